//! PRIM: SAM's mask decoder returning the IoU score (mask token 0) and the mask embedding (the
//! transformer's image tokens); SAM's own mask head stays callable as the coupled baseline.

use super::layers::{gelu, ConvTranspose2x, LayerNorm2d, Mlp};
use super::two_way::TwoWayTransformer;
use tch::{nn, nn::Init, Tensor};

/// `mask_decoder.*` except `mask_decoder.pimm`.
#[derive(Debug)]
pub struct Prim {
    pub transformer: TwoWayTransformer,
    iou_token: Tensor,
    mask_tokens: Tensor,
    iou_head: Mlp,
    upscale0: ConvTranspose2x,
    upscale1: LayerNorm2d,
    upscale3: ConvTranspose2x,
    hypernet: Vec<Mlp>,
    dim: i64,
}

/// What the two-way transformer produced for a prompt batch.
#[derive(Debug)]
pub struct PrimOutput {
    /// B×1: predicted IoU of mask 0.
    pub iou: Tensor,
    /// B×D×g×g: image tokens after the last LN4.
    pub mask_embedding: Tensor,
    /// B×(5+Ns)×D output tokens (kept for SAM's mask head).
    pub tokens: Tensor,
}

impl Prim {
    pub fn new(
        p: &nn::Path,
        dim: i64,
        depth: i64,
        heads: i64,
        mlp: i64,
        iou_hidden: i64,
        num_mask_tokens: i64,
    ) -> Prim {
        let up = p / "output_upscaling";
        let hp = p / "output_hypernetworks_mlps";
        Prim {
            transformer: TwoWayTransformer::new(&(p / "transformer"), depth, dim, heads, mlp),
            iou_token: (p / "iou_token").var("weight", &[1, dim], Init::Randn { mean: 0.0, stdev: 1.0 }),
            mask_tokens: (p / "mask_tokens").var(
                "weight",
                &[num_mask_tokens, dim],
                Init::Randn { mean: 0.0, stdev: 1.0 },
            ),
            iou_head: Mlp::new(&(p / "iou_prediction_head"), dim, iou_hidden, num_mask_tokens, 3),
            upscale0: ConvTranspose2x::new(&(&up / 0), dim, dim / 4, true),
            upscale1: LayerNorm2d::new(&(&up / 1), dim / 4, 1e-6),
            upscale3: ConvTranspose2x::new(&(&up / 3), dim / 4, dim / 8, true),
            hypernet: (0..num_mask_tokens).map(|i| Mlp::new(&(&hp / i), dim, dim, dim / 8, 3)).collect(),
            dim,
        }
    }

    /// image B×D×g×g (neck), dense_pe 1×D×g×g, sparse B×Ns×D, dense B×D×g×g.
    pub fn forward(&self, image: &Tensor, dense_pe: &Tensor, sparse: &Tensor, dense: &Tensor) -> PrimOutput {
        let b = sparse.size()[0];
        let s = image.size();
        let output_tokens =
            Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0).unsqueeze(0).expand([b, -1, -1], false);
        let tokens = Tensor::cat(&[output_tokens, sparse.to_kind(image.kind())], 1);
        let src = image.expand([b, s[1], s[2], s[3]], false) + dense;
        let pos = dense_pe.expand([b, s[1], s[2], s[3]], false);
        let (hs, keys) = self.transformer.forward(&src, &pos, &tokens);
        let iou = self.iou_head.forward(&hs.select(1, 0)).narrow(1, 0, 1);
        let mask_embedding = keys.transpose(1, 2).reshape([b, self.dim, s[2], s[3]]);
        PrimOutput { iou, mask_embedding, tokens: hs }
    }

    /// SAM's own mask head on a PRIM output: low-res logits of mask token 0, B×1×4g×4g.
    pub fn sam_mask(&self, out: &PrimOutput) -> Tensor {
        let up = gelu(&self.upscale1.forward(&self.upscale0.forward(&out.mask_embedding)));
        let up = gelu(&self.upscale3.forward(&up));
        let s = up.size();
        let hyper = self.hypernet[0].forward(&out.tokens.select(1, 1)).unsqueeze(1); // B×1×C
        hyper.matmul(&up.view([s[0], s[1], s[2] * s[3]])).view([s[0], 1, s[2], s[3]])
    }
}

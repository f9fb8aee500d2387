//! SAM's prompt encoder: random-Fourier positional encoding, point/box sparse embeddings, the
//! no-mask dense embedding and the dense PE. Never uses mask prompts (their weights exist so keys load).

use super::layers::{Conv2d, LayerNorm2d};
use tch::{nn, nn::Init, Kind, Tensor};

/// Random-Fourier positional encoding (`pe_layer.positional_encoding_gaussian_matrix`, 2×D/2).
#[derive(Debug)]
pub struct PositionEmbeddingRandom {
    pub gaussian: Tensor,
}

impl PositionEmbeddingRandom {
    fn new(p: &nn::Path, num_feats: i64) -> Self {
        // A persistent, non-trainable buffer drawn from N(0, 1), as in SAM.
        let gaussian = p.zeros_no_train("positional_encoding_gaussian_matrix", &[2, num_feats]);
        tch::no_grad(|| {
            let mut g = gaussian.shallow_clone();
            g.copy_(&Tensor::randn([2, num_feats], (Kind::Float, gaussian.device())));
        });
        PositionEmbeddingRandom { gaussian }
    }

    /// coords in [0,1] (…×2, x first) → …×D.
    fn encode(&self, coords: &Tensor) -> Tensor {
        let c = (coords * 2.0 - 1.0).matmul(&self.gaussian.to_kind(coords.kind())) * (2.0 * std::f64::consts::PI);
        Tensor::cat(&[c.sin(), c.cos()], -1)
    }

    /// Dense PE of an h×w grid at cell centres → 1×D×h×w.
    fn dense(&self, h: i64, w: i64, kind: Kind) -> Tensor {
        let dev = self.gaussian.device();
        let y = (Tensor::arange(h, (kind, dev)) + 0.5) / h as f64;
        let x = (Tensor::arange(w, (kind, dev)) + 0.5) / w as f64;
        let yy = y.view([h, 1]).expand([h, w], false);
        let xx = x.view([1, w]).expand([h, w], false);
        let pe = self.encode(&Tensor::stack(&[xx, yy], -1));
        pe.permute([2, 0, 1]).unsqueeze(0)
    }

    /// Pixel coordinates (…×2, x first) in an S×S input → …×D.
    fn encode_pixels(&self, coords: &Tensor, image_size: i64) -> Tensor {
        self.encode(&(coords / image_size as f64))
    }
}

/// SAM's PromptEncoder (variables under `prompt_encoder`).
#[derive(Debug)]
pub struct PromptEncoder {
    pe_layer: PositionEmbeddingRandom,
    point_embeddings: Vec<Tensor>,
    not_a_point_embed: Tensor,
    no_mask_embed: Tensor,
    pub embed_dim: i64,
    pub image_size: i64,
    pub grid: i64,
}

fn embedding(p: &nn::Path, dim: i64) -> Tensor {
    // torch.nn.Embedding initialises from N(0, 1).
    p.var("weight", &[1, dim], Init::Randn { mean: 0.0, stdev: 1.0 })
}

impl PromptEncoder {
    pub fn new(p: &nn::Path, embed_dim: i64, image_size: i64, grid: i64, mask_in_chans: i64) -> PromptEncoder {
        let pe_layer = PositionEmbeddingRandom::new(&(p / "pe_layer"), embed_dim / 2);
        let pp = p / "point_embeddings";
        let point_embeddings = (0..4).map(|i| embedding(&(&pp / i), embed_dim)).collect();
        // Mask-downscaling weights: created so that SAM checkpoints load by name; never run.
        let md = p / "mask_downscaling";
        let _ = Conv2d::new(&(&md / 0), 1, mask_in_chans / 4, 2, 2, 0, true);
        let _ = LayerNorm2d::new(&(&md / 1), mask_in_chans / 4, 1e-6);
        let _ = Conv2d::new(&(&md / 3), mask_in_chans / 4, mask_in_chans, 2, 2, 0, true);
        let _ = LayerNorm2d::new(&(&md / 4), mask_in_chans, 1e-6);
        let _ = Conv2d::new(&(&md / 6), mask_in_chans, embed_dim, 1, 1, 0, true);
        PromptEncoder {
            pe_layer,
            point_embeddings,
            not_a_point_embed: embedding(&(p / "not_a_point_embed"), embed_dim),
            no_mask_embed: embedding(&(p / "no_mask_embed"), embed_dim),
            embed_dim,
            image_size,
            grid,
        }
    }

    /// The dtype of the prompt encoder's parameters (follows `VarStore::set_kind`).
    pub fn no_mask_embed_kind(&self) -> Kind {
        self.no_mask_embed.kind()
    }

    /// Dense positional encoding of the embedding grid, 1×D×g×g.
    pub fn dense_pe(&self) -> Tensor {
        self.pe_layer.dense(self.grid, self.grid, self.no_mask_embed.kind())
    }

    /// Points B×N×2 (input-pixel frame, x first) with labels B×N (1 fg, 0 bg, −1 padding) → B×N'×D,
    /// N' = N+1 when `pad` (SAM appends a (0,0) padding point labelled −1 when no box is given).
    pub fn embed_points(&self, coords: &Tensor, labels: &Tensor, pad: bool) -> Tensor {
        let kind = self.no_mask_embed.kind();
        let mut points = coords.to_kind(kind) + 0.5;
        let mut labels = labels.to_kind(kind);
        if pad {
            let b = points.size()[0];
            points = Tensor::cat(&[points, Tensor::zeros([b, 1, 2], (kind, coords.device()))], 1);
            labels = Tensor::cat(&[labels, -Tensor::ones([b, 1], (kind, coords.device()))], 1);
        }
        let pe = self.pe_layer.encode_pixels(&points, self.image_size);
        let is = |v: f64| labels.eq(v).to_kind(kind).unsqueeze(-1);
        let (pad_m, neg_m, pos_m) = (is(-1.0), is(0.0), is(1.0));
        pe * (1.0 - &pad_m)
            + pad_m * &self.not_a_point_embed
            + neg_m * &self.point_embeddings[0]
            + pos_m * &self.point_embeddings[1]
    }

    /// Boxes B×4 (x0,y0,x1,y1, input-pixel frame) → B×2×D (two corner tokens).
    pub fn embed_boxes(&self, boxes: &Tensor) -> Tensor {
        let kind = self.no_mask_embed.kind();
        let corners = (boxes.to_kind(kind) + 0.5).reshape([-1, 2, 2]);
        let pe = self.pe_layer.encode_pixels(&corners, self.image_size);
        let add = Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0).unsqueeze(0);
        pe + add
    }

    /// The "no mask" dense embedding broadcast to B×D×g×g.
    pub fn no_mask_dense(&self, batch: i64) -> Tensor {
        self.no_mask_embed.reshape([1, -1, 1, 1]).expand([batch, self.embed_dim, self.grid, self.grid], false)
    }
}

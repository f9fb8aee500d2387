//! PIMM/PDMM (DeSAM §5): a U-Net-like decoder over the encoder taps with PRIM's mask embedding fused
//! once at the coarsest level. Owns only this decoder; it never sees prompts except through M.
//!
//! Generic over the tap shapes: branch d (0 = deepest, widest) takes tap L−1−d, reaches side
//! g·2^d with n_d transposed-conv ×2 steps (n_d = log2(g·2^d / tap side)), and has U/2^d channels.
//! For SAM's ViT every tap is E×g×g, which gives exactly the official layout (n = 0, 1, 2).

use super::layers::{ConvTranspose2x, Linear, TORCH_DEFAULT_WEIGHT};
use tch::{nn, Tensor};

const IN_EPS: f64 = 1e-5;

#[derive(Debug, thiserror::Error)]
pub enum PimmError {
    #[error("PIMM needs at least 2 taps, got {0}")]
    TooFewTaps(usize),
    #[error("tap {index} has side {side}, which cannot be upsampled by powers of 2 to {target}")]
    BadTapSide { index: usize, side: i64, target: i64 },
    #[error("PIMM channels {0} must be divisible by 2^(taps−1) and ≥ 16 at every level")]
    BadChannels(i64),
}

/// A bias-free convolution named `<p>.conv.weight` (MONAI's `get_conv_layer(conv_only=True)`).
#[derive(Debug)]
struct MonaiConv {
    weight: Tensor,
    padding: i64,
}

impl MonaiConv {
    fn new(p: &nn::Path, input: i64, output: i64, k: i64) -> MonaiConv {
        MonaiConv { weight: (p / "conv").var("weight", &[output, input, k, k], TORCH_DEFAULT_WEIGHT), padding: k / 2 }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, None::<&Tensor>, [1], [self.padding], [1], 1)
    }
}

fn instance_norm(x: &Tensor) -> Tensor {
    x.instance_norm(None::<&Tensor>, None::<&Tensor>, None::<&Tensor>, None::<&Tensor>, true, 0.1, IN_EPS, false)
}

fn lrelu(x: &Tensor) -> Tensor {
    x.leaky_relu()
}

/// SRB: residual block with squeeze-and-excitation (MONAI-style `UnetResSEBlock`).
#[derive(Debug)]
struct Srb {
    conv1: MonaiConv,
    conv2: MonaiConv,
    /// Created even when the shortcut is the identity (its weights are in the state dict).
    conv3: MonaiConv,
    se_fc0: Linear,
    se_fc2: Linear,
    projected: bool,
}

impl Srb {
    fn new(p: &nn::Path, input: i64, output: i64) -> Srb {
        let hidden = output / 16;
        Srb {
            conv1: MonaiConv::new(&(p / "conv1"), input, output, 3),
            conv2: MonaiConv::new(&(p / "conv2"), output, output, 3),
            conv3: MonaiConv::new(&(p / "conv3"), input, output, 1),
            se_fc0: Linear::new(&(p / "se" / "fc" / 0), output, hidden, false),
            se_fc2: Linear::new(&(p / "se" / "fc" / 2), hidden, output, false),
            projected: input != output,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = lrelu(&instance_norm(&self.conv1.forward(x)));
        let y = instance_norm(&self.conv2.forward(&y));
        let s = y.size();
        let squeeze = y.mean_dim(&[2i64, 3][..], false, None);
        let excite = self.se_fc2.forward(&self.se_fc0.forward(&squeeze).relu()).sigmoid();
        let y = y * excite.view([s[0], s[1], 1, 1]);
        let residual = if self.projected { instance_norm(&self.conv3.forward(x)) } else { x.shallow_clone() };
        lrelu(&(y + residual))
    }
}

/// "SRB + upsampling": SRB(in→out) then n × [ConvTranspose ×2, SRB(out→out)].
#[derive(Debug)]
struct PreUpBlock {
    block_init: Srb,
    ups: Vec<(ConvTranspose2x, Srb)>,
}

impl PreUpBlock {
    fn new(p: &nn::Path, input: i64, output: i64, n: usize) -> PreUpBlock {
        let rb = p / "residual_block";
        PreUpBlock {
            block_init: Srb::new(&(p / "block_init"), input, output),
            ups: (0..n)
                .map(|i| {
                    let ip = &rb / i;
                    (
                        ConvTranspose2x::new(&(&ip / 0 / "conv"), output, output, false),
                        Srb::new(&(&ip / 1), output, output),
                    )
                })
                .collect(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = self.block_init.forward(x);
        for (up, srb) in &self.ups {
            x = srb.forward(&up.forward(&x));
        }
        x
    }
}

/// ConvTranspose ×2 (in→out), concat [upsampled, skip], SRB(2·out→out).
#[derive(Debug)]
struct UpBlock {
    transp_conv: ConvTranspose2x,
    res_block: Srb,
}

impl UpBlock {
    fn new(p: &nn::Path, input: i64, output: i64) -> UpBlock {
        UpBlock {
            transp_conv: ConvTranspose2x::new(&(p / "transp_conv" / "conv"), input, output, false),
            res_block: Srb::new(&(p / "res_block"), 2 * output, output),
        }
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> Tensor {
        let up = self.transp_conv.forward(x);
        let skip = broadcast_batch(skip, up.size()[0]);
        self.res_block.forward(&Tensor::cat(&[up, skip], 1))
    }
}

/// A batch-1 tensor expanded to batch `n` (unchanged when it already has batch n).
pub(crate) fn broadcast_batch(t: &Tensor, n: i64) -> Tensor {
    let mut s = t.size();
    if s[0] == n {
        return t.shallow_clone();
    }
    s[0] = n;
    t.expand(&s, false)
}

/// The prompt-independent part of PIMM for a batch of images: the outputs of the context branches,
/// deep → shallow (branch d is U/2^d × g·2^d × g·2^d).
#[derive(Debug)]
pub struct PimmContext {
    pub branches: Vec<Tensor>,
}

impl PimmContext {
    pub fn batch_size(&self) -> i64 {
        self.branches[0].size()[0]
    }
    /// Rows `start..start+len`, sharing storage.
    pub fn narrow(&self, start: i64, len: i64) -> PimmContext {
        PimmContext { branches: self.branches.iter().map(|t| t.narrow(0, start, len)).collect() }
    }
}

/// `mask_decoder.pimm`.
#[derive(Debug)]
pub struct Pimm {
    context: Vec<PreUpBlock>,
    fusion: Srb,
    localization: Vec<UpBlock>,
    /// Final 1×1 head (the last `seg_outputs.*`); the earlier deep-supervision heads exist but are unused.
    head: MonaiConvPlain,
    tap_shapes: Vec<(i64, i64)>,
    output_size: i64,
}

/// A bias-free 1×1 conv named `<p>.weight` (`seg_outputs.*` are plain Conv2d).
#[derive(Debug)]
struct MonaiConvPlain {
    weight: Tensor,
}

impl Pimm {
    /// `tap_shapes`: (channels, side) per tap, shallow → deep; `channels`: U = D (the mask
    /// embedding's width); `grid`: the mask embedding's side g (must equal the deepest tap's side).
    pub fn new(p: &nn::Path, tap_shapes: &[(i64, i64)], channels: i64, grid: i64) -> Result<Pimm, PimmError> {
        let l = tap_shapes.len();
        if l < 2 {
            return Err(PimmError::TooFewTaps(l));
        }
        let ladder: Vec<i64> = (0..l).map(|d| channels >> d).collect();
        if ladder.iter().enumerate().any(|(d, &c)| c << d != channels || c < 16) {
            return Err(PimmError::BadChannels(channels));
        }
        let cp = p / "conv_blocks_context";
        let mut context = Vec::with_capacity(l);
        for d in 0..l {
            let index = l - 1 - d;
            let (c, side) = tap_shapes[index];
            let target = grid << d;
            let ratio = target / side.max(1);
            if side <= 0 || target % side != 0 || !(ratio as u64).is_power_of_two() {
                return Err(PimmError::BadTapSide { index, side, target });
            }
            context.push(PreUpBlock::new(&(&cp / d), c, ladder[d], ratio.trailing_zeros() as usize));
        }
        let lp = p / "conv_blocks_localization";
        let localization = (0..l - 1).map(|i| UpBlock::new(&(&lp / i), ladder[i], ladder[i + 1])).collect();
        let sp = p / "seg_outputs";
        let mut heads: Vec<MonaiConvPlain> = (0..l - 1)
            .map(|i| MonaiConvPlain {
                weight: (&sp / i).var("weight", &[1, ladder[i + 1], 1, 1], TORCH_DEFAULT_WEIGHT),
            })
            .collect();
        Ok(Pimm {
            context,
            fusion: Srb::new(&(p / "mask_embedding_fusion"), 2 * channels, channels),
            localization,
            head: heads.pop().expect("l ≥ 2"),
            tap_shapes: tap_shapes.to_vec(),
            output_size: grid << (l - 1),
        })
    }

    pub fn tap_shapes(&self) -> &[(i64, i64)] {
        &self.tap_shapes
    }

    /// Side of the logits (g·2^(L−1)).
    pub fn output_size(&self) -> i64 {
        self.output_size
    }

    /// Prompt-independent branches from the taps (shallow → deep), computed once per image.
    pub fn context(&self, taps: &[Tensor]) -> PimmContext {
        let l = self.context.len();
        assert_eq!(taps.len(), l, "PIMM built for {l} taps");
        PimmContext { branches: (0..l).map(|d| self.context[d].forward(&taps[l - 1 - d])).collect() }
    }

    /// Prompt-dependent part: fuse M (B×U×g×g, first in the concat) with the context, run the
    /// up-blocks and the head → logits B×1×(g·2^(L−1))². A batch-1 context is broadcast to B.
    pub fn decode(&self, ctx: &PimmContext, mask_embedding: &Tensor) -> Tensor {
        let b = mask_embedding.size()[0];
        let c0 = broadcast_batch(&ctx.branches[0], b);
        let mut x = self.fusion.forward(&Tensor::cat(&[mask_embedding, &c0], 1));
        for (i, up) in self.localization.iter().enumerate() {
            x = up.forward(&x, &ctx.branches[i + 1]);
        }
        x.conv2d(&self.head.weight, None::<&Tensor>, [1], [0], [1], 1)
    }

    /// Full forward (context + decode).
    pub fn forward(&self, taps: &[Tensor], mask_embedding: &Tensor) -> Tensor {
        self.decode(&self.context(taps), mask_embedding)
    }
}

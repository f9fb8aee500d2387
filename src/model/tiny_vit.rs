//! LiteMedSAM's TinyViT image encoder (inference only, BatchNorm in eval mode) with multi-scale taps.
//! Must not load files or normalise images: weights come through the VarStore, input is [0,1] RGB.

use super::backbone::{Backbone, Features};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

const IMAGE_SIZE: i64 = 256;
const EMBED_DIMS: [i64; 4] = [64, 128, 160, 320];
const DEPTHS: [usize; 4] = [2, 2, 6, 2];
const HEADS: [i64; 4] = [2, 4, 5, 10];
const WINDOWS: [i64; 4] = [7, 7, 14, 7];
const MLP_RATIO: i64 = 4;
const MBCONV_EXPAND: i64 = 4;
const LOCAL_CONV: i64 = 3;
const NECK_DIM: i64 = 256;
/// The embedding grid (the neck runs at 64×64 whatever the stage strides say).
const GRID: i64 = 64;

/// Convolution without bias followed by BatchNorm (the state dict's `.c` / `.bn` pairs).
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ConvBn {
    fn new(p: &nn::Path, cin: i64, cout: i64, kernel: i64, stride: i64, padding: i64, groups: i64) -> Self {
        let cfg = nn::ConvConfig { stride, padding, groups, bias: false, ..Default::default() };
        ConvBn {
            conv: nn::conv2d(p / "c", cin, cout, kernel, cfg),
            bn: nn::batch_norm2d(p / "bn", cout, Default::default()),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.bn.forward_t(&self.conv.forward(x), false)
    }
}

fn gelu(x: &Tensor) -> Tensor {
    x.gelu("none")
}

/// Inverted residual block of stage 0 (1×1 expand, 3×3 depthwise, 1×1 project, residual).
#[derive(Debug)]
struct MbConv {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl MbConv {
    fn new(p: &nn::Path, dim: i64) -> Self {
        let hidden = dim * MBCONV_EXPAND;
        MbConv {
            conv1: ConvBn::new(&(p / "conv1"), dim, hidden, 1, 1, 0, 1),
            conv2: ConvBn::new(&(p / "conv2"), hidden, hidden, 3, 1, 1, hidden),
            conv3: ConvBn::new(&(p / "conv3"), hidden, dim, 1, 1, 0, 1),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = gelu(&self.conv1.forward(x));
        let y = gelu(&self.conv2.forward(&y));
        gelu(&(self.conv3.forward(&y) + x))
    }
}

/// Stage transition: 1×1 conv, depthwise 3×3 (stride 2, except into the 320-wide last stages,
/// where LiteMedSAM keeps the 64×64 grid), 1×1 conv. NCHW in, NCHW out.
#[derive(Debug)]
struct PatchMerging {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl PatchMerging {
    fn new(p: &nn::Path, dim: i64, out: i64) -> Self {
        let stride = if matches!(out, 320 | 448 | 576) { 1 } else { 2 };
        PatchMerging {
            conv1: ConvBn::new(&(p / "conv1"), dim, out, 1, 1, 0, 1),
            conv2: ConvBn::new(&(p / "conv2"), out, out, 3, stride, 1, out),
            conv3: ConvBn::new(&(p / "conv3"), out, out, 1, 1, 0, 1),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = gelu(&self.conv1.forward(x));
        let y = gelu(&self.conv2.forward(&y));
        self.conv3.forward(&y)
    }
}

/// Window attention with learned biases per (|dy|, |dx|) offset and head.
#[derive(Debug)]
struct Attention {
    norm: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    attention_biases: Tensor,
    /// (N·N) offset index for every query/key pair of a window (not a weight: rebuilt here).
    bias_index: Tensor,
    heads: i64,
    key_dim: i64,
    tokens: i64,
}

impl Attention {
    fn new(p: &nn::Path, dim: i64, heads: i64, window: i64) -> Self {
        let key_dim = dim / heads;
        let points: Vec<(i64, i64)> = (0..window).flat_map(|i| (0..window).map(move |j| (i, j))).collect();
        let mut offsets: Vec<(i64, i64)> = Vec::new();
        let mut index = Vec::with_capacity(points.len() * points.len());
        for a in &points {
            for b in &points {
                let off = ((a.0 - b.0).abs(), (a.1 - b.1).abs());
                let i = offsets.iter().position(|o| *o == off).unwrap_or_else(|| {
                    offsets.push(off);
                    offsets.len() - 1
                });
                index.push(i as i64);
            }
        }
        Attention {
            norm: nn::layer_norm(p / "norm", vec![dim], Default::default()),
            qkv: nn::linear(p / "qkv", dim, 3 * dim, Default::default()),
            proj: nn::linear(p / "proj", dim, dim, Default::default()),
            attention_biases: p.zeros("attention_biases", &[heads, offsets.len() as i64]),
            bias_index: Tensor::from_slice(&index).to_device(p.device()),
            heads,
            key_dim,
            tokens: points.len() as i64,
        }
    }

    /// x: (B, N, C) → (B, N, C).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, _) = x.size3().unwrap();
        let kd = self.key_dim;
        // Each head's slice of the projection holds its q, k and v one after the other.
        let qkv = self.qkv.forward(&self.norm.forward(x)).view([b, n, self.heads, 3 * kd]);
        let q = qkv.narrow(3, 0, kd).permute([0, 2, 1, 3]);
        let k = qkv.narrow(3, kd, kd).permute([0, 2, 1, 3]);
        let v = qkv.narrow(3, 2 * kd, kd).permute([0, 2, 1, 3]);
        let bias = self.attention_biases.index_select(1, &self.bias_index).view([self.heads, self.tokens, self.tokens]);
        let attn = q.matmul(&k.transpose(-2, -1)) * (kd as f64).powf(-0.5) + bias;
        let attn = attn.softmax(-1, attn.kind());
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, n, self.heads * kd]);
        self.proj.forward(&y)
    }
}

#[derive(Debug)]
struct Mlp {
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    fn new(p: &nn::Path, dim: i64) -> Self {
        Mlp {
            norm: nn::layer_norm(p / "norm", vec![dim], Default::default()),
            fc1: nn::linear(p / "fc1", dim, dim * MLP_RATIO, Default::default()),
            fc2: nn::linear(p / "fc2", dim * MLP_RATIO, dim, Default::default()),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&gelu(&self.fc1.forward(&self.norm.forward(x))))
    }
}

/// Windowed attention + depthwise local conv + MLP, on (B, H·W, C) tokens.
#[derive(Debug)]
struct Block {
    attn: Attention,
    local_conv: ConvBn,
    mlp: Mlp,
    window: i64,
    side: i64,
}

impl Block {
    fn new(p: &nn::Path, dim: i64, side: i64, heads: i64, window: i64) -> Self {
        Block {
            attn: Attention::new(&(p / "attn"), dim, heads, window),
            local_conv: ConvBn::new(&(p / "local_conv"), dim, dim, LOCAL_CONV, 1, LOCAL_CONV / 2, dim),
            mlp: Mlp::new(&(p / "mlp"), dim),
            window,
            side,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, l, c) = x.size3().unwrap();
        let (h, w, ws) = (self.side, self.side, self.window);
        let attended = if h == ws && w == ws {
            self.attn.forward(x)
        } else {
            // Zero-pad bottom/right to whole windows; the padding tokens are ordinary keys.
            let pad_b = (ws - h % ws) % ws;
            let pad_r = (ws - w % ws) % ws;
            let (ph, pw) = (h + pad_b, w + pad_r);
            let (nh, nw) = (ph / ws, pw / ws);
            let grid = x.view([b, h, w, c]).constant_pad_nd([0, 0, 0, pad_r, 0, pad_b]);
            let windows = grid.view([b, nh, ws, nw, ws, c]).transpose(2, 3).reshape([b * nh * nw, ws * ws, c]);
            let y = self.attn.forward(&windows);
            let y = y.view([b, nh, nw, ws, ws, c]).transpose(2, 3).reshape([b, ph, pw, c]);
            y.narrow(1, 0, h).narrow(2, 0, w).contiguous().view([b, l, c])
        };
        let x = x + attended;
        let x = x.transpose(1, 2).reshape([b, c, h, w]);
        let x = self.local_conv.forward(&x).view([b, c, l]).transpose(1, 2);
        &x + self.mlp.forward(&x)
    }
}

/// LayerNorm over channels at each pixel (SAM's LayerNorm2d, eps 1e-6).
#[derive(Debug)]
struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm2d {
    fn new(p: &nn::Path, c: i64) -> Self {
        LayerNorm2d { weight: p.ones("weight", &[c]), bias: p.zeros("bias", &[c]) }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let u = x.mean_dim(1, true, x.kind());
        let d = x - &u;
        let s = d.square().mean_dim(1, true, x.kind());
        let y = d / (s + 1e-6).sqrt();
        y * self.weight.view([-1, 1, 1]) + self.bias.view([-1, 1, 1])
    }
}

#[derive(Debug)]
struct Stage {
    blocks: Vec<Block>,
    downsample: Option<PatchMerging>,
}

/// (B, H·W, C) tokens → (B, C, H, W).
fn tokens_to_map(x: &Tensor, side: i64) -> Tensor {
    let (b, _, c) = x.size3().unwrap();
    x.transpose(1, 2).reshape([b, c, side, side])
}

/// (B, C, H, W) → (B, H·W, C) tokens.
fn map_to_tokens(x: &Tensor) -> Tensor {
    x.flatten(2, 3).transpose(1, 2)
}

/// LiteMedSAM's TinyViT (image 256, embeddings 256×64×64). Variables are created under `p`
/// with the exact state-dict names of `image_encoder.*` in `lite_medsam.pth`.
#[derive(Debug)]
pub struct TinyVit {
    patch_embed: (ConvBn, ConvBn),
    stage0: (Vec<MbConv>, PatchMerging),
    stages: Vec<Stage>,
    neck: (nn::Conv2D, LayerNorm2d, nn::Conv2D, LayerNorm2d),
}

// SAFETY: forward only reads the parameter tensors (libtorch ops on shared read-only tensors are
// thread-safe); nothing mutates them after loading, which happens before the model is shared.
unsafe impl Sync for TinyVit {}

impl TinyVit {
    pub fn new(p: &nn::Path) -> TinyVit {
        let pe = p / "patch_embed" / "seq";
        let patch_embed = (
            ConvBn::new(&(&pe / "0"), 3, EMBED_DIMS[0] / 2, 1, 1, 0, 1),
            ConvBn::new(&(&pe / "2"), EMBED_DIMS[0] / 2, EMBED_DIMS[0], 1, 1, 0, 1),
        );
        let l0 = p / "layers" / "0";
        let stage0 = (
            (0..DEPTHS[0]).map(|j| MbConv::new(&(&l0 / "blocks" / j), EMBED_DIMS[0])).collect(),
            PatchMerging::new(&(&l0 / "downsample"), EMBED_DIMS[0], EMBED_DIMS[1]),
        );
        let stages = (1..4)
            .map(|i| {
                let li = p / "layers" / i;
                // Input side of stage i: 256/2^i, but stage 3 follows a stride-1 merge.
                let side = IMAGE_SIZE >> (if i == 3 { i - 1 } else { i });
                Stage {
                    blocks: (0..DEPTHS[i])
                        .map(|j| Block::new(&(&li / "blocks" / j), EMBED_DIMS[i], side, HEADS[i], WINDOWS[i]))
                        .collect(),
                    downsample: (i < 3)
                        .then(|| PatchMerging::new(&(&li / "downsample"), EMBED_DIMS[i], EMBED_DIMS[i + 1])),
                }
            })
            .collect();
        let n = p / "neck";
        let no_bias = |pad| nn::ConvConfig { padding: pad, bias: false, ..Default::default() };
        let neck = (
            nn::conv2d(&n / "0", EMBED_DIMS[3], NECK_DIM, 1, no_bias(0)),
            LayerNorm2d::new(&(&n / "1"), NECK_DIM),
            nn::conv2d(&n / "2", NECK_DIM, NECK_DIM, 3, no_bias(1)),
            LayerNorm2d::new(&(&n / "3"), NECK_DIM),
        );
        TinyVit { patch_embed, stage0, stages, neck }
    }
}

impl Backbone for TinyVit {
    /// images: B×3×256×256 in [0,1] → taps [B×128×128², B×160×64², B×320×64²], neck B×256×64².
    fn forward(&self, images: &Tensor) -> Features {
        let x = gelu(&self.patch_embed.0.forward(images));
        let mut x = self.patch_embed.1.forward(&x);
        for block in &self.stage0.0 {
            x = block.forward(&x);
        }
        let x = self.stage0.1.forward(&x);
        let mut taps = vec![x.shallow_clone()];
        let mut tokens = map_to_tokens(&x);
        for (i, stage) in self.stages.iter().enumerate() {
            for block in &stage.blocks {
                tokens = block.forward(&tokens);
            }
            if let Some(down) = &stage.downsample {
                let side = block_side(&stage.blocks);
                let merged = down.forward(&tokens_to_map(&tokens, side));
                if i < 2 {
                    taps.push(merged.shallow_clone());
                }
                tokens = map_to_tokens(&merged);
            }
        }
        let x = tokens_to_map(&tokens, GRID);
        let (c0, n1, c2, n3) = &self.neck;
        let neck = n3.forward(&c2.forward(&n1.forward(&c0.forward(&x))));
        Features { taps, neck }
    }
    fn image_size(&self) -> i64 {
        IMAGE_SIZE
    }
    fn tap_shapes(&self) -> Vec<(i64, i64)> {
        vec![(EMBED_DIMS[1], IMAGE_SIZE / 2), (EMBED_DIMS[2], GRID), (EMBED_DIMS[3], GRID)]
    }
}

fn block_side(blocks: &[Block]) -> i64 {
    blocks.first().map(|b| b.side).unwrap_or(GRID)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn shapes_and_state_dict_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = TinyVit::new(&(vs.root() / "image_encoder"));
        let vars = vs.variables();
        // lite_medsam.pth has 435 tensors; the image encoder's share, minus the 41 BN counters.
        assert!(vars.contains_key("image_encoder.layers.2.blocks.5.attn.attention_biases"));
        assert_eq!(vars["image_encoder.layers.2.blocks.5.attn.attention_biases"].size(), [5, 196]);
        assert_eq!(vars["image_encoder.layers.1.blocks.0.attn.attention_biases"].size(), [4, 49]);
        assert!(vars.contains_key("image_encoder.layers.0.downsample.conv2.bn.running_var"));
        assert!(vars.contains_key("image_encoder.neck.3.bias"));
        let f = tch::no_grad(|| net.forward(&Tensor::rand([1, 3, 256, 256], (Kind::Float, Device::Cpu))));
        let shapes: Vec<Vec<i64>> = f.taps.iter().map(|t| t.size()).collect();
        assert_eq!(shapes, [vec![1, 128, 128, 128], vec![1, 160, 64, 64], vec![1, 320, 64, 64]]);
        assert_eq!(f.neck.size(), [1, 256, 64, 64]);
        for ((c, s), t) in net.tap_shapes().into_iter().zip(&f.taps) {
            assert_eq!((t.size()[1], t.size()[2]), (c, s));
        }
    }
}

//! SAM's ImageEncoderViT with DeSAM's taps (outputs of every global block but the last) and the neck.
//! Owns the ViT forward only; knows nothing of prompts, decoders or checkpoint files.

use super::backbone::{Backbone, Features};
use super::config::VitConfig;
use super::layers::{gelu, Conv2d, LayerNorm, LayerNorm2d, Linear};
use tch::{nn, nn::Init, Tensor};

/// Relative-position embeddings R[i,j] = table[i − j + S − 1] for a span of `size` tokens
/// (query and key spans are equal in SAM, so no interpolation is needed). Returns size×size×C.
pub fn get_rel_pos(size: i64, table: &Tensor) -> Tensor {
    let device = table.device();
    let q = Tensor::arange(size, (tch::Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange(size, (tch::Kind::Int64, device)).unsqueeze(0);
    let idx = (q - k + (size - 1)).flatten(0, 1);
    table.index_select(0, &idx).view([size, size, -1])
}

/// Adds the decomposed rel-pos bias to `attn` (B·heads × (h·w) × (h·w)), using the unscaled `q`
/// (B·heads × (h·w) × C).
pub fn add_decomposed_rel_pos(attn: &Tensor, q: &Tensor, rel_h: &Tensor, rel_w: &Tensor, h: i64, w: i64) -> Tensor {
    let rh = get_rel_pos(h, rel_h);
    let rw = get_rel_pos(w, rel_w);
    let b = q.size()[0];
    let dim = q.size()[2];
    let r_q = q.reshape([b, h, w, dim]);
    let bias_h = Tensor::einsum("bhwc,hkc->bhwk", &[&r_q, &rh], None::<i64>);
    let bias_w = Tensor::einsum("bhwc,wkc->bhwk", &[&r_q, &rw], None::<i64>);
    (attn.view([b, h, w, h, w]) + bias_h.unsqueeze(-1) + bias_w.unsqueeze(-2)).view([b, h * w, h * w])
}

/// Zero-pads a B×H×W×C map bottom/right to a multiple of `ws` and cuts it into ws×ws windows.
/// Returns (windows (B·nW)×ws×ws×C, (Hp, Wp)).
pub fn window_partition(x: &Tensor, ws: i64) -> (Tensor, (i64, i64)) {
    let s = x.size();
    let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
    let ph = (ws - h % ws) % ws;
    let pw = (ws - w % ws) % ws;
    let x = if ph > 0 || pw > 0 { x.constant_pad_nd([0, 0, 0, pw, 0, ph]) } else { x.shallow_clone() };
    let (hp, wp) = (h + ph, w + pw);
    let windows =
        x.view([b, hp / ws, ws, wp / ws, ws, c]).permute([0, 1, 3, 2, 4, 5]).contiguous().view([-1, ws, ws, c]);
    (windows, (hp, wp))
}

/// Inverse of [`window_partition`]: reassembles windows into B×Hp×Wp×C and crops to h×w.
pub fn window_unpartition(windows: &Tensor, ws: i64, pad_hw: (i64, i64), hw: (i64, i64)) -> Tensor {
    let (hp, wp) = pad_hw;
    let (h, w) = hw;
    let b = windows.size()[0] / (hp * wp / ws / ws);
    let x =
        windows.view([b, hp / ws, wp / ws, ws, ws, -1]).permute([0, 1, 3, 2, 4, 5]).contiguous().view([b, hp, wp, -1]);
    if hp > h || wp > w {
        x.narrow(1, 0, h).narrow(2, 0, w).contiguous()
    } else {
        x
    }
}

/// Largest attention-logit slice computed at once (elements): 64 Mi = 256 MB in f32.
const ATTENTION_CHUNK_ELEMENTS: i64 = 64 << 20;

#[derive(Debug)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    heads: i64,
    scale: f64,
}

impl Attention {
    fn new(p: &nn::Path, dim: i64, heads: i64, span: i64) -> Attention {
        let head_dim = dim / heads;
        Attention {
            qkv: Linear::new(&(p / "qkv"), dim, 3 * dim, true),
            proj: Linear::new(&(p / "proj"), dim, dim, true),
            rel_pos_h: p.var("rel_pos_h", &[2 * span - 1, head_dim], Init::Const(0.0)),
            rel_pos_w: p.var("rel_pos_w", &[2 * span - 1, head_dim], Init::Const(0.0)),
            heads,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    /// x: B×H×W×C (channels-last).
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (b, h, w) = (s[0], s[1], s[2]);
        let qkv = self.qkv.forward(x).reshape([b, h * w, 3, self.heads, -1]).permute([2, 0, 3, 1, 4]);
        let qkv = qkv.reshape([3, b * self.heads, h * w, -1]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let out = self.attend_sliced(&q, &k, &v, h, w, ATTENTION_CHUNK_ELEMENTS);
        let out = out.view([b, self.heads, h, w, -1]).permute([0, 2, 3, 1, 4]).reshape([b, h, w, -1]);
        self.proj.forward(&out)
    }

    /// Attention of q, k, v ((B·heads)×N×C) with at most `chunk_elements` logits live at once.
    fn attend_sliced(&self, q: &Tensor, k: &Tensor, v: &Tensor, h: i64, w: i64, chunk_elements: i64) -> Tensor {
        // Global attention over 4096 tokens makes (B·heads)×N×N logits (805 MB per ViT-B image in
        // f32, three live copies at peak); slices of the batch·head axis bound that peak and give
        // the same numbers up to float rounding (bit-identical on ViT-B here).
        let bh = q.size()[0];
        let n = h * w;
        let step = (chunk_elements / (n * n)).clamp(1, bh);
        if step >= bh {
            self.attend(q, k, v, h, w)
        } else {
            let parts: Vec<Tensor> = (0..bh)
                .step_by(step as usize)
                .map(|s| {
                    let len = step.min(bh - s);
                    self.attend(&q.narrow(0, s, len), &k.narrow(0, s, len), &v.narrow(0, s, len), h, w)
                })
                .collect();
            Tensor::cat(&parts, 0)
        }
    }

    /// softmax((q·scale)·kᵀ + rel-pos(q)) · v for a slice of the batch·head axis.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, h: i64, w: i64) -> Tensor {
        let attn = (q * self.scale).matmul(&k.transpose(-2, -1));
        let attn = add_decomposed_rel_pos(&attn, q, &self.rel_pos_h, &self.rel_pos_w, h, w);
        attn.softmax(-1, attn.kind()).matmul(v)
    }
}

#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    /// 0 = global attention.
    window: i64,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Tensor {
        let shortcut = x;
        let y = self.norm1.forward(x);
        let y = if self.window > 0 {
            let s = y.size();
            let (h, w) = (s[1], s[2]);
            let (win, pad_hw) = window_partition(&y, self.window);
            let out = self.attn.forward(&win);
            window_unpartition(&out, self.window, pad_hw, (h, w))
        } else {
            self.attn.forward(&y)
        };
        let x = shortcut + y;
        let m = self.lin2.forward(&gelu(&self.lin1.forward(&self.norm2.forward(&x))));
        x + m
    }
}

/// SAM's ViT image encoder returning DeSAM's taps and the neck.
#[derive(Debug)]
pub struct ImageEncoderVit {
    patch_embed: Conv2d,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck0: Conv2d,
    neck1: LayerNorm2d,
    neck2: Conv2d,
    neck3: LayerNorm2d,
    tapped: Vec<usize>,
    image_size: i64,
    embed_dim: i64,
    grid: i64,
}

impl ImageEncoderVit {
    /// Creates the variables under `p` (e.g. root/"image_encoder") with SAM's state-dict names.
    pub fn new(p: &nn::Path, cfg: &VitConfig, image_size: i64, patch: i64, out_chans: i64) -> ImageEncoderVit {
        let e = cfg.embed_dim;
        let grid = image_size / patch;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let bp = p / "blocks" / i;
                let global = cfg.global_indices.contains(&i);
                let window = if global { 0 } else { cfg.window };
                let span = if global { grid } else { cfg.window };
                Block {
                    norm1: LayerNorm::new(&(&bp / "norm1"), e, cfg.layer_norm_eps),
                    attn: Attention::new(&(&bp / "attn"), e, cfg.heads, span),
                    norm2: LayerNorm::new(&(&bp / "norm2"), e, cfg.layer_norm_eps),
                    lin1: Linear::new(&(&bp / "mlp" / "lin1"), e, e * cfg.mlp_ratio, true),
                    lin2: Linear::new(&(&bp / "mlp" / "lin2"), e * cfg.mlp_ratio, e, true),
                    window,
                }
            })
            .collect();
        let neck = p / "neck";
        let n = cfg.global_indices.len();
        ImageEncoderVit {
            patch_embed: Conv2d::new(&(p / "patch_embed" / "proj"), 3, e, patch, patch, 0, true),
            pos_embed: p.var("pos_embed", &[1, grid, grid, e], Init::Const(0.0)),
            blocks,
            neck0: Conv2d::new(&(&neck / 0), e, out_chans, 1, 1, 0, false),
            neck1: LayerNorm2d::new(&(&neck / 1), out_chans, 1e-6),
            neck2: Conv2d::new(&(&neck / 2), out_chans, out_chans, 3, 1, 1, false),
            neck3: LayerNorm2d::new(&(&neck / 3), out_chans, 1e-6),
            tapped: cfg.global_indices[..n.saturating_sub(1)].iter().map(|&i| i as usize).collect(),
            image_size,
            embed_dim: e,
            grid,
        }
    }
}

// SAFETY: the encoder's tensors are parameters that `forward` only reads; libtorch allows
// concurrent reads of a tensor from several threads. Nothing mutates them outside `&mut VarStore`.
unsafe impl Sync for ImageEncoderVit {}

impl Backbone for ImageEncoderVit {
    fn forward(&self, images: &Tensor) -> Features {
        let mut x = self.patch_embed.forward(images).permute([0, 2, 3, 1]) + &self.pos_embed;
        let mut taps = Vec::with_capacity(self.tapped.len());
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x);
            if self.tapped.contains(&i) {
                taps.push(x.permute([0, 3, 1, 2]).contiguous());
            }
        }
        let x = x.permute([0, 3, 1, 2]);
        let neck = self.neck3.forward(&self.neck2.forward(&self.neck1.forward(&self.neck0.forward(&x))));
        Features { taps, neck }
    }

    fn image_size(&self) -> i64 {
        self.image_size
    }

    fn tap_shapes(&self) -> Vec<(i64, i64)> {
        vec![(self.embed_dim, self.grid); self.tapped.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn rel_pos_indexing_follows_i_minus_j() {
        // table row r holds the value r, so R[i,j] = i − j + S − 1.
        let s = 4;
        let table = Tensor::arange(2 * s - 1, (Kind::Float, Device::Cpu)).unsqueeze(1);
        let r = get_rel_pos(s, &table).squeeze_dim(2);
        for i in 0..s {
            for j in 0..s {
                assert_eq!(r.double_value(&[i, j]), (i - j + s - 1) as f64);
            }
        }
    }

    #[test]
    fn window_partition_pads_and_unpartition_inverts() {
        tch::manual_seed(1);
        let x = Tensor::randn([2, 8, 7, 5], (Kind::Float, Device::Cpu));
        let (win, pad) = window_partition(&x, 3);
        assert_eq!(pad, (9, 9));
        assert_eq!(win.size(), vec![2 * 9, 3, 3, 5]);
        // Window 0 of batch 0 is the top-left 3×3 block.
        assert!(win.get(0).equal(&x.get(0).narrow(0, 0, 3).narrow(1, 0, 3)));
        // The last window of batch 0 holds padded zeros in its last row.
        assert_eq!(win.get(8).get(2).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let back = window_unpartition(&win, 3, pad, (8, 7));
        assert!(back.equal(&x));
    }

    #[test]
    fn sliced_attention_equals_whole_attention() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let attn = Attention::new(&vs.root(), 16, 4, 5);
        tch::no_grad(|| {
            for t in [&attn.rel_pos_h, &attn.rel_pos_w] {
                t.shallow_clone().copy_(&Tensor::randn(t.size(), (Kind::Float, Device::Cpu)));
            }
        });
        let (h, w) = (5, 5);
        let qkv = Tensor::randn([3, 8, h * w, 4], (Kind::Float, Device::Cpu));
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let whole = attn.attend_sliced(&q, &k, &v, h, w, i64::MAX);
        let sliced = attn.attend_sliced(&q, &k, &v, h, w, 3 * 625);
        let diff = (&whole - &sliced).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{diff}");
        assert_eq!(whole.size(), vec![8, 25, 4]);
    }

    #[test]
    fn rel_pos_bias_adds_q_dot_table() {
        tch::manual_seed(2);
        let (h, w, c) = (2, 3, 4);
        let q = Tensor::randn([1, h * w, c], (Kind::Double, Device::Cpu));
        let th = Tensor::randn([2 * h - 1, c], (Kind::Double, Device::Cpu));
        let tw = Tensor::randn([2 * w - 1, c], (Kind::Double, Device::Cpu));
        let zero = Tensor::zeros([1, h * w, h * w], (Kind::Double, Device::Cpu));
        let out = add_decomposed_rel_pos(&zero, &q, &th, &tw, h, w);
        // Query (1,2) against key (0,1): q·th[1−0+h−1] + q·tw[2−1+w−1].
        let (qh, qw, kh, kw) = (1, 2, 0, 1);
        let qv = q.get(0).get(qh * w + qw);
        let expect = qv.dot(&th.get(qh - kh + h - 1)) + qv.dot(&tw.get(qw - kw + w - 1));
        let got = out.double_value(&[0, qh * w + qw, kh * w + kw]);
        assert!((got - expect.double_value(&[])).abs() < 1e-12);
    }
}

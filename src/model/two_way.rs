//! SAM's two-way transformer (tokens ↔ image tokens), exactly as in segment-anything: layer 0 has no
//! residual/PE on self-attention, cross-attentions downsample ×2, ReLU MLP, final attention + norm.

use super::layers::{LayerNorm, Linear};
use tch::{nn, Tensor};

const LN_EPS: f64 = 1e-5;

#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl Attention {
    pub fn new(p: &nn::Path, dim: i64, heads: i64, downsample: i64) -> Attention {
        let inner = dim / downsample;
        Attention {
            q_proj: Linear::new(&(p / "q_proj"), dim, inner, true),
            k_proj: Linear::new(&(p / "k_proj"), dim, inner, true),
            v_proj: Linear::new(&(p / "v_proj"), dim, inner, true),
            out_proj: Linear::new(&(p / "out_proj"), inner, dim, true),
            heads,
        }
    }

    fn separate(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        x.reshape([s[0], s[1], self.heads, s[2] / self.heads]).transpose(1, 2)
    }

    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let q = self.separate(&self.q_proj.forward(q));
        let k = self.separate(&self.k_proj.forward(k));
        let v = self.separate(&self.v_proj.forward(v));
        let c = q.size()[3];
        let attn = q.matmul(&k.transpose(2, 3)) / (c as f64).sqrt();
        let attn = attn.softmax(-1, attn.kind());
        let out = attn.matmul(&v);
        let s = out.size();
        let out = out.transpose(1, 2).reshape([s[0], s[2], s[1] * s[3]]);
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct TwoWayBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_token_to_image: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    norm3: LayerNorm,
    norm4: LayerNorm,
    cross_image_to_token: Attention,
    skip_first_pe: bool,
}

impl TwoWayBlock {
    fn forward(&self, queries: &Tensor, keys: &Tensor, query_pe: &Tensor, key_pe: &Tensor) -> (Tensor, Tensor) {
        let queries = if self.skip_first_pe {
            self.self_attn.forward(queries, queries, queries)
        } else {
            let q = queries + query_pe;
            queries + self.self_attn.forward(&q, &q, queries)
        };
        let queries = self.norm1.forward(&queries);

        let q = &queries + query_pe;
        let k = keys + key_pe;
        let queries = self.norm2.forward(&(&queries + self.cross_token_to_image.forward(&q, &k, keys)));

        let mlp = self.lin2.forward(&self.lin1.forward(&queries).relu());
        let queries = self.norm3.forward(&(queries + mlp));

        let q = &queries + query_pe;
        let keys = self.norm4.forward(&(keys + self.cross_image_to_token.forward(&k, &q, &queries)));
        (queries, keys)
    }
}

/// `mask_decoder.transformer`.
#[derive(Debug)]
pub struct TwoWayTransformer {
    layers: Vec<TwoWayBlock>,
    final_attn: Attention,
    norm_final: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(p: &nn::Path, depth: i64, dim: i64, heads: i64, mlp_dim: i64) -> TwoWayTransformer {
        let layers = (0..depth)
            .map(|i| {
                let lp = p / "layers" / i;
                TwoWayBlock {
                    self_attn: Attention::new(&(&lp / "self_attn"), dim, heads, 1),
                    norm1: LayerNorm::new(&(&lp / "norm1"), dim, LN_EPS),
                    cross_token_to_image: Attention::new(&(&lp / "cross_attn_token_to_image"), dim, heads, 2),
                    norm2: LayerNorm::new(&(&lp / "norm2"), dim, LN_EPS),
                    lin1: Linear::new(&(&lp / "mlp" / "lin1"), dim, mlp_dim, true),
                    lin2: Linear::new(&(&lp / "mlp" / "lin2"), mlp_dim, dim, true),
                    norm3: LayerNorm::new(&(&lp / "norm3"), dim, LN_EPS),
                    norm4: LayerNorm::new(&(&lp / "norm4"), dim, LN_EPS),
                    cross_image_to_token: Attention::new(&(&lp / "cross_attn_image_to_token"), dim, heads, 2),
                    skip_first_pe: i == 0,
                }
            })
            .collect();
        TwoWayTransformer {
            layers,
            final_attn: Attention::new(&(p / "final_attn_token_to_image"), dim, heads, 2),
            norm_final: LayerNorm::new(&(p / "norm_final_attn"), dim, LN_EPS),
        }
    }

    /// image B×D×h×w, image_pe B×D×h×w, tokens B×N×D → (tokens B×N×D, image tokens B×(h·w)×D).
    pub fn forward(&self, image: &Tensor, image_pe: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
        let keys0 = image.flatten(2, -1).permute([0, 2, 1]);
        let key_pe = image_pe.flatten(2, -1).permute([0, 2, 1]);
        let mut queries = tokens.shallow_clone();
        let mut keys = keys0;
        for layer in &self.layers {
            let (q, k) = layer.forward(&queries, &keys, tokens, &key_pe);
            queries = q;
            keys = k;
        }
        let q = &queries + tokens;
        let k = &keys + &key_pe;
        let attn = self.final_attn.forward(&q, &k, &keys);
        let queries = self.norm_final.forward(&(queries + attn));
        (queries, keys)
    }
}

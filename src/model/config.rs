//! Every size of every supported network (SAM ViT-B/L/H + DeSAM PIMM, LiteMedSAM, the tiny test
//! model) and its pixel normalisation. Pure data: builds no tensors, reads no files.

use std::fmt;
use std::str::FromStr;

/// The supported image encoders (model.json and the command lines spell them as [`Arch::name`] does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// SAM ViT-B (1024 input).
    #[value(name = "vit_b")]
    VitB,
    /// SAM ViT-L.
    #[value(name = "vit_l")]
    VitL,
    /// SAM ViT-H.
    #[value(name = "vit_h")]
    VitH,
    /// LiteMedSAM (TinyViT encoder, 256 input).
    Lite,
    /// Tiny-A of the spec (§15): every code path at toy size, for tests.
    Tiny,
}

impl Arch {
    pub const ALL: [Arch; 5] = [Arch::VitB, Arch::VitL, Arch::VitH, Arch::Lite, Arch::Tiny];

    pub fn name(self) -> &'static str {
        match self {
            Arch::VitB => "vit_b",
            Arch::VitL => "vit_l",
            Arch::VitH => "vit_h",
            Arch::Lite => "lite",
            Arch::Tiny => "tiny",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture {0:?} (expected one of vit_b, vit_l, vit_h, lite, tiny)")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .iter()
            .copied()
            .find(|a| a.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownArch(s.to_string()))
    }
}

/// Sizes of SAM's ViT image encoder (unused for `Arch::Lite`, whose TinyViT is fixed).
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// E.
    pub embed_dim: i64,
    pub depth: i64,
    pub heads: i64,
    pub mlp_ratio: i64,
    /// Window side of the windowed-attention blocks.
    pub window: i64,
    /// 0-based indices of the global-attention blocks; all but the last are tapped.
    pub global_indices: Vec<i64>,
    pub layer_norm_eps: f64,
}

/// Every size of one DeSAM network.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Input side S (square), in pixels.
    pub image_size: i64,
    /// Patch side (S / grid for the ViT; 4 for TinyViT's effective stride 4 at 256 → 64).
    pub patch_size: i64,
    /// `None` for LiteMedSAM (TinyViT sizes are fixed in its own module).
    pub vit: Option<VitConfig>,
    /// D: neck, prompt embeddings, two-way transformer, PIMM top width.
    pub prompt_dim: i64,
    pub two_way_depth: i64,
    pub two_way_heads: i64,
    pub two_way_mlp: i64,
    pub iou_hidden: i64,
    /// SAM's mask-downscaling channels (weights exist, unused).
    pub mask_in_chans: i64,
    /// Mask tokens = multimask outputs + 1 (4 in SAM).
    pub num_mask_tokens: i64,
    /// PIMM channel ladder, deep → shallow (U, U/2, U/4).
    pub pimm_channels: Vec<i64>,
    /// Number of encoder taps L (= PIMM branches).
    pub tap_count: usize,
    /// Embedding grid g (tokens per side).
    pub grid: i64,
    /// Output side of PIMM logits and SAM's low-res mask (4g).
    pub output_size: i64,
    /// Normalisation of a 0–255 RGB image: x' = (x − mean) / std per channel.
    pub pixel_mean: [f64; 3],
    pub pixel_std: [f64; 3],
}

const IMAGENET_MEAN: [f64; 3] = [123.675, 116.28, 103.53];
const IMAGENET_STD: [f64; 3] = [58.395, 57.12, 57.375];

impl ModelConfig {
    pub fn for_arch(arch: Arch) -> ModelConfig {
        let sam = |embed_dim, depth, heads, global_indices: Vec<i64>| ModelConfig {
            arch,
            image_size: 1024,
            patch_size: 16,
            vit: Some(VitConfig {
                embed_dim,
                depth,
                heads,
                mlp_ratio: 4,
                window: 14,
                global_indices,
                layer_norm_eps: 1e-6,
            }),
            prompt_dim: 256,
            two_way_depth: 2,
            two_way_heads: 8,
            two_way_mlp: 2048,
            iou_hidden: 256,
            mask_in_chans: 16,
            num_mask_tokens: 4,
            pimm_channels: vec![256, 128, 64],
            tap_count: 3,
            grid: 64,
            output_size: 256,
            pixel_mean: IMAGENET_MEAN,
            pixel_std: IMAGENET_STD,
        };
        match arch {
            Arch::VitB => sam(768, 12, 12, vec![2, 5, 8, 11]),
            Arch::VitL => sam(1024, 24, 16, vec![5, 11, 17, 23]),
            Arch::VitH => sam(1280, 32, 16, vec![7, 15, 23, 31]),
            Arch::Lite => ModelConfig {
                arch,
                image_size: 256,
                patch_size: 4,
                vit: None,
                prompt_dim: 256,
                two_way_depth: 2,
                two_way_heads: 8,
                two_way_mlp: 2048,
                iou_hidden: 256,
                mask_in_chans: 16,
                num_mask_tokens: 4,
                pimm_channels: vec![256, 128, 64],
                tap_count: 3,
                grid: 64,
                output_size: 256,
                // LiteMedSAM takes the image scaled to [0, 1], no mean/std.
                pixel_mean: [0.0; 3],
                pixel_std: [255.0; 3],
            },
            Arch::Tiny => ModelConfig {
                arch,
                image_size: 128,
                patch_size: 16,
                vit: Some(VitConfig {
                    embed_dim: 64,
                    depth: 8,
                    heads: 4,
                    mlp_ratio: 4,
                    window: 3,
                    global_indices: vec![1, 3, 5, 7],
                    layer_norm_eps: 1e-6,
                }),
                prompt_dim: 64,
                two_way_depth: 2,
                two_way_heads: 2,
                two_way_mlp: 256,
                iou_hidden: 64,
                mask_in_chans: 16,
                num_mask_tokens: 4,
                pimm_channels: vec![64, 32, 16],
                tap_count: 3,
                grid: 8,
                output_size: 32,
                pixel_mean: IMAGENET_MEAN,
                pixel_std: IMAGENET_STD,
            },
        }
    }

    /// The embedding grid g = S / patch.
    pub fn grid_side(&self) -> i64 {
        self.grid
    }

    /// Normalise a B×3×S×S image with 0–255 values for this network.
    pub fn normalise(&self, image_0_255: &tch::Tensor) -> tch::Tensor {
        let opts = (image_0_255.kind(), image_0_255.device());
        let mean = tch::Tensor::from_slice(&self.pixel_mean).to_kind(opts.0).to_device(opts.1).view([1, 3, 1, 1]);
        let std = tch::Tensor::from_slice(&self.pixel_std).to_kind(opts.0).to_device(opts.1).view([1, 3, 1, 1]);
        (image_0_255 - mean) / std
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_round_trip() {
        for a in Arch::ALL {
            assert_eq!(a.to_string().parse::<Arch>().unwrap(), a);
        }
        assert!("vit_x".parse::<Arch>().is_err());
    }

    #[test]
    fn sizes_scale_together() {
        for a in Arch::ALL {
            let c = ModelConfig::for_arch(a);
            assert_eq!(c.output_size, 4 * c.grid, "{a}");
            assert_eq!(c.pimm_channels[0], c.prompt_dim, "{a}");
            assert_eq!(c.pimm_channels.len(), c.tap_count, "{a}");
            if let Some(v) = &c.vit {
                assert_eq!(c.image_size / c.patch_size, c.grid, "{a}");
                assert_eq!(v.global_indices.len(), c.tap_count + 1, "{a}");
                assert_eq!(v.embed_dim % v.heads, 0, "{a}");
                assert_eq!(*v.global_indices.last().unwrap(), v.depth - 1, "{a}");
            }
            assert_eq!((c.prompt_dim / 2) % c.two_way_heads, 0, "{a}");
        }
    }
}

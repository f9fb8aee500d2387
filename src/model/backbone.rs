//! The image-encoder contract shared by SAM's ViT and LiteMedSAM's TinyViT, so that the engine and
//! training never branch on the architecture.

use tch::Tensor;

/// What a frozen image encoder hands to the decoder for a batch of images.
#[derive(Debug)]
pub struct Features {
    /// Multi-scale taps, shallow → deep, channels-first (B×C×h×w). SAM ViT: the outputs of every
    /// global-attention block but the last (all at g×g). TinyViT: its stage outputs.
    pub taps: Vec<Tensor>,
    /// The neck output, B×D×g×g (D = prompt/transformer dim, g = embedding grid).
    pub neck: Tensor,
}

impl Features {
    /// Rows `start..start+len` of every tensor (a sub-batch), sharing storage.
    pub fn narrow(&self, start: i64, len: i64) -> Features {
        Features {
            taps: self.taps.iter().map(|t| t.narrow(0, start, len)).collect(),
            neck: self.neck.narrow(0, start, len),
        }
    }

    /// Every tensor repeated along the batch axis to `n` (from batch 1).
    pub fn expand_batch(&self, n: i64) -> Features {
        let rep = |t: &Tensor| {
            let mut shape = t.size();
            shape[0] = n;
            t.expand(&shape, false)
        };
        Features { taps: self.taps.iter().map(rep).collect(), neck: rep(&self.neck) }
    }

    pub fn batch_size(&self) -> i64 {
        self.neck.size()[0]
    }

    pub fn to_device_kind(&self, device: tch::Device, kind: tch::Kind) -> Features {
        Features {
            taps: self.taps.iter().map(|t| t.to_device(device).to_kind(kind)).collect(),
            neck: self.neck.to_device(device).to_kind(kind),
        }
    }
}

/// A frozen image encoder. Input: B×3×S×S, already normalised for this backbone.
pub trait Backbone: Send + Sync + std::fmt::Debug {
    fn forward(&self, images: &Tensor) -> Features;
    /// Input side length S.
    fn image_size(&self) -> i64;
    /// (channels, side) of each tap, shallow → deep.
    fn tap_shapes(&self) -> Vec<(i64, i64)>;
}

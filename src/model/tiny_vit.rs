//! LiteMedSAM's TinyViT image encoder with multi-scale taps (owned by the `ckpt` task).
//! PLACEHOLDER SIGNATURE ONLY: the real implementation replaces this file.

use super::backbone::{Backbone, Features};
use tch::{nn, Tensor};

/// LiteMedSAM's TinyViT (image 256, embeddings 256×64×64). Variables are created under `p`
/// with the exact state-dict names of `image_encoder.*` in `lite_medsam.pth`.
#[derive(Debug)]
pub struct TinyVit {}

impl TinyVit {
    pub fn new(_p: &nn::Path) -> TinyVit {
        unimplemented!("TinyViT is being written on the ckpt branch")
    }
}

impl Backbone for TinyVit {
    fn forward(&self, _images: &Tensor) -> Features {
        unimplemented!()
    }
    fn image_size(&self) -> i64 {
        256
    }
    fn tap_shapes(&self) -> Vec<(i64, i64)> {
        unimplemented!()
    }
}

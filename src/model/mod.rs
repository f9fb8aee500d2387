//! The network and nothing else: SAM ViT and TinyViT backbones, prompt encoder, PRIM, PIMM,
//! checkpoints. Knows nothing about files other than weights, nor about DICOM.

pub mod backbone;
pub mod checkpoint;
pub mod config;
pub mod desam;
pub(crate) mod layers;
pub mod pimm;
pub mod pimm_lite;
pub mod prim;
pub mod prompt;
pub mod tiny_vit;
pub mod two_way;
pub mod vit;

pub use backbone::{Backbone, Features};
pub use config::{Arch, ModelConfig, VitConfig};
pub use desam::{DeSam, DecoderOutput, ModelError, PromptBatch};
pub use pimm::PimmContext;

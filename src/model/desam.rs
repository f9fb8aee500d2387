//! The whole DeSAM network: one VarStore whose paths are PyTorch's state-dict keys, a frozen
//! backbone, the prompt encoder, PRIM and PIMM. Owns the forward API; never reads images or DICOM.

use super::backbone::{Backbone, Features};
use super::checkpoint::{self, CheckpointError, LoadReport};
use super::config::{Arch, ModelConfig};
use super::pimm::{broadcast_batch, Pimm, PimmContext, PimmError};
use super::prim::{Prim, PrimOutput};
use super::prompt::PromptEncoder;
use super::tiny_vit::TinyVit;
use super::vit::ImageEncoderVit;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// State-dict prefix of the PIMM (absent from SAM/LiteMedSAM checkpoints).
pub const PIMM_PREFIX: &str = "mask_decoder.pimm.";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("PIMM: {0}")]
    Pimm(#[from] PimmError),
    #[error("no checkpoint given")]
    NoCheckpoint,
    #[error("{0}")]
    Input(String),
}

/// A batch of B prompts in the input-pixel frame (0..S).
#[derive(Debug)]
pub enum PromptBatch {
    /// B×4 boxes, x0 y0 x1 y1.
    Boxes(Tensor),
    /// B×N×2 point coordinates (x, y) and B×N labels (1 foreground, 0 background); SAM's padding
    /// point is appended (no box), so N points give N+1 tokens.
    Points { coords: Tensor, labels: Tensor },
}

impl PromptBatch {
    pub fn batch_size(&self) -> i64 {
        match self {
            PromptBatch::Boxes(b) => b.size()[0],
            PromptBatch::Points { coords, .. } => coords.size()[0],
        }
    }
}

/// What the decoder gives for a prompt batch.
#[derive(Debug)]
pub struct DecoderOutput {
    /// B×1 predicted IoU (mask token 0).
    pub iou: Tensor,
    /// B×D×g×g PRIM mask embedding.
    pub mask_embedding: Tensor,
    /// B×1×4g×4g PIMM logits (no sigmoid).
    pub logits: Tensor,
}

/// The DeSAM network.
pub struct DeSam {
    cfg: ModelConfig,
    vs: nn::VarStore,
    backbone: Box<dyn Backbone>,
    prompt: PromptEncoder,
    prim: Prim,
    pimm: Pimm,
    channels_last: bool,
}

/// The same N×C×H×W values with N×H×W×C memory order (PyTorch's channels_last).
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

impl std::fmt::Debug for DeSam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeSam").field("arch", &self.cfg.arch).field("device", &self.vs.device()).finish()
    }
}

impl DeSam {
    /// A freshly initialised network (PyTorch default init; seed with `tch::manual_seed`).
    pub fn new(cfg: &ModelConfig, device: Device) -> DeSam {
        Self::try_new(cfg, device).expect("ModelConfig::for_arch sizes are consistent")
    }

    /// As [`DeSam::new`], with an error for an inconsistent hand-made config.
    pub fn try_new(cfg: &ModelConfig, device: Device) -> Result<DeSam, ModelError> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let enc = &root / "image_encoder";
        let backbone: Box<dyn Backbone> = match (&cfg.arch, &cfg.vit) {
            (Arch::Lite, _) => Box::new(TinyVit::new(&enc)),
            (_, Some(v)) => Box::new(ImageEncoderVit::new(&enc, v, cfg.image_size, cfg.patch_size, cfg.prompt_dim)),
            (a, None) => return Err(ModelError::Input(format!("architecture {a} needs ViT sizes"))),
        };
        let d = cfg.prompt_dim;
        let prompt = PromptEncoder::new(&(&root / "prompt_encoder"), d, cfg.image_size, cfg.grid, cfg.mask_in_chans);
        let md = &root / "mask_decoder";
        let prim = Prim::new(
            &md,
            d,
            cfg.two_way_depth,
            cfg.two_way_heads,
            cfg.two_way_mlp,
            cfg.iou_hidden,
            cfg.num_mask_tokens,
        );
        let pimm = Pimm::new(&(&md / "pimm"), &backbone.tap_shapes(), cfg.pimm_channels[0], cfg.grid)?;
        Ok(DeSam { cfg: cfg.clone(), vs, backbone, prompt, prim, pimm, channels_last: false })
    }

    /// Builds the network and loads `checkpoints` in order (later files override earlier keys).
    /// Only PIMM may be missing (SAM/LiteMedSAM checkpoints): it keeps its fresh init and the
    /// report lists it under `fresh`.
    pub fn load(cfg: &ModelConfig, checkpoints: &[&Path], device: Device) -> Result<(DeSam, LoadReport), ModelError> {
        if checkpoints.is_empty() {
            return Err(ModelError::NoCheckpoint);
        }
        let mut model = DeSam::try_new(cfg, device)?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for path in checkpoints {
            for (name, t) in checkpoint::read_checkpoint(path)? {
                tensors.retain(|(n, _)| n != &name);
                tensors.push((name, t));
            }
        }
        let report = checkpoint::load_into(&mut model.vs, tensors, &[PIMM_PREFIX])?;
        Ok((model, report))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
    pub fn backbone(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }
    pub fn prompt_encoder(&self) -> &PromptEncoder {
        &self.prompt
    }
    pub fn prim(&self) -> &Prim {
        &self.prim
    }
    pub fn pimm(&self) -> &Pimm {
        &self.pimm
    }
    pub fn device(&self) -> Device {
        self.vs.device()
    }
    /// The parameters' dtype (follows `var_store_mut().set_kind(..)`).
    pub fn kind(&self) -> Kind {
        self.prompt.no_mask_embed_kind()
    }

    /// Every variable, sorted by state-dict key.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// PRIM + PIMM variables (`mask_decoder.*`), sorted: what training optimises.
    pub fn decoder_variables(&self) -> Vec<(String, Tensor)> {
        self.state_dict().into_iter().filter(|(n, _)| n.starts_with("mask_decoder.")).collect()
    }

    /// Stops gradients for the image and prompt encoders (DeSAM trains only `mask_decoder.*`), so
    /// that `encode` builds no autograd graph even outside `no_grad`.
    pub fn freeze_encoders(&self) {
        for (name, t) in self.vs.variables() {
            if !name.starts_with("mask_decoder.") {
                let _ = t.shallow_clone().set_requires_grad(false);
            }
        }
    }

    /// Gives the image encoder's 4-D parameters (conv weights) channels-last strides and runs the
    /// encoder on channels-last input: oneDNN then skips reordering NCHW data on every call
    /// (CPU, LiteMedSAM in bf16: about a quarter off the encoder). The features come back NCHW
    /// because PIMM's instance norms are slower on channels-last. Values and shapes are unchanged.
    pub fn use_channels_last(&mut self) {
        tch::no_grad(|| {
            for (name, mut t) in self.vs.variables() {
                if t.dim() == 4 && name.starts_with("image_encoder.") {
                    let cl = to_channels_last(&t);
                    t.set_data(&cl);
                }
            }
        });
        self.channels_last = true;
    }

    /// Runs the frozen encoder on B×3×S×S normalised images.
    pub fn encode(&self, images: &Tensor) -> Features {
        let x = images.to_device(self.device()).to_kind(self.kind());
        if !self.channels_last {
            return self.backbone.forward(&x);
        }
        let f = self.backbone.forward(&to_channels_last(&x));
        Features { taps: f.taps.iter().map(|t| t.contiguous()).collect(), neck: f.neck.contiguous() }
    }

    /// The prompt-independent PIMM branches (once per image, shared by all its prompts).
    pub fn pimm_context(&self, f: &Features) -> PimmContext {
        self.pimm.context(&f.taps)
    }

    fn run_prim(&self, f: &Features, prompts: &PromptBatch) -> PrimOutput {
        let sparse = match prompts {
            PromptBatch::Boxes(b) => self.prompt.embed_boxes(&b.to_device(self.device())),
            PromptBatch::Points { coords, labels } => {
                self.prompt.embed_points(&coords.to_device(self.device()), &labels.to_device(self.device()), true)
            }
        };
        let b = sparse.size()[0];
        let neck = broadcast_batch(&f.neck, b);
        self.prim.forward(&neck, &self.prompt.dense_pe(), &sparse, &self.prompt.no_mask_dense(b))
    }

    /// PRIM + PIMM for a prompt batch. Features/context of batch 1 are broadcast to the prompts.
    pub fn decode(&self, f: &Features, ctx: &PimmContext, prompts: &PromptBatch) -> DecoderOutput {
        let out = self.run_prim(f, prompts);
        let logits = self.pimm.decode(ctx, &out.mask_embedding);
        DecoderOutput { iou: out.iou, mask_embedding: out.mask_embedding, logits }
    }

    /// SAM's own mask head (the coupled baseline): low-res logits of mask 0, B×1×4g×4g.
    pub fn sam_mask(&self, f: &Features, prompts: &PromptBatch) -> Tensor {
        let out = self.run_prim(f, prompts);
        self.prim.sam_mask(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desam_can_move_to_a_worker_thread() {
        fn is_send<T: Send>() {}
        is_send::<DeSam>();
    }
}

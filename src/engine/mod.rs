//! The segmentation engine: preprocessing, encoder precompute, automatic prompts, postprocessing,
//! QA. No I/O in the core (apart from the optional feature cache); every front door calls `Segmenter`.

pub mod cache;
pub mod components;
pub mod postprocess;
pub mod preprocess;
pub mod prompts;
pub mod quality;
pub mod segmenter;
pub mod untrained;

pub use postprocess::Cleanup3d;
pub use segmenter::{
    DeviceChoice, Dtype, EngineError, EngineOptions, Mode, ModelId, Progress, SegmentRequest, SegmentationResult,
    Segmenter, SliceDetail, Stage, StageTimings,
};
pub use untrained::{create_untrained_model_dir, BackboneSource};

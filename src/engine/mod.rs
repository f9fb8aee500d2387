//! The segmentation engine: preprocessing, encoder precompute, automatic prompts, postprocessing,
//! QA. No I/O in the core; every front door (CLI, Orthanc, Slicer, training eval) calls it.

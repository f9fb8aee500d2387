//! NIfTI-1 in/out with correct affines (RAS on disk ↔ LPS in `Volume`).

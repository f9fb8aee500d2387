//! desam-train: precompute store, datasets, losses, training loop, evaluation, export/registry.

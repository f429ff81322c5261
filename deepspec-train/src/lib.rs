//! Training: anchors and block construction, losses, AdamW with global-norm clipping, the
//! learning-rate schedule.

pub mod anchors;
pub mod batch;
pub mod blocks;
pub mod loss;
pub mod optim;
pub mod schedule;

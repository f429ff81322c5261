//! Training: anchors and block construction, losses, AdamW with global-norm clipping, the
//! learning-rate schedule.

pub mod anchors;
pub mod batch;
pub mod blocks;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod logging;
pub mod loss;
pub mod memory;
pub mod offline;
pub mod optim;
pub mod plan;
pub mod schedule;
pub mod trainer;

//! Evaluation: the verifying speculative-decoding engine (target KV cache, draft proposals,
//! rejection sampling, bonus token) and its per-round trace.

pub mod calibration;
pub mod datasets;
pub mod engine;
pub mod metrics;
pub mod plan;
pub mod plots;
pub mod profile;
pub mod proposer;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod serve;
pub mod serving;
pub mod traces;
pub mod verify;

//! Evaluation: the verifying speculative-decoding engine (target KV cache, draft proposals,
//! rejection sampling, bonus token) and its per-round trace.

pub mod engine;
pub mod proposer;
pub mod verify;

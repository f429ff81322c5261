//! Evaluation: the verifying speculative-decoding engine, benchmarks, metrics, reports.

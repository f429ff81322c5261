//! What every deepspec stage shares: target models, weight loading (Hugging Face safetensors
//! and GGUF), tokenizers and chat templates, sampling and generation.
//!
//! Everything numeric is generic over a burn [`Backend`](burn::tensor::backend::Backend); the
//! backend and device are chosen once by the caller (the CLI) and passed down.

pub mod backend;
pub mod cache;
pub mod drafter;
pub mod error;
pub mod fixtures;
pub mod generate;
pub mod guard;
pub mod io;
pub mod layers;
pub mod model;
pub mod prepare;
pub mod progress;
pub mod recipe;
pub mod sampling;

pub use error::LoadError;

//! The language side of Qwen-VL-Chat: checkpoint loading, tokenizer, prompt building, the QWen LM with
//! its KV cache, generation and grounding-markup parsing.
//!
//! This crate knows nothing about pixels: image features arrive as plain tensors at given positions.

pub mod checkpoint;
pub mod config;
pub mod dev;
pub mod error;
pub mod generate;
pub mod grounding;
pub mod model;
pub mod prompt;
pub mod quant;
pub mod react;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::{GenerationConfig, QwenConfig};
pub use error::{Error, Result};
/// The fused decode attention lives with the other CPU kernels.
pub use kernels::decode_attention;

//! The image side of Qwen-VL: decoding with limits, Pillow-exact preprocessing, the ViT and the
//! cross-attention resampler. Knows nothing about tokens or checkpoint files.
//!
//! Pipeline: [`load_rgb`] / [`decode_rgb`] → [`preprocess`] (Pillow bicubic resize to a square
//! plus CLIP normalisation, bit-exact with the reference) → [`VisualEncoder::forward`] on a batch
//! `[B, 3, S, S]` → `[B, 256, output_dim]` image features for the LM.

mod error;
mod image_io;
mod preprocess;
pub mod qwen_vit;
mod resize;

pub use error::{Error, Result};
pub use image_io::{
    decode_rgb, decoder_limits, load_rgb, read_image_file, to_rgb8_like_pil, MAX_DECODE_ALLOC,
    MAX_IMAGE_SIDE,
};
pub use preprocess::{denormalize_sample, normalize, preprocess, CLIP_MEAN, CLIP_STD};
pub use qwen_vit::{Config, Encoding, Layer, LinearBuilder, VisualDebug, VisualEncoder};
pub use resize::{resize_bicubic, vertical_first};

/// Re-export of the `image` crate, so callers name the same `RgbImage` type.
pub use image;

//! The decisions every front end (`run`, `ocr`, `serve`, the desktop app) shares, made in one
//! place: which generation options a request means ([`options`]), which device a word names
//! ([`device`]), how a tool-using exchange is prompted and its reply read ([`tools`]), where
//! the shown text stops ([`text`]), which weight type a model is loaded as and whether it fits ([`load`]), the
//! question behind "read the text" ([`OCR_PROMPT`]) and where a reply's grounding boxes lie in
//! its picture ([`reply_boxes`]). The engine ([`crate::engine`]) does the work; front ends only
//! turn their input into these types and the results into their output.

pub mod device;
pub mod options;
pub mod text;
pub mod tools;

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use candle_core::Device;
use lm::checkpoint::LoadProgress;
use lm::quant::WeightType;

use crate::engine::{Engine, Reply};
use crate::model_dir::{check_memory, choose_weights, sixteen_bit_bytes, weights_bytes};

pub use device::{available_devices, parse_device, DeviceError};
pub use options::{fresh_seed, GenerateRequest, OptionError};

/// The question `qwenvl ocr` asks by default and the app's "Read text" button asks.
pub const OCR_PROMPT: &str = "What is the text in the image? Write it out exactly.";

/// The weight type `dir` is loaded as on `device`: `requested`, else the machine's default
/// ([`choose_weights`]); refused up front when it cannot fit (running out of memory would end
/// the process without a word). Returns the type and the checkpoint's size in bytes.
pub fn plan_load(
    dir: &Path,
    requested: Option<WeightType>,
    device: &Device,
) -> Result<(WeightType, u64)> {
    // A broken folder is left to the engine, whose errors name the missing or broken file.
    let bytes = weights_bytes(dir);
    let size = sixteen_bit_bytes(dir, bytes);
    let wt = match requested {
        Some(wt) => wt,
        None => choose_weights(size, device)?,
    };
    check_memory(size, wt, device)?;
    Ok((wt, bytes))
}

/// Loads `dir` as `wt` on `device`; `progress` counts the bytes read for a bar.
pub fn load(
    dir: &Path,
    wt: WeightType,
    device: &Device,
    progress: Arc<LoadProgress>,
) -> Result<Engine> {
    Engine::load_with(dir, wt, device, Some(progress))
}

/// A grounding box of a reply, on Qwen-VL's 0–1000 grid and in the pixels of the picture it
/// refers to (the latest of the conversation, as the reference draws them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundedBox {
    pub label: Option<String>,
    /// `[x1, y1, x2, y2]` on the 0–1000 grid.
    pub grid: [i64; 4],
    /// The 0-based index of the picture in [`Reply::pictures`]; `None` without a picture.
    pub picture: Option<usize>,
    /// The box in that picture's pixels.
    pub px: Option<[i64; 4]>,
}

/// The boxes of `text` (a reply's, possibly cut by a stop string) over `reply`'s pictures.
pub fn reply_boxes(reply: &Reply, text: &str) -> Vec<GroundedBox> {
    let latest = reply.pictures.len().checked_sub(1);
    lm::grounding::boxes(text)
        .into_iter()
        .map(|b| GroundedBox {
            px: latest.map(|i| {
                let p = &reply.pictures[i];
                lm::grounding::grid_to_pixels(b.grid, p.width, p.height)
            }),
            label: b.label,
            grid: b.grid,
            picture: latest,
        })
        .collect()
}

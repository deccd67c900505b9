//! The reference's image transform: Pillow bicubic resize to a square, `ToTensor`, CLIP
//! `Normalize`, channels first. Every operation is reproduced in the same precision, so the
//! output equals the reference's `float32` tensor exactly for the same decoded pixels.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::{Error, Result};
use crate::resize::resize_bicubic;

/// CLIP's per-channel mean (R, G, B), as the reference writes it (Python floats).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's per-channel standard deviation (R, G, B).
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Resizes `img` to `image_size` x `image_size` (aspect ratio not kept, Pillow bicubic) and
/// normalises it: `f32` tensor `[3, image_size, image_size]` on the CPU.
pub fn preprocess(img: &RgbImage, image_size: usize) -> Result<Tensor> {
    let side = u32::try_from(image_size)
        .ok()
        .filter(|&s| s > 0 && s <= crate::MAX_IMAGE_SIDE)
        .ok_or(Error::InvalidSize(image_size))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::Empty {
            name: "(in-memory picture)".to_string(),
            width: img.width(),
            height: img.height(),
        });
    }
    normalize(&resize_bicubic(img, side, side))
}

/// `ToTensor` + `Normalize(CLIP_MEAN, CLIP_STD)` without resizing: `f32` `[3, H, W]` on the CPU
/// with `((u8 / 255) - mean) / std` computed in `f32` like torchvision.
pub fn normalize(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // torchvision turns the Python floats into float32 tensors before subtracting/dividing.
    let mean = CLIP_MEAN.map(|m| m as f32);
    let std = CLIP_STD.map(|s| s as f32);
    let mut out = vec![0f32; 3 * h * w];
    let (r, rest) = out.split_at_mut(h * w);
    let (g, b) = rest.split_at_mut(h * w);
    for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = (f32::from(px[0]) / 255.0 - mean[0]) / std[0];
        g[i] = (f32::from(px[1]) / 255.0 - mean[1]) / std[1];
        b[i] = (f32::from(px[2]) / 255.0 - mean[2]) / std[2];
    }
    Ok(Tensor::from_vec(out, (3, h, w), &Device::Cpu)?)
}

/// Inverts [`normalize`] for one value of channel `c`: the 8-bit sample it came from (rounded),
/// useful to compare preprocessed tensors at the uint8 level.
pub fn denormalize_sample(c: usize, v: f32) -> i32 {
    let x = f64::from(v) * f64::from(CLIP_STD[c] as f32) + f64::from(CLIP_MEAN[c] as f32);
    (x * 255.0).round() as i32
}

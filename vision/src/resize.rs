//! Pillow's bicubic resize, ported bit for bit.
//!
//! This is `ImagingResample` of Pillow's `libImaging/Resample.c` on the 8-bit path with the BICUBIC
//! filter (what `Image.resize(size, Image.BICUBIC)` does for an RGB image): a separable filter with
//! the cubic kernel a = -0.5 and support 2, widened by the scale factor when shrinking (antialias);
//! double-precision coefficients per output column/row normalised by their sum, then converted to
//! 22-bit fixed point; the horizontal pass runs first, over only the source rows the vertical pass
//! reads, then the vertical pass; a pass whose dimension does not change is skipped.

use image::RgbImage;

/// Fixed-point precision of the coefficients (`PRECISION_BITS = 32 - 8 - 2` in Pillow).
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support of the bicubic filter before antialias widening.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Pillow's `bicubic_filter` (a = -0.5).
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one output sample: the first source index and a fixed-point weight per tap.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the box `[0, in_size)`.
fn precompute_coeffs(in_size: u32, out_size: u32) -> Vec<Taps> {
    // Pillow keeps the box as `float`; `in1 - in0` is exact for any u32 that fits a float exactly,
    // and larger sizes are beyond the decoder limits.
    let (in0, in1) = (0f32, in_size as f32);
    let scale = f64::from(in1 - in0) / f64::from(out_size);
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = f64::from(in0) + (f64::from(xx) + 0.5) * scale;
            // C's `(int)` truncates toward zero; Rust's `as` does the same (and saturates).
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let count = (xmax - xmin).max(0) as usize;
            let mut k: Vec<f64> = (0..count)
                .map(|x| bicubic_filter(((x as i64 + xmin) as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().fold(0.0, |acc, &w| acc + w);
            if ww != 0.0 {
                for w in &mut k {
                    *w /= ww;
                }
            }
            let one = f64::from(1u32 << PRECISION_BITS);
            let weights = k
                .iter()
                .map(|&w| {
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps {
                first: xmin as usize,
                weights,
            }
        })
        .collect()
}

/// Pillow's `clip8`: drop the fixed-point fraction (arithmetic shift) and saturate to 0..=255.
#[inline]
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Rounding offset every accumulator starts from (`1 << (PRECISION_BITS - 1)`).
const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Resizes `img` to `width` x `height` exactly like Pillow's `Image.resize((width, height),
/// Image.BICUBIC)` on an RGB image (same pixels, bit for bit).
///
/// A zero `width` or `height` gives an empty image; an empty source gives a black image.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    if in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    if !need_horizontal && !need_vertical {
        return img.clone();
    }

    let horiz = precompute_coeffs(in_w, width);
    let vert = precompute_coeffs(in_h, height);
    let src = img.as_raw();

    // Horizontal pass over the source rows the vertical pass needs.
    let (tmp, tmp_w, row0) = if need_horizontal {
        let first = vert.first().map_or(0, |t| t.first);
        let last = vert.last().map_or(0, |t| t.first + t.weights.len());
        let rows = last.saturating_sub(first);
        let out_w = width as usize;
        let mut out = vec![0u8; rows * out_w * 3];
        let in_stride = in_w as usize * 3;
        for (r, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
            let line = &src[(first + r) * in_stride..(first + r + 1) * in_stride];
            for (taps, px) in horiz.iter().zip(out_row.chunks_exact_mut(3)) {
                let mut acc = [HALF; 3];
                let start = taps.first * 3;
                for (k, s) in taps.weights.iter().zip(line[start..].chunks_exact(3)) {
                    let k = i64::from(*k);
                    acc[0] += i64::from(s[0]) * k;
                    acc[1] += i64::from(s[1]) * k;
                    acc[2] += i64::from(s[2]) * k;
                }
                px.copy_from_slice(&[clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]);
            }
        }
        (out, out_w, first)
    } else {
        (src.to_vec(), in_w as usize, 0)
    };

    if !need_vertical {
        return RgbImage::from_raw(width, height, tmp).unwrap_or_else(|| RgbImage::new(width, height));
    }

    // Vertical pass; the tap indices are shifted by the first row kept by the horizontal pass.
    let stride = tmp_w * 3;
    let mut out = vec![0u8; height as usize * stride];
    for (taps, out_row) in vert.iter().zip(out.chunks_exact_mut(stride)) {
        let base = taps.first - row0;
        for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
            let mut acc = [HALF; 3];
            for (y, k) in taps.weights.iter().enumerate() {
                let k = i64::from(*k);
                let s = &tmp[(base + y) * stride + xx * 3..][..3];
                acc[0] += i64::from(s[0]) * k;
                acc[1] += i64::from(s[1]) * k;
                acc[2] += i64::from(s[2]) * k;
            }
            px.copy_from_slice(&[clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]);
        }
    }
    RgbImage::from_raw(tmp_w as u32, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

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
/// Pass order: Pillow resamples horizontally first, except that recent Pillow resizes vertically
/// first when the height is scaled down while the width is not (python-pillow PR #9549). The
/// reference fixtures need that: `portrait` (300x900 → 448x448) matches bit for bit only with
/// the vertical pass first, every other fixture only with the horizontal pass first. See
/// [`vertical_first`] for the exact rule used.
///
/// A zero `width` or `height` gives an empty image; an empty source gives a black image.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    let src = Plane {
        data: img.as_raw().clone(),
        width: in_w as usize,
        height: in_h as usize,
    };
    let out = match (need_horizontal, need_vertical) {
        (false, false) => src,
        (true, false) => horizontal_pass(&src, &precompute_coeffs(in_w, width), 0, src.height),
        (false, true) => vertical_pass(&src, &precompute_coeffs(in_h, height), 0),
        (true, true) if vertical_first(in_w, in_h, width, height) => {
            let tmp = vertical_pass(&src, &precompute_coeffs(in_h, height), 0);
            horizontal_pass(&tmp, &precompute_coeffs(in_w, width), 0, tmp.height)
        }
        (true, true) => {
            // Only the source rows the vertical pass reads go through the horizontal pass.
            let vert = precompute_coeffs(in_h, height);
            let first = vert.first().map_or(0, |t| t.first);
            let last = vert.last().map_or(0, |t| t.first + t.weights.len());
            let tmp = horizontal_pass(&src, &precompute_coeffs(in_w, width), first, last);
            vertical_pass(&tmp, &vert, first)
        }
    };
    RgbImage::from_raw(out.width as u32, out.height as u32, out.data)
        .unwrap_or_else(|| RgbImage::new(width, height))
}

/// Whether Pillow runs the vertical pass before the horizontal one: when the height shrinks
/// and the width does not (python-pillow PR #9549, "If height is being scaled down, but not
/// width, resize vertically first"; the merged version speaks of the height being "scaled down
/// significantly more than width" — its exact threshold could not be checked, and only the
/// case covered here is confirmed by the fixtures).
pub fn vertical_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    out_h < in_h && out_w >= in_w
}

/// An interleaved RGB buffer.
struct Plane {
    data: Vec<u8>,
    width: usize,
    height: usize,
}

/// Horizontal pass over source rows `first..last` (Pillow's `ImagingResampleHorizontal_8bpc`).
fn horizontal_pass(src: &Plane, taps: &[Taps], first: usize, last: usize) -> Plane {
    let rows = last.saturating_sub(first);
    let out_w = taps.len();
    let in_stride = src.width * 3;
    let mut out = vec![0u8; rows * out_w * 3];
    for (r, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let line = &src.data[(first + r) * in_stride..][..in_stride];
        for (t, px) in taps.iter().zip(out_row.chunks_exact_mut(3)) {
            let mut acc = [HALF; 3];
            for (k, s) in t.weights.iter().zip(line[t.first * 3..].chunks_exact(3)) {
                let k = i64::from(*k);
                acc[0] += i64::from(s[0]) * k;
                acc[1] += i64::from(s[1]) * k;
                acc[2] += i64::from(s[2]) * k;
            }
            px.copy_from_slice(&[clip8(acc[0]), clip8(acc[1]), clip8(acc[2])]);
        }
    }
    Plane {
        data: out,
        width: out_w,
        height: rows,
    }
}

/// Vertical pass (Pillow's `ImagingResampleVertical_8bpc`); `row0` is the source row that
/// `src`'s first row corresponds to (the tap indices are shifted by it).
fn vertical_pass(src: &Plane, taps: &[Taps], row0: usize) -> Plane {
    let stride = src.width * 3;
    let mut out = vec![0u8; taps.len() * stride];
    for (t, out_row) in taps.iter().zip(out.chunks_exact_mut(stride)) {
        let base = t.first - row0;
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut acc = HALF;
            for (y, k) in t.weights.iter().enumerate() {
                acc += i64::from(src.data[(base + y) * stride + i]) * i64::from(*k);
            }
            *o = clip8(acc);
        }
    }
    Plane {
        data: out,
        width: src.width,
        height: taps.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                (x ^ y) as u8,
                (255 - (x + y) % 256) as u8,
            ])
        })
    }

    fn constant(w: u32, h: u32, px: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb(px))
    }

    #[test]
    fn fixed_point_weights_sum_to_one() {
        for (i, o) in [
            (640, 448),
            (300, 448),
            (1, 448),
            (10000, 1),
            (448, 448),
            (3, 2),
        ] {
            for t in precompute_coeffs(i, o) {
                let s: i64 = t.weights.iter().map(|&w| i64::from(w)).sum();
                // Each weight is rounded on its own: the sum is 2^22 up to the tap count.
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64,
                    "{i}->{o}"
                );
                assert!(t.first + t.weights.len() <= i as usize);
            }
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = gradient(37, 21);
        assert_eq!(resize_bicubic(&img, 37, 21), img);
    }

    #[test]
    fn constant_images_stay_constant() {
        // Normalised weights reproduce a flat colour in every regime, including the extremes.
        let px = [12, 200, 77];
        for (w, h, ow, oh) in [
            (1, 1, 448, 448),
            (1, 10000, 448, 448),
            (10000, 1, 448, 448),
            (1, 10000, 1, 37),
            (10000, 1, 1, 1),
            (640, 480, 448, 448),
            (300, 900, 448, 448),
        ] {
            let out = resize_bicubic(&constant(w, h, px), ow, oh);
            assert_eq!(out.dimensions(), (ow, oh));
            assert!(out.pixels().all(|p| p.0 == px), "{w}x{h} -> {ow}x{oh}");
        }
    }

    #[test]
    fn one_by_one_upscale_and_one_dimension_passes() {
        let img = RgbImage::from_pixel(1, 1, image::Rgb([1, 2, 3]));
        let out = resize_bicubic(&img, 5, 3);
        assert!(out.pixels().all(|p| p.0 == [1, 2, 3]));

        // Only one pass runs when one dimension is unchanged: rows (or columns) stay independent.
        let img = gradient(1, 10000);
        let down = resize_bicubic(&img, 1, 100);
        assert_eq!(down.dimensions(), (1, 100));
        let up = resize_bicubic(&gradient(3, 5), 9, 5);
        let row_only = resize_bicubic(&gradient(3, 1), 9, 1);
        assert_eq!(&up.as_raw()[..9 * 3], row_only.as_raw().as_slice());
    }

    #[test]
    fn shrinking_a_line_to_one_pixel_averages() {
        // 10000 -> 1: the kernel covers the whole line; a 0/255 stripe pattern gives mid grey.
        let img = RgbImage::from_fn(10000, 1, |x, _| {
            image::Rgb([if x % 2 == 0 { 0 } else { 255 }; 3])
        });
        let out = resize_bicubic(&img, 1, 1);
        let v = out.get_pixel(0, 0).0[0];
        assert!((126..=129).contains(&v), "{v}");
    }

    #[test]
    fn empty_inputs_and_outputs() {
        assert_eq!(resize_bicubic(&gradient(4, 4), 0, 3).dimensions(), (0, 3));
        let black = resize_bicubic(&RgbImage::new(0, 0), 2, 2);
        assert!(black.pixels().all(|p| p.0 == [0, 0, 0]));
    }

    #[test]
    fn pass_order_rule() {
        // The fixture case (portrait 300x900 -> 448x448) runs vertically first.
        assert!(vertical_first(300, 900, 448, 448));
        for (w, h) in [(640, 480), (1200, 300), (50, 40), (400, 400), (256, 192)] {
            assert!(!vertical_first(w, h, 448, 448), "{w}x{h}");
        }
    }
}

//! Resizing of square position tables with PyTorch's
//! `F.interpolate(mode="bicubic", align_corners=False)` (cubic a = -0.75, no antialias, clamped
//! borders), computed in `f32` in the same order as PyTorch's CPU kernel: per output value, the
//! four row taps each sum four column taps, and the row sums are combined in tap order.

use candle_core::{DType, Device, Result, Tensor};

/// PyTorch's `cubic_convolution1` (|x| <= 1).
fn cubic1(x: f32, a: f32) -> f32 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

/// PyTorch's `cubic_convolution2` (1 < |x| < 2).
fn cubic2(x: f32, a: f32) -> f32 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// Source indices (clamped) and weights of the four taps of each output index.
fn taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    const A: f32 = -0.75;
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|i| {
            let real = scale * (i as f32 + 0.5) - 0.5;
            let floor = real.floor();
            let index = (floor as i64).min(in_size as i64 - 1);
            let t = (real - index as f32).clamp(0.0, 1.0);
            let x2 = 1.0 - t;
            let w = [
                cubic2(t + 1.0, A),
                cubic1(t, A),
                cubic1(x2, A),
                cubic2(x2 + 1.0, A),
            ];
            let idx = std::array::from_fn(|j| {
                (index - 1 + j as i64).clamp(0, in_size as i64 - 1) as usize
            });
            (idx, w)
        })
        .collect()
}

/// Resizes a `[src*src, C]` table, seen as a `src` x `src` grid (row-major) of `C`-vectors, to
/// `[dst*dst, C]`. The input is returned unchanged when the grids already match; otherwise the
/// result has the input's dtype and device (computed in `f32` on the CPU, once per grid size).
pub fn resize_square_table(table: &Tensor, dst: usize) -> Result<Tensor> {
    let (n, c) = table.dims2()?;
    let src = (n as f64).sqrt().round() as usize;
    if src * src != n {
        candle_core::bail!("position table has {n} rows, not a square grid");
    }
    if src == dst {
        return Ok(table.clone());
    }
    if src == 0 {
        candle_core::bail!("empty position table cannot be resized to {dst}x{dst}");
    }
    let data: Vec<f32> = table
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let taps = taps(src, dst);
    let mut out = vec![0f32; dst * dst * c];
    let mut row = vec![0f32; c];
    for (oy, (iy, wy)) in taps.iter().enumerate() {
        for (ox, (ix, wx)) in taps.iter().enumerate() {
            let dst_px = &mut out[(oy * dst + ox) * c..][..c];
            for (j, (&y, &wyj)) in iy.iter().zip(wy).enumerate() {
                // Inner interpolation along x for source row y.
                for (ch, r) in row.iter_mut().enumerate() {
                    let at = |x: usize| data[(y * src + x) * c + ch];
                    let mut t = at(ix[0]) * wx[0];
                    t += at(ix[1]) * wx[1];
                    t += at(ix[2]) * wx[2];
                    t += at(ix[3]) * wx[3];
                    *r = t;
                }
                for (d, &t) in dst_px.iter_mut().zip(&row) {
                    if j == 0 {
                        *d = t * wyj;
                    } else {
                        *d += t * wyj;
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (dst * dst, c), &Device::Cpu)?
        .to_dtype(table.dtype())?
        .to_device(table.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_match_pytorch_for_half_scale() {
        // 16 -> 32: source positions -0.25, 0.25, 0.75, ... so t alternates 0.75 / 0.25.
        let t = taps(16, 32);
        assert_eq!(t[0].0, [0, 0, 0, 1]);
        assert_eq!(t[31].0, [14, 15, 15, 15]);
        for (_, w) in &t {
            let s: f32 = w.iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{w:?}");
        }
        // t = 0.75 with a = -0.75: PyTorch's coefficients.
        let w = t[0].1;
        let expect = [-0.03515625f32, 0.26171875, 0.87890625, -0.10546875];
        assert_eq!(w, expect);
    }

    #[test]
    fn constant_table_stays_constant_and_same_size_is_identity() -> Result<()> {
        let t = Tensor::ones((16, 3), DType::F32, &Device::Cpu)?;
        let r = resize_square_table(&t, 8)?;
        assert_eq!(r.dims(), &[64, 3]);
        let v: Vec<f32> = r.flatten_all()?.to_vec1()?;
        assert!(v.iter().all(|x| (x - 1.0).abs() < 1e-6));
        let same = resize_square_table(&t, 4)?;
        assert_eq!(same.flatten_all()?.to_vec1::<f32>()?, vec![1f32; 48]);
        assert!(resize_square_table(&Tensor::ones((15, 3), DType::F32, &Device::Cpu)?, 4).is_err());
        Ok(())
    }
}

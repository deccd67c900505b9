//! What the tiled matmuls of [`crate::quant`] and [`crate::dense16`] share: the output their
//! threads write side by side, and reading f16 values without F16C.

/// The `[m, n]` output of a tiled matmul `y = x·Wᵀ + b`, shared by the threads that compute it:
/// each writes only the columns of its own tiles (quantized in [`crate::quant`], 16-bit in [`crate::dense16`]).
#[derive(Clone, Copy)]
pub(crate) struct TileOut<'a> {
    ptr: *mut f32,
    n: usize,
    bias: Option<&'a [f32]>,
}
// SAFETY: writes go through `store`, whose callers keep their column ranges disjoint.
unsafe impl Send for TileOut<'_> {}
unsafe impl Sync for TileOut<'_> {}

impl<'a> TileOut<'a> {
    /// Checks the shapes of `x` (`m` rows of `k`), `out` and `bias` for an `[n, k]` weight.
    pub(crate) fn new(
        out: &'a mut [f32],
        x: &[f32],
        (m, n, k): (usize, usize, usize),
        bias: Option<&'a [f32]>,
    ) -> Self {
        assert_eq!(x.len(), m * k, "activation shape");
        assert_eq!(out.len(), m * n, "output shape");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "bias shape");
        }
        Self {
            ptr: out.as_mut_ptr(),
            n,
            bias,
        }
    }

    /// Writes `dots` (row `i`, columns `j0..j0 + dots.len()`), adding the bias as it stores
    /// (a separate broadcast add is another pass over the output, on one thread).
    ///
    /// # Safety
    /// `i` and the columns must lie inside the output, and no other thread may write them.
    pub(crate) unsafe fn store(self, i: usize, j0: usize, dots: &mut [f32]) {
        let cols = dots.len();
        if let Some(b) = self.bias {
            for (v, b) in dots.iter_mut().zip(&b[j0..j0 + cols]) {
                *v += b;
            }
        }
        std::ptr::copy_nonoverlapping(dots.as_ptr(), self.ptr.add(i * self.n + j0), cols);
    }
}

/// f16 bits to f32 without F16C, branch-free so that it vectorises: normal numbers by moving
/// the exponent, subnormals through one float multiply, infinities and NaNs kept.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // Normal: rebias the exponent (2^112 = 2^(127 − 15)).
    let normal = f32::from_bits((em << 13) + (112 << 23));
    // Subnormal (exponent 0): mantissa · 2^-24, exact in f32.
    let sub = em as f32 * f32::from_bits(0x3380_0000);
    let v = if em < 0x0400 {
        sub
    } else if em >= 0x7C00 {
        f32::from_bits((em << 13) | 0x7F80_0000)
    } else {
        normal
    };
    f32::from_bits(v.to_bits() | sign)
}

/// f32 → bf16 bits, rounding to nearest even (what `vcvtne2ps2bf16` does; NaN stays NaN).
/// Branch-free (both results, then a select), so that loops over it vectorise.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1))) >> 16;
    if x.is_nan() {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// bf16 bits widened to f32 (exact).
#[inline(always)]
pub(crate) fn bf16_value(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

/// Two values as one 32-bit lane of bf16 pairs (`a` in the low half, as `vdpbf16ps` and
/// `tdpbf16ps` pair them).
#[inline(always)]
pub(crate) fn pair(a: f32, b: f32) -> u32 {
    bf16_bits(a) | (bf16_bits(b) << 16)
}

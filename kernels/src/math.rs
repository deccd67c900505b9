//! Elementwise maths at every level: the vision tower's exact (erf) GELU, and `e^x` for the
//! softmax of its fused attention.
//!
//! Every level evaluates the same formulas: `e^x = 2^n·p(f)` with `n = round(x·log2 e)` and a
//! degree-6 Taylor polynomial `p` on `[-½, ½]` (relative error ~2e-7), and erf from Abramowitz &
//! Stegun 7.1.26 (absolute error ≤ 1.5e-7, below f32 rounding of the results that matter). The
//! portable code is written branch-free over plain arrays so that it vectorises too.

use rayon::prelude::*;

use crate::cpu::{self, Isa, Level};

/// Taylor coefficients of `2^f = e^(f·ln 2)`, highest first.
const EXP2_POLY: [f32; 7] = [
    1.540_353e-4,
    1.333_355_8e-3,
    9.618_129e-3,
    5.550_411e-2,
    0.240_226_5,
    std::f32::consts::LN_2,
    1.0,
];
/// A&S 7.1.26: `erf(z) ≈ 1 − t·P(t)·e^(−z²)`, `t = 1 / (1 + 0.3275911·z)`.
const ERF_P: f32 = 0.327_591_1;
const ERF_POLY: [f32; 5] = [
    1.061_405_4,
    -1.453_152_1,
    1.421_413_8,
    -0.284_496_72,
    0.254_829_6,
];
/// Below this `e^x` is 0 in f32 (subnormals end near −103.3).
const EXP_MIN: f32 = -104.0;

/// `e^x` for `x ≤ 0` (inputs below −104 give 0), portable.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let t = x.max(EXP_MIN) * std::f32::consts::LOG2_E;
    // Round to nearest even by the 1.5·2²³ trick (|t| < 2²²).
    const MAGIC: f32 = 12_582_912.0;
    let n = (t + MAGIC) - MAGIC;
    let f = t - n;
    let mut p = EXP2_POLY[0];
    for c in &EXP2_POLY[1..] {
        p = p * f + c;
    }
    // 2^n in two normal halves, so a subnormal result is rounded once, as `vscalefps` does.
    let n = n as i32;
    let (n1, n2) = (n >> 1, n - (n >> 1));
    p * f32::from_bits(((n1 + 127) as u32) << 23) * f32::from_bits(((n2 + 127) as u32) << 23)
}

/// Exact-form GELU `x·(1 + erf(x/√2))/2`, portable.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (a * ERF_P + 1.0);
    let mut p = ERF_POLY[0];
    for c in &ERF_POLY[1..] {
        p = p * t + c;
    }
    let erf_abs = 1.0 - p * t * exp_nonpositive(-(a * a));
    x * 0.5 * (1.0 + erf_abs.copysign(z))
}

/// GELU over `data` in place, on every core, at the process's level.
pub fn gelu_erf_in_place(data: &mut [f32]) {
    gelu_erf_in_place_at(data, cpu::level())
}

/// [`gelu_erf_in_place`] with the code of a chosen level.
pub fn gelu_erf_in_place_at(data: &mut [f32], level: Level) {
    cpu::assert_supported(level);
    let isa = level.isa();
    data.par_chunks_mut(1 << 14).for_each(|c| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was checked above.
        Isa::Avx512 => unsafe { x86::gelu_avx512(c) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::gelu_avx2(c) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon::gelu(c) },
        _ => c.iter_mut().for_each(|x| *x = gelu_erf(*x)),
    });
}

/// `row[j] = e^(row[j] − max)` for scores `≤ max`, with the code of `isa` (one thread).
pub(crate) fn exp_shifted_in_place(row: &mut [f32], max: f32, isa: Isa) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass the ISA of a checked level.
        Isa::Avx512 => unsafe { x86::exp_shifted_avx512(row, max) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::exp_shifted_avx2(row, max) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon::exp_shifted(row, max) },
        _ => row.iter_mut().for_each(|v| *v = exp_nonpositive(*v - max)),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// `e^x` for `x ≤ 0` on 16 lanes: the integer power applied with `vscalefps`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_nonpositive512(x: __m512) -> __m512 {
        let t = _mm512_mul_ps(
            _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN)),
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(EXP2_POLY[0]);
        for &c in &EXP2_POLY[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// GELU on 16 lanes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu512(x: __m512) -> __m512 {
        let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let a = _mm512_abs_ps(z);
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(a, _mm512_set1_ps(ERF_P), one));
        let mut p = _mm512_set1_ps(ERF_POLY[0]);
        for &c in &ERF_POLY[1..] {
            p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
        }
        p = _mm512_mul_ps(p, t);
        let e = exp_nonpositive512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        // erf(|z|) = 1 − p·e; the sign of z is copied back.
        let erf_abs = _mm512_fnmadd_ps(p, e, one);
        let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
        _mm512_mul_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(0.5)),
            _mm512_add_ps(one, erf),
        )
    }

    /// `e^x` for `x ≤ 0` on 8 lanes; `2^n` is built in two normal halves (no `vscalefps`).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_nonpositive256(x: __m256) -> __m256 {
        let t = _mm256_mul_ps(
            _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)),
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm256_sub_ps(t, n);
        let mut p = _mm256_set1_ps(EXP2_POLY[0]);
        for &c in &EXP2_POLY[1..] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
        }
        let n = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(n);
        let n2 = _mm256_sub_epi32(n, n1);
        let bias = _mm256_set1_epi32(127);
        let pow =
            |e: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(e, bias)));
        _mm256_mul_ps(_mm256_mul_ps(p, pow(n1)), pow(n2))
    }

    /// GELU on 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu256(x: __m256) -> __m256 {
        let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let sign_bit = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
        let a = _mm256_andnot_ps(sign_bit, z);
        let one = _mm256_set1_ps(1.0);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(a, _mm256_set1_ps(ERF_P), one));
        let mut p = _mm256_set1_ps(ERF_POLY[0]);
        for &c in &ERF_POLY[1..] {
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
        }
        p = _mm256_mul_ps(p, t);
        let e = exp_nonpositive256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
        let erf_abs = _mm256_fnmadd_ps(p, e, one);
        let erf = _mm256_or_ps(erf_abs, _mm256_and_ps(z, sign_bit));
        _mm256_mul_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(0.5)),
            _mm256_add_ps(one, erf),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_avx512(c: &mut [f32]) {
        let mut chunks = c.chunks_exact_mut(16);
        for v in &mut chunks {
            let p = v.as_mut_ptr();
            _mm512_storeu_ps(p, gelu512(_mm512_loadu_ps(p)));
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = gelu_erf(*x));
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_avx2(c: &mut [f32]) {
        let mut chunks = c.chunks_exact_mut(8);
        for v in &mut chunks {
            let p = v.as_mut_ptr();
            _mm256_storeu_ps(p, gelu256(_mm256_loadu_ps(p)));
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = gelu_erf(*x));
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_avx512(row: &mut [f32], max: f32) {
        let m = _mm512_set1_ps(max);
        let mut chunks = row.chunks_exact_mut(16);
        for v in &mut chunks {
            let p = v.as_mut_ptr();
            _mm512_storeu_ps(p, exp_nonpositive512(_mm512_sub_ps(_mm512_loadu_ps(p), m)));
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|v| *v = exp_nonpositive(*v - max));
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) {
        let m = _mm256_set1_ps(max);
        let mut chunks = row.chunks_exact_mut(8);
        for v in &mut chunks {
            let p = v.as_mut_ptr();
            _mm256_storeu_ps(p, exp_nonpositive256(_mm256_sub_ps(_mm256_loadu_ps(p), m)));
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|v| *v = exp_nonpositive(*v - max));
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use super::*;
    use std::arch::aarch64::*;

    /// `e^x` for `x ≤ 0` on 4 lanes; `2^n` in two normal halves, as on AVX2.
    #[inline(always)]
    pub unsafe fn exp_nonpositive4(x: float32x4_t) -> float32x4_t {
        let t = vmulq_n_f32(vmaxq_f32(x, vdupq_n_f32(EXP_MIN)), std::f32::consts::LOG2_E);
        // `frintn`: round to nearest, ties to even.
        let n = vrndnq_f32(t);
        let f = vsubq_f32(t, n);
        let mut p = vdupq_n_f32(EXP2_POLY[0]);
        for &c in &EXP2_POLY[1..] {
            p = vfmaq_f32(vdupq_n_f32(c), p, f);
        }
        let n = vcvtq_s32_f32(n);
        let n1 = vshrq_n_s32::<1>(n);
        let n2 = vsubq_s32(n, n1);
        let pow =
            |e: int32x4_t| vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(e, vdupq_n_s32(127))));
        vmulq_f32(vmulq_f32(p, pow(n1)), pow(n2))
    }

    /// GELU on 4 lanes.
    #[inline(always)]
    pub unsafe fn gelu4(x: float32x4_t) -> float32x4_t {
        let z = vmulq_n_f32(x, std::f32::consts::FRAC_1_SQRT_2);
        let a = vabsq_f32(z);
        let one = vdupq_n_f32(1.0);
        let t = vdivq_f32(one, vfmaq_n_f32(one, a, ERF_P));
        let mut p = vdupq_n_f32(ERF_POLY[0]);
        for &c in &ERF_POLY[1..] {
            p = vfmaq_f32(vdupq_n_f32(c), p, t);
        }
        p = vmulq_f32(p, t);
        let e = exp_nonpositive4(vnegq_f32(vmulq_f32(a, a)));
        let erf_abs = vfmsq_f32(one, p, e);
        // The sign of z on |erf|.
        let sign = vandq_u32(vreinterpretq_u32_f32(z), vdupq_n_u32(0x8000_0000));
        let erf = vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(erf_abs), sign));
        vmulq_f32(vmulq_n_f32(x, 0.5), vaddq_f32(one, erf))
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn gelu(c: &mut [f32]) {
        let mut chunks = c.chunks_exact_mut(4);
        for v in &mut chunks {
            let p = v.as_mut_ptr();
            vst1q_f32(p, gelu4(vld1q_f32(p)));
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = gelu_erf(*x));
    }

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn exp_shifted(row: &mut [f32], max: f32) {
        let m = vdupq_n_f32(max);
        let mut chunks = row.chunks_exact_mut(4);
        for v in &mut chunks {
            let p = v.as_mut_ptr();
            vst1q_f32(p, exp_nonpositive4(vsubq_f32(vld1q_f32(p), m)));
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|v| *v = exp_nonpositive(*v - max));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64: the Taylor series for |z| ≤ 3 (no cancellation to speak of there), else
    /// `1 − erfc` by its continued fraction `e^(−z²)/√π · 1/(z + ½/(z + 1/(z + 3⁄2/(z + …))))`.
    fn erf64(z: f64) -> f64 {
        if z.abs() > 3.0 {
            let a = z.abs();
            let mut f = a;
            for n in (1..80).rev() {
                f = a + (n as f64 / 2.0) / f;
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / f;
            return (1.0 - erfc).copysign(z);
        }
        let (mut term, mut sum) = (z, z);
        for n in 1..200 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn inputs() -> Vec<f32> {
        // A dense sweep, then the edges: zero, signs, large, subnormal outputs, a ragged tail.
        let mut x: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect();
        x.extend([0.0, -0.0, 30.0, -30.0, 1e-30, -1e-30, 7.5, -13.7, 100.0]);
        x
    }

    /// Each level's GELU within 2e-6·max(1, |x|) of the exact one (the polynomials' own errors,
    /// 1.5e-7 for erf and 2e-7 relative for exp, times |x|, plus f32 rounding), and within 4 ulps
    /// of max(1, |x|) of the portable code's (the same formulas, fused or not).
    #[test]
    fn gelu_matches_the_exact_function_at_every_level() {
        let x = inputs();
        let mut portable = x.clone();
        gelu_erf_in_place_at(&mut portable, Level::Portable);
        for level in cpu::levels_to_test("gelu") {
            let mut got = x.clone();
            gelu_erf_in_place_at(&mut got, level);
            for ((&x, &g), &p) in x.iter().zip(&got).zip(&portable) {
                let exact = x as f64 * 0.5 * (1.0 + erf64(x as f64 / std::f64::consts::SQRT_2));
                let tol = 2e-6 * (x.abs() as f64).max(1.0);
                assert!(
                    (g as f64 - exact).abs() <= tol,
                    "{level} gelu({x}) = {g}, exact {exact}"
                );
                // `1 + erf` cancels for negative x: compare on the scale of x, not of the result.
                assert!(
                    (g - p).abs() <= 4.0 * f32::EPSILON * x.abs().max(1.0),
                    "{level} gelu({x}) = {g}, portable {p}"
                );
            }
        }
    }

    /// `e^(x − max)` within `1e-6 + 1e-7·|x|` relative of the exact value at every level: the
    /// polynomial's own 2e-7 and the rounding of its seven steps (6e-8 each), plus the rounding
    /// of `x·log2 e` itself, whose ulp grows with |x| (2⁻²⁴·|x|·log2 e·ln 2 ≈ 6e-8·|x|); down to
    /// the subnormals, and 0 below them.
    #[test]
    fn exp_matches_libm_at_every_level() {
        let mut x: Vec<f32> = (0..=2100).map(|i| -(i as f32) * 0.05).collect();
        x.extend([-87.5, -100.0, -103.9, -104.0, -150.0, f32::MIN]);
        for level in cpu::levels_to_test("exp") {
            let mut got = x.clone();
            exp_shifted_in_place(&mut got, 0.0, level.isa());
            for (&x, &g) in x.iter().zip(&got) {
                let want = (x as f64).exp();
                // Subnormal results also round to the subnormal grid (steps of 1.4e-45).
                let tol = (1e-6 + 1e-7 * x.abs() as f64) * want + 1.5e-45;
                assert!(
                    (g as f64 - want).abs() <= tol,
                    "{level} e^{x} = {g}, want {want}"
                );
            }
        }
    }
}

//! AVX-512 helpers shared by the vision tower's CPU kernels.

/// Whether this CPU has AVX-512F (the helpers below need it).
pub fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `e^x` for `x ≤ 0`: `2^(x·log2 e)` split into an integer power, applied with `vscalefps`, and
/// a degree-6 Taylor polynomial on `[-½, ½]` (relative error ~2e-7). Inputs below −104 give 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_nonpositive(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let t = _mm512_mul_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-104.0)),
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    // Taylor coefficients of 2^f = e^(f·ln 2), highest first.
    let c = [
        1.540_353e-4f32,
        1.333_355_8e-3,
        9.618_129e-3,
        5.550_411e-2,
        0.240_226_5,
        std::f32::consts::LN_2,
        1.0,
    ];
    let mut p = _mm512_set1_ps(c[0]);
    for &ci in &c[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    }
    _mm512_scalef_ps(p, n)
}

/// Exact-form GELU `x·(1 + erf(x/√2))/2` on 16 lanes, with erf from Abramowitz & Stegun 7.1.26
/// (absolute error ≤ 1.5e-7, below f32 rounding of the results that matter).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu_erf(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let a = _mm512_abs_ps(z);
    let one = _mm512_set1_ps(1.0);
    let t = _mm512_div_ps(one, _mm512_fmadd_ps(a, _mm512_set1_ps(0.327_591_1), one));
    let mut p = _mm512_set1_ps(1.061_405_4);
    for c in [-1.453_152_1f32, 1.421_413_8, -0.284_496_72, 0.254_829_6] {
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c));
    }
    p = _mm512_mul_ps(p, t);
    let e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
    // erf(|z|) = 1 − p·e; the sign of z is copied back.
    let erf_abs = _mm512_fnmadd_ps(p, e, one);
    let sign = _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(i32::MIN));
    let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), sign));
    _mm512_mul_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(0.5)),
        _mm512_add_ps(one, erf),
    )
}

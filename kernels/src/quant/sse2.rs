//! The portable level's tile kernels on x86-64, in SSE2: the x86-64 baseline, so every x86-64
//! CPU runs them with no detection. The compiler's own vectorisation of the plain-Rust kernels
//! ([`super::tile_dot_q8_0_portable`], [`super::tile_dot_q4k_portable`]) stays 2–3× short of this
//! (it cannot see that a broadcast 4-byte activation pattern feeds `pmaddwd`). Same integer sums,
//! same float operations in the same order: the results are the plain kernels' bit for bit.

// Register blocks read clearest as indexed loops over their row groups.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{
    q4k_d_at, q4k_min_at, q4k_scale_at, Act, Format, LANES, MAX_TILE, Q4K_NIBBLES, Q4K_TILE_BYTES,
    Q8_0_TILE_BYTES, QK8_0, QK_K,
};

/// `out[u] = tile · acts[u]`, one activation row at a time.
pub(super) fn tile_dots(
    format: Format,
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    let (_, _, tbytes) = format.block();
    assert!(tile.len() >= kb * tbytes);
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        assert!(a.q.len() >= kb * format.block().0 && a.d.len() >= kb);
        // SAFETY: SSE2 is part of x86-64; the sizes were checked above.
        unsafe {
            match format {
                Format::Q8_0 => q8_0(tile, kb, a, o),
                Format::Q4K => q4k(tile, kb, a, o),
            }
        }
    }
}

/// Bytes 0–7 (or 8–15) of `v` sign-extended to i16.
#[inline(always)]
unsafe fn widen_lo(v: __m128i) -> __m128i {
    _mm_srai_epi16::<8>(_mm_unpacklo_epi8(v, v))
}

#[inline(always)]
unsafe fn widen_hi(v: __m128i) -> __m128i {
    _mm_srai_epi16::<8>(_mm_unpackhi_epi8(v, v))
}

/// Four activation bytes at `p` as the i16 pattern `[x0 x1 x2 x3 x0 x1 x2 x3]`.
#[inline(always)]
unsafe fn act_pattern(p: *const u8) -> __m128i {
    widen_lo(_mm_set1_epi32((p as *const i32).read_unaligned()))
}

/// Row sums from pair partials: `a = [r0 r0' r1 r1']`, `b = [r2 r2' r3 r3']` → `[r0 r1 r2 r3]`.
#[inline(always)]
unsafe fn rows4(a: __m128i, b: __m128i) -> __m128i {
    let (a, b) = (_mm_castsi128_ps(a), _mm_castsi128_ps(b));
    let even = _mm_castps_si128(_mm_shuffle_ps::<0b10_00_10_00>(a, b));
    let odd = _mm_castps_si128(_mm_shuffle_ps::<0b11_01_11_01>(a, b));
    _mm_add_epi32(even, odd)
}

/// Four f16 values at `p`, widened exactly: the bits moved into f32 position and scaled by
/// 2¹¹² (exact for subnormals too), infinities and NaNs given the all-ones exponent.
#[inline(always)]
unsafe fn f16x4(p: *const u8) -> __m128 {
    let h = _mm_unpacklo_epi16(_mm_loadl_epi64(p as *const __m128i), _mm_setzero_si128());
    let sign = _mm_slli_epi32::<16>(_mm_and_si128(h, _mm_set1_epi32(0x8000)));
    let em = _mm_and_si128(h, _mm_set1_epi32(0x7FFF));
    let v = _mm_mul_ps(
        _mm_castsi128_ps(_mm_slli_epi32::<13>(em)),
        _mm_castsi128_ps(_mm_set1_epi32(0x7780_0000)),
    );
    let special = _mm_cmpgt_epi32(em, _mm_set1_epi32(0x7BFF));
    let v = _mm_or_ps(
        v,
        _mm_castsi128_ps(_mm_and_si128(special, _mm_set1_epi32(0x7F80_0000))),
    );
    _mm_or_ps(v, _mm_castsi128_ps(sign))
}

unsafe fn q8_0(tile: &[u8], kb: usize, a: &Act, out: &mut [f32; MAX_TILE]) {
    let flip = _mm_set1_epi8(-128);
    let mut facc = [_mm_setzero_ps(); 4];
    for b in 0..kb {
        let tb = tile.as_ptr().add(b * Q8_0_TILE_BYTES);
        let ap = a.q.as_ptr().add(b * QK8_0);
        // Per group `g` of 4 rows: pair partials of rows 4g, 4g+1 and of 4g+2, 4g+3.
        let mut acc = [_mm_setzero_si128(); 8];
        for p in 0..8 {
            let x = act_pattern(ap.add(4 * p));
            for g in 0..4 {
                let w = _mm_loadu_si128(tb.add(32 + p * 64 + 16 * g) as *const __m128i);
                // Weights are stored as q + 128.
                let w = _mm_xor_si128(w, flip);
                acc[2 * g] = _mm_add_epi32(acc[2 * g], _mm_madd_epi16(widen_lo(w), x));
                acc[2 * g + 1] = _mm_add_epi32(acc[2 * g + 1], _mm_madd_epi16(widen_hi(w), x));
            }
        }
        let da = _mm_set1_ps(*a.d.get_unchecked(b));
        for g in 0..4 {
            let i = _mm_cvtepi32_ps(rows4(acc[2 * g], acc[2 * g + 1]));
            let scale = _mm_mul_ps(f16x4(tb.add(8 * g)), da);
            facc[g] = _mm_add_ps(facc[g], _mm_mul_ps(i, scale));
        }
    }
    for g in 0..4 {
        _mm_storeu_ps(out.as_mut_ptr().add(4 * g), facc[g]);
    }
    out[LANES..].fill(0.0);
}

/// Four u8 at `p` as the i16 pattern `[s0 s0 s0 s0 s1 s1 s1 s1]` (`lo`) and the same of s2, s3.
#[inline(always)]
unsafe fn scale_patterns(p: *const u8) -> (__m128i, __m128i) {
    let v = _mm_cvtsi32_si128((p as *const i32).read_unaligned());
    let v = _mm_unpacklo_epi8(v, _mm_setzero_si128());
    let v = _mm_unpacklo_epi16(v, v);
    (_mm_unpacklo_epi32(v, v), _mm_unpackhi_epi32(v, v))
}

unsafe fn q4k(tile: &[u8], kb: usize, a: &Act, out: &mut [f32; MAX_TILE]) {
    let mask = _mm_set1_epi8(0x0F);
    let zero = _mm_setzero_si128();
    // Row groups: 0–3 are rows 4g.. (low nibbles), 4–7 rows 16 + 4(g − 4).. (high nibbles).
    let mut facc = [_mm_setzero_ps(); 8];
    for b in 0..kb {
        let tb = tile.as_ptr().add(b * Q4K_TILE_BYTES);
        // Pair partials (rows r, r+1 | r+2, r+3) of Σ_s sc_s·(q·a)_s, per row group.
        let mut int = [_mm_setzero_si128(); 16];
        for s in 0..8 {
            // i16 lanes (row, position in the chunk's 4 values) summed over the 8 chunks.
            let mut acc = [_mm_setzero_si128(); 16];
            for p in 0..8 {
                let x = act_pattern(a.q.as_ptr().add(b * QK_K + s * 32 + 4 * p));
                for g in 0..4 {
                    let at = Q4K_NIBBLES + (s * 8 + p) * 64 + 16 * g;
                    let w = _mm_loadu_si128(tb.add(at) as *const __m128i);
                    let lo = _mm_and_si128(w, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(w), mask);
                    let mul = |v: __m128i| {
                        (
                            _mm_mullo_epi16(_mm_unpacklo_epi8(v, zero), x),
                            _mm_mullo_epi16(_mm_unpackhi_epi8(v, zero), x),
                        )
                    };
                    let (l0, l1) = mul(lo);
                    let (h0, h1) = mul(hi);
                    acc[2 * g] = _mm_add_epi16(acc[2 * g], l0);
                    acc[2 * g + 1] = _mm_add_epi16(acc[2 * g + 1], l1);
                    acc[8 + 2 * g] = _mm_add_epi16(acc[8 + 2 * g], h0);
                    acc[8 + 2 * g + 1] = _mm_add_epi16(acc[8 + 2 * g + 1], h1);
                }
            }
            for g in 0..8 {
                let r = if g < 4 { 4 * g } else { LANES + 4 * (g - 4) };
                let (s01, s23) = scale_patterns(tb.add(q4k_scale_at(r, s)));
                int[2 * g] = _mm_add_epi32(int[2 * g], _mm_madd_epi16(acc[2 * g], s01));
                int[2 * g + 1] = _mm_add_epi32(int[2 * g + 1], _mm_madd_epi16(acc[2 * g + 1], s23));
            }
        }
        let ad = *a.d.get_unchecked(b);
        let da = _mm_set1_ps(ad);
        let sums = a.sums.as_ptr().add(b * 8);
        // Σa of sub-blocks 0–3 and 4–7 as i16 patterns (|Σa| ≤ 32·127 fits).
        let sum_pattern = |at: usize| {
            let v = _mm_loadu_si128(sums.add(at) as *const __m128i);
            let v = _mm_packs_epi32(v, v);
            _mm_unpacklo_epi64(v, v)
        };
        let (s03, s47) = (sum_pattern(0), sum_pattern(4));
        for g in 0..8 {
            let r = if g < 4 { 4 * g } else { LANES + 4 * (g - 4) };
            let m0 = _mm_loadu_si128(tb.add(q4k_min_at(r, 0)) as *const __m128i);
            let m1 = _mm_loadu_si128(tb.add(q4k_min_at(r, 4)) as *const __m128i);
            let pair = |lo: bool| {
                let (a0, a1) = if lo {
                    (_mm_unpacklo_epi8(m0, zero), _mm_unpacklo_epi8(m1, zero))
                } else {
                    (_mm_unpackhi_epi8(m0, zero), _mm_unpackhi_epi8(m1, zero))
                };
                _mm_add_epi32(_mm_madd_epi16(a0, s03), _mm_madd_epi16(a1, s47))
            };
            let mins = _mm_cvtepi32_ps(rows4(pair(true), pair(false)));
            let ints = _mm_cvtepi32_ps(rows4(int[2 * g], int[2 * g + 1]));
            let d = f16x4(tb.add(q4k_d_at(r).0));
            let dmin = f16x4(tb.add(q4k_d_at(r).1));
            facc[g] = _mm_sub_ps(facc[g], _mm_mul_ps(mins, _mm_mul_ps(dmin, da)));
            facc[g] = _mm_add_ps(facc[g], _mm_mul_ps(ints, _mm_mul_ps(d, da)));
        }
    }
    for g in 0..8 {
        let r = if g < 4 { 4 * g } else { LANES + 4 * (g - 4) };
        _mm_storeu_ps(out.as_mut_ptr().add(r), facc[g]);
    }
}

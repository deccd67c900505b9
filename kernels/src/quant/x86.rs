//! The x86-64 tile kernels: AVX-512 VNNI (`vpdpbusd` on 16 lanes) and AVX2 (`vpmaddubsw` +
//! `vpmaddwd` on 8 lanes, or AVX-VNNI `vpdpbusd` on 8 lanes for q8_0). Every kernel computes the
//! same exact integer sums per block and combines them in floats in the same order, so their
//! results are bit-identical.

use std::arch::x86_64::*;

use super::*;

/// Tile-blocks ahead the AVX-512 kernels prefetch (measured on Sapphire Rapids: q4k 1×4096×11008
/// from 69 % to 82 % of the bandwidth, 4 rows 1.50 → 1.20 ms, 8 rows 2.09 → 1.79 ms; 4 blocks
/// ahead was slower).
const Q4K_PREFETCH: usize = 2;
const Q8_0_PREFETCH: usize = 8;

/// [`avx512_rows`] for up to [`MAX_ROWS`] activation rows.
///
/// # Safety
/// The CPU must run [`Level::Avx512`]; `tile` holds `kb` tile-blocks of `format`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile_dots_avx512(
    format: Format,
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    // q4k keeps two sums per row and sub-block and two per row and block: at 8 rows that is more
    // than the 32 registers and the compiler spills a few block sums once per sub-block. Still,
    // one pass of 8 rows beat two passes of 4 over the same tile (Sapphire Rapids, 8×4096×11008:
    // 1.83 → 1.56 ms; a 324-row prefill 660 → 714 GFLOP/s).
    match acts.len() {
        1 => avx512_rows::<1>(format, tile, kb, acts, out),
        2 => avx512_rows::<2>(format, tile, kb, acts, out),
        3 => avx512_rows::<3>(format, tile, kb, acts, out),
        4 => avx512_rows::<4>(format, tile, kb, acts, out),
        5 => avx512_rows::<5>(format, tile, kb, acts, out),
        6 => avx512_rows::<6>(format, tile, kb, acts, out),
        7 => avx512_rows::<7>(format, tile, kb, acts, out),
        _ => avx512_rows::<8>(format, tile, kb, acts, out),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn avx512_rows<const N: usize>(
    format: Format,
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    let (_, _, tbytes) = format.block();
    debug_assert!(tile.len() >= kb * tbytes && acts.len() == N);
    let base = tile.as_ptr();
    let mut facc = [_mm512_setzero_ps(); N];
    // SAFETY (all pointer reads): a tile-block is `tbytes` long with the layout documented at
    // the constants; activation rows are `k` bytes long with `kb` scales (q4k: and `kb` split
    // sums).
    match format {
        Format::Q4K => {
            // Per 64-byte chunk: `full` = Σ(16·q_hi + q_lo)·a and `high` = Σ(16·q_hi)·a, so
            // row r's sum is `full − high` and row r+16's is `high / 16`. Scales and mins are
            // applied to exact integer sums (scale ≤ 63, |Σ q·a| ≤ 32·15·127, |full| ≤
            // 32·255·128: no i32 overflow over a block) and converted to float once per block.
            let mask = _mm512_set1_epi8(0x0F);
            let mut facc_hi = [_mm512_setzero_ps(); N];
            for b in 0..kb {
                let tb = base.add(b * tbytes);
                // The block's header first, in address order: d and dmin of rows 0..16 and
                // 16..32, then the mins, applied right away. Reading it after the nibbles,
                // 4 KiB behind the stream, halved the rate from memory.
                let [d_lo, d_hi, m_lo, m_hi] = [
                    q4k_d_at(0).0,
                    q4k_d_at(LANES).0,
                    q4k_d_at(0).1,
                    q4k_d_at(LANES).1,
                ]
                .map(|at| _mm512_cvtph_ps(_mm256_loadu_si256(tb.add(at) as *const __m256i)));
                for u in 0..N {
                    let da = _mm512_set1_ps(*acts[u].d.get_unchecked(b));
                    let split = acts[u].min_sums.get_unchecked(b);
                    let mins = _mm512_cvtepi32_ps(q4k_min_dot(tb.add(q4k_min_at(0, 0)), split));
                    facc[u] = _mm512_fnmadd_ps(mins, _mm512_mul_ps(m_lo, da), facc[u]);
                    let mins = _mm512_cvtepi32_ps(q4k_min_dot(tb.add(q4k_min_at(LANES, 0)), split));
                    facc_hi[u] = _mm512_fnmadd_ps(mins, _mm512_mul_ps(m_hi, da), facc_hi[u]);
                }
                let mut lo_int = [_mm512_setzero_si512(); N];
                let mut hi_int = [_mm512_setzero_si512(); N];
                // The hardware prefetchers alone leave the stream short of the bandwidth, and
                // with several rows (a batched decode step) the stream and the arithmetic stop
                // overlapping: fetch the block `Q4K_PREFETCH` ahead, a cache line per 64-byte
                // chunk (the tail lines of its header here, the rest in the loop).
                let ahead = tb.wrapping_add(Q4K_PREFETCH * tbytes);
                for line in 64..Q4K_TILE_BYTES.div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64) as *const i8);
                }
                for s in 0..8 {
                    // Two chains per sum for 1–2 rows: one chain of 8 dependent `vpdpbusd`
                    // holds back the loads behind it.
                    let chains = if N <= 2 { 2 } else { 1 };
                    let mut full = [[_mm512_setzero_si512(); 2]; N];
                    let mut high = [[_mm512_setzero_si512(); 2]; N];
                    for p in 0..8 {
                        let line = ahead.wrapping_add((s * 8 + p) * 64);
                        _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                        let w =
                            _mm512_loadu_si512(tb.add(Q4K_NIBBLES + (s * 8 + p) * 64) as *const _);
                        let h = _mm512_andnot_si512(mask, w);
                        let c = p % chains;
                        for u in 0..N {
                            let ap = acts[u].q.as_ptr().add(b * QK_K + s * 32 + p * 4);
                            let a = _mm512_set1_epi32((ap as *const i32).read_unaligned());
                            full[u][c] = _mm512_dpbusd_epi32(full[u][c], w, a);
                            high[u][c] = _mm512_dpbusd_epi32(high[u][c], h, a);
                        }
                    }
                    let full: [_; N] =
                        std::array::from_fn(|u| _mm512_add_epi32(full[u][0], full[u][1]));
                    let high: [_; N] =
                        std::array::from_fn(|u| _mm512_add_epi32(high[u][0], high[u][1]));
                    let sc_lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        tb.add(q4k_scale_at(0, s)) as *const __m128i
                    ));
                    let sc_hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        tb.add(q4k_scale_at(LANES, s)) as *const __m128i,
                    ));
                    for u in 0..N {
                        let lo = _mm512_sub_epi32(full[u], high[u]);
                        lo_int[u] = _mm512_add_epi32(lo_int[u], _mm512_mullo_epi32(lo, sc_lo));
                        // Still 16× the sum: divided once per block, exactly.
                        hi_int[u] = _mm512_add_epi32(hi_int[u], _mm512_mullo_epi32(high[u], sc_hi));
                    }
                }
                for u in 0..N {
                    let da = _mm512_set1_ps(*acts[u].d.get_unchecked(b));
                    let lo = _mm512_cvtepi32_ps(lo_int[u]);
                    facc[u] = _mm512_fmadd_ps(lo, _mm512_mul_ps(d_lo, da), facc[u]);
                    let hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(hi_int[u], 4));
                    facc_hi[u] = _mm512_fmadd_ps(hi, _mm512_mul_ps(d_hi, da), facc_hi[u]);
                }
            }
            for u in 0..N {
                _mm512_storeu_ps(out[u].as_mut_ptr().add(LANES), facc_hi[u]);
            }
        }
        Format::Q8_0 => {
            for b in 0..kb {
                let tb = base.add(b * tbytes);
                // As for q4k: the block `Q8_0_PREFETCH` ahead, its 9 cache lines.
                let ahead = tb.wrapping_add(Q8_0_PREFETCH * tbytes);
                for line in 0..Q8_0_TILE_BYTES.div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64) as *const i8);
                }
                let dv = _mm512_cvtph_ps(_mm256_loadu_si256(tb as *const __m256i));
                let mut iacc = [_mm512_setzero_si512(); N];
                for p in 0..8 {
                    let w = _mm512_loadu_si512(tb.add(32 + p * 64) as *const _);
                    for u in 0..N {
                        let ap = acts[u].q.as_ptr().add(b * QK8_0 + p * 4);
                        let a = _mm512_set1_epi32((ap as *const i32).read_unaligned());
                        iacc[u] = _mm512_dpbusd_epi32(iacc[u], w, a);
                    }
                }
                for u in 0..N {
                    let corr = _mm512_set1_epi32(128 * *acts[u].sums.get_unchecked(b));
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(iacc[u], corr));
                    let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*acts[u].d.get_unchecked(b)));
                    facc[u] = _mm512_fmadd_ps(v, scale, facc[u]);
                }
            }
        }
    }
    for u in 0..N {
        _mm512_storeu_ps(out[u].as_mut_ptr(), facc[u]);
    }
}

/// `Σ_s m[r][s]·Σa_s` for 16 rows of a q4k tile-block whose mins start at `mins` (see
/// [`q4k_min_at`]), exact: two `vpdpbusd` for each byte of the split sums (see
/// [`Act::min_sums`]). |result| ≤ 8·63·4064.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn q4k_min_dot(mins: *const u8, split: &[i32; 4]) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: 128 bytes of mins start at `mins`.
    let m0 = _mm512_loadu_si512(mins as *const _);
    let m1 = _mm512_loadu_si512(mins.add(64) as *const _);
    let z = _mm512_setzero_si512();
    let hi = _mm512_dpbusd_epi32(z, m0, _mm512_set1_epi32(split[0]));
    let hi = _mm512_dpbusd_epi32(hi, m1, _mm512_set1_epi32(split[1]));
    let lo = _mm512_dpbusd_epi32(z, m0, _mm512_set1_epi32(split[2]));
    let lo = _mm512_dpbusd_epi32(lo, m1, _mm512_set1_epi32(split[3]));
    _mm512_add_epi32(_mm512_slli_epi32(hi, 6), lo)
}

/// [`quantize_block_sums`] 16 lanes at a time, with the same results: `vcvtps2dq` rounds to
/// nearest even like the scalar trick. Blocks holding NaN or ±∞ take the scalar path.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_block_avx512(x: &[f32], q: &mut [u8], sums: &mut [i32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    debug_assert!(n.is_multiple_of(32) && q.len() == n && sums.len() == n / 32);
    let p = x.as_ptr();
    let mut amax = _mm512_setzero_ps();
    let mut unordered = 0u16;
    for i in (0..n).step_by(16) {
        let v = _mm512_loadu_ps(p.add(i));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        unordered |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    }
    let amax = _mm512_reduce_max_ps(amax);
    if unordered != 0 || !amax.is_finite() || amax == 0.0 {
        return super::quantize_block_sums(x, q, sums);
    }
    let id = _mm512_set1_ps(127.0 / amax);
    for (c, s) in sums.iter_mut().enumerate() {
        let lo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p.add(32 * c)), id));
        let hi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p.add(32 * c + 16)), id));
        *s = _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi));
        _mm_storeu_si128(
            q.as_mut_ptr().add(32 * c) as *mut __m128i,
            _mm512_cvtepi32_epi8(lo),
        );
        _mm_storeu_si128(
            q.as_mut_ptr().add(32 * c + 16) as *mut __m128i,
            _mm512_cvtepi32_epi8(hi),
        );
    }
    amax / 127.0
}

/// q4k rows the AVX2 kernel takes at once (six accumulators per row in 16 registers).
const Q4K_AVX2_ROWS: usize = 2;
/// q8_0 rows the AVX2 kernel takes at once.
const Q8_0_AVX2_ROWS: usize = 4;

/// The AVX2 kernels for up to [`MAX_ROWS`] activation rows.
///
/// # Safety
/// The CPU must run [`Level::Avx2`]; `tile` holds `kb` tile-blocks of `format`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_dots_avx2(
    format: Format,
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    let vnni = cpu::features().avx_vnni;
    let per = match format {
        Format::Q4K => Q4K_AVX2_ROWS,
        Format::Q8_0 => Q8_0_AVX2_ROWS,
    };
    for (a, o) in acts.chunks(per).zip(out.chunks_mut(per)) {
        match (format, a.len()) {
            (Format::Q4K, 1) => q4k_avx2::<1>(tile, kb, a, o),
            (Format::Q4K, _) => q4k_avx2::<2>(tile, kb, a, o),
            (Format::Q8_0, n) if vnni => match n {
                1 => q8_0_avxvnni::<1>(tile, kb, a, o),
                2 => q8_0_avxvnni::<2>(tile, kb, a, o),
                3 => q8_0_avxvnni::<3>(tile, kb, a, o),
                _ => q8_0_avxvnni::<4>(tile, kb, a, o),
            },
            (Format::Q8_0, n) => match n {
                1 => q8_0_avx2::<1, MaddDot>(tile, kb, a, o),
                2 => q8_0_avx2::<2, MaddDot>(tile, kb, a, o),
                3 => q8_0_avx2::<3, MaddDot>(tile, kb, a, o),
                _ => q8_0_avx2::<4, MaddDot>(tile, kb, a, o),
            },
        }
    }
}

/// Sums of four byte products per 32-bit lane, as q8_0 stores them: `acc + Σ (w − 128)·a` for
/// weight bytes `w` stored as `q + 128` and signed activation bytes `a`.
trait Q8Dot {
    /// Whether [`Self::dot`] leaves the `128·Σa` offset in (subtracted once per block).
    const OFFSET: bool;
    unsafe fn dot(acc: __m256i, w: __m256i, a: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` takes unsigned × signed bytes with i16 saturation, so the weights go back
/// to signed `q`, and `|q|·(a·sign q)` is multiplied (|q| ≤ 128, |a| ≤ 127: no saturation).
struct MaddDot;
impl Q8Dot for MaddDot {
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        let q = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(a, q));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
}

/// AVX-VNNI (VEX) `vpdpbusd`: unsigned weights as stored, exact i32 sums.
struct VexVnniDot;
impl Q8Dot for VexVnniDot {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, a)
    }
}

/// The same instruction in its EVEX form (AVX-512 VNNI + VL): the AVX-VNNI code path, testable
/// on CPUs that have AVX-512 VNNI but not AVX-VNNI.
#[cfg(test)]
pub(super) struct EvexVnniDot;
#[cfg(test)]
impl Q8Dot for EvexVnniDot {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, a)
    }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn q8_0_avxvnni<const N: usize>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    q8_0_avx2::<N, VexVnniDot>(tile, kb, acts, out)
}

/// [`q8_0_avx2`] with [`EvexVnniDot`], for tests.
#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn q8_0_evex_vnni<const N: usize>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    q8_0_avx2::<N, EvexVnniDot>(tile, kb, acts, out)
}

/// q8_0 on 8 lanes: the 16-row tile as two halves of 8 rows.
#[inline(always)]
unsafe fn q8_0_avx2<const N: usize, D: Q8Dot>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    debug_assert!(tile.len() >= kb * Q8_0_TILE_BYTES && acts.len() == N);
    // Both halves of a block before the next one: each chunk is read from memory in one pass.
    let mut facc = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..kb {
        let tb = tile.as_ptr().add(b * Q8_0_TILE_BYTES);
        for (h, facc) in facc.iter_mut().enumerate() {
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(tb.add(16 * h) as *const __m128i));
            let mut iacc = [_mm256_setzero_si256(); N];
            for p in 0..8 {
                let w = _mm256_loadu_si256(tb.add(32 + p * 64 + 32 * h) as *const __m256i);
                for u in 0..N {
                    let ap = acts[u].q.as_ptr().add(b * QK8_0 + p * 4);
                    let a = _mm256_set1_epi32((ap as *const i32).read_unaligned());
                    iacc[u] = D::dot(iacc[u], w, a);
                }
            }
            for u in 0..N {
                let mut i = iacc[u];
                if D::OFFSET {
                    i = _mm256_sub_epi32(
                        i,
                        _mm256_set1_epi32(128 * *acts[u].sums.get_unchecked(b)),
                    );
                }
                let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*acts[u].d.get_unchecked(b)));
                facc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), scale, facc[u]);
            }
        }
    }
    for (h, facc) in facc.iter().enumerate() {
        for u in 0..N {
            _mm256_storeu_ps(out[u].as_mut_ptr().add(8 * h), facc[u]);
        }
    }
}

/// `Σ_s m[r][s]·Σa_s` for the 8 rows whose mins start at `mins` (see [`q4k_min_at`]; the two
/// 64-byte groups of sub-blocks 0–3 and 4–7), exact, as [`q4k_min_dot`] computes it.
#[inline(always)]
unsafe fn q4k_min_dot_avx2(mins: *const u8, split: &[i32; 4]) -> __m256i {
    let m0 = _mm256_loadu_si256(mins as *const __m256i);
    let m1 = _mm256_loadu_si256(mins.add(64) as *const __m256i);
    // mins ≤ 63 times bytes in -64..=63: pairs ≤ 8064, no i16 saturation.
    #[inline(always)]
    unsafe fn dot(m: __m256i, s: i32) -> __m256i {
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(m, _mm256_set1_epi32(s)),
            _mm256_set1_epi16(1),
        )
    }
    let hi = _mm256_add_epi32(dot(m0, split[0]), dot(m1, split[1]));
    let lo = _mm256_add_epi32(dot(m0, split[2]), dot(m1, split[3]));
    _mm256_add_epi32(_mm256_slli_epi32(hi, 6), lo)
}

/// q4k on 8 lanes: lane-half `h` of the tile covers rows `8h..8h+8` (low nibbles) and
/// `16+8h..16+8h+8` (high nibbles). Nibble products (≤ 15·127) summed as i16 over a whole
/// 32-value sub-block stay below 2¹⁵; `vpmaddwd` with the scales then gives exact i32 sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_avx2<const N: usize>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    debug_assert!(tile.len() >= kb * Q4K_TILE_BYTES && acts.len() == N);
    let mask = _mm256_set1_epi8(0x0F);
    // Each scale in both 16-bit halves of its lane, for `vpmaddwd`.
    let pair = |sc: *const u8| {
        let s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(sc as *const __m128i));
        _mm256_or_si256(s, _mm256_slli_epi32(s, 16))
    };
    // Both lane-halves of a block before the next block: each 64-byte chunk is read from memory
    // once, in one pass (a pass per half streamed memory at ~70 % of the AVX-512 kernel's rate).
    let mut facc_all = [[_mm256_setzero_ps(); N]; 2];
    let mut facc_hi_all = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..kb {
        let tb = tile.as_ptr().add(b * Q4K_TILE_BYTES);
        for h in 0..2 {
            let facc = &mut facc_all[h];
            let facc_hi = &mut facc_hi_all[h];
            let f16x8 = |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(tb.add(at) as *const __m128i));
            let (d_lo, d_hi) = (f16x8(q4k_d_at(8 * h).0), f16x8(q4k_d_at(LANES + 8 * h).0));
            let (m_lo, m_hi) = (f16x8(q4k_d_at(8 * h).1), f16x8(q4k_d_at(LANES + 8 * h).1));
            for u in 0..N {
                let da = _mm256_set1_ps(*acts[u].d.get_unchecked(b));
                let split = acts[u].min_sums.get_unchecked(b);
                let lo = q4k_min_dot_avx2(tb.add(q4k_min_at(0, 0) + 32 * h), split);
                facc[u] =
                    _mm256_fnmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(m_lo, da), facc[u]);
                let hi = q4k_min_dot_avx2(tb.add(q4k_min_at(LANES, 0) + 32 * h), split);
                facc_hi[u] =
                    _mm256_fnmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(m_hi, da), facc_hi[u]);
            }
            let mut lo_int = [_mm256_setzero_si256(); N];
            let mut hi_int = [_mm256_setzero_si256(); N];
            for s in 0..8 {
                let mut lo16 = [_mm256_setzero_si256(); N];
                let mut hi16 = [_mm256_setzero_si256(); N];
                for p in 0..8 {
                    let w = _mm256_loadu_si256(
                        tb.add(Q4K_NIBBLES + (s * 8 + p) * 64 + 32 * h) as *const __m256i
                    );
                    let wl = _mm256_and_si256(w, mask);
                    let wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                    for u in 0..N {
                        let ap = acts[u].q.as_ptr().add(b * QK_K + s * 32 + p * 4);
                        let a = _mm256_set1_epi32((ap as *const i32).read_unaligned());
                        lo16[u] = _mm256_add_epi16(lo16[u], _mm256_maddubs_epi16(wl, a));
                        hi16[u] = _mm256_add_epi16(hi16[u], _mm256_maddubs_epi16(wh, a));
                    }
                }
                let sc_lo = pair(tb.add(q4k_scale_at(8 * h, s)));
                let sc_hi = pair(tb.add(q4k_scale_at(LANES + 8 * h, s)));
                for u in 0..N {
                    lo_int[u] = _mm256_add_epi32(lo_int[u], _mm256_madd_epi16(lo16[u], sc_lo));
                    hi_int[u] = _mm256_add_epi32(hi_int[u], _mm256_madd_epi16(hi16[u], sc_hi));
                }
            }
            for u in 0..N {
                let da = _mm256_set1_ps(*acts[u].d.get_unchecked(b));
                let lo = _mm256_cvtepi32_ps(lo_int[u]);
                facc[u] = _mm256_fmadd_ps(lo, _mm256_mul_ps(d_lo, da), facc[u]);
                let hi = _mm256_cvtepi32_ps(hi_int[u]);
                facc_hi[u] = _mm256_fmadd_ps(hi, _mm256_mul_ps(d_hi, da), facc_hi[u]);
            }
        }
    }
    for h in 0..2 {
        for u in 0..N {
            _mm256_storeu_ps(out[u].as_mut_ptr().add(8 * h), facc_all[h][u]);
            _mm256_storeu_ps(out[u].as_mut_ptr().add(LANES + 8 * h), facc_hi_all[h][u]);
        }
    }
}

/// [`quantize_block_sums`] 8 lanes at a time, with the same results (`vcvtps2dq` rounds to
/// nearest even like the scalar trick). Blocks holding NaN or ±∞ take the scalar path.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_block_avx2(x: &[f32], q: &mut [u8], sums: &mut [i32]) -> f32 {
    let n = x.len();
    debug_assert!(n.is_multiple_of(32) && q.len() == n && sums.len() == n / 32);
    let p = x.as_ptr();
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let mut amax = _mm256_setzero_ps();
    let mut unordered = 0;
    for i in (0..n).step_by(8) {
        let v = _mm256_loadu_ps(p.add(i));
        amax = _mm256_max_ps(amax, _mm256_and_ps(v, abs));
        unordered |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), amax);
    let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
    if unordered != 0 || !amax.is_finite() || amax == 0.0 {
        return super::quantize_block_sums(x, q, sums);
    }
    let id = _mm256_set1_ps(127.0 / amax);
    // `vpackssdw`/`vpacksswb` interleave the 128-bit halves; this puts the 32 bytes in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (c, s) in sums.iter_mut().enumerate() {
        let v: [__m256i; 4] = std::array::from_fn(|j| {
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(32 * c + 8 * j)), id))
        });
        let total = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
        let mut t = [0i32; 8];
        _mm256_storeu_si256(t.as_mut_ptr() as *mut __m256i, total);
        *s = t.iter().sum();
        let b = _mm256_packs_epi16(
            _mm256_packs_epi32(v[0], v[1]),
            _mm256_packs_epi32(v[2], v[3]),
        );
        let b = _mm256_permutevar8x32_epi32(b, order);
        _mm256_storeu_si256(q.as_mut_ptr().add(32 * c) as *mut __m256i, b);
    }
    amax / 127.0
}

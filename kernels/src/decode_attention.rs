//! Causal attention of a few new queries over the KV cache, fused into one pass per head
//! (decoding: one query per step), at every [`Level`].
//!
//! Through candle a decode step's attention is a dozen ops per layer (a strided matmul of one query
//! row, a division, a softmax, a second matmul and two layout copies), each allocating its output
//! and each a parallel region of its own. Here every head computes its scores, softmax and
//! weighted sum of values in one go, reading the cache in place, and writes its output straight
//! into the `[t, heads·head_dim]` layout `c_proj` takes.
//!
//! Arithmetic is the reference's: `s_j = (q·k_j) / scale` in f32, `p_j = e^(s_j − max) / Σe`,
//! `out = Σ p_j·v_j`; only the order of the f32 sums differs between levels.

use rayon::prelude::*;

use crate::cpu::{self, Isa, Level};

/// Queries per call this path takes; longer runs (prefills) go through batched matmuls.
pub const MAX_QUERIES: usize = 16;

/// Shapes of one call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub heads: usize,
    /// New queries, the last `queries` positions of the cache.
    pub queries: usize,
    pub head_dim: usize,
    /// Positions a head's cache buffer has room for (its stride in rows).
    pub capacity: usize,
    /// Positions filled, the new ones included.
    pub len: usize,
}

/// What the KV cache may hold: f32, or f16 (widened to f32 as it is read).
pub trait KvElem: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    /// Whether this is f16 (the SIMD loads differ).
    const F16: bool;
}

impl KvElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    const F16: bool = false;
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    const F16: bool = true;
}

/// `out[i, h, :] = softmax((q[h, i]·k[h, :len]ᵀ) / scale, causal)·v[h, :len]`, with `q`
/// `[heads, queries, head_dim]`, `k` and `v` `[heads, capacity, head_dim]` and `out`
/// `[queries, heads, head_dim]`. Query `i` sees keys `0..=len − queries + i`.
pub fn attend<T: KvElem>(q: &[f32], k: &[T], v: &[T], dims: Dims, scale: f32, out: &mut [f32]) {
    attend_at(q, k, v, dims, scale, out, cpu::level())
}

/// [`attend`] with the kernel of a chosen level.
///
/// # Panics
/// If this CPU cannot run `level`, or the shapes do not match.
pub fn attend_at<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    dims: Dims,
    scale: f32,
    out: &mut [f32],
    level: Level,
) {
    cpu::assert_supported(level);
    let Dims {
        heads,
        queries,
        head_dim: d,
        capacity,
        len,
    } = dims;
    assert!(
        queries >= 1 && queries <= len && len <= capacity,
        "{dims:?}"
    );
    assert_eq!(q.len(), heads * queries * d, "query shape");
    assert!(k.len() >= heads * capacity * d && v.len() >= heads * capacity * d);
    assert_eq!(out.len(), queries * heads * d, "output shape");
    // Each level's vectors need whole lanes of the head width; others take the portable loop.
    let isa = match level.isa() {
        Isa::Avx512 if d.is_multiple_of(16) => Isa::Avx512,
        Isa::Avx512 | Isa::Avx2 if d.is_multiple_of(8) => Isa::Avx2,
        Isa::Neon if d.is_multiple_of(4) => Isa::Neon,
        _ => Isa::Portable,
    };
    // One task per output row: row `i·heads + h` is query `i` of head `h`.
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0f32; len],
        |scores, (row, o)| {
            let (i, h) = (row / heads, row % heads);
            let seen = len - queries + i + 1;
            let qh = &q[(h * queries + i) * d..][..d];
            let kh = &k[h * capacity * d..][..seen * d];
            let vh = &v[h * capacity * d..][..seen * d];
            let scores = &mut scores[..seen];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the level was checked above and the width fits its lanes.
                Isa::Avx512 => unsafe { x86::row_avx512(qh, kh, vh, scale, scores, o) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above (AVX2 is below every AVX-512 level).
                Isa::Avx2 => unsafe { x86::row_avx2(qh, kh, vh, scale, scores, o) },
                #[cfg(target_arch = "aarch64")]
                // SAFETY: as above.
                Isa::Neon => unsafe { neon::row(qh, kh, vh, scale, scores, o) },
                _ => row_portable(qh, kh, vh, scale, scores, o),
            }
        },
    );
}

/// `e^(s − max)` over the scores and their sum (shared by every level: the exponentials are
/// libm's, once per key).
fn softmax_in_place(scores: &mut [f32]) -> f32 {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    sum
}

/// Lanes of the portable loops: fixed arrays the compiler vectorises.
const P: usize = 8;

/// One query row over `scores.len()` keys, in plain Rust.
fn row_portable<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        let kj = &k[j * d..(j + 1) * d];
        let mut acc = [0f32; P];
        let mut qc = q.chunks_exact(P);
        let mut kc = kj.chunks_exact(P);
        for (a, b) in (&mut qc).zip(&mut kc) {
            for l in 0..P {
                acc[l] += a[l] * b[l].widen();
            }
        }
        let mut dot: f32 = acc.iter().sum();
        for (a, b) in qc.remainder().iter().zip(kc.remainder()) {
            dot += a * b.widen();
        }
        *s = dot / scale;
    }
    let sum = softmax_in_place(scores);
    out.fill(0.0);
    for (j, &e) in scores.iter().enumerate() {
        let p = e / sum;
        for (o, x) in out.iter_mut().zip(&v[j * d..(j + 1) * d]) {
            *o += p * x.widen();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{softmax_in_place, KvElem};
    use std::arch::x86_64::*;

    /// Rows ahead the AVX-512 rows prefetch (2 KB of an f16 cache at Qwen's 128).
    const PREFETCH_ROWS: usize = 8;

    #[inline(always)]
    unsafe fn load16<T: KvElem>(p: *const T) -> __m512 {
        if T::F16 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    #[inline(always)]
    unsafe fn load8<T: KvElem>(p: *const T) -> __m256 {
        if T::F16 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// One query row over `scores.len()` keys; `q.len()` is a multiple of 16.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `k` and `v` hold `scores.len()` rows of `q.len()` values.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn row_avx512<T: KvElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        // The query and the output row live in registers for the common head widths (Qwen's
        // 128 is 8 vectors): through memory, every key's update of the output waited on the
        // store of the key before it.
        match q.len() / 16 {
            1 => row_regs::<T, 1>(q, k, v, scale, scores, out),
            2 => row_regs::<T, 2>(q, k, v, scale, scores, out),
            4 => row_regs::<T, 4>(q, k, v, scale, scores, out),
            6 => row_regs::<T, 6>(q, k, v, scale, scores, out),
            8 => row_regs::<T, 8>(q, k, v, scale, scores, out),
            _ => row_memory(q, k, v, scale, scores, out),
        }
    }

    /// `q · k_j` of one key row over `L` vectors, unreduced, in two chains (even and odd
    /// vectors) so the FMA latency overlaps.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn dot<T: KvElem, const L: usize>(qv: &[__m512; L], kj: *const T) -> __m512 {
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for (c, q) in qv.iter().enumerate() {
            if c % 2 == 0 {
                a0 = _mm512_fmadd_ps(*q, load16(kj.add(16 * c)), a0);
            } else {
                a1 = _mm512_fmadd_ps(*q, load16(kj.add(16 * c)), a1);
            }
        }
        _mm512_add_ps(a0, a1)
    }

    /// The lane sums of four vectors, in one `__m128`: a quarter of the shuffles of four
    /// `_mm512_reduce_add_ps`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn reduce4(x: [__m512; 4]) -> __m128 {
        let a = _mm512_add_ps(
            _mm512_unpacklo_ps(x[0], x[1]),
            _mm512_unpackhi_ps(x[0], x[1]),
        );
        let b = _mm512_add_ps(
            _mm512_unpacklo_ps(x[2], x[3]),
            _mm512_unpackhi_ps(x[2], x[3]),
        );
        // Per 128-bit lane: [Σx0, Σx1, Σx2, Σx3] of its four values.
        let c = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(a, b),
            _mm512_shuffle_ps::<0xEE>(a, b),
        );
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(c)));
        let s = _mm256_add_ps(_mm512_castps512_ps256(c), hi);
        _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
    }

    /// Row `j + PREFETCH_ROWS`'s cache lines, fetched now: one head's rows are one run, and the
    /// hardware prefetchers alone left a core waiting on memory (Sapphire Rapids, 452 f16
    /// positions × 32 heads × 128 per layer from memory: 16.4 → 18.3 GB/s).
    #[inline(always)]
    unsafe fn prefetch_row<T>(base: *const T, j: usize, row_bytes: usize) {
        let p = (base as *const i8).wrapping_add((j + PREFETCH_ROWS) * row_bytes);
        for line in (0..row_bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line));
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn row_regs<T: KvElem, const L: usize>(
        q: &[f32],
        k: &[T],
        v: &[T],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = 16 * L;
        let n = scores.len();
        let row_bytes = d * std::mem::size_of::<T>();
        let qv: [__m512; L] = std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(16 * c)));
        let kp = k.as_ptr();
        let mut j = 0;
        while j + 4 <= n {
            for r in 0..4 {
                prefetch_row(kp, j + r, row_bytes);
            }
            let x: [__m512; 4] = std::array::from_fn(|r| dot::<T, L>(&qv, kp.add((j + r) * d)));
            let s4 = _mm_div_ps(reduce4(x), _mm_set1_ps(scale));
            _mm_storeu_ps(scores.as_mut_ptr().add(j), s4);
            j += 4;
        }
        for (r, s) in scores[j..].iter_mut().enumerate() {
            *s = _mm512_reduce_add_ps(dot::<T, L>(&qv, kp.add((j + r) * d))) / scale;
        }
        let sum = softmax_in_place(scores);
        // p_j = e_j / Σe, sixteen at a time (the same IEEE quotient as one at a time).
        let mut chunks = scores.chunks_exact_mut(16);
        for c in &mut chunks {
            let e = _mm512_loadu_ps(c.as_ptr());
            _mm512_storeu_ps(c.as_mut_ptr(), _mm512_div_ps(e, _mm512_set1_ps(sum)));
        }
        for e in chunks.into_remainder() {
            *e /= sum;
        }
        let mut acc = [_mm512_setzero_ps(); L];
        let vp = v.as_ptr();
        for (j, &p) in scores.iter().enumerate() {
            prefetch_row(vp, j, row_bytes);
            let p = _mm512_set1_ps(p);
            let vj = vp.add(j * d);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(p, load16(vj.add(16 * c)), *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), *a);
        }
    }

    /// [`row_avx512`] for any multiple of 16, the output row in memory.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn row_memory<T: KvElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = q.len();
        let lanes = d / 16;
        for (j, s) in scores.iter_mut().enumerate() {
            let kj = k.as_ptr().add(j * d);
            // Two chains so the FMA latency overlaps.
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut c = 0;
            while c + 1 < lanes {
                a0 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.as_ptr().add(16 * c)),
                    load16(kj.add(16 * c)),
                    a0,
                );
                a1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.as_ptr().add(16 * c + 16)),
                    load16(kj.add(16 * c + 16)),
                    a1,
                );
                c += 2;
            }
            if c < lanes {
                a0 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(q.as_ptr().add(16 * c)),
                    load16(kj.add(16 * c)),
                    a0,
                );
            }
            *s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / scale;
        }
        let sum = softmax_in_place(scores);
        out.fill(0.0);
        for (j, &e) in scores.iter().enumerate() {
            let p = _mm512_set1_ps(e / sum);
            let vj = v.as_ptr().add(j * d);
            for c in 0..lanes {
                let o = out.as_mut_ptr().add(16 * c);
                _mm512_storeu_ps(
                    o,
                    _mm512_fmadd_ps(p, load16(vj.add(16 * c)), _mm512_loadu_ps(o)),
                );
            }
        }
    }

    /// One query row over `scores.len()` keys; `q.len()` is a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_avx2<T: KvElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = q.len();
        let lanes = d / 8;
        for (j, s) in scores.iter_mut().enumerate() {
            let kj = k.as_ptr().add(j * d);
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in 0..lanes {
                acc[c % 4] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(q.as_ptr().add(8 * c)),
                    load8(kj.add(8 * c)),
                    acc[c % 4],
                );
            }
            let a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
            let x = _mm_add_ss(x, _mm_movehdup_ps(x));
            *s = _mm_cvtss_f32(x) / scale;
        }
        let sum = softmax_in_place(scores);
        out.fill(0.0);
        for (j, &e) in scores.iter().enumerate() {
            let p = _mm256_set1_ps(e / sum);
            let vj = v.as_ptr().add(j * d);
            for c in 0..lanes {
                let o = out.as_mut_ptr().add(8 * c);
                _mm256_storeu_ps(
                    o,
                    _mm256_fmadd_ps(p, load8(vj.add(8 * c)), _mm256_loadu_ps(o)),
                );
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{softmax_in_place, KvElem};
    use std::arch::aarch64::*;

    #[inline(always)]
    unsafe fn load4<T: KvElem>(p: *const T) -> float32x4_t {
        if T::F16 {
            crate::arm::load_f16x4(p as *const u16)
        } else {
            vld1q_f32(p as *const f32)
        }
    }

    /// One query row over `scores.len()` keys; `q.len()` is a multiple of 4.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn row<T: KvElem>(
        q: &[f32],
        k: &[T],
        v: &[T],
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = q.len();
        let lanes = d / 4;
        for (j, s) in scores.iter_mut().enumerate() {
            let kj = k.as_ptr().add(j * d);
            // Four chains so the FMA latency overlaps.
            let mut acc = [vdupq_n_f32(0.0); 4];
            for c in 0..lanes {
                acc[c % 4] = vfmaq_f32(
                    acc[c % 4],
                    vld1q_f32(q.as_ptr().add(4 * c)),
                    load4(kj.add(4 * c)),
                );
            }
            let a = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
            *s = vaddvq_f32(a) / scale;
        }
        let sum = softmax_in_place(scores);
        out.fill(0.0);
        for (j, &e) in scores.iter().enumerate() {
            let p = e / sum;
            let vj = v.as_ptr().add(j * d);
            for c in 0..lanes {
                let o = out.as_mut_ptr().add(4 * c);
                vst1q_f32(o, vfmaq_n_f32(vld1q_f32(o), load4(vj.add(4 * c)), p));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The reference's arithmetic in plain f64 loops.
    fn naive(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> Vec<f32> {
        let Dims {
            heads,
            queries,
            head_dim: d,
            capacity,
            len,
        } = dims;
        let mut out = vec![0f32; queries * heads * d];
        for h in 0..heads {
            for i in 0..queries {
                let seen = len - queries + i + 1;
                let qh = &q[(h * queries + i) * d..][..d];
                let s: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kj = &k[(h * capacity + j) * d..][..d];
                        qh.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / scale as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..d {
                    let acc: f64 = (0..seen)
                        .map(|j| e[j] / sum * v[(h * capacity + j) * d + c] as f64)
                        .sum();
                    out[(i * heads + h) * d + c] = acc as f32;
                }
            }
        }
        out
    }

    fn max_error(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn matches_exact_causal_attention() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let levels = cpu::levels_to_test("decode attention");
        // Odd lengths, a partly filled buffer, one query and several, widths of 1, 2 and 8
        // vectors (and 4, 6 and 3: each register width of the AVX-512 rows) and widths that fit
        // no vector (12, 6), length 1 and a very long cache.
        for (heads, queries, d, capacity, len) in [
            (4, 1, 128, 256, 131),
            (3, 5, 32, 64, 37),
            (2, 16, 16, 16, 16),
            (1, 1, 48, 8, 1),
            (2, 3, 24, 40, 40),
            (3, 2, 12, 9, 7),
            (1, 1, 6, 3, 1),
            (2, 1, 128, 5000, 4999),
            (2, 2, 64, 70, 69),
            (1, 1, 96, 10, 10),
        ] {
            let dims = Dims {
                heads,
                queries,
                head_dim: d,
                capacity,
                len,
            };
            let mut r = |n: usize, s: f32| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-s..s)).collect()
            };
            // Scores spread over ±8 so the softmax is far from uniform.
            let q = r(heads * queries * d, 3.0);
            let k = r(heads * capacity * d, 1.0);
            let v = r(heads * capacity * d, 2.0);
            let scale = (d as f32).sqrt();
            let exact = naive(&q, &k, &v, dims, scale);
            let half = |x: &[f32]| -> Vec<half::f16> {
                x.iter().map(|&x| half::f16::from_f32(x)).collect()
            };
            let (kh, vh) = (half(&k), half(&v));
            let widen = |x: &[half::f16]| -> Vec<f32> { x.iter().map(|x| x.to_f32()).collect() };
            let exact_half = naive(&q, &widen(&kh), &widen(&vh), dims, scale);
            // f32 sums of up to 128 products of values ≤ 3 and softmax sums over 5000 keys:
            // rounding stays near 1e-6; 2e-5 leaves room without hiding a wrong weight.
            for &level in &levels {
                let mut out = vec![f32::NAN; queries * heads * d];
                attend_at(&q, &k, &v, dims, scale, &mut out, level);
                let err = max_error(&out, &exact);
                assert!(err < 2e-5, "{level} f32 {dims:?}: max error {err}");
                // An f16 cache: the same arithmetic on the widened values.
                attend_at(&q, &kh, &vh, dims, scale, &mut out, level);
                let err = max_error(&out, &exact_half);
                assert!(err < 2e-5, "{level} f16 {dims:?}: max error {err}");
            }
        }
    }
}

//! Causal attention of a few new queries over the KV cache, fused into one pass per head on CPUs
//! with AVX-512 (decoding: one query per step).
//!
//! Through candle a decode step's attention is a dozen ops per layer (a strided matmul of one query
//! row, a division, a softmax, a second matmul and two layout copies), each allocating its output
//! and each a parallel region of its own. Here every head computes its scores, softmax and
//! weighted sum of values in one go, reading the cache in place, and writes its output straight
//! into the `[t, heads·head_dim]` layout `c_proj` takes.
//!
//! Arithmetic is the reference's: `s_j = (q·k_j) / scale` in f32, `p_j = e^(s_j − max) / Σe`,
//! `out = Σ p_j·v_j`; only the order of the f32 sums differs.

use rayon::prelude::*;

/// Queries per call this path takes; longer runs (prefills) go through batched matmuls.
pub const MAX_QUERIES: usize = 16;

/// Whether the fused kernel runs on this CPU for heads of width `head_dim`.
pub fn available(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        head_dim.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

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
pub trait KvElem: Copy + Send + Sync {
    /// Sixteen values from `p`, as f32.
    ///
    /// # Safety
    /// `p` must point at 16 readable values and the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl KvElem for half::f16 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// `out[i, h, :] = softmax((q[h, i]·k[h, :len]ᵀ) / scale, causal)·v[h, :len]`, with `q`
/// `[heads, queries, head_dim]`, `k` and `v` `[heads, capacity, head_dim]` and `out`
/// `[queries, heads, head_dim]`. Query `i` sees keys `0..=len − queries + i`.
///
/// Callers check [`available`] first.
pub fn attend<T: KvElem>(q: &[f32], k: &[T], v: &[T], dims: Dims, scale: f32, out: &mut [f32]) {
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
    assert!(
        available(d),
        "fused attention needs AVX-512F and head_dim % 16 == 0"
    );
    // One task per output row: row `i·heads + h` is query `i` of head `h`.
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0f32; len],
        |scores, (row, o)| {
            let (i, h) = (row / heads, row % heads);
            let seen = len - queries + i + 1;
            let qh = &q[(h * queries + i) * d..][..d];
            let kh = &k[h * capacity * d..][..seen * d];
            let vh = &v[h * capacity * d..][..seen * d];
            // SAFETY: the CPU features were checked by `available` (asserted above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                attend_row_avx512(qh, kh, vh, scale, &mut scores[..seen], o);
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (qh, kh, vh, scores, o);
        },
    );
}

/// One query row over `scores.len()` keys.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_row_avx512<T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    let lanes = d / 16;
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let kj = k.as_ptr().add(j * d);
        // Two chains so the FMA latency overlaps.
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut c = 0;
        while c + 1 < lanes {
            a0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(q.as_ptr().add(16 * c)),
                T::load16(kj.add(16 * c)),
                a0,
            );
            a1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(q.as_ptr().add(16 * c + 16)),
                T::load16(kj.add(16 * c + 16)),
                a1,
            );
            c += 2;
        }
        if c < lanes {
            a0 = _mm512_fmadd_ps(
                _mm512_loadu_ps(q.as_ptr().add(16 * c)),
                T::load16(kj.add(16 * c)),
                a0,
            );
        }
        *s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / scale;
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (j, &e) in scores.iter().enumerate() {
        let p = _mm512_set1_ps(e / sum);
        let vj = v.as_ptr().add(j * d);
        for c in 0..lanes {
            let o = out.as_mut_ptr().add(16 * c);
            let acc = _mm512_fmadd_ps(p, T::load16(vj.add(16 * c)), _mm512_loadu_ps(o));
            _mm512_storeu_ps(o, acc);
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
        // Odd lengths, a partly filled buffer, one query and several, widths of 1, 2 and 8 lanes.
        for (heads, queries, d, capacity, len) in [
            (4, 1, 128, 256, 131),
            (3, 5, 32, 64, 37),
            (2, 16, 16, 16, 16),
            (1, 1, 48, 8, 1),
        ] {
            if !available(d) {
                eprintln!("no AVX-512F: fused attention not exercised");
                return;
            }
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
            let mut out = vec![f32::NAN; queries * heads * d];
            attend(&q, &k, &v, dims, scale, &mut out);
            let err = max_error(&out, &naive(&q, &k, &v, dims, scale));
            assert!(err < 2e-5, "f32 {dims:?}: max error {err}");
            // An f16 cache: the same arithmetic on the widened values.
            let half = |x: &[f32]| -> Vec<half::f16> {
                x.iter().map(|&x| half::f16::from_f32(x)).collect()
            };
            let (kh, vh) = (half(&k), half(&v));
            let widen = |x: &[half::f16]| -> Vec<f32> { x.iter().map(|x| x.to_f32()).collect() };
            attend(&q, &kh, &vh, dims, scale, &mut out);
            let err = max_error(&out, &naive(&q, &widen(&kh), &widen(&vh), dims, scale));
            assert!(err < 2e-5, "f16 {dims:?}: max error {err}");
        }
    }
}

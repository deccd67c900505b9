//! The ViT's self-attention on the CPU with bf16 products (AVX-512 BF16 `vdpbf16ps`), fused:
//! `softmax(q·kᵀ/√d)·v` per head without materialising the `[heads, N, N]` score tensor.
//!
//! Why: with quantized linear layers the vision tower's f32 attention was half of its time
//! (1024 patches, 16 heads: f32 GEMMs through strided views, then a softmax over 16 M scores, per
//! layer). `vdpbf16ps` does 32 multiply-adds per instruction, twice f32 FMA, and a fused pass keeps
//! each head's keys and values in L2.
//!
//! Numerics: q (already divided by √d), k, v and the softmax weights are rounded to bf16 (round to
//! nearest even); products are summed in f32. The weights are `e = exp(s − max)` rounded to bf16,
//! and the output is `Σ e·v / Σ e` over those same rounded weights, so it stays an exact convex
//! combination of the values. bf16 keeps 8 significant bits at every magnitude, so the softmax's
//! small tail weights keep their share (int8 would flush them to zero).
//!
//! Used only with quantized weights (whose int8 activations are coarser still); f32 models keep
//! the exact path, and CPUs without AVX-512 BF16 use it too.

use rayon::prelude::*;

/// Keys (or value channels) per 512-bit vector of f32 lanes.
const LANES: usize = 16;
/// Query rows computed together (register blocking).
const ROWS: usize = 4;
/// Query rows per parallel task.
const TASK_ROWS: usize = 64;

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// f32 → bf16 bits, rounding to nearest even (what `vcvtne2ps2bf16` does; NaN stays NaN).
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7FFF + ((b >> 16) & 1)) >> 16
}

fn bf16_value(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

/// Two values as one 32-bit lane of bf16 pairs (`a` in the low half, as `vdpbf16ps` pairs them).
fn pair(a: f32, b: f32) -> u32 {
    bf16_bits(a) | (bf16_bits(b) << 16)
}

/// One head's operands in the kernel's layouts (all `u32` lanes are bf16 pairs).
struct Head {
    /// `[n_tiles][hd/2][16]`: lane `r` of pair `g` holds `k[16t + r][2g..2g + 2]`.
    k: Vec<u32>,
    /// `[ceil(hd/16)][n_pairs][16]`: lane `r` of pair `g` holds `v[2g..2g + 2][16t + r]`.
    v: Vec<u32>,
    /// `[n][hd/2]`: query pairs, already divided by √d.
    q: Vec<u32>,
}

/// Attention for one picture: `qkv` is the in-projection's output `[n, heads, 3·hd]` (per head
/// `[q | k | v]`, upstream's layout), `out` receives `[n, heads·hd]`. `hd` must be even.
///
/// # Panics
/// If the kernel is not [`available`] or the slices do not match the sizes.
pub fn attention(qkv: &[f32], n: usize, heads: usize, hd: usize, out: &mut [f32]) {
    assert!(available(), "bf16 attention needs AVX-512 BF16");
    assert!(hd.is_multiple_of(2), "head width must be even");
    assert_eq!(qkv.len(), n * heads * 3 * hd, "qkv shape");
    assert_eq!(out.len(), n * heads * hd, "output shape");
    if n == 0 {
        return;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let prepared: Vec<Head> = (0..heads)
        .into_par_iter()
        .map(|h| prepare(qkv, n, heads, hd, h, scale))
        .collect();
    let tasks: Vec<(usize, usize)> = (0..heads)
        .flat_map(|h| (0..n).step_by(TASK_ROWS).map(move |i| (h, i)))
        .collect();
    let out_ptr = SendPtr(out.as_mut_ptr());
    tasks.into_par_iter().for_each(|(h, i0)| {
        let i1 = (i0 + TASK_ROWS).min(n);
        let mut ctx = vec![0f32; ROWS * hd.next_multiple_of(LANES)];
        let mut scores = vec![0f32; ROWS * n.next_multiple_of(2 * LANES)];
        let mut probs = vec![0u32; ROWS * n.div_ceil(2)];
        let mut i = i0;
        while i < i1 {
            let r = (i1 - i).min(ROWS);
            // SAFETY: the CPU features were checked above; buffers have the sizes the kernels use.
            unsafe {
                block(&prepared[h], n, hd, i, r, &mut scores, &mut probs, &mut ctx);
            }
            let stride = hd.next_multiple_of(LANES);
            for u in 0..r {
                // SAFETY: row `i + u`, columns `h·hd..(h+1)·hd` belong to this task alone.
                unsafe {
                    let dst = out_ptr.get().add((i + u) * heads * hd + h * hd);
                    std::ptr::copy_nonoverlapping(ctx[u * stride..].as_ptr(), dst, hd);
                }
            }
            i += r;
        }
    });
}

fn prepare(qkv: &[f32], n: usize, heads: usize, hd: usize, h: usize, scale: f32) -> Head {
    let at = |j: usize, part: usize, d: usize| qkv[(j * heads + h) * 3 * hd + part * hd + d];
    let (hp, n_tiles) = (hd / 2, n.div_ceil(2 * LANES) * 2);
    let mut k = vec![0u32; n_tiles * hp * LANES];
    for j in 0..n {
        let (t, r) = (j / LANES, j % LANES);
        for g in 0..hp {
            k[(t * hp + g) * LANES + r] = pair(at(j, 1, 2 * g), at(j, 1, 2 * g + 1));
        }
    }
    let (d_tiles, n_pairs) = (hd.div_ceil(LANES), n.div_ceil(2));
    let mut v = vec![0u32; d_tiles * n_pairs * LANES];
    for g in 0..n_pairs {
        for d in 0..hd {
            let (t, r) = (d / LANES, d % LANES);
            let hi = if 2 * g + 1 < n {
                at(2 * g + 1, 2, d)
            } else {
                0.0
            };
            v[(t * n_pairs + g) * LANES + r] = pair(at(2 * g, 2, d), hi);
        }
    }
    let mut q = vec![0u32; n * hp];
    for j in 0..n {
        for g in 0..hp {
            q[j * hp + g] = pair(at(j, 0, 2 * g) * scale, at(j, 0, 2 * g + 1) * scale);
        }
    }
    Head { k, v, q }
}

/// Rows `i..i + r` of one head: scores, softmax, weighted values into `ctx` (`[r][hd rounded up
/// to 16]`, already divided by the weights' sum).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    head: &Head,
    n: usize,
    hd: usize,
    i: usize,
    r: usize,
    scores: &mut [f32],
    probs: &mut [u32],
    ctx: &mut [f32],
) {
    let hp = hd / 2;
    let s_stride = n.next_multiple_of(2 * LANES);
    let q = &head.q[i * hp..(i + r) * hp];
    match r {
        1 => scores_kernel::<1>(head, q, hp, s_stride, scores),
        2 => scores_kernel::<2>(head, q, hp, s_stride, scores),
        3 => scores_kernel::<3>(head, q, hp, s_stride, scores),
        _ => scores_kernel::<4>(head, q, hp, s_stride, scores),
    }
    let n_pairs = n.div_ceil(2);
    let mut sums = [0f32; ROWS];
    for u in 0..r {
        let row = &mut scores[u * s_stride..u * s_stride + n];
        sums[u] = softmax_weights(row, &mut probs[u * n_pairs..(u + 1) * n_pairs]);
    }
    let c_stride = hd.next_multiple_of(LANES);
    match r {
        1 => values_kernel::<1>(head, probs, n_pairs, hd, c_stride, ctx),
        2 => values_kernel::<2>(head, probs, n_pairs, hd, c_stride, ctx),
        3 => values_kernel::<3>(head, probs, n_pairs, hd, c_stride, ctx),
        _ => values_kernel::<4>(head, probs, n_pairs, hd, c_stride, ctx),
    }
    for u in 0..r {
        let inv = 1.0 / sums[u];
        for c in &mut ctx[u * c_stride..u * c_stride + hd] {
            *c *= inv;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    _: &Head,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
    _: &mut [f32],
    _: &mut [u32],
    _: &mut [f32],
) {
    unreachable!("bf16 attention is only offered on x86-64")
}

/// `scores[u][j] = q[u]·k[j]` for every key, two key tiles at a time (8 independent
/// accumulators cover `vdpbf16ps`'s latency).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
// Register blocks read clearest as indexed loops over their rows.
#[allow(clippy::needless_range_loop)]
unsafe fn scores_kernel<const R: usize>(
    head: &Head,
    q: &[u32],
    hp: usize,
    s_stride: usize,
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let n_tiles = s_stride / LANES;
    for t in (0..n_tiles).step_by(2) {
        let mut acc = [[_mm512_setzero_ps(); R]; 2];
        let k0 = head.k.as_ptr().add(t * hp * LANES);
        let k1 = head.k.as_ptr().add((t + 1) * hp * LANES);
        for g in 0..hp {
            let a0: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(k0.add(g * LANES) as *const _));
            let a1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(k1.add(g * LANES) as *const _));
            for u in 0..R {
                let b: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*q.get_unchecked(u * hp + g) as i32));
                acc[0][u] = _mm512_dpbf16_ps(acc[0][u], a0, b);
                acc[1][u] = _mm512_dpbf16_ps(acc[1][u], a1, b);
            }
        }
        for u in 0..R {
            let row = scores.as_mut_ptr().add(u * s_stride + t * LANES);
            _mm512_storeu_ps(row, acc[0][u]);
            _mm512_storeu_ps(row.add(LANES), acc[1][u]);
        }
    }
}

/// Turns one row of scores into bf16 weights `exp(s − max)` (pairs, zero-padded) and returns their
/// sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn softmax_weights(row: &mut [f32], probs: &mut [u32]) -> f32 {
    use std::arch::x86_64::*;
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let n = row.len();
    let maxv = _mm512_set1_ps(max);
    let mut j = 0;
    while j + LANES <= n {
        let p = row.as_mut_ptr().add(j);
        _mm512_storeu_ps(
            p,
            super::simd::exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p), maxv)),
        );
        j += LANES;
    }
    for v in &mut row[j..] {
        *v = (*v - max).exp();
    }
    let mut sum = 0f32;
    for (g, p) in probs.iter_mut().enumerate() {
        let lo = bf16_bits(row[2 * g]);
        let hi = if 2 * g + 1 < n {
            bf16_bits(row[2 * g + 1])
        } else {
            0
        };
        sum += bf16_value(lo) + bf16_value(hi);
        *p = lo | (hi << 16);
    }
    sum
}

/// `ctx[u][d] = Σ_j w[u][j]·v[j][d]` (unnormalised), up to four value tiles at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn values_kernel<const R: usize>(
    head: &Head,
    probs: &[u32],
    n_pairs: usize,
    hd: usize,
    c_stride: usize,
    ctx: &mut [f32],
) {
    let d_tiles = hd.div_ceil(LANES);
    let mut t = 0;
    while t < d_tiles {
        match d_tiles - t {
            1 => values_tiles::<R, 1>(head, probs, n_pairs, t, c_stride, ctx),
            2 => values_tiles::<R, 2>(head, probs, n_pairs, t, c_stride, ctx),
            3 => values_tiles::<R, 3>(head, probs, n_pairs, t, c_stride, ctx),
            _ => values_tiles::<R, 4>(head, probs, n_pairs, t, c_stride, ctx),
        }
        t += 4;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
// Register blocks read clearest as indexed loops over their rows.
#[allow(clippy::needless_range_loop)]
unsafe fn values_tiles<const R: usize, const T: usize>(
    head: &Head,
    probs: &[u32],
    n_pairs: usize,
    t0: usize,
    c_stride: usize,
    ctx: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    for g in 0..n_pairs {
        let mut b = [_mm512_setzero_si512(); R];
        for u in 0..R {
            b[u] = _mm512_set1_epi32(*probs.get_unchecked(u * n_pairs + g) as i32);
        }
        for tt in 0..T {
            let v = head.v.as_ptr().add(((t0 + tt) * n_pairs + g) * LANES);
            let a: __m512bh = std::mem::transmute(_mm512_loadu_si512(v as *const _));
            for u in 0..R {
                acc[tt][u] = _mm512_dpbf16_ps(
                    acc[tt][u],
                    a,
                    std::mem::transmute::<__m512i, __m512bh>(b[u]),
                );
            }
        }
    }
    for tt in 0..T {
        for u in 0..R {
            _mm512_storeu_ps(
                ctx.as_mut_ptr().add(u * c_stride + (t0 + tt) * LANES),
                acc[tt][u],
            );
        }
    }
}

/// The output pointer the tasks share; each writes only its own rows' head columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only for the disjoint writes documented in `attention`.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain attention in f64. With `bf16`, q (divided by √d), k and v are rounded to bf16 first,
    /// as the kernel rounds them (the softmax weights are not rounded).
    fn reference(qkv: &[f32], n: usize, heads: usize, hd: usize, bf16: bool) -> Vec<f32> {
        let round = |x: f32| if bf16 { bf16_value(bf16_bits(x)) } else { x };
        let scale = 1.0 / (hd as f32).sqrt();
        let at = |j: usize, h: usize, part: usize, d: usize| {
            let x = qkv[(j * heads + h) * 3 * hd + part * hd + d];
            round(if part == 0 { x * scale } else { x }) as f64
        };
        let mut out = vec![0f32; n * heads * hd];
        for h in 0..heads {
            for i in 0..n {
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|d| at(i, h, 0, d) * at(j, h, 1, d))
                            .sum::<f64>()
                    })
                    .collect();
                let max = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    out[i * heads * hd + h * hd + d] =
                        ((0..n).map(|j| e[j] * at(j, h, 2, d)).sum::<f64>() / sum) as f32;
                }
            }
        }
        out
    }

    /// A deterministic spread of values with some large ones (peaked softmax rows).
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 6.0
            })
            .collect()
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even wins.
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_value(bf16_bits(f32::INFINITY)), f32::INFINITY);
    }

    /// On bf16-rounded q, k and v, the kernel differs from exact attention only by rounding the
    /// softmax weights `w` to bf16 (relative error ε ≤ 2⁻⁹), plus f32 sums. Since the output is
    /// `Σ w(1+ε)v / Σ w(1+ε)`, that moves it by at most `2⁻⁹·max|v − out|` (·(1+2⁻⁸)): the bound
    /// asserted. Against exact f32 operands it stays within bf16's precision. Sizes cover partial
    /// key tiles, an odd token count and head widths that are not whole tiles.
    #[test]
    fn matches_attention_on_bf16_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        let max_err =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        for (n, heads, hd, seed) in [
            (1, 1, 2, 1),
            (17, 2, 8, 2),
            (33, 3, 20, 3),
            (70, 2, 104, 4),
            (256, 1, 32, 5),
        ] {
            let qkv = values(n * heads * 3 * hd, seed);
            let mut got = vec![f32::NAN; n * heads * hd];
            attention(&qkv, n, heads, hd, &mut got);
            let rounded = reference(&qkv, n, heads, hd, true);
            // Values are in [-3, 3]: |v − out| ≤ 6.
            let bound = 6.0 / 512.0 * (1.0 + 1.0 / 256.0) + 1e-5;
            let err = max_err(&got, &rounded);
            assert!(
                err <= bound,
                "n {n} heads {heads} hd {hd}: {err} off the bf16-operand reference (bound {bound})"
            );
            // Scores here reach ±20, so bf16's 2⁻⁹ relative rounding moves weights by ~1%, on
            // values of up to 3.
            let exact = max_err(&got, &reference(&qkv, n, heads, hd, false));
            assert!(
                exact < 0.05,
                "n {n} heads {heads} hd {hd}: {exact} off exact attention"
            );
        }
    }
}

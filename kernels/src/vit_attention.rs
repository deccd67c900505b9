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
//! Every level computes these same numerics: CPUs without `vdpbf16ps` widen the bf16 pairs into
//! f32 (a shift and a mask) and multiply-add them, which gives the same exact bf16·bf16 products.
//! Used only with quantized weights (whose int8 activations are coarser still); f32 models keep
//! the exact path.

use rayon::prelude::*;

use crate::cpu::{self, Isa, Level};
use crate::tile::{bf16_bits, bf16_value, pair};

/// Keys (or value channels) per 512-bit vector of f32 lanes.
const LANES: usize = 16;
/// Query rows computed together (register blocking).
const ROWS: usize = 4;
/// Query rows per parallel task.
const TASK_ROWS: usize = 64;

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
/// If the slices do not match the sizes.
pub fn attention(qkv: &[f32], n: usize, heads: usize, hd: usize, out: &mut [f32]) {
    attention_at(qkv, n, heads, hd, out, cpu::level())
}

/// Which code computes the products: `vdpbf16ps` needs AVX-512 BF16 on top of the AVX-512 level.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Code {
    Portable,
    Avx2,
    Avx512Bf16,
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Neon,
}

/// [`attention`] with the code of a chosen level.
///
/// # Panics
/// If this CPU cannot run `level`, or the slices do not match the sizes.
pub fn attention_at(qkv: &[f32], n: usize, heads: usize, hd: usize, out: &mut [f32], level: Level) {
    cpu::assert_supported(level);
    #[cfg(target_arch = "x86_64")]
    if level == Level::Amx && n >= crate::amx::MIN_ROWS {
        // SAFETY: the level was checked above.
        return unsafe { attention_amx(qkv, n, heads, hd, out) };
    }
    let code = match level.isa() {
        Isa::Avx512 if cpu::features().avx512_bf16 => Code::Avx512Bf16,
        Isa::Avx512 | Isa::Avx2 => Code::Avx2,
        Isa::Neon => Code::Neon,
        Isa::Portable => Code::Portable,
    };
    attention_with(qkv, n, heads, hd, out, code)
}

fn attention_with(qkv: &[f32], n: usize, heads: usize, hd: usize, out: &mut [f32], code: Code) {
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
            block(
                code,
                &prepared[h],
                n,
                hd,
                i,
                r,
                &mut scores,
                &mut probs,
                &mut ctx,
            );
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

/// Query rows per pass of the AMX attention: bounds a head's scores (4 MB at 1024). Smaller
/// passes, whose scores would stay in L2, were measured slower (the keys are packed per pass).
#[cfg(target_arch = "x86_64")]
const QUERY_CHUNK: usize = 1024;

/// `row = exp(row − max)` and the sum of those weights rounded to bf16 (as the tiles will
/// round them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn softmax_row_avx512(row: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    crate::math::exp_shifted_in_place(row, max, Isa::Avx512);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &e) in sums.iter_mut().zip(c) {
            *s += bf16_value(bf16_bits(e));
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&e| bf16_value(bf16_bits(e)))
        .sum();
    sums.iter().sum::<f32>() + tail
}

/// The AMX level: per head, the scores `q·kᵀ` and then `e·v` as two tile matmuls
/// ([`crate::amx`]), the softmax between them in f32. The same numerics as the fused kernels:
/// q/√d, k, v and `e = exp(s − max)` rounded to bf16 (the tiles' operands), f32 sums, and the
/// output divided by the sum of the rounded weights. A head's scores (4 MB for the ViT's 1024
/// patches) are written out: the tiles multiply several times faster than `vdpbf16ps`, and a
/// pass over the scores costs less than the products it saves.
///
/// # Safety
/// The AMX level is supported.
#[cfg(target_arch = "x86_64")]
unsafe fn attention_amx(qkv: &[f32], n: usize, heads: usize, hd: usize, out: &mut [f32]) {
    use crate::amx::{matmul, F32Rows};
    use crate::tile::TileOut;
    assert_eq!(qkv.len(), n * heads * 3 * hd, "qkv shape");
    assert_eq!(out.len(), n * heads * hd, "output shape");
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    thread_local! {
        /// A head's operands and scores, kept between heads and calls: fresh megabytes cost a
        /// page fault per 4 KB.
        static BUFFERS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    (0..heads).into_par_iter().for_each(|h| {
        let mut buf = crate::amx::take_kept(&BUFFERS);
        buf.resize(n * hd + QUERY_CHUNK * n + QUERY_CHUNK * hd, 0.0);
        let (q, rest) = buf.split_at_mut(n * hd);
        let (scores, ctx) = rest.split_at_mut(QUERY_CHUNK * n);
        let stride = heads * 3 * hd;
        for (j, q) in q.chunks_exact_mut(hd).enumerate() {
            for (o, &x) in q.iter_mut().zip(&qkv[j * stride + h * 3 * hd..][..hd]) {
                *o = x * scale;
            }
        }
        let q: &[f32] = q;
        // Keys: row j = token j; values as rows: row d = channel d across the tokens.
        let keys = F32Rows {
            n,
            k: hd,
            data: &qkv[h * 3 * hd + hd..],
            row_stride: stride,
            col_stride: 1,
        };
        let values = F32Rows {
            n: hd,
            k: n,
            data: &qkv[h * 3 * hd + 2 * hd..],
            row_stride: 1,
            col_stride: stride,
        };
        // Queries a chunk at a time (all of the ViT's 1024 at once).
        for i0 in (0..n).step_by(QUERY_CHUNK) {
            let rows = QUERY_CHUNK.min(n - i0);
            let q = &q[i0 * hd..(i0 + rows) * hd];
            let scores = &mut scores[..rows * n];
            let ctx = &mut ctx[..rows * hd];
            // SAFETY: the caller checked the level.
            unsafe { matmul(&keys, q, rows, TileOut::new(scores, q, (rows, n, hd), None)) };
            let sums: Vec<f32> = scores
                .chunks_mut(n)
                // SAFETY: the AMX level has AVX-512.
                .map(|row| unsafe { softmax_row_avx512(row) })
                .collect();
            let scores: &[f32] = scores;
            // SAFETY: as above.
            unsafe {
                matmul(
                    &values,
                    scores,
                    rows,
                    TileOut::new(ctx, scores, (rows, hd, n), None),
                )
            };
            for (u, (row, sum)) in ctx.chunks_exact(hd).zip(&sums).enumerate() {
                // SAFETY: row `i0 + u`, columns `h·hd..(h+1)·hd` belong to this head alone.
                let dst = unsafe {
                    let at = (i0 + u) * heads * hd + h * hd;
                    std::slice::from_raw_parts_mut(out_ptr.get().add(at), hd)
                };
                for (o, &c) in dst.iter_mut().zip(row) {
                    *o = c / sum;
                }
            }
        }
        crate::amx::keep(&BUFFERS, buf);
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
#[allow(clippy::too_many_arguments)]
fn block(
    code: Code,
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
    let n_pairs = n.div_ceil(2);
    let c_stride = hd.next_multiple_of(LANES);
    macro_rules! by_rows {
        ($($f:ident)::+, $($arg:expr),*) => {
            match r {
                1 => $($f)::+::<1>($($arg),*),
                2 => $($f)::+::<2>($($arg),*),
                3 => $($f)::+::<3>($($arg),*),
                _ => $($f)::+::<4>($($arg),*),
            }
        };
    }
    // SAFETY (every arm): the code was chosen from a checked level; the buffers have the sizes
    // the kernels use (see `attention_with`).
    match code {
        #[cfg(target_arch = "x86_64")]
        Code::Avx512Bf16 => unsafe { by_rows!(scores_kernel, head, q, hp, s_stride, scores) },
        #[cfg(target_arch = "x86_64")]
        Code::Avx2 => unsafe { by_rows!(x86::scores_avx2, head, q, hp, s_stride, scores) },
        #[cfg(target_arch = "aarch64")]
        Code::Neon => unsafe { by_rows!(neon::scores, head, q, hp, s_stride, scores) },
        _ => by_rows!(scores_portable, head, q, hp, s_stride, scores),
    }
    let isa = match code {
        Code::Portable => Isa::Portable,
        Code::Avx2 => Isa::Avx2,
        Code::Avx512Bf16 => Isa::Avx512,
        Code::Neon => Isa::Neon,
    };
    let mut sums = [0f32; ROWS];
    for u in 0..r {
        let row = &mut scores[u * s_stride..u * s_stride + n];
        sums[u] = softmax_weights(row, &mut probs[u * n_pairs..(u + 1) * n_pairs], isa);
    }
    match code {
        #[cfg(target_arch = "x86_64")]
        Code::Avx512Bf16 => unsafe {
            by_rows!(values_kernel, head, probs, n_pairs, hd, c_stride, ctx)
        },
        #[cfg(target_arch = "x86_64")]
        Code::Avx2 => unsafe {
            by_rows!(x86::values_avx2, head, probs, n_pairs, hd, c_stride, ctx)
        },
        #[cfg(target_arch = "aarch64")]
        Code::Neon => unsafe { by_rows!(neon::values, head, probs, n_pairs, hd, c_stride, ctx) },
        _ => by_rows!(values_portable, head, probs, n_pairs, hd, c_stride, ctx),
    }
    for u in 0..r {
        let inv = 1.0 / sums[u];
        for c in &mut ctx[u * c_stride..u * c_stride + hd] {
            *c *= inv;
        }
    }
}

/// The two bf16 values of a pair lane, widened (exact).
#[inline(always)]
fn unpair(p: u32) -> (f32, f32) {
    (f32::from_bits(p << 16), f32::from_bits(p & 0xFFFF_0000))
}

/// [`scores_kernel`] in plain Rust over 16-lane arrays.
fn scores_portable<const R: usize>(
    head: &Head,
    q: &[u32],
    hp: usize,
    s_stride: usize,
    scores: &mut [f32],
) {
    let n_tiles = s_stride / LANES;
    for t in 0..n_tiles {
        let mut acc = [[0f32; LANES]; R];
        let kt = &head.k[t * hp * LANES..(t + 1) * hp * LANES];
        for g in 0..hp {
            let lanes = &kt[g * LANES..(g + 1) * LANES];
            let (mut klo, mut khi) = ([0f32; LANES], [0f32; LANES]);
            for l in 0..LANES {
                (klo[l], khi[l]) = unpair(lanes[l]);
            }
            for (u, a) in acc.iter_mut().enumerate() {
                let (ql, qh) = unpair(q[u * hp + g]);
                for l in 0..LANES {
                    a[l] += klo[l] * ql + khi[l] * qh;
                }
            }
        }
        for (u, a) in acc.iter().enumerate() {
            scores[u * s_stride + t * LANES..][..LANES].copy_from_slice(a);
        }
    }
}

/// [`values_kernel`] in plain Rust over 16-lane arrays.
fn values_portable<const R: usize>(
    head: &Head,
    probs: &[u32],
    n_pairs: usize,
    hd: usize,
    c_stride: usize,
    ctx: &mut [f32],
) {
    for t in 0..hd.div_ceil(LANES) {
        let mut acc = [[0f32; LANES]; R];
        let vt = &head.v[t * n_pairs * LANES..(t + 1) * n_pairs * LANES];
        for g in 0..n_pairs {
            let lanes = &vt[g * LANES..(g + 1) * LANES];
            let (mut vlo, mut vhi) = ([0f32; LANES], [0f32; LANES]);
            for l in 0..LANES {
                (vlo[l], vhi[l]) = unpair(lanes[l]);
            }
            for (u, a) in acc.iter_mut().enumerate() {
                let (pl, ph) = unpair(probs[u * n_pairs + g]);
                for l in 0..LANES {
                    a[l] += vlo[l] * pl + vhi[l] * ph;
                }
            }
        }
        for (u, a) in acc.iter().enumerate() {
            ctx[u * c_stride + t * LANES..][..LANES].copy_from_slice(a);
        }
    }
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
fn softmax_weights(row: &mut [f32], probs: &mut [u32], isa: Isa) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let n = row.len();
    crate::math::exp_shifted_in_place(row, max, isa);
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Head, LANES};
    use std::arch::x86_64::*;

    /// Both bf16 halves of 8 pair lanes, widened: (low values, high values).
    #[inline(always)]
    unsafe fn unpair8(v: __m256i) -> (__m256, __m256) {
        (
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
            _mm256_castsi256_ps(_mm256_and_si256(
                v,
                _mm256_set1_epi32(0xFFFF_0000u32 as i32),
            )),
        )
    }

    /// [`super::scores_kernel`] without `vdpbf16ps`: one key tile (two halves of 8) at a time.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn scores_avx2<const R: usize>(
        head: &Head,
        q: &[u32],
        hp: usize,
        s_stride: usize,
        scores: &mut [f32],
    ) {
        let n_tiles = s_stride / LANES;
        for t in 0..n_tiles {
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            let kt = head.k.as_ptr().add(t * hp * LANES);
            for g in 0..hp {
                let (a0l, a0h) = unpair8(_mm256_loadu_si256(kt.add(g * LANES) as *const __m256i));
                let (a1l, a1h) =
                    unpair8(_mm256_loadu_si256(kt.add(g * LANES + 8) as *const __m256i));
                for u in 0..R {
                    let p = *q.get_unchecked(u * hp + g);
                    let bl = _mm256_set1_ps(f32::from_bits(p << 16));
                    let bh = _mm256_set1_ps(f32::from_bits(p & 0xFFFF_0000));
                    acc[0][u] = _mm256_fmadd_ps(a0h, bh, _mm256_fmadd_ps(a0l, bl, acc[0][u]));
                    acc[1][u] = _mm256_fmadd_ps(a1h, bh, _mm256_fmadd_ps(a1l, bl, acc[1][u]));
                }
            }
            for u in 0..R {
                let row = scores.as_mut_ptr().add(u * s_stride + t * LANES);
                _mm256_storeu_ps(row, acc[0][u]);
                _mm256_storeu_ps(row.add(8), acc[1][u]);
            }
        }
    }

    /// [`super::values_kernel`] without `vdpbf16ps`: one value tile (two halves of 8) at a time.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn values_avx2<const R: usize>(
        head: &Head,
        probs: &[u32],
        n_pairs: usize,
        hd: usize,
        c_stride: usize,
        ctx: &mut [f32],
    ) {
        for t in 0..hd.div_ceil(LANES) {
            let mut acc = [[_mm256_setzero_ps(); R]; 2];
            let vt = head.v.as_ptr().add(t * n_pairs * LANES);
            for g in 0..n_pairs {
                let (v0l, v0h) = unpair8(_mm256_loadu_si256(vt.add(g * LANES) as *const __m256i));
                let (v1l, v1h) =
                    unpair8(_mm256_loadu_si256(vt.add(g * LANES + 8) as *const __m256i));
                for u in 0..R {
                    let p = *probs.get_unchecked(u * n_pairs + g);
                    let bl = _mm256_set1_ps(f32::from_bits(p << 16));
                    let bh = _mm256_set1_ps(f32::from_bits(p & 0xFFFF_0000));
                    acc[0][u] = _mm256_fmadd_ps(v0h, bh, _mm256_fmadd_ps(v0l, bl, acc[0][u]));
                    acc[1][u] = _mm256_fmadd_ps(v1h, bh, _mm256_fmadd_ps(v1l, bl, acc[1][u]));
                }
            }
            for u in 0..R {
                let o = ctx.as_mut_ptr().add(u * c_stride + t * LANES);
                _mm256_storeu_ps(o, acc[0][u]);
                _mm256_storeu_ps(o.add(8), acc[1][u]);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Head, LANES};
    use crate::arm::unpair_bf16;
    use std::arch::aarch64::*;

    /// [`super::scores_kernel`] on NEON: one key tile (four vectors of 4 lanes) at a time,
    /// bf16 pairs widened and multiplied in f32.
    #[target_feature(enable = "neon")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn scores<const R: usize>(
        head: &Head,
        q: &[u32],
        hp: usize,
        s_stride: usize,
        scores: &mut [f32],
    ) {
        let n_tiles = s_stride / LANES;
        for t in 0..n_tiles {
            let mut acc = [[vdupq_n_f32(0.0); R]; 4];
            let kt = head.k.as_ptr().add(t * hp * LANES);
            for g in 0..hp {
                let k: [(float32x4_t, float32x4_t); 4] =
                    std::array::from_fn(|c| unpair_bf16(vld1q_u32(kt.add(g * LANES + 4 * c))));
                for u in 0..R {
                    let p = *q.get_unchecked(u * hp + g);
                    let (bl, bh) = (f32::from_bits(p << 16), f32::from_bits(p & 0xFFFF_0000));
                    for c in 0..4 {
                        acc[c][u] = vfmaq_n_f32(vfmaq_n_f32(acc[c][u], k[c].0, bl), k[c].1, bh);
                    }
                }
            }
            for u in 0..R {
                let row = scores.as_mut_ptr().add(u * s_stride + t * LANES);
                for c in 0..4 {
                    vst1q_f32(row.add(4 * c), acc[c][u]);
                }
            }
        }
    }

    /// [`super::values_kernel`] on NEON: one value tile at a time.
    #[target_feature(enable = "neon")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn values<const R: usize>(
        head: &Head,
        probs: &[u32],
        n_pairs: usize,
        hd: usize,
        c_stride: usize,
        ctx: &mut [f32],
    ) {
        for t in 0..hd.div_ceil(LANES) {
            let mut acc = [[vdupq_n_f32(0.0); R]; 4];
            let vt = head.v.as_ptr().add(t * n_pairs * LANES);
            for g in 0..n_pairs {
                let v: [(float32x4_t, float32x4_t); 4] =
                    std::array::from_fn(|c| unpair_bf16(vld1q_u32(vt.add(g * LANES + 4 * c))));
                for u in 0..R {
                    let p = *probs.get_unchecked(u * n_pairs + g);
                    let (bl, bh) = (f32::from_bits(p << 16), f32::from_bits(p & 0xFFFF_0000));
                    for c in 0..4 {
                        acc[c][u] = vfmaq_n_f32(vfmaq_n_f32(acc[c][u], v[c].0, bl), v[c].1, bh);
                    }
                }
            }
            for u in 0..R {
                let o = ctx.as_mut_ptr().add(u * c_stride + t * LANES);
                for c in 0..4 {
                    vst1q_f32(o.add(4 * c), acc[c][u]);
                }
            }
        }
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
        // Every level, plus the widening code on CPUs whose AVX-512 level has `vdpbf16ps`.
        let mut codes: Vec<(String, Code)> = cpu::levels_to_test("bf16 attention")
            .into_iter()
            .map(|l| {
                let code = match l.isa() {
                    Isa::Avx512 if cpu::features().avx512_bf16 => Code::Avx512Bf16,
                    Isa::Avx512 | Isa::Avx2 => Code::Avx2,
                    Isa::Neon => Code::Neon,
                    Isa::Portable => Code::Portable,
                };
                (l.name().to_string(), code)
            })
            .collect();
        if Level::Avx512.supported() && !cpu::features().avx512_bf16 {
            eprintln!("bf16 attention: vdpbf16ps not run, this CPU lacks AVX-512 BF16 (counted as skipped)");
        }
        codes.dedup_by_key(|c| c.1);
        let max_err =
            |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        for (n, heads, hd, seed) in [
            (1, 1, 2, 1),
            (17, 2, 8, 2),
            (33, 3, 20, 3),
            (70, 2, 104, 4),
            (256, 1, 32, 5),
            (1030, 1, 6, 6),
        ] {
            let qkv = values(n * heads * 3 * hd, seed);
            let rounded = reference(&qkv, n, heads, hd, true);
            let exact_ref = reference(&qkv, n, heads, hd, false);
            // The AMX level's tile path (from MIN_ROWS tokens) computes the same numerics.
            let mut runs: Vec<(String, Option<Code>)> = codes
                .iter()
                .map(|(name, c)| (name.clone(), Some(*c)))
                .collect();
            if Level::Amx.supported() && n >= crate::amx_min_rows() {
                runs.push(("amx tiles".into(), None));
            }
            for (name, code) in &runs {
                let mut got = vec![f32::NAN; n * heads * hd];
                match code {
                    Some(code) => attention_with(&qkv, n, heads, hd, &mut got, *code),
                    None => attention_at(&qkv, n, heads, hd, &mut got, Level::Amx),
                }
                // Values are in [-3, 3]: |v − out| ≤ 6.
                let bound = 6.0 / 512.0 * (1.0 + 1.0 / 256.0) + 1e-5;
                let err = max_err(&got, &rounded);
                assert!(
                err <= bound,
                "{name} n {n} heads {heads} hd {hd}: {err} off the bf16-operand reference (bound {bound})"
            );
                // Scores here reach ±20, so bf16's 2⁻⁹ relative rounding moves weights by ~1%, on
                // values of up to 3.
                let exact = max_err(&got, &exact_ref);
                assert!(
                    exact < 0.05,
                    "{name} n {n} heads {heads} hd {hd}: {exact} off exact attention"
                );
            }
        }
    }
}

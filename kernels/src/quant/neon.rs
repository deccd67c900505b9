//! The aarch64 tile kernels: a 16-row tile is four vectors of 4 rows; each 64-byte chunk of a
//! tile-block holds 4 inputs of all 16 rows, which one `sdot` by element (or, without dotprod,
//! its widening-multiply replacement [`MullDot`]) multiplies into 4 rows at a time. The integer
//! sums are exact, as at every level; floats are combined with fused multiply-adds in the
//! AVX2/AVX-512 kernels' order.

// Register blocks read clearest as indexed loops over their rows and row-vectors.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;

use super::{
    q4k_d_at, q4k_min_at, q4k_scale_at, Act, Format, LANES, MAX_TILE, Q4K_NIBBLES, Q4K_TILE_BYTES,
    Q8_0_TILE_BYTES, QK8_0, QK_K,
};
use crate::arm::{load_f16x4, Dot4, MullDot, Sdot};
use crate::cpu;

/// Activation rows one pass over a tile multiplies (4 × 4 row-vectors of accumulators each).
const ROWS: usize = 4;

/// # Safety
/// The CPU must run [`crate::Level::Neon`]; `tile` holds `kb` tile-blocks of `format`.
pub(super) unsafe fn tile_dots(
    format: Format,
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    tile_dots_with(format, tile, kb, acts, out, cpu::features().dotprod)
}

/// [`tile_dots`] with or without `sdot` (tests compare the two where the CPU has dotprod).
///
/// # Safety
/// As [`tile_dots`]; `dotprod` only where the CPU has it.
pub(super) unsafe fn tile_dots_with(
    format: Format,
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
    dotprod: bool,
) {
    for (a, o) in acts.chunks(ROWS).zip(out.chunks_mut(ROWS)) {
        macro_rules! run {
            ($f:ident, $d:ty) => {
                match a.len() {
                    1 => $f::<1, $d>(tile, kb, a, o),
                    2 => $f::<2, $d>(tile, kb, a, o),
                    3 => $f::<3, $d>(tile, kb, a, o),
                    _ => $f::<4, $d>(tile, kb, a, o),
                }
            };
        }
        match (format, dotprod) {
            (Format::Q8_0, true) => run!(q8_0_dotprod, Sdot),
            (Format::Q8_0, false) => run!(q8_0_base, MullDot),
            (Format::Q4K, true) => run!(q4k_dotprod, Sdot),
            (Format::Q4K, false) => run!(q4k_base, MullDot),
        }
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_0_dotprod<const N: usize, D: Dot4>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    q8_0::<N, D>(tile, kb, acts, out)
}

#[target_feature(enable = "neon")]
unsafe fn q8_0_base<const N: usize, D: Dot4>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    q8_0::<N, D>(tile, kb, acts, out)
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn q4k_dotprod<const N: usize, D: Dot4>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    q4k::<N, D>(tile, kb, acts, out)
}

#[target_feature(enable = "neon")]
unsafe fn q4k_base<const N: usize, D: Dot4>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    q4k::<N, D>(tile, kb, acts, out)
}

/// `Σ_{p<8} w_p · a[4p..4p+4]` over the 8 chunks of 4 inputs, `w_p` from `chunk(p)` and the
/// 32 activation bytes in `a0`, `a1` (the element index of `sdot` must be a constant).
#[inline(always)]
unsafe fn dot8<D: Dot4>(
    mut acc: int32x4_t,
    chunk: impl Fn(usize) -> int8x16_t,
    a0: int8x16_t,
    a1: int8x16_t,
) -> int32x4_t {
    acc = D::dot::<0>(acc, chunk(0), a0);
    acc = D::dot::<1>(acc, chunk(1), a0);
    acc = D::dot::<2>(acc, chunk(2), a0);
    acc = D::dot::<3>(acc, chunk(3), a0);
    acc = D::dot::<0>(acc, chunk(4), a1);
    acc = D::dot::<1>(acc, chunk(5), a1);
    acc = D::dot::<2>(acc, chunk(6), a1);
    D::dot::<3>(acc, chunk(7), a1)
}

/// q8_0: weights are stored as `q + 128`; flipping the top bit gives the signed `q` back.
#[inline(always)]
unsafe fn q8_0<const N: usize, D: Dot4>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    debug_assert!(tile.len() >= kb * Q8_0_TILE_BYTES && acts.len() == N);
    let flip = vdupq_n_u8(0x80);
    let mut facc = [[vdupq_n_f32(0.0); 4]; N];
    for b in 0..kb {
        let tb = tile.as_ptr().add(b * Q8_0_TILE_BYTES);
        let mut a = [[vdupq_n_s8(0); 2]; N];
        for u in 0..N {
            let ap = acts[u].q.as_ptr().add(b * QK8_0) as *const i8;
            a[u] = [vld1q_s8(ap), vld1q_s8(ap.add(16))];
        }
        for v in 0..4 {
            let w = |p: usize| {
                vreinterpretq_s8_u8(veorq_u8(vld1q_u8(tb.add(32 + p * 64 + 16 * v)), flip))
            };
            let d = load_f16x4(tb.add(8 * v) as *const u16);
            for u in 0..N {
                let i = dot8::<D>(vdupq_n_s32(0), w, a[u][0], a[u][1]);
                let scale = vmulq_n_f32(d, *acts[u].d.get_unchecked(b));
                facc[u][v] = vfmaq_f32(facc[u][v], vcvtq_f32_s32(i), scale);
            }
        }
    }
    for u in 0..N {
        for v in 0..4 {
            vst1q_f32(out[u].as_mut_ptr().add(4 * v), facc[u][v]);
        }
    }
}

/// Four u8 at `p` widened to i32 lanes.
#[inline(always)]
unsafe fn u8x4(p: *const u8) -> int32x4_t {
    let w = (p as *const u32).read_unaligned();
    let v = vmovl_u8(vcreate_u8(w as u64));
    vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(v)))
}

/// `Σ_s m[r][s]·Σa_s` for the 4 rows whose mins start at `mins` (sub-blocks 0–3, and 4–7 64
/// bytes on; see [`q4k_min_at`]), exact: the sums are split as `64·h + l` into signed bytes.
#[inline(always)]
unsafe fn q4k_min_dot<D: Dot4>(mins: *const u8, split: &[i32; 4]) -> int32x4_t {
    let m0 = vreinterpretq_s8_u8(vld1q_u8(mins));
    let m1 = vreinterpretq_s8_u8(vld1q_u8(mins.add(64)));
    let s = |i: usize| vreinterpretq_s8_s32(vdupq_n_s32(split[i]));
    let zero = vdupq_n_s32(0);
    let hi = D::dot::<0>(D::dot::<0>(zero, m0, s(0)), m1, s(1));
    let lo = D::dot::<0>(D::dot::<0>(zero, m0, s(2)), m1, s(3));
    vaddq_s32(vshlq_n_s32::<6>(hi), lo)
}

/// q4k: for each block, each 4-row vector `v` of the tile covers rows `4v..4v+4` (low nibbles)
/// and `16+4v..16+4v+4` (high nibbles).
#[inline(always)]
unsafe fn q4k<const N: usize, D: Dot4>(
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    debug_assert!(tile.len() >= kb * Q4K_TILE_BYTES && acts.len() == N);
    let mask = vdupq_n_u8(0x0F);
    let mut facc = [[[vdupq_n_f32(0.0); 2]; 4]; N];
    for b in 0..kb {
        let tb = tile.as_ptr().add(b * Q4K_TILE_BYTES);
        for v in 0..4 {
            let rows = [4 * v, LANES + 4 * v];
            let d = rows.map(|r| load_f16x4(tb.add(q4k_d_at(r).0) as *const u16));
            let dmin = rows.map(|r| load_f16x4(tb.add(q4k_d_at(r).1) as *const u16));
            let mut int = [[vdupq_n_s32(0); 2]; N];
            for s in 0..8 {
                let at = tb.add(Q4K_NIBBLES + s * 8 * 64 + 16 * v);
                let raw = |p: usize| vld1q_u8(at.add(p * 64));
                let lo = |p: usize| vreinterpretq_s8_u8(vandq_u8(raw(p), mask));
                let hi = |p: usize| vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw(p)));
                let sc = rows.map(|r| u8x4(tb.add(q4k_scale_at(r, s))));
                for u in 0..N {
                    let ap = acts[u].q.as_ptr().add(b * QK_K + s * 32) as *const i8;
                    let (a0, a1) = (vld1q_s8(ap), vld1q_s8(ap.add(16)));
                    let zero = vdupq_n_s32(0);
                    int[u][0] = vmlaq_s32(int[u][0], dot8::<D>(zero, lo, a0, a1), sc[0]);
                    int[u][1] = vmlaq_s32(int[u][1], dot8::<D>(zero, hi, a0, a1), sc[1]);
                }
            }
            for u in 0..N {
                let da = *acts[u].d.get_unchecked(b);
                let split = acts[u].min_sums.get_unchecked(b);
                for h in 0..2 {
                    let mins = q4k_min_dot::<D>(tb.add(q4k_min_at(rows[h], 0)), split);
                    let f = &mut facc[u][v][h];
                    *f = vfmsq_f32(*f, vcvtq_f32_s32(mins), vmulq_n_f32(dmin[h], da));
                    *f = vfmaq_f32(*f, vcvtq_f32_s32(int[u][h]), vmulq_n_f32(d[h], da));
                }
            }
        }
    }
    for u in 0..N {
        for v in 0..4 {
            vst1q_f32(out[u].as_mut_ptr().add(4 * v), facc[u][v][0]);
            vst1q_f32(out[u].as_mut_ptr().add(LANES + 4 * v), facc[u][v][1]);
        }
    }
}

/// [`super::quantize_block_sums`] 4 lanes at a time, with the same results (`fcvtns` rounds to
/// nearest even like the scalar trick). Blocks holding NaN or ±∞ take the scalar path.
///
/// # Safety
/// The CPU must run NEON; `x.len()` is a multiple of 32, `q` as long, `sums` one per 32.
#[target_feature(enable = "neon")]
pub(super) unsafe fn quantize_block(x: &[f32], q: &mut [u8], sums: &mut [i32]) -> f32 {
    let n = x.len();
    debug_assert!(n.is_multiple_of(32) && q.len() == n && sums.len() == n / 32);
    let p = x.as_ptr();
    let mut amax = vdupq_n_f32(0.0);
    let mut ordered = vdupq_n_u32(u32::MAX);
    for i in (0..n).step_by(4) {
        let v = vld1q_f32(p.add(i));
        amax = vmaxq_f32(amax, vabsq_f32(v));
        ordered = vandq_u32(ordered, vceqq_f32(v, v));
    }
    let amax = vmaxvq_f32(amax);
    if vminvq_u32(ordered) == 0 || !amax.is_finite() || amax == 0.0 {
        return super::quantize_block_sums(x, q, sums);
    }
    let id = vdupq_n_f32(127.0 / amax);
    for (c, s) in sums.iter_mut().enumerate() {
        let v: [int32x4_t; 8] = std::array::from_fn(|j| {
            vcvtnq_s32_f32(vmulq_f32(vld1q_f32(p.add(32 * c + 4 * j)), id))
        });
        let total = vaddq_s32(
            vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])),
            vaddq_s32(vaddq_s32(v[4], v[5]), vaddq_s32(v[6], v[7])),
        );
        *s = vaddvq_s32(total);
        let h: [int16x8_t; 4] =
            std::array::from_fn(|j| vcombine_s16(vqmovn_s32(v[2 * j]), vqmovn_s32(v[2 * j + 1])));
        let out = q.as_mut_ptr().add(32 * c) as *mut i8;
        vst1q_s8(out, vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1])));
        vst1q_s8(out.add(16), vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3])));
    }
    amax / 127.0
}

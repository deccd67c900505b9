//! aarch64 building blocks the NEON kernels share: the dotprod `sdot` and the f16 widening
//! `fcvtl`, written as inline assembly because their intrinsics are not stable Rust yet
//! (`stdarch_neon_dotprod`, `stdarch_neon_f16`), and the `sdot` replacement for CPUs without
//! dotprod (Cortex-A72/A53 class), which gives the same exact i32 sums.

use std::arch::aarch64::*;
use std::arch::asm;

/// Four 4-byte dot products into the four 32-bit lanes of an accumulator: lane `i` gains
/// `Σ_j w[4i + j]·a[4L + j]` (signed bytes; group `L` of `a` is broadcast to every lane).
pub(crate) trait Dot4 {
    unsafe fn dot<const L: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t;
}

/// The dotprod instruction (`sdot` by element).
pub(crate) struct Sdot;
impl Dot4 for Sdot {
    #[inline(always)]
    unsafe fn dot<const L: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let mut r = acc;
        // SAFETY (caller): the enclosing function enables `dotprod`.
        asm!(
            "sdot {r:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
            r = inout(vreg) r,
            w = in(vreg) w,
            a = in(vreg) a,
            l = const L,
            options(pure, nomem, nostack, preserves_flags)
        );
        r
    }
}

/// Base NEON: widening multiplies (|w·a| ≤ 128·128 fits i16) and two pairwise adds.
pub(crate) struct MullDot;
impl Dot4 for MullDot {
    #[inline(always)]
    unsafe fn dot<const L: i32>(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let b = vreinterpretq_s8_s32(vdupq_laneq_s32::<L>(vreinterpretq_s32_s8(a)));
        let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(b)));
        let hi = vpaddlq_s16(vmull_high_s8(w, b));
        vaddq_s32(acc, vpaddq_s32(lo, hi))
    }
}

/// Four f16 values (bits) widened to f32, exactly.
#[inline(always)]
pub(crate) unsafe fn f16x4_to_f32(h: uint16x4_t) -> float32x4_t {
    let r: float32x4_t;
    // FCVTL is base ARMv8-A; only its intrinsic's f16 vector type is unstable.
    asm!(
        "fcvtl {r:v}.4s, {h:v}.4h",
        r = out(vreg) r,
        h = in(vreg) h,
        options(pure, nomem, nostack, preserves_flags)
    );
    r
}

/// Four f16 values loaded from `p` (unaligned) and widened.
#[inline(always)]
pub(crate) unsafe fn load_f16x4(p: *const u16) -> float32x4_t {
    f16x4_to_f32(vld1_u16(p))
}

/// The low and high bf16 halves of four 32-bit pair lanes, widened (exact).
#[inline(always)]
pub(crate) unsafe fn unpair_bf16(v: uint32x4_t) -> (float32x4_t, float32x4_t) {
    (
        vreinterpretq_f32_u32(vshlq_n_u32::<16>(v)),
        vreinterpretq_f32_u32(vandq_u32(v, vdupq_n_u32(0xFFFF_0000))),
    )
}

//! Dense 16-bit linear weights (bf16 or f16) on the CPU, multiplied in f32.
//!
//! candle's CPU backend has no bf16 GEMM: a bf16 matmul widens both operands to f32 on every call
//! (about six times slower than f32 when decoding). Here the weights stay 16-bit in memory, half
//! of f32, and each value is widened in registers right before its multiply-add; activations stay
//! f32, so the only rounding is the weights' own. Decoding streams half the bytes of f32.
//!
//! Layout: tiles of 32 rows. For each input `k` a tile holds 16 32-bit lanes; lane `r` carries
//! row `r` in its low half and row `r + 16` in its high half. bf16 widens with one shift (low
//! rows) and one mask (high rows); f16 with the hardware conversion.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::{self, Isa, Level};
use crate::tile::{f16_to_f32, TileOut};
use crate::LargeBuffer;

/// Rows per tile.
const TILE: usize = 32;
/// Activation rows one kernel call handles: 2 × ROWS accumulators stay in registers.
const ROWS: usize = 6;

/// Which 16-bit type the weights are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Bf16,
    F16,
}

/// Byte offset, within a tile, of row `r`'s value for input `kk`: lane `r % 16`, low half for
/// rows 0–15, high half for rows 16–31.
fn value_at(kk: usize, r: usize) -> usize {
    kk * 64 + (r % 16) * 4 + if r >= 16 { 2 } else { 0 }
}

impl Half {
    fn bits(self, v: f32) -> u16 {
        match self {
            Half::Bf16 => bf16::from_f32(v).to_bits(),
            Half::F16 => f16::from_f32(v).to_bits(),
        }
    }

    fn value(self, bits: u16) -> f32 {
        match self {
            Half::Bf16 => bf16::from_bits(bits).to_f32(),
            Half::F16 => f16::from_bits(bits).to_f32(),
        }
    }

    /// The value of row `r`, input `kk` in `tile`, widened.
    fn read(self, tile: &[u8], kk: usize, r: usize) -> f32 {
        let at = value_at(kk, r);
        self.value(u16::from_le_bytes([tile[at], tile[at + 1]]))
    }
}

/// An `[n, k]` weight in 16-bit tiles (see the module header).
#[derive(Clone)]
pub struct HalfWeight {
    half: Half,
    n: usize,
    k: usize,
    /// `[n/32 tiles][k][16 lanes]` of `u32`; rows past `n` in the last tile are zero.
    tiles: LargeBuffer,
}

impl std::fmt::Debug for HalfWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HalfWeight({:?}, {}x{})", self.half, self.n, self.k)
    }
}

impl HalfWeight {
    /// From `n` rows of `k` values (row-major), rounded to `half` (exact for bf16 checkpoints
    /// held as bf16).
    pub fn from_rows(half: Half, n: usize, k: usize, w: &[f32]) -> Self {
        assert_eq!(w.len(), n * k, "weight shape");
        let n_tiles = n.div_ceil(TILE);
        let mut tiles = LargeBuffer::zeroed(n_tiles * k * 64);
        tiles
            .par_chunks_mut(k * 64)
            .enumerate()
            .for_each(|(t, tile)| {
                for r in 0..TILE.min(n - t * TILE) {
                    let row = &w[(t * TILE + r) * k..][..k];
                    for (kk, &v) in row.iter().enumerate() {
                        let at = value_at(kk, r);
                        tile[at..at + 2].copy_from_slice(&half.bits(v).to_le_bytes());
                    }
                }
            });
        Self { half, n, k, tiles }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    pub fn half(&self) -> Half {
        self.half
    }

    pub fn size_in_bytes(&self) -> usize {
        self.tiles.len()
    }

    /// Row `j` widened to f32.
    pub fn row(&self, j: usize) -> Vec<f32> {
        let (t, r) = (j / TILE, j % TILE);
        let tile = &self.tiles[t * self.k * 64..];
        (0..self.k).map(|kk| self.half.read(tile, kk, r)).collect()
    }

    /// `out[i·n + j] = x[i] · w[j] (+ bias[j])` for the `m` rows of `x` (`[m, k]`, row-major).
    pub fn matmul_bias(&self, x: &[f32], m: usize, out: &mut [f32], bias: Option<&[f32]>) {
        self.matmul_at(x, m, out, bias, cpu::level())
    }

    /// [`Self::matmul_bias`] with the kernel of a chosen level (tests and benches compare them).
    ///
    /// # Panics
    /// If this CPU cannot run `level`, or the shapes do not match.
    pub fn matmul_at(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        bias: Option<&[f32]>,
        level: Level,
    ) {
        cpu::assert_supported(level);
        let isa = level.isa();
        let (n, k) = (self.n, self.k);
        let out = TileOut::new(out, x, (m, n, k), bias);
        if m == 0 || n == 0 {
            return;
        }
        // No AMX tiles here: they would round the activations to bf16 too, and the 16-bit
        // types promise logits within 1e-3 of f32 (measured 0.018 off on tiny-a with bf16
        // activations, against 4e-5 with f32 ones).
        let n_tiles = n.div_ceil(TILE);
        (0..n_tiles).into_par_iter().for_each(|t| {
            let tile = &self.tiles[t * k * 64..(t + 1) * k * 64];
            let (j0, cols) = (t * TILE, TILE.min(n - t * TILE));
            let mut dots = [[0f32; TILE]; ROWS];
            for i in (0..m).step_by(ROWS) {
                let r = ROWS.min(m - i);
                let xs = &x[i * k..(i + r) * k];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the level was checked above; slices are sized.
                    Isa::Avx512 => unsafe {
                        x86::tile_dots_avx512(self.half, tile, k, xs, r, &mut dots)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    Isa::Avx2 => unsafe {
                        x86::tile_dots_avx2(self.half, tile, k, xs, r, &mut dots)
                    },
                    #[cfg(target_arch = "aarch64")]
                    // SAFETY: as above.
                    Isa::Neon => unsafe { neon::tile_dots(self.half, tile, k, xs, r, &mut dots) },
                    #[cfg(target_arch = "x86_64")]
                    _ => sse2::tile_dots(self.half, tile, k, xs, r, &mut dots),
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => tile_dots_portable(self.half, tile, k, xs, r, &mut dots),
                }
                for (u, d) in dots[..r].iter_mut().enumerate() {
                    // SAFETY: row `i + u < m`, columns `j0..j0 + cols` of this tile, which
                    // no other thread writes.
                    unsafe { out.store(i + u, j0, &mut d[..cols]) };
                }
            }
        });
    }
}

/// `dots[u][c] = Σ_k xs[u·k + kk] · w[c][kk]` for one tile and `r ≤ ROWS` activation rows,
/// written over fixed 16-lane arrays that the compiler vectorises at the baseline.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
fn tile_dots_portable(
    half: Half,
    tile: &[u8],
    k: usize,
    xs: &[f32],
    r: usize,
    dots: &mut [[f32; TILE]; ROWS],
) {
    for d in dots[..r].iter_mut() {
        d.fill(0.0);
    }
    for (kk, lanes) in tile.chunks_exact(64).take(k).enumerate() {
        let mut lo = [0f32; 16];
        let mut hi = [0f32; 16];
        for (l, b) in lanes.chunks_exact(4).enumerate() {
            let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            match half {
                Half::Bf16 => {
                    lo[l] = f32::from_bits(v << 16);
                    hi[l] = f32::from_bits(v & 0xFFFF_0000);
                }
                Half::F16 => {
                    lo[l] = f16_to_f32(v & 0xFFFF);
                    hi[l] = f16_to_f32(v >> 16);
                }
            }
        }
        for (u, d) in dots[..r].iter_mut().enumerate() {
            let xv = xs[u * k + kk];
            let (dl, dh) = d.split_at_mut(16);
            for l in 0..16 {
                dl[l] += xv * lo[l];
                dh[l] += xv * hi[l];
            }
        }
    }
}

/// The portable level on x86-64: SSE2 is the baseline, so every x86-64 CPU runs this. The
/// compiler's vectorisation of [`tile_dots_portable`] spills its 32 accumulators to memory on
/// every input (16 xmm registers); here a matvec keeps all 32 rows in 8 registers and reads each
/// cache line of weights once. Same conversions, the same multiply then add in the same order:
/// the plain kernel's results bit for bit.
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    use super::{Half, ROWS, TILE};

    pub(super) fn tile_dots(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        r: usize,
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        assert!(tile.len() >= k * 64 && xs.len() >= r * k && r <= ROWS);
        // A tile's 16 lanes are 4 groups of 4 (16 bytes each); `G` groups × `R` rows × 2 halves
        // accumulators stay within the 16 registers.
        // SAFETY: SSE2 is part of x86-64; sizes were checked above.
        unsafe {
            match r {
                1 => rows::<1, 4>(half, tile, k, xs, 0, dots),
                2 | 3 => {
                    for g in [0, 2] {
                        if r == 2 {
                            rows::<2, 2>(half, tile, k, xs, g, dots)
                        } else {
                            rows::<3, 2>(half, tile, k, xs, g, dots)
                        }
                    }
                }
                _ => {
                    for g in 0..4 {
                        match r {
                            4 => rows::<4, 1>(half, tile, k, xs, g, dots),
                            5 => rows::<5, 1>(half, tile, k, xs, g, dots),
                            _ => rows::<ROWS, 1>(half, tile, k, xs, g, dots),
                        }
                    }
                }
            }
        }
    }

    /// [`crate::tile::f16_to_f32`] on 4 lanes: the same three cases chosen by masks.
    #[inline(always)]
    unsafe fn f16_lanes(h: __m128i) -> __m128 {
        let sign = _mm_slli_epi32::<16>(_mm_and_si128(h, _mm_set1_epi32(0x8000)));
        let em = _mm_and_si128(h, _mm_set1_epi32(0x7FFF));
        let normal = _mm_add_epi32(_mm_slli_epi32::<13>(em), _mm_set1_epi32(112 << 23));
        let sub = _mm_castps_si128(_mm_mul_ps(
            _mm_cvtepi32_ps(em),
            _mm_castsi128_ps(_mm_set1_epi32(0x3380_0000)),
        ));
        let special = _mm_or_si128(_mm_slli_epi32::<13>(em), _mm_set1_epi32(0x7F80_0000));
        let is_sub = _mm_cmplt_epi32(em, _mm_set1_epi32(0x0400));
        let is_special = _mm_cmpgt_epi32(em, _mm_set1_epi32(0x7BFF));
        let v = _mm_or_si128(
            _mm_and_si128(is_sub, sub),
            _mm_andnot_si128(
                is_sub,
                _mm_or_si128(
                    _mm_and_si128(is_special, special),
                    _mm_andnot_si128(is_special, normal),
                ),
            ),
        );
        _mm_castsi128_ps(_mm_or_si128(v, sign))
    }

    /// Groups `g0..g0 + G` of 4 lanes for `R` activation rows.
    #[inline(always)]
    unsafe fn rows<const R: usize, const G: usize>(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        g0: usize,
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        let mut lo = [[_mm_setzero_ps(); R]; G];
        let mut hi = [[_mm_setzero_ps(); R]; G];
        let high_mask = _mm_set1_epi32(0xFFFF_0000u32 as i32);
        let (tp, xp) = (tile.as_ptr().add(16 * g0), xs.as_ptr());
        for kk in 0..k {
            for g in 0..G {
                let v = _mm_loadu_si128(tp.add(kk * 64 + 16 * g) as *const __m128i);
                let (wl, wh) = match half {
                    Half::Bf16 => (
                        _mm_castsi128_ps(_mm_slli_epi32::<16>(v)),
                        _mm_castsi128_ps(_mm_and_si128(v, high_mask)),
                    ),
                    Half::F16 => (
                        f16_lanes(_mm_and_si128(v, _mm_set1_epi32(0xFFFF))),
                        f16_lanes(_mm_srli_epi32::<16>(v)),
                    ),
                };
                for u in 0..R {
                    let xb = _mm_set1_ps(*xp.add(u * k + kk));
                    lo[g][u] = _mm_add_ps(lo[g][u], _mm_mul_ps(xb, wl));
                    hi[g][u] = _mm_add_ps(hi[g][u], _mm_mul_ps(xb, wh));
                }
            }
        }
        for g in 0..G {
            let l = 4 * (g0 + g);
            for u in 0..R {
                _mm_storeu_ps(dots[u].as_mut_ptr().add(l), lo[g][u]);
                _mm_storeu_ps(dots[u].as_mut_ptr().add(16 + l), hi[g][u]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Half, ROWS, TILE};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must run AVX-512F; `tile` holds `k` inputs, `xs` `r` rows of `k`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_dots_avx512(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        r: usize,
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        // One monomorphised loop per row count keeps every accumulator in a register.
        match r {
            1 => rows512::<1>(half, tile, k, xs, dots),
            2 => rows512::<2>(half, tile, k, xs, dots),
            3 => rows512::<3>(half, tile, k, xs, dots),
            4 => rows512::<4>(half, tile, k, xs, dots),
            5 => rows512::<5>(half, tile, k, xs, dots),
            _ => rows512::<ROWS>(half, tile, k, xs, dots),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn rows512<const R: usize>(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        debug_assert!(tile.len() >= k * 64 && xs.len() >= R * k);
        let mut lo = [_mm512_setzero_ps(); R];
        let mut hi = [_mm512_setzero_ps(); R];
        let high_mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let (tp, xp) = (tile.as_ptr(), xs.as_ptr());
        for kk in 0..k {
            let v = _mm512_loadu_si512(tp.add(kk * 64).cast());
            let (wl, wh) = match half {
                Half::Bf16 => (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                    _mm512_castsi512_ps(_mm512_and_si512(v, high_mask)),
                ),
                Half::F16 => (
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v))),
                ),
            };
            for u in 0..R {
                let xb = _mm512_set1_ps(*xp.add(u * k + kk));
                lo[u] = _mm512_fmadd_ps(wl, xb, lo[u]);
                hi[u] = _mm512_fmadd_ps(wh, xb, hi[u]);
            }
        }
        for u in 0..R {
            _mm512_storeu_ps(dots[u].as_mut_ptr(), lo[u]);
            _mm512_storeu_ps(dots[u].as_mut_ptr().add(16), hi[u]);
        }
    }

    /// # Safety
    /// The CPU must run AVX2 + FMA + F16C; `tile` holds `k` inputs, `xs` `r` rows of `k`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_dots_avx2(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        r: usize,
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        // A tile is two halves of 8 lanes (rows 0–7 with 16–23, and 8–15 with 24–31). Up to 3
        // activation rows take both halves in one pass over the tile (12 accumulators), so that
        // a matvec reads each cache line of weights once; more rows go half by half (each half
        // with 6 rows keeps 12 accumulators in the 16 registers).
        match r {
            1 => rows256::<1, 2>(half, tile, k, xs, 0, dots),
            2 => rows256::<2, 2>(half, tile, k, xs, 0, dots),
            3 => rows256::<3, 2>(half, tile, k, xs, 0, dots),
            _ => {
                for h in 0..2 {
                    match r {
                        4 => rows256::<4, 1>(half, tile, k, xs, h, dots),
                        5 => rows256::<5, 1>(half, tile, k, xs, h, dots),
                        _ => rows256::<ROWS, 1>(half, tile, k, xs, h, dots),
                    }
                }
            }
        }
    }

    /// 8 f16 values from the low 16 bits of each 32-bit lane of `v`.
    #[inline(always)]
    unsafe fn f16_low_halves(v: __m256i) -> __m256 {
        let low = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
        // Packs lanes 0–3 | 4–7 of each 128-bit half; the permute joins the two halves.
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(low, low));
        _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
    }

    /// `HS` lane-halves from half `h0` on, for `R` activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows256<const R: usize, const HS: usize>(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        h0: usize,
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        debug_assert!(tile.len() >= k * 64 && xs.len() >= R * k && h0 + HS <= 2);
        let mut lo = [[_mm256_setzero_ps(); R]; HS];
        let mut hi = [[_mm256_setzero_ps(); R]; HS];
        let high_mask = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let (tp, xp) = (tile.as_ptr().add(32 * h0), xs.as_ptr());
        for kk in 0..k {
            for hh in 0..HS {
                let v = _mm256_loadu_si256(tp.add(kk * 64 + 32 * hh) as *const __m256i);
                let (wl, wh) = match half {
                    Half::Bf16 => (
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
                        _mm256_castsi256_ps(_mm256_and_si256(v, high_mask)),
                    ),
                    Half::F16 => (
                        f16_low_halves(v),
                        f16_low_halves(_mm256_srli_epi32::<16>(v)),
                    ),
                };
                for u in 0..R {
                    let xb = _mm256_broadcast_ss(&*xp.add(u * k + kk));
                    lo[hh][u] = _mm256_fmadd_ps(wl, xb, lo[hh][u]);
                    hi[hh][u] = _mm256_fmadd_ps(wh, xb, hi[hh][u]);
                }
            }
        }
        for hh in 0..HS {
            let h = h0 + hh;
            for u in 0..R {
                _mm256_storeu_ps(dots[u].as_mut_ptr().add(8 * h), lo[hh][u]);
                _mm256_storeu_ps(dots[u].as_mut_ptr().add(16 + 8 * h), hi[hh][u]);
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Half, ROWS, TILE};
    use crate::arm::f16x4_to_f32;
    use std::arch::aarch64::*;

    /// # Safety
    /// The CPU must run NEON; `tile` holds `k` inputs, `xs` `r` rows of `k`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn tile_dots(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        r: usize,
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        // A tile is two halves of 8 lanes (rows 0–7 with 16–23, and 8–15 with 24–31). Up to 3
        // activation rows take both halves in one pass over the tile (24 accumulators), so a
        // matvec reads each cache line once; more rows go half by half.
        match r {
            1 => rows::<1, 2>(half, tile, k, xs, 0, dots),
            2 => rows::<2, 2>(half, tile, k, xs, 0, dots),
            3 => rows::<3, 2>(half, tile, k, xs, 0, dots),
            _ => {
                for h in 0..2 {
                    match r {
                        4 => rows::<4, 1>(half, tile, k, xs, h, dots),
                        5 => rows::<5, 1>(half, tile, k, xs, h, dots),
                        _ => rows::<ROWS, 1>(half, tile, k, xs, h, dots),
                    }
                }
            }
        }
    }

    /// Low and high 16-bit values of 4 lanes, widened.
    #[inline(always)]
    unsafe fn widen(half: Half, v: uint32x4_t) -> (float32x4_t, float32x4_t) {
        match half {
            Half::Bf16 => crate::arm::unpair_bf16(v),
            Half::F16 => (
                f16x4_to_f32(vmovn_u32(v)),
                f16x4_to_f32(vshrn_n_u32::<16>(v)),
            ),
        }
    }

    /// `HS` lane-halves from half `h0` on, for `R` activation rows.
    #[target_feature(enable = "neon")]
    // Register blocks read clearest as indexed loops over their rows.
    #[allow(clippy::needless_range_loop)]
    unsafe fn rows<const R: usize, const HS: usize>(
        half: Half,
        tile: &[u8],
        k: usize,
        xs: &[f32],
        h0: usize,
        dots: &mut [[f32; TILE]; ROWS],
    ) {
        debug_assert!(tile.len() >= k * 64 && xs.len() >= R * k && h0 + HS <= 2);
        let zero = vdupq_n_f32(0.0);
        let mut lo = [[[zero; 2]; R]; HS];
        let mut hi = [[[zero; 2]; R]; HS];
        let (tp, xp) = (tile.as_ptr().add(32 * h0) as *const u32, xs.as_ptr());
        for kk in 0..k {
            for hh in 0..HS {
                let at = tp.add(kk * 16 + 8 * hh);
                let (w0l, w0h) = widen(half, vld1q_u32(at));
                let (w1l, w1h) = widen(half, vld1q_u32(at.add(4)));
                for u in 0..R {
                    let x = *xp.add(u * k + kk);
                    lo[hh][u][0] = vfmaq_n_f32(lo[hh][u][0], w0l, x);
                    lo[hh][u][1] = vfmaq_n_f32(lo[hh][u][1], w1l, x);
                    hi[hh][u][0] = vfmaq_n_f32(hi[hh][u][0], w0h, x);
                    hi[hh][u][1] = vfmaq_n_f32(hi[hh][u][1], w1h, x);
                }
            }
        }
        for hh in 0..HS {
            let h = h0 + hh;
            for u in 0..R {
                let d = dots[u].as_mut_ptr();
                vst1q_f32(d.add(8 * h), lo[hh][u][0]);
                vst1q_f32(d.add(8 * h + 4), lo[hh][u][1]);
                vst1q_f32(d.add(16 + 8 * h), hi[hh][u][0]);
                vst1q_f32(d.add(16 + 8 * h + 4), hi[hh][u][1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against a plain f64 product over the rounded weights: both kernels, both types, row counts
    /// that are and are not whole tiles, every activation-row count of the kernel and more.
    #[test]
    fn matches_a_plain_product_over_the_rounded_weights() {
        let levels = cpu::levels_to_test("dense16 matmul");
        for half in [Half::Bf16, Half::F16] {
            for (n, k) in [(32, 64), (45, 33), (7, 128), (100, 1)] {
                let w = lcg(n as u64 * 31 + k as u64, n * k);
                let hw = HalfWeight::from_rows(half, n, k, &w);
                let bias = lcg(5, n);
                for m in [1, 2, 5, 6, 7, 13] {
                    let x = lcg(m as u64, m * k);
                    let mut want = vec![0f64; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let row = hw.row(j);
                            want[i * n + j] = bias[j] as f64
                                + (0..k)
                                    .map(|kk| x[i * k + kk] as f64 * row[kk] as f64)
                                    .sum::<f64>();
                        }
                    }
                    for &level in &levels {
                        let mut out = vec![f32::NAN; m * n];
                        hw.matmul_at(&x, m, &mut out, Some(&bias), level);
                        for (o, w) in out.iter().zip(&want) {
                            assert!(
                                (*o as f64 - w).abs() < 1e-5 * (k as f64).sqrt() + 1e-6,
                                "{half:?} n={n} k={k} m={m} {level}: {o} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The SSE2 portable kernel is the plain one bit for bit: both types, every row count, inputs
    /// that are not a multiple of anything, f16 subnormals and the largest finite values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse2_portable_kernel_is_the_plain_one() {
        for half in [Half::Bf16, Half::F16] {
            for k in [1, 3, 17, 130] {
                let mut w = lcg(k as u64 + 7, TILE * k);
                // f16 subnormals, the largest finite f16 and zeros of both signs.
                for (i, v) in w.iter_mut().enumerate().step_by(5) {
                    *v = [3.0e-6, -6.0e-8, 65504.0, -0.0, 0.0][i / 5 % 5];
                }
                let hw = HalfWeight::from_rows(half, TILE, k, &w);
                for r in 1..=ROWS {
                    let xs = lcg(r as u64, r * k);
                    let mut want = [[0f32; TILE]; ROWS];
                    let mut got = [[f32::NAN; TILE]; ROWS];
                    tile_dots_portable(half, &hw.tiles, k, &xs, r, &mut want);
                    sse2::tile_dots(half, &hw.tiles, k, &xs, r, &mut got);
                    for u in 0..r {
                        let (g, w): (Vec<u32>, Vec<u32>) = (
                            got[u].iter().map(|v| v.to_bits()).collect(),
                            want[u].iter().map(|v| v.to_bits()).collect(),
                        );
                        assert_eq!(g, w, "{half:?} k={k} rows={r} row {u}");
                    }
                }
            }
        }
    }

    /// The branch-free portable conversion is `half`'s, for every one of the 65 536 bit patterns.
    #[test]
    fn portable_f16_conversion_is_exact() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h as u32);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn rows_round_trip_as_the_half_type() {
        let w = [1.0f32, -2.5, 3.140625, 1e-3, 65504.0, 0.1];
        for half in [Half::Bf16, Half::F16] {
            let hw = HalfWeight::from_rows(half, 3, 2, &w);
            let got: Vec<f32> = (0..3).flat_map(|j| hw.row(j)).collect();
            let want: Vec<f32> = w.iter().map(|&v| half.value(half.bits(v))).collect();
            assert_eq!(got, want);
        }
        // bf16 values come back exactly (a bf16 checkpoint loses nothing).
        let exact: Vec<f32> = [1.5f32, -0.375, 1024.0, 3.0e-20]
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        let hw = HalfWeight::from_rows(Half::Bf16, 2, 2, &exact);
        assert_eq!([hw.row(0), hw.row(1)].concat(), exact);
    }
}

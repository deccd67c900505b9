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

use super::cpu::{LargeBuffer, TileOut};

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
        self.matmul_with(x, m, out, bias, simd_available())
    }

    /// [`Self::matmul_bias`], choosing the SIMD kernel or the portable one (tests compare them).
    pub fn matmul_with(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        bias: Option<&[f32]>,
        simd: bool,
    ) {
        let (n, k) = (self.n, self.k);
        let out = TileOut::new(out, x, (m, n, k), bias);
        if m == 0 || n == 0 {
            return;
        }
        let n_tiles = n.div_ceil(TILE);
        (0..n_tiles).into_par_iter().for_each(|t| {
            let tile = &self.tiles[t * k * 64..(t + 1) * k * 64];
            let (j0, cols) = (t * TILE, TILE.min(n - t * TILE));
            let mut dots = [[0f32; TILE]; ROWS];
            for i in (0..m).step_by(ROWS) {
                let r = ROWS.min(m - i);
                let xs = &x[i * k..(i + r) * k];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is only true where AVX-512F was detected; slices are sized.
                    unsafe { tile_dots_avx512(self.half, tile, k, xs, r, &mut dots) };
                } else {
                    tile_dots_portable(self.half, tile, k, xs, r, &mut dots);
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = simd;
                    tile_dots_portable(self.half, tile, k, xs, r, &mut dots);
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

/// Whether this CPU runs the AVX-512 kernel.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `dots[u][c] = Σ_k xs[u·k + kk] · w[c][kk]` for one tile and `r ≤ ROWS` activation rows.
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
    for kk in 0..k {
        let w: [f32; TILE] = std::array::from_fn(|r| half.read(tile, kk, r));
        for (u, d) in dots[..r].iter_mut().enumerate() {
            let xv = xs[u * k + kk];
            for (acc, wv) in d.iter_mut().zip(&w) {
                *acc += xv * wv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_dots_avx512(
    half: Half,
    tile: &[u8],
    k: usize,
    xs: &[f32],
    r: usize,
    dots: &mut [[f32; TILE]; ROWS],
) {
    // One monomorphised loop per row count keeps every accumulator in a register.
    match r {
        1 => tile_dots_rows::<1>(half, tile, k, xs, dots),
        2 => tile_dots_rows::<2>(half, tile, k, xs, dots),
        3 => tile_dots_rows::<3>(half, tile, k, xs, dots),
        4 => tile_dots_rows::<4>(half, tile, k, xs, dots),
        5 => tile_dots_rows::<5>(half, tile, k, xs, dots),
        _ => tile_dots_rows::<ROWS>(half, tile, k, xs, dots),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_dots_rows<const R: usize>(
    half: Half,
    tile: &[u8],
    k: usize,
    xs: &[f32],
    dots: &mut [[f32; TILE]; ROWS],
) {
    use std::arch::x86_64::*;
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
                    for simd in [false, simd_available()] {
                        let mut out = vec![f32::NAN; m * n];
                        hw.matmul_with(&x, m, &mut out, Some(&bias), simd);
                        for (o, w) in out.iter().zip(&want) {
                            assert!(
                                (*o as f64 - w).abs() < 1e-5 * (k as f64).sqrt() + 1e-6,
                                "{half:?} n={n} k={k} m={m} simd={simd}: {o} vs {w}"
                            );
                        }
                    }
                }
            }
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

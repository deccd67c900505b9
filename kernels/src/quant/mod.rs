//! Quantized linear weights held once, in tiles of 16 rows, with their CPU kernels.
//!
//! Why not candle's `QMatMul` on the CPU: candle 0.11 repacks q4k/q8_0 weights into an expanded
//! tile layout on first use (q4k tiles take 6 bits per weight, with f32 scales) and keeps the
//! original GGML blocks as well, so the model sits in memory ~2.3 times. Here the weights are
//! repacked once at load into a compact tile layout (4.625 bits per q4k weight, 8.5 per q8_0) and the
//! GGML blocks are dropped; the GGUF cache still stores GGML blocks ([`CpuQWeight::to_ggml`]
//! converts back exactly).
//!
//! A tile gives each weight row one 32-bit lane of a 16-lane vector, so that one AVX-512 VNNI
//! `vpdpbusd` multiplies 4 inputs into 16 rows at once (64 multiply-adds): the activations are
//! quantized to int8 once per matmul and broadcast 4 bytes at a time, and no horizontal sums are
//! needed. q8_0 tiles hold 16 rows; q4k tiles hold 32, rows `r` and `r + 16` sharing a lane in the
//! low and high nibbles of its bytes, so that each nibble byte multiplies the same 4 inputs (see
//! [`Q4K_TILE_BYTES`]). A portable path runs the same arithmetic elsewhere.
//!
//! Arithmetic, per weight row `w` and activation row `x` (both int8-quantized per block):
//! - q4k: `w = d·sc_s·q − dmin·m_s` per 32-value sub-block `s`, `x = d_x·a` per 256-value block,
//!   so `w·x = Σ_blocks d_x·Σ_s d·sc_s·(q·a)_s − Σ_s dmin·m_s·(d_x·Σa_s)`.
//! - q8_0: `w = d·q` per 32 values, `x = d_x·a`; VNNI multiplies unsigned by signed bytes, so the
//!   weights are stored as `q + 128` and `128·Σa` is subtracted per block.

use half::f16;
use rayon::prelude::*;

use crate::cpu::{self, Isa, Level};
use crate::tile::TileOut;
use crate::LargeBuffer;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod sse2;
#[cfg(target_arch = "x86_64")]
mod x86;

const QK_K: usize = 256;
const QK8_0: usize = 32;
const Q4K_BLOCK_BYTES: usize = 144;
const Q8_0_BLOCK_BYTES: usize = 34;
/// Rows of a vector of 32-bit lanes.
const LANES: usize = 16;
/// Weight rows per tile, at most (q4k's: two per lane).
const MAX_TILE: usize = 2 * LANES;
/// One q4k tile-block (32 rows × 256 values): d and dmin (32 f16 each), scales (8 sub-blocks × 32
/// rows, u8), mins (see [`q4k_min_at`]), then 4096 bytes of nibbles: per sub-block 8 chunks of 64
/// bytes, in which byte `4r + j` holds value `4p + j` of row `r` in its low nibble and of row
/// `r + 16` in its high nibble. One `vpdpbusd` of the whole bytes and one of the high nibbles give
/// both rows' sums (see [`CpuQWeight::tile_dots_avx512`]): one mask per 64 bytes where a layout
/// with both nibbles of a byte in one row needs two (+15 % matvec throughput in cache).
const Q4K_TILE_BYTES: usize = 64 + 64 + 256 + 256 + 4096;
/// Where a q4k tile-block's nibbles start.
const Q4K_NIBBLES: usize = 640;
/// One q8_0 tile-block: d (16 f16), then 8 chunks of 64 bytes in which bytes `4r..4r+4` hold
/// values `4p..4p+4` of row `r`, offset by +128 (unsigned, as `vpdpbusd` wants its first operand).
const Q8_0_TILE_BYTES: usize = 32 + 512;
/// Activation rows a weight tile is reused for before the next tile: keeps the chunk's quantized
/// activations in L2 (64 rows × 11008 bytes for the LM's down projection).
const M_CHUNK: usize = 64;
/// Activation rows one weight tile is multiplied with at a time (independent accumulators).
const MAX_ROWS: usize = 8;

/// The block formats this module runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Q4K,
    Q8_0,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4K => "q4k",
            Self::Q8_0 => "q8_0",
        }
    }

    /// Weight rows per tile.
    fn rows(self) -> usize {
        match self {
            Self::Q4K => MAX_TILE,
            Self::Q8_0 => LANES,
        }
    }

    /// (values, GGML bytes, tile bytes) of one block.
    fn block(self) -> (usize, usize, usize) {
        match self {
            Self::Q4K => (QK_K, Q4K_BLOCK_BYTES, Q4K_TILE_BYTES),
            Self::Q8_0 => (QK8_0, Q8_0_BLOCK_BYTES, Q8_0_TILE_BYTES),
        }
    }
}

/// An `[n, k]` weight (`n` output rows of `k` inputs) in 16-row tiles.
#[derive(Clone)]
pub struct CpuQWeight {
    format: Format,
    n: usize,
    k: usize,
    /// `[n/rows tiles][k/block blocks][tile-block]`; rows past `n` in the last tile are zero.
    tiles: LargeBuffer,
}

impl std::fmt::Debug for CpuQWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuQWeight({:?}, [{}, {}])", self.format, self.n, self.k)
    }
}

/// [`f16_at`] by the branch-free conversion, for loops the compiler vectorises.
#[inline(always)]
fn f16_lanes(b: &[u8], at: usize) -> f32 {
    crate::tile::f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]) as u32)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// GGML's 6-bit scales and mins of a q4k block (`get_scale_min_k4`).
fn q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, m)
}

/// The inverse of [`q4k_scales`].
fn q4k_pack_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    s
}

/// Byte offsets in a q4k tile-block of row `r`'s d and dmin (f16).
fn q4k_d_at(r: usize) -> (usize, usize) {
    (2 * r, 64 + 2 * r)
}

/// Byte offset in a q4k tile-block of the scale of sub-block `s` of row `r`.
fn q4k_scale_at(r: usize, s: usize) -> usize {
    128 + s * 32 + r
}

/// Byte offset in a q4k tile-block of the min of sub-block `s` of row `r`: per 16-row half, each
/// row holds its mins 4 to a 32-bit lane, sub-blocks 0–3 in a first 64 bytes and 4–7 in a second,
/// so that two `vpdpbusd` apply all 8 mins of 16 rows at once.
fn q4k_min_at(r: usize, s: usize) -> usize {
    384 + (r / LANES) * 128 + (s / 4) * 64 + (r % LANES) * 4 + s % 4
}

/// Byte offset in a q4k tile-block of value `v` of row `r`, and whether it is the high nibble.
fn q4k_nibble_at(r: usize, v: usize) -> (usize, bool) {
    let (s, w) = (v / 32, v % 32);
    let (p, j) = (w / 4, w % 4);
    (
        Q4K_NIBBLES + (s * 8 + p) * 64 + (r % LANES) * 4 + j,
        r >= LANES,
    )
}

/// Value `v` of row `r` of a q4k tile-block.
fn q4k_nibble(tb: &[u8], r: usize, v: usize) -> u8 {
    let (at, high) = q4k_nibble_at(r, v);
    if high {
        tb[at] >> 4
    } else {
        tb[at] & 0xF
    }
}

impl CpuQWeight {
    /// Repacks GGML blocks (`n` rows of `k / block` blocks); `k` must be a whole number of blocks.
    pub fn from_ggml(format: Format, n: usize, k: usize, ggml: &[u8]) -> Result<Self, String> {
        let (bv, bb, tb) = format.block();
        if k == 0 || !k.is_multiple_of(bv) {
            return Err(format!(
                "{format:?} rows need a multiple of {bv} columns, got {k}"
            ));
        }
        let kb = k / bv;
        let want = n * kb * bb;
        if ggml.len() != want {
            return Err(format!(
                "{format:?} [{n}, {k}] needs {want} bytes of blocks, got {}",
                ggml.len()
            ));
        }
        let rows = format.rows();
        let n_tiles = n.div_ceil(rows);
        let mut tiles = LargeBuffer::zeroed(n_tiles * kb * tb);
        tiles
            .par_chunks_mut(kb * tb)
            .enumerate()
            .for_each(|(t, tile)| {
                for (b, out) in tile.chunks_exact_mut(tb).enumerate() {
                    for r in 0..rows.min(n - t * rows) {
                        let row = t * rows + r;
                        let blk = &ggml[(row * kb + b) * bb..(row * kb + b + 1) * bb];
                        match format {
                            Format::Q4K => {
                                let (d, dmin) = q4k_d_at(r);
                                out[d..d + 2].copy_from_slice(&blk[0..2]);
                                out[dmin..dmin + 2].copy_from_slice(&blk[2..4]);
                                let (sc, m) = q4k_scales(&blk[4..16]);
                                for s in 0..8 {
                                    out[q4k_scale_at(r, s)] = sc[s];
                                    out[q4k_min_at(r, s)] = m[s];
                                }
                                // Sub-block `s` is the low (even `s`) or high (odd) nibbles of
                                // bytes 32·(s/2).. of the GGML block.
                                for s in 0..8 {
                                    let src = &blk[16 + (s / 2) * 32..];
                                    for p in 0..8 {
                                        let (at, high) = q4k_nibble_at(r, s * 32 + 4 * p);
                                        for j in 0..4 {
                                            let q = (src[4 * p + j] >> (4 * (s % 2))) & 0xF;
                                            out[at + j] |= if high { q << 4 } else { q };
                                        }
                                    }
                                }
                            }
                            Format::Q8_0 => {
                                out[2 * r..2 * r + 2].copy_from_slice(&blk[0..2]);
                                for (v, &q) in blk[2..].iter().enumerate() {
                                    out[32 + (v / 4) * 64 + r * 4 + v % 4] = q ^ 0x80;
                                }
                            }
                        }
                    }
                }
            });
        Ok(Self {
            format,
            n,
            k,
            tiles,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes an `[n, k]` weight takes in tiles (what a matmul streams).
    pub fn tiled_size(format: Format, n: usize, k: usize) -> usize {
        let (bv, _, tb) = format.block();
        n.div_ceil(format.rows()) * k.div_ceil(bv) * tb
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held in memory.
    pub fn size_in_bytes(&self) -> usize {
        self.tiles.len()
    }

    fn tile_block(&self, t: usize, b: usize) -> &[u8] {
        let (bv, _, tb) = self.format.block();
        let at = (t * (self.k / bv) + b) * tb;
        &self.tiles[at..at + tb]
    }

    /// The weights as GGML blocks again, bit for bit what [`Self::from_ggml`] was given.
    pub fn to_ggml(&self) -> Vec<u8> {
        let (bv, bb, _) = self.format.block();
        let kb = self.k / bv;
        let mut out = vec![0u8; self.n * kb * bb];
        let rows = self.format.rows();
        for (row, out_row) in out.chunks_exact_mut(kb * bb).enumerate() {
            let (t, r) = (row / rows, row % rows);
            for (b, blk) in out_row.chunks_exact_mut(bb).enumerate() {
                let tb = self.tile_block(t, b);
                match self.format {
                    Format::Q4K => {
                        let (d, dmin) = q4k_d_at(r);
                        blk[0..2].copy_from_slice(&tb[d..d + 2]);
                        blk[2..4].copy_from_slice(&tb[dmin..dmin + 2]);
                        let sc = std::array::from_fn(|s| tb[q4k_scale_at(r, s)]);
                        let m = std::array::from_fn(|s| tb[q4k_min_at(r, s)]);
                        blk[4..16].copy_from_slice(&q4k_pack_scales(&sc, &m));
                        let qs = &mut blk[16..];
                        for v in 0..QK_K {
                            let q = q4k_nibble(tb, r, v);
                            let (chunk, rr) = (v / 64, v % 64);
                            qs[chunk * 32 + rr % 32] |= if rr < 32 { q } else { q << 4 };
                        }
                    }
                    Format::Q8_0 => {
                        blk[0..2].copy_from_slice(&tb[2 * r..2 * r + 2]);
                        for v in 0..QK8_0 {
                            blk[2 + v] = tb[32 + (v / 4) * 64 + r * 4 + v % 4] ^ 0x80;
                        }
                    }
                }
            }
        }
        out
    }

    /// Weight row `j` in f32 (what the blocks encode).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (bv, _, _) = self.format.block();
        let rows = self.format.rows();
        let (t, r) = (j / rows, j % rows);
        for (b, out) in out.chunks_exact_mut(bv).enumerate() {
            let tb = self.tile_block(t, b);
            let d = f16_at(tb, 2 * r);
            match self.format {
                Format::Q4K => {
                    let dmin = f16_at(tb, q4k_d_at(r).1);
                    for (v, o) in out.iter_mut().enumerate() {
                        let s = v / 32;
                        let (sc, m) = (tb[q4k_scale_at(r, s)], tb[q4k_min_at(r, s)]);
                        let q = q4k_nibble(tb, r, v);
                        *o = d * sc as f32 * q as f32 - dmin * m as f32;
                    }
                }
                Format::Q8_0 => {
                    for (v, o) in out.iter_mut().enumerate() {
                        *o = d * ((tb[32 + (v / 4) * 64 + r * 4 + v % 4] ^ 0x80) as i8) as f32;
                    }
                }
            }
        }
    }

    /// `out[i·n + j] = x[i] · w[j]` for the `m` rows of `x` (`[m, k]`, row-major).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_at(x, m, out, None, cpu::level())
    }

    /// [`Self::matmul`] plus `bias[j]` on every row, added as the results are stored (a separate
    /// broadcast add is another pass over the output, on one thread).
    pub fn matmul_bias(&self, x: &[f32], m: usize, out: &mut [f32], bias: Option<&[f32]>) {
        self.matmul_at(x, m, out, bias, cpu::level())
    }

    /// [`Self::matmul_bias`] with the kernels of a chosen level (tests and benches compare them).
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
        #[cfg(target_arch = "x86_64")]
        if level == Level::Amx && m >= crate::amx::MIN_ROWS {
            // SAFETY: the level was checked above.
            unsafe { crate::amx::matmul(self, x, m, out) };
            return;
        }
        let acts: Vec<Act> = if m == 1 {
            vec![Act::new(self.format, x, isa)]
        } else {
            x.par_chunks_exact(k)
                .map(|r| Act::new(self.format, r, isa))
                .collect()
        };
        let rows = self.format.rows();
        let n_tiles = n.div_ceil(rows);
        // Bands of tiles, several per thread so uneven bands even out.
        let threads = rayon::current_num_threads().max(1);
        let band = n_tiles.div_ceil(threads * 4).clamp(1, 256 / rows);
        (0..n_tiles).into_par_iter().step_by(band).for_each(|t0| {
            let t1 = (t0 + band).min(n_tiles);
            let mut dots = [[0f32; MAX_TILE]; MAX_ROWS];
            for i0 in (0..m).step_by(M_CHUNK) {
                let i1 = (i0 + M_CHUNK).min(m);
                for t in t0..t1 {
                    let (j0, cols) = (t * rows, rows.min(n - t * rows));
                    let mut i = i0;
                    while i < i1 {
                        let r = (i1 - i).min(MAX_ROWS);
                        self.tile_dots(t, &acts[i..i + r], &mut dots[..r], isa);
                        for (u, d) in dots[..r].iter_mut().enumerate() {
                            // SAFETY: row `i + u < m`, columns `j0..j0 + cols` of its own tiles:
                            // this band alone writes them.
                            unsafe { out.store(i + u, j0, &mut d[..cols]) };
                        }
                        i += r;
                    }
                }
            }
        });
    }

    /// `out[u][r] = w[rows·t + r] · acts[u]` for up to [`MAX_ROWS`] activation rows.
    fn tile_dots(&self, t: usize, acts: &[Act], out: &mut [[f32; MAX_TILE]], isa: Isa) {
        let (bv, _, tbytes) = self.format.block();
        let kb = self.k / bv;
        let tile = &self.tiles[t * kb * tbytes..(t + 1) * kb * tbytes];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a level is only used after `cpu::assert_supported`; the tile holds `kb`
            // tile-blocks and each activation row `k` values.
            Isa::Avx512 => unsafe { x86::tile_dots_avx512(self.format, tile, kb, acts, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::tile_dots_avx2(self.format, tile, kb, acts, out) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: as above.
            Isa::Neon => unsafe { neon::tile_dots(self.format, tile, kb, acts, out) },
            #[cfg(target_arch = "x86_64")]
            _ => sse2::tile_dots(self.format, tile, kb, acts, out),
            #[cfg(not(target_arch = "x86_64"))]
            _ => tile_dots_plain(self.format, tile, kb, acts, out),
        }
    }
}

/// The portable q8_0 tile kernel: the same integer sums as the SIMD kernels, written over fixed
/// arrays of 16-bit products so that the compiler vectorises them at the baseline (the pattern of
/// SSE2's `pmaddwd`: two i16 products summed into an i32 lane). Floats are combined as the SIMD
/// kernels do, but without fused multiply-adds.
/// The portable kernels in plain Rust: what a CPU that is neither x86-64 nor aarch64 runs, and
/// what the x86-64 portable level's SSE2 code is tested against.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn tile_dots_plain(
    format: Format,
    tile: &[u8],
    kb: usize,
    acts: &[Act],
    out: &mut [[f32; MAX_TILE]],
) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        match format {
            Format::Q4K => tile_dot_q4k_portable(tile, kb, a, o),
            Format::Q8_0 => tile_dot_q8_0_portable(tile, kb, a, o),
        }
    }
}

fn tile_dot_q8_0_portable(tile: &[u8], kb: usize, a: &Act, out: &mut [f32; MAX_TILE]) {
    let mut acc = [0f32; LANES];
    for (b, tb) in tile.chunks_exact(Q8_0_TILE_BYTES).take(kb).enumerate() {
        // Lane `2r + h` sums values `2h, 2h + 1` of each chunk's 4 for row `r`.
        let mut pairs = [0i32; 2 * LANES];
        for p in 0..8 {
            let x = &a.q[b * QK8_0 + p * 4..][..4];
            let xs: [i16; 4 * LANES] = std::array::from_fn(|i| x[i % 4] as i8 as i16);
            let chunk: &[u8; 64] = tb[32 + p * 64..32 + p * 64 + 64].try_into().unwrap();
            // Weights are stored as q + 128.
            let ws: [i16; 4 * LANES] = std::array::from_fn(|i| (chunk[i] ^ 0x80) as i8 as i16);
            for (j, s) in pairs.iter_mut().enumerate() {
                *s += ws[2 * j] as i32 * xs[2 * j] as i32
                    + ws[2 * j + 1] as i32 * xs[2 * j + 1] as i32;
            }
        }
        let da = a.d[b];
        // The branch-free f16 conversion vectorises; `half`'s software one (no F16C at the
        // baseline) is a call per value.
        let d: [f32; LANES] = std::array::from_fn(|r| f16_lanes(tb, 2 * r));
        for (r, o) in acc.iter_mut().enumerate() {
            let isum = pairs[2 * r] + pairs[2 * r + 1];
            *o += isum as f32 * (d[r] * da);
        }
    }
    out[..LANES].copy_from_slice(&acc);
}

/// The portable q4k tile kernel: per block the exact integer sums `Σ_s sc_s·(q·a)_s` and
/// `Σ_s m_s·Σa_s` of each row, as the SIMD kernels compute them, then the block's float scales.
/// Nibble products (≤ 15·127) are summed in i16 lanes, one per row and position in a chunk's 4
/// values: 8 chunks a sub-block give at most 8·1905 < 2¹⁵, so plain 16-bit vector multiplies and
/// adds (SSE2's `pmullw`/`paddw`) do the work.
fn tile_dot_q4k_portable(tile: &[u8], kb: usize, a: &Act, out: &mut [f32; MAX_TILE]) {
    let mut acc = [0f32; MAX_TILE];
    for (b, tb) in tile.chunks_exact(Q4K_TILE_BYTES).take(kb).enumerate() {
        let mut lo_int = [0i32; LANES];
        let mut hi_int = [0i32; LANES];
        for s in 0..8 {
            let (mut lo, mut hi) = ([0i16; 4 * LANES], [0i16; 4 * LANES]);
            for p in 0..8 {
                let x = &a.q[b * QK_K + s * 32 + p * 4..][..4];
                let xs: [i16; 4 * LANES] = std::array::from_fn(|i| x[i % 4] as i8 as i16);
                let at = Q4K_NIBBLES + (s * 8 + p) * 64;
                let chunk: &[u8; 64] = tb[at..at + 64].try_into().unwrap();
                for i in 0..4 * LANES {
                    lo[i] += (chunk[i] & 15) as i16 * xs[i];
                    hi[i] += (chunk[i] >> 4) as i16 * xs[i];
                }
            }
            let sc = &tb[q4k_scale_at(0, s)..q4k_scale_at(0, s) + MAX_TILE];
            for r in 0..LANES {
                let l: i32 = lo[4 * r..4 * r + 4].iter().map(|&v| v as i32).sum();
                let h: i32 = hi[4 * r..4 * r + 4].iter().map(|&v| v as i32).sum();
                lo_int[r] += l * sc[r] as i32;
                hi_int[r] += h * sc[LANES + r] as i32;
            }
        }
        let da = a.d[b];
        let sums = &a.sums[b * 8..b * 8 + 8];
        let d: [f32; MAX_TILE] = std::array::from_fn(|r| f16_lanes(tb, q4k_d_at(r).0));
        let dmin: [f32; MAX_TILE] = std::array::from_fn(|r| f16_lanes(tb, q4k_d_at(r).1));
        for r in 0..MAX_TILE {
            let mins: i32 = (0..8).map(|s| tb[q4k_min_at(r, s)] as i32 * sums[s]).sum();
            let int = if r < LANES {
                lo_int[r]
            } else {
                hi_int[r - LANES]
            };
            acc[r] -= mins as f32 * (dmin[r] * da);
            acc[r] += int as f32 * (d[r] * da);
        }
    }
    *out = acc;
}

/// One activation row quantized to int8 for a weight format.
pub(crate) struct Act {
    /// The signed values.
    q: Vec<u8>,
    /// Per-block scale (q4k: per 256 values; q8_0: per 32).
    d: Vec<f32>,
    /// q8_0: `Σa` per block (the +128 offset of the weights adds `128·Σa`). q4k: `Σa` per 32-value
    /// sub-block (the portable kernel applies the mins to it).
    sums: Vec<i32>,
    /// q4k: per block, the 8 sub-block sums split as `Σa = 64·h + l` (`h` signed, `0 ≤ l < 64`)
    /// into bytes `[h0..h3], [h4..h7], [l0..l3], [l4..l7]`: the SIMD kernels multiply unsigned
    /// mins by signed bytes, and `|Σa| ≤ 32·127` does not fit one.
    min_sums: Vec<[i32; 4]>,
}

/// Symmetric int8 quantization of one block; returns the scale (NaN if the block is not finite).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    // `f32::max` drops NaNs; a NaN or infinite input must poison the result, not vanish.
    let (amax, finite) = x.iter().fold((0f32, true), |(a, ok), v| {
        (a.max(v.abs()), ok && v.is_finite())
    });
    if amax == 0.0 || !finite {
        q.fill(0);
        return if finite { 0.0 } else { f32::NAN };
    }
    let id = 127.0 / amax;
    // Round to nearest even by the 1.5·2²³ trick (|v·id| ≤ 127): `f32::round` is a libm call on
    // baseline x86-64 and was 1/4 of the quantization time.
    const MAGIC: f32 = 12_582_912.0;
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v * id + MAGIC) - MAGIC) as i8;
    }
    amax / 127.0
}

impl Act {
    fn new(format: Format, x: &[f32], isa: Isa) -> Self {
        let k = x.len();
        let (bv, _, _) = format.block();
        let mut q = vec![0u8; k];
        let mut d = Vec::with_capacity(k / bv);
        let mut sums = Vec::new();
        let mut min_sums = Vec::new();
        let mut sub = [0i32; QK_K / 32];
        for (xb, qb) in x.chunks_exact(bv).zip(q.chunks_exact_mut(bv)) {
            let sub = &mut sub[..bv / 32];
            let db = quantize_block_at(isa, xb, qb, sub);
            d.push(db);
            match format {
                Format::Q4K => {
                    sums.extend_from_slice(sub);
                    let (mut h, mut l) = ([0u8; 8], [0u8; 8]);
                    for (s, &v) in sub.iter().enumerate() {
                        // |v| ≤ 32·127: v >> 6 lies in -64..=63.
                        h[s] = (v >> 6) as i8 as u8;
                        l[s] = (v & 63) as u8;
                    }
                    let word = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    min_sums.push([word(&h[..4]), word(&h[4..]), word(&l[..4]), word(&l[4..])]);
                }
                Format::Q8_0 => sums.push(sub.iter().sum()),
            }
        }
        Self {
            q,
            d,
            sums,
            min_sums,
        }
    }
}

/// [`quantize_block_sums`] with the code of `isa` (all give the same bytes, scales and sums).
fn quantize_block_at(isa: Isa, x: &[f32], q: &mut [u8], sums: &mut [i32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was checked by the caller (`cpu::assert_supported`).
        Isa::Avx512 => unsafe { x86::quantize_block_avx512(x, q, sums) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::quantize_block_avx2(x, q, sums) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above.
        Isa::Neon => unsafe { neon::quantize_block(x, q, sums) },
        _ => quantize_block_sums(x, q, sums),
    }
}

/// [`quantize_block`] into bytes, with the sum of each 32 quantized values.
fn quantize_block_sums(x: &[f32], q: &mut [u8], sums: &mut [i32]) -> f32 {
    let mut tmp = [0i8; QK_K];
    let tmp = &mut tmp[..x.len()];
    let d = quantize_block(x, tmp);
    for ((qs, ts), s) in q.chunks_exact_mut(32).zip(tmp.chunks_exact(32)).zip(sums) {
        for (o, &v) in qs.iter_mut().zip(ts) {
            *o = v as u8;
        }
        *s = ts.iter().map(|&v| v as i32).sum();
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes.
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 32) as u8
            })
            .collect()
    }

    fn floats(seed: u64, len: usize, scale: f32) -> Vec<f32> {
        bytes(seed, 4 * len)
            .chunks_exact(4)
            .map(|b| {
                (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32 / u32::MAX as f32 - 0.5)
                    * scale
            })
            .collect()
    }

    /// Random GGML blocks with every bit pattern of the quants and scales (q8_0 quants include
    /// -128), and small positive d / dmin.
    fn ggml_blocks(format: Format, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let (bv, bb, _) = format.block();
        let mut g = bytes(seed, n * (k / bv) * bb);
        let ds = floats(seed + 1, 2 * n * (k / bv), 0.02);
        for (i, blk) in g.chunks_exact_mut(bb).enumerate() {
            blk[0..2].copy_from_slice(&f16::from_f32(ds[2 * i].abs() + 1e-3).to_le_bytes());
            if format == Format::Q4K {
                blk[2..4].copy_from_slice(&f16::from_f32(ds[2 * i + 1].abs()).to_le_bytes());
            }
        }
        g
    }

    /// GGML's own decoding of the blocks (`dequantize_row_q4_K` / `_q8_0`), written from the format.
    fn ggml_dequantize(format: Format, g: &[u8]) -> Vec<f32> {
        let (_, bb, _) = format.block();
        let mut out = Vec::new();
        for blk in g.chunks_exact(bb) {
            let d = f16_at(blk, 0);
            match format {
                Format::Q8_0 => out.extend(blk[2..].iter().map(|&q| d * q as i8 as f32)),
                Format::Q4K => {
                    let dmin = f16_at(blk, 2);
                    let (sc, m) = q4k_scales(&blk[4..16]);
                    for j in 0..4 {
                        let qs = &blk[16 + 32 * j..16 + 32 * j + 32];
                        for (s, shift) in [(2 * j, 0), (2 * j + 1, 4)] {
                            out.extend(qs.iter().map(|&q| {
                                d * sc[s] as f32 * ((q >> shift) & 15) as f32 - dmin * m[s] as f32
                            }));
                        }
                    }
                }
            }
        }
        out
    }

    fn weight(format: Format, n: usize, k: usize, seed: u64) -> (CpuQWeight, Vec<u8>, Vec<f32>) {
        let g = ggml_blocks(format, n, k, seed);
        let w = CpuQWeight::from_ggml(format, n, k, &g).unwrap();
        let deq = ggml_dequantize(format, &g);
        (w, g, deq)
    }

    #[test]
    fn tiles_hold_exactly_the_ggml_blocks() {
        for format in [Format::Q4K, Format::Q8_0] {
            // 37 rows: the last tile is partial.
            let (qw, ggml, deq) = weight(format, 37, 512, 3);
            assert_eq!(qw.to_ggml(), ggml, "{format:?} round trip");
            let mut row = vec![0f32; 512];
            for j in 0..37 {
                qw.dequantize_row(j, &mut row);
                assert_eq!(row, deq[j * 512..(j + 1) * 512], "{format:?} row {j}");
            }
        }
    }

    #[test]
    fn q4k_scale_packing_round_trips() {
        for seed in 0..64u8 {
            let mix = |a: u8, b: u8, i: usize| seed.wrapping_mul(a).wrapping_add(i as u8 * b) % 64;
            let sc: [u8; 8] = std::array::from_fn(|i| mix(7, 13, i));
            let m: [u8; 8] = std::array::from_fn(|i| mix(11, 5, i));
            assert_eq!(q4k_scales(&q4k_pack_scales(&sc, &m)), (sc, m));
        }
    }

    /// Every level against the f32 product with the dequantized weights (the only difference
    /// left is the int8 rounding of the activations, ≤ 1/254 of each block's largest value),
    /// and against each other. The integer sums of every level are the same exact numbers: the
    /// SIMD levels also combine them in the same order with fused multiply-adds, so they agree
    /// bit for bit; the portable kernel rounds each product and sum separately, which moves a
    /// result by a few f32 ulps of the largest term per block (bound: 1e-5 of the output scale).
    #[test]
    fn every_level_matches_the_dequantized_product_and_the_portable_kernel() {
        let levels = cpu::levels_to_test("quant matmul");
        for format in [Format::Q4K, Format::Q8_0] {
            for (m, k, n) in [
                (1, 512, 37),
                (2, 256, 40),
                (3, 768, 48),
                (5, 1792, 16),
                (9, 256, 33),
                (13, 512, 1),
                (70, 256, 300),
            ] {
                let (qw, _, deq) = weight(format, n, k, (m * 31 + n) as u64);
                let x = floats(m as u64 + 100, m * k, 4.0);
                let mut reference = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        reference[i * n + j] = x[i * k..(i + 1) * k]
                            .iter()
                            .zip(&deq[j * k..(j + 1) * k])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>() as f32;
                    }
                }
                let scale = reference.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
                let mut simd: Option<(Level, Vec<f32>)> = None;
                let mut portable = vec![0f32; m * n];
                qw.matmul_at(&x, m, &mut portable, None, Level::Portable);
                for &level in &levels {
                    let mut got = vec![f32::NAN; m * n];
                    qw.matmul_at(&x, m, &mut got, None, level);
                    // From MIN_ROWS rows the AMX level multiplies bf16 on tiles, other numerics
                    // than the int8 sums: `amx_tiles_compute_the_bf16_product` checks it exactly.
                    let tiles = level == Level::Amx && m >= crate::amx_min_rows();
                    let err = got
                        .iter()
                        .zip(&reference)
                        .fold(0f32, |a, (p, r)| a.max((p - r).abs()));
                    assert!(
                        err < 0.02 * scale,
                        "{format:?} {level} {m}x{k}x{n}: max error {err} vs scale {scale}"
                    );
                    for (g, p) in got.iter().zip(&portable).filter(|_| !tiles) {
                        assert!(
                            (g - p).abs() <= 1e-5 * scale,
                            "{format:?} {level} {m}x{k}x{n}: {g} vs portable {p}"
                        );
                    }
                    // The fused bias is the plain sum.
                    let mut biased = vec![0f32; m * n];
                    qw.matmul_at(&x, m, &mut biased, Some(&bias), level);
                    for (i, (b, p)) in biased.iter().zip(&got).enumerate() {
                        assert_eq!(*b, p + bias[i % n], "{format:?} {level} bias at {i}");
                    }
                    if level != Level::Portable && !tiles {
                        match &simd {
                            Some((other, want)) => assert!(
                                got == *want,
                                "{format:?} {m}x{k}x{n}: {level} and {other} differ"
                            ),
                            None => simd = Some((level, got)),
                        }
                    }
                }
            }
        }
    }

    type TileKernel<'a> = &'a dyn Fn(Format, &[u8], usize, &[Act], &mut [[f32; MAX_TILE]]);

    /// Runs two tile kernels over every tile of random weights and asserts the same bits.
    fn same_tile_results(
        isa: Isa,
        shapes: &[(usize, usize, usize)],
        one: TileKernel,
        other: TileKernel,
    ) {
        for format in [Format::Q4K, Format::Q8_0] {
            for &(n, k, m) in shapes {
                let (qw, _, _) = weight(format, n, k, (n + k) as u64);
                let mut x = floats(9, m * k, 4.0);
                x[3] = 0.0;
                let acts: Vec<Act> = x
                    .chunks_exact(k)
                    .map(|r| Act::new(format, r, isa))
                    .collect();
                let (bv, _, tb) = format.block();
                let kb = k / bv;
                for t in 0..n.div_ceil(format.rows()) {
                    let tile = &qw.tiles[t * kb * tb..(t + 1) * kb * tb];
                    let mut a = vec![[0f32; MAX_TILE]; m];
                    let mut b = vec![[0f32; MAX_TILE]; m];
                    one(format, tile, kb, &acts, &mut a);
                    other(format, tile, kb, &acts, &mut b);
                    for u in 0..m {
                        let (a, b) = (&a[u][..format.rows()], &b[u][..format.rows()]);
                        assert!(
                            a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{format:?} {n}x{k} tile {t} row {u}: {a:?} vs {b:?}"
                        );
                    }
                }
            }
        }
    }

    /// x86-64's portable level runs SSE2 code; it gives the plain-Rust kernels' results bit for
    /// bit (same integer sums, same float operations in the same order).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sse2_portable_kernels_are_the_plain_ones() {
        let shapes = [(40, 768, 5), (16, 256, 1), (33, 1792, 3)];
        same_tile_results(Isa::Portable, &shapes, &sse2::tile_dots, &tile_dots_plain);
    }

    /// The NEON kernels without dotprod (widening multiplies) give the `sdot` kernels' results
    /// bit for bit; run where the CPU has dotprod (qemu `-cpu max`), else said on stderr.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_base_path_is_the_sdot_path() {
        if !cpu::features().dotprod {
            eprintln!("neon sdot vs base: this CPU lacks dotprod; the base path ran alone");
            return;
        }
        // SAFETY: NEON is the aarch64 baseline; dotprod was checked above.
        let with = |dotprod| {
            move |f: Format, t: &[u8], kb: usize, a: &[Act], o: &mut [[f32; MAX_TILE]]| unsafe {
                neon::tile_dots_with(f, t, kb, a, o, dotprod)
            }
        };
        same_tile_results(
            Isa::Neon,
            &[(40, 768, 5), (16, 256, 1)],
            &with(true),
            &with(false),
        );
    }

    /// The AVX-VNNI q8_0 path (the same `vpdpbusd` on 8 lanes), run through its EVEX encoding
    /// where the CPU has AVX-512 VNNI: bit-identical to the `vpmaddubsw` path.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx_vnni_q8_0_path_is_the_maddubs_path() {
        let f = cpu::features();
        if !(Level::Avx512.supported() && f.avx512_vnni) {
            eprintln!(
                "avx-vnni q8_0 path: not run, this CPU lacks AVX-512 VNNI (counted as skipped)"
            );
            return;
        }
        let (k, n) = (1024, 16);
        let (qw, _, _) = weight(Format::Q8_0, n, k, 9);
        let x = floats(4, 4 * k, 3.0);
        let acts: Vec<Act> = x
            .chunks_exact(k)
            .map(|r| Act::new(Format::Q8_0, r, Isa::Avx2))
            .collect();
        let mut a = [[0f32; MAX_TILE]; 4];
        let mut b = [[0f32; MAX_TILE]; 4];
        // SAFETY: AVX2 and AVX-512 VNNI/VL were detected; one whole tile of `k / 32` blocks.
        unsafe {
            let tile = &qw.tiles[..k / QK8_0 * Q8_0_TILE_BYTES];
            x86::tile_dots_avx2(Format::Q8_0, tile, k / QK8_0, &acts, &mut a);
            x86::q8_0_evex_vnni::<4>(tile, k / QK8_0, &acts, &mut b);
        }
        if f.avx_vnni {
            eprintln!("(this CPU has AVX-VNNI: tile_dots_avx2 itself ran vpdpbusd)");
        }
        assert_eq!(a, b);
    }

    /// The largest sums the q4k kernels' integer accumulators can meet: every nibble 15, every
    /// scale and min 63, every activation ±127, in both nibble halves of a tile.
    #[test]
    fn q4k_extreme_blocks_do_not_overflow() {
        let (n, k) = (40, 1024);
        let mut blk = [0u8; Q4K_BLOCK_BYTES];
        blk[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        blk[4..16].copy_from_slice(&q4k_pack_scales(&[63; 8], &[63; 8]));
        blk[16..].fill(0xFF);
        let ggml = blk.repeat(n * k / QK_K);
        let qw = CpuQWeight::from_ggml(Format::Q4K, n, k, &ggml).unwrap();
        let mut row = vec![0f32; k];
        qw.dequantize_row(n - 1, &mut row);
        assert!(row.iter().all(|&v| v == 0.5 * 63.0 * 15.0 - 0.25 * 63.0));
        // All +1, then a sign per 32-value sub-block (extreme sub-block sums of both signs).
        for flip in [false, true] {
            let x: Vec<f32> = (0..k)
                .map(|i| if flip && (i / 32) % 3 == 1 { -1.0 } else { 1.0 })
                .collect();
            let want: f64 = x.iter().zip(&row).map(|(a, w)| (a * w) as f64).sum();
            for level in cpu::levels_to_test("q4k extremes") {
                let mut out = vec![0f32; 2 * n];
                qw.matmul_at(&x.repeat(2), 2, &mut out, None, level);
                for v in out {
                    assert!(
                        ((v as f64 - want) / want).abs() < 1e-5,
                        "{level} flip {flip}: {v} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_and_non_finite_activation_blocks() {
        for level in cpu::levels_to_test("quant non-finite") {
            for format in [Format::Q4K, Format::Q8_0] {
                let (qw, _, _) = weight(format, 16, 256, 1);
                let mut out = vec![1f32; 16];
                qw.matmul_at(&[0f32; 256], 1, &mut out, None, level);
                assert!(out.iter().all(|v| *v == 0.0), "{level} {format:?} {out:?}");
                let mut x = [0.5f32; 256];
                x[3] = f32::NAN;
                qw.matmul_at(&x, 1, &mut out, None, level);
                assert!(
                    out.iter().all(|v| v.is_nan()),
                    "{level} {format:?}: a NaN must not vanish: {out:?}"
                );
            }
        }
    }

    /// Every level's activation quantizer gives the scalar one's bytes, scales and sums, ties and
    /// non-finite blocks included.
    #[test]
    fn vector_activation_quantization_is_the_scalar_one() {
        for level in cpu::levels_to_test("activation quantization") {
            for (bv, seed) in [(32usize, 0u64), (256, 1), (32, 2), (256, 3)] {
                let mut x = floats(seed, 64 * bv, 2.0 + seed as f32);
                // Exact ties of the rounding: with a block maximum of 127, v·id is v itself.
                x[0] = 127.0;
                for (i, v) in x[1..bv].iter_mut().enumerate() {
                    *v = (i as f32 - 15.0) + 0.5;
                }
                x[5 * bv + 3] = f32::NAN;
                x[7 * bv] = f32::INFINITY;
                x[9 * bv..10 * bv].fill(0.0);
                for xb in x.chunks_exact(bv) {
                    let (mut qa, mut qb) = (vec![0u8; bv], vec![0u8; bv]);
                    let (mut sa, mut sb) = (vec![0i32; bv / 32], vec![0i32; bv / 32]);
                    let da = quantize_block_sums(xb, &mut qa, &mut sa);
                    let db = quantize_block_at(level.isa(), xb, &mut qb, &mut sb);
                    assert_eq!(da.to_bits(), db.to_bits(), "{level}");
                    assert_eq!((qa, sa), (qb, sb), "{level}");
                }
            }
        }
    }

    #[test]
    fn rejects_inconsistent_blocks() {
        assert!(CpuQWeight::from_ggml(Format::Q4K, 2, 250, &[0; 288]).is_err());
        assert!(CpuQWeight::from_ggml(Format::Q4K, 2, 256, &[0; 287]).is_err());
        assert!(CpuQWeight::from_ggml(Format::Q8_0, 2, 96, &[0; 203]).is_err());
        assert!(CpuQWeight::from_ggml(Format::Q8_0, 2, 96, &[0; 204]).is_ok());
    }

    /// The AMX level's tile matmul (from `MIN_ROWS` activation rows) against its own arithmetic
    /// done exactly: `Σ bf16(x)·bf16(w)` in f64, where `w` is GGML's dequantized weight. The
    /// tiles sum exact f32 products in f32 in their own order; over k ≤ 2048 terms that moves a
    /// result by about √k f32 ulps of `Σ|x·w|` (bound used: 1e-5 of it), while one misplaced
    /// weight or input moves it by a whole term, ~Σ|x·w|/k ≥ 5e-4 of it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_tiles_compute_the_bf16_product() {
        if !cpu::levels_to_test("amx tiles").contains(&Level::Amx) {
            return;
        }
        let bf = |v: f32| crate::tile::bf16_value(crate::tile::bf16_bits(v)) as f64;
        for format in [Format::Q4K, Format::Q8_0] {
            for (m, k, n) in [
                (32, 256, 32),
                (33, 512, 17),
                (70, 768, 300),
                (100, 2048, 40),
                (64, 256, 1),
                (47, 1792, 65),
            ] {
                let (qw, _, deq) = weight(format, n, k, (m * 7 + n) as u64);
                let x = floats(m as u64 + 5, m * k, 4.0);
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.5 - 7.0).collect();
                let mut got = vec![f32::NAN; m * n];
                qw.matmul_at(&x, m, &mut got, Some(&bias), Level::Amx);
                for i in 0..m {
                    for j in 0..n {
                        let terms = x[i * k..(i + 1) * k]
                            .iter()
                            .zip(&deq[j * k..(j + 1) * k])
                            .map(|(a, b)| bf(*a) * bf(*b));
                        let (sum, abs) = terms.fold((0f64, 0f64), |(s, a), t| (s + t, a + t.abs()));
                        let want = sum + bias[j] as f64;
                        let g = got[i * n + j] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * abs + 1e-6 * bias[j].abs() as f64,
                            "{format:?} {m}x{k}x{n} at ({i}, {j}): {g} vs {want} (Σ|t| {abs})"
                        );
                    }
                }
            }
        }
    }
}

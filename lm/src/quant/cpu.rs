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

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

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
/// Activation rows the q4k kernel takes at once: it keeps 6 accumulators per row in registers.
const Q4K_MAX_ROWS: usize = 4;
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
    pub fn from_ggml(g: GgmlDType) -> Option<Self> {
        match g {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4K => GgmlDType::Q4K,
            Self::Q8_0 => GgmlDType::Q8_0,
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

/// Zero-initialised bytes that, on Linux, sit in their own anonymous mapping advised onto
/// transparent huge pages (`MADV_HUGEPAGE`).
///
/// Decoding streams every weight once per token. On 4 KiB pages each page of that stream is a TLB
/// miss, and in a virtual machine a miss is a two-level page walk; 2 MiB pages make them 512
/// times rarer. (Most distributions enable THP only where asked, as here.)
pub struct LargeBuffer {
    #[cfg(target_os = "linux")]
    map: Option<memmap2::MmapMut>,
    heap: Vec<u8>,
}

impl LargeBuffer {
    /// Below this a buffer is a plain heap allocation: no huge page would fill.
    const MAPPED_FROM: usize = 2 << 20;

    pub fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len >= Self::MAPPED_FROM {
            if let Ok(map) = memmap2::MmapMut::map_anon(len) {
                // Advice only: without THP the mapping still works, on small pages.
                let _ = map.advise(memmap2::Advice::HugePage);
                return Self {
                    map: Some(map),
                    heap: Vec::new(),
                };
            }
        }
        Self {
            #[cfg(target_os = "linux")]
            map: None,
            heap: vec![0; len],
        }
    }
}

impl std::ops::Deref for LargeBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        #[cfg(target_os = "linux")]
        if let Some(m) = &self.map {
            return m;
        }
        &self.heap
    }
}

impl std::ops::DerefMut for LargeBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        #[cfg(target_os = "linux")]
        if let Some(m) = &mut self.map {
            return m;
        }
        &mut self.heap
    }
}

impl Clone for LargeBuffer {
    fn clone(&self) -> Self {
        let mut b = Self::zeroed(self.len());
        b.copy_from_slice(self);
        b
    }
}

impl std::fmt::Debug for CpuQWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuQWeight({:?}, [{}, {}])", self.format, self.n, self.k)
    }
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
        self.matmul_with(x, m, out, None, Kernel::best())
    }

    /// [`Self::matmul`] plus `bias[j]` on every row, added as the results are stored (a separate
    /// broadcast add is another pass over the output, on one thread).
    pub fn matmul_bias(&self, x: &[f32], m: usize, out: &mut [f32], bias: Option<&[f32]>) {
        self.matmul_with(x, m, out, bias, Kernel::best())
    }

    /// [`Self::matmul_bias`] with a chosen kernel (tests compare them).
    pub fn matmul_with(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        bias: Option<&[f32]>,
        kernel: Kernel,
    ) {
        let (n, k) = (self.n, self.k);
        let out = TileOut::new(out, x, (m, n, k), bias);
        if m == 0 || n == 0 {
            return;
        }
        let acts: Vec<Act> = if m == 1 {
            vec![Act::new(self.format, x)]
        } else {
            x.par_chunks_exact(k)
                .map(|r| Act::new(self.format, r))
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
                        self.tile_dots(t, &acts[i..i + r], &mut dots[..r], kernel);
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
    fn tile_dots(&self, t: usize, acts: &[Act], out: &mut [[f32; MAX_TILE]], kernel: Kernel) {
        match kernel {
            Kernel::Portable => {
                for (a, o) in acts.iter().zip(out.iter_mut()) {
                    self.tile_dot_portable(t, a, o);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni if self.format == Format::Q4K && acts.len() > Q4K_MAX_ROWS => {
                for (a, o) in acts.chunks(Q4K_MAX_ROWS).zip(out.chunks_mut(Q4K_MAX_ROWS)) {
                    self.tile_dots(t, a, o, kernel);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::Avx512Vnni` is only chosen after the CPU features were detected.
            Kernel::Avx512Vnni => unsafe {
                match acts.len() {
                    1 => self.tile_dots_avx512::<1>(t, acts, out),
                    2 => self.tile_dots_avx512::<2>(t, acts, out),
                    3 => self.tile_dots_avx512::<3>(t, acts, out),
                    4 => self.tile_dots_avx512::<4>(t, acts, out),
                    5 => self.tile_dots_avx512::<5>(t, acts, out),
                    6 => self.tile_dots_avx512::<6>(t, acts, out),
                    7 => self.tile_dots_avx512::<7>(t, acts, out),
                    _ => self.tile_dots_avx512::<8>(t, acts, out),
                }
            },
        }
    }

    fn tile_dot_portable(&self, t: usize, a: &Act, out: &mut [f32; MAX_TILE]) {
        let (bv, _, _) = self.format.block();
        out.fill(0.0);
        for b in 0..self.k / bv {
            let tb = self.tile_block(t, b);
            for (r, o) in out[..self.format.rows()].iter_mut().enumerate() {
                let d = f16_at(tb, 2 * r);
                match self.format {
                    Format::Q4K => {
                        let dmin = f16_at(tb, q4k_d_at(r).1);
                        let da = a.d[b];
                        for s in 0..8 {
                            let isum: i32 = (0..32)
                                .map(|w| {
                                    let v = s * 32 + w;
                                    q4k_nibble(tb, r, v) as i32 * a.q[b * QK_K + v] as i8 as i32
                                })
                                .sum();
                            let (sc, m) = (tb[q4k_scale_at(r, s)], tb[q4k_min_at(r, s)]);
                            *o += isum as f32 * (d * sc as f32) * da;
                            *o -= dmin * m as f32 * (da * a.sums[b * 8 + s] as f32);
                        }
                    }
                    Format::Q8_0 => {
                        let isum: i32 = (0..QK8_0)
                            .map(|v| {
                                let w = tb[32 + (v / 4) * 64 + r * 4 + v % 4] as i32;
                                w * a.q[b * QK8_0 + v] as i8 as i32
                            })
                            .sum();
                        let corr = 128 * a.sums[b];
                        *o += (isum - corr) as f32 * (d * a.d[b]);
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_dots_avx512<const N: usize>(
        &self,
        t: usize,
        acts: &[Act],
        out: &mut [[f32; MAX_TILE]],
    ) {
        use std::arch::x86_64::*;
        let (bv, _, tbytes) = self.format.block();
        let kb = self.k / bv;
        let base = self.tiles.as_ptr().add(t * kb * tbytes);
        let mut facc = [_mm512_setzero_ps(); N];
        // SAFETY (all pointer reads): a tile-block is `tbytes` long with the layout documented at
        // the constants; activation rows are `k` bytes long with `kb` scales (q4k: and `kb` split
        // sums).
        match self.format {
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
                        let mins =
                            _mm512_cvtepi32_ps(q4k_min_dot(tb.add(q4k_min_at(LANES, 0)), split));
                        facc_hi[u] = _mm512_fnmadd_ps(mins, _mm512_mul_ps(m_hi, da), facc_hi[u]);
                    }
                    let mut lo_int = [_mm512_setzero_si512(); N];
                    let mut hi_int = [_mm512_setzero_si512(); N];
                    for s in 0..8 {
                        // Two chains per sum for 1–2 rows: one chain of 8 dependent `vpdpbusd`
                        // holds back the loads behind it.
                        let chains = if N <= 2 { 2 } else { 1 };
                        let mut full = [[_mm512_setzero_si512(); 2]; N];
                        let mut high = [[_mm512_setzero_si512(); 2]; N];
                        for p in 0..8 {
                            let w = _mm512_loadu_si512(
                                tb.add(Q4K_NIBBLES + (s * 8 + p) * 64) as *const _
                            );
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
                            tb.add(q4k_scale_at(0, s)) as *const __m128i,
                        ));
                        let sc_hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                            tb.add(q4k_scale_at(LANES, s)) as *const __m128i,
                        ));
                        for u in 0..N {
                            let lo = _mm512_sub_epi32(full[u], high[u]);
                            lo_int[u] = _mm512_add_epi32(lo_int[u], _mm512_mullo_epi32(lo, sc_lo));
                            // Still 16× the sum: divided once per block, exactly.
                            hi_int[u] =
                                _mm512_add_epi32(hi_int[u], _mm512_mullo_epi32(high[u], sc_hi));
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
}

/// `Σ_s m[r][s]·Σa_s` for 16 rows of a q4k tile-block whose mins start at `mins` (see
/// [`q4k_min_at`]), exact: two `vpdpbusd` for each byte of the split sums (see
/// [`Act::min_sums`]). |result| ≤ 8·63·4064.
#[cfg(target_arch = "x86_64")]
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

/// The `[m, n]` output of a tiled matmul `y = x·Wᵀ + b`, shared by the threads that compute it:
/// each writes only the columns of its own tiles (here and in [`super::dense16`]).
#[derive(Clone, Copy)]
pub(crate) struct TileOut<'a> {
    ptr: *mut f32,
    n: usize,
    bias: Option<&'a [f32]>,
}
// SAFETY: writes go through `store`, whose callers keep their column ranges disjoint.
unsafe impl Send for TileOut<'_> {}
unsafe impl Sync for TileOut<'_> {}

impl<'a> TileOut<'a> {
    /// Checks the shapes of `x` (`m` rows of `k`), `out` and `bias` for an `[n, k]` weight.
    pub(crate) fn new(
        out: &'a mut [f32],
        x: &[f32],
        (m, n, k): (usize, usize, usize),
        bias: Option<&'a [f32]>,
    ) -> Self {
        assert_eq!(x.len(), m * k, "activation shape");
        assert_eq!(out.len(), m * n, "output shape");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "bias shape");
        }
        Self {
            ptr: out.as_mut_ptr(),
            n,
            bias,
        }
    }

    /// Writes `dots` (row `i`, columns `j0..j0 + dots.len()`), adding the bias as it stores
    /// (a separate broadcast add is another pass over the output, on one thread).
    ///
    /// # Safety
    /// `i` and the columns must lie inside the output, and no other thread may write them.
    pub(crate) unsafe fn store(self, i: usize, j0: usize, dots: &mut [f32]) {
        let cols = dots.len();
        if let Some(b) = self.bias {
            for (v, b) in dots.iter_mut().zip(&b[j0..j0 + cols]) {
                *v += b;
            }
        }
        std::ptr::copy_nonoverlapping(dots.as_ptr(), self.ptr.add(i * self.n + j0), cols);
    }
}

/// Which dot-product code runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static HAS: OnceLock<bool> = OnceLock::new();
            let has = *HAS.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            });
            if has {
                return Kernel::Avx512Vnni;
            }
        }
        Kernel::Portable
    }
}

/// One activation row quantized to int8 for a weight format.
struct Act {
    /// The signed values.
    q: Vec<u8>,
    /// Per-block scale (q4k: per 256 values; q8_0: per 32).
    d: Vec<f32>,
    /// q8_0: `Σa` per block (the +128 offset of the weights adds `128·Σa`). q4k: `Σa` per 32-value
    /// sub-block (the portable kernel applies the mins to it).
    sums: Vec<i32>,
    /// q4k: per block, the 8 sub-block sums split as `Σa = 64·h + l` (`h` signed, `0 ≤ l < 64`)
    /// into bytes `[h0..h3], [h4..h7], [l0..l3], [l4..l7]`: `vpdpbusd` multiplies unsigned mins by
    /// signed bytes, and `|Σa| ≤ 32·127` does not fit one.
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
    // Round to nearest by the 1.5·2²³ trick (|v·id| ≤ 127): `f32::round` is a libm call on
    // baseline x86-64 and was 1/4 of the quantization time.
    const MAGIC: f32 = 12_582_912.0;
    for (q, v) in q.iter_mut().zip(x) {
        *q = ((v * id + MAGIC) - MAGIC) as i8;
    }
    amax / 127.0
}

impl Act {
    fn new(format: Format, x: &[f32]) -> Self {
        let k = x.len();
        let (bv, _, _) = format.block();
        let mut q = vec![0u8; k];
        let mut d = Vec::with_capacity(k / bv);
        let mut sums = Vec::new();
        let mut min_sums = Vec::new();
        let simd = Kernel::best() != Kernel::Portable;
        let mut sub = [0i32; QK_K / 32];
        for (xb, qb) in x.chunks_exact(bv).zip(q.chunks_exact_mut(bv)) {
            let sub = &mut sub[..bv / 32];
            let db = if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Kernel::Avx512Vnni` is only chosen after AVX-512 was detected.
                unsafe {
                    quantize_block_avx512(xb, qb, sub)
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!()
            } else {
                quantize_block_sums(xb, qb, sub)
            };
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

/// [`quantize_block_sums`] 16 lanes at a time, with the same results: `vcvtps2dq` rounds to
/// nearest even like the scalar trick. Blocks holding NaN or ±∞ take the scalar path.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [u8], sums: &mut [i32]) -> f32 {
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
        return quantize_block_sums(x, q, sums);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn weight(format: Format, n: usize, k: usize, seed: u64) -> (CpuQWeight, Vec<u8>, Vec<f32>) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        // A seed-dependent offset so the weights differ between calls (q4k mins are then used).
        let w = (w + seed as f64 * 1e-2).unwrap();
        let q = QTensor::quantize(&w, format.ggml()).unwrap();
        let ggml = q.data().unwrap().into_owned();
        let qw = CpuQWeight::from_ggml(format, n, k, &ggml).unwrap();
        let deq = q
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (qw, ggml, deq)
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

    /// Both kernels against an f32 product with the dequantized weights: the only difference left
    /// is the int8 rounding of the activations (≤ 1/254 of each block's largest value).
    #[test]
    fn kernels_match_the_dequantized_product() {
        let dev = Device::Cpu;
        for format in [Format::Q4K, Format::Q8_0] {
            for (m, k, n) in [
                (1, 512, 37),
                (2, 512, 40),
                (7, 768, 48),
                (70, 256, 300),
                (5, 1792, 16),
            ] {
                let (qw, _, deq) = weight(format, n, k, m as u64);
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &dev)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut reference = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        reference[i * n + j] = x[i * k..(i + 1) * k]
                            .iter()
                            .zip(&deq[j * k..(j + 1) * k])
                            .map(|(a, b)| a * b)
                            .sum();
                    }
                }
                let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
                let mut portable = vec![0f32; m * n];
                qw.matmul_with(&x, m, &mut portable, None, Kernel::Portable);
                let err = portable
                    .iter()
                    .zip(&reference)
                    .fold(0f32, |a, (p, r)| a.max((p - r).abs()));
                assert!(
                    err < 0.02 * scale,
                    "{format:?} {m}x{k}x{n}: max error {err} vs scale {scale}"
                );
                let mut best = vec![0f32; m * n];
                qw.matmul(&x, m, &mut best);
                // The fused bias is the plain sum.
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 3.0).collect();
                let mut biased = vec![0f32; m * n];
                qw.matmul_bias(&x, m, &mut biased, Some(&bias));
                for (i, (b, p)) in biased.iter().zip(&best).enumerate() {
                    assert_eq!(*b, p + bias[i % n], "{format:?} {m}x{k}x{n} bias at {i}");
                }
                // Same integer sums; only the float summation order differs.
                for (b, p) in best.iter().zip(&portable) {
                    assert!(
                        (b - p).abs() <= 1e-4 * scale,
                        "{format:?} {m}x{k}x{n}: {:?} kernel {b} vs portable {p}",
                        Kernel::best()
                    );
                }
            }
        }
    }

    /// The largest sums the q4k kernel's integer accumulators can meet: every nibble 15, every
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
            for kernel in [Kernel::Portable, Kernel::best()] {
                let mut out = vec![0f32; 2 * n];
                qw.matmul_with(&x.repeat(2), 2, &mut out, None, kernel);
                for v in out {
                    assert!(
                        ((v as f64 - want) / want).abs() < 1e-5,
                        "{kernel:?} flip {flip}: {v} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_and_non_finite_activation_blocks() {
        for format in [Format::Q4K, Format::Q8_0] {
            let (qw, _, _) = weight(format, 16, 256, 1);
            let mut out = vec![1f32; 16];
            qw.matmul(&[0f32; 256], 1, &mut out);
            assert!(out.iter().all(|v| *v == 0.0), "{format:?} {out:?}");
            let mut x = [0.5f32; 256];
            x[3] = f32::NAN;
            qw.matmul(&x, 1, &mut out);
            assert!(
                out.iter().all(|v| v.is_nan()),
                "{format:?}: a NaN must not vanish: {out:?}"
            );
        }
    }

    /// The AVX-512 activation quantizer gives the scalar one's bytes, scales and sums, ties and
    /// non-finite blocks included.
    #[test]
    fn vector_activation_quantization_is_the_scalar_one() {
        if Kernel::best() == Kernel::Portable {
            eprintln!("skipped: no AVX-512 VNNI");
            return;
        }
        let dev = Device::Cpu;
        for (bv, seed) in [(32usize, 0u64), (256, 1), (32, 2), (256, 3)] {
            let mut x: Vec<f32> = Tensor::randn(0f32, 1.0 + seed as f32, (64 * bv,), &dev)
                .unwrap()
                .to_vec1()
                .unwrap();
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
                #[cfg(target_arch = "x86_64")]
                let db = unsafe { quantize_block_avx512(xb, &mut qb, &mut sb) };
                #[cfg(not(target_arch = "x86_64"))]
                let db = quantize_block_sums(xb, &mut qb, &mut sb);
                assert_eq!(da.to_bits(), db.to_bits());
                assert_eq!((qa, sa), (qb, sb));
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
}

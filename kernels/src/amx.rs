//! The AMX level's compute-bound matmuls: Intel AMX tiles (`tdpbf16ps`) multiplying bf16
//! activations by weights widened to bf16, with f32 accumulation.
//!
//! Why bf16 tiles for the quantized weights too: one `tdpbf16ps` does 16×16×32 multiply-adds
//! (8192, in 16 cycles), and its f32 accumulators stay in the tiles for the whole inner dimension.
//! The int8 `tdpbssd` is twice as fast, but q8_0 and q4k change scale every 32 inputs for each
//! weight row, so its int32 results would have to leave the tiles every 32 inputs to be scaled
//! and summed by AVX-512: that epilogue runs at the tiles' own speed and halves it. Widening a
//! band of weights to bf16 once per matmul costs a few instructions per weight against the
//! hundreds of multiply-adds (one per activation row) each weight then takes part in.
//!
//! Numerics: activations are rounded to bf16 (round to nearest even: relative error ≤ 2⁻⁹ per
//! value, where the other levels' int8 blocks err by up to 1/254 of the block's largest value);
//! each weight is its exact value (`d·q`, `d·sc·q − dmin·m`) rounded once to bf16. Products are
//! exact in f32 and summed in f32. Dense 16-bit weights stay on the f32-activation kernels
//! ([`crate::dense16`]): their promise is logits within 1e-3 of f32, which bf16 activations break.
//!
//! The tiles are used through inline assembly (`asm!`): the AMX intrinsics are not stable Rust.
//! Linux lends tile state to a process only when it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`request_tiles`] asks once, and the AMX level exists only where it was granted.

use rayon::prelude::*;
use std::cell::RefCell;

use crate::tile::{pair, TileOut};

/// Weight rows per panel (two 16-column B tiles).
pub(crate) const PANEL: usize = 32;
/// Inputs per tile step (32 bf16 = 64 bytes a tile row).
pub(crate) const STEP: usize = 32;
/// u32 pairs in one panel step: 2 tiles × 16 pair rows × 16 columns.
pub(crate) const STEP_PAIRS: usize = 512;
/// Activation rows below which the other kernels stay faster (the panels would be packed for
/// few multiply-adds each).
pub const MIN_ROWS: usize = 32;
/// Activation rows per block (two 16-row A tiles).
const BLOCK: usize = 32;
/// Tile steps per pass over one A block: 32 rows × 256 inputs of bf16 (16 KB) stay in L1 while
/// every panel of the band takes them.
const STEPS_PER_PASS: usize = 8;
/// Panel bytes a band may take: its panels stay in L2 (2 MB a core on Sapphire Rapids) while
/// every activation block passes.
const BAND_BYTES: usize = 1 << 20;

/// Asks Linux for the AMX tile state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`) for this
/// process; false where it is refused (an old kernel, a sandbox) or not Linux.
pub(crate) fn request_tiles() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes the process's permitted XSAVE
        // features; it reads and writes no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// A weight the AMX matmul can take: it widens any 32 of its rows into a bf16 panel.
pub(crate) trait Panels: Sync {
    /// `(n, k)`.
    fn dims(&self) -> (usize, usize);
    /// Writes tile steps `s0..s0 + ns` of rows `j0..j0 + 32` (zero past `n`): step `s0 + s`,
    /// tile `t` (rows `j0 + 16t..`), pair row `p`, column `c` at `s·512 + t·256 + p·16 + c` holds
    /// inputs `32(s0 + s) + 2p` and `+ 1` of row `j0 + 16t + c` (zero past `k`).
    ///
    /// # Safety
    /// Runs at the AMX level (AVX-512 code inside); `panel` holds `ns · 512` lanes.
    unsafe fn pack(&self, j0: usize, s0: usize, ns: usize, panel: &mut [u32]);
}

/// Tile steps of an inner dimension `k`.
pub(crate) fn steps(k: usize) -> usize {
    k.div_ceil(STEP)
}

/// The tile configuration: palette 1, every tile 16 rows × 64 bytes (C: 16×16 f32; A: 16 rows ×
/// 32 bf16; B: 16 pair rows × 16 columns).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Loads [`CONFIG`] into this thread's tiles for the life of the guard, released at its end (a
/// thread holding tile state makes every context switch save 8 KB more).
struct Tiles;

impl Tiles {
    /// # Safety
    /// The process holds the tile permission ([`request_tiles`]) and the CPU has AMX.
    unsafe fn load() -> Self {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) &CONFIG, options(nostack, readonly));
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `load`.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `c[32×32] += a · b` over `steps` tile steps on the tiles. `a` is one activation block in
/// steps of 2 KB (32 rows × 32 bf16, row-major); `b` is panel steps ([`Panels::pack`]); `c` is
/// f32, 32 rows of 32 (tiles C00, C01 / C10, C11), loaded and stored back.
///
/// # Safety
/// Tiles configured ([`Tiles::load`]); `a` and `b` cover `steps ≥ 1` steps, aligned to 64 bytes.
#[inline]
unsafe fn block(a: *const u16, b: *const u32, c: *mut f32, steps: usize) {
    std::arch::asm!(
        "tileloadd tmm0, [{c} + {cs}*1]",
        "tileloadd tmm1, [{c} + {cs}*1 + 64]",
        "tileloadd tmm2, [{c} + {cs}*1 + 2048]",
        "tileloadd tmm3, [{c} + {cs}*1 + 2112]",
        // Software-pipelined: the next step's loads go between this step's products, as soon
        // as the tile they overwrite has been read (tiles are not renamed).
        "tileloadd tmm4, [{a} + {s64}*1]",
        "tileloadd tmm6, [{b} + {s64}*1]",
        "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
        "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
        "dec {n}",
        "jz 3f",
        "2:",
        "add {a}, 2048",
        "add {b}, 2048",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm4, [{a} + {s64}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tileloadd tmm6, [{b} + {s64}*1]",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
        "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
        "dec {n}",
        "jnz 2b",
        "3:",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "tilestored [{c} + {cs}*1], tmm0",
        "tilestored [{c} + {cs}*1 + 64], tmm1",
        "tilestored [{c} + {cs}*1 + 2048], tmm2",
        "tilestored [{c} + {cs}*1 + 2112], tmm3",
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        n = inout(reg) steps => _,
        c = in(reg) c,
        cs = in(reg) 128usize,
        s64 = in(reg) 64usize,
        options(nostack),
    );
}

/// One cache line. Tile rows must not straddle lines: an unaligned `tileloadd` was measured 7×
/// slower (16.7 ns against 2.4 ns for 1 KB from L1).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A buffer of whole cache lines, seen as `T`s.
struct Lines(Vec<Line>);

impl Default for Lines {
    fn default() -> Self {
        Lines::new()
    }
}

/// This thread's buffer kept in `cell`, taken out for one call and handed back with [`keep`]. A
/// call nested on the same thread (a rayon task stolen while the first waits) finds it taken and
/// starts from an empty one.
pub(crate) fn take_kept<T: Default>(cell: &'static std::thread::LocalKey<RefCell<T>>) -> T {
    cell.with(|c| {
        c.try_borrow_mut()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    })
}

/// Hands a buffer back to this thread's `cell` for the next call ([`take_kept`]).
pub(crate) fn keep<T>(cell: &'static std::thread::LocalKey<RefCell<T>>, buf: T) {
    cell.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            *c = buf;
        }
    });
}

impl Lines {
    const fn new() -> Self {
        Lines(Vec::new())
    }

    /// `len` T's (u16, u32, f32) over at least that many bytes of lines; grown lines are zero,
    /// kept ones hold what the last user wrote (callers overwrite what they read).
    fn slice_mut<T: Copy>(&mut self, len: usize) -> &mut [T] {
        let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; 16]));
        }
        // SAFETY: the lines hold at least `len` T's of plain bits, aligned to 64.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), len) }
    }
}

thread_local! {
    /// Each thread's panels and accumulators, kept between calls.
    static SCRATCH: RefCell<(Lines, Lines, Lines)> =
        const { RefCell::new((Lines::new(), Lines::new(), Lines::new())) };
}

thread_local! {
    /// The calling thread's bf16 activations, kept between calls: a fresh buffer of megabytes
    /// costs a page fault per 4 KB, about as long as converting into it.
    static ACTIVATIONS: RefCell<Lines> = const { RefCell::new(Lines::new()) };
}

/// Writes the activations as bf16 into `a`, in blocks of 32 rows, each block in steps of 2 KB
/// (32 rows × 32 inputs, row-major), so that every tile load reads 1 KB in a row (rows `k` apart
/// would fall into the same few L1 sets for `k` a multiple of 2048). Rows past `m`, inputs past
/// `k`: zero. Rounded to nearest even by `vcvtne2ps2bf16`, which also flushes f32 subnormals.
unsafe fn activations(x: &[f32], m: usize, k: usize, a: &mut [u16]) {
    let st = steps(k);
    a.par_chunks_mut(st * BLOCK * STEP)
        .enumerate()
        // SAFETY: the AMX level has AVX-512 BF16.
        .for_each(|(mb, blk)| unsafe { activation_block(x, m, k, mb, blk) });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn activation_block(x: &[f32], m: usize, k: usize, mb: usize, blk: &mut [u16]) {
    use std::arch::x86_64::*;
    let st = steps(k);
    for r in 0..BLOCK {
        let i = mb * BLOCK + r;
        for s in 0..st {
            let o = blk.as_mut_ptr().add((s * BLOCK + r) * STEP);
            if i >= m {
                _mm512_storeu_si512(o.cast(), _mm512_setzero_si512());
                continue;
            }
            let left = k - s * STEP;
            let mask = |from: usize| -> __mmask16 {
                let n = left.saturating_sub(from).min(16);
                ((1u32 << n) - 1) as __mmask16
            };
            let src = x.as_ptr().add(i * k + s * STEP);
            let lo = _mm512_maskz_loadu_ps(mask(0), src);
            let hi = _mm512_maskz_loadu_ps(mask(16), src.add(16.min(left)));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(o.cast(), v);
        }
    }
}

/// Panels per band of columns (a band's activation reads are shared by its panels), and tile
/// steps per chunk of the inner dimension (a chunk's panels stay in L2).
const BAND_PANELS: usize = 4;
const CHUNK_STEPS: usize = BAND_BYTES / (BAND_PANELS * STEP_PAIRS * 4);

/// `out = x · wᵀ (+ bias)` on the tiles, for `m ≥ 1` rows of `x` (`[m, k]`).
///
/// Each task takes a band of up to 4 panels (128 weight rows) and walks the inner dimension in
/// chunks whose panels stay in L2 (1 MB); every activation block passes each chunk with its
/// accumulators in L1 (parked in L2 between chunks). The activations are read once per band.
///
/// # Safety
/// The AMX level is supported ([`crate::cpu::Level::Amx`]).
pub(crate) unsafe fn matmul(w: &impl Panels, x: &[f32], m: usize, out: TileOut) {
    let (n, k) = w.dims();
    let st = steps(k);
    let m_blocks = m.div_ceil(BLOCK);
    let len = m_blocks * st * BLOCK * STEP;
    let mut lines = take_kept(&ACTIVATIONS);
    let a: &mut [u16] = lines.slice_mut(len);
    activations(x, m, k, a);
    let a: &[u16] = a;
    let n_panels = n.div_ceil(PANEL);
    // Bands even out over the threads: the fewest panels on the busiest thread, then the widest.
    let threads = rayon::current_num_threads().max(1);
    let busiest = |pb: usize| n_panels.div_ceil(pb).div_ceil(threads) * pb;
    let per_band = (1..=BAND_PANELS)
        .rev()
        .min_by_key(|&pb| busiest(pb))
        .unwrap_or(1);
    (0..n_panels)
        .into_par_iter()
        .step_by(per_band)
        .for_each(|p0| {
            let np = per_band.min(n_panels - p0);
            SCRATCH.with(|s| {
                let (panels, acc, local) = &mut *s.borrow_mut();
                let chunk = CHUNK_STEPS.min(st);
                let panels: &mut [u32] = panels.slice_mut(np * chunk * STEP_PAIRS);
                // One activation block's accumulators stay in L1 while it passes a chunk; between
                // chunks (long inner dimensions only) they wait in `acc`, in L2.
                let local: &mut [f32] = local.slice_mut(np * BLOCK * PANEL);
                let acc: &mut [f32] = acc.slice_mut(if chunk < st {
                    m_blocks * np * BLOCK * PANEL
                } else {
                    0
                });
                let (j0, cols) = (p0 * PANEL, (np * PANEL).min(n - p0 * PANEL));
                for s0 in (0..st).step_by(chunk) {
                    let ns = chunk.min(st - s0);
                    for i in 0..np {
                        w.pack(
                            (p0 + i) * PANEL,
                            s0,
                            ns,
                            &mut panels[i * ns * STEP_PAIRS..(i + 1) * ns * STEP_PAIRS],
                        );
                    }
                    let _tiles = Tiles::load();
                    for mb in 0..m_blocks {
                        let at = (mb * np * BLOCK * PANEL).min(acc.len());
                        let len = if chunk < st { np * BLOCK * PANEL } else { 0 };
                        let saved = &mut acc[at..at + len];
                        if s0 == 0 {
                            local.fill(0.0);
                        } else {
                            local.copy_from_slice(saved);
                        }
                        let a_block = a.as_ptr().add((mb * st + s0) * BLOCK * STEP);
                        for p in (0..ns).step_by(STEPS_PER_PASS) {
                            let pass = STEPS_PER_PASS.min(ns - p);
                            for i in 0..np {
                                block(
                                    a_block.add(p * BLOCK * STEP),
                                    panels.as_ptr().add((i * ns + p) * STEP_PAIRS),
                                    local.as_mut_ptr().add(i * BLOCK * PANEL),
                                    pass,
                                );
                            }
                        }
                        if s0 + ns < st {
                            saved.copy_from_slice(local);
                            continue;
                        }
                        for r in 0..BLOCK.min(m - mb * BLOCK) {
                            for p in 0..np {
                                let c0 = p * PANEL;
                                if c0 >= cols {
                                    break;
                                }
                                let dots = &mut local[p * BLOCK * PANEL + r * PANEL..][..PANEL];
                                // SAFETY: row `mb·32 + r < m`, columns of this band's panels:
                                // this task alone writes them.
                                out.store(
                                    mb * BLOCK + r,
                                    j0 + c0,
                                    &mut dots[..PANEL.min(cols - c0)],
                                );
                            }
                        }
                    }
                }
            });
        });
    keep(&ACTIVATIONS, lines);
}

/// An f32 matrix `[n, k]` taken as weight rows (rounded to bf16 as they are packed): element
/// `(j, kk)` at `data[j·row_stride + kk·col_stride]`. The ViT attention's keys (rows = tokens)
/// and its values read as columns (rows = channels), straight out of the fused qkv projection.
pub(crate) struct F32Rows<'a> {
    pub n: usize,
    pub k: usize,
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Panels for F32Rows<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    unsafe fn pack(&self, j0: usize, s0: usize, ns: usize, panel: &mut [u32]) {
        let (n, k) = (self.n, self.k);
        let at = |j: usize, kk: usize| {
            if j < n && kk < k {
                self.data[j * self.row_stride + kk * self.col_stride]
            } else {
                0.0
            }
        };
        for (s, out) in (s0..s0 + ns).zip(panel.chunks_exact_mut(STEP_PAIRS)) {
            for p in 0..16 {
                let kk = s * STEP + 2 * p;
                for t in 0..2 {
                    for c in 0..16 {
                        let j = j0 + 16 * t + c;
                        out[t * 256 + p * 16 + c] = pair(at(j, kk), at(j, kk + 1));
                    }
                }
            }
        }
    }
}

//! qwenvl's hand-written CPU kernels, and the one place that decides which of them runs
//! ([`cpu`]): quantized (q4k, q8_0) and 16-bit (bf16, f16) matmuls and matvecs, decode attention
//! over the KV cache, the vision tower's fused attention, GELU and activation quantization.
//!
//! Each kernel exists at every [`cpu::Level`]: portable Rust (blocked, multi-threaded,
//! autovectorised; the reference the others are tested against), AVX2, AVX-512 and NEON, chosen
//! at run time. `lm` and `vision` both use this crate and stay independent of each other.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "aarch64")]
mod arm;
mod buffer;
pub mod cpu;
pub mod decode_attention;
pub mod dense16;
pub mod math;
pub mod quant;
mod tile;
pub mod vit_attention;

pub use buffer::LargeBuffer;

/// Activation rows from which the AMX level multiplies on tiles (below, it runs the AVX-512
/// kernels); `usize::MAX` where there are no tiles. Tests pick their comparisons by it.
#[cfg(test)]
pub(crate) fn amx_min_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        amx::MIN_ROWS
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        usize::MAX
    }
}

pub use cpu::Level;

/// A CPU weight the model multiplies by: quantized tiles or 16-bit tiles.
pub trait CpuMatmul: Send + Sync {
    /// `(n, k)`: output rows, inputs.
    fn dims(&self) -> (usize, usize);
    /// Bytes held, all read by one matvec.
    fn size_in_bytes(&self) -> usize;
    /// `out[i·n + j] = x[i] · w[j] (+ bias[j])` for the `m` rows of `x`, at the process's level.
    fn matmul_bias(&self, x: &[f32], m: usize, out: &mut [f32], bias: Option<&[f32]>) {
        self.matmul_at(x, m, out, bias, cpu::level())
    }
    /// [`Self::matmul_bias`] at a chosen level (tests and benches compare them).
    fn matmul_at(&self, x: &[f32], m: usize, out: &mut [f32], bias: Option<&[f32]>, level: Level);
}

impl CpuMatmul for quant::CpuQWeight {
    fn dims(&self) -> (usize, usize) {
        quant::CpuQWeight::dims(self)
    }
    fn size_in_bytes(&self) -> usize {
        quant::CpuQWeight::size_in_bytes(self)
    }
    fn matmul_at(&self, x: &[f32], m: usize, out: &mut [f32], bias: Option<&[f32]>, level: Level) {
        quant::CpuQWeight::matmul_at(self, x, m, out, bias, level)
    }
}

impl CpuMatmul for dense16::HalfWeight {
    fn dims(&self) -> (usize, usize) {
        dense16::HalfWeight::dims(self)
    }
    fn size_in_bytes(&self) -> usize {
        dense16::HalfWeight::size_in_bytes(self)
    }
    fn matmul_at(&self, x: &[f32], m: usize, out: &mut [f32], bias: Option<&[f32]>, level: Level) {
        dense16::HalfWeight::matmul_at(self, x, m, out, bias, level)
    }
}

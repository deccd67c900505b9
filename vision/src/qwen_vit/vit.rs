//! The ViT part of Qwen-VL's vision tower: pre-norm residual blocks with per-head packed
//! q/k/v attention and an exact-GELU MLP.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Builds one of the tower's linear layers (`[out, in]` weight, and a bias if asked, under `vb`):
/// dense by default ([`dense_linear`]); the app can hand in a quantizing builder so the
/// 1.9 B-parameter tower fits a laptop. Arguments: `(in_dim, out_dim, has_bias, vb)`.
pub type LinearBuilder<'a> = &'a dyn Fn(usize, usize, bool, VarBuilder) -> Result<Layer>;

/// A linear layer of any representation (dense or quantized).
#[derive(Clone)]
pub struct Layer(pub Arc<dyn Module + Send + Sync>);

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Layer")
    }
}

impl Module for Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.0.forward(xs)
    }
}

/// The default builder: a dense `candle_nn::Linear` in the VarBuilder's dtype.
pub fn dense_linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Layer> {
    Ok(Layer(Arc::new(if bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    })))
}

/// LayerNorm eps of the whole vision tower (hard-coded upstream, independent of the LM's eps).
pub const LN_EPS: f64 = 1e-6;

/// LayerNorm with weight and bias, computed in `f32` whatever the activation dtype.
///
/// The mean is subtracted first, so the variance does not suffer from cancellation when
/// activations have a large mean.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let centred = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        candle_nn::ops::layer_norm(&centred, &self.weight, &self.bias, self.eps as f32)?
            .to_dtype(dtype)
    }
}

/// Softmax over the last dimension, in `f32`.
///
/// On GPUs half-precision scores go to candle's kernel as they are: it sums in f32 already, and
/// the two conversions were a third of the vision tower's memory traffic there (16 M scores per
/// layer); its exponentials are then rounded to the scores' precision.
pub fn softmax_f32(xs: &Tensor) -> Result<Tensor> {
    if !xs.device().is_cpu() {
        return candle_nn::ops::softmax_last_dim(&xs.contiguous()?);
    }
    let dtype = xs.dtype();
    candle_nn::ops::softmax_last_dim(&xs.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(dtype)
}

/// Self-attention whose `in_proj` output is laid out per head as `[q_h | k_h | v_h]`
/// (upstream `VisualAttention`), not as `[all q | all k | all v]`.
#[derive(Debug, Clone)]
pub struct VisualAttention {
    in_proj: Layer,
    out_proj: Layer,
    num_heads: usize,
    head_dim: usize,
    /// Run the fused bf16 kernel ([`kernels::vit_attention`]).
    bf16: bool,
}

impl VisualAttention {
    pub fn new(
        width: usize,
        num_heads: usize,
        vb: VarBuilder,
        linear: LinearBuilder,
    ) -> Result<Self> {
        Ok(Self {
            in_proj: linear(width, 3 * width, true, vb.pp("in_proj"))?,
            out_proj: linear(width, width, true, vb.pp("out_proj"))?,
            num_heads,
            head_dim: width / num_heads,
            bf16: false,
        })
    }

    /// Computes the attention itself with bf16 products ([`kernels::vit_attention`], at every
    /// CPU level) when the activations are f32 on the CPU; otherwise this changes nothing.
    pub fn set_bf16_attention(&mut self, on: bool) {
        self.bf16 = on;
    }

    fn fused_applies(&self, xs: &Tensor) -> bool {
        self.bf16
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.head_dim.is_multiple_of(2)
    }
}

impl Module for VisualAttention {
    /// `xs`: `[B, N, W]` → `[B, N, W]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, w) = xs.dims3()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        if self.fused_applies(xs) {
            let qkv = self.in_proj.forward(xs)?.contiguous()?;
            let mut ctx = vec![0f32; b * n * w];
            with_cpu_f32(&qkv, |qkv| {
                for (qkv, ctx) in qkv.chunks_exact(n * 3 * w).zip(ctx.chunks_exact_mut(n * w)) {
                    kernels::vit_attention::attention(qkv, n, h, hd, ctx);
                }
            })?;
            return self
                .out_proj
                .forward(&Tensor::from_vec(ctx, (b, n, w), xs.device())?);
        }
        let qkv = self.in_proj.forward(xs)?.reshape((b, n, h, 3 * hd))?;
        let part = |i: usize| qkv.narrow(3, i * hd, hd)?.transpose(1, 2)?.contiguous();
        // Upstream divides q by sqrt(head_dim) before the product.
        let q = part(0)?.affine(1.0 / (hd as f64).sqrt(), 0.0)?;
        let k = part(1)?;
        let v = part(2)?;
        let probs = softmax_f32(&q.matmul(&k.t()?)?)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w))?;
        self.out_proj.forward(&ctx)
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, without copying them.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor")
    };
    Ok(f(&cpu.as_slice::<f32>()?[start..end]))
}

/// `c_fc` → exact (erf) GELU → `c_proj`.
#[derive(Debug, Clone)]
pub struct Mlp {
    c_fc: Layer,
    c_proj: Layer,
}

impl Mlp {
    pub fn new(width: usize, hidden: usize, vb: VarBuilder, linear: LinearBuilder) -> Result<Self> {
        Ok(Self {
            c_fc: linear(width, hidden, true, vb.pp("c_fc"))?,
            c_proj: linear(hidden, width, true, vb.pp("c_proj"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // `c_fc`'s output is a fresh tensor no one else holds, so GELU can overwrite it.
        self.c_proj.forward(&gelu_erf(self.c_fc.forward(xs)?)?)
    }
}

/// Exact (erf) GELU, in place on the fresh output of `c_fc`, on every core: candle's `gelu_erf`
/// runs on one thread, and the MLP applies it to 1024 × 8192 values per layer
/// ([`kernels::math::gelu_erf_in_place`], vectorised at every CPU level).
fn gelu_erf(xs: Tensor) -> Result<Tensor> {
    if !xs.device().is_cpu() || xs.dtype() != DType::F32 || !xs.is_contiguous() {
        return xs.gelu_erf();
    }
    xs.inplace_op1(&GeluInPlace)?;
    Ok(xs)
}

struct GeluInPlace;

impl candle_core::InplaceOp1 for GeluInPlace {
    fn name(&self) -> &'static str {
        "gelu-erf-in-place"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu: expected f32")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu: expected a contiguous tensor")
        };
        kernels::math::gelu_erf_in_place(&mut data[start..end]);
        Ok(())
    }
}

/// One pre-norm block: `x += attn(ln_1(x))`, `x += mlp(ln_2(x))`.
#[derive(Debug, Clone)]
pub struct ResidualAttentionBlock {
    ln_1: LayerNorm,
    attn: VisualAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl ResidualAttentionBlock {
    pub fn new(
        width: usize,
        heads: usize,
        mlp_width: usize,
        vb: VarBuilder,
        linear: LinearBuilder,
    ) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::new(width, LN_EPS, vb.pp("ln_1"))?,
            attn: VisualAttention::new(width, heads, vb.pp("attn"), linear)?,
            ln_2: LayerNorm::new(width, LN_EPS, vb.pp("ln_2"))?,
            mlp: Mlp::new(width, mlp_width, vb.pp("mlp"), linear)?,
        })
    }
}

impl ResidualAttentionBlock {
    /// See [`VisualAttention::set_bf16_attention`].
    pub fn set_bf16_attention(&mut self, on: bool) {
        self.attn.set_bf16_attention(on);
    }
}

impl Module for ResidualAttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.ln_1.forward(xs)?)?)?;
        &xs + self.mlp.forward(&self.ln_2.forward(&xs)?)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place GELU (at this process's CPU level) against candle's scalar erf form, over the
    /// range activations take.
    #[test]
    fn vector_gelu_matches_the_scalar_one() {
        let xs: Vec<f32> = (-12_000..12_000).map(|i| i as f32 * 1e-3 + 1e-4).collect();
        let scalar: Vec<f32> = xs
            .iter()
            .map(|&x| {
                (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
                    * 0.5
                    * x
            })
            .collect();
        let t = Tensor::new(xs.as_slice(), &candle_core::Device::Cpu).unwrap();
        let fast: Vec<f32> = gelu_erf(t).unwrap().to_vec1().unwrap();
        for ((x, f), s) in xs.iter().zip(&fast).zip(&scalar) {
            // erf's 1.5e-7 approximation error plus a few f32 roundings, scaled by x/2, plus the
            // rounding of the result.
            assert!(
                (f - s).abs() <= 2e-7 * x.abs() + 4e-7,
                "gelu({x}): {f} vs {s}"
            );
        }
        assert!(
            gelu_erf(Tensor::new(&[f32::NAN], &candle_core::Device::Cpu).unwrap())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0]
                .is_nan()
        );
    }
}

//! The resampler (`attn_pool`): one cross-attention layer from 256 learned queries to the ViT's
//! patch features, upstream `Resampler` on top of `torch.nn.MultiheadAttention`.
//!
//! Queries get the stored 16x16 sin-cos table, keys get that table bicubically resized to the
//! patch grid, values get no position term.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Module, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::vit::{softmax_f32, Layer, LayerNorm, LinearBuilder, LN_EPS};

/// One of the `[q; k; v]` thirds of a packed `in_proj_weight`/`in_proj_bias`, served as an
/// ordinary `weight`/`bias` pair so the layer can be built (and quantized) like any other. The
/// packed tensors are read only when asked for (a quantized-cache hit never reads them), and
/// then once for all three thirds.
struct PackedThird<'a> {
    vb: VarBuilder<'a>,
    packed: Arc<Packed>,
    part: usize,
    dim: usize,
}

/// The packed tensors, shared by the three thirds once read.
#[derive(Default)]
struct Packed {
    weight: OnceLock<Tensor>,
    bias: OnceLock<Tensor>,
}

impl PackedThird<'_> {
    fn packed(&self, slot: &OnceLock<Tensor>, shape: Shape, name: &str) -> Result<Tensor> {
        if let Some(t) = slot.get() {
            return Ok(t.clone());
        }
        let t = self.vb.get(shape, name)?;
        Ok(slot.get_or_init(|| t).clone())
    }
}

impl SimpleBackend for PackedThird<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        _: &Device,
    ) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, self.vb.device())?;
        if t.shape() != &s {
            candle_core::bail!("{name}: shape {:?}, expected {s:?}", t.shape());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> Result<Tensor> {
        let e = self.dim;
        let t = if name.ends_with(".weight") {
            self.packed(&self.packed.weight, (3 * e, e).into(), "in_proj_weight")?
        } else if name.ends_with(".bias") {
            self.packed(&self.packed.bias, (3 * e).into(), "in_proj_bias")?
        } else {
            candle_core::bail!("{name}: not part of a packed projection")
        };
        t.narrow(0, self.part * e, e)?.contiguous()?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        name.ends_with(".weight") || name.ends_with(".bias")
    }
}

/// Width of one resampler head (`num_heads = embed_dim / 128` upstream).
pub const RESAMPLER_HEAD_DIM: usize = 128;

/// `torch.nn.MultiheadAttention` with packed `in_proj_weight` rows `[q; k; v]`, no mask.
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    q_proj: Layer,
    k_proj: Layer,
    v_proj: Layer,
    out_proj: Layer,
    num_heads: usize,
    head_dim: usize,
}

impl MultiheadAttention {
    pub fn new(
        embed_dim: usize,
        num_heads: usize,
        vb: VarBuilder,
        linear: LinearBuilder,
    ) -> Result<Self> {
        let packed = Arc::new(Packed::default());
        let part = |i: usize| -> Result<Layer> {
            // Named `<prefix>.in_proj_q` etc., which is also the quantized cache's key.
            let name = format!("{}.in_proj_{}", vb.prefix(), ["q", "k", "v"][i]);
            let third = PackedThird {
                vb: vb.clone(),
                packed: packed.clone(),
                part: i,
                dim: embed_dim,
            };
            let tvb = VarBuilder::from_backend(Box::new(third), vb.dtype(), vb.device().clone());
            linear(embed_dim, embed_dim, true, tvb.pp(name))
        };
        let out_proj = linear(embed_dim, embed_dim, true, vb.pp("out_proj"))?;
        Ok(Self {
            q_proj: part(0)?,
            k_proj: part(1)?,
            v_proj: part(2)?,
            out_proj,
            num_heads,
            head_dim: embed_dim / num_heads,
        })
    }

    /// `query`: `[Q, E]` (shared by the batch); `key`, `value`: `[B, N, E]` → `[B, Q, E]`.
    pub fn forward(&self, query: &Tensor, key: &Tensor, value: &Tensor) -> Result<Tensor> {
        let (b, n, e) = key.dims3()?;
        let nq = query.dim(0)?;
        let (h, hd) = (self.num_heads, self.head_dim);
        // torch scales q by sqrt(1 / head_dim) before q·kᵀ.
        let q = self
            .q_proj
            .forward(query)?
            .reshape((nq, h, hd))?
            .transpose(0, 1)?
            .affine((1.0 / hd as f64).sqrt(), 0.0)?
            .unsqueeze(0)?
            .broadcast_as((b, h, nq, hd))?
            .contiguous()?;
        let heads = |t: Tensor| t.reshape((b, n, h, hd))?.transpose(1, 2)?.contiguous();
        let k = heads(self.k_proj.forward(key)?)?;
        let v = heads(self.v_proj.forward(value)?)?;
        let probs = softmax_f32(&q.matmul(&k.t()?)?)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, nq, e))?;
        self.out_proj.forward(&ctx)
    }
}

/// Upstream `Resampler`.
#[derive(Debug, Clone)]
pub struct Resampler {
    /// `None` when the ViT width already equals the embed dim (upstream uses `nn.Identity`).
    kv_proj: Option<Layer>,
    ln_kv: LayerNorm,
    ln_q: LayerNorm,
    query: Tensor,
    pos_embed: Tensor,
    attn: MultiheadAttention,
}

impl Resampler {
    pub fn new(
        n_queries: usize,
        embed_dim: usize,
        kv_dim: usize,
        vb: VarBuilder,
        linear: LinearBuilder,
    ) -> Result<Self> {
        let kv_proj = if kv_dim != embed_dim {
            Some(linear(kv_dim, embed_dim, false, vb.pp("kv_proj"))?)
        } else {
            None
        };
        let num_heads = (embed_dim / RESAMPLER_HEAD_DIM).max(1);
        Ok(Self {
            kv_proj,
            ln_kv: LayerNorm::new(embed_dim, LN_EPS, vb.pp("ln_kv"))?,
            ln_q: LayerNorm::new(embed_dim, LN_EPS, vb.pp("ln_q"))?,
            query: vb.get((n_queries, embed_dim), "query")?,
            pos_embed: vb.get((n_queries, embed_dim), "pos_embed")?,
            attn: MultiheadAttention::new(embed_dim, num_heads, vb.pp("attn"), linear)?,
        })
    }

    /// The stored (bf16-rounded upstream) `[n_queries, E]` sin-cos table.
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// `xs`: ViT output `[B, N, W]`; `key_pos`: `pos_embed` resized to the patch grid, `[N, E]`.
    pub fn forward(&self, xs: &Tensor, key_pos: &Tensor) -> Result<Tensor> {
        let kv = match &self.kv_proj {
            Some(p) => p.forward(xs)?,
            None => xs.clone(),
        };
        let kv = self.ln_kv.forward(&kv)?;
        let q = (self.ln_q.forward(&self.query)? + &self.pos_embed)?;
        let k = kv.broadcast_add(key_pos)?;
        self.attn.forward(&q, &k, &kv)
    }
}

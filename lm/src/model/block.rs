//! One transformer block: RMSNorm, attention (fused `c_attn`, rotary, log-n, chunked scores or
//! the fused CPU decode kernel) and the SwiGLU MLP.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::QwenConfig;
use crate::decode_attention;
use crate::quant::{with_cpu_f32, with_cpu_slice, QLinear, Quantizer};
use half::f16;

use super::cache::LayerKv;
use super::rope::Positions;

/// Queries per attention chunk: bounds the score matrix to `heads × CHUNK × kv_len` floats, so a
/// 6000-token prefill of the 32-head model does not need gigabytes of scores.
pub(super) const ATTN_CHUNK: usize = 512;

/// One sequence's share of a (batched) forward pass through a block: its positions (as many as
/// it has rows in the batch, which are consecutive) and its cache of this layer.
pub(super) struct Part<'a> {
    pub(super) pos: &'a Positions,
    pub(super) cache: &'a mut Option<LayerKv>,
}

#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    pub(super) fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's fused kernel: one pass instead of eight ops (on a GPU, eight launches). In f32
        // it is the reference's arithmetic; in half precision it rounds once, after the weight,
        // where the reference rounds before it too (≤ 1 ulp apart): taken on GPUs, where launches
        // dominate decoding.
        if x.dtype() == self.weight.dtype() && (x.dtype() == DType::F32 || !x.device().is_cpu()) {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        // The reference normalises in f32 and casts back before scaling by the weight.
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(ms + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) c_attn: QLinear,
    pub(super) c_proj: QLinear,
    /// What the KV cache holds: f16 behind quantized or 16-bit weights on CPUs that run the fused
    /// decode attention (the cache is read whole for every decoded token; f16 halves that
    /// traffic, and its rounding is no coarser than the weights'), else the compute dtype.
    pub(super) kv_dtype: DType,
    pub(super) n_heads: usize,
    pub(super) head_dim: usize,
    pub(super) rot_dim: usize,
    pub(super) scale_attn: bool,
}

impl Attention {
    pub(super) fn new(cfg: &QwenConfig, vb: VarBuilder, wt: &Quantizer) -> Result<Self> {
        let h = cfg.hidden_size;
        let proj = cfg.num_attention_heads * cfg.head_dim();
        Ok(Self {
            c_attn: QLinear::load(h, 3 * proj, true, vb.pp("c_attn"), wt.clone())?,
            c_proj: QLinear::load(proj, h, !cfg.no_bias, vb.pp("c_proj"), wt.clone())?,
            kv_dtype: if wt.weight_type.compact_on_cpu() && vb.device().is_cpu() {
                DType::F16
            } else {
                vb.dtype()
            },
            n_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            rot_dim: cfg.rotary_dim(),
            scale_attn: cfg.scale_attn_weights,
        })
    }

    pub(super) fn rotary(&self, x: &Tensor, pos: &Positions) -> Result<Tensor> {
        let d = self.head_dim;
        let dtype = x.dtype();
        // The reference rotates in f32 and casts back.
        let xf = x.to_dtype(DType::F32)?;
        let rotated = if self.rot_dim == d {
            candle_nn::rotary_emb::rope(&xf, &pos.cos, &pos.sin)?
        } else {
            let rot = xf.narrow(D::Minus1, 0, self.rot_dim)?.contiguous()?;
            let pass = xf.narrow(D::Minus1, self.rot_dim, d - self.rot_dim)?;
            let rot = candle_nn::rotary_emb::rope(&rot, &pos.cos, &pos.sin)?;
            Tensor::cat(&[rot, pass], D::Minus1)?
        };
        rotated.to_dtype(dtype)
    }

    /// Attention of the `t` new queries `q` (`[1, heads, t, head_dim]`) over the cache, by the
    /// fused CPU kernel; returns `[1, t, heads·head_dim]`.
    pub(super) fn fused_attention(&self, q: &Tensor, kv: &LayerKv, scale: f32) -> Result<Tensor> {
        let t = q.dim(2)?;
        let (n, d) = (self.n_heads, self.head_dim);
        let dims = decode_attention::Dims {
            heads: n,
            queries: t,
            head_dim: d,
            capacity: kv.k.dim(2)?,
            len: kv.len,
        };
        let mut out = vec![0f32; t * n * d];
        fn run<T: decode_attention::KvElem + candle_core::WithDType>(
            q: &[f32],
            kv: &LayerKv,
            dims: decode_attention::Dims,
            scale: f32,
            out: &mut [f32],
        ) -> Result<()> {
            with_cpu_slice::<T, _>(&kv.k, |ks| {
                with_cpu_slice::<T, _>(&kv.v, |vs| {
                    decode_attention::attend(q, ks, vs, dims, scale, out);
                    Ok(())
                })
            })
        }
        with_cpu_f32(&q.contiguous()?, |qs| match kv.k.dtype() {
            DType::F16 => run::<f16>(qs, kv, dims, scale, &mut out),
            _ => run::<f32>(qs, kv, dims, scale, &mut out),
        })?;
        Tensor::from_vec(out, (1, t, n * d), q.device())
    }

    /// Attention for the rows of `x` (`[1, T, hidden]`): each part is one sequence's run of rows,
    /// attending over its own cache. One `c_attn` and one `c_proj` pass serve every part (a
    /// batched decode step reads the weights once for all sequences).
    pub(super) fn forward(&self, x: &Tensor, parts: &mut [Part<'_>]) -> Result<Tensor> {
        let qkv = self.c_attn.forward(x)?;
        if let [part] = parts {
            let out = self.attend(&qkv, part.pos, part.cache)?;
            return self.c_proj.forward(&out);
        }
        if parts.iter().all(|p| p.pos.len == 1) && qkv.device().is_cpu() && x.dtype() == DType::F32
        {
            let out = self.attend_decode_batch(&qkv, parts)?;
            return self.c_proj.forward(&out);
        }
        let mut outs = Vec::with_capacity(parts.len());
        let mut r0 = 0;
        for part in parts.iter_mut() {
            let rows = part.pos.len;
            outs.push(self.attend(&qkv.narrow(1, r0, rows)?, part.pos, part.cache)?);
            r0 += rows;
        }
        self.c_proj.forward(&Tensor::cat(&outs, 1)?)
    }

    /// A decode step of several sequences (one new position each) on the CPU, with the result of
    /// [`attend`](Self::attend) for each: the split, rotary, log-n scaling and key/value
    /// conversion run once over all rows (each row at its own position), only the cache writes
    /// and the fused attention are per sequence, and those attentions run in parallel. Per-row
    /// small ops of every sequence and layer were a third of a batched step.
    fn attend_decode_batch(&self, qkv: &Tensor, parts: &mut [Part<'_>]) -> Result<Tensor> {
        let b = parts.len();
        let (n, d) = (self.n_heads, self.head_dim);
        // `[1, heads, B, head_dim]`: the B rows as positions of one sequence.
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * n * d, n * d)?
                .reshape((1, b, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let rows = |f: fn(&Positions) -> &Tensor| -> Result<Tensor> {
            Tensor::cat(&parts.iter().map(|p| f(p.pos)).collect::<Vec<_>>(), 0)
        };
        let logn = match parts.iter().any(|p| p.pos.logn.is_some()) {
            true => {
                let f = parts
                    .iter()
                    .map(|p| match &p.pos.logn {
                        Some(t) => t.flatten_all()?.to_vec1::<f32>().map(|v| v[0]),
                        None => Ok(1.0),
                    })
                    .collect::<Result<Vec<f32>>>()?;
                Some(Tensor::from_vec(f, (1, 1, b, 1), qkv.device())?)
            }
            false => None,
        };
        let pos = Positions {
            cos: rows(|p| &p.cos)?,
            sin: rows(|p| &p.sin)?,
            logn,
            offset: 0,
            len: b,
        };
        let q = self.rotary(&split(0)?, &pos)?;
        let k = self.rotary(&split(1)?, &pos)?.to_dtype(self.kv_dtype)?;
        let v = split(2)?.to_dtype(self.kv_dtype)?;
        let q = match &pos.logn {
            Some(f) => q.broadcast_mul(&f.to_dtype(q.dtype())?)?,
            None => q,
        };
        for (i, part) in parts.iter_mut().enumerate() {
            LayerKv::append(
                part.cache,
                &k.narrow(2, i, 1)?,
                &v.narrow(2, i, 1)?,
                self.kv_dtype,
            )?;
        }
        let scale = if self.scale_attn {
            (d as f64).sqrt() as f32
        } else {
            1.0
        };
        // `[1, B, heads, head_dim]`: each sequence's query heads in one contiguous run.
        let q = q.transpose(1, 2)?.contiguous()?;
        let mut out = vec![0f32; b * n * d];
        with_cpu_f32(&q, |qs| {
            use rayon::prelude::*;
            out.par_chunks_mut(n * d)
                .zip(qs.par_chunks(n * d))
                .zip(parts.par_iter())
                .try_for_each(|((o, q), part)| {
                    let kv = part
                        .cache
                        .as_ref()
                        .ok_or_else(|| candle_core::Error::Msg("kv cache slot missing".into()))?;
                    let dims = decode_attention::Dims {
                        heads: n,
                        queries: 1,
                        head_dim: d,
                        capacity: kv.k.dim(2)?,
                        len: kv.len,
                    };
                    fn run<T: decode_attention::KvElem + candle_core::WithDType>(
                        q: &[f32],
                        kv: &LayerKv,
                        dims: decode_attention::Dims,
                        scale: f32,
                        out: &mut [f32],
                    ) -> Result<()> {
                        with_cpu_slice::<T, _>(&kv.k, |ks| {
                            with_cpu_slice::<T, _>(&kv.v, |vs| {
                                decode_attention::attend(q, ks, vs, dims, scale, out);
                                Ok(())
                            })
                        })
                    }
                    match kv.k.dtype() {
                        DType::F16 => run::<f16>(q, kv, dims, scale, o),
                        _ => run::<f32>(q, kv, dims, scale, o),
                    }
                })
        })?;
        Tensor::from_vec(out, (1, b, n * d), qkv.device())
    }

    /// One sequence's attention: `qkv` (`[b, t, 3·heads·head_dim]`) are its new positions, written
    /// into `cache` after what it holds; returns `[b, t, heads·head_dim]` before `c_proj`.
    fn attend(&self, qkv: &Tensor, pos: &Positions, cache: &mut Option<LayerKv>) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let (n, d) = (self.n_heads, self.head_dim);
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(D::Minus1, i * n * d, n * d)?
                .reshape((b, t, n, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = self.rotary(&split(0)?, pos)?;
        let k = self.rotary(&split(1)?, pos)?;
        let v = split(2)?;
        let q = match &pos.logn {
            Some(f) => q.broadcast_mul(&f.to_dtype(q.dtype())?)?,
            None => q,
        };
        let (k, v) = LayerKv::append(cache, &k, &v, self.kv_dtype)?;

        let scale = if self.scale_attn {
            (d as f64).sqrt()
        } else {
            1.0
        };
        if b == 1
            && t <= decode_attention::MAX_QUERIES
            && qkv.device().is_cpu()
            && q.dtype() == DType::F32
        {
            if let Some(kv) = cache.as_ref() {
                return self.fused_attention(&q, kv, scale as f32);
            }
        }
        let kv_len = k.dim(2)?;
        // A strided view: the matmul reads the cache buffer in place (a copy when it holds
        // another dtype).
        let (k, v) = (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?);
        let kt = k.transpose(2, 3)?;
        let mut outs = Vec::with_capacity(t.div_ceil(ATTN_CHUNK));
        let mut q0 = 0;
        while q0 < t {
            let c = ATTN_CHUNK.min(t - q0);
            let qc = q.narrow(2, q0, c)?;
            let scores = (qc.matmul(&kt)? / scale)?;
            // f32 softmax as the reference; on GPUs candle's kernel sums in f32 itself, and the
            // two conversions are two more launches per layer and token.
            let scores = if qkv.device().is_cpu() {
                scores.to_dtype(DType::F32)?
            } else {
                scores
            };
            // Causal: the query at absolute position p sees keys 0..=p.
            let first_abs = pos.offset + q0;
            let scores = if kv_len > first_abs + 1 {
                let mask: Vec<f32> = (0..c)
                    .flat_map(|i| {
                        (0..kv_len).map(move |j| {
                            if j > first_abs + i {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (1, 1, c, kv_len), qkv.device())?
                    .to_dtype(scores.dtype())?;
                scores.broadcast_add(&mask)?
            } else {
                scores
            };
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            outs.push(probs.matmul(&v)?);
            q0 += c;
        }
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            Tensor::cat(&outs, 2)?
        };
        out.transpose(1, 2)?.reshape((b, t, n * d))
    }
}

#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) w1: QLinear,
    pub(super) w2: QLinear,
    pub(super) c_proj: QLinear,
}

impl Mlp {
    pub(super) fn new(cfg: &QwenConfig, vb: VarBuilder, wt: &Quantizer) -> Result<Self> {
        let (h, ff, b) = (cfg.hidden_size, cfg.intermediate_size / 2, !cfg.no_bias);
        Ok(Self {
            w1: QLinear::load(h, ff, b, vb.pp("w1"), wt.clone())?,
            w2: QLinear::load(h, ff, b, vb.pp("w2"), wt.clone())?,
            c_proj: QLinear::load(ff, h, b, vb.pp("c_proj"), wt.clone())?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // SiLU is on w2; w1 is the plain factor.
        let gate = candle_nn::ops::silu(&self.w2.forward(x)?)?;
        self.c_proj.forward(&(self.w1.forward(x)? * gate)?)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) ln_1: RmsNorm,
    pub(super) attn: Attention,
    pub(super) ln_2: RmsNorm,
    pub(super) mlp: Mlp,
}

impl Block {
    pub(super) fn new(cfg: &QwenConfig, vb: VarBuilder, wt: &Quantizer) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        Ok(Self {
            ln_1: RmsNorm::new(h, eps, vb.pp("ln_1"))?,
            attn: Attention::new(cfg, vb.pp("attn"), wt)?,
            ln_2: RmsNorm::new(h, eps, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), wt)?,
        })
    }

    /// The block over the rows of `x` (`[1, T, hidden]`), split into `parts` for attention.
    pub(super) fn forward(&self, x: &Tensor, parts: &mut [Part<'_>]) -> Result<Tensor> {
        let a = (x + self.attn.forward(&self.ln_1.forward(x)?, parts)?)?;
        &a + self.mlp.forward(&self.ln_2.forward(&a)?)?
    }
}

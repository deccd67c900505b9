//! QWen, the language model of Qwen-VL-Chat (Qwen-7B architecture).
//!
//! RMSNorm, fused `c_attn` (with bias) split into q | k | v, rotary embeddings on the full head dim
//! ("rotate-half") with dynamic NTK scaling of the base, log-n query scaling beyond `seq_length`,
//! SwiGLU MLP `c_proj(w1(x) * silu(w2(x)))`, untied `lm_head`. Image features are written over the
//! token embeddings between `<img>` and `</img>` during the prefill.
//!
//! Tensor names follow the checkpoint: `transformer.wte`, `transformer.h.{i}.attn.c_attn`, ...,
//! `transformer.ln_f`, `lm_head`.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::config::QwenConfig;
use crate::decode_attention;
use crate::quant::{with_cpu_f32, with_cpu_slice, QLinear, Quantizer, WeightType};
use half::f16;

/// Queries per attention chunk: bounds the score matrix to `heads × CHUNK × kv_len` floats, so a
/// 6000-token prefill of the 32-head model does not need gigabytes of scores.
const ATTN_CHUNK: usize = 512;

/// Dynamic-NTK alpha for a prefill of `n` positions (reference: `2^ceil(log2(n / seq_length) + 1) - 1`,
/// at least 1).
pub fn ntk_alpha(n: usize, seq_length: usize) -> f64 {
    let context_value = (n as f64 / seq_length as f64).log2() + 1.0;
    let alpha = 2f64.powf(context_value.ceil()) - 1.0;
    alpha.max(1.0)
}

/// Log-n attention factor of the query at 0-based position `p`.
pub fn logn_factor(p: usize, seq_length: usize) -> f32 {
    let i = p + 1;
    if i > seq_length {
        ((i as f64).ln() / (seq_length as f64).ln()) as f32
    } else {
        1.0
    }
}

/// Rotary tables for absolute positions `[offset, offset + len)`, computed in f32 like the
/// reference (`inv_freq = 1 / base^(2j/d)`, angle = `p * inv_freq`). Returns `(cos, sin)`, each
/// `[len, rot_dim / 2]`.
fn rotary_tables(
    rot_dim: usize,
    base: f64,
    offset: usize,
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = rot_dim / 2;
    let base = base as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| 1.0 / base.powf((2 * j) as f32 / rot_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in offset..offset + len {
        for f in &inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (len, half), device)?,
        Tensor::from_vec(sin, (len, half), device)?,
    ))
}

/// Per-forward-pass positional state shared by all layers.
struct Positions {
    cos: Tensor,
    sin: Tensor,
    /// `[1, 1, T, 1]` log-n factors, `None` when every factor is 1.
    logn: Option<Tensor>,
    offset: usize,
}

/// Key/value cache of every layer plus the NTK alpha frozen at prefill.
///
/// Each layer's keys and values live in buffers with room to spare ([`KV_STEP`] positions at a
/// time) that new positions are written into in place; attention reads views of the filled part.
/// (Concatenating and re-transposing the whole cache on every decoded token was 30% of decode.)
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    ntk_alpha: Option<f64>,
}

/// Positions a layer's key/value buffers grow by.
const KV_STEP: usize = 128;

/// Keys and values `[batch, heads, capacity, head_dim]` of one layer, `len` positions filled.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Writes `k`, `v` (`[batch, heads, t, head_dim]`) as `dtype` after the filled positions of
    /// `slot`, growing its buffers if needed, and returns views of all filled positions.
    fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = (&k.to_dtype(dtype)?, &v.to_dtype(dtype)?);
        let (b, h, t, d) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |l| l.len);
        let cap = match slot {
            Some(l) => l.k.dim(2)?,
            None => 0,
        };
        if len + t > cap {
            let new_cap = (len + t).next_multiple_of(KV_STEP);
            let nk = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, new_cap, d), v.dtype(), v.device())?;
            if let Some(l) = slot.as_ref().filter(|l| l.len > 0) {
                nk.slice_set(&l.k.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&l.v.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let l = slot
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("kv cache slot missing".into()))?;
        l.k.slice_set(&k.contiguous()?, 2, len)?;
        l.v.slice_set(&v.contiguous()?, 2, len)?;
        l.len = len + t;
        Ok((l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?))
    }
}

impl Clone for KvCache {
    /// A deep copy: the buffers are written in place, so clones must not share them.
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().and_then(|l| {
                    Some(LayerKv {
                        k: l.k.copy().ok()?,
                        v: l.v.copy().ok()?,
                        len: l.len,
                    })
                })
            })
            .collect();
        Self {
            layers,
            ntk_alpha: self.ntk_alpha,
        }
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            ntk_alpha: None,
        }
    }

    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The NTK alpha chosen at prefill (frozen during decoding, as the reference does).
    pub fn ntk_alpha(&self) -> Option<f64> {
        self.ntk_alpha
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.ntk_alpha = None;
    }

    /// Drops every position from `len` on (keeps a shared prefix for reuse).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        if len == 0 {
            self.clear();
            return Ok(());
        }
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
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
struct Attention {
    c_attn: QLinear,
    c_proj: QLinear,
    /// What the KV cache holds: f16 behind quantized or 16-bit weights on CPUs that run the fused
    /// decode attention (the cache is read whole for every decoded token; f16 halves that
    /// traffic, and its rounding is no coarser than the weights'), else the compute dtype.
    kv_dtype: DType,
    n_heads: usize,
    head_dim: usize,
    rot_dim: usize,
    scale_attn: bool,
}

impl Attention {
    fn new(cfg: &QwenConfig, vb: VarBuilder, wt: &Quantizer) -> Result<Self> {
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

    fn rotary(&self, x: &Tensor, pos: &Positions) -> Result<Tensor> {
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
    fn fused_attention(&self, q: &Tensor, kv: &LayerKv, scale: f32) -> Result<Tensor> {
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

    fn forward(&self, x: &Tensor, pos: &Positions, cache: &mut Option<LayerKv>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (n, d) = (self.n_heads, self.head_dim);
        let qkv = self.c_attn.forward(x)?;
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
            && x.device().is_cpu()
            && q.dtype() == DType::F32
        {
            if let Some(kv) = cache.as_ref() {
                let out = self.fused_attention(&q, kv, scale as f32)?;
                return self.c_proj.forward(&out);
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
            let scores = if x.device().is_cpu() {
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
                let mask = Tensor::from_vec(mask, (1, 1, c, kv_len), x.device())?
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
        let out = out.transpose(1, 2)?.reshape((b, t, n * d))?;
        self.c_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    w1: QLinear,
    w2: QLinear,
    c_proj: QLinear,
}

impl Mlp {
    fn new(cfg: &QwenConfig, vb: VarBuilder, wt: &Quantizer) -> Result<Self> {
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
struct Block {
    ln_1: RmsNorm,
    attn: Attention,
    ln_2: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &QwenConfig, vb: VarBuilder, wt: &Quantizer) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        Ok(Self {
            ln_1: RmsNorm::new(h, eps, vb.pp("ln_1"))?,
            attn: Attention::new(cfg, vb.pp("attn"), wt)?,
            ln_2: RmsNorm::new(h, eps, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"), wt)?,
        })
    }

    fn forward(&self, x: &Tensor, pos: &Positions, cache: &mut Option<LayerKv>) -> Result<Tensor> {
        let a = (x + self.attn.forward(&self.ln_1.forward(x)?, pos, cache)?)?;
        &a + self.mlp.forward(&self.ln_2.forward(&a)?)?
    }
}

/// Image features to write over the embeddings of one image span.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// Index of the first of the 256 positions strictly between `<img>` and `</img>`.
    pub first_position: usize,
    /// `[256, hidden]` features from the visual encoder.
    pub features: Tensor,
}

/// Hidden states of every stage of one forward pass (for golden tests and debugging).
#[derive(Debug, Clone)]
pub struct ForwardTrace {
    pub embeddings: Tensor,
    pub block_outputs: Vec<Tensor>,
    pub ln_f_out: Tensor,
}

/// The token embedding table: dense, or quantized rows on the CPU (quantized models).
#[derive(Debug, Clone)]
enum TokenEmbedding {
    Dense(Embedding),
    Quantized(Arc<crate::quant::cpu::CpuQWeight>),
    /// Rows read from the memory-mapped checkpoint as they are looked up.
    Mapped(crate::checkpoint::MappedRows),
}

impl TokenEmbedding {
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            TokenEmbedding::Dense(e) => e.forward(&Tensor::new(ids, device)?),
            TokenEmbedding::Quantized(w) => {
                let hidden = w.dims().1;
                let mut out = vec![0f32; ids.len() * hidden];
                for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
                    w.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, (ids.len(), hidden), device)
            }
            TokenEmbedding::Mapped(t) => {
                let hidden = t.dims().1;
                let mut out = vec![0f32; ids.len() * hidden];
                for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
                    t.row_f32(id as usize, row)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                }
                Tensor::from_vec(out, (ids.len(), hidden), device)
            }
        }
    }
}

/// The QWen language model with its LM head.
#[derive(Debug, Clone)]
pub struct QwenLm {
    wte: TokenEmbedding,
    h: Vec<Block>,
    ln_f: RmsNorm,
    lm_head: QLinear,
    cfg: QwenConfig,
    weight_type: WeightType,
    dtype: DType,
    device: Device,
}

impl QwenLm {
    /// Dense model in the VarBuilder's dtype. `vb` is rooted at the checkpoint's top level (it
    /// holds `transformer.*` and `lm_head`).
    pub fn new(cfg: &QwenConfig, vb: VarBuilder) -> Result<Self> {
        let wt = match vb.dtype() {
            DType::F16 => WeightType::F16,
            DType::BF16 => WeightType::BF16,
            _ => WeightType::F32,
        };
        let dtype = wt.compute_dtype(vb.device());
        Self::load(cfg, vb.set_dtype(dtype), wt)
    }

    /// Model with linear weights of type `wt`; activations use `wt.compute_dtype(..)`, the type `vb`
    /// is switched to. With quantized weights the embedding table is quantized too (f16 off the CPU):
    /// its rows are only looked up, never multiplied.
    pub fn load(cfg: &QwenConfig, vb: VarBuilder, q: impl Into<Quantizer>) -> Result<Self> {
        Self::load_with_table(cfg, vb, q, None)
    }

    /// Like [`load`](Self::load); a quantized model on the CPU looks its token embeddings up in
    /// `table` (the checkpoint's own `transformer.wte.weight`, mapped) instead of holding a
    /// quantized copy.
    pub fn load_with_table(
        cfg: &QwenConfig,
        vb: VarBuilder,
        q: impl Into<Quantizer>,
        table: Option<crate::checkpoint::MappedRows>,
    ) -> Result<Self> {
        let q: Quantizer = q.into();
        let wt = q.weight_type;
        let dtype = wt.compute_dtype(vb.device());
        let vb = vb.set_dtype(dtype);
        let t = vb.pp("transformer");
        let tied = cfg.tie_word_embeddings && !vb.contains_tensor("lm_head.weight");
        let dims = (cfg.vocab_size, cfg.hidden_size);
        let mapped = table
            .filter(|m| wt.compact_on_cpu() && !tied && vb.device().is_cpu() && m.dims() == dims);
        let q8 = match wt.is_quantized() && !tied && mapped.is_none() {
            true => crate::quant::load_quantized_table(&t.pp("wte"), &q, dims)?,
            false => None,
        };
        let wte = match (mapped, q8) {
            (Some(m), _) => {
                q.count_read(&format!("{}.weight", t.pp("wte").prefix()));
                TokenEmbedding::Mapped(m)
            }
            (None, Some(w)) => TokenEmbedding::Quantized(w),
            (None, None) if wt.is_quantized() => TokenEmbedding::Dense(candle_nn::embedding(
                dims.0,
                dims.1,
                t.pp("wte").set_dtype(DType::F16),
            )?),
            (None, None) => {
                TokenEmbedding::Dense(candle_nn::embedding(dims.0, dims.1, t.pp("wte"))?)
            }
        };
        let lm_head = if let (true, TokenEmbedding::Dense(e)) = (tied, &wte) {
            QLinear::from_weight(e.embeddings().to_dtype(dtype)?)
        } else {
            QLinear::load(
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                vb.pp("lm_head"),
                q.clone(),
            )?
        };
        // The blocks after the two vocabulary-sized tables: a table is read in full precision
        // while it is quantized, and that transient should not sit on top of the whole model.
        let h = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(cfg, t.pp("h").pp(i), &q))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = RmsNorm::new(cfg.hidden_size, cfg.layer_norm_epsilon, t.pp("ln_f"))?;
        Ok(Self {
            wte,
            h,
            ln_f,
            lm_head,
            cfg: cfg.clone(),
            weight_type: wt,
            dtype,
            device: vb.device().clone(),
        })
    }

    pub fn weight_type(&self) -> WeightType {
        self.weight_type
    }

    pub fn config(&self) -> &QwenConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The NTK alpha a prefill of `n` positions on an empty cache uses.
    pub fn prefill_ntk_alpha(&self, n: usize) -> f64 {
        if self.cfg.use_dynamic_ntk {
            ntk_alpha(n, self.cfg.seq_length)
        } else {
            1.0
        }
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.h.len())
    }

    /// Token embeddings `[T, hidden]` with image features written over their spans.
    pub fn embed(&self, ids: &[u32], images: &[ImageFeatures]) -> Result<Tensor> {
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({vocab})");
        }
        let mut x = self.wte.lookup(ids, &self.device)?.to_dtype(self.dtype)?;
        for img in images {
            let n = img.features.dim(0)?;
            if img.first_position + n > ids.len() {
                candle_core::bail!(
                    "image features for positions {}..{} do not fit a {}-token prompt",
                    img.first_position,
                    img.first_position + n,
                    ids.len()
                );
            }
            let feats = img.features.to_dtype(x.dtype())?.to_device(&self.device)?;
            x = x.slice_assign(
                &[img.first_position..img.first_position + n, 0..x.dim(1)?],
                &feats,
            )?;
        }
        Ok(x)
    }

    fn positions(&self, offset: usize, len: usize, alpha: f64) -> Result<Positions> {
        let rot_dim = self.cfg.rotary_dim();
        let base = self.cfg.rotary_emb_base * alpha.powf(rot_dim as f64 / (rot_dim as f64 - 2.0));
        let (cos, sin) = rotary_tables(rot_dim, base, offset, len, &self.device)?;
        let seq = self.cfg.seq_length;
        let logn = if self.cfg.use_logn_attn && offset + len > seq {
            let f: Vec<f32> = (offset..offset + len)
                .map(|p| logn_factor(p, seq))
                .collect();
            Some(Tensor::from_vec(f, (1, 1, len, 1), &self.device)?)
        } else {
            None
        };
        Ok(Positions {
            cos,
            sin,
            logn,
            offset,
        })
    }

    /// Runs the blocks over `embeds` (`[T, hidden]`) appended after the cache's contents and returns
    /// the final hidden states after `ln_f` (`[T, hidden]`). With an empty cache this is a prefill and
    /// fixes the NTK alpha for later steps.
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.in_pool(|| Ok(self.run(embeds, cache, false)?.ln_f_out))
    }

    /// Like [`forward_embeds`](Self::forward_embeds) but also returns every block's output.
    pub fn forward_trace(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<ForwardTrace> {
        self.in_pool(|| self.run(embeds, cache, true))
    }

    /// Runs `f` on a thread of rayon's pool (in place when already on one) when computing on the
    /// CPU. Every matmul splits its work over the pool; called from a thread outside it, each of
    /// the ~200 per decoded token would hand its work to a sleeping worker and sleep until woken
    /// back, and the small ops in between would run while the pool sits idle.
    fn in_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.device.is_cpu() {
            rayon::scope(|_| f())
        } else {
            f()
        }
    }

    fn run(&self, embeds: &Tensor, cache: &mut KvCache, trace: bool) -> Result<ForwardTrace> {
        let t = embeds.dim(0)?;
        if cache.layers.len() != self.h.len() {
            *cache = self.new_cache();
        }
        let offset = cache.len();
        let alpha = match (offset, cache.ntk_alpha) {
            (_, Some(a)) if offset > 0 => a,
            _ => self.prefill_ntk_alpha(t),
        };
        cache.ntk_alpha = Some(alpha);
        let pos = self.positions(offset, t, alpha)?;
        let mut x = embeds.to_dtype(self.dtype)?.unsqueeze(0)?;
        let mut block_outputs = Vec::new();
        for (block, layer_cache) in self.h.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, &pos, layer_cache)?;
            if trace {
                block_outputs.push(x.squeeze(0)?);
            }
        }
        let ln_f_out = self.ln_f.forward(&x)?.squeeze(0)?;
        Ok(ForwardTrace {
            embeddings: embeds.clone(),
            block_outputs,
            ln_f_out,
        })
    }

    /// LM-head logits (f32, `[vocab]`) of one hidden state `[hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head
            .forward(&hidden.unsqueeze(0)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)
    }

    /// Forward pass over `ids` (appended after the cache) and the logits of the last position.
    pub fn forward(
        &self,
        ids: &[u32],
        images: &[ImageFeatures],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            candle_core::bail!("forward over an empty token sequence");
        }
        self.in_pool(|| {
            let x = self.embed(ids, images)?;
            let hidden = self.run(&x, cache, false)?.ln_f_out;
            self.logits(&hidden.get(ids.len() - 1)?)
        })
    }
}

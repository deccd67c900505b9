//! QWen, the language model of Qwen-VL-Chat (Qwen-7B architecture).
//!
//! RMSNorm, fused `c_attn` (with bias) split into q | k | v, rotary embeddings on the full head dim
//! ("rotate-half") with dynamic NTK scaling of the base, log-n query scaling beyond `seq_length`,
//! SwiGLU MLP `c_proj(w1(x) * silu(w2(x)))`, untied `lm_head`. Image features are written over the
//! token embeddings between `<img>` and `</img>` during the prefill.
//!
//! Tensor names follow the checkpoint: `transformer.wte`, `transformer.h.{i}.attn.c_attn`, ...,
//! `transformer.ln_f`, `lm_head`.

mod block;
mod cache;
mod rope;

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::config::QwenConfig;
use crate::quant::{QLinear, Quantizer, WeightType};

use block::{Block, Part, RmsNorm};
pub use cache::KvCache;
pub use rope::{logn_factor, ntk_alpha};
use rope::{rotary_tables, Positions};

/// Image features to write over the embeddings of one image span.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    /// Index of the first of the 256 positions strictly between `<img>` and `</img>`.
    pub first_position: usize,
    /// `[256, hidden]` features from the visual encoder.
    pub features: Tensor,
}

/// One sequence's share of a batched step ([`QwenLm::forward_batch`]).
pub struct BatchStep<'a> {
    /// New positions' embeddings, `[t, hidden]` ([`QwenLm::embed`]).
    pub embeds: Tensor,
    pub cache: &'a mut KvCache,
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

    /// Bytes one position takes in the KV cache (keys and values of every layer).
    pub fn kv_bytes_per_position(&self) -> usize {
        self.h
            .iter()
            .map(|b| 2 * b.attn.n_heads * b.attn.head_dim * b.attn.kv_dtype.size_in_bytes())
            .sum()
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
            len,
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
        let (ln_f_out, block_outputs) = self.run_batch(&[embeds], &mut [cache], trace)?;
        Ok(ForwardTrace {
            embeddings: embeds.clone(),
            block_outputs,
            ln_f_out,
        })
    }

    /// Runs the blocks over every sequence's new embeddings (`embeds[i]`, `[t_i, hidden]`, after
    /// what `caches[i]` holds) as one batch of `Σ t_i` rows: each weight is read once for all of
    /// them, attention is per sequence over its own cache. Returns the rows after `ln_f`
    /// (`[Σ t_i, hidden]`, in order) and, with `trace`, every block's output.
    fn run_batch(
        &self,
        embeds: &[&Tensor],
        caches: &mut [&mut KvCache],
        trace: bool,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if embeds.len() != caches.len() || embeds.is_empty() {
            candle_core::bail!(
                "a batch of {} inputs for {} caches",
                embeds.len(),
                caches.len()
            );
        }
        let mut positions = Vec::with_capacity(embeds.len());
        for (x, cache) in embeds.iter().zip(caches.iter_mut()) {
            let t = x.dim(0)?;
            if cache.layers.len() != self.h.len() {
                **cache = self.new_cache();
            }
            let offset = cache.len();
            // An empty cache takes the alpha a prefill of `t` would, unless `plan_prefill` fixed
            // it for a prompt that arrives in chunks.
            let alpha = cache.ntk_alpha.unwrap_or_else(|| self.prefill_ntk_alpha(t));
            cache.ntk_alpha = Some(alpha);
            positions.push(self.positions(offset, t, alpha)?);
        }
        let x = match embeds {
            [one] => (*one).clone(),
            many => Tensor::cat(many, 0)?,
        };
        let mut x = x.to_dtype(self.dtype)?.unsqueeze(0)?;
        let mut block_outputs = Vec::new();
        for (li, block) in self.h.iter().enumerate() {
            let mut parts: Vec<Part<'_>> = caches
                .iter_mut()
                .zip(&positions)
                .map(|(c, pos)| Part {
                    pos,
                    cache: &mut c.layers[li],
                })
                .collect();
            x = block.forward(&x, &mut parts)?;
            if trace {
                block_outputs.push(x.squeeze(0)?);
            }
        }
        Ok((self.ln_f.forward(&x)?.squeeze(0)?, block_outputs))
    }

    /// Fixes the NTK alpha of an empty `cache` to that of a prefill of `prompt_len` positions, so a
    /// prompt fed in several chunks is rotated exactly as one prefill of it would be.
    pub fn plan_prefill(&self, cache: &mut KvCache, prompt_len: usize) {
        if cache.is_empty() {
            if cache.layers.len() != self.h.len() {
                *cache = self.new_cache();
            }
            cache.ntk_alpha = Some(self.prefill_ntk_alpha(prompt_len));
        }
    }

    /// One step of several sequences at once: each gets its new embeddings (`[t, hidden]`: one
    /// row to decode a token, more for a chunk of its prompt) appended to its cache. Returns the
    /// logits (f32) of each sequence's last new position, `[sequences, vocab]`.
    pub fn forward_batch(&self, steps: &mut [BatchStep<'_>]) -> Result<Tensor> {
        self.in_pool(|| {
            let mut lasts = Vec::with_capacity(steps.len());
            let mut row = 0;
            for s in steps.iter() {
                let t = s.embeds.dim(0)?;
                if t == 0 {
                    candle_core::bail!("a batch step with no new positions");
                }
                row += t;
                lasts.push(row as u32 - 1);
            }
            let embeds: Vec<Tensor> = steps.iter().map(|s| s.embeds.clone()).collect();
            let embeds: Vec<&Tensor> = embeds.iter().collect();
            let mut caches: Vec<&mut KvCache> = steps.iter_mut().map(|s| &mut *s.cache).collect();
            let hidden = self.run_batch(&embeds, &mut caches, false)?.0;
            let last = hidden.index_select(&Tensor::new(lasts.as_slice(), hidden.device())?, 0)?;
            self.lm_head
                .forward(&last.unsqueeze(0)?)?
                .squeeze(0)?
                .to_dtype(DType::F32)
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

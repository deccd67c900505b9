//! `config.json` and `generation_config.json` of a Qwen (v1) checkpoint, mirrored as serde structs:
//! Qwen-VL-Chat, and the text-only Qwen / Qwen-Chat models of the same architecture (1.8B to 72B,
//! Code-Qwen, Math-Qwen) whose `config.json` has no `visual` section. Missing keys fall back to the
//! values of the published Qwen-VL-Chat checkpoint.
//!
//! Every switch of the upstream `configuration_qwen.py` is read. Those we do not implement are
//! refused by name ([`QwenConfig::validate`]) rather than ignored.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

fn d_seq_length() -> usize {
    2048
}
fn d_rotary_base() -> f64 {
    10000.0
}
fn d_rotary_pct() -> f64 {
    1.0
}
fn d_eps() -> f64 {
    1e-6
}
fn d_true() -> bool {
    true
}
fn d_max_pos() -> usize {
    8192
}

/// `config.json` (model_type "qwen").
#[derive(Debug, Clone, Deserialize)]
pub struct QwenConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub kv_channels: Option<usize>,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_rotary_base")]
    pub rotary_emb_base: f64,
    #[serde(default = "d_rotary_pct")]
    pub rotary_pct: f64,
    #[serde(default = "d_seq_length")]
    pub seq_length: usize,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_true")]
    pub use_dynamic_ntk: bool,
    #[serde(default = "d_true")]
    pub use_logn_attn: bool,
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// No bias on the MLP and the attention output projection (`c_attn` always has one).
    #[serde(default = "d_true")]
    pub no_bias: bool,
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// Upstream computes the attention softmax in f32 when set, else in the activation dtype; we
    /// always compute it in f32 (the same result on the f32 path, never coarser otherwise).
    #[serde(default)]
    pub softmax_in_fp32: bool,
    /// 8-bit KV cache of the upstream code (text-only Qwen); not implemented, refused when set.
    #[serde(default)]
    pub use_cache_quantization: bool,
    /// Upstream's CUDA kernels for the quantized KV cache (only with `use_cache_quantization`).
    #[serde(default)]
    pub use_cache_kernel: bool,
    /// `"auto"`, `true` or `false`: flash-attention on CUDA upstream. Numerically the same
    /// attention; we run our own kernels whatever it says.
    #[serde(default)]
    pub use_flash_attn: Option<serde_json::Value>,
    /// The vision tower's own config; the `vision` crate parses it.
    #[serde(default)]
    pub visual: Option<serde_json::Value>,
    /// GPTQ Int4 checkpoints (`Qwen/*-Int4`): how their linear layers were packed.
    #[serde(default)]
    pub quantization_config: Option<GptqConfig>,
}

/// `quantization_config` of a GPTQ checkpoint (auto-gptq's `quantize_config.json`). The packed
/// tensors describe their own groups (`g_idx`, `scales`), so `group_size` and `desc_act` need no
/// handling of their own; what would change the arithmetic is checked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GptqConfig {
    #[serde(default)]
    pub quant_method: Option<String>,
    pub bits: u32,
    #[serde(default)]
    pub group_size: Option<i64>,
    #[serde(default)]
    pub desc_act: bool,
    #[serde(default)]
    pub sym: Option<bool>,
    /// auto-gptq's storage format: `gptq` (v1, zeros stored minus one) unless it says otherwise.
    #[serde(default)]
    pub checkpoint_format: Option<String>,
}

impl QwenConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|m| Error::checkpoint(path, m))?;
        Ok(cfg)
    }

    /// Whether this is Qwen-VL (a `visual` section) rather than a text-only Qwen LM.
    pub fn has_vision(&self) -> bool {
        self.visual.is_some()
    }

    /// Refuses what this implementation does not run exactly as the upstream code does, naming
    /// the setting.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let cfg = self;
        if let Some(mt) = &cfg.model_type {
            if mt != "qwen" {
                return Err(format!(
                    "unsupported model_type {mt:?} (expected \"qwen\": Qwen v1 / Qwen-VL; \
                     Qwen1.5 and later are \"qwen2\" models, which qwenvl does not run)"
                ));
            }
        }
        if let Some(q) = &cfg.quantization_config {
            if let Some(m) = q.quant_method.as_deref().filter(|m| *m != "gptq") {
                return Err(format!(
                    "quantization_config.quant_method {m:?} is not supported (only GPTQ Int4, \
                     as Qwen's *-Int4 checkpoints)"
                ));
            }
            if q.bits != 4 {
                return Err(format!(
                    "quantization_config.bits {} is not supported: only 4-bit GPTQ",
                    q.bits
                ));
            }
            if let Some(f) = q.checkpoint_format.as_deref().filter(|f| *f != "gptq") {
                return Err(format!(
                    "quantization_config.checkpoint_format {f:?} is not supported: only \
                     auto-gptq's \"gptq\" layout (zeros stored minus one)"
                ));
            }
        }
        if cfg.use_cache_quantization {
            return Err(
                "use_cache_quantization is true: the 8-bit KV cache of the upstream code \
                 is not supported; set it to false in config.json"
                    .into(),
            );
        }
        if !cfg.scale_attn_weights {
            return Err(
                "scale_attn_weights is false: the upstream code always scales attention \
                 by 1/sqrt(head_dim) whatever this says, so the checkpoint's intent is unclear"
                    .into(),
            );
        }
        if cfg.num_attention_heads == 0
            || (cfg.kv_channels.is_none()
                && !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads))
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            ));
        }
        // Upstream splits `c_attn`'s output at `hidden_size` and the heads at
        // `hidden_size / num_attention_heads`: any other kv_channels breaks its own model.
        if let Some(kv) = cfg.kv_channels {
            if kv * cfg.num_attention_heads != cfg.hidden_size {
                return Err(format!(
                    "kv_channels {kv} x num_attention_heads {} is not hidden_size {}",
                    cfg.num_attention_heads, cfg.hidden_size
                ));
            }
        }
        if !(cfg.rotary_pct > 0.0 && cfg.rotary_pct <= 1.0) {
            return Err(format!("rotary_pct {} is not in (0, 1]", cfg.rotary_pct));
        }
        if cfg.rotary_dim() < 4
            || !cfg.rotary_dim().is_multiple_of(2)
            || cfg.rotary_dim() > cfg.head_dim()
        {
            return Err(format!(
                "head dim {} / rotary_pct {} give an unusable rotary dimension {}",
                cfg.head_dim(),
                cfg.rotary_pct,
                cfg.rotary_dim()
            ));
        }
        if cfg.seq_length == 0 || cfg.max_position_embeddings == 0 {
            return Err("seq_length and max_position_embeddings must be positive".into());
        }
        if !(cfg.rotary_emb_base.is_finite() && cfg.rotary_emb_base > 1.0) {
            return Err(format!(
                "rotary_emb_base {} must be above 1",
                cfg.rotary_emb_base
            ));
        }
        if cfg.vocab_size < crate::tokenizer::N_RANKS + 3 {
            return Err(format!(
                "vocab_size {} is smaller than the Qwen vocabulary ({} tokens and the chat specials)",
                cfg.vocab_size,
                crate::tokenizer::N_RANKS + 3
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.kv_channels
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Number of rotary dimensions per head (`rotary_pct` of the head dim).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }
}

fn d_chat_format() -> String {
    "chatml".into()
}
fn d_eos() -> u32 {
    151643
}
fn d_max_window() -> usize {
    6144
}
fn d_max_new() -> usize {
    512
}
fn d_top_p() -> f64 {
    0.8
}

/// `generation_config.json`: the sampling defaults the checkpoint ships with.
#[derive(Debug, Clone, Deserialize)]
pub struct GenerationConfig {
    #[serde(default = "d_chat_format")]
    pub chat_format: String,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default = "d_max_window")]
    pub max_window_size: usize,
    #[serde(default = "d_max_new")]
    pub max_new_tokens: usize,
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "d_top_p")]
    pub top_p: f64,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

//! `--random qwen-vl-chat`: full-size synthetic weights, served tensor by tensor through the same
//! loading code as a real checkpoint.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

/// `config.json` of Qwen/Qwen-VL-Chat (the shapes `--random qwen-vl-chat` builds).
pub const QWEN_VL_CHAT_CONFIG: &str = r#"{
  "architectures": ["QWenLMHeadModel"], "bf16": true, "fp16": false, "fp32": false,
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128,
  "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen",
  "no_bias": true, "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000,
  "rotary_pct": 1.0, "scale_attn_weights": true, "seq_length": 2048, "tie_word_embeddings": false,
  "tokenizer_type": "QWenTokenizer", "torch_dtype": "bfloat16", "use_cache": true,
  "use_dynamic_ntk": true, "use_logn_attn": true,
  "visual": {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
             "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664},
  "vocab_size": 151936
}"#;

/// `config.json` of Qwen/Qwen-7B-Chat (upstream v1.1: 8k training context, 32k positions).
pub const QWEN_7B_CHAT_CONFIG: &str = r#"{
  "architectures": ["QWenLMHeadModel"], "bf16": false, "fp16": false, "fp32": false,
  "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 22016, "kv_channels": 128,
  "layer_norm_epsilon": 1e-06, "max_position_embeddings": 32768, "model_type": "qwen",
  "no_bias": true, "num_attention_heads": 32, "num_hidden_layers": 32, "rotary_emb_base": 10000,
  "rotary_pct": 1.0, "scale_attn_weights": true, "seq_length": 8192, "tie_word_embeddings": false,
  "tokenizer_class": "QWenTokenizer", "torch_dtype": "bfloat16", "use_cache": true,
  "use_dynamic_ntk": true, "use_logn_attn": true, "softmax_in_fp32": false,
  "use_cache_quantization": false, "use_cache_kernel": false, "use_flash_attn": "auto",
  "vocab_size": 151936
}"#;

/// `config.json` of Qwen/Qwen-14B-Chat.
pub const QWEN_14B_CHAT_CONFIG: &str = r#"{
  "architectures": ["QWenLMHeadModel"], "bf16": false, "fp16": false, "fp32": false,
  "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 27392, "kv_channels": 128,
  "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen",
  "no_bias": true, "num_attention_heads": 40, "num_hidden_layers": 40, "rotary_emb_base": 10000,
  "rotary_pct": 1.0, "scale_attn_weights": true, "seq_length": 2048, "tie_word_embeddings": false,
  "tokenizer_class": "QWenTokenizer", "torch_dtype": "bfloat16", "use_cache": true,
  "use_dynamic_ntk": true, "use_logn_attn": true, "softmax_in_fp32": false,
  "use_cache_quantization": false, "use_cache_kernel": false, "use_flash_attn": "auto",
  "vocab_size": 152064
}"#;

/// `config.json` of Qwen/Qwen-1_8B-Chat.
pub const QWEN_1_8B_CHAT_CONFIG: &str = r#"{
  "architectures": ["QWenLMHeadModel"], "bf16": false, "fp16": false, "fp32": false,
  "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "kv_channels": 128,
  "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen",
  "no_bias": true, "num_attention_heads": 16, "num_hidden_layers": 24, "rotary_emb_base": 10000,
  "rotary_pct": 1.0, "scale_attn_weights": true, "seq_length": 8192, "tie_word_embeddings": false,
  "tokenizer_class": "QWenTokenizer", "torch_dtype": "bfloat16", "use_cache": true,
  "use_dynamic_ntk": true, "use_logn_attn": true, "softmax_in_fp32": false,
  "use_cache_quantization": false, "use_cache_kernel": false, "use_flash_attn": "auto",
  "vocab_size": 151936
}"#;

/// Values every synthetic tensor is cut from: 16 M floats, uniform in ±0.02·√3 (std 0.02, the
/// checkpoint's `initializer_range`).
const POOL_LEN: usize = 1 << 24;

/// A [`SimpleBackend`] that serves any requested tensor with synthetic values: LayerNorm/RMSNorm
/// weights are 1, everything else is a window of the shared random pool chosen by the name.
pub struct RandomBackend {
    pool: Arc<Vec<f32>>,
}

impl RandomBackend {
    pub fn new(seed: u64) -> Self {
        let mut state = seed | 1;
        let scale = 0.02f32 * 3f32.sqrt();
        let pool = (0..POOL_LEN)
            .map(|_| {
                // xorshift64*: fast and good enough for timing weights.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                (r as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        Self {
            pool: Arc::new(pool),
        }
    }

    fn values(&self, name: &str, n: usize) -> Vec<f32> {
        let is_norm_weight = name.ends_with(".weight")
            && (name.contains(".ln_") || name.contains("ln_f") || name.contains("ln_pre"));
        if is_norm_weight {
            return vec![1.0; n];
        }
        let start = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        }) as usize
            % POOL_LEN;
        let mut out = Vec::with_capacity(n);
        let mut at = start;
        while out.len() < n {
            let take = (n - out.len()).min(POOL_LEN - at);
            out.extend_from_slice(&self.pool[at..at + take]);
            at = 0;
        }
        out
    }
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let v = self.values(name, s.elem_count());
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

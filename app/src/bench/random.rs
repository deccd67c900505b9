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
    /// The LM's linear layers are served GPTQ-packed (`qweight`, `qzeros`, `scales`, `g_idx`).
    gptq: bool,
}

/// The tensors of a GPTQ-packed linear layer.
const GPTQ_PARTS: [&str; 4] = [".qweight", ".qzeros", ".scales", ".g_idx"];

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
            gptq: false,
        }
    }

    /// Serves the LM's linear layers (`transformer.h.*`) GPTQ-packed, as an Int4 checkpoint.
    pub fn with_gptq(mut self, gptq: bool) -> Self {
        self.gptq = gptq;
        self
    }

    /// A packed GPTQ tensor: random 4-bit values (from the pool's bits), symmetric zeros (8,
    /// stored as 7), scales giving the weights the pool's spread, groups of 128 in order.
    fn gptq_tensor(&self, name: &str, s: &Shape, dtype: DType, dev: &Device) -> Option<Tensor> {
        let n = s.elem_count();
        let t = if name.ends_with(".qweight") {
            let v = self.values(name, n);
            let words: Vec<i32> = v.iter().map(|x| x.to_bits() as i32).collect();
            Tensor::from_vec(words, s, dev)
        } else if name.ends_with(".qzeros") {
            Tensor::from_vec(vec![0x7777_7777i32; n], s, dev)
        } else if name.ends_with(".scales") {
            // q - 8 spans ±8: scale 0.02·√3 / 8 gives the pool's range.
            Tensor::from_vec(vec![0.02f32 * 3f32.sqrt() / 8.0; n], s, dev)
                .and_then(|t| t.to_dtype(dtype))
        } else if name.ends_with(".g_idx") {
            Tensor::from_vec((0..n as i32).map(|i| i / 128).collect::<Vec<_>>(), s, dev)
        } else {
            return None;
        };
        t.ok()
    }

    fn is_gptq_layer(&self, name: &str) -> bool {
        self.gptq && name.starts_with("transformer.h.")
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
        if self.is_gptq_layer(name) {
            if let Some(t) = self.gptq_tensor(name, &s, dtype, dev) {
                return Ok(t);
            }
        }
        let v = self.values(name, s.elem_count());
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Packed layers only in the Int4 presets; every other tensor is there.
        !GPTQ_PARTS.iter().any(|p| name.ends_with(p)) || self.is_gptq_layer(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarBuilder;

    /// The Int4 presets serve the LM's linear layers GPTQ-packed, which the loader dequantises to
    /// weights of the pool's spread (4-bit steps of 0.02·√3 / 8); other presets never look packed.
    #[test]
    fn int4_presets_serve_packed_lm_layers_only() {
        let dev = Device::Cpu;
        let vb = |gptq| {
            VarBuilder::from_backend(
                Box::new(RandomBackend::new(7).with_gptq(gptq)),
                DType::F32,
                dev.clone(),
            )
        };
        let layer = "transformer.h.0.mlp.w1";
        assert!(!lm::quant::gptq::is_packed(&vb(false).pp(layer)));
        assert!(!lm::quant::gptq::is_packed(
            &vb(true).pp("transformer.visual.x")
        ));
        let packed = vb(true).pp(layer);
        assert!(lm::quant::gptq::is_packed(&packed));
        let w = lm::quant::gptq::dequantize(&packed, (16, 256)).unwrap();
        let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let step = 0.02 * 3f32.sqrt() / 8.0;
        assert!(v.iter().all(|x| {
            let k = x / step;
            (k - k.round()).abs() < 1e-4 && (-8.0..=7.0).contains(&k.round())
        }));
        // Not all one value: the 4-bit codes come from the pool.
        assert!(v.iter().any(|&x| x != v[0]));
    }
}

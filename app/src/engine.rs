//! The engine: one loaded model (checkpoint, tokenizer, vision tower, LM) and the path from a
//! conversation to a reply: prompt → images → visual features → prefill → generation.
//!
//! The CLI and the GUI both go through this type; neither touches tensors directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lm::generate::{self, Flow, GenerateOptions, Generation};
use lm::checkpoint::LoadProgress;
use lm::model::{ImageFeatures, KvCache, QwenLm};
use lm::prompt::{Conversation, Prompt};
use lm::quant::{QLinear, WeightType};
use lm::tokenizer::QwenTokenizer;
use lm::Checkpoint;

/// Wall-clock time of each stage of one reply, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub prompt_ms: f64,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// From the start of the request to the first new token.
    pub time_to_first_token_ms: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub decode_tokens_per_s: f64,
}

/// A decoded input picture and where it came from.
#[derive(Debug, Clone)]
pub struct Picture {
    /// The path as written in the conversation (and in the prompt).
    pub path: String,
    pub width: u32,
    pub height: u32,
}

/// Everything a finished reply carries.
#[derive(Debug, Clone)]
pub struct Reply {
    pub prompt: Prompt,
    pub generation: Generation,
    /// The reply text without the stop token, surrounding whitespace trimmed (as the reference).
    pub text: String,
    pub pictures: Vec<Picture>,
    pub last_logits: Tensor,
    pub timings: Timings,
}

pub struct Engine {
    pub checkpoint: Checkpoint,
    pub tokenizer: QwenTokenizer,
    pub lm: QwenLm,
    pub visual: vision::VisualEncoder,
    pub visual_config: vision::Config,
    pub device: Device,
    /// The dtype activations are computed in.
    pub dtype: DType,
    pub weight_type: WeightType,
    pub load_ms: f64,
}

/// The weight type of the vision tower for a requested LM weight type: k-quants need rows that
/// are multiples of 256 and the tower's width (1664) is not, so it gets the block-32 type of the
/// same size class.
fn vision_weight_type(wt: WeightType) -> WeightType {
    match wt {
        WeightType::Q4K => WeightType::Q4_0,
        other => other,
    }
}

impl Engine {
    /// Dense model in `dtype` (f32 is the exact reference path).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let wt = match dtype {
            DType::F16 => WeightType::F16,
            DType::BF16 => WeightType::BF16,
            _ => WeightType::F32,
        };
        Self::load_with(dir, wt, device, None)
    }

    /// Loads with linear weights of type `wt` (quantized types are quantized tensor by tensor
    /// while loading); `progress` counts the tensors read.
    pub fn load_with(
        dir: &Path,
        wt: WeightType,
        device: &Device,
        progress: Option<Arc<LoadProgress>>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let checkpoint = Checkpoint::open(dir)
            .with_context(|| format!("cannot open the model folder {}", dir.display()))?;
        let tok_path = checkpoint.tokenizer_file();
        let tokenizer = QwenTokenizer::from_file(&tok_path)
            .with_context(|| format!("cannot load the tokenizer {}", tok_path.display()))?;
        // Build the BPE now rather than on the first message.
        tokenizer
            .warm_up()
            .with_context(|| format!("cannot build the tokenizer {}", tok_path.display()))?;
        let visual_value = checkpoint
            .config
            .visual
            .clone()
            .context("config.json has no `visual` section: this is not a Qwen-VL checkpoint")?;
        let visual_config: vision::Config = serde_json::from_value(visual_value)
            .context("config.json: invalid `visual` section")?;
        let dtype = wt.compute_dtype();
        let vb = match progress {
            Some(p) => checkpoint.var_builder_with_progress(dtype, device, p),
            None => checkpoint.var_builder(dtype, device),
        };
        let lm = QwenLm::load(&checkpoint.config, vb.clone(), wt)
            .with_context(|| format!("cannot build the language model from {}", dir.display()))?;
        let vision_vb = vb.pp("transformer").pp("visual");
        let visual = if wt.is_quantized() {
            let vwt = vision_weight_type(wt);
            let linear: vision::LinearBuilder = &move |i, o, vb| {
                Ok(vision::Layer(Arc::new(QLinear::load(i, o, true, vb, vwt)?)))
            };
            vision::VisualEncoder::new_with_linear(&visual_config, vision_vb, linear)
        } else {
            vision::VisualEncoder::new(&visual_config, vision_vb)
        }
        .with_context(|| format!("cannot build the vision tower from {}", dir.display()))?;
        Ok(Self {
            checkpoint,
            tokenizer,
            lm,
            visual,
            visual_config,
            device: device.clone(),
            dtype,
            weight_type: wt,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Builds the prompt of a conversation with the checkpoint's history window.
    pub fn prompt(&self, conv: &Conversation) -> Result<Prompt> {
        let window = self.checkpoint.generation.max_window_size;
        Ok(lm::prompt::build_chatml(&self.tokenizer, conv, window)?)
    }

    /// Decodes, preprocesses and encodes every image of `prompt` (paths relative to `base_dir`),
    /// all in one batch. Returns the features at their spans and the decoded pictures.
    pub fn encode_images(
        &self,
        prompt: &Prompt,
        base_dir: &Path,
    ) -> Result<(Vec<ImageFeatures>, Vec<Picture>)> {
        if prompt.images.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let size = self.visual_config.image_size;
        let mut pixels = Vec::with_capacity(prompt.images.len());
        let mut pictures = Vec::with_capacity(prompt.images.len());
        let mut decoded: HashMap<&str, (Tensor, u32, u32)> = HashMap::new();
        for span in &prompt.images {
            if !decoded.contains_key(span.path.as_str()) {
                let file: PathBuf = base_dir.join(&span.path);
                let img = vision::load_rgb(&file)?;
                let (w, h) = img.dimensions();
                let px = vision::preprocess(&img, size)?;
                decoded.insert(span.path.as_str(), (px, w, h));
            }
            let (px, w, h) = &decoded[span.path.as_str()];
            pixels.push(px.clone());
            pictures.push(Picture {
                path: span.path.clone(),
                width: *w,
                height: *h,
            });
        }
        let batch = Tensor::stack(&pixels, 0)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let feats = self.visual.forward(&batch)?;
        let features = prompt
            .images
            .iter()
            .enumerate()
            .map(|(i, span)| {
                Ok(ImageFeatures {
                    first_position: span.start + 1,
                    features: feats.get(i)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((features, pictures))
    }

    /// Answers the conversation: prompt, images, prefill, then generation with `on_text` called
    /// for every piece of new text as it becomes complete.
    pub fn reply(
        &self,
        conv: &Conversation,
        base_dir: &Path,
        opts: &GenerateOptions,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str),
    ) -> Result<Reply> {
        let t0 = Instant::now();
        let prompt = self.prompt(conv)?;
        let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;

        let t1 = Instant::now();
        let (features, pictures) = self.encode_images(&prompt, base_dir)?;
        let vision_ms = t1.elapsed().as_secs_f64() * 1e3;

        let t2 = Instant::now();
        let mut cache: KvCache = self.lm.new_cache();
        let last_logits = self.lm.forward(&prompt.ids, &features, &mut cache)?;
        let prefill_ms = t2.elapsed().as_secs_f64() * 1e3;

        let t3 = Instant::now();
        let mut first_token_at = None;
        let mut stream = generate::StreamDecoder::default();
        let stop_ids = opts.stop_ids.clone();
        let generation = generate::generate(
            &self.lm,
            &mut cache,
            last_logits.clone(),
            &prompt.ids,
            opts,
            cancel,
            |id| {
                first_token_at.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1e3);
                if !stop_ids.contains(&id) {
                    let piece = stream.push(&self.tokenizer, id);
                    if !piece.is_empty() {
                        on_text(&piece);
                    }
                }
                Flow::Continue
            },
        )?;
        let rest = stream.flush();
        if !rest.is_empty() {
            on_text(&rest);
        }
        let decode_ms = t3.elapsed().as_secs_f64() * 1e3;
        let text = self
            .tokenizer
            .decode(generation.content_ids(), false, false)
            .trim()
            .to_string();
        let n = generation.ids.len();
        let timings = Timings {
            prompt_ms,
            vision_ms,
            prefill_ms,
            decode_ms,
            time_to_first_token_ms: first_token_at.unwrap_or(0.0),
            prompt_tokens: prompt.ids.len(),
            generated_tokens: n,
            // The first token comes from the prefill's logits; the rest each cost one step.
            decode_tokens_per_s: if n > 1 && decode_ms > 0.0 {
                (n - 1) as f64 / (decode_ms / 1e3)
            } else {
                0.0
            },
        };
        Ok(Reply {
            prompt,
            generation,
            text,
            pictures,
            last_logits,
            timings,
        })
    }
}

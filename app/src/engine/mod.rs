//! The engine: one loaded model (checkpoint, tokenizer, vision tower, LM) and the path from a
//! conversation to a reply: prompt → images → visual features → prefill → generation.
//!
//! The CLI and the GUI both go through this type; neither touches tensors directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lm::checkpoint::LoadProgress;
use lm::generate::Generation;
use lm::model::{ImageFeatures, KvCache, QwenLm};
use lm::prompt::{Conversation, Prompt};
use lm::quant::{QLinear, QuantCache, Quantizer, WeightType};
use lm::tokenizer::QwenTokenizer;
use lm::Checkpoint;
use sha2::Digest;

mod batch;

pub use batch::{BatchLimits, Batcher, ReplySink, Request};

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
    /// Prompt positions whose keys/values came from the previous reply's cache.
    pub reused_prefix_tokens: usize,
    /// Images whose features came from the feature cache (not encoded again).
    pub cached_images: usize,
    pub generated_tokens: usize,
    pub decode_tokens_per_s: f64,
    /// The CPU kernel level these timings ran at (`portable`, `avx2`, `avx512`, `amx`, `neon`),
    /// or `None` when the model runs on a GPU.
    pub cpu: Option<&'static str>,
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

/// SHA-256 of an image file's bytes: the identity of its visual features.
pub type ImageKey = [u8; 32];

/// Images whose features the cache keeps at most (each is `256 × hidden` values).
const FEATURE_CACHE_IMAGES: usize = 64;

/// The previous reply's KV cache and what it holds.
struct CachedPrefix {
    ids: Vec<u32>,
    /// `(index of <img>, content)` of every image span in `ids`.
    images: Vec<(usize, ImageKey)>,
    cache: KvCache,
}

/// The pictures of several prompts on their way through the vision tower
/// ([`Engine::start_images`]).
#[derive(Default)]
pub struct ImageJob {
    /// Each prompt's image spans: `(index of <img>, path)`.
    prompts: Vec<Vec<(usize, String)>>,
    /// Each prompt's image content keys, or why its pictures cannot be read.
    keys: Vec<Result<Vec<ImageKey>>>,
    /// Features already known (the feature cache).
    known: HashMap<ImageKey, (Tensor, u32, u32)>,
    /// The pictures being encoded, in batch order: key, width, height.
    pictures: Vec<(ImageKey, u32, u32)>,
    encoding: Option<vision::Encoding>,
    /// Why the batch could not be encoded (fails every prompt with a new picture).
    failed: Option<String>,
}

impl ImageJob {
    /// Whether the vision tower still has work for this job.
    pub fn is_encoding(&self) -> bool {
        self.encoding.is_some() && self.failed.is_none()
    }
}

/// The images of a prompt, ready for the LM.
#[derive(Default)]
pub struct EncodedImages {
    /// Features at their spans, in prompt order.
    pub features: Vec<ImageFeatures>,
    pub pictures: Vec<Picture>,
    /// Content key of each image, in prompt order.
    pub keys: Vec<ImageKey>,
    /// How many came from the feature cache.
    pub cached: usize,
}

/// Work kept between replies so a follow-up only pays for what is new.
#[derive(Default)]
struct Reuse {
    features: HashMap<ImageKey, (Tensor, u32, u32)>,
    prefix: Option<CachedPrefix>,
}

/// Qwen-VL's vision tower with its config.
pub struct Vision {
    pub encoder: vision::VisualEncoder,
    pub config: vision::Config,
}

/// The `visual` section of a Qwen-VL `config.json`, checked against the prompt layout; `None` for
/// a text-only Qwen.
pub fn visual_config(cfg: &lm::QwenConfig) -> Result<Option<vision::Config>> {
    let Some(value) = cfg.visual.clone() else {
        return Ok(None);
    };
    let vc: vision::Config =
        serde_json::from_value(value).context("config.json: invalid `visual` section")?;
    // The prompt reserves one position per visual feature between `<img>` and `</img>`.
    anyhow::ensure!(
        vc.n_queries == lm::tokenizer::IMG_SPAN,
        "config.json: visual.n_queries is {}, but the Qwen-VL prompt holds {} features per image",
        vc.n_queries,
        lm::tokenizer::IMG_SPAN
    );
    Ok(Some(vc))
}

pub struct Engine {
    pub checkpoint: Checkpoint,
    pub tokenizer: QwenTokenizer,
    pub lm: QwenLm,
    /// The vision tower; `None` for a text-only Qwen checkpoint.
    pub vision: Option<Vision>,
    pub device: Device,
    /// The dtype activations are computed in.
    pub dtype: DType,
    pub weight_type: WeightType,
    pub load_ms: f64,
    /// The quantized-model cache file and whether this load read from it.
    pub quant_cache: Option<(PathBuf, bool)>,
    reuse: Mutex<Reuse>,
}

/// Where quantized models are cached: `$QWENVL_CACHE_DIR`, else the platform cache folder.
pub fn quant_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("QWENVL_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("", "", "qwenvl").map(|d| d.cache_dir().join("quantized"))
}

/// Identity of a model folder's contents: its JSON files' bytes and the name, size and modification
/// time of every weight file. A changed file gives another identity, so a stale cache is never used.
pub fn checkpoint_identity(dir: &Path) -> Result<String> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "json" || e == "safetensors" || e == "bin")
        })
        .collect();
    entries.sort();
    let mut h = sha2::Sha256::new();
    for p in entries {
        let meta = std::fs::metadata(&p).with_context(|| format!("cannot stat {}", p.display()))?;
        h.update(
            p.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update(meta.len().to_le_bytes());
        if p.extension().is_some_and(|e| e == "json") {
            h.update(std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?);
        } else if let Ok(t) = meta.modified() {
            let secs = t
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            h.update(secs.to_le_bytes());
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    Ok(digest[..10].iter().map(|b| format!("{b:02x}")).collect())
}

/// Hands the heap's free pages back to the system. Loading frees a transient buffer per weight
/// (bf16 or cached bytes on their way to tiles); glibc keeps those holes resident, ~0.3 GB for
/// the full model, which would otherwise add to the peak that the vision encode and prefill
/// build on.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How to build the linear layers of the model in `dir`: quantized weights come from (or go to)
/// the on-disk cache when there is a cache folder.
pub fn quantizer_for(dir: &Path, wt: WeightType) -> Result<Quantizer> {
    let cache = match (wt.is_quantized(), quant_cache_dir()) {
        (true, Some(cache_dir)) => {
            let name = lm::quant::cache_file_name(&checkpoint_identity(dir)?, wt);
            Some(Arc::new(QuantCache::open(&cache_dir.join(name))))
        }
        _ => None,
    };
    Ok(Quantizer {
        weight_type: wt,
        cache,
        progress: None,
    })
}

/// The vision tower with its block linears built by `q` (quantized or dense).
pub fn build_visual(
    cfg: &vision::Config,
    vb: candle_nn::VarBuilder,
    q: &Quantizer,
) -> vision::Result<vision::VisualEncoder> {
    // Compact towers (quantized, or 16-bit on the CPU) are built from our linear layers.
    if !(q.weight_type.is_quantized() || q.weight_type.is_half() && vb.device().is_cpu()) {
        return vision::VisualEncoder::new(cfg, vb);
    }
    let linear: vision::LinearBuilder = &|i, o, bias, vb| {
        Ok(vision::Layer(Arc::new(QLinear::load(
            i,
            o,
            bias,
            vb,
            q.clone(),
        )?)))
    };
    // Quantized towers already round activations to int8, and 16-bit ones their weights; bf16
    // attention is no coarser and halves the encode time (see vision::qwen_vit::bf16_attention).
    Ok(vision::VisualEncoder::new_with_linear(cfg, vb, linear)?.with_bf16_attention(true))
}

/// The language model and (for Qwen-VL) the vision tower of a checkpoint (`vb` rooted at its top
/// level), built as the engine runs them; the benchmark builds them the same way. A quantized
/// model looks its token embeddings up in `table` (the mapped checkpoint's own) instead of holding
/// a copy.
pub fn build_models(
    cfg: &lm::QwenConfig,
    vb: &candle_nn::VarBuilder,
    q: &Quantizer,
    table: Option<lm::checkpoint::MappedRows>,
) -> Result<(QwenLm, Option<Vision>)> {
    let visual_config = visual_config(cfg)?;
    let lm = QwenLm::load_with_table(cfg, vb.clone(), q.clone(), table)
        .context("cannot build the language model")?;
    release_free_heap();
    let vision = match visual_config {
        Some(config) => {
            let encoder = build_visual(&config, vb.pp("transformer").pp("visual"), q)
                .context("cannot build the vision tower")?;
            release_free_heap();
            Some(Vision { encoder, config })
        }
        None => None,
    };
    if !vb.device().is_cpu() {
        warm_up(&lm, vision.as_ref()).context("cannot run the model on the GPU")?;
    }
    Ok((lm, vision))
}

/// One picture (Qwen-VL) and a short prompt through the whole model, results dropped. On a GPU the
/// first call of each kernel loads (JIT-compiles) its module and cuBLAS picks its algorithms:
/// ~0.1 s per stage that would otherwise land on the user's first reply.
fn warm_up(lm: &QwenLm, vision: Option<&Vision>) -> Result<()> {
    use lm::tokenizer::NEWLINE;
    let Some(Vision {
        encoder: visual,
        config: cfg,
    }) = vision
    else {
        let mut cache = lm.new_cache();
        lm.forward(&[NEWLINE, NEWLINE], &[], &mut cache)?;
        lm.forward(&[NEWLINE], &[], &mut cache)?.to_vec1::<f32>()?;
        return Ok(());
    };
    let s = cfg.image_size;
    let pixels = Tensor::zeros((1, 3, s, s), visual.dtype(), lm.device())?;
    let features = visual.forward(&pixels)?.get(0)?;
    // A prompt's shape: `<img>`, one pad per feature, `</img>`, a newline; then one decode step.
    use lm::tokenizer::{IMG_END, IMG_PAD, IMG_START};
    let mut ids = vec![IMG_START];
    ids.extend(std::iter::repeat_n(IMG_PAD, cfg.n_queries));
    ids.extend([IMG_END, NEWLINE]);
    let images = [lm::model::ImageFeatures {
        first_position: 1,
        features,
    }];
    let mut cache = lm.new_cache();
    lm.forward(&ids, &images, &mut cache)?;
    lm.forward(&[NEWLINE], &[], &mut cache)?.to_vec1::<f32>()?;
    Ok(())
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
        let tokenizer = checkpoint
            .tokenizer()
            .with_context(|| format!("cannot load the tokenizer {}", tok_path.display()))?;
        // Build the BPE now rather than on the first message.
        tokenizer
            .warm_up()
            .with_context(|| format!("cannot build the tokenizer {}", tok_path.display()))?;
        let dtype = wt.compute_dtype(device);
        let mut q = quantizer_for(dir, wt)?;
        let vb = match progress {
            Some(p) => {
                let (vb, counter) = checkpoint.var_builder_with_progress(dtype, device, p);
                q.progress = Some(counter);
                vb
            }
            None => checkpoint.var_builder(dtype, device),
        };
        let cache = q.cache.clone();
        let table = checkpoint.mapped_rows("transformer.wte.weight");
        let (lm, vision) = build_models(&checkpoint.config, &vb, &q, table)
            .with_context(|| format!("cannot build the model from {}", dir.display()))?;
        if let Some(c) = &cache {
            // A cache that cannot be written only costs the next start its speed.
            if let Err(e) = c.save() {
                eprintln!(
                    "warning: cannot write the quantized-model cache {}: {e}",
                    c.path().display()
                );
            }
        }
        Ok(Self {
            checkpoint,
            tokenizer,
            lm,
            vision,
            device: device.clone(),
            dtype,
            weight_type: wt,
            quant_cache: cache.as_ref().map(|c| (c.path().to_path_buf(), c.is_hit())),
            reuse: Mutex::default(),
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Builds the prompt of a conversation with the checkpoint's history window.
    pub fn prompt(&self, conv: &Conversation) -> Result<Prompt> {
        self.prompt_continuing(conv, "")
    }

    /// [`prompt`](Self::prompt) with the assistant's reply already begun by `reply_prefix`
    /// (empty: a fresh reply), which the model continues (tool use: after a tool's result).
    pub fn prompt_continuing(&self, conv: &Conversation, reply_prefix: &str) -> Result<Prompt> {
        let window = self.checkpoint.generation.max_window_size;
        let prompt = if reply_prefix.is_empty() {
            lm::prompt::build_chatml(&self.tokenizer, conv, window)?
        } else {
            lm::prompt::build_chatml_continuing(&self.tokenizer, conv, reply_prefix, window)?
        };
        // Refused before any image is decoded or the model runs.
        prompt.check_context(self.checkpoint.config.max_position_embeddings)?;
        Ok(prompt)
    }

    /// Forgets the feature cache and the previous reply's KV cache (the next reply runs cold).
    pub fn clear_caches(&self) {
        if let Ok(mut r) = self.reuse.lock() {
            *r = Reuse::default();
        }
    }

    /// Decodes, preprocesses and encodes every image of `prompt` (paths relative to `base_dir`);
    /// images seen before (same file content) come from the feature cache, the others are encoded
    /// in one batch. Returns the features at their spans, the decoded pictures, each image's content
    /// key and how many came from the cache.
    pub fn encode_images(&self, prompt: &Prompt, base_dir: &Path) -> Result<EncodedImages> {
        self.encode_images_many(&[(prompt, base_dir)])
            .pop()
            .unwrap_or_else(|| Ok(EncodedImages::default()))
    }

    /// [`encode_images`](Self::encode_images) for several prompts at once: the new pictures of all
    /// of them go through the vision tower in one batch. A picture that cannot be read or decoded
    /// fails only its own prompt.
    pub fn encode_images_many(&self, prompts: &[(&Prompt, &Path)]) -> Vec<Result<EncodedImages>> {
        let mut job = self.start_images(prompts);
        let done = self.advance_images(&mut job, usize::MAX);
        self.finish_images(job, done)
    }

    /// Reads, decodes and preprocesses the pictures of `prompts` (those seen before come from the
    /// feature cache) and starts encoding the new ones in one batch;
    /// [`advance_images`](Self::advance_images) runs the vision tower's blocks a few at a time and
    /// [`finish_images`](Self::finish_images) gives each prompt its features.
    pub fn start_images(&self, prompts: &[(&Prompt, &Path)]) -> ImageJob {
        let size = self.vision.as_ref().map_or(448, |v| v.config.image_size);
        let mut known: HashMap<ImageKey, (Tensor, u32, u32)> = HashMap::new();
        // New pictures of all prompts: content key, pixels, width, height.
        let mut todo: Vec<(ImageKey, Tensor, u32, u32)> = Vec::new();
        let mut keys: Vec<Result<Vec<ImageKey>>> = Vec::with_capacity(prompts.len());
        let mut job = ImageJob {
            prompts: prompts
                .iter()
                .map(|(p, _)| p.images.iter().map(|s| (s.start, s.path.clone())).collect())
                .collect(),
            ..ImageJob::default()
        };
        {
            let Ok(reuse) = self.reuse.lock() else {
                job.failed = Some("engine state poisoned".into());
                job.keys = prompts.iter().map(|_| Ok(Vec::new())).collect();
                return job;
            };
            for (prompt, base_dir) in prompts {
                let mut mine: Vec<(ImageKey, Tensor, u32, u32)> = Vec::new();
                let read = prompt
                    .images
                    .iter()
                    .map(|span| {
                        let file: PathBuf = base_dir.join(&span.path);
                        // Refuses pipes, devices and directories, and caps the size: a FIFO or
                        // /dev/zero must not hang or exhaust memory.
                        let bytes = vision::read_image_file(&file)?;
                        let key: ImageKey = sha2::Sha256::digest(&bytes).into();
                        let seen = known.contains_key(&key)
                            || todo.iter().chain(&mine).any(|t| t.0 == key);
                        if !seen {
                            if let Some(hit) = reuse.features.get(&key) {
                                known.insert(key, hit.clone());
                            } else {
                                let img = vision::decode_rgb(&bytes, &file.to_string_lossy())?;
                                let (w, h) = img.dimensions();
                                mine.push((key, vision::preprocess(&img, size)?, w, h));
                            }
                        }
                        Ok(key)
                    })
                    .collect::<Result<Vec<ImageKey>>>();
                if read.is_ok() {
                    todo.append(&mut mine);
                }
                keys.push(read);
            }
        }
        job.keys = keys;
        job.known = known;
        job.pictures = todo.iter().map(|t| (t.0, t.2, t.3)).collect();
        if !todo.is_empty() {
            let started = (|| -> Result<vision::Encoding> {
                let pixels: Vec<Tensor> = todo.iter().map(|t| t.1.clone()).collect();
                let batch = Tensor::stack(&pixels, 0)?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?;
                let vision = self
                    .vision
                    .as_ref()
                    .context("this is a text-only Qwen model: it cannot read pictures")?;
                Ok(vision.encoder.begin(&batch)?)
            })();
            match started {
                Ok(e) => job.encoding = Some(e),
                Err(e) => job.failed = Some(format!("{e:#}")),
            }
        }
        job
    }

    /// Runs up to `blocks` more of the vision tower's blocks; returns whether the job is through
    /// all of them (a job with nothing to encode, or one that failed, is).
    pub fn advance_images(&self, job: &mut ImageJob, blocks: usize) -> bool {
        let Some(enc) = job.encoding.as_mut() else {
            return true;
        };
        let Some(vision) = self.vision.as_ref() else {
            return true;
        };
        match vision.encoder.advance(enc, blocks) {
            Ok(done) => done,
            Err(e) => {
                job.failed = Some(format!("{e:#}"));
                job.encoding = None;
                true
            }
        }
    }

    /// Each prompt's features, in the order the job was started with (see
    /// [`start_images`](Self::start_images)); the new ones are kept in the feature cache.
    pub fn finish_images(&self, job: ImageJob, done: bool) -> Vec<Result<EncodedImages>> {
        let ImageJob {
            prompts,
            keys,
            mut known,
            pictures,
            encoding,
            mut failed,
        } = job;
        debug_assert!(done || encoding.is_none() || failed.is_some());
        let vision = self.vision.as_ref();
        if let Some((enc, vision)) = encoding.filter(|_| failed.is_none()).zip(vision) {
            match vision.encoder.finish(enc) {
                Ok(feats) => match self.reuse.lock() {
                    Ok(mut reuse) => {
                        if reuse.features.len() + pictures.len() > FEATURE_CACHE_IMAGES {
                            reuse.features.clear();
                        }
                        for (i, &(key, w, h)) in pictures.iter().enumerate() {
                            match feats.get(i) {
                                Ok(f) => {
                                    reuse.features.insert(key, (f.clone(), w, h));
                                    known.insert(key, (f, w, h));
                                }
                                Err(e) => failed = Some(e.to_string()),
                            }
                        }
                    }
                    Err(_) => failed = Some("engine state poisoned".into()),
                },
                Err(e) => failed = Some(format!("{e:#}")),
            }
        }
        let new_keys: Vec<ImageKey> = pictures.iter().map(|p| p.0).collect();
        prompts
            .iter()
            .zip(keys)
            .map(|(spans, keys)| {
                let keys = keys?;
                if let Some(msg) = failed.as_ref().filter(|_| !keys.is_empty()) {
                    anyhow::bail!("cannot encode the pictures: {msg}");
                }
                let mut features = Vec::with_capacity(keys.len());
                let mut pics = Vec::with_capacity(keys.len());
                for ((start, path), key) in spans.iter().zip(&keys) {
                    let (f, w, h) = &known[key];
                    features.push(ImageFeatures {
                        first_position: start + 1,
                        features: f.clone(),
                    });
                    pics.push(Picture {
                        path: path.clone(),
                        width: *w,
                        height: *h,
                    });
                }
                let cached = keys.iter().filter(|k| !new_keys.contains(k)).count();
                Ok(EncodedImages {
                    features,
                    pictures: pics,
                    keys,
                    cached,
                })
            })
            .collect()
    }

    /// The KV cache to continue from: the previous reply's cache cut to the longest prefix it
    /// shares with `ids` (same tokens, same image contents), or an empty one. Reuse must give what a
    /// cold run gives, so it is refused when the cold prefill would pick another NTK alpha.
    fn take_prefix(&self, ids: &[u32], spans: &[(usize, ImageKey)]) -> Result<(KvCache, usize)> {
        let cold = || (self.lm.new_cache(), 0);
        let prev = match self.reuse.lock() {
            Ok(mut r) => r.prefix.take(),
            Err(_) => None,
        };
        let Some(mut prev) = prev else {
            return Ok(cold());
        };
        let mut n = prev.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        // An image inside the shared prefix must be the same picture, and a span is reused whole
        // or not at all.
        for &(start, key) in spans {
            let same = prev.images.iter().any(|&(s, k)| s == start && k == key);
            if start < n && (!same || n < start + lm::tokenizer::IMG_SPAN + 2) {
                n = n.min(start);
            }
        }
        // The last prompt position is always run: its logits start the reply.
        n = n.min(ids.len().saturating_sub(1));
        if n == 0 || prev.cache.ntk_alpha() != Some(self.lm.prefill_ntk_alpha(ids.len())) {
            return Ok(cold());
        }
        prev.cache.truncate(n)?;
        Ok((prev.cache, n))
    }
}

//! What the worker thread runs: a [`Backend`] loads a model and answers conversations. The real
//! one wraps [`Engine`]; [`ScriptedBackend`] replays fixed replies so tests (and the screenshot
//! demo) can drive the UI without a model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lm::checkpoint::LoadProgress;
use lm::generate::Finish;
use lm::prompt::Conversation;
use lm::quant::WeightType;
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
pub use crate::model_dir::{check_memory, check_model_dir, choose_weights, weights_bytes};
use crate::openai::ChatRequest;
use crate::remote::RemoteClient;
use crate::session::GenerateRequest;

/// User-adjustable generation settings; defaults come from the checkpoint's
/// `generation_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Sample (true) or always take the most likely token.
    pub do_sample: bool,
    pub temperature: f64,
    /// 1.0 disables top-p.
    pub top_p: f64,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables the penalty.
    pub repetition_penalty: f64,
    pub max_new_tokens: usize,
    pub system: String,
}

impl Default for Params {
    fn default() -> Self {
        Self::from_generation_config(&lm::GenerationConfig::default())
    }
}

impl Params {
    pub fn from_generation_config(g: &lm::GenerationConfig) -> Self {
        Self {
            do_sample: g.do_sample,
            temperature: g.temperature.unwrap_or(1.0),
            top_p: if g.top_p > 0.0 && g.top_p <= 1.0 {
                g.top_p
            } else {
                1.0
            },
            top_k: g.top_k,
            repetition_penalty: g.repetition_penalty.unwrap_or(1.0),
            max_new_tokens: g.max_new_tokens,
            system: lm::prompt::DEFAULT_SYSTEM.to_string(),
        }
    }

    /// These settings as a request, by the rules every front end shares
    /// ([`crate::session::options`]); `seed` varies per request so Regenerate gives a new answer.
    pub fn request(&self, seed: u64) -> GenerateRequest {
        let sample = self.do_sample && self.temperature > 0.0;
        GenerateRequest {
            max_new_tokens: Some(self.max_new_tokens.max(1) as u64),
            greedy: !sample,
            temperature: sample.then_some(self.temperature),
            top_p: sample.then_some(self.top_p),
            top_k: sample.then_some(self.top_k as u64),
            repetition_penalty: Some(self.repetition_penalty),
            seed: Some(seed),
            ignore_eos: false,
        }
    }
}

/// Where the model runs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSource {
    /// A model folder, run on this computer, with its weights held as `weights` (`None`: the
    /// default for this machine, see [`choose_weights`]).
    Folder {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weights: Option<WeightType>,
        /// A `--device` word (`cpu`, `cuda:0`, `metal:0`); `None`: the CPU.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    /// An OpenAI-compatible server serving Qwen-VL-Chat (`qwenvl serve`, vLLM).
    Server {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_key: Option<String>,
    },
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs and panic messages.
        match self {
            ModelSource::Folder { path, .. } => write!(f, "Folder({})", path.display()),
            ModelSource::Server { url, api_key } => write!(
                f,
                "Server({url}{})",
                if api_key.is_some() { ", with key" } else { "" }
            ),
        }
    }
}

impl ModelSource {
    pub fn folder(path: impl Into<PathBuf>) -> Self {
        ModelSource::Folder {
            path: path.into(),
            weights: None,
            device: None,
        }
    }

    /// Short name for the top bar: the folder's name, or the server's host and port.
    pub fn label(&self) -> String {
        match self {
            ModelSource::Folder { path, .. } => path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| path.display().to_string()),
            ModelSource::Server { url, .. } => url
                .split("://")
                .nth(1)
                .unwrap_or(url)
                .split('/')
                .next()
                .unwrap_or(url)
                .to_string(),
        }
    }

    /// The full folder path or URL.
    pub fn location(&self) -> String {
        match self {
            ModelSource::Folder { path, .. } => path.display().to_string(),
            ModelSource::Server { url, .. } => url.clone(),
        }
    }

    pub fn is_server(&self) -> bool {
        matches!(self, ModelSource::Server { .. })
    }
}

/// A loaded model as the UI shows it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub source: ModelSource,
    /// Short human description ("2 layers, hidden 128, f32").
    pub description: String,
    pub defaults: Params,
    pub load_ms: f64,
    /// Whether the model reads pictures (Qwen-VL); false for a text-only Qwen.
    pub vision: bool,
}

/// Numbers of one finished (or stopped) reply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplyStats {
    pub tokens: usize,
    pub time_to_first_token_ms: f64,
    pub tokens_per_s: f64,
    pub cancelled: bool,
    /// Oldest turns left out of the prompt because the history window was full.
    #[serde(default)]
    pub history_turns_dropped: usize,
}

impl ReplyStats {
    /// Rounded to 0.01 so that the numbers survive a JSON round trip exactly (a saved chat
    /// reloads equal to what was saved).
    pub fn rounded(mut self) -> Self {
        let r = |v: f64| (v * 100.0).round() / 100.0;
        self.time_to_first_token_ms = r(self.time_to_first_token_ms);
        self.tokens_per_s = r(self.tokens_per_s);
        self
    }
}

/// Loading stages reported while a model loads, with the fraction done when it is known.
pub type Progress<'a> = &'a dyn Fn(&str, Option<f32>);

pub trait Backend: Send {
    /// Loads the model of `source` (or connects to its server); `counter` counts the weight
    /// bytes read (the UI polls it). A server that cannot be reached leaves the model that was
    /// loaded before in place.
    fn load(
        &mut self,
        source: &ModelSource,
        progress: Progress<'_>,
        counter: &Arc<LoadProgress>,
    ) -> Result<ModelInfo>;
    /// Answers `conv` (image paths relative to `base_dir`), calling `on_text` with each new
    /// piece. Returns early, with `cancelled` set, once `cancel` is raised.
    fn reply(
        &mut self,
        conv: &Conversation,
        base_dir: &Path,
        params: &Params,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ReplyStats>;
}

/// The real model: on the CPU, or on a server.
#[derive(Default)]
pub struct EngineBackend {
    engine: Option<Engine>,
    /// The server and the model id it serves, when the model runs there.
    remote: Option<(RemoteClient, String)>,
    requests: u64,
}

impl Backend for EngineBackend {
    fn load(
        &mut self,
        source: &ModelSource,
        progress: Progress<'_>,
        counter: &Arc<LoadProgress>,
    ) -> Result<ModelInfo> {
        let (dir, weights, device) = match source {
            ModelSource::Folder {
                path,
                weights,
                device,
            } => (path.as_path(), *weights, device.as_deref().unwrap_or("cpu")),
            ModelSource::Server { url, api_key } => {
                return self.connect(url.as_str(), api_key.clone(), progress)
            }
        };
        progress("Checking the folder", None);
        check_model_dir(dir)?;
        // A device that is not there is an error, never a quiet fall back to the CPU.
        let device = crate::session::parse_device(device)?;
        // Free the previous model first: two large models may not fit together.
        self.engine = None;
        self.remote = None;
        let (wt, _) = crate::session::plan_load(dir, weights, &device)?;
        progress(&format!("Loading the weights as {wt}"), None);
        let engine = crate::session::load(dir, wt, &device, counter.clone())?;
        let cfg = &engine.checkpoint.config;
        let info = ModelInfo {
            source: source.clone(),
            description: format!(
                "{} layers, hidden {}, weights {wt}",
                cfg.num_hidden_layers, cfg.hidden_size
            ),
            defaults: Params::from_generation_config(&engine.checkpoint.generation),
            load_ms: engine.load_ms,
            vision: engine.vision.is_some(),
        };
        self.engine = Some(engine);
        Ok(info)
    }

    fn reply(
        &mut self,
        conv: &Conversation,
        base_dir: &Path,
        params: &Params,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ReplyStats> {
        self.requests += 1;
        let request = params.request(crate::session::fresh_seed());
        // The settings are checked here, the same for a local model and a server.
        request.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some((client, model)) = &self.remote {
            return remote_reply(client, model, conv, base_dir, &request, cancel, on_text);
        }
        let engine = self.engine.as_ref().context("no model is loaded")?;
        let opts = request
            .resolve(&engine.checkpoint.generation, 0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let reply = engine.reply(conv, base_dir, &opts, cancel, on_text)?;
        Ok(ReplyStats {
            tokens: reply.timings.generated_tokens,
            time_to_first_token_ms: reply.timings.time_to_first_token_ms,
            tokens_per_s: reply.timings.decode_tokens_per_s,
            cancelled: reply.generation.finish == Finish::Cancelled,
            history_turns_dropped: reply.prompt.history_turns_dropped,
        })
    }
}

impl EngineBackend {
    /// Checks the server answers and serves a model; the local model (if any) is freed only
    /// once it does.
    fn connect(
        &mut self,
        url: &str,
        api_key: Option<String>,
        progress: Progress<'_>,
    ) -> Result<ModelInfo> {
        let t0 = Instant::now();
        let client = RemoteClient::new(url, api_key.clone())?;
        progress(&format!("Connecting to {}", client.base()), None);
        let models = client.models()?;
        // vLLM may serve several models: take the Qwen-VL one.
        let model = models
            .iter()
            .find(|m| m.to_ascii_lowercase().contains("qwen"))
            .or(models.first())
            .cloned()
            .with_context(|| format!("{} serves no model", client.base()))?;
        let description = format!("{model} on {}", client.base());
        self.engine = None;
        self.remote = Some((client, model));
        Ok(ModelInfo {
            source: ModelSource::Server {
                url: url.to_string(),
                api_key,
            },
            description,
            defaults: Params::default(),
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            // A server that cannot read pictures says so when one is sent (a 400).
            vision: true,
        })
    }
}

/// One reply from the server: the conversation goes as OpenAI messages with the images inline.
fn remote_reply(
    client: &RemoteClient,
    model: &str,
    conv: &Conversation,
    base_dir: &Path,
    request: &GenerateRequest,
    cancel: &AtomicBool,
    on_text: &mut dyn FnMut(&str),
) -> Result<ReplyStats> {
    // The server applies the same rules (`temperature: 0` is greedy), so it answers as the
    // local engine would.
    let req = ChatRequest {
        model: model.to_string(),
        messages: crate::openai::to_messages(conv, base_dir)?,
        temperature: Some(if request.greedy {
            0.0
        } else {
            request.temperature.unwrap_or(1.0)
        }),
        top_p: request.top_p,
        top_k: request.top_k.map(|k| k as i64),
        repetition_penalty: request.repetition_penalty.filter(|r| *r != 1.0),
        seed: request.seed.map(|s| (s >> 1) as i64),
        max_tokens: request.max_new_tokens,
        ..ChatRequest::default()
    };
    let out = client.chat(&req, cancel, on_text)?;
    let tokens = out
        .usage
        .map(|u| u.completion_tokens as usize)
        .unwrap_or(out.pieces);
    Ok(ReplyStats {
        tokens,
        time_to_first_token_ms: out.time_to_first_token_ms,
        tokens_per_s: if out.pieces > 1 && out.streaming_s > 0.0 {
            (out.pieces - 1) as f64 / out.streaming_s
        } else {
            0.0
        },
        cancelled: out.cancelled,
        history_turns_dropped: 0,
    })
}

/// Replays scripted replies piece by piece (tests, demo). Records every conversation it is
/// asked to answer.
#[derive(Clone, Default)]
pub struct ScriptedBackend {
    /// Replies in order; the last one repeats.
    pub replies: Vec<Vec<String>>,
    /// Pause before each piece (lets tests observe streaming and stop it).
    pub delay: Duration,
    /// Every conversation received, with its base folder.
    pub seen: Arc<Mutex<Vec<(Conversation, PathBuf)>>>,
    /// `load` fails with this message when set.
    pub load_error: Option<String>,
    /// How long `load` takes.
    pub load_delay: Duration,
    /// Every source `load` was asked for.
    pub loads: Arc<Mutex<Vec<ModelSource>>>,
    count: usize,
}

impl ScriptedBackend {
    /// One reply, split into pieces at whitespace boundaries (as tokens would stream).
    pub fn new(reply: &str, delay: Duration) -> Self {
        Self {
            replies: vec![split_pieces(reply)],
            delay,
            ..Self::default()
        }
    }
}

/// Splits text into token-like pieces, each word with its leading space.
pub fn split_pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if (c == ' ' || c == '<') && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Backend for ScriptedBackend {
    fn load(
        &mut self,
        source: &ModelSource,
        progress: Progress<'_>,
        _counter: &Arc<LoadProgress>,
    ) -> Result<ModelInfo> {
        progress("Loading scripted model", None);
        self.loads.lock().unwrap().push(source.clone());
        let dir = match source {
            ModelSource::Folder { path, .. } => path.clone(),
            ModelSource::Server { .. } => PathBuf::new(),
        };
        std::thread::sleep(self.load_delay);
        if let Some(e) = &self.load_error {
            bail!("{e}");
        }
        let gen_path = dir.join("generation_config.json");
        let defaults = match std::fs::read(&gen_path) {
            Ok(bytes) => Params::from_generation_config(
                &serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: invalid JSON", gen_path.display()))?,
            ),
            Err(_) => Params::default(),
        };
        // Like the real model: a config.json without a `visual` section is a text-only Qwen.
        let vision = std::fs::read(dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_none_or(|c| c.get("visual").is_some());
        Ok(ModelInfo {
            source: source.clone(),
            description: "scripted replies".into(),
            defaults,
            load_ms: 0.0,
            vision,
        })
    }

    fn reply(
        &mut self,
        conv: &Conversation,
        base_dir: &Path,
        _params: &Params,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ReplyStats> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((conv.clone(), base_dir.to_path_buf()));
        }
        let pieces = self
            .replies
            .get(self.count)
            .or(self.replies.last())
            .cloned()
            .unwrap_or_default();
        self.count += 1;
        let t0 = Instant::now();
        let mut stats = ReplyStats::default();
        for piece in pieces {
            std::thread::sleep(self.delay);
            if cancel.load(Ordering::Relaxed) {
                stats.cancelled = true;
                break;
            }
            if stats.tokens == 0 {
                stats.time_to_first_token_ms = t0.elapsed().as_secs_f64() * 1e3;
            }
            on_text(&piece);
            stats.tokens += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        if secs > 0.0 {
            stats.tokens_per_s = stats.tokens as f64 / secs;
        }
        Ok(stats)
    }
}

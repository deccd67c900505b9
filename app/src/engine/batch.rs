//! Continuous batching: several replies generated together.
//!
//! Every step feeds each active sequence its next input — one token while it decodes, a chunk of
//! its prompt while it is prefilled — through one pass over the weights
//! ([`lm::model::QwenLm::forward_batch`]): decoding is bound by reading the weights, so sequences
//! that share a step share that read. Attention runs per sequence over its own KV cache, and each
//! keeps its own sampler, seed, stop tokens and length. Requests join between steps; the pictures
//! of requests that arrive together are encoded in one batch, and what arrives while others decode
//! — its pictures (a few vision blocks per step) and its prompt (a chunk per step) — is fed in
//! pieces so their streams keep flowing. A sequence leaves as soon as it ends or its client goes
//! away.
//! [`Engine::reply`] is a batch of one.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, Result};
use candle_core::Tensor;
use lm::generate::{Finish, GenerateOptions, Sequence, StreamDecoder};
use lm::model::{BatchStep, ImageFeatures, KvCache};
use lm::prompt::{Conversation, Prompt};

use super::{CachedPrefix, EncodedImages, Engine, ImageJob, ImageKey, Picture, Reply, Timings};

/// Where one reply's tokens and its end go.
pub trait ReplySink {
    /// Whether the reply should end now (its client went away, or a stop string was seen).
    fn cancelled(&self) -> bool;
    /// Every new token, the stop token included, as it is chosen.
    fn token(&mut self, _id: u32) {}
    /// New text as it becomes complete (never a stop token's).
    fn text(&mut self, piece: &str);
    /// The finished reply, or why there is none. Called exactly once.
    fn done(&mut self, reply: Result<Reply>);
}

/// One conversation to answer.
pub struct Request<'a> {
    pub conversation: Conversation,
    /// The reply already begun, which the model continues (empty: a fresh reply).
    pub reply_prefix: String,
    /// The folder image paths in the conversation are relative to.
    pub base_dir: PathBuf,
    pub options: GenerateOptions,
    pub sink: Box<dyn ReplySink + 'a>,
}

/// How much a batch may hold.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most sequences generated together.
    pub parallel: usize,
    /// KV-cache bytes the sequences may reserve together: each reserves what its prompt plus its
    /// longest reply can fill before it is let in (one is always let in, however long).
    pub kv_budget: usize,
    /// Most prompt positions fed in one step while other sequences decode.
    pub prefill_chunk: usize,
    /// Most vision-tower blocks run for new pictures in one step while other sequences decode
    /// (the full tower has 48).
    pub vision_blocks: usize,
}

impl BatchLimits {
    /// One sequence at a time (the app, `run`).
    pub fn one() -> Self {
        Self {
            parallel: 1,
            kv_budget: usize::MAX,
            prefill_chunk: usize::MAX,
            vision_blocks: usize::MAX,
        }
    }
}

/// Requests admitted together whose pictures are going through the vision tower.
struct Arrival<'a> {
    requests: Vec<(Request<'a>, Prompt)>,
    images: ImageJob,
    t0: Instant,
    prompt_ms: f64,
    vision_start: Instant,
}

/// A sequence of the batch.
struct Slot<'a> {
    sink: Box<dyn ReplySink + 'a>,
    prompt: Prompt,
    pictures: Vec<Picture>,
    spans: Vec<(usize, ImageKey)>,
    cached_images: usize,
    /// Prompt embeddings not fed yet (`[n, hidden]`); `None` once the prefill is done.
    todo: Option<Tensor>,
    cache: KvCache,
    reused: usize,
    seq: Sequence,
    stream: StreamDecoder,
    /// The token to feed next while decoding.
    next: Option<u32>,
    /// Logits of the last prompt position.
    first_logits: Option<Tensor>,
    /// KV-cache bytes set aside for this sequence.
    reserved: usize,
    t0: Instant,
    prompt_ms: f64,
    vision_ms: f64,
    prefill_start: Instant,
    prefill_ms: f64,
    decode_start: Option<Instant>,
    first_token_ms: Option<f64>,
}

/// Sequences being generated together, and those waiting for room.
pub struct Batcher<'e, 'a> {
    engine: &'e Engine,
    limits: BatchLimits,
    /// Admitted, their pictures being encoded (the front one advances each step).
    arriving: VecDeque<Arrival<'a>>,
    /// Prompted and encoded, waiting for a slot or for KV memory.
    waiting: VecDeque<Slot<'a>>,
    slots: Vec<Slot<'a>>,
}

impl<'e, 'a> Batcher<'e, 'a> {
    pub fn new(engine: &'e Engine, limits: BatchLimits) -> Self {
        Self {
            engine,
            limits: BatchLimits {
                parallel: limits.parallel.max(1),
                prefill_chunk: limits.prefill_chunk.max(1),
                vision_blocks: limits.vision_blocks.max(1),
                ..limits
            },
            arriving: VecDeque::new(),
            waiting: VecDeque::new(),
            slots: Vec::new(),
        }
    }

    /// Sequences being generated.
    pub fn active(&self) -> usize {
        self.slots.len()
    }

    /// Requests admitted but not generating yet: their pictures are being encoded, or they wait
    /// for a slot or for memory.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
            + self
                .arriving
                .iter()
                .map(|a| a.requests.len())
                .sum::<usize>()
    }

    /// How many more requests [`admit`](Self::admit) should be given now.
    pub fn room(&self) -> usize {
        self.limits
            .parallel
            .saturating_sub(self.slots.len() + self.waiting())
    }

    pub fn is_idle(&self) -> bool {
        self.slots.is_empty() && self.waiting.is_empty() && self.arriving.is_empty()
    }

    /// Whether some sequence is decoding (then new work is fed in small pieces between its steps).
    fn decoding(&self) -> bool {
        self.slots.iter().any(|s| s.todo.is_none())
    }

    /// Takes requests in: builds their prompts and starts encoding all their new pictures in one
    /// batch (at once when nothing is decoding, else a few vision blocks per step). A request
    /// that fails here gets its error at once.
    pub fn admit(&mut self, requests: Vec<Request<'a>>) {
        let engine = self.engine;
        let t0 = Instant::now();
        let mut prompted = Vec::with_capacity(requests.len());
        for mut r in requests {
            match engine.prompt_continuing(&r.conversation, &r.reply_prefix) {
                Ok(p) => prompted.push((r, p)),
                Err(e) => r.sink.done(Err(e)),
            }
        }
        if prompted.is_empty() {
            return;
        }
        let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
        let vision_start = Instant::now();
        let inputs: Vec<(&Prompt, &Path)> = prompted
            .iter()
            .map(|(r, p)| (p, r.base_dir.as_path()))
            .collect();
        let images = engine.start_images(&inputs);
        self.arriving.push_back(Arrival {
            requests: prompted,
            images,
            t0,
            prompt_ms,
            vision_start,
        });
        if !self.decoding() {
            self.encode(usize::MAX);
        }
        self.fill();
    }

    /// Runs up to `blocks` vision blocks of the arrivals, in order; those done become sequences
    /// waiting for a slot.
    fn encode(&mut self, mut blocks: usize) {
        while let Some(front) = self.arriving.front_mut() {
            let before = front.images.is_encoding();
            if !self.engine.advance_images(&mut front.images, blocks) {
                return;
            }
            // A step's budget is spent on the first arrival with pictures to encode.
            if before && blocks != usize::MAX {
                blocks = 0;
            }
            let Some(a) = self.arriving.pop_front() else {
                return;
            };
            let vision_ms = a.vision_start.elapsed().as_secs_f64() * 1e3;
            let encoded = self.engine.finish_images(a.images, true);
            for ((mut r, prompt), enc) in a.requests.into_iter().zip(encoded) {
                match enc.and_then(|enc| self.prepare(&r, prompt, enc)) {
                    Ok(mut slot) => {
                        slot.t0 = a.t0;
                        slot.prompt_ms = a.prompt_ms;
                        slot.vision_ms = vision_ms;
                        slot.sink = r.sink;
                        self.waiting.push_back(slot);
                    }
                    Err(e) => r.sink.done(Err(e)),
                }
            }
        }
    }

    /// A sequence ready to prefill: the reusable prefix of the previous reply's cache, the rest of
    /// the prompt embedded, the NTK alpha of the whole prompt fixed.
    fn prepare(&self, r: &Request<'_>, prompt: Prompt, enc: EncodedImages) -> Result<Slot<'a>> {
        let engine = self.engine;
        let EncodedImages {
            features,
            pictures,
            keys,
            cached,
        } = enc;
        let spans: Vec<(usize, ImageKey)> = prompt
            .images
            .iter()
            .map(|s| s.start)
            .zip(keys.iter().copied())
            .collect();
        let (mut cache, reused) = engine.take_prefix(&prompt.ids, &spans)?;
        // Only the images after the reused prefix still need writing into embeddings.
        let new_features: Vec<ImageFeatures> = features
            .into_iter()
            .filter(|f| f.first_position > reused)
            .map(|f| ImageFeatures {
                first_position: f.first_position - reused,
                features: f.features,
            })
            .collect();
        let todo = engine.lm.embed(&prompt.ids[reused..], &new_features)?;
        engine.lm.plan_prefill(&mut cache, prompt.ids.len());
        let max_pos = engine.checkpoint.config.max_position_embeddings;
        // The reply cannot run past the positions the model knows.
        let opts = GenerateOptions {
            max_new_tokens: r
                .options
                .max_new_tokens
                .min(max_pos.saturating_sub(prompt.ids.len())),
            ..r.options.clone()
        };
        let positions = (prompt.ids.len() + opts.max_new_tokens).min(max_pos);
        let now = Instant::now();
        Ok(Slot {
            sink: Box::new(Unset),
            seq: Sequence::new(&opts, &prompt.ids),
            prompt,
            pictures,
            spans,
            cached_images: cached,
            todo: Some(todo),
            cache,
            reused,
            stream: StreamDecoder::default(),
            next: None,
            first_logits: None,
            reserved: positions.saturating_mul(engine.lm.kv_bytes_per_position()),
            t0: now,
            prompt_ms: 0.0,
            vision_ms: 0.0,
            prefill_start: now,
            prefill_ms: 0.0,
            decode_start: None,
            first_token_ms: None,
        })
    }

    /// Lets waiting sequences in, in order, while there are slots and KV memory for them.
    fn fill(&mut self) {
        while let Some(w) = self.waiting.front() {
            let used: usize = self.slots.iter().map(|s| s.reserved).sum();
            let fits = used.saturating_add(w.reserved) <= self.limits.kv_budget;
            if self.slots.len() >= self.limits.parallel || !(fits || self.slots.is_empty()) {
                break;
            }
            if let Some(mut s) = self.waiting.pop_front() {
                s.prefill_start = Instant::now();
                self.slots.push(s);
            }
        }
    }

    /// One step of every active sequence. Returns whether work is left.
    pub fn step(&mut self) -> bool {
        // Requests whose client left end before they cost another step.
        let mut i = 0;
        while i < self.waiting.len() {
            match self.waiting[i].sink.cancelled() {
                true => {
                    if let Some(s) = self.waiting.remove(i) {
                        finish(self.engine, s, Finish::Cancelled);
                    }
                }
                false => i += 1,
            }
        }
        i = 0;
        while i < self.slots.len() {
            if self.slots[i].sink.cancelled() {
                let s = self.slots.remove(i);
                finish(self.engine, s, Finish::Cancelled);
            } else {
                i += 1;
            }
        }
        // New pictures: a few blocks while others decode, else all at once.
        let blocks = match self.decoding() {
            true => self.limits.vision_blocks,
            false => usize::MAX,
        };
        self.encode(blocks);
        self.fill();
        if self.slots.is_empty() {
            return !self.is_idle();
        }
        let chunk = if self.decoding() {
            self.limits.prefill_chunk
        } else {
            usize::MAX
        };
        // Each sequence's input: its next token, or the next chunk of its prompt.
        let mut inputs = Vec::with_capacity(self.slots.len());
        let mut failed = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let input = match (&s.todo, s.next) {
                (Some(t), _) => t
                    .dim(0)
                    .and_then(|n| t.narrow(0, 0, chunk.min(n)))
                    .map_err(anyhow::Error::from),
                (None, Some(id)) => self.engine.lm.embed(&[id], &[]).map_err(Into::into),
                (None, None) => Err(anyhow!("a sequence with nothing to feed")),
            };
            match input {
                Ok(x) => inputs.push(x),
                Err(e) => failed.push((i, e)),
            }
        }
        for (i, e) in failed.into_iter().rev() {
            let mut s = self.slots.remove(i);
            s.sink.done(Err(e));
        }
        if self.slots.is_empty() {
            return !self.is_idle();
        }
        let fed: Vec<usize> = inputs.iter().map(|x| x.dim(0).unwrap_or(0)).collect();
        let logits = {
            let mut steps: Vec<BatchStep<'_>> = self
                .slots
                .iter_mut()
                .zip(inputs)
                .map(|(s, embeds)| BatchStep {
                    embeds,
                    cache: &mut s.cache,
                })
                .collect();
            self.engine
                .lm
                .forward_batch(&mut steps)
                .and_then(|l| Ok((l.to_vec2::<f32>()?, l)))
        };
        let (rows, logits) = match logits {
            Ok(l) => l,
            Err(e) => {
                self.fail_all(e.into());
                return !self.is_idle();
            }
        };
        let mut ended = Vec::new();
        for (i, (s, row)) in self.slots.iter_mut().zip(&rows).enumerate() {
            if let Some(todo) = &s.todo {
                let n = todo.dim(0).unwrap_or(0);
                if fed[i] < n {
                    match todo.narrow(0, fed[i], n - fed[i]) {
                        Ok(rest) => s.todo = Some(rest),
                        Err(e) => ended.push((i, Err(e.into()))),
                    }
                    continue;
                }
                s.todo = None;
                s.prefill_ms = s.prefill_start.elapsed().as_secs_f64() * 1e3;
                s.decode_start = Some(Instant::now());
                s.first_logits = logits.get(i).ok();
            }
            if s.seq.is_full() {
                ended.push((i, Ok(Finish::Length)));
                continue;
            }
            let (id, stop) = s.seq.next(row);
            s.first_token_ms
                .get_or_insert_with(|| s.t0.elapsed().as_secs_f64() * 1e3);
            s.sink.token(id);
            if stop.is_none() {
                let piece = s.stream.push(&self.engine.tokenizer, id);
                if !piece.is_empty() {
                    s.sink.text(&piece);
                }
            }
            match stop {
                Some(stop) => ended.push((i, Ok(stop))),
                None if s.seq.is_full() => ended.push((i, Ok(Finish::Length))),
                None => s.next = Some(id),
            }
        }
        for (i, end) in ended.into_iter().rev() {
            let mut s = self.slots.remove(i);
            match end {
                Ok(f) => finish(self.engine, s, f),
                Err(e) => s.sink.done(Err(e)),
            }
        }
        !self.is_idle()
    }

    /// Ends every sequence with `error` (the model failed in a way that concerns them all).
    pub fn fail_all(&mut self, error: anyhow::Error) {
        let mut all: Vec<Slot<'a>> = self.slots.drain(..).collect();
        all.extend(self.waiting.drain(..));
        let mut arriving: Vec<Request<'a>> = self
            .arriving
            .drain(..)
            .flat_map(|a| a.requests.into_iter().map(|(r, _)| r))
            .collect();
        if all.is_empty() && arriving.len() == 1 {
            return arriving[0].sink.done(Err(error));
        }
        if let ([s], true) = (&mut all[..], arriving.is_empty()) {
            s.sink.done(Err(error));
            return;
        }
        let msg = format!("{error:#}");
        for mut s in all {
            s.sink.done(Err(anyhow!("{msg}")));
        }
        for r in &mut arriving {
            r.sink.done(Err(anyhow!("{msg}")));
        }
    }
}

/// A sink for a slot under construction (replaced before the slot is queued).
struct Unset;

impl ReplySink for Unset {
    fn cancelled(&self) -> bool {
        true
    }
    fn text(&mut self, _: &str) {}
    fn done(&mut self, _: Result<Reply>) {}
}

/// Ends a sequence: its last text, its cache kept for a follow-up, its reply to the sink.
fn finish(engine: &Engine, mut s: Slot<'_>, finish: Finish) {
    let rest = s.stream.flush();
    if !rest.is_empty() {
        s.sink.text(&rest);
    }
    let generation = s.seq.finish(finish);
    let decode_ms = s
        .decode_start
        .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    // Keep the cache (prompt and every reply token fed through the model) for a follow-up.
    let fed: Vec<u32> = s
        .prompt
        .ids
        .iter()
        .chain(&generation.ids)
        .copied()
        .take(s.cache.len())
        .collect();
    if let Ok(mut r) = engine.reuse.lock() {
        r.prefix = Some(CachedPrefix {
            ids: fed,
            images: std::mem::take(&mut s.spans),
            cache: std::mem::take(&mut s.cache),
        });
    }
    let text = engine
        .tokenizer
        .decode(generation.content_ids(), false, false)
        .trim()
        .to_string();
    let n = generation.ids.len();
    let timings = Timings {
        prompt_ms: s.prompt_ms,
        vision_ms: s.vision_ms,
        prefill_ms: s.prefill_ms,
        decode_ms,
        time_to_first_token_ms: s.first_token_ms.unwrap_or(0.0),
        prompt_tokens: s.prompt.ids.len(),
        reused_prefix_tokens: s.reused,
        cached_images: s.cached_images,
        generated_tokens: n,
        // The first token comes from the prefill's logits; the rest each cost one step.
        decode_tokens_per_s: if n > 1 && decode_ms > 0.0 {
            (n - 1) as f64 / (decode_ms / 1e3)
        } else {
            0.0
        },
        cpu: engine
            .device
            .is_cpu()
            .then(|| ::kernels::cpu::level().name()),
    };
    let last_logits = match s.first_logits.take() {
        Some(l) => l,
        None => {
            // Cancelled before its prefill ended: there are no logits to give.
            let vocab = engine.checkpoint.config.vocab_size;
            match Tensor::zeros(vocab, candle_core::DType::F32, &engine.device) {
                Ok(t) => t,
                Err(e) => return s.sink.done(Err(e.into())),
            }
        }
    };
    let reply = Reply {
        prompt: s.prompt,
        generation,
        text,
        pictures: s.pictures,
        last_logits,
        timings,
    };
    s.sink.done(Ok(reply));
}

impl Engine {
    /// Answers the conversation: prompt, images, prefill, then generation with `on_text` called
    /// for every piece of new text as it becomes complete. A batch of one sequence.
    pub fn reply(
        &self,
        conv: &Conversation,
        base_dir: &Path,
        opts: &GenerateOptions,
        cancel: &AtomicBool,
        on_text: impl FnMut(&str),
    ) -> Result<Reply> {
        self.reply_continuing(conv, "", base_dir, opts, cancel, on_text)
    }

    /// [`reply`](Self::reply) continuing the reply begun by `reply_prefix` (tool use).
    pub fn reply_continuing(
        &self,
        conv: &Conversation,
        reply_prefix: &str,
        base_dir: &Path,
        opts: &GenerateOptions,
        cancel: &AtomicBool,
        on_text: impl FnMut(&str),
    ) -> Result<Reply> {
        struct One<'c, F> {
            cancel: &'c AtomicBool,
            on_text: F,
            out: &'c RefCell<Option<Result<Reply>>>,
        }
        impl<F: FnMut(&str)> ReplySink for One<'_, F> {
            fn cancelled(&self) -> bool {
                self.cancel.load(Ordering::Relaxed)
            }
            fn text(&mut self, piece: &str) {
                (self.on_text)(piece)
            }
            fn done(&mut self, reply: Result<Reply>) {
                *self.out.borrow_mut() = Some(reply);
            }
        }
        let out = RefCell::new(None);
        {
            let mut batch = Batcher::new(self, BatchLimits::one());
            batch.admit(vec![Request {
                conversation: conv.clone(),
                reply_prefix: reply_prefix.to_string(),
                base_dir: base_dir.to_path_buf(),
                options: opts.clone(),
                sink: Box::new(One {
                    cancel,
                    on_text,
                    out: &out,
                }),
            }]);
            while batch.step() {}
        }
        out.into_inner()
            .unwrap_or_else(|| Err(anyhow!("the reply ended without a result")))
    }
}

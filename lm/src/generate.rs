//! Token generation: greedy or sampled (temperature, top-k, top-p, repetition penalty), stop tokens,
//! a per-token callback for streaming, and cancellation.
//!
//! Sampling follows the Hugging Face processors the reference uses, in their order: repetition
//! penalty, temperature, top-k, top-p. The repetition penalty is a logits processor, not a sampling
//! setting: the reference `generate` applies it before the argmax of greedy decoding too.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::model::{KvCache, QwenLm};
use crate::tokenizer::{ENDOFTEXT, IM_END, IM_START};

/// The tokens that end a chat reply.
pub const CHAT_STOP_IDS: [u32; 3] = [IM_END, IM_START, ENDOFTEXT];

/// Sampling settings; `None` fields are disabled.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl SamplingParams {
    /// The checkpoint's defaults (`generation_config.json`).
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        Self {
            temperature: g.temperature.unwrap_or(1.0),
            top_p: Some(g.top_p).filter(|p| *p > 0.0 && *p < 1.0),
            top_k: Some(g.top_k).filter(|k| *k > 0),
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decoding {
    /// Argmax at every step, ties to the lowest id.
    Greedy,
    Sample(SamplingParams),
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub decoding: Decoding,
    /// Divides positive (multiplies negative) logits of every id seen so far, in greedy and
    /// sampled decoding alike; `None` (or 1) is off.
    pub repetition_penalty: Option<f64>,
    pub stop_ids: Vec<u32>,
}

impl GenerateOptions {
    /// Defaults of the checkpoint: sampling if `do_sample`, else greedy; chat stop tokens.
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        Self {
            max_new_tokens: g.max_new_tokens,
            decoding: if g.do_sample {
                Decoding::Sample(SamplingParams::from_generation_config(g))
            } else {
                Decoding::Greedy
            },
            repetition_penalty: g.repetition_penalty.filter(|p| *p != 1.0),
            stop_ids: CHAT_STOP_IDS.to_vec(),
        }
    }

    /// Plain argmax decoding with the chat stop tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            decoding: Decoding::Greedy,
            repetition_penalty: None,
            stop_ids: CHAT_STOP_IDS.to_vec(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was produced (it is the last of `ids`).
    Stop(u32),
    /// `max_new_tokens` were produced.
    Length,
    /// The cancel flag was raised or the callback asked to stop.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids, including the stop token when `finish` is `Stop`.
    pub ids: Vec<u32>,
    pub finish: Finish,
}

impl Generation {
    /// The new ids without a trailing stop token.
    pub fn content_ids(&self) -> &[u32] {
        match self.finish {
            Finish::Stop(_) => &self.ids[..self.ids.len().saturating_sub(1)],
            _ => &self.ids,
        }
    }
}

/// What the per-token callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Index of the largest value; ties go to the lowest index. NaNs never win.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// Chooses the next token from `logits` given every id seen so far (prompt and reply).
pub struct Sampler {
    decoding: Decoding,
    repetition_penalty: Option<f64>,
    rng: StdRng,
}

impl Sampler {
    pub fn new(decoding: Decoding, repetition_penalty: Option<f64>) -> Self {
        let seed = match &decoding {
            Decoding::Sample(p) => p.seed,
            Decoding::Greedy => 0,
        };
        Self {
            decoding,
            repetition_penalty: repetition_penalty.filter(|p| *p != 1.0),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn next(&mut self, logits: &[f32], seen: &[u32]) -> u32 {
        let penalized;
        let logits = match self.repetition_penalty {
            Some(penalty) => {
                penalized = apply_repetition_penalty(logits, seen, penalty);
                &penalized[..]
            }
            None => logits,
        };
        let p = match &self.decoding {
            Decoding::Greedy => return argmax(logits),
            Decoding::Sample(p) => p,
        };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = p.temperature as f32;
        // Candidates sorted by logit, best first (stable: ties keep the lower id first).
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        if order.is_empty() {
            return argmax(logits);
        }
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if let Some(k) = p.top_k {
            order.truncate(k.max(1));
        }
        let max = logits[order[0] as usize] / t;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] / t - max) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = p.top_p {
            // Keep a token while the mass of the better tokens is still below top_p.
            let mut cum = 0.0;
            let mut keep = 0;
            for &pr in &probs {
                if cum < top_p || keep == 0 {
                    keep += 1;
                    cum += pr;
                } else {
                    break;
                }
            }
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (&id, &pr) in order.iter().zip(&probs) {
            if r < pr {
                return id;
            }
            r -= pr;
        }
        order[order.len() - 1]
    }
}

/// Hugging Face's `RepetitionPenaltyLogitsProcessor`: each id seen (once, however often it
/// occurs) has its logit divided by `penalty` when positive and multiplied when negative.
pub fn apply_repetition_penalty(logits: &[f32], seen: &[u32], penalty: f64) -> Vec<f32> {
    let mut out = logits.to_vec();
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if let Some(l) = out.get_mut(id as usize) {
            if done.insert(id) {
                *l = if *l < 0.0 {
                    *l * penalty as f32
                } else {
                    *l / penalty as f32
                };
            }
        }
    }
    out
}

/// One reply being generated: its sampler, every id seen so far and the ids produced, and when it
/// ends. [`generate`] drives one to the end; a batch of sequences takes a step of each in turn.
pub struct Sequence {
    sampler: Sampler,
    seen: Vec<u32>,
    prompt_len: usize,
    max_new_tokens: usize,
    stop_ids: Vec<u32>,
}

impl Sequence {
    pub fn new(opts: &GenerateOptions, prompt_ids: &[u32]) -> Self {
        Self {
            sampler: Sampler::new(opts.decoding.clone(), opts.repetition_penalty),
            seen: prompt_ids.to_vec(),
            prompt_len: prompt_ids.len(),
            max_new_tokens: opts.max_new_tokens,
            stop_ids: opts.stop_ids.clone(),
        }
    }

    /// The ids produced so far.
    pub fn ids(&self) -> &[u32] {
        &self.seen[self.prompt_len..]
    }

    /// Whether `max_new_tokens` have been produced.
    pub fn is_full(&self) -> bool {
        self.ids().len() >= self.max_new_tokens
    }

    /// Chooses the next id from the logits of the last position fed; returns it and `Some` of
    /// [`Finish::Stop`] when it is a stop token.
    pub fn next(&mut self, logits: &[f32]) -> (u32, Option<Finish>) {
        let next = self.sampler.next(logits, &self.seen);
        self.seen.push(next);
        let stop = self.stop_ids.contains(&next).then_some(Finish::Stop(next));
        (next, stop)
    }

    /// The reply so far, ended for `finish`.
    pub fn finish(self, finish: Finish) -> Generation {
        let mut ids = self.seen;
        ids.drain(..self.prompt_len);
        Generation { ids, finish }
    }
}

/// Generates after a prefill: `logits` are those of the last prompt position, `cache` holds the
/// prompt. `on_token` is called with every new id (the stop token included) and may stop early.
pub fn generate(
    model: &QwenLm,
    cache: &mut KvCache,
    logits: Tensor,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    cancel: &AtomicBool,
    mut on_token: impl FnMut(u32) -> Flow,
) -> Result<Generation> {
    let mut seq = Sequence::new(opts, prompt_ids);
    let mut logits = logits;
    while !seq.is_full() {
        if cancel.load(Ordering::Relaxed) {
            return Ok(seq.finish(Finish::Cancelled));
        }
        let values: Vec<f32> = logits.to_vec1().map_err(Error::Candle)?;
        let (next, stop) = seq.next(&values);
        let flow = on_token(next);
        if let Some(stop) = stop {
            return Ok(seq.finish(stop));
        }
        if flow == Flow::Stop {
            return Ok(seq.finish(Finish::Cancelled));
        }
        if seq.is_full() {
            break;
        }
        logits = model.forward(&[next], &[], cache)?;
    }
    Ok(seq.finish(Finish::Length))
}

/// Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences so a
/// multi-byte character split over two tokens is emitted whole.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// Adds a token and returns the text that became complete (possibly empty).
    pub fn push(&mut self, tok: &crate::tokenizer::QwenTokenizer, id: u32) -> String {
        if let Some(bytes) = tok.token_bytes(id) {
            self.pending.extend_from_slice(bytes);
            let mut out = String::new();
            loop {
                match std::str::from_utf8(&self.pending) {
                    Ok(s) => {
                        out.push_str(s);
                        self.pending.clear();
                        break;
                    }
                    Err(e) => {
                        let valid = e.valid_up_to();
                        out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                        match e.error_len() {
                            // An invalid sequence can never complete: replace it like `decode`.
                            Some(n) => {
                                out.push(char::REPLACEMENT_CHARACTER);
                                self.pending.drain(..valid + n);
                            }
                            // An incomplete character: wait for the next token.
                            None => {
                                self.pending.drain(..valid);
                                break;
                            }
                        }
                    }
                }
            }
            out
        } else {
            let mut out = self.flush();
            out.push_str(&tok.decode(&[id], false, false));
            out
        }
    }

    /// Whatever is still held back, with invalid bytes replaced.
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

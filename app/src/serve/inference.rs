//! The inference thread: answers queued requests in one continuous batch ([`Batcher`]): up to
//! `--parallel` sequences decode together, new requests join between steps.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use axum::http::StatusCode;
use lm::generate::Finish;

use super::error::ApiError;
use super::metrics::Metrics;
use super::queue::FairQueue;
use super::state::{Job, JobEvent, Outcome, ToolForm};
use crate::engine::{BatchLimits, Batcher, Engine, Reply, ReplySink, Request};
use crate::openai::{BoxOut, FunctionCall, ToolCallOut, Usage};
use crate::session::text::TextFilter;

/// The inference thread: runs the batch until the queue closes and every request is answered.
pub(super) fn inference_loop(
    engine: &Engine,
    queue: &FairQueue<Job>,
    limits: BatchLimits,
    metrics: &Arc<Metrics>,
) {
    let mut batch = Batcher::new(engine, limits);
    loop {
        // New requests join between steps; the thread only waits for one when nothing runs.
        let mut new = Vec::new();
        while new.len() < batch.room() {
            let job = if batch.is_idle() && new.is_empty() {
                queue.pop()
            } else {
                queue.try_pop()
            };
            let Some(job) = job else { break };
            if job.cancel.load(Ordering::SeqCst) {
                eprintln!("{}: cancelled while queued (the client left)", job.label);
                continue;
            }
            new.push(request(job, metrics.clone()));
        }
        if batch.is_idle() && new.is_empty() {
            return;
        }
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if !new.is_empty() {
                batch.admit(new);
            }
            metrics.busy.store(batch.active(), Ordering::Relaxed);
            metrics.waiting.store(batch.waiting(), Ordering::Relaxed);
            batch.step();
        }));
        if let Err(p) = ran {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            batch.fail_all(anyhow::anyhow!("internal error: {what}"));
        }
        metrics.busy.store(batch.active(), Ordering::Relaxed);
        metrics.waiting.store(batch.waiting(), Ordering::Relaxed);
    }
}

fn request<'a>(job: Job, metrics: Arc<Metrics>) -> Request<'a> {
    Request {
        conversation: job.conversation.clone(),
        reply_prefix: job.reply_prefix.clone(),
        base_dir: job.images.path().to_path_buf(),
        options: job.options.clone(),
        sink: Box::new(JobSink {
            filter: TextFilter::new(job.stops.clone()),
            job,
            metrics,
            started: Instant::now(),
            last_token: None,
        }),
    }
}

/// Sends one request's text to its client as it comes and its outcome at the end.
struct JobSink {
    job: Job,
    filter: TextFilter,
    metrics: Arc<Metrics>,
    started: Instant,
    last_token: Option<Instant>,
}

impl ReplySink for JobSink {
    fn cancelled(&self) -> bool {
        self.job.cancel.load(Ordering::SeqCst)
    }

    fn token(&mut self, _id: u32) {
        let now = Instant::now();
        match self.last_token {
            None => self
                .metrics
                .first_token((now - self.job.arrived).as_secs_f64()),
            Some(t) => self.metrics.between_tokens((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    fn text(&mut self, piece: &str) {
        let out = self.filter.push(piece);
        if self.filter.stopped() {
            self.job.cancel.store(true, Ordering::SeqCst);
        }
        // With tools offered, whether the text is an answer or a call is known only at its
        // end: it is sent then, read.
        if !out.is_empty() && self.job.tools == ToolForm::Off {
            let _ = self.job.events.send(JobEvent::Text(out));
        }
    }

    fn done(&mut self, reply: Result<Reply>) {
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        let label = self.job.label.clone();
        let event = match self.outcome(reply) {
            Ok(o) => {
                eprintln!(
                    "{label}: finish={} prompt_tokens={} completion_tokens={} {ms:.0} ms",
                    o.finish_reason, o.usage.prompt_tokens, o.usage.completion_tokens
                );
                self.metrics
                    .tokens(o.usage.prompt_tokens, o.usage.completion_tokens);
                JobEvent::Done(o)
            }
            Err(e) => {
                eprintln!("{label}: failed ({}): {}", e.status, e.detail.message);
                JobEvent::Failed(e)
            }
        };
        let _ = self.job.events.send(event);
    }
}

impl JobSink {
    fn outcome(&mut self, reply: Result<Reply>) -> Result<Outcome, ApiError> {
        let reply = reply.map_err(|e| {
            // The request was checked before queueing: what fails here is an image that cannot
            // be decoded after all (a truncated file with a good header), or the server itself.
            let msg = format!("{e:#}");
            if e.chain()
                .any(|c| c.downcast_ref::<vision::Error>().is_some())
            {
                ApiError::invalid(msg).param("messages")
            } else {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, msg)
            }
        })?;
        let tail = self.filter.finish();
        if !tail.is_empty() && self.job.tools == ToolForm::Off {
            let _ = self.job.events.send(JobEvent::Text(tail));
        }
        let mut finish_reason = if self.filter.stopped() {
            "stop"
        } else {
            match reply.generation.finish {
                Finish::Stop(_) => "stop",
                Finish::Length => "length",
                Finish::Cancelled => "cancelled",
            }
        };
        let mut text = self.filter.text().to_string();
        let (mut tool_calls, mut function_call) = (None, None);
        if self.job.tools != ToolForm::Off {
            let read = crate::session::tools::read_reply(&text);
            text = read.content;
            if let Some(call) = read.call {
                let call = FunctionCall {
                    name: call.name,
                    arguments: call.arguments,
                };
                if self.job.tools == ToolForm::Tools {
                    finish_reason = "tool_calls";
                    tool_calls = Some(vec![ToolCallOut {
                        id: format!("call_{:016x}", crate::session::fresh_seed()),
                        kind: "function".into(),
                        function: call,
                    }]);
                } else {
                    finish_reason = "function_call";
                    function_call = Some(call);
                }
            }
        }
        let boxes = crate::session::reply_boxes(&reply, &text)
            .into_iter()
            .map(|b| BoxOut {
                label: b.label,
                grid: b.grid,
                image: b.picture.map(|i| i + 1),
                box_px: b.px,
            })
            .collect();
        let prompt_tokens = reply.prompt.ids.len() as u64;
        let completion_tokens = reply.generation.ids.len() as u64;
        Ok(Outcome {
            text,
            finish_reason,
            usage: Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
            },
            boxes,
            tool_calls,
            function_call,
            text_held: self.job.tools != ToolForm::Off,
        })
    }
}

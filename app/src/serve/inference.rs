//! The inference thread: answers queued requests one at a time.

use std::sync::atomic::Ordering;

use anyhow::Result;
use axum::http::StatusCode;
use lm::generate::Finish;

use super::error::ApiError;
use super::queue::FairQueue;
use super::state::{Job, JobEvent, Outcome};
use super::text::TextFilter;
use crate::engine::Engine;
use crate::openai::{BoxOut, Usage};

/// The inference thread: answers queued requests one at a time until the queue closes.
pub(super) fn inference_loop(engine: &Engine, queue: &FairQueue<Job>) {
    while let Some(job) = queue.pop() {
        if job.cancel.load(Ordering::SeqCst) {
            eprintln!("{}: cancelled while queued (the client left)", job.label);
            continue;
        }
        let events = job.events.clone();
        let t0 = std::time::Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(engine, &job)));
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match &r {
            Ok(Ok(o)) => eprintln!(
                "{}: finish={} prompt_tokens={} completion_tokens={} {ms:.0} ms",
                job.label, o.finish_reason, o.usage.prompt_tokens, o.usage.completion_tokens
            ),
            Ok(Err(e)) => eprintln!("{}: failed ({}): {}", job.label, e.status, e.detail.message),
            Err(_) => eprintln!("{}: internal error", job.label),
        }
        let event = match r {
            Ok(Ok(outcome)) => JobEvent::Done(outcome),
            Ok(Err(e)) => JobEvent::Failed(e),
            Err(p) => JobEvent::Failed(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                None,
                format!(
                    "internal error: {}",
                    p.downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default()
                ),
            )),
        };
        let _ = events.send(event);
    }
}

fn answer(engine: &Engine, job: &Job) -> Result<Outcome, ApiError> {
    let mut filter = TextFilter::new(job.stops.clone());
    let reply = engine
        .reply(
            &job.conversation,
            job.images.path(),
            &job.options,
            &job.cancel,
            |piece| {
                let out = filter.push(piece);
                if filter.stopped() {
                    job.cancel.store(true, Ordering::SeqCst);
                }
                if !out.is_empty() {
                    let _ = job.events.send(JobEvent::Text(out));
                }
            },
        )
        .map_err(|e| {
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
    let tail = filter.finish();
    if !tail.is_empty() {
        let _ = job.events.send(JobEvent::Text(tail));
    }
    let finish_reason = if filter.stopped() {
        "stop"
    } else {
        match reply.generation.finish {
            Finish::Stop(_) => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    };
    let text = filter.text().to_string();
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
    })
}

//! What the server's parts share: the server itself, a queued request (`Job`) and what the
//! inference thread sends back about it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lm::generate::GenerateOptions;
use lm::prompt::Conversation;
use tokio::sync::mpsc::UnboundedSender;

use super::args::ServeArgs;
use super::error::ApiError;
use super::metrics::Metrics;
use super::queue::FairQueue;
use crate::engine::Engine;
use crate::openai::{BoxOut, FunctionCall, ToolCallOut, Usage};

/// What a request gets back from the inference thread.
pub(super) enum JobEvent {
    Text(String),
    Done(Outcome),
    Failed(ApiError),
}

pub(super) struct Outcome {
    pub(super) text: String,
    pub(super) finish_reason: &'static str,
    pub(super) usage: Usage,
    pub(super) boxes: Vec<BoxOut>,
    /// The call the model made, in the form the request asked for.
    pub(super) tool_calls: Option<Vec<ToolCallOut>>,
    pub(super) function_call: Option<FunctionCall>,
    /// The text was not streamed as it came (tools were offered): a stream sends it now.
    pub(super) text_held: bool,
}

/// Whether a request offered tools, and in which form: the reply's call comes back in the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ToolForm {
    /// No tools offered: the reply is plain text.
    Off,
    /// `tools`: answered with `tool_calls` and `finish_reason: "tool_calls"`.
    Tools,
    /// The older `functions`: answered with `function_call` and `"function_call"`.
    Functions,
}

pub(super) struct Job {
    /// `chatcmpl-N from ADDR`, for the request log.
    pub(super) label: String,
    pub(super) conversation: Conversation,
    /// The reply already begun (a tool's result came back), which the model continues.
    pub(super) reply_prefix: String,
    pub(super) tools: ToolForm,
    /// The request's decoded images; deleted when the job is dropped.
    pub(super) images: tempfile::TempDir,
    pub(super) options: GenerateOptions,
    pub(super) stops: Vec<String>,
    pub(super) cancel: Arc<AtomicBool>,
    pub(super) events: UnboundedSender<JobEvent>,
    /// When the request came in (time to first token counts from here).
    pub(super) arrived: Instant,
}

pub(super) struct Server {
    /// Set once the model has loaded; until then `/health` says 503 and requests are refused
    /// with 503 and `Retry-After`.
    pub(super) engine: OnceLock<Arc<Engine>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) model_id: String,
    pub(super) args: ServeArgs,
    pub(super) queue: Arc<FairQueue<Job>>,
    pub(super) requests: AtomicU64,
    pub(super) created: u64,
}

/// Raises the request's cancel flag when the response (or the handler) is dropped, which is what
/// happens when the client disconnects.
pub(super) struct CancelOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Server {
    /// The loaded engine, or the 503 a request gets while the model is still loading.
    pub(super) fn engine(&self) -> Result<&Arc<Engine>, ApiError> {
        self.engine.get().ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("loading"),
                "the model is still loading: retry shortly",
            )
            .retry_after(5)
        })
    }
}

pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

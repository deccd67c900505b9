//! `qwenvl serve`: an OpenAI-compatible HTTP server over the engine.
//!
//! `POST /v1/chat/completions` (plain or `stream: true` server-sent events) and `GET /v1/models`.
//! Requests are checked and turned into a conversation on the async side (images from `data:`
//! URLs are written to a per-request temporary folder, which the engine reads like any other
//! picture), then queued; one inference thread answers them in turn, round-robin across clients
//! ([`queue::FairQueue`]). A client that goes away raises its request's cancel flag: a queued
//! request is dropped, a running one stops at the next token.

pub mod queue;
pub mod text;

#[cfg(test)]
mod tests {
    use super::default_model_id;
    use std::path::Path;

    #[test]
    fn model_ids_of_cache_snapshots_and_plain_folders() {
        let snap = Path::new("/nonexistent/hub/models--Qwen--Qwen-VL-Chat/snapshots/0123abc");
        assert_eq!(default_model_id(snap), "Qwen/Qwen-VL-Chat");
        assert_eq!(default_model_id(Path::new("/nonexistent/tiny-a")), "tiny-a");
        assert_eq!(default_model_id(Path::new("/nonexistent/snapshots/x")), "x");
    }
}

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use candle_core::Device;
use lm::generate::{Decoding, Finish, GenerateOptions, SamplingOverrides, SamplingParams};
use lm::prompt::Conversation;
use lm::quant::WeightType;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::Engine;
use crate::openai::{
    self, BoxOut, ChatChunk, ChatCompletion, ChatRequest, Choice, ChunkChoice, Delta, ErrorBody,
    ErrorDetail, MessageError, ModelCard, ModelList, ReplyMessage, Usage,
};
use queue::FairQueue;
use text::TextFilter;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model folder (config.json, qwen.tiktoken, weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on. The default answers this machine only; another address exposes the
    /// model to the network (use --api-key there).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port; 0 picks a free one (the address is printed either way).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request (also read from QWENVL_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model id clients name in requests (default: the model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// In-memory weight type (q4k, q8_0, bf16, f32, …); default: f32 for small checkpoints, q8_0
    /// or q4k for the real model, as the app chooses.
    #[arg(long, value_parser = crate::parse_weight_type)]
    pub quant: Option<WeightType>,
    /// Accept `file://` URLs and plain paths in `image_url` (read with the server's rights).
    #[arg(long)]
    pub allow_local_files: bool,
    /// Largest request body, in MiB (images come inline as base64).
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// Most images in one request (all messages together).
    #[arg(long, default_value_t = 16)]
    pub max_images: usize,
    /// Most pixels of one image (width × height).
    #[arg(long, default_value_t = 50_000_000)]
    pub max_image_pixels: u64,
    /// Most requests waiting for the model; more get 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
}

/// What a request gets back from the inference thread.
enum JobEvent {
    Text(String),
    Done(Outcome),
    Failed(ApiError),
}

struct Outcome {
    text: String,
    finish_reason: &'static str,
    usage: Usage,
    boxes: Vec<BoxOut>,
}

struct Job {
    /// `chatcmpl-N from ADDR`, for the request log.
    label: String,
    conversation: Conversation,
    /// The request's decoded images; deleted when the job is dropped.
    images: tempfile::TempDir,
    options: GenerateOptions,
    stops: Vec<String>,
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<JobEvent>,
}

struct Server {
    engine: Arc<Engine>,
    model_id: String,
    args: ServeArgs,
    queue: Arc<FairQueue<Job>>,
    requests: AtomicU64,
    created: u64,
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    fn new(status: StatusCode, kind: &str, code: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: ErrorDetail {
                message: message.into(),
                kind: kind.into(),
                param: None,
                code: code.map(str::to_string),
            },
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }

    fn param(mut self, p: impl Into<String>) -> Self {
        self.detail.param = Some(p.into());
        self
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.detail.clone(),
        }
    }
}

impl From<MessageError> for ApiError {
    fn from(e: MessageError) -> Self {
        ApiError::invalid(e.message).param(e.param)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads the model, binds, prints `listening on http://ADDR` and serves until Ctrl+C/SIGTERM.
pub fn run(mut args: ServeArgs) -> Result<()> {
    if args.api_key.is_none() {
        // From the environment, so that the key stays out of `ps` listings.
        args.api_key = std::env::var("QWENVL_API_KEY")
            .ok()
            .filter(|k| !k.is_empty());
    }
    let engine = crate::cli_load::load(&args.model, args.quant, &Device::Cpu)?;
    let model_id = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_id(&args.model));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    runtime.block_on(serve(Arc::new(engine), model_id, args))
}

/// The id a model folder is served under: `Org/Name` for a Hugging Face cache snapshot
/// (`…/models--Org--Name/snapshots/<sha>`, the id vLLM would use), else the folder's name.
pub fn default_model_id(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = |p: Option<&Path>| {
        p.and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
    };
    let parent = dir.parent();
    if name(parent).as_deref() == Some("snapshots") {
        if let Some(repo) = name(parent.and_then(Path::parent))
            .as_deref()
            .and_then(|r| r.strip_prefix("models--"))
        {
            return repo.replacen("--", "/", 1);
        }
    }
    name(Some(&dir)).unwrap_or_else(|| "qwen-vl-chat".into())
}

async fn serve(engine: Arc<Engine>, model_id: String, args: ServeArgs) -> Result<()> {
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    if !args.host.is_loopback() && args.api_key.is_none() {
        eprintln!(
            "warning: listening on {local} without --api-key: anyone who can reach this port can use the model"
        );
    }
    let queue = Arc::new(FairQueue::new(args.max_queue.max(1)));
    let worker = {
        let (engine, queue) = (engine.clone(), queue.clone());
        std::thread::Builder::new()
            .name("qwenvl-serve-inference".into())
            .spawn(move || inference_loop(&engine, &queue))
            .context("cannot start the inference thread")?
    };
    let state = Arc::new(Server {
        engine,
        model_id,
        queue: queue.clone(),
        requests: AtomicU64::new(0),
        created: now_s(),
        args,
    });
    let app = router(state);
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("server error")?;
    queue.close();
    let _ = worker.join();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: Arc<Server>) -> Router {
    let limit = state.args.max_body_mb.max(1) << 20;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(api)
        .with_state(state)
}

/// Equal strings in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(st): State<Arc<Server>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.args.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes()));
        if !ok {
            let msg = if given.is_none() {
                "missing API key: send `Authorization: Bearer KEY`"
            } else {
                "incorrect API key"
            };
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                msg,
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        format!(
            "no route {} {} (POST /v1/chat/completions, GET /v1/models)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn models(State(st): State<Arc<Server>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: st.model_id.clone(),
            object: "model".into(),
            created: st.created,
            owned_by: "qwenvl".into(),
        }],
    })
}

/// Raises the request's cancel flag when the response (or the handler) is dropped, which is what
/// happens when the client disconnects.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn chat_completions(
    State(st): State<Arc<Server>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match prepare(&st, &headers, body).await {
        Ok((mut job, stream, include_usage, events)) => {
            let id = format!("chatcmpl-{}", st.requests.fetch_add(1, Ordering::Relaxed));
            job.label = format!("{id} from {peer}");
            let guard = CancelOnDrop(job.cancel.clone());
            if st.queue.push(&peer.ip().to_string(), job).is_err() {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("overloaded"),
                    format!(
                        "the server is busy ({} requests waiting): retry later",
                        st.queue.len()
                    ),
                )
                .into_response();
            }
            if stream {
                stream_response(st, id, events, guard, include_usage).into_response()
            } else {
                full_response(st, id, events, guard).await
            }
        }
        Err(e) => e.into_response(),
    }
}

type Prepared = (Job, bool, bool, UnboundedReceiver<JobEvent>);

/// Checks the request and builds the job: everything a client can get wrong is answered here
/// with 4xx, before the request waits in the queue.
async fn prepare(
    st: &Arc<Server>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Prepared, ApiError> {
    let body = body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the server's limit of {} MiB (--max-body-mb)",
                st.args.max_body_mb
            )
        } else {
            r.body_text()
        };
        ApiError::new(status, "invalid_request_error", None, message)
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ApiError::invalid(
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let req: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not a valid chat request: {e}")))?;
    if req.model != st.model_id {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!(
                "the model `{}` is not served here; this server serves `{}`",
                req.model, st.model_id
            ),
        )
        .param("model"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported").param("n"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs are not supported").param("logprobs"));
    }
    if req.tools.is_some() {
        return Err(ApiError::invalid("tools are not supported by Qwen-VL-Chat").param("tools"));
    }
    let options = generate_options(&st.engine, &req)?;
    let stops = req.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::invalid("at most 4 stop sequences").param("stop"));
    }

    // Images are decoded from base64 and written out off the async threads.
    let st2 = st.clone();
    let (conversation, images) = tokio::task::spawn_blocking(move || {
        let images = tempfile::Builder::new()
            .prefix("qwenvl-serve-")
            .tempdir()
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    None,
                    format!("cannot create a folder for the request's images: {e}"),
                )
            })?;
        let mut count = 0usize;
        let conversation = openai::to_conversation(&req.messages, &mut |url, param| {
            count += 1;
            if count > st2.args.max_images {
                return Err(MessageError {
                    message: format!(
                        "more than {} images in one request (--max-images)",
                        st2.args.max_images
                    ),
                    param: param.to_string(),
                });
            }
            save_image(&st2.args, url, images.path(), count).map_err(|message| MessageError {
                message,
                param: param.to_string(),
            })
        })?;
        // The prompt is built now so that a conversation too long for the context is refused
        // with 400 instead of failing in the queue.
        st2.engine
            .prompt(&conversation)
            .map_err(|e| ApiError::invalid(format!("{e:#}")).param("messages"))?;
        Ok::<_, ApiError>((conversation, images))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            format!("internal error: {e}"),
        )
    })??;
    let (tx, rx) = unbounded_channel();
    let job = Job {
        label: String::new(),
        conversation,
        images,
        options,
        stops,
        cancel: Arc::new(AtomicBool::new(false)),
        events: tx,
    };
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    Ok((job, req.stream, include_usage, rx))
}

/// The request's sampling settings over the checkpoint's defaults; `temperature: 0` is greedy.
fn generate_options(engine: &Engine, req: &ChatRequest) -> Result<GenerateOptions, ApiError> {
    let gen_cfg = &engine.checkpoint.generation;
    let mut opts = GenerateOptions::from_generation_config(gen_cfg);
    if let Some(n) = req.max_completion_tokens.or(req.max_tokens) {
        if n == 0 {
            return Err(ApiError::invalid("max_tokens must be at least 1").param("max_tokens"));
        }
        opts.max_new_tokens = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(t) = req.temperature {
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(
                ApiError::invalid(format!("temperature must be in [0, 2], got {t}"))
                    .param("temperature"),
            );
        }
    }
    if let Some(p) = req.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(
                ApiError::invalid(format!("top_p must be in (0, 1], got {p}")).param("top_p"),
            );
        }
    }
    if let Some(r) = req.repetition_penalty {
        if !(r > 0.0 && r.is_finite()) {
            return Err(ApiError::invalid(format!(
                "repetition_penalty must be a finite number > 0, got {r}"
            ))
            .param("repetition_penalty"));
        }
    }
    if req.ignore_eos == Some(true) {
        opts.stop_ids.clear();
    }
    let o = SamplingOverrides {
        temperature: req.temperature,
        top_p: req.top_p,
        // A negative top_k means "off", as in vLLM.
        top_k: req.top_k.map(|k| usize::try_from(k).unwrap_or(0)),
        repetition_penalty: req.repetition_penalty,
        seed: req.seed.map(|s| s as u64),
    };
    if req.temperature == Some(0.0) {
        opts.decoding = Decoding::Greedy;
    } else if o.any() || gen_cfg.do_sample {
        let seed = o.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let o = SamplingOverrides {
            seed: Some(seed),
            ..o
        };
        opts.decoding =
            Decoding::Sample(SamplingParams::from_generation_config(gen_cfg).with_overrides(&o));
    }
    Ok(opts)
}

/// Writes the image at `url` into `dir` and returns its path; the error is the message for 400.
fn save_image(args: &ServeArgs, url: &str, dir: &Path, n: usize) -> Result<String, String> {
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or("malformed data: URL (no comma)")?;
        if !meta.ends_with(";base64") {
            return Err("data: URLs must be base64 (data:image/png;base64,…)".into());
        }
        let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .map_err(|e| format!("the image's base64 data is invalid: {e}"))?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(
            "image URLs are not fetched by this server: send the image inline as a data: URL"
                .into(),
        );
    } else if args.allow_local_files {
        let path = url.strip_prefix("file://").unwrap_or(url);
        vision::read_image_file(Path::new(path)).map_err(|e| e.to_string())?
    } else {
        return Err(
            "image_url must be a data: URL (local paths need the server's --allow-local-files)"
                .into(),
        );
    };
    let format = image::guess_format(&bytes).map_err(|_| {
        format!(
            "image {n} is not a supported image (PNG, JPEG, GIF, WebP, BMP or TIFF), {} bytes",
            bytes.len()
        )
    })?;
    let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format)
        .into_dimensions()
        .map_err(|e| format!("image {n} cannot be read: {e}"))?;
    if u64::from(w) * u64::from(h) > args.max_image_pixels {
        return Err(format!(
            "image {n} is {w}×{h} pixels, more than the server's limit of {} (--max-image-pixels)",
            args.max_image_pixels
        ));
    }
    let ext = format.extensions_str().first().copied().unwrap_or("img");
    let path = dir.join(format!("image-{n}.{ext}"));
    std::fs::write(&path, &bytes).map_err(|e| format!("cannot store image {n}: {e}"))?;
    Ok(path.to_string_lossy().into_owned())
}

/// The inference thread: answers queued requests one at a time until the queue closes.
fn inference_loop(engine: &Engine, queue: &FairQueue<Job>) {
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
    let latest = reply.pictures.last();
    let boxes = lm::grounding::boxes(&text)
        .into_iter()
        .map(|b| BoxOut {
            label: b.label,
            grid: b.grid,
            image: latest.map(|_| reply.pictures.len()),
            box_px: latest.map(|p| lm::grounding::grid_to_pixels(b.grid, p.width, p.height)),
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

async fn full_response(
    st: Arc<Server>,
    id: String,
    mut events: UnboundedReceiver<JobEvent>,
    _guard: CancelOnDrop,
) -> Response {
    while let Some(e) = events.recv().await {
        match e {
            JobEvent::Text(_) => {}
            JobEvent::Failed(e) => return e.into_response(),
            JobEvent::Done(o) => {
                return Json(ChatCompletion {
                    id,
                    object: "chat.completion".into(),
                    created: now_s(),
                    model: st.model_id.clone(),
                    choices: vec![Choice {
                        index: 0,
                        message: ReplyMessage {
                            role: "assistant".into(),
                            content: o.text,
                            boxes: o.boxes,
                        },
                        finish_reason: o.finish_reason.into(),
                    }],
                    usage: o.usage,
                })
                .into_response();
            }
        }
    }
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        "the inference thread stopped",
    )
    .into_response()
}

struct StreamState {
    st: Arc<Server>,
    id: String,
    created: u64,
    events: UnboundedReceiver<JobEvent>,
    pending: std::collections::VecDeque<String>,
    include_usage: bool,
    finished: bool,
    _guard: CancelOnDrop,
}

impl StreamState {
    fn chunk(&self, delta: Delta, finish: Option<&str>, boxes: Option<Vec<BoxOut>>) -> String {
        let c = ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.st.model_id.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_string),
                boxes,
            }],
            usage: None,
        };
        serde_json::to_string(&c).unwrap_or_default()
    }
}

fn stream_response(
    st: Arc<Server>,
    id: String,
    events: UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
    include_usage: bool,
) -> impl IntoResponse {
    let mut state = StreamState {
        st,
        id,
        created: now_s(),
        events,
        pending: Default::default(),
        include_usage,
        finished: false,
        _guard: guard,
    };
    // The role comes first, at once: the client knows the request was accepted.
    let first = state.chunk(
        Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        },
        None,
        None,
    );
    state.pending.push_back(first);
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((
                    Ok::<_, std::convert::Infallible>(SseEvent::default().data(data)),
                    s,
                ));
            }
            if s.finished {
                return None;
            }
            match s.events.recv().await {
                Some(JobEvent::Text(t)) => {
                    let c = s.chunk(
                        Delta {
                            role: None,
                            content: Some(t),
                        },
                        None,
                        None,
                    );
                    s.pending.push_back(c);
                }
                Some(JobEvent::Done(o)) => {
                    let c = s.chunk(Delta::default(), Some(o.finish_reason), Some(o.boxes));
                    s.pending.push_back(c);
                    if s.include_usage {
                        let u = ChatChunk {
                            id: s.id.clone(),
                            object: "chat.completion.chunk".into(),
                            created: s.created,
                            model: s.st.model_id.clone(),
                            choices: Vec::new(),
                            usage: Some(o.usage),
                        };
                        s.pending
                            .push_back(serde_json::to_string(&u).unwrap_or_default());
                    }
                    s.pending.push_back("[DONE]".into());
                    s.finished = true;
                }
                Some(JobEvent::Failed(e)) => {
                    s.pending
                        .push_back(serde_json::to_string(&e.body()).unwrap_or_default());
                    s.pending.push_back("[DONE]".into());
                    s.finished = true;
                }
                None => {
                    s.finished = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

//! `qwenvl serve`: an OpenAI-compatible HTTP server over the engine.
//!
//! `POST /v1/chat/completions` (plain or `stream: true` server-sent events), `GET /v1/models`,
//! `GET /health` (503 while the model loads) and `GET /metrics` (Prometheus). Requests are checked
//! and turned into a conversation on the async side (images from `data:` URLs are written to a
//! per-request temporary folder, which the engine reads like any other picture), then queued; the
//! inference thread takes them round-robin across clients ([`queue::FairQueue`]) into one
//! continuous batch of up to `--parallel` requests ([`crate::engine::Batcher`]). A client that goes
//! away raises its request's cancel flag: a queued request is dropped, a running one leaves the
//! batch at the next step.
//!
//! One file per part: `args` (the command line), `routes` (the HTTP routes), `auth` (the API
//! key), `request` (checking a request and making it a job), `inference` (the inference thread),
//! `sse` (streamed replies), `metrics` (`/metrics`), `state` (what they share), `error`
//! (OpenAI-style errors).

mod args;
mod auth;
mod error;
mod inference;
mod metrics;
pub mod queue;
mod request;
mod routes;
mod sse;
mod state;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};

use crate::engine::{BatchLimits, Engine};
use inference::inference_loop;
use metrics::Metrics;
use queue::FairQueue;
use routes::router;
use state::{now_s, Server};

pub use args::ServeArgs;
pub use error::ApiError;

/// Binds, prints `listening on http://ADDR`, loads the model (`/health` answers 503 until it is
/// ready) and serves until Ctrl+C/SIGTERM.
pub fn run(mut args: ServeArgs) -> Result<()> {
    if args.api_key.is_none() {
        // From the environment, so that the key stays out of `ps` listings.
        args.api_key = std::env::var("QWENVL_API_KEY")
            .ok()
            .filter(|k| !k.is_empty());
    }
    let device = crate::session::parse_device(&args.device)?;
    if args.parallel == Some(0) {
        anyhow::bail!("--parallel must be at least 1");
    }
    let model_id = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_id(&args.model));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    runtime.block_on(serve(device, model_id, args))
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

/// Positions a slot is sized for when `--parallel` is chosen from memory.
const TYPICAL_SLOT_POSITIONS: usize = 2048;
/// Vision-tower blocks run per step for new pictures while other requests decode: about as long
/// as a 64-token prefill chunk on the full model (48 blocks over 1024 patches).
const VISION_BLOCKS_PER_STEP: usize = 4;
/// Most sequences batched when `--parallel` is not given.
const DEFAULT_MAX_PARALLEL: usize = 8;

/// The batch's limits: `--kv-memory-mb` (default half the memory left after loading) and
/// `--parallel` (default as many typical slots as that memory holds, 1 to 8).
fn batch_limits(args: &ServeArgs, engine: &Engine) -> BatchLimits {
    let per_position = engine.lm.kv_bytes_per_position().max(1);
    let kv_budget = match args.kv_memory_mb {
        Some(mb) => mb.saturating_mul(1 << 20),
        None => crate::model_dir::available_memory().map_or(8 << 30, |m| (m / 2) as usize),
    };
    let slot =
        per_position * TYPICAL_SLOT_POSITIONS.min(engine.checkpoint.config.max_position_embeddings);
    let parallel = args
        .parallel
        .unwrap_or_else(|| (kv_budget / slot).clamp(1, DEFAULT_MAX_PARALLEL));
    BatchLimits {
        parallel,
        kv_budget,
        prefill_chunk: args.prefill_chunk.max(1),
        vision_blocks: VISION_BLOCKS_PER_STEP,
    }
}

async fn serve(device: candle_core::Device, model_id: String, args: ServeArgs) -> Result<()> {
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
    let state = Arc::new(Server {
        engine: OnceLock::new(),
        metrics: Arc::new(Metrics::new()),
        model_id,
        queue: queue.clone(),
        requests: AtomicU64::new(0),
        created: now_s(),
        args,
    });
    // The model loads off the async threads while the port already answers `/health` (503).
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let worker = {
        let (state, queue) = (state.clone(), queue.clone());
        std::thread::Builder::new()
            .name("qwenvl-serve-inference".into())
            .spawn(move || {
                let engine =
                    match crate::cli_load::load(&state.args.model, state.args.quant, &device) {
                        Ok(e) => Arc::new(e),
                        Err(e) => {
                            let _ = loaded_tx.send(Err(e));
                            return;
                        }
                    };
                let limits = batch_limits(&state.args, &engine);
                state
                    .metrics
                    .slots
                    .store(limits.parallel, Ordering::Relaxed);
                eprintln!(
                    "ready: {} requests at a time, {} MiB for their KV caches",
                    limits.parallel,
                    limits.kv_budget >> 20
                );
                let _ = state.engine.set(engine.clone());
                let _ = loaded_tx.send(Ok(()));
                inference_loop(&engine, &queue, limits, &state.metrics)
            })
            .context("cannot start the inference thread")?
    };
    let app = router(state.clone());
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal());
    // A model that cannot load ends the server with its error.
    let loaded = async {
        match loaded_rx.await {
            Ok(Err(e)) => Err(e),
            _ => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = server => r.context("server error"),
        r = loaded => r,
    };
    queue.close();
    let _ = worker.join();
    result
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

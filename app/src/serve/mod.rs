//! `qwenvl serve`: an OpenAI-compatible HTTP server over the engine.
//!
//! `POST /v1/chat/completions` (plain or `stream: true` server-sent events) and `GET /v1/models`.
//! Requests are checked and turned into a conversation on the async side (images from `data:`
//! URLs are written to a per-request temporary folder, which the engine reads like any other
//! picture), then queued; one inference thread answers them in turn, round-robin across clients
//! ([`queue::FairQueue`]). A client that goes away raises its request's cancel flag: a queued
//! request is dropped, a running one stops at the next token.
//!
//! One file per part: `args` (the command line), `routes` (the HTTP routes), `auth` (the API
//! key), `request` (checking a request and making it a job), `inference` (the inference thread),
//! `sse` (streamed replies), `state` (what they share), `error` (OpenAI-style errors).

mod args;
mod auth;
mod error;
mod inference;
pub mod queue;
mod request;
mod routes;
mod sse;
mod state;
pub mod text;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::engine::Engine;
use inference::inference_loop;
use queue::FairQueue;
use routes::router;
use state::{now_s, Server};

pub use args::ServeArgs;
pub use error::ApiError;

/// Loads the model, binds, prints `listening on http://ADDR` and serves until Ctrl+C/SIGTERM.
pub fn run(mut args: ServeArgs) -> Result<()> {
    if args.api_key.is_none() {
        // From the environment, so that the key stays out of `ps` listings.
        args.api_key = std::env::var("QWENVL_API_KEY")
            .ok()
            .filter(|k| !k.is_empty());
    }
    let device = crate::session::parse_device(&args.device)?;
    let engine = crate::cli_load::load(&args.model, args.quant, &device)?;
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

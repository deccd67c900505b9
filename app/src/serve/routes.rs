//! The HTTP routes: chat completions (plain or streamed), the model list, health, metrics, 404s;
//! the request counter and the opt-in CORS headers.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::mpsc::UnboundedReceiver;

use super::auth::authorize;
use super::error::ApiError;
use super::request::prepare;
use super::sse::stream_response;
use super::state::{now_s, CancelOnDrop, JobEvent, Server};
use crate::openai::{ChatCompletion, Choice, ModelCard, ModelList, ReplyMessage};

pub(super) fn router(state: Arc<Server>) -> Router {
    let limit = state.args.max_body_mb.max(1) << 20;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), count));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

/// `200 {"status":"ok"}` once the model is loaded, `503 {"status":"loading"}` before.
async fn health(State(st): State<Arc<Server>>) -> Response {
    match st.engine.get() {
        Some(_) => Json(serde_json::json!({"status": "ok"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(serde_json::json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics(State(st): State<Arc<Server>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(st.queue.len()),
    )
        .into_response()
}

/// Counts every chat-completion request by the status it was answered with.
async fn count(State(st): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let chat = req.uri().path() == "/v1/chat/completions";
    let r = next.run(req).await;
    if chat {
        st.metrics.request(r.status().as_u16());
    }
    r
}

/// `--cors-origin`: answers browsers' preflight requests and marks responses as readable from
/// that origin. Without the flag no CORS header is sent (browsers then refuse cross-origin reads).
async fn cors(State(st): State<Arc<Server>>, req: Request, next: Next) -> Response {
    let Some(origin) = st.args.cors_origin.clone() else {
        return next.run(req).await;
    };
    let origin = HeaderValue::from_str(&origin).unwrap_or(HeaderValue::from_static("*"));
    let mut r = if req.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        r
    } else {
        next.run(req).await
    };
    r.headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    r
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        format!(
            "no route {} {} (POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics)",
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
                .retry_after(2)
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
                            tool_calls: o.tool_calls,
                            function_call: o.function_call,
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicU64;
    use std::sync::OnceLock;

    use super::*;
    use crate::serve::metrics::Metrics;
    use crate::serve::queue::FairQueue;
    use crate::serve::ServeArgs;

    /// One HTTP/1.0 exchange: the response's status line, headers and body, lower-cased.
    fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.to_lowercase()
    }

    #[test]
    fn while_the_model_loads_health_and_chat_answer_503_with_retry_after() {
        let args = ServeArgs {
            model: "/nonexistent".into(),
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 0,
            api_key: None,
            served_model_name: None,
            quant: None,
            device: "cpu".into(),
            allow_local_files: false,
            max_body_mb: 1,
            max_images: 1,
            max_image_pixels: 1,
            max_queue: 1,
            parallel: None,
            kv_memory_mb: None,
            prefill_chunk: 64,
            cors_origin: None,
        };
        let st = Arc::new(Server {
            engine: OnceLock::new(),
            metrics: Arc::new(Metrics::new()),
            model_id: "m".into(),
            args,
            queue: Arc::new(FairQueue::new(1)),
            requests: AtomicU64::new(0),
            created: 0,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = router(st).into_make_service_with_connect_info::<SocketAddr>();
                axum::serve(listener, app).await.unwrap();
            })
        });
        let health = exchange(addr, "GET /health HTTP/1.0\r\n\r\n");
        assert!(health.starts_with("http/1.0 503"), "{health}");
        assert!(health.contains("retry-after: 5"), "{health}");
        assert!(health.contains(r#"{"status":"loading"}"#), "{health}");
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let chat = exchange(
            addr,
            &format!(
                "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        );
        assert!(chat.starts_with("http/1.0 503"), "{chat}");
        assert!(chat.contains("retry-after: 5"), "{chat}");
        assert!(chat.contains("still loading"), "{chat}");
        let metrics = exchange(addr, "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(
            metrics.contains("qwenvl_requests_total{status=\"503\"} 1"),
            "{metrics}"
        );
    }
}

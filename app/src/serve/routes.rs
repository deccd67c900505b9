//! The HTTP routes: chat completions (plain or streamed), the model list, 404s.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self};
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
        .layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(api)
        .with_state(state)
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

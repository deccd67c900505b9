//! `--api-key`: every `/v1` request must carry `Authorization: Bearer KEY`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::Server;

/// Equal strings in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn authorize(State(st): State<Arc<Server>>, req: Request, next: Next) -> Response {
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

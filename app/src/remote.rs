//! A client of any OpenAI-compatible chat server that serves Qwen-VL-Chat (`qwenvl serve` on
//! another machine, or vLLM on a GPU cluster): the app's remote backend. Replies stream as
//! server-sent events; stopping a reply closes the connection, which cancels it on the server.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::openai::{BoxOut, ChatChunk, ChatRequest, ErrorBody, ModelList, StreamOptions, Usage};

/// One server: its `/v1` base URL and key.
#[derive(Clone)]
pub struct RemoteClient {
    base: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

/// What a streamed reply came to.
#[derive(Debug, Clone, Default)]
pub struct StreamOutcome {
    pub text: String,
    /// `stop`, `length`, … ; `None` when the stream ended without one (or was cancelled).
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    pub boxes: Vec<BoxOut>,
    pub time_to_first_token_ms: f64,
    /// Seconds from the first piece to the last.
    pub streaming_s: f64,
    pub pieces: usize,
    pub cancelled: bool,
}

impl std::fmt::Debug for RemoteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("RemoteClient")
            .field("base", &self.base)
            .finish()
    }
}

/// `http://host:port`, `http://host:port/`, `…/v1` and `…/v1/` all name the same API root.
pub fn api_base(url: &str) -> Result<String> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{url:?} is not a server address: it should start with http:// or https://");
    }
    Ok(if url.ends_with("/v1") {
        url.to_string()
    } else {
        format!("{url}/v1")
    })
}

impl RemoteClient {
    pub fn new(url: &str, api_key: Option<String>) -> Result<Self> {
        let config = ureq::Agent::config_builder()
            // Error bodies carry the server's explanation: read them instead of failing early.
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build();
        Ok(Self {
            base: api_base(url)?,
            api_key: api_key.filter(|k| !k.trim().is_empty()),
            agent: ureq::Agent::new_with_config(config),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.api_key {
            Some(k) => req.header("Authorization", &format!("Bearer {}", k.trim())),
            None => req,
        }
    }

    fn refused(&self, what: &str, resp: ureq::http::Response<ureq::Body>) -> anyhow::Error {
        let status = resp.status();
        let body = resp.into_body().read_to_string().unwrap_or_default();
        let reason = serde_json::from_str::<ErrorBody>(&body)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| body.chars().take(300).collect());
        anyhow!("{} refused {what} ({status}): {reason}", self.base)
    }

    /// The ids of the models the server serves.
    pub fn models(&self) -> Result<Vec<String>> {
        let url = format!("{}/models", self.base);
        let resp = self
            .auth(self.agent.get(&url))
            .call()
            .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            return Err(self.refused("the model list", resp));
        }
        let list: ModelList = resp
            .into_body()
            .read_json()
            .with_context(|| format!("{url} did not answer with a model list"))?;
        Ok(list.data.into_iter().map(|m| m.id).collect())
    }

    /// Streams the reply to `req` (its `stream` fields are set here), calling `on_text` with each
    /// piece. Returns as soon as `cancel` is raised; the connection is then dropped.
    pub fn chat(
        &self,
        req: &ChatRequest,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<StreamOutcome> {
        let req = ChatRequest {
            stream: true,
            stream_options: Some(StreamOptions {
                include_usage: true,
            }),
            ..req.clone()
        };
        let url = format!("{}/chat/completions", self.base);
        let t0 = Instant::now();
        let resp = self
            .auth(self.agent.post(&url))
            .send_json(&req)
            .with_context(|| format!("cannot reach {url}"))?;
        if !resp.status().is_success() {
            return Err(self.refused("the request", resp));
        }
        // Lines are read on their own thread so that Stop answers at once even while the server
        // is silent (reading an image, queueing); the connection closes when that thread ends.
        let (tx, rx) = sync_channel::<std::io::Result<String>>(64);
        let mut reader = BufReader::new(resp.into_body().into_reader());
        std::thread::Builder::new()
            .name("qwenvl-remote-stream".into())
            .spawn(move || loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {
                        if tx.send(Ok(line)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            })
            .context("cannot start the stream reader")?;
        let mut out = StreamOutcome::default();
        let mut first: Option<Instant> = None;
        loop {
            if cancel.load(Ordering::SeqCst) {
                out.cancelled = true;
                break;
            }
            let line = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => bail!("the connection to {} broke mid-reply: {e}", self.base),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue; // Comments (keep-alives), event names, blank separators.
            };
            let data = data.trim();
            if data == "[DONE]" {
                break;
            }
            let value: serde_json::Value = serde_json::from_str(data)
                .with_context(|| format!("{} sent a malformed event: {data:.200}", self.base))?;
            if let Some(e) = value.get("error") {
                let msg = e
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("unknown error");
                bail!("{} failed mid-reply: {msg}", self.base);
            }
            let chunk: ChatChunk = serde_json::from_value(value)
                .with_context(|| format!("{} sent a malformed chunk: {data:.200}", self.base))?;
            if let Some(u) = chunk.usage {
                out.usage = Some(u);
            }
            for c in chunk.choices {
                if let Some(t) = c.delta.content.filter(|t| !t.is_empty()) {
                    let now = Instant::now();
                    if first.is_none() {
                        first = Some(now);
                        out.time_to_first_token_ms = (now - t0).as_secs_f64() * 1e3;
                    }
                    out.pieces += 1;
                    out.streaming_s = first.map(|f| (now - f).as_secs_f64()).unwrap_or(0.0);
                    out.text.push_str(&t);
                    on_text(&t);
                }
                if let Some(r) = c.finish_reason {
                    out.finish_reason = Some(r);
                }
                if let Some(b) = c.boxes {
                    out.boxes = b;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised() {
        for u in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            " http://h:1/v1/ ",
        ] {
            assert_eq!(api_base(u).unwrap(), "http://h:1/v1", "{u}");
        }
        assert!(api_base("h:1").unwrap_err().to_string().contains("http://"));
    }
}

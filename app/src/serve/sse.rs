//! Streamed replies as server-sent events, in the OpenAI chunk format.

use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use tokio::sync::mpsc::UnboundedReceiver;

use super::state::{now_s, CancelOnDrop, JobEvent, Server};
use crate::openai::{BoxOut, ChatChunk, ChunkChoice, Delta, DeltaToolCall};

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

pub(super) fn stream_response(
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
            ..Delta::default()
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
                            content: Some(t),
                            ..Delta::default()
                        },
                        None,
                        None,
                    );
                    s.pending.push_back(c);
                }
                Some(JobEvent::Done(o)) => {
                    // A reply to a request with tools comes whole at its end: its text (the
                    // thought or the answer), then its call.
                    let tools = o.tool_calls.is_some() || o.function_call.is_some();
                    if o.text_held && !o.text.is_empty() {
                        let c = s.chunk(
                            Delta {
                                content: Some(o.text.clone()),
                                ..Delta::default()
                            },
                            None,
                            None,
                        );
                        s.pending.push_back(c);
                    }
                    if tools {
                        let delta = Delta {
                            tool_calls: o.tool_calls.clone().map(|calls| {
                                calls
                                    .into_iter()
                                    .enumerate()
                                    .map(|(i, call)| DeltaToolCall {
                                        index: i as u32,
                                        call,
                                    })
                                    .collect()
                            }),
                            function_call: o.function_call.clone(),
                            ..Delta::default()
                        };
                        let c = s.chunk(delta, None, None);
                        s.pending.push_back(c);
                    }
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

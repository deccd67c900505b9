//! The OpenAI chat-completions wire format, as far as Qwen-VL-Chat uses it: what `qwenvl serve`
//! accepts and answers, and what the app's remote backend sends and reads. One set of types keeps
//! the two ends in step.
//!
//! A conversation maps onto messages directly: the system prompt is a `system` message, each
//! history turn a `user` message (text and `image_url` parts) and an `assistant` message, and the
//! query the final `user` message.

use std::path::Path;

use base64::Engine as _;
use lm::prompt::{Conversation, Item};
use serde::{Deserialize, Serialize};

/// `POST /v1/chat/completions` body. Fields OpenAI defines that do not apply here (penalties,
/// `user`, `response_format`, …) are ignored; the ones that would change the answer's meaning
/// (`n > 1`, `logprobs`, a `tool_choice` that forces a call) are refused by the server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Tools the model may call ([`crate::session::tools`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// The older form of `tools` (what Qwen's own `openai_api.py` reads): answered with
    /// `function_call` instead of `tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<lm::react::Tool>>,
    /// vLLM's extensions, accepted for the same meaning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Keep generating past the end-of-turn token, up to `max_tokens` (for benchmarks and tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// The calls an assistant message made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
    /// Which call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The older form of `tool_calls`: one call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall>,
    /// The tool's name on `tool` and `function` messages (not needed: results follow calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `tools[i]`: `{"type": "function", "function": {"name", "description", "parameters"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: lm::react::Tool,
}

/// `tool_choice`: `"auto"`, `"none"`, `"required"`, or `{"type": "function", "function":
/// {"name": …}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(String),
    Named {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamedFunction {
    pub name: String,
}

/// A call the model made: `{"id", "type": "function", "function": {"name", "arguments"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallOut {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

/// The function and its arguments, a JSON text as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

/// Message content: plain text or a list of parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

/// `{"url": …, "detail": …}`, or the bare URL string some clients send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    Url(String),
}

impl ImageUrl {
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url, .. } | ImageUrl::Url(url) => url,
        }
    }
}

/// A grounding box of the reply (the `boxes` extension field): `box` on Qwen-VL's 0–1000 grid,
/// `image` the 1-based number of the picture it refers to (the latest one), `box_px` in that
/// picture's pixels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxOut {
    #[serde(rename = "ref")]
    pub label: Option<String>,
    #[serde(rename = "box")]
    pub grid: [i64; 4],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub box_px: Option<[i64; 4]>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub message: ReplyMessage,
    pub finish_reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplyMessage {
    pub role: String,
    pub content: String,
    #[serde(default)]
    pub boxes: Vec<BoxOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall>,
}

/// One server-sent event of a streamed reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<String>,
    /// Set on the last chunk (the one with `finish_reason`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boxes: Option<Vec<BoxOut>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<DeltaToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<FunctionCall>,
}

/// A call in a streamed reply; each is sent whole, in one chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaToolCall {
    pub index: u32,
    #[serde(flatten)]
    pub call: ToolCallOut,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    #[serde(default)]
    pub created: u64,
    #[serde(default)]
    pub owned_by: String,
}

/// `{"error": {...}}`, the body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

/// Why a message list is not a Qwen-VL conversation; the server answers 400 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MessageError {
    pub message: String,
    /// The offending field, e.g. `messages[2].content[0].image_url`.
    pub param: String,
}

fn bad(param: String, message: impl Into<String>) -> MessageError {
    MessageError {
        message: message.into(),
        param,
    }
}

/// The conversation that `messages` describe. `image` turns an image URL (with its parameter
/// path, for errors) into the file path the engine reads. Consecutive messages of one role are
/// joined; the last message must be the user's.
pub fn to_conversation(
    messages: &[Message],
    image: &mut dyn FnMut(&str, &str) -> Result<String, MessageError>,
) -> Result<Conversation, MessageError> {
    let mut system: Option<String> = None;
    // (role, items) with consecutive same-role messages merged.
    let mut turns: Vec<(String, Vec<Item>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.role.as_str();
        let mut items = Vec::new();
        match &m.content {
            None => {}
            Some(Content::Text(t)) => items.push(Item::Text { text: t.clone() }),
            Some(Content::Parts(parts)) => {
                for (j, p) in parts.iter().enumerate() {
                    match p {
                        Part::Text { text } => items.push(Item::Text { text: text.clone() }),
                        Part::ImageUrl { image_url } => {
                            let param = format!("{at}.content[{j}].image_url");
                            if role != "user" {
                                return Err(bad(
                                    param,
                                    format!(
                                        "{role} messages cannot hold images: only the user's can"
                                    ),
                                ));
                            }
                            items.push(Item::Image {
                                image: image(image_url.url(), &param)?,
                            });
                        }
                    }
                }
            }
        }
        match role {
            "system" | "developer" => {
                if !turns.is_empty() {
                    return Err(bad(
                        format!("{at}.role"),
                        "the system message must come before the conversation",
                    ));
                }
                let text = items_text(&items);
                system = Some(match system {
                    Some(s) => format!("{s}\n{text}"),
                    None => text,
                });
            }
            "user" | "assistant" => match turns.last_mut() {
                Some((r, prev)) if r == role => {
                    // Joined like two paragraphs.
                    prev.push(Item::Text { text: "\n".into() });
                    prev.extend(items);
                }
                _ => turns.push((role.to_string(), items)),
            },
            other => {
                return Err(bad(
                    format!("{at}.role"),
                    format!("role `{other}` is not supported (system, user or assistant)"),
                ))
            }
        }
    }
    let Some((last_role, query)) = turns.pop() else {
        return Err(bad("messages".into(), "there is no user message to answer"));
    };
    if last_role != "user" {
        return Err(bad(
            "messages".into(),
            "the last message must be the user's: there is nothing to answer",
        ));
    }
    if turns.first().is_some_and(|(r, _)| r == "assistant") {
        // A reply with no question before it: the question was empty.
        turns.insert(0, ("user".into(), Vec::new()));
    }
    let mut history = Vec::new();
    for pair in turns.chunks(2) {
        let user = pair[0].1.clone();
        let reply = pair.get(1).map(|t| items_text(&t.1)).unwrap_or_default();
        history.push((user, reply));
    }
    Ok(Conversation {
        system: system.unwrap_or_else(|| lm::prompt::DEFAULT_SYSTEM.to_string()),
        history,
        query,
    })
}

/// Whether `messages` hold a tool exchange (calls or results), which only the ReAct prompt of
/// [`crate::session::tools`] can express.
pub fn has_tool_exchange(messages: &[Message]) -> bool {
    messages.iter().any(|m| {
        matches!(m.role.as_str(), "tool" | "function")
            || m.tool_calls.as_ref().is_some_and(|c| !c.is_empty())
            || m.function_call.is_some()
    })
}

/// The messages as a tool-using exchange ([`lm::react::Message`]): an assistant message with
/// several calls becomes one call per step, each followed by its result, as the ReAct format
/// writes them; results must come in the order of the calls. Pictures cannot be part of it.
pub fn to_react(messages: &[Message]) -> Result<Vec<lm::react::Message>, MessageError> {
    use lm::react::{Message as RMessage, Role, ToolCall};
    let mut out: Vec<RMessage> = Vec::new();
    // Calls of the last assistant message not written out yet: (id, call).
    let mut waiting: std::collections::VecDeque<(String, ToolCall)> = Default::default();
    // The call written out last, whose result comes next: (id, whether it must have one, as a
    // call split off a several-call message must).
    let mut open: Option<(String, bool)> = None;
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match p {
                        Part::Text { text: t } => text.push_str(t),
                        Part::ImageUrl { .. } => {
                            return Err(bad(
                                format!("{at}.content[{j}].image_url"),
                                "pictures cannot be part of a tool-using exchange: send them \
                                 in a request without tools",
                            ))
                        }
                    }
                }
                text
            }
        };
        let role = m.role.as_str();
        if !matches!(role, "tool" | "function") {
            if let Some(id) = missing_result(&open, &waiting) {
                return Err(bad(
                    format!("{at}.role"),
                    format!("the tool call `{id}` has no result before this message"),
                ));
            }
        }
        match role {
            "system" | "developer" => match out.as_mut_slice() {
                // Several system messages at the start are one system prompt.
                [prev] if prev.role == Role::System => {
                    prev.content.push('\n');
                    prev.content.push_str(&content);
                }
                _ => out.push(RMessage {
                    role: Role::System,
                    content,
                    call: None,
                }),
            },
            "user" => out.push(RMessage {
                role: Role::User,
                content,
                call: None,
            }),
            "assistant" => {
                let mut calls: Vec<(String, ToolCall)> = Vec::new();
                if let Some(f) = &m.function_call {
                    calls.push((
                        String::new(),
                        react_call(f, &format!("{at}.function_call"))?,
                    ));
                }
                for (j, c) in m.tool_calls.iter().flatten().enumerate() {
                    calls.push((
                        c.id.clone(),
                        react_call(&c.function, &format!("{at}.tool_calls[{j}].function"))?,
                    ));
                }
                let mut calls = calls.into_iter();
                let first = calls.next();
                open = first.as_ref().map(|(id, _)| (id.clone(), false));
                out.push(RMessage {
                    role: Role::Assistant,
                    content,
                    call: first.map(|(_, c)| c),
                });
                waiting.extend(calls);
            }
            "tool" | "function" => {
                let want = open.take().map(|(id, _)| id);
                if let (Some(want), Some(got)) = (want, m.tool_call_id.as_deref()) {
                    if !want.is_empty() && want != got {
                        return Err(bad(
                            format!("{at}.tool_call_id"),
                            format!(
                                "tool results must come in the order of the calls: \
                                 expected the result of `{want}`, got `{got}`"
                            ),
                        ));
                    }
                }
                out.push(RMessage {
                    role: Role::Tool,
                    content,
                    call: None,
                });
                if let Some((id, call)) = waiting.pop_front() {
                    open = Some((id, true));
                    out.push(RMessage {
                        role: Role::Assistant,
                        content: String::new(),
                        call: Some(call),
                    });
                }
            }
            other => {
                return Err(bad(
                    format!("{at}.role"),
                    format!("role `{other}` is not supported (system, user, assistant or tool)"),
                ))
            }
        }
    }
    if let Some(id) = missing_result(&open, &waiting) {
        return Err(bad(
            "messages".into(),
            format!("the tool call `{id}` has no result"),
        ));
    }
    Ok(out)
}

/// The call that still needs its result before another kind of message: the open one when it
/// must have one, else the next one waiting.
fn missing_result<'a>(
    open: &'a Option<(String, bool)>,
    waiting: &'a std::collections::VecDeque<(String, lm::react::ToolCall)>,
) -> Option<&'a String> {
    match open {
        Some((id, true)) => Some(id),
        _ => waiting.front().map(|(id, _)| id),
    }
}

/// The functions of `tools`; a tool of another type is refused, naming it.
pub fn function_tools(tools: &[ToolSpec]) -> Result<Vec<lm::react::Tool>, MessageError> {
    if let Some(i) = tools.iter().position(|t| t.kind != "function") {
        return Err(bad(
            format!("tools[{i}].type"),
            format!(
                "tool type `{}` is not supported: only `function` tools",
                tools[i].kind
            ),
        ));
    }
    Ok(tools.iter().map(|t| t.function.clone()).collect())
}

fn react_call(f: &FunctionCall, param: &str) -> Result<lm::react::ToolCall, MessageError> {
    if f.name.trim().is_empty() {
        return Err(bad(param.into(), "a tool call needs the tool's name"));
    }
    Ok(lm::react::ToolCall {
        name: f.name.clone(),
        arguments: f.arguments.clone(),
    })
}

fn items_text(items: &[Item]) -> String {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Text { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// The messages of `conv`, with every image (path relative to `base_dir`) sent inline as a
/// `data:` URL and grounding items as their markup text, which the model reads the same way.
pub fn to_messages(conv: &Conversation, base_dir: &Path) -> anyhow::Result<Vec<Message>> {
    let mut out = vec![Message {
        role: "system".into(),
        content: Some(Content::Text(conv.system.clone())),
        ..Message::default()
    }];
    let user = |items: &[Item]| -> anyhow::Result<Message> {
        let mut parts = Vec::new();
        for item in items {
            match item {
                Item::Text { text } => parts.push(Part::Text { text: text.clone() }),
                Item::Box { .. } => parts.push(Part::Text {
                    text: lm::prompt::items_to_text(std::slice::from_ref(item)),
                }),
                Item::Image { image } => parts.push(Part::ImageUrl {
                    image_url: ImageUrl::Object {
                        url: data_url(&base_dir.join(image))?,
                        detail: None,
                    },
                }),
            }
        }
        Ok(Message {
            role: "user".into(),
            content: Some(Content::Parts(parts)),
            ..Message::default()
        })
    };
    for (items, reply) in &conv.history {
        out.push(user(items)?);
        out.push(Message {
            role: "assistant".into(),
            content: Some(Content::Text(reply.clone())),
            ..Message::default()
        });
    }
    out.push(user(&conv.query)?);
    Ok(out)
}

/// `data:<mime>;base64,<bytes>` of an image file (size-capped like every image read).
pub fn data_url(path: &Path) -> anyhow::Result<String> {
    let bytes = vision::read_image_file(path)?;
    let mime = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Png) => "image/png",
        Ok(image::ImageFormat::Jpeg) => "image/jpeg",
        Ok(image::ImageFormat::Gif) => "image/gif",
        Ok(image::ImageFormat::WebP) => "image/webp",
        Ok(image::ImageFormat::Bmp) => "image/bmp",
        Ok(image::ImageFormat::Tiff) => "image/tiff",
        _ => "application/octet-stream",
    };
    Ok(format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: serde_json::Value) -> Vec<Message> {
        serde_json::from_value(v).unwrap()
    }

    fn no_images(u: &str, p: &str) -> Result<String, MessageError> {
        Err(bad(p.into(), format!("unexpected image {u}")))
    }

    #[test]
    fn messages_map_to_system_history_and_query() {
        let m = msgs(serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a"}}, {"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": "a dog"},
            {"role": "user", "content": "and the colour?"}
        ]));
        let mut seen = Vec::new();
        let conv = to_conversation(&m, &mut |u, p| {
            seen.push(p.to_string());
            Ok(format!("/tmp/{u}.png"))
        })
        .unwrap();
        assert_eq!(seen, ["messages[1].content[0].image_url"]);
        assert_eq!(conv.system, "Be brief.");
        assert_eq!(conv.history.len(), 1);
        assert_eq!(
            conv.history[0].0,
            vec![
                Item::Image {
                    image: "/tmp/a.png".into()
                },
                Item::Text {
                    text: "what?".into()
                }
            ]
        );
        assert_eq!(conv.history[0].1, "a dog");
        assert_eq!(
            conv.query,
            vec![Item::Text {
                text: "and the colour?".into()
            }]
        );
    }

    #[test]
    fn default_system_and_refusals() {
        let conv = to_conversation(
            &msgs(serde_json::json!([{"role": "user", "content": "hi"}])),
            &mut no_images,
        )
        .unwrap();
        assert_eq!(conv.system, lm::prompt::DEFAULT_SYSTEM);
        let e = to_conversation(
            &msgs(serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])),
            &mut no_images,
        )
        .unwrap_err();
        assert!(e.message.contains("last message must be the user's"), "{e}");
        let e = to_conversation(
            &msgs(serde_json::json!([{"role": "tool", "content": "x"}])),
            &mut no_images,
        )
        .unwrap_err();
        assert_eq!(e.param, "messages[0].role");
        let e = to_conversation(
            &msgs(serde_json::json!([{"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "user", "content": "q"}])),
            &mut no_images,
        )
        .unwrap_err();
        assert!(e.message.contains("only the user's"), "{e}");
        assert!(to_conversation(&[], &mut no_images).is_err());
    }

    #[test]
    fn several_calls_become_one_step_each_with_its_result() {
        use lm::react::Role;
        let m = msgs(serde_json::json!([
            {"role": "system", "content": "A"},
            {"role": "developer", "content": "B"},
            {"role": "user", "content": "Rome and Oslo?"},
            {"role": "assistant", "content": "Both.", "tool_calls": [
                {"id": "r", "type": "function", "function": {"name": "w", "arguments": "{\"c\": \"Rome\"}"}},
                {"id": "o", "type": "function", "function": {"name": "w", "arguments": "{\"c\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "r", "content": "sun"},
            {"role": "tool", "tool_call_id": "o", "content": "rain"}
        ]));
        assert!(has_tool_exchange(&m));
        let r = to_react(&m).unwrap();
        let roles: Vec<Role> = r.iter().map(|m| m.role).collect();
        use Role::*;
        assert_eq!(roles, [System, User, Assistant, Tool, Assistant, Tool]);
        assert_eq!(r[0].content, "A\nB");
        assert_eq!(r[2].content, "Both.");
        assert_eq!(r[2].call.as_ref().unwrap().arguments, "{\"c\": \"Rome\"}");
        assert_eq!(r[3].content, "sun");
        assert_eq!(r[4].content, "");
        assert_eq!(r[4].call.as_ref().unwrap().arguments, "{\"c\": \"Oslo\"}");
        assert_eq!(r[5].content, "rain");
        // A user message while a call waits for its result is refused.
        let mut early = m[..5].to_vec();
        early.push(m[2].clone());
        let e = to_react(&early).unwrap_err();
        assert!(e.message.contains("`o` has no result"), "{e}");
        // Pictures cannot be part of it.
        let pic = msgs(serde_json::json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": "x"}]}, {"role": "tool", "content": "r"}]));
        assert_eq!(
            to_react(&pic).unwrap_err().param,
            "messages[0].content[0].image_url"
        );
    }

    #[test]
    fn unknown_part_types_do_not_parse() {
        let r: Result<Vec<Message>, _> = serde_json::from_value(serde_json::json!([
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
        ]));
        assert!(r.is_err());
    }

    #[test]
    fn conversation_round_trips_through_messages() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("p.png");
        image::RgbImage::new(3, 2).save(&png).unwrap();
        let conv = Conversation {
            system: "sys".into(),
            history: vec![(
                vec![
                    Item::Image {
                        image: "p.png".into(),
                    },
                    Item::Text { text: "q1".into() },
                ],
                "r1".into(),
            )],
            query: vec![
                Item::Text {
                    text: "where is ".into(),
                },
                Item::Box {
                    reference: Some("it".into()),
                    boxes: vec![[1, 2, 3, 4]],
                },
            ],
        };
        let m = to_messages(&conv, dir.path()).unwrap();
        let json = serde_json::to_value(&m).unwrap();
        let url = json[1]["content"][0]["image_url"]["url"].as_str().unwrap();
        assert!(url.starts_with("data:image/png;base64,"), "{url}");
        let back = to_conversation(&m, &mut |_, _| Ok("p.png".into())).unwrap();
        assert_eq!(back.system, conv.system);
        assert_eq!(back.history, conv.history);
        assert_eq!(
            lm::prompt::items_to_text(&back.query),
            lm::prompt::items_to_text(&conv.query)
        );
    }
}

//! Tool use for Qwen-Chat: the ReAct prompt of Qwen's own OpenAI-API example (`openai_api.py` of
//! QwenLM/Qwen): the tools are described in an instruction put before the user's question, the
//! model answers `Thought:` / `Action:` / `Action Input:` and stops at `Observation:`, the
//! tool's result comes back as `Observation: ...` and the model continues its own reply after
//! `Thought:`.
//!
//! [`parse_messages`] and [`parse_response`] follow upstream's functions of the same names
//! exactly (tests/fixtures/tools/react_prompts.json holds their outputs); the prompt is then built
//! by [`crate::prompt::build_chatml`], or, when the last message is a tool result,
//! [`crate::prompt::build_chatml_continuing`] (upstream's "text completion" of the open reply).

use serde::{Deserialize, Serialize};

/// One tool the model may call (OpenAI's `function` object; the `_for_model`/`_for_human`
/// variants are upstream's own extensions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_for_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_for_human: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description_for_model: Option<String>,
    #[serde(default = "empty_object")]
    pub parameters: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}

/// A tool call the model made: the tool's name and its arguments as the model wrote them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// Who a message is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result (upstream `function`, OpenAI `tool`).
    Tool,
}

/// One message of a tool-using exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    #[serde(default)]
    pub content: String,
    /// The call an assistant message made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<ToolCall>,
}

/// What the messages become: a system prompt, (question, reply) turns, and the question to
/// answer, or `None` when the model is to continue the last reply (after a tool's result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactTurns {
    pub system: String,
    pub history: Vec<(String, String)>,
    pub query: Option<String>,
}

const TOOL_DESC: &str =
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. \
What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}";

const REACT_INSTRUCTION: &str =
    "Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!";

/// Where generation stops while tools are offered (with the stops upstream adds).
pub const STOP_WORDS: [&str; 1] = ["Observation:"];

/// Python's `s.lstrip('\n').rstrip()`.
fn tidy(s: &str) -> String {
    s.trim_start_matches('\n').trim_end().to_string()
}

/// Python's `json.dumps(v, ensure_ascii=False)`: `", "` and `": "` separators, keys in the
/// object's order.
fn py_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Array(a) => format!("[{}]", a.iter().map(py_json).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), py_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// The ReAct instruction describing `tools` (upstream's `REACT_INSTRUCTION`); empty without tools.
pub fn instruction(tools: &[Tool]) -> String {
    if tools.is_empty() {
        return String::new();
    }
    let mut texts = Vec::new();
    let mut names = Vec::new();
    for t in tools {
        let name_m = t.name_for_model.as_deref().unwrap_or(&t.name);
        let name_h = t.name_for_human.as_deref().unwrap_or(&t.name);
        let desc_m = t.description_for_model.as_deref().unwrap_or(&t.description);
        texts.push(
            TOOL_DESC
                .replace("{name_for_model}", name_m)
                .replace("{name_for_human}", name_h)
                .replace("{description_for_model}", desc_m)
                .replace("{parameters}", &py_json(&t.parameters)),
        );
        names.push(name_m.to_string());
    }
    // The tool texts go in last: a description holding `{tools_name_text}` stays as written.
    let head = REACT_INSTRUCTION.replace("{tools_name_text}", &names.join(", "));
    tidy(&head.replace("{tools_text}", &texts.join("\n\n")))
}

/// Upstream `parse_messages`: the messages (and the offered tools) as system prompt, turns and
/// the question. Errors are upstream's 400s, worded for the caller.
pub fn parse_messages(messages: &[Message], tools: &[Tool]) -> Result<ReactTurns, String> {
    if messages.iter().all(|m| m.role != Role::User) {
        return Err("expecting at least one user message".into());
    }
    let mut rest = messages;
    let system = match messages.first() {
        Some(m) if m.role == Role::System => {
            rest = &messages[1..];
            tidy(&m.content)
        }
        _ => crate::prompt::DEFAULT_SYSTEM.to_string(),
    };
    let mut instruction = instruction(tools);

    let mut merged: Vec<(Role, String)> = Vec::new();
    for (i, m) in rest.iter().enumerate() {
        let content = tidy(&m.content);
        match m.role {
            Role::Tool => {
                let Some((Role::Assistant, last)) = merged.last_mut() else {
                    return Err(
                        "a tool result must follow the assistant message that called it".into(),
                    );
                };
                last.push_str(&format!("\nObservation: {content}"));
                if i == rest.len() - 1 {
                    // The model goes on with its reply.
                    last.push_str("\nThought:");
                }
            }
            Role::Assistant => {
                if merged.is_empty() {
                    return Err("expecting a user message before the assistant's".into());
                }
                let content = match &m.call {
                    None if !tools.is_empty() => {
                        format!("Thought: I now know the final answer.\nFinal Answer: {content}")
                    }
                    None => content,
                    Some(call) => {
                        let thought = if content.starts_with("Thought:") {
                            content
                        } else {
                            format!("Thought: {content}")
                        };
                        format!(
                            "{thought}\nAction: {}\nAction Input: {}",
                            call.name, call.arguments
                        )
                    }
                };
                match merged.last_mut() {
                    Some((Role::User, _)) => merged.push((Role::Assistant, tidy(&content))),
                    Some((_, last)) => {
                        last.push('\n');
                        last.push_str(&content);
                    }
                    None => unreachable!("checked above"),
                }
            }
            Role::User => merged.push((Role::User, content)),
            Role::System => return Err("the system message must come first".into()),
        }
    }

    let mut query = None;
    if let Some((Role::User, _)) = merged.last() {
        query = merged.pop().map(|m| m.1);
    }
    if !merged.len().is_multiple_of(2) {
        return Err("expecting a user message before every assistant message".into());
    }
    let n = merged.len();
    let mut history = Vec::new();
    for (i, pair) in merged.chunks(2).enumerate() {
        let (Role::User, user) = &pair[0] else {
            return Err(
                "expecting exactly one user (or tool) message before every assistant message"
                    .into(),
            );
        };
        let (Role::Assistant, bot) = &pair[1] else {
            return Err(
                "expecting exactly one user (or tool) message before every assistant message"
                    .into(),
            );
        };
        let mut user = tidy(user);
        if !instruction.is_empty() && 2 * i == n - 2 {
            user = format!("{instruction}\n\nQuestion: {user}");
            instruction.clear();
        }
        history.push((user, tidy(bot)));
    }
    if !instruction.is_empty() {
        // Only reachable with a question to answer: a continued reply has its turn above.
        let q = query.as_deref().unwrap_or_default();
        query = Some(format!("{instruction}\n\nQuestion: {q}"));
    }
    Ok(ReactTurns {
        system,
        history,
        query,
    })
}

/// What a reply says: its text (the thought before a call, the final answer, or the whole
/// reply) and the call it makes, if any (upstream `parse_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub call: Option<ToolCall>,
}

/// Upstream `parse_response` over the generated text (after the stop words were cut).
pub fn parse_response(response: &str) -> Parsed {
    let find = |s: &str, pat: &str| s.find(pat).map_or(-1, |i| i as i64);
    let mut response = response.to_string();
    let i = find(&response, "\nAction:");
    let j = find(&response, "\nAction Input:");
    let mut k = find(&response, "\nObservation:");
    let (mut name, mut args) = (String::new(), String::new());
    if 0 <= i && i < j {
        if k < j {
            // The stop word was cut off: put it back so the arguments end somewhere.
            response = format!("{}\nObservation:", response.trim_end());
        }
        k = find(&response, "\nObservation:");
        let (i, j, k) = (i as usize, j as usize, k as usize);
        name = response[i + "\nAction:".len()..j].trim().to_string();
        args = response[j + "\nAction Input:".len()..k].trim().to_string();
    }
    if !name.is_empty() {
        let mut content = response[..i as usize].to_string();
        if let Some(t) = content.find("Thought: ") {
            content = content[t + "Thought: ".len()..].to_string();
        }
        return Parsed {
            content: content.trim().to_string(),
            call: Some(ToolCall {
                name,
                arguments: args,
            }),
        };
    }
    let content = match response.rfind("\nFinal Answer: ") {
        Some(z) => response[z + "\nFinal Answer: ".len()..].to_string(),
        None => response,
    };
    Parsed {
        content,
        call: None,
    }
}

/// Upstream `add_extra_stop_words`: each stop word, and its form without leading newlines.
pub fn add_extra_stop_words(words: &[String]) -> Vec<String> {
    let mut out: Vec<String> = words.to_vec();
    for w in words {
        let s = w.trim_start_matches('\n');
        if !s.is_empty() && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

impl ReactTurns {
    /// The conversation to prompt with, and the reply already begun: empty when the model
    /// answers [`ReactTurns::query`], else the open reply of the last turn (ending in
    /// `Observation: ...\nThought:`), which [`crate::prompt::build_chatml_continuing`] continues.
    pub fn into_conversation(mut self) -> (crate::prompt::Conversation, String) {
        use crate::prompt::{Conversation, Item};
        let text = |s: String| vec![Item::Text { text: s }];
        let (query, prefix) = match self.query {
            Some(q) => (q, String::new()),
            // parse_messages only leaves no query when the last turn is an open reply.
            None => self.history.pop().unwrap_or_default(),
        };
        let conversation = Conversation {
            system: self.system,
            history: self
                .history
                .into_iter()
                .map(|(u, a)| (text(u), a))
                .collect(),
            query: text(query),
        };
        (conversation, prefix)
    }
}

/// The stop strings of a request that offers tools, as upstream sets them: the caller's own
/// (with their forms without leading newlines) and `Observation:`, where the model waits for
/// the tool's result.
pub fn stop_words(caller: &[String]) -> Vec<String> {
    let mut words = add_extra_stop_words(caller);
    for w in STOP_WORDS {
        if !words.iter().any(|s| s == w) {
            words.push(w.to_string());
        }
    }
    words
}

//! Tool use, the same under `serve` and `run`: a tool-using exchange becomes the ReAct prompt of
//! Qwen's own OpenAI-API example ([`lm::react`]) and the reply text becomes an answer or a call.
//!
//! The model writes `Thought: …\nAction: name\nAction Input: {…}` and stops at `Observation:`;
//! the caller runs the tool and sends its result back as a `tool` message, and the model goes on
//! with the same reply after `Observation: {result}\nThought:` (a continued reply, not a new
//! turn), until it writes `Final Answer: …`.

use lm::prompt::Conversation;
use lm::react::{self, Message, Tool, ToolCall};

/// What to generate for a tool-using exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolPrompt {
    pub conversation: Conversation,
    /// The reply already begun (after a tool's result), which the model continues; empty for a
    /// fresh reply.
    pub reply_prefix: String,
    /// Where generation stops: the caller's stop strings and `Observation:` when tools are
    /// offered.
    pub stops: Vec<String>,
    /// Whether tools are offered: then the reply is read as an answer or a call ([`read_reply`]).
    pub offered: bool,
}

/// The prompt for `messages` with `tools` offered (none: the exchange is only continued, and
/// the reply is plain text). The error says what is wrong with the messages.
pub fn prepare(
    messages: &[Message],
    tools: &[Tool],
    stops: &[String],
) -> Result<ToolPrompt, String> {
    if let Some(t) = tools.iter().find(|t| t.name.trim().is_empty()) {
        return Err(format!(
            "every tool needs a name (one described as {:?} has none)",
            t.description
        ));
    }
    let turns = react::parse_messages(messages, tools)?;
    let (conversation, reply_prefix) = turns.into_conversation();
    let offered = !tools.is_empty();
    let stops = if offered {
        react::stop_words(stops)
    } else {
        stops.to_vec()
    };
    Ok(ToolPrompt {
        conversation,
        reply_prefix,
        stops,
        offered,
    })
}

/// A finished reply of a request that offered tools: the text to show (the thought before a
/// call, or the final answer) and the call, if the model made one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolReply {
    pub content: String,
    pub call: Option<ToolCall>,
}

/// Reads the reply text (already cut at the stop strings) as upstream's `parse_response` does.
pub fn read_reply(text: &str) -> ToolReply {
    let p = react::parse_response(text);
    ToolReply {
        content: p.content,
        call: p.call,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lm::react::Role;

    fn msg(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
            call: None,
        }
    }

    fn weather() -> Tool {
        serde_json::from_value(serde_json::json!({
            "name": "get_weather",
            "description": "The weather of a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
        }))
        .unwrap()
    }

    #[test]
    fn a_question_with_tools_gets_the_instruction_and_the_observation_stop() {
        let p = prepare(
            &[msg(Role::User, "Weather in Paris?")],
            &[weather()],
            &["\nEND".into()],
        )
        .unwrap();
        assert!(p.offered);
        assert_eq!(p.reply_prefix, "");
        assert_eq!(p.stops, ["\nEND", "END", "Observation:"]);
        let q = lm::prompt::items_to_text(&p.conversation.query);
        assert!(q.starts_with("Answer the following questions"), "{q}");
        assert!(q.contains("get_weather: Call this tool"), "{q}");
        assert!(q.ends_with("Question: Weather in Paris?"), "{q}");
    }

    #[test]
    fn a_tool_result_continues_the_open_reply() {
        let call = Message {
            role: Role::Assistant,
            content: "I should look it up.".into(),
            call: Some(ToolCall {
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris"}"#.into(),
            }),
        };
        let p = prepare(
            &[
                msg(Role::User, "Weather in Paris?"),
                call,
                msg(Role::Tool, "sunny"),
            ],
            &[weather()],
            &[],
        )
        .unwrap();
        assert_eq!(
            p.reply_prefix,
            "Thought: I should look it up.\nAction: get_weather\nAction Input: \
             {\"city\": \"Paris\"}\nObservation: sunny\nThought:"
        );
        assert!(p.conversation.history.is_empty());
        // Without tools offered the exchange still reads, and no stop is added.
        let p = prepare(&[msg(Role::User, "hi")], &[], &[]).unwrap();
        assert!(!p.offered && p.stops.is_empty());
    }

    #[test]
    fn replies_become_calls_or_answers() {
        let r = read_reply(
            "Thought: I need the weather.\nAction: get_weather\nAction Input: {\"city\": \"Paris\"}",
        );
        assert_eq!(r.content, "I need the weather.");
        assert_eq!(
            r.call,
            Some(ToolCall {
                name: "get_weather".into(),
                arguments: "{\"city\": \"Paris\"}".into()
            })
        );
        let r = read_reply("I now know the final answer.\nFinal Answer: It is sunny.");
        assert_eq!(r.content, "It is sunny.");
        assert_eq!(r.call, None);
        let e = prepare(
            &[msg(Role::User, "q")],
            &[Tool {
                name: " ".into(),
                ..weather()
            }],
            &[],
        )
        .unwrap_err();
        assert!(e.contains("needs a name"), "{e}");
    }
}

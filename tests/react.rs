//! Tool use (ReAct) against the outputs of upstream `openai_api.py` (QwenLM/Qwen) recorded in
//! `tests/fixtures/tools/react_prompts.json` by `scripts/fixtures/gen_react_prompts.py`: the
//! messages → turns mapping, the prompt's text and token ids (with the text-only tokenizer), the
//! reply parsing and the stop words.

use lm::prompt::{build_chatml, build_chatml_continuing};
use lm::react::{self, Message, Role, Tool, ToolCall};
use lm::Checkpoint;
use serde_json::Value;

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                "function" => Role::Tool,
                r => panic!("role {r}"),
            },
            content: m["content"].as_str().unwrap_or_default().to_string(),
            call: m.get("function_call").map(|c| ToolCall {
                name: c["name"].as_str().unwrap().into(),
                arguments: c["arguments"].as_str().unwrap().into(),
            }),
        })
        .collect()
}

#[test]
fn react_prompts_match_upstream_openai_api() {
    let g = qwenvl_e2e::react_golden();
    let tok = Checkpoint::open(&qwenvl_e2e::text_fixture("tiny-text"))
        .unwrap()
        .tokenizer()
        .unwrap();
    for c in g["prompts"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        let tools: Vec<Tool> = serde_json::from_value(match &c["functions"] {
            Value::Null => Value::Array(vec![]),
            f => f.clone(),
        })
        .unwrap();
        let turns = react::parse_messages(&messages(&c["messages"]), &tools).unwrap();
        assert_eq!(turns.system, c["system"].as_str().unwrap(), "{id}: system");
        let want_history: Vec<(String, String)> =
            serde_json::from_value(c["history"].clone()).unwrap();
        assert_eq!(turns.history, want_history, "{id}: history");
        assert_eq!(turns.query.as_deref(), c["query"].as_str(), "{id}: query");

        let continuing = turns.query.is_none();
        let (conv, prefix) = turns.into_conversation();
        assert_eq!(prefix.is_empty(), !continuing, "{id}: open reply");
        let prompt = if continuing {
            build_chatml_continuing(&tok, &conv, &prefix, 6144).unwrap()
        } else {
            build_chatml(&tok, &conv, 6144).unwrap()
        };
        assert_eq!(
            prompt.raw_text,
            c["prompt_text"].as_str().unwrap(),
            "{id}: prompt text"
        );
        let want_ids: Vec<u32> = serde_json::from_value(c["prompt_ids"].clone()).unwrap();
        assert_eq!(prompt.ids, want_ids, "{id}: prompt ids");
    }
}

#[test]
fn replies_parse_like_upstream() {
    let g = qwenvl_e2e::react_golden();
    for c in g["parse_response"].as_array().unwrap() {
        let r = c["response"].as_str().unwrap();
        let p = react::parse_response(r);
        assert_eq!(p.content, c["content"].as_str().unwrap(), "{r:?}: content");
        let call = c["function_call"].as_object().map(|f| ToolCall {
            name: f["name"].as_str().unwrap().into(),
            arguments: f["arguments"].as_str().unwrap().into(),
        });
        assert_eq!(p.call, call, "{r:?}: call");
        let finish = if call.is_some() {
            "function_call"
        } else {
            "stop"
        };
        assert_eq!(c["finish_reason"], finish);
    }
    let stops = react::add_extra_stop_words(&["\nObservation:".into(), "Observation:".into()]);
    let want: Vec<String> = serde_json::from_value(g["add_extra_stop_words"].clone()).unwrap();
    assert_eq!(stops, want);
    // With tools offered upstream adds `Observation:` to the caller's stops (none: only it).
    assert_eq!(react::stop_words(&[]), ["Observation:"]);
    assert_eq!(
        react::stop_words(&["\nEND".into()]),
        ["\nEND", "END", "Observation:"]
    );
}

#[test]
fn malformed_exchanges_are_refused() {
    let m = |role, content: &str| Message {
        role,
        content: content.into(),
        call: None,
    };
    let tools: Vec<Tool> = Vec::new();
    for (msgs, needle) in [
        (vec![m(Role::Assistant, "hi")], "at least one user"),
        (vec![m(Role::Tool, "x"), m(Role::User, "q")], "tool result"),
        (vec![m(Role::User, "q"), m(Role::System, "late")], "system"),
    ] {
        let e = react::parse_messages(&msgs, &tools).unwrap_err();
        assert!(e.contains(needle), "{e}");
    }
}

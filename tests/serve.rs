//! `qwenvl serve` end to end: the real binary on the tiny-a fixture on a loopback port, talked to
//! with the official `openai` Python client and with curl. Answers must equal `qwenvl run`'s for
//! the same conversation and greedy settings.
//!
//! Needs `python3` with `openai` (`pip install openai`; `.ci/run` installs it) and `curl`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use qwenvl_e2e::{expected_json, tiny_a};
use serde_json::{json, Value};

#[path = "server_support.rs"]
mod server_support;
use server_support::{Server, BIN};
const MAX_TOKENS: u64 = 24;

fn case(id: &str) -> Value {
    expected_json("cases.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap()
        .clone()
}

/// The fixture images are referenced as `images/...` relative to the tiny-a folder.
fn images_base() -> PathBuf {
    tiny_a()
}

/// `qwenvl run --greedy --json` on a fixture conversation.
fn cli(conv: &Value, max_tokens: u64) -> Value {
    let conv: lm::prompt::Conversation = serde_json::from_value(conv.clone()).unwrap();
    server_support::cli(&conv, &tiny_a(), max_tokens as usize)
}

/// The OpenAI messages of a conversation, images inline as data URLs.
fn messages(conv: &Value) -> Value {
    let conv: lm::prompt::Conversation = serde_json::from_value(conv.clone()).unwrap();
    serde_json::to_value(qwenvl::openai::to_messages(&conv, &images_base()).unwrap()).unwrap()
}

/// curl's status code and body.
fn curl(url: &str, key: Option<&str>, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o"])
        .arg(dir.path().join("out"))
        .args(["-w", "%{http_code}"]);
    if let Some(k) = key {
        cmd.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    if let Some(b) = body {
        let f = dir.path().join("body.json");
        std::fs::write(&f, b).unwrap();
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", f.display()));
    }
    let out = cmd.arg(url).output().expect("curl");
    let code = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    (
        code,
        std::fs::read(dir.path().join("out")).unwrap_or_default(),
    )
}

fn chat_body(conv: &Value, extra: Value) -> Vec<u8> {
    let mut body = json!({
        "model": "tiny-a",
        "messages": messages(conv),
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    serde_json::to_vec(&body).unwrap()
}

/// Runs a Python script with the `openai` client; its stdout is JSON.
fn python(script: &str, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("client.py");
    std::fs::write(&f, script).unwrap();
    let out = Command::new("python3")
        .arg(&f)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the openai client script failed (is `pip install openai` done?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "client output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Non-streaming and streaming chat through the official client; messages come from a file.
const OPENAI_CHAT: &str = r#"
import json, sys
import openai
url, key, messages_file, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=url + "/v1", api_key=key)
messages = json.load(open(messages_file))
out = {"models": [m.id for m in client.models.list().data]}
r = client.chat.completions.create(model="tiny-a", messages=messages, temperature=0, max_tokens=max_tokens)
out["text"] = r.choices[0].message.content
out["finish"] = r.choices[0].finish_reason
out["usage"] = r.usage.model_dump()
out["boxes"] = (r.choices[0].message.model_extra or {}).get("boxes")
pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(model="tiny-a", messages=messages, temperature=0,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["stream_pieces"] = pieces
out["stream_finish"] = finish
out["stream_usage"] = usage
try:
    openai.OpenAI(base_url=url + "/v1", api_key="wrong-key").models.list()
    out["bad_key"] = "accepted"
except openai.AuthenticationError as e:
    out["bad_key"] = {"status": e.status_code, "message": str(e)}
print(json.dumps(out))
"#;

#[test]
fn openai_client_gets_the_cli_answer_streamed_and_not() {
    let server = Server::start(&["--api-key", "k-123"]);
    for id in ["one_image", "multi_turn_history_images", "custom_system"] {
        let conv = case(id)["conversation"].clone();
        let want = cli(&conv, MAX_TOKENS);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("messages.json");
        std::fs::write(&f, serde_json::to_vec(&messages(&conv)).unwrap()).unwrap();
        let got = python(
            OPENAI_CHAT,
            &[
                &server.url,
                "k-123",
                f.to_str().unwrap(),
                &MAX_TOKENS.to_string(),
            ],
        );
        assert_eq!(got["models"], json!(["tiny-a"]));
        assert_eq!(got["text"], want["text"], "{id}: non-streamed text");
        let streamed: String = got["stream_pieces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(
            streamed,
            want["text"].as_str().unwrap(),
            "{id}: streamed text"
        );
        let n_prompt = want["prompt_ids"].as_array().unwrap().len() as u64;
        let n_gen = want["generated_ids"].as_array().unwrap().len() as u64;
        if n_gen > 4 {
            assert!(
                got["stream_pieces"].as_array().unwrap().len() > 1,
                "{id}: the reply came in one piece, not streamed"
            );
        }
        for usage in [&got["usage"], &got["stream_usage"]] {
            assert_eq!(usage["prompt_tokens"], n_prompt, "{id}");
            assert_eq!(usage["completion_tokens"], n_gen, "{id}");
            assert_eq!(usage["total_tokens"], n_prompt + n_gen, "{id}");
        }
        let finish = if want["finish"] == "Length" {
            "length"
        } else {
            "stop"
        };
        assert_eq!(got["finish"], finish, "{id}");
        assert_eq!(got["stream_finish"], finish, "{id}");
        assert_eq!(got["boxes"], json!([]), "{id}: the boxes extension field");
        assert_eq!(got["bad_key"]["status"], 401, "{id}: {}", got["bad_key"]);
        assert!(got["bad_key"]["message"]
            .as_str()
            .unwrap()
            .contains("incorrect API key"));
    }
}

#[test]
fn curl_answers_equal_the_cli_and_keys_are_checked() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let chat = format!("{}/v1/chat/completions", server.url);
    for id in ["text_only_zh", "two_images", "grounding_en", "box_input"] {
        let conv = case(id)["conversation"].clone();
        let want = cli(&conv, MAX_TOKENS);
        let (code, body) = curl(&chat, Some("s3cret"), Some(&chat_body(&conv, json!({}))));
        assert_eq!(code, 200, "{id}: {}", String::from_utf8_lossy(&body));
        let r: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"]["content"], want["text"], "{id}");
        assert_eq!(
            r["usage"]["completion_tokens"],
            want["generated_ids"].as_array().unwrap().len(),
            "{id}"
        );
        // The grounding extension: the CLI's boxes, in the same grid and pixels.
        let boxes = r["choices"][0]["message"]["boxes"].as_array().unwrap();
        let cli_boxes = want["boxes"].as_array().unwrap();
        assert_eq!(boxes.len(), cli_boxes.len(), "{id}");
        for (b, c) in boxes.iter().zip(cli_boxes) {
            assert_eq!(b["box"], c["box"]);
            assert_eq!(b["box_px"], c["box_px"]);
        }
    }
    // Streaming with curl: server-sent events ending in [DONE].
    let conv = case("one_image")["conversation"].clone();
    let want = cli(&conv, MAX_TOKENS);
    let (code, body) = curl(
        &chat,
        Some("s3cret"),
        Some(&chat_body(&conv, json!({"stream": true}))),
    );
    assert_eq!(code, 200);
    let text = String::from_utf8(body).unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let mut streamed = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
    }
    assert_eq!(streamed, want["text"].as_str().unwrap());

    // Keys: none, wrong, right; /v1/models too.
    let models = format!("{}/v1/models", server.url);
    for key in [None, Some("wrong"), Some("s3cret-and-more")] {
        let (code, body) = curl(&models, key, None);
        assert_eq!(code, 401, "{key:?}");
        let e: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(e["error"]["code"], "invalid_api_key");
    }
    let (code, _) = curl(&chat, Some("wrong"), Some(&chat_body(&conv, json!({}))));
    assert_eq!(code, 401);
    let (code, body) = curl(&models, Some("s3cret"), None);
    assert_eq!(code, 200);
    let m: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["data"][0]["id"], "tiny-a");
}

#[test]
fn limits_and_bad_requests_get_clear_errors() {
    let server = Server::start(&[
        "--max-body-mb",
        "1",
        "--max-images",
        "2",
        "--max-image-pixels",
        "100000",
    ]);
    let chat = format!("{}/v1/chat/completions", server.url);
    let err = |code: u16, body: &[u8]| -> (u16, String) {
        let v: Value = serde_json::from_slice(body)
            .unwrap_or_else(|_| panic!("not a JSON error: {}", String::from_utf8_lossy(body)));
        (code, v["error"]["message"].as_str().unwrap().to_string())
    };

    // An oversized body: 413 before the model sees anything.
    let big =
        json!({"model": "tiny-a", "messages": [{"role": "user", "content": "x".repeat(2 << 20)}]});
    let (code, body) = curl(&chat, None, Some(&serde_json::to_vec(&big).unwrap()));
    let (code, msg) = err(code, &body);
    assert_eq!(code, 413, "{msg}");
    assert!(msg.contains("1 MiB"), "{msg}");

    // Too many images.
    let img = |name: &str| json!({"type": "image_url", "image_url": {"url": qwenvl::openai::data_url(&tiny_a().join("images").join(name)).unwrap()}});
    let three = json!({"model": "tiny-a", "messages": [{"role": "user", "content": [img("tiny_50x40.png"), img("tiny_50x40.png"), img("tiny_50x40.png"), {"type": "text", "text": "?"}]}]});
    let (code, body) = curl(&chat, None, Some(&serde_json::to_vec(&three).unwrap()));
    let (code, msg) = err(code, &body);
    assert_eq!(code, 400);
    assert!(msg.contains("more than 2 images"), "{msg}");

    // Too many pixels (640×480 > 100000).
    let large = json!({"model": "tiny-a", "messages": [{"role": "user", "content": [img("photo_640x480.jpg")]}]});
    let (code, body) = curl(&chat, None, Some(&serde_json::to_vec(&large).unwrap()));
    let (code, msg) = err(code, &body);
    assert_eq!(code, 400);
    assert!(msg.contains("640×480"), "{msg}");

    // Not an image, bad base64, a local path without --allow-local-files, an http URL.
    for (url, needle) in [
        (
            "data:image/png;base64,aGVsbG8gd29ybGQ=",
            "not a supported image",
        ),
        ("data:image/png;base64,!!!", "base64"),
        ("/etc/passwd", "--allow-local-files"),
        ("http://example.com/a.png", "not fetched"),
    ] {
        let body = json!({"model": "tiny-a", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]});
        let (code, body) = curl(&chat, None, Some(&serde_json::to_vec(&body).unwrap()));
        let (code, msg) = err(code, &body);
        assert_eq!(code, 400, "{url}: {msg}");
        assert!(msg.contains(needle), "{url}: {msg}");
    }

    // Malformed requests.
    for (body, code_want, needle) in [
        (&b"{not json"[..], 400, "not a valid chat request"),
        (br#"{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}"#, 404, "not served here"),
        (br#"{"model": "tiny-a", "messages": []}"#, 400, "no user message"),
        (br#"{"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}"#, 400, "temperature"),
        (br#"{"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "n": 3}"#, 400, "n = 1"),
    ] {
        let (code, resp) = curl(&chat, None, Some(body));
        let (code, msg) = err(code, &resp);
        assert_eq!(code, code_want, "{msg}");
        assert!(msg.contains(needle), "{msg}");
    }
    let (code, _) = curl(&format!("{}/v1/nothing", server.url), None, None);
    assert_eq!(code, 404);

    // After all that, the server still answers.
    let ok = json!({"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let (code, body) = curl(&chat, None, Some(&serde_json::to_vec(&ok).unwrap()));
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn stop_strings_and_seeded_sampling() {
    let server = Server::start(&[]);
    let chat = format!("{}/v1/chat/completions", server.url);
    let conv = case("one_image")["conversation"].clone();
    let want = cli(&conv, MAX_TOKENS);
    let text = want["text"].as_str().unwrap();
    // Stop at the start of the second word of the greedy answer.
    let words: Vec<&str> = text.split(' ').collect();
    assert!(words.len() > 2, "need a multi-word answer: {text:?}");
    let stop = words[1];
    let cut = &text[..text.find(stop).unwrap()];
    let (code, body) = curl(
        &chat,
        None,
        Some(&chat_body(&conv, json!({"stop": [stop]}))),
    );
    assert_eq!(code, 200);
    let r: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["choices"][0]["message"]["content"], cut.trim_end());
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    // The same seed gives the same sample; the CLI's sampler with that seed agrees.
    let sampled = |seed: i64| {
        let (code, body) = curl(
            &chat,
            None,
            Some(&chat_body(
                &conv,
                json!({"temperature": 1.0, "top_p": 0.9, "seed": seed}),
            )),
        );
        assert_eq!(code, 200);
        let r: Value = serde_json::from_slice(&body).unwrap();
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a = sampled(7);
    assert_eq!(a, sampled(7));
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(tiny_a().join("images"), dir.path().join("images")).unwrap();
    let path = dir.path().join("c.json");
    std::fs::write(&path, serde_json::to_vec(&conv).unwrap()).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--json", "--model"])
        .arg(tiny_a())
        .arg("--conversation")
        .arg(&path)
        .args([
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            "7",
            "--max-new-tokens",
        ])
        .arg(MAX_TOKENS.to_string())
        .output()
        .unwrap();
    let cli_sample: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a, cli_sample["text"].as_str().unwrap());
}

#[test]
fn temperature_zero_is_run_greedy_with_or_without_a_repetition_penalty() {
    let server = Server::start(&[]);
    let chat = format!("{}/v1/chat/completions", server.url);
    let c = case("one_image");
    let conv: lm::prompt::Conversation = serde_json::from_value(c["conversation"].clone()).unwrap();
    let served = |extra: Value| {
        let (code, body) = curl(&chat, None, Some(&chat_body(&c["conversation"], extra)));
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let r: Value = serde_json::from_slice(&body).unwrap();
        (
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            r["usage"]["completion_tokens"].as_u64().unwrap(),
        )
    };
    let run = |extra: &[&str]| {
        let v = server_support::cli_with(&conv, &tiny_a(), MAX_TOKENS as usize, extra);
        let ids = v["generated_ids"].as_array().unwrap().len() as u64;
        (v["text"].as_str().unwrap().trim_end().to_string(), ids)
    };
    let plain = served(json!({"seed": 5}));
    assert_eq!(
        plain,
        run(&[]),
        "temperature 0 is `run --greedy`, whatever the seed"
    );
    // The penalty is applied in greedy decoding too, by both front ends alike.
    let penalized = served(json!({"repetition_penalty": 1.5, "seed": 6}));
    assert_eq!(penalized, run(&["--repetition-penalty", "1.5"]));
    assert_ne!(
        penalized.0, plain.0,
        "a penalty of 1.5 changes this greedy answer"
    );
}

/// Sends a streaming request over a raw socket, reads `events` events, then hangs up.
fn stream_then_hang_up(base: &str, body: &[u8], events: usize) -> Vec<String> {
    let addr = base.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut got = Vec::new();
    let mut line = String::new();
    while got.len() < events {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(d) = line.trim().strip_prefix("data: ") {
            got.push(d.to_string());
        }
    }
    s.shutdown(std::net::Shutdown::Both).unwrap();
    got
}

#[test]
fn a_client_that_hangs_up_cancels_its_generation() {
    // One request at a time, so that the last part's request waits in the queue.
    let server = Server::start(&["--parallel", "1"]);
    // `ignore_eos` (vLLM's extension) keeps the reply going to `max_tokens` whatever the random
    // model says, and 8000 tokens take far longer than any of the hang-ups below: only a cancel
    // ends these requests early.
    let conv = case("two_images")["conversation"].clone();
    let body = chat_body(
        &conv,
        json!({"stream": true, "max_tokens": 8000, "ignore_eos": true}),
    );
    let got = stream_then_hang_up(&server.url, &body, 4);
    assert_eq!(got.len(), 4, "{got:?}");
    let line = server.wait_log("chatcmpl-0 from");
    assert!(line.contains("finish=cancelled"), "{line}");
    let n: u64 = line
        .split("completion_tokens=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(
        n < 8000 - 300,
        "generation went on after the hang-up: {line}"
    );

    // The same without streaming: the client gives up waiting for the whole answer.
    let plain = chat_body(&conv, json!({"max_tokens": 8000, "ignore_eos": true}));
    let addr = server.url.strip_prefix("http://").unwrap().to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        plain.len()
    )
    .unwrap();
    s.write_all(&plain).unwrap();
    // Long enough to be decoding (two tiny-model image encodes and a prefill take ~0.2 s), far
    // from done.
    std::thread::sleep(Duration::from_millis(600));
    drop(s);
    let line = server.wait_log("chatcmpl-1 from");
    assert!(line.contains("finish=cancelled"), "{line}");

    // A request that waits in the queue behind a long one and whose client leaves is dropped
    // without running: start a long non-streamed request, queue a streamed one, hang up on it.
    let long = chat_body(&conv, json!({"max_tokens": 300, "ignore_eos": true}));
    let chat = format!("{}/v1/chat/completions", server.url);
    let t = std::thread::spawn(move || curl(&chat, None, Some(&long)));
    std::thread::sleep(Duration::from_millis(200));
    let got = stream_then_hang_up(&server.url, &body, 1);
    assert_eq!(
        got.len(),
        1,
        "the role chunk comes at once, even while queued"
    );
    let (code, body) = t.join().unwrap();
    assert_eq!(code, 200);
    let r: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        r["usage"]["completion_tokens"], 300,
        "ignore_eos runs to max_tokens"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    let line = server.wait_log("chatcmpl-3 from");
    assert!(line.contains("cancelled while queued"), "{line}");
}

#[test]
fn concurrent_clients_are_all_answered_in_full() {
    let server = Server::start(&[]);
    let conv = case("one_image")["conversation"].clone();
    let want = cli(&conv, MAX_TOKENS);
    let chat = format!("{}/v1/chat/completions", server.url);
    let body = chat_body(&conv, json!({}));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (chat, body) = (chat.clone(), body.clone());
            std::thread::spawn(move || curl(&chat, None, Some(&body)))
        })
        .collect();
    for h in handles {
        let (code, body) = h.join().unwrap();
        assert_eq!(code, 200);
        let r: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(r["choices"][0]["message"]["content"], want["text"]);
    }
}

/// curl's status code, response headers (lower-case names) and body.
fn curl_full(args: &[&str], url: &str) -> (u16, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("curl")
        .args(["-s", "-D"])
        .arg(dir.path().join("headers"))
        .arg("-o")
        .arg(dir.path().join("out"))
        .args(["-w", "%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl");
    let code = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    let headers = std::fs::read_to_string(dir.path().join("headers"))
        .unwrap_or_default()
        .to_lowercase();
    let body = std::fs::read(dir.path().join("out")).unwrap_or_default();
    (code, headers, body)
}

/// The value of one Prometheus sample line (`name{labels} value`) in `/metrics`' text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no `{name}` in /metrics:\n{text}"))
}

#[test]
fn health_models_and_metrics_answer_as_llama_server_does() {
    let server = Server::start(&[
        "--parallel",
        "3",
        "--served-model-name",
        "tiny-a",
        "--cors-origin",
        "https://example.org",
    ]);
    let (code, headers, body) = curl_full(&[], &format!("{}/health", server.url));
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"status": "ok"})
    );
    assert!(
        headers.contains("access-control-allow-origin: https://example.org"),
        "{headers}"
    );
    // A browser's preflight is answered without a key or a body.
    let (code, headers, _) = curl_full(
        &["-X", "OPTIONS", "-H", "Origin: https://example.org"],
        &format!("{}/v1/chat/completions", server.url),
    );
    assert_eq!(code, 204);
    assert!(
        headers.contains("access-control-allow-methods"),
        "{headers}"
    );
    let (code, _, body) = curl_full(&[], &format!("{}/v1/models", server.url));
    assert_eq!(code, 200);
    let models: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-a");

    let (code, _, body) = curl_full(&[], &format!("{}/metrics", server.url));
    assert_eq!(code, 200);
    let before = String::from_utf8(body).unwrap();
    assert_eq!(metric(&before, "qwenvl_slots_total"), 3.0);
    assert_eq!(metric(&before, "qwenvl_generation_tokens_total"), 0.0);

    let chat = format!("{}/v1/chat/completions", server.url);
    let (mut prompt, mut generated) = (0.0, 0.0);
    for id in ["one_image", "text_only_en", "two_images"] {
        let (code, body) = curl(
            &chat,
            None,
            Some(&chat_body(&case(id)["conversation"], json!({}))),
        );
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let r: Value = serde_json::from_slice(&body).unwrap();
        prompt += r["usage"]["prompt_tokens"].as_f64().unwrap();
        generated += r["usage"]["completion_tokens"].as_f64().unwrap();
    }
    let bad = json!({"model": "tiny-a", "messages": [], "temperature": 5});
    let (code, _) = curl(&chat, None, Some(&serde_json::to_vec(&bad).unwrap()));
    assert_eq!(code, 400);
    let (_, _, body) = curl_full(&[], &format!("{}/metrics", server.url));
    let after = String::from_utf8(body).unwrap();
    assert_eq!(metric(&after, "qwenvl_requests_total{status=\"200\"}"), 3.0);
    assert_eq!(metric(&after, "qwenvl_requests_total{status=\"400\"}"), 1.0);
    assert_eq!(metric(&after, "qwenvl_prompt_tokens_total"), prompt);
    assert_eq!(metric(&after, "qwenvl_generation_tokens_total"), generated);
    assert_eq!(
        metric(&after, "qwenvl_time_to_first_token_seconds_count"),
        3.0
    );
    assert_eq!(
        metric(&after, "qwenvl_inter_token_latency_seconds_count"),
        generated - 3.0,
        "one gap between each two tokens of a reply"
    );
    assert_eq!(metric(&after, "qwenvl_slots_busy"), 0.0);
    assert_eq!(metric(&after, "qwenvl_queue_depth"), 0.0);
}

/// 16 clients at once through the official client, half of them streaming; prints each answer.
const OPENAI_CROWD: &str = r#"
import json, sys
from concurrent.futures import ThreadPoolExecutor
import openai
url, messages_file, max_tokens, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
messages = json.load(open(messages_file))
def ask(i):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    if i % 2 == 0:
        r = client.chat.completions.create(model="tiny-a", messages=messages, temperature=0, max_tokens=max_tokens)
        return r.choices[0].message.content
    text = ""
    for chunk in client.chat.completions.create(model="tiny-a", messages=messages, temperature=0,
            max_tokens=max_tokens, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
    return text
with ThreadPoolExecutor(n) as pool:
    print(json.dumps(list(pool.map(ask, range(n)))))
"#;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn thirty_two_clients_at_once_hostile_ones_included() {
    let server = Server::start(&["--parallel", "4", "--max-body-mb", "1"]);
    let conv = case("one_image")["conversation"].clone();
    let want = cli(&conv, MAX_TOKENS)["text"].as_str().unwrap().to_string();
    let chat = format!("{}/v1/chat/completions", server.url);
    let good = chat_body(&conv, json!({}));
    // Warm: the first request's allocations are not growth.
    assert_eq!(curl(&chat, None, Some(&good)).0, 200);
    let rss_warm = rss_kb(server.pid());

    let dir = tempfile::tempdir().unwrap();
    let messages_file = dir.path().join("messages.json");
    std::fs::write(
        &messages_file,
        serde_json::to_vec(&messages(&conv)).unwrap(),
    )
    .unwrap();
    let crowd = {
        let (url, f) = (server.url.clone(), messages_file.clone());
        std::thread::spawn(move || {
            python(
                OPENAI_CROWD,
                &[&url, f.to_str().unwrap(), &MAX_TOKENS.to_string(), "16"],
            )
        })
    };
    let broken = {
        // A PNG signature and a cut-off header: refused when the picture is read.
        let mut m = messages(&conv);
        let part = m
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .filter_map(|msg| msg["content"].as_array_mut())
            .flatten()
            .find(|p| p["type"] == "image_url")
            .expect("an image part");
        part["image_url"]["url"] = json!("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA");
        chat_body_messages(m)
    };
    let oversized = chat_body(&conv, json!({"padding": "x".repeat(2 << 20)}));
    let long_stream = chat_body(
        &conv,
        json!({"stream": true, "max_tokens": 4000, "ignore_eos": true}),
    );
    // 16 more over curl and raw sockets: 6 plain, 4 that hang up mid-stream, 4 broken
    // pictures, 2 bodies over the limit.
    let mut others = Vec::new();
    for i in 0..16 {
        let (chat, url) = (chat.clone(), server.url.clone());
        let body = match i {
            0..=5 => good.clone(),
            6..=9 => long_stream.clone(),
            10..=13 => broken.clone(),
            _ => oversized.clone(),
        };
        others.push(std::thread::spawn(move || match i {
            6..=9 => {
                let got = stream_then_hang_up(&url, &body, 3);
                (if got.len() == 3 { 200 } else { 0 }, Vec::new())
            }
            _ => curl(&chat, None, Some(&body)),
        }));
    }
    let codes: Vec<(u16, Vec<u8>)> = others.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (code, body)) in codes.iter().enumerate() {
        let want_code = match i {
            0..=9 => 200,
            10..=13 => 400,
            _ => 413,
        };
        assert_eq!(
            *code,
            want_code,
            "client {i}: {}",
            String::from_utf8_lossy(body)
        );
        if i <= 5 {
            let r: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(
                r["choices"][0]["message"]["content"],
                want.as_str(),
                "client {i}"
            );
        }
    }
    let answers = crowd.join().unwrap();
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 16);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.as_str(), Some(want.as_str()), "openai client {i}");
    }
    // The hung-up streams leave the batch; the server is idle and still answers.
    let t0 = std::time::Instant::now();
    loop {
        let (_, _, body) = curl_full(&[], &format!("{}/metrics", server.url));
        let m = String::from_utf8(body).unwrap();
        if metric(&m, "qwenvl_slots_busy") == 0.0 {
            // Every request counted under the status it got: 1 warm-up + 16 + 6 + 4 answered.
            assert_eq!(metric(&m, "qwenvl_requests_total{status=\"200\"}"), 27.0);
            assert_eq!(metric(&m, "qwenvl_requests_total{status=\"400\"}"), 4.0);
            assert_eq!(metric(&m, "qwenvl_requests_total{status=\"413\"}"), 2.0);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "hung-up requests still running:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cancelled = server.log().matches("finish=cancelled").count();
    assert_eq!(cancelled, 4, "{}", server.log());
    assert_eq!(
        curl(&chat, None, Some(&good)).0,
        200,
        "the server is still up"
    );
    let rss = rss_kb(server.pid());
    assert!(
        rss < rss_warm + 256 * 1024,
        "memory grew from {rss_warm} kB to {rss} kB over 32 requests"
    );
}

fn chat_body_messages(messages: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": "tiny-a",
        "messages": messages,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }))
    .unwrap()
}

/// A text-only Qwen checkpoint is served like Qwen-VL: `/v1/models` names it, text requests are
/// answered, and a picture in a request is a 400 that says why (not a 500, not a crash).
#[test]
fn text_only_models_answer_text_and_refuse_pictures() {
    let server = Server::start_model(&qwenvl_e2e::text_fixture("tiny-text"), &[]);
    let (code, body) = curl(&format!("{}/v1/models", server.url), None, None);
    assert_eq!(code, 200);
    let models: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-text", "{models}");

    let chat = format!("{}/v1/chat/completions", server.url);
    let text = json!({"model": "tiny-text", "max_tokens": 8, "temperature": 0,
                      "messages": [{"role": "user", "content": "你好！请用三句话介绍一下长城。"}]});
    let (code, body) = curl(&chat, None, Some(&serde_json::to_vec(&text).unwrap()));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");

    let url = qwenvl::openai::data_url(&tiny_a().join("images").join("tiny_50x40.png")).unwrap();
    let pic = json!({"model": "tiny-text", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]}]});
    let (code, body) = curl(&chat, None, Some(&serde_json::to_vec(&pic).unwrap()));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(code, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("text-only"), "{msg}");
    // Still up and answering.
    let (code, _) = curl(&chat, None, Some(&serde_json::to_vec(&text).unwrap()));
    assert_eq!(code, 200);
}

/// The official client's tool round trip, plain and streamed: the question with `tools` gets
/// `tool_calls` (finish `tool_calls`), the call and a `tool` result sent back get the answer.
/// Both prompts are upstream's own (`prompt_tokens` equals the golden prompt's length, and the
/// scripted model only answers after that prompt's last ids).
const OPENAI_TOOLS: &str = r#"
import json, sys
import openai
url, tools_file, question = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
tools = json.load(open(tools_file))
messages = [{"role": "user", "content": question}]

def ask(messages, stream):
    kw = dict(model="weather", messages=messages, tools=tools, temperature=0, max_tokens=64)
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [{"id": c.id, "type": c.type, "name": c.function.name,
                  "arguments": c.function.arguments} for c in (m.tool_calls or [])]
        return {"content": m.content, "calls": calls, "finish": r.choices[0].finish_reason,
                "prompt_tokens": r.usage.prompt_tokens}
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for c in d.tool_calls or []:
            e = calls.setdefault(c.index, {"id": "", "type": "", "name": "", "arguments": ""})
            e["id"] += c.id or ""
            e["type"] += c.type or ""
            e["name"] += (c.function.name or "") if c.function else ""
            e["arguments"] += (c.function.arguments or "") if c.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return {"content": content, "calls": [calls[i] for i in sorted(calls)], "finish": finish}

out = {"call": ask(messages, False), "call_streamed": ask(messages, True)}
c = out["call"]["calls"][0]
messages.append({"role": "assistant", "content": out["call"]["content"], "tool_calls": [
    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}]})
messages.append({"role": "tool", "tool_call_id": c["id"], "content": sys.argv[4]})
out["answer"] = ask(messages, False)
out["answer_streamed"] = ask(messages, True)
print(json.dumps(out))
"#;

#[test]
fn tool_calls_round_trip_through_the_openai_client() {
    use qwenvl_e2e::scripted;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("weather");
    scripted::write_weather_model(&model);
    let q = qwenvl_e2e::react_case("one_tool_question");
    let a = qwenvl_e2e::react_case("after_observation");
    let tools = qwenvl_e2e::openai_tools(&q);
    let tools_file = dir.path().join("tools.json");
    std::fs::write(&tools_file, serde_json::to_vec(&tools).unwrap()).unwrap();
    let result = a["messages"][2]["content"].as_str().unwrap();

    let server = Server::start_model(&model, &[]);
    let out = python(
        OPENAI_TOOLS,
        &[
            &server.url,
            tools_file.to_str().unwrap(),
            q["messages"][0]["content"].as_str().unwrap(),
            result,
        ],
    );
    for key in ["call", "call_streamed"] {
        let r = &out[key];
        assert_eq!(r["finish"], "tool_calls", "{key}: {r}");
        assert_eq!(r["content"], scripted::WEATHER_THOUGHT, "{key}: {r}");
        let calls = r["calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{key}: {r}");
        assert_eq!(calls[0]["name"], "get_weather", "{key}: {r}");
        assert_eq!(
            calls[0]["arguments"],
            scripted::WEATHER_ARGUMENTS,
            "{key}: {r}"
        );
        assert_eq!(calls[0]["type"], "function", "{key}: {r}");
        assert!(
            calls[0]["id"].as_str().unwrap().starts_with("call_"),
            "{key}: {r}"
        );
    }
    assert_eq!(
        out["call"]["prompt_tokens"],
        q["prompt_ids"].as_array().unwrap().len(),
        "the question's prompt is upstream's"
    );
    for key in ["answer", "answer_streamed"] {
        let r = &out[key];
        assert_eq!(r["finish"], "stop", "{key}: {r}");
        assert_eq!(r["content"], scripted::WEATHER_ANSWER, "{key}: {r}");
        assert_eq!(r["calls"], json!([]), "{key}: {r}");
    }
    assert_eq!(
        out["answer"]["prompt_tokens"],
        a["prompt_ids"].as_array().unwrap().len(),
        "the continued reply's prompt is upstream's"
    );
}

/// Tool requests the ReAct format cannot honour are refused by name; `functions` (the older
/// form Qwen's own example reads) is answered with `function_call`.
#[test]
fn tool_requests_are_checked_and_functions_get_function_call() {
    use qwenvl_e2e::scripted;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("weather");
    scripted::write_weather_model(&model);
    let server = Server::start_model(&model, &[]);
    let chat = format!("{}/v1/chat/completions", server.url);
    let weather = json!({"name": "get_weather", "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名, e.g. 北京"}}, "required": ["city"]}});
    let question = json!([{"role": "user", "content": "What's the weather in Paris?"}]);
    let post = |body: Value| {
        let (code, out) = curl(&chat, None, Some(&serde_json::to_vec(&body).unwrap()));
        (code, serde_json::from_slice::<Value>(&out).unwrap())
    };
    let tools = json!([{"type": "function", "function": weather}]);
    for (extra, param, needle) in [
        (
            json!({"tool_choice": "required"}),
            "tool_choice",
            "decides itself",
        ),
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            "tool_choice",
            "get_weather",
        ),
        (json!({"functions": [weather]}), "functions", "not both"),
        (
            json!({"tools": [{"type": "retrieval", "function": weather}]}),
            "tools[0].type",
            "retrieval",
        ),
    ] {
        let mut body = json!({"model": "weather", "messages": question, "tools": tools});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (code, v) = post(body);
        assert_eq!(code, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg}");
    }
    // A tool result for a call that was never made, and a call left without a result.
    let bad = json!([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "x"}
    ]);
    let (code, v) = post(json!({"model": "weather", "messages": bad, "tools": tools}));
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages[2].tool_call_id", "{v}");
    let (code, v) = post(json!({"model": "weather", "messages": [bad[0], bad[1]], "tools": tools}));
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no result"),
        "{v}"
    );

    // The older `functions` form.
    let (code, v) = post(
        json!({"model": "weather", "messages": question, "functions": [weather],
                                "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "function_call", "{v}");
    assert_eq!(
        choice["message"]["function_call"]["name"], "get_weather",
        "{v}"
    );
    assert_eq!(
        choice["message"]["function_call"]["arguments"],
        scripted::WEATHER_ARGUMENTS,
        "{v}"
    );
    assert!(choice["message"].get("tool_calls").is_none(), "{v}");
    // tool_choice "none": no tools offered, the reply is plain text (whatever this model says).
    let (code, v) = post(
        json!({"model": "weather", "messages": question, "tools": tools,
                                "tool_choice": "none", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
}

//! The app's remote backend end to end against a real `qwenvl serve` on the tiny-a fixture: the
//! backend itself, then the desktop app (egui_kittest) connected to the server — streaming, Stop
//! (which must cancel the generation on the server), bad keys and unreachable servers.

#[path = "server_support.rs"]
mod server_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use lm::checkpoint::LoadProgress;
use lm::prompt::{Conversation, Item};
use qwenvl::gui::backend::{Backend, EngineBackend, ModelSource, Params};
use qwenvl::gui::model::ModelState;
use qwenvl::gui::state::TurnStatus;
use qwenvl::gui::{install_fonts, AppOptions, QwenApp};
use qwenvl_e2e::{expected_json, tiny_a};
use serde_json::Value;
use server_support::{cli, Server};

fn case(id: &str) -> Conversation {
    let cases = expected_json("cases.json");
    let c = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap();
    serde_json::from_value(c["conversation"].clone()).unwrap()
}

fn greedy(max_new_tokens: usize) -> Params {
    Params {
        do_sample: false,
        max_new_tokens,
        ..Params::default()
    }
}

fn server_source(server: &Server, key: Option<&str>) -> ModelSource {
    ModelSource::Server {
        url: server.url.clone(),
        api_key: key.map(str::to_string),
    }
}

#[test]
fn the_backend_streams_the_cli_answer_from_the_server() {
    let server = Server::start(&["--api-key", "key-1"]);
    let mut backend = EngineBackend::default();
    let counter = Arc::new(LoadProgress::default());
    let info = backend
        .load(&server_source(&server, Some("key-1")), &|_, _| {}, &counter)
        .unwrap();
    assert!(info.description.contains("tiny-a"), "{}", info.description);
    for id in ["one_image", "multi_turn_history_images", "box_input"] {
        let conv = case(id);
        let want = cli(&conv, &tiny_a(), 24);
        let mut pieces = Vec::new();
        let cancel = AtomicBool::new(false);
        let stats = backend
            .reply(&conv, &tiny_a(), &greedy(24), &cancel, &mut |p| {
                pieces.push(p.to_string())
            })
            .unwrap();
        assert_eq!(pieces.concat(), want["text"].as_str().unwrap(), "{id}");
        assert_eq!(
            stats.tokens,
            want["generated_ids"].as_array().unwrap().len(),
            "{id}"
        );
        assert!(!stats.cancelled);
        assert!(stats.time_to_first_token_ms > 0.0);
    }

    // Cancel from the callback: the call returns and the server stops generating. (The greedy
    // reply to `one_image` runs 204 tokens before it stops by itself.)
    let conv = case("one_image");
    let cancel = AtomicBool::new(false);
    let mut n = 0;
    let t0 = Instant::now();
    let stats = backend
        .reply(&conv, &tiny_a(), &greedy(8000), &cancel, &mut |_| {
            n += 1;
            if n == 3 {
                cancel.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    assert!(stats.cancelled);
    assert!(t0.elapsed() < Duration::from_secs(30));
    let line = server.wait_log("finish=cancelled");
    assert!(line.contains("chatcmpl-"), "{line}");
}

#[test]
fn bad_keys_and_unreachable_servers_are_named() {
    let server = Server::start(&["--api-key", "right"]);
    let counter = Arc::new(LoadProgress::default());
    let mut backend = EngineBackend::default();
    for key in [None, Some("wrong")] {
        let e = backend
            .load(&server_source(&server, key), &|_, _| {}, &counter)
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("401"), "{msg}");
        assert!(msg.contains("API key"), "{msg}");
    }
    // A port nobody listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let e = backend
        .load(
            &ModelSource::Server {
                url: url.clone(),
                api_key: None,
            },
            &|_, _| {},
            &counter,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("cannot reach"), "{e:#}");
    let e = backend
        .load(
            &ModelSource::Server {
                url: "gpu-box:8080".into(),
                api_key: None,
            },
            &|_, _| {},
            &counter,
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("http://"), "{e:#}");
}

fn harness<'a>(app: QwenApp) -> Harness<'a, QwenApp> {
    let h = Harness::builder()
        .with_size(egui::vec2(1200.0, 860.0))
        .build_state(|ctx, app: &mut QwenApp| app.ui(ctx), app);
    install_fonts(&h.ctx);
    h
}

fn step_until(
    h: &mut Harness<'_, QwenApp>,
    secs: u64,
    what: &str,
    done: impl Fn(&QwenApp) -> bool,
) {
    let t0 = Instant::now();
    while !done(h.state()) {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}; errors: {:?}",
            h.state().errors
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ready(app: &QwenApp) -> bool {
    matches!(app.model, ModelState::Ready(_))
}

#[test]
fn the_app_chats_through_a_server_and_stop_cancels_there() {
    let server = Server::start(&["--api-key", "app-key"]);
    let tmp = tempfile::tempdir().unwrap();
    let opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    let mut h = harness(QwenApp::new(opts));
    // The first-run screen's server form.
    h.get_by_label("Connect");
    h.state_mut().server_url = format!("{}/", server.url);
    h.state_mut().server_key = "app-key".into();
    h.run_steps(2);
    h.get_by_label("Connect").click();
    step_until(&mut h, 30, "the connection", ready);
    let host = server.url.strip_prefix("http://").unwrap();
    h.get_by_label(&format!("Server: {host}"));

    // One message with a picture, greedy: the CLI's answer, streamed into the chat.
    h.state_mut().params = greedy(24);
    h.state_mut()
        .attach_files(&[tiny_a().join("images/photo_640x480.jpg")]);
    h.run_steps(2);
    let input = h.get_by_role(Role::MultilineTextInput);
    input.focus();
    input.type_text("What is in the picture?");
    h.step();
    h.get_by_label("Send").click();
    h.run_steps(2);
    assert!(h.state().is_generating(), "{:?}", h.state().notice);
    step_until(&mut h, 60, "the reply", |app| !app.is_generating());
    let turn = h.state().chat().turns[0].clone();
    assert_eq!(turn.status, TurnStatus::Done);
    let conv = Conversation {
        system: lm::prompt::DEFAULT_SYSTEM.into(),
        history: vec![],
        query: vec![
            Item::Image {
                image: "images/photo_640x480.jpg".into(),
            },
            Item::Text {
                text: "What is in the picture?".into(),
            },
        ],
    };
    let want = cli(&conv, &tiny_a(), 24);
    assert_eq!(turn.reply, want["text"].as_str().unwrap());
    let stats = turn.stats.unwrap();
    assert_eq!(
        stats.tokens,
        want["generated_ids"].as_array().unwrap().len()
    );

    // A long reply in a new chat, stopped from the app: the server's log shows the generation
    // cancelled. (The greedy reply to this conversation, the `one_image` case, runs 204 tokens.)
    h.state_mut().new_chat();
    h.state_mut().params = greedy(8000);
    h.state_mut()
        .attach_files(&[tiny_a().join("images/photo_640x480.jpg")]);
    h.run_steps(2);
    let input = h.get_by_role(Role::MultilineTextInput);
    input.focus();
    input.type_text("What is in this picture?");
    h.step();
    h.get_by_label("Send").click();
    h.run_steps(2);
    step_until(&mut h, 60, "streamed text", |app| {
        app.chat().turns[0].reply.chars().count() > 12
    });
    h.get_by_label("Stop").click();
    h.run_steps(2);
    assert!(!h.state().is_generating());
    assert_eq!(h.state().chat().turns[0].status, TurnStatus::Stopped);
    let line = server.wait_log("chatcmpl-1 from");
    assert!(line.contains("finish=cancelled"), "{line}");

    // The server and key are remembered: a new app connects again by itself.
    let settings: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("config/settings.json")).unwrap())
            .unwrap();
    assert_eq!(settings["use_server"], true);
    assert_eq!(settings["server"]["url"], format!("{}/", server.url));
    drop(h);
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    opts.discover_model = true;
    let mut h = harness(QwenApp::new(opts));
    step_until(&mut h, 30, "the reconnection", ready);
    match &h.state().model {
        ModelState::Ready(info) => assert!(info.source.is_server()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_connection_keeps_the_local_model() {
    let server = Server::start(&["--api-key", "right"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    opts.model = Some(tiny_a());
    let mut h = harness(QwenApp::new(opts));
    step_until(&mut h, 60, "tiny-a to load", ready);
    h.state_mut().server_url = server.url.clone();
    h.state_mut().server_key = "wrong".into();
    h.state_mut().connect_server();
    step_until(&mut h, 30, "the refusal", |app| !app.errors.is_empty());
    let err = h.state().errors.join("\n");
    assert!(err.contains("incorrect API key"), "{err}");
    match &h.state().model {
        ModelState::Ready(info) => assert!(!info.source.is_server()),
        other => panic!("the local model should still be ready: {other:?}"),
    }
    // And it still answers.
    h.state_mut().params = greedy(4);
    assert!(h
        .state_mut()
        .send_items(vec![Item::Text { text: "hi".into() }]));
    h.run_steps(2);
    step_until(&mut h, 60, "the local reply", |app| !app.is_generating());
    assert_eq!(h.state().chat().turns[0].status, TurnStatus::Done);
}

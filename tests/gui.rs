//! The desktop app, driven headless with egui_kittest: AccessKit queries by label/role, clicks,
//! drags and simulated file drops against the real `QwenApp` (the same code the window runs).
//!
//! Snapshot tests render with wgpu and need an adapter: on a machine without a GPU, Mesa's
//! lavapipe (Debian `mesa-vulkan-drivers`, which brings `libvulkan1`). Snapshots live in
//! tests/snapshots/; refresh them with `UPDATE_SNAPSHOTS=1 cargo test -p qwenvl --test gui`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egui::accesskit::Role;
use egui::{pos2, vec2, Rect};
use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions};
use lm::prompt::{items_to_text, Conversation, Item};
use lm::quant::WeightType;
use qwenvl::gui::backend::{EngineBackend, ModelSource, ReplyStats, ScriptedBackend};
use qwenvl::gui::geometry;
use qwenvl::gui::model::ModelState;
use qwenvl::gui::state::{Chat, TurnStatus};
use qwenvl::gui::{install_fonts, AppOptions, QwenApp};
use qwenvl_e2e::tiny_a;

#[path = "server_support.rs"]
#[allow(dead_code)]
mod server_support;

fn image(name: &str) -> PathBuf {
    tiny_a().join("images").join(name)
}

type Seen = Arc<Mutex<Vec<(Conversation, PathBuf)>>>;

/// An app in `root` answering with `reply` (scripted), its "model" already loading.
fn scripted_app(root: &Path, reply: &str, delay_ms: u64) -> (QwenApp, Seen) {
    let backend = ScriptedBackend::new(reply, Duration::from_millis(delay_ms));
    let seen = backend.seen.clone();
    let mut opts = AppOptions::for_folder(root, Box::new(backend));
    opts.model = Some(tiny_a());
    (QwenApp::new(opts), seen)
}

fn harness<'a>(app: QwenApp, size: egui::Vec2) -> Harness<'a, QwenApp> {
    let h = Harness::builder()
        .with_size(size)
        .build_state(|ctx, app: &mut QwenApp| app.ui(ctx), app);
    install_fonts(&h.ctx);
    h
}

fn wgpu_harness<'a>(app: QwenApp, size: egui::Vec2) -> Harness<'a, QwenApp> {
    let h = Harness::builder()
        .with_size(size)
        .wgpu()
        .build_state(|ctx, app: &mut QwenApp| app.ui(ctx), app);
    install_fonts(&h.ctx);
    h
}

/// Steps frames until `done` holds (the worker runs in real time), or panics after `secs`.
fn step_until(
    h: &mut Harness<'_, QwenApp>,
    secs: u64,
    what: &str,
    mut done: impl FnMut(&QwenApp) -> bool,
) {
    let t0 = Instant::now();
    loop {
        h.step();
        if done(h.state()) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}; errors: {:?}; generating: {}; last turn: {:?}",
            h.state().errors,
            h.state().is_generating(),
            h.state()
                .chat()
                .turns
                .last()
                .map(|t| (t.reply.len(), &t.status)),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ready(app: &QwenApp) -> bool {
    matches!(app.model, ModelState::Ready(_))
}

fn drop_file(h: &mut Harness<'_, QwenApp>, path: PathBuf) {
    h.input_mut().dropped_files.push(egui::DroppedFile {
        path: Some(path),
        ..Default::default()
    });
}

fn type_message(h: &mut Harness<'_, QwenApp>, text: &str) {
    let input = h.get_by_role(Role::MultilineTextInput);
    input.focus();
    input.type_text(text);
    h.step();
}

#[test]
fn tiny_a_two_dropped_images_streams_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    opts.model = Some(tiny_a());
    let mut h = harness(QwenApp::new(opts), vec2(1200.0, 860.0));
    step_until(&mut h, 120, "tiny-a to load", ready);
    // The checkpoint's generation_config.json is the default.
    assert!(h.state().params.do_sample);
    assert_eq!(h.state().params.top_p, 0.3);
    assert_eq!(h.state().params.max_new_tokens, 512);
    // Greedy on the golden case `two_images`: the reference reply loops without a stop token,
    // so Stop lands mid-stream, and its text is known.
    h.state_mut().params.do_sample = false;
    h.state_mut().params.max_new_tokens = 2048;
    let cases = qwenvl_e2e::expected_json("cases.json");
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "two_images")
        .unwrap();
    assert_eq!(case["greedy"]["stopped"], false);
    let golden = case["greedy"]["text"].as_str().unwrap().to_string();

    drop_file(&mut h, image("screenshot_1200x300.png"));
    drop_file(&mut h, image("portrait_300x900.jpg"));
    h.run_steps(3);
    assert_eq!(h.state().composer.images.len(), 2);
    h.get_by_label("Picture 1");
    h.get_by_label("Picture 2");
    assert_eq!(h.get_all_by_label("Remove").count(), 2);

    type_message(
        &mut h,
        "What are the differences between these two pictures?",
    );
    h.get_by_label("Send").click();
    h.run_steps(2);
    assert!(h.state().is_generating());
    // Composer cleared, the turn holds both pictures in order, then the text.
    assert!(h.state().composer.images.is_empty());
    let user = h.state().chat().turns[0].user.clone();
    assert!(
        matches!(&user[..], [Item::Image { .. }, Item::Image { .. }, Item::Text { text }]
            if text == "What are the differences between these two pictures?")
    );
    h.get_by_label("Stop");

    // Streaming: the reply grows over several frames.
    let mut lengths = Vec::new();
    step_until(&mut h, 120, "streamed text", |app| {
        let n = app.chat().turns[0].reply.len();
        if lengths.last() != Some(&n) {
            lengths.push(n);
        }
        lengths.iter().filter(|&&l| l > 0).count() >= 3
    });
    assert!(h.state().is_generating(), "the reply ended before Stop");
    h.get_by_label("Stop").click();
    h.run_steps(2);
    assert!(!h.state().is_generating());
    let turn = h.state().chat().turns[0].clone();
    assert_eq!(turn.status, TurnStatus::Stopped);
    assert!(!turn.reply.is_empty());
    // What streamed is the reference's greedy reply (or its start).
    assert!(
        golden.starts_with(&turn.reply) || turn.reply.starts_with(&golden),
        "{:?} vs golden {golden:?}",
        turn.reply
    );
    // Nothing more arrives after Stop, and Send is back.
    std::thread::sleep(Duration::from_millis(300));
    h.run_steps(3);
    assert_eq!(h.state().chat().turns[0].reply, turn.reply);
    h.get_by_label("(stopped)");
    h.get_by_label("Send");
    // The stopped turn was saved.
    let saved = std::fs::read_dir(tmp.path().join("data/chats"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count();
    assert_eq!(saved, 1);
}

const GROUNDED: &str = concat!(
    "Here: <ref>the cat</ref><box>(100,200),(500,600)</box><box>(600,100),(900,400)</box>",
    " and <ref>狗</ref><quad>(10,10),(200,10),(200,300),(10,300)</quad>."
);

/// Sends one message with the photo and waits for the scripted reply.
fn send_with_photo(h: &mut Harness<'_, QwenApp>, text: &str) {
    step_until(h, 10, "the scripted model", ready);
    h.state_mut().attach_files(&[image("photo_640x480.jpg")]);
    h.run_steps(2);
    type_message(h, text);
    h.get_by_label("Send").click();
    step_until(h, 10, "the reply", |app| !app.is_generating());
    h.run_steps(2);
}

#[test]
fn boxes_in_a_reply_are_drawn_with_the_right_geometry() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), GROUNDED, 0);
    let mut h = harness(app, vec2(1200.0, 900.0));
    send_with_photo(&mut h, "Where are the animals?");

    h.get_by_label("Picture with 2 found object(s): the cat, 狗");
    // Markup appears as chips, never as raw tags.
    h.get_by_label("the cat");
    h.get_by_label("狗");
    assert!(h.query_by_label_contains("<ref>").is_none());
    assert!(h.query_by_label_contains("<box>").is_none());

    let check = |h: &Harness<'_, QwenApp>| {
        let drawn = &h.state().drawn;
        assert_eq!(drawn.len(), 3, "two boxes of the cat and the dog's quad");
        let r = drawn[0].image_rect;
        // The 640x480 photo keeps its aspect ratio.
        assert!((r.width() / r.height() - 640.0 / 480.0).abs() < 1e-3);
        // Pixel → screen: egui rounds the picture's rect, so each axis has its own scale.
        let (sx, sy) = (r.width() / 640.0, r.height() / 480.0);
        let at = |x: f32, y: f32| pos2(r.min.x + x * sx, r.min.y + y * sy);
        let close = |a: egui::Pos2, b: egui::Pos2| (a - b).length() < 1e-3;
        // (100,200),(500,600) on 640x480 → pixels (64,96)-(320,288).
        assert_eq!(drawn[0].label.as_deref(), Some("the cat"));
        assert!(close(drawn[0].outline[0], at(64.0, 96.0)), "{:?}", drawn[0]);
        assert!(
            close(drawn[0].outline[2], at(320.0, 288.0)),
            "{:?}",
            drawn[0]
        );
        // (600,100),(900,400) → (384,48)-(576,192), same object.
        assert_eq!(drawn[1].object, 0);
        assert!(close(drawn[1].outline[0], at(384.0, 48.0)));
        assert!(close(drawn[1].outline[2], at(576.0, 192.0)));
        // The quad's corners → (6,4),(128,4),(128,144),(6,144).
        assert_eq!(
            (drawn[2].object, drawn[2].label.as_deref()),
            (1, Some("狗"))
        );
        let q: Vec<_> = [(6.0, 4.0), (128.0, 4.0), (128.0, 144.0), (6.0, 144.0)]
            .iter()
            .map(|&(x, y)| at(x, y))
            .collect();
        assert!(drawn[2].outline.iter().zip(&q).all(|(a, b)| close(*a, *b)));
        r
    };
    let big = check(&h);
    // Resized window: the picture shrinks and the boxes follow it.
    h.set_size(vec2(560.0, 900.0));
    h.run_steps(3);
    let small = check(&h);
    assert!(small.width() < big.width(), "{small:?} vs {big:?}");

    // Hovering a ref chip highlights its box; hovering the box highlights the chip's object.
    h.get_by_label("the cat").hover();
    h.run_steps(2);
    assert!(h
        .state()
        .drawn
        .iter()
        .filter(|d| d.object == 0)
        .all(|d| d.highlighted));
    assert!(h
        .state()
        .drawn
        .iter()
        .filter(|d| d.object == 1)
        .all(|d| !d.highlighted));
    let dog_box = Rect::from_points(&h.state().drawn[2].outline);
    h.hover_at(dog_box.center());
    h.run_steps(2);
    assert_eq!(h.state().hovered, Some((0, 1)));

    // The toggle hides the boxes.
    h.get_by_label("Show boxes").click();
    h.run_steps(2);
    assert!(h.state().drawn.is_empty());

    // Export: boxes drawn into the PNG at the reference's pixel positions.
    let out = tmp.path().join("annotated.png");
    h.state().export_annotated(0, &out).unwrap();
    let png = vision::image::open(&out).unwrap().to_rgba8();
    let orig = vision::image::open(image("photo_640x480.jpg"))
        .unwrap()
        .to_rgba8();
    assert_eq!(png.dimensions(), (640, 480));
    let red = geometry::colour(0);
    assert_eq!(png.get_pixel(64, 200).0, [red.r(), red.g(), red.b(), 255]);
    assert_eq!(png.get_pixel(200, 288).0, [red.r(), red.g(), red.b(), 255]);
    assert_eq!(png.get_pixel(192, 192), orig.get_pixel(192, 192));
}

#[test]
fn dragging_a_region_sends_box_markup() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, seen) = scripted_app(tmp.path(), "A red square.", 0);
    let mut h = harness(app, vec2(1200.0, 900.0));
    step_until(&mut h, 10, "the scripted model", ready);
    h.state_mut().attach_files(&[image("photo_640x480.jpg")]);
    // The composer panel takes a frame to grow to its new content.
    h.run_steps(2);
    h.get_by_label("Region").click();
    h.run_steps(2);
    let r = h.get_by_label("Region picker: Picture 1").rect();
    let at = |fx: f32, fy: f32| pos2(r.min.x + fx * r.width(), r.min.y + fy * r.height());
    h.hover_at(at(0.25, 0.25));
    h.step();
    h.drag_at(at(0.25, 0.25));
    h.step();
    h.hover_at(at(0.5, 0.4));
    h.step();
    h.hover_at(at(0.75, 0.5));
    h.step();
    h.drop_at(at(0.75, 0.5));
    h.run_steps(2);
    assert_eq!(h.state().composer.regions.len(), 1);
    assert_eq!(h.state().composer.regions[0].grid, [250, 250, 750, 500]);
    // Shown as a chip, not as markup.
    h.get_by_label("Region on Picture 1: (250,250),(750,500)");

    type_message(&mut h, "What is here?");
    h.get_by_label("Send").click();
    step_until(&mut h, 10, "the reply", |app| !app.is_generating());
    h.run_steps(2);
    // The sent message shows the region as a chip too.
    h.get_by_label("region (250,250),(750,500)");
    let seen = seen.lock().unwrap();
    let text = items_to_text(&seen[0].0.query);
    assert!(
        text.ends_with("What is here?<box>(250,250),(750,500)</box>"),
        "{text}"
    );
    assert!(text.starts_with("Picture 1: <img>images/"));
}

#[test]
fn chats_persist_and_reload_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, seen) = scripted_app(tmp.path(), GROUNDED, 0);
    let mut h = harness(app, vec2(1100.0, 800.0));
    send_with_photo(&mut h, "第一个问题");
    type_message(&mut h, "And now?");
    h.get_by_label("Send").click();
    step_until(&mut h, 10, "the second reply", |app| !app.is_generating());
    let chat: Chat = h.state().chat().clone();
    assert_eq!(chat.turns.len(), 2);
    assert_eq!(chat.title, "第一个问题");
    // The second request carried the first turn as history, its picture included.
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[1].0.history.len(), 1);
        assert_eq!(seen[1].0.history[0].1, GROUNDED);
        assert!(seen[1]
            .1
            .join(chat.turns[0].pictures().next().unwrap())
            .is_file());
    }
    drop(h);

    // A damaged file next to it is reported and kept aside, not deleted.
    let chats = tmp.path().join("data/chats");
    std::fs::write(chats.join("chat-broken.json"), b"{ not json").unwrap();

    let (app, _) = scripted_app(tmp.path(), "x", 0);
    let mut h = harness(app, vec2(1100.0, 800.0));
    h.run_steps(2);
    assert_eq!(h.state().chat(), &chat, "reopened on the last chat, intact");
    // In the sidebar and in the message.
    assert_eq!(h.get_all_by_label("第一个问题").count(), 2);
    assert_eq!(h.state().errors.len(), 1, "{:?}", h.state().errors);
    assert!(h.state().errors[0].contains("chat-broken.json"));
    h.get_by_label_contains("is damaged");
    assert!(!chats.join("chat-broken.json").exists());
    let aside: Vec<_> = std::fs::read_dir(&chats)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("chat-broken.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read(chats.join(&aside[0])).unwrap(), b"{ not json");

    // Markdown export names the pictures and shows markup as words.
    let md_path = tmp.path().join("chat.md");
    h.state().export_markdown(&md_path).unwrap();
    let md = std::fs::read_to_string(md_path).unwrap();
    assert!(md.contains("![Picture 1]("));
    assert!(md.contains("**the cat** `[100,200,500,600]`"), "{md}");
    assert!(!md.contains("<ref>"));
}

#[test]
fn a_second_message_while_generating_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, seen) = scripted_app(tmp.path(), "one two three four five six seven eight", 40);
    let mut h = harness(app, vec2(1100.0, 800.0));
    step_until(&mut h, 10, "the scripted model", ready);
    type_message(&mut h, "first");
    h.get_by_label("Send").click();
    h.run_steps(2);
    assert!(h.state().is_generating());
    // No Send button while generating; Enter and direct sends are refused with a notice.
    assert!(h.query_by_label("Send").is_none());
    assert!(!h.state_mut().send_items(vec![Item::Text {
        text: "second".into()
    }]));
    h.step();
    h.get_by_label("Wait for the reply to finish, or press Stop.");
    step_until(&mut h, 10, "the reply", |app| !app.is_generating());
    assert_eq!(h.state().chat().turns.len(), 1);
    assert_eq!(
        h.state().chat().turns[0].reply,
        "one two three four five six seven eight"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    let stats = h.state().chat().turns[0].stats.clone().unwrap();
    assert_eq!(stats.tokens, 8);
    assert!(stats.time_to_first_token_ms > 0.0 && stats.tokens_per_s > 0.0);
    h.get_by_label_contains("tokens/s · first token");

    // Regenerate writes the last reply again.
    h.get_by_label("Regenerate").click();
    h.step();
    assert!(h.state().is_generating());
    step_until(&mut h, 10, "the new reply", |app| !app.is_generating());
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(h.state().chat().turns.len(), 1);
}

#[test]
fn pasted_screenshot_and_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut app, _) = scripted_app(tmp.path(), "ok", 0);
    // A 4x2 picture on the "clipboard".
    app_clipboard(&mut app, 4, 2);
    let mut h = harness(app, vec2(1100.0, 800.0));
    step_until(&mut h, 10, "the scripted model", ready);
    // Ctrl+V with only a picture on the clipboard: egui sees just the V key going up.
    h.event(egui::Event::Key {
        key: egui::Key::V,
        physical_key: None,
        pressed: false,
        repeat: false,
        modifiers: egui::Modifiers::COMMAND,
    });
    h.run_steps(2);
    assert_eq!(h.state().composer.images.len(), 1);
    assert_eq!(
        (
            h.state().composer.images[0].width,
            h.state().composer.images[0].height
        ),
        (4, 2)
    );
    h.get_by_label("Remove").click();
    h.step();
    assert!(h.state().composer.images.is_empty());

    // A file that is not an image: a readable error, nothing attached.
    let bad = tmp.path().join("notes.png");
    std::fs::write(&bad, b"hello").unwrap();
    drop_file(&mut h, bad);
    h.run_steps(2);
    assert!(h.state().composer.images.is_empty());
    h.get_by_label_contains("is not a readable image");
}

/// `qwenvl PICTURE...` (and a file manager's "Open with"): the pictures wait in the composer of
/// the first message; one that cannot be read is named, and the others still attach.
#[test]
fn pictures_named_at_start_are_attached() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("notes.png");
    std::fs::write(&bad, b"hello").unwrap();
    let mut opts = AppOptions::for_folder(
        tmp.path(),
        Box::new(ScriptedBackend::new("ok", Duration::ZERO)),
    );
    opts.model = Some(tiny_a());
    opts.attach = vec![
        image("photo_640x480.jpg"),
        bad,
        image("screenshot_1200x300.png"),
    ];
    let mut h = harness(QwenApp::new(opts), vec2(1100.0, 800.0));
    h.run_steps(2);
    let sizes: Vec<(u32, u32)> = h
        .state()
        .composer
        .images
        .iter()
        .map(|s| (s.width, s.height))
        .collect();
    assert_eq!(sizes, [(640, 480), (1200, 300)]);
    h.get_by_label_contains("notes.png");
    h.get_by_label_contains("is not a readable image");
}

/// Esc stops a reply, Ctrl+N opens a new chat, Ctrl+F focuses the chat search, which filters
/// the sidebar by title and text; the theme toggle and Ctrl+= (text size) are remembered.
#[test]
fn keyboard_shortcuts_search_theme_and_text_size() {
    use egui::{Key, Modifiers};
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(
        tmp.path(),
        "A long answer that streams slowly, piece after piece, for a while.",
        80,
    );
    let mut h = harness(app, vec2(1100.0, 800.0));
    step_until(&mut h, 10, "the scripted model", ready);
    type_message(&mut h, "Tell me about zebras");
    h.get_by_label("Send").click();
    h.run_steps(2);
    assert!(h.state().is_generating());
    h.key_press(Key::Escape);
    h.run_steps(2);
    assert!(!h.state().is_generating());
    assert_eq!(h.state().chat().turns[0].status, TurnStatus::Stopped);

    h.key_press_modifiers(Modifiers::COMMAND, Key::N);
    h.run_steps(2);
    assert_eq!((h.state().chats.len(), h.state().current), (2, 0));
    assert!(h.state().chat().turns.is_empty());
    type_message(&mut h, "And giraffes?");
    h.get_by_label("Send").click();
    step_until(&mut h, 20, "the second reply", |app| !app.is_generating());
    h.run_steps(2);
    assert_eq!(
        h.get_all_by_label_contains("zebras").count(),
        1,
        "both chats listed"
    );

    h.key_press_modifiers(Modifiers::COMMAND, Key::F);
    h.run_steps(2);
    let search = qwenvl::gui::model::chat_search_id();
    assert!(
        h.ctx.memory(|m| m.has_focus(search)),
        "Ctrl+F focuses the search"
    );
    h.get_by_role(Role::TextInput).type_text("ZEBRA");
    h.run_steps(2);
    // Only the zebra chat is left in the sidebar (its title), the giraffe chat is hidden.
    assert_eq!(h.state().chat_search, "ZEBRA");
    assert!(
        h.query_by_label("And giraffes?").is_some(),
        "the open chat still shows"
    );
    let titles: Vec<String> = h.state().chats.iter().map(|c| c.title.clone()).collect();
    let giraffe = titles.iter().find(|t| t.contains("giraffes")).unwrap();
    assert_eq!(
        h.get_all_by_label(giraffe).count(),
        1,
        "the giraffe chat's sidebar entry is hidden (its message shows)"
    );

    assert_eq!(
        h.state().settings.theme,
        qwenvl::gui::settings::Theme::System
    );
    h.get_by_label_contains("Theme: system").click();
    h.run_steps(2);
    assert_eq!(
        h.state().settings.theme,
        qwenvl::gui::settings::Theme::Light
    );
    assert_eq!(h.ctx.theme(), egui::Theme::Light);
    h.get_by_label_contains("Theme: light").click();
    h.run_steps(2);
    assert_eq!(h.ctx.theme(), egui::Theme::Dark);

    h.key_press_modifiers(Modifiers::COMMAND, Key::Plus);
    h.run_steps(2);
    let zoom = h.ctx.zoom_factor();
    assert!(zoom > 1.0, "Ctrl+= made the text larger: {zoom}");
    assert_eq!(h.state().settings.zoom, Some(zoom));
    // Remembered: a new start has the dark theme and the larger text.
    let settings = std::fs::read_to_string(tmp.path().join("config/settings.json")).unwrap();
    assert!(settings.contains("\"Dark\""), "{settings}");
    drop(h);
    let (app, _) = scripted_app(tmp.path(), "x", 0);
    let mut h = harness(app, vec2(1100.0, 800.0));
    h.run_steps(3);
    assert_eq!(h.ctx.theme(), egui::Theme::Dark);
    assert!((h.ctx.zoom_factor() - zoom).abs() < 1e-3);
}

/// An app whose model answers "reply one", "reply two", ... in turn.
fn numbered_replies_app(root: &Path) -> (QwenApp, Seen) {
    let mut backend = ScriptedBackend::new("x", Duration::ZERO);
    backend.replies = ["one", "two", "three", "four", "five"]
        .iter()
        .map(|n| vec!["reply ".to_string(), n.to_string()])
        .collect();
    let seen = backend.seen.clone();
    let mut opts = AppOptions::for_folder(root, Box::new(backend));
    opts.model = Some(tiny_a());
    (QwenApp::new(opts), seen)
}

fn send_text(h: &mut Harness<'_, QwenApp>, text: &str) {
    type_message(h, text);
    h.get_by_label("Send").click();
    step_until(h, 10, "the reply", |app| !app.is_generating());
    h.run_steps(2);
}

fn replies(h: &Harness<'_, QwenApp>) -> Vec<String> {
    h.state()
        .chat()
        .turns
        .iter()
        .map(|t| t.reply.clone())
        .collect()
}

/// Regenerate keeps every version, browsable with ‹ n/m ›, also for an earlier reply, whose
/// version keeps the turns that followed it; edit-and-resend replaces the tail of the chat;
/// Delete removes one exchange; all of it survives a restart.
#[test]
fn regenerate_keeps_versions_edit_replaces_the_tail_and_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, seen) = numbered_replies_app(tmp.path());
    let mut h = harness(app, vec2(1100.0, 900.0));
    step_until(&mut h, 10, "the scripted model", ready);
    send_text(&mut h, "first question");
    send_text(&mut h, "second question");
    assert_eq!(replies(&h), ["reply one", "reply two"]);

    // A new version of the last reply; both kept.
    h.get_all_by_label("Regenerate").nth(1).unwrap().click();
    step_until(&mut h, 10, "the new version", |app| !app.is_generating());
    h.run_steps(2);
    assert_eq!(replies(&h), ["reply one", "reply three"]);
    h.get_by_label("2/2");
    h.get_by_label("‹").click();
    h.run_steps(2);
    assert_eq!(replies(&h), ["reply one", "reply two"]);
    h.get_by_label("1/2");
    h.get_by_label("›").click();
    h.run_steps(2);
    assert_eq!(replies(&h), ["reply one", "reply three"]);

    // A new version of the first reply: the second exchange stays with the old version.
    h.get_all_by_label("Regenerate").next().unwrap().click();
    step_until(&mut h, 10, "the first reply again", |app| {
        !app.is_generating()
    });
    h.run_steps(2);
    assert_eq!(replies(&h), ["reply four"]);
    // The model was asked the first question alone, not with the old tail.
    let asked = seen.lock().unwrap().last().unwrap().0.clone();
    assert!(asked.history.is_empty(), "{asked:?}");
    h.get_by_label("‹").click();
    h.run_steps(2);
    assert_eq!(replies(&h), ["reply one", "reply three"]);
    assert_eq!(h.state().chat().turns[1].version(), (2, 2));

    // Restart: the versions are in the chat file.
    drop(h);
    let (app, seen) = numbered_replies_app(tmp.path());
    let mut h = harness(app, vec2(1100.0, 900.0));
    step_until(&mut h, 10, "the scripted model", ready);
    assert_eq!(replies(&h), ["reply one", "reply three"]);
    assert_eq!(h.state().chat().turns[0].version(), (1, 2));

    // Edit the first message and ask again: the chat after it is replaced.
    h.get_all_by_label("Edit").next().unwrap().click();
    h.run_steps(2);
    assert_eq!(h.state().editing, Some((0, "first question".to_string())));
    assert!(
        h.get_all_by_value("first question").next().is_some(),
        "the editor holds the text"
    );
    h.state_mut().editing = Some((0, "an edited question".into()));
    h.run_steps(1);
    h.get_by_label("Save and send").click();
    step_until(&mut h, 10, "the answer to the edit", |app| {
        !app.is_generating()
    });
    h.run_steps(2);
    assert_eq!(h.state().chat().turns.len(), 1);
    assert_eq!(
        h.state().chat().turns[0].user,
        [Item::Text {
            text: "an edited question".into()
        }]
    );
    let asked = seen.lock().unwrap().last().unwrap().0.clone();
    assert!(
        matches!(&asked.query[..], [Item::Text { text }] if text == "an edited question"),
        "{asked:?}"
    );

    send_text(&mut h, "one more");
    assert_eq!(h.state().chat().turns.len(), 2);
    h.get_all_by_label("Delete").next().unwrap().click();
    h.run_steps(2);
    assert_eq!(h.state().chat().turns.len(), 1);
    assert!(
        matches!(&h.state().chat().turns[0].user[..], [Item::Text { text }] if text == "one more")
    );
}

/// A chat in the sidebar is renamed and deleted from its context menu; the file goes too.
#[test]
fn chats_are_renamed_and_deleted_from_the_sidebar() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = numbered_replies_app(tmp.path());
    let mut h = harness(app, vec2(1100.0, 800.0));
    step_until(&mut h, 10, "the scripted model", ready);
    send_text(&mut h, "about cats");
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::N);
    h.run_steps(2);
    send_text(&mut h, "about dogs");
    let files = || {
        std::fs::read_dir(tmp.path().join("data/chats"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "json")
            })
            .count()
    };
    assert_eq!(files(), 2);

    let cats = h
        .state()
        .chats
        .iter()
        .position(|c| c.title.contains("cats"))
        .unwrap();
    let title = h.state().chats[cats].title.clone();
    // The sidebar entry (the chat view shows the dogs chat).
    h.get_by_label(&title).click_secondary();
    h.run_steps(2);
    h.get_by_label("Rename").click();
    h.run_steps(2);
    // The window's field holds the old title; the user types over it.
    assert_eq!(h.state().renaming, Some((cats, title.clone())));
    assert!(h.get_all_by_value(&title).next().is_some());
    h.state_mut().renaming = Some((cats, "Cat notes".into()));
    h.run_steps(1);
    h.get_by_label("Rename").click();
    h.run_steps(3);
    assert_eq!(h.state().chats[cats].title, "Cat notes");
    let saved: Vec<String> = std::fs::read_dir(tmp.path().join("data/chats"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(saved.iter().any(|s| s.contains("Cat notes")));

    h.get_by_label("Cat notes").click_secondary();
    h.run_steps(2);
    h.get_by_label("Delete chat").click();
    h.run_steps(2);
    assert_eq!(h.state().chats.len(), 1);
    assert!(h.state().chats[0].title.contains("dogs"));
    assert_eq!(files(), 1);
}

/// The viewer: a reply's picture opens large; 100 % shows it pixel for pixel, zooming in scales
/// the boxes with it, a region dragged at that zoom is the right 0–1000 box in the composer, and
/// the box list copies pixel boxes as JSON.
#[test]
fn picture_viewer_zooms_keeps_boxes_and_maps_regions() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), GROUNDED, 0);
    let mut h = harness(app, vec2(1400.0, 1000.0));
    send_with_photo(&mut h, "Where are the animals?");
    h.get_by_label("Picture with 2 found object(s): the cat, 狗")
        .click();
    h.run_steps(3);
    h.get_by_label("Zoomable picture");
    let viewer_boxes = |h: &Harness<'_, QwenApp>| -> Vec<qwenvl::gui::model::Drawn> {
        h.state()
            .drawn
            .iter()
            .filter(|d| d.in_viewer)
            .cloned()
            .collect()
    };
    h.get_by_label("Actual size").click();
    h.run_steps(2);
    let d = viewer_boxes(&h);
    assert_eq!(d.len(), 3, "two boxes of the cat and the dog's quad");
    let r = d[0].image_rect;
    assert!(
        (r.width() - 640.0).abs() < 0.5 && (r.height() - 480.0).abs() < 0.5,
        "{r:?}"
    );
    h.get_by_label("100 %");
    h.get_by_label("Zoom in").click();
    h.run_steps(2);
    let d = viewer_boxes(&h);
    let r = d[0].image_rect;
    assert!((r.width() - 800.0).abs() < 0.5, "{r:?}");
    h.get_by_label("125 %");
    // The cat's first box, pixels (64,96)-(320,288), scaled with the picture.
    let at = |x: f32, y: f32| pos2(r.min.x + x * 1.25, r.min.y + y * 1.25);
    assert!(
        (d[0].outline[0] - at(64.0, 96.0)).length() < 0.5,
        "{:?}",
        d[0]
    );
    assert!(
        (d[0].outline[2] - at(320.0, 288.0)).length() < 0.5,
        "{:?}",
        d[0]
    );

    // A region at 125 %: pixels (160,120)-(320,240) of 640x480 = grid (250,250)-(500,500).
    h.get_by_label("Draw region").click();
    h.run_steps(2);
    h.hover_at(at(160.0, 120.0));
    h.step();
    h.drag_at(at(160.0, 120.0));
    h.step();
    h.hover_at(at(240.0, 180.0));
    h.step();
    h.hover_at(at(320.0, 240.0));
    h.step();
    h.drop_at(at(320.0, 240.0));
    h.run_steps(2);
    let composer = &h.state().composer;
    assert_eq!(
        composer.images.len(),
        1,
        "the picture goes with the next message"
    );
    assert_eq!(composer.regions.len(), 1);
    let g = composer.regions[0].grid;
    for (got, want) in g.iter().zip([250, 250, 500, 500]) {
        assert!((got - want).abs() <= 1, "{g:?}");
    }

    // The wheel zooms about the pointer: the picture point under it stays put.
    let under = at(320.0, 240.0);
    h.hover_at(under);
    h.step();
    h.event(egui::Event::MouseWheel {
        unit: egui::MouseWheelUnit::Point,
        delta: vec2(0.0, 120.0),
        modifiers: egui::Modifiers::NONE,
    });
    h.run_steps(20);
    let r2 = viewer_boxes(&h)[0].image_rect;
    assert!(r2.width() > 800.5, "{r2:?}");
    let kept = ((under - r2.min) / (r2.width() / 640.0)) - vec2(320.0, 240.0);
    assert!(
        kept.length() < 1.0,
        "the point under the pointer moved by {kept:?} pixels"
    );

    h.get_by_label("Copy boxes as JSON").click();
    h.step();
    let copied = copied_texts(&h);
    let rows: serde_json::Value = serde_json::from_str(&copied[0]).unwrap();
    assert_eq!(rows[0]["label"], "the cat");
    assert_eq!(rows[0]["px"], serde_json::json!([64, 96, 320, 288]));
    assert_eq!(rows[2]["label"], "狗");
    assert_eq!(
        rows[2]["px"].as_array().unwrap().len(),
        8,
        "a quad's four corners"
    );

    h.get_by_label("Close").click();
    h.run_steps(2);
    assert!(h.state().viewer.is_none());
}

/// What the last frame put on the clipboard.
fn copied_texts(h: &Harness<'_, QwenApp>) -> Vec<String> {
    h.output()
        .platform_output
        .commands
        .iter()
        .filter_map(|c| match c {
            egui::OutputCommand::CopyText(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

fn app_clipboard(app: &mut QwenApp, w: u32, hgt: u32) {
    app.set_clipboard(Box::new(move || {
        Ok(Some((w, hgt, vec![200u8; (w * hgt * 4) as usize])))
    }));
}

#[test]
fn broken_model_folder_and_first_run_screen() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    let empty = tmp.path().join("not-a-model");
    std::fs::create_dir_all(&empty).unwrap();
    opts.model = Some(empty);
    let mut h = harness(QwenApp::new(opts), vec2(1100.0, 800.0));
    step_until(&mut h, 10, "the load to fail", |app| {
        matches!(app.model, ModelState::Failed { .. })
    });
    h.run_steps(2);
    // In the banner and on the first-run screen.
    assert_eq!(h.get_all_by_label_contains("has no config.json").count(), 2);
    // The first-run screen offers the download, the folder picker and a server.
    h.get_by_label("Download Qwen/Qwen-VL-Chat");
    h.get_by_label("Open model folder…");
    h.get_by_label("Connect");
}

/// A chat with a picture, Chinese text and boxes, rendered with wgpu.
#[test]
fn snapshot_chat_with_boxes() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), GROUNDED, 0);
    let mut h = wgpu_harness(app, vec2(1100.0, 860.0));
    send_with_photo(&mut h, "图里的动物在哪里？");
    // Measured speeds differ run to run; the picture must not.
    h.state_mut().chats[0].turns[0].stats = Some(ReplyStats {
        tokens: 15,
        time_to_first_token_ms: 120.0,
        tokens_per_s: 24.5,
        cancelled: false,
        history_turns_dropped: 0,
    });
    h.remove_cursor();
    h.run_steps(2);
    h.snapshot_options("chat_with_boxes", &snapshot_options());
}

const MARKDOWN_REPLY: &str = concat!(
    "## Shapes\n\nI see **three** shapes, one is <ref>the square</ref><box>(156,208),(406,541)</box>:\n\n",
    "- a red *square*\n- a blue circle\n\n",
    "| shape | colour |\n|---|---|\n| square | red |\n| circle | blue |\n\n",
    "```python\nfrom PIL import Image\nprint(Image.open(\"a.png\").size)\n```\n\n",
    "See [the docs](https://example.com/docs)."
);

/// A Markdown reply: heading, list, table and code block are drawn as such (no raw `**`, `|` or
/// fences), the grounding chip sits inside the text and still lights its box, and the code
/// block's button copies exactly its code.
#[test]
fn markdown_replies_render_lists_tables_and_code_with_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), MARKDOWN_REPLY, 0);
    let mut h = harness(app, vec2(1100.0, 900.0));
    send_with_photo(&mut h, "What shapes are there?");
    h.run_steps(2);
    h.get_by_label("Shapes");
    h.get_by_label("three");
    h.get_by_label("a red ");
    // The italic list word and the table cell.
    assert_eq!(h.get_all_by_label("square").count(), 2);
    h.get_by_label("a blue circle");
    for cell in ["shape", "colour", "circle", "blue"] {
        h.get_by_label(cell);
    }
    h.get_by_label_contains("from PIL import Image");
    h.get_by_label("the docs");
    for raw in ["**", "| shape", "```", "## ", "<ref>"] {
        assert!(
            h.query_by_label_contains(raw).is_none(),
            "raw {raw:?} shown"
        );
    }
    // The chip inside the paragraph still highlights its box.
    h.get_by_label("the square").hover();
    h.run_steps(2);
    assert_eq!(h.state().hovered, Some((0, 0)));
    h.get_by_label("Copy code").click();
    h.step();
    let copied = copied_texts(&h);
    assert_eq!(
        copied,
        ["from PIL import Image\nprint(Image.open(\"a.png\").size)"]
    );
}

/// The Markdown reply above, rendered with wgpu.
#[test]
fn snapshot_markdown_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), MARKDOWN_REPLY, 0);
    let mut h = wgpu_harness(app, vec2(1100.0, 1000.0));
    send_with_photo(&mut h, "What shapes are there?");
    h.state_mut().chats[0].turns[0].stats = Some(ReplyStats {
        tokens: 60,
        time_to_first_token_ms: 120.0,
        tokens_per_s: 24.5,
        cancelled: false,
        history_turns_dropped: 0,
    });
    h.remove_cursor();
    h.run_steps(2);
    h.snapshot_options("markdown_reply", &snapshot_options());
}

#[test]
fn snapshot_first_run() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    let mut h = wgpu_harness(QwenApp::new(opts), vec2(1000.0, 640.0));
    h.run_steps(3);
    h.snapshot_options("first_run", &snapshot_options());
}

fn snapshot_options() -> SnapshotOptions {
    SnapshotOptions::new().output_path(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/snapshots"))
}

#[test]
fn new_chat_and_switching_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, seen) = scripted_app(tmp.path(), "hi there", 0);
    let mut h = harness(app, vec2(1100.0, 800.0));
    step_until(&mut h, 10, "the scripted model", ready);
    type_message(&mut h, "hello");
    h.get_by_label("Send").click();
    step_until(&mut h, 10, "the reply", |app| !app.is_generating());
    h.run_steps(2);
    h.get_by_label("＋ New chat").click();
    h.run_steps(2);
    assert_eq!(h.state().chats.len(), 2);
    assert!(h.state().chat().turns.is_empty());
    // A new chat starts without history.
    type_message(&mut h, "again");
    h.get_by_label("Send").click();
    step_until(&mut h, 10, "the reply", |app| !app.is_generating());
    assert!(seen.lock().unwrap()[1].0.history.is_empty());
    h.run_steps(2);
    h.get_by_role_and_label(Role::Button, "hello").click();
    h.run_steps(2);
    assert_eq!(h.state().chat().title, "hello");
    assert_eq!(h.state().chat().turns[0].reply, "hi there");
}

/// Files dragged over the window show the drop overlay.
#[test]
fn snapshot_drop_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), "x", 0);
    let mut h = wgpu_harness(app, vec2(900.0, 560.0));
    step_until(&mut h, 10, "the scripted model", ready);
    h.input_mut().hovered_files.push(egui::HoveredFile {
        path: Some(image("photo_640x480.jpg")),
        ..Default::default()
    });
    // Raw input lasts one frame, as in the window where it is sent every frame.
    h.step();
    h.snapshot_options("drop_overlay", &snapshot_options());
}

#[test]
fn model_found_in_the_hugging_face_cache() {
    use qwenvl::model_dir::{hf_snapshots, looks_like_model};
    let tmp = tempfile::tempdir().unwrap();
    let snaps = tmp.path().join("models--Qwen--Qwen-VL-Chat/snapshots");
    let good = snaps.join("0123abcd");
    let partial = snaps.join("99ffee00");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(good.join("config.json"), b"{}").unwrap();
    std::fs::write(good.join("qwen.tiktoken"), b"").unwrap();
    // An interrupted download (no tokenizer yet) is not offered.
    std::fs::write(partial.join("config.json"), b"{}").unwrap();
    assert_eq!(hf_snapshots(tmp.path()), vec![good.clone()]);
    assert!(looks_like_model(&tiny_a()));
    assert!(hf_snapshots(&tmp.path().join("elsewhere")).is_empty());
}

#[test]
fn settings_panel_defaults_and_persistence() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), "x", 0);
    let mut h = harness(app, vec2(1200.0, 800.0));
    step_until(&mut h, 10, "the scripted model", ready);
    h.get_by_label("⚙ Settings").click();
    h.run_steps(2);
    // tiny-a's generation_config.json: sampling, top_p 0.3, top_k 0, 512 new tokens.
    let p = h.state().params.clone();
    assert!(p.do_sample);
    assert_eq!((p.top_p, p.top_k, p.max_new_tokens), (0.3, 0, 512));
    assert_eq!(p.temperature, 1.0);
    h.get_by_role_and_label(Role::Slider, "Top-p");
    h.get_by_role_and_label(Role::Slider, "Max new tokens");
    // Keyboard on the slider: a smaller temperature, saved to the settings file.
    h.get_by_role_and_label(Role::Slider, "Temperature").focus();
    h.run_steps(1);
    h.key_press(egui::Key::ArrowLeft);
    h.run_steps(2);
    let t = h.state().params.temperature;
    assert!(t < 1.0, "{t}");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("config/settings.json")).unwrap())
            .unwrap();
    assert_eq!(saved["params"]["temperature"].as_f64(), Some(t));
    h.get_by_label("Reset to the model's defaults").click();
    h.run_steps(2);
    assert_eq!(h.state().params.temperature, 1.0);
}

/// The weight type in the settings: automatic by default (f32 for tiny-a), each choice labelled
/// with its memory for the open folder; choosing one loads the folder again with it and is
/// remembered for the next start.
#[test]
fn choosing_the_weight_type_reloads_the_model_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    // The app on tiny-a, loaded, and every source its scripted backend was asked to load.
    let start = || {
        let backend = ScriptedBackend::new("x", Duration::ZERO);
        let loads = backend.loads.clone();
        let mut opts = AppOptions::for_folder(tmp.path(), Box::new(backend));
        opts.model = Some(tiny_a());
        let mut h = harness(QwenApp::new(opts), vec2(1200.0, 800.0));
        step_until(&mut h, 10, "the scripted model", ready);
        (h, loads)
    };
    let (mut h, loads) = start();
    let folder = |s: &ModelSource| match s {
        ModelSource::Folder { path, weights, .. } => (path.clone(), *weights),
        other => panic!("{other:?}"),
    };
    assert_eq!(folder(&loads.lock().unwrap()[0]), (tiny_a(), None));

    h.get_by_label("⚙ Settings").click();
    h.run_steps(2);
    h.get_by_label("Weights in memory").click();
    h.run_steps(2);
    h.get_by_label("Automatic (f32)");
    // tiny-a's weights take ~0.08 GB as stored: a tenth of that as q4k.
    h.get_by_label_contains("q4k, about 0.0").click();
    h.run_steps(2);
    step_until(&mut h, 10, "the model loaded again", ready);
    let all = loads.lock().unwrap().clone();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(folder(&all[1]), (tiny_a(), Some(WeightType::Q4K)));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("config/settings.json")).unwrap())
            .unwrap();
    assert_eq!(saved["weights"], "q4k");

    // The next start loads with the remembered type.
    drop(h);
    let (_h, loads) = start();
    assert_eq!(
        folder(&loads.lock().unwrap()[0]),
        (tiny_a(), Some(WeightType::Q4K))
    );
}

/// The composer with two pictures, the region picker open and a region marked.
#[test]
fn snapshot_composer_with_region() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), "x", 0);
    let mut h = wgpu_harness(app, vec2(1000.0, 760.0));
    step_until(&mut h, 10, "the scripted model", ready);
    h.state_mut()
        .attach_files(&[image("photo_640x480.jpg"), image("portrait_300x900.jpg")]);
    h.run_steps(2);
    h.get_all_by_label("Region").next().unwrap().click();
    h.run_steps(2);
    let r = h.get_by_label("Region picker: Picture 1").rect();
    let at = |fx: f32, fy: f32| pos2(r.min.x + fx * r.width(), r.min.y + fy * r.height());
    h.hover_at(at(0.6, 0.2));
    h.step();
    h.drag_at(at(0.6, 0.2));
    h.step();
    h.hover_at(at(0.95, 0.8));
    h.step();
    h.drop_at(at(0.95, 0.8));
    h.run_steps(2);
    assert_eq!(h.state().composer.regions[0].grid, [600, 200, 950, 800]);
    type_message(&mut h, "这是什么？");
    h.remove_cursor();
    h.run_steps(2);
    h.snapshot_options("composer_with_region", &snapshot_options());
}

#[test]
fn read_text_sends_the_ocr_prompt_and_the_reply_can_be_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, seen) = scripted_app(
        tmp.path(),
        "Hello <ref>world</ref><box>(1,2),(3,4)</box>",
        0,
    );
    let mut h = harness(app, vec2(1100.0, 800.0));
    step_until(&mut h, 10, "the scripted model", ready);
    h.state_mut()
        .attach_files(&[image("screenshot_1200x300.png")]);
    h.run_steps(2);
    h.get_by_label("Read text").click();
    h.run_steps(2);
    step_until(&mut h, 10, "the reply", |app| !app.is_generating());
    {
        let seen = seen.lock().unwrap();
        assert!(matches!(
            &seen[0].0.query[..],
            [Item::Image { .. }, Item::Text { text }] if text == qwenvl::session::OCR_PROMPT
        ));
    }
    // The picture went with the message, not left in the composer.
    assert!(h.state().composer.images.is_empty());
    h.run_steps(2);
    h.get_by_label("Copy").click();
    h.step();
    let copied = copied_texts(&h);
    assert_eq!(copied, vec!["Hello **world** `[1,2,3,4]`".to_string()]);
}

#[test]
fn loading_shows_its_stage_then_the_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let mut backend = ScriptedBackend::new("x", Duration::ZERO);
    backend.load_delay = Duration::from_millis(800);
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(backend));
    opts.model = Some(tiny_a());
    let mut h = harness(QwenApp::new(opts), vec2(1000.0, 700.0));
    step_until(
        &mut h,
        5,
        "the loading stage",
        |app| matches!(&app.model, ModelState::Loading { stage, .. } if stage == "Loading scripted model"),
    );
    h.step();
    h.get_by_label_contains("Loading scripted model — ");
    h.get_by_label_contains("Loading /");
    step_until(&mut h, 10, "the model", ready);
    h.run_steps(2);
    h.get_by_label("Ask about pictures");
    assert_eq!(
        h.state().settings.last_model.as_deref(),
        Some(tiny_a().as_path())
    );
}

/// The child half of `sigkill_during_generation_loses_nothing`: sends a message with a picture and
/// keeps a slow reply streaming until the parent kills it. Ignored, so that it runs only when the
/// parent starts it (with `--ignored`), never as a test that passes by doing nothing.
#[test]
#[ignore = "the child process of sigkill_during_generation_loses_nothing, which starts it"]
fn sigkill_child() {
    let root = std::env::var_os("QWENVL_SIGKILL_CHILD_ROOT")
        .expect("QWENVL_SIGKILL_CHILD_ROOT: run by sigkill_during_generation_loses_nothing");
    let root = PathBuf::from(root);
    let (app, _) = scripted_app(&root, &"一个很长的回答。".repeat(2000), 20);
    let mut h = harness(app, vec2(1100.0, 800.0));
    step_until(&mut h, 60, "the scripted model", ready);
    h.state_mut().attach_files(&[image("photo_640x480.jpg")]);
    h.run_steps(2);
    type_message(&mut h, "Killed mid-reply?");
    h.get_by_label("Send").click();
    step_until(&mut h, 60, "streaming", |app| {
        app.chat()
            .turns
            .first()
            .is_some_and(|t| !t.reply.is_empty())
    });
    std::fs::write(root.join("streaming"), b"").unwrap();
    loop {
        h.step();
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigkill_during_generation_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QWENVL_SIGKILL_CHILD_ROOT", tmp.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !tmp.path().join("streaming").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child app exited before it was killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the child never streamed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // `Child::kill` is SIGKILL on Unix: no destructor, no last save.
    child.kill().unwrap();
    child.wait().unwrap();

    // Restart on the same folders: the sent message and its picture are there.
    let (app, _) = scripted_app(tmp.path(), "x", 0);
    let mut h = harness(app, vec2(1100.0, 800.0));
    h.run_steps(2);
    let chat = h.state().chat().clone();
    assert_eq!(chat.turns.len(), 1, "{chat:?}");
    let turn = &chat.turns[0];
    assert!(
        matches!(&turn.user[..], [Item::Image { .. }, Item::Text { text }] if text == "Killed mid-reply?"),
        "{:?}",
        turn.user
    );
    let picture = turn.pictures().next().unwrap();
    let stored = tmp.path().join("data/chats").join(picture);
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(image("photo_640x480.jpg")).unwrap(),
        "the attached picture survives, byte for byte"
    );
    // Shown again: as the chat's title in the sidebar and as the message.
    assert_eq!(h.get_all_by_label("Killed mid-reply?").count(), 2);
}

#[test]
fn a_reply_that_lost_old_turns_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, _) = scripted_app(tmp.path(), "ok", 0);
    let mut h = harness(app, vec2(1100.0, 800.0));
    send_with_photo(&mut h, "A question");
    assert!(h
        .query_by_label_contains("no longer fit the model's context")
        .is_none());
    h.state_mut().chats[0].turns[0].stats = Some(ReplyStats {
        tokens: 3,
        time_to_first_token_ms: 10.0,
        tokens_per_s: 5.0,
        cancelled: false,
        history_turns_dropped: 2,
    });
    h.run_steps(2);
    h.get_by_label_contains("The 2 oldest turn(s) no longer fit the model's context");
}

/// The app, `qwenvl run` and `qwenvl serve` are front ends over one session layer: the same
/// greedy request (here with a repetition penalty, which greedy decoding applies too) gets the
/// same answer from each, on tiny-a.
#[test]
fn app_cli_and_server_give_the_same_greedy_answer() {
    const TOKENS: usize = 24;
    const PENALTY: f64 = 1.3;
    let question = "What is in this picture?";
    let conv = Conversation {
        system: lm::prompt::DEFAULT_SYSTEM.to_string(),
        history: Vec::new(),
        query: vec![
            Item::Image {
                image: "images/photo_640x480.jpg".into(),
            },
            Item::Text {
                text: question.into(),
            },
        ],
    };
    let penalty = PENALTY.to_string();
    let cli = server_support::cli_with(
        &conv,
        &tiny_a(),
        TOKENS,
        &["--repetition-penalty", &penalty],
    );
    let cli_text = cli["text"].as_str().unwrap().trim().to_string();
    let plain = server_support::cli(&conv, &tiny_a(), TOKENS);
    assert_ne!(
        plain["text"].as_str().unwrap().trim(),
        cli_text,
        "the penalty changes this answer, so each front end must apply it"
    );

    let server = server_support::Server::start(&[]);
    let body = serde_json::json!({
        "model": "tiny-a",
        "messages": qwenvl::openai::to_messages(&conv, &tiny_a()).unwrap(),
        "temperature": 0,
        "repetition_penalty": PENALTY,
        "max_tokens": TOKENS,
    });
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ])
        .arg(format!("{}/v1/chat/completions", server.url))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin
                .take()
                .unwrap()
                .write_all(&serde_json::to_vec(&body).unwrap())?;
            c.wait_with_output()
        })
        .expect("curl");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let served = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .trim();
    assert_eq!(served, cli_text, "serve vs run");

    let tmp = tempfile::tempdir().unwrap();
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    opts.model = Some(tiny_a());
    let mut h = harness(QwenApp::new(opts), vec2(1200.0, 860.0));
    step_until(&mut h, 120, "tiny-a to load", ready);
    h.state_mut().params.do_sample = false;
    h.state_mut().params.repetition_penalty = PENALTY;
    h.state_mut().params.max_new_tokens = TOKENS;
    h.state_mut().attach_files(&[image("photo_640x480.jpg")]);
    h.run_steps(2);
    type_message(&mut h, question);
    h.get_by_label("Send").click();
    h.run_steps(2);
    step_until(&mut h, 120, "the reply", |app| !app.is_generating());
    let app_text = h.state().chat().turns[0].reply.trim().to_string();
    assert_eq!(app_text, cli_text, "app vs run");
}

/// "Runs on" offers the devices this build finds and is remembered; a remembered device this
/// build lacks is an error that names it (the model is not quietly loaded on the CPU), and
/// choosing the CPU then loads it.
#[test]
fn the_device_setting_names_a_missing_device_and_switches_back() {
    if candle_core::utils::cuda_is_available() {
        eprintln!("skipped: this build has CUDA, so cuda:0 is not a missing device");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("config")).unwrap();
    std::fs::write(
        tmp.path().join("config/settings.json"),
        br#"{"device": "cuda:0", "show_boxes": true}"#,
    )
    .unwrap();
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    opts.model = Some(tiny_a());
    let mut h = harness(QwenApp::new(opts), vec2(1200.0, 860.0));
    step_until(&mut h, 60, "the load to fail", |app| {
        matches!(app.model, ModelState::Failed { .. })
    });
    let ModelState::Failed { error, .. } = &h.state().model else {
        unreachable!()
    };
    assert!(
        error.contains("device cuda:0: this qwenvl was built without CUDA"),
        "{error}"
    );

    h.get_by_label("⚙ Settings").click();
    h.run_steps(2);
    h.get_by_label("Runs on").click();
    h.run_steps(2);
    h.get_by_label("CPU").click();
    h.run_steps(2);
    step_until(&mut h, 120, "tiny-a to load on the CPU", ready);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("config/settings.json")).unwrap())
            .unwrap();
    assert_eq!(saved["device"], serde_json::Value::Null);
}

/// A text-only Qwen (tests/fixtures/tiny-text) in the app: "Attach images…" is disabled with a
/// one-line note, a dropped picture is refused with a message that says why (the message being
/// written survives), and a text message is answered.
#[test]
fn text_only_model_disables_pictures_and_still_chats() {
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    opts.model = Some(qwenvl_e2e::text_fixture("tiny-text"));
    let mut h = harness(QwenApp::new(opts), vec2(1200.0, 860.0));
    step_until(&mut h, 120, "tiny-text to load", ready);
    assert!(!h.state().reads_pictures());
    {
        use egui_kittest::kittest::NodeT;
        assert!(h
            .get_by_label("Attach images…")
            .accesskit_node()
            .is_disabled());
    }
    h.get_by_label_contains("Text-only model: pictures cannot be attached");
    // The empty chat does not invite pictures.
    h.get_by_label("Ask anything");
    assert!(h.query_by_label("Ask about pictures").is_none());

    type_message(&mut h, "Hello!");
    drop_file(&mut h, image("tiny_50x40.png"));
    h.step();
    assert!(h.state().composer.images.is_empty());
    assert!(
        h.state().errors.iter().any(|e| e.contains("text-only")),
        "{:?}",
        h.state().errors
    );
    assert_eq!(h.state().composer.text, "Hello!");

    h.state_mut().params.max_new_tokens = 4;
    h.get_by_label("Send").click();
    step_until(&mut h, 60, "the reply", |a| {
        !a.is_generating()
            && a.chat()
                .turns
                .last()
                .is_some_and(|t| t.status == TurnStatus::Done)
    });
    assert!(!h.state().chat().turns[0].reply.is_empty());
}

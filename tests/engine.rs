//! The engine reuses work across turns — visual features by image content, the KV cache of the
//! unchanged conversation prefix — and must give exactly what a cold run gives.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use candle_core::{DType, Device};
use lm::checkpoint::LoadProgress;
use lm::generate::{Decoding, GenerateOptions, CHAT_STOP_IDS};
use lm::prompt::{Conversation, Item};
use qwenvl::engine::{Engine, Reply};
use qwenvl_e2e::{max_abs_diff, tiny_a};

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        decoding: Decoding::Greedy,
        repetition_penalty: None,
        stop_ids: CHAT_STOP_IDS.to_vec(),
    }
}

fn ask(engine: &Engine, conv: &Conversation) -> Reply {
    engine
        .reply(
            conv,
            &tiny_a(),
            &greedy(12),
            &AtomicBool::new(false),
            |_| {},
        )
        .unwrap()
}

fn image(path: &str) -> Item {
    Item::Image {
        image: path.to_string(),
    }
}

fn text(t: &str) -> Item {
    Item::Text {
        text: t.to_string(),
    }
}

#[test]
fn follow_up_turns_reuse_features_and_prefix_and_match_a_cold_run() {
    let dir: &Path = &tiny_a();
    let warm = Engine::load(dir, DType::F32, &Device::Cpu).unwrap();
    let cold = Engine::load(dir, DType::F32, &Device::Cpu).unwrap();

    let first = Conversation {
        system: "You are a helpful assistant.".into(),
        history: vec![],
        query: vec![image("images/photo_640x480.jpg"), text("What is this?")],
    };
    let r1 = ask(&warm, &first);
    assert_eq!(r1.timings.reused_prefix_tokens, 0);
    assert_eq!(r1.timings.cached_images, 0);

    // The follow-up keeps the first turn and asks about the same picture again plus a new one.
    let second = Conversation {
        system: first.system.clone(),
        history: vec![(first.query.clone(), r1.text.clone())],
        query: vec![
            image("images/photo_640x480.jpg"),
            image("images/tiny_50x40.png"),
            text("And now?"),
        ],
    };
    let r2 = ask(&warm, &second);
    cold.clear_caches();
    let c2 = ask(&cold, &second);

    assert!(
        r2.timings.reused_prefix_tokens > 258,
        "the first turn (with its image) should come from the cache, reused {}",
        r2.timings.reused_prefix_tokens
    );
    assert_eq!(r2.timings.cached_images, 2, "photo twice from the cache");
    assert_eq!(c2.timings.reused_prefix_tokens, 0);
    assert_eq!(r2.prompt.ids, c2.prompt.ids);
    assert_eq!(r2.generation.ids, c2.generation.ids, "same reply as cold");
    let d = max_abs_diff(&r2.last_logits, &c2.last_logits);
    assert!(d < 1e-4, "warm and cold logits differ by {d}");

    // A changed system prompt shares almost nothing: the result is still the cold one.
    let third = Conversation {
        system: "Answer briefly.".into(),
        ..second.clone()
    };
    let r3 = ask(&warm, &third);
    cold.clear_caches();
    let c3 = ask(&cold, &third);
    assert_eq!(r3.generation.ids, c3.generation.ids);
    assert!(max_abs_diff(&r3.last_logits, &c3.last_logits) < 1e-4);
}

#[test]
fn a_changed_image_file_is_encoded_again() {
    let tmp = tempfile::tempdir().unwrap();
    let pic = tmp.path().join("pic.png");
    std::fs::copy(tiny_a().join("images/tiny_50x40.png"), &pic).unwrap();
    let engine = Engine::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let conv = Conversation {
        system: "You are a helpful assistant.".into(),
        history: vec![],
        query: vec![image("pic.png"), text("What is this?")],
    };
    let run = |e: &Engine| {
        e.reply(
            &conv,
            tmp.path(),
            &greedy(4),
            &AtomicBool::new(false),
            |_| {},
        )
        .unwrap()
    };
    let a = run(&engine);
    let b = run(&engine);
    assert_eq!(b.timings.cached_images, 1);
    assert_eq!(a.generation.ids, b.generation.ids);
    // Same path, other content: the cache must not answer for the old picture.
    std::fs::copy(tiny_a().join("images/gray_256x192.png"), &pic).unwrap();
    let c = run(&engine);
    assert_eq!(c.timings.cached_images, 0);
    let fresh = Engine::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let d = run(&fresh);
    assert_eq!(c.generation.ids, d.generation.ids);
    assert!(max_abs_diff(&c.last_logits, &d.last_logits) < 1e-4);
}

#[test]
fn a_dense_load_counts_every_tensor_once() {
    let p = Arc::new(LoadProgress::default());
    let engine = Engine::load_with(
        &tiny_a(),
        lm::quant::WeightType::F32,
        &Device::Cpu,
        Some(p.clone()),
    )
    .unwrap();
    assert_eq!(p.bytes.load(Relaxed), engine.checkpoint.total_bytes());
}

#[test]
fn the_second_quantized_load_reads_the_cache_and_answers_the_same() {
    let cache = tempfile::tempdir().unwrap();
    // Only this test loads quantized engines, so the variable affects nothing else.
    std::env::set_var("QWENVL_CACHE_DIR", cache.path());
    let wt = lm::quant::WeightType::Q8_0;
    let (p1, p2) = (
        Arc::new(LoadProgress::default()),
        Arc::new(LoadProgress::default()),
    );
    let first = Engine::load_with(&tiny_a(), wt, &Device::Cpu, Some(p1.clone())).unwrap();
    let (path, hit) = first.quant_cache.clone().unwrap();
    assert!(!hit, "a fresh cache folder cannot hit");
    assert!(
        path.starts_with(cache.path()) && path.exists(),
        "{}",
        path.display()
    );
    let second = Engine::load_with(&tiny_a(), wt, &Device::Cpu, Some(p2.clone())).unwrap();
    assert_eq!(second.quant_cache.clone().unwrap(), (path, true));
    // The progress bar reaches its end both times: weights from the cache and the mapped
    // embedding table count as read, each tensor once.
    let total = first.checkpoint.total_bytes();
    assert_eq!(p1.bytes.load(Relaxed), total, "quantizing load");
    assert_eq!(p2.bytes.load(Relaxed), total, "load from the cache");
    let tensors = first.checkpoint.tensor_names().count() as u64;
    assert_eq!(p2.tensors.load(Relaxed), tensors);
    let conv = Conversation {
        system: "You are a helpful assistant.".into(),
        history: vec![],
        query: vec![image("images/photo_640x480.jpg"), text("What is this?")],
    };
    let a = ask(&first, &conv);
    let b = ask(&second, &conv);
    assert_eq!(a.generation.ids, b.generation.ids);
    assert_eq!(max_abs_diff(&a.last_logits, &b.last_logits), 0.0);
}

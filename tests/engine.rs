//! The engine reuses work across turns — visual features by image content, the KV cache of the
//! unchanged conversation prefix — and must give exactly what a cold run gives; replies generated
//! together in one batch must equal the same requests run alone.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use candle_core::{DType, Device};
use lm::checkpoint::LoadProgress;
use lm::generate::{Decoding, GenerateOptions, CHAT_STOP_IDS};
use lm::prompt::{Conversation, Item};
use qwenvl::engine::{BatchLimits, Batcher, Engine, Reply, ReplySink, Request};
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

/// Collects what the batch sends one request: text pieces, tokens, the reply; it asks to stop
/// after `cancel_after` tokens.
struct Collect {
    out: Rc<RefCell<Collected>>,
    cancel_after: Option<usize>,
}

#[derive(Default)]
struct Collected {
    text: String,
    tokens: Vec<u32>,
    reply: Option<anyhow::Result<Reply>>,
}

impl ReplySink for Collect {
    fn cancelled(&self) -> bool {
        self.cancel_after
            .is_some_and(|n| self.out.borrow().tokens.len() >= n)
    }
    fn token(&mut self, id: u32) {
        self.out.borrow_mut().tokens.push(id);
    }
    fn text(&mut self, piece: &str) {
        self.out.borrow_mut().text.push_str(piece);
    }
    fn done(&mut self, reply: anyhow::Result<Reply>) {
        assert!(self.out.borrow().reply.is_none(), "done twice");
        self.out.borrow_mut().reply = Some(reply);
    }
}

#[test]
fn replies_generated_together_equal_the_same_requests_alone() {
    let dir: &Path = &tiny_a();
    let engine = Engine::load(dir, DType::F32, &Device::Cpu).unwrap();
    let conv = |query: Vec<Item>| Conversation {
        system: "You are a helpful assistant.".into(),
        history: vec![],
        query,
    };
    let sampled = GenerateOptions {
        decoding: Decoding::Sample(lm::generate::SamplingParams {
            temperature: 0.8,
            top_p: Some(0.9),
            top_k: None,
            seed: 7,
        }),
        ..greedy(14)
    };
    let penalized = GenerateOptions {
        repetition_penalty: Some(1.3),
        ..greedy(16)
    };
    // Different lengths, pictures, settings; one ends by a stop token early or by its length.
    let requests: Vec<(Conversation, GenerateOptions)> = vec![
        (conv(vec![text("Hello!")]), greedy(20)),
        (
            conv(vec![
                image("images/photo_640x480.jpg"),
                text("What is this?"),
            ]),
            greedy(12),
        ),
        (
            conv(vec![text(
                "Tell me a long story about a dragon and a castle.",
            )]),
            sampled,
        ),
        (
            conv(vec![
                image("images/tiny_50x40.png"),
                image("images/gray_256x192.png"),
                text("Compare the two pictures."),
            ]),
            penalized,
        ),
        (conv(vec![text("Count to ten.")]), greedy(9)),
    ];
    let alone: Vec<Reply> = requests
        .iter()
        .map(|(c, o)| {
            engine.clear_caches();
            engine
                .reply(c, dir, o, &AtomicBool::new(false), |_| {})
                .unwrap()
        })
        .collect();
    engine.clear_caches();

    // Three slots for five requests, prompts fed 5 positions and pictures one vision block at a
    // time while others decode; requests join at different steps, the last two only when a slot
    // is free.
    let outs: Vec<Rc<RefCell<Collected>>> = (0..requests.len()).map(|_| Rc::default()).collect();
    let request = |i: usize| Request {
        conversation: requests[i].0.clone(),
        reply_prefix: String::new(),
        base_dir: dir.to_path_buf(),
        options: requests[i].1.clone(),
        sink: Box::new(Collect {
            out: outs[i].clone(),
            cancel_after: None,
        }),
    };
    let limits = BatchLimits {
        parallel: 3,
        kv_budget: usize::MAX,
        prefill_chunk: 5,
        vision_blocks: 1,
    };
    let mut batch = Batcher::new(&engine, limits);
    batch.admit(vec![request(0)]);
    for _ in 0..3 {
        batch.step();
    }
    batch.admit(vec![request(1), request(2)]);
    assert_eq!(
        batch.waiting(),
        2,
        "request 1's picture is still being encoded"
    );
    batch.step();
    assert_eq!(batch.waiting(), 2, "the tiny tower has two blocks");
    batch.step();
    assert_eq!(batch.active(), 3);
    assert_eq!(batch.room(), 0);
    batch.admit(vec![request(3), request(4)]);
    assert_eq!(batch.waiting(), 2, "no slot for them yet");
    let mut steps = 0;
    let mut most = 0;
    while batch.step() {
        most = most.max(batch.active());
        steps += 1;
        assert!(steps < 500, "the batch never ends");
    }
    assert_eq!(most, 3, "never more than --parallel together");
    for (i, (out, want)) in outs.iter().zip(&alone).enumerate() {
        let out = out.borrow();
        let got = out.reply.as_ref().expect("no reply").as_ref().unwrap();
        assert_eq!(got.prompt.ids, want.prompt.ids, "request {i}");
        assert_eq!(
            got.generation.ids, want.generation.ids,
            "request {i}: batched and alone differ"
        );
        assert_eq!(got.generation.finish, want.generation.finish, "request {i}");
        assert_eq!(got.text, want.text, "request {i}");
        assert_eq!(
            out.tokens, got.generation.ids,
            "request {i}: every token streamed"
        );
        assert_eq!(out.text.trim(), got.text, "request {i}: the streamed text");
        let d = max_abs_diff(&got.last_logits, &want.last_logits);
        assert!(d < 1e-4, "request {i}: first logits differ by {d}");
    }

    // A request whose client leaves after 3 tokens ends at once, the others as before.
    let gone: Rc<RefCell<Collected>> = Rc::default();
    let stay: Rc<RefCell<Collected>> = Rc::default();
    let mut batch = Batcher::new(&engine, limits);
    batch.admit(vec![
        Request {
            conversation: requests[0].0.clone(),
            reply_prefix: String::new(),
            base_dir: dir.to_path_buf(),
            options: requests[0].1.clone(),
            sink: Box::new(Collect {
                out: gone.clone(),
                cancel_after: Some(3),
            }),
        },
        Request {
            conversation: requests[1].0.clone(),
            reply_prefix: String::new(),
            base_dir: dir.to_path_buf(),
            options: requests[1].1.clone(),
            sink: Box::new(Collect {
                out: stay.clone(),
                cancel_after: None,
            }),
        },
    ]);
    while batch.step() {}
    let g = gone.borrow();
    let g = g.reply.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(g.generation.finish, lm::generate::Finish::Cancelled);
    assert_eq!(g.generation.ids, alone[0].generation.ids[..3]);
    let s = stay.borrow();
    let s = s.reply.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(s.generation.ids, alone[1].generation.ids);
}

#[test]
fn a_bad_picture_fails_only_its_own_request_in_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    std::fs::copy(
        tiny_a().join("images/tiny_50x40.png"),
        tmp.path().join("ok.png"),
    )
    .unwrap();
    let engine = Engine::load(&tiny_a(), DType::F32, &Device::Cpu).unwrap();
    let conv = |pic: &str| Conversation {
        system: "You are a helpful assistant.".into(),
        history: vec![],
        query: vec![image(pic), text("What is this?")],
    };
    let outs: Vec<Rc<RefCell<Collected>>> = (0..2).map(|_| Rc::default()).collect();
    let mut batch = Batcher::new(&engine, BatchLimits::one());
    batch.admit(
        ["broken.png", "ok.png"]
            .iter()
            .zip(&outs)
            .map(|(pic, out)| Request {
                conversation: conv(pic),
                reply_prefix: String::new(),
                base_dir: tmp.path().to_path_buf(),
                options: greedy(4),
                sink: Box::new(Collect {
                    out: out.clone(),
                    cancel_after: None,
                }),
            })
            .collect(),
    );
    while batch.step() {}
    let bad = outs[0].borrow();
    let err = bad.reply.as_ref().unwrap().as_ref().expect_err("an error");
    assert!(format!("{err:#}").contains("broken.png"), "{err:#}");
    let ok = outs[1].borrow();
    let ok = ok.reply.as_ref().unwrap().as_ref().unwrap();
    engine.clear_caches();
    let want = engine
        .reply(
            &conv("ok.png"),
            tmp.path(),
            &greedy(4),
            &AtomicBool::new(false),
            |_| {},
        )
        .unwrap();
    assert_eq!(ok.generation.ids, want.generation.ids);
}

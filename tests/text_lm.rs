//! Golden tests of the text-only Qwen (v1) models: `tests/fixtures/tiny-text` (Qwen-7B-Chat's
//! switches: dynamic NTK, log-n, no biases, untied head) and `tiny-text-b` (partial rotary, biases,
//! tied embeddings, rope base 1e6, padded vocabulary, no NTK or log-n), generated from the
//! unmodified upstream code (see `tests/fixtures/README.md`).
//!
//! Each case is checked from the conversation on: our prompt ids against upstream `make_context`,
//! the final-position logits of the prefill, its NTK alpha, and greedy decoding with the KV cache.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use lm::generate::{self, Decoding, Flow, GenerateOptions, CHAT_STOP_IDS};
use lm::model::QwenLm;
use lm::prompt::{build_chatml, Conversation};
use lm::Checkpoint;
use qwenvl_e2e::{assert_greedy_matches, ids_of, max_abs_diff};
use serde_json::Value;

const LOGITS_TOL: f32 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    qwenvl_e2e::text_fixture(name)
}

fn read_json(path: PathBuf) -> Value {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

fn check_fixture(name: &str) {
    let dir = fixture(name);
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(!ckpt.config.has_vision(), "{name} is text-only");
    let tok = ckpt.tokenizer().unwrap();
    assert!(!tok.has_markup());
    let lm = QwenLm::new(&ckpt.config, ckpt.var_builder(DType::F32, &Device::Cpu)).unwrap();
    let expected = read_json(dir.join("expected/cases.json"));
    let logits =
        candle_core::safetensors::load(dir.join("expected/logits.safetensors"), &Device::Cpu)
            .unwrap();
    let steps = expected["greedy_steps"].as_u64().unwrap() as usize;
    let mut report = Vec::new();
    for c in expected["cases"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        let conv: Conversation = serde_json::from_value(c["conversation"].clone()).unwrap();
        let prompt =
            build_chatml(&tok, &conv, c["max_window_size"].as_u64().unwrap() as usize).unwrap();
        let want_ids = ids_of(&c["prompt_ids"]);
        assert_eq!(prompt.ids, want_ids, "{name}/{id}: prompt ids");
        assert_eq!(
            prompt.raw_text,
            c["raw_text"].as_str().unwrap(),
            "{name}/{id}: raw text"
        );

        let mut cache = lm.new_cache();
        let last = lm.forward(&prompt.ids, &[], &mut cache).unwrap();
        let alpha = c["prefill"]["ntk_alpha"].as_f64().unwrap();
        assert_eq!(cache.ntk_alpha(), Some(alpha), "{name}/{id}: NTK alpha");
        let want: &Tensor = &logits[c["logits_key"].as_str().unwrap()];
        let d = max_abs_diff(&last, want);
        assert!(d < LOGITS_TOL, "{name}/{id}: final logits differ by {d}");

        let opts = GenerateOptions {
            max_new_tokens: steps,
            decoding: Decoding::Greedy,
            repetition_penalty: None,
            stop_ids: CHAT_STOP_IDS.to_vec(),
        };
        let gen = generate::generate(
            &lm,
            &mut cache,
            last,
            &prompt.ids,
            &opts,
            &AtomicBool::new(false),
            |_| Flow::Continue,
        )
        .unwrap();
        let (_, all_firm) = assert_greedy_matches(c, &gen.ids, &format!("{name}/{id}"));
        let reference = ids_of(&c["greedy"]["ids"]);
        // The text-only tokenizer decodes like upstream's (specials kept as text).
        assert_eq!(
            tok.decode(&reference, false, false),
            c["greedy"]["text"].as_str().unwrap(),
            "{name}/{id}: decoded text"
        );
        report.push(format!(
            "{name}/{id}: {} prompt ids, alpha {alpha}, max |Δlogit| {d:.2e}, every greedy step firm: {all_firm}",
            prompt.ids.len()
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// GPTQ Int4 (`tests/fixtures/tiny-gptq`, packed as auto-gptq packs Qwen's *-Int4 checkpoints
/// from known int4 values, zeros and f16 scales; group size 128, the MLP's c_proj two groups):
/// loaded directly, it matches the upstream model run on the dequantised float weights.
#[test]
fn tiny_gptq_matches_upstream_on_the_dequantised_weights() {
    let ckpt = Checkpoint::open(&fixture("tiny-gptq")).unwrap();
    let q = ckpt
        .config
        .quantization_config
        .clone()
        .expect("a GPTQ config");
    assert_eq!((q.bits, q.group_size, q.desc_act), (4, Some(128), false));
    check_fixture("tiny-gptq");
}

#[test]
fn gptq_settings_we_do_not_run_are_refused_by_name() {
    let base: Value = read_json(fixture("tiny-gptq").join("config.json"));
    for (key, value, needle) in [
        ("bits", serde_json::json!(8), "bits 8"),
        ("quant_method", serde_json::json!("awq"), "\"awq\""),
        ("checkpoint_format", serde_json::json!("gptq_v2"), "gptq_v2"),
    ] {
        let mut cfg = base.clone();
        cfg["quantization_config"][key] = value;
        let cfg: lm::QwenConfig = serde_json::from_value(cfg).unwrap();
        let e = cfg.validate().unwrap_err();
        assert!(e.contains(needle), "{key}: {e}");
    }
}

#[test]
fn tiny_text_matches_upstream_qwen_7b_chat_code() {
    check_fixture("tiny-text");
}

#[test]
fn tiny_text_b_matches_upstream_with_partial_rotary_biases_and_tied_head() {
    check_fixture("tiny-text-b");
}

#[test]
fn text_only_checkpoints_cover_the_switches_they_claim() {
    let a = Checkpoint::open(&fixture("tiny-text")).unwrap().config;
    assert!(a.use_dynamic_ntk && a.use_logn_attn && a.no_bias && !a.tie_word_embeddings);
    let b = Checkpoint::open(&fixture("tiny-text-b")).unwrap();
    let cfg = &b.config;
    assert!(cfg.rotary_pct < 1.0 && !cfg.no_bias && cfg.tie_word_embeddings);
    assert!(!cfg.use_dynamic_ntk && !cfg.use_logn_attn && cfg.rotary_emb_base == 1e6);
    assert_eq!(cfg.vocab_size, 152_064);
    // Tied: the checkpoint has no lm_head of its own.
    assert!(b.tensor_info("lm_head.weight").is_none());
    // The long case really is past seq_length (NTK and log-n in tiny-text).
    let cases = read_json(fixture("tiny-text").join("expected/cases.json"));
    let long = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "long_ntk")
        .unwrap();
    assert!(long["prompt_len"].as_u64().unwrap() as usize > a.seq_length);
    assert!(long["prefill"]["ntk_alpha"].as_f64().unwrap() > 1.0);
}

#[test]
fn text_only_prompts_refuse_pictures_and_keep_markup_as_text() {
    let ckpt = Checkpoint::open(&fixture("tiny-text")).unwrap();
    let tok = ckpt.tokenizer().unwrap();
    let conv: Conversation = serde_json::from_value(serde_json::json!({
        "query": [{"image": "cat.png"}, {"text": "What is this?"}]
    }))
    .unwrap();
    let err = build_chatml(&tok, &conv, 6144).unwrap_err().to_string();
    assert!(
        err.contains("text-only") && err.contains("cat.png"),
        "{err}"
    );
    // `<ref>`/`<img>` are ordinary text: no id at or above 151851.
    let ids = tok
        .encode("<ref>a</ref><img>b</img>", lm::tokenizer::Specials::All)
        .unwrap();
    assert!(ids.iter().all(|&i| i < 151_851), "{ids:?}");
    assert_eq!(tok.decode(&ids, false, false), "<ref>a</ref><img>b</img>");
    assert_eq!(tok.vocab_size_tokenizer(), 151_851);
    assert_eq!(tok.special_id("<ref>"), None);
    assert_eq!(tok.special_id("<|im_start|>"), Some(151_644));
    // Ids past the vocabulary (a padded 152064-row head can produce them) decode to nothing.
    assert_eq!(
        tok.decode(&[151_900, 9707], false, false),
        tok.decode(&[9707], false, false)
    );
}

#[test]
fn unsupported_switches_are_refused_by_name() {
    let base = std::fs::read_to_string(fixture("tiny-text").join("config.json")).unwrap();
    for (key, value, needle) in [
        ("use_cache_quantization", "true", "use_cache_quantization"),
        ("scale_attn_weights", "false", "scale_attn_weights"),
        ("kv_channels", "16", "kv_channels"),
        ("rotary_pct", "0.0", "rotary_pct"),
        ("model_type", "\"qwen2\"", "qwen2"),
    ] {
        let mut cfg: serde_json::Map<String, Value> = serde_json::from_str(&base).unwrap();
        cfg.insert(key.into(), serde_json::from_str(value).unwrap());
        let dir = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", "qwen.tiktoken"] {
            std::fs::copy(fixture("tiny-text").join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_string(&cfg).unwrap(),
        )
        .unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(needle), "{key}={value}: {err}");
    }
}

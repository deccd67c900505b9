//! Golden tests of the language model over tiny-a: per-layer hidden states, final logits of every
//! case and greedy generations, through the public `lm` and `vision` APIs and the shared checkpoint
//! loader.
//!
//! The prompts are the reference's recorded `prompt_ids` (so the LM is checked on every case, including
//! `inline_img_tag`, whose prompt we deliberately build differently); image features come from our
//! vision tower on the case's image files.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use lm::generate::{self, Decoding, Flow, GenerateOptions, CHAT_STOP_IDS};
use lm::model::QwenLm;
use lm::Checkpoint;
use qwenvl_e2e::{
    assert_greedy_matches, case_image_features, expected_json, expected_tensors, ids_of,
    max_abs_diff, tiny_a,
};
use serde_json::Value;

const LOGITS_TOL: f32 = 1e-3;

struct Model {
    lm: QwenLm,
    visual: vision::VisualEncoder,
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let ckpt = Checkpoint::open(&tiny_a()).unwrap();
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        let vcfg: vision::Config =
            serde_json::from_value(ckpt.config.visual.clone().unwrap()).unwrap();
        Model {
            lm: QwenLm::new(&ckpt.config, vb.clone()).unwrap(),
            visual: vision::VisualEncoder::new(&vcfg, vb.pp("transformer").pp("visual")).unwrap(),
        }
    })
}

fn cases() -> &'static Vec<Value> {
    static C: OnceLock<Vec<Value>> = OnceLock::new();
    C.get_or_init(|| {
        expected_json("cases.json")["cases"]
            .as_array()
            .unwrap()
            .clone()
    })
}

fn case(id: &str) -> &'static Value {
    cases().iter().find(|c| c["id"] == id).unwrap()
}

#[test]
fn per_layer_hidden_states_match_reference() {
    let m = model();
    let debug = expected_tensors("lm_debug.safetensors");
    for id in ["text_only_en", "one_image"] {
        let c = case(id);
        let ids = ids_of(&c["prompt_ids"]);
        let emb =
            m.lm.embed(&ids, &case_image_features(&model().visual, c))
                .unwrap();
        let d = max_abs_diff(&emb, &debug[&format!("{id}.embeddings")]);
        assert!(d < 1e-4, "{id}: embeddings differ by {d}");
        let mut cache = m.lm.new_cache();
        let trace = m.lm.forward_trace(&emb, &mut cache).unwrap();
        for (i, out) in trace.block_outputs.iter().enumerate() {
            let d = max_abs_diff(out, &debug[&format!("{id}.block_{i}_out")]);
            assert!(d < 1e-3, "{id}: block {i} output differs by {d}");
        }
        let d = max_abs_diff(&trace.ln_f_out, &debug[&format!("{id}.ln_f_out")]);
        assert!(d < 1e-3, "{id}: ln_f output differs by {d}");
        let last =
            m.lm.logits(&trace.ln_f_out.get(ids.len() - 1).unwrap())
                .unwrap();
        let d = max_abs_diff(&last, &debug[&format!("{id}.logits_last")]);
        assert!(d < LOGITS_TOL, "{id}: last logits differ by {d}");
    }
}

#[test]
fn final_logits_and_greedy_generation_match_reference_for_every_case() {
    let m = model();
    let logits = expected_tensors("logits.safetensors");
    let greedy_steps = expected_json("cases.json")["greedy_steps"]
        .as_u64()
        .unwrap() as usize;
    let mut report = Vec::new();
    for c in cases() {
        let id = c["id"].as_str().unwrap();
        let ids = ids_of(&c["prompt_ids"]);
        let features = case_image_features(&model().visual, c);
        let mut cache = m.lm.new_cache();
        let last = m.lm.forward(&ids, &features, &mut cache).unwrap();

        // The prefill's NTK alpha is the reference's.
        let alpha = c["prefill"]["ntk_alpha"].as_f64().unwrap();
        assert_eq!(cache.ntk_alpha(), Some(alpha), "{id}: NTK alpha");

        let want = &logits[c["logits_key"].as_str().unwrap()];
        let d = max_abs_diff(&last, want);
        assert!(d < LOGITS_TOL, "{id}: final logits differ by {d}");

        // Top-20 ids in the same order.
        let top20: Vec<u32> = c["top20"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[0].as_u64().unwrap() as u32)
            .collect();
        let mut order: Vec<(u32, f32)> = last
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as u32, v))
            .collect();
        order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let ours20: Vec<u32> = order.iter().take(20).map(|p| p.0).collect();
        assert_eq!(ours20, top20, "{id}: top-20 ids");

        let opts = GenerateOptions {
            max_new_tokens: greedy_steps,
            decoding: Decoding::Greedy,
            repetition_penalty: None,
            stop_ids: CHAT_STOP_IDS.to_vec(),
        };
        let gen = generate::generate(
            &m.lm,
            &mut cache,
            last,
            &ids,
            &opts,
            &AtomicBool::new(false),
            |_| Flow::Continue,
        )
        .unwrap();
        assert_greedy_matches(c, &gen.ids, id);
        report.push(format!("{id}: max |Δlogit| {d:.2e}"));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn cached_decoding_equals_a_plain_forward() {
    // Decoding one token with the KV cache must give the logits of a full forward over prompt + token.
    let m = model();
    let c = case("text_only_zh");
    let ids = ids_of(&c["prompt_ids"]);
    let mut cache = m.lm.new_cache();
    let _ = m.lm.forward(&ids, &[], &mut cache).unwrap();
    let next = 42u32;
    let stepped = m.lm.forward(&[next], &[], &mut cache).unwrap();
    let mut full_ids = ids.clone();
    full_ids.push(next);
    let full = m.lm.forward(&full_ids, &[], &mut m.lm.new_cache()).unwrap();
    let d = max_abs_diff(&stepped, &full);
    assert!(
        d < 1e-4,
        "cached step differs from the plain forward by {d}"
    );
}

#[test]
fn ntk_alpha_and_logn_follow_the_reference_formulas() {
    use lm::model::{logn_factor, ntk_alpha};
    assert_eq!(ntk_alpha(31, 2048), 1.0);
    assert_eq!(ntk_alpha(2048, 2048), 1.0);
    assert_eq!(ntk_alpha(2049, 2048), 3.0);
    assert_eq!(ntk_alpha(4096, 2048), 3.0);
    assert_eq!(ntk_alpha(4097, 2048), 7.0);
    assert_eq!(logn_factor(2047, 2048), 1.0);
    assert!(logn_factor(2048, 2048) > 1.0);
    let summary = expected_json("summary.json");
    let lc = &summary["sanity"]["long_context_prefill"];
    let n = summary["sanity"]["long_context_prompt_len"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(ntk_alpha(n, 2048), lc["ntk_alpha"].as_f64().unwrap());
    let want = lc["logn_max_factor"].as_f64().unwrap() as f32;
    assert_eq!(logn_factor(n - 1, 2048), want);
    let scaled = (0..n).filter(|&p| logn_factor(p, 2048) != 1.0).count();
    assert_eq!(scaled as u64, lc["logn_scaled_positions"].as_u64().unwrap());
}

#[test]
fn bf16_weights_stay_close_to_f32() {
    // bf16 is a lossy path (not the reference's numerics); it must still produce the same greedy
    // first token on a plain text case and logits of the right magnitude.
    let ckpt = Checkpoint::open(&tiny_a()).unwrap();
    let lm16 = QwenLm::new(&ckpt.config, ckpt.var_builder(DType::BF16, &Device::Cpu)).unwrap();
    let c = case("text_only_en");
    let ids = ids_of(&c["prompt_ids"]);
    let got = lm16.forward(&ids, &[], &mut lm16.new_cache()).unwrap();
    let want: HashMap<String, Tensor> = expected_tensors("logits.safetensors");
    let d = max_abs_diff(&got, &want["logits.text_only_en"]);
    assert!(d < 0.25, "bf16 logits differ by {d}");
    let ref_first = ids_of(&c["greedy"]["ids"])[0];
    assert_eq!(
        generate::argmax(&got.to_vec1::<f32>().unwrap()),
        ref_first,
        "bf16 greedy first token"
    );
}

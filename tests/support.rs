//! Shared helpers for the end-to-end tests: where the fixtures are and how to read them.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `../shared/fixtures` next to the repository (override with `QWENVL_FIXTURES`).
pub fn fixtures_root() -> PathBuf {
    if let Ok(p) = std::env::var("QWENVL_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// The `tiny-a` checkpoint folder.
pub fn tiny_a() -> PathBuf {
    fixtures_root().join("tiny-a")
}

/// A file under `tiny-a/expected/`.
pub fn expected(name: &str) -> PathBuf {
    tiny_a().join("expected").join(name)
}

/// Parsed JSON of a file under `tiny-a/expected/`.
pub fn expected_json(name: &str) -> serde_json::Value {
    let path = expected(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All tensors of a safetensors file under `tiny-a/expected/`, on the CPU.
pub fn expected_tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = expected(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute elementwise difference of two same-shaped tensors (compared in f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The golden ReAct prompts of upstream `openai_api.py` (`tests/fixtures/tools/react_prompts.json`).
pub fn react_golden() -> serde_json::Value {
    let p = text_fixture("tools").join("react_prompts.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// One prompt case of [`react_golden`] by id.
pub fn react_case(id: &str) -> serde_json::Value {
    react_golden()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no golden ReAct prompt {id}"))
        .clone()
}

/// A golden case's `functions` in the OpenAI `tools` form (none: empty).
pub fn openai_tools(case: &serde_json::Value) -> Vec<serde_json::Value> {
    case["functions"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|f| serde_json::json!({"type": "function", "function": f}))
                .collect()
        })
        .unwrap_or_default()
}

/// GPTQ Int4 copies of a checkpoint, and dense copies of their dequantised weights.
#[path = "gptq_support.rs"]
pub mod gptq;

/// Hand-built checkpoints whose greedy replies are scripted (the tool-use tests).
#[path = "scripted_model.rs"]
pub mod scripted;

/// Generators of hostile inputs (broken pictures, bombs, broken checkpoints) for `hostile.rs`
/// and `cli_hostile.rs`.
#[path = "hostile_support.rs"]
pub mod hostile;

/// Token ids of a JSON array (`prompt_ids`, `greedy.ids`).
pub fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `visual`'s features for a `cases.json` case's image spans, all images in one batch (as the
/// reference does), placed at the case's recorded feature positions.
pub fn case_image_features(
    visual: &vision::VisualEncoder,
    case: &serde_json::Value,
) -> Vec<lm::model::ImageFeatures> {
    let spans = case["image_spans"].as_array().unwrap();
    if spans.is_empty() {
        return Vec::new();
    }
    let size = visual.config().image_size;
    let pixels: Vec<Tensor> = spans
        .iter()
        .map(|s| {
            let path = tiny_a().join(s["path"].as_str().unwrap());
            vision::preprocess(&vision::load_rgb(&path).unwrap(), size).unwrap()
        })
        .collect();
    let feats = visual.forward(&Tensor::stack(&pixels, 0).unwrap()).unwrap();
    spans
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let first = s["feature_positions"][0].as_u64().unwrap() as usize;
            assert_eq!(first, s["img_start_pos"].as_u64().unwrap() as usize + 1);
            lm::model::ImageFeatures {
                first_position: first,
                features: feats.get(i).unwrap(),
            }
        })
        .collect()
}

/// A text-only Qwen fixture committed under `tests/fixtures/` (`tiny-text`, `tiny-text-b`).
pub fn text_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Greedy steps whose best and second-best logits are closer than this are near-ties: from the
/// first one on, a correct implementation may pick the other token.
pub const NEAR_TIE: f64 = 2e-3;

/// Checks greedy ids `ours` against the reference of a `cases.json` case (`greedy.ids`,
/// `greedy.step_top2_margins`): equal up to the reference's first chat stop token (inclusive,
/// where our generation ends; the reference then forces `<|endoftext|>`), or only up to its first
/// near-tie step, and then exactly equal when there is none. Returns the reference ids up to the
/// stop and whether every step was firm.
pub fn assert_greedy_matches(
    case: &serde_json::Value,
    ours: &[u32],
    what: &str,
) -> (Vec<u32>, bool) {
    let reference = ids_of(&case["greedy"]["ids"]);
    let until_stop = match reference
        .iter()
        .position(|id| lm::generate::CHAT_STOP_IDS.contains(id))
    {
        Some(p) => reference[..=p].to_vec(),
        None => reference,
    };
    let firm = case["greedy"]["step_top2_margins"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m.as_f64().unwrap() < NEAR_TIE)
        .unwrap_or(until_stop.len())
        .min(until_stop.len());
    assert_eq!(
        &ours[..firm.min(ours.len())],
        &until_stop[..firm],
        "{what}: greedy ids"
    );
    let all_firm = firm == until_stop.len();
    if all_firm {
        assert_eq!(ours, &until_stop[..], "{what}: greedy ids (full)");
    }
    (until_stop, all_firm)
}

//! Accuracy of the quantized and half-precision paths against f32 on every tiny-a case: top-1
//! agreement and max |Δlogit| of the final logits (printed, for the record), and the acceptance bar:
//! q8_0 keeps the greedy tokens of the reference.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use lm::generate::{self, Decoding, Flow, GenerateOptions, CHAT_STOP_IDS};
use lm::model::QwenLm;
use lm::quant::{QLinear, WeightType};
use lm::Checkpoint;
use qwenvl_e2e::{
    case_image_features, expected_json, expected_tensors, ids_of, max_abs_diff, tiny_a,
};
use serde_json::Value;

struct Model {
    lm: QwenLm,
    visual: vision::VisualEncoder,
}

/// Builds LM and vision tower with weights of type `wt`, the way the app's engine does
/// (`app::engine::build_models`).
fn load(wt: WeightType) -> Model {
    let ckpt = Checkpoint::open(&tiny_a()).unwrap();
    let vb = ckpt.var_builder(wt.compute_dtype(&Device::Cpu), &Device::Cpu);
    let vcfg: vision::Config = serde_json::from_value(ckpt.config.visual.clone().unwrap()).unwrap();
    // Quantized models look their token embeddings up in the checkpoint's own mapped table.
    let table = ckpt.mapped_rows("transformer.wte.weight");
    let lm = QwenLm::load_with_table(&ckpt.config, vb.clone(), wt, table).unwrap();
    let vvb = vb.pp("transformer").pp("visual");
    let visual = if wt.is_quantized() {
        let linear: vision::LinearBuilder =
            &move |i, o, bias, vb| Ok(vision::Layer(Arc::new(QLinear::load(i, o, bias, vb, wt)?)));
        vision::VisualEncoder::new_with_linear(&vcfg, vvb, linear)
            .unwrap()
            .with_bf16_attention(true)
    } else {
        vision::VisualEncoder::new(&vcfg, vvb).unwrap()
    };
    Model { lm, visual }
}

struct Outcome {
    top1_agree: usize,
    cases: usize,
    max_delta: f32,
    greedy_equal: usize,
    /// Largest reference top-2 margin at a step where our greedy sequence first left the
    /// reference's (0 when none did; infinite when one differs without a differing step).
    worst_divergence_margin: f32,
}

/// Evaluates every case whose prompt has at most `max_len` tokens.
fn evaluate(wt: WeightType, max_len: usize) -> Outcome {
    let m = load(wt);
    let reference = expected_tensors("logits.safetensors");
    let cases: Vec<Value> = expected_json("cases.json")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["prompt_len"].as_u64().unwrap() as usize <= max_len)
        .cloned()
        .collect();
    let mut out = Outcome {
        top1_agree: 0,
        cases: cases.len(),
        max_delta: 0.0,
        greedy_equal: 0,
        worst_divergence_margin: 0.0,
    };
    for c in &cases {
        let ids = ids_of(&c["prompt_ids"]);
        let mut cache = m.lm.new_cache();
        let logits =
            m.lm.forward(&ids, &case_image_features(&m.visual, c), &mut cache)
                .unwrap();
        let want = &reference[c["logits_key"].as_str().unwrap()];
        out.max_delta = out.max_delta.max(max_abs_diff(&logits, want));
        let ours = generate::argmax(&logits.to_vec1::<f32>().unwrap());
        let theirs = generate::argmax(&want.to_vec1::<f32>().unwrap());
        out.top1_agree += usize::from(ours == theirs);
        let opts = GenerateOptions {
            max_new_tokens: 24,
            decoding: Decoding::Greedy,
            repetition_penalty: None,
            stop_ids: CHAT_STOP_IDS.to_vec(),
        };
        let gen = generate::generate(
            &m.lm,
            &mut cache,
            logits,
            &ids,
            &opts,
            &AtomicBool::new(false),
            |_| Flow::Continue,
        )
        .unwrap();
        let reference_ids = ids_of(&c["greedy"]["ids"]);
        let until_stop = match reference_ids
            .iter()
            .position(|id| CHAT_STOP_IDS.contains(id))
        {
            Some(p) => &reference_ids[..=p],
            None => &reference_ids[..],
        };
        out.greedy_equal += usize::from(gen.ids == until_stop);
        if let Some(step) = gen.ids.iter().zip(until_stop).position(|(a, b)| a != b) {
            let margin = c["greedy"]["step_top2_margins"][step].as_f64().unwrap();
            eprintln!(
                "  {wt} {}: first differing step {step}, reference margin {margin:.4}",
                c["id"]
            );
            out.worst_divergence_margin = out.worst_divergence_margin.max(margin as f32);
        } else if gen.ids != until_stop {
            out.worst_divergence_margin = f32::INFINITY;
        }
    }
    eprintln!(
        "{wt}: top-1 agreement {}/{}, max |Δlogit| {:.4}, greedy sequences equal {}/{}",
        out.top1_agree, out.cases, out.max_delta, out.greedy_equal, out.cases
    );
    out
}

/// q8_0 must stay the same model: the same first token in every case, logits within 0.2, and
/// greedy sequences equal to the reference's up to the first near-tie step (the fixture's rule).
///
/// A step is a near-tie for q8_0 when its reference top-2 margin is below twice the largest
/// |Δlogit| q8_0 shows on the cases' logits: an error that size can swap the two tokens. Keeping
/// every sequence identical beyond such steps is not reachable on tiny-a, whose recorded margins go
/// down to 0.003 while 8-bit weights alone (without quantized activations) already move its logits
/// by ~0.1 (see the closing note of the performance issue); which cases are equal is printed.
#[test]
fn q8_0_stays_the_same_model() {
    let o = evaluate(WeightType::Q8_0, usize::MAX);
    assert_eq!(o.top1_agree, o.cases, "q8_0 changed a first token");
    // Measured (2026-12, Zen 3): max |Δlogit| 0.149 at avx2, 0.164 at portable.
    assert!(o.max_delta < 0.2, "q8_0 logits moved by {}", o.max_delta);
    assert!(
        o.worst_divergence_margin < 2.0 * o.max_delta,
        "q8_0 left a greedy sequence at a step with margin {} (not a near-tie for errors of {})",
        o.worst_divergence_margin,
        o.max_delta
    );
}

/// 16-bit weights keep the reference's greedy tokens on every case. tiny-a's weights are exact in
/// bf16 (and in f16), and on the CPU the activations stay f32 (`quant::dense16`), so what is left
/// is the f16 KV cache and the bf16 attention of the vision tower.
#[test]
fn half_precision_weights_keep_every_greedy_sequence() {
    for wt in [WeightType::F16, WeightType::BF16] {
        let o = evaluate(wt, usize::MAX);
        assert_eq!(o.top1_agree, o.cases, "{wt} changed a first token");
        // Measured: 0.0009 for both, at every level.
        assert!(o.max_delta < 0.002, "{wt}: logits moved by {}", o.max_delta);
        assert_eq!(o.greedy_equal, o.cases, "{wt} left a greedy sequence");
    }
}

#[test]
fn four_bit_types_run_and_report_their_accuracy() {
    // 4-bit types drift further on this tiny model (hidden 128: few blocks per row to average
    // rounding out), but must stay well correlated.
    // Measured (2026-12, Zen 3, avx2 and portable): q4_0 top-1 5/13, max |Δlogit| 2.41-2.43;
    // q4k 6/13, 2.29-2.33. The bounds leave one case (and ~0.2) for the other levels' rounding.
    for (wt, top1, delta) in [(WeightType::Q4_0, 4, 2.6), (WeightType::Q4K, 5, 2.5)] {
        let o = evaluate(wt, 1000);
        assert!(
            o.top1_agree >= top1,
            "{wt}: {}/{} top-1 agree",
            o.top1_agree,
            o.cases
        );
        assert!(o.max_delta < delta, "{wt}: logits moved by {}", o.max_delta);
        assert!(
            o.worst_divergence_margin < 2.0 * o.max_delta,
            "{wt}: left a greedy sequence at a step with margin {}",
            o.worst_divergence_margin
        );
    }
}

//! End-to-end tests of `qwenvl run` over the tiny-a fixtures, in every weight layout people have:
//! single safetensors, sharded safetensors and sharded pickled `.bin` (the layout Qwen-VL-Chat ships).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use qwenvl_e2e::{
    assert_greedy_matches, expected_json, expected_tensors, fixtures_root, max_abs_diff,
    text_fixture, tiny_a,
};
use serde_json::Value;

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

/// A scratch folder holding the conversation file, with `images/` linked to the fixture images so
/// the case's relative paths resolve against the conversation's folder.
fn conversation_dir(case: &Value) -> tempfile::TempDir {
    conversation_file_dir(&case["conversation"])
}

/// [`conversation_dir`] for any conversation file's contents.
fn conversation_file_dir(conversation: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(tiny_a().join("images"), dir.path().join("images")).unwrap();
    std::fs::write(
        dir.path().join("conversation.json"),
        serde_json::to_vec(conversation).unwrap(),
    )
    .unwrap();
    dir
}

struct Run {
    json: Value,
    logits: candle_core::Tensor,
}

/// `qwenvl run --json` on the case's conversation with greedy decoding over 24 new tokens.
fn run_case(model: &Path, case: &Value, extra: &[&str]) -> Run {
    run_cli(
        model,
        case,
        &[&["--greedy", "--max-new-tokens", "24"], extra].concat(),
    )
}

fn run_cli(model: &Path, case: &Value, args: &[&str]) -> Run {
    run_cli_env(model, case, args, &[])
}

fn run_cli_env(model: &Path, case: &Value, args: &[&str], env: &[(&str, &str)]) -> Run {
    run_conversation(model, &case["conversation"], args, env)
}

/// `qwenvl run --json --logits-out` on a conversation file holding `conversation`.
fn run_conversation(
    model: &Path,
    conversation: &Value,
    args: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let dir = conversation_file_dir(conversation);
    let logits_path = dir.path().join("logits.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .envs(env.iter().copied())
        .arg("run")
        .arg("--model")
        .arg(model)
        .arg("--conversation")
        .arg(dir.path().join("conversation.json"))
        .args(["--json", "--logits-out"])
        .arg(&logits_path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qwenvl run failed for {conversation}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let logits = candle_core::safetensors::load(&logits_path, &candle_core::Device::Cpu)
        .unwrap()
        .remove("logits")
        .unwrap();
    Run { json, logits }
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Checks one CLI run against the reference: prompt ids, final logits, greedy ids and text.
fn check_against_reference(case: &Value, run: &Run, logits_ref: &candle_core::Tensor) {
    let id = case["id"].as_str().unwrap();
    assert_eq!(
        u64s(&run.json["prompt_ids"]),
        u64s(&case["prompt_ids"]),
        "{id}: prompt ids"
    );
    let d = max_abs_diff(&run.logits, logits_ref);
    assert!(d < 1e-3, "{id}: final logits differ by {d}");

    let ours: Vec<u32> = u64s(&run.json["generated_ids"])
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let (until_stop, all_firm) = assert_greedy_matches(case, &ours, id);
    if all_firm {
        if case["greedy"]["stopped"].as_bool().unwrap() {
            // With a stop token the reference's `chat()` response is exactly our reply text.
            assert_eq!(
                run.json["text"], case["greedy"]["response"],
                "{id}: reply text"
            );
            let stop = until_stop.last().unwrap();
            assert_eq!(run.json["finish"], format!("Stop({stop})"), "{id}: finish");
        } else {
            assert_eq!(run.json["finish"], "Length", "{id}: finish");
        }
    }
}

#[test]
fn every_case_matches_the_reference_through_the_cli() {
    let logits = expected_tensors("logits.safetensors");
    for c in cases() {
        let id = c["id"].as_str().unwrap();
        let run = run_case(&tiny_a(), c, &[]);
        if id == "inline_img_tag" {
            continue; // checked by `typed_img_tags_never_open_files`
        }
        check_against_reference(c, &run, &logits[c["logits_key"].as_str().unwrap()]);
    }
}

/// The golden cases (one text, one image, one grounding) under every CPU kernel level this CPU
/// runs, forced with `QWENVL_CPU`. f32 weights: every level against the reference (prompt ids,
/// logits, greedy ids and text). 16-bit and quantized weights: every level against the portable
/// level, which the SIMD kernels are tested against kernel by kernel (kernels::*::tests).
///
/// Tolerances, from what separates the levels: bf16 has no activation rounding, so the levels
/// differ by float summation order only (measured ≤ 5e-5 on these logits; bound 5e-4). q8_0 and
/// q4k round every activation row to int8 before each matmul; a few-ulp difference in a layer's
/// output (another summation order in attention, GELU or the block scales) can move one value
/// across an int8 rounding boundary, which shifts later logits by an amount of the order of the
/// weight type's own error. So a level must be no further from the portable run than the portable
/// run is from the exact f32 reference (measured: 0.06–0.12 apart vs 0.12–0.14 for q8_0; 0.14
/// vs 1.8 for q4k), plus 1e-3; a wrong kernel is off by far more.
#[test]
fn every_cpu_level_gives_the_reference_results() {
    let logits = expected_tensors("logits.safetensors");
    let levels = kernels::cpu::levels_to_test("CLI golden cases");
    let base = levels[0];
    assert_eq!(base, kernels::Level::Portable);
    for id in ["text_only_en", "one_image", "grounding_en"] {
        let c = case(id);
        let reference = &logits[c["logits_key"].as_str().unwrap()];
        let mut portable: Vec<(&str, Run)> = Vec::new();
        for &level in &levels {
            let env = [("QWENVL_CPU", level.name())];
            let run = run_cli_env(
                &tiny_a(),
                c,
                &["--greedy", "--max-new-tokens", "24", "--quant", "f32"],
                &env,
            );
            assert_eq!(
                run.json["timings"]["cpu"],
                level.name(),
                "{id}: timings name the level"
            );
            check_against_reference(c, &run, reference);
            for wt in ["bf16", "q8_0", "q4k"] {
                let args = ["--greedy", "--max-new-tokens", "24", "--quant", wt];
                let run = run_cli_env(&tiny_a(), c, &args, &env);
                let Some((_, first)) = portable.iter().find(|(w, _)| *w == wt) else {
                    portable.push((wt, run));
                    continue;
                };
                assert_eq!(
                    run.json["prompt_ids"], first.json["prompt_ids"],
                    "{id} {wt} at {level}: prompt ids"
                );
                let d = max_abs_diff(&run.logits, &first.logits);
                let bound = if wt == "bf16" {
                    5e-4
                } else {
                    max_abs_diff(&first.logits, reference) + 1e-3
                };
                eprintln!("{id} {wt}: {level} vs {base}: max |Δlogit| {d} (bound {bound})");
                assert!(
                    d <= bound,
                    "{id} {wt} at {level}: logits differ by {d} from {base} (bound {bound})"
                );
                if wt == "bf16" {
                    assert_eq!(
                        run.json["generated_ids"], first.json["generated_ids"],
                        "{id} {wt} at {level}: greedy ids"
                    );
                }
            }
        }
    }
}

/// An unknown word, or a level this CPU lacks, is refused before anything runs (exit 2), with
/// the accepted words and what this CPU has; never a SIGILL.
#[test]
fn bad_cpu_levels_are_refused_at_start() {
    let lacking = [
        kernels::Level::Neon,
        kernels::Level::Avx2,
        kernels::Level::Amx,
    ]
    .into_iter()
    .find(|l| !l.supported())
    .expect("no CPU runs both x86 and Arm levels");
    for (word, why) in [
        ("sse9", "not a kernel level"),
        (lacking.name(), "cannot run that level"),
    ] {
        for args in [&["run", "--help"][..], &["bench", "--kernels"][..]] {
            let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
                .env("QWENVL_CPU", word)
                .args(args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "QWENVL_CPU={word} {args:?}: {err}"
            );
            assert!(err.contains(why), "{err}");
            assert!(err.contains("portable, avx2, avx512, amx, neon"), "{err}");
            assert!(err.contains("this CPU runs: portable"), "{err}");
        }
    }
    // Any case is accepted, as is the level this CPU runs.
    let best = kernels::cpu::detected().name().to_uppercase();
    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .env("QWENVL_CPU", &best)
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn typed_img_tags_never_open_files() {
    // We deliberately differ from the reference: `<img>path</img>` typed in text stays text.
    let c = case("inline_img_tag");
    let run = run_case(&tiny_a(), c, &[]);
    let ours = u64s(&run.json["prompt_ids"]);
    assert_ne!(ours, u64s(&c["prompt_ids"]));
    for special in [151857u64, 151858, 151859] {
        assert!(
            !ours.contains(&special),
            "typed image markup became special token {special}"
        );
    }
    let conv = serde_json::json!({
        "query": [{"text": "Describe <img>/etc/passwd</img> please"}]
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.json");
    std::fs::write(&file, serde_json::to_vec(&conv).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .args([
            "run",
            "--greedy",
            "--max-new-tokens",
            "3",
            "--json",
            "--model",
        ])
        .arg(tiny_a())
        .arg("--conversation")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!u64s(&json["prompt_ids"]).contains(&151857));
}

/// The fixture's `.bin` shards, gunzipped into a scratch model folder.
fn unpack_bin_checkpoint() -> tempfile::TempDir {
    let src = fixtures_root().join("tiny-a-bin");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(stem) = name.strip_suffix(".gz") {
            let mut dec = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
            let mut out = std::fs::File::create(dir.path().join(stem)).unwrap();
            std::io::copy(&mut dec, &mut out).unwrap();
        } else if name != "README.md" {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    dir
}

/// tiny-a re-saved as three safetensors shards with an index.
fn sharded_safetensors_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "qwen.tiktoken"] {
        std::fs::copy(tiny_a().join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(tiny_a().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    names.sort();
    let shards = 3;
    let mut weight_map = serde_json::Map::new();
    for (s, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join(&file)).unwrap();
        for n in chunk {
            weight_map.insert(n.clone(), Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn sharded_bin_and_sharded_safetensors_give_the_reference_results() {
    let logits = expected_tensors("logits.safetensors");
    let bin = unpack_bin_checkpoint();
    let sharded = sharded_safetensors_checkpoint();
    for model in [bin.path(), sharded.path()] {
        for id in ["two_images", "multi_turn_history_images", "grounding_zh"] {
            let c = case(id);
            let run = run_case(model, c, &[]);
            check_against_reference(c, &run, &logits[c["logits_key"].as_str().unwrap()]);
        }
    }
}

#[test]
fn streamed_output_is_the_reply_text() {
    let c = case("ocr");
    let dir = conversation_dir(c);
    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .args(["run", "--greedy", "--max-new-tokens", "24", "--model"])
        .arg(tiny_a())
        .arg("--conversation")
        .arg(dir.path().join("conversation.json"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let streamed = String::from_utf8(out.stdout).unwrap();
    let want = c["greedy"]["response"].as_str().unwrap();
    assert_eq!(streamed.trim(), want);
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let c = case("text_only_en");
    let sample = |seed: &str| {
        let args = [
            "--max-new-tokens",
            "24",
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
        ];
        u64s(&run_cli(&tiny_a(), c, &args).json["generated_ids"])
    };
    let a = sample("7");
    assert_eq!(a, sample("7"), "same seed, same tokens");
    assert_ne!(a, sample("8"), "another seed, other tokens");
    let greedy = u64s(&case("text_only_en")["greedy"]["ids"]);
    assert_ne!(a, greedy, "sampling at temperature 1.5 is not greedy");
}

#[test]
fn bad_inputs_give_clear_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("c.json");
    std::fs::write(
        &conv,
        br#"{"query": [{"image": "missing.png"}, {"text": "hi"}]}"#,
    )
    .unwrap();
    let model = tiny_a();
    let model = model.to_str().unwrap();
    let conv_s = conv.to_str().unwrap();
    let err = run(&["run", "--model", model, "--conversation", conv_s]);
    assert!(err.contains("missing.png"), "{err}");

    let err = run(&[
        "run",
        "--model",
        "/nonexistent/model",
        "--conversation",
        conv_s,
    ]);
    assert!(err.contains("/nonexistent/model"), "{err}");

    std::fs::write(&conv, b"{not json").unwrap();
    let err = run(&["run", "--model", model, "--conversation", conv_s]);
    assert!(err.contains("c.json"), "{err}");

    let missing: PathBuf = dir.path().join("nope.json");
    let err = run(&[
        "run",
        "--model",
        model,
        "--conversation",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("nope.json"), "{err}");
}

/// A checkpoint far bigger than this machine's memory (a sparse 1 TB shard next to tiny-a's
/// config and tokenizer): without `--quant` it is not loaded as f32 but as the smallest default
/// (q4k), and even that is refused with the numbers before a byte is read, rather than the process
/// being killed for memory mid-load.
#[test]
fn a_model_too_big_for_memory_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "qwen.tiktoken"] {
        std::fs::copy(tiny_a().join(f), dir.path().join(f)).unwrap();
    }
    let shard = std::fs::File::create(dir.path().join("model.safetensors")).unwrap();
    shard.set_len(1 << 40).unwrap();
    let conv = dir.path().join("c.json");
    std::fs::write(&conv, br#"{"query": [{"text": "hi"}]}"#).unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
            .args(["run", "--model", dir.path().to_str().unwrap()])
            .args(["--conversation", conv.to_str().unwrap()])
            .args(extra)
            .env_remove("QWENVL_WEIGHTS")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[]);
    assert!(err.contains("not enough memory"), "{err}");
    assert!(err.contains("as q4k"), "{err}");
    let err = run(&["--dtype", "f32"]);
    assert!(err.contains("as f32"), "{err}");
    assert!(err.contains("--quant q4k"), "{err}");
}

/// Temperature 0 is greedy decoding whatever the seed, with or without a repetition penalty, and
/// the penalty (applied in greedy decoding, as the reference `generate` does) changes the answer.
#[test]
fn temperature_zero_is_greedy_and_keeps_the_repetition_penalty() {
    let c = case("text_only_en");
    let ids = |args: &[&str]| {
        let args = [&["--max-new-tokens", "24"], args].concat();
        u64s(&run_cli(&tiny_a(), c, &args).json["generated_ids"])
    };
    let mut plain = None;
    for penalty in [None, Some("1.1"), Some("1.5")] {
        let extra: Vec<&str> = penalty
            .map(|p| vec!["--repetition-penalty", p])
            .unwrap_or_default();
        let greedy = ids(&[&["--greedy"], &extra[..]].concat());
        for seed in ["1", "2"] {
            let t0 = ids(&[&["--temperature", "0", "--seed", seed], &extra[..]].concat());
            assert_eq!(t0, greedy, "--temperature 0 --seed {seed} {extra:?}");
        }
        plain.get_or_insert_with(|| greedy.clone());
        if penalty == Some("1.5") {
            assert_ne!(
                Some(&greedy),
                plain.as_ref(),
                "a repetition penalty of 1.5 changes the greedy answer"
            );
        }
    }
}

/// `serve` and `ocr` take `--device` like `run`; a device this build lacks is refused by name.
#[test]
fn every_model_command_takes_a_device_and_refuses_a_missing_one() {
    let bin = env!("CARGO_BIN_EXE_qwenvl");
    for cmd in ["run", "serve", "ocr", "bench"] {
        let out = Command::new(bin).args([cmd, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--device"), "{cmd} --help: {help}");
    }
    if candle_core::utils::cuda_is_available() {
        return;
    }
    let image = tiny_a().join("images").join(
        std::fs::read_dir(tiny_a().join("images"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name(),
    );
    let runs: [Vec<std::ffi::OsString>; 2] = [
        vec!["serve".into(), "--port".into(), "0".into()],
        vec!["ocr".into(), image.into()],
    ];
    for args in runs {
        let out = Command::new(bin)
            .args(&args)
            .arg("--model")
            .arg(tiny_a())
            .args(["--device", "cuda:0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains("device cuda:0: this qwenvl was built without CUDA"),
            "{args:?}: {err}"
        );
    }
}

/// The text-only Qwen fixtures (`tests/fixtures/tiny-text*`, generated from the upstream
/// Qwen-7B-Chat code, and the GPTQ Int4 `tiny-gptq`) through `qwenvl run --dtype f32 --greedy --json --logits-out`: prompt ids,
/// logits, greedy ids and, where the reference stopped, its `chat()` response; one case under
/// every CPU level.
#[test]
fn text_only_qwen_matches_the_reference_through_the_cli() {
    let levels = kernels::cpu::levels_to_test("CLI text-only golden cases");
    for name in ["tiny-text", "tiny-text-b", "tiny-gptq"] {
        let dir = text_fixture(name);
        let expected: Value =
            serde_json::from_slice(&std::fs::read(dir.join("expected/cases.json")).unwrap())
                .unwrap();
        let logits = candle_core::safetensors::load(
            dir.join("expected/logits.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        for c in expected["cases"].as_array().unwrap() {
            // The fixture ships Qwen-7B-Chat's repetition_penalty 1.1; the reference ids are plain
            // argmax.
            let args = [
                "--dtype",
                "f32",
                "--greedy",
                "--repetition-penalty",
                "1",
                "--max-new-tokens",
                "24",
            ];
            let run = run_cli(&dir, c, &args);
            check_against_reference(c, &run, &logits[c["logits_key"].as_str().unwrap()]);
            if c["id"] == "en" {
                for level in &levels {
                    let env = [("QWENVL_CPU", level.name())];
                    let run = run_cli_env(&dir, c, &args, &env);
                    assert_eq!(run.json["timings"]["cpu"], level.name());
                    check_against_reference(c, &run, &logits[c["logits_key"].as_str().unwrap()]);
                }
            }
        }
    }
}

/// A GPTQ checkpoint is repacked into our own quantized tiles on request: `--quant q8_0` and
/// `q4k` load it (dequantised exactly, then quantized like any checkpoint, activations rounded to
/// int8 as always) and answer the same prompt. Bounds are those the weight types show on tiny-a
/// (tests/quant.rs: q8_0 within 0.2; q4k measured 1.8 there, bound 2): measured here 0.13 and
/// 0.36.
#[test]
fn gptq_checkpoints_load_into_our_quantized_tiles() {
    let dir = text_fixture("tiny-gptq");
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected/cases.json")).unwrap()).unwrap();
    let logits = candle_core::safetensors::load(
        dir.join("expected/logits.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let c = &expected["cases"][0];
    let want = &logits[c["logits_key"].as_str().unwrap()];
    let cache = tempfile::tempdir().unwrap();
    for (quant, tol) in [("q8_0", 0.2f32), ("q4k", 2.0)] {
        let run = run_cli_env(
            &dir,
            c,
            &["--quant", quant, "--greedy", "--max-new-tokens", "4"],
            &[("QWENVL_CACHE_DIR", cache.path().to_str().unwrap())],
        );
        assert_eq!(run.json["prompt_ids"], c["prompt_ids"], "{quant}");
        assert!(
            !run.json["generated_ids"].as_array().unwrap().is_empty(),
            "{quant}"
        );
        let d = qwenvl_e2e::max_abs_diff(&run.logits, want);
        eprintln!("{quant}: max |Δlogit| vs the f32 reference {d:.3e}");
        assert!(d < tol, "{quant}: logits differ from f32 by {d}");
    }
}

/// Qwen-VL-Chat-Int4's layout (the LM's linear layers GPTQ-packed, the vision tower 16-bit):
/// tiny-a packed that way answers a text case and a picture case with exactly the logits and
/// greedy ids of a dense checkpoint holding the dequantised weights, so the packed layers read
/// as those weights and the vision tower is untouched.
#[test]
fn qwen_vl_int4_layout_equals_its_dequantised_weights() {
    let scratch = tempfile::tempdir().unwrap();
    let (gptq, dense) = (scratch.path().join("gptq"), scratch.path().join("dense"));
    let packed = qwenvl_e2e::gptq::write_copies(&tiny_a(), &gptq, &dense);
    let layers = 5 * lm_layers(&tiny_a());
    assert_eq!(packed, layers, "every LM linear layer is packed");
    for id in ["text_only_en", "one_image"] {
        let c = case(id);
        let args = ["--dtype", "f32", "--greedy", "--max-new-tokens", "8"];
        let a = run_cli(&gptq, c, &args);
        let b = run_cli(&dense, c, &args);
        assert_eq!(a.json["prompt_ids"], b.json["prompt_ids"], "{id}");
        assert_eq!(a.json["generated_ids"], b.json["generated_ids"], "{id}");
        let d = qwenvl_e2e::max_abs_diff(&a.logits, &b.logits);
        assert_eq!(d, 0.0, "{id}: the packed checkpoint's logits differ by {d}");
    }
}

fn lm_layers(dir: &Path) -> usize {
    let c: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    c["num_hidden_layers"].as_u64().unwrap() as usize
}

#[test]
fn text_only_models_refuse_pictures_and_ocr_with_a_clear_message() {
    let dir = text_fixture("tiny-text");
    let scratch = tempfile::tempdir().unwrap();
    let conv = scratch.path().join("c.json");
    std::fs::write(
        &conv,
        r#"{"query": [{"image": "cat.png"}, {"text": "What is it?"}]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .args(["run", "--model"])
        .arg(&dir)
        .arg("--conversation")
        .arg(&conv)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("text-only") && err.contains("cat.png"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .args(["ocr", "--model"])
        .arg(&dir)
        .arg(tiny_a().join("images"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("text-only"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A golden ReAct case's messages in the OpenAI form of today's clients: `tool_calls` with ids
/// and `tool` results naming them (upstream's own `function_call` / `function` form otherwise).
fn openai_tool_messages(messages: &Value, modern: bool) -> Value {
    if !modern {
        return messages.clone();
    }
    let mut calls = 0;
    let out: Vec<Value> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if let Some(f) = m.as_object_mut().unwrap().remove("function_call") {
                calls += 1;
                m["tool_calls"] =
                    serde_json::json!([{"id": format!("call_{calls}"), "type": "function", "function": f}]);
            }
            if m["role"] == "function" {
                m["role"] = "tool".into();
                m["tool_call_id"] = format!("call_{calls}").into();
            }
            m
        })
        .collect();
    Value::Array(out)
}

fn run_tool_file(model: &Path, file: &Value, extra: &[&str]) -> Value {
    let args: Vec<&str> = ["--greedy", "--dtype", "f32"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    run_conversation(model, file, &args, &[]).json
}

/// `run --conversation` takes OpenAI chat messages with tools: every golden ReAct case builds
/// upstream's prompt ids exactly (in both message forms), and a scripted model's call and answer
/// come back as `tool_calls` and `content`.
#[test]
fn tool_conversations_build_upstream_prompts_and_read_calls() {
    use qwenvl_e2e::{openai_tools, react_case, react_golden};
    let tiny_text = qwenvl_e2e::text_fixture("tiny-text");
    for (k, c) in react_golden()["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let id = c["id"].as_str().unwrap();
        let tools = openai_tools(c);
        let file = serde_json::json!({
            "tools": tools,
            "messages": openai_tool_messages(&c["messages"], k % 2 == 0),
        });
        let out = run_tool_file(&tiny_text, &file, &["--max-new-tokens", "2"]);
        assert_eq!(out["prompt_ids"], c["prompt_ids"], "{id}: prompt ids");
        assert_eq!(out.get("tool_calls").is_some(), !tools.is_empty(), "{id}");
    }

    use qwenvl_e2e::scripted;
    let dir = tempfile::tempdir().unwrap();
    scripted::write_weather_model(dir.path());
    let q = react_case("one_tool_question");
    let out = run_tool_file(
        dir.path(),
        &serde_json::json!({"tools": openai_tools(&q), "messages": q["messages"]}),
        &[],
    );
    assert_eq!(out["prompt_ids"], q["prompt_ids"]);
    assert_eq!(out["content"], scripted::WEATHER_THOUGHT, "{out}");
    assert_eq!(
        out["tool_calls"],
        serde_json::json!([{"name": "get_weather", "arguments": scripted::WEATHER_ARGUMENTS}]),
        "{out}"
    );
    assert_eq!(out["finish"], "StopString", "{out}");
    let a = react_case("after_observation");
    let out = run_tool_file(
        dir.path(),
        &serde_json::json!({"tools": openai_tools(&a), "messages": openai_tool_messages(&a["messages"], true)}),
        &[],
    );
    assert_eq!(out["prompt_ids"], a["prompt_ids"]);
    assert_eq!(out["content"], scripted::WEATHER_ANSWER, "{out}");
    assert_eq!(out["tool_calls"], Value::Null, "{out}");
}

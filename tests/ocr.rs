//! `qwenvl ocr` over tiny-a images: one line per image with the same text `qwenvl run` gives, error
//! lines for broken files, and resuming with the same `--out`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qwenvl::ocr::DEFAULT_PROMPT;
use qwenvl_e2e::tiny_a;
use serde_json::Value;

const IMAGES: [&str; 3] = ["gray_256x192.png", "palette_320x240.png", "tiny_50x40.png"];

fn ocr(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .arg("ocr")
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every line of the results file; `None` for a line that is not JSON.
fn lines(out: &Path) -> Vec<Option<Value>> {
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn parsed(out: &Path) -> Vec<Value> {
    lines(out).into_iter().flatten().collect()
}

/// `qwenvl run --greedy --json` on the same single-turn conversation.
fn run_reference(image: &Path, prompt: &str) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conversation.json");
    let c = serde_json::json!({"query": [{"image": image.to_str().unwrap()}, {"text": prompt}]});
    std::fs::write(&conv, c.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .arg("run")
        .arg("--model")
        .arg(tiny_a())
        .arg("--conversation")
        .arg(&conv)
        .args(["--greedy", "--json", "--max-new-tokens", "8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "qwenvl run: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn batch_answers_match_qwenvl_run_and_resume_skips_what_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for name in IMAGES {
        std::fs::copy(tiny_a().join("images").join(name), imgs.join(name)).unwrap();
    }
    let broken = imgs.join("broken.png");
    std::fs::write(&broken, b"this is not a picture").unwrap();
    // Not an image extension: a folder argument leaves it out.
    std::fs::write(imgs.join("notes.txt"), b"ignored").unwrap();
    let out = dir.path().join("results.jsonl");
    let model = tiny_a();
    let base: Vec<&std::ffi::OsStr> = vec![
        "--model".as_ref(),
        model.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--max-new-tokens".as_ref(),
        "8".as_ref(),
    ];

    // The folder stands for its images, sorted by name; the broken one fails, the others go on.
    let r = ocr(&[&[imgs.as_os_str()], &base[..]].concat());
    let err = text(&r.stderr);
    assert!(
        !r.status.success(),
        "a failed image must fail the run: {err}"
    );
    assert!(err.contains("1 of 4 image(s) failed"), "{err}");
    let first = parsed(&out);
    assert_eq!(lines(&out).len(), 4, "one line per image");
    let mut expected: Vec<PathBuf> = IMAGES.iter().map(|n| imgs.join(n)).collect();
    expected.push(broken.clone());
    expected.sort();
    let paths: Vec<&str> = first.iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        expected
            .iter()
            .map(|p| p.to_str().unwrap())
            .collect::<Vec<_>>()
    );
    for v in &first {
        assert_eq!(v["prompt"], DEFAULT_PROMPT);
        let path = PathBuf::from(v["path"].as_str().unwrap());
        if path == broken {
            let e = v["error"].as_str().expect("an error line");
            assert!(e.contains("broken.png"), "the error names the file: {e}");
            assert!(v.get("text").is_none());
            continue;
        }
        assert!(v.get("error").is_none(), "{v}");
        let reference = run_reference(&path, DEFAULT_PROMPT);
        assert_eq!(v["text"], reference["text"], "{}", path.display());
        assert_eq!(
            v["tokens"].as_u64().unwrap() as usize,
            reference["generated_ids"].as_array().unwrap().len()
        );
        assert!(v["boxes"].is_array() && v["ms"].as_f64().unwrap() > 0.0);
    }

    // A crash mid-write left half a line; the rerun skips the three answered images and retries
    // the broken one, on a line of its own.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        f.write_all(br#"{"file": "cut", "pa"#).unwrap();
    }
    let r = ocr(&[&[imgs.as_os_str()], &base[..]].concat());
    let err = text(&r.stderr);
    assert!(!r.status.success());
    assert!(err.contains("3 skipped"), "{err}");
    let all = lines(&out);
    assert_eq!(all.len(), 6, "4 lines, the cut one, one retry");
    assert!(all[4].is_none(), "the cut line stays as it was");
    let retry = all[5].as_ref().expect("the retry's line parses");
    assert_eq!(retry["path"], broken.to_str().unwrap());
    assert!(retry["error"].as_str().unwrap().contains("broken.png"));

    // Repaired, the broken file is answered (once, though given twice); nothing else runs again.
    std::fs::copy(tiny_a().join("images/rgba_400x400.png"), &broken).unwrap();
    let r = ocr(&[&[broken.as_os_str()], &[imgs.as_os_str()], &base[..]].concat());
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("1 answered, 0 failed, 3 skipped"),
        "{}",
        text(&r.stderr)
    );
    let all = parsed(&out);
    assert_eq!(all.len(), 6, "one new line");
    let repaired = &all[5];
    assert_eq!(repaired["path"], broken.to_str().unwrap());
    assert!(repaired.get("error").is_none(), "{repaired}");
    let reference = run_reference(&broken, DEFAULT_PROMPT);
    assert_eq!(repaired["text"], reference["text"]);

    // Everything answered: a rerun adds nothing and succeeds.
    let r = ocr(&[&[imgs.as_os_str()], &base[..]].concat());
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert_eq!(parsed(&out).len(), 6);

    // Another question is another job: every image again, with that prompt.
    let prompt = "Describe the picture.";
    let r = ocr(&[
        &[imgs.as_os_str(), "--prompt".as_ref(), prompt.as_ref()],
        &base[..],
    ]
    .concat());
    assert!(r.status.success(), "{}", text(&r.stderr));
    let all = parsed(&out);
    assert_eq!(all.len(), 10);
    assert!(all[6..]
        .iter()
        .all(|v| v["prompt"] == prompt && v.get("text").is_some()));
    let one = &all[6];
    let reference = run_reference(Path::new(one["path"].as_str().unwrap()), prompt);
    assert_eq!(one["text"], reference["text"]);

    // Batched (three images at a time, the fourth joining when one ends): the same lines in
    // the same order as one at a time.
    let out2 = dir.path().join("batched.jsonl");
    let r = ocr(&[
        imgs.as_os_str(),
        "--prompt".as_ref(),
        prompt.as_ref(),
        "--parallel".as_ref(),
        "3".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--out".as_ref(),
        out2.as_os_str(),
        "--max-new-tokens".as_ref(),
        "8".as_ref(),
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let batched = parsed(&out2);
    assert_eq!(batched.len(), 4);
    for (b, a) in batched.iter().zip(&all[6..]) {
        for field in ["path", "text", "tokens", "boxes", "width", "finish"] {
            assert_eq!(b[field], a[field], "{field} of {}", a["path"]);
        }
    }
}

#[test]
fn results_go_to_stdout_and_bad_outputs_are_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let image = tiny_a().join("images").join(IMAGES[2]);
    let model = tiny_a();
    let r = ocr(&[
        image.as_os_str(),
        "--model".as_ref(),
        model.as_os_str(),
        "--max-new-tokens".as_ref(),
        "2".as_ref(),
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let out = text(&r.stdout);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["path"], image.to_str().unwrap());
    assert!(v["text"].is_string());

    // A folder as --out, and a file in a missing folder: refused before the (missing) model loads.
    for bad in [
        dir.path().to_path_buf(),
        dir.path().join("no/such/dir/out.jsonl"),
    ] {
        let r = ocr(&[
            image.as_os_str(),
            "--model".as_ref(),
            "/no/such/model".as_ref(),
            "--out".as_ref(),
            bad.as_os_str(),
        ]);
        let err = text(&r.stderr);
        assert!(!r.status.success());
        assert!(
            err.contains("--out") && err.contains(bad.to_str().unwrap()),
            "{err}"
        );
        assert!(
            !err.contains("/no/such/model"),
            "the output is checked first: {err}"
        );
    }
}

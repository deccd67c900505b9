//! `qwenvl download` against a local stand-in for the Hugging Face hub (std TcpListener, HTTP/1.1,
//! keep-alive, `Range`), serving the tiny-a checkpoint plus a few files the model does not need:
//! full download into the hub cache layout, interruption and resume, no re-transfer of complete
//! files, the snapshot as a working model, cancellation through the library API, clear errors.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};

use qwenvl::download::{self, DownloadOptions, DownloadProgress, DownloadStage};
use qwenvl_e2e::tiny_a;

#[path = "hub_support.rs"]
mod hub_support;
use hub_support::*;
use sha2::Digest;

/// `qwenvl download ARGS` with the hub at `endpoint` and the cache in `home`.
fn download_cli(endpoint: &str, home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .arg("download")
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn repo_dir(home: &Path) -> PathBuf {
    home.join("hub").join("models--tiny-org--tiny-vl")
}

fn snapshot(home: &Path) -> PathBuf {
    repo_dir(home).join("snapshots").join(SHA)
}

fn assert_identical(snap: &Path, hub: &Hub, files: &[&str]) {
    for f in files {
        let got = std::fs::read(snap.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(
            got == *hub.state.files[*f].bytes,
            "{f}: the downloaded bytes differ from the served ones"
        );
    }
}

fn incomplete_files(home: &Path) -> Vec<(PathBuf, u64)> {
    std::fs::read_dir(repo_dir(home).join("blobs"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
                .map(|e| (e.path(), e.metadata().unwrap().len()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn downloads_the_model_files_into_the_hub_cache_and_skips_them_afterwards() {
    let hub = Hub::start();
    let home = tempfile::tempdir().unwrap();
    let out = download_cli(&hub.endpoint(), home.path(), &[REPO]);
    assert!(
        out.status.success(),
        "download failed: {}",
        text(&out.stderr)
    );
    let snap = snapshot(home.path());
    assert_eq!(
        text(&out.stdout),
        format!("{}\n", snap.display()),
        "stdout is the snapshot folder"
    );
    assert_identical(&snap, &hub, &MODEL_FILES);
    for f in EXTRA_FILES {
        assert!(
            !snap.join(f).exists(),
            "{f} is not a model file but was downloaded"
        );
    }
    // The hub cache layout: refs/main → commit, weights as blobs named by their SHA-256.
    let refs = std::fs::read_to_string(repo_dir(home.path()).join("refs/main")).unwrap();
    assert_eq!(refs.trim(), SHA);
    let weights = &hub.state.files["model.safetensors"].bytes;
    let blob = repo_dir(home.path())
        .join("blobs")
        .join(hex(&sha2::Sha256::digest(weights.as_slice())));
    assert_eq!(
        std::fs::metadata(&blob).unwrap().len(),
        weights.len() as u64
    );
    assert!(
        std::fs::symlink_metadata(snap.join("model.safetensors"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "snapshot entries link to the blobs"
    );
    assert!(incomplete_files(home.path()).is_empty());
    let log = hub.take_log();
    for f in MODEL_FILES {
        let bodies = Hub::bodies(&log, f);
        assert_eq!(bodies.len(), 1, "{f}: one transfer, got {bodies:?}");
        assert_eq!(bodies[0].sent, hub.size(f));
    }
    for f in EXTRA_FILES {
        assert!(
            log.iter().all(|s| s.file.as_deref() != Some(f)),
            "{f} was requested"
        );
    }

    // Again: everything is there, no body moves.
    let out = download_cli(&hub.endpoint(), home.path(), &[REPO]);
    assert!(
        out.status.success(),
        "second download failed: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), format!("{}\n", snap.display()));
    let log = hub.take_log();
    let bodies: Vec<_> = log.iter().filter(|s| s.is_body()).collect();
    assert!(
        bodies.is_empty(),
        "a complete download transferred again: {bodies:?}"
    );

    // --all adds the other files (the nested one too) and transfers only them.
    let out = download_cli(
        &hub.endpoint(),
        home.path(),
        &[REPO, "--all", "--revision", "main"],
    );
    assert!(out.status.success(), "--all failed: {}", text(&out.stderr));
    assert_identical(&snap, &hub, &MODEL_FILES);
    assert_identical(&snap, &hub, &EXTRA_FILES);
    let log = hub.take_log();
    let mut moved: Vec<String> = log
        .iter()
        .filter(|s| s.is_body())
        .map(|s| s.file.clone().unwrap())
        .collect();
    moved.sort();
    let mut extra: Vec<String> = EXTRA_FILES.iter().map(|s| s.to_string()).collect();
    extra.sort();
    assert_eq!(moved, extra, "--all transfers only the files not yet there");

    // The snapshot is a working model folder: same greedy tokens as the fixture itself.
    let conv_dir = tempfile::tempdir().unwrap();
    let conv = conv_dir.path().join("conversation.json");
    std::fs::write(&conv, r#"{"query":[{"text":"hi"}]}"#).unwrap();
    let run = |model: &Path| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
            .arg("run")
            .arg("--model")
            .arg(model)
            .arg("--conversation")
            .arg(&conv)
            .args(["--greedy", "--max-new-tokens", "4", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qwenvl run --model {}: {}",
            model.display(),
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let ours = run(&snap);
    let fixture = run(&tiny_a());
    assert!(!ours["generated_ids"].as_array().unwrap().is_empty());
    assert_eq!(ours["generated_ids"], fixture["generated_ids"]);
    assert_eq!(ours["text"], fixture["text"]);
}

#[test]
fn an_interrupted_download_fails_clearly_and_the_next_run_resumes_it() {
    let hub = Hub::start();
    let size = hub.size("model.safetensors");
    let at = size * 2 / 5;
    // One attempt plus two retries, all cut: the first run must fail.
    *hub.state.cut.lock().unwrap() = Some(Cut {
        file: "model.safetensors".into(),
        requests: 3,
        at,
    });
    let home = tempfile::tempdir().unwrap();
    let out = download_cli(&hub.endpoint(), home.path(), &[REPO, "--retries", "2"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the cut download succeeded");
    assert!(!err.contains("panicked"), "{err}");
    let url = format!("{}/{REPO}/resolve/{SHA}/model.safetensors", hub.endpoint());
    assert!(
        err.contains("model.safetensors") && err.contains(&url),
        "the error names the file and URL: {err}"
    );
    assert!(
        err.contains(&format!("after {at} of {size} bytes")),
        "{err}"
    );
    assert!(err.contains("resume"), "{err}");
    assert_eq!(*hub.state.cuts_done.lock().unwrap(), 3, "the retries ran");
    let partial = incomplete_files(home.path());
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert_eq!(
        partial[0].1, at,
        "the partial file holds exactly what was received"
    );
    assert!(!snapshot(home.path()).join("model.safetensors").exists());
    let log1 = hub.take_log();
    let first = Hub::bodies(&log1, "model.safetensors");
    assert_eq!(first.len(), 3);
    assert_eq!(
        first[1].range.as_deref(),
        Some(format!("bytes={at}-").as_str()),
        "a retry resumes"
    );

    let out = download_cli(&hub.endpoint(), home.path(), &[REPO, "--retries", "2"]);
    assert!(
        out.status.success(),
        "the resumed download failed: {}",
        text(&out.stderr)
    );
    let log = hub.take_log();
    let second = Hub::bodies(&log, "model.safetensors");
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(
        second[0].range.as_deref(),
        Some(format!("bytes={at}-").as_str())
    );
    assert_eq!(
        second[0].sent,
        size - at,
        "only the missing bytes were sent"
    );
    // A file finished in either run is transferred once in all.
    for f in MODEL_FILES.iter().filter(|f| **f != "model.safetensors") {
        let n = Hub::bodies(&log1, f).len() + Hub::bodies(&log, f).len();
        assert_eq!(n, 1, "{f} transferred {n} times");
    }
    assert_identical(&snapshot(home.path()), &hub, &MODEL_FILES);
    assert!(incomplete_files(home.path()).is_empty());
}

#[test]
fn cancelling_through_the_library_keeps_the_partial_file_for_the_next_call() {
    let hub = Hub::start();
    let home = tempfile::tempdir().unwrap();
    let opts = DownloadOptions {
        repo: REPO.into(),
        endpoint: Some(hub.endpoint()),
        cache_dir: Some(home.path().join("hub")),
        ..DownloadOptions::default()
    };
    let expected_total: u64 = MODEL_FILES.iter().map(|f| hub.size(f)).sum();
    let cancel = AtomicBool::new(false);
    let mut reports: Vec<DownloadProgress> = Vec::new();
    let err = download::download(
        &opts,
        &mut |p| {
            reports.push(p.clone());
            if p.stage == DownloadStage::Downloading && p.file == "model.safetensors" {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    )
    .unwrap_err();
    assert!(err.is::<download::Cancelled>(), "{err:#}");
    assert!(format!("{err}").contains("download cancelled"));
    let first_download = reports
        .iter()
        .find(|r| r.stage == DownloadStage::Downloading)
        .unwrap();
    assert_eq!(
        first_download.bytes_total, expected_total,
        "the total is known before any body"
    );
    assert_eq!(first_download.file_count, MODEL_FILES.len());
    let partial = incomplete_files(home.path());
    assert_eq!(partial.len(), 1, "{partial:?}");
    let kept = partial[0].1;
    assert!(kept > 0 && kept < hub.size("model.safetensors"), "{kept}");
    // The server logs a request once it has written the answer (into a socket the client closed).
    let t0 = std::time::Instant::now();
    while Hub::bodies(&hub.state.log.lock().unwrap(), "model.safetensors").is_empty() {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the cancelled request never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    hub.take_log();

    cancel.store(false, Ordering::Relaxed);
    let mut reports: Vec<DownloadProgress> = Vec::new();
    let snap = download::download(&opts, &mut |p| reports.push(p.clone()), &cancel).unwrap();
    assert_eq!(
        snap,
        home.path()
            .join("hub/models--tiny-org--tiny-vl/snapshots")
            .join(SHA)
    );
    assert_identical(&snap, &hub, &MODEL_FILES);
    let log = hub.take_log();
    let bodies = Hub::bodies(&log, "model.safetensors");
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(
        bodies[0].range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
    assert_eq!(bodies[0].sent, hub.size("model.safetensors") - kept);
    let done: Vec<u64> = reports
        .iter()
        .filter(|r| r.stage != DownloadStage::Checking)
        .map(|r| r.bytes_done)
        .collect();
    assert!(
        done.windows(2).all(|w| w[0] <= w[1]),
        "bytes_done never goes back"
    );
    let last = reports.last().unwrap();
    assert_eq!(last.stage, DownloadStage::Done);
    assert_eq!(
        (last.bytes_done, last.bytes_total),
        (expected_total, expected_total)
    );
    assert_eq!(
        download::cached_snapshot_in(&home.path().join("hub"), REPO, "main"),
        Some(snap)
    );
}

#[test]
fn unknown_repositories_revisions_and_unreachable_hubs_give_clear_errors() {
    let hub = Hub::start();
    let home = tempfile::tempdir().unwrap();

    let out = download_cli(&hub.endpoint(), home.path(), &["tiny-org/nope"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("tiny-org/nope") && err.contains("no such model"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    let out = download_cli(&hub.endpoint(), home.path(), &[REPO, "--revision", "v9"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(REPO) && err.contains("no revision \"v9\""),
        "{err}"
    );

    let out = download_cli(&hub.endpoint(), home.path(), &["../../etc"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not a Hugging Face repository id"));

    // A port nothing listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("http://127.0.0.1:{port}");
    let t0 = std::time::Instant::now();
    let out = download_cli(&dead, home.path(), &[REPO]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "cannot reach {dead}/api/models/{REPO}/revision/main"
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        t0.elapsed().as_secs() < 20,
        "a refused connection is not retried for long"
    );
    assert!(!repo_dir(home.path()).join("snapshots").exists());
}

fn app_harness<'a>(app: qwenvl::gui::QwenApp) -> egui_kittest::Harness<'a, qwenvl::gui::QwenApp> {
    let h = egui_kittest::Harness::builder()
        .with_size(egui::vec2(1200.0, 860.0))
        .build_state(|ctx, app: &mut qwenvl::gui::QwenApp| app.ui(ctx), app);
    qwenvl::gui::install_fonts(&h.ctx);
    h
}

/// The app's first-run screen: Download fetches the model into the hub cache with a progress bar,
/// a cut connection ends in an error that says it resumes, the second press resumes (a `Range`
/// request from where it stopped) and the downloaded model is loaded.
#[test]
fn the_first_run_screen_downloads_resumes_and_loads_the_model() {
    use egui_kittest::kittest::Queryable;
    use qwenvl::gui::backend::{EngineBackend, ModelSource};
    use qwenvl::gui::model::ModelState;
    use qwenvl::gui::{AppOptions, QwenApp};
    use std::time::{Duration, Instant};

    let hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let mut opts = AppOptions::for_folder(tmp.path(), Box::new(EngineBackend::default()));
    opts.download = DownloadOptions {
        repo: REPO.into(),
        retries: 0,
        endpoint: Some(hub.endpoint()),
        cache_dir: Some(cache.clone()),
        ..DownloadOptions::default()
    };
    let size = hub.size("model.safetensors");
    let at = size * 2 / 5;
    *hub.state.cut.lock().unwrap() = Some(Cut {
        file: "model.safetensors".into(),
        requests: 1,
        at,
    });
    let mut h = app_harness(QwenApp::new(opts));
    let button = format!("Download {REPO}");
    let wait = |h: &mut egui_kittest::Harness<'_, QwenApp>,
                what: &str,
                done: &dyn Fn(&QwenApp) -> bool| {
        let t0 = Instant::now();
        let mut saw_progress = false;
        while !done(h.state()) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}: {:?}",
                h.state().errors
            );
            h.step();
            saw_progress |= h
                .state()
                .download
                .as_ref()
                .and_then(|d| d.progress.as_ref())
                .is_some_and(|p| p.bytes_total > 0);
            std::thread::sleep(Duration::from_millis(5));
        }
        saw_progress
    };

    h.get_by_label(&button).click();
    h.run_steps(2);
    assert!(h.state().download.is_some());
    h.get_by_label("Cancel download");
    wait(&mut h, "the cut download to fail", &|app| {
        !app.errors.is_empty()
    });
    let err = h.state().errors.join("\n");
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("resume"), "{err}");
    assert!(h.state().download.is_none());
    assert!(matches!(h.state().model, ModelState::None));

    h.get_by_label(&button).click();
    h.run_steps(1);
    let saw_progress = wait(&mut h, "the model to download and load", &|app| {
        matches!(app.model, ModelState::Ready(_))
    });
    assert!(saw_progress, "no progress was shown");
    let snap = cache
        .join("models--tiny-org--tiny-vl")
        .join("snapshots")
        .join(SHA);
    match &h.state().model {
        ModelState::Ready(info) => assert_eq!(info.source, ModelSource::folder(snap.clone())),
        other => panic!("{other:?}"),
    }
    assert_identical(&snap, &hub, &MODEL_FILES);
    let bodies = Hub::bodies(&hub.take_log(), "model.safetensors");
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(
        bodies[1].range.as_deref(),
        Some(format!("bytes={at}-").as_str())
    );
    assert_eq!(bodies[1].sent, size - at);
}

//! `qwenvl download` against a local stand-in for the Hugging Face hub (std TcpListener, HTTP/1.1,
//! keep-alive, `Range`), serving the tiny-a checkpoint plus a few files the model does not need:
//! full download into the hub cache layout, interruption and resume, no re-transfer of complete
//! files, the snapshot as a working model, cancellation through the library API, clear errors.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use qwenvl::download::{self, DownloadOptions, DownloadProgress, DownloadStage};
use qwenvl_e2e::tiny_a;
use sha2::Digest;

const REPO: &str = "tiny-org/tiny-vl";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const MODEL_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "qwen.tiktoken",
    "tokenizer_config.json",
    "model.safetensors",
];
const EXTRA_FILES: [&str; 3] = ["README.md", "modeling_qwen.py", "assets/notes.txt"];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Served {
    bytes: Arc<Vec<u8>>,
    /// Weight files carry their SHA-256 as `x-linked-etag`, as LFS files on the hub do.
    lfs: bool,
}

/// One request the server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    file: Option<String>,
    range: Option<String>,
    /// Body bytes sent.
    sent: u64,
}

impl Seen {
    /// A transfer of file content (not the hub client's 1-byte metadata probe).
    fn is_body(&self) -> bool {
        self.method == "GET" && self.file.is_some() && self.range.as_deref() != Some("bytes=0-0")
    }
}

/// Connection cuts: the first `requests` body requests for `file` stop at byte `at`.
struct Cut {
    file: String,
    requests: usize,
    at: u64,
}

struct State {
    files: HashMap<String, Served>,
    log: Mutex<Vec<Seen>>,
    cut: Mutex<Option<Cut>>,
    cuts_done: Mutex<usize>,
}

struct Hub {
    port: u16,
    state: Arc<State>,
}

impl Hub {
    fn start() -> Self {
        let mut files = HashMap::new();
        for name in MODEL_FILES {
            let bytes = std::fs::read(tiny_a().join(name)).unwrap();
            files.insert(
                name.to_string(),
                Served {
                    bytes: Arc::new(bytes),
                    lfs: name.ends_with(".safetensors"),
                },
            );
        }
        let extra: [(&str, Vec<u8>); 3] = [
            (
                "README.md",
                std::fs::read(tiny_a().join("README.md")).unwrap(),
            ),
            (
                "modeling_qwen.py",
                b"# remote code the Rust engine never runs\n".to_vec(),
            ),
            ("assets/notes.txt", b"a nested file\n".to_vec()),
        ];
        for (name, bytes) in extra {
            files.insert(
                name.to_string(),
                Served {
                    bytes: Arc::new(bytes),
                    lfs: false,
                },
            );
        }
        let state = Arc::new(State {
            files,
            log: Mutex::default(),
            cut: Mutex::default(),
            cuts_done: Mutex::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let st = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || serve_connection(stream, &st));
            }
        });
        Hub { port, state }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn size(&self, name: &str) -> u64 {
        self.state.files[name].bytes.len() as u64
    }

    fn take_log(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.state.log.lock().unwrap())
    }

    fn bodies(log: &[Seen], file: &str) -> Vec<Seen> {
        log.iter()
            .filter(|s| s.is_body() && s.file.as_deref() == Some(file))
            .cloned()
            .collect()
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
    head: bool,
) {
    let mut text = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = stream.write_all(text.as_bytes());
    if !head {
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
}

fn serve_connection(stream: TcpStream, st: &State) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        if let Some(n) = headers
            .get("content-length")
            .and_then(|n| n.parse::<u64>().ok())
        {
            let _ = std::io::copy(&mut (&mut reader).take(n), &mut std::io::sink());
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let range = headers.get("range").cloned();
        let keep = handle(&mut stream, st, &method, &path, range);
        if !keep {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Answers one request; false when the connection was cut.
fn handle(
    stream: &mut TcpStream,
    st: &State,
    method: &str,
    path: &str,
    range: Option<String>,
) -> bool {
    let head = method == "HEAD";
    let mut seen = Seen {
        method: method.to_string(),
        file: None,
        range: range.clone(),
        sent: 0,
    };
    let json = |s: &str| vec![("Content-Type".to_string(), s.to_string())];
    let (org_name, rest) = if let Some(p) = path.strip_prefix("/api/models/") {
        // /api/models/{org}/{name}/revision/{rev}
        let segs: Vec<&str> = p.splitn(4, '/').collect();
        let repo = format!("{}/{}", segs[0], segs.get(1).unwrap_or(&""));
        if repo != REPO {
            let mut h = json("application/json");
            h.push(("x-error-code".into(), "RepoNotFound".into()));
            respond(
                stream,
                "404 Not Found",
                &h,
                br#"{"error":"Repository not found"}"#,
                head,
            );
        } else if segs.get(2) != Some(&"revision")
            || !["main", SHA].contains(segs.get(3).unwrap_or(&""))
        {
            let mut h = json("application/json");
            h.push(("x-error-code".into(), "RevisionNotFound".into()));
            respond(
                stream,
                "404 Not Found",
                &h,
                br#"{"error":"Invalid rev id"}"#,
                head,
            );
        } else {
            let mut names: Vec<&String> = st.files.keys().collect();
            names.sort();
            let siblings: Vec<_> = names
                .iter()
                .map(|n| serde_json::json!({ "rfilename": n }))
                .collect();
            let body = serde_json::json!({"id": REPO, "sha": SHA, "siblings": siblings});
            respond(
                stream,
                "200 OK",
                &json("application/json"),
                body.to_string().as_bytes(),
                head,
            );
        }
        st.log.lock().unwrap().push(seen);
        return true;
    } else {
        // /{org}/{name}/resolve/{rev}/{file...}
        let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if segs.len() < 5 || segs[2] != "resolve" {
            respond(stream, "404 Not Found", &[], b"not found", head);
            st.log.lock().unwrap().push(seen);
            return true;
        }
        (
            format!("{}/{}", segs[0], segs[1]),
            (segs[3].to_string(), segs[4].to_string()),
        )
    };
    let (rev, file) = rest;
    let served = st.files.get(&file);
    if org_name != REPO || !["main", SHA].contains(&rev.as_str()) || served.is_none() {
        respond(
            stream,
            "404 Not Found",
            &[("x-error-code".into(), "EntryNotFound".into())],
            b"Entry not found",
            head,
        );
        st.log.lock().unwrap().push(seen);
        return true;
    }
    let served = served.unwrap();
    seen.file = Some(file.clone());
    let bytes = &served.bytes;
    let size = bytes.len() as u64;
    let digest = hex(&sha2::Sha256::digest(bytes.as_slice()));
    let mut headers = vec![
        ("x-repo-commit".to_string(), SHA.to_string()),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    if served.lfs {
        headers.push(("x-linked-etag".into(), format!("\"{digest}\"")));
        headers.push(("etag".into(), format!("\"{}\"", &digest[..40])));
    } else {
        // Any stable string (the hub sends the git blob id).
        headers.push(("etag".into(), format!("\"{}\"", &digest[24..64])));
    }
    let (status, start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: u64 = a.parse().unwrap();
            let b: u64 = if b.is_empty() {
                size - 1
            } else {
                b.parse::<u64>().unwrap().min(size - 1)
            };
            if a >= size {
                headers.push(("Content-Range".into(), format!("bytes */{size}")));
                respond(stream, "416 Range Not Satisfiable", &headers, b"", head);
                st.log.lock().unwrap().push(seen);
                return true;
            }
            headers.push(("Content-Range".into(), format!("bytes {a}-{b}/{size}")));
            ("206 Partial Content", a, b + 1)
        }
        None => ("200 OK", 0, size),
    };
    let body = &bytes[start as usize..end as usize];
    // Cut the first requests for the chosen file once `at` bytes of the file have gone out.
    let cut_at = {
        let mut cut = st.cut.lock().unwrap();
        match cut.as_mut() {
            Some(c) if c.file == file && c.requests > 0 && seen.is_body() => {
                c.requests -= 1;
                Some(c.at)
            }
            _ => None,
        }
    };
    if let Some(at) = cut_at {
        let upto = at.clamp(start, end);
        let mut text = format!("HTTP/1.1 {status}\r\n");
        for (k, v) in &headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let _ = stream.write_all(text.as_bytes());
        let _ = stream.write_all(&bytes[start as usize..upto as usize]);
        let _ = stream.flush();
        seen.sent = upto - start;
        *st.cuts_done.lock().unwrap() += 1;
        st.log.lock().unwrap().push(seen);
        return false;
    }
    respond(stream, status, &headers, body, head);
    if !head {
        seen.sent = body.len() as u64;
    }
    st.log.lock().unwrap().push(seen);
    true
}

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

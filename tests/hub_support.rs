//! A local stand-in for the Hugging Face hub (std TcpListener, HTTP/1.1, keep-alive, `Range`)
//! serving the tiny-a checkpoint plus a few files the model does not need; shared by the download
//! tests and the app's first-run download test.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use qwenvl_e2e::tiny_a;
use sha2::Digest;

pub const REPO: &str = "tiny-org/tiny-vl";
pub const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
pub const MODEL_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "qwen.tiktoken",
    "tokenizer_config.json",
    "model.safetensors",
];
pub const EXTRA_FILES: [&str; 3] = ["README.md", "modeling_qwen.py", "assets/notes.txt"];

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Served {
    pub bytes: Arc<Vec<u8>>,
    /// Weight files carry their SHA-256 as `x-linked-etag`, as LFS files on the hub do.
    pub lfs: bool,
}

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub file: Option<String>,
    pub range: Option<String>,
    /// Body bytes sent.
    pub sent: u64,
}

impl Seen {
    /// A transfer of file content (not the hub client's 1-byte metadata probe).
    pub fn is_body(&self) -> bool {
        self.method == "GET" && self.file.is_some() && self.range.as_deref() != Some("bytes=0-0")
    }
}

/// Connection cuts: the first `requests` body requests for `file` stop at byte `at`.
pub struct Cut {
    pub file: String,
    pub requests: usize,
    pub at: u64,
}

pub struct State {
    pub files: HashMap<String, Served>,
    pub log: Mutex<Vec<Seen>>,
    pub cut: Mutex<Option<Cut>>,
    pub cuts_done: Mutex<usize>,
}

pub struct Hub {
    pub port: u16,
    pub state: Arc<State>,
}

impl Hub {
    pub fn start() -> Self {
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

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn size(&self, name: &str) -> u64 {
        self.state.files[name].bytes.len() as u64
    }

    pub fn take_log(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.state.log.lock().unwrap())
    }

    pub fn bodies(log: &[Seen], file: &str) -> Vec<Seen> {
        log.iter()
            .filter(|s| s.is_body() && s.file.as_deref() == Some(file))
            .cloned()
            .collect()
    }
}

pub fn respond(
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

pub fn serve_connection(stream: TcpStream, st: &State) {
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
pub fn handle(
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

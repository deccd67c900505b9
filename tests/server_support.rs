//! Starts `qwenvl serve` on the tiny-a fixture on a free loopback port (shared by the server and
//! remote-backend tests).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lm::prompt::{Conversation, Item};
use qwenvl_e2e::tiny_a;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_qwenvl");

/// A running `qwenvl serve`; killed when dropped. Its stderr (the request log) is collected.
pub struct Server {
    child: Child,
    pub url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        Self::start_model(&tiny_a(), extra)
    }

    /// `qwenvl serve` on the model folder `model`.
    pub fn start_model(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(extra)
            .env_remove("QWENVL_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qwenvl serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "qwenvl serve did not start: {line:?}; log: {}",
                    log.lock().unwrap()
                )
            })
            .to_string();
        let server = Server { child, url, log };
        server.wait_ready();
        server
    }

    /// Waits until `GET /health` says the model is loaded (the port answers before that).
    pub fn wait_ready(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            if http_get(&self.url, "/health").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("qwenvl serve never became ready; log:\n{}", self.log());
    }

    // Only the server tests read it (this file is shared with the remote-backend tests).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the request log has a line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no log line with {needle:?}; log:\n{}", self.log());
    }
}

/// `GET path` on the server at `url` (`http://host:port`): the status code and the body.
pub fn http_get(url: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Some((code, body))
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qwenvl run --greedy --json` on `conv` (image paths relative to `base`).
pub fn cli(conv: &Conversation, base: &Path, max_tokens: usize) -> Value {
    cli_with(conv, base, max_tokens, &[])
}

/// [`cli`] with more `qwenvl run` flags.
pub fn cli_with(conv: &Conversation, base: &Path, max_tokens: usize, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.json");
    // Absolute image paths, so the file can live anywhere.
    let mut conv = conv.clone();
    let abs = |items: &mut Vec<Item>| {
        for i in items {
            if let Item::Image { image } = i {
                *image = base.join(&*image).to_string_lossy().into_owned();
            }
        }
    };
    abs(&mut conv.query);
    for (u, _) in &mut conv.history {
        abs(u);
    }
    std::fs::write(&path, serde_json::to_vec(&conv).unwrap()).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--json", "--greedy", "--model"])
        .arg(tiny_a())
        .arg("--conversation")
        .arg(&path)
        .args(["--max-new-tokens", &max_tokens.to_string()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

//! The hub side of a download: repository listings and file metadata through `hf-hub`, file
//! bodies over HTTP with resumption, retries with backoff, and cancellation.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};
use sha2::Digest;

use super::{hub_cache, incomplete_path, Cancelled, DownloadOptions, DEFAULT_ENDPOINT};

/// The hub client and what the body transfers need beside it.
pub(super) struct Hub<'a> {
    pub(super) api: Api,
    pub(super) cache: Cache,
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
    retries: usize,
    /// Also ends the waits between retries.
    cancel: &'a AtomicBool,
}

/// Why a request failed, and whether trying again may help.
struct Failure {
    error: anyhow::Error,
    retry: bool,
}

impl Failure {
    pub(super) fn fatal(error: anyhow::Error) -> Self {
        Self {
            error,
            retry: false,
        }
    }
    pub(super) fn transient(error: anyhow::Error) -> Self {
        Self { error, retry: true }
    }
}

/// Whether a transport error may pass: a refused connection or an unknown host will not.
fn transport_retryable(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::HostNotFound | ureq::Error::BadUri(_) => false,
        ureq::Error::Io(io) => io.kind() != std::io::ErrorKind::ConnectionRefused,
        ureq::Error::StatusCode(c) => status_retryable(*c),
        _ => true,
    }
}

fn status_retryable(code: u16) -> bool {
    code >= 500 || code == 429 || code == 408
}

impl<'a> Hub<'a> {
    pub(super) fn new(opts: &DownloadOptions, cancel: &'a AtomicBool) -> Result<Self> {
        let cache = Cache::new(match &opts.cache_dir {
            Some(d) => d.clone(),
            None => hub_cache()?,
        });
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("HF_ENDPOINT").ok())
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim()
            .trim_end_matches('/')
            .to_string();
        // `HF_TOKEN` first, as `huggingface_hub` does, then the token file of `huggingface-cli login`.
        let token = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .map(|t| t.trim().to_string())
            .find(|t| !t.is_empty())
            .or_else(|| Cache::from_env().token());
        let api = ApiBuilder::from_env()
            .with_endpoint(endpoint.clone())
            .with_cache_dir(cache.path().clone())
            .with_token(token.clone())
            .with_progress(false)
            .with_user_agent("qwenvl", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| anyhow!("cannot set up the hub client: {e}"))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .user_agent(format!("qwenvl/{}", env!("CARGO_PKG_VERSION")))
            // Bodies are stored as sent: no transparent decompression.
            .accept_encoding("identity")
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .into();
        Ok(Self {
            api,
            cache,
            endpoint,
            token,
            agent,
            retries: opts.retries,
            cancel,
        })
    }

    /// Runs `attempt` until it succeeds, fails for good, or fails `retries + 1` times in a row
    /// without progress. An attempt that moved bytes resets the count and is retried at once;
    /// others wait 0.5 s, 1 s, 2 s … (at most 10 s).
    fn with_retries<T>(
        &self,
        mut attempt: impl FnMut() -> (std::result::Result<T, Failure>, bool),
    ) -> Result<T> {
        let mut failures = 0usize;
        loop {
            let (result, progressed) = attempt();
            match result {
                Ok(v) => return Ok(v),
                Err(f) => {
                    if !f.retry || f.error.is::<Cancelled>() {
                        return Err(f.error);
                    }
                    failures = if progressed { 1 } else { failures + 1 };
                    if failures > self.retries {
                        if self.retries == 0 {
                            return Err(f.error);
                        }
                        return Err(f
                            .error
                            .context(format!("gave up after {failures} failed attempts")));
                    }
                    if !progressed {
                        let wait =
                            Duration::from_millis((500u64 << (failures - 1).min(5)).min(10_000));
                        let until = Instant::now() + wait;
                        while Instant::now() < until {
                            if self.cancel.load(Ordering::Relaxed) {
                                return Err(Cancelled.into());
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            }
        }
    }

    /// The repository listing at `revision` (its commit and files).
    pub(super) fn info(&self, repo: &str, revision: &str) -> Result<RepoInfo> {
        let api_repo = self.api.repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ));
        let url = format!(
            "{}/api/{}",
            self.endpoint,
            Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()).api_url()
        );
        self.with_retries(|| {
            let response = api_repo
                .info_request()
                .config()
                .http_status_as_error(false)
                .build()
                .call();
            let mut response = match response {
                Ok(r) => r,
                Err(e) => {
                    let retry = transport_retryable(&e);
                    let error = anyhow!("cannot reach {}: {e} (while listing {repo})", url);
                    return (Err(Failure { error, retry }), false);
                }
            };
            let code = response.status().as_u16();
            if code == 200 {
                let parsed = response.body_mut().read_json::<RepoInfo>().map_err(|e| {
                    Failure::fatal(anyhow!(
                        "{url}: not a Hugging Face hub answer ({e}); is HF_ENDPOINT={} a hub?",
                        self.endpoint
                    ))
                });
                return (parsed, false);
            }
            let error_code = response
                .headers()
                .get("x-error-code")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let error = match code {
                _ if error_code == "RevisionNotFound" => {
                    anyhow!("{repo} has no revision {revision:?} (HTTP {code} for {url})")
                }
                401 | 403 | 404 => anyhow!(
                    "{code} for {repo}: no such model at {} (or it is private or gated: set \
                     HF_TOKEN to a token that may read it) [{url}]",
                    self.endpoint
                ),
                _ => anyhow!("HTTP {code} for {url} (while listing {repo})"),
            };
            (
                Err(Failure {
                    error,
                    retry: status_retryable(code),
                }),
                false,
            )
        })
    }

    /// Size, etag and commit of one file (following the hub's redirect to its CDN).
    pub(super) fn metadata(&self, url: &str, name: &str) -> Result<hf_hub::api::sync::Metadata> {
        self.with_retries(|| {
            let r = self.api.metadata(url).map_err(|e| match e {
                ApiError::RequestError(e) => {
                    let retry = transport_retryable(&e);
                    let error = match *e {
                        ureq::Error::StatusCode(404) => {
                            anyhow!("{name}: 404 not found at {url}")
                        }
                        ureq::Error::StatusCode(c @ (401 | 403)) => anyhow!(
                            "{name}: HTTP {c} for {url} (a private or gated model: set HF_TOKEN)"
                        ),
                        ureq::Error::StatusCode(c) => anyhow!("{name}: HTTP {c} for {url}"),
                        e => anyhow!("{name}: cannot reach {url}: {e}"),
                    };
                    Failure { error, retry }
                }
                ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => Failure::fatal(anyhow!(
                    "{name}: the answer of {url} lacks a valid {h} header (is HF_ENDPOINT={} a \
                         Hugging Face hub?)",
                    self.endpoint
                )),
                e => Failure::fatal(anyhow!("{name}: {url}: {e}")),
            });
            (r, false)
        })
    }

    /// Transfers one file body into `blob` through `<blob>.incomplete`, resuming what is there.
    /// `on_bytes` gets the file's byte count after every chunk and may stop the transfer.
    pub(super) fn fetch_blob(
        &self,
        url: &str,
        name: &str,
        blob: &Path,
        etag: &str,
        size: u64,
        on_bytes: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<()> {
        let part = incomplete_path(blob);
        let mut lock_path = blob.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let lock = File::create(&lock_path)
            .with_context(|| format!("{name}: cannot create {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            bail!(
                "{name}: another download of this file is running (it holds {})",
                lock_path.display()
            );
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&part)
            .with_context(|| format!("{name}: cannot write {}", part.display()))?;
        let mut have = file.metadata()?.len();
        if have > size {
            // Longer than the file: not a prefix of it.
            file.set_len(0)?;
            have = 0;
        }
        // An LFS file's etag is its SHA-256: hash what is there, then every new byte.
        let expect_sha = (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| etag.to_ascii_lowercase());
        let mut hasher = sha2::Sha256::new();
        if expect_sha.is_some() && have > 0 {
            let mut prefix = File::open(&part)?.take(have);
            std::io::copy(&mut prefix, &mut hasher)
                .with_context(|| format!("{name}: cannot read {}", part.display()))?;
        }

        self.with_retries(|| {
            let start = have;
            if start == size {
                return (Ok(()), false);
            }
            let r = self.fetch_range(
                url,
                name,
                &part,
                &mut file,
                &mut hasher,
                &mut have,
                size,
                on_bytes,
            );
            (r, have > start)
        })
        .map_err(|e| {
            if e.is::<Cancelled>() {
                e
            } else {
                e.context(format!(
                    "{name}: download failed after {have} of {size} bytes; the partial file {} is \
                     kept and the next run resumes it",
                    part.display()
                ))
            }
        })?;
        drop(file);

        if let Some(expected) = expect_sha {
            let got: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if got != expected {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "{name}: the downloaded bytes have SHA-256 {got}, not {expected} as {url} \
                     announced; the partial file was deleted, run again"
                );
            }
        }
        std::fs::rename(&part, blob).with_context(|| {
            format!(
                "{name}: cannot move {} to {}",
                part.display(),
                blob.display()
            )
        })?;
        drop(lock);
        Ok(())
    }

    /// One request for the bytes from `*have` on, appended to `file`.
    #[allow(clippy::too_many_arguments)]
    fn fetch_range(
        &self,
        url: &str,
        name: &str,
        part: &Path,
        file: &mut File,
        hasher: &mut sha2::Sha256,
        have: &mut u64,
        size: u64,
        on_bytes: &mut dyn FnMut(u64) -> Result<()>,
    ) -> std::result::Result<(), Failure> {
        let start = *have;
        let mut request = self.agent.get(url);
        if start > 0 {
            request = request.header("Range", format!("bytes={start}-"));
        }
        if let Some(t) = &self.token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        let response = request.call().map_err(|e| Failure {
            retry: transport_retryable(&e),
            error: anyhow!("{name}: cannot reach {url}: {e}"),
        })?;
        let code = response.status().as_u16();
        match code {
            206 => {
                let range = response
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !range.starts_with(&format!("bytes {start}-")) {
                    return Err(Failure::fatal(anyhow!(
                        "{name}: asked {url} for bytes {start}- and got the range {range:?}"
                    )));
                }
            }
            200 if start > 0 => {
                // The server ignored the range: start over rather than append a second copy.
                file.set_len(0).map_err(|e| io_failure(name, part, e))?;
                *hasher = sha2::Sha256::new();
                *have = 0;
            }
            200 => {}
            _ => {
                let hint = match code {
                    404 => " (not found)",
                    401 | 403 => " (a private or gated model: set HF_TOKEN)",
                    _ => "",
                };
                return Err(Failure {
                    error: anyhow!("{name}: HTTP {code} for {url}{hint}"),
                    retry: status_retryable(code),
                });
            }
        }
        let mut body = response.into_body().into_reader();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Failure::transient(anyhow!(
                        "{name}: the connection to {url} broke after {} of {size} bytes: {e}",
                        *have
                    )))
                }
            };
            if *have + n as u64 > size {
                let _ = file.set_len(0);
                return Err(Failure::fatal(anyhow!(
                    "{name}: {url} sent more than the {size} bytes it announced"
                )));
            }
            file.write_all(&buf[..n])
                .map_err(|e| io_failure(name, part, e))?;
            hasher.update(&buf[..n]);
            *have += n as u64;
            on_bytes(*have).map_err(Failure::fatal)?;
        }
        file.flush().map_err(|e| io_failure(name, part, e))?;
        if *have < size {
            return Err(Failure::transient(anyhow!(
                "{name}: the connection to {url} closed after {} of {size} bytes",
                *have
            )));
        }
        Ok(())
    }
}

fn io_failure(name: &str, part: &Path, e: std::io::Error) -> Failure {
    Failure::fatal(anyhow!("{name}: cannot write {}: {e}", part.display()))
}

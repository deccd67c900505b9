//! `qwenvl download`: fetches a model from the Hugging Face hub into the standard hub cache
//! (`models--org--name/{blobs,snapshots,refs}`, the layout `huggingface-cli` and the desktop app's
//! model discovery use), resumably.
//!
//! The hub client `hf-hub` answers the repository listing, the file URLs, each file's metadata
//! (size, etag, commit; redirects to the CDN) and the cache layout, and honours `HF_ENDPOINT`,
//! `HF_HOME` and the token file. The file bodies are transferred here rather than by `hf-hub`,
//! which cannot be cancelled, appends a whole body when a server ignores `Range`, and never checks
//! what it wrote: bodies go to `blobs/<etag>.incomplete` (the name `huggingface_hub` uses, so either
//! tool resumes the other's partial files), resume with `Range: bytes=N-`, are checked against the
//! announced size and, for LFS files (whose etag is their SHA-256), against their hash, and only
//! then become the blob the snapshot links to. The HTTP side (listings, metadata, resumable
//! bodies, retries) is `hub`; this file plans the files and lays out the cache.

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};

mod hub;
use hub::Hub;

/// The model the app runs.
pub const DEFAULT_REPO: &str = "Qwen/Qwen-VL-Chat";
/// Retries of a failed request before giving up (a retry resumes where the last attempt stopped).
pub const DEFAULT_RETRIES: usize = 5;
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The checkpoints qwenvl runs, by short name (`qwenvl download qwen-7b-chat`): Qwen-VL and the
/// text-only Qwen (v1) chat models of the same architecture.
pub const KNOWN_MODELS: [(&str, &str); 13] = [
    ("qwen-vl-chat", "Qwen/Qwen-VL-Chat"),
    ("qwen-vl", "Qwen/Qwen-VL"),
    ("qwen-1.8b-chat", "Qwen/Qwen-1_8B-Chat"),
    ("qwen-7b-chat", "Qwen/Qwen-7B-Chat"),
    ("qwen-14b-chat", "Qwen/Qwen-14B-Chat"),
    ("qwen-72b-chat", "Qwen/Qwen-72B-Chat"),
    ("qwen-7b", "Qwen/Qwen-7B"),
    ("qwen-14b", "Qwen/Qwen-14B"),
    ("qwen-vl-chat-int4", "Qwen/Qwen-VL-Chat-Int4"),
    ("qwen-1.8b-chat-int4", "Qwen/Qwen-1_8B-Chat-Int4"),
    ("qwen-7b-chat-int4", "Qwen/Qwen-7B-Chat-Int4"),
    ("qwen-14b-chat-int4", "Qwen/Qwen-14B-Chat-Int4"),
    ("qwen-72b-chat-int4", "Qwen/Qwen-72B-Chat-Int4"),
];

/// The hub repository of a short name of [`KNOWN_MODELS`], or `repo` itself when it is an
/// `org/name`; anything else is refused with the known names.
pub fn resolve_repo(repo: &str) -> Result<String> {
    if repo.contains('/') {
        return Ok(repo.to_string());
    }
    let key = repo.to_ascii_lowercase();
    match KNOWN_MODELS.iter().find(|(name, _)| *name == key) {
        Some((_, id)) => Ok(id.to_string()),
        None => bail!(
            "{repo:?} is neither a hub repository (org/name) nor a known model: {}",
            KNOWN_MODELS
                .iter()
                .map(|(n, id)| format!("{n} ({id})"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `qwenvl download [REPO]`.
#[derive(clap::Args, Debug, Clone)]
pub struct DownloadArgs {
    /// Model repository on the hub (`org/name`), or a short name: qwen-vl-chat, qwen-vl,
    /// qwen-1.8b-chat, qwen-7b-chat, qwen-14b-chat, qwen-72b-chat, qwen-7b, qwen-14b,
    /// qwen-vl-chat-int4, qwen-1.8b-chat-int4, qwen-7b-chat-int4, qwen-14b-chat-int4,
    /// qwen-72b-chat-int4.
    #[arg(default_value = DEFAULT_REPO)]
    pub repo: String,
    /// Branch, tag or commit to download.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Every file of the repository, not only what the model needs (JSON configs, the tokenizer,
    /// the weights).
    #[arg(long)]
    pub all: bool,
    /// Retries of a failed request; each resumes where the previous attempt stopped.
    #[arg(long, default_value_t = DEFAULT_RETRIES)]
    pub retries: usize,
}

/// What to download.
#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// `org/name` on the hub.
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// Every file of the repository instead of [`select_files`]'s choice.
    pub all_files: bool,
    /// Retries of a failed request.
    pub retries: usize,
    /// Hub URL; `None`: `$HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Hub cache folder (the one holding `models--org--name`); `None`: [`hub_cache`].
    pub cache_dir: Option<PathBuf>,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        Self {
            repo: DEFAULT_REPO.to_string(),
            revision: "main".to_string(),
            all_files: false,
            retries: DEFAULT_RETRIES,
            endpoint: None,
            cache_dir: None,
        }
    }
}

/// Which phase a [`DownloadProgress`] report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadStage {
    /// Asking the hub for each file's size (`bytes_total` grows while this lasts).
    Checking,
    /// Transferring file bodies (`bytes_total` is final).
    Downloading,
    /// Every file is in the cache.
    Done,
}

/// One progress report. Byte counts cover all the selected files; bytes already in the cache (whole
/// files and resumed partial ones) count as done from the start.
#[derive(Debug, Clone)]
pub struct DownloadProgress {
    pub stage: DownloadStage,
    /// The current file, relative to the repository.
    pub file: String,
    /// 0-based index of `file` among the selected files.
    pub file_index: usize,
    pub file_count: usize,
    pub file_bytes_done: u64,
    pub file_bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// The error a cancelled download ends with (`err.is::<Cancelled>()`); partial files stay for the
/// next attempt to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("download cancelled (run it again to resume)")
    }
}

impl std::error::Error for Cancelled {}

/// The files of a repository listing the model needs: top-level `*.json` (configs, tokenizer
/// config, weight index), `*.tiktoken` and the weights. When the repository has safetensors
/// weights, the pickled `*.bin` ones (and their index) are left out. `all` keeps every file.
pub fn select_files(names: &[String], all: bool) -> Vec<String> {
    if all {
        return names.to_vec();
    }
    let has_safetensors = names
        .iter()
        .any(|n| !n.contains('/') && n.ends_with(".safetensors"));
    names
        .iter()
        .filter(|n| !n.contains('/'))
        .filter(|n| {
            if n.ends_with(".bin") || n.as_str() == "pytorch_model.bin.index.json" {
                !has_safetensors
            } else {
                n.ends_with(".json") || n.ends_with(".tiktoken") || n.ends_with(".safetensors")
            }
        })
        .cloned()
        .collect()
}

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`
/// (the same folder the desktop app looks for models in).
pub fn hub_cache() -> Result<PathBuf> {
    crate::model_dir::hf_hub_cache()
        .context("no home folder to put the Hugging Face cache in (set HF_HOME)")
}

/// The snapshot folder a previous download of `repo` at `revision` left in the hub cache folder
/// `cache_dir` (the revision's commit from `refs/`, or `revision` itself when it is a commit),
/// without asking the hub. It may lack files that a download of another selection would add.
pub fn cached_snapshot_in(cache_dir: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    check_repo_id(repo).ok()?;
    check_component(revision).ok()?;
    let dir = cache_dir.join(Repo::new(repo.to_string(), RepoType::Model).folder_name());
    let commit = std::fs::read_to_string(dir.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    check_component(&commit).ok()?;
    let snap = dir.join("snapshots").join(commit);
    snap.join("config.json").is_file().then_some(snap)
}

/// Downloads `opts.repo` at `opts.revision` (the model's files, or every file with `all_files`)
/// into the hub cache and returns the snapshot folder, a model folder `Engine::load` accepts.
/// Files already in the cache are not transferred again; partial ones are resumed. `progress` is called from this
/// thread (at most every 50 ms while bytes flow); setting `cancel` stops the download soon after
/// with a [`Cancelled`] error.
pub fn download(
    opts: &DownloadOptions,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf> {
    check_repo_id(&opts.repo)?;
    if opts.revision.is_empty() {
        bail!("the revision must not be empty");
    }
    let hub = Hub::new(opts, cancel)?;

    let info = hub.info(&opts.repo, &opts.revision)?;
    check_component(&info.sha)
        .with_context(|| format!("{}: the hub answered an unusable commit id", opts.repo))?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    for n in &names {
        check_file_name(n)
            .with_context(|| format!("{}: refusing a file of its listing", opts.repo))?;
    }
    let files = select_files(&names, opts.all_files);
    if files.is_empty() {
        bail!(
            "{}@{}: the repository has none of the model's files (*.json, *.tiktoken, *.safetensors, \
             *.bin); --all takes every file",
            opts.repo,
            opts.revision
        );
    }

    // Files are fetched at the listing's commit, so a push during the download cannot mix versions.
    let pinned = hub.api.repo(Repo::with_revision(
        opts.repo.clone(),
        RepoType::Model,
        info.sha.clone(),
    ));
    let repo_dir = hub
        .cache
        .path()
        .join(Repo::new(opts.repo.clone(), RepoType::Model).folder_name());
    let snapshot = repo_dir.join("snapshots").join(&info.sha);
    let blobs = repo_dir.join("blobs");

    // Sizes first, so the overall total is known before any body moves.
    let count = files.len();
    let mut plan: Vec<Planned> = Vec::with_capacity(count);
    let mut bytes_total = 0u64;
    let mut bytes_done = 0u64;
    for (i, name) in files.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Cancelled.into());
        }
        let pointer = snapshot.join(name);
        let item = match std::fs::metadata(&pointer) {
            // A snapshot entry is only made once its blob is complete.
            Ok(m) if m.is_file() => Planned {
                name: name.clone(),
                url: pinned.url(name),
                pointer,
                blob: None,
                size: m.len(),
                have: m.len(),
            },
            _ => {
                let url = pinned.url(name);
                let meta = hub.metadata(&url, name)?;
                // A weak etag (`W/"…"`) names the same blob as its strong form.
                let etag = meta.etag().trim_start_matches("W/").to_string();
                check_component(&etag).with_context(|| {
                    format!("{name}: the server at {url} answered an unusable etag")
                })?;
                let blob = blobs.join(&etag);
                let size = meta.size() as u64;
                let have = match std::fs::metadata(&blob) {
                    Ok(m) if m.len() == size => size,
                    _ => std::fs::metadata(incomplete_path(&blob))
                        .map(|m| m.len())
                        .ok()
                        .filter(|&n| n <= size)
                        .unwrap_or(0),
                };
                Planned {
                    name: name.clone(),
                    url,
                    pointer,
                    blob: Some((blob, etag)),
                    size,
                    have,
                }
            }
        };
        bytes_total += item.size;
        bytes_done += item.have;
        progress(&DownloadProgress {
            stage: DownloadStage::Checking,
            file: name.clone(),
            file_index: i,
            file_count: count,
            file_bytes_done: item.have,
            file_bytes_total: item.size,
            bytes_done,
            bytes_total,
        });
        plan.push(item);
    }

    std::fs::create_dir_all(&blobs)
        .with_context(|| format!("cannot create the cache folder {}", blobs.display()))?;
    for (i, item) in plan.iter().enumerate() {
        let Some((blob, etag)) = &item.blob else {
            continue;
        };
        let mut report = |file_done: u64, done: u64| {
            progress(&DownloadProgress {
                stage: DownloadStage::Downloading,
                file: item.name.clone(),
                file_index: i,
                file_count: count,
                file_bytes_done: file_done,
                file_bytes_total: item.size,
                bytes_done: done,
                bytes_total,
            })
        };
        let complete_before = std::fs::metadata(blob).is_ok_and(|m| m.len() == item.size);
        if !complete_before {
            let base = bytes_done - item.have;
            report(item.have, bytes_done);
            let mut last = Instant::now();
            let mut on_bytes = |file_done: u64| -> Result<()> {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Cancelled.into());
                }
                if last.elapsed() >= Duration::from_millis(50) || file_done == item.size {
                    last = Instant::now();
                    report(file_done, base + file_done);
                }
                Ok(())
            };
            hub.fetch_blob(&item.url, &item.name, blob, etag, item.size, &mut on_bytes)?;
            bytes_done = base + item.size;
        }
        link(blob, &item.pointer).with_context(|| {
            format!("{}: cannot link it into {}", item.name, snapshot.display())
        })?;
    }

    // A branch or tag name points at the commit, as `huggingface_hub` records it.
    if opts.revision != info.sha {
        let r = Repo::with_revision(opts.repo.clone(), RepoType::Model, opts.revision.clone());
        hub.cache.repo(r).create_ref(&info.sha).with_context(|| {
            format!(
                "cannot write the ref {} in {}",
                opts.revision,
                repo_dir.display()
            )
        })?;
    }
    if let Some(last) = plan.last() {
        progress(&DownloadProgress {
            stage: DownloadStage::Done,
            file: last.name.clone(),
            file_index: count - 1,
            file_count: count,
            file_bytes_done: last.size,
            file_bytes_total: last.size,
            bytes_done: bytes_total,
            bytes_total,
        });
    }
    Ok(snapshot)
}

/// A selected file and what the cache already has of it.
struct Planned {
    name: String,
    url: String,
    pointer: PathBuf,
    /// Blob path and etag; `None` when the snapshot already holds the file.
    blob: Option<(PathBuf, String)>,
    size: u64,
    /// Bytes already in the cache (the whole file, or a partial `.incomplete`).
    have: u64,
}

fn incomplete_path(blob: &Path) -> PathBuf {
    let mut s = blob.as_os_str().to_owned();
    s.push(".incomplete");
    PathBuf::from(s)
}

/// `org/name` or `name`, of the characters the hub allows.
fn check_repo_id(repo: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        bail!("{repo:?} is not a Hugging Face repository id (expected org/name)");
    }
    Ok(())
}

/// A single path component (commit ids and etags become file names).
fn check_component(s: &str) -> Result<()> {
    if s.is_empty()
        || s == "."
        || s == ".."
        || s.contains(['/', '\\', '\0'])
        || s.ends_with(".incomplete")
        || s.ends_with(".lock")
    {
        bail!("{s:?} cannot be a file name");
    }
    Ok(())
}

/// A relative path inside the snapshot: no `..`, no root, no empty parts.
fn check_file_name(name: &str) -> Result<()> {
    let p = Path::new(name);
    let ok = !name.is_empty()
        && !name.contains(['\\', '\0'])
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !name.split('/').any(str::is_empty);
    if !ok {
        bail!("{name:?} is not a safe file name");
    }
    Ok(())
}

/// The snapshot entry: a relative symlink to the blob (a copy where links are not allowed).
fn link(blob: &Path, pointer: &Path) -> std::io::Result<()> {
    if std::fs::metadata(pointer).is_ok() {
        return Ok(());
    }
    let parent = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    // A dangling link from an interrupted run would make `symlink` fail.
    let _ = std::fs::remove_file(pointer);
    #[cfg(unix)]
    {
        // snapshots/<commit>/<a/b/file> → ../../(..)blobs/<etag>
        let depth = pointer
            .strip_prefix(
                parent
                    .ancestors()
                    .find(|a| a.ends_with("snapshots"))
                    .unwrap_or(parent),
            )
            .map(|r| r.components().count())
            .unwrap_or(2);
        let mut rel = PathBuf::new();
        for _ in 0..depth {
            rel.push("..");
        }
        rel.push("blobs");
        rel.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(rel, pointer)
    }
    #[cfg(not(unix))]
    {
        std::fs::hard_link(blob, pointer).or_else(|_| std::fs::copy(blob, pointer).map(|_| ()))
    }
}

/// `qwenvl download`: a progress bar on stderr (plain lines when stderr is not a terminal), the
/// snapshot folder on stdout.
pub fn run(args: DownloadArgs) -> Result<()> {
    use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

    let opts = DownloadOptions {
        repo: resolve_repo(&args.repo)?,
        revision: args.revision,
        all_files: args.all,
        retries: args.retries,
        ..DownloadOptions::default()
    };
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    bar.set_message(format!("listing {}@{}", opts.repo, opts.revision));
    bar.enable_steady_tick(Duration::from_millis(120));
    let style = ProgressStyle::with_template(
        "{msg}\n[{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("valid template")
    .progress_chars("=> ");
    let mut started = false;
    let mut current = usize::MAX;
    let cancel = AtomicBool::new(false);
    let t0 = Instant::now();
    let mut summary = (0usize, 0u64, 0u64);
    let result = download(
        &opts,
        &mut |p| {
            summary = (p.file_count, p.bytes_total, p.bytes_done);
            match p.stage {
                DownloadStage::Checking => bar.set_message(format!(
                    "checking {} ({}/{})",
                    p.file,
                    p.file_index + 1,
                    p.file_count
                )),
                DownloadStage::Downloading | DownloadStage::Done => {
                    if !started {
                        started = true;
                        bar.set_style(style.clone());
                        bar.set_length(p.bytes_total);
                        bar.set_position(p.bytes_done);
                        // Bytes already there are not part of the rate.
                        bar.reset_eta();
                    }
                    if current != p.file_index && p.stage == DownloadStage::Downloading {
                        current = p.file_index;
                        bar.set_message(format!(
                            "{} ({}/{}, {})",
                            p.file,
                            p.file_index + 1,
                            p.file_count,
                            HumanBytes(p.file_bytes_total)
                        ));
                        if !tty {
                            eprintln!(
                                "downloading {} ({}/{}, {}{})",
                                p.file,
                                p.file_index + 1,
                                p.file_count,
                                HumanBytes(p.file_bytes_total),
                                if p.file_bytes_done > 0 {
                                    format!(", resuming at {}", HumanBytes(p.file_bytes_done))
                                } else {
                                    String::new()
                                }
                            );
                        }
                    }
                    bar.set_position(p.bytes_done);
                }
            }
        },
        &cancel,
    );
    bar.finish_and_clear();
    let snapshot = result?;
    let (files, total, _) = summary;
    eprintln!(
        "{}@{}: {files} files, {} in {:.1} s",
        opts.repo,
        opts.revision,
        HumanBytes(total),
        t0.elapsed().as_secs_f64()
    );
    println!("{}", snapshot.display());
    Ok(())
}

#[cfg(test)]
mod known_model_tests {
    use super::*;

    #[test]
    fn short_names_resolve_to_hub_repositories() {
        assert_eq!(resolve_repo("qwen-7b-chat").unwrap(), "Qwen/Qwen-7B-Chat");
        assert_eq!(
            resolve_repo("qwen-7b-chat-int4").unwrap(),
            "Qwen/Qwen-7B-Chat-Int4"
        );
        // The help lists every short name (it is written by hand).
        use clap::Args;
        let cmd = DownloadArgs::augment_args(clap::Command::new("download"));
        let help = cmd
            .get_arguments()
            .find(|a| a.get_id() == "repo")
            .and_then(|a| a.get_help())
            .unwrap()
            .to_string();
        let listed: Vec<&str> = help
            .split([',', ' ', ':', '\n'])
            .map(|w| w.trim_end_matches('.'))
            .filter(|w| w.starts_with("qwen"))
            .collect();
        for (name, _) in KNOWN_MODELS {
            assert!(
                listed.contains(&name),
                "{name} is missing from the help: {help}"
            );
        }
        assert_eq!(resolve_repo("Qwen-14B-Chat").unwrap(), "Qwen/Qwen-14B-Chat");
        assert_eq!(resolve_repo("someone/model").unwrap(), "someone/model");
        let e = resolve_repo("llama").unwrap_err().to_string();
        assert!(e.contains("qwen-vl-chat (Qwen/Qwen-VL-Chat)"), "{e}");
    }
}

//! `qwenvl ocr`: one question (by default "read the text") over many images, one JSON line per
//! image in input order, resumable. The model is loaded once; every image is answered greedily in
//! a fresh single-turn conversation, `--parallel` of them batched together.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lm::prompt::{Conversation, Item, DEFAULT_SYSTEM};
use lm::quant::WeightType;
use serde_json::{json, Value};

use crate::engine::{BatchLimits, Batcher, Reply, ReplySink, Request};

/// The question asked when `--prompt` is not given.
pub const DEFAULT_PROMPT: &str = crate::session::OCR_PROMPT;

/// File extensions taken from a folder given among the inputs.
const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "gif", "webp", "bmp", "tif", "tiff"];

/// `qwenvl ocr FILES… --model DIR`.
#[derive(clap::Args, Debug, Clone)]
pub struct OcrArgs {
    /// Images; a folder stands for its image files (sorted by name, not recursive).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Model folder (config.json, generation_config.json, qwen.tiktoken, weights).
    #[arg(long)]
    pub model: PathBuf,
    /// The question asked about every image.
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// JSON-lines file to append the results to (default: stdout). Images whose successful result
    /// for the same prompt is already in it are skipped; failed ones are tried again.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Weight type in memory: q4k, q4_0, q8_0 (quantized while loading), bf16, f16 or f32.
    /// Default: f32 for small checkpoints; for the full model q8_0 when it fits with room to
    /// spare, else q4k.
    #[arg(long, value_parser = crate::parse_weight_type)]
    pub quant: Option<WeightType>,
    /// Most new tokens per image (default: the checkpoint's max_new_tokens).
    #[arg(long)]
    pub max_new_tokens: Option<u64>,
    /// cpu, cuda, cuda:N, metal, metal:N, or auto (a GPU when this build supports one and it is
    /// there).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images answered together (continuous batching: one pass over the weights per step
    /// serves all of them; each needs its own KV cache). Results stay in input order.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
}

/// The inputs in order, folders replaced by their image files sorted by name. Paths that do not
/// exist stay, so they get an error line.
pub fn expand_inputs(files: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for f in files {
        if !f.is_dir() {
            out.push(f.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(f)
            .with_context(|| format!("cannot list the folder {}", f.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// `(path, prompt)` of every successful line of an earlier results file. Lines that do not parse
/// (a line cut by a crash) and error lines are ignored.
pub fn completed(results: &Path) -> Result<HashSet<(String, String)>> {
    let mut done = HashSet::new();
    let file = match File::open(results) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", results.display())),
    };
    for line in BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("cannot read {}", results.display()))?;
        let Ok(v) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        if v.get("error").is_some() || v.get("text").is_none() {
            continue;
        }
        if let (Some(p), Some(q)) = (v["path"].as_str(), v["prompt"].as_str()) {
            done.insert((p.to_string(), q.to_string()));
        }
    }
    Ok(done)
}

/// Opens the results file for appending; a last line without its newline (cut by a crash) gets
/// one, so the next line starts clean.
fn open_results(path: &Path) -> Result<File> {
    if path.is_dir() {
        bail!("--out {}: is a folder, not a file", path.display());
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .with_context(|| format!("--out {}: cannot open it for writing", path.display()))?;
    let len = f.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(f)
}

/// The single-turn conversation that asks `prompt` about the image at `abs`.
fn conversation(prompt: &str, abs: &Path) -> Result<Conversation> {
    let Some(image) = abs.to_str() else {
        bail!("{}: the path is not valid UTF-8", abs.display());
    };
    Ok(Conversation {
        system: DEFAULT_SYSTEM.to_string(),
        history: Vec::new(),
        query: vec![
            Item::Image {
                image: image.to_string(),
            },
            Item::Text {
                text: prompt.to_string(),
            },
        ],
    })
}

/// One image's result line.
fn record(prompt: &str, given: &Path, abs: &Path, reply: Result<Reply>, ms: f64) -> Value {
    let mut record = json!({
        "file": given.to_string_lossy(),
        "path": abs.to_string_lossy(),
        "prompt": prompt,
    });
    let obj = record.as_object_mut().expect("an object");
    match reply {
        Ok(reply) => {
            let picture = reply.pictures.last();
            let boxes: Vec<Value> = crate::session::reply_boxes(&reply, &reply.text)
                .into_iter()
                .map(|b| json!({"ref": b.label, "box": b.grid, "box_px": b.px}))
                .collect();
            obj.extend([
                ("text".to_string(), json!(reply.text)),
                ("boxes".to_string(), json!(boxes)),
                ("width".to_string(), json!(picture.map(|p| p.width))),
                ("height".to_string(), json!(picture.map(|p| p.height))),
                ("tokens".to_string(), json!(reply.generation.ids.len())),
                (
                    "finish".to_string(),
                    json!(format!("{:?}", reply.generation.finish)),
                ),
            ]);
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let path = abs.to_string_lossy();
            let msg = if msg.contains(path.as_ref()) {
                msg
            } else {
                format!("{path}: {msg}")
            };
            obj.insert("error".into(), Value::String(msg));
        }
    }
    obj.insert("ms".into(), json!(ms));
    record
}

/// Puts one image's result line in its place among the results.
struct OcrSink<'a> {
    index: usize,
    prompt: &'a str,
    given: &'a Path,
    abs: &'a Path,
    started: Instant,
    results: &'a RefCell<Vec<Option<Value>>>,
}

impl ReplySink for OcrSink<'_> {
    fn cancelled(&self) -> bool {
        false
    }
    fn text(&mut self, _: &str) {}
    fn done(&mut self, reply: Result<Reply>) {
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.results.borrow_mut()[self.index] =
            Some(record(self.prompt, self.given, self.abs, reply, ms));
    }
}

/// `qwenvl ocr`.
pub fn run(args: OcrArgs) -> Result<()> {
    use indicatif::{ProgressBar, ProgressStyle};

    // Everything that can be refused is refused before the model loads.
    let device = crate::session::parse_device(&args.device)?;
    // A text-only Qwen reads no pictures: say so before anything is read or loaded. (A folder
    // whose config cannot be read is reported by the load, with its own message.)
    if let Ok(cfg) = lm::QwenConfig::from_file(&args.model.join("config.json")) {
        anyhow::ensure!(
            cfg.has_vision(),
            "ocr: {} is a text-only Qwen model (its config.json has no `visual` section): it \
             cannot read pictures; use a Qwen-VL checkpoint such as Qwen/Qwen-VL-Chat",
            args.model.display()
        );
    }
    let inputs = expand_inputs(&args.files)?;
    let (mut out, done): (Box<dyn Write>, HashSet<(String, String)>) = match &args.out {
        Some(p) => {
            let f = open_results(p)?;
            (Box::new(f), completed(p)?)
        }
        None => (Box::new(std::io::stdout()), HashSet::new()),
    };
    let mut todo = Vec::new();
    let mut skipped = 0usize;
    let mut seen = HashSet::new();
    for given in inputs {
        let abs = std::path::absolute(&given)
            .with_context(|| format!("cannot resolve the path {}", given.display()))?;
        // An image named twice (also through its folder) is answered once.
        if !seen.insert(abs.clone()) {
            continue;
        }
        if done.contains(&(abs.to_string_lossy().into_owned(), args.prompt.clone())) {
            skipped += 1;
        } else {
            todo.push((given, abs));
        }
    }
    let out_name = args
        .out
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "stdout".into());
    if todo.is_empty() {
        eprintln!("ocr: nothing to do, all {skipped} image(s) already answered in {out_name}");
        return Ok(());
    }

    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(todo.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg}\n[{elapsed_precise}] [{wide_bar}] {pos}/{len} images, ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let engine = bar.suspend(|| crate::cli_load::load(&args.model, args.quant, &device))?;
    let opts = crate::session::GenerateRequest {
        greedy: true,
        max_new_tokens: args.max_new_tokens,
        ..Default::default()
    }
    .resolve(&engine.checkpoint.generation, 0)
    .map_err(|e| anyhow::anyhow!(e.message_for_flags()))?;
    bar.reset_eta();

    // Up to --parallel images are answered together (their pictures encoded in one batch);
    // lines are written in input order as soon as every earlier one is written.
    let results: RefCell<Vec<Option<Value>>> = RefCell::new(vec![None; todo.len()]);
    let mut batch = Batcher::new(
        &engine,
        BatchLimits {
            parallel: args.parallel.max(1),
            kv_budget: usize::MAX,
            prefill_chunk: usize::MAX,
            vision_blocks: usize::MAX,
        },
    );
    let (mut admitted, mut written) = (0, 0);
    let mut failed = Vec::new();
    while written < todo.len() {
        let mut new = Vec::new();
        while new.len() < batch.room() && admitted < todo.len() {
            let (given, abs) = &todo[admitted];
            let started = Instant::now();
            match conversation(&args.prompt, abs) {
                Ok(conversation) => new.push(Request {
                    conversation,
                    reply_prefix: String::new(),
                    base_dir: PathBuf::from("/"),
                    options: opts.clone(),
                    sink: Box::new(OcrSink {
                        index: admitted,
                        prompt: &args.prompt,
                        given,
                        abs,
                        started,
                        results: &results,
                    }),
                }),
                Err(e) => {
                    results.borrow_mut()[admitted] =
                        Some(record(&args.prompt, given, abs, Err(e), 0.0))
                }
            }
            admitted += 1;
        }
        if !new.is_empty() {
            if let Some((given, _)) = todo.get(written) {
                bar.set_message(given.display().to_string());
            }
            batch.admit(new);
        }
        if !batch.is_idle() {
            batch.step();
        }
        while let Some(record) = results.borrow_mut().get_mut(written).and_then(Option::take) {
            if let Some(e) = record.get("error").and_then(Value::as_str) {
                failed.push(e.to_string());
            }
            let line = serde_json::to_string(&record)? + "\n";
            // Written and flushed at once: a crash loses at most the images being answered.
            bar.suspend(|| -> Result<()> {
                out.write_all(line.as_bytes())
                    .and_then(|()| out.flush())
                    .with_context(|| format!("cannot write the result to {out_name}"))
            })?;
            bar.inc(1);
            written += 1;
            if let Some((given, _)) = todo.get(written) {
                bar.set_message(given.display().to_string());
            }
        }
    }
    bar.finish_and_clear();

    let ok = todo.len() - failed.len();
    let skipped_note = if args.out.is_some() {
        format!(", {skipped} skipped (already in {out_name})")
    } else {
        String::new()
    };
    eprintln!("ocr: {ok} answered, {} failed{skipped_note}", failed.len());
    for e in &failed {
        eprintln!("  failed: {e}");
    }
    if !failed.is_empty() {
        let retry = if args.out.is_some() {
            "; a run with the same --out tries them again"
        } else {
            ""
        };
        bail!(
            "{} of {} image(s) failed (their lines in {out_name} carry the error{retry})",
            failed.len(),
            todo.len()
        );
    }
    Ok(())
}

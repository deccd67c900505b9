//! `qwenvl`: run Qwen-VL-Chat locally. `qwenvl run` answers a conversation file from the command
//! line; the desktop app comes with no arguments.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand, ValueEnum};
use lm::generate::GenerateOptions;
use lm::prompt::Conversation;

use lm::quant::WeightType;
use qwenvl::engine::{Engine, Reply};
use qwenvl::openai;
use qwenvl::session::text::TextFilter;
use qwenvl::session::{parse_device, GenerateRequest};
use qwenvl::{bench, gui, parse_weight_type};

#[derive(Parser)]
#[command(
    name = "qwenvl",
    version,
    about = "Run Qwen-VL-Chat locally",
    long_about = "Run Qwen-VL-Chat locally. Without a command, opens the desktop app; pictures \
                  named on the command line are attached to its first message.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Pictures to attach in the desktop app (what a file manager's "Open with" passes).
    #[arg(value_name = "PICTURE")]
    pictures: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one conversation file (the neutral JSON format, or OpenAI chat messages with
    /// tools) and print the reply.
    Run(RunArgs),
    /// Measure load time, memory, vision encode, prefill and decode speed against this machine's
    /// bandwidth and matmul throughput.
    Bench(BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/models`).
    Serve(qwenvl::serve::ServeArgs),
    /// Developer tools.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Download a model from the Hugging Face hub into its cache (resumable) and print the folder.
    Download(qwenvl::download::DownloadArgs),
    /// Read the text of many images (or ask them all one question): one JSON line per image,
    /// resumable.
    Ocr(qwenvl::ocr::OcrArgs),
    /// The quantized-model cache: `path` prints its folder, `clear` deletes it.
    Cache {
        #[arg(value_parser = ["path", "clear"])]
        action: String,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Write a random checkpoint in the real Hugging Face layout (bf16 shards + index), so other
    /// implementations can be timed on the very same files.
    RandomCheckpoint {
        /// qwen-vl-chat (full size, 10 shards, ~19.3 GB) or tiny (the tiny-a shapes).
        #[arg(long, default_value = "qwen-vl-chat")]
        preset: String,
        #[arg(long, value_parser = ["safetensors", "bin"], default_value = "safetensors")]
        format: String,
        #[arg(long)]
        out: PathBuf,
        /// A qwen.tiktoken to copy in, so the folder is a complete model.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Model folder to measure.
    #[arg(long, conflicts_with = "random", required_unless_present_any = ["random", "kernels"])]
    model: Option<PathBuf>,
    /// Full-size random weights synthesised locally instead of a model folder.
    #[arg(long, value_parser = bench::RANDOM_PRESETS)]
    random: Option<String>,
    /// Weight type: q4k, q4_0, q8_0, bf16, f16 or f32.
    #[arg(long, default_value = "q4k", value_parser = parse_weight_type)]
    quant: WeightType,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Where to run: cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Measure each hot CPU kernel alone (quantized matmuls and matvecs, ViT attention) instead
    /// of a model.
    #[arg(long, conflicts_with_all = ["model", "random"])]
    kernels: bool,
    /// Also decode with several sequences batched together, as `serve --parallel` does, and
    /// report aggregate and per-stream tok/s for each count (e.g. 1,2,4,8).
    #[arg(long, value_delimiter = ',', conflicts_with = "kernels")]
    streams: Vec<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    fn weight_type(self) -> WeightType {
        match self {
            DtypeArg::F32 => WeightType::F32,
            DtypeArg::F16 => WeightType::F16,
            DtypeArg::Bf16 => WeightType::BF16,
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Model folder (config.json, generation_config.json, qwen.tiktoken, weights).
    #[arg(long)]
    model: PathBuf,
    /// Conversation JSON: {"system", "history", "query"}, or OpenAI chat form {"messages",
    /// "tools", "stop"} (tool calls and `tool` results included); image paths relative to its
    /// folder.
    #[arg(long)]
    conversation: PathBuf,
    /// Dense weight type in memory (f32 is the exact reference path).
    #[arg(long, value_enum, conflicts_with = "quant")]
    dtype: Option<DtypeArg>,
    /// Weight type in memory: q4k, q4_0, q8_0 (quantized while loading), bf16, f16 or f32.
    /// Default: f32 for small checkpoints; for the full model on a CPU q8_0 when it fits with
    /// room to spare, else q4k; on a GPU bf16, q8_0 or q4k, the first that fits its memory.
    #[arg(long, value_parser = parse_weight_type)]
    quant: Option<WeightType>,
    /// Most new tokens (default: the checkpoint's max_new_tokens).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Argmax at every step (ties to the lowest id), after the repetition penalty if any; the
    /// same as `--temperature 0`.
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k", "seed"])]
    greedy: bool,
    /// In [0, 2]; 0 is greedy decoding.
    #[arg(long)]
    temperature: Option<f64>,
    /// In (0, 1]; 1 disables top-p.
    #[arg(long)]
    top_p: Option<f64>,
    /// 0 disables top-k.
    #[arg(long)]
    top_k: Option<u64>,
    /// Finite and > 0 (1 disables it); applies to greedy decoding too.
    #[arg(long)]
    repetition_penalty: Option<f64>,
    /// The sampler's seed (default 0: runs are reproducible).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object (ids, text, boxes, timings) instead of streaming the reply.
    #[arg(long)]
    json: bool,
    /// cpu, cuda, cuda:N, metal, or auto (a GPU when this build supports one and it is there).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write the last prompt position's logits (f32 [vocab], tensor `logits`) to a safetensors file.
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

/// Every tensor op allocates its output afresh (the vision tower's MLP activations are 33 MB per
/// layer). glibc serves blocks over 32 MB with mmap and unmaps them on free, so each op paid page
/// faults and kernel page zeroing: ~20% of a vision encode, measured with perf. Keeping large
/// blocks in the heap lets the next op reuse the memory.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    // A bad QWENVL_CPU is refused before anything runs (even `--help`): a kernel level this CPU
    // lacks would fault (SIGILL) the first time it ran.
    if let Err(e) = kernels::cpu::level_from_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Run(args)) => run(args),
        Some(Command::Bench(args)) => run_bench(args),
        Some(Command::Cache { action }) => cache_command(&action),
        Some(Command::Serve(args)) => qwenvl::serve::run(args),
        Some(Command::Download(a)) => qwenvl::download::run(a),
        Some(Command::Ocr(a)) => qwenvl::ocr::run(a),
        Some(Command::Dev(DevCommand::RandomCheckpoint {
            preset,
            format,
            out,
            tokenizer,
            seed,
        })) => random_checkpoint(&preset, &format, &out, tokenizer.as_deref(), seed),
        None => gui::run(cli.pictures),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn generate_options(args: &RunArgs, engine: &Engine) -> Result<GenerateOptions> {
    let request = GenerateRequest {
        max_new_tokens: args.max_new_tokens.map(|n| n as u64),
        greedy: args.greedy,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ignore_eos: false,
    };
    request
        .resolve(&engine.checkpoint.generation, 0)
        .map_err(|e| anyhow!(e.message_for_flags()))
}

/// Conversation files larger than this are refused (1 MB of text is already far beyond any
/// context window).
const MAX_CONVERSATION_BYTES: u64 = 256 << 20;

/// What `run --conversation` answers.
struct Question {
    conversation: Conversation,
    /// The reply already begun (after a tool's result).
    reply_prefix: String,
    /// Stop strings (the file's `stop`, and `Observation:` with tools).
    stops: Vec<String>,
    /// Tools were offered: the reply is read as an answer or a call.
    tools: bool,
}

/// The OpenAI chat form of a conversation file.
#[derive(serde::Deserialize)]
struct ChatFile {
    messages: Vec<openai::Message>,
    #[serde(default)]
    tools: Vec<openai::ToolSpec>,
    #[serde(default)]
    stop: Option<openai::Stop>,
}

fn read_question(path: &Path) -> Result<Question> {
    let value = read_conversation(path)?;
    let invalid = || format!("{}: not a valid conversation JSON", path.display());
    if value.get("messages").is_none() {
        let conversation = serde_json::from_value(value).with_context(invalid)?;
        return Ok(Question {
            conversation,
            reply_prefix: String::new(),
            stops: Vec::new(),
            tools: false,
        });
    }
    let file: ChatFile = serde_json::from_value(value).with_context(invalid)?;
    let stops = file.stop.map(openai::Stop::into_vec).unwrap_or_default();
    let at = |e: openai::MessageError| anyhow!("{}: {}: {}", path.display(), e.param, e.message);
    if file.tools.is_empty() && !openai::has_tool_exchange(&file.messages) {
        // Image URLs are paths (relative to the file's folder) or file:// URLs.
        let conversation = openai::to_conversation(&file.messages, &mut |url, _| {
            Ok(url.strip_prefix("file://").unwrap_or(url).to_string())
        })
        .map_err(at)?;
        return Ok(Question {
            conversation,
            reply_prefix: String::new(),
            stops,
            tools: false,
        });
    }
    let tools = openai::function_tools(&file.tools).map_err(at)?;
    let messages = openai::to_react(&file.messages).map_err(at)?;
    let p = qwenvl::session::tools::prepare(&messages, &tools, &stops)
        .map_err(|e| anyhow!("{}: messages: {e}", path.display()))?;
    Ok(Question {
        conversation: p.conversation,
        reply_prefix: p.reply_prefix,
        stops: p.stops,
        tools: p.offered,
    })
}

fn read_conversation(path: &Path) -> Result<serde_json::Value> {
    // A pipe or device would block or never end: only regular files are read.
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the conversation {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "cannot read the conversation {}: not a regular file",
            path.display()
        );
    }
    if meta.len() > MAX_CONVERSATION_BYTES {
        bail!(
            "cannot read the conversation {}: {} bytes is more than the {} MiB limit",
            path.display(),
            meta.len(),
            MAX_CONVERSATION_BYTES >> 20
        );
    }
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the conversation {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a valid conversation JSON", path.display()))
}

fn run(args: RunArgs) -> Result<()> {
    let q = read_question(&args.conversation)?;
    let base_dir = args
        .conversation
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let device = parse_device(&args.device)?;
    let requested = args.quant.or(args.dtype.map(DtypeArg::weight_type));
    let engine = qwenvl::cli_load::load(&args.model, requested, &device)?;
    let opts = generate_options(&args, &engine)?;
    let cancel = AtomicBool::new(false);
    // With tools the text is read at its end (an answer or a call), so it is not streamed.
    let stream = !args.json && !q.tools;
    let mut stdout = std::io::stdout().lock();
    let mut filter = TextFilter::new(q.stops.clone());
    let reply = engine.reply_continuing(
        &q.conversation,
        &q.reply_prefix,
        &base_dir,
        &opts,
        &cancel,
        |piece| {
            let out = filter.push(piece);
            if filter.stopped() {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if stream {
                // A closed pipe must not abort generation bookkeeping; ignore write errors here.
                let _ = stdout.write_all(out.as_bytes());
                let _ = stdout.flush();
            }
        },
    )?;
    let tail = filter.finish();
    if stream {
        let _ = stdout.write_all(tail.as_bytes());
    }
    let text = filter.text().to_string();
    let tool = q.tools.then(|| qwenvl::session::tools::read_reply(&text));
    if let Some(path) = &args.logits_out {
        write_logits(path, &reply.last_logits)?;
    }
    if reply.prompt.history_turns_dropped > 0 && !args.json {
        eprintln!(
            "note: the {} oldest turn(s) did not fit the history window and were left out",
            reply.prompt.history_turns_dropped
        );
    }
    if args.json {
        let mut out = json_output(&engine, &reply);
        if !q.stops.is_empty() {
            out["text"] = text.into();
        }
        if filter.stopped() {
            // Cut at a stop string (the engine saw a cancel).
            out["finish"] = "StopString".into();
        }
        if let Some(t) = &tool {
            out["content"] = t.content.clone().into();
            out["tool_calls"] = match &t.call {
                Some(c) => serde_json::json!([{"name": c.name, "arguments": c.arguments}]),
                None => serde_json::Value::Null,
            };
        }
        writeln!(stdout, "{}", serde_json::to_string(&out)?)?;
    } else if let Some(t) = &tool {
        writeln!(stdout, "{}", t.content)?;
        if let Some(c) = &t.call {
            writeln!(stdout, "→ call {} with {}", c.name, c.arguments)?;
        }
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}

fn write_logits(path: &Path, logits: &Tensor) -> Result<()> {
    let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    candle_core::safetensors::save(&std::collections::HashMap::from([("logits", logits)]), path)
        .with_context(|| format!("cannot write logits to {}", path.display()))
}

fn json_output(engine: &Engine, reply: &Reply) -> serde_json::Value {
    let boxes: Vec<serde_json::Value> = qwenvl::session::reply_boxes(reply, &reply.text)
        .into_iter()
        .map(|b| {
            serde_json::json!({
                "ref": b.label,
                "box": b.grid,
                "image": b.picture.map(|i| reply.pictures[i].path.clone()),
                "box_px": b.px,
            })
        })
        .collect();
    serde_json::json!({
        "prompt_ids": reply.prompt.ids,
        "generated_ids": reply.generation.ids,
        "text": reply.text,
        "finish": format!("{:?}", reply.generation.finish),
        "boxes": boxes,
        "history_turns_kept": reply.prompt.history_turns_kept,
        "history_turns_dropped": reply.prompt.history_turns_dropped,
        "timings": reply.timings,
        "load_ms": engine.load_ms,
    })
}

fn run_bench(args: BenchArgs) -> Result<()> {
    if args.kernels {
        let rows = bench::kernels::run(|k| eprintln!("{k} ..."))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            println!(
                "CPU kernels: {} ({})",
                bench::cpu_level_words(),
                kernels::cpu::describe_features()
            );
            print!("{}", bench::kernels::table(&rows));
        }
        return Ok(());
    }
    let source = match (&args.model, &args.random) {
        (Some(dir), _) => bench::Source::Checkpoint(dir.clone()),
        (None, Some(name)) => bench::Source::Random(name.clone()),
        (None, None) => anyhow::bail!("bench: give --model DIR or --random PRESET"),
    };
    let device = parse_device(&args.device)?;
    if args.streams.contains(&0) {
        anyhow::bail!("--streams: each count must be at least 1");
    }
    let report = bench::run(
        source,
        args.quant,
        args.decode_tokens,
        &args.streams,
        &device,
    )?;
    if args.json {
        println!("{}", bench::to_json(&report)?);
    } else {
        print!("{}", bench::table(&report));
    }
    Ok(())
}

fn cache_command(action: &str) -> Result<()> {
    let dir = qwenvl::engine::quant_cache_dir()
        .context("no cache folder on this platform (set QWENVL_CACHE_DIR)")?;
    match action {
        "clear" => {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot delete {}", dir.display()))?;
            }
            println!("cleared {}", dir.display());
        }
        _ => println!("{}", dir.display()),
    }
    Ok(())
}

fn random_checkpoint(
    preset: &str,
    format: &str,
    out: &Path,
    tokenizer: Option<&Path>,
    seed: u64,
) -> Result<()> {
    use qwenvl::random_checkpoint as rc;
    let p = rc::preset(preset).with_context(|| format!("unknown preset {preset:?}"))?;
    let format = if format == "bin" {
        rc::Format::Bin
    } else {
        rc::Format::Safetensors
    };
    let mut last = 0u64;
    rc::write(out, &p, format, seed, &mut |done, total| {
        // One line per percent keeps a log readable.
        let pct = done * 100 / total.max(1);
        if pct != last {
            last = pct;
            eprint!("\rwriting {}: {pct:3}%", out.display());
        }
    })?;
    eprintln!();
    if let Some(t) = tokenizer {
        rc::copy_tokenizer(out, t)?;
    }
    println!("{}", out.display());
    Ok(())
}

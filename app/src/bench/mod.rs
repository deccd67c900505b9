//! `qwenvl bench`: load time, peak RSS, vision encode, prefill, decode and time to first token, set
//! against what this machine can do (memory read bandwidth and matmul throughput measured in the
//! same run).
//!
//! `--random qwen-vl-chat` synthesises full-size weights on the fly (no download): every tensor is
//! a slice of one shared pool of random values, so producing 9.6 B parameters costs memcpy time, not
//! RNG time, and the model is built through the very same loading code as a real checkpoint.

pub mod kernels;
mod random;
mod streams;

pub use random::{RandomBackend, QWEN_VL_CHAT_CONFIG};
use streams::measure_streams;
pub use streams::StreamsRow;

use std::path::PathBuf;
use std::time::Instant;

use ::kernels::LargeBuffer;
use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use lm::model::ImageFeatures;
use lm::quant::cpu::{CpuQWeight, Format};
use lm::quant::WeightType;
use lm::QwenConfig;

/// Where the weights come from.
pub enum Source {
    Checkpoint(PathBuf),
    /// A named preset of [`random_preset_config`].
    Random(String),
}

/// The presets `--random` accepts.
pub const RANDOM_PRESETS: [&str; 6] = [
    "qwen-vl-chat",
    "qwen-1.8b-chat",
    "qwen-7b-chat",
    "qwen-14b-chat",
    "qwen-7b-chat-int4",
    "qwen-14b-chat-int4",
];

/// `config.json` of a `--random` preset: the published checkpoint's shapes and switches.
pub fn random_preset_config(name: &str) -> Option<&'static str> {
    Some(match name {
        "qwen-vl-chat" => QWEN_VL_CHAT_CONFIG,
        "qwen-1.8b-chat" => random::QWEN_1_8B_CHAT_CONFIG,
        "qwen-7b-chat" => random::QWEN_7B_CHAT_CONFIG,
        "qwen-14b-chat" | "qwen-14b-chat-int4" => random::QWEN_14B_CHAT_CONFIG,
        "qwen-7b-chat-int4" => random::QWEN_7B_CHAT_CONFIG,
        _ => return None,
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    /// `cpu`, or the GPU (`cuda:0`, …).
    pub device: String,
    pub quant: String,
    /// The CPU kernel level the run used (`QWENVL_CPU` caps it).
    pub cpu: String,
    pub threads: usize,
    pub load_s: f64,
    /// The quantized weights were read from the on-disk cache.
    pub load_from_cache: bool,
    pub peak_rss_gb: f64,
    /// Peak RSS when each phase ended (load, cache write, vision, prefill): where the peak is set.
    pub peak_rss_by_phase_gb: Vec<(String, f64)>,
    pub lm_weight_bytes_per_token: u64,
    /// Vision encode of one picture; `None` for text-only models.
    pub vision_encode_s: Option<f64>,
    pub vision_gflop: Option<f64>,
    pub vision_gflops: Option<f64>,
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub prefill_tokens_per_s: f64,
    pub prefill_gflops: f64,
    pub time_to_first_token_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    /// CPU: the mean of read-bandwidth samples taken between stretches of the decode; GPU: the
    /// device-to-device copy rate.
    pub bandwidth_gb_s: f64,
    /// CPU: the lowest and highest of those samples.
    pub bandwidth_range_gb_s: Option<(f64, f64)>,
    /// tokens/s the measured bandwidth allows: bandwidth / weight bytes read per token.
    pub decode_limit_tokens_per_s: f64,
    pub decode_fraction_of_limit: f64,
    pub matmul_f32_gflops: f64,
    pub matmul_q4k_gflops: f64,
    /// Decode speed with several sequences decoded together (`--streams`).
    pub streams: Vec<StreamsRow>,
}

/// Peak resident set size of this process so far, in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> u64 {
    status_kb("VmHWM:")
}

/// A `/proc/self/status` size field, in bytes.
fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Decoded tokens between two read-bandwidth samples.
const BANDWIDTH_SAMPLE_EVERY: usize = 16;

/// The buffer read-bandwidth passes sum: 1 GiB, held like the weights (on huge pages where the
/// OS gives them), so the limit is measured the way the weights are read.
pub(crate) struct ReadBuffer(LargeBuffer);

impl ReadBuffer {
    pub(crate) fn new() -> Self {
        let mut bytes = LargeBuffer::zeroed(1 << 30);
        // Written, so every page is really backed (unwritten pages all read the one zero page).
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8;
        }
        Self(bytes)
    }

    /// One pass, every core summing its share; GB/s.
    pub(crate) fn read_pass(&self) -> f64 {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: every bit pattern is a valid u64; the ends that are not 8-aligned are left out.
        let (_, words, _) = unsafe { self.0.align_to::<u64>() };
        let chunk = words.len().div_ceil(threads);
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(total);
        (words.len() * 8) as f64 / secs / 1e9
    }
}

/// Best wall time of `runs` calls of `f`, in seconds. What `f` returns is dropped after the
/// clock stops (so freeing it is not timed, and the work cannot be optimised away).
pub(crate) fn best_of<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..runs {
        let t0 = Instant::now();
        let out = f()?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(std::hint::black_box(out));
    }
    Ok(best)
}

/// Bytes a device-to-device copy of 1 GiB moves per second, reads and writes counted (how GPU
/// bandwidth is usually quoted), in GB/s; best of 10. On CUDA it is the driver's own copy
/// (`cuMemcpyDtoD`): candle's tensor copy is a kernel that reaches a third of that.
#[cfg(feature = "cuda")]
pub fn measure_device_copy(device: &Device) -> Result<f64> {
    let Ok(cuda) = device.as_cuda_device() else {
        return measure_tensor_copy(device);
    };
    let stream = cuda.cuda_stream();
    let n = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(n)?;
    let mut dst = stream.alloc_zeros::<u8>(n)?;
    stream.synchronize()?;
    let best = best_of(10, || {
        stream.memcpy_dtod(&src, &mut dst)?;
        Ok(stream.synchronize()?)
    })?;
    Ok(2.0 * n as f64 / best / 1e9)
}

#[cfg(not(feature = "cuda"))]
pub fn measure_device_copy(device: &Device) -> Result<f64> {
    measure_tensor_copy(device)
}

/// [`measure_device_copy`] through a tensor copy (any device).
fn measure_tensor_copy(device: &Device) -> Result<f64> {
    let src = Tensor::zeros(1usize << 28, DType::F32, device)?;
    device.synchronize()?;
    let best = best_of(10, || {
        let copy = src.copy()?;
        device.synchronize()?;
        Ok(copy)
    })?;
    Ok(2.0 * (1u64 << 30) as f64 / best / 1e9)
}

/// GFLOP/s of a `[m, k] × [k, n]` product, f32 dense and q4k-quantized (best of 3).
pub fn measure_matmul(m: usize, k: usize, n: usize) -> Result<(f64, f64)> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
    let flop = 2.0 * (m * k * n) as f64;
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> Result<f64> {
        Ok(flop / best_of(3, || Ok(f()?))? / 1e9)
    };
    let dense = QMatMul::Tensor(w.clone());
    let f32_gflops = time(&|| dense.forward(&x))?;
    // The q4k kernel the engine runs (lm::quant::cpu), not candle's.
    let ggml = QTensor::quantize(&w, GgmlDType::Q4K)?.data()?.into_owned();
    let q = CpuQWeight::from_ggml(Format::Q4K, n, k, &ggml).map_err(anyhow::Error::msg)?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let q4k_gflops = time(&|| {
        let mut out = vec![0f32; m * n];
        q.matmul(&xs, m, &mut out);
        Tensor::from_vec(out, (m, n), &dev)
    })?;
    Ok((f32_gflops, q4k_gflops))
}

/// Bytes of LM weights one decode step reads: every block's linear layers and the LM head (the
/// embedding is only looked up).
fn lm_bytes_per_token(cfg: &QwenConfig, wt: WeightType) -> u64 {
    let h = cfg.hidden_size;
    let proj = cfg.num_attention_heads * cfg.head_dim();
    let ff = cfg.intermediate_size / 2;
    let mats = [(h, 3 * proj), (proj, h), (h, ff), (h, ff), (ff, h)];
    let per_layer: f64 = mats.iter().map(|&(i, o)| weight_bytes(i, o, wt)).sum();
    let head = weight_bytes(h, cfg.vocab_size, wt);
    (per_layer * cfg.num_hidden_layers as f64 + head) as u64
}

fn weight_bytes(in_dim: usize, out_dim: usize, wt: WeightType) -> f64 {
    // On the CPU q4k and q8_0 weights are held (and streamed) as 16-row tiles.
    match wt.ggml().and_then(lm::quant::cpu_format) {
        Some(f) => CpuQWeight::tiled_size(f, out_dim, wt.stored_in_dim(in_dim)) as f64,
        None => wt.weight_bytes(in_dim, out_dim) as f64,
    }
}

/// FLOPs of one vision encode (ViT blocks, resampler, projection) for one image.
fn vision_flop(v: &vision::Config, lm_hidden: usize) -> f64 {
    let n = (v.image_size / v.patch_size).pow(2) as f64;
    let (w, mlp, e) = (v.width as f64, v.mlp_width() as f64, lm_hidden as f64);
    let per_layer = 2.0 * n * (3.0 * w * w + w * w + 2.0 * w * mlp) + 4.0 * n * n * w;
    let q = v.n_queries as f64;
    let patch = 2.0 * n * w * 3.0 * (v.patch_size * v.patch_size) as f64;
    let resampler = 2.0 * (n * w * e + q * e * e + 2.0 * n * e * e + q * e * e)
        + 4.0 * q * n * e
        + 2.0 * q * e * e;
    patch + per_layer * v.layers as f64 + resampler
}

/// FLOPs of a prefill over `t` tokens (linear layers and attention; the LM head for one row).
fn prefill_flop(cfg: &QwenConfig, t: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    let proj = (cfg.num_attention_heads * cfg.head_dim()) as f64;
    let ff = (cfg.intermediate_size / 2) as f64;
    let t = t as f64;
    let linear = 2.0 * t * (h * 3.0 * proj + proj * h + 3.0 * h * ff);
    let attn = 2.0 * t * t * proj; // causal half of q·kᵀ and p·v
    (linear + attn) * cfg.num_hidden_layers as f64 + 2.0 * h * cfg.vocab_size as f64
}

/// Runs the whole benchmark.
pub fn run(
    source: Source,
    wt: WeightType,
    decode_tokens: usize,
    streams: &[usize],
    device: &Device,
) -> Result<BenchReport> {
    let device = device.clone();
    let threads = candle_core::utils::get_num_threads();
    let mut q: lm::quant::Quantizer = wt.into();
    let mut table = None;
    // Load progress: a bar for checkpoints (random weights are not read from anywhere).
    let progress = std::sync::Arc::new(lm::checkpoint::LoadProgress::default());
    let mut total = 0;
    let (cfg, vb, model_name): (QwenConfig, VarBuilder, String) = match &source {
        Source::Random(name) => {
            let json = random_preset_config(name).with_context(|| {
                format!(
                    "unknown preset {name:?}: one of {}",
                    RANDOM_PRESETS.join(", ")
                )
            })?;
            let mut cfg: QwenConfig = serde_json::from_str(json)?;
            // The Int4 presets: the LM's linear layers GPTQ-packed as Qwen's *-Int4 ship them
            // (4 bits, groups of 128), dequantised and repacked at load like a real checkpoint.
            let int4 = name.ends_with("-int4");
            if int4 {
                cfg.quantization_config = Some(serde_json::from_value(serde_json::json!({
                    "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
                    "sym": true
                }))?);
            }
            let vb = VarBuilder::from_backend(
                Box::new(RandomBackend::new(0x5eed).with_gptq(int4)),
                wt.compute_dtype(&device),
                device.clone(),
            );
            (cfg, vb, format!("random {name}"))
        }
        Source::Checkpoint(dir) => {
            let ck = lm::Checkpoint::open(dir)
                .with_context(|| format!("cannot open the model folder {}", dir.display()))?;
            let (vb, counter) =
                ck.var_builder_with_progress(wt.compute_dtype(&device), &device, progress.clone());
            q = crate::engine::quantizer_for(dir, wt)?;
            q.progress = Some(counter);
            total = crate::model_dir::weights_bytes(dir);
            // As the engine loads it: token embeddings read from the mapped checkpoint.
            table = ck.mapped_rows("transformer.wte.weight");
            (ck.config.clone(), vb, dir.display().to_string())
        }
    };
    eprintln!("loading ({wt}) ...");
    let t0 = Instant::now();
    let (lm, vision) = crate::cli_load::with_bar(total, &progress, || {
        crate::engine::build_models(&cfg, &vb, &q, table)
    })?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut phases = vec![("load".to_string(), peak_rss_bytes() as f64 / 1e9)];
    let from_cache = q.cache.as_ref().is_some_and(|c| c.is_hit());
    // Written after the clock stops: the next start is the one that profits.
    if let Some(c) = &q.cache {
        c.save()?;
        phases.push(("cache write".into(), peak_rss_bytes() as f64 / 1e9));
    }

    // One 448×448 picture of noise, through the real preprocessing.
    let feats = match &vision {
        Some(v) => {
            let s = v.config.image_size as u32;
            let img = vision::image::RgbImage::from_fn(s, s, |x, y| {
                let v = ((x * 31 + y * 17) % 251) as u8;
                vision::image::Rgb([v, v.wrapping_mul(3), v.wrapping_add(91)])
            });
            eprintln!("vision encode ...");
            let t1 = Instant::now();
            let pixels = vision::preprocess(&img, v.config.image_size)?
                .unsqueeze(0)?
                .to_device(&device)?
                .to_dtype(lm.dtype())?;
            let feats = v.encoder.forward(&pixels)?;
            // GPU work is queued: wait for it before reading the clock.
            device.synchronize()?;
            let vision_encode_s = t1.elapsed().as_secs_f64();
            phases.push(("vision".into(), peak_rss_bytes() as f64 / 1e9));
            Some((feats.get(0)?, vision_encode_s))
        }
        None => None,
    };
    let vision_encode_s = feats.as_ref().map(|f| f.1);

    // The reference's measurement: one image + a 40-word question in the chat template; a
    // text-only model gets text in the picture's 258 positions, so both prefill 324 tokens.
    let mut ids: Vec<u32> = vec![151644, 8948, 198];
    ids.extend((0..8).map(|i| 1000 + i * 37));
    ids.extend([151645, 198, 151644, 872, 198, 24669, 220, 16, 25, 220]);
    let img_start = ids.len();
    let mut images = Vec::new();
    match feats {
        Some((features, _)) => {
            ids.push(151857);
            ids.extend(std::iter::repeat_n(151859u32, 256));
            ids.push(151858);
            images.push(ImageFeatures {
                first_position: img_start + 1,
                features,
            });
        }
        None => ids.extend((0..258u32).map(|i| 3000 + i * 97)),
    }
    ids.extend((0..40u32).map(|i| 2000 + i * 53));
    ids.extend([151645, 198, 151644, 77091, 198]);
    eprintln!("prefill {} tokens ...", ids.len());
    let t2 = Instant::now();
    let mut cache = lm.new_cache();
    let logits = lm.forward(&ids, &images, &mut cache)?;
    let mut next = lm::generate::argmax(&logits.to_vec1::<f32>()?);
    let prefill_s = t2.elapsed().as_secs_f64();
    phases.push(("prefill".into(), peak_rss_bytes() as f64 / 1e9));
    let time_to_first_token_s = vision_encode_s.unwrap_or(0.0) + prefill_s;

    eprintln!("decode {decode_tokens} tokens ...");
    // On the CPU the read bandwidth is sampled between stretches of decoding (untimed): on a
    // shared machine it drifts by 2× within seconds, so one measurement before or after the decode
    // would compare it with another state of the machine. The sampling buffer's pages are left
    // out of the peak RSS.
    let peak_before_decode = peak_rss_bytes();
    let sampler = device.is_cpu().then(|| {
        let before = status_kb("VmRSS:");
        let buf = ReadBuffer::new();
        let held = status_kb("VmRSS:").saturating_sub(before);
        (buf, held)
    });
    let mut samples = Vec::new();
    let mut decode_s = 0.0;
    for i in 0..decode_tokens {
        if let Some((buf, _)) = &sampler {
            if i % BANDWIDTH_SAMPLE_EVERY == 0 {
                samples.push(buf.read_pass());
            }
        }
        let t = Instant::now();
        let logits = lm.forward(&[next], &[], &mut cache)?;
        next = lm::generate::argmax(&logits.to_vec1::<f32>()?);
        decode_s += t.elapsed().as_secs_f64();
    }
    let mut peak_rss = peak_rss_bytes();
    if let Some((buf, held)) = sampler {
        samples.push(buf.read_pass());
        peak_rss = peak_before_decode.max(peak_rss.saturating_sub(held));
    }
    // Its config is all the report still needs of the vision tower.
    let vision_gflop = vision.map(|v| vision_flop(&v.config, cfg.hidden_size) / 1e9);
    let streams = streams
        .iter()
        .map(|&s| measure_streams(&lm, &cache, next, s, decode_tokens))
        .collect::<Result<Vec<_>>>()?;
    drop((lm, cache));

    eprintln!("measuring matmul throughput ...");
    let (bandwidth_gb_s, matmul_f32_gflops, matmul_q4k_gflops) = if device.is_cpu() {
        let (f, q) = measure_matmul(512, 4096, 11008)?;
        (samples.iter().sum::<f64>() / samples.len() as f64, f, q)
    } else {
        // On a GPU the limit is its device-to-device copy rate; the CPU kernels are not measured.
        (measure_device_copy(&device)?, f64::NAN, f64::NAN)
    };
    let bandwidth_range_gb_s = samples.iter().fold(None, |r: Option<(f64, f64)>, &x| {
        Some(r.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x))))
    });
    let bytes = lm_bytes_per_token(&cfg, wt);
    let decode_tokens_per_s = decode_tokens as f64 / decode_s;
    let limit = bandwidth_gb_s * 1e9 / bytes as f64;
    Ok(BenchReport {
        model: model_name,
        device: match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".into(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        },
        quant: wt.to_string(),
        cpu: cpu_level_words(),
        threads,
        load_s,
        load_from_cache: from_cache,
        peak_rss_gb: peak_rss as f64 / 1e9,
        peak_rss_by_phase_gb: phases,
        lm_weight_bytes_per_token: bytes,
        vision_encode_s,
        vision_gflop,
        vision_gflops: vision_gflop.zip(vision_encode_s).map(|(f, s)| f / s),
        prefill_tokens: ids.len(),
        prefill_s,
        prefill_tokens_per_s: ids.len() as f64 / prefill_s,
        prefill_gflops: prefill_flop(&cfg, ids.len()) / 1e9 / prefill_s,
        time_to_first_token_s,
        decode_tokens,
        decode_tokens_per_s,
        bandwidth_gb_s,
        bandwidth_range_gb_s,
        decode_limit_tokens_per_s: limit,
        decode_fraction_of_limit: decode_tokens_per_s / limit,
        matmul_f32_gflops,
        matmul_q4k_gflops,
        streams,
    })
}

/// The CPU kernel level of this process and what it was chosen from, e.g.
/// `avx2 (QWENVL_CPU; this CPU runs avx512)`.
pub fn cpu_level_words() -> String {
    let (level, best) = (::kernels::cpu::level(), ::kernels::cpu::detected());
    if level == best {
        level.to_string()
    } else {
        format!("{level} (QWENVL_CPU; this CPU runs {best})")
    }
}

/// The report as an aligned two-column table.
pub fn table(r: &BenchReport) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("model", r.model.clone()),
        ("device", r.device.clone()),
        ("weights", r.quant.clone()),
        ("CPU kernels", r.cpu.clone()),
        ("threads", r.threads.to_string()),
        (
            "load",
            format!(
                "{:.1} s{}",
                r.load_s,
                if r.load_from_cache {
                    " (quantized cache)"
                } else {
                    ""
                }
            ),
        ),
        (
            "peak RSS",
            format!(
                "{:.2} GB  (after {})",
                r.peak_rss_gb,
                r.peak_rss_by_phase_gb
                    .iter()
                    .map(|(p, gb)| format!("{p} {gb:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "vision encode (1 image)",
            match (r.vision_encode_s, r.vision_gflop, r.vision_gflops) {
                (Some(s), Some(f), Some(rate)) => {
                    format!("{}  ({f:.0} GFLOP, {rate:.0} GFLOP/s)", duration(s))
                }
                _ => "none (text-only model)".into(),
            },
        ),
        (
            "prefill",
            format!(
                "{} tokens in {}  ({:.1} tok/s, {:.0} GFLOP/s)",
                r.prefill_tokens,
                duration(r.prefill_s),
                r.prefill_tokens_per_s,
                r.prefill_gflops
            ),
        ),
        ("time to first token", duration(r.time_to_first_token_s)),
        (
            "decode",
            format!(
                "{:.2} tok/s over {} tokens",
                r.decode_tokens_per_s, r.decode_tokens
            ),
        ),
        (
            "weights read per token",
            format!("{:.2} GB", r.lm_weight_bytes_per_token as f64 / 1e9),
        ),
        (
            if r.device == "cpu" {
                "read bandwidth"
            } else {
                "copy bandwidth (read + write)"
            },
            match r.bandwidth_range_gb_s {
                Some((lo, hi)) => format!(
                    "{:.1} GB/s  (mean of samples between decode stretches, {lo:.1}–{hi:.1})",
                    r.bandwidth_gb_s
                ),
                None => format!("{:.1} GB/s", r.bandwidth_gb_s),
            },
        ),
        (
            "decode vs bandwidth limit",
            format!(
                "{:.0} % of {:.2} tok/s",
                r.decode_fraction_of_limit * 100.0,
                r.decode_limit_tokens_per_s
            ),
        ),
    ];
    if !r.matmul_f32_gflops.is_nan() {
        rows.push((
            "matmul 512×4096×11008",
            format!(
                "f32 {:.0} GFLOP/s, q4k {:.0} GFLOP/s",
                r.matmul_f32_gflops, r.matmul_q4k_gflops
            ),
        ));
    }
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out: String = rows
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect();
    if !r.streams.is_empty() {
        let single = r.streams.iter().find(|s| s.streams == 1);
        out.push_str("\nstreams  aggregate tok/s  per stream tok/s  vs 1 stream\n");
        for s in &r.streams {
            let ratio = single.map_or(String::from("-"), |one| {
                format!(
                    "{:.2}×",
                    s.aggregate_tokens_per_s / one.aggregate_tokens_per_s
                )
            });
            out.push_str(&format!(
                "{:>7}  {:>15.2}  {:>16.2}  {ratio:>11}\n",
                s.streams, s.aggregate_tokens_per_s, s.per_stream_tokens_per_s
            ));
        }
    }
    out
}

/// Seconds, or milliseconds below one second (GPU timings).
fn duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Keys of a report for machine consumption.
pub fn to_json(r: &BenchReport) -> Result<String> {
    Ok(serde_json::to_string_pretty(r)?)
}

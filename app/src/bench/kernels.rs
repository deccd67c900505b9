//! `qwenvl bench --kernels`: each hot CPU kernel alone, at the shapes the model runs it, against
//! the machine's measured limits (memory read bandwidth for the decode matvecs, the f32 matmul for
//! the rest). Synthetic data; best of several runs. Our kernels run at the process's CPU level
//! (`QWENVL_CPU` caps it); each row names the level its kernel ran at.

use anyhow::Result;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use kernels::cpu::Level;
use kernels::dense16::{Half, HalfWeight};
use kernels::quant::{CpuQWeight, Format};
use kernels::CpuMatmul;

use super::best_of;

/// One measured kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelResult {
    pub kernel: String,
    /// Where the model runs it, and the shape.
    pub shape: String,
    pub ms: f64,
    /// `rate` in `unit` (GFLOP/s, or GB/s for the bandwidth-bound matvecs).
    pub rate: f64,
    pub unit: &'static str,
    /// For bandwidth-bound kernels: the median share of the read bandwidth measured right before
    /// each pass.
    pub of_bandwidth: Option<f64>,
    /// The level the kernel ran at (`portable`, `avx2`, `avx512`, `neon`, …), or `candle` for
    /// candle's own kernels (gemm picks its code by itself).
    pub cpu: String,
}

fn randn(shape: (usize, usize), std: f64) -> Result<Vec<f32>> {
    Ok(Tensor::randn(0f32, std as f32, shape, &Device::Cpu)?
        .flatten_all()?
        .to_vec1()?)
}

fn qweight(format: Format, n: usize, k: usize) -> Result<CpuQWeight> {
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)?;
    let ggml = QTensor::quantize(&w, lm::quant::ggml_dtype(format))?
        .data()?
        .into_owned();
    CpuQWeight::from_ggml(format, n, k, &ggml).map_err(anyhow::Error::msg)
}

fn bf16_weight(n: usize, k: usize) -> Result<HalfWeight> {
    Ok(HalfWeight::from_rows(
        Half::Bf16,
        n,
        k,
        &randn((n, k), 0.02)?,
    ))
}

/// A CPU weight kind the model runs: quantized tiles, or bf16 tiles.
#[derive(Clone, Copy)]
enum Kind {
    Q(Format),
    Bf16,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Q(f) => name(f),
            Kind::Bf16 => "bf16",
        }
    }

    /// A random `[n, k]` weight of this kind.
    fn weight(self, n: usize, k: usize) -> Result<Box<dyn CpuMatmul>> {
        Ok(match self {
            Kind::Q(f) => Box::new(qweight(f, n, k)?),
            Kind::Bf16 => Box::new(bf16_weight(n, k)?),
        })
    }
}

/// Times a pass right after a read-bandwidth pass: (best seconds, median of the passes' rates
/// over the bandwidth beside them).
type Paired<'a> = &'a dyn Fn(&mut dyn FnMut()) -> (f64, f64);

/// Matvecs over copies of `one` totalling ~1.3 GB (no cache reuse), on rayon's threads as the
/// model's forward pass runs them (see `QwenLm::in_pool`); `paired` times them against the read
/// bandwidth measured right before each pass.
fn matvec_from_memory<W: CpuMatmul + Clone>(
    one: W,
    kernel: &str,
    m: usize,
    paired: Paired<'_>,
    level: Level,
) -> Result<KernelResult> {
    let (n, k) = one.dims();
    let copies = (1_300_000_000 / one.size_in_bytes()).max(1);
    let bytes = (copies * one.size_in_bytes()) as f64;
    let ws: Vec<W> = (0..copies).map(|_| one.clone()).collect();
    let x = randn((m, k), 1.0)?;
    let mut y = vec![0f32; m * n];
    let (s, ratio) = paired(&mut || {
        rayon::scope(|_| {
            for w in &ws {
                w.matmul_at(&x, m, &mut y, None, level);
            }
        })
    });
    let (what, shape) = match m {
        1 => ("matvec", "decode"),
        _ => ("matmul", "batched decode"),
    };
    Ok(KernelResult {
        kernel: format!("{kernel} {what}"),
        shape: format!("{shape}: {m}×{k}×{n}, {copies} weights"),
        ms: s * 1e3 / copies as f64,
        rate: bytes / s / 1e9,
        unit: "GB/s",
        of_bandwidth: Some(ratio * bytes / 1e9),
        cpu: level.to_string(),
    })
}

fn name(format: Format) -> &'static str {
    format.name()
}

fn gflops(flop: f64, s: f64) -> f64 {
    flop / s / 1e9
}

/// Runs every kernel at the process's CPU level; `progress` is told each one's name before it
/// starts.
pub fn run(mut progress: impl FnMut(&str)) -> Result<Vec<KernelResult>> {
    let level = kernels::cpu::level();
    let ours = level.to_string();
    let mut out = Vec::new();
    let dev = Device::Cpu;

    // Compute-bound matmuls: the vision tower (1024 patches) and a prefill (324 tokens); bf16 is
    // the 16-bit path (`--quant bf16` on the CPU: weights widened in registers, f32 FMAs).
    for (kind, m, k, n, what) in [
        (Kind::Q(Format::Q8_0), 1024, 1664, 4992, "ViT in_proj"),
        (Kind::Q(Format::Q8_0), 1024, 1664, 8192, "ViT c_fc"),
        (Kind::Q(Format::Q8_0), 1024, 8192, 1664, "ViT c_proj"),
        (Kind::Q(Format::Q4K), 1024, 8192, 1664, "ViT c_proj"),
        (Kind::Q(Format::Q8_0), 324, 4096, 11008, "LM w1 (prefill)"),
        (Kind::Q(Format::Q4K), 324, 4096, 11008, "LM w1 (prefill)"),
        (Kind::Bf16, 1024, 1664, 8192, "ViT c_fc"),
        (Kind::Bf16, 324, 4096, 11008, "LM w1 (prefill)"),
    ] {
        progress(&format!("{} matmul {m}×{k}×{n}", kind.name()));
        let w = kind.weight(n, k)?;
        let x = randn((m, k), 1.0)?;
        let bias = randn((1, n), 0.02)?;
        let mut y = vec![0f32; m * n];
        let s = best_of(5, || {
            w.matmul_at(&x, m, &mut y, Some(&bias), level);
            Ok(())
        })?;
        out.push(KernelResult {
            kernel: format!("{} matmul", kind.name()),
            shape: format!("{what}: {m}×{k}×{n}"),
            ms: s * 1e3,
            rate: gflops(2.0 * (m * k * n) as f64, s),
            unit: "GFLOP/s",
            of_bandwidth: None,
            cpu: ours.clone(),
        });
    }

    // Bandwidth-bound decode kernels, each pass over ~1.3 GB (no cache reuse). This machine's
    // bandwidth drifts by 2× over seconds, so each pass is paired with a bandwidth pass right
    // before it and the median of the per-pair ratios is reported next to the best pass.
    progress("memory read bandwidth");
    let bw = super::ReadBuffer::new();
    let best_bw = (0..3).map(|_| bw.read_pass()).fold(0f64, f64::max);
    let paired = |f: &mut dyn FnMut()| -> (f64, f64) {
        let (mut best, mut ratios) = (f64::MAX, Vec::new());
        for _ in 0..7 {
            let limit = bw.read_pass();
            let t0 = std::time::Instant::now();
            f();
            let s = t0.elapsed().as_secs_f64();
            best = best.min(s);
            ratios.push(1.0 / s / limit);
        }
        ratios.sort_by(f64::total_cmp);
        (best, ratios[ratios.len() / 2])
    };
    for kind in [Kind::Q(Format::Q4K), Kind::Q(Format::Q8_0), Kind::Bf16] {
        let (k, n) = (4096, 11008);
        progress(&format!("{} matvec 1×{k}×{n}", kind.name()));
        out.push(match kind {
            Kind::Q(format) => {
                matvec_from_memory(qweight(format, n, k)?, kind.name(), 1, &paired, level)?
            }
            Kind::Bf16 => matvec_from_memory(bf16_weight(n, k)?, kind.name(), 1, &paired, level)?,
        });
    }
    // Several sequences decoded together (`serve --parallel`): the weights are still read once
    // per step, so the rate should stay near the bandwidth while the rows multiply the work.
    for (format, m) in [(Format::Q4K, 4), (Format::Q4K, 8), (Format::Q8_0, 8)] {
        let (k, n) = (4096, 11008);
        progress(&format!("{format:?} matmul {m}×{k}×{n} from memory"));
        let w = qweight(format, n, k)?;
        out.push(matvec_from_memory(w, name(format), m, &paired, level)?);
    }
    // The same matvecs on a weight that stays in the last-level cache (~9 MB): the kernels' own
    // ceiling, which decides how much of a fast memory system they can use.
    for format in [Format::Q4K, Format::Q8_0] {
        let (k, n) = (4096, 4096);
        progress(&format!("{format:?} matvec 1×{k}×{n} in cache"));
        let w = qweight(format, n, k)?;
        let x = randn((1, k), 1.0)?;
        let mut y = vec![0f32; n];
        let reps = 100;
        let s = best_of(5, || {
            rayon::scope(|_| {
                for _ in 0..reps {
                    w.matmul_at(&x, 1, &mut y, None, level);
                }
            });
            Ok(())
        })?;
        out.push(KernelResult {
            kernel: format!("{} matvec", name(format)),
            shape: format!("in cache: 1×{k}×{n}, {} KB", w.size_in_bytes() / 1000),
            ms: s * 1e3 / reps as f64,
            rate: (reps * w.size_in_bytes()) as f64 / s / 1e9,
            unit: "GB/s",
            of_bandwidth: None,
            cpu: ours.clone(),
        });
    }
    // Decode attention of one query over an f16 KV cache of 452 positions (a 324-token prompt
    // plus 128 decoded), 32 heads of 128: the LM's, per layer.
    let (heads, d, len) = (32, 128, 452);
    {
        progress("decode attention");
        let per_layer = 2 * heads * len * d;
        let layers = 1_300_000_000 / (2 * per_layer);
        let half = |n: usize| -> Result<Vec<half::f16>> {
            Ok(randn((1, n), 1.0)?
                .into_iter()
                .map(half::f16::from_f32)
                .collect())
        };
        let ks: Vec<Vec<half::f16>> = (0..layers)
            .map(|_| half(heads * len * d))
            .collect::<Result<_>>()?;
        let vs: Vec<Vec<half::f16>> = (0..layers)
            .map(|_| half(heads * len * d))
            .collect::<Result<_>>()?;
        let q = randn((1, heads * d), 1.0)?;
        let mut o = vec![0f32; heads * d];
        let dims = lm::decode_attention::Dims {
            heads,
            queries: 1,
            head_dim: d,
            capacity: len,
            len,
        };
        let scale = (d as f32).sqrt();
        let (s, ratio) = paired(&mut || {
            for (k, v) in ks.iter().zip(&vs) {
                kernels::decode_attention::attend_at(&q, k, v, dims, scale, &mut o, level);
            }
        });
        let bytes = (layers * per_layer * 2) as f64;
        out.push(KernelResult {
            kernel: "decode attention (fused)".into(),
            shape: format!("1 query, f16 KV of {len}, {heads}×{d}, {layers} layers"),
            ms: s * 1e3 / layers as f64,
            rate: bytes / s / 1e9,
            unit: "GB/s",
            of_bandwidth: Some(ratio * bytes / 1e9),
            cpu: ours.clone(),
        });
    }
    out.push(KernelResult {
        kernel: "read bandwidth".into(),
        shape: "sum of 1 GiB, every core".into(),
        ms: f64::NAN,
        rate: best_bw,
        unit: "GB/s",
        of_bandwidth: None,
        cpu: "baseline".into(),
    });

    // ViT self-attention: 1024 patches, 16 heads of 104.
    let (t, h, hd) = (1024, 16, 104);
    let attn_flop = 4.0 * (t * t * h * hd) as f64;
    {
        progress("bf16 ViT attention");
        let qkv = randn((t, h * 3 * hd), 1.0)?;
        let mut ctx = vec![0f32; t * h * hd];
        let s = best_of(5, || {
            kernels::vit_attention::attention_at(&qkv, t, h, hd, &mut ctx, level);
            Ok(())
        })?;
        out.push(KernelResult {
            kernel: "bf16 attention (fused)".into(),
            shape: format!("ViT: {t} tokens, {h}×{hd}"),
            ms: s * 1e3,
            rate: gflops(attn_flop, s),
            unit: "GFLOP/s",
            of_bandwidth: None,
            cpu: ours.clone(),
        });
    }
    progress("f32 ViT attention");
    let q = Tensor::randn(0f32, 1.0, (1, h, t, hd), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, h, t, hd), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, h, t, hd), &dev)?;
    let s = best_of(3, || {
        let p = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        std::hint::black_box(p.matmul(&v)?);
        Ok(())
    })?;
    out.push(KernelResult {
        kernel: "f32 attention (candle)".into(),
        shape: format!("ViT: {t} tokens, {h}×{hd}"),
        ms: s * 1e3,
        rate: gflops(attn_flop, s),
        unit: "GFLOP/s",
        of_bandwidth: None,
        cpu: "candle".into(),
    });

    // The f32 reference: candle's dense matmul.
    progress("f32 matmul");
    let (m, k, n) = (512, 4096, 11008);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = QMatMul::Tensor(Tensor::randn(0f32, 0.02, (n, k), &dev)?);
    let s = best_of(3, || {
        std::hint::black_box(w.forward(&x)?);
        Ok(())
    })?;
    out.push(KernelResult {
        kernel: "f32 matmul (candle)".into(),
        shape: format!("{m}×{k}×{n}"),
        ms: s * 1e3,
        rate: gflops(2.0 * (m * k * n) as f64, s),
        unit: "GFLOP/s",
        of_bandwidth: None,
        cpu: "candle".into(),
    });
    // GELU over the ViT MLP's hidden activations (1024 × 8192), in place.
    progress("gelu");
    let mut act = randn((1024, 8192), 2.0)?;
    let s = best_of(5, || {
        kernels::math::gelu_erf_in_place_at(&mut act, level);
        Ok(())
    })?;
    out.push(KernelResult {
        kernel: "gelu (erf)".into(),
        shape: "ViT MLP: 1024×8192".into(),
        ms: s * 1e3,
        rate: (1024 * 8192) as f64 / s / 1e9,
        unit: "Gvalues/s",
        of_bandwidth: None,
        cpu: ours.clone(),
    });
    Ok(out)
}

/// The results as an aligned table.
pub fn table(rows: &[KernelResult]) -> String {
    let kw = rows
        .iter()
        .map(|r| r.kernel.chars().count())
        .max()
        .unwrap_or(0);
    let sw = rows
        .iter()
        .map(|r| r.shape.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|r| {
            let ms = if r.ms.is_nan() {
                String::new()
            } else {
                format!("{:.2} ms", r.ms)
            };
            let share = r
                .of_bandwidth
                .map(|f| format!("  ({:.0} % of the bandwidth beside it)", f * 100.0))
                .unwrap_or_default();
            format!(
                "{:<kw$}  {:<8}  {:<sw$}  {:>10}  {:>7.1} {}{share}\n",
                r.kernel, r.cpu, r.shape, ms, r.rate, r.unit
            )
        })
        .collect()
}

//! A model folder as the app and the server see it before loading: is it a model, how big are its
//! weights, which in-memory weight type suits this machine, and does it fit.

use std::path::Path;

use anyhow::{bail, Context, Result};
use lm::quant::WeightType;

/// Weights of a model folder in bytes: what must fit in memory, and the loading bar's total.
pub fn weights_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.ends_with(".safetensors") || n.ends_with(".bin")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// f32 is the exact path; the real 9.6B-parameter model only fits in memory quantized (or bf16,
/// which the CPU has no fast matmul for). `QWENVL_WEIGHTS=f32|f16|bf16|q8_0|q4_0|q4k` overrides.
pub fn choose_weights(dir: &Path) -> Result<WeightType> {
    match std::env::var("QWENVL_WEIGHTS") {
        Ok(v) => WeightType::parse(&v.to_ascii_lowercase()).with_context(|| {
            format!("QWENVL_WEIGHTS={v}: expected one of f32, f16, bf16, q8_0, q4_0, q4k")
        }),
        // candle's CPU backend has no bf16 GEMM: quantized weights are smaller and faster there.
        // q8_0 when it fits with room to spare, else q4k.
        Err(_) if weights_bytes(dir) > 4 << 30 => {
            let q8_bytes = weights_bytes(dir) as f64 * 0.55;
            Ok(match available_memory() {
                Some(free) if free as f64 > q8_bytes * 1.3 => WeightType::Q8_0,
                _ => WeightType::Q4K,
            })
        }
        Err(_) => Ok(WeightType::F32),
    }
}

/// A folder that is plainly not a model gets a readable error before the engine sees it.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    for needed in ["config.json", "qwen.tiktoken"] {
        if !dir.join(needed).is_file() {
            bail!(
                "{} has no {needed}: choose the folder of a Qwen-VL-Chat download",
                dir.display()
            );
        }
    }
    if weights_bytes(dir) == 0 {
        bail!("{} has no weights (*.safetensors or *.bin)", dir.display());
    }
    Ok(())
}

/// Free memory in bytes (Linux `MemAvailable`); `None` where unknown.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Running out of memory aborts the process without a word, so refuse up front a model that
/// cannot fit. Checkpoints are stored as 16-bit; the in-memory size scales with the weight type.
pub fn check_memory(dir: &Path, wt: WeightType) -> Result<()> {
    let per_16bit = match wt {
        WeightType::F32 => 2.0,
        WeightType::F16 | WeightType::BF16 => 1.0,
        WeightType::Q8_0 => 0.55,
        WeightType::Q4_0 | WeightType::Q4K => 0.3,
    };
    let need = (weights_bytes(dir) as f64 * per_16bit) as u64;
    if let Some(free) = available_memory() {
        if need > free {
            bail!(
                "not enough memory: the model needs about {:.1} GB as {wt}, {:.1} GB are free. \
                 Close other programs, or set QWENVL_WEIGHTS=q4k (or bf16, q8_0) for a smaller \
                 model in memory",
                need as f64 / 1e9,
                free as f64 / 1e9,
            );
        }
    }
    Ok(())
}

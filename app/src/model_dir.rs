//! A model folder as the app and the server see it before loading: where one is found without
//! asking (`$QWENVL_MODEL`, the last used, the Hugging Face cache), is it a model, how big are
//! its weights, which in-memory weight type suits this machine, and does it fit.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use lm::quant::WeightType;

/// The Hugging Face repository the app is made for.
pub const MODEL_REPO: &str = "Qwen/Qwen-VL-Chat";

/// Where a model folder was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    EnvVar(PathBuf),
    LastUsed(PathBuf),
    HfCache(PathBuf),
}

impl Found {
    pub fn path(&self) -> &Path {
        match self {
            Found::EnvVar(p) | Found::LastUsed(p) | Found::HfCache(p) => p,
        }
    }
}

/// A folder that looks like a checkpoint (enough to try loading it).
pub fn looks_like_model(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("qwen.tiktoken").is_file()
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    directories::BaseDirs::new().map(|b| b.home_dir().join(".cache/huggingface/hub"))
}

/// Snapshots of Qwen-VL-Chat in a hub cache, newest first.
pub fn hf_snapshots(hub: &Path) -> Vec<PathBuf> {
    let dir = hub.join("models--Qwen--Qwen-VL-Chat").join("snapshots");
    let mut snaps: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| looks_like_model(p))
                .map(|p| {
                    let t = p
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    (t, p)
                })
                .collect()
        })
        .unwrap_or_default();
    snaps.sort_by_key(|s| std::cmp::Reverse(s.0));
    snaps.into_iter().map(|(_, p)| p).collect()
}

/// The first model folder found: `$QWENVL_MODEL`, the last used one, the HF cache.
pub fn discover(last_model: Option<&Path>) -> Option<Found> {
    if let Some(p) = std::env::var_os("QWENVL_MODEL") {
        // Named explicitly: try it even if it looks wrong, so the error is shown.
        return Some(Found::EnvVar(PathBuf::from(p)));
    }
    if let Some(p) = last_model.filter(|p| looks_like_model(p)) {
        return Some(Found::LastUsed(p.to_path_buf()));
    }
    hf_hub_cache()
        .and_then(|hub| hf_snapshots(&hub).into_iter().next())
        .map(Found::HfCache)
}

/// What `bytes` of weights in `dir` ([`weights_bytes`]) amount to as 16-bit weights, the unit
/// the memory rules count in: a GPTQ Int4 checkpoint (`quantization_config` in its config)
/// holds its linear layers in 4 bits and its embeddings in 16, about a third of its 16-bit size
/// (Qwen-7B-Chat-Int4: 5.9 GB for 15.4 GB), and is dequantised at load.
pub fn sixteen_bit_bytes(dir: &Path, bytes: u64) -> u64 {
    let gptq = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|c| c.get("quantization_config").is_some_and(|q| !q.is_null()));
    if gptq {
        bytes.saturating_mul(3)
    } else {
        bytes
    }
}

/// Weights of a model folder in bytes: what is read at load (the loading bar's total); see
/// [`sixteen_bit_bytes`] for what must fit in memory.
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

/// The weight type a model folder with `checkpoint_bytes` of weights ([`weights_bytes`]) is
/// loaded as when none is asked for: `QWENVL_WEIGHTS` if set, else [`default_weights`] for that
/// size and the memory free on `device`.
pub fn choose_weights(checkpoint_bytes: u64, device: &Device) -> Result<WeightType> {
    match std::env::var("QWENVL_WEIGHTS") {
        Ok(v) => WeightType::parse(&v.to_ascii_lowercase()).with_context(|| {
            format!("QWENVL_WEIGHTS={v}: expected one of f32, f16, bf16, q8_0, q4_0, q4k")
        }),
        Err(_) => Ok(default_weights(
            checkpoint_bytes,
            !device.is_cpu(),
            free_memory(device),
        )),
    }
}

/// Checkpoints up to this size (tiny test models) run in f32, the exact reference path.
const SMALL_CHECKPOINT: u64 = 4 << 30;

/// The default weight type for a checkpoint of `checkpoint_bytes` (stored as 16-bit, as
/// Qwen-VL-Chat ships) with `free` bytes of memory on the device (`None`: unknown).
///
/// - Small checkpoints: f32, the exact path.
/// - CPUs: q8_0 when it fits with room to spare, else q4k. candle's CPU backend has no bf16
///   GEMM, so 16-bit weights are both bigger and slower there than quantized ones.
/// - GPUs: bf16 (tensor cores; closest to the reference) when it fits, else q8_0, else q4k.
pub fn default_weights(checkpoint_bytes: u64, gpu: bool, free: Option<u64>) -> WeightType {
    if checkpoint_bytes <= SMALL_CHECKPOINT {
        return WeightType::F32;
    }
    let (choices, headroom): (&[WeightType], f64) = if gpu {
        (&[WeightType::BF16, WeightType::Q8_0], 1.15)
    } else {
        (&[WeightType::Q8_0], 1.3)
    };
    let fits = |wt: WeightType| {
        free.is_some_and(|f| f as f64 > in_memory_bytes(checkpoint_bytes, wt) as f64 * headroom)
    };
    match free {
        // Unknown free memory on a GPU: assume a card made for such models.
        None if gpu => WeightType::BF16,
        _ => choices
            .iter()
            .copied()
            .find(|&wt| fits(wt))
            .unwrap_or(WeightType::Q4K),
    }
}

/// About how many bytes a 16-bit checkpoint of `checkpoint_bytes` takes in memory as `wt`.
pub fn in_memory_bytes(checkpoint_bytes: u64, wt: WeightType) -> u64 {
    let per_16bit = match wt {
        WeightType::F32 => 2.0,
        WeightType::F16 | WeightType::BF16 => 1.0,
        WeightType::Q8_0 => 0.55,
        WeightType::Q4_0 | WeightType::Q4K => 0.3,
    };
    (checkpoint_bytes as f64 * per_16bit) as u64
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

/// Free host memory in bytes (Linux `MemAvailable`); `None` where unknown.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Memory free for the weights on `device`: host memory for the CPU, the card's own for CUDA;
/// `None` where unknown (Metal).
pub fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => available_memory(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64),
        _ => None,
    }
}

/// Running out of memory aborts the process without a word (or, on a GPU, fails deep inside the
/// load), so refuse up front a model with `checkpoint_bytes` of weights ([`weights_bytes`]) that
/// cannot fit on `device` as `wt`.
pub fn check_memory(checkpoint_bytes: u64, wt: WeightType, device: &Device) -> Result<()> {
    let need = in_memory_bytes(checkpoint_bytes, wt);
    let Some(free) = free_memory(device) else {
        return Ok(());
    };
    if need > free {
        let (place, others) = if device.is_cpu() {
            ("", "other programs")
        } else {
            (" on the GPU", "other programs using the GPU")
        };
        let smaller = if wt == WeightType::Q4K || wt == WeightType::Q4_0 {
            String::new()
        } else {
            " or choose a smaller weight type: q4k (`--quant q4k` on the command line, \
             `QWENVL_WEIGHTS=q4k` for the app)"
                .to_string()
        };
        bail!(
            "not enough memory: the model needs about {:.1} GB as {wt}, {:.1} GB are free{place}. \
             Close {others}{smaller}.",
            need as f64 / 1e9,
            free as f64 / 1e9,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;
    /// Qwen-VL-Chat's shards: 19.3 GB of bf16.
    const QWEN_VL_CHAT: u64 = 19_300_000_000;

    #[test]
    fn small_checkpoints_run_exact() {
        for gpu in [false, true] {
            for free in [None, Some(GB / 2), Some(100 * GB)] {
                assert_eq!(default_weights(60 << 20, gpu, free), WeightType::F32);
            }
        }
    }

    #[test]
    fn the_full_model_on_a_cpu_is_quantized_to_fit() {
        // This machine: 24 GB, ~21 free.
        assert_eq!(
            default_weights(QWEN_VL_CHAT, false, Some(21 * GB)),
            WeightType::Q8_0
        );
        // q8_0 (~10.6 GB) without room to spare, or memory unknown: q4k.
        assert_eq!(
            default_weights(QWEN_VL_CHAT, false, Some(12 * GB)),
            WeightType::Q4K
        );
        assert_eq!(default_weights(QWEN_VL_CHAT, false, None), WeightType::Q4K);
        // Never 16-bit or f32 on a CPU, however much memory there is.
        assert_eq!(
            default_weights(QWEN_VL_CHAT, false, Some(512 * GB)),
            WeightType::Q8_0
        );
    }

    #[test]
    fn the_full_model_on_a_gpu_takes_the_largest_type_that_fits() {
        assert_eq!(
            default_weights(QWEN_VL_CHAT, true, Some(80 * GB)),
            WeightType::BF16
        );
        assert_eq!(
            default_weights(QWEN_VL_CHAT, true, Some(16 * GB)),
            WeightType::Q8_0
        );
        assert_eq!(
            default_weights(QWEN_VL_CHAT, true, Some(8 * GB)),
            WeightType::Q4K
        );
        assert_eq!(default_weights(QWEN_VL_CHAT, true, None), WeightType::BF16);
    }

    #[test]
    fn gptq_checkpoints_count_as_their_16_bit_size() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let gptq = fixtures.join("tiny-gptq");
        let n = weights_bytes(&gptq);
        assert!(n > 0);
        assert_eq!(sixteen_bit_bytes(&gptq, n), 3 * n);
        let plain = fixtures.join("tiny-text");
        assert_eq!(sixteen_bit_bytes(&plain, 7), 7);
    }

    #[test]
    fn a_model_too_big_for_memory_is_refused_with_the_numbers() {
        // A sparse file: 1 TB on paper, nothing on disk.
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("model.safetensors")).unwrap();
        f.set_len(1 << 40).unwrap();
        if available_memory().is_none() {
            return; // not Linux: free memory unknown, nothing to compare with
        }
        let bytes = weights_bytes(dir.path());
        assert_eq!(bytes, 1 << 40);
        let err = check_memory(bytes, WeightType::Q8_0, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("not enough memory"), "{err}");
        assert!(err.contains("as q8_0"), "{err}");
        assert!(err.contains("--quant q4k"), "{err}");
        let err = check_memory(bytes, WeightType::Q4K, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("smaller weight type"), "{err}");
    }
}

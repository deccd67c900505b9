//! Loading a Hugging Face Qwen-VL model folder: `config.json`, `generation_config.json`
//! (optional), `qwen.tiktoken` and the weights in any of the layouts the hub uses:
//!
//! * a single `model.safetensors`;
//! * sharded safetensors listed by `model.safetensors.index.json`;
//! * sharded PyTorch pickles `pytorch_model-*.bin` listed by `pytorch_model.bin.index.json` (the
//!   layout `Qwen/Qwen-VL-Chat` ships), or a single `pytorch_model.bin`.
//!
//! Every shard is memory-mapped once; [`Checkpoint::open`] only indexes the tensors (name → shard,
//! dtype, shape, byte range) and validates them against the file sizes. Tensors are created
//! straight from the mapped bytes when requested and converted to the requested dtype.
//! PyTorch pickles go through a restricted interpreter ([`pickle`]) that only understands the
//! objects a `torch.save`d state dict is made of.

mod backend;
mod index;
mod pickle;
mod pth;
mod safetensors;
mod weights;
mod zip;

use backend::Backend;
pub use backend::{LoadProgress, MappedRows, ReadCounter};
use weights::Weights;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::config::{GenerationConfig, QwenConfig};
use crate::error::{Error, Result};

pub use safetensors::MAX_HEADER_LEN as MAX_SAFETENSORS_HEADER_LEN;

/// Parsers of untrusted checkpoint bytes, exposed for fuzzing and hostile-input tests. Each one
/// only indexes (never materialises tensors) and returns the number of tensors found.
pub mod parse {
    use std::path::Path;

    use crate::error::Result;

    /// The name used in error messages for in-memory data.
    const NAME: &str = "<memory>";

    /// Indexes a `.safetensors` file held in memory (header length, JSON header, offsets).
    pub fn safetensors(data: &[u8]) -> Result<usize> {
        super::safetensors::index(Path::new(NAME), data).map(|t| t.len())
    }

    /// Indexes a zip-based torch checkpoint (`pytorch_model.bin`) held in memory: zip directory,
    /// restricted pickle, tensor views against their storages.
    pub fn torch(data: &[u8]) -> Result<usize> {
        super::pth::index(Path::new(NAME), data).map(|t| t.len())
    }

    /// Runs the restricted pickle interpreter over a `data.pkl` held in memory.
    pub fn pickle(data: &[u8]) -> std::result::Result<usize, String> {
        super::pickle::load_state_dict(data).map(|t| t.len())
    }

    /// Lists the entries of a zip archive held in memory.
    pub fn zip(data: &[u8]) -> std::result::Result<usize, String> {
        super::zip::entries(data).map(|e| e.len())
    }

    /// Validates a shard index (`*.index.json`) held in memory; returns the weight map's size.
    pub fn index_json(data: &[u8]) -> Result<usize> {
        super::index::parse_weight_map(Path::new(NAME), data).map(|m| m.len())
    }
}

const CONFIG: &str = "config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const TOKENIZER: &str = "qwen.tiktoken";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const SAFETENSORS: &str = "model.safetensors";
const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";
const PYTORCH: &str = "pytorch_model.bin";

/// How the weights of a checkpoint are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `model.safetensors`.
    Safetensors,
    /// `model.safetensors.index.json` + shards.
    ShardedSafetensors,
    /// `pytorch_model.bin`.
    Pytorch,
    /// `pytorch_model.bin.index.json` + shards.
    ShardedPytorch,
}

impl WeightsFormat {
    fn is_pytorch(self) -> bool {
        matches!(self, Self::Pytorch | Self::ShardedPytorch)
    }
}

/// What the index knows about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Dtype on disk.
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The shard file holding it.
    pub file: PathBuf,
}

/// Where the bytes of a tensor are, relative to the start of its shard file.
#[derive(Debug, Clone)]
pub(crate) enum Span {
    /// Row-major bytes starting at `start`.
    Contiguous { start: usize },
    /// A strided view (in elements) over a storage of `storage_len` bytes starting at `start`.
    Strided {
        start: usize,
        storage_len: usize,
        offset: usize,
        stride: Vec<usize>,
    },
}

/// One tensor as a shard parser reports it.
#[derive(Debug, Clone)]
pub(crate) struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub span: Span,
}

/// Bytes of a dense tensor of `shape` and `dtype`, `None` on overflow.
pub(crate) fn byte_len(shape: &[usize], dtype: DType) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
}

/// An opened model folder: parsed configs plus the indexed, memory-mapped weights.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: QwenConfig,
    pub generation: GenerationConfig,
    weights: Arc<Weights>,
}

impl Checkpoint {
    /// Parses the configs, finds the weights layout, maps the shards and indexes every tensor.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::checkpoint(
                dir,
                "checkpoint folder not found (or not a directory)",
            ));
        }
        let config_path = dir.join(CONFIG);
        if !config_path.is_file() {
            return Err(Error::checkpoint(
                &config_path,
                "not found: not a Hugging Face model folder",
            ));
        }
        let config = QwenConfig::from_file(&config_path)?;
        let generation_path = dir.join(GENERATION_CONFIG);
        let generation = if generation_path.is_file() {
            GenerationConfig::from_file(&generation_path)?
        } else {
            GenerationConfig::default()
        };
        let weights = Weights::open(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            generation,
            weights: Arc::new(weights),
        })
    }

    /// One `VarBuilder` over all shards; tensors are loaded lazily and converted to `dtype`.
    /// Getting an absent tensor or one of another shape fails with an error naming it.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Backend(self.weights.clone(), None)),
            dtype,
            device.clone(),
        )
    }

    /// Like [`var_builder`](Self::var_builder), counting every tensor read into `progress`
    /// (compare with [`total_bytes`](Self::total_bytes)); with the [`ReadCounter`] that counts
    /// into the same `progress` the tensors a load takes without reading them.
    pub fn var_builder_with_progress(
        &self,
        dtype: DType,
        device: &Device,
        progress: Arc<LoadProgress>,
    ) -> (VarBuilder<'static>, ReadCounter) {
        let counter = ReadCounter {
            weights: self.weights.clone(),
            progress,
        };
        let vb = VarBuilder::from_backend(
            Box::new(Backend(self.weights.clone(), Some(counter.clone()))),
            dtype,
            device.clone(),
        );
        (vb, counter)
    }

    /// `qwen.tiktoken` in the checkpoint folder (not checked for existence here).
    pub fn tokenizer_file(&self) -> PathBuf {
        self.dir.join(TOKENIZER)
    }

    /// The checkpoint's tokenizer: Qwen-VL's, or the text-only Qwen's when `config.json` has no
    /// `visual` section (there `<ref>`, `<img>` ... are ordinary text).
    pub fn tokenizer(&self) -> Result<crate::tokenizer::QwenTokenizer> {
        let tok = crate::tokenizer::QwenTokenizer::from_file(&self.tokenizer_file())?;
        Ok(if self.config.has_vision() {
            tok
        } else {
            tok.text_only()
        })
    }

    /// The storage layout found by [`Checkpoint::open`].
    pub fn format(&self) -> WeightsFormat {
        self.weights.format
    }

    pub fn tensor_info(&self, name: &str) -> Option<TensorInfo> {
        self.weights.info(name)
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.weights.tensors.keys().map(String::as_str)
    }

    /// Loads one tensor and converts it to `dtype` on `device`.
    pub fn load_tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.weights.load(name, dtype, device)
    }

    /// `name` (a `[rows, cols]` bf16, f16 or f32 tensor stored row-major) as a table read row by
    /// row from the map; `None` for any other dtype, shape or layout.
    pub fn mapped_rows(&self, name: &str) -> Option<MappedRows> {
        let e = self.weights.tensors.get(name)?;
        let (&[rows, cols], Span::Contiguous { start }) = (e.shape.as_slice(), &e.span) else {
            return None;
        };
        if !matches!(e.dtype, DType::BF16 | DType::F16 | DType::F32) {
            return None;
        }
        let len = byte_len(&e.shape, e.dtype)?;
        let shard = self.weights.shards.get(e.shard)?;
        if start.checked_add(len)? > shard.mmap.len() {
            return None;
        }
        Some(MappedRows {
            weights: self.weights.clone(),
            name: name.to_string(),
            shard: e.shard,
            start: *start,
            rows,
            cols,
            dtype: e.dtype,
        })
    }

    /// Bytes of all tensors as stored (for progress reporting).
    pub fn total_bytes(&self) -> u64 {
        self.weights
            .tensors
            .values()
            .map(|e| byte_len(&e.shape, e.dtype).unwrap_or(0) as u64)
            .sum()
    }
}

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

mod index;
mod pickle;
mod pth;
mod safetensors;
mod zip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
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

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

#[derive(Debug)]
struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    span: Span,
}

/// All shards of a checkpoint, mapped, with the tensor index.
pub(crate) struct Weights {
    dir: PathBuf,
    format: WeightsFormat,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("dir", &self.dir)
            .field("format", &self.format)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Weights {
    fn open(dir: &Path) -> Result<Self> {
        let layouts = [
            (SAFETENSORS_INDEX, WeightsFormat::ShardedSafetensors),
            (SAFETENSORS, WeightsFormat::Safetensors),
            (PYTORCH_INDEX, WeightsFormat::ShardedPytorch),
            (PYTORCH, WeightsFormat::Pytorch),
        ];
        let Some((file, format)) = layouts.iter().find(|(f, _)| dir.join(f).is_file()) else {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "no weights found: looked for {}",
                    layouts.map(|(f, _)| f).join(", ")
                ),
            ));
        };
        let mut weights = Weights {
            dir: dir.to_path_buf(),
            format: *format,
            shards: Vec::new(),
            tensors: BTreeMap::new(),
        };
        match format {
            WeightsFormat::Safetensors | WeightsFormat::Pytorch => {
                for t in weights.add_shard(&dir.join(file))? {
                    weights.insert(t, 0);
                }
            }
            WeightsFormat::ShardedSafetensors | WeightsFormat::ShardedPytorch => {
                weights.open_sharded(&dir.join(file))?
            }
        }
        Ok(weights)
    }

    fn open_sharded(&mut self, index_path: &Path) -> Result<()> {
        let map = index::read_weight_map(index_path)?;
        // Shards in order of first appearance, each opened once.
        let mut shard_of_file: BTreeMap<&str, usize> = BTreeMap::new();
        for (name, file) in &map {
            if shard_of_file.contains_key(file.as_str()) {
                continue;
            }
            let path = self.dir.join(file);
            if !path.is_file() {
                return Err(Error::checkpoint(
                    index_path,
                    format!(
                        "shard {file} (holding tensor `{name}`) not found at {}",
                        path.display()
                    ),
                ));
            }
            let shard = self.shards.len();
            shard_of_file.insert(file, shard);
            for t in self.add_shard(&path)? {
                // A tensor the index assigns to another shard is ignored here.
                if map.get(&t.name).is_none_or(|f| f == file) {
                    self.insert(t, shard);
                }
            }
        }
        for (name, file) in &map {
            if !self.tensors.contains_key(name) {
                return Err(Error::Tensor {
                    name: name.clone(),
                    path: self.dir.join(file),
                    msg: format!(
                        "listed in {} but not present in the shard",
                        index_path.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Maps `path` as the next shard and returns its tensors.
    fn add_shard(&mut self, path: &Path) -> Result<Vec<RawTensor>> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the checkpoint not
        // being truncated or rewritten while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let tensors = if self.format.is_pytorch() {
            pth::index(path, &mmap)?
        } else {
            safetensors::index(path, &mmap)?
        };
        self.shards.push(Shard {
            path: path.to_path_buf(),
            mmap,
        });
        Ok(tensors)
    }

    fn insert(&mut self, t: RawTensor, shard: usize) {
        self.tensors.insert(
            t.name,
            Entry {
                shard,
                dtype: t.dtype,
                shape: t.shape,
                span: t.span,
            },
        );
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            path: self.dir.clone(),
            msg: "not found in the checkpoint".to_string(),
        })
    }

    fn file_of(&self, entry: &Entry) -> &Path {
        self.shards
            .get(entry.shard)
            .map_or(self.dir.as_path(), |s| s.path.as_path())
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let entry = self.tensors.get(name)?;
        Some(TensorInfo {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            file: self.file_of(entry).to_path_buf(),
        })
    }

    /// The tensor `name` in its on-disk dtype, then converted to `dtype` on `device`.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entry(name)?;
        let path = self.file_of(entry);
        let err = |msg: String| Error::Tensor {
            name: name.to_string(),
            path: path.to_path_buf(),
            msg,
        };
        let data: &[u8] = self
            .shards
            .get(entry.shard)
            .map_or(&[], |s| s.mmap.as_ref());
        let nbytes = byte_len(&entry.shape, entry.dtype)
            .ok_or_else(|| err(format!("shape {:?} overflows", entry.shape)))?;
        let past_eof = || {
            err(format!(
                "byte range past the end of the file ({} bytes)",
                data.len()
            ))
        };
        let gathered;
        let bytes = match &entry.span {
            Span::Contiguous { start } => start
                .checked_add(nbytes)
                .and_then(|end| data.get(*start..end))
                .ok_or_else(past_eof)?,
            Span::Strided {
                start,
                storage_len,
                offset,
                stride,
            } => {
                let storage = start
                    .checked_add(*storage_len)
                    .and_then(|end| data.get(*start..end))
                    .ok_or_else(past_eof)?;
                gathered = gather(
                    storage,
                    entry.dtype.size_in_bytes(),
                    &entry.shape,
                    stride,
                    *offset,
                )
                .ok_or_else(|| err("strided view reaches past its storage".to_string()))?;
                gathered.as_slice()
            }
        };
        if let Some(i) = first_non_finite(bytes, entry.dtype) {
            return Err(err(format!(
                "holds a NaN or infinite value (element {i} of shape {:?}): the checkpoint is corrupt",
                entry.shape
            )));
        }
        let t = Tensor::from_raw_buffer(bytes, entry.dtype, &entry.shape, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| err(format!("cannot load as {dtype:?} on {device:?}: {e}")))?;
        let (start, len) = match &entry.span {
            Span::Contiguous { start } => (*start, nbytes),
            Span::Strided {
                start, storage_len, ..
            } => (*start, *storage_len),
        };
        self.release(entry.shard, start, len);
        Ok(t)
    }

    /// Drops the mapped pages of a tensor that has been copied out from this process's resident
    /// set: otherwise every byte of a 19 GB bf16 checkpoint read through the map stays counted in
    /// RSS until the map closes, and a quantized load would peak at the checkpoint's size instead
    /// of the model's. The pages stay in the page cache; a later read faults them back in.
    fn release(&self, shard: usize, start: usize, len: usize) {
        #[cfg(unix)]
        if let Some(s) = self.shards.get(shard) {
            const PAGE: usize = 4096;
            // Whole pages inside the range only: a neighbouring tensor may share the edge pages.
            let (first, end) = (start.next_multiple_of(PAGE), (start + len) / PAGE * PAGE);
            if end > first && end <= s.mmap.len() {
                // SAFETY: the map is a read-only view of a file, so dropped pages read back the
                // same bytes from the file; no borrow of this range outlives the copy above.
                let _ = unsafe {
                    s.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        first,
                        end - first,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (shard, start, len);
    }
}

/// Index of the first NaN or infinity among the little-endian floats `bytes` of `dtype` (integer
/// dtypes have none). Checks the exponent bits only, eight bytes at a time: one pass over the
/// mapped bytes, no conversion (a few GB/s even unoptimised).
fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
    // An element is NaN or infinite when all bits of its exponent (`mask`) are set.
    let (elem, mask): (usize, u64) = match dtype {
        DType::F16 => (2, 0x7C00),
        DType::BF16 => (2, 0x7F80),
        DType::F32 => (4, 0x7F80_0000),
        DType::F64 => (8, 0x7FF0_0000_0000_0000),
        _ => return None,
    };
    let bits = elem * 8;
    let lanes = 8 / elem;
    // The mask in every lane of a word, and the lowest and highest bit of every lane.
    let (mut masks, mut low, mut high) = (0u64, 0u64, 0u64);
    for l in 0..lanes {
        masks |= mask << (l * bits);
        low |= 1 << (l * bits);
        high |= 1 << (l * bits + bits - 1);
    }
    let element = |c: &[u8]| {
        c.iter()
            .enumerate()
            .fold(0u64, |v, (i, &b)| v | u64::from(b) << (8 * i))
    };
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for (wi, w) in words.enumerate() {
        let w = element(w);
        // A lane of `y` is zero exactly for a non-finite element; the classic "has a zero lane"
        // test is exact here because no lane of `y` has its top bit set.
        let y = (w & masks) ^ masks;
        if y.wrapping_sub(low) & !y & high != 0 {
            let lane = (0..lanes).find(|l| (w >> (l * bits)) & mask == mask)?;
            return Some(wi * lanes + lane);
        }
    }
    let done = (bytes.len() - tail.len()) / elem;
    tail.chunks_exact(elem)
        .position(|c| element(c) & mask == mask)
        .map(|i| done + i)
}

/// Copies the strided view `(shape, stride, offset)` of `storage` (elements of `elem` bytes)
/// into row-major order; `None` if an element lies outside the storage.
fn gather(
    storage: &[u8],
    elem: usize,
    shape: &[usize],
    stride: &[usize],
    offset: usize,
) -> Option<Vec<u8>> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let mut out = Vec::with_capacity(numel.checked_mul(elem)?);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let e = idx
            .iter()
            .zip(stride)
            .try_fold(offset, |acc, (&i, &s)| acc.checked_add(i.checked_mul(s)?))?;
        let b = e.checked_mul(elem)?;
        out.extend_from_slice(storage.get(b..b.checked_add(elem)?)?);
        for (i, &n) in idx.iter_mut().zip(shape).rev() {
            *i += 1;
            if *i < n {
                break;
            }
            *i = 0;
        }
    }
    Some(out)
}

/// [`SimpleBackend`] over all shards, so one `VarBuilder` serves the whole model; counting each
/// tensor read when a load reports progress.
struct Backend(Arc<Weights>, Option<ReadCounter>);

/// What a VarBuilder has read so far; a UI thread polls it for a progress bar while a worker loads.
#[derive(Debug, Default)]
pub struct LoadProgress {
    /// Bytes of the tensors read, as stored on disk.
    pub bytes: std::sync::atomic::AtomicU64,
    pub tensors: std::sync::atomic::AtomicU64,
}

impl Backend {
    fn count(&self, name: &str) {
        if let Some(c) = &self.1 {
            c.count(name);
        }
    }
}

/// Counts a checkpoint's tensors into a [`LoadProgress`] by name: those its `VarBuilder` reads,
/// and those a load takes without reading them through it (weights found in the quantized-model
/// cache, the mapped token-embedding table), without which a second start's bar would stay near
/// zero.
#[derive(Clone)]
pub struct ReadCounter {
    weights: Arc<Weights>,
    progress: Arc<LoadProgress>,
}

impl ReadCounter {
    /// Counts `name` (a full tensor name) as read; names the checkpoint lacks count nothing.
    pub fn count(&self, name: &str) {
        if let Some(e) = self.weights.tensors.get(name) {
            return self.add(byte_len(&e.shape, e.dtype).unwrap_or(0) as u64, 1);
        }
        // The resampler's packed `in_proj_weight` is quantized, and cached, as three thirds named
        // `in_proj_q`, `in_proj_k` and `in_proj_v`: each counts a third of its bytes.
        let third = name
            .strip_suffix(".weight")
            .and_then(|n| n.rsplit_once(".in_proj_"))
            .filter(|(_, part)| matches!(*part, "q" | "k" | "v"));
        let Some((prefix, part)) = third else { return };
        if let Some(e) = self
            .weights
            .tensors
            .get(&format!("{prefix}.in_proj_weight"))
        {
            let bytes = byte_len(&e.shape, e.dtype).unwrap_or(0) as u64;
            self.add(bytes / 3, u64::from(part == "q"));
        }
    }

    fn add(&self, bytes: u64, tensors: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.progress.bytes.fetch_add(bytes, Relaxed);
        self.progress.tensors.fetch_add(tensors, Relaxed);
    }
}

impl std::fmt::Debug for ReadCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCounter")
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let entry = self.0.entry(name).map_err(candle_core::Error::wrap)?;
        if entry.shape.as_slice() != s.dims() {
            return Err(candle_core::Error::wrap(Error::Tensor {
                name: name.to_string(),
                path: self.0.file_of(entry).to_path_buf(),
                msg: format!(
                    "wrong shape: expected {:?}, found {:?}",
                    s.dims(),
                    entry.shape
                ),
            }));
        }
        let t = self
            .0
            .load(name, dtype, dev)
            .map_err(candle_core::Error::wrap)?;
        self.count(name);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0
            .load(name, dtype, dev)
            .map_err(candle_core::Error::wrap)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

/// A 2-D tensor read row by row straight from the mapped checkpoint: the token-embedding table of a
/// quantized model. Only the rows looked up are ever paged in, so the 151,936 × 4096 table costs
/// no resident memory up front (instead of 0.66 GB as an 8-bit copy) and its rows stay exact.
#[derive(Clone)]
pub struct MappedRows {
    weights: Arc<Weights>,
    name: String,
    shard: usize,
    start: usize,
    rows: usize,
    cols: usize,
    dtype: DType,
}

impl std::fmt::Debug for MappedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRows")
            .field("name", &self.name)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl MappedRows {
    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Row `i` converted to f32 into `out` (`cols` long). A row out of range, or one holding a
    /// NaN or infinity (a corrupt checkpoint), is an error naming the tensor.
    pub fn row_f32(&self, i: usize, out: &mut [f32]) -> Result<()> {
        let err = |msg: String| Error::Tensor {
            name: self.name.clone(),
            path: self.weights.shards[self.shard].path.clone(),
            msg,
        };
        if i >= self.rows || out.len() != self.cols {
            return Err(err(format!(
                "row {i} of a {}×{} table (into {} values)",
                self.rows,
                self.cols,
                out.len()
            )));
        }
        let size = self.dtype.size_in_bytes();
        let at = self.start + i * self.cols * size;
        let bytes = &self.weights.shards[self.shard].mmap[at..at + self.cols * size];
        if let Some(j) = first_non_finite(bytes, self.dtype) {
            return Err(err(format!(
                "row {i} holds a NaN or infinite value (element {j}): the checkpoint is corrupt"
            )));
        }
        match self.dtype {
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            _ => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The element-by-element definition.
    fn reference(bytes: &[u8], dtype: DType) -> Option<usize> {
        let n = dtype.size_in_bytes();
        bytes.chunks_exact(n).position(|c| match dtype {
            DType::F16 => !half::f16::from_le_bytes([c[0], c[1]]).is_finite(),
            DType::BF16 => !half::bf16::from_le_bytes([c[0], c[1]]).is_finite(),
            DType::F32 => !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite(),
            DType::F64 => !f64::from_le_bytes(c.try_into().unwrap()).is_finite(),
            _ => false,
        })
    }

    #[test]
    fn non_finite_scan_matches_the_definition() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for dtype in [DType::F16, DType::BF16, DType::F32, DType::F64, DType::U8] {
            for len in [0usize, 1, 2, 6, 8, 14, 16, 30, 64, 200] {
                for _ in 0..200 {
                    let mut bytes: Vec<u8> = (0..len).map(|_| (next() % 256) as u8).collect();
                    // Mostly finite data: clear the top exponent bit of every element sometimes.
                    if next() % 2 == 0 {
                        let n = dtype.size_in_bytes();
                        for c in bytes.chunks_mut(n) {
                            if c.len() == n {
                                c[n - 1] &= 0x3F;
                            }
                        }
                        if len > 0 && next() % 2 == 0 {
                            let at = (next() as usize % len) / n * n;
                            if n >= 2 && at + n <= len {
                                bytes[at + n - 1] |= 0x7F;
                                bytes[at + n - 2] |= 0xF0;
                            }
                        }
                    }
                    assert_eq!(
                        first_non_finite(&bytes, dtype),
                        reference(&bytes, dtype),
                        "{dtype:?} {bytes:?}"
                    );
                }
            }
        }
        assert_eq!(
            first_non_finite(&f32::NAN.to_le_bytes(), DType::F32),
            Some(0)
        );
        let v: Vec<u8> = [1.0f32, 2.0, f32::INFINITY]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(&v, DType::F32), Some(2));
    }
}

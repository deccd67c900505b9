//! How the model code reads a checkpoint: a candle `VarBuilder` backend over the mapped
//! weights (counting what is read for a progress bar), and rows of a table read in place.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::byte_len;
use super::weights::{first_non_finite, Weights};
use crate::error::{Error, Result};

/// [`SimpleBackend`] over all shards, so one `VarBuilder` serves the whole model; counting each
/// tensor read when a load reports progress.
pub(super) struct Backend(pub(super) Arc<Weights>, pub(super) Option<ReadCounter>);

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
    pub(super) weights: Arc<Weights>,
    pub(super) progress: Arc<LoadProgress>,
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
    pub(super) weights: Arc<Weights>,
    pub(super) name: String,
    pub(super) shard: usize,
    pub(super) start: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) dtype: DType,
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

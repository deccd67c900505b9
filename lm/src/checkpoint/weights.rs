//! The mapped shards of a checkpoint and the index of every tensor in them: which layout the
//! folder uses, each tensor's shard, dtype, shape and byte range (checked against the file
//! sizes), and reading a tensor out of the mapped bytes (strided views gathered, non-finite
//! values refused).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::error::{Error, Result};

pub(super) struct Shard {
    pub(super) path: PathBuf,
    pub(super) mmap: memmap2::Mmap,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) shard: usize,
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    pub(super) span: Span,
}

/// All shards of a checkpoint, mapped, with the tensor index.
pub(crate) struct Weights {
    pub(super) dir: PathBuf,
    pub(super) format: WeightsFormat,
    pub(super) shards: Vec<Shard>,
    pub(super) tensors: BTreeMap<String, Entry>,
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
    pub(super) fn open(dir: &Path) -> Result<Self> {
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

    pub(super) fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            path: self.dir.clone(),
            msg: "not found in the checkpoint".to_string(),
        })
    }

    pub(super) fn file_of(&self, entry: &Entry) -> &Path {
        self.shards
            .get(entry.shard)
            .map_or(self.dir.as_path(), |s| s.path.as_path())
    }

    pub(super) fn info(&self, name: &str) -> Option<TensorInfo> {
        let entry = self.tensors.get(name)?;
        Some(TensorInfo {
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            file: self.file_of(entry).to_path_buf(),
        })
    }

    /// The tensor `name` in its on-disk dtype, then converted to `dtype` on `device`.
    pub(super) fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
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
    pub(super) fn release(&self, shard: usize, start: usize, len: usize) {
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
pub(super) fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
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
pub(super) fn gather(
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

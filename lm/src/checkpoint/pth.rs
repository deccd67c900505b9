//! Index of a PyTorch `pytorch_model*.bin` (the zip format of `torch.save` since torch 1.6).
//!
//! The archive holds `<prefix>/data.pkl` (the state dict, pickled) and one uncompressed entry
//! `<prefix>/data/<key>` per storage. The pickle is run by the restricted interpreter of
//! [`super::pickle`]; each tensor then becomes a byte range of its storage entry inside the mapped
//! file, so the zip is never copied or decompressed.

use std::collections::HashMap;
use std::path::Path;

use super::pickle::{self, TensorRef};
use super::zip::{self, ZipEntry};
use super::{RawTensor, Span};
use crate::error::{Error, Result};

/// Lists the tensors of the torch archive `path` whose bytes are `data`.
pub(crate) fn index(path: &Path, data: &[u8]) -> Result<Vec<RawTensor>> {
    if !data.starts_with(b"PK\x03\x04") {
        let msg = if data.len() < 4 {
            format!("truncated file ({} bytes)", data.len())
        } else {
            "not a zip-based torch checkpoint (the legacy pre-1.6 torch.save format is not supported; re-save it with a recent torch or convert it to safetensors)".to_string()
        };
        return Err(Error::checkpoint(path, msg));
    }
    let entries = zip::entries(data).map_err(|m| Error::checkpoint(path, m))?;
    // `archive/data.pkl` for current torch, `<file stem>/data.pkl` for older versions.
    let pkl = entries
        .iter()
        .find(|e| e.name.ends_with("/data.pkl") && e.name.matches('/').count() == 1)
        .ok_or_else(|| {
            Error::checkpoint(
                path,
                "no `<archive>/data.pkl` entry: not a torch checkpoint",
            )
        })?;
    let prefix = pkl.name.trim_end_matches("data.pkl");
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let entry_bytes = |e: &ZipEntry| {
        e.start
            .checked_add(e.size)
            .and_then(|end| data.get(e.start..end))
            .ok_or_else(|| {
                Error::checkpoint(
                    path,
                    format!("truncated file: entry {} past the end", e.name),
                )
            })
    };

    if let Some(order) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let order = entry_bytes(order)?;
        if order != b"little" {
            return Err(Error::checkpoint(
                path,
                format!(
                    "byte order {:?} is not supported (only little-endian)",
                    String::from_utf8_lossy(order)
                ),
            ));
        }
    }

    let state = pickle::load_state_dict(entry_bytes(pkl)?)
        .map_err(|m| Error::checkpoint(path, format!("{}: {m}", pkl.name)))?;
    state
        .into_iter()
        .map(|(name, t)| {
            let (dtype, shape, span) =
                tensor_span(prefix, &by_name, &t).map_err(|msg| Error::Tensor {
                    name: name.clone(),
                    path: path.to_path_buf(),
                    msg,
                })?;
            Ok(RawTensor {
                name,
                dtype,
                shape,
                span,
            })
        })
        .collect()
}

type Located = (candle_core::DType, Vec<usize>, Span);

/// Dtype, shape and byte location of the tensor view `t`, validated against its storage entry.
fn tensor_span(
    prefix: &str,
    entries: &HashMap<&str, &ZipEntry>,
    t: &TensorRef,
) -> std::result::Result<Located, String> {
    let ty = &t.storage.ty;
    let dtype = ty
        .dtype
        .ok_or_else(|| format!("unsupported dtype: storage type torch.{}", ty.name))?;
    let entry_name = format!("{prefix}data/{}", t.storage.key);
    let entry = entries
        .get(entry_name.as_str())
        .ok_or_else(|| format!("storage entry {entry_name} missing from the archive"))?;
    let elem = dtype.size_in_bytes();
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| format!("size {v} overflows"));
    let storage_numel = to_usize(t.storage.numel)?;
    let storage_len = storage_numel
        .checked_mul(elem)
        .ok_or_else(|| "storage size overflows".to_string())?;
    if storage_len > entry.size {
        return Err(format!(
            "truncated storage: {entry_name} holds {} bytes but {storage_numel} {dtype:?} elements need {storage_len}",
            entry.size
        ));
    }
    let shape = t
        .size
        .iter()
        .map(|&s| to_usize(s))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let stride = t
        .stride
        .iter()
        .map(|&s| to_usize(s))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let offset = to_usize(t.offset)?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if numel > 0 {
        // Index of the last element the view touches.
        let last = shape
            .iter()
            .zip(&stride)
            .try_fold(offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
        if last.is_none_or(|l| l >= storage_numel) {
            return Err(format!(
                "view (offset {offset}, size {shape:?}, stride {stride:?}) reaches past its storage {entry_name} of {storage_numel} elements"
            ));
        }
    }
    if numel > storage_numel {
        // Only overlapping views (stride 0, `expand`) get here; materialising one could take
        // far more memory than the file, so it is refused.
        return Err(format!(
            "view (size {shape:?}, stride {stride:?}) has more elements than its storage {entry_name} ({storage_numel}); overlapping views are not supported"
        ));
    }
    // Row-major check; strides of size-1 dimensions do not matter.
    let mut expected = 1usize;
    let mut contiguous = true;
    for (&d, &s) in shape.iter().zip(&stride).rev() {
        if d != 1 && s != expected {
            contiguous = false;
        }
        expected = expected.saturating_mul(d);
    }
    let span = if numel == 0 {
        Span::Contiguous { start: entry.start }
    } else if contiguous {
        // No overflow: `offset` lies inside the storage, which lies inside the file.
        Span::Contiguous {
            start: entry.start + offset * elem,
        }
    } else {
        Span::Strided {
            start: entry.start,
            storage_len,
            offset,
            stride,
        }
    };
    Ok((dtype, shape, span))
}

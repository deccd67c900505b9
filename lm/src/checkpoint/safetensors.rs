//! Index of a `.safetensors` file: the JSON header is parsed and validated against the file size,
//! the tensor bytes stay in the memory map.
//!
//! Format: `u64` little-endian header length `n`, `n` bytes of JSON
//! `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`, then the data
//! section the offsets are relative to.

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;

use super::{RawTensor, Span};
use crate::error::{Error, Result};

/// Upper bound on the JSON header, like the `safetensors` crate: a corrupt length must fail fast
/// instead of allocating gigabytes.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Lists the tensors of the safetensors file `path` whose bytes are `data`.
pub(crate) fn index(path: &Path, data: &[u8]) -> Result<Vec<RawTensor>> {
    let len_bytes: [u8; 8] = data
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            Error::checkpoint(
                path,
                format!(
                    "not a safetensors file: {} bytes, too short for the header length",
                    data.len()
                ),
            )
        })?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::checkpoint(
            path,
            format!(
                "safetensors header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes (corrupt file?)"
            ),
        ));
    }
    // Fits in usize: bounded by MAX_HEADER_LEN.
    let header_end = 8 + header_len as usize;
    let header = data.get(8..header_end).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!(
                "truncated safetensors file: header of {header_len} bytes but the file has only {} bytes",
                data.len()
            ),
        )
    })?;
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| Error::checkpoint(path, format!("invalid safetensors header: {e}")))?;
    let data_len = data.len() - header_end;

    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let tensor_err = |msg: String| Error::Tensor {
            name: name.clone(),
            path: path.to_path_buf(),
            msg,
        };
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| tensor_err(format!("invalid safetensors header entry: {e}")))?;
        let dtype = parse_dtype(&entry.dtype)
            .ok_or_else(|| tensor_err(format!("unsupported dtype {}", entry.dtype)))?;
        let (begin, end) = entry.data_offsets;
        let nbytes = super::byte_len(&entry.shape, dtype)
            .ok_or_else(|| tensor_err(format!("shape {:?} overflows", entry.shape)))?;
        if end < begin || end - begin != nbytes {
            return Err(tensor_err(format!(
                "data_offsets [{begin}, {end}] do not match dtype {dtype:?} and shape {:?} ({nbytes} bytes)",
                entry.shape
            )));
        }
        if end > data_len {
            return Err(tensor_err(format!(
                "truncated file: the tensor needs bytes {}..{} but the file has only {} bytes",
                header_end + begin,
                header_end + end,
                data.len()
            )));
        }
        tensors.push(RawTensor {
            name,
            dtype,
            shape: entry.shape,
            span: Span::Contiguous {
                start: header_end + begin,
            },
        });
    }
    Ok(tensors)
}

/// safetensors dtype names that candle can hold.
fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I16" => DType::I16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        _ => return None,
    })
}

//! Shard index files (`model.safetensors.index.json`, `pytorch_model.bin.index.json`): the
//! `weight_map` from tensor name to the shard file holding it.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::Deserialize;

use crate::config::read_json;
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct IndexFile {
    weight_map: Option<BTreeMap<String, String>>,
}

/// Reads the `weight_map` of the index file `path`. Shard names must be plain file names inside
/// the checkpoint folder: an index must not make us map arbitrary files.
pub(crate) fn read_weight_map(path: &Path) -> Result<BTreeMap<String, String>> {
    let index: IndexFile = read_json(path)?;
    check_weight_map(path, index)
}

/// [`read_weight_map`] of index bytes already read; `path` names them in errors.
pub(crate) fn parse_weight_map(path: &Path, data: &[u8]) -> Result<BTreeMap<String, String>> {
    let index: IndexFile = serde_json::from_slice(data).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    check_weight_map(path, index)
}

fn check_weight_map(path: &Path, index: IndexFile) -> Result<BTreeMap<String, String>> {
    let map = index
        .weight_map
        .ok_or_else(|| Error::checkpoint(path, "index file has no \"weight_map\""))?;
    if map.is_empty() {
        return Err(Error::checkpoint(
            path,
            "index file has an empty \"weight_map\"",
        ));
    }
    for (name, file) in &map {
        let mut comps = Path::new(file).components();
        let plain = matches!(
            (comps.next(), comps.next()),
            (Some(Component::Normal(_)), None)
        );
        if !plain {
            return Err(Error::checkpoint(
                path,
                format!("tensor `{name}` points to {file:?}, which is not a file name inside the checkpoint folder"),
            ));
        }
    }
    Ok(map)
}

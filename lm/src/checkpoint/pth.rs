//! PyTorch zip checkpoints (stub).
use std::path::Path;

use super::RawTensor;
use crate::error::{Error, Result};

pub(crate) fn index(path: &Path, _data: &[u8]) -> Result<Vec<RawTensor>> {
    Err(Error::checkpoint(path, "pytorch checkpoints not supported yet"))
}

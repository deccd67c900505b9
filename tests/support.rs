//! Shared helpers for the end-to-end tests: where the fixtures are and how to read them.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

/// `../shared/fixtures` next to the repository (override with `QWENVL_FIXTURES`).
pub fn fixtures_root() -> PathBuf {
    if let Ok(p) = std::env::var("QWENVL_FIXTURES") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// The `tiny-a` checkpoint folder.
pub fn tiny_a() -> PathBuf {
    fixtures_root().join("tiny-a")
}

/// A file under `tiny-a/expected/`.
pub fn expected(name: &str) -> PathBuf {
    tiny_a().join("expected").join(name)
}

/// Parsed JSON of a file under `tiny-a/expected/`.
pub fn expected_json(name: &str) -> serde_json::Value {
    let path = expected(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All tensors of a safetensors file under `tiny-a/expected/`, on the CPU.
pub fn expected_tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = expected(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute elementwise difference of two same-shaped tensors (compared in f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Generators of hostile inputs (broken pictures, bombs, broken checkpoints) for `hostile.rs`
/// and `cli_hostile.rs`.
#[path = "hostile_support.rs"]
pub mod hostile;

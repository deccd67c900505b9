//! Rotary position embeddings with dynamic NTK scaling of the base, and log-n query scaling.

use candle_core::{Device, Result, Tensor};

/// Dynamic-NTK alpha for a prefill of `n` positions (reference: `2^ceil(log2(n / seq_length) + 1) - 1`,
/// at least 1).
pub fn ntk_alpha(n: usize, seq_length: usize) -> f64 {
    let context_value = (n as f64 / seq_length as f64).log2() + 1.0;
    let alpha = 2f64.powf(context_value.ceil()) - 1.0;
    alpha.max(1.0)
}

/// Log-n attention factor of the query at 0-based position `p`.
pub fn logn_factor(p: usize, seq_length: usize) -> f32 {
    let i = p + 1;
    if i > seq_length {
        ((i as f64).ln() / (seq_length as f64).ln()) as f32
    } else {
        1.0
    }
}

/// Rotary tables for absolute positions `[offset, offset + len)`, computed in f32 like the
/// reference (`inv_freq = 1 / base^(2j/d)`, angle = `p * inv_freq`). Returns `(cos, sin)`, each
/// `[len, rot_dim / 2]`.
pub(super) fn rotary_tables(
    rot_dim: usize,
    base: f64,
    offset: usize,
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = rot_dim / 2;
    let base = base as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|j| 1.0 / base.powf((2 * j) as f32 / rot_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for p in offset..offset + len {
        for f in &inv_freq {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (len, half), device)?,
        Tensor::from_vec(sin, (len, half), device)?,
    ))
}

/// Per-forward-pass positional state shared by all layers.
pub(super) struct Positions {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// `[1, 1, T, 1]` log-n factors, `None` when every factor is 1.
    pub(super) logn: Option<Tensor>,
    pub(super) offset: usize,
    /// Number of positions (`T`).
    pub(super) len: usize,
}

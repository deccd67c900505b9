//! How linear weights are held in memory: dense (f32/f16/bf16) or quantized (candle's GGML block
//! formats), chosen at load time. A quantized weight is read from the mapped checkpoint as f32 and
//! quantized at once, so the full-precision model never sits in memory.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// In-memory type of the linear weights (`--quant` / `--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl WeightType {
    pub const ALL: [WeightType; 6] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q8_0,
        WeightType::Q4_0,
        WeightType::Q4K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::F16 => "f16",
            WeightType::BF16 => "bf16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q4K => "q4k",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4K)
    }

    /// The dtype activations are computed in: the dense type itself, f32 for quantized weights.
    pub fn compute_dtype(self) -> DType {
        match self {
            WeightType::F16 => DType::F16,
            WeightType::BF16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The GGML block type for a weight whose rows have `in_dim` elements, falling back to a
    /// block-32 type when k-quants' 256-element blocks do not divide the rows (the vision tower's
    /// width 1664, the tiny fixtures), and to f16 when not even 32 does.
    pub fn ggml_for(self, in_dim: usize) -> Option<GgmlDType> {
        let wanted = match self {
            WeightType::Q8_0 => GgmlDType::Q8_0,
            WeightType::Q4_0 => GgmlDType::Q4_0,
            WeightType::Q4K => GgmlDType::Q4K,
            _ => return None,
        };
        Some(if in_dim.is_multiple_of(wanted.block_size()) {
            wanted
        } else if wanted == GgmlDType::Q4K && in_dim.is_multiple_of(32) {
            GgmlDType::Q4_0
        } else if in_dim.is_multiple_of(32) {
            wanted
        } else {
            GgmlDType::F16
        })
    }
}

impl std::fmt::Display for WeightType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `y = x·Wᵀ + b` with W dense or quantized.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl QLinear {
    /// Loads `weight` (`[out, in]`) and optionally `bias` under `vb`. For quantized types `vb` must
    /// be f32: each weight is materialised in f32 only while it is being quantized.
    pub fn load(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
        wt: WeightType,
    ) -> Result<Self> {
        let w = vb.get((out_dim, in_dim), "weight")?;
        let weight = match wt.ggml_for(in_dim) {
            Some(GgmlDType::F16) => QMatMul::Tensor(w.to_dtype(DType::F16)?),
            Some(g) => QMatMul::from_qtensor(QTensor::quantize(&w, g)?)?,
            None => QMatMul::Tensor(w),
        };
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A dense layer from an existing weight (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self {
            weight: QMatMul::Tensor(weight),
            bias: None,
        }
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            // f16 fallback weights under f32 activations.
            QMatMul::Tensor(w) if w.dtype() != x.dtype() => {
                let w = w.to_dtype(x.dtype())?;
                QMatMul::Tensor(w).forward(x)?
            }
            m => m.forward(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

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

    /// The GGML block type of a quantized weight type.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            WeightType::Q8_0 => Some(GgmlDType::Q8_0),
            WeightType::Q4_0 => Some(GgmlDType::Q4_0),
            WeightType::Q4K => Some(GgmlDType::Q4K),
            _ => None,
        }
    }

    /// Row length a quantized weight with `in_dim` inputs is stored with: rounded up to
    /// [`QUANT_ROW_ALIGN`] (zero columns; the input gets matching zeros), dense weights as they are.
    pub fn stored_in_dim(self, in_dim: usize) -> usize {
        if self.is_quantized() {
            in_dim.next_multiple_of(QUANT_ROW_ALIGN)
        } else {
            in_dim
        }
    }

    /// Bytes of an `[out_dim, in_dim]` weight in this type.
    pub fn weight_bytes(self, in_dim: usize, out_dim: usize) -> u64 {
        let k = self.stored_in_dim(in_dim);
        match self.ggml() {
            Some(g) => (k / g.block_size() * g.type_size() * out_dim) as u64,
            None => (k * out_dim * self.compute_dtype().size_in_bytes()) as u64,
        }
    }
}

/// Quantized rows are padded to a multiple of 256: k-quants need it, and candle's fast CPU kernels
/// for q8_0 take it too (measured: a 1024×1664×4992 q8_0 product runs at 11 GFLOP/s, the same product
/// padded to 1792 columns at 52 GFLOP/s). The vision tower's width 1664 is the case that matters.
pub const QUANT_ROW_ALIGN: usize = 256;

impl std::fmt::Display for WeightType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantizes a `[rows, cols]` weight with every core: rows are independent blocks in the GGML
/// layout, so each thread quantizes a band of rows and the bands' bytes are concatenated.
/// (candle's `QTensor::quantize` is single-threaded; this is what makes a 9.6 B-parameter load
/// take seconds per gigabyte rather than minutes.)
pub fn quantize_rows_parallel(w: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let (rows, cols) = w.dims2()?;
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    if threads == 1 || rows * cols < (1 << 20) || !w.device().is_cpu() {
        return QTensor::quantize(w, dtype);
    }
    let band = rows.div_ceil(threads);
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..rows)
            .step_by(band)
            .map(|r0| {
                s.spawn(move || -> Result<Vec<u8>> {
                    let n = band.min(rows - r0);
                    let q = QTensor::quantize(&w.narrow(0, r0, n)?, dtype)?;
                    Ok(q.data()?.into_owned())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(candle_core::Error::Msg("quantize thread panicked".into())))
            })
            .collect()
    });
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(&p?);
    }
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(bytes),
        w.device(),
        dtype,
    )?;
    QTensor::new(storage, (rows, cols))
}

/// `y = x·Wᵀ + b` with W dense or quantized.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: QMatMul,
    bias: Option<Tensor>,
    /// Zero columns appended to quantized rows (and so to the inputs), see [`QUANT_ROW_ALIGN`].
    pad: usize,
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
        let pad = wt.stored_in_dim(in_dim) - in_dim;
        let weight = match wt.ggml() {
            Some(g) => {
                let w = if pad > 0 {
                    w.pad_with_zeros(1, 0, pad)?
                } else {
                    w
                };
                QMatMul::from_qtensor(quantize_rows_parallel(&w, g)?)?
            }
            None => QMatMul::Tensor(w),
        };
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias, pad })
    }

    /// A dense layer from an existing weight (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self {
            weight: QMatMul::Tensor(weight),
            bias: None,
            pad: 0,
        }
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = if self.pad > 0 {
            let x = x.pad_with_zeros(candle_core::D::Minus1, 0, self.pad)?;
            self.weight.forward(&x)?
        } else {
            self.weight.forward(x)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parallel_quantization_is_byte_identical_to_candles() {
        let w = Tensor::randn(0f32, 0.02, (1000, 2048), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
            let a = QTensor::quantize(&w, dtype).unwrap();
            let b = quantize_rows_parallel(&w, dtype).unwrap();
            assert_eq!(a.shape(), b.shape());
            assert_eq!(a.data().unwrap(), b.data().unwrap(), "{dtype:?}");
        }
    }
}

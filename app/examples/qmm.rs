//! A probe of candle's CPU matmul kernels at the shapes qwenvl runs: dense f32 against the GGML
//! block types, for the vision tower (M = 1024 patches, width 1664 and its 256-padded 1792), the LM
//! prefill (M = 324) and decode (M = 1). `cargo run -p qwenvl --example qmm` prints GFLOP/s; it is
//! how the 256-column row padding of quantized weights was chosen (see `lm::quant`).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let shapes = [
        (1024usize, 1664usize, 4992usize, GgmlDType::Q8_0),
        (1024, 1792, 4992, GgmlDType::Q8_0),
        (1024, 1792, 4992, GgmlDType::Q4K),
        (1024, 1792, 4992, GgmlDType::Q4_0),
        (324, 4096, 11008, GgmlDType::Q4K),
        (324, 4096, 11008, GgmlDType::Q8_0),
        (1, 4096, 11008, GgmlDType::Q4K),
        (1, 4096, 11008, GgmlDType::Q8_0),
    ];
    for (m, k, n, g) in shapes {
        let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, g)?)?;
        let dense = QMatMul::Tensor(w);
        let reps = if m == 1 { 20 } else { 2 };
        let time = |mm: &QMatMul| -> candle_core::Result<f64> {
            let _ = mm.forward(&x)?; // warm-up (and weight repacking)
            let t = Instant::now();
            for _ in 0..reps {
                let _ = mm.forward(&x)?;
            }
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        };
        let (tq, td) = (time(&q)?, time(&dense)?);
        let flop = 2.0 * (m * k * n) as f64;
        println!(
            "{m}x{k}x{n} {g:?}: {:.1} ms, {:.0} GFLOP/s | f32: {:.1} ms, {:.0} GFLOP/s",
            tq * 1e3,
            flop / tq / 1e9,
            td * 1e3,
            flop / td / 1e9
        );
    }
    Ok(())
}

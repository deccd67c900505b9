//! A probe of candle's CPU matmul kernels at the shapes qwenvl runs: dense f32 against the GGML
//! block types, for the vision tower (M = 1024 patches, width 1664 and its 256-padded 1792), the LM
//! prefill (M = 324) and decode (M = 1), and qwenvl's own single-copy q4k/q8_0 kernels
//! (`lm::quant::cpu`) at the same shapes. `cargo run --release -p qwenvl --example qmm` prints
//! GFLOP/s and, for decode, the weight bytes streamed per second; it is how the 256-column row
//! padding of quantized weights was chosen (see `lm::quant`).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use lm::quant::cpu::CpuQWeight;

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
        let dense = QMatMul::Tensor(w.clone());
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
        let ours = match lm::quant::cpu_format(g) {
            Some(f) if k % 256 == 0 => {
                let bytes = QTensor::quantize(&w, g)?.data()?.into_owned();
                let qw = CpuQWeight::from_ggml(f, n, k, &bytes).map_err(candle_core::Error::Msg)?;
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut out = vec![0f32; m * n];
                qw.matmul(&xs, m, &mut out);
                let t = Instant::now();
                for _ in 0..reps {
                    qw.matmul(&xs, m, &mut out);
                }
                let t = t.elapsed().as_secs_f64() / reps as f64;
                format!(
                    " | qwenvl: {:.1} ms, {:.0} GFLOP/s, {:.1} GB/s of weights",
                    t * 1e3,
                    flop / t / 1e9,
                    qw.size_in_bytes() as f64 / t / 1e9
                )
            }
            _ => String::new(),
        };
        println!(
            "{m}x{k}x{n} {g:?}: candle {:.1} ms, {:.0} GFLOP/s | f32: {:.1} ms, {:.0} GFLOP/s{ours}",
            tq * 1e3,
            flop / tq / 1e9,
            td * 1e3,
            flop / td / 1e9
        );
    }
    Ok(())
}

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (m, k, n, g) in [
        (1024usize, 1792usize, 4992usize, GgmlDType::Q8_0),
        (1024, 1792, 4992, GgmlDType::Q4_0),
        (1024, 1664, 4992, GgmlDType::Q8_0),
        (1024, 8192, 1664, GgmlDType::Q8_0),
        (1024, 8192, 1664, GgmlDType::Q4K),
    ] {
        let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, g)?)?;
        let _ = q.forward(&x)?;
        let t = Instant::now();
        let reps = if m == 1 { 20 } else { 2 };
        for _ in 0..reps {
            let _ = q.forward(&x)?;
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let d = QMatMul::Tensor(w.clone());
        let t2 = Instant::now();
        for _ in 0..reps {
            let _ = d.forward(&x)?;
        }
        let s2 = t2.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m}x{k}x{n} {g:?}: {:.1} ms {:.0} GFLOP/s | f32 {:.1} ms {:.0} GFLOP/s",
            s * 1e3,
            2.0 * (m * k * n) as f64 / s / 1e9,
            s2 * 1e3,
            2.0 * (m * k * n) as f64 / s2 / 1e9
        );
    }
    Ok(())
}

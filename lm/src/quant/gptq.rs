//! GPTQ Int4 linear layers as Qwen's `*-Int4` checkpoints ship them (auto-gptq's `QuantLinear`,
//! "gptq" v1 layout): `qweight` (int32 `[in/8, out]`, eight 4-bit values per word, lowest bits
//! first, along the input), `qzeros` (int32 `[groups, out/8]`, eight zeros per word along the
//! output, stored minus one), `scales` (f16 `[groups, out]`) and `g_idx` (int32 `[in]`: the group
//! of each input). The weight is `W[o, i] = scales[g, o] · (q[i, o] − (qzeros[g, o] + 1))` with
//! `g = g_idx[i]`, exactly auto-gptq's dequantisation; any `g_idx` (desc_act) works.
//!
//! The weight is dequantised once at load (in f32, where it is exact) and then held like any
//! checkpoint weight: f32 for the exact path, or quantized into our own tiles by the requested
//! weight type.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

/// Whether `vb` (a linear layer's prefix) holds a GPTQ-packed weight.
pub fn is_packed(vb: &VarBuilder) -> bool {
    vb.contains_tensor("qweight")
}

fn bad(vb: &VarBuilder, msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("{}: GPTQ weight: {msg}", vb.prefix()))
}

/// The dense `[out_dim, in_dim]` f32 weight of a GPTQ layer, in `vb`'s dtype.
pub fn dequantize(vb: &VarBuilder, (out_dim, in_dim): (usize, usize)) -> Result<Tensor> {
    if !in_dim.is_multiple_of(8) || !out_dim.is_multiple_of(8) {
        return Err(bad(
            vb,
            format!("[{out_dim}, {in_dim}] is not in whole 32-bit words"),
        ));
    }
    let get = |shape: &[usize], name: &str, dtype: DType| {
        vb.get_with_hints_dtype(shape, name, Default::default(), dtype)
            .map_err(|e| bad(vb, format!("{name}: {e}")))
    };
    let g_idx = get(&[in_dim], "g_idx", DType::I32)?.to_vec1::<i32>()?;
    // auto-gptq keeps ceil(in / group_size) groups and every one is used, whatever the order.
    let groups = match g_idx.iter().copied().max() {
        Some(g) if g >= 0 && g_idx.iter().all(|&g| g >= 0) => g as usize + 1,
        _ => return Err(bad(vb, "g_idx holds a negative group".into())),
    };
    let qweight = get(&[in_dim / 8, out_dim], "qweight", DType::I32)?;
    let qzeros = get(&[groups, out_dim / 8], "qzeros", DType::I32)?;
    let scales = get(&[groups, out_dim], "scales", DType::F32)?;
    let qweight = qweight.flatten_all()?.to_vec1::<i32>()?;
    let qzeros = qzeros.flatten_all()?.to_vec1::<i32>()?;
    let scales = scales.flatten_all()?.to_vec1::<f32>()?;
    let nibble = |word: i32, k: usize| ((word as u32 >> (4 * k)) & 0xF) as i32;
    let mut w = vec![0f32; out_dim * in_dim];
    for (i, &g) in g_idx.iter().enumerate() {
        let g = g as usize;
        let qrow = &qweight[(i / 8) * out_dim..(i / 8 + 1) * out_dim];
        let zrow = &qzeros[g * (out_dim / 8)..(g + 1) * (out_dim / 8)];
        let srow = &scales[g * out_dim..(g + 1) * out_dim];
        for o in 0..out_dim {
            let q = nibble(qrow[o], i % 8);
            let z = nibble(zrow[o / 8], o % 8) + 1;
            w[o * in_dim + i] = srow[o] * (q - z) as f32;
        }
    }
    Tensor::from_vec(w, (out_dim, in_dim), vb.device())?.to_dtype(vb.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// Packs known values as auto-gptq does and checks every element comes back.
    #[test]
    fn packed_values_come_back_exactly_with_groups_of_128_and_any_g_idx() {
        let (out_dim, in_dim, group) = (16usize, 256usize, 128usize);
        let q = |i: usize, o: usize| ((i * 7 + o * 3) % 16) as i32;
        let z = |g: usize, o: usize| (1 + (g * 5 + o) % 15) as i32;
        let s = |g: usize, o: usize| 0.01 * (1 + g + 2 * o) as f32;
        for desc_act in [false, true] {
            // desc_act: inputs in a permuted order of groups.
            let g_idx: Vec<i32> = (0..in_dim)
                .map(|i| {
                    let g = i / group;
                    (if desc_act {
                        (i * 37 % in_dim) / group
                    } else {
                        g
                    }) as i32
                })
                .collect();
            let groups = in_dim / group;
            let mut qweight = vec![0u32; in_dim / 8 * out_dim];
            for i in 0..in_dim {
                for o in 0..out_dim {
                    qweight[(i / 8) * out_dim + o] |= (q(i, o) as u32) << (4 * (i % 8));
                }
            }
            let mut qzeros = vec![0u32; groups * out_dim / 8];
            let mut scales = vec![0f32; groups * out_dim];
            for g in 0..groups {
                for o in 0..out_dim {
                    qzeros[g * out_dim / 8 + o / 8] |= ((z(g, o) - 1) as u32) << (4 * (o % 8));
                    scales[g * out_dim + o] = s(g, o);
                }
            }
            let dev = Device::Cpu;
            let i32s = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
            let mut ts = HashMap::new();
            ts.insert(
                "l.qweight".to_string(),
                Tensor::from_vec(i32s(&qweight), (in_dim / 8, out_dim), &dev).unwrap(),
            );
            ts.insert(
                "l.qzeros".to_string(),
                Tensor::from_vec(i32s(&qzeros), (groups, out_dim / 8), &dev).unwrap(),
            );
            ts.insert(
                "l.scales".to_string(),
                Tensor::from_vec(scales.clone(), (groups, out_dim), &dev)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap(),
            );
            ts.insert(
                "l.g_idx".to_string(),
                Tensor::from_vec(g_idx.clone(), in_dim, &dev).unwrap(),
            );
            let vb = VarBuilder::from_tensors(ts, DType::F32, &dev).pp("l");
            assert!(is_packed(&vb));
            let w = dequantize(&vb, (out_dim, in_dim)).unwrap();
            let w = w.to_vec2::<f32>().unwrap();
            for (o, row) in w.iter().enumerate() {
                for (i, &got) in row.iter().enumerate() {
                    let g = g_idx[i] as usize;
                    let scale = half::f16::from_f32(s(g, o)).to_f32();
                    assert_eq!(got, scale * (q(i, o) - z(g, o)) as f32, "[{o}, {i}]");
                }
            }
            // A wrong shape names the tensor.
            let e = dequantize(&vb, (out_dim, in_dim + 8))
                .unwrap_err()
                .to_string();
            assert!(e.contains("l: GPTQ weight: g_idx"), "{e}");
        }
    }
}

//! GPTQ Int4 copies of a checkpoint for the loader's tests: every LM linear layer quantized to 4
//! bits in groups of 128 along its input and packed as auto-gptq packs Qwen's `*-Int4`
//! checkpoints ("gptq" v1: zeros stored minus one), beside a dense copy holding exactly the
//! dequantised weights. Everything else (embeddings, norms, biases, the vision tower) is copied
//! untouched, as in Qwen-VL-Chat-Int4.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

const LAYERS: [&str; 5] = [
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.w1.weight",
    ".mlp.w2.weight",
    ".mlp.c_proj.weight",
];

/// Packs `w` (`[out, in]`, row-major) asymmetrically per (group, output): returns qweight,
/// qzeros, f16 scales, g_idx and the dequantised weight `scale · (q − z)`.
#[allow(clippy::type_complexity)]
fn pack(
    w: &[f32],
    out_dim: usize,
    in_dim: usize,
    group: usize,
) -> (Vec<i32>, Vec<i32>, Vec<half::f16>, Vec<i32>, Vec<f32>) {
    let groups = in_dim.div_ceil(group);
    let mut scales = vec![half::f16::ZERO; groups * out_dim];
    let mut zeros = vec![0i32; groups * out_dim];
    for g in 0..groups {
        for o in 0..out_dim {
            let cols = g * group..((g + 1) * group).min(in_dim);
            let row = &w[o * in_dim..(o + 1) * in_dim];
            let (lo, hi) = cols
                .clone()
                .map(|i| row[i])
                .fold((0f32, 0f32), |(a, b), x| (a.min(x), b.max(x)));
            let s = half::f16::from_f32(((hi - lo) / 15.0).max(1e-6));
            // Zeros 1..=15, as real checkpoints hold (a zero of 0 does not pack in v1).
            let z = (-lo / s.to_f32()).round().clamp(1.0, 15.0) as i32;
            scales[g * out_dim + o] = s;
            zeros[g * out_dim + o] = z;
        }
    }
    let g_idx: Vec<i32> = (0..in_dim).map(|i| (i / group) as i32).collect();
    let mut qweight = vec![0u32; in_dim / 8 * out_dim];
    let mut dense = vec![0f32; out_dim * in_dim];
    for o in 0..out_dim {
        for i in 0..in_dim {
            let g = i / group;
            let s = scales[g * out_dim + o].to_f32();
            let z = zeros[g * out_dim + o];
            let q = ((w[o * in_dim + i] / s).round() as i32 + z).clamp(0, 15);
            qweight[(i / 8) * out_dim + o] |= (q as u32) << (4 * (i % 8));
            dense[o * in_dim + i] = s * (q - z) as f32;
        }
    }
    let mut qzeros = vec![0u32; groups * out_dim / 8];
    for g in 0..groups {
        for o in 0..out_dim {
            qzeros[g * out_dim / 8 + o / 8] |=
                ((zeros[g * out_dim + o] - 1) as u32) << (4 * (o % 8));
        }
    }
    let i32s = |v: Vec<u32>| v.into_iter().map(|x| x as i32).collect();
    (i32s(qweight), i32s(qzeros), scales, g_idx, dense)
}

/// Writes `gptq/` (packed, with a `quantization_config`) and `dense/` (the dequantised weights
/// in f32) from the single-file checkpoint `src`; returns how many layers were packed.
pub fn write_copies(src: &Path, gptq: &Path, dense: &Path) -> usize {
    let dev = Device::Cpu;
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &dev).unwrap();
    let (mut packed, mut plain) = (HashMap::new(), HashMap::new());
    let mut n = 0;
    for (name, t) in tensors {
        let Some(layer) = LAYERS
            .iter()
            .find(|l| name.starts_with("transformer.h.") && name.ends_with(*l))
            .map(|_| name.trim_end_matches(".weight").to_string())
        else {
            plain.insert(name.clone(), t.clone());
            packed.insert(name, t);
            continue;
        };
        n += 1;
        let (out_dim, in_dim) = t.dims2().unwrap();
        let w = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (qw, qz, s, g, d) = pack(&w, out_dim, in_dim, 128);
        let groups = in_dim.div_ceil(128);
        let put = |m: &mut HashMap<String, Tensor>, k: &str, t: Tensor| {
            m.insert(format!("{layer}.{k}"), t);
        };
        put(
            &mut packed,
            "qweight",
            Tensor::from_vec(qw, (in_dim / 8, out_dim), &dev).unwrap(),
        );
        put(
            &mut packed,
            "qzeros",
            Tensor::from_vec(qz, (groups, out_dim / 8), &dev).unwrap(),
        );
        put(
            &mut packed,
            "scales",
            Tensor::from_vec(s, (groups, out_dim), &dev).unwrap(),
        );
        put(
            &mut packed,
            "g_idx",
            Tensor::from_vec(g, in_dim, &dev).unwrap(),
        );
        plain.insert(name, Tensor::from_vec(d, (out_dim, in_dim), &dev).unwrap());
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    for (dir, weights, quantized) in [(gptq, &packed, true), (dense, &plain, false)] {
        std::fs::create_dir_all(dir).unwrap();
        for f in [
            "generation_config.json",
            "qwen.tiktoken",
            "tokenizer_config.json",
        ] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), dir.join(f)).unwrap();
            }
        }
        let mut c = config.clone();
        if quantized {
            c["quantization_config"] = serde_json::json!({"bits": 4, "group_size": 128,
                "desc_act": false, "sym": false, "quant_method": "gptq"});
        }
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(&c).unwrap(),
        )
        .unwrap();
        candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    }
    n
}

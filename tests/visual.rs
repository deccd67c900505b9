//! Golden tests of the vision encoder (`expected/visual.safetensors`, `visual_debug.safetensors`).
//!
//! The reference's own `pixels.<key>` are fed to isolate the encoder from preprocessing; one test
//! runs from the image files; one checks that a batch equals one-at-a-time runs.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use qwenvl_e2e::{expected_tensors, max_abs_diff, tiny_a};
use vision::{Config, VisualEncoder};

/// Absolute tolerance on every vision stage (README §8 suggests ~1e-4).
const TOL: f32 = 1e-4;

const IMAGES: [(&str, &str); 7] = [
    ("photo", "images/photo_640x480.jpg"),
    ("screenshot", "images/screenshot_1200x300.png"),
    ("portrait", "images/portrait_300x900.jpg"),
    ("tiny", "images/tiny_50x40.png"),
    ("rgba", "images/rgba_400x400.png"),
    ("gray", "images/gray_256x192.png"),
    ("palette", "images/palette_320x240.png"),
];

fn encoder(dtype: DType) -> VisualEncoder {
    let ckpt = lm::Checkpoint::open(&tiny_a()).unwrap_or_else(|e| panic!("{e}"));
    let visual = ckpt
        .config
        .visual
        .clone()
        .expect("config.json has a visual section");
    let cfg: Config = serde_json::from_value(visual).unwrap();
    let vb = ckpt.var_builder(dtype, &Device::Cpu);
    VisualEncoder::new(&cfg, vb.pp("transformer").pp("visual")).unwrap_or_else(|e| panic!("{e}"))
}

fn pixels() -> HashMap<String, Tensor> {
    expected_tensors("preprocess.safetensors")
}

#[test]
fn config_is_parsed_from_the_checkpoint() {
    let enc = encoder(DType::F32);
    let cfg = enc.config();
    assert_eq!(
        (
            cfg.heads,
            cfg.image_size,
            cfg.layers,
            cfg.patch_size,
            cfg.width,
            cfg.output_dim
        ),
        (4, 448, 2, 14, 64, 128)
    );
    assert_eq!(cfg.image_start_id, 151857);
    assert_eq!(
        (cfg.grid_size(), cfg.mlp_width(), cfg.head_dim()),
        (32, 315, 16)
    );
    assert_eq!(cfg.resampler_heads(), 1);
}

#[test]
fn every_debug_stage_of_the_photo_matches() {
    let enc = encoder(DType::F32);
    let golden = expected_tensors("visual_debug.safetensors");
    let px = pixels()["pixels.photo"].unsqueeze(0).unwrap();
    let (out, debug) = enc.forward_debug(&px).unwrap();
    let mut names: Vec<&String> = golden.keys().collect();
    names.sort();
    let mut worst = 0f32;
    for name in names {
        let ours = debug
            .get(name)
            .unwrap_or_else(|| panic!("stage {name} not recorded"));
        // Per-token stages carry the batch dimension; position tables do not.
        let ours = if ours.rank() == 3 {
            ours.get(0).unwrap()
        } else {
            ours.clone()
        };
        let d = max_abs_diff(&ours, &golden[name]);
        println!("{name:28} {:?} max abs diff {d:.3e}", ours.dims());
        assert!(d <= TOL, "{name}: {d}");
        worst = worst.max(d);
    }
    println!("worst stage diff {worst:.3e}");
    // The debug run is the plain forward pass with taps: same output, bit for bit.
    assert_eq!(max_abs_diff(&out, debug.get("final").unwrap()), 0.0);
    assert_eq!(max_abs_diff(&out, &enc.forward(&px).unwrap()), 0.0);
}

#[test]
fn every_image_matches_from_reference_pixels() {
    let enc = encoder(DType::F32);
    let px = pixels();
    let golden = expected_tensors("visual.safetensors");
    for (key, _) in IMAGES {
        let out = enc
            .forward(&px[&format!("pixels.{key}")].unsqueeze(0).unwrap())
            .unwrap();
        assert_eq!(out.dims(), &[1, 256, 128]);
        let d = max_abs_diff(&out.get(0).unwrap(), &golden[&format!("visual.{key}")]);
        println!("{key:10} max abs diff {d:.3e}");
        assert!(d <= TOL, "{key}: {d}");
    }
}

#[test]
fn end_to_end_from_the_image_files() {
    let enc = encoder(DType::F32);
    let golden = expected_tensors("visual.safetensors");
    let size = enc.config().image_size;
    for (key, path) in IMAGES {
        let img = vision::load_rgb(&tiny_a().join(path)).unwrap();
        let px = vision::preprocess(&img, size)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let out = enc.forward(&px).unwrap();
        let d = max_abs_diff(&out.get(0).unwrap(), &golden[&format!("visual.{key}")]);
        println!("{key:10} (from {path}) max abs diff {d:.3e}");
        assert!(d <= TOL, "{key}: {d}");
    }
}

#[test]
fn batch_equals_one_at_a_time() {
    let enc = encoder(DType::F32);
    let px = pixels();
    let singles: Vec<Tensor> = IMAGES
        .iter()
        .map(|(key, _)| px[&format!("pixels.{key}")].clone())
        .collect();
    let batch = enc.forward(&Tensor::stack(&singles, 0).unwrap()).unwrap();
    assert_eq!(batch.dims(), &[IMAGES.len(), 256, 128]);
    let mut worst = 0f32;
    for (i, single) in singles.iter().enumerate() {
        let alone = enc.forward(&single.unsqueeze(0).unwrap()).unwrap();
        let d = max_abs_diff(&batch.get(i).unwrap(), &alone.get(0).unwrap());
        worst = worst.max(d);
    }
    println!("batched vs single max abs diff {worst:.3e}");
    assert!(worst <= 1e-5, "{worst}");
}

#[test]
fn half_precision_runs_close_to_f32() {
    let px = pixels()["pixels.photo"].unsqueeze(0).unwrap();
    let reference = encoder(DType::F32).forward(&px).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let out = encoder(dtype).forward(&px).unwrap();
        assert_eq!(out.dtype(), dtype);
        let out = out.to_dtype(DType::F32).unwrap();
        let err = (&out - &reference)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let rms = reference.sqr().unwrap().mean_all().unwrap();
        let rel = (err.to_scalar::<f32>().unwrap() / rms.to_scalar::<f32>().unwrap()).sqrt();
        println!("{dtype:?}: relative RMS error vs f32 {rel:.3e}");
        assert!(rel < 0.05, "{dtype:?}: {rel}");
    }
}

//! Golden tests of decoding and preprocessing (`expected/preprocess.safetensors`).
//!
//! * JPEG decoding vs Pillow/libjpeg (`decoded_rgb.<key>`): exact (we decode with libjpeg-turbo
//!   too; a foreign decoder such as zune-jpeg differs by up to 4 steps on the photo).
//! * Resize + normalise of the reference's own decoded pixels: exactly `pixels.<key>`.
//! * Whole path from the file: exact for PNGs and JPEGs, also compared as 8-bit levels.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use qwenvl_e2e::{expected_tensors, max_abs_diff, tiny_a};
use vision::image::RgbImage;

/// Key, path and size (w, h) of every image of README §1.4.
const IMAGES: [(&str, &str, (u32, u32)); 7] = [
    ("photo", "images/photo_640x480.jpg", (640, 480)),
    ("screenshot", "images/screenshot_1200x300.png", (1200, 300)),
    ("portrait", "images/portrait_300x900.jpg", (300, 900)),
    ("tiny", "images/tiny_50x40.png", (50, 40)),
    ("rgba", "images/rgba_400x400.png", (400, 400)),
    ("gray", "images/gray_256x192.png", (256, 192)),
    ("palette", "images/palette_320x240.png", (320, 240)),
];

const IMAGE_SIZE: usize = 448;

fn is_jpeg(path: &str) -> bool {
    path.ends_with(".jpg")
}

fn golden() -> HashMap<String, Tensor> {
    expected_tensors("preprocess.safetensors")
}

fn load(path: &str) -> RgbImage {
    let file = tiny_a().join(path);
    vision::load_rgb(&file).unwrap_or_else(|e| panic!("{e}"))
}

/// `decoded_rgb.<key>` (uint8 `[H, W, 3]`) as an image.
fn reference_decode(golden: &HashMap<String, Tensor>, key: &str) -> RgbImage {
    let t = &golden[&format!("decoded_rgb.{key}")];
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3);
    let data: Vec<u8> = t.flatten_all().unwrap().to_vec1().unwrap();
    RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

/// Largest per-sample difference of two same-sized images, and how many samples differ.
fn image_diff(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .fold((0, 0), |(max, n), (x, y)| {
            let d = x.abs_diff(*y);
            (max.max(d), n + usize::from(d != 0))
        })
}

/// The 8-bit levels behind a normalised `[3, S, S]` tensor; asserts that every value is exactly
/// the normalisation of an integer level (README §2.5).
fn levels(pixels: &Tensor) -> Vec<i32> {
    let (c, h, w) = pixels.dims3().unwrap();
    let data: Vec<f32> = pixels.flatten_all().unwrap().to_vec1().unwrap();
    let mut out = Vec::with_capacity(data.len());
    for (i, &v) in data.iter().enumerate() {
        let ch = i / (h * w);
        let k = vision::denormalize_sample(ch, v);
        assert!((0..=255).contains(&k), "value {v} is no 8-bit level");
        out.push(k);
    }
    // Re-normalising the recovered levels must give the values back bit for bit.
    let rebuilt = RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let i = y as usize * w + x as usize;
        vision::image::Rgb(std::array::from_fn(|ch| out[ch * h * w + i] as u8))
    });
    assert_eq!(c, 3);
    let back = vision::normalize(&rebuilt).unwrap();
    assert_eq!(max_abs_diff(&back, pixels), 0.0, "levels are not exact");
    out
}

#[test]
fn decoded_sizes_match_the_table() {
    for (key, path, size) in IMAGES {
        assert_eq!(load(path).dimensions(), size, "{key}");
    }
}

#[test]
fn jpeg_decoding_matches_pillow_exactly() {
    let golden = golden();
    for (key, path, _) in IMAGES.iter().filter(|(_, p, _)| is_jpeg(p)) {
        let ours = load(path);
        let reference = reference_decode(&golden, key);
        let (max, n) = image_diff(&ours, &reference);
        let total = ours.as_raw().len();
        println!("{key}: decoded max diff {max} ({n} of {total} samples differ)");
        assert_eq!(
            max, 0,
            "{key}: JPEG decode differs by {max} steps in {n} samples"
        );
    }
}

#[test]
fn resize_and_normalise_of_reference_decode_is_exact() {
    let golden = golden();
    for (key, path, _) in IMAGES.iter().filter(|(_, p, _)| is_jpeg(p)) {
        let img = reference_decode(&golden, key);
        let ours = vision::preprocess(&img, IMAGE_SIZE).unwrap();
        let expect = &golden[&format!("pixels.{key}")];
        assert_eq!(ours.dtype(), DType::F32);
        assert_eq!(ours.dims(), &[3, IMAGE_SIZE, IMAGE_SIZE]);
        let d = max_abs_diff(&ours, expect);
        println!("{key} ({path}): resize+normalise of decoded_rgb max diff {d}");
        assert_eq!(d, 0.0, "{key}");
    }
}

#[test]
fn png_full_path_is_exact() {
    let golden = golden();
    for (key, path, _) in IMAGES.iter().filter(|(_, p, _)| !is_jpeg(p)) {
        let ours = vision::preprocess(&load(path), IMAGE_SIZE).unwrap();
        let d = max_abs_diff(&ours, &golden[&format!("pixels.{key}")]);
        println!("{key}: full path max diff {d}");
        assert_eq!(d, 0.0, "{key}");
    }
}

#[test]
fn jpeg_full_path_is_exact() {
    let golden = golden();
    for (key, path, _) in IMAGES.iter().filter(|(_, p, _)| is_jpeg(p)) {
        let ours = vision::preprocess(&load(path), IMAGE_SIZE).unwrap();
        let expect = &golden[&format!("pixels.{key}")];
        let (a, b) = (levels(&ours), levels(expect));
        let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).max().unwrap();
        let n = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        println!(
            "{key}: full path max diff {max} uint8 steps ({n} of {} samples), {} in f32",
            a.len(),
            max_abs_diff(&ours, expect)
        );
        assert_eq!(max, 0, "{key}: {max} steps");
        assert_eq!(max_abs_diff(&ours, expect), 0.0, "{key}");
    }
}

#[test]
fn golden_pixels_are_normalised_levels() {
    let golden = golden();
    for (key, _, _) in IMAGES {
        let levels = levels(&golden[&format!("pixels.{key}")]);
        assert_eq!(levels.len(), 3 * IMAGE_SIZE * IMAGE_SIZE);
    }
}

#[test]
fn format_comes_from_content_not_extension() {
    let png = std::fs::read(tiny_a().join("images/tiny_50x40.png")).unwrap();
    let jpg = std::fs::read(tiny_a().join("images/photo_640x480.jpg")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("really_png.jpg"),
        dir.path().join("really_jpeg"),
    );
    std::fs::write(&a, &png).unwrap();
    std::fs::write(&b, &jpg).unwrap();
    assert_eq!(vision::load_rgb(&a).unwrap(), load("images/tiny_50x40.png"));
    assert_eq!(
        vision::load_rgb(&b).unwrap(),
        load("images/photo_640x480.jpg")
    );
    assert_eq!(
        vision::decode_rgb(&png, "clipboard").unwrap(),
        load("images/tiny_50x40.png")
    );
}

#[test]
fn errors_name_the_image() {
    let missing = tiny_a().join("images/does_not_exist.png");
    let e = vision::load_rgb(&missing).unwrap_err().to_string();
    assert!(e.contains("does_not_exist.png"), "{e}");

    let e = vision::decode_rgb(b"definitely not a picture", "paste-1").unwrap_err();
    assert!(matches!(e, vision::Error::UnknownFormat { .. }), "{e}");
    assert!(e.to_string().contains("paste-1"), "{e}");

    // A truncated PNG: recognised, but undecodable.
    let png = std::fs::read(tiny_a().join("images/screenshot_1200x300.png")).unwrap();
    let e = vision::decode_rgb(&png[..png.len() / 2], "half.png").unwrap_err();
    assert!(matches!(e, vision::Error::Decode { .. }), "{e}");
    assert!(e.to_string().contains("half.png"), "{e}");
}

#[test]
fn truncated_jpeg_is_refused_like_pillow() {
    let jpg = std::fs::read(tiny_a().join("images/photo_640x480.jpg")).unwrap();
    let e = vision::decode_rgb(&jpg[..jpg.len() * 2 / 3], "cut.jpg").unwrap_err();
    assert!(matches!(e, vision::Error::Jpeg { .. }), "{e}");
    assert!(
        e.to_string().contains("cut.jpg") && e.to_string().contains("truncated"),
        "{e}"
    );
    let e = vision::decode_rgb(&jpg[..100], "header-only.jpg").unwrap_err();
    assert!(e.to_string().contains("header-only.jpg"), "{e}");
}

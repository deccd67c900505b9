//! Generators of hostile inputs shared by `hostile.rs` (library API) and `cli_hostile.rs` (CLI):
//! broken pictures, decompression bombs, broken checkpoints and pickles. Everything is built in
//! memory; nothing here is a stored blob.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use vision::image::{self, DynamicImage, ImageFormat, RgbImage};

/// The formats the decoder accepts, all of which `image` can also write.
pub const ALL_FORMATS: [ImageFormat; 6] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::Gif,
    ImageFormat::WebP,
    ImageFormat::Bmp,
    ImageFormat::Tiff,
];

/// A deterministic generator, so failures reproduce.
pub struct Lcg(pub u64);
impl Lcg {
    pub fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// A `w` x `h` colour gradient with some noise.
pub fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x * 7 + y * 13) % 256) as u8,
        ])
    })
}

/// `img` encoded as `fmt`.
pub fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt)
        .expect("encoding a test picture");
    out.into_inner()
}

/// A valid 8x8 PNG whose IHDR (with a correct CRC) announces `w` x `h`.
pub fn png_with_size(w: u32, h: u32) -> Vec<u8> {
    let mut data = encode(&DynamicImage::ImageRgb8(gradient(8, 8)), ImageFormat::Png);
    data[16..20].copy_from_slice(&w.to_be_bytes());
    data[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&data[12..29]);
    data[29..33].copy_from_slice(&crc.to_be_bytes());
    data
}

/// Offset of the JPEG start-of-frame marker (SOF0/SOF1/SOF2).
pub fn find_sof(jpg: &[u8]) -> Option<usize> {
    jpg.windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
}

/// A small JPEG whose frame header announces `w` x `h`.
pub fn jpeg_with_size(w: u16, h: u16) -> Vec<u8> {
    let mut data = encode(
        &DynamicImage::ImageRgb8(gradient(16, 16)),
        ImageFormat::Jpeg,
    );
    let sof = find_sof(&data).expect("SOF");
    data[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    data[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    data
}

/// A GIF with only a logical screen of `w` x `h` and no frame.
pub fn gif_screen_only(w: u16, h: u16) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    g.extend_from_slice(&[0, 0, 0, b';']);
    g
}

/// A GIF whose screen and single frame are `w` x `h`, with a few bytes of LZW data.
pub fn gif_bomb(w: u16, h: u16) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    // Global colour table of 2 entries.
    g.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
    g.push(b',');
    g.extend_from_slice(&[0, 0, 0, 0]);
    g.extend_from_slice(&w.to_le_bytes());
    g.extend_from_slice(&h.to_le_bytes());
    g.push(0);
    g.extend_from_slice(&[2, 2, 0x4C, 0x01, 0, b';']);
    g
}

/// A BMP file header + BITMAPINFOHEADER announcing `w` x `h` 24-bit pixels, with 16 pixel bytes.
pub fn bmp_header(w: i32, h: i32) -> Vec<u8> {
    let mut b = b"BM".to_vec();
    b.extend_from_slice(&(54u32 + 16).to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0; 24]);
    b.extend_from_slice(&[0x55; 16]);
    b
}

/// A little-endian baseline TIFF announcing `w` x `h` 8-bit RGB in one uncompressed strip.
pub fn tiff_header(w: u32, h: u32) -> Vec<u8> {
    let mut t = b"II*\0".to_vec();
    t.extend_from_slice(&8u32.to_le_bytes());
    let entries: [(u16, u16, u32, u32); 9] = [
        (256, 4, 1, w),                 // ImageWidth (LONG)
        (257, 4, 1, h),                 // ImageLength
        (258, 3, 1, 8),                 // BitsPerSample
        (259, 3, 1, 1),                 // Compression: none
        (262, 3, 1, 1),                 // Photometric: BlackIsZero
        (273, 4, 1, 200),               // StripOffsets
        (277, 3, 1, 1),                 // SamplesPerPixel
        (278, 4, 1, h),                 // RowsPerStrip
        (279, 4, 1, w.wrapping_mul(h)), // StripByteCounts
    ];
    t.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, ty, count, value) in entries {
        t.extend_from_slice(&tag.to_le_bytes());
        t.extend_from_slice(&ty.to_le_bytes());
        t.extend_from_slice(&count.to_le_bytes());
        if ty == 3 {
            t.extend_from_slice(&(value as u16).to_le_bytes());
            t.extend_from_slice(&[0, 0]);
        } else {
            t.extend_from_slice(&value.to_le_bytes());
        }
    }
    t.extend_from_slice(&0u32.to_le_bytes());
    t.resize(264, 0x77);
    t
}

/// An extended WebP (VP8X) whose canvas is `w` x `h`, followed by a tiny lossless frame.
pub fn webp_vp8x(w: u32, h: u32) -> Vec<u8> {
    let lossless = encode(&DynamicImage::ImageRgb8(gradient(4, 4)), ImageFormat::WebP);
    // The VP8L chunk of the small picture (after "RIFF" size "WEBP").
    let frame = &lossless[12..];
    let mut chunk = b"VP8X".to_vec();
    chunk.extend_from_slice(&10u32.to_le_bytes());
    chunk.extend_from_slice(&[0, 0, 0, 0]);
    chunk.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    chunk.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    let mut body = b"WEBP".to_vec();
    body.extend_from_slice(&chunk);
    body.extend_from_slice(frame);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// An 8x8 animated GIF, one frame per colour.
pub fn animated_gif(colours: &[[u8; 3]]) -> Vec<u8> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut out);
        enc.set_repeat(Repeat::Infinite).expect("repeat");
        for c in colours {
            let frame = image::RgbaImage::from_pixel(8, 8, image::Rgba([c[0], c[1], c[2], 255]));
            enc.encode_frame(image::Frame::new(frame)).expect("frame");
        }
    }
    out
}

/// `jpg` with an APP1 Exif segment (orientation tag = `orientation`) right after SOI.
pub fn with_exif_orientation(jpg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0*".to_vec();
    tiff.extend_from_slice(&8u32.to_be_bytes());
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes());
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff);
    let mut out = jpg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpg[2..]);
    out
}

/// A FIFO in `dir` (through `mkfifo`), `None` where that tool is missing.
pub fn make_fifo(dir: &Path) -> Option<PathBuf> {
    let path = dir.join("pipe.png");
    let ok = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(path)
}

/// A temporary model folder with tiny-a's configs and tokenizer but no weights.
pub fn model_dir_without_weights() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "generation_config.json", "qwen.tiktoken"] {
        std::fs::copy(crate::tiny_a().join(f), dir.path().join(f)).expect("copy fixture file");
    }
    dir
}

/// A safetensors file of 1-D... shaped f32 tensors: each `(name, values)` becomes shape
/// `[2, len / 2]` when `len` is even and > 1, else `[len]`.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<f32>)]) {
    let shapes: Vec<Vec<usize>> = tensors
        .iter()
        .map(|(_, values)| {
            if values.len() > 1 && values.len() % 2 == 0 {
                vec![2, values.len() / 2]
            } else {
                vec![values.len()]
            }
        })
        .collect();
    let entries: Vec<(&str, &str, &[usize], u64)> = tensors
        .iter()
        .zip(&shapes)
        .map(|((name, values), shape)| (*name, "F32", &shape[..], 4 * values.len() as u64))
        .collect();
    let mut out = lm::dev::safetensors_header(&entries, None);
    for (_, values) in tensors {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, out).expect("write safetensors");
}

/// A safetensors file from a header string and the data section.
pub fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// `torch.save({"w": tensor})`: one tensor of `size` (row-major) over a storage
/// `torch.<storage>` with key "0" of `numel` elements.
pub fn state_dict_pickle(storage: &str, numel: u8, size: [u8; 2]) -> Vec<u8> {
    let size = [size[0] as u64, size[1] as u64];
    lm::dev::state_dict_pickle(&[lm::dev::TensorEntry {
        numel: numel as u64,
        ..lm::dev::TensorEntry::contiguous("w", storage, "0", &size)
    }])
}

/// A pickle that calls `module.name("id")`, the classic code-execution payload.
pub fn evil_pickle(module: &str, name: &str) -> Vec<u8> {
    let mut p = lm::dev::Pickler::new();
    p.global(module, name);
    p.out.push(b'(');
    p.string("id");
    p.out.extend_from_slice(b"tR");
    p.finish()
}

/// A torch zip archive (`archive/data.pkl`, `archive/byteorder`, `archive/data/0` with
/// `storage_bytes` bytes), stored, like `torch.save` writes it.
pub fn torch_zip(pickle: &[u8], storage_bytes: usize) -> Vec<u8> {
    let storage: Vec<u8> = (0..storage_bytes).map(|i| (i % 7) as u8).collect();
    lm::dev::zip_bytes(&[
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little"),
        ("archive/data/0", &storage),
    ])
}

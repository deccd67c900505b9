//! Decoding pictures into 8-bit RGB the way the reference does: `PIL.Image.open(path).convert("RGB")`.
//!
//! * The format is recognised from the content (magic bytes), never from the file extension.
//! * The decoder runs with explicit limits ([`MAX_IMAGE_SIDE`], [`MAX_DECODE_ALLOC`]) so a tiny
//!   file announcing a gigantic picture (a decompression bomb) fails before allocating.
//! * The RGB conversion follows Pillow: alpha is dropped (not composited over a background),
//!   grey is replicated into R, G and B, palette indices are looked up (the decoder expands them).
//!   16-bit samples follow Pillow too: RGB(A) and grey+alpha keep the high byte (`v >> 8`, Pillow's
//!   `;16B` unpackers), while plain 16-bit grey opens as an integer image in Pillow whose conversion
//!   to RGB *clips* (`min(v, 255)`), which is what we do. Floating-point images (HDR TIFFs) have no
//!   Pillow equivalent in the supported formats; they go through `image`'s own conversion.
//! * EXIF orientation is ignored, as in the reference.
//!
//! Known decoder-level differences from Pillow: JPEG is decoded by `zune-jpeg` instead of libjpeg
//! (chroma upsampling and IDCT may differ by one 8-bit step here and there); GIF is the first frame
//! with transparent pixels as the decoder leaves them; CMYK JPEGs use the decoder's CMYK→RGB.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::Path;

use image::{DynamicImage, ImageError, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Largest accepted width and height of a decoded picture.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// Largest allocation the decoder may make for one picture (1 GiB).
pub const MAX_DECODE_ALLOC: u64 = 1 << 30;

/// The decoder limits used by [`load_rgb`] and [`decode_rgb`].
pub fn decoder_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    limits
}

/// Reads and decodes the picture at `path` into 8-bit RGB (Pillow's `convert("RGB")`).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| Error::Read {
        name: name.clone(),
        source,
    })?;
    decode_reader(BufReader::new(file), &name)
}

/// Decodes an encoded picture held in memory (clipboard, network); `name` is used in errors only.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    decode_reader(Cursor::new(bytes), name)
}

fn decode_reader<R: BufRead + Seek>(reader: R, name: &str) -> Result<RgbImage> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|source| Error::Read {
            name: name.to_string(),
            source,
        })?;
    if reader.format().is_none() {
        return Err(Error::UnknownFormat {
            name: name.to_string(),
        });
    }
    reader.limits(decoder_limits());
    let img = reader.decode().map_err(|e| decode_error(e, name))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::Empty {
            name: name.to_string(),
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(to_rgb8_like_pil(img))
}

fn decode_error(source: ImageError, name: &str) -> Error {
    let name = name.to_string();
    match source {
        ImageError::Limits(_) => Error::TooLarge {
            name,
            max_side: MAX_IMAGE_SIDE,
            max_alloc_mib: MAX_DECODE_ALLOC >> 20,
            source,
        },
        ImageError::IoError(e) => Error::Read { name, source: e },
        source => Error::Decode { name, source },
    }
}

/// Converts a decoded picture to 8-bit RGB exactly like Pillow's `convert("RGB")` of the image
/// Pillow would have opened (see the module documentation for the 16-bit rules).
pub fn to_rgb8_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(c) => repack(w, h, c.as_raw(), 4, false, |v| v),
        DynamicImage::ImageLuma8(g) => repack(w, h, g.as_raw(), 1, true, |v| v),
        DynamicImage::ImageLumaA8(g) => repack(w, h, g.as_raw(), 2, true, |v| v),
        // Pillow: mode "I" (or "I;16"), whose RGB conversion clips to 0..=255.
        DynamicImage::ImageLuma16(g) => repack(w, h, g.as_raw(), 1, true, |v| v.min(255) as u8),
        // Pillow: "LA;16B" / "RGB;16B" / "RGBA;16B" unpackers keep the most significant byte.
        DynamicImage::ImageLumaA16(g) => repack(w, h, g.as_raw(), 2, true, |v| (v >> 8) as u8),
        DynamicImage::ImageRgb16(c) => repack(w, h, c.as_raw(), 3, false, |v| (v >> 8) as u8),
        DynamicImage::ImageRgba16(c) => repack(w, h, c.as_raw(), 4, false, |v| (v >> 8) as u8),
        other => other.to_rgb8(),
    }
}

/// Builds an RGB image from interleaved samples with `channels` per pixel: grey layouts replicate
/// the first sample, colour layouts take the first three; anything after (alpha) is dropped.
fn repack<T: Copy>(
    w: u32,
    h: u32,
    samples: &[T],
    channels: usize,
    grey: bool,
    conv: impl Fn(T) -> u8,
) -> RgbImage {
    let mut out = Vec::with_capacity(samples.len() / channels * 3);
    for p in samples.chunks_exact(channels) {
        if grey {
            let g = conv(p[0]);
            out.extend_from_slice(&[g, g, g]);
        } else {
            out.extend_from_slice(&[conv(p[0]), conv(p[1]), conv(p[2])]);
        }
    }
    // `samples` holds exactly w*h pixels (it comes from an image buffer of that size).
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

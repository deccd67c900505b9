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
//! JPEG goes through libjpeg-turbo's decoder (vendored by the `mozjpeg` crate), the library
//! Pillow bundles, with Pillow's settings (islow IDCT, fancy upsampling), so JPEG pixels match
//! Pillow bit for bit (a foreign decoder such as `zune-jpeg` differs by up to 4 steps); CMYK/YCCK
//! JPEGs are read inverted (Pillow's "CMYK;I", the Adobe convention) and converted with Pillow's
//! `cmyk2rgb`; a truncated JPEG is refused, as Pillow does by default. Every other format goes
//! through the `image` crate; a GIF is its first frame, with transparent pixels as `image`
//! leaves them (Pillow would show the palette colour of the transparent index).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Largest accepted width and height of a decoded picture.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// Largest allocation the decoder may make for one picture (1 GiB); also the largest file read.
pub const MAX_DECODE_ALLOC: u64 = 1 << 30;

/// The decoder limits used by [`load_rgb`] and [`decode_rgb`] for non-JPEG formats.
pub fn decoder_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    limits
}

/// Reads and decodes the picture at `path` into 8-bit RGB (Pillow's `convert("RGB")`).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = read_image_file(path)?;
    decode_rgb(&bytes, &path.display().to_string())
}

/// Reads the encoded bytes of the picture file at `path` (for callers that hash or cache them
/// before [`decode_rgb`]), safely: a directory, FIFO, socket or device is refused before it is
/// opened (opening a FIFO blocks until a writer appears, reading `/dev/zero` never ends), and at
/// most [`MAX_DECODE_ALLOC`] bytes are read, even from a file that grows meanwhile.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    let name = path.display().to_string();
    let read_err = |source| Error::Read {
        name: name.clone(),
        source,
    };
    let too_large = |len: u64| Error::TooLarge {
        name: name.clone(),
        detail: format!("the file has {len} bytes or more"),
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "it is a directory"
        } else {
            "not a regular file (a pipe, socket or device)"
        };
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            kind,
        )));
    }
    if meta.len() > MAX_DECODE_ALLOC {
        return Err(too_large(meta.len()));
    }
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_DECODE_ALLOC + 1),
        &mut bytes,
    )
    .map_err(read_err)?;
    if bytes.len() as u64 > MAX_DECODE_ALLOC {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Decodes an encoded picture held in memory (clipboard, network); `name` is used in errors only.
pub fn decode_rgb(bytes: &[u8], name: &str) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| Error::Read {
            name: name.to_string(),
            source,
        })?;
    let img = match reader.format() {
        None => {
            return Err(Error::UnknownFormat {
                name: name.to_string(),
            })
        }
        Some(ImageFormat::Jpeg) => decode_jpeg(bytes, name)?,
        Some(_) => {
            let mut reader = reader;
            reader.limits(decoder_limits());
            to_rgb8_like_pil(reader.decode().map_err(|e| decode_error(e, name))?)
        }
    };
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::Empty {
            name: name.to_string(),
            width: img.width(),
            height: img.height(),
        });
    }
    Ok(img)
}

fn decode_error(source: ImageError, name: &str) -> Error {
    let name = name.to_string();
    match source {
        ImageError::Limits(e) => Error::TooLarge {
            name,
            detail: e.to_string(),
        },
        source => Error::Decode { name, source },
    }
}

/// What went wrong inside the libjpeg call (errors there unwind with a message).
enum JpegFailure {
    Io(std::io::Error),
    TooLarge(String),
}

/// Decodes a JPEG with libjpeg-turbo as Pillow does, then converts to RGB as Pillow does.
fn decode_jpeg(bytes: &[u8], name: &str) -> Result<RgbImage> {
    use mozjpeg::{ColorSpace, Decompress, NO_MARKERS};

    let progressive = jpeg_is_progressive(bytes);
    let hit_eof = std::rc::Rc::new(std::cell::Cell::new(false));
    let reader = EofWatch {
        data: bytes,
        hit_eof: hit_eof.clone(),
    };
    let run = std::panic::AssertUnwindSafe(|| -> std::result::Result<RgbImage, JpegFailure> {
        let d = Decompress::with_markers(NO_MARKERS)
            .from_reader(reader)
            .map_err(JpegFailure::Io)?;
        let (w, h) = d.size();
        let source_space = d.color_space();
        let n_comp = d.components().len() as u64;
        let cmyk = matches!(source_space, ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK);
        // Output buffer, plus the whole-image coefficient buffer libjpeg keeps for progressive
        // files (2 bytes per coefficient, at most one per pixel and component).
        let pixels = w as u64 * h as u64;
        let need =
            pixels * if cmyk { 4 } else { 3 } + if progressive { pixels * n_comp * 2 } else { 0 };
        if w > MAX_IMAGE_SIDE as usize || h > MAX_IMAGE_SIDE as usize || need > MAX_DECODE_ALLOC {
            return Err(JpegFailure::TooLarge(format!(
                "{w}x{h} pixels, about {} MiB to decode",
                need >> 20
            )));
        }
        let (w32, h32) = (w as u32, h as u32);
        if cmyk {
            // Pillow reads CMYK JPEGs as "CMYK;I" (Adobe's inverted convention), then `cmyk2rgb`.
            let mut started = d
                .to_colorspace(ColorSpace::JCS_CMYK)
                .map_err(JpegFailure::Io)?;
            let px: Vec<[u8; 4]> = started.read_scanlines().map_err(JpegFailure::Io)?;
            started.finish().map_err(JpegFailure::Io)?;
            let rgb = px.iter().flat_map(|p| cmyk_inverted_to_rgb(*p)).collect();
            Ok(RgbImage::from_raw(w32, h32, rgb).unwrap_or_else(|| RgbImage::new(w32, h32)))
        } else {
            // Grey is replicated by libjpeg, YCbCr converted with libjpeg's tables: same as Pillow.
            let mut started = d.rgb().map_err(JpegFailure::Io)?;
            let px: Vec<u8> = started.read_scanlines().map_err(JpegFailure::Io)?;
            started.finish().map_err(JpegFailure::Io)?;
            Ok(RgbImage::from_raw(w32, h32, px).unwrap_or_else(|| RgbImage::new(w32, h32)))
        }
    });
    match std::panic::catch_unwind(run) {
        // libjpeg pads a truncated file and only warns; Pillow refuses it, and so do we.
        Ok(Ok(_)) if hit_eof.get() => Err(Error::Jpeg {
            name: name.to_string(),
            message: "image file is truncated (the data ends before the end-of-image marker)"
                .to_string(),
        }),
        Ok(Ok(img)) => Ok(img),
        Ok(Err(JpegFailure::TooLarge(detail))) => Err(Error::TooLarge {
            name: name.to_string(),
            detail,
        }),
        Ok(Err(JpegFailure::Io(e))) => Err(Error::Jpeg {
            name: name.to_string(),
            message: e.to_string(),
        }),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".to_string());
            Err(Error::Jpeg {
                name: name.to_string(),
                message,
            })
        }
    }
}

/// An in-memory reader that records whether libjpeg asked for data past the end.
struct EofWatch<'a> {
    data: &'a [u8],
    hit_eof: std::rc::Rc<std::cell::Cell<bool>>,
}

impl std::io::Read for EofWatch<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::BufRead::fill_buf(self)?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

impl std::io::BufRead for EofWatch<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.data.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(self.data)
    }

    fn consume(&mut self, amt: usize) {
        self.data = &self.data[amt.min(self.data.len())..];
    }
}

/// Pillow's "CMYK;I" unpacking (every channel inverted) followed by its `cmyk2rgb`.
fn cmyk_inverted_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let [c, m, y, k] = p.map(|v| 255 - i32::from(v));
    let nk = 255 - k;
    [c, m, y].map(|v| (nk - muldiv255(v, nk)).clamp(0, 255) as u8)
}

/// Whether the JPEG's frame header is progressive (SOF2/SOF6/SOF10/SOF14): walks the marker
/// segments up to the first start-of-frame. Malformed data gives `true` (the conservative answer
/// for the memory estimate); libjpeg reports the actual error.
fn jpeg_is_progressive(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return true;
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1, // fill byte
            0xD0..=0xD9 | 0x01 => i += 2,
            0xC2 | 0xC6 | 0xCA | 0xCE => return true,
            0xC0 | 0xC1 | 0xC3 | 0xC5 | 0xC7 | 0xC9 | 0xCB | 0xCD | 0xCF => return false,
            _ => {
                let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
                i += 2 + len;
            }
        }
    }
    true
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn sixteen_bit_pngs_convert_like_pillow() {
        let rgb =
            ImageBuffer::<Rgb<u16>, _>::from_raw(2, 1, vec![0x12FF, 0x0080, 0xFFFF, 0, 1, 0x8000])
                .unwrap();
        let out = decode_rgb(&png(DynamicImage::ImageRgb16(rgb)), "rgb16").unwrap();
        // High byte, no rounding (`image`'s own conversion would give 0x13 for 0x12FF).
        assert_eq!(out.as_raw(), &[0x12, 0x00, 0xFF, 0, 0, 0x80]);

        let rgba =
            ImageBuffer::<Rgba<u16>, _>::from_raw(1, 1, vec![0xABCD, 0x0102, 0xFFFF, 0]).unwrap();
        let out = decode_rgb(&png(DynamicImage::ImageRgba16(rgba)), "rgba16").unwrap();
        assert_eq!(out.as_raw(), &[0xAB, 0x01, 0xFF]);

        // Plain 16-bit grey is an "I" image in Pillow: converting to RGB clips at 255.
        let grey = ImageBuffer::<Luma<u16>, _>::from_raw(3, 1, vec![200, 300, 0xFFFF]).unwrap();
        let out = decode_rgb(&png(DynamicImage::ImageLuma16(grey)), "l16").unwrap();
        assert_eq!(out.as_raw(), &[200, 200, 200, 255, 255, 255, 255, 255, 255]);

        let la = ImageBuffer::<LumaA<u16>, _>::from_raw(1, 1, vec![0x7F01, 0]).unwrap();
        let out = decode_rgb(&png(DynamicImage::ImageLumaA16(la)), "la16").unwrap();
        assert_eq!(out.as_raw(), &[0x7F, 0x7F, 0x7F]);
    }

    #[test]
    fn eight_bit_modes_drop_alpha_and_replicate_grey() {
        let la = ImageBuffer::<LumaA<u8>, _>::from_raw(1, 1, vec![9, 0]).unwrap();
        assert_eq!(
            decode_rgb(&png(DynamicImage::ImageLumaA8(la)), "la")
                .unwrap()
                .as_raw(),
            &[9, 9, 9]
        );
        let rgba = ImageBuffer::<Rgba<u8>, _>::from_raw(1, 1, vec![1, 2, 3, 0]).unwrap();
        assert_eq!(
            decode_rgb(&png(DynamicImage::ImageRgba8(rgba)), "rgba")
                .unwrap()
                .as_raw(),
            &[1, 2, 3]
        );
    }

    #[test]
    fn png_decompression_bomb_is_refused_before_decoding() {
        let mut data = png(DynamicImage::ImageRgb8(RgbImage::new(8, 8)));
        // IHDR: length(4) "IHDR"(4) width(4) height(4) ... starting at byte 8; CRC covers type+data.
        data[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        data[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&data[12..29]);
        data[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_rgb(&data, "bomb.png").unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("bomb.png"), "{e}");
    }

    fn tiny_jpeg(color: mozjpeg::ColorSpace, comps: usize) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(color);
        c.set_size(16, 16);
        c.set_quality(100.0);
        let mut c = c.start_compress(Vec::new()).unwrap();
        let px: Vec<u8> = (0..16 * 16 * comps).map(|i| (i * 7 % 256) as u8).collect();
        c.write_scanlines(&px).unwrap();
        c.finish().unwrap()
    }

    #[test]
    fn jpeg_decompression_bomb_is_refused_before_decoding() {
        let mut data = tiny_jpeg(mozjpeg::ColorSpace::JCS_RGB, 3);
        // Patch the frame header (SOF0/SOF2: FF Cx len(2) precision(1) height(2) width(2)).
        let sof = data
            .windows(2)
            .position(|w| w[0] == 0xFF && (w[1] == 0xC0 || w[1] == 0xC2))
            .unwrap();
        data[sof + 5..sof + 7].copy_from_slice(&60_000u16.to_be_bytes());
        data[sof + 7..sof + 9].copy_from_slice(&60_000u16.to_be_bytes());
        let e = decode_rgb(&data, "bomb.jpg").unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("bomb.jpg"), "{e}");
    }

    #[test]
    fn cmyk_and_grey_jpegs_decode() {
        let grey = decode_rgb(&tiny_jpeg(mozjpeg::ColorSpace::JCS_GRAYSCALE, 1), "g.jpg").unwrap();
        assert_eq!(grey.dimensions(), (16, 16));
        assert!(grey.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        let cmyk = decode_rgb(&tiny_jpeg(mozjpeg::ColorSpace::JCS_CMYK, 4), "c.jpg").unwrap();
        assert_eq!(cmyk.dimensions(), (16, 16));
    }

    #[test]
    fn pillow_cmyk_inverted_conversion() {
        // Stored (inverted) CMYK 255,255,255,255 means no ink: white. 0 everywhere: black.
        assert_eq!(cmyk_inverted_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_inverted_to_rgb([0, 0, 0, 0]), [0, 0, 0]);
        // Full cyan (stored 0), no black (stored 255): pure cyan.
        assert_eq!(cmyk_inverted_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
    }

    #[test]
    fn progressive_detection() {
        let base = tiny_jpeg(mozjpeg::ColorSpace::JCS_RGB, 3);
        let has_sof2 = base.windows(2).any(|w| w == [0xFF, 0xC2]);
        assert_eq!(jpeg_is_progressive(&base), has_sof2);
        assert!(jpeg_is_progressive(&[0xFF, 0xD8, 0xFF, 0xC2, 0, 4, 0, 0]));
        assert!(!jpeg_is_progressive(&[
            0xFF, 0xD8, 0xFF, 0xE0, 0, 2, 0xFF, 0xC0, 0, 4, 0, 0
        ]));
    }

    #[test]
    fn empty_and_unknown_inputs_fail_with_the_name() {
        assert!(
            matches!(decode_rgb(&[], "nothing"), Err(Error::UnknownFormat { name }) if name == "nothing")
        );
        let e = load_rgb(Path::new("/definitely/not/here.png")).unwrap_err();
        assert!(
            matches!(e, Error::Read { .. }) && e.to_string().contains("/definitely/not/here.png")
        );
    }
}

//! The crate's error type. Every message about a picture names the picture (its path, or the name
//! the caller gave for in-memory data), so a failing prompt points at the file at fault.

/// Errors of the image side: reading, decoding, preprocessing and building the vision tower.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read.
    #[error("cannot read image {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: std::io::Error,
    },

    /// The content matches none of the supported formats (the extension is not consulted).
    #[error("image {name}: unrecognised format (supported: PNG, JPEG, GIF, WebP, BMP, TIFF)")]
    UnknownFormat { name: String },

    /// The header announces more pixels or memory than the decoder limits allow.
    #[error(
        "image {name} is too large to decode ({detail}; limits: {max_side}x{max_side} pixels, \
         {max_alloc_mib} MiB)",
        max_side = crate::MAX_IMAGE_SIDE,
        max_alloc_mib = crate::MAX_DECODE_ALLOC >> 20
    )]
    TooLarge { name: String, detail: String },

    /// The data is corrupt or uses a feature the decoder does not support.
    #[error("cannot decode image {name}: {source}")]
    Decode {
        name: String,
        #[source]
        source: image::ImageError,
    },

    /// libjpeg rejected the JPEG data.
    #[error("cannot decode JPEG image {name}: {message}")]
    Jpeg { name: String, message: String },

    /// The picture has no pixels.
    #[error("image {name} is empty ({width}x{height})")]
    Empty {
        name: String,
        width: u32,
        height: u32,
    },

    /// A requested output size is unusable (zero, or larger than the decoder limits).
    #[error("invalid target image size {0} (must be 1..={max})", max = crate::MAX_IMAGE_SIDE)]
    InvalidSize(usize),

    /// The `visual` section of config.json is inconsistent.
    #[error("invalid vision config: {0}")]
    Config(String),

    /// A tensor operation failed (shape mismatch, missing weight, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

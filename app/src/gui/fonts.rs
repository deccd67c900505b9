//! The bundled font with CJK coverage: the window's fallback font and the labels of exported
//! pictures.

/// Droid Sans Fallback (Apache-2.0, see assets/fonts/DroidSansFallbackFull.LICENSE-NOTE.txt).
pub static CJK_FONT: &[u8] = include_bytes!("../../../assets/fonts/DroidSansFallbackFull.ttf");

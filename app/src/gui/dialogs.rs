//! Native file dialogs (rfd), shared by the buttons and the shortcuts that open them.

use std::path::PathBuf;

/// The picture types the app reads.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "gif", "webp", "bmp", "tif", "tiff"];

/// "Attach images…" and Ctrl+O: the chosen files, `None` if cancelled.
pub fn pick_images() -> Option<Vec<PathBuf>> {
    rfd::FileDialog::new()
        .add_filter("Images", &IMAGE_EXTENSIONS)
        .pick_files()
}

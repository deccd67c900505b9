//! Library face of the `qwenvl` package: the engine, the benchmark and the desktop app. The
//! binary (`main.rs`) is a thin CLI over it, and the GUI tests (`tests/gui.rs`, egui_kittest)
//! drive the app through it without a window.

pub mod bench;
pub mod download;
pub mod engine;
pub mod gui;
pub mod ocr;
pub mod random_checkpoint;

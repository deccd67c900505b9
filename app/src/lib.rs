//! Library face of the `qwenvl` package: the engine, the benchmark and the desktop app. The
//! binary (`main.rs`) is a thin CLI over it, and the GUI tests (`tests/gui.rs`, egui_kittest)
//! drive the app through it without a window.

pub mod bench;
pub mod cli_load;
pub mod download;
pub mod engine;
pub mod gui;
pub mod model_dir;
pub mod ocr;
pub mod openai;
pub mod random_checkpoint;
pub mod remote;
pub mod serve;
pub mod session;

/// `--quant` and friends: a weight type by name, or the list of names.
pub fn parse_weight_type(s: &str) -> std::result::Result<lm::quant::WeightType, String> {
    lm::quant::WeightType::parse(s).ok_or_else(|| {
        let all: Vec<&str> = lm::quant::WeightType::ALL
            .iter()
            .map(|w| w.name())
            .collect();
        format!("unknown weight type {s:?} (one of {})", all.join(", "))
    })
}

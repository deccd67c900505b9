//! Loading a model for the command line (`run`, `ocr`, `serve`): the weight type (asked for, or
//! the default for the device), the memory check, and a progress bar on stderr while the weights
//! are read and quantized (or read back from the quantized-model cache).

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use lm::checkpoint::LoadProgress;
use lm::quant::WeightType;

use crate::engine::Engine;

/// Loads `dir` as `requested` (else the default for `device`, see [`crate::session::plan_load`]), refusing up front
/// a model that cannot fit. Prints one line naming the weight type, and on a terminal a bar of
/// the bytes loaded.
pub fn load(dir: &Path, requested: Option<WeightType>, device: &Device) -> Result<Engine> {
    let (wt, bytes) = crate::session::plan_load(dir, requested, device)?;
    eprintln!("loading {} as {wt}…", dir.display());

    let progress = Arc::new(LoadProgress::default());
    let engine = with_bar(bytes, &progress, || {
        crate::session::load(dir, wt, device, progress.clone())
    })?;
    let source = match &engine.quant_cache {
        Some((_, true)) => " from the quantized-model cache",
        _ => "",
    };
    eprintln!("loaded in {:.1} s{source}", engine.load_ms / 1e3);
    Ok(engine)
}

/// Runs `load` while a bar on stderr (on a terminal; nothing otherwise) follows the bytes
/// `progress` counts, out of `total`.
pub fn with_bar<R>(total: u64, progress: &LoadProgress, load: impl FnOnce() -> R) -> R {
    let bar = if total > 0 && std::io::stderr().is_terminal() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let done = AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        // The load runs on this thread; the loader only bumps counters, so another moves the bar.
        let poller = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(progress.bytes.load(Ordering::Relaxed));
                std::thread::park_timeout(Duration::from_millis(100));
            }
        });
        let out = load();
        done.store(true, Ordering::Relaxed);
        // Woken at once: the load's time (which `bench` measures) should not wait out a tick.
        poller.thread().unpark();
        out
    });
    bar.finish_and_clear();
    out
}

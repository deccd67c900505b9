//! The first-run screen's model download: a thread of its own that reports progress to the
//! app, which loads the model when it is done.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::QwenApp;
use crate::download::{DownloadProgress, DownloadStage};
use crate::gui::model::Download;

pub(super) enum DownloadEvent {
    Progress(DownloadProgress),
    End(DownloadEnd),
}

/// How a download ended.
pub(super) enum DownloadEnd {
    Done(PathBuf),
    Failed(String),
    Cancelled,
}

impl QwenApp {
    /// Downloads the model into the Hugging Face cache on a thread of its own, then loads it.
    /// Partial files are kept: a failed or cancelled download resumes where it stopped.
    pub fn start_download(&mut self) {
        if self.download.is_some() {
            return;
        }
        let (tx, events) = std::sync::mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = self.download_opts.clone();
        let waker = self.waker_ctx.clone();
        let flag = cancel.clone();
        let wake = move || {
            if let Some(ctx) = waker.get() {
                ctx.request_repaint();
            }
        };
        let spawned = std::thread::Builder::new()
            .name("qwenvl-download".into())
            .spawn(move || {
                let r = crate::download::download(
                    &opts,
                    &mut |p| {
                        let _ = tx.send(DownloadEvent::Progress(p.clone()));
                        wake();
                    },
                    &flag,
                );
                let _ = tx.send(DownloadEvent::End(match r {
                    Ok(dir) => DownloadEnd::Done(dir),
                    Err(e) if e.is::<crate::download::Cancelled>() => DownloadEnd::Cancelled,
                    Err(e) => DownloadEnd::Failed(format!("{e:#}")),
                }));
                wake();
            });
        if let Err(e) = spawned {
            self.errors
                .push(format!("Could not start the download: {e}"));
            return;
        }
        self.download = Some(Download {
            progress: None,
            cancel,
            since: Instant::now(),
            start_bytes: None,
        });
        self.download_events = Some(events);
    }

    pub fn cancel_download(&mut self) {
        if let Some(d) = &self.download {
            d.cancel.store(true, Ordering::SeqCst);
        }
    }

    pub(super) fn poll_download(&mut self) {
        let (Some(d), Some(events)) = (self.state.download.as_mut(), &self.download_events) else {
            return;
        };
        let mut end = None;
        while let Ok(ev) = events.try_recv() {
            match ev {
                DownloadEvent::Progress(p) => {
                    if p.stage == DownloadStage::Downloading && d.start_bytes.is_none() {
                        d.start_bytes = Some(p.bytes_done);
                        d.since = Instant::now();
                    }
                    d.progress = Some(p);
                }
                DownloadEvent::End(e) => end = Some(e),
            }
        }
        match end {
            None => {}
            Some(DownloadEnd::Done(dir)) => {
                self.download = None;
                self.load_model(dir);
            }
            Some(DownloadEnd::Cancelled) => {
                self.download = None;
                self.notice = Some(
                    "Download cancelled. The files fetched so far are kept: Download resumes."
                        .into(),
                );
            }
            Some(DownloadEnd::Failed(e)) => {
                self.download = None;
                self.errors.push(format!(
                    "The download failed: {e}. Press Download again to resume where it stopped."
                ));
            }
        }
    }
}

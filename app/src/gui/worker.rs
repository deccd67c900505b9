//! The inference thread. It owns the [`Backend`] (and so the model), takes [`Command`]s one at a
//! time from a channel and answers with [`Event`]s; the UI thread never waits on it. Requests are
//! served in order, so a second message can only queue behind the first, never interleave.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use lm::checkpoint::LoadProgress;
use lm::prompt::Conversation;

use super::backend::{Backend, ModelInfo, ModelSource, Params, ReplyStats};

/// Wakes the UI when an event is sent (`egui::Context::request_repaint`).
pub type Waker = Arc<dyn Fn() + Send + Sync>;

pub enum Command {
    /// Load a model (or connect to a server); the counter tracks the bytes read.
    Load(ModelSource, Arc<LoadProgress>),
    Reply {
        id: u64,
        conversation: Box<Conversation>,
        base_dir: PathBuf,
        params: Params,
        cancel: Arc<AtomicBool>,
    },
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Stage of the load and the fraction done, when known.
    LoadStage(String, Option<f32>),
    Loaded(ModelInfo),
    LoadFailed(String),
    /// A piece of the reply of request `id`.
    Text(u64, String),
    Done(u64, ReplyStats),
    Failed(u64, String),
}

pub struct Worker {
    commands: Sender<Command>,
    pub events: Receiver<Event>,
}

/// Readable text for a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Worker {
    pub fn spawn(mut backend: Box<dyn Backend>, waker: Waker) -> Self {
        let (commands, rx) = channel::<Command>();
        let (tx, events) = channel::<Event>();
        let send = move |e: Event| {
            // The UI may be gone (window closed): nothing left to tell.
            let _ = tx.send(e);
            waker();
        };
        let spawned = std::thread::Builder::new()
            .name("qwenvl-inference".into())
            .spawn(move || {
                for cmd in rx {
                    match cmd {
                        Command::Load(source, counter) => {
                            let stage =
                                |s: &str, f: Option<f32>| send(Event::LoadStage(s.to_string(), f));
                            // A bug in the model code must not take the window down with it.
                            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                backend.load(&source, &stage, &counter)
                            }));
                            send(match r {
                                Ok(Ok(info)) => Event::Loaded(info),
                                Ok(Err(e)) => Event::LoadFailed(format!("{e:#}")),
                                Err(p) => Event::LoadFailed(format!(
                                    "internal error while loading: {}",
                                    panic_message(&*p)
                                )),
                            });
                        }
                        Command::Reply {
                            id,
                            conversation,
                            base_dir,
                            params,
                            cancel,
                        } => {
                            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                                backend.reply(
                                    &conversation,
                                    &base_dir,
                                    &params,
                                    &cancel,
                                    &mut |t: &str| send(Event::Text(id, t.to_string())),
                                )
                            }));
                            send(match r {
                                Ok(Ok(stats)) => Event::Done(id, stats),
                                Ok(Err(e)) => Event::Failed(id, format!("{e:#}")),
                                Err(p) => Event::Failed(
                                    id,
                                    format!("internal error: {}", panic_message(&*p)),
                                ),
                            });
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // Without a thread every command fails; report it on the first event poll.
            let (tx, events) = channel();
            let _ = tx.send(Event::LoadFailed(format!(
                "cannot start the inference thread: {e}"
            )));
            return Self { commands, events };
        }
        Self { commands, events }
    }

    /// Queues a command; false if the worker thread is gone.
    pub fn send(&self, cmd: Command) -> bool {
        self.commands.send(cmd).is_ok()
    }
}

//! What a view asks the app to do. Views draw [`AppState`](super::model::AppState) and edit its
//! plain fields; everything with an effect beyond that (a model load, a message, a file) is an
//! `Action`, handled in one place: [`QwenApp::apply`](super::app::QwenApp::apply).

use std::path::PathBuf;

use lm::prompt::Item;
use lm::quant::WeightType;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Load a model folder with the weight type and device of the settings.
    LoadModel(PathBuf),
    /// Connect to the server of the "Connect to a server" form.
    ConnectServer,
    StartDownload,
    CancelDownload,
    NewChat,
    OpenChat(usize),
    /// The weight type of model folders (`None`: automatic); reloads the current folder.
    SetWeights(Option<WeightType>),
    /// The device model folders run on (`None`: the CPU); reloads the current folder.
    SetDevice(Option<String>),
    SaveSettings,
    /// Send a message with these items.
    Send(Vec<Item>),
    /// Send the composer's message.
    SendComposer,
    /// Ask for the text of the composer's attached picture `i`, which leaves the composer once
    /// the question is sent.
    ReadText(usize),
    Stop,
    /// A new version of the last reply.
    Regenerate,
    /// A new version of reply `t` (the turns after it stay with the version it replaces).
    RegenerateAt(usize),
    /// Show version `version` (0-based) of reply `turn`.
    ShowVersion {
        turn: usize,
        version: usize,
    },
    /// Replace user message `turn` with `items` and ask again; the chat after it is replaced.
    EditResend {
        turn: usize,
        items: Vec<Item>,
    },
    /// Delete turn `t` (the message and its reply).
    DeleteTurn(usize),
    DeleteChat(usize),
    RenameChat {
        chat: usize,
        title: String,
    },
    AttachFiles(Vec<PathBuf>),
    ExportMarkdown(PathBuf),
    /// The picture of reply `turn` with its boxes drawn, as PNG.
    ExportAnnotated {
        turn: usize,
        dest: PathBuf,
    },
}

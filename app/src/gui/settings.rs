//! Where things live: the app's folders (platform config/data dirs via `directories`, overridable
//! for tests) and the small settings file. Finding a model folder without asking is model
//! discovery, in [`crate::model_dir`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::backend::{ModelSource, Params};
use super::state::write_atomic;

/// The app's own folders.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// settings.json
    pub config: PathBuf,
    /// chats/ (and chats/images/)
    pub data: PathBuf,
}

impl Dirs {
    /// Platform folders; `QWENVL_CONFIG_DIR` / `QWENVL_DATA_DIR` override them.
    pub fn platform() -> Result<Self> {
        let proj = directories::ProjectDirs::from("", "", "qwenvl");
        let pick = |var: &str, f: fn(&directories::ProjectDirs) -> &Path| -> Result<PathBuf> {
            if let Some(v) = std::env::var_os(var) {
                return Ok(PathBuf::from(v));
            }
            proj.as_ref()
                .map(|p| f(p).to_path_buf())
                .with_context(|| format!("no home folder found; set {var}"))
        };
        Ok(Self {
            config: pick("QWENVL_CONFIG_DIR", |p| p.config_dir())?,
            data: pick("QWENVL_DATA_DIR", |p| p.data_dir())?,
        })
    }

    pub fn in_folder(root: &Path) -> Self {
        Self {
            config: root.join("config"),
            data: root.join("data"),
        }
    }

    pub fn chats(&self) -> PathBuf {
        self.data.join("chats")
    }
}

/// What the app remembers between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Settings {
    #[serde(default)]
    pub last_model: Option<PathBuf>,
    /// The user's generation settings per model folder are not kept; these are the last used
    /// ones, reset to the checkpoint's defaults when another model is opened.
    #[serde(default)]
    pub params: Option<Params>,
    #[serde(default)]
    pub last_chat: Option<String>,
    #[serde(default = "yes")]
    pub show_boxes: bool,
    /// The last server connected to (its key too: the settings file is the user's own).
    #[serde(default)]
    pub server: Option<ModelSource>,
    /// The model ran on `server` last time: connect again at start.
    #[serde(default)]
    pub use_server: bool,
    /// Weight type in memory for model folders; `None`: the default for this machine.
    #[serde(default, deserialize_with = "weights_or_automatic")]
    pub weights: Option<lm::quant::WeightType>,
    /// Where model folders run, as a `--device` word; `None`: the CPU.
    #[serde(default)]
    pub device: Option<String>,
    /// Light, dark, or the system's (the default).
    #[serde(default)]
    pub theme: Theme,
    /// The text size, as egui's zoom factor (Ctrl+= / Ctrl+-); `None`: 1.
    #[serde(default)]
    pub zoom: Option<f32>,
}

/// The colour theme the user chose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Theme {
    #[default]
    System,
    Light,
    Dark,
}

impl Theme {
    pub fn preference(self) -> egui::ThemePreference {
        match self {
            Theme::System => egui::ThemePreference::System,
            Theme::Light => egui::ThemePreference::Light,
            Theme::Dark => egui::ThemePreference::Dark,
        }
    }

    /// The next one of the top bar's toggle.
    pub fn next(self) -> Theme {
        match self {
            Theme::System => Theme::Light,
            Theme::Light => Theme::Dark,
            Theme::Dark => Theme::System,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Theme::System => "system",
            Theme::Light => "light",
            Theme::Dark => "dark",
        }
    }
}

/// A weight type this version does not know (a hand edit, a newer version's) reads as
/// automatic, rather than making the whole settings file unreadable (and so forgotten).
fn weights_or_automatic<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<lm::quant::WeightType>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.and_then(|s| lm::quant::WeightType::parse(&s)))
}

fn yes() -> bool {
    true
}

impl Settings {
    fn path(dirs: &Dirs) -> PathBuf {
        dirs.config.join("settings.json")
    }

    /// Missing or unreadable settings are not an error: start fresh.
    pub fn load(dirs: &Dirs) -> Self {
        std::fs::read(Self::path(dirs))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Settings {
                show_boxes: true,
                ..Default::default()
            })
    }

    pub fn save(&self, dirs: &Dirs) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        write_atomic(&Self::path(dirs), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_weight_type_reads_as_automatic_and_keeps_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let dirs = Dirs::in_folder(root.path());
        std::fs::create_dir_all(&dirs.config).unwrap();
        let write = |json: &str| std::fs::write(Settings::path(&dirs), json).unwrap();
        write(r#"{"last_model": "/m", "weights": "q8_0"}"#);
        assert_eq!(
            Settings::load(&dirs).weights,
            Some(lm::quant::WeightType::Q8_0)
        );
        write(r#"{"last_model": "/m", "weights": "q6_k"}"#);
        let s = Settings::load(&dirs);
        assert_eq!(s.weights, None);
        assert_eq!(s.last_model, Some(PathBuf::from("/m")));
    }
}

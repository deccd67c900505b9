//! What a packager and a desktop need: the version, the licence, the changelog, the .desktop
//! entry and its icon, and `qwenvl PICTURE...` opening the app with the pictures attached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn qwenvl(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qwenvl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_licence_and_changelog() {
    let (code, out, _) = qwenvl(&["--version"]);
    assert_eq!(code, Some(0));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(out.trim(), format!("qwenvl {version}"));
    let licence = std::fs::read_to_string(root().join("LICENSE")).unwrap();
    assert!(licence.contains("Apache License") && licence.contains("Version 2.0, January 2004"));
    assert!(licence.contains("END OF TERMS AND CONDITIONS"));
    let changelog = std::fs::read_to_string(root().join("CHANGELOG.md")).unwrap();
    assert!(
        changelog.contains(&format!("## {version}")),
        "CHANGELOG.md has no section for {version}"
    );
}

#[test]
fn help_names_the_pictures_argument_and_a_command_takes_no_pictures() {
    let (code, out, _) = qwenvl(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("[PICTURE]..."), "{out}");
    // A command with a stray picture path is a usage error, not a silently opened window.
    let (code, _, err) = qwenvl(&["cache", "path", "photo.png"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("photo.png"), "{err}");
}

/// The `[Desktop Entry]` keys, as a launcher reads them.
fn desktop_entry() -> HashMap<String, String> {
    let text = std::fs::read_to_string(root().join("assets/qwenvl.desktop")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("[Desktop Entry]"));
    lines
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not key=value: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn desktop_entry_starts_this_binary_with_files_and_names_a_real_icon() {
    let e = desktop_entry();
    assert_eq!(e["Type"], "Application");
    assert_eq!(
        e["Exec"], "qwenvl %F",
        "files from a file manager reach `qwenvl PICTURE...`"
    );
    assert_eq!(e["Terminal"], "false");
    // The window's app id is what the launcher matches the running window with.
    let gui = std::fs::read_to_string(root().join("app/src/gui/mod.rs")).unwrap();
    assert!(gui.contains(&format!(".with_app_id(\"{}\")", e["StartupWMClass"])));
    let icon = root().join(format!("assets/icons/{}.png", e["Icon"]));
    let img = image::open(&icon).unwrap_or_else(|err| panic!("{}: {err}", icon.display()));
    assert_eq!((img.width(), img.height()), (256, 256));
    assert!(root()
        .join(format!("assets/icons/{}.svg", e["Icon"]))
        .is_file());
    // Every picture type it claims opens in the app.
    for mime in e["MimeType"].split(';').filter(|m| !m.is_empty()) {
        let ext = mime.strip_prefix("image/").expect("image types only");
        let format = image::ImageFormat::from_extension(ext)
            .unwrap_or_else(|| panic!("{mime}: no decoder for .{ext}"));
        assert!(
            format.reading_enabled(),
            "{mime}: this build cannot read it"
        );
    }
    // The icon the window shows is the same file.
    let window = qwenvl::gui::window_icon();
    assert_eq!((window.width, window.height), (256, 256));
    assert_eq!(window.rgba, img.into_rgba8().into_raw());
}

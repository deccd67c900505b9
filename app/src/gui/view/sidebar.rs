//! The list of chats.

use super::super::action::Action;
use super::super::model::{chat_search_id, AppState};
use super::super::state::Chat;

pub fn show(app: &mut AppState, ctx: &egui::Context) {
    egui::SidePanel::left("chats")
        .resizable(true)
        .default_width(210.0)
        .show(ctx, |ui| {
            ui.add_space(6.0);
            if ui
                .add_sized(
                    [ui.available_width(), 28.0],
                    egui::Button::new("＋ New chat"),
                )
                .clicked()
            {
                app.ask(Action::NewChat);
            }
            ui.add_space(6.0);
            ui.add(
                egui::TextEdit::singleline(&mut app.chat_search)
                    .id(chat_search_id())
                    .hint_text("Search chats (Ctrl+F)")
                    .desired_width(f32::INFINITY),
            );
            ui.add_space(4.0);
            let query = app.chat_search.trim().to_lowercase();
            let (mut open, mut start_rename, mut delete) = (None, None, None);
            egui::ScrollArea::vertical().show(ui, |ui| {
                for (i, chat) in app.chats.iter().enumerate() {
                    if !query.is_empty() && !chat_matches(chat, &query) {
                        continue;
                    }
                    let selected = i == app.current;
                    let title = if chat.turns.is_empty() {
                        "New chat".to_string()
                    } else {
                        chat.title.clone()
                    };
                    let r = ui
                        .add_sized(
                            [ui.available_width(), 24.0],
                            egui::Button::selectable(selected, title.clone()),
                        )
                        .on_hover_text("Right-click to rename or delete");
                    if r.clicked() {
                        open = Some(i);
                    }
                    r.context_menu(|ui| {
                        if ui.button("Rename").clicked() {
                            start_rename = Some((i, title.clone()));
                            ui.close();
                        }
                        if ui.button("Delete chat").clicked() {
                            delete = Some(i);
                            ui.close();
                        }
                    });
                }
            });
            if let Some((i, title)) = start_rename {
                app.renaming = Some((i, title));
            }
            rename_window(app, ctx);
            if let Some(i) = delete {
                app.ask(Action::DeleteChat(i));
            }
            if let Some(i) = open {
                app.ask(Action::OpenChat(i));
            }
        });
}

/// Whether a chat's title, messages or replies hold `query` (lower case).
fn chat_matches(chat: &Chat, query: &str) -> bool {
    chat.title.to_lowercase().contains(query)
        || chat.turns.iter().any(|t| {
            t.reply.to_lowercase().contains(query)
                || t.user.iter().any(|item| match item {
                    lm::prompt::Item::Text { text } => text.to_lowercase().contains(query),
                    _ => false,
                })
        })
}

fn rename_id() -> egui::Id {
    egui::Id::new("rename chat")
}

/// "Rename chat": the new title; Enter or Rename keeps it, Cancel or closing drops it.
fn rename_window(app: &mut AppState, ctx: &egui::Context) {
    let Some((i, draft)) = app.renaming.as_mut() else {
        return;
    };
    let i = *i;
    let (mut keep, mut close) = (false, false);
    let mut open = true;
    egui::Window::new("Rename chat")
        .open(&mut open)
        .collapsible(false)
        .resizable(false)
        .show(ctx, |ui| {
            let r = ui.add(egui::TextEdit::singleline(draft).id(rename_id()));
            keep = r.lost_focus() && ui.input(|inp| inp.key_pressed(egui::Key::Enter));
            ui.horizontal(|ui| {
                keep |= ui.button("Rename").clicked();
                close = ui.button("Cancel").clicked();
            });
        });
    if keep {
        let title = draft.clone();
        app.ask(Action::RenameChat { chat: i, title });
    }
    if keep || close || !open {
        app.renaming = None;
    }
}

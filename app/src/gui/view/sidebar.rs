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
            let mut open = None;
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
                    let r = ui.add_sized(
                        [ui.available_width(), 24.0],
                        egui::Button::selectable(selected, title),
                    );
                    if r.clicked() {
                        open = Some(i);
                    }
                }
            });
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

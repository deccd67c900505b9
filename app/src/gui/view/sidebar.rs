//! The list of chats.

use super::super::action::Action;
use super::super::model::AppState;

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
            let mut open = None;
            egui::ScrollArea::vertical().show(ui, |ui| {
                for (i, chat) in app.chats.iter().enumerate() {
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

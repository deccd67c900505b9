//! Prompt building from arbitrary conversation JSON: parse, build the ChatML ids with a small and
//! a normal window, check the image spans against the image items.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lm::prompt::{build_chatml, Conversation, Item};

#[path = "shared/mod.rs"]
mod shared;
use shared::tok;

fuzz_target!(|data: &[u8]| {
    let Ok(conv) = serde_json::from_slice::<Conversation>(data) else {
        return;
    };
    let tok = tok();
    for window in [0, 64, 6144] {
        let Ok(p) = build_chatml(tok, &conv, window) else {
            continue;
        };
        assert_eq!(
            p.history_turns_kept + p.history_turns_dropped,
            conv.history.len()
        );
        let n_images = p.images.len();
        let query_images = conv
            .query
            .iter()
            .filter(|i| matches!(i, Item::Image { .. }))
            .count();
        assert!(
            n_images >= query_images,
            "{n_images} spans < {query_images} image items"
        );
        for span in &p.images {
            assert_eq!(p.ids[span.start], lm::tokenizer::IMG_START);
            assert_eq!(p.ids[span.end()], lm::tokenizer::IMG_END);
        }
    }
});

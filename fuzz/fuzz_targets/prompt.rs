//! Prompt building from arbitrary conversation JSON: parse, build the ChatML ids with a small and
//! a normal window, check the image spans against the image items.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lm::prompt::{build_chatml, Conversation, Item};
use lm::tokenizer::QwenTokenizer;

fn tok() -> &'static QwenTokenizer {
    static TOK: OnceLock<QwenTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let root = std::env::var("QWENVL_FIXTURES").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures").into()
        });
        let t = QwenTokenizer::from_file(&std::path::Path::new(&root).join("tiny-a/qwen.tiktoken"))
            .expect("fixture vocabulary");
        t.warm_up().expect("BPE");
        t
    })
}

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

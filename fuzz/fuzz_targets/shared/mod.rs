//! What several fuzz targets need: the tiny-a fixture vocabulary, loaded once.

use std::sync::OnceLock;

use lm::tokenizer::QwenTokenizer;

/// `$QWENVL_FIXTURES/tiny-a/qwen.tiktoken` (default `../shared/fixtures` beside the repository),
/// built and warmed up once per process.
pub fn tok() -> &'static QwenTokenizer {
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

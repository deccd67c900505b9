//! Tokenizer: encode arbitrary text under every `Specials` mode, decode arbitrary ids, and check
//! that text encoded without specials decodes back to its NFC form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lm::tokenizer::Specials;

#[path = "shared/mod.rs"]
mod shared;
use shared::tok;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tok = tok();
    let text = String::from_utf8_lossy(rest);
    let specials = [
        Specials::All,
        Specials::ImageMarkup,
        Specials::GroundingMarkup,
        Specials::None,
    ][usize::from(mode % 4)];
    if let Ok(ids) = tok.encode(&text, specials) {
        let _ = tok.decode(&ids, true, true);
        let _ = tok.decode(&ids, false, false);
    }
    // Without specials, decoding is the inverse of encoding (up to NFC).
    let plain = tok
        .encode(&text, Specials::None)
        .expect("encoding plain text never fails");
    let nfc: String = unicode_nfc(&text);
    assert_eq!(tok.decode(&plain, false, false), nfc);
    // Arbitrary ids (including out-of-vocabulary ones and broken image spans).
    let ids: Vec<u32> = rest
        .chunks(3)
        .map(|c| c.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)) % 152_000)
        .collect();
    let _ = tok.decode(&ids, mode & 1 == 0, mode & 2 == 0);
    let _ = tok.encode_ordinary(&text);
});

fn unicode_nfc(s: &str) -> String {
    unicode_normalization::UnicodeNormalization::nfc(s).collect()
}

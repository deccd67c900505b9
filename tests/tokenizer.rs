//! Golden tests of the tokenizer against `expected/tokenizer.json` (reference QWenTokenizer).

use std::sync::OnceLock;

use lm::tokenizer::{self, QwenTokenizer, Specials};
use qwenvl_e2e::{expected_json, tiny_a};
use serde_json::Value;

fn tok() -> &'static QwenTokenizer {
    static TOK: OnceLock<QwenTokenizer> = OnceLock::new();
    TOK.get_or_init(|| QwenTokenizer::from_file(&tiny_a().join("qwen.tiktoken")).unwrap())
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// Checks a result against a recorded `{"ok": true, "value": ids}` or
/// `{"ok": false, "error": "Type: msg"}`.
/// For errors, our message must end with the reference's message (the part after the Python type).
fn check_outcome(got: lm::Result<Vec<u32>>, want: &Value, what: &str) {
    if want["ok"].as_bool().unwrap() {
        let got = got.unwrap_or_else(|e| panic!("{what}: unexpected error {e}"));
        assert_eq!(got, ids_of(&want["value"]), "{what}");
    } else {
        let err = want["error"].as_str().unwrap();
        let msg = err.split_once(": ").map_or(err, |(_, m)| m);
        match got {
            Ok(ids) => panic!("{what}: expected error {err:?}, got {} ids", ids.len()),
            Err(e) => assert!(e.to_string().ends_with(msg), "{what}: {e} vs {err}"),
        }
    }
}

#[test]
fn special_tokens() {
    let j = expected_json("tokenizer.json");
    let t = tok();
    for (name, v) in j["special_tokens"].as_object().unwrap() {
        let v = u32::try_from(v.as_u64().unwrap()).unwrap();
        match name.as_str() {
            "n_mergeable_ranks" => assert_eq!(v as usize, tokenizer::N_RANKS),
            "n_vocab_tiktoken" => assert_eq!(v as usize, t.vocab_size_tokenizer()),
            "eod_id" => assert_eq!(v, tokenizer::ENDOFTEXT),
            _ => {
                assert_eq!(t.special_id(name), Some(v), "{name}");
                assert_eq!(t.id_to_special(v), Some(name.as_str()), "{name}");
                assert_eq!(t.token_bytes(v), Some(name.as_bytes()));
                let enc = t.encode(name, Specials::All);
                if v == tokenizer::IMG_START {
                    // A lone `<img>` opens a span that never closes.
                    assert!(enc.is_err());
                } else {
                    assert_eq!(enc.unwrap(), vec![v], "{name}");
                }
            }
        }
    }
    // Every special round-trips through its string; the constants agree with the fixture.
    for id in tokenizer::ENDOFTEXT..t.vocab_size_tokenizer() as u32 {
        let name = t.id_to_special(id).unwrap();
        assert_eq!(t.special_id(name), Some(id));
    }
    assert_eq!(t.special_id("<|extra_205|>"), None);
    assert_eq!(t.id_to_special(100), None);
    assert_eq!(t.token_bytes(151860), None);
    assert_eq!(t.encode_ordinary("\n"), vec![198]);
}

#[test]
fn encode_cases() {
    let j = expected_json("tokenizer.json");
    let t = tok();
    let cases = j["encode"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        check_outcome(
            t.encode(text, Specials::All),
            &c["encode_default"],
            &format!("encode_default {text:?}"),
        );
        check_outcome(
            t.encode(text, Specials::ImageMarkup),
            &c["encode_image_st_only"],
            &format!("encode_image_st_only {text:?}"),
        );
        for (enc, dec) in [
            ("encode_default", "decode_of_encode_default"),
            ("encode_image_st_only", "decode_of_encode_image_st_only"),
        ] {
            if c[enc]["ok"].as_bool().unwrap() && c[dec]["ok"].as_bool().unwrap() {
                let ids = ids_of(&c[enc]["value"]);
                assert_eq!(
                    t.decode(&ids, false, false),
                    c[dec]["value"].as_str().unwrap(),
                    "{dec} {text:?}"
                );
            }
        }
    }
}

#[test]
fn edge_cases() {
    let j = expected_json("tokenizer.json");
    let t = tok();
    for c in j["edge_cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        check_outcome(
            t.encode(text, Specials::ImageMarkup),
            &c["encode_image_st_only"],
            &format!("edge case {text:?}"),
        );
    }
}

#[test]
fn from_list_format_text_encoding() {
    let j = expected_json("tokenizer.json");
    let t = tok();
    for c in j["from_list_format"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        check_outcome(
            t.encode(text, Specials::ImageMarkup),
            &c["encode_image_st_only"],
            &format!("from_list_format {text:?}"),
        );
    }
}

#[test]
fn decode_cases() {
    let j = expected_json("tokenizer.json");
    let t = tok();
    let cases = j["decode"].as_array().unwrap();
    assert!(!cases.is_empty());
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let ids = ids_of(&c["ids"]);
        let skip = c["skip_special_tokens"].as_bool().unwrap();
        assert!(c["decode"]["ok"].as_bool().unwrap(), "{name}");
        assert_eq!(
            t.decode(&ids, skip, false),
            c["decode"]["value"].as_str().unwrap(),
            "{name} skip={skip}"
        );
        if let Some(keep) = c.get("decode_keep_image_special") {
            assert!(keep["ok"].as_bool().unwrap(), "{name}");
            assert_eq!(
                t.decode(&ids, skip, true),
                keep["value"].as_str().unwrap(),
                "{name} keep_image_special"
            );
        }
    }
}

/// Our secure prompt encoding: only ref/box/quad are markup; image and chat specials typed in text
/// are plain text, so they never open a span or a turn.
#[test]
fn grounding_markup_mode_keeps_image_and_chat_tags_as_text() {
    let t = tok();
    let j = expected_json("tokenizer.json");
    let texts = j["encode"]
        .as_array()
        .unwrap()
        .iter()
        .chain(j["edge_cases"].as_array().unwrap())
        .map(|c| c["text"].as_str().unwrap());
    for text in texts {
        let ids = t.encode(text, Specials::GroundingMarkup).unwrap();
        assert!(
            ids.iter().all(|&id| id < tokenizer::ENDOFTEXT
                || (tokenizer::REF_START..=tokenizer::QUAD_END).contains(&id)),
            "{text:?}"
        );
        assert_eq!(t.decode(&ids, false, false), text_nfc(text), "{text:?}");
        // With no markup at all the ids are exactly the ordinary encoding.
        if !["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"]
            .iter()
            .any(|m| text.contains(m))
        {
            assert_eq!(ids, t.encode_ordinary(text), "{text:?}");
        }
    }
    let ids = t
        .encode(
            "<img>a.png</img><|im_start|><ref>x</ref>",
            Specials::GroundingMarkup,
        )
        .unwrap();
    assert_eq!(
        ids.iter().filter(|&&id| id >= tokenizer::ENDOFTEXT).count(),
        2
    );
    assert_eq!(
        t.encode("<ref>x</ref>", Specials::None).unwrap(),
        t.encode_ordinary("<ref>x</ref>")
    );
}

fn text_nfc(text: &str) -> String {
    // Decoding returns the NFC form that was encoded; fixture texts with decomposed characters
    // decode to their composed form (see `decode_of_encode_*`).
    let j = expected_json("tokenizer.json");
    j["encode"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["text"].as_str() == Some(text))
        .and_then(|c| c["decode_of_encode_default"]["value"].as_str())
        .unwrap_or(text)
        .to_string()
}

#[test]
fn image_spans() {
    let t = tok();
    // A special token inside a span is rejected, as by the reference (TypeError joining the bytes).
    assert!(t
        .encode("<img>a<ref>b</img>", Specials::ImageMarkup)
        .is_err());
    assert!(t
        .encode("<img>a<img>b</img>", Specials::ImageMarkup)
        .is_err());
    assert!(t.encode("<img>a<|im_end|>b</img>", Specials::All).is_err());
    // ... but chat specials are plain path bytes when only the markup is recognised.
    let ids = t
        .encode("<img>a<|im_end|>b</img>", Specials::ImageMarkup)
        .unwrap();
    assert_eq!(
        lm::tokenizer::image_path_from_span(&ids).unwrap(),
        b"a<|im_end|>b"
    );
    // Span <-> path, and decoding a span back to `<img>path</img>`.
    let path = "图片/x y.png".as_bytes();
    let span = lm::tokenizer::image_span(path).unwrap();
    assert_eq!(span.len(), tokenizer::IMG_SPAN + 2);
    assert_eq!(lm::tokenizer::image_path_from_span(&span).unwrap(), path);
    assert_eq!(t.decode(&span, false, false), "<img>图片/x y.png</img>");
    assert_eq!(t.decode(&span, true, false), "图片/x y.png");
    // Exactly 256 bytes: no padding, still decodable.
    let full = lm::tokenizer::image_span(&[b'x'; 256]).unwrap();
    assert_eq!(
        t.decode(&full, false, false),
        format!("<img>{}</img>", "x".repeat(256))
    );
    // An unclosed span decodes token by token instead of failing.
    assert_eq!(
        t.decode(&[tokenizer::IMG_START, 9707], false, false),
        "<img>Hello"
    );
    // Ids past the tokenizer's vocab (model padding rows) have no text.
    assert_eq!(t.decode(&[9707, 151900, 1879], false, false), "Hello world");
}

/// `greedy.tokens_text` (each new id alone) and `greedy.text` (all together, specials kept) of
/// `cases.json` are reference decodes too.
#[test]
fn greedy_texts_decode() {
    let t = tok();
    let j = expected_json("cases.json");
    for case in j["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let g = &case["greedy"];
        let ids = ids_of(&g["ids"]);
        let texts = g["tokens_text"].as_array().unwrap();
        assert_eq!(ids.len(), texts.len(), "{id}");
        for (&tid, want) in ids.iter().zip(texts) {
            assert_eq!(
                t.decode(&[tid], false, false),
                want.as_str().unwrap(),
                "{id}: {tid}"
            );
        }
        assert_eq!(
            t.decode(&ids, false, false),
            g["text"].as_str().unwrap(),
            "{id}"
        );
    }
}

//! Checkpoint parsing of untrusted bytes: safetensors header, torch zip archive, restricted
//! pickle, zip directory, shard index JSON. The first byte picks the parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lm::checkpoint::parse;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => drop(parse::safetensors(rest)),
        1 => drop(parse::torch(rest)),
        2 => drop(parse::pickle(rest)),
        3 => drop(parse::zip(rest)),
        _ => drop(parse::index_json(rest)),
    }
});

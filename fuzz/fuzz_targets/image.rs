//! Image decoding with the decoder limits (every format recognised by content).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(img) = vision::decode_rgb(data, "fuzz") {
        assert!(img.width() > 0 && img.height() > 0);
        assert!(img.width() <= vision::MAX_IMAGE_SIDE && img.height() <= vision::MAX_IMAGE_SIDE);
        // Preprocessing must accept whatever decoding accepts.
        if u64::from(img.width()) * u64::from(img.height()) <= 1 << 20 {
            let _ = vision::preprocess(&img, 28);
        }
    }
});

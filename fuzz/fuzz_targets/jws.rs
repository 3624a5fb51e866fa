//! Compact JWS reading (src/auth/jws.rs) on arbitrary text: never panics; what it accepts
//! has exactly three segments, a header that is one JSON object without `crit`, and a
//! signature that round-trips through canonical base64url; a claims segment it reads is
//! one JSON object with no repeated member name (checked against serde_json's own reading,
//! which keeps the last of repeated names and must then agree on every name it saw).
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use smartgate::auth::jws::{Compact, decode_object, numeric_date};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Compact::parse(text) {
        assert_eq!(text.split('.').count(), 3);
        assert!(!c.header.contains_key("crit"));
        let sig = text.rsplit('.').next().unwrap();
        let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        assert_eq!(URL_SAFE_NO_PAD.encode(raw), sig, "one encoding only");
    }
    for segment in text.split('.') {
        if let Some(obj) = decode_object(segment) {
            let raw = URL_SAFE_NO_PAD.decode(segment).unwrap();
            let lenient: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&raw).expect("serde_json reads what we read");
            assert_eq!(obj.len(), lenient.len(), "a repeated member name slipped through");
            for (_, v) in &obj {
                let _ = numeric_date(v);
            }
        }
    }
});

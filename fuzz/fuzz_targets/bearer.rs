//! Bearer token extraction on arbitrary Authorization values and query strings: never
//! panics; a token it returns is a well-formed RFC 6750 b64token taken from a single
//! `Bearer` header, and never one from the query.
#![no_main]

use http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
use libfuzzer_sys::fuzz_target;
use smartgate::auth::bearer::extract;

fuzz_target!(|data: &[u8]| {
    // First byte: how many Authorization headers (0-2); then the value; a 0xff splits off
    // a query string.
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let (value, query) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], std::str::from_utf8(&rest[i + 1..]).ok()),
        None => (rest, None),
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(value) {
        for _ in 0..count % 3 {
            headers.append(AUTHORIZATION, v.clone());
        }
    }
    if let Ok(token) = extract(&headers, query) {
        assert_eq!(count % 3, 1, "a token from a single header only");
        let body = token.trim_end_matches('=');
        assert!(!body.is_empty());
        assert!(
            body.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
        );
        let text = std::str::from_utf8(value).unwrap();
        assert!(text[..6].eq_ignore_ascii_case("bearer"));
        assert!(text.ends_with(token));
    }
});

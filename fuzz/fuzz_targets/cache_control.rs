//! Keeping answers to tokens out of shared caches, on arbitrary `Cache-Control` values
//! (one per input line). Never panics; an answer that lets a shared cache keep it
//! leaves with a plain `private` and without `public`; a second pass changes nothing.
#![no_main]

use http::header::{CACHE_CONTROL, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use smartgate::proxy::headers::keep_private;

/// The directive names of every value, lowercased, outside quoted strings (a rough
/// reading: enough to say whether `private` or `public` stands alone).
fn names(h: &HeaderMap) -> Vec<String> {
    let mut out = Vec::new();
    for v in h.get_all(CACHE_CONTROL) {
        let mut quoted = false;
        let mut escaped = false;
        let mut current = String::new();
        for b in v.as_bytes() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' if !quoted => out.push(std::mem::take(&mut current)),
                _ if !quoted => current.push(b.to_ascii_lowercase() as char),
                _ => {}
            }
        }
        out.push(current);
    }
    out.into_iter()
        .map(|d| d.split('=').next().unwrap_or("").trim().to_owned())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            h.append(CACHE_CONTROL, v);
        }
    }
    let before = h.clone();
    keep_private(&mut h);
    if h != before {
        let after = names(&h);
        assert!(after.iter().any(|n| n == "private"), "{before:?} -> {h:?}");
        assert!(!after.iter().any(|n| n == "public"), "{before:?} -> {h:?}");
    }
    let once = h.clone();
    keep_private(&mut h);
    assert_eq!(h, once, "a second pass changed {once:?}");
});

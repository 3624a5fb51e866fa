//! The request classifier on arbitrary method, path, query and form body: never panics,
//! and whatever it accepts has a path made only of decoded, unambiguous segments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartgate::fhir::request::classify;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let mut parts = s.splitn(4, '\n');
    let method = match parts.next().unwrap_or("").len() % 6 {
        0 => http::Method::GET,
        1 => http::Method::POST,
        2 => http::Method::PUT,
        3 => http::Method::PATCH,
        4 => http::Method::DELETE,
        _ => http::Method::HEAD,
    };
    let path = parts.next().unwrap_or("");
    let query = parts.next();
    let form = parts.next().map(str::as_bytes);
    let headers = http::HeaderMap::new();
    if let Ok(req) = classify(&method, path, query, &headers, form, Some("batch")) {
        for v in [&req.id, &req.version, &req.operation].into_iter().flatten() {
            assert!(!v.contains(['/', '\\', '%', ';']) && v != "." && v != "..");
        }
    }
});

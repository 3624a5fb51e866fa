//! Rewriting the upstream's address out of answers, on arbitrary input: `Link` header
//! values and JSON documents (Bundles, export manifests, anything), and export status URL
//! signatures. Never panics; no URL under the upstream base survives in a rewritten
//! `Link` target; rewriting twice changes nothing more; no made-up signature verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartgate::fhir::bundle::rewrite_links;
use smartgate::config::BulkDataConfig;
use smartgate::exports::{Exports, split_signature};
use smartgate::proxy::headers::map_link_targets;

const UP: &str = "http://up/fhir";

fn to_public(url: &str) -> Option<String> {
    url.strip_prefix(UP)
        .filter(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']))
        .map(|rest| format!("https://pub/r4{rest}"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Export status URLs: a signature split off any target verifies only if it was made
    // for that target (never, for input the fuzzer makes up).
    if let Some((target, signature)) = split_signature(text) {
        let exports = Exports::default();
        let config = BulkDataConfig::default();
        assert!(!exports.verify(&config, "client", target, signature, 0));
    }
    if let Some(out) = map_link_targets(text, &to_public) {
        assert_ne!(out, text);
        assert_eq!(map_link_targets(&out, &to_public), None, "a second pass changed {out:?}");
    }
    if let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(text) {
        if rewrite_links(&mut doc, &to_public) {
            let once = doc.clone();
            assert!(!rewrite_links(&mut doc, &to_public));
            assert_eq!(doc, once);
        }
    }
});

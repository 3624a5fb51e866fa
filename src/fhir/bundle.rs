//! Structural edits of FHIR JSON Bundles, and of Bulk Data export manifests: the URL
//! fields that point back at the server.

use serde_json::Value;

/// Cheap test for whether a FHIR JSON body may hold something [`rewrite_links`] would
/// change: only Bundles and export manifests (which have `transactionTime`) carry links.
/// A body that names either only through JSON escapes contains `\u`, so it is caught too.
pub fn may_need_link_rewrite(body: &[u8]) -> bool {
    // One pass for the rare first letters of the three markers (`Bundle`,
    // `transactionTime`, an escape `\u` that could spell either), then a look at each
    // candidate: a third of three substring searches over a body that has none.
    const MANIFEST: &[u8] = b"transactionTime";
    const T_AT: usize = 11; // where `T` is in MANIFEST
    memchr::memchr3_iter(b'B', b'T', b'\\', body).any(|i| match body[i] {
        b'B' => body[i..].starts_with(b"Bundle"),
        b'T' => i >= T_AT && body[i - T_AT..].starts_with(MANIFEST),
        _ => body.get(i + 1) == Some(&b'u'),
    })
}

/// Rewrites `Bundle.link[].url`, `Bundle.entry[].fullUrl` and
/// `Bundle.entry[].response.location` with `map` (which returns `None` to keep a URL),
/// descending into Bundles nested as entry resources. Returns whether anything changed.
///
/// FHIR R4 bundle.html: `link.url` and `fullUrl` are absolute URLs on the server, and so
/// would reveal the upstream's address.
///
/// A Bulk Data export manifest (an object with `transactionTime` and `output`, FHIR Bulk
/// Data Access 2.0 export.html#response---complete-status) gets its `request` and the
/// `url` of every `output`, `error` and `deleted` file rewritten the same way, so that
/// the files are fetched through the gateway. URLs elsewhere (object storage) are kept.
pub fn rewrite_links(resource: &mut Value, map: &dyn Fn(&str) -> Option<String>) -> bool {
    let Some(obj) = resource.as_object_mut() else {
        return false;
    };
    if obj.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        if !(obj.contains_key("transactionTime") && obj.get("output").is_some_and(Value::is_array))
        {
            return false;
        }
        let mut changed = rewrite_field(resource, "request", map);
        for list in ["output", "error", "deleted"] {
            if let Some(files) = resource.get_mut(list).and_then(Value::as_array_mut) {
                for file in files {
                    changed |= rewrite_field(file, "url", map);
                }
            }
        }
        return changed;
    }
    let mut changed = false;
    if let Some(links) = obj.get_mut("link").and_then(Value::as_array_mut) {
        for link in links {
            changed |= rewrite_field(link, "url", map);
        }
    }
    if let Some(entries) = obj.get_mut("entry").and_then(Value::as_array_mut) {
        for entry in entries {
            changed |= rewrite_field(entry, "fullUrl", map);
            if let Some(response) = entry.get_mut("response") {
                changed |= rewrite_field(response, "location", map);
            }
            if let Some(inner) = entry.get_mut("resource") {
                changed |= rewrite_links(inner, map);
            }
        }
    }
    changed
}

fn rewrite_field(obj: &mut Value, field: &str, map: &dyn Fn(&str) -> Option<String>) -> bool {
    let Some(slot) = obj.get_mut(field) else {
        return false;
    };
    let Some(new) = slot.as_str().and_then(map) else {
        return false;
    };
    *slot = Value::String(new);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn up(url: &str) -> Option<String> {
        url.strip_prefix("http://up/fhir")
            .map(|rest| format!("https://pub/r4{rest}"))
    }

    /// Links, fullUrls, response locations and nested bundles are rewritten; resource
    /// content that merely mentions the upstream is not touched.
    #[test]
    fn rewrites_bundle_fields() {
        let mut b = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": "http://up/fhir?_getpages=abc"}],
            "entry": [
                {"fullUrl": "http://up/fhir/Patient/1",
                 "resource": {"resourceType": "Patient", "id": "1",
                              "text": {"div": "see http://up/fhir/Patient/1"}}},
                {"response": {"status": "201", "location": "http://up/fhir/Patient/2/_history/1"}},
                {"resource": {"resourceType": "Bundle", "link": [{"url": "http://up/fhir/x"}]}}
            ]
        });
        assert!(rewrite_links(&mut b, &up));
        assert_eq!(b["link"][0]["url"], "https://pub/r4?_getpages=abc");
        assert_eq!(b["entry"][0]["fullUrl"], "https://pub/r4/Patient/1");
        assert_eq!(
            b["entry"][0]["resource"]["text"]["div"],
            "see http://up/fhir/Patient/1"
        );
        assert_eq!(
            b["entry"][1]["response"]["location"],
            "https://pub/r4/Patient/2/_history/1"
        );
        assert_eq!(
            b["entry"][2]["resource"]["link"][0]["url"],
            "https://pub/r4/x"
        );
    }

    /// Non-bundles and odd shapes are left alone without error.
    #[test]
    fn ignores_non_bundles_and_odd_shapes() {
        let mut p = json!({"resourceType": "Patient", "link": [{"url": "http://up/fhir/x"}]});
        assert!(!rewrite_links(&mut p, &up));
        let mut odd =
            json!({"resourceType": "Bundle", "link": "nope", "entry": [1, null, {"fullUrl": 3}]});
        assert!(!rewrite_links(&mut odd, &up));
        assert!(!rewrite_links(&mut json!([1, 2]), &up));
    }

    /// An export manifest's file URLs on the server are rewritten; ones elsewhere are not.
    #[test]
    fn rewrites_export_manifests() {
        let mut m = json!({
            "transactionTime": "2024-01-01T00:00:00Z",
            "request": "http://up/fhir/$export?_type=Patient",
            "requiresAccessToken": true,
            "output": [
                {"type": "Patient", "url": "http://up/fhir/Binary/p1", "count": 2},
                {"type": "Observation", "url": "https://storage.example/o1.ndjson"}
            ],
            "error": [{"type": "OperationOutcome", "url": "http://up/fhir/Binary/e1"}]
        });
        assert!(rewrite_links(&mut m, &up));
        assert_eq!(m["request"], "https://pub/r4/$export?_type=Patient");
        assert_eq!(m["output"][0]["url"], "https://pub/r4/Binary/p1");
        assert_eq!(m["output"][1]["url"], "https://storage.example/o1.ndjson");
        assert_eq!(m["error"][0]["url"], "https://pub/r4/Binary/e1");
        // Without `output` it is not a manifest.
        let mut other = json!({"transactionTime": "x", "request": "http://up/fhir/x"});
        assert!(!rewrite_links(&mut other, &up));
        assert!(may_need_link_rewrite(&serde_json::to_vec(&m).unwrap()));
    }

    /// The pre-filter never skips a Bundle, escaped or not.
    #[test]
    fn prefilter() {
        assert!(may_need_link_rewrite(br#"{"resourceType":"Bundle"}"#));
        assert!(may_need_link_rewrite(br#"{"resourceType":"Bund\u006ce"}"#));
        assert!(!may_need_link_rewrite(br#"{"resourceType":"Patient"}"#));
        assert!(may_need_link_rewrite(br#"{"transactionTime":"x"}"#));
        // A `T` too near the start to end `transactionTime`, a `B` and a `\` at the end.
        assert!(!may_need_link_rewrite(b"T actionTime B \\"));
    }

    /// Contains `needle`: the definition the pre-filter's single pass must keep.
    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    proptest::proptest! {
        /// The single pass finds exactly what three substring searches find, over text
        /// made of the markers' pieces so that near misses are common.
        #[test]
        fn prefilter_is_the_three_searches(parts in proptest::collection::vec(
            proptest::sample::select(vec![
                "Bundle", "Bundl", "B", "transactionTime", "transaction", "actionTime",
                "T", "\\", "u", "\\u", "\"", "{", "x",
            ]),
            0..24,
        )) {
            let body = parts.concat().into_bytes();
            let expected = contains(&body, b"Bundle")
                || contains(&body, b"transactionTime")
                || contains(&body, b"\\u");
            proptest::prop_assert_eq!(may_need_link_rewrite(&body), expected);
        }
    }
}

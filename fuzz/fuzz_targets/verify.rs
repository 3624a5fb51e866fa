//! Response and body verification (and Subscription criteria) on arbitrary JSON: never
//! panics; the single-pass check of one resource decides like the whole one; filtering
//! never adds entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartgate::policy::verify::{Verdict, Viewer};
use smartgate::policy::{Context, Policy, Verify};
use smartgate::smart::scope::{Grants, Perms};

fuzz_target!(|data: &[u8]| {
    let grants = Grants::parse([
        "patient/Observation.rs",
        "patient/Patient.r",
        "user/Condition.rs?category=x",
        "patient/Medication.r",
    ]);
    let ctx = Context::new(Some("123"), None, false);
    let policy = Policy {
        bases: vec!["http://up/fhir".into()],
        ..Policy::default()
    };
    let v = Viewer { grants: &grants, ctx: &ctx, policy: &policy, owners: None };
    let rs = Perms::R.union(Perms::S);
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else {
        let _ = v.visible_bytes(data, rs);
        return;
    };
    if let Some(fast) = v.visible_bytes(data, rs) {
        // Only documents with one reading are answered from the bytes (smartgate::json).
        assert!(smartgate::json::parse(data).is_ok());
        assert_eq!(fast, v.visible(&doc, rs));
    }
    if let Some(ty) = doc.get("resourceType").and_then(|t| t.as_str()) {
        let _ = v.check_write(ty, &doc, Perms::C);
    }
    // Any `criteria`, as a Subscription's: a search classified and decided, or refused.
    let _ = v.check_standing_search(&doc);
    let before = doc.get("entry").and_then(|e| e.as_array()).map_or(0, |e| e.len());
    let mut filtered = doc.clone();
    if let Verdict::Changed { removed } = v.verify(Verify::Bundle { narrowed: true }, &mut filtered) {
        let after = filtered.get("entry").and_then(|e| e.as_array()).map_or(0, |e| e.len());
        assert!(after + removed == before || removed == 0);
    }
    let mut batch = doc;
    let _ = v.verify_batch_response(&mut batch, &[]);
});

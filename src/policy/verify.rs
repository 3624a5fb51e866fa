//! The checks on resources that the plan asks for: whether the token could read a
//! resource directly (response verification), and whether it could write one (request
//! bodies and stored versions). Pure functions over parsed JSON; no I/O.

use serde_json::Value;

use super::{Context, DenyReason, Plan, Policy, Verify, applicable};
use crate::fhir::search::{compartment_patients, in_compartment, matches};
use crate::smart::scope::{Grants, Perms};

/// What verifying a response did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to change.
    Unchanged,
    /// The document was changed; `removed` entries were taken out.
    Changed {
        /// Entries removed.
        removed: usize,
    },
    /// The whole response is refused.
    Refuse(DenyReason),
}

/// Who the resources a Provenance points at belong to: `Type/id` → the patients whose
/// compartment each is in (none: no patient's). The pipeline fills it before it verifies
/// an answer holding Provenance, from the entries of the same Bundle and by looking the
/// other targets up.
pub type Owners = std::collections::HashMap<String, Vec<String>>;

/// The token's view of resources.
#[derive(Debug, Clone, Copy)]
pub struct Viewer<'a> {
    /// The token's scopes.
    pub grants: &'a Grants,
    /// Its patient context.
    pub ctx: &'a Context,
    /// The policy.
    pub policy: &'a Policy,
    /// Owners of the resources the answer's Provenance points at, when known.
    pub owners: Option<&'a Owners>,
}

impl Viewer<'_> {
    /// Whether some granted scope with one of the letters in `any` covers `resource`: its
    /// type, its compartment when the scope is confined, its granular constraints.
    pub fn visible(&self, resource: &Value, any: Perms) -> bool {
        let Some(ty) = resource_type(resource) else {
            return false;
        };
        let (apps, _) = applicable(self.grants, self.ctx, self.policy, ty, any, true);
        let bases = &self.policy.bases;
        apps.iter().any(|a| {
            a.confined_to.is_none_or(|p| match ty {
                "Bundle" => self.entries_visible(resource, any),
                "Subscription" => self.check_standing_search(resource).is_ok(),
                // A Group is in the compartment of every patient it lists; read under
                // one patient's context it would list the others (a cohort, a clinic's
                // roster). Readable only when the patient is the only one it names.
                "Group" => self.written_for(ty, resource, p),
                // US Core: the Provenance of the patient's records is the patient's.
                "Provenance" => {
                    in_compartment(ty, resource, p, bases) || self.provenance_of(resource, p)
                }
                _ => in_compartment(ty, resource, p, bases),
            }) && a
                .constraints
                .iter()
                .all(|(k, v)| matches(ty, resource, k, v, bases) == Some(true))
        })
    }

    /// Whether a Provenance is about `patient`'s records alone: it names targets, and
    /// every one is a resource known ([`Owners`]) to be in that patient's compartment and
    /// no other's. The R4 compartment puts a Provenance in it only when a target is the
    /// Patient itself; US Core (and the (g)(10) tests) read the Provenance of a patient's
    /// Conditions, Observations, … with patient scopes.
    fn provenance_of(&self, resource: &Value, patient: &str) -> bool {
        let Some(owners) = self.owners else {
            return false;
        };
        let Some(targets) = resource.get("target").and_then(Value::as_array) else {
            return false;
        };
        !targets.is_empty()
            && targets.iter().all(|t| {
                crate::fhir::reference::reference_target(t, &self.policy.bases)
                    .and_then(|(ty, id)| owners.get(&format!("{ty}/{id}")))
                    .is_some_and(|ps| !ps.is_empty() && ps.iter().all(|p| p == patient))
            })
    }

    /// The patients whose compartment `resource` is in (its own id for a Patient).
    pub fn patients_of(&self, resource: &Value) -> Vec<String> {
        resource_type(resource).map_or_else(Vec::new, |ty| {
            compartment_patients(ty, resource, &self.policy.bases)
                .into_iter()
                .map(str::to_owned)
                .collect()
        })
    }

    /// A stored Bundle under confinement: readable when it has entries and the token
    /// could read every entry's resource itself. An entry without a resource (a bare URL),
    /// or with a `request` or `response` (URLs and outcomes that may name other
    /// resources), is not readable; nested Bundles are judged the same way.
    fn entries_visible(&self, bundle: &Value, any: Perms) -> bool {
        bundle
            .get("entry")
            .and_then(Value::as_array)
            .is_some_and(|entries| {
                !entries.is_empty()
                    && entries.iter().all(|e| {
                        e.get("request").is_none()
                            && e.get("response").is_none()
                            && e.get("resource").is_some_and(|r| self.visible(r, any))
                    })
            })
    }

    /// Whether `resource` (of type `ty`, in the compartment) is written for `patient`
    /// alone: every compartment reference names the patient and there is at least one
    /// (a Patient: its own id, so a Patient without one is no patient's). A stored Bundle is written for the patient when it has
    /// entries and each entry's resource is, or is of a type outside the compartment that
    /// the policy lets confined tokens have: the entries are stored in it, not written as
    /// resources, so the type scopes are the Bundle's own.
    fn written_for(&self, ty: &str, resource: &Value, patient: &str) -> bool {
        let entry_for_patient = |r: &Value| match resource_type(r) {
            Some(t) if super::in_compartment_type(t) => self.written_for(t, r, patient),
            Some(t) => self.policy.non_compartment_allowed(t),
            None => false,
        };
        match ty {
            "Bundle" => resource
                .get("entry")
                .and_then(Value::as_array)
                .is_some_and(|entries| {
                    !entries.is_empty()
                        && entries
                            .iter()
                            .all(|e| e.get("resource").is_some_and(entry_for_patient))
                }),
            "Subscription" => self.check_standing_search(resource).is_ok(),
            // A conditional reference (`Patient?identifier=…`) the server would resolve
            // to some patient: unknowable here, so refused.
            _ if has_conditional_reference(ty, resource) => false,
            _ => {
                let ids = compartment_patients(ty, resource, &self.policy.bases);
                !ids.is_empty() && ids.iter().all(|i| *i == patient)
            }
        }
    }

    /// [`Viewer::visible`] straight from the bytes of one resource, parsing only the
    /// top-level elements the check reads (`resourceType`, `id`, the compartment paths,
    /// the granular constraints' paths): a read's response is mostly text the check
    /// never looks at. `None` when the body is not a plain JSON object of a known type,
    /// or is a Bundle or an OperationOutcome (the caller then parses it whole: an
    /// OperationOutcome is sanitised there).
    pub fn visible_bytes(&self, bytes: &[u8], any: Perms) -> Option<bool> {
        // Read strictly, whole (a repeat at any depth, or anything else the full reading
        // refuses, is refused here); only the members the check needs are built.
        let members = crate::json::members(bytes).ok()?;
        // At most one: a repeated name was refused.
        let (_, ty) = members.iter().find(|(name, _)| name == "resourceType")?;
        let ty = crate::json::parse_value(ty).ok()?;
        let ty = crate::fhir::request::resource_type(ty.as_str()?).ok()?;
        if ty == "Bundle" || ty == "OperationOutcome" {
            return None;
        }
        let wanted = self.wanted(ty);
        let mut partial = serde_json::Map::new();
        for (name, text) in members {
            if wanted.contains(&&*name) {
                partial.insert(name.into_owned(), crate::json::parse_value(text).ok()?);
            }
        }
        partial.insert("resourceType".to_owned(), Value::from(ty));
        Some(self.visible(&Value::Object(partial), any))
    }

    /// The top-level elements [`Viewer::visible`] reads for a resource of type `ty`:
    /// `id`, the first step of each compartment path and of each path of the granted
    /// scopes' constraints.
    fn wanted(&self, ty: &str) -> Vec<&'static str> {
        let constrained = self.grants.scopes.iter().flat_map(|s| &s.constraints);
        let mut wanted =
            crate::fhir::search::checked_elements(ty, true, constrained.map(|(k, _)| k.as_str()));
        wanted.push("id");
        wanted
    }

    /// Whether a Subscription may stand as written: its `criteria` is a search the server
    /// runs for it from then on, and each match is pushed to the channel's endpoint
    /// without passing the gateway. So the criteria must be a search the token may make
    /// that needs nothing done to its answers: of a type it may search, naming its
    /// patient and carrying its granular constraints itself (nothing to add), reaching
    /// no other resources. A token that may read everything may subscribe to anything;
    /// any other subscription (an absolute or topic-based criteria, say) is refused.
    pub fn check_standing_search(&self, resource: &Value) -> Result<(), DenyReason> {
        use super::{Decision, authorize, reaches_other_resources, sees_everything};
        use crate::fhir::request::{Interaction, classify_get};
        if sees_everything(self.grants, self.ctx, self.policy) {
            return Ok(());
        }
        let unreadable = DenyReason::Unverifiable(
            "a Subscription's criteria must be a search of one type the token may make",
        );
        let Some(criteria) = resource.get("criteria").and_then(Value::as_str) else {
            return Err(unreadable);
        };
        let search = classify_get(&format!("/{criteria}")).map_err(|_| unreadable.clone())?;
        if search.interaction != Interaction::SearchType || reaches_other_resources(&search) {
            return Err(unreadable);
        }
        match authorize(self.grants, self.ctx, &search, self.policy) {
            Decision::Deny { reason, .. } => Err(reason),
            Decision::Allow(plan)
                if plan.inject.is_empty()
                    && matches!(
                        plan.verify,
                        Verify::None | Verify::Bundle { narrowed: true }
                    ) =>
            {
                Ok(())
            }
            Decision::Allow(_) => Err(DenyReason::Unverifiable(
                "a Subscription's criteria must name the patient and the scopes' constraints",
            )),
        }
    }

    /// Whether the token may write `resource` (as type `ty`) with `perm`: under
    /// confinement every compartment reference names the patient and there is at least
    /// one; under constraints the resource matches them.
    pub fn check_write(&self, ty: &str, resource: &Value, perm: Perms) -> Result<(), DenyReason> {
        if resource_type(resource) != Some(ty) {
            return Err(DenyReason::Unverifiable(
                "the body is not a resource of the type written",
            ));
        }
        let (apps, no_patient) = applicable(self.grants, self.ctx, self.policy, ty, perm, false);
        if apps.is_empty() {
            return Err(if no_patient {
                DenyReason::NoPatientContext
            } else {
                DenyReason::InsufficientScope
            });
        }
        let bases = &self.policy.bases;
        let mut reason = DenyReason::Compartment;
        for a in &apps {
            let compartment_ok = a
                .confined_to
                .is_none_or(|p| self.written_for(ty, resource, p));
            let granular_ok = a
                .constraints
                .iter()
                .all(|(k, v)| matches(ty, resource, k, v, bases) == Some(true));
            if compartment_ok && granular_ok {
                return Ok(());
            }
            if compartment_ok {
                reason = DenyReason::Granular;
            }
        }
        Err(reason)
    }

    /// Whether the token may leave `resource` stored as type `ty` (a create or update body,
    /// a patched result, a transaction entry): [`Viewer::check_write`] and, for a
    /// Subscription, which the server keeps running as a search, its criteria
    /// ([`Viewer::check_standing_search`]) for every token.
    pub fn check_written(&self, ty: &str, resource: &Value, perm: Perms) -> Result<(), DenyReason> {
        self.check_write(ty, resource, perm)?;
        if ty == "Subscription" {
            self.check_standing_search(resource)?;
        }
        Ok(())
    }

    /// Verifies a response body as `verify` says (a successful response).
    pub fn verify(&self, verify: Verify, doc: &mut Value) -> Verdict {
        match verify {
            Verify::None => Verdict::Unchanged,
            Verify::Resource(perm) => self.single(doc, perm),
            Verify::Bundle { narrowed } => {
                if resource_type(doc) == Some("Bundle") {
                    self.filter(doc, narrowed)
                } else {
                    self.single(doc, Perms::R.union(Perms::S))
                }
            }
        }
    }

    fn single(&self, doc: &mut Value, perm: Perms) -> Verdict {
        // The server speaking about the request, not a stored resource: only what of it
        // carries no record data passes.
        if let Some(outcome) = sanitized_outcome(doc) {
            if outcome == *doc {
                return Verdict::Unchanged;
            }
            *doc = outcome;
            return Verdict::Changed { removed: 0 };
        }
        if self.visible(doc, perm) {
            Verdict::Unchanged
        } else {
            Verdict::Refuse(DenyReason::Compartment)
        }
    }

    /// Removes every entry the token could not read; drops `total` when entries were
    /// removed or the query was not confined (it would count what the token cannot see).
    pub fn filter(&self, doc: &mut Value, narrowed: bool) -> Verdict {
        let rs = Perms::R.union(Perms::S);
        let mut removed = 0;
        if let Some(Value::Array(entries)) = doc.get_mut("entry") {
            let before = entries.len();
            entries.retain(|e| e.get("resource").is_some_and(|r| self.visible(r, rs)));
            removed = before - entries.len();
        }
        let mut changed = removed > 0;
        if (removed > 0 || !narrowed)
            && let Some(obj) = doc.as_object_mut()
        {
            changed |= obj.remove("total").is_some();
        }
        if changed {
            Verdict::Changed { removed }
        } else {
            Verdict::Unchanged
        }
    }

    /// Verifies a batch or transaction response entry by entry, with the plan of the
    /// request entry at the same index: a resource the token could not read is taken
    /// out and the entry's status becomes 403; searched Bundles are filtered.
    pub fn verify_batch_response(&self, doc: &mut Value, plans: &[Plan]) -> Verdict {
        let mut removed = 0;
        let mut changed = false;
        let Some(Value::Array(entries)) = doc.get_mut("entry") else {
            return Verdict::Unchanged;
        };
        for (i, entry) in entries.iter_mut().enumerate() {
            // An entry the request did not have is verified as strictly as possible.
            let verify = plans
                .get(i)
                .map_or(Verify::Bundle { narrowed: false }, |p| p.verify);
            let wrote = plans.get(i).is_some_and(|p| p.write.is_some());
            // The outcome of an entry: sanitised like any OperationOutcome.
            if let Some(outcome) = entry.pointer_mut("/response/outcome") {
                match sanitized_outcome(outcome) {
                    Some(clean) if clean == *outcome => {}
                    Some(clean) => {
                        *outcome = clean;
                        changed = true;
                    }
                    None => {
                        *outcome = serde_json::json!({"resourceType": "OperationOutcome",
                            "issue": [{"severity": "error", "code": "unknown"}]});
                        changed = true;
                    }
                }
            }
            let Some(resource) = entry.get_mut("resource") else {
                continue;
            };
            let verdict = self.verify(verify, resource);
            match verdict {
                Verdict::Unchanged => {}
                Verdict::Changed { removed: n } => {
                    removed += n;
                    changed = true;
                }
                Verdict::Refuse(_) => {
                    if let Some(obj) = entry.as_object_mut() {
                        obj.remove("resource");
                        // A write happened whatever its answer holds: its status stands.
                        if !wrote {
                            obj.insert(
                                "response".into(),
                                serde_json::json!({"status": "403 Forbidden"}),
                            );
                        }
                    }
                    removed += 1;
                    changed = true;
                }
            }
        }
        if changed {
            Verdict::Changed { removed }
        } else {
            Verdict::Unchanged
        }
    }
}

/// What of an `OperationOutcome` may go to a token that cannot read everything: each
/// issue's `severity`, `code` and the codings of its `details` (`system`, `code`). The
/// rest — `diagnostics`, `details.text`, `expression`, `location`, the narrative,
/// `contained`, extensions — is free text or references, which may carry another
/// patient's data (a 409 naming the conflicting resource, a 422 quoting it) and cannot
/// be checked. `None` when `doc` is not an OperationOutcome.
pub fn sanitized_outcome(doc: &Value) -> Option<Value> {
    if doc.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome") {
        return None;
    }
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    fn items(v: Option<&Value>) -> &[Value] {
        v.and_then(Value::as_array).map_or(&[], Vec::as_slice)
    }
    let issues: Vec<Value> = items(doc.get("issue"))
        .iter()
        .map(|issue| {
            let mut kept = serde_json::Map::new();
            kept.insert(
                "severity".into(),
                Value::from(text(issue, "severity").unwrap_or_else(|| "error".into())),
            );
            kept.insert(
                "code".into(),
                Value::from(text(issue, "code").unwrap_or_else(|| "unknown".into())),
            );
            let codings: Vec<Value> = items(issue.pointer("/details/coding"))
                .iter()
                .map(|c| {
                    let mut coding = serde_json::Map::new();
                    for k in ["system", "code"] {
                        if let Some(v) = text(c, k) {
                            coding.insert(k.into(), Value::from(v));
                        }
                    }
                    Value::Object(coding)
                })
                .filter(|c| c.as_object().is_some_and(|o| !o.is_empty()))
                .collect();
            if !codings.is_empty() {
                kept.insert("details".into(), serde_json::json!({ "coding": codings }));
            }
            Value::Object(kept)
        })
        .collect();
    let issues = if issues.is_empty() {
        vec![serde_json::json!({"severity": "error", "code": "unknown"})]
    } else {
        issues
    };
    Some(serde_json::json!({"resourceType": "OperationOutcome", "issue": issues}))
}

/// Whether a compartment path of the resource holds a conditional reference
/// (`Type?search`, FHIR R4 http.html#trules), which names no fixed resource.
fn has_conditional_reference(ty: &str, resource: &Value) -> bool {
    crate::fhir::search::compartment_elements(ty, resource)
        .iter()
        .any(|e| {
            e.get("reference")
                .and_then(Value::as_str)
                .is_some_and(|r| r.contains('?'))
        })
}

/// The `resourceType` of a resource, if it is an R4 type.
fn resource_type(v: &Value) -> Option<&'static str> {
    crate::fhir::request::resource_type(v.get("resourceType")?.as_str()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obs(id: &str, patient: &str, category: &str) -> Value {
        json!({
            "resourceType": "Observation", "id": id,
            "subject": {"reference": format!("Patient/{patient}")},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}]
        })
    }

    fn with<T>(scopes: &str, patient: Option<&str>, f: impl FnOnce(Viewer<'_>) -> T) -> T {
        let grants = Grants::parse(scopes.split_whitespace());
        let ctx = Context::new(patient, None, false);
        let policy = Policy {
            bases: vec!["http://up/fhir".into()],
            ..Policy::default()
        };
        f(Viewer {
            grants: &grants,
            ctx: &ctx,
            policy: &policy,
            owners: None,
        })
    }

    #[test]
    fn visibility() {
        let rs = Perms::R.union(Perms::S);
        with(
            "patient/Observation.rs patient/Patient.r",
            Some("123"),
            |v| {
                assert!(v.visible(&obs("1", "123", "laboratory"), rs));
                assert!(!v.visible(&obs("2", "456", "laboratory"), rs));
                assert!(
                    !v.visible(&obs("3", "12", "laboratory"), rs),
                    "no prefix match"
                );
                assert!(v.visible(&json!({"resourceType": "Patient", "id": "123"}), Perms::R));
                assert!(!v.visible(&json!({"resourceType": "Patient", "id": "456"}), Perms::R));
                // No scope for the type, or a contained/logical reference only.
                assert!(!v.visible(
                    &json!({"resourceType": "Condition", "subject": {"reference": "Patient/123"}}),
                    rs
                ));
                assert!(!v.visible(
                    &json!({"resourceType": "Observation", "subject": {"reference": "#p"}}),
                    rs
                ));
                assert!(!v.visible(&json!({"resourceType": "Observation", "subject": {"identifier": {"value": "123"}}}), rs));
                assert!(!v.visible(&json!({"resourceType": "Nonsense"}), rs));
                assert!(!v.visible(&json!([]), rs));
            },
        );
        // Granular: the union of two category scopes; a non-matching resource is not read.
        with(
            "user/Observation.rs?category=laboratory user/Observation.rs?category=vital-signs",
            None,
            |v| {
                assert!(v.visible(&obs("1", "1", "laboratory"), rs));
                assert!(v.visible(&obs("2", "2", "vital-signs"), rs));
                assert!(!v.visible(&obs("3", "3", "social-history"), rs));
                assert_eq!(
                    v.verify(Verify::Resource(Perms::R), &mut obs("3", "3", "imaging")),
                    Verdict::Refuse(DenyReason::Compartment)
                );
            },
        );
    }

    /// The partial parse decides exactly like the whole one.
    #[test]
    fn visible_bytes_agrees() {
        let rs = Perms::R.union(Perms::S);
        for scopes in [
            "patient/Observation.rs",
            "user/Observation.rs?category=laboratory",
            "system/*.rs",
        ] {
            with(scopes, Some("123"), |v| {
                for doc in [
                    obs("1", "123", "laboratory"),
                    obs("2", "456", "laboratory"),
                    obs("3", "123", "imaging"),
                    json!({"resourceType": "Patient", "id": "123"}),
                    json!({"resourceType": "Observation", "performer": [{"reference": "Patient/123"}], "note": [{"text": "x"}]}),
                ] {
                    let bytes = serde_json::to_vec(&doc).unwrap();
                    assert_eq!(
                        v.visible_bytes(&bytes, rs),
                        Some(v.visible(&doc, rs)),
                        "{scopes} {doc}"
                    );
                }
                assert_eq!(v.visible_bytes(b"[1]", rs), None);
                assert_eq!(v.visible_bytes(br#"{"resourceType":"Bundle"}"#, rs), None);
                assert_eq!(v.visible_bytes(br#"{"resourceType":"Nope"}"#, rs), None);
            });
        }
    }

    /// The single-pass reading of the bytes never disagrees with checking the whole
    /// parsed document, whatever the key order, repeated keys, escaped keys and nested
    /// look-alike text; and it does answer for the usual shape (`resourceType` first).
    #[test]
    fn visible_bytes_matches_the_whole_document() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let reference = prop_oneof![
            Just(r#"{"reference":"Patient/123"}"#.to_owned()),
            Just(r#"{"reference":"Patient/456"}"#.to_owned()),
            Just(r#"{"reference":"http://up/fhir/Patient/123"}"#.to_owned()),
            Just(r#"{"reference":"Group/1"}"#.to_owned()),
            Just(r#"[{"reference":"Patient/123"},{"reference":"Patient/456"}]"#.to_owned()),
            Just(r#"null"#.to_owned()),
        ];
        let element = prop_oneof![
            reference.clone().prop_map(|r| format!(r#""subject":{r}"#)),
            reference.clone().prop_map(|r| format!(r#""subj\u0065ct":{r}"#)),
            reference.clone().prop_map(|r| format!(r#""performer":[{r}]"#)),
            reference.clone().prop_map(|r| format!(r#""patient":{r}"#)),
            reference.prop_map(|r| format!(r#""item":[{{"resource":{r}}}]"#)),
            Just(r#""criteria":"Observation?patient=Patient/123""#.to_owned()),
            Just(r#""criteria":"Observation?code=x""#.to_owned()),
            Just(r#""crit\u0065ria":"Observation?patient=Patient/123""#.to_owned()),
            Just(r#""id":"1""#.to_owned()),
            Just(r#""category":[{"coding":[{"code":"laboratory"}]}]"#.to_owned()),
            Just(r#""category":[{"coding":[{"code":"imaging"}]}]"#.to_owned()),
            Just(r#""note":[{"text":"\"subject\":{\"reference\":\"Patient/456\"}"}]"#.to_owned()),
            Just(r#""contained":[{"resourceType":"Patient","id":"x","subject":{"reference":"Patient/456"}}]"#.to_owned()),
            Just(r#""resourceType":"Observation""#.to_owned()),
        ];
        let ty = prop_oneof![
            Just("Observation"),
            Just("Patient"),
            Just("Encounter"),
            Just("OperationOutcome"),
            Just("Bundle"),
            Just("Subscription"),
            Just("Linkage"),
            Just("Nope"),
        ];
        let doc = (ty, prop::collection::vec(element, 0..6), 0usize..7).prop_map(
            |(ty, mut elements, at)| {
                elements.insert(at.min(elements.len()), format!(r#""resourceType":"{ty}""#));
                format!("{{{}}}", elements.join(","))
            },
        );
        let rs = Perms::R.union(Perms::S);
        for scopes in [
            "patient/Observation.rs patient/Encounter.rs patient/Patient.rs",
            "patient/*.rs",
            "user/Observation.rs?category=laboratory",
            "patient/Observation.rs?category=imaging",
        ] {
            with(scopes, Some("123"), |v| {
                let mut runner = TestRunner::new(Config::with_cases(400));
                runner
                    .run(&doc, |text| {
                        let bytes = text.as_bytes();
                        let whole: Value = serde_json::from_str(&text).unwrap();
                        // A repeated name has two readings: never answered (crate::json).
                        let one_reading = crate::json::parse(bytes).is_ok();
                        // A Bundle or an OperationOutcome is read whole (the latter to be
                        // sanitised), as is anything of an unknown type.
                        let usual = one_reading
                            && !text.contains("Bundle")
                            && !text.contains("OperationOutcome")
                            && !text.contains("Nope");
                        let expected = v.visible(&whole, rs);
                        match v.visible_bytes(bytes, rs) {
                            Some(seen) => {
                                prop_assert!(one_reading, "answered two readings: {}", text);
                                prop_assert_eq!(seen, expected, "{}", text)
                            }
                            None => prop_assert!(!usual, "no answer for {}", text),
                        }
                        Ok(())
                    })
                    .unwrap();
            });
        }
    }

    #[test]
    fn search_bundles_are_filtered() {
        with("patient/Observation.rs", Some("123"), |v| {
            let mut b = json!({
                "resourceType": "Bundle", "type": "searchset", "total": 3,
                "entry": [
                    {"resource": obs("1", "123", "laboratory"), "search": {"mode": "match"}},
                    // _include of another patient's resource
                    {"resource": obs("2", "456", "laboratory"), "search": {"mode": "include"}},
                    // _revinclude of a type the token has no scope for
                    {"resource": {"resourceType": "Provenance", "target": [{"reference": "Observation/1"}]}, "search": {"mode": "include"}},
                    {"resource": {"resourceType": "Patient", "id": "123"}, "search": {"mode": "include"}},
                    // a history entry for a delete: no resource, nothing to judge by
                    {"request": {"method": "DELETE", "url": "Observation/9"}}
                ]
            });
            assert_eq!(
                v.verify(Verify::Bundle { narrowed: true }, &mut b),
                Verdict::Changed { removed: 4 }
            );
            assert_eq!(b["entry"].as_array().unwrap().len(), 1);
            assert_eq!(b["entry"][0]["resource"]["id"], "1");
            assert!(b.get("total").is_none(), "total removed with the entries");
            // Nothing removed from a narrowed query: total stays, nothing re-serialised.
            let mut ok = json!({"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [{"resource": obs("1", "123", "x")}]});
            assert_eq!(
                v.verify(Verify::Bundle { narrowed: true }, &mut ok),
                Verdict::Unchanged
            );
            assert_eq!(ok["total"], 1);
            // A query that was not narrowed: its total counts what the token cannot see.
            assert_eq!(
                v.verify(Verify::Bundle { narrowed: false }, &mut ok),
                Verdict::Changed { removed: 0 }
            );
            assert!(ok.get("total").is_none());
        });
    }

    #[test]
    fn writes() {
        with(
            "patient/Observation.cruds patient/Patient.ru",
            Some("123"),
            |v| {
                let u = Perms::U;
                assert_eq!(
                    v.check_write("Observation", &obs("1", "123", "x"), u),
                    Ok(())
                );
                // Moving a resource 123 → 456 (the body) or 456 → 123 (the stored version).
                assert_eq!(
                    v.check_write("Observation", &obs("1", "456", "x"), u),
                    Err(DenyReason::Compartment)
                );
                // A second patient reference beside ours.
                let mut two = obs("1", "123", "x");
                two["performer"] = json!([{"reference": "Patient/456"}]);
                assert_eq!(
                    v.check_write("Observation", &two, u),
                    Err(DenyReason::Compartment)
                );
                // No compartment reference at all, or only a logical one.
                let none =
                    json!({"resourceType": "Observation", "subject": {"reference": "urn:uuid:1"}});
                assert_eq!(
                    v.check_write("Observation", &none, Perms::C),
                    Err(DenyReason::Compartment)
                );
                // A conditional reference beside ours: it could resolve to anyone.
                let mut cond = obs("1", "123", "x");
                cond["performer"] = json!([{"reference": "Patient?identifier=http://x|456"}]);
                assert_eq!(
                    v.check_write("Observation", &cond, u),
                    Err(DenyReason::Compartment)
                );
                // A body of another type than the URL says.
                assert!(matches!(
                    v.check_write("Condition", &obs("1", "123", "x"), u),
                    Err(DenyReason::Unverifiable(_))
                ));
                // Creating a Patient is denied; updating one's own record is not.
                assert!(
                    v.check_write("Patient", &json!({"resourceType": "Patient"}), Perms::C)
                        .is_err()
                );
                assert_eq!(
                    v.check_write(
                        "Patient",
                        &json!({"resourceType": "Patient", "id": "123"}),
                        u
                    ),
                    Ok(())
                );
                assert!(
                    v.check_write(
                        "Patient",
                        &json!({"resourceType": "Patient", "id": "456"}),
                        u
                    )
                    .is_err()
                );
            },
        );
        with("user/Observation.cu?category=laboratory", None, |v| {
            assert_eq!(
                v.check_write("Observation", &obs("1", "1", "laboratory"), Perms::C),
                Ok(())
            );
            assert_eq!(
                v.check_write("Observation", &obs("1", "1", "imaging"), Perms::C),
                Err(DenyReason::Granular)
            );
        });
    }

    #[test]
    fn batch_responses() {
        with("patient/Observation.rs", Some("123"), |v| {
            let read = Plan {
                verify: Verify::Resource(Perms::R),
                ..Plan::pass_through()
            };
            let search = Plan {
                verify: Verify::Bundle { narrowed: true },
                ..Plan::pass_through()
            };
            let mut b = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
                {"resource": obs("1", "123", "x"), "response": {"status": "200 OK"}},
                {"resource": obs("2", "456", "x"), "response": {"status": "200 OK"}},
                {"resource": {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": obs("3", "456", "x")}]}, "response": {"status": "200 OK"}},
                {"resource": obs("4", "456", "x"), "response": {"status": "200 OK"}}
            ]});
            let verdict = v.verify_batch_response(&mut b, &[read.clone(), read, search]);
            assert_eq!(verdict, Verdict::Changed { removed: 3 });
            assert_eq!(b["entry"][0]["resource"]["id"], "1");
            assert!(b["entry"][1].get("resource").is_none());
            assert_eq!(b["entry"][1]["response"]["status"], "403 Forbidden");
            assert_eq!(
                b["entry"][2]["resource"]["entry"].as_array().unwrap().len(),
                0
            );
            assert!(
                b["entry"][3].get("resource").is_none(),
                "an entry without a plan is verified"
            );
        });
    }

    /// A Subscription stands only on a search the token may make with nothing to add
    /// to it or take out of its answers.
    #[test]
    fn standing_searches() {
        let sub = |criteria: &str| json!({"resourceType": "Subscription", "criteria": criteria});
        let unverifiable =
            |r: Result<(), DenyReason>| matches!(r, Err(DenyReason::Unverifiable(_)));
        with("patient/*.cruds", Some("123"), |v| {
            for ok in [
                "Observation?patient=Patient/123&code=http://loinc.org|1975-2",
                "Observation?subject=Patient/123",
                "Patient?_id=123",
            ] {
                assert_eq!(v.check_standing_search(&sub(ok)), Ok(()), "{ok}");
            }
            // Every patient's Observations, pushed past the gateway.
            assert!(unverifiable(
                v.check_standing_search(&sub("Observation?code=x"))
            ));
            assert_eq!(
                v.check_standing_search(&sub("Observation?patient=456")),
                Err(DenyReason::Compartment)
            );
            for bad in [
                "Observation?patient=123&_include=Observation:performer",
                "Observation?patient=123&subject.name=x",
                "http://up/fhir/Observation?patient=123",
                "http://example.org/topic/encounter-start",
                "Observation/1",
                "",
            ] {
                assert!(unverifiable(v.check_standing_search(&sub(bad))), "{bad}");
            }
            assert!(unverifiable(v.check_standing_search(
                &json!({"resourceType": "Subscription"})
            )));
        });
        // Unconfined but constrained: the criteria carries the constraint.
        with(
            "system/Subscription.cu system/Observation.s?category=laboratory",
            None,
            |v| {
                assert_eq!(
                    v.check_standing_search(&sub("Observation?category=laboratory")),
                    Ok(())
                );
                assert!(unverifiable(
                    v.check_standing_search(&sub("Observation?code=x"))
                ));
                assert_eq!(
                    v.check_standing_search(&sub("Patient?name=x")),
                    Err(DenyReason::InsufficientScope)
                );
            },
        );
        // A token that may read everything may subscribe to anything.
        with("system/*.rs system/Subscription.c", None, |v| {
            assert_eq!(
                v.check_standing_search(&sub("http://example.org/topic/x")),
                Ok(())
            );
        });
    }

    /// A Group names every patient in it: under confinement it is readable only when the
    /// context patient is the only patient it names; unconfined scopes read any.
    #[test]
    fn groups_list_no_other_patients() {
        let group = |members: &[&str]| {
            json!({"resourceType": "Group", "type": "person", "actual": true,
                   "member": members.iter().map(|m| json!({"entity": {"reference": m}})).collect::<Vec<_>>()})
        };
        let r = Perms::R;
        with("patient/Group.r", Some("123"), |v| {
            assert!(v.visible(&group(&["Patient/123"]), r));
            assert!(v.visible(&group(&["Patient/123", "Practitioner/7"]), r));
            assert!(!v.visible(&group(&["Patient/123", "Patient/456"]), r));
            assert!(!v.visible(&group(&["Patient/456"]), r));
            assert!(!v.visible(&group(&[]), r));
            assert!(!v.visible(&group(&["Patient/123", "Patient?identifier=x"]), r));
            let bytes = group(&["Patient/123", "Patient/456"]).to_string();
            assert_eq!(v.visible_bytes(bytes.as_bytes(), r), Some(false));
        });
        with("user/Group.r", None, |v| {
            assert!(v.visible(&group(&["Patient/123", "Patient/456"]), r));
        });
    }

    /// A stored Bundle (a document, an IPS) is read with its entries: under confinement
    /// it is readable when the token could read every entry itself, and written when
    /// every entry is for the patient. Unconfined scopes are not affected.
    #[test]
    fn stored_bundles_are_judged_by_their_entries() {
        let doc = |entries: Vec<Value>| {
            json!({"resourceType": "Bundle", "id": "d", "type": "document",
                   "entry": entries.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
        };
        let comp = |p: &str| json!({"resourceType": "Composition", "subject": {"reference": format!("Patient/{p}")}});
        let pat = |id: &str| json!({"resourceType": "Patient", "id": id});
        let org = json!({"resourceType": "Organization", "id": "o"});
        let own = doc(vec![
            comp("123"),
            pat("123"),
            obs("1", "123", "x"),
            org.clone(),
        ]);
        let theirs = doc(vec![comp("456"), pat("456"), obs("2", "456", "x")]);
        let mixed = doc(vec![comp("123"), obs("2", "456", "x")]);
        let nested = doc(vec![doc(vec![obs("2", "456", "x")])]);
        let r = Perms::R;
        with("patient/*.rs", Some("123"), |v| {
            assert!(v.visible(&own, r));
            assert!(!v.visible(&theirs, r));
            assert!(
                !v.visible(&mixed, r),
                "one other patient's entry hides the whole"
            );
            assert!(!v.visible(&nested, r));
            assert!(v.visible(&doc(vec![doc(vec![obs("1", "123", "x")])]), r));
            // Nothing to judge by: entries stripped (_summary, _elements) or without a
            // resource.
            assert!(!v.visible(&json!({"resourceType": "Bundle", "type": "document"}), r));
            assert!(!v.visible(&doc(vec![]), r));
            let bare = json!({"resourceType": "Bundle", "entry": [{"fullUrl": "Observation/2"}]});
            assert!(!v.visible(&bare, r));
            // A stored transaction's request URLs may name other patients' resources.
            let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": obs("1", "123", "x"), "request": {"method": "PUT", "url": "Observation/2"}}]});
            assert!(!v.visible(&tx, r));
            let answered = json!({"resourceType": "Bundle", "entry": [
                {"resource": obs("1", "123", "x"), "response": {"status": "200"}}]});
            assert!(!v.visible(&answered, r));
            // A search of stored Bundles keeps only the readable ones.
            let mut found = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": own}, {"resource": theirs}]});
            assert_eq!(
                v.verify(Verify::Bundle { narrowed: false }, &mut found),
                Verdict::Changed { removed: 1 }
            );
            // Writes: every entry for the patient.
            let c = Perms::C;
            assert_eq!(
                v.check_write("Bundle", &doc(vec![comp("123"), pat("123")]), c),
                Err(DenyReason::InsufficientScope)
            );
        });
        with("patient/*.cruds", Some("123"), |v| {
            let c = Perms::C;
            assert_eq!(
                v.check_write(
                    "Bundle",
                    &doc(vec![comp("123"), pat("123"), org.clone()]),
                    c
                ),
                Ok(())
            );
            assert_eq!(
                v.check_write("Bundle", &doc(vec![comp("123"), obs("2", "456", "x")]), c),
                Err(DenyReason::Compartment)
            );
            assert_eq!(
                v.check_write("Bundle", &doc(vec![pat("456")]), c),
                Err(DenyReason::Compartment)
            );
            assert_eq!(
                v.check_write("Bundle", &doc(vec![doc(vec![comp("456")])]), c),
                Err(DenyReason::Compartment)
            );
            // An entry's conditional reference could resolve to any patient, as in a
            // resource written on its own.
            let conditional = json!({"resourceType": "Composition",
                                     "subject": {"reference": "Patient/123"},
                                     "author": [{"reference": "Patient?identifier=x"}]});
            assert_eq!(
                v.check_write("Bundle", &doc(vec![conditional]), c),
                Err(DenyReason::Compartment)
            );
            assert_eq!(
                v.check_write("Bundle", &doc(vec![]), c),
                Err(DenyReason::Compartment)
            );
        });
        // Only the Bundle scope: entries of other types cannot be read, so neither can it.
        with("patient/Bundle.r", Some("123"), |v| {
            assert!(!v.visible(&doc(vec![comp("123")]), r));
        });
        with("system/Bundle.r", None, |v| assert!(v.visible(&theirs, r)));
    }

    /// Write letters never read: a create-only (or `cud`) scope sees none of the
    /// patient's resources in an answer, and beside a read scope of one type it does not
    /// make the token one that "sees everything" (whose answers would go unchecked).
    #[test]
    fn write_letters_never_read() {
        let rs = Perms::R.union(Perms::S);
        with("patient/Observation.c", Some("123"), |v| {
            assert!(!v.visible(&obs("1", "123", "laboratory"), rs));
            assert!(v.visible(&obs("1", "123", "laboratory"), Perms::C));
        });
        with("system/*.cud patient/Observation.rs", Some("123"), |v| {
            assert!(!super::super::sees_everything(v.grants, v.ctx, v.policy));
            assert!(!v.visible(&obs("2", "456", "laboratory"), rs));
            assert!(!v.visible(&json!({"resourceType": "Patient", "id": "456"}), rs));
        });
        with("system/*.rs", None, |v| {
            assert!(super::super::sees_everything(v.grants, v.ctx, v.policy));
        });
    }

    /// `check_written`: the written resource must be of the type written, in the
    /// patient's compartment under confinement, match granular constraints, and — a
    /// Subscription — have criteria the token may search standing; each refusal says why.
    #[test]
    fn check_written_rules() {
        let c = Perms::C;
        with(
            "patient/Observation.c patient/Subscription.c patient/Observation.s",
            Some("123"),
            |v| {
                assert_eq!(
                    v.check_written("Observation", &obs("1", "123", "x"), c),
                    Ok(())
                );
                assert_eq!(
                    v.check_written("Observation", &obs("1", "456", "x"), c),
                    Err(DenyReason::Compartment)
                );
                assert!(matches!(
                    v.check_written(
                        "Observation",
                        &json!({"resourceType": "Patient", "id": "123"}),
                        c
                    ),
                    Err(DenyReason::Unverifiable(_))
                ));
                assert_eq!(
                    v.check_written(
                        "Condition",
                        &json!({"resourceType": "Condition",
                    "subject": {"reference": "Patient/123"}}),
                        c
                    ),
                    Err(DenyReason::InsufficientScope)
                );
                let sub = |criteria: &str| {
                    json!({"resourceType": "Subscription", "status": "requested",
                "criteria": criteria, "subject": {"reference": "Patient/123"}})
                };
                assert_eq!(
                    v.check_written("Subscription", &sub("Observation?patient=Patient/123"), c),
                    Ok(())
                );
                assert!(
                    v.check_written("Subscription", &sub("Observation?code=x"), c)
                        .is_err()
                );
                assert!(
                    v.check_written("Subscription", &sub("Condition?patient=Patient/123"), c)
                        .is_err()
                );
            },
        );
        with("user/Observation.c?category=laboratory", None, |v| {
            assert_eq!(
                v.check_written("Observation", &obs("1", "9", "laboratory"), c),
                Ok(())
            );
            assert_eq!(
                v.check_written("Observation", &obs("1", "9", "imaging"), c),
                Err(DenyReason::Granular)
            );
        });
        with("patient/Observation.c", None, |v| {
            assert_eq!(
                v.check_written("Observation", &obs("1", "123", "x"), c),
                Err(DenyReason::NoPatientContext)
            );
        });
    }

    /// A Provenance under a patient context is readable when every target is known to be
    /// that patient's alone; unknown, another patient's, or shared targets are not; a
    /// Provenance whose target is the Patient itself is in the compartment as before.
    #[test]
    fn provenance_follows_its_targets() {
        let rs = Perms::R.union(Perms::S);
        let prov = |targets: &[&str]| {
            json!({"resourceType": "Provenance", "id": "p",
                   "target": targets.iter().map(|t| json!({"reference": t})).collect::<Vec<_>>()})
        };
        let grants = Grants::parse(["patient/*.rs"]);
        let ctx = Context::new(Some("123"), None, false);
        let policy = Policy::default();
        let mut owners = Owners::new();
        owners.insert("Condition/c1".into(), vec!["123".into()]);
        owners.insert("Observation/o1".into(), vec!["123".into()]);
        owners.insert("Condition/c2".into(), vec!["456".into()]);
        owners.insert("Group/g".into(), vec!["123".into(), "456".into()]);
        owners.insert("Medication/m".into(), vec![]);
        let v = Viewer {
            grants: &grants,
            ctx: &ctx,
            policy: &policy,
            owners: Some(&owners),
        };
        assert!(v.visible(&prov(&["Condition/c1"]), rs));
        assert!(v.visible(&prov(&["Condition/c1", "Observation/o1"]), rs));
        for theirs in [
            &["Condition/c2"][..],
            &["Condition/c1", "Condition/c2"],
            &["Group/g"],
            &["Medication/m"],
            &["Condition/unknown"],
            &[],
        ] {
            assert!(!v.visible(&prov(theirs), rs), "{theirs:?}");
        }
        assert!(v.visible(&prov(&["Patient/123"]), rs));
        // From the bytes as from the document.
        let bytes = serde_json::to_vec(&prov(&["Condition/c1"])).unwrap();
        assert_eq!(v.visible_bytes(&bytes, rs), Some(true));
        let bytes = serde_json::to_vec(&prov(&["Condition/c2"])).unwrap();
        assert_eq!(v.visible_bytes(&bytes, rs), Some(false));
        // Without owners nothing but the Patient target counts.
        let v = Viewer { owners: None, ..v };
        assert!(!v.visible(&prov(&["Condition/c1"]), rs));
    }

    /// A Subscription is read by what it runs: its criteria must be a search the token
    /// may make, confined to its patient; the Debug form of a set of letters names them.
    #[test]
    fn subscriptions_are_read_by_their_criteria() {
        let rs = Perms::R.union(Perms::S);
        let sub = |criteria: &str| {
            json!({"resourceType": "Subscription", "id": "s", "status": "active",
                   "criteria": criteria, "channel": {"type": "rest-hook"}})
        };
        with("patient/*.rs", Some("123"), |v| {
            assert!(v.visible(&sub("Observation?patient=Patient/123"), rs));
            assert!(!v.visible(&sub("Observation?patient=Patient/456"), rs));
            assert!(!v.visible(&sub("Observation?code=x"), rs));
        });
        assert_eq!(format!("{:?}", Perms::R.union(Perms::S)), "Perms(rs)");
    }

    /// What of an OperationOutcome passes: severity, code and coded details; codings with
    /// neither system nor code, and details without codings, go; anything else is not an
    /// outcome. As a read's answer or a batch entry's outcome, a dirty one is replaced and
    /// said changed, a clean one left as it is.
    #[test]
    fn outcomes_are_sanitised() {
        let dirty = json!({"resourceType": "OperationOutcome",
        "text": {"div": "<div>John 456</div>"},
        "issue": [
            {"severity": "error", "code": "conflict", "diagnostics": "Patient/456 John",
             "details": {"text": "John", "coding": [
                 {"system": "http://s", "code": "c", "display": "John"},
                 {"display": "only a display"}]}},
            {"severity": "warning", "code": "processing", "details": {"coding": [{"display": "x"}]}},
            {}
        ]});
        let clean = json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "conflict",
             "details": {"coding": [{"system": "http://s", "code": "c"}]}},
            {"severity": "warning", "code": "processing"},
            {"severity": "error", "code": "unknown"}
        ]});
        assert_eq!(sanitized_outcome(&dirty), Some(clean.clone()));
        assert_eq!(sanitized_outcome(&clean), Some(clean.clone()));
        assert_eq!(sanitized_outcome(&json!({"resourceType": "Patient"})), None);
        with("patient/*.rs", Some("123"), |v| {
            let mut doc = dirty.clone();
            assert_eq!(
                v.verify(Verify::Resource(Perms::R), &mut doc),
                Verdict::Changed { removed: 0 }
            );
            assert_eq!(doc, clean);
            let mut doc = clean.clone();
            assert_eq!(
                v.verify(Verify::Resource(Perms::R), &mut doc),
                Verdict::Unchanged
            );
            let batch = |outcome: &Value| {
                json!({"resourceType": "Bundle", "type": "batch-response",
                "entry": [{"response": {"status": "400 Bad Request", "outcome": outcome}}]})
            };
            let mut doc = batch(&dirty);
            assert_eq!(
                v.verify_batch_response(&mut doc, &[]),
                Verdict::Changed { removed: 0 }
            );
            assert_eq!(doc, batch(&clean));
            let mut doc = batch(&clean);
            assert_eq!(v.verify_batch_response(&mut doc, &[]), Verdict::Unchanged);
            let mut doc = batch(&json!({"resourceType": "Patient", "id": "456"}));
            assert_eq!(
                v.verify_batch_response(&mut doc, &[]),
                Verdict::Changed { removed: 0 }
            );
            assert_eq!(
                doc["entry"][0]["response"]["outcome"]["issue"][0]["code"],
                "unknown"
            );
        });
    }
}

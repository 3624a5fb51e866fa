//! Checks that need the upstream before a write is forwarded (DESIGN.md: nothing reaches
//! the upstream that the token could not have written directly): the body of a create or
//! update, the stored version of an update, patch or delete (fetched first), the result
//! of a JSON Patch; and the same for every entry of a batch or transaction. The write is
//! then sent with `If-Match` of the version that was checked, so a concurrent change makes
//! it fail instead of slipping through.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use super::{buffer, limited, upstream_failed};
use crate::auth::Principal;
use crate::body::{BoxBody, empty, full};
use crate::error::{Denial, GatewayError};
use crate::policy::verify::{Owners, Viewer};
use crate::policy::{DenyReason, Plan, Write, WriteCheck};
use crate::proxy::headers::{ClientSide, media_type_is};
use crate::state::{Shared, Snapshot};

/// What the checks need to reach the upstream.
pub(super) struct Fetcher<'a> {
    pub shared: &'a Shared,
    pub snap: &'a Snapshot,
    pub worker: &'a crate::proxy::WorkerSide,
    pub client: &'a ClientSide,
    pub request_id: &'a HeaderValue,
    pub principal: &'a Principal,
    pub viewer: Viewer<'a>,
}

/// Most targets of Provenance looked up at the upstream for one answer: a page of a
/// search with `_revinclude=Provenance:target` names the page's own entries, which need
/// no lookup; a Provenance read names a few.
pub const MAX_OWNER_LOOKUPS: usize = 16;

/// A stored resource and the version that was read.
struct Stored {
    resource: Value,
    version: Option<String>,
}

impl<'a> Fetcher<'a> {
    /// The checks of one request by `principal`, seen in `ctx`.
    pub fn new(
        shared: &'a Shared,
        snap: &'a Snapshot,
        worker: &'a crate::proxy::WorkerSide,
        client: &'a ClientSide,
        request_id: &'a HeaderValue,
        principal: &'a Principal,
        ctx: &'a crate::policy::Context,
    ) -> Fetcher<'a> {
        Fetcher {
            shared,
            snap,
            worker,
            client,
            request_id,
            principal,
            viewer: Viewer {
                grants: &principal.grants,
                ctx,
                policy: &snap.policy,
                owners: None,
            },
        }
    }
}

impl Fetcher<'_> {
    /// `GET [type]/[id]` from the upstream: the resource and its version, `None` when it
    /// does not exist (404, 410).
    async fn fetch(&self, ty: &str, id: &str) -> Result<Option<Stored>, GatewayError> {
        let uri = self.snap.upstream.uri_for(&format!("/{ty}/{id}"))?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .header(header::ACCEPT, "application/fhir+json")
            .body(empty())
            .map_err(|_| GatewayError::Internal)?;
        let identity = super::identity(self.snap, Some(self.principal));
        let (resp, _) = self
            .snap
            .upstream
            .send(self.worker, req, self.client, self.request_id, &identity)
            .await
            .map_err(|f| upstream_failed(self.shared, f).to_error())?;
        match resp.status() {
            StatusCode::NOT_FOUND | StatusCode::GONE => return Ok(None),
            s if s.is_success() => {}
            _ => {
                return Err(GatewayError::UpstreamInvalid(
                    "the stored version could not be read to check the write",
                ));
            }
        }
        let etag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(etag_version);
        let limit = self.snap.config.upstream.max_response_buffer.0;
        let bytes = limited(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|_| GatewayError::UpstreamInvalid("the stored version could not be read"))?
            .to_bytes();
        let resource = crate::json::parse(&bytes).map_err(|_| {
            GatewayError::UpstreamInvalid(
                "the stored version is not JSON, or repeats a member name",
            )
        })?;
        let version = etag.or_else(|| resource["meta"]["versionId"].as_str().map(str::to_owned));
        Ok(Some(Stored { resource, version }))
    }

    /// For a Binary whose `securityContext` references a resource other than a Patient
    /// (FHIR R4: the resource whose access rules apply to the Binary), whether the token
    /// may read that resource, fetched from the upstream (a missing one: no). `None` when
    /// the reference is a Patient, absent or not local: the compartment check decides.
    pub async fn security_context_readable(
        &self,
        binary: &[u8],
    ) -> Result<Option<bool>, GatewayError> {
        #[derive(serde::Deserialize)]
        struct Binary {
            #[serde(rename = "securityContext")]
            security_context: Option<Value>,
        }
        // Strictly: a Binary with two readings is refused by the verification that follows.
        let Some(context) = crate::json::parse_as::<Binary>(binary)
            .ok()
            .and_then(|b| b.security_context)
        else {
            return Ok(None);
        };
        let bases = &self.viewer.policy.bases;
        let Some((ty, id)) = crate::fhir::reference::reference_target(&context, bases) else {
            return Ok(None);
        };
        if ty == "Patient" {
            return Ok(None);
        }
        Ok(Some(match self.fetch(ty, id).await? {
            Some(stored) => self
                .viewer
                .visible(&stored.resource, crate::smart::scope::Perms::R),
            None => false,
        }))
    }

    /// Who the resources the Provenance of an answer points at belong to ([`Owners`]):
    /// the other resources of the same Bundle as they are in it, the rest looked up at
    /// the upstream — at most [`MAX_OWNER_LOOKUPS`] per answer, each remembered in the
    /// snapshot's cache for 30 s. A target not looked up (past the limit, or gone) has no
    /// owner: a Provenance naming it is not readable. `doc` is the answer as read.
    pub async fn provenance_owners(&self, doc: &Value) -> Result<Owners, GatewayError> {
        let resources: Vec<&Value> = match doc.get("entry").and_then(Value::as_array) {
            Some(entries) if doc["resourceType"] == "Bundle" => {
                entries.iter().filter_map(|e| e.get("resource")).collect()
            }
            _ => vec![doc],
        };
        let mut owners = Owners::new();
        for r in &resources {
            if let (Some(ty), Some(id)) = (r["resourceType"].as_str(), r["id"].as_str())
                && ty != "Provenance"
            {
                owners.insert(format!("{ty}/{id}"), self.viewer.patients_of(r));
            }
        }
        let bases = &self.viewer.policy.bases;
        let mut wanted: Vec<(&str, &str)> = resources
            .iter()
            .filter(|r| r["resourceType"] == "Provenance")
            .filter_map(|r| r.get("target").and_then(Value::as_array))
            .flatten()
            .filter_map(|t| crate::fhir::reference::reference_target(t, bases))
            .filter(|(ty, id)| !owners.contains_key(&format!("{ty}/{id}")))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        for (ty, id) in wanted.into_iter().take(MAX_OWNER_LOOKUPS) {
            let key = format!("{ty}/{id}");
            let patients = match self.snap.owners.get(&key) {
                Some(known) => known,
                None => {
                    let found = match self.fetch(ty, id).await? {
                        Some(stored) => self.viewer.patients_of(&stored.resource),
                        None => Vec::new(),
                    };
                    let found = std::sync::Arc::new(found);
                    self.snap.owners.insert(key.clone(), found.clone());
                    found
                }
            };
            owners.insert(key, patients.to_vec());
        }
        Ok(owners)
    }

    /// Checks a single write; returns the request to forward (body put back, `If-Match`
    /// set to the version checked).
    pub async fn write(
        &self,
        w: &Write,
        req: Request<BoxBody>,
    ) -> Result<Request<BoxBody>, GatewayError> {
        let viewer = self.viewer;
        let ty = w.resource_type;
        let (mut req, bytes) = buffer(self.snap, req).await?;
        let deny = |r: DenyReason| forbidden(self.shared, r);
        match w.check {
            WriteCheck::Body | WriteCheck::StoredAndBody => {
                let body = json_body(req.headers(), &bytes)?;
                viewer.check_written(ty, &body, w.perm).map_err(deny)?;
            }
            WriteCheck::Patch => {
                if !media_type_is(req.headers(), "application/json-patch+json") {
                    return Err(GatewayError::UnsupportedMediaType(
                        "only JSON Patch (application/json-patch+json) can be checked",
                    ));
                }
            }
            WriteCheck::Stored => {}
        }
        if w.check == WriteCheck::Body {
            return Ok(req);
        }
        let id = w.id.as_deref().ok_or(GatewayError::Internal)?;
        let Some(stored) = self.fetch(ty, id).await? else {
            // Nothing stored: an update creates (its body was checked); a delete or
            // patch has nothing to act on and the upstream says so.
            return Ok(req);
        };
        viewer
            .check_write(ty, &stored.resource, w.perm)
            .map_err(deny)?;
        if w.check == WriteCheck::Patch {
            let patch: json_patch::Patch = crate::json::parse_as(&bytes)
                .map_err(|_| GatewayError::BadRequest("the JSON Patch is malformed"))?;
            let mut result = stored.resource.clone();
            json_patch::patch(&mut result, &patch)
                .map_err(|_| GatewayError::BadRequest("the JSON Patch does not apply"))?;
            viewer.check_written(ty, &result, w.perm).map_err(deny)?;
        }
        pin_version(req.headers_mut(), stored.version.as_deref())?;
        Ok(req)
    }

    /// Checks and narrows a batch or transaction entry by entry with the plans the
    /// policy made; returns the request with the (possibly rewritten) Bundle.
    pub async fn bundle(
        &self,
        plans: &[Plan],
        req: Request<BoxBody>,
    ) -> Result<Request<BoxBody>, GatewayError> {
        let viewer = self.viewer;
        let (req, bytes) = buffer(self.snap, req).await?;
        let mut bundle = crate::json::parse(&bytes).map_err(|_| {
            GatewayError::BadRequest("the posted Bundle is not JSON, or repeats a member name")
        })?;
        let mut changed = false;
        let deny_entry = |i: usize, r: DenyReason| {
            forbidden(
                self.shared,
                DenyReason::Entries(vec![(i, r, String::new())]),
            )
        };
        let Some(entries) = bundle.get_mut("entry").and_then(Value::as_array_mut) else {
            return Ok(req);
        };
        let local = uuid_targets(entries);
        for (i, (entry, plan)) in entries.iter_mut().zip(plans).enumerate() {
            if !plan.inject.is_empty() {
                let request = &mut entry["request"];
                let target = if request.get("ifNoneExist").is_some() {
                    "ifNoneExist"
                } else {
                    "url"
                };
                // Both are strings: entries where they are not were refused as malformed.
                let Some(current) = request[target].as_str().map(str::to_owned) else {
                    return Err(deny_entry(i, DenyReason::BadEntry(i)));
                };
                request[target] = Value::String(if target == "url" {
                    append_params(&current, &plan.inject)
                } else {
                    append_query(&current, &plan.inject)
                });
                changed = true;
            }
            let Some(w) = &plan.write else { continue };
            let ty = w.resource_type;
            match w.check {
                WriteCheck::Body | WriteCheck::StoredAndBody => {
                    // References to other entries (`urn:uuid:…`) read as the resources
                    // those entries write, where the entry names one.
                    let mut resource = entry["resource"].clone();
                    resolve_uuids(&mut resource, &local);
                    viewer
                        .check_written(ty, &resource, w.perm)
                        .map_err(|r| deny_entry(i, r))?;
                }
                WriteCheck::Patch => {
                    return Err(deny_entry(
                        i,
                        DenyReason::Unverifiable("a patch inside a bundle"),
                    ));
                }
                WriteCheck::Stored => {}
            }
            if w.check == WriteCheck::Body {
                continue;
            }
            let id = w.id.as_deref().ok_or(GatewayError::Internal)?;
            if let Some(stored) = self.fetch(ty, id).await? {
                viewer
                    .check_write(ty, &stored.resource, w.perm)
                    .map_err(|r| deny_entry(i, r))?;
                let request = &mut entry["request"];
                let tag = pinned(
                    stored.version.as_deref(),
                    request.get("ifMatch").and_then(Value::as_str),
                )?;
                request["ifMatch"] = Value::String(tag);
                changed = true;
            }
        }
        if !changed {
            return Ok(req);
        }
        let body = serde_json::to_vec(&bundle).map_err(|_| GatewayError::Internal)?;
        let (mut parts, _) = req.into_parts();
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Ok(Request::from_parts(parts, full(Bytes::from(body))))
    }
}

/// `fullUrl` (`urn:uuid:…`) → `Type/id` for the entries that write a named resource
/// (`PUT Type/id`). Entries that create (`POST`) name none: a reference to them stays a
/// `urn:uuid` and never counts as a patient.
fn uuid_targets(entries: &[Value]) -> Vec<(String, String)> {
    entries
        .iter()
        .filter_map(|e| {
            let full = e["fullUrl"].as_str()?.strip_prefix("urn:uuid:")?;
            if e["request"]["method"] != "PUT" {
                return None;
            }
            let url = e["request"]["url"].as_str()?;
            let (ty, id) = url.split_once('/')?;
            (crate::fhir::request::resource_type(ty).is_ok() && crate::fhir::is_id(id))
                .then(|| (format!("urn:uuid:{full}"), format!("{ty}/{id}")))
        })
        .collect()
}

/// Replaces every `reference` that names a mapped `urn:uuid` with its `Type/id`.
fn resolve_uuids(v: &mut Value, map: &[(String, String)]) {
    if map.is_empty() {
        return;
    }
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("reference")
                && let Some((_, to)) = map.iter().find(|(from, _)| from == r)
            {
                *r = to.clone();
            }
            for child in o.values_mut() {
                resolve_uuids(child, map);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| resolve_uuids(c, map)),
        _ => {}
    }
}

/// Sets `If-Match` to the version checked; a client `If-Match` naming another version
/// fails now (412), as the upstream would. Without a version the write cannot be guarded
/// and is refused.
fn pin_version(headers: &mut http::HeaderMap, version: Option<&str>) -> Result<(), GatewayError> {
    let given = headers.get(header::IF_MATCH).and_then(|h| h.to_str().ok());
    let value = HeaderValue::from_str(&pinned(version, given)?)
        .map_err(|_| GatewayError::UpstreamInvalid("the stored version id is malformed"))?;
    headers.insert(header::IF_MATCH, value);
    Ok(())
}

/// The `If-Match` value for the version checked (`W/"v"`), given the client's own, if
/// any: refused without a version, 412 when the client's names another.
fn pinned(version: Option<&str>, given: Option<&str>) -> Result<String, GatewayError> {
    let Some(v) = version else {
        return Err(GatewayError::UpstreamInvalid(
            "the upstream gave no version to guard the write with",
        ));
    };
    if given.is_some_and(|g| etag_version(g).as_deref() != Some(v)) {
        return Err(GatewayError::PreconditionFailed(
            "If-Match does not name the current version",
        ));
    }
    Ok(format!("W/\"{v}\""))
}

/// The version in an ETag: `W/"3"` or `"3"` → `3`.
pub(super) fn etag_version(tag: &str) -> Option<String> {
    let t = tag.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    let v = t.strip_prefix('"')?.strip_suffix('"')?;
    crate::fhir::is_id(v).then(|| v.to_owned())
}

/// A query string (no `?`, as in `If-None-Exist`) with `params` appended.
pub(super) fn append_query(query: &str, params: &[(String, String)]) -> String {
    let extra = encode(params);
    if query.is_empty() {
        extra
    } else {
        format!("{}&{extra}", query.trim_end_matches('&'))
    }
}

fn encode(params: &[(String, String)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// `target` (a path with or without a query) with `params` appended to its query.
pub(super) fn append_params(target: &str, params: &[(String, String)]) -> String {
    let extra = encode(params);
    if target.contains('?') {
        if target.ends_with('?') || target.ends_with('&') {
            format!("{target}{extra}")
        } else {
            format!("{target}&{extra}")
        }
    } else {
        format!("{target}?{extra}")
    }
}

/// `target` (a path with or without a query) with each `_elements` parameter also asking
/// for `extra`, the elements a check reads; every other parameter byte for byte as it
/// was. The name is compared decoded, as the upstream reads it (`%5Felements` too).
///
/// `_summary=text` becomes `_elements=text` and is widened the same way: the narrative
/// summary keeps only `text`, `id`, `meta` and mandatory elements, so every resource
/// would fail the check; `_elements` returns those (FHIR R4 search.html#elements: the
/// mandatory ones too) and what the check reads.
pub(super) fn widen_elements(target: &str, extra: &[&str]) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let pieces: Vec<String> = query
        .split('&')
        .map(
            |piece| match form_urlencoded::parse(piece.as_bytes()).next() {
                Some((name, value))
                    if name == "_elements" || (name == "_summary" && value == "text") =>
                {
                    let value = if name == "_summary" {
                        "text".into()
                    } else {
                        value
                    };
                    let mut names: Vec<&str> = value.split(',').filter(|n| !n.is_empty()).collect();
                    for e in extra {
                        if !names.contains(e) {
                            names.push(e);
                        }
                    }
                    let value: String =
                        form_urlencoded::byte_serialize(names.join(",").as_bytes()).collect();
                    format!("_elements={}", value.replace("%2C", ","))
                }
                _ => piece.to_owned(),
            },
        )
        .collect();
    format!("{path}?{}", pieces.join("&"))
}

/// A JSON request body, or 415 for a format the gateway cannot check.
fn json_body(headers: &http::HeaderMap, bytes: &[u8]) -> Result<Value, GatewayError> {
    if !crate::proxy::headers::is_fhir_json(headers) {
        return Err(GatewayError::UnsupportedMediaType(
            "only JSON bodies can be checked",
        ));
    }
    crate::json::parse(bytes)
        .map_err(|_| GatewayError::BadRequest("the body is not JSON, or repeats a member name"))
}

/// A policy refusal found while checking, counted like the decision's own.
pub(super) fn forbidden(shared: &Shared, reason: DenyReason) -> GatewayError {
    shared
        .metrics
        .decisions
        .with_label_values(&["deny", reason.code()])
        .inc();
    GatewayError::Forbidden(Box::new(Denial {
        code: reason.code(),
        message: reason.to_string(),
        needed: String::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `_elements` (however its name is encoded) gains what is missing; nothing
    /// else changes.
    #[test]
    fn elements_widened() {
        let extra = ["performer", "subject"];
        for (target, widened) in [
            (
                "/Observation?_elements=code",
                "/Observation?_elements=code,performer,subject",
            ),
            (
                "/Observation?code=a%2Cb&_elements=code,subject&_count=2",
                "/Observation?code=a%2Cb&_elements=code,subject,performer&_count=2",
            ),
            (
                "/Observation/1?%5Felements=code",
                "/Observation/1?_elements=code,performer,subject",
            ),
            (
                "/Observation?_elements=",
                "/Observation?_elements=performer,subject",
            ),
            (
                "/Observation?_elements=a&_elements=b",
                "/Observation?_elements=a,performer,subject&_elements=b,performer,subject",
            ),
            (
                "/Observation?_elementsx=a&x=_elements",
                "/Observation?_elementsx=a&x=_elements",
            ),
            (
                "/Observation?code=x&_summary=text",
                "/Observation?code=x&_elements=text,performer,subject",
            ),
            (
                "/Observation?_summary=true&_summary=data",
                "/Observation?_summary=true&_summary=data",
            ),
            ("/Observation", "/Observation"),
        ] {
            assert_eq!(widen_elements(target, &extra), widened, "{target}");
        }
    }

    /// On any query: the parameters other than `_elements` (and `_summary=text`) come out
    /// byte for byte and in order, and every `_elements` then asks for the extra elements.
    #[test]
    fn elements_widened_on_any_query() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let piece = prop_oneof![
            "[a-z_%5F0-9]{0,9}=[a-zA-Z0-9,%:|/._-]{0,12}",
            Just("_elements=code,status".to_owned()),
            Just("%5Felements=".to_owned()),
            Just("_summary=text".to_owned()),
            Just("_summary=count".to_owned()),
            "[a-z=&%]{0,4}",
        ];
        let target = prop::collection::vec(piece, 0..6)
            .prop_map(|pieces| format!("/Observation?{}", pieces.join("&")));
        let extra = ["performer", "subject"];
        TestRunner::new(Config::with_cases(500))
            .run(&target, |target| {
                let out = widen_elements(&target, &extra);
                let (_, before) = target.split_once('?').unwrap();
                let (path, after) = out.split_once('?').unwrap();
                prop_assert_eq!(path, "/Observation");
                let before: Vec<&str> = before.split('&').collect();
                let after: Vec<&str> = after.split('&').collect();
                prop_assert_eq!(before.len(), after.len());
                for (b, a) in before.iter().zip(&after) {
                    match form_urlencoded::parse(b.as_bytes()).next() {
                        Some((name, value))
                            if name == "_elements" || (name == "_summary" && value == "text") =>
                        {
                            let (_, value) = form_urlencoded::parse(a.as_bytes()).next().unwrap();
                            let names: Vec<&str> = value.split(',').collect();
                            prop_assert!(extra.iter().all(|e| names.contains(e)), "{}", a);
                        }
                        _ => prop_assert_eq!(b, a),
                    }
                }
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn etags_and_params() {
        assert_eq!(etag_version("W/\"3\"").as_deref(), Some("3"));
        assert_eq!(etag_version("\"a-1\"").as_deref(), Some("a-1"));
        assert_eq!(etag_version("3"), None);
        assert_eq!(etag_version("W/\"a b\""), None);
        let p = vec![("patient".to_owned(), "Patient/1 2".to_owned())];
        assert_eq!(
            append_params("Observation", &p),
            "Observation?patient=Patient%2F1+2"
        );
        assert_eq!(
            append_params("Observation?code=x", &p),
            "Observation?code=x&patient=Patient%2F1+2"
        );
        assert_eq!(append_query("code=x", &p), "code=x&patient=Patient%2F1+2");
        assert_eq!(append_query("", &p), "patient=Patient%2F1+2");
    }
}

//! The classify and authorize stages.

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request};

use super::buffer;
use crate::auth::Principal;
use crate::body::BoxBody;
use crate::error::GatewayError;
use crate::fhir::request::{ClassifyError, FhirRequest, Interaction, classify};
use crate::policy::{Context, Decision, Plan, authorize, authorize_bundle, cache};
use crate::state::{Shared, Snapshot};

/// The classify and authorize stages: the FHIR interaction, then the decision. Batch and
/// transaction bodies are read to decide every entry before anything is forwarded.
#[allow(clippy::too_many_arguments)]
pub(super) async fn classify_and_authorize(
    shared: &Shared,
    snap: &Snapshot,
    req: Request<BoxBody>,
    principal: &Principal,
    form: Option<Bytes>,
    rel: &str,
    signed: Option<(&str, &str)>,
    ctx: &mut super::Ctx<'_>,
) -> Result<(Request<BoxBody>, Plan), GatewayError> {
    let (path, query) = match rel.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rel, None),
    };
    let base_post = req.method() == Method::POST && (path.is_empty() || path == "/");
    // Requests decided by the target alone can use the decision cache — after the header
    // checks, which the cache must never skip.
    crate::fhir::request::check_headers(req.headers()).map_err(classify_error)?;
    if let Some((target, signature)) = signed {
        let decision = signed_status(shared, snap, &req, principal, target, signature);
        return finish(shared, req, decision);
    }
    // A POST $export carries its parameters in its body (exports::body_params): read
    // for the decision, which is then not cached by the target alone.
    let export_post = req.method() == Method::POST && crate::exports::is_kick_off(rel);
    let cacheable = !base_post && form.is_none() && !export_post;
    let if_none_exist = req
        .headers()
        .contains_key(&crate::fhir::request::IF_NONE_EXIST);
    let decider = cache::Decider {
        principal: principal.id,
        generation: snap.generation,
    };
    if cacheable
        && let Some((decision, target)) = cache::get(decider, req.method(), if_none_exist, rel)
    {
        shared.metrics.decision_cache_hit.inc();
        ctx.target = Some(target);
        return finish(shared, req, decision);
    }
    let method = req.method().clone();
    let (req, bundle, export_params) =
        read_deciding_body(snap, req, base_post, export_post).await?;
    let bundle_type = bundle
        .as_ref()
        .filter(|b| b["resourceType"] == "Bundle")
        .and_then(|b| b["type"].as_str());
    let freq = classify(
        req.method(),
        path,
        query,
        req.headers(),
        form.as_deref(),
        bundle_type,
    )
    .map_err(classify_error)?;
    let mut freq = freq;
    freq.params.extend(export_params);
    let target = crate::audit::Target::of(&freq);

    let context = context(snap, principal);
    let decision = match (freq.interaction, &bundle) {
        (Interaction::Batch | Interaction::Transaction, Some(bundle)) => {
            let entries = bundle_entries(snap, bundle);
            authorize_bundle(&principal.grants, &context, &entries, &snap.policy)
        }
        _ => authorize(&principal.grants, &context, &freq, &snap.policy),
    };
    if cacheable {
        shared.metrics.decision_cache_miss.inc();
    }
    // A token's first request caches no decision: most cold tokens have no second.
    if cacheable && principal.used_again() {
        let shape = cache::RequestShape {
            method,
            target: rel.to_owned(),
            if_none_exist,
        };
        cache::put(decider, shape, decision.clone(), target.clone());
    }
    ctx.target = Some(target);
    finish(shared, req, decision)
}

/// An export status URL the gateway signed (exports.rs): for the client it was signed
/// for, until it expires, whatever the path looks like; refused to anyone else.
fn signed_status(
    shared: &Shared,
    snap: &Snapshot,
    req: &Request<BoxBody>,
    principal: &Principal,
    target: &str,
    signature: &str,
) -> Decision {
    let valid = matches!(*req.method(), Method::GET | Method::DELETE)
        && crate::exports::client_of(principal).is_some_and(|client| {
            let config = &snap.config.bulk_data;
            let now = jsonwebtoken::get_current_timestamp();
            shared
                .exports
                .verify(config, &client, target, signature, now)
        });
    if valid {
        return Decision::Allow(Plan::pass_through());
    }
    Decision::Deny {
        reason: crate::policy::DenyReason::Unverifiable(
            "the export status URL was signed for another client, or has expired",
        ),
        needed: String::new(),
    }
}

/// The bodies the decision reads: a batch or transaction Bundle posted to the base, and
/// the parameters of a POST $export (exports::body_params). Read whole and put back.
async fn read_deciding_body(
    snap: &Snapshot,
    req: Request<BoxBody>,
    base_post: bool,
    export_post: bool,
) -> Result<
    (
        Request<BoxBody>,
        Option<serde_json::Value>,
        Vec<(String, String)>,
    ),
    GatewayError,
> {
    if base_post {
        let (req, bytes) = buffer(snap, req).await?;
        let bundle = crate::json::parse(&bytes).map_err(|_| {
            GatewayError::BadRequest("the posted Bundle is not JSON, or repeats a member name")
        })?;
        return Ok((req, Some(bundle), Vec::new()));
    }
    if export_post {
        let (req, bytes) = buffer(snap, req).await?;
        let params = crate::exports::body_params(&bytes).map_err(GatewayError::BadRequest)?;
        return Ok((req, None, params));
    }
    Ok((req, None, Vec::new()))
}

/// Counts the decision and turns a denial into the 403 error.
fn finish(
    shared: &Shared,
    req: Request<BoxBody>,
    decision: Decision,
) -> Result<(Request<BoxBody>, Plan), GatewayError> {
    match decision {
        Decision::Allow(plan) => {
            shared.metrics.decision_allow.inc();
            Ok((req, plan))
        }
        Decision::Deny { reason, needed } => {
            shared
                .metrics
                .decisions
                .with_label_values(&["deny", reason.code()])
                .inc();
            Err(GatewayError::Forbidden(Box::new(crate::error::Denial {
                code: reason.code(),
                message: reason.to_string(),
                needed,
            })))
        }
    }
}

fn classify_error(e: ClassifyError) -> GatewayError {
    match e {
        ClassifyError::BadRequest(why) => GatewayError::BadRequest(why),
        ClassifyError::UnknownType => GatewayError::NotFound,
        ClassifyError::MethodNotAllowed => GatewayError::MethodNotAllowed,
    }
}

/// Each entry of a batch or transaction as a request (FHIR R4 bundle.html: `request.method`
/// and `request.url`, relative to the base or absolute under the public base).
fn bundle_entries(snap: &Snapshot, bundle: &serde_json::Value) -> Vec<Result<FhirRequest, ()>> {
    let Some(entries) = bundle["entry"].as_array() else {
        return Vec::new();
    };
    let public = snap.config.server.public_base_url.as_string();
    entries
        .iter()
        .map(|entry| {
            let request = &entry["request"];
            let method: Method = request["method"]
                .as_str()
                .ok_or(())?
                .parse()
                .map_err(|_| ())?;
            let url = request["url"].as_str().ok_or(())?;
            let url = match url.strip_prefix(&public) {
                Some(rest) => rest.trim_start_matches('/'),
                None if url.contains("://") => return Err(()),
                None => url,
            };
            let (path, query) = match url.split_once('?') {
                Some((p, q)) => (format!("/{p}"), Some(q)),
                None => (format!("/{url}"), None),
            };
            let path = if path == "/" { String::new() } else { path };
            let mut headers = http::HeaderMap::new();
            match request.get("ifNoneExist") {
                None => {}
                // A condition the gateway narrows must be one it can read: anything but a
                // string (null included) would be narrowed to the patient alone.
                Some(serde_json::Value::String(_)) => {
                    headers.insert("if-none-exist", HeaderValue::from_static("1"));
                }
                Some(_) => return Err(()),
            }
            let resource = &entry["resource"];
            let nested_type = (resource["resourceType"] == "Bundle")
                .then(|| resource["type"].as_str())
                .flatten();
            classify(&method, &path, query, &headers, None, nested_type).map_err(|_| ())
        })
        .collect()
}

/// Whether the caller may read every resource of every type, unconfined: nothing the
/// upstream answers can be more than it could read directly.
pub(super) fn sees_everything(snap: &Snapshot, principal: &Principal) -> bool {
    crate::policy::sees_everything(&principal.grants, &context(snap, principal), &snap.policy)
}

/// The patient context of a caller, as the policy reads it.
pub(super) fn context(snap: &Snapshot, principal: &Principal) -> Context {
    Context::new(
        principal.patient(),
        principal.fhir_user(),
        snap.config.policy.confine_related_person,
    )
}

//! The public endpoints, answered without a token: the SMART configuration document and
//! the CapabilityStatement with its SMART security section.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{ConnInfo, Ctx, limited};
use crate::body::{BoxBody, full};
use crate::error::GatewayError;
use crate::proxy::Identity;
use crate::proxy::headers::ClientSide;
use crate::state::{Shared, Snapshot};

/// How long an augmented CapabilityStatement is served from memory.
const METADATA_TTL: Duration = Duration::from_secs(60);

/// `GET [base]/metadata`: no token; the upstream's CapabilityStatement with the SMART
/// security section added (SMART App Launch 2.2 conformance.html) and its own address
/// rewritten; cached briefly; 503 when the upstream cannot give one.
pub(super) async fn metadata(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: Request<Incoming>,
    rel: &str,
    request_id: &HeaderValue,
    ctx: &mut Ctx<'_>,
) -> Result<Response<BoxBody>, GatewayError> {
    let cacheable = rel == "/metadata";
    let cached = snap
        .metadata
        .lock()
        .ok()
        .and_then(|m| m.clone())
        .filter(|(at, _)| cacheable && at.elapsed() < METADATA_TTL);
    let bytes = match cached {
        Some((_, bytes)) => bytes,
        None => {
            let bytes = fetch_metadata(shared, snap, conn, &req, rel, request_id, ctx).await?;
            if cacheable && let Ok(mut m) = snap.metadata.lock() {
                *m = Some((Instant::now(), bytes.clone()));
            }
            bytes
        }
    };
    let mut resp = if req.method() == Method::HEAD {
        Response::new(crate::body::empty())
    } else {
        Response::new(full(bytes.clone()))
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::error::FHIR_JSON),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    Ok(resp)
}

async fn fetch_metadata(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: &Request<Incoming>,
    rel: &str,
    request_id: &HeaderValue,
    ctx: &mut Ctx<'_>,
) -> Result<Bytes, GatewayError> {
    let upstream = Request::get(snap.upstream.uri_for(rel)?)
        .header(header::ACCEPT, "application/fhir+json")
        .body(crate::body::empty())
        .map_err(|_| GatewayError::Internal)?;
    let client = ClientSide {
        peer: conn.peer_text.clone(),
        proto: if conn.tls { "https" } else { "http" },
        host: req.headers().get(header::HOST).cloned(),
    };
    let identity = Identity {
        strip: &snap.identity_headers,
        set: Vec::new(),
    };
    let (resp, took) = snap
        .upstream
        .send(&conn.worker, upstream, &client, request_id, &identity)
        .await
        .map_err(|failure| {
            super::upstream_failed(shared, failure);
            GatewayError::Unavailable
        })?;
    ctx.upstream_time = Some(took);
    if resp.status() != StatusCode::OK {
        return Err(GatewayError::Unavailable);
    }
    let limit = snap.config.upstream.max_response_buffer.0;
    let body = limited(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|_| GatewayError::Unavailable)?
        .to_bytes();
    let mut statement: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| GatewayError::UpstreamInvalid("CapabilityStatement is not JSON"))?;
    if !crate::smart::capability::augment(&mut statement, snap.smart.as_ref()) {
        return Err(GatewayError::UpstreamInvalid("not a CapabilityStatement"));
    }
    if let Some(url) = statement["implementation"]["url"].as_str()
        && let Some(public) = snap.urls.to_public(url)
    {
        statement["implementation"]["url"] = serde_json::Value::String(public);
    }
    serde_json::to_vec(&statement)
        .map(Bytes::from)
        .map_err(|_| GatewayError::Internal)
}

/// Whether `req` is a CORS preflight (Fetch standard: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`). FHIR R4 defines no `OPTIONS` interaction.
pub(super) fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight for the FHIR API: any origin (access rides on bearer
/// tokens, not on cookies a browser would add), the FHIR methods, and the headers asked
/// for when they read as a header list (else the ones FHIR clients send).
pub(super) fn preflight(request: &http::HeaderMap) -> Response<BoxBody> {
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let asked = request
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| {
            v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(b))
        })
        .cloned();
    let h = resp.headers_mut();
    allow_preflight(
        h,
        "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        asked.unwrap_or(HeaderValue::from_static(
            "Authorization, Accept, Content-Type, If-Match, If-None-Exist, If-None-Match, \
             If-Modified-Since, Prefer, X-Request-Id",
        )),
    );
    h.insert(
        header::VARY,
        HeaderValue::from_static("Access-Control-Request-Headers"),
    );
    resp
}

/// The headers of an answer to a preflight: any origin, `methods`, request `headers`,
/// cached for a day.
fn allow_preflight(h: &mut http::HeaderMap, methods: &'static str, headers: HeaderValue) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, headers);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
}

/// CORS on an answer to a cross-origin request, refusals included (an app must be able
/// to read a 401's challenge): any origin, and the headers a FHIR client reads exposed.
pub(super) fn allow_cross_origin(h: &mut http::HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "Location, Content-Location, ETag, Last-Modified, WWW-Authenticate, X-Request-Id",
        ),
    );
}

/// `/.well-known/smart-configuration` (SMART App Launch 2.2 conformance.html): no token,
/// `application/json` whatever `Accept` says, readable from any origin.
pub(super) fn discovery(
    snap: &Snapshot,
    method: &Method,
) -> Result<Response<BoxBody>, GatewayError> {
    let doc = snap.discovery.as_ref().ok_or(GatewayError::NotFound)?;
    let mut resp = match *method {
        Method::GET => Response::new(full(doc.clone())),
        Method::HEAD | Method::OPTIONS => Response::new(crate::body::empty()),
        _ => return Err(GatewayError::MethodNotAllowed),
    };
    if *method == Method::OPTIONS {
        *resp.status_mut() = StatusCode::NO_CONTENT;
    }
    let h = resp.headers_mut();
    if *method == Method::OPTIONS {
        allow_preflight(
            h,
            "GET, HEAD, OPTIONS",
            HeaderValue::from_static("Accept, Content-Type"),
        );
    } else {
        public_json_headers(h);
        if *method == Method::HEAD {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(doc.len()));
        }
    }
    Ok(resp)
}

/// A public JSON document (the OpenID Connect configuration), readable cross-origin.
pub(super) fn json_document(doc: &serde_json::Value) -> Response<BoxBody> {
    let mut resp = Response::new(full(doc.to_string()));
    public_json_headers(resp.headers_mut());
    resp
}

/// The headers of a public JSON document: any origin may read it, caches may keep it
/// five minutes.
fn public_json_headers(h: &mut http::HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
}

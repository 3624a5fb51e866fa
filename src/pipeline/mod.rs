//! The request flow of DESIGN.md as named stages, in order:
//! route → (authenticate → classify → authorize) → forward → respond, with `log` (metrics
//! and the access line) run for every request, answered, refused or failed.
//!
//! With `auth.mode = "none"` (trials, benchmarks) classify and authorize are skipped and
//! every request gets the pass-through plan.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

mod authorize;
mod checks;

mod public;

use crate::auth::{AuthFailure, Principal, bearer};
use crate::body::{BoxBody, full};
use crate::error::GatewayError;
use crate::exports;
use crate::fhir::bundle;
use crate::fhir::request::IF_NONE_EXIST;
use crate::policy::verify::{Verdict, Viewer};
use crate::policy::{Plan, Verify};
use crate::proxy::Identity;
use crate::proxy::headers::{ClientSide, X_REQUEST_ID};
use crate::state::{Shared, Snapshot};

/// The boxed future of one request, as the connection's service returns it.
pub type ResponseFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<BoxBody>, Infallible>> + Send>,
>;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Client address.
    pub peer: std::net::SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The worker thread serving the connection.
    pub worker: crate::proxy::WorkerSide,
    /// The peer address as the forwarding headers write it (formatted once).
    pub peer_text: Arc<crate::proxy::headers::PeerText>,
}

/// Low-cardinality route class, the `route` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// A FHIR REST request under the public base.
    Fhir,
    /// `GET [base]/metadata`: public, no token (FHIR R4 http.html#capabilities).
    Metadata,
    /// `[base]/.well-known/smart-configuration`: public, served by the gateway.
    Discovery,
    /// `[base]/auth/…`: the embedded authorization server.
    Auth,
    /// Anything else.
    NotFound,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Fhir => "fhir",
            Route::Metadata => "metadata",
            Route::Discovery => "discovery",
            Route::Auth => "auth",
            Route::NotFound => "not_found",
        }
    }
}

/// Per-request facts gathered along the way for the `log` stage: the metrics and the
/// audit line. Dropped unlogged (the client abandoned the request and its future with
/// it), it writes the audit line of an aborted request: a write may have reached the
/// upstream all the same.
pub(super) struct Ctx<'a> {
    shared: &'a Shared,
    conn: &'a ConnInfo,
    started: Instant,
    method: Method,
    request_id: HeaderValue,
    forwarded_for: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
    /// The query string, only with `audit.include_query`.
    query: Option<Box<str>>,
    route: Route,
    pub(super) upstream_time: Option<Duration>,
    upstream_status: Option<u16>,
    reason: Option<&'static str>,
    token_reason: Option<&'static str>,
    /// A token or policy refusal (as opposed to a malformed request or a failure).
    denied: bool,
    principal: Option<Arc<Principal>>,
    target: Option<crate::audit::Target>,
    /// What the embedded authorization server did (route `auth`).
    authz: crate::audit::AuthzNote,
    seen: Seen,
    logged: bool,
    _inflight: Inflight<'a>,
}

/// What verification did to the answer (atomics only because the request's future
/// must be `Send`; one task touches them).
#[derive(Default)]
pub(super) struct Seen {
    /// 1 + the index of the result in [`crate::metrics::VERIFY_RESULTS`]; 0 for none.
    verified: std::sync::atomic::AtomicU8,
    removed: std::sync::atomic::AtomicU64,
}

impl Seen {
    /// Counts a verification result and remembers it for the audit line.
    fn note(&self, shared: &Shared, result: &'static str) {
        shared.metrics.count_verify(result);
        let index = crate::metrics::VERIFY_RESULTS
            .iter()
            .position(|r| *r == result)
            .map_or(0, |i| i + 1);
        self.verified
            .store(index as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The last verification result noted.
    fn verified(&self) -> Option<&'static str> {
        let index = self.verified.load(std::sync::atomic::Ordering::Relaxed);
        crate::metrics::VERIFY_RESULTS
            .get(usize::from(index).checked_sub(1)?)
            .copied()
    }

    fn removed(&self) -> u64 {
        self.removed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<'a> Ctx<'a> {
    fn new(
        shared: &'a Shared,
        conn: &'a ConnInfo,
        snap: &Snapshot,
        req: &Request<Incoming>,
        request_id: HeaderValue,
    ) -> Ctx<'a> {
        let headers = req.headers();
        Ctx {
            shared,
            conn,
            started: Instant::now(),
            method: req.method().clone(),
            request_id,
            forwarded_for: headers
                .get(&crate::proxy::headers::X_FORWARDED_FOR)
                .cloned(),
            traceparent: headers.get(&crate::proxy::headers::TRACEPARENT).cloned(),
            query: snap
                .config
                .audit
                .include_query
                .then(|| req.uri().query().map(Box::from))
                .flatten(),
            route: Route::NotFound,
            upstream_time: None,
            upstream_status: None,
            reason: None,
            token_reason: None,
            denied: false,
            principal: None,
            target: None,
            authz: Default::default(),
            seen: Seen::default(),
            logged: false,
            _inflight: Inflight::new(&shared.metrics.inflight),
        }
    }

    /// The audit decision (see [`crate::audit::Line::decision`]).
    fn decision(&self) -> &'static str {
        match self.seen.verified() {
            _ if self.denied => "deny",
            Some("refused") => "deny",
            Some("filtered" | "outcome_sanitised" | "withheld") => "filtered",
            _ if self.reason.is_some() => "error",
            _ => "allow",
        }
    }
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        if !self.logged {
            log(self, None);
        }
    }
}

/// Handles one request end to end. Never fails: errors become OperationOutcome responses.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody>, Infallible> {
    let snap = shared.snapshot.load_full();
    let request_id = crate::proxy::headers::request_id(req.headers());
    let cross_origin = req.headers().contains_key(header::ORIGIN);
    let mut ctx = Ctx::new(&shared, &conn, &snap, &req, request_id.clone());

    let mut resp = match serve(&shared, &snap, &conn, req, &request_id, &mut ctx).await {
        Ok(resp) => resp,
        Err(e) => {
            ctx.reason = Some(e.reason());
            ctx.denied = matches!(
                e,
                GatewayError::Forbidden(_)
                    | GatewayError::MissingToken
                    | GatewayError::InvalidToken(_)
                    | GatewayError::InvalidRequest(_)
            );
            e.into_response(&snap.config.auth.realm)
        }
    };
    resp.headers_mut().insert(&X_REQUEST_ID, request_id);
    if cross_origin {
        public::allow_cross_origin(resp.headers_mut());
    }
    log(&mut ctx, Some(resp.status()));
    Ok(resp)
}

/// One request in flight on `smartgate_inflight_requests`, until it is dropped: also when
/// the client abandons the request and its future is dropped before it finishes.
struct Inflight<'a>(&'a prometheus::IntGauge);

impl<'a> Inflight<'a> {
    fn new(gauge: &'a prometheus::IntGauge) -> Inflight<'a> {
        gauge.inc();
        Inflight(gauge)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The route stage: the gateway's own endpoints, or the FHIR flow.
async fn serve(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: Request<Incoming>,
    request_id: &HeaderValue,
    ctx: &mut Ctx<'_>,
) -> Result<Response<BoxBody>, GatewayError> {
    let path_and_query = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let rel = snap
        .urls
        .strip_public(path_and_query)
        .ok_or(GatewayError::NotFound)?
        .to_owned();
    let path = rel.split('?').next().unwrap_or_default();
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    if path == "/.well-known/smart-configuration" {
        ctx.route = Route::Discovery;
        return public::discovery(snap, req.method());
    }
    if path == "/.well-known/openid-configuration"
        && let Some(doc) = snap
            .authz
            .as_ref()
            .zip(snap.smart.as_ref())
            .and_then(|(a, smart)| a.openid_configuration(smart))
    {
        ctx.route = Route::Discovery;
        return Ok(public::json_document(&doc));
    }
    if read && path == "/metadata" {
        ctx.route = Route::Metadata;
        // Boxed, like the other rare routes: their futures would otherwise make every
        // request's future (allocated and moved once per request) as large as theirs.
        return Box::pin(public::metadata(
            shared, snap, conn, req, &rel, request_id, ctx,
        ))
        .await;
    }
    if let Some(authz) = &snap.authz
        && rel.starts_with("/auth/")
    {
        ctx.route = Route::Auth;
        return Box::pin(authz.handle(snap.auth.as_deref(), req, &rel, &mut ctx.authz)).await;
    }
    ctx.route = Route::Fhir;
    // A browser app's CORS preflight carries no token: answered here, never forwarded.
    if public::is_preflight(&req) {
        return Ok(public::preflight(req.headers()));
    }
    fhir(shared, snap, conn, req, &rel, request_id, ctx).await
}

/// A FHIR REST request, stage by stage: admit → authenticate → authorize → narrow →
/// forward → verify and respond.
async fn fhir(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: Request<Incoming>,
    rel: &str,
    request_id: &HeaderValue,
    ctx: &mut Ctx<'_>,
) -> Result<Response<BoxBody>, GatewayError> {
    let req = admit(req).await?;
    // A signed export status URL (exports.rs): the signature is the gateway's, checked in
    // the authorize stage and never forwarded. Without tokens nothing is signed.
    let signed = snap.auth.as_ref().and(exports::split_signature(rel));
    let mut upstream_uri = snap.upstream.uri_for(signed.map_or(rel, |(t, _)| t))?;

    // authenticate
    let (req, principal, form) = authenticate(snap, req, ctx).await?;
    ctx.principal.clone_from(&principal);
    // A POST _search form, kept to rewrite its `_elements` (a cheap clone of the bytes).
    let search_form = form.clone();

    // authorize
    let (mut req, plan) = match &principal {
        None => (req, Plan::pass_through()),
        Some(p) => {
            authorize::classify_and_authorize(shared, snap, req, p, form, rel, signed, ctx).await?
        }
    };
    // The length hyper frames the body by (its Content-Length), or a buffered body's.
    if (req.body().size_hint().exact()).is_some_and(|n| n > snap.config.server.max_request_body.0) {
        return Err(GatewayError::PayloadTooLarge);
    }

    // narrow: the caller as the checks see it, built once, only when the plan has checks.
    let client = client_side(conn, &req);
    let context = principal
        .as_deref()
        .filter(|_| !plan.is_pass_through())
        .map(|p| authorize::context(snap, p));
    let (worker, client_ref) = (&conn.worker, &client);
    let fetcher = (principal.as_deref().zip(context.as_ref())).map(|(principal, ctx)| {
        checks::Fetcher::new(shared, snap, worker, client_ref, request_id, principal, ctx)
    });
    let mut shape = Shape::default();
    if let Some(fetcher) = &fetcher {
        let narrowed = narrow(snap, fetcher, &plan, req, rel, search_form.as_deref()).await?;
        req = narrowed.0;
        if let Some(uri) = narrowed.1 {
            upstream_uri = uri;
        }
        shape = ask_for_what_can_be_verified(&plan, rel, &mut req)?;
    }

    // forward
    let method = req.method().clone();
    let resp = forward(
        shared,
        snap,
        conn,
        req,
        upstream_uri,
        &client,
        request_id,
        &principal,
        ctx,
    )
    .await?;
    let export_status = export_to_bind(snap, principal.as_deref(), rel, &resp);
    // An error answer's body is the server speaking about the request, in free text the
    // gateway cannot check: only what of it carries no record data goes to a token that
    // cannot read everything.
    let resp = match principal.as_deref() {
        Some(p) if !resp.status().is_success() && !authorize::sees_everything(snap, p) => {
            Box::pin(error_answer(shared, snap, &ctx.seen, &method, resp)).await
        }
        _ => resp,
    };

    // verify, respond
    let mut resp = respond(
        shared,
        snap,
        &ctx.seen,
        &plan,
        fetcher.as_ref(),
        &method,
        shape.native,
        resp,
    )
    .await?;
    if let Some((status, client)) = export_status {
        bind_export_status(shared, snap, &status, &client, &mut resp);
    }
    Ok(finish(resp, principal.is_some(), shape.head))
}

/// What a token was shown is not for a shared cache to show others; a HEAD asked as GET
/// goes back without the body.
fn finish(mut resp: Response<BoxBody>, token: bool, head: bool) -> Response<BoxBody> {
    if token {
        crate::proxy::headers::keep_private(resp.headers_mut());
    }
    if head {
        let (mut parts, _) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        return Response::from_parts(parts, crate::body::empty());
    }
    resp
}

/// The admit stage: no body where FHIR has none, before anything else reads the request,
/// and a request head with one reading.
async fn admit(req: Request<Incoming>) -> Result<Request<BoxBody>, GatewayError> {
    let req = without_stray_body(req).await?;
    let (mut parts, body) = req.into_parts();
    crate::proxy::headers::check_request_head(&parts.uri, &mut parts.headers)
        .map_err(GatewayError::BadRequest)?;
    Ok(Request::from_parts(parts, body))
}

/// The client as the forwarding headers describe it.
fn client_side(conn: &ConnInfo, req: &Request<BoxBody>) -> ClientSide {
    ClientSide {
        peer: conn.peer_text.clone(),
        proto: if conn.tls { "https" } else { "http" },
        // `:authority` (HTTP/2) or an absolute-form target first: RFC 9113 §8.3.1.
        host: req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| req.headers().get(header::HOST).cloned()),
    }
}

/// The narrow stage, for a token whose requests are checked: the patient and granted
/// constraints added to the search or the conditional create, `_elements` widened to
/// what verification needs, `handling=strict` asked for, and writes and transactions
/// checked before anything is forwarded. The new upstream target, when it changed.
async fn narrow(
    snap: &Snapshot,
    fetcher: &checks::Fetcher<'_>,
    plan: &Plan,
    mut req: Request<BoxBody>,
    rel: &str,
    search_form: Option<&[u8]>,
) -> Result<(Request<BoxBody>, Option<http::Uri>), GatewayError> {
    let mut narrowed: Option<String> = None;
    if !plan.inject.is_empty() {
        let conditional_create =
            req.method() == Method::POST && req.headers().contains_key(&IF_NONE_EXIST);
        if conditional_create {
            narrow_condition(req.headers_mut(), &plan.inject)?;
        } else {
            narrowed = Some(checks::append_params(rel, &plan.inject));
        }
    }
    if !plan.elements.is_empty() {
        let target = narrowed.as_deref().unwrap_or(rel);
        narrowed = Some(checks::widen_elements(target, &plan.elements));
        // `_elements` in a POST _search body is widened the same way.
        if let Some(text) = search_form.and_then(|b| std::str::from_utf8(b).ok()) {
            let widened = checks::widen_elements(&format!("?{text}"), &plan.elements);
            let body = widened.trim_start_matches('?').to_owned();
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            req.headers_mut().remove(header::TRANSFER_ENCODING);
            *req.body_mut() = crate::body::full(body);
        }
    }
    let uri = match &narrowed {
        Some(target) => Some(snap.upstream.uri_for(target)?),
        None => None,
    };
    if plan.strict || plan.entries.iter().any(|e| e.strict) {
        crate::proxy::headers::prefer_strict(req.headers_mut());
    }
    // Boxed: writes and transactions under a confined token are the rarer requests, and
    // their futures would otherwise size every request's.
    if let Some(w) = &plan.write {
        req = Box::pin(fetcher.write(w, req)).await?;
    }
    if !plan.entries.is_empty() {
        req = Box::pin(fetcher.bundle(&plan.entries, req)).await?;
    }
    Ok((req, uri))
}

/// A conditional create's `If-None-Exist` with the patient and constraints added. One
/// readable condition, or none of it could be kept: narrowing an unreadable one would
/// replace the client's condition with ours alone, and a second header would be dropped
/// unseen.
fn narrow_condition(
    headers: &mut http::HeaderMap,
    inject: &[(String, String)],
) -> Result<(), GatewayError> {
    const MALFORMED: GatewayError = GatewayError::BadRequest("If-None-Exist is malformed");
    let mut values = headers.get_all(&IF_NONE_EXIST).iter();
    let current = match (values.next().map(HeaderValue::to_str), values.next()) {
        (Some(Ok(current)), None) => current,
        _ => return Err(MALFORMED),
    };
    let narrowed = checks::append_query(current, inject);
    let value = HeaderValue::from_str(&narrowed).map_err(|_| MALFORMED)?;
    headers.insert(&IF_NONE_EXIST, value);
    Ok(())
}

/// How the answer is asked for so that it can be verified, and how it goes back.
#[derive(Default)]
struct Shape {
    /// A HEAD asked as GET: answered without the body.
    head: bool,
    /// The client asked for no FHIR format: a verified Binary is answered in its native
    /// form (FHIR R4 binary.html#rest), though the upstream is asked for JSON.
    native: bool,
}

/// Asks the upstream for an answer that can be verified: JSON, whole, now. No 304 that
/// would confirm a version of a resource the token cannot see, no 206 with a part of one
/// that cannot be checked (the whole is answered, which RFC 9110 §14.2 allows), no 202
/// pointing at a status URL to poll later unchecked, no HEAD that skips the check.
fn ask_for_what_can_be_verified(
    plan: &Plan,
    rel: &str,
    req: &mut Request<BoxBody>,
) -> Result<Shape, GatewayError> {
    if !needs_verify(plan) {
        return Ok(Shape::default());
    }
    // `_format` overrides Accept at the server: asking for XML would only get the answer
    // refused after the server did the work.
    let format = format_asked(rel);
    if format == Some(false) {
        return Err(GatewayError::NotAcceptable(
            "responses to this token are checked, and only JSON can be checked",
        ));
    }
    let native = plan.binary_read && format.is_none() && !accepts_a_fhir_format(req.headers());
    let h = req.headers_mut();
    h.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/fhir+json"),
    );
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::RANGE,
        header::IF_RANGE,
    ] {
        h.remove(name);
    }
    crate::proxy::headers::drop_respond_async(h);
    let head = req.method() == Method::HEAD;
    if head {
        *req.method_mut() = Method::GET;
    }
    Ok(Shape { head, native })
}

/// The forward stage: the request to the upstream, and its answer's head.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: Request<BoxBody>,
    upstream_uri: http::Uri,
    client: &ClientSide,
    request_id: &HeaderValue,
    principal: &Option<Arc<Principal>>,
    ctx: &mut Ctx<'_>,
) -> Result<Response<BoxBody>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    parts.uri = upstream_uri;
    // The body is already boxed; the limit applies to what streams on.
    // The upstream connection's protocol is negotiated separately from the client's.
    parts.version = Version::HTTP_11;
    let body = limited(body, snap.config.server.max_request_body.0);
    let (resp, upstream_time) = snap
        .upstream
        .send(
            &conn.worker,
            Request::from_parts(parts, body),
            client,
            request_id,
            &identity(snap, principal.as_deref()),
        )
        .await
        .map_err(|failure| upstream_failed(shared, failure).to_error())?;
    ctx.upstream_time = Some(upstream_time);
    ctx.upstream_status = Some(resp.status().as_u16());
    shared
        .metrics
        .upstream_duration
        .observe(upstream_time.as_secs_f64());
    // Unless the client's own Authorization is forwarded, an upstream asking for
    // credentials refuses the gateway's ([upstream.headers]), not the client's token:
    // passed on, a 401 would have a SMART app throw a good token away and sign in again,
    // in a loop, and a `WWW-Authenticate: Basic` could open a browser's password prompt.
    if matches!(resp.status().as_u16(), 401 | 407) && !snap.config.upstream.forward_authorization {
        tracing::warn!(
            status = resp.status().as_u16(),
            "the upstream refused the gateway's credentials (upstream.headers)"
        );
        shared
            .metrics
            .upstream_errors
            .with_label_values(&["credentials_refused"])
            .inc();
        return Err(GatewayError::UpstreamInvalid(
            "the upstream refused the gateway's credentials",
        ));
    }
    Ok(resp)
}

/// An export kick-off the upstream accepted: its status URL, to be bound to this client
/// (exports.rs).
fn export_to_bind(
    snap: &Snapshot,
    principal: Option<&Principal>,
    rel: &str,
    resp: &Response<BoxBody>,
) -> Option<(String, String)> {
    let p = principal?;
    if resp.status() != StatusCode::ACCEPTED || !exports::is_kick_off(rel) {
        return None;
    }
    resp.headers()
        .get(header::CONTENT_LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|url| snap.urls.relative(url))
        .filter(|status| exports::may_bind(status))
        .zip(exports::client_of(p))
}

/// The answer's status URL, signed for the client that kicked the export off.
fn bind_export_status(
    shared: &Shared,
    snap: &Snapshot,
    status: &str,
    client: &str,
    resp: &mut Response<BoxBody>,
) {
    let Some(public) = resp
        .headers()
        .get(header::CONTENT_LOCATION)
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    let signature = shared.exports.sign(
        &snap.config.bulk_data,
        client,
        status,
        jsonwebtoken::get_current_timestamp(),
    );
    let signed = exports::with_signature(public, &signature);
    match HeaderValue::from_str(&signed) {
        Ok(v) => resp.headers_mut().insert(header::CONTENT_LOCATION, v),
        Err(_) => resp.headers_mut().remove(header::CONTENT_LOCATION),
    };
}

/// What the query's `_format` (FHIR R4 http.html#mime-type) asks for: `None` without
/// one, `Some(true)` when every `_format` is JSON, `Some(false)` when one is not.
fn format_asked(rel: &str) -> Option<bool> {
    let (_, query) = rel.split_once('?')?;
    let is_json = |v: &str| {
        let essence = v.split(';').next().unwrap_or("").trim();
        [
            "json",
            "application/json",
            "application/fhir+json",
            "application/json+fhir",
        ]
        .iter()
        .any(|json| essence.eq_ignore_ascii_case(json))
    };
    form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "_format")
        .map(|(_, v)| is_json(&v))
        .reduce(|all, this| all && this)
}

/// Whether `Accept` names a FHIR format (or plain JSON or XML, which FHIR reads as its
/// own): anything else, or no `Accept`, asks a Binary for its native form.
fn accepts_a_fhir_format(headers: &http::HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().any(|v| {
        v.to_str()
            .map_or(true, |v| v.contains("json") || v.contains("xml"))
    })
}

/// A verified Binary (FHIR JSON) answered as its content: the bytes of `data` under its
/// `contentType`. Anything else, or a Binary without both, goes back unchanged.
fn native_binary(mut parts: http::response::Parts, bytes: Bytes) -> Response<BoxBody> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Binary<'a> {
        resource_type: &'a str,
        content_type: Option<&'a str>,
        data: Option<&'a str>,
    }
    let content = crate::json::validate(&bytes)
        .ok()
        .and_then(|()| serde_json::from_slice::<Binary>(&bytes).ok())
        .filter(|b| b.resource_type == "Binary")
        .and_then(|b| Some((b.content_type?, b.data?)))
        .and_then(|(ty, data)| {
            let ty = HeaderValue::from_str(ty).ok()?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(data)
                .ok()?;
            Some((ty, data))
        });
    match content {
        Some((ty, data)) => {
            parts.headers.insert(header::CONTENT_TYPE, ty);
            // Content from the record, served from the API's origin: never sniffed into
            // something else, and never run as a page there (an HTML or SVG document).
            parts.headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            );
            parts.headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("sandbox"),
            );
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
            Response::from_parts(parts, full(data))
        }
        None => Response::from_parts(parts, full(bytes)),
    }
}

/// An upstream error answer as a token that cannot read everything may see it: a 404 is
/// the gateway's own (the same status, headers and body as a read refused with
/// `policy.denied_read_status = 404`, so the two cannot be told apart); any other keeps
/// its status and headers, and its body becomes the sanitised OperationOutcome
/// ([`crate::policy::verify::sanitized_outcome`]) or, for anything else, one of the
/// gateway's own.
async fn error_answer(
    shared: &Shared,
    snap: &Snapshot,
    seen: &Seen,
    method: &Method,
    resp: Response<BoxBody>,
) -> Response<BoxBody> {
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return GatewayError::NotFound.into_response(&snap.config.auth.realm);
    }
    if *method == Method::HEAD || status == StatusCode::NOT_MODIFIED || resp.body().is_end_stream()
    {
        return resp;
    }
    seen.note(shared, "outcome_sanitised");
    let (mut parts, body) = resp.into_parts();
    let limit = snap.config.upstream.max_response_buffer.0;
    let outcome = crate::body::read_whole(limited(body, limit))
        .await
        .ok()
        .and_then(|bytes| crate::json::parse(&bytes).ok())
        .and_then(|doc| crate::policy::verify::sanitized_outcome(&doc))
        .unwrap_or_else(|| {
            serde_json::json!({"resourceType": "OperationOutcome", "issue": [{
                "severity": "error", "code": "unknown",
                "diagnostics": format!("The FHIR server answered {}; its body is withheld.", status.as_u16())
            }]})
        });
    let bytes = Bytes::from(outcome.to_string());
    for name in [
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
        header::ETAG,
        header::LAST_MODIFIED,
        header::CONTENT_RANGE,
        header::CONTENT_LOCATION,
    ] {
        parts.headers.remove(name);
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::error::FHIR_JSON),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Response::from_parts(parts, full(bytes))
}

/// The answer to a checked write whose body the token may not see: the write happened
/// and its status stands, but the body becomes the gateway's own OperationOutcome.
fn withheld(shared: &Shared, seen: &Seen) -> Bytes {
    seen.note(shared, "withheld");
    Bytes::from(
        serde_json::json!({"resourceType": "OperationOutcome", "issue": [{
            "severity": "information", "code": "informational",
            "diagnostics": "The write was done; the server's answer is withheld: this token may not read it."
        }]})
        .to_string(),
    )
}

/// Whether the response must be verified.
fn needs_verify(plan: &Plan) -> bool {
    plan.verify != Verify::None || !plan.entries.is_empty()
}

/// Counts a failed upstream exchange by kind and hands the failure on.
pub(super) fn upstream_failed(
    shared: &Shared,
    failure: crate::proxy::UpstreamFailure,
) -> crate::proxy::UpstreamFailure {
    shared
        .metrics
        .upstream_errors
        .with_label_values(&[failure.kind()])
        .inc();
    failure
}

/// The authenticate stage: the bearer token → the caller, or a refusal. Nothing is
/// forwarded for a refused or unjudgeable token.
async fn authenticate(
    snap: &Snapshot,
    req: Request<BoxBody>,
    ctx: &mut Ctx<'_>,
) -> Result<(Request<BoxBody>, Option<Arc<Principal>>, Option<Bytes>), GatewayError> {
    let Some(auth) = &snap.auth else {
        return Ok((req, None, None));
    };
    let result = match bearer::extract(req.headers(), req.uri().query()) {
        Ok(token) => auth.authenticate(token).await,
        Err(e) => Err(e.into()),
    };
    let principal = result.map_err(|failure| {
        if let AuthFailure::Invalid(e) = &failure {
            ctx.token_reason = Some(e.code());
        }
        match failure {
            AuthFailure::Missing => GatewayError::MissingToken,
            AuthFailure::InvalidRequest(why) => GatewayError::InvalidRequest(why),
            AuthFailure::Invalid(e) => GatewayError::InvalidToken(e.description()),
            AuthFailure::Unavailable => GatewayError::AuthUnavailable,
        }
    })?;
    // RFC 6750 §2.2 form-body tokens are refused like query tokens. Form bodies are small
    // (POST _search); they are read here and passed on whole.
    if is_form(req.headers()) {
        let (req, bytes) = buffer(snap, req).await?;
        if std::str::from_utf8(&bytes).is_ok_and(bearer::has_access_token_param) {
            return Err(GatewayError::InvalidRequest(
                "access_token in the request body is not accepted",
            ));
        }
        return Ok((req, Some(principal), Some(bytes)));
    }
    Ok((req, Some(principal), None))
}

/// A request whose method carries no content (FHIR R4 http.html: read, vread, search by
/// GET, history, delete, capabilities; [`crate::proxy::carries_content`]) must come without a
/// body, however it is framed: `Content-Length`, chunked, or HTTP/2 DATA frames. An
/// upstream that does not read bodies on GET, HEAD or DELETE would run such a body as the
/// next request on the connection (request smuggling, the CL.0 class), unchecked, and
/// answer it to whoever comes next (response-queue poisoning). So a body there is refused,
/// never forwarded; an empty one (a zero-length chunked body, an empty DATA frame) is
/// dropped with its framing headers.
async fn without_stray_body(req: Request<Incoming>) -> Result<Request<BoxBody>, GatewayError> {
    if crate::proxy::carries_content(req.method()) {
        return Ok(req.map(|b| b.map_err(Into::into).boxed()));
    }
    const REFUSED: GatewayError =
        GatewayError::BadRequest("this interaction has no body in FHIR, and one was sent");
    let (mut parts, body) = req.into_parts();
    if !body.is_end_stream() {
        if body.size_hint().lower() > 0 {
            return Err(REFUSED);
        }
        // Length unknown until the body ends: read it, allowing not a byte.
        match crate::body::read_whole(Limited::new(body, 0)).await {
            Ok(bytes) if bytes.is_empty() => {}
            Ok(_) => return Err(REFUSED),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(REFUSED),
            Err(_) => return Err(GatewayError::BadRequest("request body incomplete")),
        }
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    Ok(Request::from_parts(parts, crate::body::empty()))
}

/// Reads a request body whole (within `server.max_request_body`) and puts it back.
pub(super) async fn buffer(
    snap: &Snapshot,
    req: Request<BoxBody>,
) -> Result<(Request<BoxBody>, Bytes), GatewayError> {
    let limit = snap.config.server.max_request_body.0;
    // The length hyper frames the body by, as in `serve`.
    if req.body().size_hint().exact().is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge);
    }
    let (parts, body) = req.into_parts();
    let bytes = crate::body::read_whole(limited(body, limit))
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                GatewayError::PayloadTooLarge
            } else {
                GatewayError::BadRequest("request body incomplete")
            }
        })?;
    Ok((Request::from_parts(parts, full(bytes.clone())), bytes))
}

fn is_form(headers: &http::HeaderMap) -> bool {
    crate::proxy::headers::media_type_is(headers, "application/x-www-form-urlencoded")
}

/// Identity headers for the upstream: client copies always stripped; values set only when
/// `auth.identity_headers.enabled`.
fn identity<'a>(snap: &'a Snapshot, principal: Option<&Principal>) -> Identity<'a> {
    let mut set = Vec::new();
    let cfg = &snap.config.auth.identity_headers;
    if let (true, Some(p)) = (cfg.enabled, principal) {
        let values = [
            p.client_id(),
            p.subject(),
            p.patient(),
            p.fhir_user(),
            Some(p.scope()).filter(|s| !s.is_empty()),
        ];
        for (name, value) in snap.identity_headers.iter().zip(values) {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                set.push((name.clone(), v));
            }
        }
    }
    Identity {
        strip: &snap.identity_headers,
        set,
    }
}

/// The response stage: the upstream's address out of headers and FHIR JSON bodies, and
/// the verification the plan asks for.
#[allow(clippy::too_many_arguments)]
async fn respond(
    shared: &Shared,
    snap: &Snapshot,
    seen: &Seen,
    plan: &Plan,
    fetcher: Option<&checks::Fetcher<'_>>,
    method: &Method,
    native: bool,
    mut resp: Response<BoxBody>,
) -> Result<Response<BoxBody>, GatewayError> {
    let viewer = fetcher.map(|f| f.viewer);
    rewrite_address_headers(snap, resp.headers_mut());
    let bodiless = *method == Method::HEAD
        || resp.status() == StatusCode::NO_CONTENT
        || resp.status() == StatusCode::NOT_MODIFIED
        // A checked write answered without a body (`Prefer: return=minimal`): what was
        // written was checked, and there is nothing to read.
        || (plan.write.is_some() && resp.body().size_hint().exact() == Some(0));
    // Only successful answers carry resources to verify; errors pass as they are.
    let verify = viewer.filter(|_| needs_verify(plan) && resp.status().is_success() && !bodiless);
    if verify.is_none()
        && (!plan.rewrite_links || bodiless || !crate::proxy::headers::is_fhir_json(resp.headers()))
    {
        return Ok(resp);
    }
    if verify.is_some() && !crate::proxy::headers::is_fhir_json(resp.headers()) {
        count(shared, "verify_unreadable");
        return Err(GatewayError::UpstreamInvalid(
            "a response that must be verified is not FHIR JSON",
        ));
    }
    let (mut parts, bytes, declared) = read_answer(shared, snap, resp).await?;
    let bytes = match (verify, fetcher) {
        (Some(viewer), Some(fetcher)) => {
            verified(shared, snap, seen, plan, viewer, fetcher, bytes).await?
        }
        _ => rewrite_body(shared, snap, bytes),
    };
    // The upstream's Content-Length stands when hyper framed the body by it and the
    // body kept its length; otherwise the length is the gateway's to state.
    if declared != Some(bytes.len() as u64) {
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }
    if native && parts.status == StatusCode::OK {
        return Ok(native_binary(parts, bytes));
    }
    Ok(Response::from_parts(parts, full(bytes)))
}

/// The upstream's address out of `Link`, `Location` and `Content-Location`.
fn rewrite_address_headers(snap: &Snapshot, headers: &mut http::HeaderMap) {
    if headers.contains_key(header::LINK) {
        rewrite_link_headers(snap, headers);
    }
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        if let Some(new) = headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| snap.urls.to_public(v))
        {
            match HeaderValue::from_str(&new) {
                Ok(v) => headers.insert(name, v),
                Err(_) => headers.remove(name),
            };
        }
    }
}

/// An answer's body read whole, within `upstream.max_response_buffer`, with the length
/// hyper framed it by (if any). An encoded body cannot be inspected, so it cannot pass.
async fn read_answer(
    shared: &Shared,
    snap: &Snapshot,
    resp: Response<BoxBody>,
) -> Result<(http::response::Parts, Bytes, Option<u64>), GatewayError> {
    if resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(GatewayError::UpstreamInvalid("encoded body"));
    }
    const TOO_LARGE: GatewayError = GatewayError::UpstreamInvalid("response too large to inspect");
    let limit = snap.config.upstream.max_response_buffer.0;
    // The length hyper frames the body by, read before any of it is: a Content-Length
    // hyper does not go by (beside Transfer-Encoding) does not count.
    let declared = resp.body().size_hint().exact();
    if declared.is_some_and(|n| n > limit) {
        count(shared, "too_large");
        return Err(TOO_LARGE);
    }
    let (parts, body) = resp.into_parts();
    // A declared length within the limit needs no counting: hyper delivers exactly that
    // many bytes or fails the body.
    let body = if declared.is_some() {
        body
    } else {
        limited(body, limit)
    };
    match crate::body::read_whole(body).await {
        Ok(bytes) => Ok((parts, bytes, declared)),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            count(shared, "too_large");
            Err(TOO_LARGE)
        }
        Err(e) => {
            tracing::warn!(error = %e, "upstream response body failed");
            shared
                .metrics
                .upstream_errors
                .with_label_values(&["response_body"])
                .inc();
            Err(GatewayError::UpstreamUnreachable)
        }
    }
}

/// The verify stage: the answer as the token may see it, or its refusal.
async fn verified(
    shared: &Shared,
    snap: &Snapshot,
    seen: &Seen,
    plan: &Plan,
    viewer: Viewer<'_>,
    fetcher: &checks::Fetcher<'_>,
    bytes: Bytes,
) -> Result<Bytes, GatewayError> {
    // Provenance under a patient context is the patient's when its targets are: who they
    // belong to is found first (the Bundle's own entries, lookups for the rest), from the
    // document read once here and then verified as it was read.
    let mut parsed = None;
    let owners = if (viewer.ctx.patient.is_some() || viewer.ctx.user_confined)
        && memchr::memmem::find(&bytes, b"\"Provenance\"").is_some()
    {
        parsed = crate::json::parse(&bytes).ok();
        match &parsed {
            Some(doc) => Some(Box::pin(fetcher.provenance_owners(doc)).await?),
            // Not one reading: verify_body refuses it.
            None => None,
        }
    } else {
        None
    };
    let viewer = Viewer {
        owners: owners.as_ref(),
        ..viewer
    };
    // A Binary whose securityContext is another resource (a DocumentReference) is as
    // readable as that resource: fetched and checked (boxed: rare).
    if plan.binary_read {
        match Box::pin(fetcher.security_context_readable(&bytes)).await? {
            None => {}
            Some(true) => {
                seen.note(shared, "passed");
                return Ok(bytes);
            }
            Some(false) => {
                let reason = crate::policy::DenyReason::Compartment;
                return Err(refused(shared, seen, snap, reason));
            }
        }
        return verify_body(shared, snap, seen, plan, viewer, &bytes, parsed.take());
    }
    match verify_body(shared, snap, seen, plan, viewer, &bytes, parsed.take()) {
        Ok(bytes) => Ok(bytes),
        // A checked write whose answer the token may not see: done, its body withheld.
        Err(GatewayError::Forbidden(_) | GatewayError::NotFound) if plan.write.is_some() => {
            Ok(withheld(shared, seen))
        }
        Err(e) => Err(e),
    }
}

/// The upstream's address out of `Link` headers (paging links some servers send as
/// headers). A value that is not text is dropped rather than passed unread.
fn rewrite_link_headers(snap: &Snapshot, headers: &mut http::HeaderMap) {
    let values: Vec<HeaderValue> = headers
        .get_all(header::LINK)
        .iter()
        .filter_map(|v| {
            let text = v.to_str().ok()?;
            match crate::proxy::headers::map_link_targets(text, &|u| snap.urls.to_public(u)) {
                Some(new) => HeaderValue::from_str(&new).ok(),
                None => Some(v.clone()),
            }
        })
        .collect();
    headers.remove(header::LINK);
    for v in values {
        headers.append(header::LINK, v);
    }
}

/// Verifies a response body as the plan says: parsed once, checked, links rewritten, and
/// re-serialised only when something changed.
#[allow(clippy::too_many_arguments)]
fn verify_body(
    shared: &Shared,
    snap: &Snapshot,
    seen: &Seen,
    plan: &Plan,
    viewer: Viewer<'_>,
    bytes: &Bytes,
    parsed: Option<serde_json::Value>,
) -> Result<Bytes, GatewayError> {
    // One resource (a read) not read yet: checked from the bytes, nothing to rewrite or
    // re-serialise.
    if let (true, Verify::Resource(perm), None) = (plan.entries.is_empty(), plan.verify, &parsed) {
        match viewer.visible_bytes(bytes, perm) {
            Some(true) => {
                seen.note(shared, "passed");
                return Ok(bytes.clone());
            }
            Some(false) => {
                return Err(refused(
                    shared,
                    seen,
                    snap,
                    crate::policy::DenyReason::Compartment,
                ));
            }
            None => {}
        }
    }
    let parsed = parsed.map_or_else(|| crate::json::parse(bytes), Ok);
    let mut doc = parsed.map_err(|_| {
        count(shared, "verify_unreadable");
        GatewayError::UpstreamInvalid(
            "a response that must be verified is not JSON, or repeats a member name",
        )
    })?;
    let verdict = if plan.entries.is_empty() {
        viewer.verify(plan.verify, &mut doc)
    } else {
        viewer.verify_batch_response(&mut doc, &plan.entries)
    };
    let mut changed = match verdict {
        Verdict::Unchanged => false,
        Verdict::Changed { removed } => {
            seen.note(shared, "filtered");
            seen.removed
                .store(removed as u64, std::sync::atomic::Ordering::Relaxed);
            shared.metrics.verify_removed.inc_by(removed as u64);
            if removed > 0 {
                tracing::info!(removed, "entries removed from the response");
            }
            true
        }
        Verdict::Refuse(reason) => return Err(refused(shared, seen, snap, reason)),
    };
    if !changed {
        seen.note(shared, "passed");
    }
    changed |= bundle::rewrite_links(&mut doc, &|url| snap.urls.to_public(url));
    if !changed {
        return Ok(bytes.clone());
    }
    serde_json::to_vec(&doc)
        .map(Bytes::from)
        .map_err(|_| GatewayError::Internal)
}

/// A response the token may not see: 403, or 404 with `policy.denied_read_status`.
fn refused(
    shared: &Shared,
    seen: &Seen,
    snap: &Snapshot,
    reason: crate::policy::DenyReason,
) -> GatewayError {
    seen.note(shared, "refused");
    if snap.config.policy.denied_read_status == crate::config::DeniedReadStatus::NotFound {
        GatewayError::NotFound
    } else {
        checks::forbidden(shared, reason)
    }
}

/// Parses a FHIR JSON body only when it may hold links, rewrites them structurally, and
/// re-serialises only when something changed.
fn rewrite_body(shared: &Shared, snap: &Snapshot, bytes: Bytes) -> Bytes {
    if !bundle::may_need_link_rewrite(&bytes) {
        count(shared, "skipped");
        return bytes;
    }
    // Strictly, as everything else: a document with two readings is passed as it came.
    let mut doc = match crate::json::parse(&bytes) {
        Ok(doc) => doc,
        Err(_) => {
            // Not JSON after all: nothing structural to rewrite.
            count(shared, "unparsed");
            return bytes;
        }
    };
    if !bundle::rewrite_links(&mut doc, &|url| snap.urls.to_public(url)) {
        count(shared, "unchanged");
        return bytes;
    }
    match serde_json::to_vec(&doc) {
        Ok(v) => {
            count(shared, "rewritten");
            Bytes::from(v)
        }
        Err(_) => bytes,
    }
}

fn count(shared: &Shared, result: &'static str) {
    shared.metrics.count_rewrite(result);
}

/// A body that fails once more than `limit` bytes have passed. A plain function, not
/// inline in the async stages: keeps the generic error conversion out of their futures.
pub(super) fn limited<B>(body: B, limit: u64) -> BoxBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).boxed()
}

/// The `log` stage: metrics and one audit line, for every request; `status` is `None`
/// for a request the client abandoned.
fn log(ctx: &mut Ctx<'_>, status: Option<StatusCode>) {
    ctx.logged = true;
    let shared = ctx.shared;
    let elapsed = ctx.started.elapsed();
    let route = ctx.route.label();
    if let Some(status) = status {
        shared
            .metrics
            .observe_request(route, status, elapsed.as_secs_f64());
    }
    if !shared.audit.enabled() {
        return;
    }
    fn text(v: &Option<HeaderValue>) -> Option<&str> {
        v.as_ref().and_then(|v| v.to_str().ok())
    }
    let p = ctx.principal.as_deref();
    let authz = (ctx.route == Route::Auth && !ctx.authz.endpoint.is_empty()).then_some(&ctx.authz);
    let (event, decision, reason) = match authz {
        Some(a) => {
            let granted = matches!(a.result, "issued" | "active" | "inactive" | "revoked");
            (
                a.endpoint,
                if granted { "allow" } else { "deny" },
                Some(a.result),
            )
        }
        None => (
            "request",
            ctx.decision(),
            ctx.token_reason
                .or(ctx.reason)
                .or(ctx.seen.verified().filter(|v| *v != "passed")),
        ),
    };
    let target = ctx.target.as_ref();
    shared.audit.record(&crate::audit::Line {
        time: crate::audit::rfc3339(std::time::SystemTime::now()),
        event,
        request_id: ctx.request_id.to_str().unwrap_or("-"),
        trace_id: ctx
            .traceparent
            .as_ref()
            .and_then(|v| crate::audit::trace_id(v.as_bytes())),
        peer: ctx.conn.peer.to_string(),
        // A readable header value is visible ASCII: any byte is a boundary.
        forwarded_for: text(&ctx.forwarded_for).map(|v| &v[..v.len().min(256)]),
        issuer: p.and_then(|p| p.issuer()),
        client_id: p
            .and_then(|p| p.client_id())
            .or(authz.and_then(|a| a.client_id.as_deref())),
        sub: p.and_then(|p| p.subject()),
        fhir_user: p.and_then(|p| p.fhir_user()),
        patient: p.and_then(|p| p.patient()),
        scope: authz.and_then(|a| a.scope.as_deref()),
        method: ctx.method.as_str(),
        route,
        interaction: target.map(|t| crate::audit::interaction_code(t.interaction)),
        resource_type: target.and_then(|t| t.resource_type),
        id: target.and_then(|t| t.id.as_deref()),
        query: ctx.query.as_deref(),
        decision,
        reason,
        removed: ctx.seen.removed(),
        upstream_status: ctx.upstream_status,
        status: status.map(|s| s.as_u16()),
        aborted: status.is_none(),
        duration_ms: elapsed.as_secs_f64() * 1000.0,
        upstream_ms: ctx.upstream_time.map(|t| t.as_secs_f64() * 1000.0),
    });
}

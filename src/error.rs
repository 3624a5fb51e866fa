//! The request-path error type and its one renderer.
//!
//! Every refusal or failure a client can see is a [`GatewayError`]. Each variant knows its
//! HTTP status, its FHIR `OperationOutcome` issue code and a short, stable `reason` used as
//! a metric label and in the access log. The `match`es below have no catch-all arm, so a
//! new variant forces a decision about how it is rendered.
//!
//! Nothing internal (upstream addresses, error chains, stack traces) is rendered: the
//! client gets the variant's fixed text; operators get the detail in the log.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{BoxBody, full};

/// Media type of every body the gateway writes itself.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// A policy refusal, as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Stable reason code (metric label).
    pub code: &'static str,
    /// What permission was missing, for the OperationOutcome.
    pub message: String,
    /// The narrowest scope that would allow the request (may be empty).
    pub needed: String,
}

/// Why a request did not get an upstream answer.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GatewayError {
    // --- client ---
    /// The path is not under `server.public_base_url` (or is not a gateway endpoint).
    #[error("no such endpoint")]
    NotFound,
    /// The request is malformed in a way the gateway refuses to guess about.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request body is larger than `server.max_request_body`.
    #[error("request body exceeds the configured limit")]
    PayloadTooLarge,
    /// The method is not defined for this FHIR path.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A body the gateway must check is in a format it cannot read.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(&'static str),
    /// The client's precondition does not hold for the version the gateway checked.
    #[error("precondition failed: {0}")]
    PreconditionFailed(&'static str),
    /// The client asks for a response format the gateway cannot check.
    #[error("not acceptable: {0}")]
    NotAcceptable(&'static str),

    // --- policy ---
    /// The token does not allow the request (RFC 6750 §3.1 `insufficient_scope`).
    #[error("forbidden: {0:?}")]
    Forbidden(Box<Denial>),

    // --- token ---
    /// No bearer token (RFC 6750 §3.1: a challenge without an error code).
    #[error("no bearer token")]
    MissingToken,
    /// The token is refused (RFC 6750 §3.1 `invalid_token`), with a coarse description.
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    /// The request carries its token wrongly (RFC 6750 §3.1 `invalid_request`).
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// The token could not be judged: the authorization server or its keys are out of
    /// reach. 503, not 401: the client must not throw a good token away.
    #[error("token verification unavailable")]
    AuthUnavailable,

    // --- upstream ---
    /// The upstream refused the connection or broke the exchange.
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    /// The upstream did not connect or answer within the configured time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The upstream answered with something the gateway cannot pass on safely.
    #[error("upstream response unusable: {0}")]
    UpstreamInvalid(&'static str),
    /// The gateway is not ready to serve (for example: not started up fully).
    #[error("service unavailable")]
    Unavailable,

    // --- internal ---
    /// A bug or resource failure inside the gateway.
    #[error("internal error")]
    Internal,
}

impl GatewayError {
    /// HTTP status sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            GatewayError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::MissingToken | GatewayError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            GatewayError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::UpstreamInvalid(_) => StatusCode::BAD_GATEWAY,
            GatewayError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable, low-cardinality reason code for metrics and the access log.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::NotFound => "not_found",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::PayloadTooLarge => "payload_too_large",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::UnsupportedMediaType(_) => "unsupported_media_type",
            GatewayError::PreconditionFailed(_) => "precondition_failed",
            GatewayError::NotAcceptable(_) => "not_acceptable",
            GatewayError::Forbidden(d) => d.code,
            GatewayError::MissingToken => "missing_token",
            GatewayError::InvalidToken(_) => "invalid_token",
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::AuthUnavailable => "auth_unavailable",
            GatewayError::UpstreamUnreachable => "upstream_unreachable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::UpstreamInvalid(_) => "upstream_invalid",
            GatewayError::Unavailable => "unavailable",
            GatewayError::Internal => "internal",
        }
    }

    /// FHIR R4 `IssueType` code (http://hl7.org/fhir/R4/valueset-issue-type.html).
    fn issue_code(&self) -> &'static str {
        match self {
            GatewayError::NotFound => "not-found",
            GatewayError::BadRequest(_) => "invalid",
            GatewayError::PayloadTooLarge => "too-costly",
            GatewayError::MethodNotAllowed => "not-supported",
            GatewayError::UnsupportedMediaType(_) => "not-supported",
            GatewayError::PreconditionFailed(_) => "conflict",
            GatewayError::NotAcceptable(_) => "not-supported",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::MissingToken => "login",
            GatewayError::InvalidToken(_) => "login",
            GatewayError::InvalidRequest(_) => "invalid",
            GatewayError::AuthUnavailable => "transient",
            GatewayError::UpstreamUnreachable => "transient",
            GatewayError::UpstreamTimeout => "timeout",
            GatewayError::UpstreamInvalid(_) => "exception",
            GatewayError::Unavailable => "transient",
            GatewayError::Internal => "exception",
        }
    }

    /// Human-readable text for the client. Fixed strings only: never upstream detail.
    fn diagnostics(&self) -> String {
        match self {
            GatewayError::NotFound => "No FHIR endpoint at this address.".to_owned(),
            GatewayError::BadRequest(why) => format!("Bad request: {why}."),
            GatewayError::PayloadTooLarge => "Request body exceeds the size limit.".to_owned(),
            GatewayError::MethodNotAllowed => {
                "This method is not defined for this FHIR path.".to_owned()
            }
            GatewayError::UnsupportedMediaType(why) => format!("Unsupported media type: {why}."),
            GatewayError::PreconditionFailed(why) => format!("Precondition failed: {why}."),
            GatewayError::NotAcceptable(why) => format!("Not acceptable: {why}."),
            GatewayError::Forbidden(d) => format!("Access denied: {}.", d.message),
            GatewayError::MissingToken => "A bearer token is required.".to_owned(),
            GatewayError::InvalidToken(why) => format!("The bearer token is not valid ({why})."),
            GatewayError::InvalidRequest(why) => format!("Invalid request: {why}."),
            GatewayError::AuthUnavailable => {
                "The token could not be verified now; retry later.".to_owned()
            }
            GatewayError::UpstreamUnreachable => "The FHIR server could not be reached.".to_owned(),
            GatewayError::UpstreamTimeout => "The FHIR server did not answer in time.".to_owned(),
            GatewayError::UpstreamInvalid(why) => {
                format!("The FHIR server's response could not be passed on: {why}.")
            }
            GatewayError::Unavailable => "The gateway is not ready; retry later.".to_owned(),
            GatewayError::Internal => "Internal gateway error.".to_owned(),
        }
    }

    /// Renders this error as a FHIR `OperationOutcome` response; `realm` goes into
    /// `WWW-Authenticate` challenges.
    pub fn into_response(self, realm: &str) -> Response<BoxBody> {
        let status = self.status();
        let mut resp = operation_outcome(status, self.issue_code(), &self.diagnostics());
        let challenge = match &self {
            GatewayError::MissingToken => Some(format!("Bearer realm=\"{realm}\"")),
            GatewayError::InvalidToken(why) => Some(format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{why}\""
            )),
            GatewayError::InvalidRequest(why) => Some(format!(
                "Bearer realm=\"{realm}\", error=\"invalid_request\", error_description=\"{why}\""
            )),
            GatewayError::Forbidden(d) if !d.needed.is_empty() => Some(format!(
                "Bearer realm=\"{realm}\", error=\"insufficient_scope\", scope=\"{}\"",
                d.needed
            )),
            GatewayError::Forbidden(_) => Some(format!(
                "Bearer realm=\"{realm}\", error=\"insufficient_scope\""
            )),
            _ => None,
        };
        if let Some(v) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
        if matches!(
            self,
            GatewayError::Unavailable | GatewayError::AuthUnavailable
        ) {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

/// A FHIR `OperationOutcome` with one error issue.
pub fn operation_outcome(status: StatusCode, code: &str, diagnostics: &str) -> Response<BoxBody> {
    let body = serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": "error", "code": code, "diagnostics": diagnostics }]
    });
    let bytes = Bytes::from(body.to_string());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Every error renders as an OperationOutcome with no internal detail.
    #[tokio::test]
    async fn renders_operation_outcome() {
        let resp = GatewayError::UpstreamTimeout.into_response("r");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(resp.headers()[CONTENT_TYPE], FHIR_JSON);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["code"], "timeout");
    }

    /// 503 tells clients when to come back.
    #[test]
    fn unavailable_has_retry_after() {
        let resp = GatewayError::Unavailable.into_response("r");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key(http::header::RETRY_AFTER));
        let resp = GatewayError::AuthUnavailable.into_response("r");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key(http::header::RETRY_AFTER));
        assert!(!resp.headers().contains_key(http::header::WWW_AUTHENTICATE));
    }

    /// RFC 6750 §3: challenges with the realm, and error codes only when a token was sent.
    #[test]
    fn bearer_challenges() {
        let www = |e: GatewayError| {
            let r = e.into_response("fhir");
            (
                r.status(),
                r.headers()[http::header::WWW_AUTHENTICATE]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            )
        };
        assert_eq!(
            www(GatewayError::MissingToken),
            (StatusCode::UNAUTHORIZED, "Bearer realm=\"fhir\"".to_owned())
        );
        assert_eq!(
            www(GatewayError::InvalidToken("expired")),
            (
                StatusCode::UNAUTHORIZED,
                "Bearer realm=\"fhir\", error=\"invalid_token\", error_description=\"expired\""
                    .to_owned()
            )
        );
        assert_eq!(
            www(GatewayError::InvalidRequest("x")).0,
            StatusCode::BAD_REQUEST
        );
    }
}

//! The embedded SMART Backend Services authorization server (SMART App Launch 2.2
//! backend-services, client-confidential-asymmetric/-symmetric, token-introspection):
//! `POST {base}/auth/token`, `POST {base}/auth/introspect`, `GET {base}/auth/jwks`.
//! Its tokens are validated in-process by the authenticate stage.

pub mod clients;
pub mod grant;
pub mod launch;
pub mod replay;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};

use crate::audit::AuthzNote;
use crate::auth::issuer::Issuer;
use crate::body::{BoxBody, full};
use crate::config::Config;
use crate::error::GatewayError;
use crate::outbound::Outbound;
use clients::{Clients, JWT_BEARER};

/// Largest form body the token and introspection endpoints read.
const MAX_FORM: usize = 64 * 1024;

/// An OAuth 2 error response (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// Answer 401 with a Basic challenge (the client tried HTTP Basic).
    basic: bool,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            status,
            error,
            description: description.into(),
            basic: false,
        }
    }
    /// `invalid_request` (400).
    pub fn invalid_request(d: impl Into<String>) -> OAuthError {
        OAuthError::new(StatusCode::BAD_REQUEST, "invalid_request", d)
    }
    /// `invalid_client` (401).
    pub fn invalid_client(d: impl Into<String>) -> OAuthError {
        OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_client", d)
    }
    /// `invalid_client` (401) with `WWW-Authenticate: Basic`.
    pub fn invalid_client_basic(d: impl Into<String>) -> OAuthError {
        OAuthError {
            basic: true,
            ..OAuthError::invalid_client(d)
        }
    }
    /// 503: something the server needs is out of reach.
    pub fn temporarily_unavailable(d: impl Into<String>) -> OAuthError {
        OAuthError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            d,
        )
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        self.error
    }

    fn into_response(self) -> Response<BoxBody> {
        let mut resp = json_response(
            self.status,
            &json!({"error": self.error, "error_description": self.description}),
        );
        if self.basic {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"smartgate\", charset=\"UTF-8\""),
            );
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// The embedded authorization server of one configuration snapshot.
pub struct AuthServer {
    /// Signs and verifies the gateway's tokens.
    pub issuer: Arc<Issuer>,
    clients: Clients,
    introspection_scope: Option<String>,
    leeway: u64,
    issued: prometheus::IntCounterVec,
    /// SMART App Launch, when `[authorization_server.login]` is set.
    launch: Option<launch::Launch>,
}

impl AuthServer {
    /// Builds the server for `config`, or `None` when it is off.
    pub fn new(
        config: &Config,
        outbound: &Outbound,
        metrics: &crate::metrics::Metrics,
        replay: Arc<replay::ReplayGuard>,
        store: Arc<crate::store::Store>,
    ) -> Result<Option<AuthServer>, String> {
        let a = &config.authorization_server;
        if !a.enabled {
            return Ok(None);
        }
        let base = config.server.public_base_url.as_string();
        let base = base.trim_end_matches('/');
        let issuer = Issuer::from_config(config)?.ok_or("authorization_server: not enabled")?;
        let clients = Clients::new(
            a,
            &format!("{base}/auth/token"),
            outbound,
            &metrics.jwks_fetches,
            replay,
            &store,
        )?;
        let launch = launch::Launch::new(config, outbound, store, &metrics.jwks_fetches)?;
        Ok(Some(AuthServer {
            issuer: Arc::new(issuer),
            clients,
            introspection_scope: a.introspection_scope.clone(),
            leeway: config.auth.leeway.0.as_secs(),
            issued: metrics.tokens_issued.clone(),
            launch,
        }))
    }

    /// The OpenID Connect provider configuration (`/.well-known/openid-configuration`),
    /// when users sign in through this server (SMART `sso-openid-connect`).
    pub fn openid_configuration(&self, smart: &crate::config::SmartConfig) -> Option<Value> {
        self.launch.as_ref()?;
        let base = self.issuer.issuer();
        Some(json!({
            "issuer": base,
            "authorization_endpoint": format!("{base}/auth/authorize"),
            "token_endpoint": format!("{base}/auth/token"),
            "jwks_uri": format!("{base}/auth/jwks"),
            "revocation_endpoint": format!("{base}/auth/revoke"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": smart.grant_types_supported,
            "scopes_supported": smart.scopes_supported,
            "token_endpoint_auth_methods_supported": smart.token_endpoint_auth_methods_supported,
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "fhirUser"],
        }))
    }

    /// Rate-limit buckets kept (`Clients::rate_buckets`).
    pub fn rate_buckets(&self) -> usize {
        self.clients.rate_buckets()
    }

    /// Serves `/auth/…` (`rel` is the path under the public base).
    /// What it did goes into `note`, for the audit line.
    pub async fn handle(
        &self,
        auth: Option<&crate::auth::Authenticator>,
        req: Request<hyper::body::Incoming>,
        rel: &str,
        note: &mut AuthzNote,
    ) -> Result<Response<BoxBody>, GatewayError> {
        let (path, query) = rel.split_once('?').unwrap_or((rel, ""));
        if let Some(launch) = &self.launch {
            let cookie = signin_cookie(req.headers());
            if path == "/auth/consent" && req.method() == Method::POST {
                let form = read_form(req).await.map(|(_, f)| f).unwrap_or_default();
                return Ok(launch.consent(cookie.as_deref(), &form).await);
            }
            let method = req.method().clone();
            if let Some(resp) = self.launch_page(launch, path, query, &method, cookie).await {
                return Ok(resp);
            }
        }
        let result = match (path, req.method()) {
            ("/auth/jwks", &Method::GET | &Method::HEAD) => {
                let mut keys = self.issuer.jwks();
                if let (Some(launch), Some(list)) = (&self.launch, keys["keys"].as_array_mut()) {
                    list.push(launch.jwk().clone());
                }
                let mut resp = json_response(StatusCode::OK, &keys);
                resp.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=300"),
                );
                return Ok(resp);
            }
            ("/auth/token", &Method::POST) => {
                note.endpoint = "token";
                self.token(req, note).await
            }
            ("/auth/introspect", &Method::POST) => {
                note.endpoint = "introspect";
                self.introspect(auth, req, note).await
            }
            ("/auth/revoke", &Method::POST) if self.launch.is_some() => {
                note.endpoint = "revoke";
                self.revoke(req, note).await
            }
            ("/auth/launch", &Method::POST) if self.launch.is_some() => {
                note.endpoint = "launch";
                self.mint_launch(req, note).await
            }
            (
                "/auth/token" | "/auth/introspect" | "/auth/jwks" | "/auth/revoke" | "/auth/launch",
                _,
            ) => {
                return Err(GatewayError::MethodNotAllowed);
            }
            _ => return Err(GatewayError::NotFound),
        };
        let resp = match result {
            Ok(resp) => {
                self.issued.with_label_values(&["issued"]).inc();
                resp
            }
            Err(e) => {
                note.result = e.code();
                self.issued.with_label_values(&[e.code()]).inc();
                tracing::info!(error = e.error, description = %e.description, "token endpoint refused");
                e.into_response()
            }
        };
        Ok(no_store(resp))
    }

    /// `POST /auth/token`: `client_credentials` with a client assertion or HTTP Basic.
    async fn token(
        &self,
        req: Request<hyper::body::Incoming>,
        note: &mut AuthzNote,
    ) -> Result<Response<BoxBody>, OAuthError> {
        let (basic, form) = read_form(req).await?;
        match (one(&form, "grant_type")?, &self.launch) {
            (None, _) => return Err(OAuthError::invalid_request("grant_type is required")),
            (Some("client_credentials"), _) => {}
            (Some(grant @ ("authorization_code" | "refresh_token")), Some(launch)) => {
                let client = self.app_client(basic.as_deref(), &form).await?;
                note.client_id = Some(client.id.clone());
                let answer = if grant == "authorization_code" {
                    launch.redeem_code(&self.issuer, client, &form).await?
                } else {
                    launch.refresh(&self.issuer, client, &form).await?
                };
                note.scope = answer["scope"].as_str().map(str::to_owned);
                note.result = "issued";
                return Ok(json_response(StatusCode::OK, &answer));
            }
            (Some(_), _) => {
                return Err(OAuthError::new(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    "only client_credentials, authorization_code and refresh_token are supported",
                ));
            }
        }
        let client = self.authenticate_client(basic.as_deref(), &form).await?;
        note.client_id = Some(client.id.clone());
        if let Some(id) = one(&form, "client_id")?
            && id != client.id
        {
            return Err(OAuthError::invalid_request(
                "client_id does not match the authenticated client",
            ));
        }
        let requested = one(&form, "scope")?.unwrap_or("");
        if requested.trim().is_empty() {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "scope is required",
            ));
        }
        let granted = grant::grant(requested, &client.scope);
        if granted.is_empty() {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "none of the requested scopes is registered for this client",
            ));
        }
        let issued = self
            .issuer
            .issue(&client.id, &granted)
            .map_err(OAuthError::temporarily_unavailable)?;
        note.scope = Some(granted.clone());
        note.result = "issued";
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "access_token": issued.token, "token_type": "bearer",
                "expires_in": issued.expires_in, "scope": granted,
            }),
        ))
    }

    /// The client a token or introspection request authenticates as: a JWT-bearer
    /// assertion, or HTTP Basic — exactly one. Rate-limited per client before any
    /// cryptography.
    async fn authenticate_client(
        &self,
        basic: Option<&str>,
        form: &[(String, String)],
    ) -> Result<&clients::Client, OAuthError> {
        let assertion_type = one(form, "client_assertion_type")?;
        let assertion = one(form, "client_assertion")?;
        match (basic, assertion_type, assertion) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(OAuthError::invalid_request(
                "use one client authentication method",
            )),
            (None, None, None) => Err(OAuthError::invalid_client(
                "client authentication is required",
            )),
            (None, Some(t), _) if t != JWT_BEARER => Err(OAuthError::invalid_client(
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            )),
            (None, _, None) | (None, None, Some(_)) => Err(OAuthError::invalid_client(
                "client_assertion and client_assertion_type go together",
            )),
            (None, Some(_), Some(a)) => {
                let id = Clients::claimed_id(a)?;
                let client = self
                    .clients
                    .get(&id)
                    .ok_or_else(|| OAuthError::invalid_client("unknown client"))?;
                self.limit(&client.id).await?;
                self.clients.verify_assertion(client, a).await?;
                Ok(client)
            }
            (Some(h), None, None) => {
                let (id, secret) = Clients::basic_credentials(h).ok_or_else(|| {
                    OAuthError::invalid_client_basic("client authentication failed")
                })?;
                self.limit(&id).await?;
                self.clients.authenticate_secret(&id, &secret)
            }
        }
    }

    /// The app a code or refresh request comes from: a confidential client authenticates
    /// as at any token request; a public one names itself (`client_id`) and has nothing
    /// to prove, its code being bound by PKCE.
    async fn app_client(
        &self,
        basic: Option<&str>,
        form: &[(String, String)],
    ) -> Result<&clients::Client, OAuthError> {
        let named = one(form, "client_id")?;
        let authenticates = basic.is_some() || one(form, "client_assertion")?.is_some();
        if !authenticates
            && let Some(client) = named.and_then(|id| self.clients.get(id))
            && client.is_public()
        {
            self.limit(&client.id).await?;
            return Ok(client);
        }
        let client = self.authenticate_client(basic, form).await?;
        if named.is_some_and(|id| id != client.id) {
            return Err(OAuthError::invalid_request(
                "client_id does not match the authenticated client",
            ));
        }
        Ok(client)
    }

    /// `POST /auth/launch`: a registered EHR (`ehr = true`, authenticated) mints a launch
    /// context.
    async fn mint_launch(
        &self,
        req: Request<hyper::body::Incoming>,
        note: &mut AuthzNote,
    ) -> Result<Response<BoxBody>, OAuthError> {
        let (launch, client, form) = self.launch_form(req, note, false).await?;
        if !client.ehr {
            return Err(OAuthError::new(
                StatusCode::FORBIDDEN,
                "unauthorized_client",
                "this client is not registered as an EHR (ehr = true)",
            ));
        }
        let answer = launch.mint_launch(client, &form).await?;
        note.result = "issued";
        Ok(json_response(StatusCode::OK, &answer))
    }

    /// `POST /auth/revoke` (RFC 7009).
    async fn revoke(
        &self,
        req: Request<hyper::body::Incoming>,
        note: &mut AuthzNote,
    ) -> Result<Response<BoxBody>, OAuthError> {
        let (launch, client, form) = self.launch_form(req, note, true).await?;
        launch.revoke(client, &form).await?;
        note.result = "revoked";
        let mut resp = Response::new(crate::body::empty());
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    }

    /// What an App Launch form post brings: its form, and its client, authenticated (an
    /// app may be public when `app`), noted for the audit line.
    async fn launch_form(
        &self,
        req: Request<hyper::body::Incoming>,
        note: &mut AuthzNote,
        app: bool,
    ) -> Result<(&launch::Launch, &clients::Client, Vec<(String, String)>), OAuthError> {
        let launch = self
            .launch
            .as_ref()
            .ok_or_else(|| OAuthError::invalid_request("not offered"))?;
        let (basic, form) = read_form(req).await?;
        let client = if app {
            self.app_client(basic.as_deref(), &form).await?
        } else {
            self.authenticate_client(basic.as_deref(), &form).await?
        };
        note.client_id = Some(client.id.clone());
        Ok((launch, client, form))
    }

    /// The sign-in pages and redirects of SMART App Launch; `None` for any other path.
    async fn launch_page(
        &self,
        launch: &launch::Launch,
        path: &str,
        query: &str,
        method: &Method,
        cookie: Option<String>,
    ) -> Option<Response<BoxBody>> {
        match (path, method) {
            ("/auth/authorize", &Method::GET) => Some(launch.authorize(&self.clients, query).await),
            ("/auth/callback", &Method::GET) => {
                Some(launch.callback(cookie.as_deref(), query).await)
            }
            ("/auth/consent", &Method::GET) => {
                Some(launch.search_patients(cookie.as_deref(), query).await)
            }
            ("/auth/style.css", &Method::GET) => Some(launch::Launch::stylesheet()),
            ("/auth/smart-style.json", &Method::GET) => Some(launch::Launch::smart_style()),
            _ => None,
        }
    }

    async fn limit(&self, id: &str) -> Result<(), OAuthError> {
        match self.clients.admit(id).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(OAuthError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "slow_down",
                "too many token requests for this client",
            )),
            Err(e) => {
                tracing::warn!(error = %e, "state store unavailable for rate limits");
                Err(OAuthError::temporarily_unavailable(
                    "rate limits cannot be checked now",
                ))
            }
        }
    }

    /// `POST /auth/introspect` (RFC 7662 with the SMART fields). The caller is a
    /// registered client, or brings a bearer token with the configured introspection
    /// scope. RFC 7662 §4 leaves to the server who may learn what about a token: a client
    /// registered with the introspection scope, or a bearer token carrying it, learns
    /// about any token; any other client only about tokens issued to itself (others
    /// are `active: false` to it, as an unknown token is). Bearer tokens that fail are
    /// counted against the bucket of unregistered callers, and once it is empty no bearer
    /// token is verified until it refills: a garbage burst costs no signature checks.
    async fn introspect(
        &self,
        auth: Option<&crate::auth::Authenticator>,
        req: Request<hyper::body::Incoming>,
        note: &mut AuthzNote,
    ) -> Result<Response<BoxBody>, OAuthError> {
        let authz = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (basic, form) = read_form(req).await?;
        let bearer = authz.as_deref().and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        });
        let sees_all = match (bearer, &self.introspection_scope) {
            (Some(token), Some(scope)) => {
                if !self.clients.unregistered_budget_left() {
                    return Err(OAuthError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "slow_down",
                        "too many failed introspection requests",
                    ));
                }
                let ok = match auth {
                    Some(a) => a
                        .authenticate(token.trim())
                        .await
                        .is_ok_and(|p| crate::smart::scope::split(p.scope()).any(|s| s == scope)),
                    None => self
                        .issuer
                        .verify(token.trim(), self.leeway)
                        .is_ok_and(|c| {
                            c.get("scope")
                                .and_then(Value::as_str)
                                .is_some_and(|s| crate::smart::scope::split(s).any(|x| x == scope))
                        }),
                };
                if !ok {
                    // Charged to the shared bucket of unregistered callers.
                    self.clients.allow("");
                    return Err(OAuthError::invalid_client(
                        "the bearer token may not introspect",
                    ));
                }
                None
            }
            (Some(_), None) => {
                return Err(OAuthError::invalid_client(
                    "introspection by bearer token is not configured",
                ));
            }
            (None, _) => {
                let client = self.authenticate_client(basic.as_deref(), &form).await?;
                note.client_id = Some(client.id.clone());
                let permitted = self
                    .introspection_scope
                    .as_deref()
                    .is_some_and(|s| crate::smart::scope::split(&client.scope).any(|x| x == s));
                (!permitted).then(|| client.id.clone())
            }
        };
        let token =
            one(&form, "token")?.ok_or_else(|| OAuthError::invalid_request("token is required"))?;
        // `sees_all`: `None` for a caller that may introspect any token, else the one
        // client whose tokens it may.
        let body = match self.issuer.verify(token, self.leeway) {
            Ok(c)
                if sees_all
                    .as_deref()
                    .is_none_or(|own| c.get("client_id").and_then(Value::as_str) == Some(own)) =>
            {
                let mut out = json!({"active": true, "token_type": "Bearer"});
                for k in [
                    "scope",
                    "client_id",
                    "exp",
                    "iat",
                    "sub",
                    "iss",
                    "aud",
                    "jti",
                ] {
                    if let Some(v) = c.get(k) {
                        out[k] = v.clone();
                    }
                }
                out
            }
            _ => json!({"active": false}),
        };
        note.result = if body["active"] == true {
            "active"
        } else {
            "inactive"
        };
        Ok(json_response(StatusCode::OK, &body))
    }
}

/// The sign-in cookie, if the browser sent one.
fn signin_cookie(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix("smartgate_signin="))
        .map(str::to_owned)
}

/// The Basic `Authorization` header (if any) and the form parameters of a request.
async fn read_form(
    req: Request<hyper::body::Incoming>,
) -> Result<(Option<String>, Vec<(String, String)>), OAuthError> {
    let form_type =
        crate::proxy::headers::media_type_is(req.headers(), "application/x-www-form-urlencoded");
    if !form_type {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    if req.uri().query().is_some_and(|q| !q.is_empty()) {
        return Err(OAuthError::invalid_request(
            "parameters go in the body, not the query",
        ));
    }
    let basic = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() > 6 && v[..6].eq_ignore_ascii_case("basic "))
        .map(str::to_owned);
    let bytes: Bytes = Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
        .map_err(|_| OAuthError::invalid_request("the body is too large or incomplete"))?
        .to_bytes();
    let form = form_urlencoded::parse(&bytes)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    Ok((basic, form))
}

/// A parameter that may appear at most once (RFC 6749 §3.1).
fn one<'a>(form: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, OAuthError> {
    let mut values = form.iter().filter(|(k, _)| k == name);
    let first = values.next().map(|(_, v)| v.as_str());
    if values.next().is_some() {
        return Err(OAuthError::invalid_request(format!("{name} is repeated")));
    }
    Ok(first)
}

fn json_response(status: StatusCode, body: &Value) -> Response<BoxBody> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// RFC 6749 §5.1: token responses are never cached.
fn no_store(mut resp: Response<BoxBody>) -> Response<BoxBody> {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

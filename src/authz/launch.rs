//! SMART App Launch in the embedded authorization server (standalone launch): the app
//! sends the user to `/auth/authorize`; the user signs in at the configured OpenID
//! Connect provider (authorization code + PKCE from the gateway to the provider, the
//! id_token verified against its JWKS); a consent page lets the user uncheck scopes; the
//! app gets a single-use code bound to its client, redirect URI and PKCE challenge, and
//! trades it at `/auth/token` for an access token (with the patient in context), an
//! RS256 id_token when it asked for `openid`, and a refresh token that rotates on every
//! use (reusing a rotated one revokes its family). `/auth/revoke` is RFC 7009.
//!
//! Every step's state lives in the [`Store`]: one replica may start a sign-in another
//! finishes, and single use (codes, refresh tokens) holds across replicas.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::OAuthError;
use super::clients::{Client, Clients};
use crate::auth::issuer::Issuer;
use crate::body::{BoxBody, full};
use crate::config::{Config, LoginConfig};
use crate::outbound::Outbound;
use crate::smart::scope::{Level, Scope, parse, split};
use crate::store::{Store, StoreError};

/// How long a sign-in may take, from `/authorize` to the consent.
const SIGN_IN_TIME: Duration = Duration::from_secs(600);
/// How long an EHR launch context may wait for the app.
const LAUNCH_LIFE: Duration = Duration::from_secs(300);
/// How long an authorization code lives (SMART: short).
const CODE_LIFE: Duration = Duration::from_secs(60);
/// The cookie binding a sign-in to the browser that started it.
const COOKIE: &str = "smartgate_signin";
/// The longest name the picker's search box sends to the FHIR server (characters).
const MAX_NAME_SEARCH: usize = 100;

/// Scopes an app may ask for besides resource scopes (SMART App Launch 2.2 scopes).
const CONTEXT_SCOPES: &[&str] = &[
    "launch",
    "launch/patient",
    "openid",
    "fhirUser",
    "profile",
    "offline_access",
    "online_access",
];

/// The pages, from auto-escaping templates.
struct Pages(minijinja::Environment<'static>);

impl Pages {
    fn new() -> Pages {
        let mut env = minijinja::Environment::new();
        for (name, text) in [
            ("layout.html", include_str!("pages/layout.html")),
            ("consent.html", include_str!("pages/consent.html")),
            ("error.html", include_str!("pages/error.html")),
        ] {
            env.add_template(name, text)
                .expect("the page templates parse (a test renders each)");
        }
        Pages(env)
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Result<String, String> {
        self.0
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|e| e.to_string())
    }
}

/// The RS256 key id_tokens are signed with (OpenID Connect requires RS256 support).
struct IdTokenKey {
    encoding: jsonwebtoken::EncodingKey,
    jwk: Value,
    kid: String,
}

impl IdTokenKey {
    fn new(config: &crate::config::AuthorizationServerConfig) -> Result<IdTokenKey, String> {
        let encoding = match &config.id_token_key {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("authorization_server.id_token_key: {}: {e}", path.display())
                })?;
                jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| {
                    format!("authorization_server.id_token_key: {}: {e}", path.display())
                })?
            }
            None => jsonwebtoken::EncodingKey::from_rsa_der(&ephemeral_rsa_der()?),
        };
        let jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, jsonwebtoken::Algorithm::RS256)
                .map_err(|e| format!("authorization_server.id_token_key: {e}"))?;
        let mut jwk = serde_json::to_value(jwk).map_err(|e| e.to_string())?;
        // RFC 7638 thumbprint as the key id: stable for the key, whatever replica.
        let canonical = format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            jwk["e"].as_str().unwrap_or_default(),
            jwk["n"].as_str().unwrap_or_default()
        );
        let kid = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            canonical.as_bytes(),
        ));
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        jwk["alg"] = json!("RS256");
        Ok(IdTokenKey { encoding, jwk, kid })
    }
}

/// The process's RS256 key when `id_token_key` is unset: made once, kept across reloads.
fn ephemeral_rsa_der() -> Result<Vec<u8>, String> {
    static KEY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    if let Some(k) = KEY.get() {
        return Ok(k.clone());
    }
    use rsa::Generate as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    let key = rsa::PrivateKey::generate();
    let der = key.to_pkcs1_der().map_err(|e| e.to_string())?;
    tracing::warn!(
        "authorization_server.id_token_key is not set: id_tokens are signed with a key made now"
    );
    Ok(KEY.get_or_init(|| der.as_bytes().to_vec()).clone())
}

/// The sign-in provider's endpoints, read from its discovery document once.
#[derive(Clone, Deserialize)]
struct Provider {
    authorization_endpoint: String,
    token_endpoint: String,
}

/// An app's sign-in in progress, from `/authorize` to the consent.
#[derive(Serialize, Deserialize)]
struct SignIn {
    client_id: String,
    redirect_uri: String,
    state: String,
    code_challenge: String,
    /// What the app asked for, within its registration.
    scope: String,
    nonce: Option<String>,
    /// The gateway's own PKCE verifier and nonce at the provider.
    idp_verifier: String,
    idp_nonce: String,
    csrf: String,
    user: Option<User>,
    /// The EHR's launch context, for an EHR launch.
    launch: Option<LaunchContext>,
    /// The patients a practitioner was offered to choose from (the picker).
    #[serde(default)]
    choices: Vec<String>,
}

/// What an EHR said the app is launched for (`POST /auth/launch`).
#[derive(Clone, Serialize, Deserialize)]
struct LaunchContext {
    /// The EHR client that minted it.
    ehr: String,
    patient: Option<String>,
    encounter: Option<String>,
}

/// Who signed in.
#[derive(Clone, Serialize, Deserialize)]
struct User {
    sub: String,
    fhir_user: Option<String>,
}

/// A checked authorization request: state, PKCE challenge, scopes, nonce, launch id.
type Checked = (String, String, String, Option<String>, Option<String>);

/// What a code (and then a refresh token) stands for.
#[derive(Serialize, Deserialize)]
struct Granted {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    scope: String,
    patient: Option<String>,
    encounter: Option<String>,
    user: User,
    nonce: Option<String>,
    /// The refresh token family, once there is one.
    family: Option<String>,
}

/// SMART App Launch for apps registered with redirect URIs.
pub struct Launch {
    base: String,
    base_path: String,
    realm: String,
    login: LoginConfig,
    provider: tokio::sync::OnceCell<Provider>,
    id_verifier: crate::auth::jwt::JwtVerifier,
    outbound: Outbound,
    store: Arc<Store>,
    pages: Pages,
    id_key: IdTokenKey,
    refresh_life: Duration,
    /// `smart_style_url` of the token answers.
    style_url: String,
    secure_cookie: bool,
    /// The FHIR server, for the patient picker: its base URL and the gateway's headers.
    upstream: (String, Vec<(String, String)>),
}

impl Launch {
    /// App Launch for `config`, or `None` without `[authorization_server.login]`.
    pub fn new(
        config: &Config,
        outbound: &Outbound,
        store: Arc<Store>,
        fetches: &prometheus::IntCounterVec,
    ) -> Result<Option<Launch>, String> {
        let a = &config.authorization_server;
        let Some(login) = &a.login else {
            return Ok(None);
        };
        let cfg = crate::config::JwtConfig {
            issuer: login.issuer.trim_end_matches('/').to_owned(),
            audience: login.client_id.clone(),
            ..crate::config::JwtConfig::for_client_keys()
        };
        let keys = Arc::new(crate::auth::jwks::KeySource::new(
            &cfg,
            outbound.clone(),
            fetches.clone(),
        )?);
        let base = config.server.public_base_url.as_string();
        let base = base.trim_end_matches('/').to_owned();
        let style_url = a.smart_style_url.as_ref().map_or_else(
            || format!("{base}/auth/smart-style.json"),
            |u| u.as_string(),
        );
        Ok(Some(Launch {
            style_url,
            base_path: config
                .server
                .public_base_url
                .path
                .trim_end_matches('/')
                .to_owned(),
            secure_cookie: base.starts_with("https://"),
            base,
            realm: config.auth.realm.clone(),
            login: login.clone(),
            provider: tokio::sync::OnceCell::new(),
            id_verifier: crate::auth::jwt::JwtVerifier::new(&cfg, config.auth.leeway.0, keys),
            outbound: outbound.clone(),
            store,
            pages: Pages::new(),
            id_key: IdTokenKey::new(a)?,
            refresh_life: a.refresh_token_lifetime.0,
            upstream: (
                config
                    .upstream
                    .url
                    .as_string()
                    .trim_end_matches('/')
                    .to_owned(),
                config
                    .upstream
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
        }))
    }

    /// The id_token key, for `/auth/jwks`.
    pub fn jwk(&self) -> &Value {
        &self.id_key.jwk
    }

    /// `GET /auth/authorize`: checks the app's request and sends the user to sign in.
    /// Until the redirect URI is known good, errors are a page (never a redirect to a URI
    /// nobody registered); after, they go back to the app (RFC 6749 §4.1.2.1).
    pub async fn authorize(&self, clients: &Clients, query: &str) -> Response<BoxBody> {
        let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let one = |name: &str| -> Result<Option<&str>, String> {
            let mut it = params.iter().filter(|(k, _)| k == name);
            let first = it.next().map(|(_, v)| v.as_str());
            if it.next().is_some() {
                return Err(format!("{name} is repeated"));
            }
            Ok(first)
        };
        let client = match one("client_id").map(|id| id.and_then(|id| clients.get(id))) {
            Ok(Some(c)) if !c.redirect_uris.is_empty() => c,
            Ok(_) => {
                return self.error_page(
                    StatusCode::BAD_REQUEST,
                    "The app is not registered for sign-in.",
                );
            }
            Err(e) => return self.error_page(StatusCode::BAD_REQUEST, &e),
        };
        let redirect_uri = match one("redirect_uri") {
            Ok(Some(r)) if client.redirect_uris.iter().any(|u| u == r) => r.to_owned(),
            Ok(None) if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
            _ => {
                return self.error_page(
                    StatusCode::BAD_REQUEST,
                    "The app's redirect address is not one it registered.",
                );
            }
        };
        let state = one("state").ok().flatten().map(str::to_owned);
        let (state, code_challenge, scope, nonce, launch) =
            match self.check_request(client, &params) {
                Ok(v) => v,
                Err((error, description)) => {
                    return redirect_error(&redirect_uri, error, &description, state.as_deref());
                }
            };
        let app_state = state.clone();
        let back = |error: &str, description: &str| {
            redirect_error(&redirect_uri, error, description, Some(&app_state))
        };
        // An EHR launch: the context the EHR minted, used once.
        let launch = match self.take_launch(launch.as_deref()).await {
            Ok(l) => l,
            Err((error, description)) => return back(error, description),
        };
        let txn = random_token();
        let sign_in = SignIn {
            client_id: client.id.clone(),
            redirect_uri: redirect_uri.clone(),
            state,
            code_challenge,
            scope,
            nonce,
            idp_verifier: random_token(),
            idp_nonce: random_token(),
            csrf: random_token(),
            user: None,
            launch,
            choices: Vec::new(),
        };
        let provider = match self.provider().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "sign-in provider unavailable");
                return back(
                    "temporarily_unavailable",
                    "the sign-in provider cannot be reached",
                );
            }
        };
        if let Err(e) = self.save(&txn, &sign_in).await {
            tracing::warn!(error = %e, "cannot keep the sign-in");
            return back("temporarily_unavailable", "sign-in state cannot be kept");
        }
        self.to_provider(provider, &txn, &sign_in)
    }

    /// The browser sent to the provider to sign in (the gateway's own PKCE, state and
    /// nonce), with the cookie binding the sign-in to it.
    fn to_provider(&self, provider: &Provider, txn: &str, sign_in: &SignIn) -> Response<BoxBody> {
        let challenge = pkce_challenge(&sign_in.idp_verifier);
        let scope = self.login.scopes.join(" ");
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.login.client_id)
            .append_pair("redirect_uri", &self.callback_uri())
            .append_pair("scope", &scope)
            .append_pair("state", txn)
            .append_pair("nonce", &sign_in.idp_nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .finish();
        let endpoint = &provider.authorization_endpoint;
        let sep = if endpoint.contains('?') { '&' } else { '?' };
        let mut resp = redirect(&format!("{endpoint}{sep}{query}"));
        if let Ok(v) = HeaderValue::from_str(&self.cookie(txn, SIGN_IN_TIME)) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        resp
    }

    /// The EHR launch context `id` names, taken (it serves one launch); `None` without one.
    async fn take_launch(
        &self,
        id: Option<&str>,
    ) -> Result<Option<LaunchContext>, (&'static str, &'static str)> {
        let Some(id) = id else {
            return Ok(None);
        };
        match self.store.take(&format!("launch:{}", digest(id))).await {
            Ok(Some(text)) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|_| ("invalid_request", "the launch context is unreadable")),
            Ok(None) => Err(("invalid_request", "unknown or expired launch")),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the launch context");
                Err((
                    "temporarily_unavailable",
                    "the launch context cannot be read",
                ))
            }
        }
    }

    /// The app's request, checked after its client and redirect URI: the state, the PKCE
    /// challenge, the scopes granted within the registration, the nonce; or the OAuth
    /// error to send back.
    fn check_request(
        &self,
        client: &Client,
        params: &[(String, String)],
    ) -> Result<Checked, (&'static str, String)> {
        let bad = |m: &str| ("invalid_request", m.to_owned());
        let one = |name: &str| -> Result<Option<&str>, (&'static str, String)> {
            let mut it = params.iter().filter(|(k, _)| k == name);
            let first = it.next().map(|(_, v)| v.as_str());
            if it.next().is_some() {
                return Err(bad(&format!("{name} is repeated")));
            }
            Ok(first)
        };
        if one("response_type")? != Some("code") {
            return Err((
                "unsupported_response_type",
                "response_type must be code".into(),
            ));
        }
        let state = one("state")?.ok_or(bad("state is required"))?;
        let challenge = one("code_challenge")?.ok_or(bad("PKCE is required: code_challenge"))?;
        if one("code_challenge_method")? != Some("S256") {
            return Err(bad("code_challenge_method must be S256"));
        }
        if !(43..=128).contains(&challenge.len())
            || !challenge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("code_challenge is not a base64url SHA-256"));
        }
        let aud = one("aud")?.ok_or(bad("aud is required"))?;
        if aud.trim_end_matches('/') != self.base {
            return Err(bad("aud is not this FHIR server"));
        }
        let launch = one("launch")?.map(str::to_owned);
        let scope = app_grant(one("scope")?.unwrap_or(""), &client.scope);
        if scope.is_empty() {
            return Err((
                "invalid_scope",
                "no requested scope is registered for this app".into(),
            ));
        }
        if launch.is_some() != split(&scope).any(|s| s == "launch") {
            return Err(bad(
                "an EHR launch comes with the launch parameter and the launch scope, together",
            ));
        }
        let nonce = one("nonce")?.map(str::to_owned);
        Ok((state.to_owned(), challenge.to_owned(), scope, nonce, launch))
    }

    /// `GET /auth/callback`: the provider's answer. The user is known; the consent page
    /// follows.
    pub async fn callback(&self, cookie: Option<&str>, query: &str) -> Response<BoxBody> {
        let params: Map<String, Value> = form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), json!(v)))
            .collect();
        let txn = params.get("state").and_then(Value::as_str).unwrap_or("");
        if txn.is_empty() || cookie != Some(txn) {
            return self.error_page(
                StatusCode::BAD_REQUEST,
                "This sign-in was not started in this browser.",
            );
        }
        let Ok(Some(mut sign_in)) = self.load(txn).await else {
            return self.error_page(
                StatusCode::BAD_REQUEST,
                "This sign-in has expired. Start again from the app.",
            );
        };
        if params.contains_key("error") {
            return redirect_error(
                &sign_in.redirect_uri,
                "access_denied",
                "sign-in was not completed",
                Some(&sign_in.state),
            );
        }
        let code = params.get("code").and_then(Value::as_str).unwrap_or("");
        let user = match self.sign_in_user(code, &sign_in).await {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(error = %e, "sign-in refused");
                return self.error_page(
                    StatusCode::BAD_REQUEST,
                    "The sign-in could not be verified.",
                );
            }
        };
        let patient = launch_patient(&sign_in, &user);
        let wants_patient = split(&sign_in.scope).any(|s| s == "launch/patient");
        // A practitioner picks the patient from those the FHIR server lists.
        let mut offered = Vec::new();
        if wants_patient && patient.is_none() && may_pick(&sign_in.scope, &user) {
            offered = self.picker_list(None).await;
        }
        if wants_patient && patient.is_none() && offered.is_empty() {
            return redirect_error(
                &sign_in.redirect_uri,
                "access_denied",
                "no patient context: the signed-in user is not a Patient, and choosing a patient is not offered",
                Some(&sign_in.state),
            );
        }
        sign_in.choices = offered.iter().map(|(id, _)| id.clone()).collect();
        sign_in.user = Some(user);
        if let Err(e) = self.save(txn, &sign_in).await {
            tracing::warn!(error = %e, "cannot keep the sign-in");
            return self.error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in state cannot be kept right now.",
            );
        }
        self.consent_page_with(txn, &sign_in, patient.as_deref(), &offered)
    }

    /// `GET /auth/consent?txn=…&name=…`: the picker's search box. The practitioner's
    /// sign-in (this browser's, signed in, offered the picker) gets the patients whose
    /// name matches; the choices accepted by the consent form become those. No match
    /// keeps the previous list.
    pub async fn search_patients(&self, cookie: Option<&str>, query: &str) -> Response<BoxBody> {
        let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let txn = params.get("txn").map_or("", String::as_str);
        if txn.is_empty() || cookie != Some(txn) {
            return self.error_page(
                StatusCode::BAD_REQUEST,
                "This sign-in was not started in this browser.",
            );
        }
        let mut sign_in = match self.load(txn).await {
            Ok(Some(s)) => s,
            _ => {
                return self.error_page(
                    StatusCode::BAD_REQUEST,
                    "This sign-in has expired. Start again from the app.",
                );
            }
        };
        let picking = sign_in
            .user
            .as_ref()
            .is_some_and(|u| !sign_in.choices.is_empty() && may_pick(&sign_in.scope, u));
        if !picking {
            return self.error_page(StatusCode::FORBIDDEN, "There is no patient to choose here.");
        }
        let name = params.get("name").map_or("", |n| n.trim());
        if name.chars().count() > MAX_NAME_SEARCH {
            return self.error_page(StatusCode::BAD_REQUEST, "That name is too long.");
        }
        let mut notice = None;
        let mut offered = self.picker_list(Some(name).filter(|n| !n.is_empty())).await;
        if offered.is_empty() {
            notice = Some(format!("No patient matches \"{name}\"."));
            offered = self.picker_list(None).await;
        }
        if offered.is_empty() {
            return self.error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The patient list cannot be had right now.",
            );
        }
        sign_in.choices = offered.iter().map(|(id, _)| id.clone()).collect();
        if let Err(e) = self.save(txn, &sign_in).await {
            tracing::warn!(error = %e, "cannot keep the sign-in");
            return self.error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in state cannot be kept right now.",
            );
        }
        self.render_consent(txn, &sign_in, None, &offered, name, notice.as_deref())
    }

    /// `POST /auth/consent`: the user's choice; the app gets a code for what was approved.
    pub async fn consent(
        &self,
        cookie: Option<&str>,
        form: &[(String, String)],
    ) -> Response<BoxBody> {
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let txn = field("txn").unwrap_or("");
        if txn.is_empty() || cookie != Some(txn) {
            return self.error_page(
                StatusCode::BAD_REQUEST,
                "This sign-in was not started in this browser.",
            );
        }
        // Taken, not read: a form submitted twice gets one code.
        let sign_in = match self.store.take(&format!("signin:{txn}")).await {
            Ok(Some(text)) => serde_json::from_str::<SignIn>(&text).ok(),
            _ => None,
        };
        let Some(sign_in) = sign_in else {
            return self.error_page(
                StatusCode::BAD_REQUEST,
                "This sign-in has expired. Start again from the app.",
            );
        };
        let csrf_ok = field("csrf").is_some_and(|c| same(c.as_bytes(), sign_in.csrf.as_bytes()));
        let Some(user) = sign_in.user.clone().filter(|_| csrf_ok) else {
            return self.error_page(
                StatusCode::FORBIDDEN,
                "The form did not come from this sign-in.",
            );
        };
        if field("decision") != Some("approve") {
            return redirect_error(
                &sign_in.redirect_uri,
                "access_denied",
                "the user declined",
                Some(&sign_in.state),
            );
        }
        // What stays checked, and never more than was asked.
        let approved: Vec<&str> = split(&sign_in.scope)
            .filter(|s| form.iter().any(|(k, v)| k == "scope" && v == s))
            .collect();
        let scope = approved.join(" ");
        let Some(patient) = chosen_patient(&sign_in, &user, &approved, field("patient")) else {
            return self.error_page(StatusCode::FORBIDDEN, "Choose one of the patients offered.");
        };
        let ehr = sign_in
            .launch
            .as_ref()
            .filter(|_| approved.contains(&"launch"));
        let granted = Granted {
            client_id: sign_in.client_id.clone(),
            redirect_uri: sign_in.redirect_uri.clone(),
            code_challenge: sign_in.code_challenge.clone(),
            patient,
            encounter: ehr.and_then(|l| l.encounter.clone()),
            scope,
            user,
            nonce: sign_in.nonce.clone(),
            family: None,
        };
        let code = random_token();
        let stored = serde_json::to_string(&granted).unwrap_or_default();
        if let Err(e) = self
            .store
            .put(&format!("code:{}", digest(&code)), &stored, CODE_LIFE)
            .await
        {
            tracing::warn!(error = %e, "cannot keep the code");
            return redirect_error(
                &sign_in.redirect_uri,
                "temporarily_unavailable",
                "the code cannot be kept",
                Some(&sign_in.state),
            );
        }
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("code", &code)
            .append_pair("state", &sign_in.state)
            .append_pair("iss", &self.base)
            .finish();
        let sep = if sign_in.redirect_uri.contains('?') {
            '&'
        } else {
            '?'
        };
        let mut resp = redirect(&format!("{}{sep}{query}", sign_in.redirect_uri));
        if let Ok(v) = HeaderValue::from_str(&self.cookie("", Duration::ZERO)) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        resp
    }

    /// `grant_type=authorization_code`: the code, once, by the client it was issued to,
    /// with its redirect URI and PKCE verifier.
    pub async fn redeem_code(
        &self,
        issuer: &Issuer,
        client: &Client,
        form: &[(String, String)],
    ) -> Result<Value, OAuthError> {
        let field = |name: &str| super::one(form, name);
        let code = field("code")?.ok_or_else(|| OAuthError::invalid_request("code is required"))?;
        let taken = self
            .store
            .take(&format!("code:{}", digest(code)))
            .await
            .map_err(unavailable)?;
        let invalid = || {
            OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the code is unknown, used or expired",
            )
        };
        let granted: Granted = taken
            .and_then(|t| serde_json::from_str(&t).ok())
            .ok_or_else(invalid)?;
        if granted.client_id != client.id {
            return Err(invalid());
        }
        if field("redirect_uri")? != Some(granted.redirect_uri.as_str()) {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "redirect_uri does not match",
            ));
        }
        let verifier = field("code_verifier")?.unwrap_or("");
        let matches = (43..=128).contains(&verifier.len())
            && same(
                pkce_challenge(verifier).as_bytes(),
                granted.code_challenge.as_bytes(),
            );
        if !matches {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "code_verifier does not match the challenge",
            ));
        }
        self.tokens(issuer, granted, None).await
    }

    /// `grant_type=refresh_token`: the token, once; a new one in its place. A token
    /// already used revokes its whole family (someone holds a copy).
    pub async fn refresh(
        &self,
        issuer: &Issuer,
        client: &Client,
        form: &[(String, String)],
    ) -> Result<Value, OAuthError> {
        let token = super::one(form, "refresh_token")?
            .ok_or_else(|| OAuthError::invalid_request("refresh_token is required"))?;
        let invalid = || {
            OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the refresh token is unknown, used, revoked or expired",
            )
        };
        let key = digest(token);
        let taken = self
            .store
            .take(&format!("rt:{key}"))
            .await
            .map_err(unavailable)?;
        let Some(granted) = taken.and_then(|t| serde_json::from_str::<Granted>(&t).ok()) else {
            // Used before? Then a copy is in other hands: end the family.
            if let Ok(Some(family)) = self.store.get(&format!("rtused:{key}")).await {
                let _ = self.store.delete(&format!("family:{family}")).await;
                tracing::warn!(client = %client.id, "a rotated refresh token was used again; its family is revoked");
            }
            return Err(invalid());
        };
        let family = granted.family.clone().unwrap_or_default();
        let alive = self
            .store
            .get(&format!("family:{family}"))
            .await
            .map_err(unavailable)?;
        if granted.client_id != client.id || alive.is_none() {
            return Err(invalid());
        }
        self.store
            .put(&format!("rtused:{key}"), &family, self.refresh_life)
            .await
            .map_err(unavailable)?;
        // A narrower scope may be asked for, never a wider one.
        let scope = match super::one(form, "scope")? {
            Some(asked) => {
                let within: Vec<&str> = split(asked)
                    .filter(|s| split(&granted.scope).any(|g| g == *s))
                    .collect();
                if within.len() != split(asked).count() {
                    return Err(OAuthError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        "a refresh cannot widen the scopes",
                    ));
                }
                within.join(" ")
            }
            None => granted.scope.clone(),
        };
        self.tokens(issuer, Granted { scope, ..granted }, Some(family))
            .await
    }

    /// `POST /auth/revoke` (RFC 7009): a refresh token's family ends. Answered 200 alike
    /// for any token, known or not.
    pub async fn revoke(
        &self,
        client: &Client,
        form: &[(String, String)],
    ) -> Result<(), OAuthError> {
        let token = super::one(form, "token")?
            .ok_or_else(|| OAuthError::invalid_request("token is required"))?;
        let key = digest(token);
        if let Some(granted) = self
            .store
            .get(&format!("rt:{key}"))
            .await
            .map_err(unavailable)?
            .and_then(|t| serde_json::from_str::<Granted>(&t).ok())
            && granted.client_id == client.id
            && let Some(family) = &granted.family
        {
            self.store
                .delete(&format!("family:{family}"))
                .await
                .map_err(unavailable)?;
            self.store
                .delete(&format!("rt:{key}"))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// `POST /auth/launch`: an EHR mints the context an app is launched for (patient,
    /// encounter); the app brings the returned `launch` to `/auth/authorize`, once, within
    /// five minutes.
    pub async fn mint_launch(
        &self,
        ehr: &Client,
        form: &[(String, String)],
    ) -> Result<Value, OAuthError> {
        let id_of = |name: &str| -> Result<Option<String>, OAuthError> {
            match super::one(form, name)? {
                None => Ok(None),
                Some(v) if fhir_id(v) => Ok(Some(v.to_owned())),
                Some(_) => Err(OAuthError::invalid_request(format!(
                    "{name} is not a FHIR id"
                ))),
            }
        };
        let context = LaunchContext {
            ehr: ehr.id.clone(),
            patient: id_of("patient")?,
            encounter: id_of("encounter")?,
        };
        if context.patient.is_none() && context.encounter.is_none() {
            return Err(OAuthError::invalid_request(
                "a launch names a patient, an encounter or both",
            ));
        }
        let launch = random_token();
        let text = serde_json::to_string(&context).unwrap_or_default();
        self.store
            .put(&format!("launch:{}", digest(&launch)), &text, LAUNCH_LIFE)
            .await
            .map_err(unavailable)?;
        Ok(json!({"launch": launch, "expires_in": LAUNCH_LIFE.as_secs()}))
    }

    /// The token answer for what was granted: access token, id_token when `openid` was
    /// granted, refresh token when offline or online access was.
    async fn tokens(
        &self,
        issuer: &Issuer,
        mut granted: Granted,
        family: Option<String>,
    ) -> Result<Value, OAuthError> {
        let scopes: Vec<&str> = split(&granted.scope).collect();
        let has = |s: &str| scopes.contains(&s);
        let mut extra = Map::new();
        if let Some(p) = &granted.patient {
            extra.insert("patient".into(), json!(p));
        }
        if let Some(e) = &granted.encounter {
            extra.insert("encounter".into(), json!(e));
        }
        if let Some(f) = granted
            .user
            .fhir_user
            .as_deref()
            .filter(|_| has("fhirUser"))
        {
            extra.insert("fhirUser".into(), json!(f));
        }
        let issued = issuer
            .issue_for(&granted.client_id, &granted.user.sub, &granted.scope, extra)
            .map_err(OAuthError::temporarily_unavailable)?;
        let mut answer = json!({
            "access_token": issued.token, "token_type": "Bearer",
            "expires_in": issued.expires_in, "scope": granted.scope,
        });
        if let Some(p) = &granted.patient {
            answer["patient"] = json!(p);
            answer["need_patient_banner"] = json!(true);
        }
        if let Some(e) = &granted.encounter {
            answer["encounter"] = json!(e);
        }
        answer["smart_style_url"] = json!(self.style_url);
        if has("openid") {
            answer["id_token"] = json!(self.id_token(&granted)?);
        }
        if has("offline_access") || has("online_access") {
            let family = match family {
                Some(f) => f,
                None => {
                    let f = random_token();
                    self.store
                        .put(&format!("family:{f}"), "1", self.refresh_life)
                        .await
                        .map_err(unavailable)?;
                    f
                }
            };
            granted.family = Some(family);
            let refresh = random_token();
            let stored = serde_json::to_string(&granted).unwrap_or_default();
            self.store
                .put(
                    &format!("rt:{}", digest(&refresh)),
                    &stored,
                    self.refresh_life,
                )
                .await
                .map_err(unavailable)?;
            answer["refresh_token"] = json!(refresh);
        }
        Ok(answer)
    }

    /// An OpenID Connect id_token (RS256), for the app (`aud` = its client id).
    fn id_token(&self, granted: &Granted) -> Result<String, OAuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = json!({
            "iss": self.base, "sub": granted.user.sub, "aud": granted.client_id,
            "iat": now, "exp": now + 300,
        });
        if let Some(f) = &granted.user.fhir_user {
            claims["fhirUser"] = json!(self.absolute(f));
        }
        if let Some(n) = &granted.nonce {
            claims["nonce"] = json!(n);
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.id_key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.id_key.encoding)
            .map_err(|e| OAuthError::temporarily_unavailable(e.to_string()))
    }

    /// `fhirUser` as an absolute URL on this server (OpenID: a resolvable URL).
    fn absolute(&self, reference: &str) -> String {
        if reference.contains("://") {
            reference.to_owned()
        } else {
            format!("{}/{}", self.base, reference.trim_start_matches('/'))
        }
    }

    /// Trades the provider's code for its id_token, and verifies it.
    async fn sign_in_user(&self, code: &str, sign_in: &SignIn) -> Result<User, String> {
        let provider = self.provider().await?;
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", &self.callback_uri())
            .append_pair("code_verifier", &sign_in.idp_verifier)
            .finish();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form_urlencoded::byte_serialize(self.login.client_id.as_bytes()).collect::<String>(),
            form_urlencoded::byte_serialize(self.login.client_secret.as_bytes())
                .collect::<String>()
        ));
        let req = Request::post(&provider.token_endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, format!("Basic {basic}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let answer = self
            .outbound
            .call(req, Duration::from_secs(10))
            .await
            .map_err(|e| format!("token endpoint: {e}"))?;
        if answer.status != StatusCode::OK {
            return Err(format!("token endpoint answered {}", answer.status));
        }
        let doc: Value =
            crate::json::parse(&answer.body).map_err(|_| "token answer is not JSON")?;
        let id_token = doc["id_token"].as_str().ok_or("no id_token")?;
        let claims = self
            .id_verifier
            .verify(id_token)
            .await
            .map_err(|_| "the provider's keys cannot be had")?
            .map_err(|e| format!("id_token: {e}"))?;
        if claims.get("nonce").and_then(Value::as_str) != Some(sign_in.idp_nonce.as_str()) {
            return Err("id_token nonce does not match".into());
        }
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or("id_token has no sub")?;
        let fhir_user = claims
            .get(&self.login.fhir_user_claim)
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(User {
            sub: sub.to_owned(),
            fhir_user,
        })
    }

    async fn provider(&self) -> Result<&Provider, String> {
        self.provider
            .get_or_try_init(|| async {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.login.issuer.trim_end_matches('/')
                );
                let answer = self
                    .outbound
                    .get_json(&url, Duration::from_secs(5))
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                if answer.status != StatusCode::OK {
                    return Err(format!("{url}: {}", answer.status));
                }
                crate::json::parse_as::<Provider>(&answer.body)
                    .map_err(|_| format!("{url}: not a discovery document"))
            })
            .await
    }

    async fn save(&self, txn: &str, sign_in: &SignIn) -> Result<(), StoreError> {
        let text = serde_json::to_string(sign_in).unwrap_or_default();
        self.store
            .put(&format!("signin:{txn}"), &text, SIGN_IN_TIME)
            .await
    }

    async fn load(&self, txn: &str) -> Result<Option<SignIn>, StoreError> {
        Ok(self
            .store
            .get(&format!("signin:{txn}"))
            .await?
            .and_then(|t| serde_json::from_str(&t).ok()))
    }

    fn callback_uri(&self) -> String {
        format!("{}/auth/callback", self.base)
    }

    fn cookie(&self, value: &str, life: Duration) -> String {
        let secure = if self.secure_cookie { "; Secure" } else { "" };
        format!(
            "{COOKIE}={value}; Path={}/auth/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            self.base_path,
            life.as_secs()
        )
    }

    /// The consent page; with `choices`, a patient picker in it.
    fn consent_page_with(
        &self,
        txn: &str,
        sign_in: &SignIn,
        patient: Option<&str>,
        choices: &[(String, String)],
    ) -> Response<BoxBody> {
        self.render_consent(txn, sign_in, patient, choices, "", None)
    }

    /// The consent page; with a picker, the search box holds `searched` and `notice`
    /// says what the search found.
    fn render_consent(
        &self,
        txn: &str,
        sign_in: &SignIn,
        patient: Option<&str>,
        choices: &[(String, String)],
        searched: &str,
        notice: Option<&str>,
    ) -> Response<BoxBody> {
        let scopes: minijinja::Value = split(&sign_in.scope)
            .map(|s| scope_item(s, &describe(s)))
            .collect();
        let choices: minijinja::Value = choices
            .iter()
            .map(|(id, name)| scope_item(id, name))
            .collect();
        let user = sign_in
            .user
            .as_ref()
            .map(|u| u.fhir_user.clone().unwrap_or_else(|| u.sub.clone()));
        let ctx = minijinja::context! {
            realm => self.realm.clone(), base_path => self.base_path.clone(),
            action => format!("{}/auth/consent", self.base_path),
            client_id => sign_in.client_id.clone(), txn => txn, csrf => sign_in.csrf.clone(),
            scopes => scopes, user => user, patient => patient, choices => choices,
            searched => searched, notice => notice,
        };
        self.page_to(
            StatusCode::OK,
            "consent.html",
            ctx,
            Some(&sign_in.redirect_uri),
        )
    }

    /// [`Launch::patients`], or none (logged) when the FHIR server does not answer.
    async fn picker_list(&self, name: Option<&str>) -> Vec<(String, String)> {
        self.patients(name).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "patient picker: the FHIR server did not answer");
            Vec::new()
        })
    }

    /// Patients for the picker: the first page of a search at the FHIR server (ids and
    /// names only), with the gateway's own credentials. Offered only to a practitioner
    /// whose granted scopes read every Patient ([`may_pick`]).
    async fn patients(&self, name: Option<&str>) -> Result<Vec<(String, String)>, String> {
        let (base, headers) = &self.upstream;
        let query = {
            let mut q = form_urlencoded::Serializer::new(String::new());
            if let Some(n) = name {
                q.append_pair("name", n);
            }
            q.append_pair("_count", "50")
                .append_pair("_elements", "id,name")
                .finish()
        };
        let mut req = Request::get(format!("{base}/Patient?{query}"))
            .header(header::ACCEPT, "application/fhir+json");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let answer = self
            .outbound
            .call(req, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        if answer.status != StatusCode::OK {
            return Err(format!("Patient search answered {}", answer.status));
        }
        let doc: Value = crate::json::parse(&answer.body).map_err(|_| "not JSON".to_owned())?;
        let entries = doc["entry"].as_array().cloned().unwrap_or_default();
        Ok(entries
            .iter()
            .map(|e| &e["resource"])
            .filter(|r| r["resourceType"] == "Patient")
            .filter_map(|r| {
                let id = r["id"].as_str().filter(|id| fhir_id(id))?;
                Some((
                    id.to_owned(),
                    display_name(r).unwrap_or_else(|| format!("Patient {id}")),
                ))
            })
            .collect())
    }

    fn error_page(&self, status: StatusCode, message: &str) -> Response<BoxBody> {
        let ctx = minijinja::context! {
            realm => self.realm.clone(), base_path => self.base_path.clone(), message => message,
        };
        self.page(status, "error.html", ctx)
    }

    fn page(&self, status: StatusCode, name: &str, ctx: minijinja::Value) -> Response<BoxBody> {
        self.page_to(status, name, ctx, None)
    }

    /// A page whose form may lead to `app` (the app's redirect URI): CSP `form-action`
    /// covers where a form's answer redirects, so that origin is allowed beside ours.
    fn page_to(
        &self,
        status: StatusCode,
        name: &str,
        ctx: minijinja::Value,
        app: Option<&str>,
    ) -> Response<BoxBody> {
        let html = self.pages.render(name, ctx).unwrap_or_else(|e| {
            tracing::error!(error = %e, page = name, "page failed to render");
            "<!doctype html><title>Error</title><p>Something went wrong.</p>".to_owned()
        });
        let mut resp = Response::new(full(html));
        *resp.status_mut() = status;
        page_headers(resp.headers_mut());
        let form_action = app
            .and_then(origin)
            .map_or_else(|| "'self'".to_owned(), |o| format!("'self' {o}"));
        let csp = format!(
            "default-src 'self'; frame-ancestors 'none'; form-action {form_action}; base-uri 'none'"
        );
        if let Ok(v) = HeaderValue::from_str(&csp) {
            resp.headers_mut()
                .insert(header::CONTENT_SECURITY_POLICY, v);
        }
        resp
    }

    /// `/auth/smart-style.json`: the look of the gateway's pages, for apps that match it
    /// (SMART App Launch `smart_style_url`, style version 1.0).
    pub fn smart_style() -> Response<BoxBody> {
        let mut resp = Response::new(full(include_str!("pages/smart-style.json")));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=3600"),
        );
        resp.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        resp
    }

    /// `/auth/style.css`, the pages' stylesheet (CSP allows only this origin's).
    pub fn stylesheet() -> Response<BoxBody> {
        let mut resp = Response::new(full(include_str!("pages/style.css")));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/css; charset=utf-8"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=3600"),
        );
        resp
    }
}

/// `scheme://authority` of an absolute URL.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let clean = authority
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    (clean && !authority.is_empty()).then(|| format!("{scheme}://{authority}"))
}

/// Headers of every page: no script, no framing, nothing from elsewhere, nothing kept (the
/// CSP is set by the caller).
fn page_headers(h: &mut http::HeaderMap) {
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
}

/// The scopes an app gets: resource scopes at patient or user level within its
/// registration (as `grant` does for system scopes), and context scopes registered
/// verbatim.
pub fn app_grant(requested: &str, registered: &str) -> String {
    let granted = super::grant::grant_at(requested, registered, &[Level::Patient, Level::User]);
    split(&granted)
        .filter(|s| CONTEXT_SCOPES.contains(s) || matches!(parse(s), Ok(Scope::Resource(_))))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The patient a consent grants: the EHR's for an EHR launch, the one picked from those
/// offered, or the signed-in Patient; `None` (outer) when the pick was not offered.
fn chosen_patient(
    sign_in: &SignIn,
    user: &User,
    approved: &[&str],
    picked: Option<&str>,
) -> Option<Option<String>> {
    if let Some(l) = sign_in
        .launch
        .as_ref()
        .filter(|_| approved.contains(&"launch"))
    {
        return Some(l.patient.clone());
    }
    if sign_in.choices.is_empty() {
        return Some(context_patient(&approved.join(" "), user));
    }
    let picked = picked.filter(|p| sign_in.choices.iter().any(|c| c == p))?;
    Some(
        approved
            .contains(&"launch/patient")
            .then(|| picked.to_owned()),
    )
}

/// Whether a signed-in user may pick the patient: a Practitioner whose scopes read every
/// Patient (user level, unconstrained), so that the list holds only what they may read.
fn may_pick(scope: &str, user: &User) -> bool {
    let practitioner = user
        .fhir_user
        .as_deref()
        .is_some_and(|f| f.starts_with("Practitioner/") || f.contains("/Practitioner/"));
    practitioner
        && split(scope).any(|s| {
            matches!(
                s,
                "user/Patient.r"
                    | "user/Patient.rs"
                    | "user/Patient.read"
                    | "user/*.r"
                    | "user/*.rs"
                    | "user/*.read"
                    | "user/Patient.cruds"
                    | "user/*.cruds"
                    | "user/Patient.*"
                    | "user/*.*"
            )
        })
}

/// A Patient's name for the picker: `given family`, from its first name.
fn display_name(patient: &Value) -> Option<String> {
    let name = patient["name"].as_array()?.first()?;
    if let Some(text) = name["text"].as_str() {
        return Some(text.to_owned());
    }
    let given: Vec<&str> = name["given"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let family = name["family"].as_str().unwrap_or("");
    let full = format!("{} {family}", given.join(" "));
    let full = full.trim();
    (!full.is_empty()).then(|| full.to_owned())
}

/// The patient of a sign-in: the EHR's, for an EHR launch; else the signed-in Patient.
fn launch_patient(sign_in: &SignIn, user: &User) -> Option<String> {
    match &sign_in.launch {
        Some(l) => l.patient.clone(),
        None => context_patient(&sign_in.scope, user),
    }
}

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
fn fhir_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The patient in context: the signed-in Patient, for `launch/patient`.
fn context_patient(scope: &str, user: &User) -> Option<String> {
    if !scope.split(' ').any(|s| s == "launch/patient") {
        return None;
    }
    let reference = user.fhir_user.as_deref()?;
    let tail = reference.rsplit_once("Patient/").map(|(_, id)| id)?;
    let id = tail.split(['/', '?', '#']).next()?;
    fhir_id(id).then(|| id.to_owned())
}

/// One scope of the consent page's list.
fn scope_item(value: &str, label: &str) -> minijinja::Value {
    minijinja::Value::from_pairs([("value", value), ("label", label)])
}

/// Words for a scope on the consent page.
fn describe(scope: &str) -> String {
    match parse(scope) {
        Ok(Scope::Resource(_)) => {
            let (level, rest) = scope.split_once('/').unwrap_or(("", scope));
            let (ty, perms) = rest.rsplit_once('.').unwrap_or((rest, ""));
            let ty = if ty == "*" {
                "all kinds of records"
            } else {
                ty
            };
            let perms = perms.split('?').next().unwrap_or(perms);
            let verbs: Vec<&str> = match perms {
                "read" | "*" => vec!["read", "search"],
                "write" => vec!["create", "change", "delete"],
                letters => letters
                    .chars()
                    .filter_map(|c| match c {
                        'c' => Some("create"),
                        'r' => Some("read"),
                        'u' => Some("change"),
                        'd' => Some("delete"),
                        's' => Some("search"),
                        _ => None,
                    })
                    .collect(),
            };
            let whose = if level == "patient" { "your" } else { "the" };
            format!("{} {whose} {ty}", verbs.join(", "))
        }
        _ => match scope {
            "launch/patient" => "know which patient you are".into(),
            "launch" => "know what you opened it for in your record system".into(),
            "openid" | "fhirUser" | "profile" => "know who you are".into(),
            "offline_access" => "keep access when you are not using it".into(),
            "online_access" => "keep access while you use it".into(),
            other => other.into(),
        },
    }
}

fn redirect(location: &str) -> Response<BoxBody> {
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = StatusCode::FOUND;
    match HeaderValue::from_str(location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// An OAuth error sent back to the app's (registered) redirect URI.
fn redirect_error(
    redirect_uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> Response<BoxBody> {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("error", error)
        .append_pair("error_description", description);
    if let Some(s) = state {
        q.append_pair("state", s);
    }
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    redirect(&format!("{redirect_uri}{sep}{}", q.finish()))
}

fn unavailable(e: StoreError) -> OAuthError {
    tracing::warn!(error = %e, "state store unavailable");
    OAuthError::temporarily_unavailable("state cannot be read or kept now")
}

/// 256 random bits, base64url.
fn random_token() -> String {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether two secrets are equal, in time that depends on their length only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// RFC 7636 S256: base64url(SHA-256(verifier)).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// What a secret is stored under: its SHA-256, so the store never holds one usable as is.
fn digest(secret: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        secret.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_of_redirect_uris() {
        assert_eq!(
            origin("https://app.example.org/cb?x=1").as_deref(),
            Some("https://app.example.org")
        );
        assert_eq!(
            origin("http://127.0.0.1:8000/cb").as_deref(),
            Some("http://127.0.0.1:8000")
        );
        // Nothing that could end the CSP directive or add a source.
        assert_eq!(origin("https://a.example; script-src *"), None);
        assert_eq!(origin("https://a b/"), None);
        assert_eq!(origin("no-scheme"), None);
    }

    #[test]
    fn pkce_s256_matches_rfc7636() {
        // RFC 7636 appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn apps_get_patient_and_user_scopes_within_registration() {
        let reg = "launch/patient openid fhirUser offline_access patient/*.rs user/Patient.r";
        assert_eq!(
            app_grant(
                "launch/patient openid patient/Observation.rs system/*.rs profile",
                reg
            ),
            "launch/patient openid patient/Observation.rs"
        );
        assert_eq!(app_grant("patient/*.cruds", reg), "patient/*.rs");
        assert_eq!(app_grant("launch user/Observation.rs", reg), "");
    }

    #[test]
    fn the_patient_comes_from_a_patient_user_only() {
        let user = |f: &str| User {
            sub: "s".into(),
            fhir_user: Some(f.into()),
        };
        let scope = "launch/patient patient/*.rs";
        assert_eq!(
            context_patient(scope, &user("Patient/123")).as_deref(),
            Some("123")
        );
        assert_eq!(
            context_patient(scope, &user("https://f.example/r4/Patient/p-1")).as_deref(),
            Some("p-1")
        );
        assert_eq!(context_patient(scope, &user("Practitioner/9")), None);
        assert_eq!(context_patient("patient/*.rs", &user("Patient/123")), None);
        assert_eq!(context_patient(scope, &user("Patient/a b")), None);
    }

    #[test]
    fn pages_render_escaped() {
        let pages = Pages::new();
        let html = pages
            .render(
                "error.html",
                minijinja::context! { realm => "r", base_path => "/r4", message => "<script>x</script>" },
            )
            .unwrap();
        assert!(
            html.contains("&lt;script&gt;x&lt;&#x2f;script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>"));
        let html = pages
            .render(
                "consent.html",
                minijinja::context! {
                    realm => "r", base_path => "/r4", action => "/r4/auth/consent",
                    client_id => "\"><img src=x>", txn => "t", csrf => "c",
                    scopes => [scope_item("patient/*.rs", "your *.rs")].into_iter().collect::<minijinja::Value>(),
                    user => "Patient/1", patient => "1",
                },
            )
            .unwrap();
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains(r#"name="csrf" value="c""#), "{html}");
    }
}

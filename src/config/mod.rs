//! Configuration: the TOML file of DESIGN.md's interface contract, environment overrides
//! (`SMARTGATE__SECTION__KEY`), validation with errors that name the key, and the masked
//! rendering `check-config` prints.
//!
//! Unknown keys are errors everywhere: a typo must never silently turn a check off.

mod env;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use units::{BaseUrl, ByteSize, Dur};

/// An asymmetric JWS algorithm (RFC 7518): the only kinds a token or an assertion may be
/// signed with here, so a public key can never serve as an HMAC secret.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum JwsAlgorithm {
    /// RSASSA-PKCS1-v1_5, SHA-256
    RS256,
    /// RSASSA-PKCS1-v1_5, SHA-384
    RS384,
    /// RSASSA-PKCS1-v1_5, SHA-512
    RS512,
    /// RSASSA-PSS, SHA-256
    PS256,
    /// RSASSA-PSS, SHA-384
    PS384,
    /// RSASSA-PSS, SHA-512
    PS512,
    /// ECDSA P-256, SHA-256
    ES256,
    /// ECDSA P-384, SHA-384
    ES384,
    /// Ed25519
    EdDSA,
}

impl JwsAlgorithm {
    /// The `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            JwsAlgorithm::RS256 => "RS256",
            JwsAlgorithm::RS384 => "RS384",
            JwsAlgorithm::RS512 => "RS512",
            JwsAlgorithm::PS256 => "PS256",
            JwsAlgorithm::PS384 => "PS384",
            JwsAlgorithm::PS512 => "PS512",
            JwsAlgorithm::ES256 => "ES256",
            JwsAlgorithm::ES384 => "ES384",
            JwsAlgorithm::EdDSA => "EdDSA",
        }
    }
}

/// `authorization_server.signing_alg`: the gateway's own ECDSA keys.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum SigningAlgorithm {
    /// ECDSA P-384, SHA-384 (the default)
    #[default]
    ES384,
    /// ECDSA P-256, SHA-256
    ES256,
}

impl SigningAlgorithm {
    /// The `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::ES384 => "ES384",
            SigningAlgorithm::ES256 => "ES256",
        }
    }
}

/// `auth.introspection.private_key_alg`: how the gateway signs its own client assertion.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum AssertionKeyAlgorithm {
    /// ECDSA P-384, SHA-384 (the default)
    #[default]
    ES384,
    /// RSASSA-PKCS1-v1_5, SHA-384
    RS384,
}

impl AssertionKeyAlgorithm {
    /// The `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            AssertionKeyAlgorithm::ES384 => "ES384",
            AssertionKeyAlgorithm::RS384 => "RS384",
        }
    }
}

/// `policy.patient_scope_non_compartment`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NonCompartmentScopes {
    /// `patient/` scopes reach types outside the compartment (Medication, …).
    #[default]
    Allow,
    /// They do not.
    Deny,
}

/// `policy.denied_read_status`: 403, or 404 to hide that the resource exists.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(try_from = "u16", into = "u16")]
pub enum DeniedReadStatus {
    /// 403 Forbidden
    #[default]
    Forbidden,
    /// 404 Not Found
    NotFound,
}

impl TryFrom<u16> for DeniedReadStatus {
    type Error = String;
    fn try_from(code: u16) -> Result<Self, String> {
        match code {
            403 => Ok(DeniedReadStatus::Forbidden),
            404 => Ok(DeniedReadStatus::NotFound),
            other => Err(format!("{other} is not 403 or 404")),
        }
    }
}

impl From<DeniedReadStatus> for u16 {
    fn from(s: DeniedReadStatus) -> u16 {
        match s {
            DeniedReadStatus::Forbidden => 403,
            DeniedReadStatus::NotFound => 404,
        }
    }
}

/// The whole configuration, validated.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The public listener.
    pub server: ServerConfig,
    /// The admin listener (health, readiness, metrics).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The protected FHIR server.
    pub upstream: UpstreamConfig,
    /// How bearer tokens are checked.
    pub auth: AuthConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Hot reload of this file.
    #[serde(default)]
    pub reload: ReloadConfig,
    /// Authorization policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The SMART discovery document (`/.well-known/smart-configuration`); absent → 404
    /// (unless the embedded authorization server is on: then it is derived).
    pub smart: Option<SmartConfig>,
    /// The embedded SMART Backend Services authorization server.
    #[serde(default)]
    pub authorization_server: AuthorizationServerConfig,
    /// Bulk Data export status URLs.
    #[serde(default)]
    pub bulk_data: BulkDataConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
}

/// `[audit]`: one JSON line per request (and per token issued or refused) on its own
/// sink, apart from the debug log.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Where the lines go: `stdout`, `file`, `both`, or `off`.
    #[serde(default)]
    pub sink: AuditSink,
    /// The file, for `file` and `both`.
    pub path: Option<PathBuf>,
    /// The file is rotated (renamed to `path.1`, `path.2`, …) when it reaches this size.
    #[serde(default = "defaults::audit_max_size")]
    pub max_size: ByteSize,
    /// Rotated files kept beside the current one.
    #[serde(default = "defaults::audit_max_files")]
    pub max_files: u32,
    /// Record the query string (it may hold PHI: names, birth dates, identifiers).
    #[serde(default)]
    pub include_query: bool,
    /// Lines held in memory while the writer catches up; beyond it lines are dropped
    /// and counted (`smartgate_audit_dropped_total`), never waited for by a request.
    #[serde(default = "defaults::audit_buffer")]
    pub buffer: ByteSize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            sink: AuditSink::default(),
            path: None,
            max_size: defaults::audit_max_size(),
            max_files: defaults::audit_max_files(),
            include_query: false,
            buffer: defaults::audit_buffer(),
        }
    }
}

/// `audit.sink`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditSink {
    /// Standard output (the debug log goes to standard error).
    #[default]
    Stdout,
    /// `audit.path`, rotated by size.
    File,
    /// Both.
    Both,
    /// No audit trail.
    Off,
}

impl AuditSink {
    /// Whether lines go to standard output.
    pub fn stdout(self) -> bool {
        matches!(self, AuditSink::Stdout | AuditSink::Both)
    }

    /// Whether lines go to `audit.path`.
    pub fn file(self) -> bool {
        matches!(self, AuditSink::File | AuditSink::Both)
    }

    /// The name as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            AuditSink::Stdout => "stdout",
            AuditSink::File => "file",
            AuditSink::Both => "both",
            AuditSink::Off => "off",
        }
    }
}

/// `[bulk_data]`: the status URLs of Bulk Data exports, which the gateway signs for the
/// client that kicked each export off.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BulkDataConfig {
    /// The key status URLs are signed with (at least 32 characters). Give every replica
    /// the same one, and keep it across restarts, so that any of them accepts a status
    /// URL another handed out. Unset: a random key per process.
    #[serde(default)]
    pub status_key: Option<String>,
    /// Keys status URLs were signed with before `status_key` was rotated: still
    /// accepted, never used to sign. Drop one once its URLs are no longer needed (they
    /// expire after seven days).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_status_keys: Vec<String>,
}

/// `[authorization_server]`: the embedded SMART Backend Services authorization server.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationServerConfig {
    /// Serve `{base}/auth/token`, `/auth/introspect`, `/auth/jwks`.
    #[serde(default)]
    pub enabled: bool,
    /// The gateway's signing key: PKCS#8 PEM (`smartgate keygen` writes one). Unset: a
    /// key generated at start, kept across reloads, lost at exit (tokens then die with
    /// the process, and other replicas do not accept them).
    pub signing_key: Option<PathBuf>,
    /// `ES384` (default) or `ES256`.
    #[serde(default)]
    pub signing_alg: SigningAlgorithm,
    /// Access token lifetime (SMART: should not exceed five minutes).
    #[serde(default = "defaults::token_lifetime")]
    pub token_lifetime: Dur,
    /// Token requests per second allowed per client (a burst of the same size).
    #[serde(default = "defaults::token_rate_limit")]
    pub rate_limit: u32,
    /// Client assertion algorithms accepted.
    #[serde(default = "defaults::assertion_algorithms")]
    pub assertion_algorithms: Vec<JwsAlgorithm>,
    /// Most live assertion ids (`jti`) one client may have for replay detection; each is
    /// kept until its assertion expires, and a full client is refused rather than an id
    /// forgotten early (`authz::replay`).
    #[serde(default = "defaults::replay_cache_max_entries")]
    pub replay_cache_max_entries: u64,
    /// A bearer token carrying this scope may call `/auth/introspect`.
    pub introspection_scope: Option<String>,
    /// Registered clients.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    /// RS256 key (PKCS#8 PEM) for OpenID Connect id_tokens (SMART App Launch). Unset: a
    /// key generated at start, kept across reloads.
    pub id_token_key: Option<PathBuf>,
    /// How long a refresh token (offline_access, online_access) stays usable.
    #[serde(default = "defaults::refresh_token_lifetime")]
    pub refresh_token_lifetime: Dur,
    /// Where users sign in for SMART App Launch: an OpenID Connect provider.
    pub login: Option<LoginConfig>,
    /// Where state shared by replicas lives.
    #[serde(default)]
    pub store: StoreConfig,
    /// The `smart_style_url` of App Launch token answers: where an app finds the look of
    /// the host it is embedded in. Unset: the gateway's own `{base}/auth/smart-style.json`.
    pub smart_style_url: Option<BaseUrl>,
}

/// `[authorization_server.login]`: the OpenID Connect provider users sign in at.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    /// The provider's issuer; its `/.well-known/openid-configuration` is read.
    pub issuer: String,
    /// The gateway's client id at the provider.
    pub client_id: String,
    /// Its secret (client_secret_basic).
    pub client_secret: String,
    /// The id_token claim that names the user's FHIR resource (`Patient/123`,
    /// `Practitioner/9`, or an absolute URL).
    #[serde(default = "defaults::fhir_user_claim")]
    pub fhir_user_claim: String,
    /// Scopes asked of the provider.
    #[serde(default = "defaults::login_scopes")]
    pub scopes: Vec<String>,
}

/// `[authorization_server.store]`: authorization codes, refresh tokens, pending sign-ins
/// and (with a server) client assertion ids.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `redis://host:port` of a Valkey/Redis server shared by every replica; unset: in
    /// this process only.
    pub url: Option<String>,
    /// Prefix of every key.
    #[serde(default = "defaults::store_prefix")]
    pub key_prefix: String,
    /// Time allowed for each command; then the request that needs it is refused (503).
    #[serde(default = "defaults::store_timeout")]
    pub timeout: Dur,
    /// Most live entries in memory (without a server).
    #[serde(default = "defaults::store_max_entries")]
    pub max_entries: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: None,
            key_prefix: defaults::store_prefix(),
            timeout: defaults::store_timeout(),
            max_entries: defaults::store_max_entries(),
        }
    }
}

impl Default for AuthorizationServerConfig {
    fn default() -> Self {
        AuthorizationServerConfig {
            enabled: false,
            signing_key: None,
            signing_alg: SigningAlgorithm::default(),
            token_lifetime: defaults::token_lifetime(),
            rate_limit: defaults::token_rate_limit(),
            assertion_algorithms: defaults::assertion_algorithms(),
            replay_cache_max_entries: defaults::replay_cache_max_entries(),
            introspection_scope: None,
            clients: Vec::new(),
            id_token_key: None,
            refresh_token_lifetime: defaults::refresh_token_lifetime(),
            login: None,
            store: StoreConfig::default(),
            smart_style_url: None,
        }
    }
}

/// `[[authorization_server.clients]]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client id (`iss` and `sub` of its assertions).
    pub client_id: String,
    /// Its public keys, inline as a JWKS JSON document.
    pub jwks: Option<String>,
    /// Or where to fetch them (cached per Cache-Control, refetched on an unknown kid).
    pub jwks_uri: Option<String>,
    /// Or, for a symmetric client (client_secret_basic): `sha256:<hex>` of its secret.
    pub client_secret_hash: Option<String>,
    /// The most this client may be granted (space-separated scopes).
    pub scope: String,
    /// `jku` header values this client may use (else a `jku` is refused).
    #[serde(default)]
    pub jku_allow: Vec<String>,
    /// A public app (SMART `client-public`): no credentials; PKCE alone binds its code.
    #[serde(default)]
    pub public: bool,
    /// Where the app may be sent back with a code (SMART App Launch), compared exactly.
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// An EHR: may mint launch contexts at `/auth/launch` (SMART EHR launch).
    #[serde(default)]
    pub ehr: bool,
}

/// `[smart]`: SMART App Launch 2.2 conformance.html fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmartConfig {
    /// Required when a `launch-*` capability is listed.
    pub authorization_endpoint: Option<String>,
    /// Required (filled in when the embedded authorization server is on).
    #[serde(default)]
    pub token_endpoint: String,
    /// Required: SMART capabilities.
    pub capabilities: Vec<String>,
    /// Derived when absent (authorization_code with launch-*, else client_credentials for
    /// confidential clients).
    pub grant_types_supported: Option<Vec<String>>,
    /// Default `["S256"]`; must contain S256 and not plain.
    pub code_challenge_methods_supported: Option<Vec<String>>,
    /// Required with `sso-openid-connect`, absent otherwise.
    pub issuer: Option<String>,
    /// Required with `sso-openid-connect`, absent otherwise.
    pub jwks_uri: Option<String>,
    /// Optional, passed through.
    pub scopes_supported: Option<Vec<String>>,
    /// Optional, passed through.
    pub response_types_supported: Option<Vec<String>>,
    /// Optional, passed through.
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
    /// Optional, passed through.
    pub token_endpoint_auth_signing_alg_values_supported: Option<Vec<String>>,
    /// Optional.
    pub introspection_endpoint: Option<String>,
    /// Optional.
    pub revocation_endpoint: Option<String>,
    /// Optional.
    pub management_endpoint: Option<String>,
    /// Optional.
    pub registration_endpoint: Option<String>,
    /// Optional.
    pub user_access_brand_bundle: Option<String>,
}

impl SmartConfig {
    /// The optional endpoint URLs, by their document field names.
    pub fn optional_endpoints(&self) -> [(&'static str, &Option<String>); 5] {
        [
            ("introspection_endpoint", &self.introspection_endpoint),
            ("revocation_endpoint", &self.revocation_endpoint),
            ("management_endpoint", &self.management_endpoint),
            ("registration_endpoint", &self.registration_endpoint),
            ("user_access_brand_bundle", &self.user_access_brand_bundle),
        ]
    }
}

/// `[policy]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Operation rules, in front of the built-in defaults (first match wins). Operations
    /// matched by no rule are denied.
    #[serde(default)]
    pub operations: Vec<OperationConfig>,
    /// Whether `patient/` scopes on types outside the Patient compartment (Medication,
    /// Practitioner, …) grant access to them: `"allow"` (default) or `"deny"`.
    #[serde(default)]
    pub patient_scope_non_compartment: NonCompartmentScopes,
    /// Confine `user/` scopes of a RelatedPerson user to the patient in context, like a
    /// Patient user's (default false: such users are not confined).
    #[serde(default)]
    pub confine_related_person: bool,
    /// Per resource type, the search parameter injected to confine a search to the
    /// patient (default: `patient` where the type has it, else its first compartment
    /// parameter).
    #[serde(default)]
    pub compartment_param: std::collections::BTreeMap<String, String>,
    /// Status for a confined read of a resource outside the token's reach: 403 (default)
    /// or 404 (FHIR security.html allows either; 404 hides existence).
    #[serde(default)]
    pub denied_read_status: DeniedReadStatus,
    /// A conditional update or delete under a patient context or granular scopes:
    /// `"deny"` (default) or `"narrow"` (see [`ConfinedConditionalWrites`]).
    #[serde(default)]
    pub confined_conditional_writes: ConfinedConditionalWrites,
}

/// `policy.confined_conditional_writes`: what becomes of a conditional update or delete
/// (`PUT|DELETE Type?search`) by a confined token (a patient context, or granular scopes).
///
/// The gateway cannot see which resources such a condition matches: the server resolves
/// it. Narrowed, the condition gets the patient (and the scopes' constraints) added and
/// goes with `Prefer: handling=strict`; but a server in FHIR's default lenient handling
/// that does not support that parameter for the type, and ignores `Prefer` too, drops it
/// and writes or deletes other patients' records. So the default refuses; `"narrow"` is
/// for upstreams known to support the compartment parameters and strict handling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfinedConditionalWrites {
    /// Refused (403).
    #[default]
    Deny,
    /// Narrowed to the patient and constraints, sent with `Prefer: handling=strict`.
    Narrow,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            operations: Vec::new(),
            patient_scope_non_compartment: NonCompartmentScopes::default(),
            confine_related_person: false,
            compartment_param: Default::default(),
            denied_read_status: DeniedReadStatus::default(),
            confined_conditional_writes: ConfinedConditionalWrites::Deny,
        }
    }
}

/// `[[policy.operations]]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OperationConfig {
    /// Operation name, with or without `$`.
    pub name: String,
    /// `system`, `type` or `instance`.
    pub level: String,
    /// Only for this resource type (any when absent).
    pub resource_type: Option<String>,
    /// `open`, `deny`, letters on the type (`"r"`, `"rs"`), letters on every type or
    /// `_type` (`"all:rs"`), `create-or-update`, or `everything`.
    pub requires: String,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the public listener.
    pub listen: SocketAddr,
    /// The FHIR base URL as clients see it; its path is the prefix the gateway serves.
    pub public_base_url: BaseUrl,
    /// Serve TLS with these PEM files (reloaded when they change).
    pub tls: Option<TlsConfig>,
    /// Largest request body forwarded; larger → 413.
    #[serde(default = "defaults::max_request_body")]
    pub max_request_body: ByteSize,
    /// How long in-flight requests may finish after SIGTERM.
    #[serde(default = "defaults::shutdown_grace")]
    pub shutdown_grace: Dur,
    /// After SIGTERM, how long to keep serving with `/readyz` failing before the listener
    /// closes, so load balancers and Kubernetes endpoints stop sending first.
    #[serde(default = "defaults::shutdown_delay")]
    pub shutdown_delay: Dur,
    /// How long a client may take to send request headers (also the keep-alive idle limit).
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Dur,
    /// Worker threads, each with its own event loop and upstream pool; 0 = one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Whether workers are pinned to CPUs: `auto` pins each worker to a CPU of its own
    /// when there is one worker per CPU the process may use; `off` never.
    #[serde(default)]
    pub worker_cpu_affinity: CpuAffinity,
}

/// `server.worker_cpu_affinity`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CpuAffinity {
    /// Pin worker i to the i-th CPU the process may use, when the worker count equals
    /// the number of those CPUs (as with `workers = 0` and no CPU quota below it).
    #[default]
    Auto,
    /// Leave the workers to the scheduler.
    Off,
}

impl ServerConfig {
    /// The number of worker threads to run.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "defaults::admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: defaults::admin_listen(),
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// FHIR base of the protected server.
    pub url: BaseUrl,
    /// Time allowed for the upstream's response headers.
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: Dur,
    /// Time allowed to open a TCP (and TLS) connection.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// Longest pause allowed between two pieces of a response body.
    #[serde(default = "defaults::upstream_idle_timeout")]
    pub idle_timeout: Dur,
    /// Headers added to every upstream request (credentials for the upstream itself).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Forward the client's `Authorization` header (off: the upstream never sees tokens).
    #[serde(default)]
    pub forward_authorization: bool,
    /// Extra PEM CA certificates trusted for an https upstream (beside the system roots).
    pub ca_file: Option<PathBuf>,
    /// Other base URLs the upstream writes for itself in links (rewritten too).
    #[serde(default)]
    pub aliases: Vec<BaseUrl>,
    /// Idle keep-alive connections kept per upstream host.
    #[serde(default = "defaults::pool_max_idle")]
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept.
    #[serde(default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: Dur,
    /// Largest FHIR JSON response the gateway holds in memory to rewrite or verify;
    /// larger ones are refused with 502 rather than passed on unchecked.
    #[serde(default = "defaults::max_response_buffer")]
    pub max_response_buffer: ByteSize,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// How bearer tokens are checked.
    pub mode: AuthMode,
    /// Allow `mode = "none"` on a listener other than loopback. Without it the gateway
    /// refuses to start as an unauthenticated proxy reachable from the network.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// `realm` in `WWW-Authenticate` challenges.
    #[serde(default = "defaults::realm")]
    pub realm: String,
    /// Clock skew allowed for `exp`, `nbf` and `iat`.
    #[serde(default = "defaults::leeway")]
    pub leeway: Dur,
    /// Most token verdicts kept in the cache.
    #[serde(default = "defaults::cache_max_entries")]
    pub cache_max_entries: u64,
    /// Longest a valid token's verdict is cached (never past the token's `exp`).
    #[serde(default = "defaults::cache_max_ttl")]
    pub cache_max_ttl: Dur,
    /// How long an invalid token's verdict is cached.
    #[serde(default = "defaults::negative_ttl")]
    pub negative_ttl: Dur,
    /// Which claims carry the SMART context.
    #[serde(default)]
    pub claims: ClaimsConfig,
    /// `[auth.jwt]`, for `mode = "jwt"`.
    pub jwt: Option<JwtConfig>,
    /// `[auth.introspection]`, for `mode = "introspection"`.
    pub introspection: Option<IntrospectionConfig>,
    /// Identity headers sent to the upstream.
    #[serde(default)]
    pub identity_headers: IdentityHeadersConfig,
}

/// `[auth.claims]`: claim names, for identity providers that do not use SMART's.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClaimsConfig {
    /// Space-separated scopes (a string), or an array of scopes; `scp` is read when this
    /// claim is absent.
    #[serde(default = "defaults::claim_scope")]
    pub scope: String,
    /// The patient in context (`123`, `Patient/123` or an absolute URL).
    #[serde(default = "defaults::claim_patient")]
    pub patient: String,
    /// The encounter in context.
    #[serde(default = "defaults::claim_encounter")]
    pub encounter: String,
    /// The user as a FHIR resource URL.
    #[serde(default = "defaults::claim_fhir_user")]
    pub fhir_user: String,
    /// SMART 2.x `fhirContext` array.
    #[serde(default = "defaults::claim_fhir_context")]
    pub fhir_context: String,
    /// Claims tried in order for the client id.
    #[serde(default = "defaults::claim_client_id")]
    pub client_id: Vec<String>,
}

impl Default for ClaimsConfig {
    fn default() -> Self {
        ClaimsConfig {
            scope: defaults::claim_scope(),
            patient: defaults::claim_patient(),
            encounter: defaults::claim_encounter(),
            fhir_user: defaults::claim_fhir_user(),
            fhir_context: defaults::claim_fhir_context(),
            client_id: defaults::claim_client_id(),
        }
    }
}

/// `[auth.jwt]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Required `iss`, compared exactly.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// Where the signing keys are; when absent, found through the issuer's discovery
    /// documents (`/.well-known/openid-configuration`, then `smart-configuration`).
    pub jwks_uri: Option<String>,
    /// Keys given inline as a JWKS JSON document (air-gapped setups); no fetching.
    pub jwks: Option<String>,
    /// Accepted signature algorithms (asymmetric only).
    #[serde(default = "defaults::algorithms")]
    pub algorithms: Vec<JwsAlgorithm>,
    /// Shortest interval between JWKS refreshes (a shorter `max-age` is raised to this).
    #[serde(default = "defaults::jwks_refresh_min")]
    pub refresh_min: Dur,
    /// Longest interval between JWKS refreshes (a longer `max-age` is lowered to this).
    #[serde(default = "defaults::jwks_refresh_max")]
    pub refresh_max: Dur,
    /// Keys older than this (the JWKS endpoint unreachable meanwhile) make `/readyz` fail;
    /// they still validate.
    #[serde(default = "defaults::jwks_max_age")]
    pub max_key_age: Dur,
    /// A token with an unknown `kid` triggers at most one JWKS refetch per this interval.
    #[serde(default = "defaults::unknown_kid_interval")]
    pub unknown_kid_refetch_interval: Dur,
    /// Timeout of each JWKS or discovery request.
    #[serde(default = "defaults::auth_http_timeout")]
    pub http_timeout: Dur,
}

impl JwtConfig {
    /// Defaults for fetching a client's keys (the embedded authorization server): the
    /// same refresh and rate limits as the gateway's own key source.
    pub fn for_client_keys() -> JwtConfig {
        JwtConfig {
            issuer: String::new(),
            audience: String::new(),
            jwks_uri: None,
            jwks: None,
            algorithms: defaults::algorithms(),
            refresh_min: defaults::jwks_refresh_min(),
            refresh_max: defaults::jwks_refresh_max(),
            max_key_age: defaults::jwks_max_age(),
            unknown_kid_refetch_interval: defaults::unknown_kid_interval(),
            http_timeout: defaults::auth_http_timeout(),
        }
    }
}

/// `[auth.introspection]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// The RFC 7662 endpoint.
    pub endpoint: String,
    /// The gateway's client id at the authorization server.
    pub client_id: Option<String>,
    /// `client_secret_basic` authentication.
    pub client_secret: Option<String>,
    /// `private_key_jwt` authentication: PEM private key.
    pub private_key: Option<PathBuf>,
    /// Algorithm of the private-key assertion: `ES384` or `RS384`.
    #[serde(default)]
    pub private_key_alg: AssertionKeyAlgorithm,
    /// Authenticate with this bearer token instead (SMART 2.2 allows it).
    pub bearer_token: Option<String>,
    /// Our audience; an `aud` in the response must contain it. Defaults to
    /// `server.public_base_url`.
    pub audience: Option<String>,
    /// Timeout of each introspection request (then 503).
    #[serde(default = "defaults::auth_http_timeout")]
    pub timeout: Dur,
}

/// `[auth.identity_headers]`: the caller's identity for the upstream, in headers.
/// Client-supplied headers with these names are always removed, enabled or not.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityHeadersConfig {
    /// Send the headers.
    #[serde(default)]
    pub enabled: bool,
    /// Header for the client id.
    #[serde(default = "defaults::hdr_client_id")]
    pub client_id: String,
    /// Header for the subject.
    #[serde(default = "defaults::hdr_subject")]
    pub subject: String,
    /// Header for the patient in context.
    #[serde(default = "defaults::hdr_patient")]
    pub patient: String,
    /// Header for fhirUser.
    #[serde(default = "defaults::hdr_fhir_user")]
    pub fhir_user: String,
    /// Header for the granted scopes.
    #[serde(default = "defaults::hdr_scopes")]
    pub scopes: String,
}

impl Default for IdentityHeadersConfig {
    fn default() -> Self {
        IdentityHeadersConfig {
            enabled: false,
            client_id: defaults::hdr_client_id(),
            subject: defaults::hdr_subject(),
            patient: defaults::hdr_patient(),
            fhir_user: defaults::hdr_fhir_user(),
            scopes: defaults::hdr_scopes(),
        }
    }
}

impl IdentityHeadersConfig {
    /// The configured header names, in a fixed order.
    pub fn names(&self) -> [&str; 5] {
        [
            &self.client_id,
            &self.subject,
            &self.patient,
            &self.fhir_user,
            &self.scopes,
        ]
    }
}

/// `auth.mode`
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No token check: every request is forwarded. For benchmarks and local trials only;
    /// the gateway warns at start.
    None,
    /// JWT access tokens validated against a JWKS.
    Jwt,
    /// RFC 7662 token introspection.
    Introspection,
    /// Only tokens of the embedded authorization server (validated in-process). In the
    /// other modes its tokens are accepted too, beside the external issuer's.
    Embedded,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `auto` (text on a terminal, JSON otherwise), `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `smartgate=debug,info`.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: defaults::log_level(),
        }
    }
}

/// `log.format`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON lines otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[reload]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the configuration (and TLS) files and reload on change; SIGHUP always reloads.
    #[serde(default = "defaults::yes")]
    pub watch: bool,
    /// How often the files are checked for changes.
    #[serde(default = "defaults::watch_interval")]
    pub interval: Dur,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: true,
            interval: defaults::watch_interval(),
        }
    }
}

mod defaults {
    use super::{ByteSize, Dur, JwsAlgorithm};
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn token_lifetime() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn token_rate_limit() -> u32 {
        10
    }
    pub fn assertion_algorithms() -> Vec<JwsAlgorithm> {
        use JwsAlgorithm::*;
        vec![RS384, ES384, RS256, ES256]
    }
    pub fn replay_cache_max_entries() -> u64 {
        100_000
    }
    pub fn max_request_body() -> ByteSize {
        ByteSize(16 << 20)
    }
    pub fn max_response_buffer() -> ByteSize {
        ByteSize(32 << 20)
    }
    pub fn shutdown_grace() -> Dur {
        Dur(Duration::from_secs(20))
    }
    pub fn refresh_token_lifetime() -> Dur {
        Dur(Duration::from_secs(30 * 86_400))
    }
    pub fn fhir_user_claim() -> String {
        "fhirUser".into()
    }
    pub fn login_scopes() -> Vec<String> {
        vec!["openid".into(), "profile".into()]
    }
    pub fn store_prefix() -> String {
        "smartgate:".into()
    }
    pub fn store_timeout() -> Dur {
        Dur(Duration::from_secs(2))
    }
    pub fn store_max_entries() -> usize {
        100_000
    }
    pub fn shutdown_delay() -> Dur {
        Dur(Duration::ZERO)
    }
    pub fn audit_max_size() -> ByteSize {
        ByteSize(100 << 20)
    }
    pub fn audit_max_files() -> u32 {
        5
    }
    pub fn audit_buffer() -> ByteSize {
        ByteSize(8 << 20)
    }
    pub fn header_read_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9090))
    }
    pub fn upstream_timeout() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn connect_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn upstream_idle_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn pool_max_idle() -> usize {
        64
    }
    pub fn pool_idle_timeout() -> Dur {
        Dur(Duration::from_secs(90))
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn watch_interval() -> Dur {
        Dur(Duration::from_secs(2))
    }
    pub fn realm() -> String {
        "smartgate".to_owned()
    }
    pub fn leeway() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn cache_max_entries() -> u64 {
        100_000
    }
    pub fn cache_max_ttl() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn negative_ttl() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn claim_scope() -> String {
        "scope".to_owned()
    }
    pub fn claim_patient() -> String {
        "patient".to_owned()
    }
    pub fn claim_encounter() -> String {
        "encounter".to_owned()
    }
    pub fn claim_fhir_user() -> String {
        "fhirUser".to_owned()
    }
    pub fn claim_fhir_context() -> String {
        "fhirContext".to_owned()
    }
    pub fn claim_client_id() -> Vec<String> {
        vec!["client_id".to_owned(), "azp".to_owned()]
    }
    pub fn algorithms() -> Vec<JwsAlgorithm> {
        use JwsAlgorithm::*;
        vec![RS256, RS384, ES256, ES384]
    }
    pub fn jwks_refresh_min() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn jwks_refresh_max() -> Dur {
        Dur(Duration::from_secs(86_400))
    }
    pub fn jwks_max_age() -> Dur {
        Dur(Duration::from_secs(86_400))
    }
    pub fn unknown_kid_interval() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn auth_http_timeout() -> Dur {
        Dur(Duration::from_secs(5))
    }
    pub fn hdr_client_id() -> String {
        "X-Smart-Client-Id".to_owned()
    }
    pub fn hdr_subject() -> String {
        "X-Smart-Subject".to_owned()
    }
    pub fn hdr_patient() -> String {
        "X-Smart-Patient".to_owned()
    }
    pub fn hdr_fhir_user() -> String {
        "X-Smart-Fhir-User".to_owned()
    }
    pub fn hdr_scopes() -> String {
        "X-Smart-Scopes".to_owned()
    }
}

/// A configuration that cannot be used, naming the file, the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path}: not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key has a wrong, missing or unknown value.
    #[error("{path}: {key}: {message}{}", env_note(.env_var))]
    Key {
        /// The file.
        path: String,
        /// Dotted key, e.g. `upstream.url`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
        /// The environment variable the value came from, when it did.
        env_var: Option<String>,
    },
}

fn env_note(var: &Option<String>) -> String {
    match var {
        Some(v) => format!(" (set by environment variable {v})"),
        None => String::new(),
    }
}

impl ConfigError {
    /// The dotted key this error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Key { key, .. } => Some(key),
            _ => None,
        }
    }
}

impl Config {
    /// Reads `path`, applies `SMARTGATE__…` overrides from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string(), env)
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_owned(),
            message: e.message().to_owned() + &line_of(text, e.span()),
        })?;
        let overridden =
            env::apply(&mut table, env).map_err(|(var, message)| ConfigError::Key {
                path: origin.to_owned(),
                key: var.clone(),
                message,
                env_var: Some(var),
            })?;
        let key_error = |key: String, message: String| {
            let env_var = overridden
                .iter()
                .find(|(k, _)| key == *k || key.starts_with(&format!("{k}.")))
                .map(|(_, v)| v.clone());
            ConfigError::Key {
                path: origin.to_owned(),
                key,
                message,
                env_var,
            }
        };
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." {
                    "(top level)".to_owned()
                } else {
                    key
                };
                key_error(key, e.inner().message().trim().to_owned())
            })?;
        config.validate().map_err(|(k, m)| key_error(k, m))?;
        Ok(config)
    }

    /// Checks what types alone cannot: header syntax, cross-key rules.
    fn validate(&self) -> Result<(), (String, String)> {
        for (name, value) in &self.upstream.headers {
            let key = format!("upstream.headers.{name}");
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| (key.clone(), format!("{name:?} is not a valid header name")))?;
            http::HeaderValue::from_str(value)
                .map_err(|_| (key, "is not a valid header value".to_owned()))?;
        }
        let bulk = &self.bulk_data;
        let keys = bulk
            .status_key
            .iter()
            .map(|k| ("bulk_data.status_key".to_owned(), k));
        let previous = bulk.previous_status_keys.iter().enumerate();
        let previous = previous.map(|(i, k)| (format!("bulk_data.previous_status_keys[{i}]"), k));
        for (name, key) in keys.chain(previous) {
            if key.len() < 32 {
                return Err((
                    name,
                    format!("is {} characters long; at least 32 are needed", key.len()),
                ));
            }
        }
        if bulk.status_key.is_none() && !bulk.previous_status_keys.is_empty() {
            return Err((
                "bulk_data.previous_status_keys".into(),
                "needs bulk_data.status_key, the key that replaced them".into(),
            ));
        }
        if self.server.workers > 1024 {
            return Err((
                "server.workers".into(),
                format!("{} is more than 1024", self.server.workers),
            ));
        }
        if self.server.max_request_body.0 == 0 {
            return Err((
                "server.max_request_body".into(),
                "must be greater than 0".into(),
            ));
        }
        if self.server.header_read_timeout.0.is_zero() {
            // Not "no limit": every connection waiting for a request would be closed.
            return Err((
                "server.header_read_timeout".into(),
                "must be greater than 0".into(),
            ));
        }
        if self.upstream.timeout.0.is_zero() {
            return Err(("upstream.timeout".into(), "must be greater than 0".into()));
        }
        if self.upstream.connect_timeout.0.is_zero() {
            return Err((
                "upstream.connect_timeout".into(),
                "must be greater than 0".into(),
            ));
        }
        if self.upstream.idle_timeout.0.is_zero() {
            return Err((
                "upstream.idle_timeout".into(),
                "must be greater than 0".into(),
            ));
        }
        if self.reload.interval.0 < std::time::Duration::from_millis(100) {
            return Err((
                "reload.interval".into(),
                format!("{} is too short (at least 100ms)", self.reload.interval),
            ));
        }
        if self.server.listen == self.admin.listen && self.server.listen.port() != 0 {
            return Err((
                "admin.listen".into(),
                format!("{} is also server.listen", self.admin.listen),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err((
                "log.level".into(),
                format!("{:?} is not a log filter: {e}", self.log.level),
            ));
        }
        if self.auth.mode == AuthMode::None
            && !self.server.listen.ip().is_loopback()
            && !self.auth.allow_unauthenticated
        {
            return Err((
                "auth.mode".into(),
                format!(
                    "\"none\" forwards every request without a token check, and server.listen \
                     ({}) is not a loopback address; choose a token mode, or set \
                     auth.allow_unauthenticated = true if this is really wanted",
                    self.server.listen
                ),
            ));
        }
        self.validate_audit()?;
        self.validate_auth()?;
        self.validate_authorization_server()?;
        Ok(())
    }

    /// The discovery configuration with the embedded server's endpoints filled in.
    pub fn effective_smart(&self) -> Option<SmartConfig> {
        let a = &self.authorization_server;
        if !a.enabled {
            return self.smart.clone();
        }
        let base = self.server.public_base_url.as_string();
        let base = base.trim_end_matches('/');
        let mut s = self.smart.clone().unwrap_or_default();
        if s.token_endpoint.is_empty() {
            s.token_endpoint = format!("{base}/auth/token");
        }
        s.introspection_endpoint
            .get_or_insert_with(|| format!("{base}/auth/introspect"));
        let symmetric = a.clients.iter().any(|c| c.client_secret_hash.is_some());
        let asymmetric = a
            .clients
            .iter()
            .any(|c| c.client_secret_hash.is_none() && !c.public);
        if a.login.is_some() {
            app_launch_discovery(&mut s, base, a.clients.iter().any(|c| c.public));
        }
        let mut caps = Vec::new();
        if asymmetric || !symmetric {
            caps.push("client-confidential-asymmetric");
        }
        if symmetric {
            caps.push("client-confidential-symmetric");
        }
        caps.extend(["permission-v2", "permission-v1"]);
        for c in caps {
            if !s.capabilities.iter().any(|x| x == c) {
                s.capabilities.push(c.to_owned());
            }
        }
        let mut methods = Vec::new();
        if asymmetric || !symmetric {
            methods.push("private_key_jwt".to_owned());
        }
        if symmetric {
            methods.push("client_secret_basic".to_owned());
        }
        if a.clients.iter().any(|c| c.public) {
            methods.push("none".to_owned());
        }
        s.token_endpoint_auth_methods_supported
            .get_or_insert(methods);
        s.token_endpoint_auth_signing_alg_values_supported
            .get_or_insert_with(|| {
                a.assertion_algorithms
                    .iter()
                    .map(|alg| alg.as_str().to_owned())
                    .collect()
            });
        s.grant_types_supported.get_or_insert_with(|| {
            let mut grants = vec!["client_credentials".to_owned()];
            if a.login.is_some() {
                grants.insert(0, "authorization_code".to_owned());
            }
            grants
        });
        if s.scopes_supported.is_none() {
            let mut scopes: Vec<String> = a
                .clients
                .iter()
                .flat_map(|c| {
                    c.scope
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                })
                .collect();
            scopes.sort();
            scopes.dedup();
            s.scopes_supported = Some(scopes);
        }
        Some(s)
    }

    fn validate_audit(&self) -> Result<(), (String, String)> {
        let a = &self.audit;
        if a.sink.file() && a.path.is_none() {
            return Err((
                "audit.path".into(),
                format!("is required with sink = \"{}\"", a.sink.name()),
            ));
        }
        if a.max_size.0 < 4096 {
            return Err(("audit.max_size".into(), "must be at least 4KiB".into()));
        }
        if a.buffer.0 < 4096 {
            return Err(("audit.buffer".into(), "must be at least 4KiB".into()));
        }
        Ok(())
    }

    fn validate_authorization_server(&self) -> Result<(), (String, String)> {
        let a = &self.authorization_server;
        let err = |k: &str, m: String| Err((format!("authorization_server.{k}"), m));
        if !a.enabled {
            return Ok(());
        }
        let secs = a.token_lifetime.0.as_secs();
        if !(1..=3600).contains(&secs) {
            return err(
                "token_lifetime",
                format!("{secs}s is outside 1s..1h (SMART: at most 5 minutes)"),
            );
        }
        if a.rate_limit == 0 {
            return err("rate_limit", "must be at least 1".into());
        }
        if let Some(login) = &a.login {
            if let Err(m) = BaseUrl::parse(&login.issuer) {
                return err("login.issuer", m);
            }
            if login.client_id.is_empty() {
                return err("login.client_id", "must not be empty".into());
            }
            if !login.scopes.iter().any(|s| s == "openid") {
                return err("login.scopes", "must include openid".into());
            }
        }
        if let Some(url) = &a.store.url
            && !url.starts_with("redis://")
        {
            return err(
                "store.url",
                format!("{url:?} is not a redis://host:port URL"),
            );
        }
        if a.store.max_entries == 0 {
            return err("store.max_entries", "must be greater than 0".into());
        }
        if a.assertion_algorithms.contains(&JwsAlgorithm::EdDSA) {
            return err(
                "assertion_algorithms",
                "EdDSA is not among SMART's client assertion algorithms".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in a.clients.iter().enumerate() {
            if !seen.insert(c.client_id.as_str()) {
                return err(
                    &format!("clients[{i}].client_id"),
                    format!("{:?} is empty or registered twice", c.client_id),
                );
            }
            self.validate_client(i, c)?;
        }
        Ok(())
    }

    /// One `[[authorization_server.clients]]` entry.
    fn validate_client(&self, i: usize, c: &ClientConfig) -> Result<(), (String, String)> {
        let a = &self.authorization_server;
        let err = |k: &str, m: String| Err((format!("authorization_server.{k}"), m));
        let key = |k: &str| format!("clients[{i}].{k}");
        if c.client_id.is_empty() {
            return err(&key("client_id"), "must not be empty".into());
        }
        let sources = [
            c.jwks.is_some(),
            c.jwks_uri.is_some(),
            c.client_secret_hash.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if c.public && sources != 0 {
            return err(
                &key("public"),
                "a public client has no jwks, jwks_uri or client_secret_hash".into(),
            );
        }
        if !c.public && sources != 1 {
            return err(
                &key("jwks"),
                "set exactly one of jwks, jwks_uri, client_secret_hash (or public = true)".into(),
            );
        }
        if c.ehr && c.public {
            return err(
                &key("ehr"),
                "an EHR mints launch contexts and must authenticate: not public".into(),
            );
        }
        if c.public && c.redirect_uris.is_empty() {
            return err(
                &key("redirect_uris"),
                "a public client signs users in, and needs at least one".into(),
            );
        }
        for (j, uri) in c.redirect_uris.iter().enumerate() {
            let u = BaseUrl::parse(uri).map_err(|m| {
                (
                    format!(
                        "authorization_server.{}",
                        key(&format!("redirect_uris[{j}]"))
                    ),
                    m,
                )
            })?;
            let local = ["localhost", "127.0.0.1", "[::1]"]
                .iter()
                .any(|h| u.authority == *h || u.authority.starts_with(&format!("{h}:")));
            if u.scheme != "https" && !local || uri.contains('#') {
                return err(
                    &key(&format!("redirect_uris[{j}]")),
                    format!("{uri:?} must be https (http only for localhost) with no fragment"),
                );
            }
        }
        if !c.redirect_uris.is_empty() && a.login.is_none() {
            return err(
                &key("redirect_uris"),
                "apps sign users in: [authorization_server.login] is required".into(),
            );
        }
        if let Some(u) = &c.jwks_uri
            && let Err(e) = BaseUrl::parse(u)
        {
            return err(&key("jwks_uri"), e);
        }
        if let Some(h) = &c.client_secret_hash
            && !h
                .strip_prefix("sha256:")
                .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return err(
                &key("client_secret_hash"),
                "must be sha256:<64 hex digits> (echo -n SECRET | sha256sum)".into(),
            );
        }
        if c.scope.split(' ').all(str::is_empty) {
            return err(&key("scope"), "must grant at least one scope".into());
        }
        // RFC 6749 §3.3: scope tokens of %x21 / %x23-5B / %x5D-7E, separated by SP
        // only. A tab or a line break would make the registration one malformed scope.
        if !c
            .scope
            .bytes()
            .all(|b| matches!(b, b' ' | 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
        {
            return err(
                &key("scope"),
                "scopes are separated by single spaces and hold only the characters RFC 6749 §3.3 allows".into(),
            );
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), (String, String)> {
        let a = &self.auth;
        let err = |k: &str, m: String| Err((k.to_owned(), m));
        if a.realm.is_empty() || a.realm.contains(['"', '\\']) || !a.realm.is_ascii() {
            return err(
                "auth.realm",
                format!("{:?} must be non-empty ASCII without quotes", a.realm),
            );
        }
        if a.cache_max_entries == 0 {
            return err("auth.cache_max_entries", "must be greater than 0".into());
        }
        for (i, name) in a.identity_headers.names().iter().enumerate() {
            let key = ["client_id", "subject", "patient", "fhir_user", "scopes"][i];
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return err(
                    &format!("auth.identity_headers.{key}"),
                    format!("{name:?} is not a valid header name"),
                );
            }
        }
        match a.mode {
            AuthMode::None => Ok(()),
            AuthMode::Embedded if !self.authorization_server.enabled => err(
                "auth.mode",
                "\"embedded\" needs [authorization_server] enabled = true".into(),
            ),
            AuthMode::Embedded => Ok(()),
            AuthMode::Jwt => {
                let Some(j) = &a.jwt else {
                    return err("auth.jwt", "is required when auth.mode = \"jwt\"".into());
                };
                if j.issuer.is_empty() {
                    return err("auth.jwt.issuer", "must not be empty".into());
                }
                if j.audience.is_empty() {
                    return err("auth.jwt.audience", "must not be empty".into());
                }
                if j.algorithms.is_empty() {
                    return err(
                        "auth.jwt.algorithms",
                        "must name at least one algorithm".into(),
                    );
                }
                match (&j.jwks_uri, &j.jwks) {
                    (Some(_), Some(_)) => {
                        return err(
                            "auth.jwt.jwks",
                            "set either jwks or jwks_uri, not both".into(),
                        );
                    }
                    (Some(uri), None) => {
                        BaseUrl::parse(uri).map_err(|m| ("auth.jwt.jwks_uri".to_owned(), m))?;
                    }
                    (None, Some(_)) => {}
                    (None, None) => {
                        BaseUrl::parse(&j.issuer).map_err(|m| {
                            (
                                "auth.jwt.issuer".to_owned(),
                                format!("{m} (needed to discover the JWKS; or set jwks_uri)"),
                            )
                        })?;
                    }
                }
                if j.refresh_min.0 > j.refresh_max.0 {
                    return err("auth.jwt.refresh_min", "must not exceed refresh_max".into());
                }
                Ok(())
            }
            AuthMode::Introspection => {
                let Some(i) = &a.introspection else {
                    return err(
                        "auth.introspection",
                        "is required when auth.mode = \"introspection\"".into(),
                    );
                };
                BaseUrl::parse(&i.endpoint)
                    .map_err(|m| ("auth.introspection.endpoint".to_owned(), m))?;
                let methods = [
                    i.client_secret.is_some(),
                    i.private_key.is_some(),
                    i.bearer_token.is_some(),
                ];
                if methods.iter().filter(|m| **m).count() != 1 {
                    return err(
                        "auth.introspection",
                        "set exactly one of client_secret, private_key, bearer_token".into(),
                    );
                }
                if (i.client_secret.is_some() || i.private_key.is_some()) && i.client_id.is_none() {
                    return err(
                        "auth.introspection.client_id",
                        "is required with client_secret or private_key".into(),
                    );
                }
                Ok(())
            }
        }
    }

    /// The effective configuration as TOML, secrets replaced by `"***"`.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for value in masked.upstream.headers.values_mut() {
            *value = "***".to_owned();
        }
        if let Some(i) = masked.auth.introspection.as_mut() {
            for secret in [&mut i.client_secret, &mut i.bearer_token]
                .into_iter()
                .flatten()
            {
                *secret = "***".to_owned();
            }
        }
        let bulk = &mut masked.bulk_data;
        for key in bulk
            .status_key
            .iter_mut()
            .chain(&mut bulk.previous_status_keys)
        {
            *key = "***".to_owned();
        }
        for c in &mut masked.authorization_server.clients {
            if let Some(h) = c.client_secret_hash.as_mut() {
                *h = "***".to_owned();
            }
        }
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// What SMART App Launch through the embedded server adds to discovery.
fn app_launch_discovery(s: &mut SmartConfig, base: &str, public_clients: bool) {
    s.authorization_endpoint
        .get_or_insert_with(|| format!("{base}/auth/authorize"));
    s.revocation_endpoint
        .get_or_insert_with(|| format!("{base}/auth/revoke"));
    s.issuer.get_or_insert_with(|| base.to_owned());
    s.jwks_uri
        .get_or_insert_with(|| format!("{base}/auth/jwks"));
    s.response_types_supported
        .get_or_insert_with(|| vec!["code".to_owned()]);
    let mut launch = vec![
        "launch-ehr",
        "context-ehr-patient",
        "context-ehr-encounter",
        "launch-standalone",
        "context-standalone-patient",
        "permission-offline",
        "permission-online",
        "permission-patient",
        "permission-user",
        "sso-openid-connect",
    ];
    if public_clients {
        launch.push("client-public");
    }
    for c in launch {
        if !s.capabilities.iter().any(|x| x == c) {
            s.capabilities.push(c.to_owned());
        }
    }
}

impl AuthMode {
    /// The mode as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Jwt => "jwt",
            AuthMode::Introspection => "introspection",
            AuthMode::Embedded => "embedded",
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `" (line N)"` for a parser span, so operators can find the spot.
fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests;

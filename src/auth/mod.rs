//! Authentication: the bearer token → [`Principal`], or a refusal.
//!
//! JWT mode verifies signatures against a JWKS; introspection mode asks the authorization
//! server (RFC 7662). Verdicts, good and bad, are cached under a hash of the token *and*
//! its verifier (issuer or endpoint), never past the token's `exp`; concurrent first
//! lookups of one token share one verification.

pub mod bearer;
pub mod cache;
pub mod claims;
pub mod explain;
pub mod introspection;
pub mod issuer;
pub mod jwks;
pub mod jws;
pub mod jwt;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec};
use sha2::{Digest, Sha256};

pub use claims::Principal;

use crate::config::{AuthMode, ClaimsConfig, Config};
use crate::metrics::Metrics;
use crate::outbound::Outbound;

/// Why a token is refused: 401 `invalid_token`. The description is deliberately
/// coarse; it tells a client what to fix without helping an attacker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of the expected shape.
    #[error("malformed")]
    Malformed,
    /// `alg` not allowed (`none`, HS*, or not configured).
    #[error("algorithm")]
    Algorithm,
    /// No key with the token's `kid` (or none that fits its `alg`).
    #[error("unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("signature")]
    Signature,
    /// Past `exp`.
    #[error("expired")]
    Expired,
    /// Before `nbf` or `iat`.
    #[error("not yet valid")]
    NotYetValid,
    /// Wrong `iss`.
    #[error("issuer")]
    Issuer,
    /// Our audience is not in `aud`.
    #[error("audience")]
    Audience,
    /// `exp`, `iss` or `aud` missing.
    #[error("missing claim")]
    MissingClaim,
    /// Introspection says `active: false`.
    #[error("inactive")]
    Inactive,
    /// `typ` is not an access token type.
    #[error("token type")]
    Type,
    /// Bound to a key or certificate (`cnf`: DPoP, RFC 9449; mutual TLS, RFC 8705). The
    /// gateway checks no proof of possession, so it cannot take such a token as a bearer
    /// token: a stolen one would work here though nowhere else.
    #[error("sender-constrained")]
    SenderConstrained,
}

impl TokenError {
    /// Every refusal, for series created at zero.
    pub const ALL: [TokenError; 12] = [
        TokenError::Malformed,
        TokenError::Algorithm,
        TokenError::UnknownKey,
        TokenError::Signature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::Issuer,
        TokenError::Audience,
        TokenError::MissingClaim,
        TokenError::Inactive,
        TokenError::Type,
        TokenError::SenderConstrained,
    ];

    /// Stable code for metrics and the access log.
    pub fn code(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::Issuer => "issuer",
            TokenError::Audience => "audience",
            TokenError::MissingClaim => "missing_claim",
            TokenError::Inactive => "inactive",
            TokenError::Type => "type",
            TokenError::SenderConstrained => "sender_constrained",
        }
    }

    /// Text for `error_description`.
    pub fn description(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::Algorithm => "algorithm",
            TokenError::UnknownKey => "signature",
            TokenError::Signature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not yet valid",
            TokenError::Issuer => "issuer",
            TokenError::Audience => "audience",
            TokenError::MissingClaim => "malformed",
            TokenError::Inactive => "inactive",
            TokenError::Type => "token type",
            TokenError::SenderConstrained => "bound to a key (cnf), which is not checked here",
        }
    }
}

/// Why authentication gave no principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token at all.
    Missing,
    /// The request is malformed (400 `invalid_request`).
    InvalidRequest(&'static str),
    /// The token is refused (401 `invalid_token`).
    Invalid(TokenError),
    /// The token could not be judged: keys or introspection unavailable (503).
    Unavailable,
}

impl From<bearer::BearerError> for AuthFailure {
    fn from(e: bearer::BearerError) -> Self {
        match e {
            bearer::BearerError::Missing => AuthFailure::Missing,
            bearer::BearerError::Malformed(why) => AuthFailure::InvalidRequest(why),
            bearer::BearerError::Invalid(_) => AuthFailure::Invalid(TokenError::Malformed),
        }
    }
}

enum Verifier {
    Jwt(jwt::JwtVerifier),
    Introspection(Box<introspection::Introspector>),
    /// Only the embedded server's tokens.
    EmbeddedOnly,
}

/// A cached verdict: the principal, or the refusal.
pub type Verdict = Result<Arc<Principal>, TokenError>;

/// Most valid verdicts a worker keeps in its own first-level cache.
const LOCAL_MAX: usize = 1024;
/// Longest token kept there (longer ones use the shared cache only).
const LOCAL_TOKEN_MAX: usize = 4096;

thread_local! {
    /// A worker's own cache of valid verdicts, in front of the shared one: each worker is
    /// single-threaded, so a hit here takes no lock and touches no shared cache line.
    /// Keyed by authenticator instance too, so verdicts never survive an `[auth]` change.
    static LOCAL: RefCell<LocalCache> = const { RefCell::new(HashMap::with_hasher(BuildFast)) };
}

/// token → (authenticator id, principal, valid until). Keyed by the token itself with
/// a cheap hash: a hit costs one pass over the token and one comparison, where the shared
/// cache's SHA-256 key costs a cryptographic hash per request. Only verified tokens are
/// ever inserted, so colliding keys cannot be planted from outside.
type LocalCache = HashMap<Box<str>, (u64, Arc<Principal>, Instant), BuildFast>;

/// A fast non-cryptographic hasher for [`LocalCache`] (FxHash-style: 8 bytes a step).
#[derive(Default, Clone, Copy)]
struct BuildFast;

impl std::hash::BuildHasher for BuildFast {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let v = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Turns bearer tokens into principals for one `[auth]` configuration.
pub struct Authenticator {
    id: u64,
    /// The embedded authorization server's tokens, verified in-process.
    embedded: Option<Arc<crate::auth::issuer::Issuer>>,
    leeway: u64,
    max_ttl: Duration,
    mode: &'static str,
    verifier: Verifier,
    /// Hashed with every token, so one token string never matches across verifiers
    /// (Oathkeeper CVE-2026-33496: a cache shared across issuers).
    cache_scope: String,
    cache: cache::VerdictCache,
    negative_ttl: Duration,
    claims: ClaimsConfig,
    /// Scope claims, issuers and client ids shared by this verifier's principals.
    shared: claims::Interner,
    validations: IntCounterVec,
    cache_events: IntCounterVec,
    /// The hot-path series, resolved once.
    hit: IntCounter,
    valid: IntCounter,
    scopes_ignored: IntCounter,
}

impl Authenticator {
    /// Builds the authenticator for `config.auth`, or `None` for `mode = "none"`. Starts
    /// the JWKS refresh on the current runtime.
    pub fn new(
        config: &Config,
        outbound: &Outbound,
        metrics: &Metrics,
        embedded: Option<Arc<crate::auth::issuer::Issuer>>,
    ) -> Result<Option<Arc<Authenticator>>, String> {
        let auth = &config.auth;
        let (mode, verifier, cache_scope) = match auth.mode {
            AuthMode::None => return Ok(None),
            AuthMode::Embedded => ("embedded", Verifier::EmbeddedOnly, "embedded".to_owned()),
            AuthMode::Jwt => {
                let cfg = auth.jwt.as_ref().ok_or("auth.jwt: missing")?;
                let keys = Arc::new(
                    jwks::KeySource::new(cfg, outbound.clone(), metrics.jwks_fetches.clone())
                        .map_err(|e| format!("auth.jwt.jwks: {e}"))?
                        .with_last_success(metrics.jwks_last_success.clone()),
                );
                keys.spawn_refresh();
                let scope = format!("jwt\0{}\0{}", cfg.issuer, cfg.audience);
                (
                    "jwt",
                    Verifier::Jwt(jwt::JwtVerifier::new(cfg, auth.leeway.0, keys)),
                    scope,
                )
            }
            AuthMode::Introspection => {
                let cfg = auth
                    .introspection
                    .as_ref()
                    .ok_or("auth.introspection: missing")?;
                let public = config.server.public_base_url.as_string();
                let i = introspection::Introspector::new(cfg, &public, outbound.clone())?;
                let scope = format!("introspection\0{}", i.endpoint());
                ("introspection", Verifier::Introspection(Box::new(i)), scope)
            }
        };
        let results = ["valid", "unavailable"]
            .into_iter()
            .chain(TokenError::ALL.map(TokenError::code));
        for result in results {
            metrics.token_validations.with_label_values(&[mode, result]);
        }
        Ok(Some(Arc::new(Authenticator {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            embedded,
            leeway: auth.leeway.0.as_secs(),
            max_ttl: auth.cache_max_ttl.0,
            mode,
            verifier,
            cache_scope,
            cache: cache::VerdictCache::new(auth.cache_max_entries),
            negative_ttl: auth.negative_ttl.0,
            claims: auth.claims.clone(),
            shared: claims::Interner::default(),
            validations: metrics.token_validations.clone(),
            cache_events: metrics.token_cache.clone(),
            hit: metrics.token_cache.with_label_values(&["hit"]),
            scopes_ignored: metrics.scopes_ignored.clone(),
            valid: metrics
                .token_validations
                .with_label_values(&[mode, "valid"]),
        })))
    }

    /// The principal for `token`, from the cache or by verification.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, AuthFailure> {
        if let Some(p) = self.local_get(token) {
            self.hit.inc();
            self.valid.inc();
            return Ok(p);
        }
        let key = self.cache_key(token);
        let mut hit = false;
        let verdict = match self.cache.get(&key) {
            Some(v) => {
                self.hit.inc();
                hit = true;
                v
            }
            None => {
                self.cache_events.with_label_values(&["miss"]).inc();
                // Concurrent misses for one key wait for this one verification. Boxed: the
                // future is large and rare, and would otherwise sit inline in every
                // request's future.
                let verified = Box::pin(self.cache.get_or_verify(
                    key,
                    self.verify(token),
                    |_, inserted| {
                        if inserted == cache::Inserted::Evicted {
                            self.cache_events.with_label_values(&["eviction"]).inc();
                        }
                    },
                    |v| self.time_to_live(v),
                ))
                .await;
                match verified {
                    Ok(v) => v,
                    Err(_) => {
                        self.count("unavailable");
                        return Err(AuthFailure::Unavailable);
                    }
                }
            }
        };
        match verdict {
            Ok(p) => {
                // An entry never outlives exp, but a hit right at the edge must not pass.
                if p.expires_at
                    .is_some_and(|exp| exp < jsonwebtoken::get_current_timestamp())
                {
                    self.count(TokenError::Expired.code());
                    return Err(AuthFailure::Invalid(TokenError::Expired));
                }
                self.valid.inc();
                // A token seen once (the cold path) goes no further than the shared cache;
                // its second use marks it and brings it to this worker's cache.
                if hit {
                    p.mark_used();
                    self.local_put(token, &p);
                }
                Ok(p)
            }
            Err(e) => {
                self.count(e.code());
                Err(AuthFailure::Invalid(e))
            }
        }
    }

    fn local_get(&self, token: &str) -> Option<Arc<Principal>> {
        LOCAL.with(|l| {
            let l = l.borrow();
            let (id, p, until) = l.get(token)?;
            (*id == self.id && Instant::now() < *until).then(|| p.clone())
        })
    }

    /// How long a verdict is kept: a valid one until the token's `exp`, capped by
    /// `cache_max_ttl`; a refusal for `negative_ttl`.
    fn time_to_live(&self, v: &Verdict) -> Duration {
        match v {
            Ok(p) => match p.expires_at {
                Some(exp) => {
                    Duration::from_secs(exp.saturating_sub(jsonwebtoken::get_current_timestamp()))
                        .min(self.max_ttl)
                }
                None => self.max_ttl,
            },
            Err(_) => self.negative_ttl,
        }
    }

    /// Keeps a valid verdict for this worker, as long as the shared cache would (capped
    /// by `cache_max_ttl` and the token's `exp`).
    fn local_put(&self, token: &str, p: &Arc<Principal>) {
        let ttl = self.time_to_live(&Ok(p.clone()));
        // Bounded memory: at most LOCAL_MAX tokens of at most LOCAL_TOKEN_MAX bytes.
        if ttl.is_zero() || token.len() > LOCAL_TOKEN_MAX {
            return;
        }
        LOCAL.with(|l| {
            let mut l = l.borrow_mut();
            if l.len() >= LOCAL_MAX {
                // Crude but bounded: start over rather than track recency per entry.
                l.clear();
            }
            l.insert(token.into(), (self.id, p.clone(), Instant::now() + ttl));
        });
    }

    /// Verifies without the cache (what a cache miss runs; also `explain-token`).
    pub async fn verify(&self, token: &str) -> Result<Verdict, Unavailable> {
        let ours = self
            .embedded
            .as_ref()
            .filter(|i| i.claims_to_be_ours(token));
        let claims = match (ours, &self.verifier) {
            (Some(issuer), _) => issuer.verify(token, self.leeway),
            (None, Verifier::EmbeddedOnly) => Err(match self.embedded {
                Some(_) => TokenError::Issuer,
                None => TokenError::UnknownKey,
            }),
            (None, v) => Self::verify_external(v, token).await?,
        };
        Ok(claims.map(|c| {
            let p = claims::principal(&c, &self.claims, &self.shared);
            // Counted once per verification (verdicts are cached), not per request.
            self.scopes_ignored.inc_by(p.grants.ignored.len() as u64);
            Arc::new(p)
        }))
    }

    async fn verify_external(
        verifier: &Verifier,
        token: &str,
    ) -> Result<Result<serde_json::Map<String, serde_json::Value>, TokenError>, Unavailable> {
        Ok(match verifier {
            Verifier::Jwt(v) => v.verify(token).await.map_err(|_| {
                tracing::warn!("token not verifiable: no signing keys available");
                Unavailable
            })?,
            Verifier::Introspection(i) => i.introspect(token).await.map_err(|e| {
                tracing::warn!(error = %e.0, "token not verifiable: introspection unavailable");
                Unavailable
            })?,
            Verifier::EmbeddedOnly => Err(TokenError::Issuer),
        })
    }

    /// Ready when a token could be judged now.
    pub fn readiness(&self) -> Result<(), String> {
        match &self.verifier {
            Verifier::Jwt(v) => v.keys().readiness(),
            Verifier::Introspection(_) | Verifier::EmbeddedOnly => Ok(()),
        }
    }

    /// Token verdicts in the shared cache.
    pub fn cached_verdicts(&self) -> u64 {
        self.cache.len()
    }

    /// `jwt` or `introspection`.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// 128 bits of SHA-256 over the verifier and the token: far beyond any collision a
    /// client could search for (2^64 work for a birthday pair, which would still have to
    /// be two tokens the issuer signed).
    fn cache_key(&self, token: &str) -> cache::Key {
        let mut h = Sha256::new();
        h.update(self.cache_scope.as_bytes());
        h.update([0u8]);
        h.update(token.as_bytes());
        let d: [u8; 32] = h.finalize().into();
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&d[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        [word(0), word(1)]
    }

    fn count(&self, result: &str) {
        self.validations
            .with_label_values(&[self.mode, result])
            .inc();
    }
}

/// The token could not be judged now.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable;

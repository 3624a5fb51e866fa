//! Signing keys for JWT mode: a JWKS given inline or fetched (from `jwks_uri`, or found
//! through the issuer's discovery documents), refreshed in the background within bounds
//! set by `Cache-Control`, refetched on an unknown `kid` at most once per interval, and
//! kept when the endpoint goes down.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use prometheus::IntCounterVec;

use crate::config::JwtConfig;
use crate::outbound::{Outbound, max_age};

/// One verification key.
pub struct Key {
    /// `kid`, if the JWKS gave one.
    pub kid: Option<String>,
    /// The key material, for `jsonwebtoken` (client assertions).
    pub decoding: DecodingKey,
    /// The key parsed once for each algorithm it may verify (access tokens).
    pub verifying: super::jws::VerifyingKey,
    /// What kind of key, to check it fits the token's `alg`.
    pub kind: KeyKind,
    /// The JWK's own `alg`, when it names one.
    pub alg: Option<Algorithm>,
}

/// Key type (and curve), per RFC 7518 §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `kty: RSA`
    Rsa,
    /// `kty: EC`, `crv: P-256`
    EcP256,
    /// `kty: EC`, `crv: P-384`
    EcP384,
    /// `kty: OKP`, `crv: Ed25519`
    Ed25519,
}

impl KeyKind {
    /// Whether a key of this kind may verify `alg` (RFC 7518 §3).
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyKind::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyKind::EcP256, ES256)
                | (KeyKind::EcP384, ES384)
                | (KeyKind::Ed25519, EdDSA)
        )
    }
}

/// A parsed JWKS.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document. Keys not for signatures, symmetric keys and key types we do
    /// not verify with are skipped; a document with no usable key is an error.
    pub fn parse(json: &[u8]) -> Result<KeySet, String> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let kind = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => KeyKind::Rsa,
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => KeyKind::EcP256,
                    EllipticCurve::P384 => KeyKind::EcP384,
                    _ => continue,
                },
                AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                    KeyKind::Ed25519
                }
                // Symmetric ("oct") keys never verify tokens here.
                _ => continue,
            };
            let (Ok(decoding), Some(verifying)) = (
                DecodingKey::from_jwk(jwk),
                super::jws::VerifyingKey::from_jwk(jwk),
            ) else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                decoding,
                verifying,
                kind,
                alg,
            });
        }
        if keys.is_empty() {
            return Err("the JWKS holds no usable signature key".to_owned());
        }
        Ok(KeySet { keys })
    }

    /// The key for a token: by `kid` when the token names one (exact match), else the only
    /// key that fits. The key must fit `alg`, and the JWK's own `alg`, if any, must be it.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&Key> {
        let fitting = |k: &&Key| k.kind.fits(alg) && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .find(fitting),
            None => {
                let mut candidates = self.keys.iter().filter(fitting);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            }
        }
    }

    /// Every key with exactly this `kid` that fits `alg` (the JWK's own `alg`, if any,
    /// must be it).
    pub fn matching<'a>(
        &'a self,
        kid: &'a str,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a DecodingKey> + 'a {
        self.keys
            .iter()
            .filter(move |k| {
                k.kid.as_deref() == Some(kid) && k.kind.fits(alg) && k.alg.is_none_or(|a| a == alg)
            })
            .map(|k| &k.decoding)
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Where keys come from and how fresh they are.
pub struct KeySource {
    current: ArcSwapOption<KeySet>,
    remote: Option<Remote>,
    state: Mutex<FetchState>,
    /// Serialises fetches, so a burst of unknown kids causes one fetch.
    fetch_lock: tokio::sync::Mutex<()>,
    fetches: IntCounterVec,
    /// Set to the time of each successful fetch, when given.
    last_success: Option<prometheus::Gauge>,
}

struct Remote {
    jwks_uri: Option<String>,
    issuer: String,
    outbound: Outbound,
    timeout: Duration,
    refresh_min: Duration,
    refresh_max: Duration,
    max_key_age: Duration,
    unknown_kid_interval: Duration,
}

#[derive(Default)]
struct FetchState {
    /// The JWKS URL, configured or discovered.
    resolved_uri: Option<String>,
    /// When the current keys were fetched.
    fetched_at: Option<Instant>,
    /// When a fetch was last started because of an unknown kid.
    last_kid_fetch: Option<Instant>,
}

/// The keys cannot be had (none fetched yet): the token cannot be judged.
#[derive(Debug, Clone)]
pub struct NoKeys;

impl KeySource {
    /// Keys as configured: inline (ready at once) or remote (fetched by
    /// [`KeySource::spawn_refresh`]).
    pub fn new(
        cfg: &JwtConfig,
        outbound: Outbound,
        fetches: IntCounterVec,
    ) -> Result<KeySource, String> {
        let (current, remote) = match &cfg.jwks {
            Some(doc) => (Some(Arc::new(KeySet::parse(doc.as_bytes())?)), None),
            None => (
                None,
                Some(Remote {
                    jwks_uri: cfg.jwks_uri.clone(),
                    issuer: cfg.issuer.trim_end_matches('/').to_owned(),
                    outbound,
                    timeout: cfg.http_timeout.0,
                    refresh_min: cfg.refresh_min.0,
                    refresh_max: cfg.refresh_max.0,
                    max_key_age: cfg.max_key_age.0,
                    unknown_kid_interval: cfg.unknown_kid_refetch_interval.0,
                }),
            ),
        };
        Ok(KeySource {
            current: ArcSwapOption::new(current),
            remote,
            state: Mutex::new(FetchState::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
            fetches,
            last_success: None,
        })
    }

    /// Records each successful fetch's time on `gauge`.
    pub fn with_last_success(mut self, gauge: prometheus::Gauge) -> KeySource {
        self.last_success = Some(gauge);
        self
    }

    /// The current key set, fetching it first if none was ever loaded.
    pub async fn keys(&self) -> Result<Arc<KeySet>, NoKeys> {
        if let Some(keys) = self.current.load_full() {
            return Ok(keys);
        }
        // Nothing yet (start-up, or the endpoint was down): one try now, rate-limited
        // like unknown kids so a flood of requests is not a flood of fetches.
        let _ = self.fetch_serialised(None, true).await;
        self.current.load_full().ok_or(NoKeys)
    }

    /// At most one on-demand fetch per `unknown_kid_refetch_interval`.
    fn allow_on_demand_fetch(&self) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        if state
            .last_kid_fetch
            .is_some_and(|t| t.elapsed() < remote.unknown_kid_interval)
        {
            return false;
        }
        state.last_kid_fetch = Some(Instant::now());
        true
    }

    /// Called when a token's `kid` is not in `seen`: refetch if the rate limit allows,
    /// and return the newer key set if there is one.
    pub async fn refetch_for_unknown_kid(&self, seen: &Arc<KeySet>) -> Option<Arc<KeySet>> {
        let _ = self.fetch_serialised(Some(seen), true).await;
        let now = self.current.load_full()?;
        (!Arc::ptr_eq(&now, seen)).then_some(now)
    }

    /// One fetch at a time; a caller that waited for another's fetch does not fetch again
    /// when the keys changed meanwhile. On-demand fetches (unknown kid, no keys yet) are
    /// rate-limited, and only a fetch actually made spends the allowance: a request that
    /// merely waited for the start-up fetch must not block a key rotation for 30 s.
    async fn fetch_serialised(
        &self,
        seen: Option<&Arc<KeySet>>,
        on_demand: bool,
    ) -> Result<Duration, String> {
        let _guard = self.fetch_lock.lock().await;
        let current = self.current.load_full();
        let changed = match (seen, &current) {
            (Some(s), Some(c)) => !Arc::ptr_eq(s, c),
            (None, Some(_)) => true,
            _ => false,
        };
        if changed {
            return Ok(Duration::ZERO);
        }
        if on_demand && !self.allow_on_demand_fetch() {
            return Err("on-demand JWKS fetch rate-limited".to_owned());
        }
        self.fetch().await
    }

    /// Fetches the JWKS now; returns when to refresh next.
    async fn fetch(&self) -> Result<Duration, String> {
        let Some(remote) = &self.remote else {
            return Ok(Duration::MAX);
        };
        let result = self.fetch_remote(remote).await;
        let label = if result.is_ok() { "success" } else { "failure" };
        self.fetches.with_label_values(&[label]).inc();
        if let (Ok(_), Some(gauge)) = (&result, &self.last_success) {
            gauge.set(crate::metrics::unix_now());
        }
        if let Err(e) = &result {
            tracing::warn!(error = %e, "JWKS fetch failed; keeping the current keys");
        }
        result
    }

    async fn fetch_remote(&self, remote: &Remote) -> Result<Duration, String> {
        let uri = match self.resolved_uri() {
            Some(uri) => uri,
            None => {
                let uri = match &remote.jwks_uri {
                    Some(uri) => uri.clone(),
                    None => discover(remote).await?,
                };
                if let Ok(mut s) = self.state.lock() {
                    s.resolved_uri = Some(uri.clone());
                }
                uri
            }
        };
        let answer = remote
            .outbound
            .get_json(&uri, remote.timeout)
            .await
            .map_err(|e| format!("{uri}: {e}"))?;
        if !answer.status.is_success() {
            return Err(format!("{uri}: HTTP {}", answer.status));
        }
        let set = KeySet::parse(&answer.body).map_err(|e| format!("{uri}: {e}"))?;
        tracing::info!(keys = set.len(), "JWKS loaded");
        self.current.store(Some(Arc::new(set)));
        if let Ok(mut s) = self.state.lock() {
            s.fetched_at = Some(Instant::now());
        }
        let next = max_age(&answer.headers)
            .unwrap_or(remote.refresh_min)
            .clamp(remote.refresh_min, remote.refresh_max);
        Ok(next)
    }

    fn resolved_uri(&self) -> Option<String> {
        self.state.lock().ok()?.resolved_uri.clone()
    }

    /// Keeps the keys fresh on the current runtime until the source is dropped.
    pub fn spawn_refresh(self: &Arc<Self>) {
        if self.remote.is_none() {
            return;
        }
        let weak: Weak<KeySource> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                let Some(source) = weak.upgrade() else { return };
                let wait = match source.fetch_serialised(None, false).await {
                    // Fetched (or another caller just did): wait per Cache-Control.
                    Ok(next) if next > Duration::ZERO => {
                        backoff = Duration::from_secs(1);
                        next
                    }
                    Ok(_) => source
                        .remote
                        .as_ref()
                        .map_or(Duration::from_secs(300), |r| r.refresh_min),
                    Err(_) => {
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        wait
                    }
                };
                drop(source);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// Ready when keys are loaded and not older than `max_key_age`.
    pub fn readiness(&self) -> Result<(), String> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let state = self
            .state
            .lock()
            .map_err(|_| "key state poisoned".to_owned())?;
        match state.fetched_at {
            None => Err("signing keys not loaded yet".to_owned()),
            Some(t) if t.elapsed() > remote.max_key_age => Err(format!(
                "signing keys are {}s old (JWKS endpoint unreachable)",
                t.elapsed().as_secs()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// `jwks_uri` from the issuer's OpenID Connect discovery document, else from its SMART
/// configuration.
async fn discover(remote: &Remote) -> Result<String, String> {
    let mut last = String::new();
    for doc in [
        "/.well-known/openid-configuration",
        "/.well-known/smart-configuration",
    ] {
        let url = format!("{}{doc}", remote.issuer);
        match remote.outbound.get_json(&url, remote.timeout).await {
            Ok(a) if a.status.is_success() => {
                let v: serde_json::Value =
                    serde_json::from_slice(&a.body).map_err(|e| format!("{url}: not JSON: {e}"))?;
                if let Some(uri) = v.get("jwks_uri").and_then(|u| u.as_str()) {
                    return Ok(uri.to_owned());
                }
                last = format!("{url}: no jwks_uri");
            }
            Ok(a) => last = format!("{url}: HTTP {}", a.status),
            Err(e) => last = format!("{url}: {e}"),
        }
    }
    Err(format!("cannot discover the JWKS: {last}"))
}

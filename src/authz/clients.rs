//! Registered clients and how they authenticate at the token endpoint: a signed client
//! assertion (RFC 7523, SMART client-confidential-asymmetric) or HTTP Basic with a secret
//! (SMART client-confidential-symmetric).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::OAuthError;
use crate::auth::jwks::{KeySet, KeySource};
use crate::config::{AuthorizationServerConfig, ClientConfig, JwtConfig};
use crate::outbound::Outbound;

/// `urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Longest an assertion may live (SMART backend-services: `exp` no more than five
/// minutes in the future).
const MAX_ASSERTION_LIFETIME: u64 = 300;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
const LEEWAY: u64 = 30;

/// How a client proves who it is.
enum Credential {
    /// Its public keys, and keys from allow-listed `jku` URLs.
    Keys {
        source: Arc<KeySource>,
        jku: HashMap<String, Arc<KeySource>>,
    },
    /// SHA-256 of its secret.
    Secret([u8; 32]),
    /// None: a public app, bound by PKCE alone.
    Public,
}

/// One registered client.
pub struct Client {
    /// Its id.
    pub id: String,
    /// The scopes it may be granted at most.
    pub scope: String,
    /// Where an app may be sent back with a code (empty: a backend client).
    pub redirect_uris: Vec<String>,
    /// An EHR, which may mint launch contexts.
    pub ehr: bool,
    credential: Credential,
}

impl Client {
    /// A public app: no credentials.
    pub fn is_public(&self) -> bool {
        matches!(self.credential, Credential::Public)
    }
}

/// The registry, the replay cache and the rate limiter.
pub struct Clients {
    clients: HashMap<String, Client>,
    algorithms: Vec<Algorithm>,
    token_endpoint: String,
    /// `jti`s seen, per client, until their assertions expire; outlives reloads.
    replay: Arc<super::replay::ReplayGuard>,
    /// Most live `jti`s one client may have (`replay_cache_max_entries`).
    replay_per_client: usize,
    /// Per registered client, and one for every id that is not registered: (tokens left,
    /// last refill). Keyed by configuration, never by what a client sends, so its size is
    /// the number of registered clients plus one.
    buckets: Mutex<HashMap<Option<String>, (f64, Instant)>>,
    rate: f64,
    /// With a shared store (Valkey/Redis), assertion ids are also kept there, so one used
    /// on another replica is refused here.
    shared: Option<Arc<crate::store::Store>>,
}

/// Parses `sha256:<64 hex>`.
pub fn parse_secret_hash(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Clients {
    /// The registry for `cfg`; `token_endpoint` is the `aud` assertions must carry.
    pub fn new(
        cfg: &AuthorizationServerConfig,
        token_endpoint: &str,
        outbound: &Outbound,
        fetches: &prometheus::IntCounterVec,
        replay: Arc<super::replay::ReplayGuard>,
        store: &Arc<crate::store::Store>,
    ) -> Result<Clients, String> {
        let mut clients = HashMap::new();
        for (i, c) in cfg.clients.iter().enumerate() {
            let built = client(c, outbound, fetches).map_err(|e| {
                let key = format!("authorization_server.clients[{i}]");
                match e.strip_prefix("client_secret_hash: ") {
                    Some(m) => format!("{key}.client_secret_hash: {m}"),
                    None => format!("{key}.jwks: {e}"),
                }
            })?;
            clients.insert(c.client_id.clone(), built);
        }
        Ok(Clients {
            clients,
            algorithms: cfg
                .assertion_algorithms
                .iter()
                .filter_map(|a| a.as_str().parse().ok())
                .collect(),
            token_endpoint: token_endpoint.to_owned(),
            replay,
            replay_per_client: usize::try_from(cfg.replay_cache_max_entries).unwrap_or(usize::MAX),
            buckets: Mutex::new(HashMap::new()),
            rate: f64::from(cfg.rate_limit),
            shared: matches!(**store, crate::store::Store::Redis(_)).then(|| store.clone()),
        })
    }

    /// A registered client.
    pub fn get(&self, id: &str) -> Option<&Client> {
        self.clients.get(id)
    }

    /// Takes one token from the client's bucket (the shared one of unregistered ids, whose
    /// requests can only fail); `false` when it is empty.
    pub fn allow(&self, id: &str) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        let now = Instant::now();
        let key = self.clients.contains_key(id).then(|| id.to_owned());
        let (tokens, last) = buckets.entry(key).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// [`Clients::allow`], counted in the shared store when there is one, so that the
    /// rate holds for the client across every replica (a one-second window of `rate`
    /// requests). A store that cannot answer refuses.
    pub async fn admit(&self, id: &str) -> Result<bool, crate::store::StoreError> {
        let Some(store) = &self.shared else {
            return Ok(self.allow(id));
        };
        let who = if self.clients.contains_key(id) {
            id
        } else {
            "*"
        };
        let second = jsonwebtoken::get_current_timestamp();
        let n = store
            .count(
                &format!("rate:{who}:{second}"),
                std::time::Duration::from_secs(2),
            )
            .await?;
        Ok(n as f64 <= self.rate)
    }

    /// Whether the shared bucket of unregistered ids and failed attempts has a token left,
    /// without taking it: checked before work a garbage request could make costly.
    pub fn unregistered_budget_left(&self) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        let now = Instant::now();
        let (tokens, last) = buckets.entry(None).or_insert((self.rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        *tokens >= 1.0
    }

    /// How many rate-limit buckets are kept: one per registered client that asked, and
    /// one for all unregistered ids.
    pub fn rate_buckets(&self) -> usize {
        self.buckets.lock().map_or(0, |b| b.len())
    }

    /// The client `id`, if it is a secret client and `secret` is its secret.
    pub fn authenticate_secret(&self, id: &str, secret: &str) -> Result<&Client, OAuthError> {
        let bad = || OAuthError::invalid_client_basic("client authentication failed");
        let client = self.clients.get(id).ok_or_else(bad)?;
        let Credential::Secret(want) = &client.credential else {
            return Err(bad());
        };
        let got: [u8; 32] =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes())
                .as_ref()
                .try_into()
                .map_err(|_| bad())?;
        // Constant time: every byte compared whatever the first difference.
        let diff = want
            .iter()
            .zip(got.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 { Ok(client) } else { Err(bad()) }
    }

    /// The `(client id, secret)` of an HTTP Basic `Authorization` header (RFC 6749
    /// §2.3.1: each form-urlencoded before the Basic encoding).
    pub fn basic_credentials(header: &str) -> Option<(String, String)> {
        let b64 = header
            .strip_prefix("Basic ")
            .or_else(|| header.strip_prefix("basic "))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (id, secret) = raw.split_once(':')?;
        Some((form_decode(id), form_decode(secret)))
    }

    /// The client id an assertion claims (`iss`), before anything is verified: to find
    /// the client and rate-limit it.
    pub fn claimed_id(assertion: &str) -> Result<String, OAuthError> {
        let payload = assertion
            .split('.')
            .nth(1)
            .ok_or_else(|| OAuthError::invalid_client("the client assertion is not a JWT"))?;
        let claims: Value = crate::auth::jwt::decode_segment(payload)
            .ok_or_else(|| OAuthError::invalid_client("the client assertion is not a JWT"))?;
        claims["iss"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| OAuthError::invalid_client("the client assertion has no iss"))
    }

    /// Verifies a client assertion (RFC 7523 §3, SMART backend-services): allowed
    /// asymmetric `alg`, a `kid` naming exactly one key of the client's of a matching
    /// type, `jku` only when allow-listed, `iss` = `sub` = the client, `aud` = the token
    /// endpoint, `exp` present and at most five minutes ahead, `jti` never seen before.
    pub async fn verify_assertion(
        &self,
        client: &Client,
        assertion: &str,
    ) -> Result<(), OAuthError> {
        let invalid = OAuthError::invalid_client;
        let header = jsonwebtoken::decode_header(assertion).map_err(|_| {
            invalid("the client assertion header is malformed or its alg is not allowed")
        })?;
        if !self.algorithms.contains(&header.alg) {
            return Err(invalid("the client assertion's alg is not allowed"));
        }
        let kid = header
            .kid
            .as_deref()
            .ok_or_else(|| invalid("the client assertion has no kid"))?;
        let Credential::Keys { source, jku } = &client.credential else {
            return Err(invalid("this client authenticates with a secret"));
        };
        let source = match &header.jku {
            None => source,
            Some(url) => jku
                .get(url)
                .ok_or_else(|| invalid("the client assertion's jku is not allow-listed"))?,
        };
        let keys = source.keys().await.map_err(|_| {
            OAuthError::temporarily_unavailable("the client's keys cannot be fetched")
        })?;
        let keys = match one_key(&keys, kid, header.alg) {
            Some(_) => keys,
            None => match source.refetch_for_unknown_kid(&keys).await {
                Some(newer) => newer,
                None => {
                    return Err(invalid(
                        "no key of the client matches the assertion's kid and alg",
                    ));
                }
            },
        };
        let key = one_key(&keys, kid, header.alg)
            .ok_or_else(|| invalid("no key of the client matches the assertion's kid and alg"))?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = LEEWAY;
        v.set_issuer(&[&client.id]);
        v.set_audience(&[&self.token_endpoint]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        // RFC 7523 §3: not to be used before `nbf`.
        v.validate_nbf = true;
        v.sub = Some(client.id.clone());
        let data = jsonwebtoken::decode::<Map<String, Value>>(assertion, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            match e.kind() {
                InvalidAudience => invalid("the client assertion's aud is not this token endpoint"),
                InvalidIssuer | InvalidSubject => {
                    invalid("the client assertion's iss and sub must both be the client id")
                }
                ExpiredSignature => invalid("the client assertion has expired"),
                ImmatureSignature => invalid("the client assertion is not yet valid"),
                MissingRequiredClaim(_) => {
                    invalid("the client assertion lacks exp, iss, sub or aud")
                }
                _ => invalid("the client assertion's signature does not verify"),
            }
        })?;
        let now = jsonwebtoken::get_current_timestamp();
        let exp = data.claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        if exp > now + MAX_ASSERTION_LIFETIME + LEEWAY {
            return Err(invalid(
                "the client assertion's exp is more than five minutes ahead",
            ));
        }
        // An assertion issued in the future (beyond the skew) is not yet one.
        if let Some(iat) = data.claims.get("iat")
            && iat.as_u64().is_none_or(|iat| iat > now + LEEWAY)
        {
            return Err(invalid("the client assertion's iat is in the future"));
        }
        let jti = data
            .claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty())
            .ok_or_else(|| invalid("the client assertion has no jti"))?;
        // Remembered until the assertion can no longer be used anyway (exp + leeway).
        self.remember(&client.id, jti, exp + LEEWAY, now).await
    }
}

impl Clients {
    /// An assertion id, kept until `until` in this process and, with a shared store,
    /// there too; one seen before is a replay.
    async fn remember(
        &self,
        client: &str,
        jti: &str,
        until: u64,
        now: u64,
    ) -> Result<(), OAuthError> {
        match self
            .replay
            .remember(client, jti, until, now, self.replay_per_client)
        {
            Ok(()) => self.remember_shared(client, jti, until - now).await,
            Err(super::replay::Refusal::Replay) => Err(OAuthError::invalid_client(
                "the client assertion was already used (jti replay)",
            )),
            Err(super::replay::Refusal::Full) => Err(OAuthError::temporarily_unavailable(
                "too many live client assertions for this client; retry when some expire",
            )),
        }
    }

    /// Marks an assertion id used in the shared store, atomically (`SET NX`): `false`
    /// there means another replica saw it first. A store that cannot answer refuses.
    async fn remember_shared(&self, client: &str, jti: &str, ttl: u64) -> Result<(), OAuthError> {
        let Some(store) = &self.shared else {
            return Ok(());
        };
        let key = format!(
            "jti:{client}:{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                jti.as_bytes()
            ))
        );
        match store
            .insert_new(&key, "1", std::time::Duration::from_secs(ttl.max(1)))
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(OAuthError::invalid_client(
                "the client assertion was already used (jti replay)",
            )),
            Err(e) => {
                tracing::warn!(error = %e, "state store unavailable for assertion ids");
                Err(OAuthError::temporarily_unavailable(
                    "assertion ids cannot be checked now",
                ))
            }
        }
    }
}

/// Exactly one key with this `kid` whose type fits `alg`.
fn one_key<'k>(
    keys: &'k KeySet,
    kid: &'k str,
    alg: Algorithm,
) -> Option<&'k jsonwebtoken::DecodingKey> {
    let mut found = keys.matching(kid, alg);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

fn form_decode(s: &str) -> String {
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn client(
    c: &ClientConfig,
    outbound: &Outbound,
    fetches: &prometheus::IntCounterVec,
) -> Result<Client, String> {
    let source_for =
        |jwks: Option<String>, jwks_uri: Option<String>| -> Result<Arc<KeySource>, String> {
            let cfg = JwtConfig {
                issuer: c.client_id.clone(),
                audience: String::new(),
                jwks_uri,
                jwks,
                ..JwtConfig::for_client_keys()
            };
            let s = Arc::new(KeySource::new(&cfg, outbound.clone(), fetches.clone())?);
            // Remote keys are kept fresh per Cache-Control, like the gateway's own.
            if tokio::runtime::Handle::try_current().is_ok() {
                s.spawn_refresh();
            }
            Ok(s)
        };
    let credential = match (&c.client_secret_hash, &c.jwks, &c.jwks_uri) {
        _ if c.public => Credential::Public,
        (Some(h), _, _) => {
            Credential::Secret(parse_secret_hash(h).ok_or("client_secret_hash: malformed")?)
        }
        (None, jwks, uri) => {
            let mut jku = HashMap::new();
            for url in &c.jku_allow {
                jku.insert(url.clone(), source_for(None, Some(url.clone()))?);
            }
            Credential::Keys {
                source: source_for(jwks.clone(), uri.clone())?,
                jku,
            }
        }
    };
    Ok(Client {
        id: c.client_id.clone(),
        scope: c.scope.clone(),
        redirect_uris: c.redirect_uris.clone(),
        ehr: c.ehr,
        credential,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids a client sends that are not registered never grow the rate limiter: 10,000
    /// random ids leave one bucket for them all, beside the registered client's.
    #[tokio::test]
    async fn unregistered_ids_share_one_bucket() {
        let cfg: AuthorizationServerConfig = toml::from_str(&format!(
            "enabled = true\nrate_limit = 5\n[[clients]]\nclient_id = \"sym\"\n\
             client_secret_hash = \"sha256:{}\"\nscope = \"system/Patient.r\"\n",
            "0".repeat(64)
        ))
        .unwrap();
        let clients = Clients::new(
            &cfg,
            "http://gw/auth/token",
            &Outbound::new(None).unwrap(),
            &crate::metrics::Metrics::new().jwks_fetches,
            Default::default(),
            &Arc::new(crate::store::Store::Memory(crate::store::MemoryStore::new(
                10,
            ))),
        )
        .unwrap();
        let mut allowed = 0;
        for i in 0..10_000 {
            allowed += usize::from(clients.allow(&format!("random-{i}-{}", uuid::Uuid::new_v4())));
        }
        assert!(clients.allow("sym"));
        assert_eq!(clients.rate_buckets(), 2);
        // Their one bucket is limited like a client's: a burst of at most the rate.
        assert!(allowed <= 6, "{allowed}");
    }
}

//! Bulk Data export jobs (FHIR Bulk Data Access 2.0, export.html): the kick-off is
//! answered `202 Accepted` with a `Content-Location` the client then polls, cancels
//! (`DELETE`) and reads the manifest from. That status URL is the server's own (HAPI:
//! `$export-poll-status?_jobId=…`; others: any path), so no scope rule can say who may
//! use it. The gateway signs each one it hands out for the client that kicked the export
//! off: a `_sg` parameter, an HMAC-SHA256 over the client, the URL and an expiry. That
//! client, and no other, may use the URL; the parameter is taken off before the request
//! is forwarded. Nothing is kept: any replica with the same `bulk_data.status_key`
//! accepts the URL, after a restart too.

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine as _;

use crate::auth::Principal;
use crate::config::BulkDataConfig;

/// The query parameter that carries the signature.
pub const PARAM: &str = "_sg";
/// How long a signed status URL is accepted.
const VALID: Duration = Duration::from_secs(7 * 24 * 3600);

/// The keys status URLs are signed with.
pub struct Exports {
    /// The key when `bulk_data.status_key` is unset: random, for this process only.
    fallback: [u8; 32],
}

impl Default for Exports {
    fn default() -> Self {
        use aws_lc_rs::rand::SecureRandom as _;
        let mut fallback = [0u8; 32];
        // A system without randomness cannot serve TLS either; an all-zero key would
        // still bind URLs to clients, only predictably, so it is logged, not fatal.
        if aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut fallback)
            .is_err()
        {
            tracing::error!("no system randomness for the export status key");
        }
        Exports { fallback }
    }
}

impl Exports {
    /// The key to sign with: the configured one, else this process's.
    fn key(&self, config: &BulkDataConfig) -> hmac::Key {
        let secret = config
            .status_key
            .as_deref()
            .map_or(&self.fallback[..], str::as_bytes);
        hmac::Key::new(hmac::HMAC_SHA256, secret)
    }

    /// The keys a signature is checked against: the signing key, then the previous ones.
    fn keys(&self, config: &BulkDataConfig) -> impl Iterator<Item = hmac::Key> {
        let previous = config.previous_status_keys.iter();
        std::iter::once(self.key(config))
            .chain(previous.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k.as_bytes())))
    }

    /// The `_sg` value for the status URL `rel` (relative to the public base) handed to
    /// `client` at `now` (seconds since the epoch): the expiry and the MAC.
    pub fn sign(&self, config: &BulkDataConfig, client: &str, rel: &str, now: u64) -> String {
        let expires = now + VALID.as_secs();
        let tag = hmac::sign(&self.key(config), &message(client, rel, expires));
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref());
        format!("{expires}.{tag}")
    }

    /// Whether `signature` was made by [`Exports::sign`] for `client` and `rel`, and has
    /// not expired at `now`.
    pub fn verify(
        &self,
        config: &BulkDataConfig,
        client: &str,
        rel: &str,
        signature: &str,
        now: u64,
    ) -> bool {
        let Some((expires, tag)) = signature.split_once('.') else {
            return false;
        };
        let (Ok(expires), Ok(tag)) = (
            expires.parse::<u64>(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tag),
        ) else {
            return false;
        };
        let message = message(client, rel, expires);
        now <= expires
            && self
                .keys(config)
                .any(|key| hmac::verify(&key, &message, &tag).is_ok())
    }
}

fn message(client: &str, rel: &str, expires: u64) -> Vec<u8> {
    format!("{client}\n{rel}\n{expires}").into_bytes()
}

/// Who kicked an export off: the token's issuer and client. `None` when the token names
/// no client: nothing to bind the job to, and no status URL is signed. Never the subject:
/// a user whose `sub` equals a client's id would poll that client's exports.
pub fn client_of(principal: &Principal) -> Option<String> {
    let who = principal.client_id()?;
    Some(format!("{}\n{who}", principal.issuer().unwrap_or_default()))
}

/// The parameters of a `POST $export` body (Bulk Data 2.0: a FHIR `Parameters` resource),
/// as `(name, value)` pairs the decision reads like query parameters: `_type` decides the
/// scopes needed, so a body naming types beyond them must be read, not forwarded unread.
/// An empty body has none. `Err` for anything else: not a strictly read JSON
/// `Parameters`, a parameter without a name, or a value other than a plain string or
/// code (which no export parameter the decision reads can be).
pub fn body_params(bytes: &[u8]) -> Result<Vec<(String, String)>, &'static str> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let doc = crate::json::parse(bytes)
        .map_err(|_| "the $export body is not JSON, or repeats a member name")?;
    if doc.get("resourceType").and_then(serde_json::Value::as_str) != Some("Parameters") {
        return Err("the $export body is not a Parameters resource");
    }
    let Some(params) = doc.get("parameter") else {
        return Ok(Vec::new());
    };
    let params = params
        .as_array()
        .ok_or("the $export body's parameter is not a list")?;
    let mut out = Vec::new();
    for p in params {
        let name = p
            .get("name")
            .and_then(serde_json::Value::as_str)
            .ok_or("a $export body parameter has no name")?;
        let value = [
            "valueString",
            "valueCode",
            "valueInstant",
            "valueDateTime",
            "valueUri",
        ]
        .iter()
        .find_map(|k| p.get(*k).and_then(serde_json::Value::as_str));
        match (name, value) {
            (_, Some(v)) => out.push((name.to_owned(), v.to_owned())),
            // Other parameters (`patient` references, extensions) are not read by the
            // decision; `_type` and `_typeFilter` always are.
            ("_type" | "_typeFilter", None) => {
                return Err("a $export _type or _typeFilter that is not a string");
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Whether `rel` (a path under the public base) kicks off an export: its last segment
/// is `$export` (system, Patient or Group level).
pub fn is_kick_off(rel: &str) -> bool {
    let path = rel.split('?').next().unwrap_or(rel);
    path.rsplit('/').next() == Some("$export")
}

/// Whether `rel` may be signed as a status URL: not a read, search or other interaction
/// the rules decide (an upstream answering a kick-off with `Content-Location: …/Patient`
/// must not hand out a signed `/Patient`), only an operation (HAPI's
/// `$export-poll-status`) or a path that is no FHIR interaction at all.
pub fn may_bind(rel: &str) -> bool {
    use crate::fhir::request::{Interaction, classify_get};
    match classify_get(rel) {
        Err(_) => true,
        Ok(req) => matches!(
            req.interaction,
            Interaction::OperationSystem
                | Interaction::OperationType
                | Interaction::OperationInstance
        ),
    }
}

/// `url` with the signature appended as the last parameter.
pub fn with_signature(url: &str, signature: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{PARAM}={signature}")
}

/// A request target (relative to the public base) that ends in a signature: the target
/// without it, and the signature. `None` when the last parameter is not `_sg`.
pub fn split_signature(rel: &str) -> Option<(&str, &str)> {
    let query_start = rel.find('?')?;
    let at = rel.rfind(['?', '&']).filter(|i| *i >= query_start)?;
    let signature = rel[at + 1..].strip_prefix(PARAM)?.strip_prefix('=')?;
    Some((&rel[..at], signature))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(key: Option<&str>) -> BulkDataConfig {
        BulkDataConfig {
            status_key: key.map(str::to_owned),
            previous_status_keys: Vec::new(),
        }
    }

    #[test]
    fn kick_offs() {
        for rel in [
            "/$export",
            "/Patient/$export?_type=Observation",
            "/Group/g1/$export",
        ] {
            assert!(is_kick_off(rel), "{rel}");
        }
        for rel in [
            "/$export-poll-status?_jobId=1",
            "/Patient/1",
            "/x?y=/$export",
            "/",
        ] {
            assert!(!is_kick_off(rel), "{rel}");
        }
    }

    #[test]
    fn only_status_urls_are_signed() {
        for rel in [
            "/$export-poll-status?_jobId=1",
            "/bulkstatus/7",
            "/_operations/export/7",
        ] {
            assert!(may_bind(rel), "{rel}");
        }
        for rel in [
            "",
            "/",
            "/Patient",
            "/Patient/1",
            "/Patient?name=x",
            "/metadata",
            "/_history",
        ] {
            assert!(!may_bind(rel), "{rel}");
        }
    }

    /// A signature holds for its client, URL and key until it expires; for nothing else.
    #[test]
    fn signatures_bind_client_url_key_and_time() {
        let exports = Exports::default();
        let shared = config(Some("0123456789abcdef0123456789abcdef"));
        let (client, rel, now) = (
            "https://as\nexporter",
            "/$export-poll-status?_jobId=1",
            1_000,
        );
        let sig = exports.sign(&shared, client, rel, now);
        assert!(exports.verify(&shared, client, rel, &sig, now));
        assert!(exports.verify(&shared, client, rel, &sig, now + VALID.as_secs()));
        assert!(!exports.verify(&shared, client, rel, &sig, now + VALID.as_secs() + 1));
        assert!(!exports.verify(&shared, "https://as\nother", rel, &sig, now));
        assert!(!exports.verify(&shared, client, "/$export-poll-status?_jobId=2", &sig, now));
        // Another replica with the same key accepts it; another key does not, nor this
        // process's random key.
        assert!(Exports::default().verify(&shared, client, rel, &sig, now));
        let other = config(Some("fedcba9876543210fedcba9876543210"));
        assert!(!exports.verify(&other, client, rel, &sig, now));
        assert!(!exports.verify(&config(None), client, rel, &sig, now));
        // Rotated: the old key still verifies as a previous key, never signs.
        let rotated = BulkDataConfig {
            status_key: Some("fedcba9876543210fedcba9876543210".into()),
            previous_status_keys: vec!["0123456789abcdef0123456789abcdef".into()],
        };
        assert!(exports.verify(&rotated, client, rel, &sig, now));
        assert_ne!(exports.sign(&rotated, client, rel, now), sig);
        let random = exports.sign(&config(None), client, rel, now);
        assert!(exports.verify(&config(None), client, rel, &random, now));
        assert!(!Exports::default().verify(&config(None), client, rel, &random, now));
        // A later expiry with the old tag, or garbage, does not pass.
        let (_, tag) = sig.split_once('.').unwrap();
        let stretched = format!("{}.{tag}", now + 2 * VALID.as_secs());
        assert!(!exports.verify(&shared, client, rel, &stretched, now));
        for bad in ["", ".", "x.y", "1.", "99999999999999999999.AAAA", &sig[1..]] {
            assert!(!exports.verify(&shared, client, rel, bad, now), "{bad}");
        }
    }

    #[test]
    fn signatures_in_urls() {
        assert_eq!(
            with_signature("https://gw/r4/x?a=1", "9.t"),
            "https://gw/r4/x?a=1&_sg=9.t"
        );
        assert_eq!(
            with_signature("https://gw/r4/bulk/7", "9.t"),
            "https://gw/r4/bulk/7?_sg=9.t"
        );
        assert_eq!(split_signature("/x?a=1&_sg=9.t"), Some(("/x?a=1", "9.t")));
        assert_eq!(split_signature("/bulk/7?_sg=9.t"), Some(("/bulk/7", "9.t")));
        for rel in [
            "/x?_sg=1&a=1",
            "/x?a=1",
            "/x",
            "/x?a=_sg=1",
            "/x?_sgx=1",
            "/a&_sg=1",
        ] {
            assert_eq!(split_signature(rel), None, "{rel}");
        }
    }

    #[test]
    fn clients_are_told_apart_by_issuer_and_client() {
        let p = |iss: Option<&str>, client: Option<&str>, sub: Option<&str>| {
            Principal::new(
                0,
                None,
                std::sync::Arc::default(),
                iss.map(std::sync::Arc::from),
                client.map(std::sync::Arc::from),
                crate::auth::claims::Identity {
                    subject: sub,
                    ..Default::default()
                },
            )
        };
        let a = client_of(&p(Some("https://as"), Some("exporter"), Some("x")));
        assert_eq!(a.as_deref(), Some("https://as\nexporter"));
        assert_ne!(
            a,
            client_of(&p(Some("https://other"), Some("exporter"), None))
        );
        // A subject is never a client: no client id, nothing to bind to.
        assert_eq!(client_of(&p(None, None, Some("svc"))), None);
        assert_eq!(
            client_of(&p(Some("https://as"), None, Some("exporter"))),
            None
        );
        assert_eq!(client_of(&p(Some("https://as"), None, None)), None);
    }
}

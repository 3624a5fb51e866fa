//! Bulk Data export jobs (FHIR Bulk Data Access 2.0, export.html): the kick-off is
//! answered `202 Accepted` with a `Content-Location` the client then polls, cancels
//! (`DELETE`) and reads the manifest from. That status URL is the server's own (HAPI:
//! `$export-poll-status?_jobId=…`; others: any path), so no scope rule can say who may
//! use it. The gateway remembers each one it hands out, with the client that kicked the
//! export off, and lets that client, and no other, use it.
//!
//! Kept in memory for a day (an export can run for hours) and bounded; after a restart
//! a status URL is decided by the rules again (a `[[policy.operations]]` rule for
//! `export-poll-status`, say).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::auth::Principal;

/// How long a status URL stays bound to its client.
const KEPT: Duration = Duration::from_secs(24 * 3600);
/// How many status URLs are remembered at most.
const CAPACITY: u64 = 10_000;

/// Status URLs (relative to the public base, query included) and their clients.
pub struct Exports {
    jobs: moka::sync::Cache<String, Arc<str>>,
    /// Whether any was ever recorded: until then no request pays for a lookup.
    any: AtomicBool,
}

impl Default for Exports {
    fn default() -> Self {
        Exports {
            any: AtomicBool::new(false),
            jobs: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(KEPT)
                .build(),
        }
    }
}

/// Who kicked an export off: the token's issuer and client (or subject, when the token
/// names no client). `None` when it names neither: nothing to bind the job to.
pub fn client_of(principal: &Principal) -> Option<String> {
    let who = principal
        .client_id
        .as_deref()
        .or(principal.subject.as_deref())?;
    Some(format!(
        "{}\n{who}",
        principal.issuer.as_deref().unwrap_or_default()
    ))
}

/// Whether `rel` (a path under the public base) kicks off an export: its last segment
/// is `$export` (system, Patient or Group level).
pub fn is_kick_off(rel: &str) -> bool {
    let path = rel.split('?').next().unwrap_or(rel);
    path.rsplit('/').next() == Some("$export")
}

/// Whether `rel` may be bound as a status URL: not a read, search or other interaction
/// the rules decide (an upstream answering a kick-off with `Content-Location: …/Patient`
/// must not take `/Patient` away from every other client), only an operation (HAPI's
/// `$export-poll-status`) or a path that is no FHIR interaction at all.
pub fn may_bind(rel: &str) -> bool {
    use crate::fhir::request::{Interaction, classify};
    let (path, query) = match rel.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rel, None),
    };
    let headers = http::HeaderMap::new();
    match classify(&http::Method::GET, path, query, &headers, None, None) {
        Err(_) => true,
        Ok(req) => matches!(
            req.interaction,
            Interaction::OperationSystem
                | Interaction::OperationType
                | Interaction::OperationInstance
        ),
    }
}

impl Exports {
    /// Binds the status URL `rel` to `client`.
    pub fn record(&self, rel: String, client: String) {
        self.jobs.insert(rel, client.into());
        self.any.store(true, Ordering::Release);
    }

    /// The client a status URL is bound to, if the gateway handed it out.
    pub fn client(&self, rel: &str) -> Option<Arc<str>> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.jobs.get(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_status_urls_are_bound() {
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

    #[test]
    fn clients_are_told_apart_by_issuer_and_client() {
        let p = |iss: Option<&str>, client: Option<&str>, sub: Option<&str>| Principal {
            issuer: iss.map(str::to_owned),
            client_id: client.map(str::to_owned),
            subject: sub.map(str::to_owned),
            scopes: Vec::new(),
            patient: None,
            encounter: None,
            fhir_user: None,
            fhir_context: None,
            expires_at: None,
            token_id: None,
            grants: Arc::default(),
            id: 0,
        };
        let a = client_of(&p(Some("https://as"), Some("exporter"), Some("x")));
        assert_eq!(a.as_deref(), Some("https://as\nexporter"));
        assert_ne!(
            a,
            client_of(&p(Some("https://other"), Some("exporter"), None))
        );
        assert_eq!(
            client_of(&p(None, None, Some("svc"))).as_deref(),
            Some("\nsvc")
        );
        assert_eq!(client_of(&p(Some("https://as"), None, None)), None);
        let jobs = Exports::default();
        jobs.record("/$export-poll-status?_jobId=1".into(), a.clone().unwrap());
        assert_eq!(
            jobs.client("/$export-poll-status?_jobId=1").as_deref(),
            a.as_deref()
        );
        assert_eq!(jobs.client("/$export-poll-status?_jobId=2"), None);
    }
}

//! The compiled, immutable snapshot every request reads, and the state shared by all
//! connections: one `ArcSwap` of the snapshot, the metrics, and what reload needs.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use http::HeaderName;

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::proxy::urls::UrlMap;
use crate::proxy::{Upstream, UpstreamSetupError};

/// Everything a request needs from the configuration, compiled once per (re)load.
/// A request loads it once and sees one consistent configuration throughout.
pub struct Snapshot {
    /// Client assertion ids seen by the embedded authorization server: handed from each
    /// snapshot to the next, so no reload forgets one before its assertion expires.
    pub replay: Arc<crate::authz::replay::ReplayGuard>,
    /// The embedded authorization server's state (sign-ins, codes, refresh tokens):
    /// handed from each snapshot to the next while `[authorization_server.store]` is
    /// unchanged, so a reload forgets no code or refresh token kept in memory.
    pub store: Arc<crate::store::Store>,
    /// Who the resources Provenance points at belong to (`Type/id` → patients), as the
    /// upstream last said, for 30 s: the lookups a Provenance read or revinclude needs
    /// (pipeline/checks.rs). At most 10,000 entries, about 150 bytes each (1.5 MiB).
    pub owners: moka::sync::Cache<String, std::sync::Arc<Vec<String>>>,
    /// Unique per compiled snapshot, never reused: keys what was decided under it (the
    /// decision cache), so nothing decided under one configuration is used under another.
    pub generation: u64,
    /// The validated configuration this was compiled from.
    pub config: Config,
    /// Public ↔ upstream URL mapping.
    pub urls: UrlMap,
    /// The upstream client.
    pub upstream: Upstream,
    /// Token verification; `None` for `auth.mode = "none"`.
    pub auth: Option<Arc<Authenticator>>,
    /// Identity header names, always removed from client requests.
    pub identity_headers: Vec<HeaderName>,
    /// The authorization policy.
    pub policy: crate::policy::Policy,
    /// The embedded authorization server, when enabled.
    pub authz: Option<Arc<crate::authz::AuthServer>>,
    /// `[smart]` with the embedded server's endpoints filled in (discovery, /metadata).
    pub smart: Option<crate::config::SmartConfig>,
    /// The serialised SMART configuration document, when `[smart]` is set.
    pub discovery: Option<bytes::Bytes>,
    /// The augmented CapabilityStatement and when it was fetched; per snapshot, so a
    /// reload starts afresh.
    pub metadata: std::sync::Mutex<Option<(std::time::Instant, bytes::Bytes)>>,
}

/// Why a configuration could not be compiled: what the key names could not be built (an
/// unreadable key file, a JWKS that is not one, an operation rule or a discovery document
/// that does not hold together). Compiling is where everything checked by building it is
/// checked, once: at start, on reload and by `check-config`.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct CompileError {
    /// The configuration key, as `section.key`.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl CompileError {
    /// An error about `key`.
    pub fn at(key: &str, message: impl Into<String>) -> CompileError {
        CompileError {
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// An error whose message may start with its own key (`"auth.jwt.jwks: …"`, as the
    /// builders write them); `key` otherwise.
    fn keyed(key: &str, message: String) -> CompileError {
        const SECTIONS: &[&str] = &[
            "server.",
            "upstream.",
            "auth.",
            "authorization_server.",
            "policy.",
            "smart.",
            "bulk_data.",
            "audit.",
        ];
        match message.split_once(": ") {
            Some((k, m)) if SECTIONS.iter().any(|s| k.starts_with(s)) && !k.contains(' ') => {
                CompileError::at(k, m)
            }
            _ => CompileError::at(key, message),
        }
    }
}

impl From<UpstreamSetupError> for CompileError {
    fn from(e: UpstreamSetupError) -> CompileError {
        CompileError::keyed("upstream", e.to_string())
    }
}

/// Headers the configuration may not set, as upstream headers or identity headers: the
/// hop-by-hop ones and the message's target and framing, which the gateway writes itself.
fn check_header_names(config: &Config) -> Result<(), CompileError> {
    let managed = |name: &str| {
        HeaderName::from_bytes(name.as_bytes()).is_ok_and(|n| {
            crate::proxy::headers::is_hop_by_hop(&n)
                || n == http::header::HOST
                || n == http::header::CONTENT_LENGTH
        })
    };
    let upstream = config
        .upstream
        .headers
        .keys()
        .map(|n| (format!("upstream.headers.{n}"), n.as_str()));
    let identity = ["client_id", "subject", "patient", "fhir_user", "scopes"]
        .iter()
        .zip(config.auth.identity_headers.names())
        .map(|(k, n)| (format!("auth.identity_headers.{k}"), n));
    for (key, name) in upstream.chain(identity) {
        if managed(name) {
            return Err(CompileError::at(
                &key,
                format!("{name:?} is managed by the gateway and cannot be set"),
            ));
        }
    }
    Ok(())
}

/// The authorization policy of `config`: the operation rules and the compartment
/// parameters checked against the R4 search parameter tables.
fn compile_policy(config: &Config) -> Result<crate::policy::Policy, CompileError> {
    let operations = crate::policy::Operations::with_config(&config.policy.operations)
        .map_err(|e| CompileError::keyed("policy.operations", e))?;
    for (ty, param) in &config.policy.compartment_param {
        let key = format!("policy.compartment_param.{ty}");
        let Ok(t) = crate::fhir::request::resource_type(ty) else {
            return Err(CompileError::at(
                &key,
                format!("{ty:?} is not an R4 resource type"),
            ));
        };
        if crate::fhir::search::param(t, param).is_none_or(|sp| {
            sp.kind != crate::fhir::generated::ParamKind::Reference
                || !sp.targets.contains(&"Patient")
        }) {
            return Err(CompileError::at(
                &key,
                format!(
                    "{param:?} is not a reference search parameter of {ty} that can name a Patient"
                ),
            ));
        }
    }
    Ok(crate::policy::Policy {
        operations,
        non_compartment: match config.policy.patient_scope_non_compartment {
            crate::config::NonCompartmentScopes::Deny => crate::policy::NonCompartment::Deny,
            crate::config::NonCompartmentScopes::Allow => crate::policy::NonCompartment::Allow,
        },
        compartment_params: config
            .policy
            .compartment_param
            .iter()
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect(),
        bases: std::iter::once(&config.server.public_base_url)
            .chain(std::iter::once(&config.upstream.url))
            .chain(config.upstream.aliases.iter())
            .map(|b| b.as_string().trim_end_matches('/').to_owned())
            .collect(),
        narrow_conditional_writes: config.policy.confined_conditional_writes
            == crate::config::ConfinedConditionalWrites::Narrow,
    })
}

/// The SMART discovery document, checked against SMART App Launch 2.2, serialised once.
fn compile_discovery(
    smart: Option<&crate::config::SmartConfig>,
) -> Result<Option<bytes::Bytes>, CompileError> {
    let Some(smart) = smart else {
        return Ok(None);
    };
    let doc = crate::smart::discovery::document(smart)
        .map_err(|(k, m)| CompileError::keyed(&k, format!("{k}: {m}")))?;
    Ok(Some(bytes::Bytes::from(doc.to_string())))
}

impl Snapshot {
    /// Compiles a validated configuration. The authenticator of `previous` is kept when
    /// `[auth]` did not change, so its keys and cache survive a reload.
    pub fn compile(
        config: Config,
        previous: Option<&Snapshot>,
        outbound: &Outbound,
        metrics: &Metrics,
    ) -> Result<Snapshot, CompileError> {
        check_header_names(&config)?;
        let upstream = Upstream::new(
            &config.upstream,
            config.server.worker_threads(),
            &metrics.pool,
        )?;
        let urls = UrlMap::new(
            &config.server.public_base_url,
            &config.upstream.url,
            &config.upstream.aliases,
        );
        let replay = previous.map(|p| p.replay.clone()).unwrap_or_default();
        let store = match previous {
            Some(p) if p.config.authorization_server.store == config.authorization_server.store => {
                p.store.clone()
            }
            _ => Arc::new(
                crate::store::Store::from_config(&config.authorization_server.store)
                    .map_err(|e| CompileError::keyed("authorization_server.store", e))?,
            ),
        };
        // Reused when its configuration is unchanged, so a reload keeps its rate limits
        // (the replay guard is kept whatever changes).
        let same_authz = |p: &Snapshot| {
            p.config.authorization_server == config.authorization_server
                && p.config.server.public_base_url == config.server.public_base_url
                && p.config.auth.leeway == config.auth.leeway
        };
        let authz = match previous {
            Some(p) if same_authz(p) => p.authz.clone(),
            _ => crate::authz::AuthServer::new(
                &config,
                outbound,
                metrics,
                replay.clone(),
                store.clone(),
            )
            .map_err(|e| CompileError::keyed("authorization_server", e))?
            .map(Arc::new),
        };
        let auth = match previous {
            Some(p)
                if p.config.auth == config.auth
                    && p.config.server.public_base_url == config.server.public_base_url
                    && same_authz(p) =>
            {
                p.auth.clone()
            }
            _ => Authenticator::new(
                &config,
                outbound,
                metrics,
                authz.as_ref().map(|a| a.issuer.clone()),
            )
            .map_err(|e| CompileError::keyed("auth", e))?,
        };
        let policy = compile_policy(&config)?;
        let smart = config.effective_smart();
        let discovery = compile_discovery(smart.as_ref())?;
        let identity_headers = config
            .auth
            .identity_headers
            .names()
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        static NEXT_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = NEXT_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Snapshot {
            owners: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(std::time::Duration::from_secs(30))
                .build(),
            replay,
            store,
            generation,
            config,
            urls,
            upstream,
            auth,
            identity_headers,
            policy,
            authz,
            smart,
            discovery,
            metadata: std::sync::Mutex::new(None),
        })
    }
}

/// Why a reload was refused (the old snapshot keeps serving).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The gateway was started from a configuration value, not a file.
    #[error("no configuration file to reload")]
    NoFile,
    /// The file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new configuration could not be compiled.
    #[error(transparent)]
    Compile(#[from] CompileError),
}

/// State shared by every connection of one gateway.
pub struct Shared {
    /// The current snapshot.
    pub snapshot: ArcSwap<Snapshot>,
    /// Metrics of this gateway.
    pub metrics: Metrics,
    /// The file the configuration came from, for reloads.
    pub config_path: Option<PathBuf>,
    /// The environment overrides in force at start, re-applied on every reload.
    pub env: Vec<(String, String)>,
    /// Client for the gateway's own calls (JWKS, introspection).
    pub outbound: Outbound,
    /// Bulk Data export status URLs handed out, and the clients they belong to.
    pub exports: crate::exports::Exports,
    /// The audit trail (`[audit]`; its sink is set at start).
    pub audit: crate::audit::Audit,
    /// Set at SIGTERM: `/readyz` fails while requests are still served
    /// (`server.shutdown_delay`).
    pub draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Re-reads the configuration file: parse → validate → compile → swap. On any error
    /// the current snapshot stays; the error is logged and counted.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let result = self.try_reload();
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the previous configuration")
            }
        }
        result
    }

    fn try_reload(&self) -> Result<(), ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let config = Config::load(path, self.env.iter().cloned())?;
        let old = self.snapshot.load();
        warn_restart_only(&old.config, &config);
        let snapshot = Snapshot::compile(config, Some(&old), &self.outbound, &self.metrics)?;
        self.metrics.set_auth_mode(snapshot.config.auth.mode);
        self.snapshot.store(Arc::new(snapshot));
        self.metrics
            .reload_success_time
            .set(crate::metrics::unix_now());
        Ok(())
    }
}

/// Listener settings, worker threads and logging cannot change on a running process;
/// say so instead of ignoring it.
fn warn_restart_only(old: &Config, new: &Config) {
    for key in restart_only_changes(old, new) {
        tracing::warn!(
            key,
            "changed in the configuration file; takes effect after a restart"
        );
    }
}

/// The keys changed from `old` to `new` that only a restart applies.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let changes = [
        ("server.listen", old.server.listen != new.server.listen),
        ("admin.listen", old.admin.listen != new.admin.listen),
        (
            "server.tls",
            old.server.tls.is_some() != new.server.tls.is_some(),
        ),
        (
            "server.workers",
            old.server.worker_threads() != new.server.worker_threads(),
        ),
        (
            "server.worker_cpu_affinity",
            old.server.worker_cpu_affinity != new.server.worker_cpu_affinity,
        ),
        ("log", old.log != new.log),
        (
            "audit",
            crate::config::AuditConfig {
                include_query: new.audit.include_query,
                ..old.audit.clone()
            } != new.audit,
        ),
    ];
    changes
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
}

/// Sets `smartgate_cache_entries{cache}` and the idle upstream connections from the
/// current snapshot (at each scrape: counting is cheap, but not free enough for every
/// request).
pub fn refresh_gauges(shared: &Shared) {
    let snap = shared.snapshot.load();
    let entries = &shared.metrics.cache_entries;
    let set = |cache: &str, n: u64| {
        entries
            .with_label_values(&[cache])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    };
    set(
        "token",
        snap.auth.as_ref().map_or(0, |a| a.cached_verdicts()),
    );
    snap.owners.run_pending_tasks();
    set("provenance_owners", snap.owners.entry_count());
    set("assertion_ids", snap.replay.len() as u64);
    shared
        .metrics
        .pool_idle
        .set(i64::try_from(snap.upstream.idle_connections()).unwrap_or(i64::MAX));
    set(
        "rate_limit_buckets",
        snap.authz.as_ref().map_or(0, |a| a.rate_buckets() as u64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration with `workers = 2`; `server_extra` adds or overrides [server] keys.
    fn config(server_extra: &str) -> Config {
        let text = "[server]\nlisten = \"127.0.0.1:8080\"\n\
                    public_base_url = \"https://fhir.example.org/r4\"\nworkers = 2\n\
                    [upstream]\nurl = \"http://127.0.0.1:8081/fhir\"\n[auth]\nmode = \"none\"\n";
        let env = server_extra.split_whitespace().map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (
                format!("SMARTGATE__SERVER__{}", k.to_uppercase()),
                v.to_owned(),
            )
        });
        Config::parse(text, "test.toml", env).unwrap()
    }

    #[test]
    fn changes_only_a_restart_applies_are_named() {
        let base = config("");
        assert!(restart_only_changes(&base, &config("")).is_empty());
        assert_eq!(
            restart_only_changes(&base, &config("workers=3")),
            ["server.workers"]
        );
        assert_eq!(
            restart_only_changes(&base, &config("listen=127.0.0.1:9999")),
            ["server.listen"]
        );
        assert_eq!(
            restart_only_changes(&base, &config("worker_cpu_affinity=off")),
            ["server.worker_cpu_affinity"]
        );
        // Applied by a reload: not named.
        for reloaded in [
            "header_read_timeout=5s",
            "max_request_body=1MiB",
            "shutdown_grace=3s",
        ] {
            assert!(
                restart_only_changes(&base, &config(reloaded)).is_empty(),
                "{reloaded}"
            );
        }
    }
}

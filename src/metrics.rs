//! Prometheus metrics. One registry per gateway instance (not the global default), so
//! several gateways in one test process do not share counters. Every label has a small,
//! fixed set of values: never ids, never raw paths.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `smartgate_upstream_errors_total` kinds, exposed from zero.
pub const UPSTREAM_ERROR_KINDS: &[&str] = &[
    "connect",
    "connect_timeout",
    "timeout",
    "request_body_too_large",
    "request_body",
    "protocol",
    "stray_body",
    "credentials_refused",
    "response_body",
];

/// `smartgate_decisions_total{decision="deny"}` reasons (`DenyReason::code`), exposed
/// from zero.
pub const DENY_REASONS: &[&str] = &[
    "insufficient_scope",
    "no_patient_context",
    "compartment",
    "granular",
    "unverifiable",
    "unknown_operation",
    "nested_bundle",
    "bundle_entry_denied",
    "bundle_entry_invalid",
];

/// `smartgate_cache_entries{cache}` caches.
pub const CACHES: &[&str] = &[
    "token",
    "provenance_owners",
    "assertion_ids",
    "rate_limit_buckets",
];

/// The git revision the binary was built from (build.rs), or `unknown`.
pub const REVISION: &str = env!("SMARTGATE_REVISION");

/// Route labels known in advance; their series are resolved once, not per request.
pub const ROUTES: &[&str] = &["fhir", "metadata", "discovery", "auth", "not_found"];

/// Results of inspecting a FHIR JSON response (`smartgate_response_rewrites_total`).
pub const REWRITE_RESULTS: &[&str] =
    &["skipped", "unparsed", "unchanged", "rewritten", "too_large"];
/// The results a verified response is counted under.
pub const VERIFY_RESULTS: &[&str] = &[
    "passed",
    "filtered",
    "refused",
    "outcome_sanitised",
    "withheld",
];

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The counters of the trail.
#[derive(Clone)]
pub struct AuditMetrics {
    /// `smartgate_audit_lines_total`
    pub lines: IntCounter,
    /// `smartgate_audit_dropped_total`
    pub dropped: IntCounter,
    /// `smartgate_audit_write_errors_total`
    pub write_errors: IntCounter,
    /// `smartgate_audit_buffer_bytes`
    pub buffered: IntGauge,
}

/// Connection counts of every worker's pool (`smartgate_upstream_connections_*`).
#[derive(Clone)]
pub struct PoolCounters {
    /// Connections opened.
    pub opened: prometheus::IntCounter,
    /// Requests sent on a pooled connection.
    pub reused: prometheus::IntCounter,
    /// Requests sent again after a pooled connection was found closed.
    pub retries: prometheus::IntCounter,
}

impl Default for PoolCounters {
    /// Counters registered nowhere (unit tests, tools).
    fn default() -> Self {
        let counter =
            |name: &str| prometheus::IntCounter::new(name, name).expect("static metric definition");
        PoolCounters {
            opened: counter("opened"),
            reused: counter("reused"),
            retries: counter("retries"),
        }
    }
}

/// Per-route series, resolved once: the label lookup (a hash and a lock) stays off the
/// hot path.
struct RouteSeries {
    route: &'static str,
    by_class: [IntCounter; 5],
    duration: Histogram,
}

/// All metrics of one gateway.
pub struct Metrics {
    registry: Registry,
    routes: Vec<RouteSeries>,
    rewrites: Vec<(&'static str, IntCounter)>,
    verifications: Vec<(&'static str, IntCounter)>,
    /// `smartgate_requests_total{route,status_class}`
    pub requests: IntCounterVec,
    /// `smartgate_request_duration_seconds{route}`
    pub request_duration: HistogramVec,
    /// `smartgate_upstream_duration_seconds` (time to response headers)
    pub upstream_duration: Histogram,
    /// `smartgate_upstream_errors_total{kind}`
    pub upstream_errors: IntCounterVec,
    /// `smartgate_inflight_requests`
    pub inflight: IntGauge,
    /// `smartgate_worker_connections{worker}`: open client connections per worker thread.
    pub worker_connections: IntGaugeVec,
    /// `smartgate_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `smartgate_tls_reloads_total{result}`
    pub tls_reloads: IntCounterVec,
    /// `smartgate_response_rewrites_total{result}`: FHIR JSON bodies inspected.
    pub response_rewrites: IntCounterVec,
    /// `smartgate_response_verifications_total{result}`: passed, filtered, refused.
    pub response_verifications: IntCounterVec,
    /// `smartgate_verify_removed_entries_total`: entries removed from verified responses.
    pub verify_removed: IntCounter,
    /// `smartgate_token_validations_total{mode,result}`
    pub token_validations: IntCounterVec,
    /// `smartgate_token_cache_total{event}`: hit, miss, eviction.
    pub token_cache: IntCounterVec,
    /// `smartgate_jwks_fetches_total{result}`
    pub jwks_fetches: IntCounterVec,
    /// `smartgate_authz_requests_total{result}`: embedded authorization server answers
    /// (`issued`, or the OAuth error code).
    pub tokens_issued: IntCounterVec,
    /// `smartgate_decisions_total{decision,reason}`
    pub decisions: IntCounterVec,
    /// `smartgate_scopes_ignored_total`: malformed scopes in verified tokens.
    pub scopes_ignored: prometheus::IntCounter,
    /// `smartgate_decisions_total{decision="allow",reason="granted"}`, resolved once.
    pub decision_allow: IntCounter,
    /// `smartgate_decision_cache_total{event="hit"}`
    pub decision_cache_hit: IntCounter,
    /// `smartgate_decision_cache_total{event="miss"}`
    pub decision_cache_miss: IntCounter,
    /// `smartgate_auth_mode_info{mode}`: 1 for the mode in force.
    pub auth_mode: IntGaugeVec,
    /// `smartgate_config_last_reload_success_timestamp_seconds` (start counts as one).
    pub reload_success_time: Gauge,
    /// `smartgate_tls_certificate_not_after_timestamp_seconds` of the served leaf.
    pub tls_not_after: Gauge,
    /// `smartgate_jwks_last_success_timestamp_seconds` of `auth.jwt`'s key set.
    pub jwks_last_success: Gauge,
    /// `smartgate_upstream_pool_idle_connections`
    pub pool_idle: IntGauge,
    /// `smartgate_upstream_connections_opened_total`, `…_reused_total`,
    /// `smartgate_upstream_retries_total`.
    pub pool: PoolCounters,
    /// `smartgate_cache_entries{cache}`, refreshed at each scrape.
    pub cache_entries: IntGaugeVec,
    /// `smartgate_header_read_timeouts_total`: connections closed for sending no complete
    /// request head in `server.header_read_timeout`.
    pub header_timeouts: IntCounter,
    /// `smartgate_draining`: 1 from SIGTERM on (`/readyz` fails).
    pub draining: IntGauge,
    /// The audit trail's counters.
    pub audit: AuditMetrics,
}

/// The current time as Unix seconds, for timestamp gauges.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Creates metrics and registers each in the gateway's registry as it is made. The
/// definitions are static, so a failure is a programming error caught by every test.
struct Registrar(Registry);

impl Registrar {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("static metric definition"))
    }

    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(
            IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition"),
        )
    }

    fn gauge(&self, name: &str, help: &str) -> Gauge {
        self.add(Gauge::new(name, help).expect("static metric definition"))
    }

    fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("static metric definition"))
    }

    fn int_gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition"))
    }

    fn histogram(&self, name: &str, help: &str) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.add(Histogram::with_opts(opts).expect("static metric definition"))
    }

    fn histograms(&self, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("static metric definition"))
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let r = Registrar(Registry::new());
        let requests = r.counters(
            "smartgate_requests_total",
            "Requests answered, by route and status class",
            &["route", "status_class"],
        );
        let request_duration = r.histograms(
            "smartgate_request_duration_seconds",
            "Time from request headers to response headers, by route",
            &["route"],
        );
        let response_rewrites = r.counters(
            "smartgate_response_rewrites_total",
            "FHIR JSON responses inspected for upstream links, by result",
            &["result"],
        );
        let response_verifications = r.counters(
            "smartgate_response_verifications_total",
            "Responses verified against the token (compartment, granular scopes), by result",
            &["result"],
        );
        let decisions = r.counters(
            "smartgate_decisions_total",
            "Authorization decisions, by decision and reason",
            &["decision", "reason"],
        );
        let decision_cache = r.counters(
            "smartgate_decision_cache_total",
            "Decision cache lookups, by event",
            &["event"],
        );
        let m = Metrics {
            routes: route_series(&requests, &request_duration),
            rewrites: resolved(&response_rewrites, REWRITE_RESULTS),
            verifications: resolved(&response_verifications, VERIFY_RESULTS),
            decision_allow: decisions.with_label_values(&["allow", "granted"]),
            decision_cache_hit: decision_cache.with_label_values(&["hit"]),
            decision_cache_miss: decision_cache.with_label_values(&["miss"]),
            requests,
            request_duration,
            response_rewrites,
            response_verifications,
            decisions,
            upstream_duration: r.histogram(
                "smartgate_upstream_duration_seconds",
                "Time from sending to the upstream to its response headers",
            ),
            upstream_errors: r.counters(
                "smartgate_upstream_errors_total",
                "Failed upstream exchanges, by kind",
                &["kind"],
            ),
            inflight: r.int_gauge("smartgate_inflight_requests", "Requests being handled"),
            worker_connections: r.int_gauges(
                "smartgate_worker_connections",
                "Open client connections, by worker thread",
                &["worker"],
            ),
            config_reloads: r.counters(
                "smartgate_config_reloads_total",
                "Configuration reloads, by result",
                &["result"],
            ),
            tls_reloads: r.counters(
                "smartgate_tls_reloads_total",
                "TLS certificate reloads, by result",
                &["result"],
            ),
            verify_removed: r.counter(
                "smartgate_verify_removed_entries_total",
                "Bundle entries removed from verified responses because the token could not read them",
            ),
            token_validations: r.counters(
                "smartgate_token_validations_total",
                "Bearer token verdicts, by mode and result (valid or the refusal reason)",
                &["mode", "result"],
            ),
            token_cache: r.counters(
                "smartgate_token_cache_total",
                "Token verdict cache events",
                &["event"],
            ),
            tokens_issued: r.counters(
                "smartgate_authz_requests_total",
                "Embedded authorization server requests, by result (issued or the OAuth error)",
                &["result"],
            ),
            jwks_fetches: r.counters(
                "smartgate_jwks_fetches_total",
                "JWKS fetches, by result",
                &["result"],
            ),
            scopes_ignored: r.counter(
                "smartgate_scopes_ignored_total",
                "Malformed scopes in verified tokens (ignored; they grant nothing)",
            ),
            auth_mode: r.int_gauges(
                "smartgate_auth_mode_info",
                "1 for the token check in force (auth.mode); mode=\"none\" checks no token",
                &["mode"],
            ),
            reload_success_time: r.gauge(
                "smartgate_config_last_reload_success_timestamp_seconds",
                "When the configuration in force was loaded (start or reload), Unix seconds",
            ),
            tls_not_after: r.gauge(
                "smartgate_tls_certificate_not_after_timestamp_seconds",
                "Expiry of the public listener's TLS certificate (leaf), Unix seconds; 0 without TLS",
            ),
            jwks_last_success: r.gauge(
                "smartgate_jwks_last_success_timestamp_seconds",
                "Last successful fetch of auth.jwt's key set, Unix seconds; 0 before the first",
            ),
            pool_idle: r.int_gauge(
                "smartgate_upstream_pool_idle_connections",
                "Idle keep-alive connections to the upstream, all workers",
            ),
            pool: PoolCounters {
                opened: r.counter(
                    "smartgate_upstream_connections_opened_total",
                    "Connections opened to the upstream",
                ),
                reused: r.counter(
                    "smartgate_upstream_connections_reused_total",
                    "Requests sent on a pooled keep-alive connection",
                ),
                retries: r.counter(
                    "smartgate_upstream_retries_total",
                    "Requests sent again on a new connection after a pooled one was found closed",
                ),
            },
            cache_entries: r.int_gauges(
                "smartgate_cache_entries",
                "Entries in the gateway's bounded caches, at scrape time",
                &["cache"],
            ),
            header_timeouts: r.counter(
                "smartgate_header_read_timeouts_total",
                "Client connections closed for not sending a request head within server.header_read_timeout",
            ),
            draining: r.int_gauge(
                "smartgate_draining",
                "1 once shutdown began: /readyz fails while requests are still served",
            ),
            audit: AuditMetrics {
                lines: r.counter("smartgate_audit_lines_total", "Audit lines queued for the sink"),
                dropped: r.counter(
                    "smartgate_audit_dropped_total",
                    "Audit lines dropped because the buffer (audit.buffer) was full",
                ),
                write_errors: r.counter(
                    "smartgate_audit_write_errors_total",
                    "Failed writes of audit lines to the sink",
                ),
                buffered: r.int_gauge(
                    "smartgate_audit_buffer_bytes",
                    "Audit bytes waiting for the writer",
                ),
            },
            registry: r.0,
        };
        m.register_process_and_build_info();
        m.create_known_series();
        m.reload_success_time.set(unix_now());
        m
    }

    /// `process_*` (Linux) and `smartgate_build_info{version,revision}`.
    fn register_process_and_build_info(&self) {
        let build_info = IntGaugeVec::new(
            Opts::new("smartgate_build_info", "Build information; always 1"),
            &["version", "revision"],
        )
        .expect("static metric definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), REVISION])
            .set(1);
        self.registry
            .register(Box::new(build_info))
            .expect("metric names are unique");
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
        #[cfg(target_os = "linux")]
        self.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");
    }

    /// Series known in advance exist from the start, at zero: an alert on rate() or
    /// increase() sees the first event, and a dashboard shows 0 rather than nothing.
    fn create_known_series(&self) {
        for r in ["success", "failure"] {
            self.config_reloads.with_label_values(&[r]);
            self.tls_reloads.with_label_values(&[r]);
            self.jwks_fetches.with_label_values(&[r]);
        }
        for kind in UPSTREAM_ERROR_KINDS {
            self.upstream_errors.with_label_values(&[kind]);
        }
        for reason in DENY_REASONS {
            self.decisions.with_label_values(&["deny", reason]);
        }
        for cache in CACHES {
            self.cache_entries.with_label_values(&[cache]);
        }
        for event in ["hit", "miss", "eviction"] {
            self.token_cache.with_label_values(&[event]);
        }
        self.tokens_issued.with_label_values(&["issued"]);
    }

    /// Marks `mode` as the token check in force.
    pub fn set_auth_mode(&self, mode: crate::config::AuthMode) {
        use crate::config::AuthMode;
        for m in [
            AuthMode::None,
            AuthMode::Jwt,
            AuthMode::Introspection,
            AuthMode::Embedded,
        ] {
            self.auth_mode
                .with_label_values(&[m.name()])
                .set(i64::from(m == mode));
        }
    }

    /// Counts one answered request and its duration.
    pub fn observe_request(&self, route: &'static str, status: http::StatusCode, secs: f64) {
        let class = status_class(status);
        match self.routes.iter().find(|r| r.route == route) {
            Some(series) => {
                let i = STATUS_CLASSES.iter().position(|c| *c == class).unwrap_or(4);
                series.by_class[i].inc();
                series.duration.observe(secs);
            }
            None => {
                self.requests.with_label_values(&[route, class]).inc();
                self.request_duration
                    .with_label_values(&[route])
                    .observe(secs);
            }
        }
    }

    /// Counts one inspected FHIR JSON response by result.
    pub fn count_rewrite(&self, result: &'static str) {
        count_in(&self.rewrites, &self.response_rewrites, result);
    }

    /// Counts one verified response by result.
    pub fn count_verify(&self, result: &'static str) {
        count_in(&self.verifications, &self.response_verifications, result);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The per-route series, resolved once: a label lookup hashes and locks on every count.
fn route_series(requests: &IntCounterVec, duration: &HistogramVec) -> Vec<RouteSeries> {
    ROUTES
        .iter()
        .map(|&route| RouteSeries {
            route,
            by_class: STATUS_CLASSES.map(|c| requests.with_label_values(&[route, c])),
            duration: duration.with_label_values(&[route]),
        })
        .collect()
}

/// `labels` of `vec`, resolved once.
fn resolved(vec: &IntCounterVec, labels: &[&'static str]) -> Vec<(&'static str, IntCounter)> {
    labels
        .iter()
        .map(|&l| (l, vec.with_label_values(&[l])))
        .collect()
}

/// Counts `label` on its resolved series, or through the vector for a label not resolved.
fn count_in(resolved: &[(&'static str, IntCounter)], vec: &IntCounterVec, label: &'static str) {
    match resolved.iter().find(|(r, _)| *r == label) {
        Some((_, c)) => c.inc(),
        None => vec.with_label_values(&[label]).inc(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// `2xx`, `4xx`, …: the status class label.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name{labels}` in the exposition, if it is there.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Counts land on their own label, resolved or not, and resolved series are
    /// exposed from zero.
    #[test]
    fn labelled_counts_land_on_their_label() {
        let m = Metrics::default();
        let before = m.render();
        for result in VERIFY_RESULTS.iter().chain(REWRITE_RESULTS) {
            assert!(
                before.contains(&format!("result=\"{result}\"}} 0")),
                "{result}"
            );
        }
        m.count_verify("passed");
        m.count_verify("passed");
        m.count_verify("refused");
        m.count_rewrite("skipped");
        m.count_rewrite("verify_unreadable");
        let text = m.render();
        for (series, expected) in [
            (
                r#"smartgate_response_verifications_total{result="passed"}"#,
                2.0,
            ),
            (
                r#"smartgate_response_verifications_total{result="refused"}"#,
                1.0,
            ),
            (
                r#"smartgate_response_verifications_total{result="filtered"}"#,
                0.0,
            ),
            (
                r#"smartgate_response_rewrites_total{result="skipped"}"#,
                1.0,
            ),
            (
                r#"smartgate_response_rewrites_total{result="verify_unreadable"}"#,
                1.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(expected), "{series}");
        }
    }
}

#[cfg(test)]
mod zero_tests {
    use super::*;
    use crate::policy::DenyReason;

    /// Every denial reason has its series from the start.
    #[test]
    fn every_deny_reason_is_listed() {
        let reasons = [
            DenyReason::InsufficientScope,
            DenyReason::NoPatientContext,
            DenyReason::Compartment,
            DenyReason::Granular,
            DenyReason::Unverifiable("x"),
            DenyReason::UnknownOperation,
            DenyReason::NestedBundle,
            DenyReason::Entries(Vec::new()),
            DenyReason::BadEntry(0),
        ];
        for r in &reasons {
            assert!(DENY_REASONS.contains(&r.code()), "{}", r.code());
        }
        assert_eq!(reasons.len(), DENY_REASONS.len());
        let text = Metrics::new().render();
        for r in DENY_REASONS {
            let series = format!("smartgate_decisions_total{{decision=\"deny\",reason=\"{r}\"}} 0");
            assert!(text.contains(&series), "{series}");
        }
    }
}

//! Prometheus metrics. One registry per gateway instance (not the global default), so
//! several gateways in one test process do not share counters. Every label has a small,
//! fixed set of values: never ids, never raw paths.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All metrics of one gateway.
pub struct Metrics {
    registry: Registry,
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
    /// `smartgate_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `smartgate_tls_reloads_total{result}`
    pub tls_reloads: IntCounterVec,
    /// `smartgate_response_rewrites_total{result}`: FHIR JSON bodies inspected.
    pub response_rewrites: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "smartgate_requests_total",
                "Requests answered, by route and status class",
            ),
            &["route", "status_class"],
        )
        .expect("static metric definition");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "smartgate_request_duration_seconds",
                "Time from request headers to response headers, by route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition");
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "smartgate_upstream_duration_seconds",
                "Time from sending to the upstream to its response headers",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "smartgate_upstream_errors_total",
                "Failed upstream exchanges, by kind",
            ),
            &["kind"],
        )
        .expect("static metric definition");
        let inflight = IntGauge::new("smartgate_inflight_requests", "Requests being handled")
            .expect("static metric definition");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "smartgate_config_reloads_total",
                "Configuration reloads, by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let tls_reloads = IntCounterVec::new(
            Opts::new(
                "smartgate_tls_reloads_total",
                "TLS certificate reloads, by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let response_rewrites = IntCounterVec::new(
            Opts::new(
                "smartgate_response_rewrites_total",
                "FHIR JSON responses inspected for upstream links, by result",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let build_info = IntGaugeVec::new(
            Opts::new("smartgate_build_info", "Build information; always 1"),
            &["version"],
        )
        .expect("static metric definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(inflight.clone()),
            Box::new(config_reloads.clone()),
            Box::new(tls_reloads.clone()),
            Box::new(response_rewrites.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Make the reload series visible from the start, so alerts can use rate() at once.
        for r in ["success", "failure"] {
            config_reloads.with_label_values(&[r]);
            tls_reloads.with_label_values(&[r]);
        }

        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            inflight,
            config_reloads,
            tls_reloads,
            response_rewrites,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
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

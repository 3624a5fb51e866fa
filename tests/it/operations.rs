//! What operators rely on: every metric documented and every metric the alerts and the
//! dashboard query really exposed, the mode in force announced, the drain that fails
//! /readyz before the listener closes, the connection counters, and the rate limiter's
//! memory under random client ids.

use std::collections::BTreeSet;
use std::time::Duration;

use http::StatusCode;

use crate::support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The metric families a gateway exposes (`# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Metric names in `text`: `smartgate_…` and `process_…` words.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices(['s', 'p']) {
        let rest = &text[i..];
        if !(rest.starts_with("smartgate_") || rest.starts_with("process_")) {
            continue;
        }
        if text[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        out.insert(name);
    }
    out
}

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap()
}

/// A gateway with the embedded authorization server, so that every family is there.
async fn embedded_gateway(up: &FakeUpstream, extra: &str) -> TestGateway {
    let auth = "[auth]\nmode = \"embedded\"\n";
    let text = config_auth(
        &up.base(),
        auth,
        &format!("[authorization_server]\nenabled = true\n{extra}"),
    );
    TestGateway::boot(&text).await
}

/// docs/operating.md lists exactly the metric families a gateway exposes, and every
/// metric the alert rules and the dashboard query is one of them.
#[tokio::test]
async fn metrics_are_documented_and_what_monitoring_queries_exists() {
    let up = FakeUpstream::echo().await;
    let gw = embedded_gateway(&up, "").await;
    let exposed = families(&metrics(&gw).await);
    assert!(exposed.len() > 35, "{exposed:?}");

    let docs = read("docs/operating.md");
    let section = docs.split("## Metrics").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    let documented: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split(['`', '{']).next())
        .map(str::to_owned)
        .collect();
    assert_eq!(
        documented.difference(&exposed).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "documented but not exposed"
    );
    assert_eq!(
        exposed.difference(&documented).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "exposed but not documented in docs/operating.md"
    );

    let histograms = ["_bucket", "_sum", "_count"];
    for file in [
        "deploy/helm/smartgate/files/prometheus-rules.yaml",
        "deploy/helm/smartgate/files/grafana-dashboard.json",
    ] {
        let queried = names_in(&read(file));
        assert!(queried.len() >= 5, "{file}: {queried:?}");
        for name in queried {
            let family = histograms
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| exposed.contains(*base))
                .unwrap_or(&name);
            assert!(
                exposed.contains(family),
                "{file} queries {name}, which no gateway exposes"
            );
        }
    }
    // The token check in force, for the alert on "none".
    let text = metrics(&gw).await;
    assert!(
        text.contains("smartgate_auth_mode_info{mode=\"embedded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("smartgate_auth_mode_info{mode=\"none\"} 0"),
        "{text}"
    );
    let revision = text
        .lines()
        .find(|l| l.starts_with("smartgate_build_info{"))
        .unwrap();
    assert!(revision.contains("revision=\""), "{revision}");
    gw.stop().await;

    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_auth_mode_info{mode=\"none\"} 1")
    );
    gw.stop().await;
}

/// On shutdown, /readyz fails at once while requests are still served for
/// `server.shutdown_delay`; then the listener closes.
#[tokio::test]
async fn draining_fails_readiness_before_the_listener_closes() {
    let up = FakeUpstream::echo().await;
    let text = config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nshutdown_delay = \"1500ms\"",
    );
    let mut gw = TestGateway::boot(&text).await;
    let ready = format!("http://{}/readyz", gw.admin);
    assert_eq!(get(&ready).await.0, StatusCode::OK);
    gw.signal_stop();
    let mut draining = false;
    for _ in 0..50 {
        let (status, _, body) = get(&ready).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(String::from_utf8_lossy(&body).contains("shutting down"));
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/readyz did not fail on shutdown");
    // Still serving meanwhile.
    assert_eq!(get(&gw.url("/r4/Patient")).await.0, StatusCode::OK);
    assert!(metrics(&gw).await.contains("smartgate_draining 1"));
    let addr = gw.addr;
    gw.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}

/// Upstream connections are counted: opened once, then reused.
#[tokio::test]
async fn upstream_connections_are_counted() {
    let up = FakeUpstream::echo().await;
    // One worker, one pool: each worker keeps its own.
    let text = config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nworkers = 1",
    );
    let gw = TestGateway::boot(&text).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/r4/Patient")).await.0, StatusCode::OK);
    }
    let text = metrics(&gw).await;
    assert!(
        text.contains("smartgate_upstream_connections_opened_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("smartgate_upstream_connections_reused_total 2\n"),
        "{text}"
    );
    assert!(
        text.contains("smartgate_upstream_pool_idle_connections 1\n"),
        "{text}"
    );
    gw.stop().await;
}

/// A connection that never sends a request head is closed and counted.
#[tokio::test]
async fn header_read_timeouts_are_counted() {
    let up = FakeUpstream::echo().await;
    let text = config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nheader_read_timeout = \"200ms\"",
    );
    let gw = TestGateway::boot(&text).await;
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("the silent connection was not closed");
    assert_eq!(closed.unwrap_or(0), 0);
    assert!(
        metrics(&gw)
            .await
            .contains("smartgate_header_read_timeouts_total 1\n")
    );
    gw.stop().await;
}

/// 10,000 token requests under random client ids leave one rate-limit bucket for all of
/// them: the limiter keys only registered clients.
#[tokio::test]
async fn random_client_ids_do_not_grow_the_rate_limiter() {
    use base64::Engine;
    let up = FakeUpstream::echo().await;
    let gw = embedded_gateway(&up, "rate_limit = 100000\n").await;
    let client = client();
    for i in 0..10_000u32 {
        let id = format!("random-{i}-{}", uuid::Uuid::new_v4());
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:secret"));
        let req = http::Request::post(gw.url("/r4/auth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", format!("Basic {basic}"))
            .body(body(
                "grant_type=client_credentials&scope=system%2FPatient.rs",
            ))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert!(resp.status().is_client_error());
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    }
    let text = metrics(&gw).await;
    assert!(
        text.contains("smartgate_cache_entries{cache=\"rate_limit_buckets\"} 1\n"),
        "{}",
        text.lines()
            .filter(|l| l.contains("cache_entries"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    gw.stop().await;
}

//! SMART App Launch in a real browser, against real servers: headless Chromium (Debian
//! `chromium`, driven by npm `playwright-core`) signs a patient in at npm `oidc-provider`,
//! approves on the gateway's consent page, and the app trades its code and reads through
//! the gateway from the Medplum FHIR engine: its own patient, and not the other. Then the
//! same with an app built on npm `fhirclient`, the SMART project's own client: an
//! independent check of the flows.

use std::time::Duration;

use smartgate::Config;

use crate::support::node::{NodeServer, e2e_dir, ensure_npm_packages};
use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_patient_launch_in_a_browser() {
    ensure_npm_packages();
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium is needed for the browser test (apt-get install chromium)");
    let fhir = NodeServer::start("fhir-server.mjs", &[], &[]);
    // The browser follows real addresses: the gateway and the provider on known ports.
    let (gw_port, idp_port, app_port) = (free_port(), free_port(), free_port());
    let fhirclient_port = free_port();
    let base = format!("http://127.0.0.1:{gw_port}/r4");
    let idp = NodeServer::start(
        "login-provider.mjs",
        &[],
        &[
            ("PORT", idp_port.to_string()),
            ("GATEWAY_CALLBACK", format!("{base}/auth/callback")),
            ("GATEWAY_SECRET", "browser-test-secret".into()),
        ],
    );
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{gw_port}"
public_base_url = "{base}"
[admin]
listen = "127.0.0.1:0"
[upstream]
url = "{fhir}"
[auth]
mode = "embedded"
[reload]
watch = false
[authorization_server]
enabled = true
[authorization_server.login]
issuer = "{issuer}"
client_id = "smartgate"
client_secret = "browser-test-secret"
scopes = ["openid", "fhirUser"]
[[authorization_server.clients]]
client_id = "browser-app"
public = true
redirect_uris = ["http://127.0.0.1:{app_port}/callback", "http://127.0.0.1:{fhirclient_port}/callback.html"]
scope = "launch/patient openid fhirUser offline_access patient/*.rs"
"#,
        fhir = fhir.address,
        issuer = idp.address,
    );
    let gw = TestGateway::boot(&text).await;
    let _ = Config::parse(&text, "browser", Vec::new()).unwrap();

    let seen = run_in_browser("browser-launch.mjs", &base, app_port, chromium).await;

    // The consent page, as the browser got it.
    assert_eq!(seen["consent_title"], "Allow access · smartgate", "{seen}");
    assert_eq!(
        seen["consent_labelled"], true,
        "every checkbox has its label"
    );
    assert_eq!(
        seen["consent_scopes"],
        serde_json::json!([
            "launch/patient",
            "openid",
            "fhirUser",
            "offline_access",
            "patient/*.rs"
        ])
    );
    let csp = seen["consent_headers"]["csp"].as_str().unwrap();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert_eq!(seen["consent_headers"]["frame"], "DENY");
    // Back in the app with its state; the token for what stayed checked.
    assert_eq!(seen["state_matches"], true, "{seen}");
    assert_eq!(seen["error"], serde_json::Value::Null);
    assert_eq!(seen["token_status"], 200);
    assert_eq!(seen["token_cache_control"], "no-store");
    assert_eq!(seen["token_type"], "Bearer");
    assert_eq!(seen["patient"], "p1");
    assert_eq!(seen["scope"], "launch/patient openid fhirUser patient/*.rs");
    assert_eq!(seen["has_id_token"], true);
    assert_eq!(
        seen["has_refresh_token"], false,
        "offline_access was unchecked"
    );
    // Its patient through the gateway from the real engine; the other refused.
    assert_eq!(seen["own_patient"], 200, "{seen}");
    assert_eq!(seen["other_patient"], 403, "{seen}");
    // Audited: the token issued to the app for that user.
    let lines = gw.audit_lines();
    assert!(
        lines.iter().any(|l| l["event"] == "token"
            && l["client_id"] == "browser-app"
            && l["reason"] == "issued"),
        "{lines:#?}"
    );

    // The same launch by the SMART project's own client library (npm fhirclient) in the
    // page: discovery, PKCE, the token over CORS, the patient in context.
    let report = run_in_browser("fhirclient-app.mjs", &base, fhirclient_port, chromium).await;
    assert_eq!(report["patient"], "p1", "{report}");
    assert_eq!(report["own"], "Patient/p1");
    assert_eq!(report["other"], 403);
    gw.stop().await;
    drop(idp);
}

/// Runs a browser script from tests/e2e against the gateway at `base`: its JSON report.
async fn run_in_browser(
    script: &str,
    base: &str,
    app_port: u16,
    chromium: &str,
) -> serde_json::Value {
    let (script, base, chromium) = (script.to_owned(), base.to_owned(), chromium.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(&script)
            .current_dir(e2e_dir())
            .env("GATEWAY", &base)
            .env("CLIENT_ID", "browser-app")
            .env("APP_PORT", app_port.to_string())
            .env("LOGIN", "p1")
            .env("OTHER_PATIENT", "p2")
            .env("CHROMIUM", &chromium)
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("the browser run took over two minutes")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "browser run failed: {stderr}");
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim().lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {line} {stderr}"))
}

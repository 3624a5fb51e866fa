//! Malformed and hostile HTTP/2 from a raw client (tests/h2/attacks.py, PyPI `h2` with
//! its validation off): data on bodiless methods, content-length disagreements,
//! connection-specific and forbidden headers, broken pseudo-headers, CR/LF/NUL in values,
//! rapid reset, CONTINUATION and PING floods. Each is refused, reset or cut off; nothing
//! of them reaches the upstream whole; the gateway goes on serving.

use crate::support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use support::*;

/// Where the Python packages of this test go when the machine lacks them.
fn python_path() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pydeps");
    let has = |path: &PathBuf| {
        Command::new("python3")
            .args(["-c", "import h2, hyperframe"])
            .env("PYTHONPATH", path)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&dir) {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&dir)
            .arg("h2==4.1.0")
            .status()
            .expect("python3 with pip is needed for the raw HTTP/2 tests");
        assert!(status.success(), "pip install h2 failed");
    }
    dir
}

#[tokio::test]
async fn malformed_and_hostile_http2_never_reaches_the_upstream() {
    let up = FakeUpstream::echo().await;
    let gw = TestGateway::boot(&config(&up.base(), "")).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/h2/attacks.py");
    let port = gw.addr.port().to_string();
    let pythonpath = python_path();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .arg(port)
            .env("PYTHONPATH", pythonpath)
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "attacks.py failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(results.len() >= 27, "{stdout}");
    for r in &results {
        let case = r["case"].as_str().unwrap();
        let status = r["status"].as_u64();
        if case == "still_serving" {
            assert_eq!(status, Some(200), "{r}");
            continue;
        }
        // Refused (4xx), reset, or the connection closed: never answered as a request.
        assert!(
            status.is_none_or(|s| (400..500).contains(&s)),
            "{case} was answered {status:?}: {r}"
        );
    }
    let seen = up.requests();
    for s in &seen {
        if s.uri.contains("evil-rapid-reset") {
            continue;
        }
        assert!(
            !s.uri.contains("evil") || !s.complete,
            "a malformed request reached the upstream whole: {} {} ({} bytes)",
            s.method,
            s.uri,
            s.body_len
        );
    }
    let rapid = seen
        .iter()
        .filter(|s| s.uri.contains("evil-rapid-reset"))
        .count();
    assert!(rapid <= 100, "{rapid} reset streams reached the upstream");
    gw.stop().await;
}

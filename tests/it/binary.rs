//! The `smartgate` binary: check-config messages, and a SIGTERM drain.

use crate::support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_smartgate");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("smartgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// check-config exits non-zero with a message naming the key, the value and what is
/// expected; for a good file it prints the effective configuration with secrets masked.
#[test]
fn check_config_messages() {
    let dir = tempfile::tempdir().unwrap();
    let good = config(
        "http://127.0.0.1:1/fhir",
        "[upstream.headers]\nAuthorization = \"Basic c2VjcmV0\"\n",
    );
    let cases = [
        (
            good.replace("http://127.0.0.1:1/fhir", "not a url"),
            "upstream.url: \"not a url\" is not an absolute http(s) URL",
        ),
        (
            good.replace("timeout = \"5s\"", "timeout = \"5 seconds\""),
            "upstream.timeout: \"5 seconds\" is not a duration",
        ),
        (
            good.replace("[auth]", "[auth]\nmod = \"jwt\""),
            "auth.mod: unknown field `mod`, expected one of `mode`",
        ),
        (
            good.replace(
                "listen = \"127.0.0.1:0\"\npublic",
                "listen = \"everywhere\"\npublic",
            ),
            "server.listen",
        ),
        // Refused by building it (the compile step start-up and reload run too), named by
        // file and key.
        (
            format!(
                "{good}\n[authorization_server]\nenabled = true\nsigning_key = \"/nonexistent/key.pem\"\n"
            ),
            "smartgate.toml: authorization_server.signing_key: /nonexistent/key.pem",
        ),
        (
            format!("{good}\n[policy.compartment_param]\nObservation = \"code\"\n"),
            "smartgate.toml: policy.compartment_param.Observation",
        ),
    ];
    for (text, expected) in cases {
        let path = write_config(&dir, &text);
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{expected}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "expected {expected:?} in {err}");
    }

    let path = write_config(&dir, &good);
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("Authorization = \"***\""), "{printed}");
    assert!(!printed.contains("c2VjcmV0"), "{printed}");

    // Environment overrides are applied and named in errors.
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("SMARTGATE__UPSTREAM__TIMEOUT", "soon")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SMARTGATE__UPSTREAM__TIMEOUT"), "{err}");

    // A missing file names the file.
    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/smartgate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/smartgate.toml"));
}

/// Starts `smartgate serve` and waits for its JSON "listening" line, which carries the
/// ports chosen for 127.0.0.1:0. Returns the child, its log lines, and both addresses.
#[allow(clippy::zombie_processes)] // the callers wait for (or kill and wait for) the child
pub(crate) fn spawn_gateway(
    path: &std::path::Path,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    String,
    String,
) {
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(path)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The audit trail (stdout), told apart from the log (stderr).
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = out.send(format!("{AUDIT}{line}"));
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("gateway did not start");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let (Some(p), Some(a)) = (v["public"].as_str(), v["admin"].as_str()) {
            return (child, rx, p.to_owned(), a.to_owned());
        }
    }
}

/// SIGTERM stops accepting, lets the in-flight request finish, and exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_request() {
    let up = FakeUpstream::start(Arc::new(|_: &Seen| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            json_response(StatusCode::OK, &json!({"slow": true}))
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &config(&up.base(), "[log]\nformat = \"json\"\nlevel = \"info\"\n"),
    );
    let (mut child, rx, addr, _) = spawn_gateway(&path);

    let url = format!("http://{addr}/r4/Patient/1");
    let in_flight = tokio::spawn(async move { get(&url).await });
    // Wait until the upstream has the request, then signal.
    for _ in 0..100 {
        if !up.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.requests().len(), 1, "request did not reach the upstream");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["slow"], true);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));

    // The audit line of the drained request is on stdout, written before the exit.
    let lines: Vec<String> = rx.try_iter().collect();
    let audit: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| l.strip_prefix(AUDIT))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        audit.iter().any(|l| l["event"] == "request"
            && l["status"] == 200
            && l["resource_type"].is_null()
            && l["method"] == "GET"),
        "{lines:#?}"
    );
    // And nothing of the trail went to the log.
    assert!(
        !lines
            .iter()
            .any(|l| !l.starts_with(AUDIT) && l.contains("\"event\":\"request\"")),
        "{lines:#?}"
    );
}

/// Marks lines the gateway wrote to stdout (the audit trail).
const AUDIT: &str = "audit> ";

/// explain-token prints the principal of a good token and the reason for a bad one, with
/// inline keys (no network), and exits 0 or 1 accordingly.
#[test]
fn explain_token_prints_verdicts() {
    use support::tokens::*;
    let key = TestKey::ec384("k1");
    let doc = jwks(&[&key]).to_string().replace('"', "\\\"");
    let auth = format!(
        "[auth]\nmode = \"jwt\"\n[auth.jwt]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks = \"{doc}\"\nalgorithms = [\"ES384\"]\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &config_auth("http://127.0.0.1:1/fhir", &auth, ""));
    let run = |token: &str| {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .args(["explain-token", "--config"])
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(token.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), report)
    };

    let (code, report) = run(&key.sign(&claims()));
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["verdict"], "valid");
    assert_eq!(report["principal"]["patient"], "123");
    assert_eq!(report["principal"]["client_id"], "app-1");

    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let (code, report) = run(&key.sign(&expired));
    assert_eq!(code, Some(1));
    assert_eq!(report["verdict"], "refused");
    assert_eq!(report["reason"], "expired");
    assert_eq!(report["claims_as_sent"]["patient"], "Patient/123");
}

/// SIGHUP re-reads the configuration file: the reload is counted, a bad file is refused
/// and the process keeps serving.
#[tokio::test]
async fn sighup_reloads_configuration() {
    let up = FakeUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&up.base(), "[log]\nformat = \"json\"\n");
    let path = write_config(&dir, &text);
    let (mut child, _rx, public, admin) = spawn_gateway(&path);
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let reloads = |result: &'static str| {
        let admin = admin.clone();
        async move {
            let m = String::from_utf8(get(&format!("http://{admin}/metrics")).await.2.to_vec())
                .unwrap();
            m.lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "smartgate_config_reloads_total{{result=\"{result}\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        }
    };

    // Whether the reload counter for `result` reaches 1 within 5 s.
    let counted = |result: &'static str| {
        let reloads = &reloads;
        async move {
            for _ in 0..100 {
                if reloads(result).await == 1 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };

    hup(child.id());
    assert!(counted("success").await, "SIGHUP did not reload");

    std::fs::write(&path, "not [valid toml").unwrap();
    hup(child.id());
    assert!(counted("failure").await, "a bad file was not refused");
    assert_eq!(
        get(&format!("http://{public}/r4/Patient")).await.0,
        StatusCode::OK
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// explain-scope needs no configuration and prints one line per permission plus the
/// reason for every ignored scope.
#[test]
fn explain_scope_prints_permissions() {
    let out = Command::new(BIN)
        .args([
            "explain-scope",
            "patient/Observation.rs user/*.cruds patient/Observation.sr openid",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("patient")
            && lines[0].contains("Observation")
            && lines[0].ends_with("rs")
    );
    // A patient/ scope says what it reaches of its type.
    assert_eq!(
        lines[1].trim(),
        "resources whose subject or performer references the patient"
    );
    assert!(lines[2].starts_with("user") && lines[2].ends_with("cruds"));
    assert!(lines[3].contains("ignored") && lines[3].contains("patient/Observation.sr"));
    let out = Command::new(BIN)
        .args([
            "explain-scope",
            "patient/Linkage.r patient/Medication.r patient/Subscription.r patient/EnrollmentResponse.r",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(
        lines[1],
        "resources whose item or source references the patient"
    );
    assert!(lines[3].starts_with("every instance: outside the patient compartment"));
    assert!(lines[5].starts_with("Subscriptions whose criteria"));
    assert!(lines[7].starts_with("none: a patient's only through another resource"));
}

/// decide prints the classification, the decision, its reason and the scope it needs.
#[test]
fn decide_prints_decisions() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).arg("decide").args(args).output().unwrap();
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    let (code, out) = run(&["--scopes", "user/Observation.rs", "GET /Observation?code=x"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("SearchType Observation") && out.contains("decision: allow"),
        "{out}"
    );
    let (code, out) = run(&["--scopes", "user/Observation.s", "GET /Observation/1"]);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("deny (insufficient_scope)") && out.contains("needs:    user/Observation.r"),
        "{out}"
    );
    let (code, out) = run(&[
        "--scopes",
        "patient/*.rs",
        "--patient",
        "123",
        "GET /Observation?code=x",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("add patient=Patient/123") && out.contains("verify every entry returned"),
        "{out}"
    );
    let (code, out) = run(&[
        "--scopes",
        "patient/*.rs",
        "--patient",
        "123",
        "GET /Patient/456",
    ]);
    assert_eq!(code, Some(1));
    assert!(out.contains("deny (compartment)"), "{out}");
    let (code, out) = run(&["GET /Patient%2F1"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("refuse before authorization"), "{out}");
}

/// keygen writes a 0600 PKCS#8 key, never overwrites one, and prints the public JWKS.
#[test]
fn keygen_writes_key_and_prints_jwks() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway-es384.pem");
    let out = Command::new(BIN)
        .args(["keygen", "--alg", "ES384", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    assert_eq!(jwks["keys"][0]["crv"], "P-384");
    assert!(
        jwks["keys"][0]["kid"]
            .as_str()
            .is_some_and(|k| !k.is_empty())
    );
    assert!(jwks["keys"][0].get("d").is_none(), "private part printed");
    let pem = std::fs::read_to_string(&path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pem);
}

/// The README's run command is `cargo run --release -- serve …`: with two binaries in the
/// package that only works while `default-run` names the gateway.
#[test]
fn cargo_run_runs_the_gateway() {
    let manifest: toml::Value = toml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["package"]["default-run"].as_str(),
        Some("smartgate")
    );
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- serve --config config/smartgate.example.toml"));
}

/// A CPU list as /proc writes it ("0-3,6") → the CPUs.
fn parse_cpu_list(list: &str) -> Vec<usize> {
    list.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => a.parse().unwrap()..=b.parse().unwrap(),
            None => part.parse().unwrap()..=part.parse().unwrap(),
        })
        .collect()
}

/// The CPUs `status` (a /proc status file) allows.
fn allowed(status: impl AsRef<std::path::Path>) -> Vec<usize> {
    let line = std::fs::read_to_string(status).unwrap_or_default();
    let list = line
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or("");
    parse_cpu_list(list)
}

/// The gateway's worker threads (by name, in order) and the CPUs each may run on.
fn worker_cpus(pid: u32) -> Vec<(String, Vec<usize>)> {
    let mut workers: Vec<(String, Vec<usize>)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let name = name.trim().to_owned();
            name.starts_with("smartgate-w")
                .then(|| (name, allowed(dir.join("status"))))
        })
        .collect();
    workers.sort();
    workers
}

/// With a worker per CPU (the default), each worker runs on a CPU of its own;
/// `worker_cpu_affinity = "off"` leaves them every CPU the process has. (On a machine
/// with one CPU, or a CPU quota below the CPUs it sees, nothing is pinned either way.)
#[cfg(target_os = "linux")]
#[test]
fn workers_are_pinned_one_per_cpu() {
    let cpus = allowed("/proc/self/status");
    assert!(!cpus.is_empty());
    let dir = tempfile::tempdir().unwrap();
    for affinity in ["auto", "off"] {
        let text = config(
            "http://127.0.0.1:1/fhir",
            "[log]\nformat = \"json\"\nlevel = \"info\"\n",
        )
        .replace(
            "shutdown_grace = \"5s\"",
            &format!("shutdown_grace = \"5s\"\nworker_cpu_affinity = \"{affinity}\""),
        );
        let path = write_config(&dir, &text);
        let (mut child, _rx, _, _) = spawn_gateway(&path);
        // workers = 0: one per CPU the process may use, fewer under a CPU quota (and
        // then never pinned).
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Where the sandbox refuses sched_setaffinity, the gateway warns and runs on.
        let may_pin = std::thread::spawn(|| {
            smartgate::server::affinity::pin_current_thread(
                smartgate::server::affinity::allowed_cpus().map_or(0, |cpus| cpus[0]),
            )
            .is_ok()
        })
        .join()
        .unwrap();
        let pinned = affinity == "auto" && may_pin && workers > 1 && workers == cpus.len();
        let mut expected: Vec<(String, Vec<usize>)> = (0..workers)
            .map(|i| {
                let on = if pinned { vec![cpus[i]] } else { cpus.clone() };
                (format!("smartgate-w{i}"), on)
            })
            .collect();
        expected.sort();
        // The workers pin themselves as they start.
        let mut seen = Vec::new();
        for _ in 0..100 {
            seen = worker_cpus(child.id());
            if seen == expected {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, expected, "worker_cpu_affinity = {affinity}");
    }
}

#[test]
fn cpu_lists_parse() {
    assert_eq!(parse_cpu_list("0-3,6\n"), [0, 1, 2, 3, 6]);
    assert_eq!(parse_cpu_list("1"), [1]);
}

/// The README stays a front page (at most 200 lines), and every relative link in it and
/// in docs/ leads to a file that exists.
#[test]
fn readme_is_short_and_links_resolve() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.lines().count() <= 200,
        "{} lines",
        readme.lines().count()
    );
    let mut pages = vec![(root.to_path_buf(), readme)];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        pages.push((root.join("docs"), std::fs::read_to_string(&path).unwrap()));
    }
    let mut links = 0;
    for (dir, text) in &pages {
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap().split('#').next().unwrap();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            assert!(
                dir.join(target).exists(),
                "broken link to {target} (from {dir:?})"
            );
            links += 1;
        }
    }
    assert!(links >= 12, "{links}");
}

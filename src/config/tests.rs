use super::*;
use std::time::Duration;

const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
public_base_url = "https://fhir.example.org/r4"

[upstream]
url = "http://127.0.0.1:8081/fhir"

[auth]
mode = "none"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "test.toml", Vec::new())
}

fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::parse(
        text,
        "test.toml",
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

/// Why `text` is refused: by parsing, or else by the compile step that start-up, reload
/// and check-config run.
fn err(text: &str) -> String {
    match parse(text) {
        Err(e) => e.to_string(),
        Ok(c) => compiled(&c).expect_err("accepted").to_string(),
    }
}

/// The compile step, as check-config runs it.
fn compiled(c: &Config) -> Result<(), crate::state::CompileError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async { crate::compile_check(c) })
}

/// A minimal file gets the documented defaults.
#[test]
fn minimal_file_has_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.server.max_request_body.0, 16 << 20);
    assert_eq!(c.server.shutdown_grace.0, Duration::from_secs(20));
    assert_eq!(c.upstream.timeout.0, Duration::from_secs(30));
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
    assert!(!c.upstream.forward_authorization);
    assert_eq!(c.server.public_base_url.path, "/r4");
}

/// The example configuration shipped in config/ is valid.
#[test]
fn example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/smartgate.example.toml");
    Config::load(Path::new(path), Vec::new()).unwrap();
}

/// Errors name the key, the value and what is expected.
#[test]
fn bad_url_names_key_and_value() {
    let e = err(&MINIMAL.replace("http://127.0.0.1:8081/fhir", "not a url"));
    assert!(
        e.contains("upstream.url: \"not a url\" is not an absolute http(s) URL"),
        "{e}"
    );
}

/// Typos are errors, not silently ignored keys.
#[test]
fn unknown_key_is_an_error() {
    let e = err(&MINIMAL.replace("[auth]", "[auth]\nmodee = \"jwt\""));
    assert!(e.contains("auth") && e.contains("modee"), "{e}");
    let e = err(&format!("{MINIMAL}\n[serverr]\nx = 1\n"));
    assert!(e.contains("serverr"), "{e}");
}

/// A missing required key is named.
#[test]
fn missing_key_is_named() {
    let e = err(&MINIMAL.replace("url = \"http://127.0.0.1:8081/fhir\"", ""));
    assert!(e.contains("upstream") && e.contains("url"), "{e}");
}

/// Durations and sizes are checked where they are written.
#[test]
fn bad_duration_names_key() {
    let e = err(&MINIMAL.replace("[upstream]", "[upstream]\ntimeout = \"30x\""));
    assert!(
        e.contains("upstream.timeout: \"30x\" is not a duration"),
        "{e}"
    );
    let e = err(&MINIMAL.replace("[server]", "[server]\nworker_cpu_affinity = \"yes\""));
    assert!(e.contains("server.worker_cpu_affinity"), "{e}");
    assert!(e.contains("auto") && e.contains("off"), "{e}");
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.server.worker_cpu_affinity, CpuAffinity::Auto);
    let e = err(&MINIMAL.replace("[server]", "[server]\nmax_request_body = \"lots\""));
    assert!(e.contains("server.max_request_body"), "{e}");
}

/// A zero timeout is refused, naming its key: none of them means "no limit".
#[test]
fn zero_timeouts_are_refused() {
    for (section, key) in [
        ("server", "header_read_timeout"),
        ("upstream", "timeout"),
        ("upstream", "connect_timeout"),
        ("upstream", "idle_timeout"),
    ] {
        let e = err(&MINIMAL.replace(
            &format!("[{section}]"),
            &format!("[{section}]\n{key} = \"0s\""),
        ));
        assert!(
            e.contains(&format!("{section}.{key}")) && e.contains("greater than 0"),
            "{e}"
        );
    }
}

/// Header credentials must be valid headers and not ones the gateway manages.
#[test]
fn upstream_headers_validated() {
    let e = err(&format!(
        "{MINIMAL}\n[upstream.headers]\n\"Bad Name\" = \"x\"\n"
    ));
    assert!(e.contains("upstream.headers.Bad Name"), "{e}");
    for managed in ["Connection", "Host", "Content-Length", "Transfer-Encoding"] {
        let e = err(&format!(
            "{MINIMAL}\n[upstream.headers]\n{managed} = \"1\"\n"
        ));
        assert!(e.contains(&format!("upstream.headers.{managed}")), "{e}");
        assert!(e.contains("managed by the gateway"), "{e}");
    }
    // The caller's identity cannot be written over the message's framing either.
    let e = err(&format!(
        "{MINIMAL}\n[auth.identity_headers]\nenabled = true\npatient = \"Content-Length\"\n"
    ));
    assert!(e.contains("auth.identity_headers.patient"), "{e}");
    assert!(e.contains("managed by the gateway"), "{e}");
}

/// Syntax errors say which line.
#[test]
fn syntax_error_has_line() {
    let e = err("[server]\nlisten = \n");
    assert!(e.contains("not valid TOML") && e.contains("line 2"), "{e}");
}

/// Environment variables override file values, typed like the file.
#[test]
fn env_overrides() {
    let c = parse_env(
        MINIMAL,
        &[
            ("SMARTGATE__UPSTREAM__URL", "http://other:9000/base"),
            ("SMARTGATE__UPSTREAM__TIMEOUT", "5s"),
            ("SMARTGATE__UPSTREAM__FORWARD_AUTHORIZATION", "true"),
            ("SMARTGATE__UPSTREAM__POOL_MAX_IDLE_PER_HOST", "8"),
            ("SMARTGATE__UPSTREAM__HEADERS__X_API_KEY", "12345"),
            (
                "SMARTGATE__UPSTREAM__ALIASES",
                r#"["http://fhir:8081/fhir"]"#,
            ),
            ("OTHER_VAR", "ignored"),
        ],
    )
    .unwrap();
    assert_eq!(c.upstream.url.as_string(), "http://other:9000/base");
    assert_eq!(c.upstream.timeout.0, Duration::from_secs(5));
    assert!(c.upstream.forward_authorization);
    assert_eq!(c.upstream.pool_max_idle_per_host, 8);
    assert_eq!(c.upstream.aliases.len(), 1);
    // Digits for a header value would be an integer; header values are strings.
    assert!(
        parse_env(
            MINIMAL,
            &[("SMARTGATE__UPSTREAM__HEADERS__X_API_KEY", "abc")]
        )
        .unwrap()
        .upstream
        .headers
        .contains_key("x-api-key")
    );
}

/// A bad override names the variable it came from.
#[test]
fn env_error_names_variable() {
    let e = parse_env(MINIMAL, &[("SMARTGATE__UPSTREAM__URL", "nope")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upstream.url") && e.contains("SMARTGATE__UPSTREAM__URL"),
        "{e}"
    );
    let e = parse_env(MINIMAL, &[("SMARTGATE__SERVER__LISTN", "x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("listn"), "{e}");
    let e = parse_env(MINIMAL, &[("SMARTGATE__SERVER____X", "x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty level"), "{e}");
}

/// Auth modes need their sections; unknown modes are refused.
#[test]
fn auth_mode_sections_required() {
    let e = err(&MINIMAL.replace("mode = \"none\"", "mode = \"jwt\""));
    assert!(e.contains("auth.jwt: is required"), "{e}");
    let e = err(&MINIMAL.replace("mode = \"none\"", "mode = \"introspection\""));
    assert!(e.contains("auth.introspection: is required"), "{e}");
    let e = err(&MINIMAL.replace("mode = \"none\"", "mode = \"bogus\""));
    assert!(e.contains("auth.mode"), "{e}");
}

const JWT: &str = "mode = \"jwt\"\n[auth.jwt]\nissuer = \"https://as.example.org\"\naudience = \"https://fhir.example.org/r4\"";

/// Symmetric algorithms can never be configured: no HMAC with a public key.
#[test]
fn jwt_algorithms_asymmetric_only() {
    parse(&MINIMAL.replace("mode = \"none\"", JWT)).unwrap();
    let e = err(&MINIMAL.replace(
        "mode = \"none\"",
        &format!("{JWT}\nalgorithms = [\"RS256\", \"HS256\"]"),
    ));
    assert!(
        e.contains("auth.jwt.algorithms") && e.contains("unknown variant `HS256`"),
        "{e}"
    );
    let e = err(&MINIMAL.replace("mode = \"none\"", &format!("{JWT}\njwks = \"{{}}\"")));
    assert!(e.contains("auth.jwt.jwks"), "{e}");
}

/// Introspection needs exactly one client authentication method, and masks secrets.
#[test]
fn introspection_client_auth() {
    let base = "mode = \"introspection\"\n[auth.introspection]\nendpoint = \"https://as.example.org/introspect\"\nclient_id = \"gw\"";
    let e = err(&MINIMAL.replace("mode = \"none\"", base));
    assert!(e.contains("exactly one of"), "{e}");
    let c = parse(&MINIMAL.replace(
        "mode = \"none\"",
        &format!("{base}\nclient_secret = \"hunter2\""),
    ))
    .unwrap();
    let out = c.to_masked_toml();
    assert!(!out.contains("hunter2") && out.contains("***"), "{out}");
    let e = err(&MINIMAL.replace(
        "mode = \"none\"",
        &format!("{base}\nbearer_token = \"x\"\nclient_secret = \"y\""),
    ));
    assert!(e.contains("exactly one of"), "{e}");
}

/// check-config never prints upstream credentials.
#[test]
fn masked_output_hides_secrets() {
    let c = parse(&format!(
        "{MINIMAL}\n[upstream.headers]\nAuthorization = \"Basic c2VjcmV0\"\n"
    ))
    .unwrap();
    let out = c.to_masked_toml();
    assert!(!out.contains("c2VjcmV0"), "{out}");
    assert!(out.contains("***"), "{out}");
    // The masked output is itself a valid configuration (secrets aside).
    assert!(parse(&out).is_ok(), "{out}");
}

/// The configuration of the Kubernetes example (the Helm chart's sidecar rendering)
/// stays valid with the environment its Deployment sets, and checks tokens.
#[test]
fn kubernetes_example_config_is_valid() {
    let yaml = include_str!("../../deploy/kubernetes/sidecar.yaml");
    let start = yaml.find("smartgate.toml: |").unwrap();
    let block: String = yaml[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    // `- name: SMARTGATE__…` followed by `value: "…"`.
    let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
    let env: Vec<(String, String)> = lines
        .windows(2)
        .filter_map(|w| {
            let name = w[0].strip_prefix("- name: ")?;
            let value = w[1].strip_prefix("value: ")?.trim_matches('"');
            name.starts_with("SMARTGATE__")
                .then(|| (name.to_owned(), value.to_owned()))
        })
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "SMARTGATE__SERVER__LISTEN"),
        "{env:?}"
    );
    let c = Config::parse(&block, "sidecar.yaml", env).unwrap();
    assert_ne!(c.auth.mode, AuthMode::None);
    assert!(!c.server.listen.ip().is_loopback());
    assert!(c.server.shutdown_delay.0 > Duration::ZERO);
}

/// The complete examples in config/examples/ stay valid.
#[test]
fn examples_are_valid() {
    for name in ["jwt.toml", "introspection.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/examples")
            .join(name);
        Config::load(&path, Vec::new()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Operation rules are checked at start, naming the row and key.
#[test]
fn policy_operations_validated() {
    let ok = format!(
        "{MINIMAL}\n[[policy.operations]]\nname = \"$lastn\"\nlevel = \"type\"\nresource_type = \"Observation\"\nrequires = \"s\"\n"
    );
    let c = parse(&ok).unwrap();
    assert_eq!(c.policy.operations.len(), 1);
    let e = err(&ok.replace("requires = \"s\"", "requires = \"rx\""));
    assert!(e.contains("policy.operations[0].requires"), "{e}");
    let e = err(&ok.replace("level = \"type\"", "level = \"server\""));
    assert!(e.contains("policy.operations[0].level"), "{e}");
    let e = err(&ok.replace("\"Observation\"", "\"Obs\""));
    assert!(e.contains("policy.operations[0].resource_type"), "{e}");
}

/// The embedded authorization server's configuration: errors name the key; secrets are
/// masked; discovery is derived from it.
#[test]
fn authorization_server_config() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("gw.pem");
    std::fs::write(&key, crate::keygen::generate("ES384").unwrap().0).unwrap();
    let hash = format!("sha256:{}", "ab".repeat(32));
    let with = |body: &str| {
        format!(
            "{MINIMAL}\n[authorization_server]\nenabled = true\nsigning_key = \"{}\"\n{body}",
            key.display()
        )
    };
    let client = format!(
        "[[authorization_server.clients]]\nclient_id = \"c\"\nclient_secret_hash = \"{hash}\"\nscope = \"system/*.rs\"\n"
    );
    let c = parse(&with(&client)).unwrap();
    let smart = c.effective_smart().unwrap();
    assert_eq!(
        smart.token_endpoint,
        "https://fhir.example.org/r4/auth/token"
    );
    assert!(
        smart
            .capabilities
            .contains(&"client-confidential-symmetric".to_owned())
    );
    assert!(!c.to_masked_toml().contains(&hash));
    // Without a signing key the process signs with a key of its own.
    parse(&format!(
        "{MINIMAL}\n[authorization_server]\nenabled = true\n"
    ))
    .unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            with("signing_alg = \"RS256\""),
            "authorization_server.signing_alg",
        ),
        (
            with("token_lifetime = \"2h\""),
            "authorization_server.token_lifetime",
        ),
        (with("rate_limit = 0"), "authorization_server.rate_limit"),
        (
            with(&client.replace(&hash, "sha256:xyz")),
            "authorization_server.clients[0].client_secret_hash",
        ),
        (
            with(&client.replace(
                "scope = \"system/*.rs\"",
                "scope = \"system/*.rs\"\njwks_uri = \"https://x/jwks\"",
            )),
            "authorization_server.clients[0].jwks: set exactly one",
        ),
        (
            with(&format!("{client}{client}")),
            "authorization_server.clients[1].client_id",
        ),
        (
            MINIMAL.replace("mode = \"none\"", "mode = \"embedded\""),
            "auth.mode: \"embedded\" needs [authorization_server]",
        ),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(e.contains(want), "{want}: {e}");
    }
    let bad_key = dir.path().join("bad.pem");
    std::fs::write(&bad_key, "nonsense").unwrap();
    let e = err(&with("").replace(&key.display().to_string(), &bad_key.display().to_string()));
    assert!(e.contains("authorization_server.signing_key"), "{e}");
}

/// `bulk_data.status_key`: at least 32 characters, masked by check-config, and
/// overridable from the environment like every key.
#[test]
fn bulk_data_status_key() {
    let e = err(&format!("{MINIMAL}\n[bulk_data]\nstatus_key = \"short\"\n"));
    assert!(
        e.contains("bulk_data.status_key") && e.contains("at least 32"),
        "{e}"
    );
    let key = "k".repeat(40);
    let c = parse(&format!("{MINIMAL}\n[bulk_data]\nstatus_key = \"{key}\"\n")).unwrap();
    assert_eq!(c.bulk_data.status_key.as_deref(), Some(key.as_str()));
    let out = c.to_masked_toml();
    assert!(!out.contains(&key) && out.contains("***"), "{out}");
    let c = parse_env(MINIMAL, &[("SMARTGATE__BULK_DATA__STATUS_KEY", &key)]).unwrap();
    assert_eq!(c.bulk_data.status_key.as_deref(), Some(key.as_str()));
    assert_eq!(parse(MINIMAL).unwrap().bulk_data.status_key, None);
    // Previous keys: each checked and masked, and only beside a current one.
    let old = "o".repeat(32);
    let rotated = format!(
        "{MINIMAL}\n[bulk_data]\nstatus_key = \"{key}\"\nprevious_status_keys = [\"{old}\", \"x\"]\n"
    );
    let e = err(&rotated);
    assert!(e.contains("bulk_data.previous_status_keys[1]"), "{e}");
    let c = parse(&rotated.replace(", \"x\"", "")).unwrap();
    let out = c.to_masked_toml();
    assert!(!out.contains(&old) && !out.contains(&key), "{out}");
    let e = err(&format!(
        "{MINIMAL}\n[bulk_data]\nprevious_status_keys = [\"{old}\"]\n"
    ));
    assert!(e.contains("needs bulk_data.status_key"), "{e}");
}

/// `auth.mode = "none"` serves only loopback unless the operator says it means it: an
/// unauthenticated proxy to PHI reachable from the network must not start by accident
/// (the container's `SMARTGATE__SERVER__LISTEN=0.0.0.0:8080`, say).
#[test]
fn no_token_checks_only_on_loopback() {
    parse(MINIMAL).unwrap();
    parse(&MINIMAL.replace("127.0.0.1:8080", "[::1]:8080")).unwrap();
    for listen in ["0.0.0.0:8080", "10.1.2.3:8080", "[::]:8080"] {
        let e = err(&MINIMAL.replace("127.0.0.1:8080", listen));
        assert!(
            e.contains("auth.mode") && e.contains("allow_unauthenticated"),
            "{listen}: {e}"
        );
        let e = parse_env(MINIMAL, &[("SMARTGATE__SERVER__LISTEN", listen)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.mode"), "{e}");
        let allowed = MINIMAL.replace("127.0.0.1:8080", listen).replace(
            "mode = \"none\"",
            "mode = \"none\"\nallow_unauthenticated = true",
        );
        parse(&allowed).unwrap();
    }
    // The opt-in changes nothing for the token modes.
    let embedded = MINIMAL
        .replace("127.0.0.1:8080", "0.0.0.0:8080")
        .replace("mode = \"none\"", "mode = \"embedded\"")
        + "\n[authorization_server]\nenabled = true\n";
    parse(&embedded).unwrap();
}

/// `[audit]`: a file sink needs its path; sizes have floors; stdout is the default.
#[test]
fn audit_config() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.audit.sink, AuditSink::Stdout);
    assert!(!c.audit.include_query);
    for (body, want) in [
        (
            "sink = \"file\"",
            "audit.path: is required with sink = \"file\"",
        ),
        (
            "sink = \"both\"",
            "audit.path: is required with sink = \"both\"",
        ),
        ("sink = \"syslog\"", "audit.sink"),
        ("sink = \"off\"\nmax_size = \"1KiB\"", "audit.max_size"),
        ("sink = \"off\"\nbuffer = 10", "audit.buffer"),
    ] {
        let e = err(&format!("{MINIMAL}\n[audit]\n{body}\n"));
        assert!(e.contains(want), "{want}: {e}");
    }
    let c = parse(&format!(
        "{MINIMAL}\n[audit]\nsink = \"both\"\npath = \"/var/log/audit.jsonl\"\nmax_files = 2\n"
    ))
    .unwrap();
    assert!(c.audit.sink.file() && c.audit.sink.stdout());
}

/// `section.key` names of the example file, set or commented out (`# key = …` under
/// `[section]` or `# [section]`).
fn example_keys() -> Vec<String> {
    let text = include_str!("../../config/smartgate.example.toml");
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if let Some(name) = line
            .strip_prefix("[[")
            .and_then(|l| l.split("]]").next())
            .or_else(|| line.strip_prefix('[').and_then(|l| l.split(']').next()))
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
            && !name.is_empty()
        {
            section = name.to_owned();
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !section.is_empty()
            && !key.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            let full = format!("{section}.{key}");
            if !keys.contains(&full) {
                keys.push(full);
            }
        }
    }
    keys
}

/// docs/configuration.md lists every key of the example file, and every key it lists is
/// one the gateway reads (an unknown one is refused as such; a known one with a wrong
/// value type is refused for its type).
#[test]
fn documented_keys_are_the_real_ones() {
    let docs = include_str!("../../docs/configuration.md");
    let documented: Vec<&str> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert!(documented.len() > 90, "{}", documented.len());
    let example = example_keys();
    assert!(example.len() > 80, "{example:?}");
    for key in &example {
        assert!(
            documented.contains(&key.as_str()),
            "{key} is in the example file but not in docs/configuration.md"
        );
    }
    for key in documented {
        let (section, name) = key.rsplit_once('.').unwrap();
        let header = match section {
            "policy.operations" | "authorization_server.clients" => format!("[[{section}]]"),
            _ => format!("[{section}]"),
        };
        // The key with a value of a type no key takes, in its own table.
        let text = if matches!(section, "server" | "upstream" | "auth") {
            let base: String = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(&format!("{name} =")))
                .map(|l| format!("{l}\n"))
                .collect();
            base.replace(
                &format!("[{section}]\n"),
                &format!("[{section}]\n{name} = {{ x = 1 }}\n"),
            )
        } else {
            format!("{MINIMAL}\n{header}\n{name} = {{ x = 1 }}\n")
        };
        let e = err(&text);
        assert!(
            !e.contains("unknown field"),
            "{key} is documented but the gateway does not read it: {e}"
        );
        assert!(e.contains(name), "{key}: {e}");
    }
}

/// Every TOML snippet in docs/ is a configuration the gateway accepts, completed with a
/// minimal [server], [upstream] and [auth] where it has none.
#[test]
fn configuration_snippets_in_docs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for block in text.split("```toml\n").skip(1) {
            let snippet = block.split("```").next().unwrap();
            let mut full = String::new();
            for (section, minimal) in [
                (
                    "[server]",
                    "[server]\nlisten = \"127.0.0.1:8080\"\npublic_base_url = \"https://fhir.example.org/r4\"\n",
                ),
                (
                    "[upstream]",
                    "[upstream]\nurl = \"http://127.0.0.1:8081/fhir\"\n",
                ),
                ("[auth]", "[auth]\nmode = \"none\"\n"),
            ] {
                if !snippet.contains(section) {
                    full.push_str(minimal);
                }
            }
            full.push_str(snippet);
            if let Err(e) = Config::parse(&full, &path.display().to_string(), Vec::new()) {
                panic!(
                    "{}: a snippet is not a valid configuration: {e}\n{snippet}",
                    path.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "{checked} snippets");
}

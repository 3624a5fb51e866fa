//! The `smartgate` command: parses the command line, sets up logging and signals, and
//! calls the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the request path allocates many small, short-lived buffers (headers, body
/// chunks); glibc's malloc was ~5% of the proxy's CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use smartgate::config::{Config, LogFormat};

/// SMART on FHIR policy enforcement gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (same as `serve --config FILE`).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the configuration and print it as it takes effect (secrets masked).
    CheckConfig,
    /// Read an access token from stdin and print what the gateway makes of it: the
    /// principal, or why it is refused. No network when the keys are inline.
    ExplainToken,
    /// Print what a scope string grants, one line per permission, and why any scope is
    /// ignored. Needs no configuration.
    ExplainScope {
        /// Space-separated scopes, as in a token's `scope` claim.
        scopes: String,
    },
    /// Generate a signing key (PKCS#8 PEM) and print its public JWKS.
    Keygen {
        /// ES384 (default) or ES256.
        #[arg(long, default_value = "ES384")]
        alg: String,
        /// Where to write the private key (created with mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Mint a client assertion (RFC 7523) for testing a Backend Services client.
    ClientAssertion {
        /// PEM private key (from `keygen`, or RSA).
        #[arg(long)]
        key: PathBuf,
        /// ES384 (default), ES256, RS384 or RS256.
        #[arg(long, default_value = "ES384")]
        alg: String,
        /// The client id (iss and sub).
        #[arg(long)]
        client_id: String,
        /// The token endpoint URL (aud).
        #[arg(long)]
        aud: String,
        /// kid in the header (default: the key's thumbprint, as keygen publishes it).
        #[arg(long)]
        kid: Option<String>,
    },
    /// Print the decision for one request: `decide --scopes 'patient/*.rs' --patient 123
    /// 'GET /Observation?code=x'` (path relative to the FHIR base). Needs no configuration.
    Decide {
        /// Space-separated scopes.
        #[arg(long, default_value = "")]
        scopes: String,
        /// The patient in context.
        #[arg(long)]
        patient: Option<String>,
        /// fhirUser (a Patient user confines user/ scopes).
        #[arg(long)]
        fhir_user: Option<String>,
        /// "METHOD /path?query"
        request: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::ExplainScope { scopes }) = &cli.command {
        let grants = smartgate::smart::scope::Grants::parse(smartgate::smart::scope::split(scopes));
        for (i, line) in grants.explain().iter().enumerate() {
            println!("{line}");
            // What a patient/ scope reaches of its type, on an indented line.
            if let Some(s) = grants.scopes.get(i)
                && s.level == smartgate::smart::scope::Level::Patient
            {
                println!("{:9}{}", "", smartgate::policy::confinement(&s.resource));
            }
        }
        if grants.scopes.is_empty() {
            println!("(no data access granted)");
        }
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Keygen { alg, out }) = &cli.command {
        return keygen(alg, out);
    }
    if let Some(Command::ClientAssertion {
        key,
        alg,
        client_id,
        aud,
        kid,
    }) = &cli.command
    {
        let pem = match std::fs::read(key) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {}: {e}", key.display());
                return ExitCode::from(2);
            }
        };
        return match smartgate::keygen::client_assertion(&pem, alg, client_id, aud, kid.as_deref())
        {
            Ok(a) => {
                println!("{a}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::Decide {
        scopes,
        patient,
        fhir_user,
        request,
    }) = &cli.command
    {
        return decide(scopes, patient.as_deref(), fhir_user.as_deref(), request);
    }
    let Some(path) = cli.config else {
        eprintln!("error: --config FILE is required (see config/smartgate.example.toml)");
        return ExitCode::from(2);
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::load(&path, env.iter().cloned()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            // The same compile step as start-up and reload: keys, JWKS, rules, discovery.
            let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
                return ExitCode::FAILURE;
            };
            if let Err(e) = runtime.block_on(async { smartgate::compile_check(&config) }) {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(2);
            }
            print!("{}", config.to_masked_toml());
            eprintln!("configuration OK: {}", path.display());
            ExitCode::SUCCESS
        }
        Command::Serve => serve(config, &path, env),
        Command::ExplainToken => explain_token(&config),
        Command::ExplainScope { .. }
        | Command::Decide { .. }
        | Command::Keygen { .. }
        | Command::ClientAssertion { .. } => ExitCode::SUCCESS,
    }
}

fn serve(config: Config, path: &Path, env: Vec<(String, String)>) -> ExitCode {
    init_logging(&config);
    if config.auth.mode == smartgate::config::AuthMode::None {
        tracing::warn!(
            "auth.mode = \"none\": requests are forwarded WITHOUT any token check; \
             use this only for trials and benchmarks"
        );
    }
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async move {
        // Handlers first: a signal that arrives once we announce ourselves must find them
        // installed, not the default action (which would kill the process).
        let signals = Signals::install();
        let gateway = smartgate::Gateway::bind(config, Some(path.to_path_buf()), env).await?;
        tracing::info!(
            public = %gateway.public_addr(),
            admin = %gateway.admin_addr(),
            version = env!("CARGO_PKG_VERSION"),
            "smartgate listening"
        );
        let handle = gateway.handle();
        let Signals { term, hup } = signals;
        if let Some(hup) = hup {
            tokio::spawn(reload_on_sighup(hup, handle));
        }
        gateway.serve(shutdown_signal(term)).await;
        Ok::<(), smartgate::StartError>(())
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            match e {
                smartgate::StartError::Compile(e) => eprintln!("error: {}: {e}", path.display()),
                e => eprintln!("error: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn decide(scopes: &str, patient: Option<&str>, fhir_user: Option<&str>, request: &str) -> ExitCode {
    use smartgate::fhir::request::classify;
    use smartgate::policy::{Context, Decision, Policy, Verify, authorize};
    use smartgate::smart::scope::Grants;

    let Some((method, target)) = request.trim().split_once(' ') else {
        eprintln!("error: the request must be \"METHOD /path?query\"");
        return ExitCode::from(2);
    };
    let Ok(method) = method.parse::<http::Method>() else {
        eprintln!("error: {method:?} is not an HTTP method");
        return ExitCode::from(2);
    };
    let (path, query) = match target.trim().split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.trim(), None),
    };
    let grants = Grants::parse(smartgate::smart::scope::split(scopes));
    for (s, e) in &grants.ignored {
        println!("ignored scope {s:?}: {e}");
    }
    let req = match classify(&method, path, query, &http::HeaderMap::new(), None, None) {
        Ok(r) => r,
        Err(e) => {
            println!("decision: refuse before authorization ({e})");
            return ExitCode::from(1);
        }
    };
    println!(
        "request:  {:?} {} {}",
        req.interaction,
        req.resource_type.unwrap_or("(all types)"),
        req.id.as_deref().unwrap_or("")
    );
    let ctx = Context::new(patient, fhir_user, false);
    match authorize(&grants, &ctx, &req, &Policy::default()) {
        Decision::Allow(plan) => {
            println!("decision: allow");
            let mut steps = Vec::new();
            if let Some(w) = &plan.write {
                steps.push(format!("check the write first ({:?})", w.check));
            }
            if !plan.inject.is_empty() {
                let p: Vec<String> = plan
                    .inject
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                steps.push(format!("add {}", p.join("&")));
            }
            steps.push("forward".into());
            match plan.verify {
                Verify::None => {}
                Verify::Resource(_) => steps.push("verify the resource returned".into()),
                Verify::Bundle { .. } => steps.push("verify every entry returned".into()),
            }
            if plan.rewrite_links {
                steps.push("rewrite upstream links in the response".into());
            }
            println!("plan:     {}", steps.join("; "));
            ExitCode::SUCCESS
        }
        Decision::Deny { reason, needed } => {
            println!("decision: deny ({})", reason.code());
            println!("reason:   {reason}");
            if !needed.is_empty() {
                println!("needs:    {needed}");
            }
            ExitCode::from(1)
        }
    }
}

fn keygen(alg: &str, out: &Path) -> ExitCode {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (pem, jwks) = match smartgate::keygen::generate(alg) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out);
    let written = file.and_then(|mut f| f.write_all(pem.as_bytes()));
    if let Err(e) = written {
        eprintln!("error: {}: {e}", out.display());
        return ExitCode::from(2);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&jwks).unwrap_or_default()
    );
    eprintln!("private key written to {} (keep it secret)", out.display());
    ExitCode::SUCCESS
}

fn explain_token(config: &Config) -> ExitCode {
    let mut token = String::new();
    if std::io::Read::read_to_string(&mut std::io::stdin(), &mut token).is_err() {
        eprintln!("error: cannot read the token from stdin");
        return ExitCode::from(2);
    }
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(smartgate::auth::explain::explain_token(config, &token)) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            if report["verdict"] == "valid" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The control runtime (the gateway's workers run their own).
fn runtime(builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    let mut builder = builder;
    builder
        .enable_all()
        .build()
        .inspect_err(|e| eprintln!("error: cannot start the runtime: {e}"))
        .ok()
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = match config.log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// The signal streams, registered before the gateway announces itself.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate())
            .inspect_err(|e| tracing::error!(error = %e, "cannot listen for SIGTERM"))
            .ok();
        let hup = signal(SignalKind::hangup())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change only"))
            .ok();
        Signals { term, hup }
    }
}

/// SIGTERM (Kubernetes, systemd) or SIGINT (Ctrl-C).
async fn shutdown_signal(term: Option<tokio::signal::unix::Signal>) {
    match term {
        Some(mut term) => tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        },
        None => {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("SIGINT received");
        }
    }
}

/// SIGHUP re-reads the configuration file.
async fn reload_on_sighup(mut hup: tokio::signal::unix::Signal, handle: smartgate::GatewayHandle) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading configuration");
        let _ = handle.reload();
    }
}

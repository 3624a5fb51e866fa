//! The audit trail: one JSON line per request, and per token the embedded authorization
//! server issues or refuses, on a sink of its own (`[audit]`: standard output, a file
//! rotated by size, or both), apart from the debug log on standard error.
//!
//! A request never waits for the disk: its line is serialised on the request's thread into
//! a buffer of at most `audit.buffer` bytes, which a writer thread empties every 100 ms
//! (sooner when 64 KiB have gathered). A line that finds the buffer full is dropped and
//! counted (`smartgate_audit_dropped_total`), for an alert to catch.
//!
//! PHI-aware by default: no query values, bodies or tokens; the query string only with
//! `audit.include_query = true`.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{AuditConfig, AuditSink};
use crate::fhir::request::{FhirRequest, Interaction};
use crate::metrics::AuditMetrics;

/// Lines gathered before the writer is woken early.
const WAKE_AT: usize = 64 << 10;
/// How often the writer empties the buffer when it is not woken early.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// What a request acted on, as far as the gateway classified it. Kept beside a cached
/// decision, so a request decided from the cache is recorded like any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The FHIR interaction.
    pub interaction: Interaction,
    /// The resource type, where there is one.
    pub resource_type: Option<&'static str>,
    /// The resource id (instance level).
    pub id: Option<Box<str>>,
}

impl Target {
    /// The target of a classified request.
    pub fn of(req: &FhirRequest) -> Target {
        Target {
            interaction: req.interaction,
            resource_type: req.resource_type,
            id: req.id.as_deref().map(Box::from),
        }
    }
}

/// The FHIR `restful-interaction` code of an interaction (`read`, `search-type`, …).
pub fn interaction_code(i: Interaction) -> &'static str {
    match i {
        Interaction::Read => "read",
        Interaction::Vread => "vread",
        Interaction::Update => "update",
        Interaction::Patch => "patch",
        Interaction::Delete => "delete",
        Interaction::HistoryInstance => "history-instance",
        Interaction::HistoryType => "history-type",
        Interaction::HistorySystem => "history-system",
        Interaction::Create => "create",
        Interaction::SearchType => "search-type",
        Interaction::SearchSystem => "search-system",
        Interaction::SearchCompartment => "search-compartment",
        Interaction::Capabilities => "capabilities",
        Interaction::Batch => "batch",
        Interaction::Transaction => "transaction",
        Interaction::OperationSystem
        | Interaction::OperationType
        | Interaction::OperationInstance => "operation",
    }
}

/// What the embedded authorization server did with a token or introspection request.
#[derive(Debug, Clone, Default)]
pub struct AuthzNote {
    /// `token` or `introspect`.
    pub endpoint: &'static str,
    /// The client, once authenticated (never a client id that failed to authenticate).
    pub client_id: Option<String>,
    /// The scopes granted (`token`).
    pub scope: Option<String>,
    /// `issued`, `active`, `inactive`, or the OAuth error code.
    pub result: &'static str,
}

/// One line of the trail. Every field is always present (`null` when unknown), so that
/// whatever reads the trail sees one shape.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    /// `request` (a request through the gateway), `token` or `introspect` (the embedded
    /// authorization server).
    pub event: &'static str,
    /// `X-Request-Id` (the client's, or one the gateway made).
    pub request_id: &'a str,
    /// The W3C `traceparent` trace id, when the request carried a valid one.
    pub trace_id: Option<&'a str>,
    /// The TCP peer.
    pub peer: String,
    /// `X-Forwarded-For` as the client sent it (unverified, at most 256 characters).
    pub forwarded_for: Option<&'a str>,
    /// The token's `iss`.
    pub issuer: Option<&'a str>,
    /// The client the token was issued to (or the authenticated client at the embedded
    /// authorization server).
    pub client_id: Option<&'a str>,
    /// The token's `sub`.
    pub sub: Option<&'a str>,
    /// The token's `fhirUser`.
    pub fhir_user: Option<&'a str>,
    /// The patient in context.
    pub patient: Option<&'a str>,
    /// Scopes granted (token issuance only; requests carry the principal instead).
    pub scope: Option<&'a str>,
    /// HTTP method.
    pub method: &'a str,
    /// `fhir`, `metadata`, `discovery`, `auth`, `not_found`.
    pub route: &'static str,
    /// FHIR interaction code, when the request was classified.
    pub interaction: Option<&'static str>,
    /// Resource type, when known.
    pub resource_type: Option<&'static str>,
    /// Resource id, when known.
    pub id: Option<&'a str>,
    /// The query string: only with `audit.include_query`.
    pub query: Option<&'a str>,
    /// `allow`, `filtered` (answered with what the token could not see removed or
    /// withheld), `deny` (refused: token or policy), `error` (not forwarded: a malformed
    /// request, or the gateway or the upstream failed), `issued`/`refused` (tokens).
    pub decision: &'static str,
    /// Why, for anything but a plain `allow`: the denial, token or error code.
    pub reason: Option<&'a str>,
    /// Entries removed from the answer by verification.
    pub removed: u64,
    /// The upstream's status, when it answered.
    pub upstream_status: Option<u16>,
    /// The status sent to the client; `null` when the client went away first.
    pub status: Option<u16>,
    /// The client abandoned the request before its answer (the upstream may still have
    /// acted on it: see `upstream_status`).
    pub aborted: bool,
    /// Time in the gateway, from request head to response head (or to the abort).
    pub duration_ms: f64,
    /// Time from sending to the upstream to its response head.
    pub upstream_ms: Option<f64>,
}

/// The W3C trace context trace id of a `traceparent` value (`00-<32 hex>-<16 hex>-<2
/// hex>`), unless malformed or all zeros.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(traceparent).ok()?;
    let mut parts = text.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none())
        && trace.bytes().any(|b| b != b'0');
    valid.then_some(trace)
}

/// `time` as RFC 3339 UTC with milliseconds (`2026-12-07T06:30:00.123Z`).
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (H. Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The audit trail of one gateway. Cheap to share; lines go to the writer thread.
pub struct Audit {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    limit: usize,
    /// Held while a batch is taken and written, so that batches land in order.
    writer: Mutex<Writer>,
    metrics: AuditMetrics,
    stop: std::sync::atomic::AtomicBool,
}

struct Writer {
    stdout: bool,
    file: Option<RotatingFile>,
}

/// A file rotated by size: `path` → `path.1` → … → `path.{keep}`.
struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    keep: u32,
}

impl RotatingFile {
    fn open(path: &Path, max_size: u64, keep: u32) -> std::io::Result<RotatingFile> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_owned(),
            file,
            size,
            max_size,
            keep,
        })
    }

    /// Writes whole lines, rotating first when the next line would take the file past
    /// `max_size` (a single longer line gets a file of its own).
    fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let room =
                usize::try_from(self.max_size.saturating_sub(self.size)).unwrap_or(usize::MAX);
            let fits = match bytes.get(..room.min(bytes.len())) {
                Some(window) if window.len() == bytes.len() => bytes.len(),
                Some(window) => memchr::memrchr(b'\n', window).map_or(0, |i| i + 1),
                None => 0,
            };
            let take = match fits {
                0 if self.size > 0 => {
                    self.rotate()?;
                    continue;
                }
                0 => memchr::memchr(b'\n', bytes).map_or(bytes.len(), |i| i + 1),
                n => n,
            };
            self.file.write_all(&bytes[..take])?;
            self.size += take as u64;
            bytes = &bytes[take..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let numbered = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for i in (1..self.keep).rev() {
                let from = numbered(i);
                if from.exists() {
                    std::fs::rename(&from, numbered(i + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    options.open(path)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Audit {
    /// Opens the sink `config` names and starts its writer thread (none for `off`).
    pub fn start(config: &AuditConfig, metrics: AuditMetrics) -> Result<Audit, String> {
        if config.sink == AuditSink::Off {
            return Ok(Audit { inner: None });
        }
        let file = match (&config.path, config.sink.file()) {
            (Some(path), true) => Some(
                RotatingFile::open(path, config.max_size.0, config.max_files)
                    .map_err(|e| format!("audit.path: {}: {e}", path.display()))?,
            ),
            _ => None,
        };
        let inner = Arc::new(Inner {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            limit: usize::try_from(config.buffer.0).unwrap_or(usize::MAX),
            writer: Mutex::new(Writer {
                stdout: config.sink.stdout(),
                file,
            }),
            metrics,
            stop: Default::default(),
        });
        let thread = inner.clone();
        std::thread::Builder::new()
            .name("smartgate-audit".into())
            .spawn(move || thread.run())
            .map_err(|e| format!("audit: cannot start the writer thread: {e}"))?;
        Ok(Audit { inner: Some(inner) })
    }

    /// A trail that records nothing.
    pub fn off() -> Audit {
        Audit { inner: None }
    }

    /// Whether lines are recorded at all.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues one line; never blocks on the sink. Dropped (and counted) when the buffer
    /// is full.
    pub fn record(&self, line: &Line<'_>) {
        let Some(inner) = &self.inner else { return };
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            buf.clear();
            if serde_json::to_writer(&mut *buf, line).is_err() {
                return;
            }
            buf.push(b'\n');
            let mut pending = lock(&inner.pending);
            if pending.len() + buf.len() > inner.limit {
                drop(pending);
                inner.metrics.dropped.inc();
                return;
            }
            pending.extend_from_slice(&buf);
            inner.metrics.buffered.set(pending.len() as i64);
            inner.metrics.lines.inc();
            if pending.len() >= WAKE_AT {
                inner.wake.notify_one();
            }
        });
    }

    /// Writes every queued line now (shutdown, tests).
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            inner.write_batch();
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        if let Some(inner) = &self.inner {
            inner.stop.store(true, std::sync::atomic::Ordering::Release);
            inner.wake.notify_one();
            inner.write_batch();
        }
    }
}

impl Inner {
    fn run(&self) {
        loop {
            {
                let pending = lock(&self.pending);
                if pending.len() < WAKE_AT && !self.stop.load(std::sync::atomic::Ordering::Acquire)
                {
                    drop(
                        self.wake
                            .wait_timeout(pending, FLUSH_EVERY)
                            .unwrap_or_else(PoisonError::into_inner),
                    );
                }
            }
            self.write_batch();
            if self.stop.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
        }
    }

    /// Takes what is queued and writes it, in order with any other batch.
    fn write_batch(&self) {
        let mut writer = lock(&self.writer);
        let batch = {
            let mut pending = lock(&self.pending);
            self.metrics.buffered.set(0);
            std::mem::take(&mut *pending)
        };
        if batch.is_empty() {
            return;
        }
        if writer.stdout {
            let mut out = std::io::stdout().lock();
            if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                self.metrics.write_errors.inc();
            }
        }
        if let Some(file) = &mut writer.file
            && let Err(e) = file.write(&batch)
        {
            self.metrics.write_errors.inc();
            tracing::error!(error = %e, path = %file.path.display(), "audit: cannot write the trail");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use prometheus::{IntCounter, IntGauge};

    fn metrics() -> AuditMetrics {
        AuditMetrics {
            lines: IntCounter::new("l", "l").unwrap(),
            dropped: IntCounter::new("d", "d").unwrap(),
            write_errors: IntCounter::new("e", "e").unwrap(),
            buffered: IntGauge::new("b", "b").unwrap(),
        }
    }

    fn line(request_id: &str) -> Line<'_> {
        Line {
            time: rfc3339(UNIX_EPOCH),
            event: "request",
            request_id,
            trace_id: None,
            peer: "127.0.0.1:1".into(),
            forwarded_for: None,
            issuer: None,
            client_id: None,
            sub: None,
            fhir_user: None,
            patient: None,
            scope: None,
            method: "GET",
            route: "fhir",
            interaction: None,
            resource_type: None,
            id: None,
            query: None,
            decision: "allow",
            reason: None,
            removed: 0,
            upstream_status: None,
            status: Some(200),
            aborted: false,
            duration_ms: 0.0,
            upstream_ms: None,
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_625_000_123);
        assert_eq!(rfc3339(t), "2026-12-07T06:30:00.123Z");
        // A leap day, and the last millisecond of a year.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_735_689_599_999);
        assert_eq!(rfc3339(t), "2024-12-31T23:59:59.999Z");
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(ok), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        // A later version may carry more fields.
        let later = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz";
        assert!(trace_id(later).is_some());
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"\"},{\"x\":1",
            b"",
        ] {
            assert_eq!(trace_id(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    /// Lines reach the file in order, one JSON object each, and the file rotates by
    /// size, keeping `max_files` old ones.
    #[test]
    fn file_sink_writes_in_order_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let config = AuditConfig {
            sink: AuditSink::File,
            path: Some(path.clone()),
            max_size: ByteSize(4096),
            max_files: 2,
            ..AuditConfig::default()
        };
        let m = metrics();
        let audit = Audit::start(&config, m.clone()).unwrap();
        let ids: Vec<String> = (0..100).map(|i| format!("req-{i:03}")).collect();
        for id in &ids {
            audit.record(&line(id));
            if id.ends_with('0') {
                audit.flush();
            }
        }
        audit.flush();
        assert_eq!(m.lines.get(), 100);
        assert_eq!(m.dropped.get(), 0);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let rotated = |i: u32| PathBuf::from(format!("{}.{i}", path.display()));
        assert!(!rotated(3).exists(), "only max_files old files are kept");
        let text = read(&rotated(2)) + &read(&rotated(1)) + &read(&path);
        let seen: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| v["request_id"].as_str().unwrap().to_owned())
            .collect();
        // The oldest lines went with the oldest file; the rest are in order.
        assert!(seen.len() >= 15 && seen.len() < 100, "{}", seen.len());
        assert_eq!(seen[..], ids[ids.len() - seen.len()..]);
        for p in [path.clone(), rotated(1)] {
            assert!(std::fs::metadata(&p).unwrap().len() <= 4096);
        }
    }

    /// A full buffer drops lines (counted) rather than making a request wait.
    #[test]
    fn a_full_buffer_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig {
            sink: AuditSink::File,
            path: Some(dir.path().join("a")),
            buffer: ByteSize(4096),
            ..AuditConfig::default()
        };
        let m = metrics();
        let audit = Audit::start(&config, m.clone()).unwrap();
        // Hold the writer so nothing drains while the buffer fills.
        let inner = audit.inner.clone().unwrap();
        let held = lock(&inner.writer);
        for _ in 0..200 {
            audit.record(&line("x"));
        }
        assert!(m.dropped.get() > 0);
        assert_eq!(m.lines.get() + m.dropped.get(), 200);
        assert!(m.buffered.get() <= 4096);
        drop(held);
        audit.flush();
        let written = std::fs::read_to_string(dir.path().join("a")).unwrap();
        assert_eq!(written.lines().count() as u64, m.lines.get());
    }
}

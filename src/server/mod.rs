//! Listeners, connections, TLS, the file watch, and graceful drain.

pub mod affinity;

pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{self, ConnInfo};
use crate::proxy::WorkerSide;
use crate::state::{ReloadError, Shared, Snapshot};
use crate::timer::CoarseTimer;
use tls::TlsState;

/// A failure to start, naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// `server.listen` or `admin.listen`.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS files are unusable.
    #[error("{0}")]
    Tls(String),
    /// The configuration could not be compiled.
    #[error(transparent)]
    Compile(#[from] crate::state::CompileError),
    /// No runtime for the gateway's own outbound calls.
    #[error("{0}")]
    Runtime(String),
    /// The audit sink cannot be opened.
    #[error("{0}")]
    Audit(String),
}

/// A bound, not yet serving gateway. Binding first lets callers (tests, the binary) learn
/// the actual addresses when configured with port 0.
pub struct Gateway {
    shared: Arc<Shared>,
    public: TcpListener,
    admin: TcpListener,
    tls: Option<Arc<TlsState>>,
}

/// A cheap handle to a running gateway: reload, metrics, addresses.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl GatewayHandle {
    /// Re-reads the configuration file now (what SIGHUP does).
    pub fn reload(&self) -> Result<(), ReloadError> {
        self.shared.reload()
    }

    /// The Prometheus text exposition.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Writes the queued audit lines to their sink now.
    pub fn flush_audit(&self) {
        self.shared.audit.flush();
    }

    /// The configuration currently in force.
    pub fn current_config(&self) -> Config {
        self.shared.snapshot.load().config.clone()
    }
}

impl Gateway {
    /// Compiles the configuration and binds both listeners. `config_path` is re-read on
    /// reload, with the same `env` overrides.
    pub async fn bind(
        config: Config,
        config_path: Option<PathBuf>,
        env: Vec<(String, String)>,
    ) -> Result<Gateway, StartError> {
        let tls = match &config.server.tls {
            Some(t) => Some(Arc::new(TlsState::load(t).map_err(StartError::Tls)?)),
            None => None,
        };
        let public = bind("server.listen", config.server.listen).await?;
        let admin = bind("admin.listen", config.admin.listen).await?;
        let outbound = crate::outbound::Outbound::new(None).map_err(StartError::Runtime)?;
        let metrics = Metrics::new();
        let audit = crate::audit::Audit::start(&config.audit, metrics.audit.clone())
            .map_err(StartError::Audit)?;
        metrics.set_auth_mode(config.auth.mode);
        if let Some(tls) = &tls {
            metrics.tls_not_after.set(tls.not_after());
        }
        let snapshot = Snapshot::compile(config, None, &outbound, &metrics)?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            config_path,
            env,
            outbound,
            exports: Default::default(),
            audit,
            draining: Default::default(),
        });
        Ok(Gateway {
            shared,
            public,
            admin,
            tls,
        })
    }

    /// Address of the public listener.
    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap_or(([0, 0, 0, 0], 0).into())
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(([0, 0, 0, 0], 0).into())
    }

    /// A handle for reloads and metrics.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight requests
    /// finish for up to `server.shutdown_grace`, and returns.
    ///
    /// Connections are served by `server.workers` threads, each running its own
    /// single-threaded event loop over a clone of the listening socket; the admin
    /// listener and the file watch run on the caller's runtime.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Gateway {
            shared,
            public,
            admin,
            tls,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (kill_tx, kill_rx) = watch::channel(false);

        let admin_task = tokio::spawn(serve_admin(shared.clone(), admin, stop_rx.clone()));
        let watch_task = tokio::spawn(watch_files(shared.clone(), tls.clone(), stop_rx.clone()));

        // Each connection holds a sender; when all are gone, the drain is complete.
        let (conn_tx, mut conn_rx) = mpsc::channel::<()>(1);
        // Each worker holds a sender until its thread has finished.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let server = shared.snapshot.load().config.server.clone();
        let workers = server.worker_threads();
        let cpus = affinity::plan(
            server.worker_cpu_affinity,
            workers,
            affinity::allowed_cpus().as_deref(),
        );
        match &cpus {
            Some(cpus) => tracing::info!(workers, ?cpus, "workers pinned one per CPU"),
            None => tracing::info!(workers, "workers left to the scheduler"),
        }
        let mut slots = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (handoff_tx, handoff_rx) = mpsc::unbounded_channel();
            let ctx = Worker {
                index: worker,
                cpu: cpus.as_ref().map(|cpus| cpus[worker]),
                shared: shared.clone(),
                tls: tls.clone(),
                stop: stop_rx.clone(),
                kill: kill_rx.clone(),
                conn_tx: conn_tx.clone(),
                _done: done_tx.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("smartgate-w{worker}"))
                .spawn(move || ctx.run(handoff_rx));
            match spawned {
                Ok(_) => slots.push(Slot {
                    handoff: handoff_tx,
                    load: shared
                        .metrics
                        .worker_connections
                        .with_label_values(&[&worker.to_string()]),
                }),
                Err(e) => tracing::error!(error = %e, worker, "cannot start worker thread"),
            }
        }
        let acceptor = tokio::spawn(accept_loop(public, slots, stop_rx.clone()));
        drop(done_tx);
        drop(conn_tx);

        shutdown.await;
        // Endpoints and load balancers learn from /readyz that this instance is going,
        // while it still serves what they send meanwhile.
        shared.draining.store(true, Ordering::Relaxed);
        shared.metrics.draining.set(1);
        let delay = shared.snapshot.load().config.server.shutdown_delay.0;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutting down: /readyz fails; still serving during server.shutdown_delay"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = stop_tx.send(true);
        let grace = shared.snapshot.load().config.server.shutdown_grace.0;
        if tokio::time::timeout(grace, conn_rx.recv()).await.is_err() {
            tracing::warn!(
                ?grace,
                "shutdown grace period over; closing remaining connections"
            );
        }
        let _ = kill_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await;
        acceptor.abort();
        watch_task.abort();
        admin_task.abort();
        shared.audit.flush();
    }
}

/// Accepts on the public socket and hands each connection to the worker serving the
/// fewest connections. One acceptor, not every worker polling a shared socket: woken
/// together, the worker that happens to run first takes a whole burst of connections, and
/// keep-alive clients (load balancers, sidecar peers) then stay on one core for good.
async fn accept_loop(listener: TcpListener, mut slots: Vec<Slot>, mut stop: watch::Receiver<bool>) {
    let mut next = 0usize;
    loop {
        let (stream, peer) = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) => continue,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The worker registers the socket with its own event loop.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let mut handoff = Handoff { stream, peer };
        loop {
            let Some(i) = least_loaded(&slots, next) else {
                tracing::error!("no worker is running; closing the connection");
                break;
            };
            next = (i + 1) % slots.len();
            let load = Load::new(slots[i].load.clone());
            match slots[i].handoff.send((handoff, load)) {
                Ok(()) => break,
                Err(mpsc::error::SendError((back, _))) => {
                    // That worker's thread has ended; the others take its share.
                    handoff = back;
                    slots.swap_remove(i);
                    next = 0;
                }
            }
        }
    }
}

/// The worker with the fewest open connections; ties go to the first from `start` on, so
/// equal workers take turns.
fn least_loaded(slots: &[Slot], start: usize) -> Option<usize> {
    let n = slots.len();
    (0..n)
        .map(|k| (start + k) % n)
        .min_by_key(|&i| slots[i].load.get())
}

/// The acceptor's view of one worker.
struct Slot {
    handoff: mpsc::UnboundedSender<(Handoff, Load)>,
    /// Connections the worker is serving (`smartgate_worker_connections`).
    load: IntGauge,
}

/// An accepted connection on its way to a worker.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
}

/// One connection counted against its worker for as long as it lives.
struct Load(IntGauge);

impl Load {
    fn new(gauge: IntGauge) -> Load {
        gauge.inc();
        Load(gauge)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One worker thread: its own event loop, serving the connections the acceptor hands it.
struct Worker {
    index: usize,
    /// The CPU the worker's thread is pinned to, if any.
    cpu: Option<usize>,
    shared: Arc<Shared>,
    tls: Option<Arc<TlsState>>,
    stop: watch::Receiver<bool>,
    kill: watch::Receiver<bool>,
    conn_tx: mpsc::Sender<()>,
    _done: mpsc::Sender<()>,
}

impl Worker {
    fn run(self, handoffs: mpsc::UnboundedReceiver<(Handoff, Load)>) {
        if let Some(cpu) = self.cpu
            && let Err(e) = affinity::pin_current_thread(cpu)
        {
            tracing::warn!(error = %e, worker = self.index, cpu, "cannot pin worker to its CPU");
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, worker = self.index, "cannot start worker runtime");
                return;
            }
        };
        // Dropping the runtime after block_on cancels connections still open past the
        // grace period.
        runtime.block_on(self.serve(handoffs));
    }

    async fn serve(mut self, mut handoffs: mpsc::UnboundedReceiver<(Handoff, Load)>) {
        // The header read timeout, armed for every request head, and the wait for the
        // upstream's answer run on this worker's coarse timers (see timer.rs), whose
        // ticks follow the configured limits; HTTP/2's keep-alive pings stay on tokio's.
        let header_timer = CoarseTimer::spawn({
            let shared = self.shared.clone();
            move || CoarseTimer::tick_for(header_read_timeout(&shared))
        });
        let worker = WorkerSide {
            index: self.index,
            deadlines: CoarseTimer::spawn({
                let shared = self.shared.clone();
                move || CoarseTimer::tick_for(upstream_timeout(&shared))
            }),
        };
        // Rebuilt when a reload changes the header read timeout: new connections get the
        // new limit, open ones keep theirs.
        let mut header_timeout = header_read_timeout(&self.shared);
        let mut builder = Arc::new(connection_builder(header_timer.clone(), header_timeout));

        loop {
            let (Handoff { stream, peer }, load) = tokio::select! {
                () = stopped(&mut self.stop) => break,
                next = handoffs.recv() => match next {
                    Some(h) => h,
                    None => break,
                },
            };
            // Still non-blocking: tokio's `into_std` leaves it so.
            let stream = match TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, worker = self.index, "cannot register connection");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let configured = header_read_timeout(&self.shared);
            if configured != header_timeout {
                header_timeout = configured;
                builder = Arc::new(connection_builder(header_timer.clone(), header_timeout));
            }
            let conn = Arc::new(ConnInfo {
                peer,
                tls: self.tls.is_some(),
                worker: worker.clone(),
                peer_text: Arc::new(crate::proxy::headers::PeerText::new(peer.ip())),
            });
            tokio::spawn(connection(
                self.shared.clone(),
                builder.clone(),
                self.tls.clone(),
                stream,
                conn,
                header_timeout,
                self.stop.clone(),
                (self.conn_tx.clone(), load),
            ));
        }
        drop(handoffs);
        drop(self.conn_tx);
        stopped(&mut self.kill).await;
    }
}

/// `server.header_read_timeout` as last loaded.
fn header_read_timeout(shared: &Shared) -> Duration {
    shared.snapshot.load().config.server.header_read_timeout.0
}

/// `upstream.timeout` as last loaded.
fn upstream_timeout(shared: &Shared) -> Duration {
    shared.snapshot.load().config.upstream.timeout.0
}

/// How a worker serves its connections: HTTP/1's header read timeout on the worker's
/// coarse timer, HTTP/2 with keep-alive pings.
fn connection_builder(
    timer: CoarseTimer,
    header_timeout: Duration,
) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(timer)
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    builder
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<Arc<TlsState>>,
    stream: TcpStream,
    conn: Arc<ConnInfo>,
    header_timeout: Duration,
    stop: watch::Receiver<bool>,
    _drain: (mpsc::Sender<()>, Load),
) {
    // The first request must come within the header read timeout of the connection's
    // start, TLS handshake included.
    let limits = Limits {
        first_by: tokio::time::Instant::now() + header_timeout,
        idle: header_timeout,
    };
    match tls {
        None => serve_io(shared, &builder, stream, conn, limits, stop).await,
        Some(tls) => {
            let accept = tls.acceptor().accept(stream);
            match tokio::time::timeout_at(limits.first_by, accept).await {
                Ok(Ok(stream)) => serve_io(shared, &builder, stream, conn, limits, stop).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => {
                    shared.metrics.header_timeouts.inc();
                    tracing::debug!("TLS handshake timed out");
                }
            }
        }
    }
}

/// How long a connection may go without a request.
#[derive(Clone, Copy)]
struct Limits {
    /// When the first request must have come by.
    first_by: tokio::time::Instant,
    /// How long an HTTP/2 connection may go without a new stream.
    idle: Duration,
}

/// Serves one connection: closed if no request has come by `limits.first_by`.
///
/// hyper's header read timeout starts with HTTP/1's first request head. Before it,
/// hyper-util waits for the bytes that tell HTTP/1 from HTTP/2 without a limit, and an
/// HTTP/2 connection may be opened and never used. Without this deadline, a client that
/// connects and says nothing would hold a connection, and a file descriptor, for ever.
async fn serve_io<I>(
    shared: Arc<Shared>,
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    conn: Arc<ConnInfo>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let requests = Arc::new(Requests::default());
    let counts = shared.clone();
    let service = {
        let requests = requests.clone();
        service_fn(move |req: Request<Incoming>| -> pipeline::ResponseFuture {
            requests.count(req.version() == http::Version::HTTP_2);
            Box::pin(Cancellable {
                inner: pipeline::handle(shared.clone(), conn.clone(), req),
                requests: Some(requests.clone()),
            })
        })
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    // Only the connection and the drain are polled on every wake once the first request
    // has come; the other branches are disabled then, or wait on a rare timer.
    let mut awaiting_first = true;
    let result = loop {
        let before = requests.seen.load(Ordering::Relaxed);
        let h2 = requests.h2.load(Ordering::Relaxed);
        let drain = tokio::select! {
            biased;
            r = connection.as_mut() => break r,
            () = requests.first.notified(), if awaiting_first => {
                awaiting_first = false;
                false
            }
            () = tokio::time::sleep_until(limits.first_by), if awaiting_first => {
                if requests.seen.load(Ordering::Relaxed) == 0 {
                    counts.metrics.header_timeouts.inc();
                    tracing::debug!("no request within server.header_read_timeout; closing");
                    return;
                }
                awaiting_first = false;
                false
            }
            // hyper closes an idle HTTP/1 connection itself (the header read timeout); an
            // HTTP/2 one, whose pings keep it alive, is closed here once a whole timeout
            // has passed without a new stream.
            () = tokio::time::sleep(limits.idle), if !awaiting_first && h2 => {
                requests.seen.load(Ordering::Relaxed) == before
            }
            () = stopped(&mut stop) => true,
            () = requests.too_many_cancelled.notified() => {
                tracing::warn!(
                    peer = %requests_peer(&requests),
                    "closing a connection whose client cancels most of its requests (HTTP/2 rapid reset)"
                );
                return;
            }
        };
        if drain {
            // Finish the requests in flight, take no new ones on this connection.
            auto::Connection::graceful_shutdown(connection.as_mut());
            break connection.as_mut().await;
        }
    };
    if let Err(e) = result {
        // hyper's HTTP/1 header read timeout: a request head begun and not finished.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            counts.metrics.header_timeouts.inc();
        }
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// What a connection's requests tell its task: how many have come (and a wake-up when
/// the first does), whether they came over HTTP/2, and how many the client cancelled
/// before their answer (a wake-up when that is too many).
#[derive(Default)]
struct Requests {
    seen: std::sync::atomic::AtomicU64,
    first: tokio::sync::Notify,
    h2: AtomicBool,
    cancelled: std::sync::atomic::AtomicU64,
    too_many_cancelled: tokio::sync::Notify,
}

/// Requests a client may cancel before its answer (HTTP/2 RST_STREAM, or a dropped
/// HTTP/1 connection's last one) on one connection before a quarter of them cancelled
/// closes it. Each was already forwarded (the paced variant of the HTTP/2 rapid reset
/// attack, CVE-2023-44487, waits until it was, so hyper's limit on streams reset before
/// they are accepted does not see it), and the upstream exchange dropped with it costs
/// an upstream connection. Browsers and SMART apps cancel a handful at most.
const CANCELS_BEFORE_CLOSING: u64 = 64;

/// Whether `cancelled` of `seen` requests is a connection worth closing.
fn cancels_too_many(cancelled: u64, seen: u64) -> bool {
    cancelled > CANCELS_BEFORE_CLOSING && cancelled.saturating_mul(4) > seen
}

fn requests_peer(requests: &Requests) -> String {
    format!(
        "{} of {} requests cancelled",
        requests.cancelled.load(Ordering::Relaxed),
        requests.seen.load(Ordering::Relaxed)
    )
}

pin_project_lite::pin_project! {
    /// A request's future that counts itself on its connection when it is dropped before
    /// it finished: the client cancelled it.
    struct Cancellable<F> {
        #[pin]
        inner: F,
        requests: Option<Arc<Requests>>,
    }

    impl<F> PinnedDrop for Cancellable<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(requests) = this.project().requests.take() {
                let cancelled = requests.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
                if cancels_too_many(cancelled, requests.seen.load(Ordering::Relaxed)) {
                    requests.too_many_cancelled.notify_one();
                }
            }
        }
    }
}

impl<F: Future> Future for Cancellable<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let polled = this.inner.poll(cx);
        if polled.is_ready() {
            // Finished: not a cancellation when dropped.
            *this.requests = None;
        }
        polled
    }
}

impl Requests {
    fn count(&self, h2: bool) {
        // One writer, the connection's own task: a load and a store, no locked add.
        let n = self.seen.load(Ordering::Relaxed);
        self.seen.store(n + 1, Ordering::Relaxed);
        if n == 0 {
            self.h2.store(h2, Ordering::Relaxed);
            self.first.notify_one();
        }
    }
}

async fn serve_admin(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(crate::admin::handle(shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Polls the configuration file and the TLS files; reloads when one changes. Polling
/// (rather than inotify) also sees Kubernetes ConfigMap updates, which swap a symlink.
async fn watch_files(
    shared: Arc<Shared>,
    tls: Option<Arc<TlsState>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut config_seen = shared.config_path.as_deref().map(fingerprint);
    let mut tls_seen = tls_paths(&shared).map(|(c, k)| (fingerprint(&c), fingerprint(&k)));
    loop {
        let snap = shared.snapshot.load_full();
        let interval = snap.config.reload.interval.0;
        let watching = snap.config.reload.watch;
        drop(snap);
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(interval) => {}
        }
        if !watching {
            continue;
        }
        if let Some(path) = shared.config_path.as_deref() {
            let now = Some(fingerprint(path));
            if now != config_seen {
                // Debounce: editors and ConfigMap updates write in several steps.
                tokio::time::sleep(Duration::from_millis(200)).await;
                config_seen = Some(fingerprint(path));
                let _ = shared.reload();
            }
        }
        if let (Some(tls), Some((cert, key))) = (&tls, tls_paths(&shared)) {
            let now = Some((fingerprint(&cert), fingerprint(&key)));
            if now != tls_seen {
                tokio::time::sleep(Duration::from_millis(200)).await;
                tls_seen = Some((fingerprint(&cert), fingerprint(&key)));
                let cfg = shared.snapshot.load().config.server.tls.clone();
                let result = match cfg {
                    Some(cfg) => tls.reload(&cfg),
                    None => Err("server.tls removed; restart to serve plain HTTP".to_owned()),
                };
                let label = match &result {
                    Ok(()) => {
                        shared.metrics.tls_not_after.set(tls.not_after());
                        tracing::info!("TLS certificate reloaded");
                        "success"
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS reload failed; keeping the current certificate");
                        "failure"
                    }
                };
                shared.metrics.tls_reloads.with_label_values(&[label]).inc();
            }
        }
    }
}

fn tls_paths(shared: &Shared) -> Option<(PathBuf, PathBuf)> {
    let snap = shared.snapshot.load();
    snap.config
        .server
        .tls
        .as_ref()
        .map(|t| (t.cert.clone(), t.key.clone()))
}

/// Modification time and length; `None` parts when the file is missing.
fn fingerprint(path: &Path) -> (Option<SystemTime>, Option<u64>) {
    match std::fs::metadata(path) {
        Ok(m) => (m.modified().ok(), Some(m.len())),
        Err(_) => (None, None),
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod cancel_tests {
    use super::*;

    /// A connection is closed once more than 64 of its requests, and more than a
    /// quarter of them, were cancelled; a handful of cancels never closes one.
    #[test]
    fn cancels_that_close_a_connection() {
        assert!(!cancels_too_many(5, 5));
        assert!(!cancels_too_many(64, 64));
        assert!(cancels_too_many(65, 65));
        assert!(cancels_too_many(65, 259));
        assert!(!cancels_too_many(65, 260));
        assert!(!cancels_too_many(100, 10_000));
    }
}

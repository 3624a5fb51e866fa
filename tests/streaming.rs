//! Bodies stream: a 20 MiB upload and a 20 MiB download pass through the gateway without
//! the process's heap growing by anything near their size.
//!
//! A counting global allocator measures the peak of live heap bytes in this process (the
//! gateway, the fake upstream and the client all run here), so the bound also covers the
//! test's own buffers: it is generous for them and far below 20 MiB.
//!
//! That allocator counts every allocation of its process, so this file is a test binary of
//! its own: in the shared suite (tests/it) other tests' bodies would count as its growth.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use support::*;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const TOTAL: usize = 20 << 20;
const CHUNK: usize = 64 << 10;
/// Far below the 20 MiB a buffering proxy would add.
const ALLOWED_GROWTH: usize = 6 << 20;

/// A body of `TOTAL` bytes made chunk by chunk as it is read.
fn generated() -> smartgate::body::BoxBody {
    struct Gen(usize);
    impl http_body::Body for Gen {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(None);
            }
            let n = self.0.min(CHUNK);
            self.0 -= n;
            std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'z'; n])))))
        }
    }
    Gen(TOTAL).map_err(|n| match n {}).boxed()
}

/// Counts a body without keeping it.
async fn drain(
    mut body: impl http_body::Body<Data = Bytes, Error = impl std::fmt::Debug> + Unpin,
) -> usize {
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            n += d.len();
        }
    }
    n
}

#[tokio::test]
async fn twenty_mib_streams_both_ways_without_buffering() {
    let up = FakeUpstream::start(Arc::new(|seen: &Seen| {
        let resp = if seen.method == http::Method::GET {
            Response::builder()
                .header("content-type", "application/octet-stream")
                .body(generated())
                .unwrap()
        } else {
            Response::builder()
                .status(StatusCode::CREATED)
                .body(smartgate::body::empty())
                .unwrap()
        };
        Box::pin(std::future::ready(resp))
    }))
    .await;
    let text = config(&up.base(), "").replace(
        "shutdown_grace = \"5s\"",
        "shutdown_grace = \"5s\"\nmax_request_body = \"64MiB\"",
    );
    let gw = TestGateway::boot(&text).await;
    // Warm up pools and lazily allocated state before measuring.
    get(&gw.url("/r4/metadata")).await;

    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);

    let client = client();
    let req = Request::post(gw.url("/r4/Binary"))
        .header("content-type", "application/octet-stream")
        .body(generated())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    drain(resp.into_body()).await;
    let upload_peak = PEAK.load(Ordering::Relaxed) - baseline;

    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let base2 = LIVE.load(Ordering::Relaxed);
    let req = Request::get(gw.url("/r4/Binary/big"))
        .body(smartgate::body::empty())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(drain(resp.into_body()).await, TOTAL);
    let download_peak = PEAK.load(Ordering::Relaxed) - base2;

    let seen = up.requests();
    let upload = seen
        .iter()
        .find(|s| s.method == http::Method::POST)
        .unwrap();
    assert_eq!(upload.body_len, TOTAL);
    assert!(
        upload_peak < ALLOWED_GROWTH,
        "upload grew the heap by {upload_peak} bytes"
    );
    assert!(
        download_peak < ALLOWED_GROWTH,
        "download grew the heap by {download_peak} bytes"
    );
    gw.stop().await;
}

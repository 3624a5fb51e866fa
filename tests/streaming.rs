//! Bodies stream: a 20 MiB upload and a 20 MiB download pass through the gateway without
//! the process's heap growing by anything near their size.
//!
//! A counting global allocator measures the peak of live heap bytes in this process (the
//! gateway, the fake upstream and the client all run here), so the bound also covers the
//! test's own buffers: it is generous for them and far below 20 MiB.
//!
//! That allocator counts every allocation of its process, so this file is a test binary of
//! its own: in the shared suite (tests/it) other tests' bodies would count as its growth.

#[path = "support/counting.rs"]
mod counting;
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use support::*;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

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

    let baseline = counting::LIVE.load(Ordering::Relaxed);
    counting::PEAK.store(baseline, Ordering::Relaxed);

    let client = client();
    let req = Request::post(gw.url("/r4/Binary"))
        .header("content-type", "application/octet-stream")
        .body(generated())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    drain(resp.into_body()).await;
    let upload_peak = counting::PEAK.load(Ordering::Relaxed) - baseline;

    counting::PEAK.store(counting::LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let base2 = counting::LIVE.load(Ordering::Relaxed);
    let req = Request::get(gw.url("/r4/Binary/big"))
        .body(smartgate::body::empty())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(drain(resp.into_body()).await, TOTAL);
    let download_peak = counting::PEAK.load(Ordering::Relaxed) - base2;

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

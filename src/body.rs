//! Body types shared by the stages: one boxed body for everything the gateway sends, and a
//! wrapper that gives up on a stalled upstream stream.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

/// Error type carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type of requests to the upstream and responses to the client.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A complete body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body read whole, trailers dropped. A body of one data frame (a small upstream answer
/// usually is) is kept as it came, without a copy or a list of chunks.
pub async fn read_whole<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut first = Bytes::new();
    let mut more: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match &mut more {
            Some(buf) => buf.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut buf = bytes::BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&data);
                more = Some(buf);
            }
        }
    }
    Ok(more.map_or(first, bytes::BytesMut::freeze))
}

/// The upstream sent no body frame for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream body idle for longer than the configured timeout")]
pub struct IdleTimeout;

pin_project_lite::pin_project! {
    /// Fails the stream when the inner body produces no frame for `idle`. Without it a
    /// stalled upstream would hold the client connection (and a pool slot) forever.
    ///
    /// The timer is armed only when the inner body first has nothing ready, and is not
    /// re-armed per frame: progress is a timestamp, checked when the timer fires. A body
    /// that is already buffered never touches the timer wheel, nor reads the clock: the
    /// idle time counts from the first wait.
    pub struct IdleTimeoutBody<B> {
        #[pin]
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        last_progress: Option<Instant>,
        idle: Duration,
    }
}

impl<B> IdleTimeoutBody<B> {
    /// Wraps `inner`; the clock starts when it first has nothing ready.
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            sleep: None,
            last_progress: None,
            idle,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if this.sleep.is_some() {
                *this.last_progress = Some(Instant::now());
            }
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let last_progress = *this.last_progress.get_or_insert_with(Instant::now);
        loop {
            let deadline = last_progress + *this.idle;
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            ready!(sleep.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(Some(Err(Box::new(IdleTimeout))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that is never ready, like a stalled upstream.
    struct Stalled;
    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    /// A stalled body fails after the idle timeout instead of hanging forever.
    #[tokio::test(start_paused = true)]
    async fn stalled_body_times_out() {
        let body = IdleTimeoutBody::new(Stalled, Duration::from_secs(1));
        let err = body.collect().await.expect_err("must fail");
        assert!(err.downcast_ref::<IdleTimeout>().is_some());
    }

    /// A body that pauses shorter than the timeout, again and again, is not cut off even
    /// when the pauses add up to more than the timeout.
    #[tokio::test(start_paused = true)]
    async fn slow_but_steady_body_passes() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(600)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let body = IdleTimeoutBody::new(Channel(rx), Duration::from_secs(1));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"xxxxx");
    }

    struct Channel(tokio::sync::mpsc::Receiver<Bytes>);
    impl Body for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }

    /// A body that keeps producing is not cut off.
    #[tokio::test(start_paused = true)]
    async fn live_body_passes() {
        let body = IdleTimeoutBody::new(full("hello"), Duration::from_secs(1));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
    }

    /// Frames of a body in order, each a data frame or trailers, then maybe an error.
    struct Frames(std::collections::VecDeque<Result<Frame<Bytes>, &'static str>>);
    impl Body for Frames {
        type Data = Bytes;
        type Error = &'static str;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    fn frames(parts: Vec<Result<Frame<Bytes>, &'static str>>) -> Frames {
        Frames(parts.into())
    }

    /// Every data frame, in order, whatever their number and sizes; trailers dropped;
    /// an error fails the read.
    #[tokio::test]
    async fn read_whole_joins_every_frame() {
        let data = |s: &'static str| Ok(Frame::data(Bytes::from_static(s.as_bytes())));
        let trailers = || Ok(Frame::trailers(http::HeaderMap::new()));
        for (parts, whole) in [
            (vec![], ""),
            (vec![data("one")], "one"),
            (vec![data(""), data("a"), data(""), data("b")], "ab"),
            (vec![data("a"), data("bc"), data("def")], "abcdef"),
            (vec![data("a"), trailers(), data("b")], "ab"),
        ] {
            assert_eq!(read_whole(frames(parts)).await.unwrap(), whole);
        }
        let failed = read_whole(frames(vec![data("a"), Err("reset"), data("b")])).await;
        assert_eq!(failed, Err("reset"));
    }
}

//! The clocks behind the limits every request is held to: `server.header_read_timeout`
//! on HTTP/1 connections and `upstream.timeout`.
//!
//! hyper arms the header read timeout anew for every request head it waits for, so on a
//! keep-alive connection once per request; the wait for the upstream's answer is
//! limited once per request too. On tokio's timer each arming is an insertion into the
//! timer wheel and a removal, and every turn of the event loop with timers pending
//! passes through the time driver: about 1,500 instructions per proxied request for the
//! header read timeout and 700 for the upstream's, 7 % of smartgate's own work
//! (benches/instructions.sh). The limits are seconds long and nobody needs them to the
//! millisecond. So each worker keeps what it waits for in a slab, and a ticker wakes,
//! every `tick`, those whose deadline has passed: a wait that ends in time costs an
//! insertion into the slab and a removal.
//!
//! A deadline is honoured at the first tick after it, never before.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::rt::{Sleep, Timer};
use tokio::time::Instant;

/// One worker's coarse timer; clones share the waits. Made only with its ticker running
/// ([`CoarseTimer::spawn`]): without one, nothing would ever expire.
#[derive(Clone)]
pub struct CoarseTimer {
    waiting: Arc<Mutex<slab::Slab<Entry>>>,
}

struct Entry {
    deadline: Instant,
    waker: Option<Waker>,
    expired: bool,
}

impl CoarseTimer {
    /// How often the ticker of a timer whose deadlines are `timeout` away runs: often
    /// enough that the limit overshoots by an eighth at most, and at most once a second.
    pub fn tick_for(timeout: Duration) -> Duration {
        (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// A timer whose ticker, spawned on the current runtime, wakes the waits whose
    /// deadline has passed for as long as that runtime runs. `tick` is asked for the
    /// time to the next tick anew each time, so a reloaded limit takes effect.
    pub fn spawn(tick: impl Fn() -> Duration + Send + 'static) -> CoarseTimer {
        let timer = CoarseTimer {
            waiting: Arc::default(),
        };
        let ticker = timer.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick()).await;
                ticker.expire(Instant::now());
            }
        });
        timer
    }

    /// `future`'s output, or [`Elapsed`] if it has not finished by `deadline` (at the
    /// first tick after it).
    pub fn timeout_at<F: Future>(&self, deadline: Instant, future: F) -> CoarseTimeout<F> {
        CoarseTimeout {
            future,
            sleep: self.sleep_at(deadline),
        }
    }

    fn sleep_at(&self, deadline: Instant) -> CoarseSleep {
        CoarseSleep {
            deadline,
            key: None,
            timer: self.clone(),
        }
    }

    /// Marks the sleeps due at `now` as expired and wakes their tasks.
    fn expire(&self, now: Instant) {
        let mut due = Vec::new();
        for (_, entry) in self.lock().iter_mut() {
            if !entry.expired && entry.deadline <= now {
                entry.expired = true;
                due.extend(entry.waker.take());
            }
        }
        due.into_iter().for_each(Waker::wake);
    }

    fn lock(&self) -> MutexGuard<'_, slab::Slab<Entry>> {
        // Nothing can leave the slab half-changed: a poisoned lock is still consistent.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().len()
    }
}

impl Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        let now = Instant::now();
        let deadline = now.checked_add(duration).unwrap_or(now + FAR);
        self.sleep_until(deadline.into_std())
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(self.sleep_at(Instant::from_std(deadline)))
    }

    /// The clock the deadlines are read against (tokio's, which tests can stop).
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

/// A deadline beyond any configuration's.
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// One wait for a deadline: in the slab from its first poll until it is dropped.
struct CoarseSleep {
    deadline: Instant,
    key: Option<usize>,
    timer: CoarseTimer,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut waiting = this.timer.lock();
        match this.key {
            None => {
                this.key = Some(waiting.insert(Entry {
                    deadline: this.deadline,
                    waker: Some(cx.waker().clone()),
                    expired: false,
                }));
                Poll::Pending
            }
            Some(key) => {
                let entry = &mut waiting[key];
                if entry.expired {
                    return Poll::Ready(());
                }
                match &entry.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => entry.waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        // Only the sleep removes its entry, so a key never names someone else's.
        if let Some(key) = self.key.take() {
            self.timer.lock().remove(key);
        }
    }
}

impl Sleep for CoarseSleep {}

/// The deadline of a [`CoarseTimer::timeout_at`] passed first.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// A future limited by a deadline on a [`CoarseTimer`]; the slab holds it only
    /// while the future is waiting.
    pub struct CoarseTimeout<F> {
        #[pin]
        future: F,
        sleep: CoarseSleep,
    }
}

impl<F: Future> Future for CoarseTimeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        Pin::new(this.sleep).poll(cx).map(|()| Err(Elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between `from_ms` and `to_ms` (paused time) have passed since `started`.
    fn assert_waited(started: Instant, from_ms: u64, to_ms: u64) {
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(from_ms) && waited <= Duration::from_millis(to_ms),
            "{waited:?}"
        );
    }

    fn poll_once(sleep: &mut Pin<Box<dyn Sleep>>) -> Poll<()> {
        let mut cx = Context::from_waker(Waker::noop());
        sleep.as_mut().poll(&mut cx)
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_at_the_first_tick_after_the_deadline() {
        let timer = CoarseTimer::spawn(|| Duration::from_secs(1));
        let deadline = timer.now() + Duration::from_millis(2500);
        let sleep = timer.sleep_until(deadline);
        let started = Instant::now();
        let woke = tokio::time::timeout(Duration::from_secs(60), sleep).await;
        assert!(woke.is_ok(), "never woke");
        assert_waited(started, 2500, 3500);
        assert_eq!(timer.waiting(), 0, "the finished sleep left its entry");
    }

    #[tokio::test(start_paused = true)]
    async fn heads_that_arrive_in_time_leave_nothing_behind() {
        let timer = CoarseTimer::spawn(|| Duration::from_millis(100));
        for _ in 0..1000 {
            let mut sleep = timer.sleep(Duration::from_secs(30));
            assert!(poll_once(&mut sleep).is_pending());
            assert!(poll_once(&mut sleep).is_pending());
            assert_eq!(timer.waiting(), 1);
        }
        assert_eq!(timer.waiting(), 0);
        // One left waiting expires, however many came and went before it.
        let mut last = timer.sleep(Duration::from_secs(30));
        assert!(poll_once(&mut last).is_pending());
        tokio::time::sleep(Duration::from_millis(29_900)).await;
        assert!(poll_once(&mut last).is_pending());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(poll_once(&mut last).is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_past_or_absurd_deadline_does_not_panic() {
        let timer = CoarseTimer::spawn(|| CoarseTimer::tick_for(Duration::ZERO));
        let woke = tokio::time::timeout(Duration::from_secs(60), timer.sleep(Duration::ZERO)).await;
        assert!(woke.is_ok(), "never woke");
        let mut never = timer.sleep(Duration::MAX);
        assert!(poll_once(&mut never).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_ends_at_the_first_tick_after_its_deadline() {
        let timer = CoarseTimer::spawn(|| Duration::from_millis(100));
        let started = Instant::now();
        let deadline = started + Duration::from_millis(250);
        let slow = tokio::time::sleep(Duration::from_secs(10));
        assert_eq!(timer.timeout_at(deadline, slow).await, Err(Elapsed));
        assert_waited(started, 250, 350);
        assert_eq!(timer.waiting(), 0, "the ended wait left its entry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_finishes_in_time_is_not_cut_short() {
        let timer = CoarseTimer::spawn(|| Duration::from_millis(100));
        let deadline = Instant::now() + Duration::from_millis(250);
        let answer = async {
            tokio::time::sleep(Duration::from_millis(240)).await;
            42
        };
        assert_eq!(timer.timeout_at(deadline, answer).await, Ok(42));
        // Ready at once: never enters the slab.
        assert_eq!(timer.timeout_at(deadline, async { 7 }).await, Ok(7));
        assert_eq!(timer.waiting(), 0);
        // Given up while waiting (the client went away): the entry goes with it.
        let mut waiting = Box::pin(timer.timeout_at(deadline, std::future::pending::<()>()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(timer.waiting(), 1);
        drop(waiting);
        assert_eq!(timer.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_tick_is_asked_for_anew_each_time() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let tick_ms = Arc::new(AtomicU64::new(10_000));
        let timer = CoarseTimer::spawn({
            let tick_ms = tick_ms.clone();
            move || Duration::from_millis(tick_ms.load(Ordering::Relaxed))
        });
        // The ticker starts its first, long tick.
        tokio::task::yield_now().await;
        // A reload shortens the limit, and with it the tick: after the tick in progress,
        // deadlines are kept to the new one.
        tick_ms.store(100, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let started = Instant::now();
        let ended = timer
            .timeout_at(
                started + Duration::from_millis(150),
                std::future::pending::<()>(),
            )
            .await;
        assert_eq!(ended, Err(Elapsed));
        assert!(
            started.elapsed() <= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn ticks_follow_the_timeout() {
        assert_eq!(
            CoarseTimer::tick_for(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(
            CoarseTimer::tick_for(Duration::from_secs(2)),
            Duration::from_millis(250)
        );
        assert_eq!(
            CoarseTimer::tick_for(Duration::ZERO),
            Duration::from_millis(10)
        );
    }
}

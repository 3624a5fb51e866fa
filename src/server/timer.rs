//! The clock behind `server.header_read_timeout` on HTTP/1 connections.
//!
//! hyper arms the header read timeout anew for every request head it waits for, so on a
//! keep-alive connection once per request. On tokio's timer each arming is an insertion
//! into the timer wheel and a removal, and every turn of the event loop with timers
//! pending passes through the time driver: about 1,500 instructions per proxied
//! request, 5 % of smartgate's own work (benches/instructions.sh). The limit is tens of
//! seconds and nobody needs it to the millisecond. So each worker keeps the heads it
//! waits for in a slab, and a ticker wakes, every `tick`, those whose deadline has
//! passed: a head that arrives in time costs an insertion into the slab and a removal.
//!
//! A deadline is honoured at the first tick after it, never before.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::rt::{Sleep, Timer};
use tokio::time::{Instant, MissedTickBehavior};

/// One worker's coarse timer, for hyper's HTTP/1 server; clones share the waiting heads.
#[derive(Clone, Default)]
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

    /// Wakes the sleeps whose deadline has passed, every `tick`, for as long as the
    /// runtime it is spawned on runs.
    pub async fn run(self, tick: Duration) {
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.expire(Instant::now());
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
        Box::pin(CoarseSleep {
            deadline: Instant::from_std(deadline),
            key: None,
            timer: self.clone(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once(sleep: &mut Pin<Box<dyn Sleep>>) -> Poll<()> {
        let mut cx = Context::from_waker(Waker::noop());
        sleep.as_mut().poll(&mut cx)
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_at_the_first_tick_after_the_deadline() {
        let timer = CoarseTimer::default();
        tokio::spawn(timer.clone().run(Duration::from_secs(1)));
        let deadline = timer.now() + Duration::from_millis(2500);
        let sleep = timer.sleep_until(deadline);
        let started = Instant::now();
        let woke = tokio::time::timeout(Duration::from_secs(60), sleep).await;
        assert!(woke.is_ok(), "never woke");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(2500) && waited <= Duration::from_millis(3500),
            "{waited:?}"
        );
        assert_eq!(timer.waiting(), 0, "the finished sleep left its entry");
    }

    #[tokio::test(start_paused = true)]
    async fn heads_that_arrive_in_time_leave_nothing_behind() {
        let timer = CoarseTimer::default();
        tokio::spawn(timer.clone().run(Duration::from_millis(100)));
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
        let timer = CoarseTimer::default();
        tokio::spawn(timer.clone().run(CoarseTimer::tick_for(Duration::ZERO)));
        let woke = tokio::time::timeout(Duration::from_secs(60), timer.sleep(Duration::ZERO)).await;
        assert!(woke.is_ok(), "never woke");
        let mut never = timer.sleep(Duration::MAX);
        assert!(poll_once(&mut never).is_pending());
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

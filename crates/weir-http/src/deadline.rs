//! Coarse deadlines for upstream exchanges, kept per worker thread.
//!
//! A tokio timer per request costs a clock read, an insertion into the runtime's timer wheel
//! and a removal, and nearly every exchange ends long before its deadline. Here an exchange
//! that has to wait takes a slot in its worker's list instead, and one ticker task per worker
//! wakes what has expired, [`TICK`] at a time; it runs only while some slot is taken. A
//! deadline fires between its time and one tick after it, never before.
//!
//! Slots live in a thread-local list, which the worker model makes sound: a worker's runtime
//! is single-threaded, so a request is polled on one thread for its whole life. On any other
//! runtime the deadline falls back to a tokio timer.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::time::Sleep;

pub const TICK: Duration = Duration::from_millis(10);

#[derive(Debug, PartialEq)]
pub struct Elapsed;

#[derive(Default)]
struct Wheel {
    /// Ticks counted so far; it advances only while the ticker runs, which it does whenever a
    /// slot is taken.
    now: u64,
    slots: Vec<Slot>,
    free: Vec<usize>,
    taken: usize,
    ticking: bool,
}

struct Slot {
    due: u64,
    waker: Option<Waker>,
    fired: bool,
}

thread_local! {
    static WHEEL: RefCell<Wheel> = RefCell::new(Wheel::default());
}

impl Wheel {
    fn take(&mut self, after: Duration, waker: &Waker) -> usize {
        // One tick more than asked: the first tick may come at once.
        let ticks = after.as_millis().div_ceil(TICK.as_millis()) as u64 + 1;
        let slot = Slot { due: self.now + ticks, waker: Some(waker.clone()), fired: false };
        self.taken += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        }
    }

    fn give_back(&mut self, i: usize) {
        self.slots[i].waker = None;
        self.free.push(i);
        self.taken -= 1;
    }
}

/// Runs while slots are taken, waking each whose time has come.
async fn ticker() {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let idle = WHEEL.with(|w| {
            let mut w = w.borrow_mut();
            w.now += 1;
            let now = w.now;
            for slot in &mut w.slots {
                if !slot.fired && slot.due <= now
                    && let Some(waker) = slot.waker.take()
                {
                    slot.fired = true;
                    waker.wake();
                }
            }
            if w.taken == 0 {
                w.ticking = false;
            }
            w.taken == 0
        });
        if idle {
            return;
        }
    }
}

/// `fut`, failing with [`Elapsed`] if it has not finished within `after`.
pub fn within<F: Future>(after: Duration, fut: F) -> Deadline<F> {
    Deadline { fut, after, watch: Watch::None }
}

enum Watch {
    None,
    Wheel(usize),
    /// Not on a worker's runtime: a plain tokio timer.
    Timer(Pin<Box<Sleep>>),
}

pin_project_lite::pin_project! {
    pub struct Deadline<F> {
        #[pin]
        fut: F,
        after: Duration,
        watch: Watch,
    }

    impl<F> PinnedDrop for Deadline<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Watch::Wheel(i) = this.watch {
                WHEEL.with(|w| w.borrow_mut().give_back(i));
            }
        }
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.watch {
            Watch::Wheel(i) => {
                let i = *i;
                let fired = WHEEL.with(|w| {
                    let mut w = w.borrow_mut();
                    let slot = &mut w.slots[i];
                    if !slot.fired && !slot.waker.as_ref().is_some_and(|k| k.will_wake(cx.waker())) {
                        slot.waker = Some(cx.waker().clone());
                    }
                    slot.fired
                });
                if fired {
                    return Poll::Ready(Err(Elapsed));
                }
            }
            Watch::Timer(sleep) => {
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Elapsed));
                }
            }
            Watch::None => {}
        }
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if let Watch::None = this.watch {
            let on_worker = Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread);
            if !on_worker {
                let mut sleep = Box::pin(tokio::time::sleep(*this.after));
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Elapsed));
                }
                *this.watch = Watch::Timer(sleep);
                return Poll::Pending;
            }
            let start = WHEEL.with(|w| {
                let mut w = w.borrow_mut();
                *this.watch = Watch::Wheel(w.take(*this.after, cx.waker()));
                !std::mem::replace(&mut w.ticking, true)
            });
            if start {
                tokio::spawn(ticker());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_after_its_time_and_not_before() {
        let tokio_started = tokio::time::Instant::now();
        let r = within(Duration::from_millis(55), std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        let waited = tokio_started.elapsed();
        assert!(waited >= Duration::from_millis(55), "fired early: {waited:?}");
        assert!(waited <= Duration::from_millis(55) + 2 * TICK, "fired late: {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn finished_work_frees_its_slot_and_the_ticker_stops() {
        let r = within(Duration::from_secs(5), tokio::time::sleep(Duration::from_millis(30))).await;
        assert_eq!(r, Ok(()));
        WHEEL.with(|w| assert_eq!(w.borrow().taken, 0));
        tokio::time::sleep(3 * TICK).await;
        WHEEL.with(|w| assert!(!w.borrow().ticking, "the ticker runs on with nothing to watch"));
        // Dropped before finishing: its slot is given back too.
        let f = within(Duration::from_secs(5), std::future::pending::<()>());
        let r = tokio::time::timeout(Duration::from_millis(20), f).await;
        assert!(r.is_err());
        WHEEL.with(|w| assert_eq!(w.borrow().taken, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_runtimes_use_a_timer() {
        let r = within(Duration::from_millis(20), std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        assert_eq!(within(Duration::from_secs(1), async { 7 }).await, Ok(7));
    }
}

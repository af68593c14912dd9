//! How a call's outcome gets back to the task that waits for it.
//!
//! A task of a proxy worker woken from another thread costs that worker's event loop a system
//! call (tokio writes to its eventfd for every such wake), and a gateway's runtime finishes the
//! calls it was handed in one go. So of the calls that finish while a waiting thread has not run
//! yet, only the first is woken from the runtime's thread: it leads. The others queue on that
//! thread's relay, and the leader wakes them from inside the worker, at no cost, when it is
//! polled or dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::engine::Outcome;
use crate::lock;

/// The calls of one waiting thread that finished while one of them leads.
#[derive(Default)]
struct Relay {
    state: Mutex<Led>,
}

#[derive(Default)]
struct Led {
    /// A finished call was woken directly and has not passed on yet.
    led: bool,
    queued: Vec<Waker>,
}

impl Relay {
    /// Wakes the calls queued behind the leader; the next call to finish leads again.
    fn pass_on(&self) {
        let queued = {
            let mut state = lock(&self.state);
            state.led = false;
            std::mem::take(&mut state.queued)
        };
        for waker in queued {
            waker.wake();
        }
    }
}

thread_local! {
    static RELAY: Arc<Relay> = Arc::new(Relay::default());
}

enum State {
    Waiting(Option<Waker>),
    /// The outcome, or `None` when the runtime dropped the call unanswered; and whether the
    /// waiting side leads its relay.
    Done(Option<Outcome>, bool),
    /// The waiting side has the outcome, or went away.
    Over,
}

struct Slot {
    state: Mutex<State>,
    relay: Arc<Relay>,
}

/// The runtime's end: answers once; dropped unanswered, the call ends with [`Closed`].
pub(crate) struct Sender(Option<Arc<Slot>>);

/// The waiting end, made on the thread that waits.
pub(crate) struct Receiver(Arc<Slot>);

/// The runtime dropped the call without an answer.
#[derive(Debug)]
pub(crate) struct Closed;

pub(crate) fn channel() -> (Sender, Receiver) {
    let slot = Arc::new(Slot { state: Mutex::new(State::Waiting(None)), relay: RELAY.with(Arc::clone) });
    (Sender(Some(slot.clone())), Receiver(slot))
}

impl Sender {
    /// Whether the waiting side went away: nobody reads the answer any more.
    pub(crate) fn gone(&self) -> bool {
        self.0.as_ref().is_none_or(|slot| matches!(*lock(&slot.state), State::Over))
    }

    pub(crate) fn send(mut self, outcome: Outcome) {
        if let Some(slot) = self.0.take() {
            finish(&slot, Some(outcome));
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            finish(&slot, None);
        }
    }
}

fn finish(slot: &Slot, outcome: Option<Outcome>) {
    let direct = {
        let mut state = lock(&slot.state);
        let State::Waiting(waker) = &mut *state else { return };
        let waker = waker.take();
        // Whether this call leads is settled under the slot's lock, so the waiting side, which
        // takes that lock, always knows whether it has to pass on.
        let (direct, leads) = match waker {
            None => (None, false),
            Some(waker) => {
                let mut relay = lock(&slot.relay.state);
                if relay.led {
                    relay.queued.push(waker);
                    (None, false)
                } else {
                    relay.led = true;
                    (Some(waker), true)
                }
            }
        };
        *state = State::Done(outcome, leads);
        direct
    };
    if let Some(waker) = direct {
        waker.wake();
    }
}

impl Future for Receiver {
    type Output = Result<Outcome, Closed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slot = &self.0;
        let mut state = lock(&slot.state);
        match &mut *state {
            State::Waiting(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            State::Done(..) => {
                let State::Done(outcome, leads) = std::mem::replace(&mut *state, State::Over) else { unreachable!() };
                drop(state);
                if leads {
                    slot.relay.pass_on();
                }
                Poll::Ready(outcome.ok_or(Closed))
            }
            State::Over => Poll::Ready(Err(Closed)),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let was = std::mem::replace(&mut *lock(&self.0.state), State::Over);
        if let State::Done(_, true) = was {
            self.0.relay.pass_on();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Outcome;
    use std::time::Duration;

    fn outcome(n: u64) -> Outcome {
        Outcome { result: Err(crate::engine::Failure::Internal(n.to_string())), logs: Vec::new(), cpu: Duration::from_nanos(n), hold: Default::default() }
    }

    #[tokio::test]
    async fn every_call_of_a_batch_gets_its_own_outcome_and_an_unanswered_one_ends_closed() {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..50).map(|_| channel()).unzip();
        let waiting: Vec<_> = receivers.into_iter().map(tokio::spawn).collect();
        tokio::task::yield_now().await;
        // A runtime thread answers the batch, all but the last, which it drops.
        std::thread::spawn(move || {
            for (n, s) in senders.into_iter().enumerate() {
                if n < 49 {
                    s.send(outcome(n as u64));
                }
            }
        })
        .join()
        .unwrap();
        for (n, w) in waiting.into_iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(5), w).await.expect("every waiting call is woken").unwrap();
            match got {
                Ok(o) => assert_eq!(o.cpu, Duration::from_nanos(n as u64)),
                Err(Closed) => assert_eq!(n, 49),
            }
        }
    }

    #[tokio::test]
    async fn the_calls_behind_a_leader_wait_for_it_and_are_woken_when_it_goes_away_unpolled() {
        let (s1, mut r1) = channel();
        let (s2, r2) = channel();
        // The first waits with a waker that does nothing: it is woken but never looks.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(Pin::new(&mut r1).poll(&mut cx).is_pending());
        let second = tokio::spawn(r2);
        tokio::task::yield_now().await;
        std::thread::spawn(move || {
            s1.send(outcome(1));
            s2.send(outcome(2));
        })
        .join()
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "the second call waits for its leader to pass on");
        drop(r1);
        let got = tokio::time::timeout(Duration::from_secs(5), second).await.expect("the second call is woken").unwrap().unwrap();
        assert_eq!(got.cpu, Duration::from_nanos(2));
    }
}

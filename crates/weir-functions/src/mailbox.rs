//! The queue a gateway's runtime thread takes its work from.
//!
//! Senders (proxy workers, the node's outbound client) push and wake the thread only when it
//! sleeps, and never while they hold the queue's lock: on a busy core the woken thread may run
//! at once, and it must not find the lock still held. The thread takes everything queued in one
//! go, so a burst of calls costs it one lock and at most one wake-up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::Instant;

use crate::lock;

pub(crate) struct Mailbox<T> {
    queue: Mutex<VecDeque<T>>,
    /// The owner is parked, or about to: the next sender unparks it.
    sleeping: AtomicBool,
    closed: AtomicBool,
    owner: OnceLock<Thread>,
}

impl<T> Mailbox<T> {
    pub(crate) fn new() -> Self {
        Mailbox { queue: Mutex::new(VecDeque::new()), sleeping: AtomicBool::new(false), closed: AtomicBool::new(false), owner: OnceLock::new() }
    }

    /// Names the calling thread as the one that takes from the mailbox; before its first
    /// [`Mailbox::take`].
    pub(crate) fn attach(&self) {
        let _ = self.owner.set(std::thread::current());
    }

    /// Queues `item`, or gives it back when the mailbox is closed.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(item);
        }
        lock(&self.queue).push_back(item);
        // Pairs with the fence in `take`: either the owner sees this item before it parks,
        // or this sees it sleeping and unparks it.
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
        Ok(())
    }

    /// Closes the mailbox: sends fail from now on and the owner's `take` answers false.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        if let Some(owner) = self.owner.get() {
            owner.unpark();
        }
    }

    /// Moves everything queued onto the end of `into`; when both are empty, first waits until
    /// something is queued or `until` passes. False once the mailbox is closed.
    pub(crate) fn take(&self, into: &mut VecDeque<T>, until: Option<Instant>) -> bool {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            if self.move_into(into) || !into.is_empty() || until.is_some_and(|t| Instant::now() >= t) {
                return true;
            }
            self.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.move_into(into) {
                self.sleeping.store(false, Ordering::SeqCst);
                return true;
            }
            if !self.closed.load(Ordering::SeqCst) {
                match until {
                    Some(t) => std::thread::park_timeout(t.saturating_duration_since(Instant::now())),
                    None => std::thread::park(),
                }
            }
            self.sleeping.store(false, Ordering::SeqCst);
        }
    }

    fn move_into(&self, into: &mut VecDeque<T>) -> bool {
        let mut queue = lock(&self.queue);
        if queue.is_empty() {
            return false;
        }
        if into.is_empty() {
            // The common case: swap buffers, so neither side allocates in steady state.
            std::mem::swap(&mut *queue, into);
        } else {
            into.append(&mut queue);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn every_item_arrives_once_in_order_per_sender() {
        let mb = Arc::new(Mailbox::new());
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = {
            let mb = mb.clone();
            std::thread::spawn(move || {
                mb.attach();
                tx.send(()).unwrap();
                let mut got: Vec<(u32, u32)> = Vec::new();
                let mut batch = VecDeque::new();
                while mb.take(&mut batch, None) {
                    got.extend(batch.drain(..));
                }
                got
            })
        };
        rx.recv().unwrap();
        let senders: Vec<_> = (0..4)
            .map(|s| {
                let mb = mb.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        mb.send((s, i)).map_err(|_| ()).unwrap();
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        // Everything sent before closing is taken before `take` says closed, as long as the
        // owner drains first: wait until the queue is empty.
        while !mb.queue.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        mb.close();
        let got = owner.join().unwrap();
        assert_eq!(got.len(), 80_000);
        for s in 0..4 {
            let mine: Vec<u32> = got.iter().filter(|(from, _)| *from == s).map(|(_, i)| *i).collect();
            assert_eq!(mine, (0..20_000).collect::<Vec<_>>());
        }
        assert!(mb.send((9, 9)).is_err(), "a closed mailbox takes nothing");
    }

    #[test]
    fn take_keeps_what_it_was_given_and_does_not_wait_for_more() {
        let mb: Mailbox<u8> = Mailbox::new();
        mb.attach();
        mb.send(2).unwrap();
        let mut batch = VecDeque::from([1]);
        assert!(mb.take(&mut batch, None));
        assert_eq!(batch, [1, 2]);
        // Nothing queued, but work in hand: returns at once rather than parking for good.
        assert!(mb.take(&mut batch, None));
        assert_eq!(batch, [1, 2]);
        mb.close();
        assert!(!mb.take(&mut batch, None));
    }

    #[test]
    fn take_returns_at_its_deadline_with_nothing() {
        let mb: Mailbox<u8> = Mailbox::new();
        mb.attach();
        let mut batch = VecDeque::new();
        let start = Instant::now();
        assert!(mb.take(&mut batch, Some(start + Duration::from_millis(20))));
        assert!(batch.is_empty());
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}

//! Work the node does for its config rather than for a request, kept from taking a busy core
//! from the proxy workers: freeing what a change replaced, and compiling a partition that is
//! slow to compile.
//!
//! A gateway of many routes or functions replaces a large structure at each of its changes.
//! Freed where the last reference goes, that would be the watch loop (every tenant's changes
//! wait on it) or a proxy worker that still held a route (every tenant's requests on it wait).
//! [`reclaim`] hands it to one thread that frees what it is given, in turn, at a lower weight.

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use weir_core::threads::niceness;

/// Steps of niceness below the process for the reclaiming thread and for the compile of a
/// slow partition: a tenth of a busy core or so (Linux weighs niceness 10 at about a tenth of
/// 0), the rest of the time all the idle core.
pub const BACKGROUND_STEPS: i32 = 10;

/// How many values may wait to be freed; past that a value is freed where it is dropped. A
/// node lets go of a partition a change, but of every one at once when its builder goes.
const WAITING_AT_MOST: usize = 4096;

type Parcel = Box<dyn Any + Send>;

/// The reclaiming thread's queue: `None` when it could not start (values are then freed in
/// place).
fn reclaimer() -> Option<&'static SyncSender<Parcel>> {
    static QUEUE: OnceLock<Option<SyncSender<Parcel>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            // Threads are started at the process's niceness from now on, whatever thread asks.
            weir_core::threads::prepare();
            let (tx, rx) = sync_channel::<Parcel>(WAITING_AT_MOST);
            let started = std::thread::Builder::new().name("weir-reclaim".into()).spawn(move || {
                if let Err(e) = batch_at(BACKGROUND_STEPS) {
                    tracing::debug!(error = %e, "the reclaiming thread keeps the process's priority");
                }
                for parcel in rx {
                    drop(parcel);
                }
            });
            match started {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "no reclaiming thread: replaced config is freed where it is dropped");
                    None
                }
            }
        })
        .as_ref()
}

/// Frees `value` on the reclaiming thread; in place when that thread is not there or has
/// [`WAITING_AT_MOST`] values queued already (a bound on what waits, never a wait).
pub fn reclaim<T: Send + 'static>(value: T) {
    let Some(queue) = reclaimer() else { return };
    match queue.try_send(Box::new(value)) {
        Ok(()) => {}
        Err(TrySendError::Full(parcel) | TrySendError::Disconnected(parcel)) => drop(parcel),
    }
}

/// Runs `work` on a thread of its own at the background's weight ([`BACKGROUND_STEPS`]),
/// within the caller's runtime as the blocking pool's threads are (for what it starts there);
/// on the blocking pool where no thread can be started.
pub fn run_slowly(work: impl FnOnce() + Send + 'static) {
    // What the work starts (a gateway's runtime, a logger's thread) starts at the process's
    // niceness, not this thread's.
    weir_core::threads::prepare();
    let runtime = tokio::runtime::Handle::current();
    // Held where both the thread and a failed start can take it.
    let work = Arc::new(Mutex::new(Some(work)));
    let take = {
        let work = work.clone();
        move || work.lock().unwrap_or_else(PoisonError::into_inner).take()
    };
    let on_thread = take.clone();
    let started = std::thread::Builder::new().name("weir-compile-slow".into()).spawn(move || {
        let _entered = runtime.enter();
        if let Err(e) = batch_at(BACKGROUND_STEPS) {
            tracing::debug!(error = %e, "slow background work keeps the process's priority");
        }
        if let Some(work) = on_thread() {
            work();
        }
    });
    if let Err(e) = started {
        tracing::warn!(error = %e, "no thread for slow background work; run on the blocking pool");
        if let Some(work) = take() {
            tokio::task::spawn_blocking(work);
        }
    }
}

/// Puts the calling thread under Linux's batch policy (it never preempts a thread that woke
/// it), `steps` of niceness nicer than the process, at most the nicest (19), and never less
/// nice than it is: without `CAP_SYS_NICE` a thread can be made nicer but not less nice again
/// (call it on a thread of its own, and start threads from one through
/// `weir_core::threads::spawn`).
pub fn batch_at(steps: i32) -> Result<(), String> {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy, thread_native_id};
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    let own = std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| niceness(&s)).ok_or("the thread's niceness cannot be read")?;
    // From the process's (its first thread's), however nice this thread already is.
    let base = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| niceness(&s)).unwrap_or(own);
    let want = base.saturating_add(steps).clamp(own, 19);
    // The setting takes a priority the crate maps to a niceness: the one nearest above `want`.
    let keep = (0..=99u8)
        .filter_map(|p| {
            let priority = ThreadPriority::Crossplatform(p.try_into().ok()?);
            Some((priority, priority.to_posix(policy).ok()?))
        })
        .filter(|(_, n)| *n >= want)
        .min_by_key(|(_, n)| *n);
    match keep {
        Some((priority, _)) => set_thread_priority_and_policy(thread_native_id(), priority, policy).map_err(|e| format!("{e:?}")),
        None => Err(format!("no priority gives niceness {want}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{Sender, channel};

    /// Says, when dropped, on which thread and at what niceness.
    struct Noted(Sender<(Option<String>, Option<i32>)>);

    impl Drop for Noted {
        fn drop(&mut self) {
            let nice = std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| niceness(&s));
            let _ = self.0.send((std::thread::current().name().map(str::to_string), nice));
        }
    }

    fn nice() -> Option<i32> {
        niceness(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
    }

    #[test]
    fn a_reclaimed_value_is_freed_on_the_reclaiming_thread_at_its_lower_weight() {
        let own = nice().unwrap();
        let (tx, rx) = channel();
        for _ in 0..3 {
            reclaim(Noted(tx.clone()));
        }
        drop(tx);
        let seen: Vec<_> = rx.iter().collect();
        assert_eq!(seen, vec![(Some("weir-reclaim".to_string()), Some((own + BACKGROUND_STEPS).min(19))); 3]);
    }

    #[test]
    fn a_thread_goes_so_many_steps_nicer_than_the_process_up_to_the_nicest() {
        let own = nice().unwrap();
        let seen = std::thread::spawn(|| (batch_at(5), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Some((own + 5).min(19))));
        let seen = std::thread::spawn(|| (batch_at(5), batch_at(8), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Ok(()), Some((own + 8).min(19))), "counted from the process, not the thread");
        let seen = std::thread::spawn(|| (batch_at(8), batch_at(5), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Ok(()), Some((own + 8).min(19))), "never less nice");
        let seen = std::thread::spawn(|| (batch_at(25), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Some(19)), "never past the nicest");
    }
}

//! The node's watch over its function runtimes' threads.
//!
//! QuickJS stops a script only where its interpreter polls the interrupt handler; a built-in
//! written in C (a string search, a sort's default comparison, hashing one long string for
//! every element of a large `Set`) runs its loop to the end however long that takes. A tenant
//! who finds such a loop would hold a core with it, out of reach of the CPU deadline.
//!
//! One thread per node looks at every runtime every [`EVERY`]. A runtime whose deadline passed
//! and that has since spent [`STALLED_CPU`] more of CPU under that same deadline is in such a
//! loop: its thread is put under Linux's idle policy at once (it then runs only on CPU no other
//! thread wants), and, while fewer than [`ABANDONED_AT_MOST`] such threads still run on the
//! node, the runtime is marked stuck: its gateway's next lowering starts a runtime afresh and
//! the stuck one ends once its loop does. Past that many, a demoted runtime is kept (its own
//! gateway's calls wait on it) until there is room, so that no tenant can have the node hold
//! runtimes without end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use crate::deadline::Deadline;
use crate::engine::stat_field;

/// How often the watchdog looks.
pub const EVERY: Duration = Duration::from_millis(100);

/// CPU a runtime may spend past its deadline, under that same deadline, before it is taken for
/// stuck. Nothing a runtime does past a deadline outside a C built-in's loop (answering a call
/// that ran out, freeing a heap) comes near it.
pub const STALLED_CPU: Duration = Duration::from_secs(2);

/// Stuck runtimes replaced whose threads still run, on a node, at most.
pub const ABANDONED_AT_MOST: usize = 4;

/// What the watchdog reads of one runtime's thread, and marks.
pub(crate) struct Watch {
    pub(crate) deadline: Deadline,
    /// The thread's id (Linux's), once it has started.
    tid: AtomicU64,
    /// Held until the watch goes (after the thread), so that the thread's handle stays valid
    /// while the watchdog may use it.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    demoted: AtomicBool,
    stuck: AtomicBool,
    ended: AtomicBool,
    on_stuck: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Watch {
    pub(crate) fn new(deadline: Deadline) -> Arc<Watch> {
        Arc::new(Watch {
            deadline,
            tid: AtomicU64::new(0),
            thread: Mutex::new(None),
            demoted: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            on_stuck: OnceLock::new(),
        })
    }

    /// Called on the runtime's thread when it starts.
    pub(crate) fn started(&self) {
        let tid = std::fs::read_link("/proc/thread-self").ok().and_then(|p| p.file_name()?.to_str()?.parse().ok()).unwrap_or(0);
        self.tid.store(tid, Ordering::Relaxed);
    }

    /// Called on the runtime's thread as it ends.
    pub(crate) fn ended(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }

    /// Watched from now on, with its thread.
    pub(crate) fn watch(self: &Arc<Watch>, thread: std::thread::JoinHandle<()>) {
        *self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(thread);
        let all = WATCHED.get_or_init(|| {
            let _ = std::thread::Builder::new().name("fn-watchdog".into()).spawn(look);
            Mutex::default()
        });
        all.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Arc::downgrade(self));
    }

    pub(crate) fn stuck(&self) -> bool {
        self.stuck.load(Ordering::Relaxed)
    }

    pub(crate) fn when_stuck(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_stuck.set(f);
    }
}

static WATCHED: OnceLock<Mutex<Vec<Weak<Watch>>>> = OnceLock::new();

/// The watchdog's loop.
fn look() {
    // Each runtime past its deadline: the deadline, and the thread's CPU time when first seen.
    let mut past: HashMap<usize, (u64, Duration)> = HashMap::new();
    loop {
        std::thread::sleep(EVERY);
        let Some(all) = WATCHED.get() else { continue };
        let watched: Vec<Arc<Watch>> = {
            let mut all = all.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        let mut abandoned = watched.iter().filter(|w| w.stuck() && !w.ended.load(Ordering::Relaxed)).count();
        past.retain(|at, _| watched.iter().any(|w| Arc::as_ptr(w) as usize == *at));
        for w in &watched {
            let key = Arc::as_ptr(w) as usize;
            if w.stuck() {
                past.remove(&key);
                continue;
            }
            // One demoted while the bound was full is replaced once there is room (stuck
            // still, or not: a runtime on idle CPU is no gateway's to keep).
            if w.demoted.load(Ordering::Relaxed) {
                if abandoned < ABANDONED_AT_MOST {
                    replace(w);
                    abandoned += 1;
                }
                continue;
            }
            let armed = w.deadline.armed();
            let tid = w.tid.load(Ordering::Relaxed);
            let Some(cpu) = (tid != 0).then(|| thread_cpu(tid)).flatten() else { continue };
            if armed == 0 || w.deadline.resting() || !w.deadline.exhausted(cpu) {
                past.remove(&key);
                continue;
            }
            match past.get(&key) {
                Some(&(deadline, since)) if deadline == armed => {
                    if cpu.saturating_sub(since) >= STALLED_CPU {
                        demote(w);
                        // Past the bound it is left to its gateway (whose calls wait on it),
                        // on idle CPU, until one of those replaced ends.
                        if abandoned < ABANDONED_AT_MOST {
                            replace(w);
                            abandoned += 1;
                        }
                    }
                }
                _ => {
                    past.insert(key, (armed, cpu));
                }
            }
        }
    }
}

/// Puts a runtime stuck in a loop it cannot be stopped in under the idle policy.
fn demote(w: &Watch) {
    w.demoted.store(true, Ordering::Relaxed);
    let tid = w.tid.load(Ordering::Relaxed);
    let idle = {
        let thread = w.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        thread.as_ref().map(|t| to_idle(std::os::unix::thread::JoinHandleExt::as_pthread_t(t), tid))
    };
    tracing::warn!(thread = tid, idle = ?idle, "a function runtime ran far past its CPU deadline inside a built-in: it runs only on idle CPU from now on");
}

/// Marks a demoted runtime stuck, for its gateway to start another.
fn replace(w: &Watch) {
    w.stuck.store(true, Ordering::Relaxed);
    if let Some(f) = w.on_stuck.get() {
        f();
    }
}

/// Puts thread `thread` (`tid`) under Linux's idle policy. The setting also sets the calling
/// thread's niceness, to 0 (the only one the policy takes), which an unprivileged process
/// above it is refused: the policy is then set all the same, and read back to be sure.
fn to_idle(thread: thread_priority::ThreadId, tid: u64) -> Result<(), String> {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy};
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let priority = (0..=99u8).find_map(|p| {
        let priority = ThreadPriority::Crossplatform(p.try_into().ok()?);
        priority.to_posix(policy).ok().map(|_| priority)
    });
    let set = priority.ok_or_else(|| "no priority is the idle policy's".to_string()).and_then(|p| set_thread_priority_and_policy(thread, p, policy).map_err(|e| format!("{e:?}")));
    match (set, thread_policy(tid)) {
        (_, Some(IDLE_POLICY)) => Ok(()),
        (Err(e), _) => Err(e),
        (Ok(()), policy) => Err(format!("the thread's policy reads {policy:?}")),
    }
}

/// Linux's number for the idle policy (`SCHED_IDLE`).
const IDLE_POLICY: u32 = 5;

/// The scheduling policy of thread `tid` of this process.
fn thread_policy(tid: u64) -> Option<u32> {
    stat_field(&std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?, 41)
}

/// The CPU time thread `tid` of this process has had.
fn thread_cpu(tid: u64) -> Option<Duration> {
    let dir = format!("/proc/self/task/{tid}");
    if let Some(ns) = std::fs::read_to_string(format!("{dir}/schedstat")).ok().and_then(|s| s.split_whitespace().next()?.parse().ok()) {
        return Some(Duration::from_nanos(ns));
    }
    // Without scheduler statistics: user and system time, in clock ticks (100 a second).
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let ticks = stat_field::<u64>(&stat, 14)? + stat_field::<u64>(&stat, 15)?;
    Some(Duration::from_millis(ticks * 10))
}

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
//!
//! It also measures, over windows of [`BUSY_WINDOW`], how much of the time each runtime spends
//! running JavaScript, or waiting for a core to run it on (`Deadline::running`: calls'
//! segments, loading functions, and what the loop runs outside a segment). A runtime busy for
//! [`BUSY_SHARE`] of [`BUSY_WINDOWS`] windows in a row is doing a tenant's heavy work, which
//! shares the cores with the proxy workers and every other tenant's runtime: its thread is put
//! at the nicest niceness (19), where it runs on what the others leave of a core, and so is any
//! runtime its gateway starts on this node while it runs (`Functions` asks for that). Other threads then preempt its segments
//! often, so its deadline reads the CPU clock at every arming (`Deadline::precise`): no wait
//! for the core counts against its calls' budgets. A light function's runtime stays at the
//! process's niceness, so that it answers its worker at once; so does one whose call is past
//! its CPU deadline, which is the stuck watch's above (CPU from the interrupt handler's first
//! poll). Once the runtime has stayed under
//! [`QUIET_SHARE`] for [`QUIET_WINDOWS`] windows in a row (on a core the others keep busy, a
//! nice runtime's JavaScript waits longer, so it is quiet only once its demand is) it is put back
//! at the niceness it started with, where Linux allows it: a process without `CAP_SYS_NICE`
//! or room under its `RLIMIT_NICE` may never lower a niceness, and there the runtime stays
//! nice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use crate::engine::stat_field;
use crate::lock;

/// How often the watchdog looks.
pub const EVERY: Duration = Duration::from_millis(100);

/// CPU a runtime may spend past its deadline, under that same deadline, before it is taken for
/// stuck. Nothing a runtime does past a deadline outside a C built-in's loop (answering a call
/// that ran out, freeing a heap) comes near it.
pub const STALLED_CPU: Duration = Duration::from_secs(2);

/// Stuck runtimes replaced whose threads still run, on a node, at most.
pub const ABANDONED_AT_MOST: usize = 4;

/// The window over which a runtime's business is measured.
pub const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// The share of a window a runtime spends running JavaScript, or waiting for a core to, from
/// which the window is busy, and how many busy windows in a row make the runtime nice. A light
/// function's runtime under all the load a core can serve spends about a third of its time so;
/// loading a gateway's functions afresh (20,000 of them at most) takes a second or two.
pub const BUSY_SHARE: f64 = 0.9;
pub const BUSY_WINDOWS: u32 = 3;

/// The share under which a nice runtime is quiet, and for how many windows in a row it must be
/// before it goes back to the niceness it started with.
pub const QUIET_SHARE: f64 = 0.5;
pub const QUIET_WINDOWS: u32 = 5;

/// The nicest niceness, Linux's.
const NICEST: i32 = 19;

/// What the watchdog reads of one runtime's thread, and marks.
pub(crate) struct Watch {
    pub(crate) deadline: Deadline,
    gateway: String,
    /// The thread's niceness when it started; `i32::MIN` until then.
    home: AtomicI32,
    /// Put at the nicest niceness for being busy; `kept_nice` once Linux refused it its own back.
    nice: AtomicBool,
    kept_nice: AtomicBool,
    /// The window under way: when it began, the time the runtime had spent running by then,
    /// and how many busy (or, nice, quiet) windows in a row went before. The watchdog's alone.
    window: Mutex<Option<(Instant, Duration, u32)>>,
    /// The thread's id (Linux's), once it has started.
    tid: AtomicU64,
    /// Held until the watch goes (after the thread), so that the thread's handle stays valid
    /// while the watchdog may use it.
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    demoted: AtomicBool,
    stuck: AtomicBool,
    /// Set as the thread ends; held while its niceness is set, so that the thread's id is
    /// still its own then.
    ended: Mutex<bool>,
    on_stuck: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl Watch {
    /// The watch of a runtime of `gateway`, to start nice where its runtime before it was.
    pub(crate) fn new(gateway: &str, deadline: Deadline, nice: bool) -> Arc<Watch> {
        Arc::new(Watch {
            deadline,
            gateway: gateway.to_string(),
            home: AtomicI32::new(i32::MIN),
            nice: AtomicBool::new(nice),
            kept_nice: AtomicBool::new(false),
            window: Mutex::new(None),
            tid: AtomicU64::new(0),
            thread: Mutex::new(None),
            demoted: AtomicBool::new(false),
            stuck: AtomicBool::new(false),
            ended: Mutex::new(false),
            on_stuck: OnceLock::new(),
        })
    }

    /// Called on the runtime's thread when it starts; the thread is marked ended when what this
    /// returns goes. A runtime made to start nice does so here.
    pub(crate) fn on_thread(self: &Arc<Watch>) -> Ending {
        let tid = std::fs::read_link("/proc/thread-self").ok().and_then(|p| p.file_name()?.to_str()?.parse().ok()).unwrap_or(0);
        self.tid.store(tid, Ordering::Relaxed);
        if let Ok(n) = rustix::process::getpriority_process(None) {
            self.home.store(n, Ordering::Relaxed);
        }
        if self.nice() {
            if rustix::process::setpriority_process(None, NICEST).is_ok() {
                self.deadline.precise(true);
            } else {
                self.nice.store(false, Ordering::Relaxed);
            }
        }
        Ending(self.clone())
    }

    /// Whether the runtime runs at the nicest niceness for having been busy.
    pub(crate) fn nice(&self) -> bool {
        self.nice.load(Ordering::Relaxed)
    }

    fn has_ended(&self) -> bool {
        *lock(&self.ended)
    }

    /// Watched from now on, with its thread.
    pub(crate) fn watch(self: &Arc<Watch>, thread: std::thread::JoinHandle<()>) {
        *lock(&self.thread) = Some(thread);
        let all = WATCHED.get_or_init(|| {
            let _ = weir_core::threads::spawn(std::thread::Builder::new().name("fn-watchdog".into()), look);
            Mutex::default()
        });
        lock(all).push(Arc::downgrade(self));
    }

    pub(crate) fn stuck(&self) -> bool {
        self.stuck.load(Ordering::Relaxed)
    }

    pub(crate) fn when_stuck(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_stuck.set(f);
    }
}

/// Marks its runtime's thread ended when it goes.
pub(crate) struct Ending(Arc<Watch>);

impl Drop for Ending {
    fn drop(&mut self) {
        *lock(&self.0.ended) = true;
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
            let mut all = lock(all);
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        let mut abandoned = watched.iter().filter(|w| w.stuck() && !w.has_ended()).count();
        let live: HashSet<usize> = watched.iter().map(|w| Arc::as_ptr(w) as usize).collect();
        past.retain(|at, _| live.contains(at));
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
            // Past its deadline when last looked at: the stuck watch's, below.
            measure(w, past.contains_key(&key));
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

/// Ends runtime `w`'s window once it is [`BUSY_WINDOW`] long, and sets the runtime's niceness
/// by how busy it was; a runtime `past` its call's CPU deadline is not made nice.
fn measure(w: &Watch, past: bool) {
    let (now, ran) = (Instant::now(), w.deadline.running());
    let mut window = lock(&w.window);
    let Some((from, ran_then, mut run)) = *window else {
        *window = Some((now, ran, 0));
        return;
    };
    let long = now.saturating_duration_since(from);
    if long < BUSY_WINDOW {
        return;
    }
    let share = ran.saturating_sub(ran_then).as_secs_f64() / long.as_secs_f64();
    match pace(w.nice.load(Ordering::Relaxed), share, &mut run) {
        Pace::Keep => {}
        Pace::Lower if past => run = 0,
        Pace::Lower => match renice(w, NICEST) {
            Ok(()) => {
                w.nice.store(true, Ordering::Relaxed);
                w.deadline.precise(true);
                tracing::info!(gateway = %w.gateway, share, "a function runtime keeps its core busy: it runs at the nicest niceness until it is quiet");
            }
            Err(e) => tracing::debug!(gateway = %w.gateway, error = %e, "a busy function runtime keeps its niceness"),
        },
        Pace::Raise if w.kept_nice.load(Ordering::Relaxed) => {}
        Pace::Raise => match renice(w, w.home.load(Ordering::Relaxed)) {
            Ok(()) => {
                w.nice.store(false, Ordering::Relaxed);
                w.deadline.precise(false);
                tracing::info!(gateway = %w.gateway, "a function runtime is quiet again: it runs at its own niceness");
            }
            Err(e) => {
                w.kept_nice.store(true, Ordering::Relaxed);
                tracing::info!(gateway = %w.gateway, error = %e, "a function runtime quiet again stays at the nicest niceness: the node may not lower a niceness (CAP_SYS_NICE, RLIMIT_NICE)");
            }
        },
    }
    *window = Some((now, ran, run));
}

#[derive(Debug, PartialEq)]
enum Pace {
    Keep,
    Lower,
    Raise,
}

/// What a window that a runtime spent `share` of running says of its niceness, given whether
/// it is nice now and the windows in a row before that count towards changing it (`run`: busy
/// ones while it is not nice, quiet ones while it is; counted on).
fn pace(nice: bool, share: f64, run: &mut u32) -> Pace {
    let (counts, needed, change) = match nice {
        false => (share >= BUSY_SHARE, BUSY_WINDOWS, Pace::Lower),
        true => (share < QUIET_SHARE, QUIET_WINDOWS, Pace::Raise),
    };
    if !counts {
        *run = 0;
        return Pace::Keep;
    }
    *run += 1;
    if *run < needed {
        return Pace::Keep;
    }
    *run = 0;
    change
}

/// Sets the niceness of runtime `w`'s thread, while it runs: the thread cannot end meanwhile,
/// so its id is not another's.
fn renice(w: &Watch, niceness: i32) -> Result<(), String> {
    let ended = lock(&w.ended);
    if *ended || niceness == i32::MIN {
        return Err("the runtime's thread is not running".into());
    }
    let tid = i32::try_from(w.tid.load(Ordering::Relaxed)).ok().and_then(rustix::process::Pid::from_raw).ok_or("the runtime's thread is not known")?;
    rustix::process::setpriority_process(Some(tid), niceness).map_err(|e| e.to_string())
}

/// Puts a runtime stuck in a loop it cannot be stopped in under the idle policy.
fn demote(w: &Watch) {
    w.demoted.store(true, Ordering::Relaxed);
    let tid = w.tid.load(Ordering::Relaxed);
    let idle = {
        let thread = lock(&w.thread);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_busy_windows_in_a_row_goes_nice_and_comes_back_after_quiet_ones() {
        let mut run = 0;
        assert_eq!(pace(false, 0.35, &mut run), Pace::Keep, "a light function's runtime under full load");
        // Busy windows count only in a row.
        for _ in 1..BUSY_WINDOWS {
            assert_eq!(pace(false, BUSY_SHARE, &mut run), Pace::Keep);
        }
        assert_eq!(pace(false, 0.5, &mut run), Pace::Keep);
        assert_eq!(run, 0);
        for _ in 1..BUSY_WINDOWS {
            assert_eq!(pace(false, 1.0, &mut run), Pace::Keep);
        }
        assert_eq!(pace(false, 0.95, &mut run), Pace::Lower);
        assert_eq!(run, 0);
        // Nice: only quiet windows in a row bring it back; a busy one starts the count again.
        for _ in 1..QUIET_WINDOWS {
            assert_eq!(pace(true, 0.1, &mut run), Pace::Keep);
        }
        assert_eq!(pace(true, 0.7, &mut run), Pace::Keep);
        assert_eq!(run, 0);
        for _ in 1..QUIET_WINDOWS {
            assert_eq!(pace(true, QUIET_SHARE / 2.0, &mut run), Pace::Keep);
        }
        assert_eq!(pace(true, 0.0, &mut run), Pace::Raise);
        assert_eq!(run, 0);
    }

    /// A thread started as `w`'s runtime's, once it has; it ends when told, with its own
    /// niceness then.
    fn runtime_thread(w: &Arc<Watch>) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<i32>) {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let thread = {
            let w = w.clone();
            std::thread::spawn(move || {
                let _ends = Watch::on_thread(&w);
                started_tx.send(()).unwrap();
                rx.recv().unwrap();
                rustix::process::getpriority_process(None).unwrap()
            })
        };
        started_rx.recv().unwrap();
        (tx, thread)
    }

    #[test]
    fn a_runtimes_thread_is_reniced_by_its_id_and_only_while_it_runs() {
        let w = Watch::new("reniced", Deadline::new(), false);
        let (tx, seen) = runtime_thread(&w);
        let home = w.home.load(Ordering::Relaxed);
        assert_ne!(home, i32::MIN);
        renice(&w, (home + 3).min(NICEST)).unwrap();
        tx.send(()).unwrap();
        assert_eq!(seen.join().unwrap(), (home + 3).min(NICEST), "the thread's own niceness");
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), home, "this thread's is untouched");
        assert!(w.has_ended(), "marked ended as the thread ended");
        assert!(renice(&w, NICEST).is_err());
    }

    /// Busy windows seen while the runtime's call is past its CPU deadline do not make it
    /// nice (the stuck watch has it): the lowering they come to is refused and the count of
    /// busy windows in a row starts again. The same windows seen otherwise make it nice.
    #[test]
    fn a_runtime_past_its_deadline_is_not_made_nice_however_busy() {
        let w = Watch::new("vetoed", Deadline::new(), false);
        let (tx, thread) = runtime_thread(&w);
        let tid = rustix::process::Pid::from_raw(w.tid.load(Ordering::Relaxed) as i32).unwrap();
        let niceness = || rustix::process::getpriority_process(Some(tid)).unwrap();
        let home = niceness();
        // Running JavaScript from now on, for a window's length before the first is measured.
        w.deadline.enter(Instant::now());
        std::thread::sleep(BUSY_WINDOW + Duration::from_millis(50));
        // A window of the last second, all of it running, as the watchdog finds it.
        let busy_window = || {
            let mut window = w.window.lock().unwrap();
            let run = window.map_or(0, |(_, _, run)| run);
            *window = Some((Instant::now() - BUSY_WINDOW, w.deadline.running() - BUSY_WINDOW, run));
        };
        for _ in 0..BUSY_WINDOWS * 3 {
            busy_window();
            measure(&w, true);
            assert!(!w.nice());
        }
        assert_eq!(niceness(), home);
        for _ in 1..BUSY_WINDOWS {
            busy_window();
            measure(&w, false);
            assert!(!w.nice(), "the count began again after the last refusal");
        }
        busy_window();
        measure(&w, false);
        assert!(w.nice());
        assert_eq!(niceness(), NICEST);
        tx.send(()).unwrap();
        assert_eq!(thread.join().unwrap(), NICEST);
    }

    #[test]
    fn a_runtime_made_to_start_nice_starts_nice_and_precise() {
        let w = Watch::new("went-nice", Deadline::new(), true);
        let seen = {
            let w = w.clone();
            std::thread::spawn(move || {
                let _ends = Watch::on_thread(&w);
                rustix::process::getpriority_process(None).unwrap()
            })
        };
        assert_eq!(seen.join().unwrap(), NICEST);
        assert!(w.nice());
        assert!(w.deadline.is_precise(), "its calls' budgets count no wait for the core");
    }
}

//! When a runtime's running JavaScript must stop, counted in the CPU its thread spends.
//!
//! A call's budget is CPU time. Reading a thread's CPU clock is a system call (about 0.25 us
//! here), too dear for every call when a warm call costs a few microseconds, while the
//! monotonic clock costs a tenth of that. So the deadline is kept on the monotonic clock,
//! which never runs slower than the thread's CPU clock: until it passes, the budget cannot have
//! run out. The interrupt handler, the first time QuickJS polls it under an arming, notes the
//! thread's CPU clock (a baseline). Once the monotonic deadline passes, the CPU spent since
//! the arming is what decides: the time before the baseline counted whole (one poll's worth
//! of running, with any wait for the core meanwhile: a call may be stopped that much early),
//! the CPU clock's advance after it. Whatever is left of the budget becomes a new
//! deadline that far ahead. So on a core shared with other threads (another tenant's runtime
//! among them) a call gets the CPU its budget names, where a deadline on the monotonic clock
//! alone would count the time others ran against it. A segment too short to be polled counts
//! its monotonic time (except on a runtime the watchdog made nice, whose every arming reads the
//! CPU clock: other threads preempt it often), and one in a built-in's loop in C, which is never polled, is the
//! watchdog's (`watchdog.rs`), which reads the runtime thread's CPU clock from `/proc` against
//! the same arming.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A runtime's deadline, shared between its thread (which arms it and runs the interrupt
/// handler) and the watchdog (which reads it, and says whether it is precise). The CPU clock
/// is only ever read on the runtime's own thread.
#[derive(Clone)]
pub(crate) struct Deadline(Arc<Shared>);

struct Shared {
    epoch: Instant,
    /// When the running JavaScript must stop, in nanoseconds since `epoch` on the monotonic
    /// clock; 0: never.
    at: AtomicU64,
    /// The arming: from when (nanoseconds since `epoch`), for how much CPU.
    from: AtomicU64,
    budget: AtomicU64,
    /// The baseline: when the interrupt handler was first polled under the arming, or the
    /// arming itself where the deadline is precise (nanoseconds since `epoch`; 0: not yet),
    /// and the thread's CPU clock then.
    base_at: AtomicU64,
    base_cpu: AtomicU64,
    resting: AtomicBool,
    /// Set when the interrupt handler stopped the running JavaScript.
    fired: AtomicBool,
    /// The time spent running JavaScript (segments, and what the loop runs outside them), on
    /// the monotonic clock, for the watchdog's measure of how busy the runtime keeps its core:
    /// nanoseconds of what ended, and when what is under way began (since `epoch`; 0: none).
    ran: AtomicU64,
    running_since: AtomicU64,
    /// See [`Deadline::precise`].
    precise: AtomicBool,
}

/// A deadline's arming, to be put back once something armed under its own is done
/// ([`Deadline::save`]).
pub(crate) struct Arming {
    at: u64,
    from: u64,
    budget: u64,
    base_at: u64,
    base_cpu: u64,
}

impl Deadline {
    pub(crate) fn new() -> Deadline {
        Deadline(Arc::new(Shared {
            epoch: Instant::now(),
            at: AtomicU64::new(0),
            from: AtomicU64::new(0),
            budget: AtomicU64::new(0),
            base_at: AtomicU64::new(0),
            base_cpu: AtomicU64::new(0),
            resting: AtomicBool::new(false),
            fired: AtomicBool::new(false),
            ran: AtomicU64::new(0),
            running_since: AtomicU64::new(0),
            precise: AtomicBool::new(false),
        }))
    }

    fn now(&self) -> u64 {
        (self.0.epoch.elapsed().as_nanos() as u64).max(1)
    }

    /// Gives the JavaScript run from `start` `budget` of CPU; on the runtime's thread. Where
    /// the deadline is [`Deadline::precise`], the baseline is taken here, so that nothing of
    /// the arming counts whole.
    pub(crate) fn arm(&self, start: Instant, budget: Duration) {
        let s = &self.0;
        let from = (start.saturating_duration_since(s.epoch).as_nanos() as u64).max(1);
        let budget = u64::try_from(budget.as_nanos()).unwrap_or(u64::MAX);
        s.from.store(from, Ordering::Relaxed);
        s.budget.store(budget, Ordering::Relaxed);
        if s.precise.load(Ordering::Relaxed) {
            s.base_cpu.store(thread_cpu(), Ordering::Relaxed);
            s.base_at.store(from, Ordering::Relaxed);
        } else {
            s.base_at.store(0, Ordering::Relaxed);
        }
        s.at.store(from.saturating_add(budget), Ordering::Relaxed);
    }

    /// Whether every arming reads the thread's CPU clock at once (a few system calls a segment,
    /// about 0.25 us each), rather than at the interrupt handler's first poll: for a
    /// runtime at the nicest niceness, whose short segments other threads preempt often, and
    /// whose waits for the core would otherwise count against its calls' budgets.
    pub(crate) fn precise(&self, on: bool) {
        self.0.precise.store(on, Ordering::Relaxed);
    }

    pub(crate) fn is_precise(&self) -> bool {
        self.0.precise.load(Ordering::Relaxed)
    }

    /// The CPU spent under the arming, read at `now`: exact from the baseline on, by `cpu`
    /// (the runtime thread's CPU clock now).
    fn used_by(&self, now: u64, cpu: impl FnOnce() -> u64) -> u64 {
        let s = &self.0;
        let from = s.from.load(Ordering::Relaxed);
        match s.base_at.load(Ordering::Relaxed) {
            0 => now.saturating_sub(from),
            base => base.saturating_sub(from).saturating_add(cpu().saturating_sub(s.base_cpu.load(Ordering::Relaxed))),
        }
    }

    /// As [`Deadline::used_by`], on the runtime's thread.
    fn used(&self, now: u64) -> u64 {
        self.used_by(now, thread_cpu)
    }

    /// Whether the budget ran out; on the runtime's thread only. Where the monotonic clock
    /// passed the deadline with CPU left, the deadline moves on by what is left.
    pub(crate) fn past(&self) -> bool {
        let s = &self.0;
        let at = s.at.load(Ordering::Relaxed);
        if at == 0 {
            return false;
        }
        let now = self.now();
        if now < at {
            return false;
        }
        let left = s.budget.load(Ordering::Relaxed).saturating_sub(self.used(now));
        if left == 0 {
            return true;
        }
        s.at.store(now + left, Ordering::Relaxed);
        false
    }

    /// Whether the budget ran out by the runtime thread's CPU clock reading `cpu` (from
    /// `/proc`, Linux's same count): the watchdog's reading, from its own thread. It changes
    /// nothing, so that the runtime's thread, the only one to move the deadline, decides
    /// alone. A reading amid an arming may mix two armings' fields; the watchdog takes a
    /// runtime for stuck only once this has held for seconds of CPU under one deadline.
    pub(crate) fn exhausted(&self, cpu: Duration) -> bool {
        let at = self.0.at.load(Ordering::Relaxed);
        let now = self.now();
        at != 0 && now >= at && self.used_by(now, || cpu.as_nanos() as u64) >= self.0.budget.load(Ordering::Relaxed)
    }

    /// The CPU spent under the arming until `now`; on the runtime's thread only.
    pub(crate) fn spent(&self, now: Instant) -> Duration {
        let now = (now.saturating_duration_since(self.0.epoch).as_nanos() as u64).max(1);
        Duration::from_nanos(self.used(now))
    }

    /// The deadline set last, as a number that changes with every setting and every move
    /// (0: none).
    pub(crate) fn armed(&self) -> u64 {
        self.0.at.load(Ordering::Relaxed)
    }

    /// The interrupt handler's answer: whether the running JavaScript must stop now (and then
    /// noted, for [`Deadline::fired`]). Its first poll under an arming takes the baseline.
    pub(crate) fn interrupt(&self) -> bool {
        let s = &self.0;
        if s.at.load(Ordering::Relaxed) != 0 && s.base_at.load(Ordering::Relaxed) == 0 {
            s.base_cpu.store(thread_cpu(), Ordering::Relaxed);
            s.base_at.store(self.now(), Ordering::Relaxed);
        }
        let past = self.past();
        if past {
            s.fired.store(true, Ordering::Relaxed);
        }
        past
    }

    /// Whether the interrupt handler stopped JavaScript since this was last asked.
    pub(crate) fn fired(&self) -> bool {
        self.0.fired.swap(false, Ordering::Relaxed)
    }

    /// The arming as it is, for [`Deadline::restore`].
    pub(crate) fn save(&self) -> Arming {
        let s = &self.0;
        Arming {
            at: s.at.load(Ordering::Relaxed),
            from: s.from.load(Ordering::Relaxed),
            budget: s.budget.load(Ordering::Relaxed),
            base_at: s.base_at.load(Ordering::Relaxed),
            base_cpu: s.base_cpu.load(Ordering::Relaxed),
        }
    }

    /// Puts back an arming [`Deadline::save`] took: what ran since counts against it.
    pub(crate) fn restore(&self, a: Arming) {
        let s = &self.0;
        s.from.store(a.from, Ordering::Relaxed);
        s.budget.store(a.budget, Ordering::Relaxed);
        s.base_cpu.store(a.base_cpu, Ordering::Relaxed);
        s.base_at.store(a.base_at, Ordering::Relaxed);
        s.at.store(a.at, Ordering::Relaxed);
    }

    /// Whether the thread waits for work or drops a runtime, running no JavaScript meanwhile
    /// (the watchdog leaves it alone then, whatever the deadline).
    /// Resting closes what [`Deadline::enter`] opened.
    pub(crate) fn rest(&self, resting: bool) {
        if resting && self.0.running_since.load(Ordering::Relaxed) != 0 {
            self.leave(Instant::now());
        }
        self.0.resting.store(resting, Ordering::Relaxed);
    }

    pub(crate) fn resting(&self) -> bool {
        self.0.resting.load(Ordering::Relaxed)
    }

    /// JavaScript runs from `start` (a segment, or what the loop runs outside one); on the
    /// runtime's thread. Where the time is counted already, it goes on from where it began;
    /// true where this began it.
    pub(crate) fn enter(&self, start: Instant) -> bool {
        if self.0.running_since.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let since = (start.saturating_duration_since(self.0.epoch).as_nanos() as u64).max(1);
        self.0.running_since.store(since, Ordering::Relaxed);
        true
    }

    /// The JavaScript [`Deadline::enter`] counted ended at `end`; on the runtime's thread, the
    /// only one to write either field. The time leaves `running_since` before it joins `ran`: a
    /// reading between the two counts it short, never twice.
    pub(crate) fn leave(&self, end: Instant) {
        let s = &self.0;
        let since = s.running_since.load(Ordering::Relaxed);
        if since != 0 {
            s.running_since.store(0, Ordering::Relaxed);
            let end = end.saturating_duration_since(s.epoch).as_nanos() as u64;
            s.ran.store(s.ran.load(Ordering::Relaxed).saturating_add(end.saturating_sub(since)), Ordering::Release);
        }
    }

    /// The time the runtime has spent running JavaScript so far (from each [`Deadline::enter`]
    /// to the [`Deadline::leave`] or rest after it), what is under way counted until now: time
    /// it held or waited for a core to run JavaScript on.
    pub(crate) fn running(&self) -> Duration {
        let s = &self.0;
        let ran = s.ran.load(Ordering::Acquire);
        let under_way = match s.running_since.load(Ordering::Relaxed) {
            0 => 0,
            since => self.now().saturating_sub(since),
        };
        Duration::from_nanos(ran.saturating_add(under_way))
    }
}

/// The calling thread's CPU clock, in nanoseconds.
fn thread_cpu() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins the calling thread for `d` of its own CPU.
    fn spin(d: Duration) {
        let until = thread_cpu() + d.as_nanos() as u64;
        while thread_cpu() < until {}
    }

    /// This thread's CPU clock as the watchdog reads it.
    fn cpu() -> Duration {
        Duration::from_nanos(thread_cpu())
    }

    #[test]
    fn the_budget_counts_the_threads_cpu_not_the_time_it_waited() {
        let d = Deadline::new();
        d.arm(Instant::now(), Duration::from_millis(100));
        assert!(!d.interrupt(), "the first poll takes the baseline");
        // The thread runs nothing for longer than the budget: no CPU of the budget is spent.
        std::thread::sleep(Duration::from_millis(150));
        assert!(!d.exhausted(cpu()), "the monotonic clock passed the deadline, the CPU clock did not");
        assert!(!d.interrupt() && !d.past() && !d.fired(), "with CPU left the call goes on");
        assert!(d.spent(Instant::now()) < Duration::from_millis(50), "{:?}", d.spent(Instant::now()));
        // Running past the budget stops it.
        spin(Duration::from_millis(105));
        assert!(d.exhausted(cpu()), "the watchdog reads it run out");
        assert!(d.interrupt() && d.fired());
        assert!(d.spent(Instant::now()) >= Duration::from_millis(100), "{:?}", d.spent(Instant::now()));
    }

    #[test]
    fn without_a_baseline_the_monotonic_clock_counts() {
        let d = Deadline::new();
        d.arm(Instant::now(), Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(d.past(), "never polled: the time since the arming counts whole");
        assert!(d.spent(Instant::now()) >= Duration::from_millis(30));
        d.arm(Instant::now(), Duration::from_millis(20));
        assert!(!d.past() && !d.exhausted(cpu()), "a new arming starts afresh");
    }

    #[test]
    fn an_arming_put_back_keeps_what_it_spent() {
        let d = Deadline::new();
        d.arm(Instant::now(), Duration::from_millis(50));
        assert!(!d.interrupt());
        spin(Duration::from_millis(20));
        let saved = d.save();
        d.arm(Instant::now(), Duration::from_millis(5));
        spin(Duration::from_millis(10));
        assert!(d.interrupt() && d.fired(), "the inner arming has its own budget");
        d.restore(saved);
        assert!(!d.past(), "the outer arming is back, with CPU left");
        let spent = d.spent(Instant::now());
        assert!(spent >= Duration::from_millis(30) && spent < Duration::from_millis(50), "the inner run counts against it: {spent:?}");
    }

    #[test]
    fn the_time_in_segments_counts_those_ended_and_the_one_under_way() {
        let d = Deadline::new();
        assert_eq!(d.running(), Duration::ZERO);
        d.enter(Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let under_way = d.running();
        assert!(under_way >= Duration::from_millis(20), "{under_way:?}");
        d.leave(Instant::now());
        let ended = d.running();
        assert!(ended >= under_way, "{ended:?}");
        // Between segments nothing is counted, and a leave without an enter adds nothing.
        std::thread::sleep(Duration::from_secs(1));
        d.leave(Instant::now());
        assert_eq!(d.running(), ended);
        // An enter while counting goes on from the first; resting ends it.
        d.enter(Instant::now());
        std::thread::sleep(Duration::from_millis(10));
        d.enter(Instant::now());
        std::thread::sleep(Duration::from_millis(10));
        d.rest(true);
        let after = d.running();
        assert!(after >= ended + Duration::from_millis(20) && after < ended + Duration::from_secs(1), "the time between segments counted: {after:?}");
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(d.running(), after, "nothing counts while resting");
    }

    #[test]
    fn a_precise_deadline_counts_no_wait_before_the_first_poll() {
        let d = Deadline::new();
        d.precise(true);
        d.arm(Instant::now(), Duration::from_millis(20));
        // Never polled, and not running: none of the budget is spent, though the monotonic
        // deadline passed.
        std::thread::sleep(Duration::from_millis(30));
        assert!(!d.past(), "the wait counted");
        assert!(d.spent(Instant::now()) < Duration::from_millis(10), "{:?}", d.spent(Instant::now()));
        spin(Duration::from_millis(25));
        assert!(d.past(), "the CPU counts");
        d.precise(false);
        d.arm(Instant::now(), Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(d.past(), "without it, never polled: the time since the arming counts whole");
    }
}

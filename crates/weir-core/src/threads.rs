//! Threads started at the process's own scheduling, whichever thread asks for them.
//!
//! Linux gives a new thread its creator's scheduling policy and niceness, and a few of the
//! node's threads run nicer than the process (a slow partition's compile, the thread freeing
//! replaced config). A thread one of them started (a gateway's function runtime, a logger's
//! writer) would run as nice for good: a thread can be made nicer, but not less nice again
//! without `CAP_SYS_NICE`. Threads that serve requests or tenants are started through
//! [`spawn`] instead: by one starter thread, made before any thread was made nicer
//! ([`prepare`]), on the asking thread's behalf. [`niceness`] reads a thread's niceness from
//! its `/proc` `stat` line.

use std::io;
use std::sync::OnceLock;
use std::sync::mpsc::{SendError, Sender, channel};
use std::thread::JoinHandle;

type Start = Box<dyn FnOnce() + Send>;

/// The starter's queue: `None` when it could not be started (threads then start in place).
fn starter() -> Option<&'static Sender<Start>> {
    static QUEUE: OnceLock<Option<Sender<Start>>> = OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = channel::<Start>();
            let started = std::thread::Builder::new().name("weir-starter".into()).spawn(move || {
                for start in rx {
                    start();
                }
            });
            started.ok().map(|_| tx)
        })
        .as_ref()
}

/// Starts the starter thread now, from the calling thread, if it is not running yet: call it
/// before making any thread nicer than the process.
pub fn prepare() {
    let _ = starter();
}

/// As `builder.spawn(f)`, the thread started by the starter thread, so at the scheduling the
/// process started with rather than the caller's. In place where the starter is not running.
pub fn spawn<F, T>(builder: std::thread::Builder, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(starter) = starter() else { return builder.spawn(f) };
    let (tx, rx) = channel();
    let start: Start = Box::new(move || {
        let _ = tx.send(builder.spawn(f));
    });
    if let Err(SendError(start)) = starter.send(start) {
        start();
    }
    rx.recv().unwrap_or_else(|_| Err(io::Error::other("the thread starter stopped")))
}

/// Field `n` (counted from 1, as `proc(5)` does) of a `/proc/.../stat` line.
pub fn stat_field<T: std::str::FromStr>(stat: &str, n: usize) -> Option<T> {
    // The name in parentheses may hold spaces; the fields after it start with the state (3rd).
    stat.rsplit_once(')')?.1.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// The niceness field of a `/proc/.../stat` line.
pub fn niceness(stat: &str) -> Option<i32> {
    stat_field(stat, 19)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_past_a_name_holding_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 7";
        assert_eq!((stat_field::<char>(stat, 3), stat_field::<u64>(stat, 14), niceness(stat)), (Some('S'), Some(11), Some(7)));
    }

    /// The niceness of the calling thread.
    fn nice() -> i32 {
        niceness(&std::fs::read_to_string("/proc/thread-self/stat").unwrap()).unwrap()
    }

    /// Makes the calling thread `steps` nicer, through `renice`'s system call as the shell
    /// does it: `setpriority` on the thread's id.
    fn nicer(steps: i32) {
        let tid = std::fs::read_link("/proc/thread-self").unwrap();
        let tid = tid.file_name().unwrap().to_str().unwrap().to_string();
        let status = std::process::Command::new("renice").args(["-n", &(nice() + steps).to_string(), "-p", &tid]).output().unwrap();
        assert!(status.status.success(), "{status:?}");
    }

    #[test]
    fn a_thread_started_from_a_nicer_thread_runs_at_the_processs_niceness() {
        let base = nice();
        prepare();
        let seen = std::thread::spawn(move || {
            nicer(5);
            let here = nice();
            let started = spawn(std::thread::Builder::new().name("started".into()), nice).unwrap().join().unwrap();
            let inherited = std::thread::spawn(nice).join().unwrap();
            (here, started, inherited)
        })
        .join()
        .unwrap();
        assert_eq!(seen, ((base + 5).min(19), base, (base + 5).min(19)), "a plain spawn inherits; ours does not");
    }
}

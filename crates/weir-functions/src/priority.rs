//! How Linux schedules tenants' work on a node. Each gateway's runtime thread runs under the
//! batch policy at the process's niceness: under it a thread never preempts the one that wakes
//! it, so a proxy worker that queues a call keeps its core until it waits, and the runtime then
//! answers every call queued meanwhile in one turn. Its weight stays the proxy's: ten steps
//! nicer, tenants whose calls spin within their budgets on a worker's core left a plain route
//! 79% of its throughput rather than about a quarter, but a light function sharing a core with
//! its worker fell to about half its throughput (the worker preempting the runtime at every
//! answer), so the runtime keeps the niceness it started with (the process's), until the
//! watchdog finds it keeping its core busy (`watchdog.rs`): then it runs at the nicest, as does
//! a runtime its gateway starts meanwhile. The compiles of what tenants publish
//! run at the nicest (19): a tenant's large sources compile on what the node's own work leaves
//! of a core.

/// Steps of niceness below the process: a gateway's runtime thread, and a compile.
pub(crate) const RUNTIME_STEPS: i32 = 0;
pub(crate) const COMPILE_STEPS: i32 = 19;

/// Puts the calling thread under Linux's batch policy, `steps` of niceness nicer than it is
/// (at most 19, the nicest).
pub(crate) fn batch_at(steps: i32) -> Result<(), String> {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy, thread_native_id};
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    let own = std::fs::read_to_string("/proc/thread-self/stat").ok().and_then(|s| niceness(&s)).ok_or("the thread's niceness cannot be read")?;
    let want = own.saturating_add(steps).clamp(own, 19);
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

/// The niceness field of a `/proc/.../stat` line.
pub(crate) fn niceness(stat: &str) -> Option<i32> {
    crate::engine::stat_field(stat, 19)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> Option<i32> {
        niceness(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
    }

    #[test]
    fn a_thread_goes_so_many_steps_nicer_up_to_the_nicest() {
        let own = nice().unwrap();
        let seen = std::thread::spawn(|| (batch_at(5), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Some((own + 5).min(19))));
        let seen = std::thread::spawn(|| (batch_at(15), batch_at(10), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Ok(()), Some(19)), "never past the nicest");
    }
}

//! How Linux schedules tenants' work on a node: their scripts (each gateway's runtime thread)
//! and the compiles of what they publish run under the batch policy [`TENANT_NICENESS`]
//! steps of niceness below the gateway's own threads (the proxy workers, the watch loop, the
//! Admin API: the process's niceness, 0 unless started otherwise; at most 19). Under the batch policy a thread never preempts the one that wakes it,
//! and the niceness weighs it at about a tenth of a thread at 0 when both want the core: a
//! node whose tenants keep their runtimes busy, each call within its budget, still gives its
//! proxy most of a core (on one core beside three runtimes spinning, a plain route kept about
//! 70% of its throughput, where at niceness 0 it kept about a quarter), while tenants share
//! among themselves as equals. A core no one else wants is theirs whole.

/// How much nicer than the gateway's own threads tenants' work runs.
pub const TENANT_NICENESS: i32 = 10;

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
        let seen = std::thread::spawn(|| (batch_at(TENANT_NICENESS), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Some((own + TENANT_NICENESS).min(19))));
        let seen = std::thread::spawn(|| (batch_at(15), batch_at(TENANT_NICENESS), nice())).join().unwrap();
        assert_eq!(seen, (Ok(()), Ok(()), Some(19)), "never past the nicest");
    }
}

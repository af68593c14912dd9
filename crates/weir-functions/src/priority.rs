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

pub(crate) use weir_proxy::background::batch_at;
#[cfg(test)]
pub(crate) use weir_core::threads::niceness;

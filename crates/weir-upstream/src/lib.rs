//! Upstream mechanism: nodes, the four balancers, and health checks. It knows nothing of
//! routes, snapshots, plugins or tenants; the data plane builds these from its config.

pub mod balancer;
pub mod health;
pub mod lanes;
pub mod reach;
mod load;
mod node;

pub use load::{InFlight, NodeLoad};
pub use node::{DEFAULT_TIMEOUT, Keepalive, NodeRt, Timeouts};

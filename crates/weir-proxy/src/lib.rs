//! The data plane: the router, config snapshots, and the HTTP proxy.
//!
//! Config flows one way: store → [`watch::follow`] → [`state::ConfigState`] →
//! [`snapshot::Builder`] → `ArcSwap<Snapshot>` → [`proxy::Proxy`]. The proxy never calls the
//! store and never parses JSON.

pub mod access;
pub mod balancer;
pub mod body;
pub mod deadline;
pub mod drain;
pub mod exporter;
pub mod front;
pub mod h1;
pub mod hop;
pub mod health;
pub mod pool;
pub mod proxy;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod status;
mod streams;
pub mod state;
pub mod watch;

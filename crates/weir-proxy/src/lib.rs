//! The data plane: the router, config snapshots, and the HTTP proxy.
//!
//! Config flows one way: store → [`watch::follow`] → [`state::ConfigState`] →
//! [`snapshot::Builder`] → `ArcSwap<Snapshot>` → [`proxy::Proxy`]. The proxy never calls the
//! store and never parses JSON.
//!
//! This crate is policy: what to do with a request. The mechanism it drives lives apart and
//! knows nothing of routes: `weir-http` (client connections, the upstream HTTP client and
//! pool, bodies) and `weir-upstream` (nodes, balancers, health checks).

pub mod access;
pub mod background;
pub mod exporter;
pub mod handler;
pub mod partition;
mod places;
pub mod proxy;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod status;
mod tunnel;
pub mod state;
pub mod watch;

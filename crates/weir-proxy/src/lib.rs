//! The data plane: the router, config snapshots, and the HTTP proxy.

pub mod router;

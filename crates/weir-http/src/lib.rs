//! HTTP mechanism: the client side of a connection (a lean HTTP/1.1 loop, hyper's server for
//! the rest), the HTTP/1.1 client of upstream nodes and its connection pool, hop-by-hop rules,
//! bodies, exchange deadlines and draining. It knows nothing of routes, snapshots, plugins or
//! tenants: whatever answers requests is a [`Service`].

pub mod body;
pub mod deadline;
pub mod drain;
pub mod front;
pub mod h1;
pub mod hop;
pub mod pool;
pub mod req_body;
mod service;
mod streams;

pub use h1::is_idempotent;
pub use service::{ConnInfo, Service, error_response};

//! Types shared by every part of Weir: the resources the data plane compiles and their store
//! keys, the typed configuration it reads them as, and the `vars` expression language.
//!
//! Nothing here does I/O (`threads` starts threads, no more). Objects are checked at the door by `weir-catalog`; the data plane
//! turns stored JSON into [`model`] types when it builds a snapshot, never per request.

pub mod error;
pub mod expr;
pub mod model;
pub mod net;
pub mod path;
pub mod resource;
pub mod schema;
pub mod text;
pub mod threads;

pub use resource::Resource;

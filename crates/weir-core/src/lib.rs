//! Types shared by every part of Weir: the resources of the Admin API, their JSON schemas,
//! the typed configuration the data plane compiles, and the `vars` expression language.
//!
//! Nothing here does I/O. The admin layer validates JSON with [`schema`]; the data plane turns
//! stored JSON into [`model`] types when it builds a snapshot, never per request.

pub mod expr;
pub mod model;
pub mod path;
pub mod resource;
pub mod schema;
pub mod text;

pub use resource::Resource;

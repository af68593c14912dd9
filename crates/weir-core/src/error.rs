//! What kind of failure an error is. Every surface (the Admin API's envelopes, the gateway's
//! JSON errors) turns a kind into its response in one place, and retries, passive health and
//! metrics decide by the kind, never by an error's message.

/// The kinds of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// What was sent is wrong: a body that does not check, a request that does not parse.
    BadInput,
    /// What was asked for does not exist.
    NotFound,
    /// What was asked for collides with what is there (a duplicate, a lost compare-and-set).
    Conflict,
    /// Something needed is not there right now (the store, every node of an upstream).
    Unavailable,
    /// Something needed did not answer in time.
    Timeout,
    /// A node failed: it refused the connection, broke it, or answered nonsense.
    Upstream,
    /// A limit was reached.
    Quota,
    /// Weir itself failed.
    Internal,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::BadInput,
        ErrorKind::NotFound,
        ErrorKind::Conflict,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Upstream,
        ErrorKind::Quota,
        ErrorKind::Internal,
    ];

    /// The kind as a metric label or a log field.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::BadInput => "bad_input",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Upstream => "upstream",
            ErrorKind::Quota => "quota",
            ErrorKind::Internal => "internal",
        }
    }

    /// The status a control API (the Admin API, the platform's) answers a failure of this
    /// kind with. The gateway's own answers also weigh which side failed (`proxy::failure`).
    pub fn api_status(self) -> u16 {
        match self {
            ErrorKind::BadInput => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
            ErrorKind::Upstream => 502,
            ErrorKind::Quota => 429,
            ErrorKind::Internal => 500,
        }
    }
}

/// An error that knows its kind.
pub trait Kinded {
    fn kind(&self) -> ErrorKind;
}

/// A message with a kind, for failures that have no error type of their own.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }
}

impl Kinded for Error {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
}

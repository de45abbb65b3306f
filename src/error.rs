//! Errors of the snapshotter core.
//!
//! Every error carries the context a reader of the log needs (which key,
//! which object, which system call), and every error maps to exactly one
//! gRPC code in [`Error::code`]; the gRPC adapter converts with that function
//! and nowhere else.

use std::io;

/// Result type of the snapshotter core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The gRPC status codes cowsnap answers with (a subset of gRPC's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The key, name or parent does not exist.
    NotFound,
    /// The key or name is already used by another snapshot.
    AlreadyExists,
    /// The request is well formed but not allowed in the current state
    /// (a parent with children, a commit of a view, ...).
    FailedPrecondition,
    /// The request itself is malformed (bad filter, label, field path, ...).
    InvalidArgument,
    /// The filesystem or a quota ran out of space.
    ResourceExhausted,
    /// The request asks for something cowsnap does not implement.
    Unimplemented,
    /// A failure of the filesystem, the metadata store or cowsnap itself.
    Internal,
    /// The daemon is shutting down or its state was found damaged.
    Unavailable,
}

/// An error of the snapshotter core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A snapshot, parent or object that the request names does not exist.
    #[error("{0}: not found")]
    NotFound(String),
    /// The key or name is taken.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The request is not allowed in the snapshot's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request asks for an unimplemented feature.
    #[error("{0}")]
    Unimplemented(String),
    /// The daemon cannot serve the request now.
    #[error("{0}")]
    Unavailable(String),
    /// A system call on the filesystem failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the object it was done to.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The metadata store failed.
    #[error("metadata: {context}: {source}")]
    Metadata {
        /// What was being done.
        context: String,
        /// The underlying redb error.
        #[source]
        source: Box<redb::Error>,
    },
    /// An invariant of cowsnap itself was broken (a bug or a damaged state).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// The one place where an error becomes a gRPC code.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
                _ => Code::Internal,
            },
            Error::Metadata { source, .. } => match source.as_ref() {
                redb::Error::Io(e) if is_space_error(e) => Code::ResourceExhausted,
                _ => Code::Internal,
            },
            Error::Internal(_) => Code::Internal,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Wraps a metadata store error with what was being done.
    pub fn meta(context: impl Into<String>, source: impl Into<redb::Error>) -> Self {
        Error::Metadata {
            context: context.into(),
            source: Box::new(source.into()),
        }
    }

    /// True when the error says an object is missing (ENOENT from the
    /// filesystem, or NotFound).
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::NotFound(_) => true,
            Error::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

fn is_space_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Adds context to results of system calls.
pub trait IoContext<T> {
    /// Wraps the error with a description of what was being done.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_errors_map_to_resource_exhausted() {
        let e = Error::io("write", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.code(), Code::ResourceExhausted);
        let e = Error::io("write", io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(e.code(), Code::ResourceExhausted);
        let e = Error::io("write", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.code(), Code::Internal);
    }

    #[test]
    fn enoent_is_not_found() {
        let e = Error::io("open", io::Error::from_raw_os_error(libc::ENOENT));
        assert!(e.is_not_found());
        assert!(Error::NotFound("k".into()).is_not_found());
        assert!(!Error::AlreadyExists("k".into()).is_not_found());
    }
}

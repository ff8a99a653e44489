//! What the library's errors have in common.
//!
//! Each part of the library has its own error type (`thiserror` enums: the caller can
//! tell what failed by matching, never by reading the message). By convention an error's
//! `Display` says what failed at its own level and leaves the cause to
//! [`std::error::Error::source`]; [`Chain`] prints the whole chain, and `anyhow`'s `{:#}`
//! (in the CLI) does the same.

use std::fmt;

/// A failure of the store (or of the findings outbox). Matched on by what failed; the
/// `Display` of each says what at its own level, the causes follow as `source`s.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (an I/O error underneath, or its log is damaged).
    #[error("database error")]
    Db(#[from] sled::Error),
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    /// The store cannot be used as it is: locked by another process, or of another
    /// format. The message says what to do.
    #[error("{0}")]
    Unusable(String),
    /// A request the store cannot serve as asked (a look-up on an undeclared index, a
    /// malformed index declaration, a batch beyond the store's limits).
    #[error("{0}")]
    Invalid(String),
    /// Stored bytes that do not decode, or that contradict each other: the store is
    /// damaged.
    #[error("{0}")]
    Corrupt(String),
    /// Long work stopped because the process is stopping (see `Store::interrupt_on`):
    /// nothing is wrong, and the work is done again from the start next time.
    #[error("{0}")]
    Interrupted(String),
    /// What was being done when a lower error happened.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<StoreError>,
    },
}

impl StoreError {
    /// Whether the request was at fault, not the store (a look-up on an undeclared index,
    /// say): the store itself is fine.
    pub fn is_invalid_request(&self) -> bool {
        match self {
            StoreError::Invalid(_) => true,
            StoreError::Context { source, .. } => source.is_invalid_request(),
            _ => false,
        }
    }

    /// Whether long work ended early because the process is stopping
    /// ([`StoreError::Interrupted`]): not a failure.
    pub fn is_interrupted(&self) -> bool {
        match self {
            StoreError::Interrupted(_) => true,
            StoreError::Context { source, .. } => source.is_interrupted(),
            _ => false,
        }
    }
}

/// `.context(...)` for results whose error becomes a [`StoreError`].
pub trait StoreContext<T> {
    fn context(self, what: impl Into<String>) -> Result<T, StoreError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T, E: Into<StoreError>> StoreContext<T> for Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Context { what: what.into(), source: Box::new(e.into()) })
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Context { what: what(), source: Box::new(e.into()) })
    }
}

/// Displays an error with its causes: `what failed: why: why that`.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot do the thing")]
        Io(#[source] std::io::Error),
        #[error("store failed")]
        Store(#[from] StoreError),
    }

    #[test]
    fn chain_shows_every_cause_once() {
        let e = Outer::Io(std::io::Error::other("disk on fire"));
        assert_eq!(Chain(&e).to_string(), "cannot do the thing: disk on fire");
        let store: Result<(), StoreError> = Err(StoreError::Corrupt("sled said no".into()));
        let e = Outer::from(store.context("cannot open the database").unwrap_err());
        assert_eq!(Chain(&e).to_string(), "store failed: cannot open the database: sled said no");
        assert_eq!(format!("{:#}", anyhow::Error::new(e)), "store failed: cannot open the database: sled said no");
    }
}

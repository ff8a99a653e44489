//! What the library's errors have in common.
//!
//! Each part of the library has its own error type (`thiserror` enums: the caller can
//! tell what failed by matching, never by reading the message). By convention an error's
//! `Display` says what failed at its own level and leaves the cause to
//! [`std::error::Error::source`]; [`Chain`] prints the whole chain, and `anyhow`'s `{:#}`
//! (in the CLI) does the same.

use std::fmt;

/// A failure of the database (or of the findings outbox).
///
/// `store/` and `findings.rs` still report their failures as `anyhow::Error`; this alias is
/// where they enter the typed errors of the rest of the library (each has a
/// `Store(#[from] StoreError)` variant, so a store failure is told apart by matching).
/// When they get an error type of their own, it replaces this alias.
pub type StoreError = anyhow::Error;

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
        #[error(transparent)]
        Store(#[from] StoreError),
    }

    #[test]
    fn chain_shows_every_cause_once() {
        let e = Outer::Io(std::io::Error::other("disk on fire"));
        assert_eq!(Chain(&e).to_string(), "cannot do the thing: disk on fire");
        let store = anyhow::anyhow!("sled said no").context("cannot open the database");
        let e = Outer::from(store);
        assert_eq!(Chain(&e).to_string(), "cannot open the database: sled said no");
        assert_eq!(format!("{:#}", anyhow::Error::new(e)), "cannot open the database: sled said no");
    }
}

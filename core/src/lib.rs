//! Lookout's engine. See ARCHITECTURE.md at the repository root for the map.

/// A [`error::StoreError::Corrupt`], written like `format!`: stored bytes that do not decode.
macro_rules! corrupt {
    ($($t:tt)*) => {
        $crate::error::StoreError::Corrupt(format!($($t)*))
    };
}

pub mod clock;
pub mod daemon;
pub mod detect;
pub mod disk;
pub mod error;
pub mod failpoint;
pub mod finding_json;
pub mod findings;
pub mod fingerprint;
pub mod gen;
pub mod ingest;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod parse;
pub mod plugin;
pub mod schema;
pub mod status;
pub mod store;
pub mod tail;

pub use store::Store;

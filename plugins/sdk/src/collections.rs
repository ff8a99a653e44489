//! Hash maps and sets for a detector's per-row bookkeeping.
//!
//! std's default hasher (SipHash-1-3) was a fifteenth of the instructions of a pass
//! that files each of a few hundred rows under its group and record ids: these hash
//! with foldhash instead, seeded at random once per process (so ids taken from the
//! telemetry cannot be chosen to collide), a few times faster on short keys.

/// A [`std::collections::HashMap`] with foldhash's seeded hasher; make one with
/// `HashMap::default()`.
pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;

/// A [`std::collections::HashSet`] with foldhash's seeded hasher; make one with
/// `HashSet::default()`.
pub type HashSet<K> = std::collections::HashSet<K, foldhash::quality::RandomState>;

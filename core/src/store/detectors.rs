//! What the scheduler keeps in the store for each detector — its cursor (the last batch
//! sequence it has seen), when to wake it, the parameters it last ran with — and the
//! identity of a row that finding ids are made of (a detector's own state is
//! `state.rs`'s). The scheduler (`detect.rs`) goes through these; only this module knows
//! their keys (the results tree and the outbox are `outbox.rs`'s).

use super::{keys, Result, Store};

/// A detector's persisted state: (key, value) pairs.
pub type DetectorState = Vec<(Vec<u8>, Vec<u8>)>;

pub(super) fn cursor_key(detector_id: &str) -> Vec<u8> {
    keys::named_key(keys::CURSOR, detector_id)
}

// Beside the cursors: `@` cannot start a detector id (`name@version`).
pub(super) fn wake_key(detector_id: &str) -> Vec<u8> {
    keys::named_key(keys::CURSOR, &format!("@wake:{detector_id}"))
}

// Beside the cursors, as the wake-up times are.
pub(super) fn params_key(detector_id: &str) -> Vec<u8> {
    keys::named_key(keys::CURSOR, &format!("@params:{detector_id}"))
}

impl Store {
    /// The parameters (as the scheduler wrote them) a detector's last completed pass ran
    /// with, if one has been recorded.
    pub fn detector_params(&self, detector_id: &str) -> Result<Option<String>> {
        Ok(match self.db.get(params_key(detector_id))? {
            Some(v) => {
                Some(String::from_utf8(v.to_vec()).map_err(|_| corrupt!("corrupt parameters of {detector_id}"))?)
            }
            None => None,
        })
    }

    /// When a detector asked to be run again whatever arrives (its last pass's
    /// `wake_at`), if it did.
    pub fn wake_at(&self, detector_id: &str) -> Result<Option<i64>> {
        Ok(match self.db.get(wake_key(detector_id))? {
            Some(v) => Some(i64::from_be_bytes(
                v.as_ref().try_into().map_err(|_| corrupt!("corrupt wake-up time of {detector_id}"))?,
            )),
            None => None,
        })
    }

    /// The batch sequence a detector has processed up to, if it ever ran.
    pub fn meta_cursor(&self, detector_id: &str) -> Result<Option<u64>> {
        Ok(match self.db.get(cursor_key(detector_id))? {
            Some(v) => Some(u64::from_be_bytes(
                v.as_ref().try_into().map_err(|_| corrupt!("corrupt cursor of {detector_id}"))?,
            )),
            None => None,
        })
    }

    /// The identity of a stored row that does not depend on this store: its key with the
    /// store's table number replaced by the table's name, so the same data gives the same
    /// finding ids in any data directory, whatever order the tables were first seen in.
    pub fn stable_identity(&self, key: &[u8]) -> Vec<u8> {
        if key.first() == Some(&keys::EVENT) && key.len() >= 3 {
            let table = u16::from_be_bytes([key[1], key[2]]);
            if let Some(name) = self.table_name(table) {
                let mut id = vec![keys::EVENT];
                id.extend_from_slice(&(name.len() as u16).to_be_bytes());
                id.extend_from_slice(name.as_bytes());
                id.extend_from_slice(&key[3..]);
                return id;
            }
        }
        key.to_vec()
    }
}

/// The SHA1 and DeviceId of an event row's key, borrowed (`None` for other keys).
pub fn row_key_sha1_device(key: &[u8]) -> Option<(&[u8], &[u8])> {
    keys::event_sha1_device(key)
}

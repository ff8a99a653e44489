//! Windowed state: what a detector keeps between passes about rows that can still change
//! a result, each with the time after which it no longer can (it has left every
//! `ago(x)` window the rule applies). The records are part of the detector's state: every
//! change goes through the [`Context`] and is committed atomically with the pass that
//! made it, and [`Records::load`] reads them back after a restart.
//!
//! Aggregates (counts, exact distinct sets, min/max, arg_max) are computed over the
//! records still inside the window at the pass's time, so they are exact by construction
//! and fall as records leave. [`Records::next_expiry`] is when the clock alone next
//! changes what is inside: hand it to [`Context::wake_at`] and the host runs a pass then,
//! with or without new rows.

use crate::collections::{HashMap, HashSet};
use crate::context::Context;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;

/// The layout of a stored record; bumped if [`Stored`] changes.
const RECORD_FORMAT: u8 = 1;

#[derive(Serialize, Deserialize)]
struct Stored<T> {
    expires: i64,
    value: T,
}

/// Records under one state-key prefix, by id (a row key, usually).
///
/// Hashed, not ordered, by id: ids are row keys that share long prefixes (table, SHA1,
/// DeviceId), and every row a pass keeps is looked up and filed, so ordered maps spent
/// a detector's time comparing those prefixes; the records of one ingestion time all
/// share an expiry, so the expiry order compared them too. Order is restored where it
/// is seen: [`Records::iter`] and [`Records::expire`] hand records out by id.
pub struct Records<T> {
    prefix: Vec<u8>,
    items: HashMap<Vec<u8>, (i64, T)>,
    /// The ids of each expiry.
    by_expiry: BTreeMap<i64, HashSet<Vec<u8>>>,
}

impl<T: Serialize + DeserializeOwned> Records<T> {
    /// The records stored under `prefix` in a detector's state (as handed to `init`).
    pub fn load(prefix: &[u8], state: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, String> {
        let mut r = Records { prefix: prefix.to_vec(), items: HashMap::default(), by_expiry: BTreeMap::new() };
        for (k, v) in state.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let id = k[prefix.len()..].to_vec();
            let stored: Stored<T> = match v.split_first() {
                Some((&RECORD_FORMAT, body)) => {
                    bincode::serde::decode_from_slice(body, bincode::config::standard())
                        .map_err(|e| format!("corrupt windowed record {id:02x?}: {e}"))?
                        .0
                }
                _ => return Err(format!("windowed record {id:02x?} has an unknown format")),
            };
            r.by_expiry.entry(stored.expires).or_default().insert(id.clone());
            r.items.insert(id, (stored.expires, stored.value));
        }
        Ok(r)
    }

    /// Keeps a record until `expires` (it leaves once the pass time is past it). `false`
    /// (and nothing written) when a record with this id is already kept: a row handed
    /// again (a pass retried after a crash, a backfill) changes nothing.
    pub fn insert(&mut self, ctx: &mut Context<'_>, id: Vec<u8>, expires: i64, value: T) -> Result<bool, String> {
        if self.items.contains_key(&id) {
            return Ok(false);
        }
        self.put(ctx, id, expires, value)?;
        Ok(true)
    }

    /// Keeps `value` under `id` until `expires`, replacing the record kept there (value and
    /// expiry) if there is one: a record that gathers rows as they come.
    pub fn put(&mut self, ctx: &mut Context<'_>, id: Vec<u8>, expires: i64, value: T) -> Result<(), String> {
        ctx.state_put([self.prefix.as_slice(), &id].concat(), Self::stored_bytes(expires, &value)?);
        if let Some((old, _)) = self.items.get(&id) {
            if let Some(ids) = self.by_expiry.get_mut(old) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_expiry.remove(old);
                }
            }
        }
        self.by_expiry.entry(expires).or_default().insert(id.clone());
        self.items.insert(id, (expires, value));
        Ok(())
    }

    /// The state value a record is kept as (what [`Records::load`] reads back): for a
    /// detector's tests of a state layout.
    pub fn stored_bytes(expires: i64, value: &T) -> Result<Vec<u8>, String> {
        // Encoded into a buffer kept between records, then copied out at its size: encoding
        // straight into a new vector grew it several times over for every record.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            scratch.push(RECORD_FORMAT);
            bincode::serde::encode_into_std_write(
                Stored { expires, value },
                &mut *scratch,
                bincode::config::standard(),
            )
            .map_err(|e| format!("cannot encode a windowed record: {e}"))?;
            Ok(scratch.to_vec())
        })
    }

    /// Drops (from memory and, with the pass, from the state) every record whose expiry
    /// is before `now`, and returns them.
    pub fn expire(&mut self, ctx: &mut Context<'_>, now: i64) -> Vec<(Vec<u8>, T)> {
        let mut gone = Vec::new();
        while let Some(first) = self.by_expiry.first_entry() {
            if *first.key() >= now {
                break;
            }
            let mut ids: Vec<Vec<u8>> = first.remove().into_iter().collect();
            ids.sort_unstable();
            for id in ids {
                if let Some((_, value)) = self.items.remove(&id) {
                    ctx.state_delete([self.prefix.as_slice(), &id].concat());
                    gone.push((id, value));
                }
            }
        }
        gone
    }

    /// The first time at which a record leaves (its expiry + 1 tick), if any is kept.
    pub fn next_expiry(&self) -> Option<i64> {
        self.by_expiry.keys().next().map(|e| e.saturating_add(1))
    }

    pub fn get(&self, id: &[u8]) -> Option<&T> {
        self.items.get(id).map(|(_, v)| v)
    }

    pub fn contains(&self, id: &[u8]) -> bool {
        self.items.contains_key(id)
    }

    /// Every record kept, by id (sorted here: for loading and re-keeping, not for each
    /// row of a pass).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &T)> {
        let mut all: Vec<(&[u8], &T)> = self.items.iter().map(|(k, (_, v))| (k.as_slice(), v)).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The id of a finding that is not a pair of rows but a tuple of values (SEMANTICS: a
/// rule's finding identity, such as (SHA1, DeviceId)): hand it as the finding's only
/// input. Length-prefixed, so ("ab", "c") and ("a", "bc") differ, and marked so it can
/// never be read as a row key.
pub fn identity_key(parts: &[&str]) -> Vec<u8> {
    let mut out = vec![0xff, b'i'];
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::StateOp;

    fn state_of(ctx: &Context<'_>, mut base: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
        for op in &ctx.state {
            match op {
                StateOp::Put(k, v) => {
                    base.retain(|(x, _)| x != k);
                    base.push((k.clone(), v.clone()));
                }
                StateOp::Delete(k) => base.retain(|(x, _)| x != k),
            }
        }
        base
    }

    #[test]
    fn records_expire_in_order_and_survive_a_reload() {
        let mut ctx = Context::new(None, 0);
        let mut r: Records<(String, i64)> = Records::load(b"n", &[]).unwrap();
        assert!(r.insert(&mut ctx, b"k1".to_vec(), 100, ("a".into(), 1)).unwrap());
        assert!(r.insert(&mut ctx, b"k2".to_vec(), 50, ("b".into(), 2)).unwrap());
        assert!(!r.insert(&mut ctx, b"k2".to_vec(), 50, ("b".into(), 2)).unwrap(), "same id twice");
        assert_eq!(r.next_expiry(), Some(51));
        assert!(r.expire(&mut ctx, 50).is_empty(), "a record at its expiry is still in");
        let gone = r.expire(&mut ctx, 51);
        assert_eq!(gone, vec![(b"k2".to_vec(), ("b".to_string(), 2))]);
        assert_eq!(r.next_expiry(), Some(101));
        let state = state_of(&ctx, vec![(b"other".to_vec(), vec![1])]);
        let again: Records<(String, i64)> = Records::load(b"n", &state).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again.get(b"k1"), Some(&("a".to_string(), 1)));
        assert_eq!(again.next_expiry(), Some(101));
        assert!(Records::<i64>::load(b"o", &[(b"ox".to_vec(), vec![9, 9])]).is_err());
    }

    #[test]
    fn a_record_put_again_replaces_its_value_and_expiry() {
        let mut ctx = Context::new(None, 0);
        let mut r: Records<Vec<u8>> = Records::load(b"p", &[]).unwrap();
        r.put(&mut ctx, b"k".to_vec(), 10, vec![1]).unwrap();
        r.put(&mut ctx, b"k".to_vec(), 30, vec![1, 2]).unwrap();
        assert_eq!((r.len(), r.get(b"k")), (1, Some(&vec![1, 2])));
        assert_eq!(r.next_expiry(), Some(31), "the first expiry is gone");
        assert!(r.expire(&mut ctx, 20).is_empty());
        let again: Records<Vec<u8>> = Records::load(b"p", &state_of(&ctx, vec![])).unwrap();
        assert_eq!((again.get(b"k"), again.next_expiry()), (Some(&vec![1, 2]), Some(31)));
    }

    #[test]
    fn identity_keys_are_unambiguous() {
        assert_ne!(identity_key(&["ab", "c"]), identity_key(&["a", "bc"]));
        assert_ne!(identity_key(&["x"]), identity_key(&["x", ""]));
        assert_eq!(identity_key(&[])[0], 0xff);
    }
}

//! The store's side of the state dir: a full snapshot ([`Persisted`]) and the journal
//! of changes since ([`JournalEntry`]), and [`replay`] of one onto the other.

use super::{Store, meta_str};
use crate::kube::registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Serialize, Deserialize, Default)]
pub struct Persisted {
    rv: u64,
    objects: Vec<(String, Value)>,
    tokens: BTreeMap<String, (String, String)>,
    /// The last journal entry this snapshot includes (entries up to it are skipped on replay).
    #[serde(default)]
    pub seq: u64,
}

/// The changes since the last write to the state dir: the current version of every
/// object written since (`None`: deleted), and the tokens when they changed.
#[derive(Serialize, Deserialize, Default)]
pub struct JournalEntry {
    pub seq: u64,
    pub(super) rv: u64,
    pub(super) objects: Vec<(String, String, String, Option<Value>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) tokens: Option<BTreeMap<String, (String, String)>>,
}

/// Replays journal entries onto a snapshot (those after its `seq`, in order).
pub fn replay(snapshot: &[u8], entries: &[JournalEntry]) -> Result<Vec<u8>, String> {
    let mut p: Persisted = if snapshot.is_empty() {
        Persisted::default()
    } else {
        serde_json::from_slice(snapshot).map_err(|e| e.to_string())?
    };
    let mut objects: BTreeMap<(String, String, String), Value> = std::mem::take(&mut p.objects)
        .into_iter()
        .map(|(storage, o)| {
            let k = (
                storage,
                meta_str(&o, "namespace").to_string(),
                meta_str(&o, "name").to_string(),
            );
            (k, o)
        })
        .collect();
    let after = p.seq;
    for e in entries.iter().filter(|e| e.seq > after) {
        p.seq = e.seq;
        p.rv = p.rv.max(e.rv);
        for (storage, ns, name, obj) in &e.objects {
            let k = (storage.clone(), ns.clone(), name.clone());
            match obj {
                Some(o) => objects.insert(k, o.clone()),
                None => objects.remove(&k),
            };
        }
        if let Some(t) = &e.tokens {
            p.tokens = t.clone();
        }
    }
    p.objects = objects.into_iter().map(|((storage, _, _), o)| (storage, o)).collect();
    serde_json::to_vec(&p).map_err(|e| e.to_string())
}

impl Store {
    /// Serialized state for the state dir.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.persisted(0)).unwrap_or_default()
    }

    /// A copy of the whole state (O(objects): for compaction and shutdown, not per write),
    /// marked as including journal entries up to `seq`; clears the pending changes.
    pub fn take_all(&mut self, seq: u64) -> Persisted {
        self.dirty = false;
        self.written.clear();
        self.tokens_changed = false;
        self.persisted(seq)
    }

    fn persisted(&self, seq: u64) -> Persisted {
        Persisted {
            rv: self.rv,
            objects: self
                .objects
                .iter()
                .flat_map(|(s, m)| m.values().map(move |o| (s.clone(), o.clone())))
                .collect(),
            tokens: self.tokens.clone(),
            seq,
        }
    }

    /// The changes since the last call (O(objects written)), as journal entry `seq`;
    /// `None` when nothing changed.
    pub fn take_changes(&mut self, seq: u64) -> Option<JournalEntry> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let objects = std::mem::take(&mut self.written)
            .into_iter()
            .map(|(storage, ns, name)| {
                let obj = self
                    .objects
                    .get(&storage)
                    .and_then(|m| m.get(&(ns.clone(), name.clone())))
                    .cloned();
                (storage, ns, name, obj)
            })
            .collect();
        let tokens = std::mem::take(&mut self.tokens_changed).then(|| self.tokens.clone());
        Some(JournalEntry {
            seq,
            rv: self.rv,
            objects,
            tokens,
        })
    }

    /// Restores a snapshot; watches may resume only from its resourceVersion on.
    /// Loads a snapshot (or a replay's result); returns the last journal entry it includes.
    pub fn restore(&mut self, data: &[u8]) -> Result<u64, String> {
        let p: Persisted = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        self.rv = p.rv;
        self.oldest_rv = p.rv;
        self.tokens = p.tokens;
        for (storage, obj) in p.objects {
            let key = (
                meta_str(&obj, "namespace").to_string(),
                meta_str(&obj, "name").to_string(),
            );
            if storage == "apiextensions.k8s.io/customresourcedefinitions"
                && let Ok(types) = registry::from_crd(&obj)
            {
                self.register(types);
            }
            self.objects.entry(storage).or_default().insert(key, obj);
        }
        Ok(p.seq)
    }
}

//! What the service controller remembers of each Service's LB (`LbCache`), so that most
//! lookups ([`super::lookup`]) are one GET by ID.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::platform::LoadBalancer;
use crate::service::diff::index_by_uid;

/// What the controller remembers of each Service's LB, by Service UID.
#[derive(Default)]
pub(crate) struct LbCache {
    /// The LB last found or created for each Service UID: the next lookup is one GET by
    /// ID instead of label-filtered lists (polling a pending LB took ~5.7 lookups per LB).
    lb_ids: Mutex<HashMap<String, KnownLb>>,
    /// Set once a list of all our LBs has been learnt ([`LbCache::learn_lbs`]): from then
    /// on a UID missing from `lb_ids` has no LB (every LB since is one we created, and a
    /// create that meets one of a previous incarnation gets a 409), so applying a new
    /// Service skips the lookup by UID label. Cleanup never skips it.
    lbs_learnt: AtomicBool,
    /// UIDs carried by several of our LBs in the last full list: always looked up by label.
    ambiguous_uids: Mutex<HashSet<String>>,
    /// UIDs whose create failed in a way that may have created the LB anyway (a timeout,
    /// a 5xx): looked up by label until a lookup answers. Without it, a create retried
    /// under another name (the name annotation changed meanwhile) would make a second LB.
    unsure_uids: Mutex<HashSet<String>>,
    /// The name of the LB whose deletion we started, per Service UID, until the cleanup
    /// is done: when it was the Service's desired name, no other LB of the Service can
    /// carry that name (names are unique), so the lookup by name is not needed to confirm.
    deleting_names: Mutex<HashMap<String, String>>,
}

/// What [`Context`](super::context::Context) remembers of a Service's LB.
#[derive(Debug, Clone)]
pub(crate) struct KnownLb {
    pub id: String,
    /// Its name, as created or last seen (names are unique: see [`find_lb`](super::lookup::find_lb)).
    pub name: String,
    /// When we created it or asked for its deletion, until it is seen settled.
    pub transition_since: Option<Instant>,
    /// Deleting (asked by us, or seen so): looked at by GET, never deleted again.
    pub deleting: bool,
    /// Carries the Service's UID label (one adopted by name may not yet): only then can
    /// the lookup by label stand in for a GET by ID.
    pub labelled: bool,
    /// The next look is the lookup by UID label, not a GET by ID: set when we ask for
    /// the deletion of a labelled LB (see [`find_lb_by_uid`](super::lookup::find_lb_by_uid)).
    pub look_by_label: bool,
}

impl KnownLb {
    pub fn new(id: &str, name: &str, labelled: bool) -> Self {
        KnownLb {
            id: id.to_owned(),
            name: name.to_owned(),
            transition_since: None,
            deleting: false,
            labelled,
            look_by_label: false,
        }
    }
}

impl LbCache {
    pub(crate) fn deleting_names(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.deleting_names.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lb_ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, KnownLb>> {
        self.lb_ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns our LBs from a list of all of them (the orphan sweep's). An entry already
    /// known is kept: it may be newer than the list; a stale one costs one GET (404)
    /// and a lookup by label.
    pub fn learn_lbs(&self, cluster_id: &str, lbs: &[LoadBalancer]) {
        let (unique, ambiguous) = index_by_uid(cluster_id, lbs);
        let names: HashMap<&str, &str> = lbs.iter().map(|lb| (lb.id.as_str(), lb.name.as_str())).collect();
        {
            let mut ids = self.lb_ids();
            for (uid, id) in unique {
                let name = names.get(id.as_str()).copied().unwrap_or_default();
                ids.entry(uid).or_insert_with(|| KnownLb::new(&id, name, true));
            }
            for uid in &ambiguous {
                ids.remove(uid);
            }
        }
        *self.ambiguous_uids() = ambiguous;
        self.lbs_learnt.store(true, Ordering::Release);
    }

    /// Whether a Service UID not in `lb_ids` is known to have no LB.
    pub(crate) fn known_without_lb(&self, uid: &str) -> bool {
        self.lbs_learnt.load(Ordering::Acquire)
            && !self.ambiguous_uids().contains(uid)
            && !self.unsure_uids().contains(uid)
    }

    pub(crate) fn ambiguous_uids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.ambiguous_uids.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn unsure_uids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.unsure_uids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers `lb` as the Service's LB, keeping a running transition's start;
    /// `labelled`: it carries the Service's UID label (found by it).
    pub(crate) fn remember_lb(&self, uid: &str, lb: &LoadBalancer, labelled: bool) {
        let mut ids = self.lb_ids();
        if let Some(known) = ids.get_mut(uid).filter(|known| known.id == lb.id) {
            known.name.clone_from(&lb.name);
            known.labelled = labelled;
        } else {
            ids.insert(uid.to_owned(), KnownLb::new(&lb.id, &lb.name, labelled));
        }
    }

    /// Notes that we just created the Service's LB `lb` (with its UID label).
    pub(crate) fn transition_started(&self, uid: &str, lb: &LoadBalancer) {
        let mut known = KnownLb::new(&lb.id, &lb.name, true);
        known.transition_since = Some(Instant::now());
        self.lb_ids().insert(uid.to_owned(), known);
        self.deleting_names().remove(uid);
    }

    /// Notes that the Service's LB `id` (named `name`) is being deleted: by us just now
    /// (`by_us`, the looks start soon), or seen so (the looks keep their pace).
    pub(crate) fn deletion_started(&self, uid: &str, id: &str, name: &str, by_us: bool) {
        let mut ids = self.lb_ids();
        if ids.get(uid).is_none_or(|known| known.id != id) {
            // Seen by name or by a look that did not remember it: its labels are not known.
            ids.insert(uid.to_owned(), KnownLb::new(id, name, false));
        }
        if let Some(known) = ids.get_mut(uid) {
            if by_us {
                known.transition_since = Some(Instant::now());
                known.look_by_label = known.labelled;
            }
            known.deleting = true;
        }
        drop(ids);
        // The name goes with it: no other LB can carry it meanwhile (see `find_lb`).
        self.deleting_names().insert(uid.to_owned(), name.to_owned());
    }

    /// The Service's LB we know and have not seen deleting: its ID and name.
    pub(crate) fn known_staying(&self, uid: &str) -> Option<(String, String)> {
        self.lb_ids()
            .get(uid)
            .filter(|k| !k.deleting)
            .map(|k| (k.id.clone(), k.name.clone()))
    }

    /// Notes that the Service's LB is settled (active, nothing pending).
    pub(crate) fn transition_finished(&self, uid: &str) {
        if let Some(known) = self.lb_ids().get_mut(uid) {
            known.transition_since = None;
        }
    }
}

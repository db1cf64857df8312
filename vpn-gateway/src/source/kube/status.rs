//! The statuses written back: what a peer's or policy's report becomes, and the writer
//! that patches them while this replica leads.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Patch, PatchParams};
use tokio::sync::watch;

use crate::crd::{CONDITION_ACCEPTED, Condition, VpnAccessPolicy, VpnAccessPolicyStatus, VpnPeer, VpnPeerStatus};
use crate::peers::PeerId;
use crate::policy::{PolicyId, PolicyReport};
use crate::source::{GatewayReport, PeerReport};

/// How often changed statuses are written.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// The field manager of our status writes.
const MANAGER: &str = "kuberaya-gateway";

/// The status to write for a policy's report; the transition time is kept while the
/// condition's status stays.
pub fn policy_status_for(
    previous: Option<&VpnAccessPolicyStatus>,
    r: &PolicyReport,
    now: Timestamp,
) -> VpnAccessPolicyStatus {
    let (status, reason, message) = match &r.outcome {
        Ok(()) => {
            let mut m = format!("grants to {} peer(s)", r.matched_peers);
            if let Some(note) = &r.note {
                m.push_str("; ");
                m.push_str(note);
            }
            ("True", "Accepted".to_string(), m)
        }
        Err(e) => ("False", e.reason().to_string(), e.to_string()),
    };
    VpnAccessPolicyStatus {
        conditions: vec![accepted_condition(
            previous.map(|p| &p.conditions[..]),
            status,
            reason,
            message,
            now,
        )],
        matched_peers: r.matched_peers,
        observed_generation: r.generation,
    }
}

/// The `Accepted` condition, keeping the previous one's transition time while its status
/// stays the same (one rule for peers and policies).
fn accepted_condition(
    previous: Option<&[Condition]>,
    status: &str,
    reason: String,
    message: String,
    now: Timestamp,
) -> Condition {
    let last_transition_time = match previous.into_iter().flatten().find(|c| c.type_ == CONDITION_ACCEPTED) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: CONDITION_ACCEPTED.to_string(),
        status: status.to_string(),
        reason,
        message,
        last_transition_time,
    }
}

/// The status to write for a report, keeping the condition's transition time when its
/// status did not change. A peer not served (disabled, expired, rejected) has no
/// `address`: only `lastAddress`, kept to give it back.
pub fn status_for(previous: Option<&VpnPeerStatus>, r: &PeerReport, now: Timestamp) -> VpnPeerStatus {
    let (status, reason, message) = match &r.outcome {
        Ok(a) => match r.address_v6 {
            Some(v6) => ("True", "Accepted".to_string(), format!("serving at {a} and {v6}")),
            None => ("True", "Accepted".to_string(), format!("serving at {a}")),
        },
        Err(e) => ("False", e.reason().to_string(), e.to_string()),
    };
    VpnPeerStatus {
        conditions: vec![accepted_condition(
            previous.map(|p| &p.conditions[..]),
            status,
            reason,
            message,
            now,
        )],
        address: r.outcome.as_ref().ok().map(|a| a.to_string()),
        last_address: r.last_address.map(|a| a.to_string()),
        address_v6: r.outcome.as_ref().ok().and(r.address_v6).map(|a| a.to_string()),
        last_address_v6: r.last_address_v6.map(|a| a.to_string()),
        last_handshake: r
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .and_then(|d| Timestamp::from_second(d.as_secs() as i64).ok())
            .map(Time)
            .or_else(|| previous.and_then(|p| p.last_handshake.clone())),
        rx_bytes: r.rx_bytes,
        tx_bytes: r.tx_bytes,
        observed_generation: r.generation,
    }
}

/// Write statuses until the report channel closes: a peer's acceptance (condition,
/// address, generation) as soon as the gateway reports it changed, and its counters (last
/// handshake, bytes) at most every `every`; a policy's condition and matched peers as soon
/// as they change.
/// Writes the gateway's reports as status while this replica leads (`leading`); a replica
/// that does not lead writes nothing, and forgets what it wrote, so that when it leads
/// again it writes every status afresh.
pub async fn write_status(
    client: Client,
    mut reports: watch::Receiver<GatewayReport>,
    every: Duration,
    mut leading: watch::Receiver<bool>,
) {
    // What was written, as hashes and the few fields the next status carries over: the
    // whole status was ~400 bytes a peer.
    let mut written: HashMap<PeerId, Written> = HashMap::new();
    // Policies are few and small: their uid and last written status, whole.
    let mut policies_written: HashMap<PolicyId, (Option<String>, VpnAccessPolicyStatus)> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut election_open = true;
    loop {
        let counters = tokio::select! {
            r = leading.changed(), if election_open => {
                // A replica alone (no election) keeps leading.
                election_open = r.is_ok();
                false
            }
            _ = tick.tick() => {
                if reports.has_changed().is_err() {
                    return;
                }
                true
            }
            r = reports.changed() => {
                if r.is_err() {
                    return;
                }
                false
            }
        };
        if !*leading.borrow() {
            // Seen, not written.
            drop(reports.borrow_and_update());
            written.clear();
            policies_written.clear();
            continue;
        }
        let report = reports.borrow_and_update().clone();
        let now = Timestamp::now();
        for r in &report.peers {
            // Lost the Lease while writing: the new leader writes from here on.
            if !*leading.borrow() {
                break;
            }
            let prev = written.get(&r.id);
            let status = status_for(prev.map(Written::previous).as_ref(), r, now);
            let new = Written::of(&status);
            if !status_due(prev, &new, counters) {
                continue;
            }
            match patch_status(&client, &r.id, &status).await {
                Ok(()) => {
                    written.insert(r.id.clone(), new);
                }
                // Deleted since the report: nothing to write.
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    tracing::debug!(peer = %r.id, "VpnPeer gone before its status was written");
                    written.remove(&r.id);
                }
                Err(e) => tracing::warn!(peer = %r.id, error = %e, "writing VpnPeer status"),
            }
        }
        let current: std::collections::HashSet<&PeerId> = report.peers.iter().map(|r| &r.id).collect();
        written.retain(|id, _| current.contains(id));
        for r in &report.policies {
            // What was written to this object (not to an older one of the same name).
            let prev = policies_written
                .get(&r.id)
                .filter(|(uid, _)| *uid == r.uid)
                .map(|(_, s)| s);
            let status = policy_status_for(prev, r, now);
            // Only when something but the time changed.
            if prev.is_some_and(|p| *p == status) {
                continue;
            }
            match patch_policy_status(&client, &r.id, &status).await {
                Ok(()) => {
                    policies_written.insert(r.id.clone(), (r.uid.clone(), status));
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    policies_written.remove(&r.id);
                }
                Err(e) => tracing::warn!(policy = %r.id, error = %e, "writing VpnAccessPolicy status"),
            }
        }
        let current: std::collections::HashSet<&PolicyId> = report.policies.iter().map(|r| &r.id).collect();
        policies_written.retain(|id, _| current.contains(id));
    }
}

/// `PATCH` a `VpnAccessPolicy`'s status (merge; the response is not parsed).
async fn patch_policy_status(client: &Client, id: &PolicyId, status: &VpnAccessPolicyStatus) -> kube::Result<()> {
    use kube::Resource;
    let url = VpnAccessPolicy::url_path(&(), Some(&id.namespace));
    let patch = serde_json::json!({ "status": status });
    let req = kube::core::Request::new(url)
        .patch_subresource("status", &id.name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(req).await.map(drop)
}

/// `PATCH` a `VpnPeer`'s status. The response (the whole object) is read but not parsed:
/// 10,000 of them parsed into `VpnPeer`s were a peak of allocations for nothing.
async fn patch_status(client: &Client, id: &PeerId, status: &VpnPeerStatus) -> kube::Result<()> {
    use kube::Resource;
    let url = VpnPeer::url_path(&(), Some(&id.namespace));
    let patch = status_patch(status);
    let req = kube::core::Request::new(url)
        .patch_subresource("status", &id.name, &PatchParams::apply(MANAGER), &Patch::Merge(&patch))
        .map_err(kube::Error::BuildRequest)?;
    client.request_text(req).await.map(drop)
}

/// The merge patch of a status: an absent `address` is written as `null`, since a merge
/// patch leaves out fields alone, and an expired or disabled peer kept showing the address
/// it no longer has.
fn status_patch(status: &VpnPeerStatus) -> serde_json::Value {
    let mut s = serde_json::to_value(status).unwrap_or_default();
    if let Some(m) = s.as_object_mut() {
        if status.address.is_none() {
            m.insert("address".to_string(), serde_json::Value::Null);
        }
        if status.address_v6.is_none() {
            m.insert("addressV6".to_string(), serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": s })
}

/// A hash of `value`'s JSON, without building the JSON.
fn json_hash(value: &impl serde::Serialize) -> u64 {
    use std::hash::Hasher;
    struct HashWriter(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for HashWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = HashWriter(Default::default());
    // Serialising plain data into a writer that cannot fail does not fail.
    let _ = serde_json::to_writer(&mut w, value);
    w.0.finish()
}

/// What the status writer keeps of a status it wrote.
#[derive(Clone, Debug, PartialEq)]
struct Written {
    /// Condition, address and observed generation: written at once when they change.
    acceptance: u64,
    /// Everything, counters included.
    whole: u64,
    /// Carried over to the next status.
    accepted: String,
    last_transition_time: Time,
    last_handshake: Option<Time>,
}

impl Written {
    fn of(s: &VpnPeerStatus) -> Self {
        let cond = s.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED);
        Written {
            acceptance: json_hash(&(&s.conditions, &s.address, &s.address_v6, &s.observed_generation)),
            whole: json_hash(s),
            accepted: cond.map(|c| c.status.clone()).unwrap_or_default(),
            last_transition_time: cond
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(Timestamp::UNIX_EPOCH)),
            last_handshake: s.last_handshake.clone(),
        }
    }

    /// As much of the written status as [`status_for`] reads.
    fn previous(&self) -> VpnPeerStatus {
        VpnPeerStatus {
            conditions: vec![Condition {
                type_: CONDITION_ACCEPTED.to_string(),
                status: self.accepted.clone(),
                reason: String::new(),
                message: String::new(),
                last_transition_time: self.last_transition_time.clone(),
            }],
            last_handshake: self.last_handshake.clone(),
            ..Default::default()
        }
    }
}

/// Whether `new` must be written over `prev`: always when the peer's acceptance changed,
/// and for counters only when `counters` (the status interval came round).
fn status_due(prev: Option<&Written>, new: &Written, counters: bool) -> bool {
    let Some(prev) = prev else { return true };
    if prev.whole == new.whole {
        return false;
    }
    counters || prev.acceptance != new.acceptance
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::Rejection;
    use crate::source::kube::convert::{peer_from_k8s, policy_from_k8s, trim_peer, trim_policy};
    use std::net::Ipv4Addr;

    #[test]
    fn the_ipv6_address_round_trips_through_the_status() {
        let v6: std::net::Ipv6Addr = "fd6b:7261:7961::7".parse().unwrap();
        let served = PeerReport {
            id: PeerId::new("team", "alice"),
            generation: Some(2),
            outcome: Ok(Ipv4Addr::new(100, 64, 0, 7)),
            last_address: Some(Ipv4Addr::new(100, 64, 0, 7)),
            address_v6: Some(v6),
            last_address_v6: Some(v6),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        };
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let s = status_for(None, &served, t0);
        assert_eq!(s.address_v6.as_deref(), Some("fd6b:7261:7961::7"));
        assert_eq!(s.last_address_v6.as_deref(), Some("fd6b:7261:7961::7"));
        assert_eq!(s.conditions[0].message, "serving at 100.64.0.7 and fd6b:7261:7961::7");
        let mut p: VpnPeer = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
            "metadata": {"name": "alice", "namespace": "team", "generation": 2},
            "spec": {"publicKey": "k", "addressV6": "fd6b:7261:7961::7"}
        }))
        .unwrap();
        assert_eq!(p.spec.address_v6.as_deref(), Some("fd6b:7261:7961::7"));
        p.status = Some(s);
        trim_peer(&mut p);
        let i = peer_from_k8s(&p).unwrap();
        assert_eq!(i.granted.address_v6, Some(v6));
        assert_eq!(i.previous_address_v6, Some(v6));
        // Cut off: no address in use, both written as null; the last one kept to give back.
        let off = PeerReport {
            outcome: Err(Rejection::Disabled),
            ..served
        };
        let s = status_for(None, &off, t0);
        assert_eq!(
            (s.address_v6.as_deref(), s.last_address_v6.as_deref()),
            (None, Some("fd6b:7261:7961::7"))
        );
        let patch = status_patch(&s);
        assert_eq!(patch["status"]["addressV6"], serde_json::Value::Null);
        assert_eq!(patch["status"]["lastAddressV6"], "fd6b:7261:7961::7");
        p.status = Some(s);
        let i = peer_from_k8s(&p).unwrap();
        assert_eq!(i.granted.address_v6, None);
        assert_eq!(i.previous_address_v6, Some(v6));
    }

    #[test]
    fn policies_convert_and_report_their_status() {
        use crate::policy::PolicyRejection;
        let mut p: VpnAccessPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnAccessPolicy",
            "metadata": {"name": "db", "namespace": "team", "generation": 2, "uid": "u-9",
                         "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"peerSelector": {"matchLabels": {"role": "dba"}}, "allow": [{"service": "pg"}]},
            "status": {"matchedPeers": 3, "conditions": []}
        }))
        .unwrap();
        trim_policy(&mut p);
        assert!(p.status.is_none() && p.metadata.managed_fields.is_none());
        let i = policy_from_k8s(&p).unwrap();
        assert_eq!(
            (i.id.to_string(), i.generation, i.uid.as_deref()),
            ("team/db".to_string(), Some(2), Some("u-9"))
        );
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut r = PolicyReport {
            id: i.id.clone(),
            uid: None,
            generation: Some(2),
            outcome: Ok(()),
            matched_peers: 2,
            note: None,
        };
        let s0 = policy_status_for(None, &r, t0);
        assert_eq!(
            (
                s0.conditions[0].status.as_str(),
                s0.matched_peers,
                s0.observed_generation
            ),
            ("True", 2, Some(2))
        );
        assert_eq!(policy_status_for(Some(&s0), &r, t1), s0, "unchanged: nothing to write");
        r.outcome = Err(PolicyRejection::Expired("2026-01-01T00:00:30Z".into()));
        r.matched_peers = 0;
        let s1 = policy_status_for(Some(&s0), &r, t1);
        let c = &s1.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Expired"));
        assert_eq!(c.last_transition_time, Time(t1));
        assert_eq!(s1.matched_peers, 0);
    }

    #[test]
    fn status_keeps_transition_time_until_the_condition_flips() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut r = PeerReport {
            rx_bytes: 10,
            tx_bytes: 20,
            ..served_at(Ipv4Addr::new(100, 64, 0, 2))
        };
        let s0 = status_for(None, &r, t0);
        assert_eq!(s0.conditions[0].status, "True");
        assert_eq!(s0.address.as_deref(), Some("100.64.0.2"));
        let s1 = status_for(Some(&s0), &r, t1);
        assert_eq!(s1.conditions[0].last_transition_time, Time(t0));
        r.outcome = Err(Rejection::Disabled);
        let s2 = status_for(Some(&s1), &r, t1);
        assert_eq!(s2.conditions[0].status, "False");
        assert_eq!(s2.conditions[0].reason, "Disabled");
        assert_eq!(s2.conditions[0].last_transition_time, Time(t1));
        assert_eq!(s2.address, None);
    }

    #[test]
    fn an_expired_peer_says_so_and_has_no_address_in_use() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:10:00Z".parse().unwrap();
        let served = PeerReport {
            last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)),
            rx_bytes: 5,
            tx_bytes: 6,
            ..served_at(Ipv4Addr::new(100, 64, 0, 7))
        };
        let s0 = status_for(None, &served, t0);
        let expired = PeerReport {
            outcome: Err(Rejection::Expired("2026-01-01T00:09:00Z".into())),
            last_handshake: None,
            ..served.clone()
        };
        let s1 = status_for(Some(&s0), &expired, t1);
        let c = &s1.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Expired"));
        assert!(c.message.contains("2026-01-01T00:09:00Z"), "{}", c.message);
        assert_eq!(c.last_transition_time, Time(t1));
        assert_eq!(s1.address, None, "no address in use");
        assert_eq!(s1.last_address.as_deref(), Some("100.64.0.7"), "kept to give it back");
        assert_eq!(s1.last_handshake, s0.last_handshake, "the last handshake stays history");
        // The patch clears the address the object still has; the last one is written.
        let patch = status_patch(&s1);
        assert_eq!(patch["status"]["address"], serde_json::Value::Null);
        assert_eq!(patch["status"]["lastAddress"], "100.64.0.7");
        assert_eq!(patch["status"]["conditions"][0]["reason"], "Expired");
        let mut object = serde_json::json!({"status": serde_json::to_value(&s0).unwrap()});
        json_merge(&mut object, &patch);
        let after: VpnPeerStatus = serde_json::from_value(object["status"].clone()).unwrap();
        assert_eq!(after.address, None);
        assert_eq!(after.conditions, s1.conditions);
        // A served peer's patch carries its address.
        assert_eq!(status_patch(&s0)["status"]["address"], "100.64.0.7");
        // Disabled and other rejections alike.
        for r in [Rejection::Disabled, Rejection::BadKey("x".into())] {
            let s = status_for(
                Some(&s0),
                &PeerReport {
                    outcome: Err(r),
                    ..served.clone()
                },
                t1,
            );
            assert_eq!((s.address, s.last_address.as_deref()), (None, Some("100.64.0.7")));
        }
    }

    /// Peer `a/b` at generation 1, accepted at `address` and last given it; no handshake,
    /// no traffic, no IPv6.
    fn served_at(address: Ipv4Addr) -> PeerReport {
        PeerReport {
            id: PeerId::new("a", "b"),
            generation: Some(1),
            outcome: Ok(address),
            last_address: Some(address),
            address_v6: None,
            last_address_v6: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    #[test]
    fn acceptance_is_written_at_once_counters_at_the_interval() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut r = PeerReport {
            rx_bytes: 0,
            tx_bytes: 0,
            ..served_at(Ipv4Addr::new(100, 64, 0, 2))
        };
        let due = |prev: &VpnPeerStatus, new: &VpnPeerStatus, counters| {
            status_due(Some(&Written::of(prev)), &Written::of(new), counters)
        };
        let s0 = status_for(None, &r, t0);
        assert!(
            status_due(None, &Written::of(&s0), false),
            "a new peer's status is written at once"
        );
        assert!(!due(&s0, &s0, true), "nothing changed");
        r.rx_bytes = 100;
        r.last_handshake = Some(SystemTime::now());
        let s1 = status_for(Some(&s0), &r, t0);
        assert!(!due(&s0, &s1, false), "counters wait for the interval");
        assert!(due(&s0, &s1, true));
        r.outcome = Err(Rejection::Disabled);
        let s2 = status_for(Some(&s1), &r, t0);
        assert!(due(&s1, &s2, false), "a rejection is written at once");
        r.outcome = Ok(Ipv4Addr::new(100, 64, 0, 2));
        r.generation = Some(2);
        let s3 = status_for(Some(&s1), &r, t0);
        assert!(due(&s1, &s3, false), "a new generation is acknowledged at once");
    }

    #[test]
    fn what_is_kept_of_a_written_status_gives_the_same_next_status() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let mut r = PeerReport {
            last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600)),
            rx_bytes: 7,
            tx_bytes: 9,
            ..served_at(Ipv4Addr::new(100, 64, 0, 2))
        };
        let s0 = status_for(None, &r, t0);
        let kept = Written::of(&s0).previous();
        r.last_handshake = None;
        for outcome in [Ok(Ipv4Addr::new(100, 64, 0, 2)), Err(Rejection::Disabled)] {
            r.outcome = outcome;
            assert_eq!(status_for(Some(&kept), &r, t1), status_for(Some(&s0), &r, t1));
        }
        assert_ne!(
            Written::of(&s0).whole,
            Written::of(&status_for(Some(&s0), &r, t1)).whole
        );
    }
}

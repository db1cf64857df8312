//! Unit tests of the `peer` module.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kuberaya_gateway::crd::{AllowRule, CONDITION_ACCEPTED, Condition, PortRef, VpnPeer, VpnPeerStatus};

use super::view::address_text;
use super::wait::settled;
use super::*;

#[test]
fn allow_forms() {
    let r = parse_allow("team-a").unwrap();
    assert_eq!(
        (r.namespace.as_deref(), r.service.as_deref(), r.ports),
        (Some("team-a"), None, None)
    );
    let r = parse_allow("team-b/db:5432,metrics").unwrap();
    assert_eq!(r.service.as_deref(), Some("db"));
    assert_eq!(
        r.ports,
        Some(vec![PortRef::Number(5432), PortRef::Name("metrics".into())])
    );
    for bad in ["", "Team", "a/", "a/b:", "a/b:0", "a/b:70000", "a:80", "a/b:x_y", "a/B"] {
        assert!(parse_allow(bad).is_err(), "{bad:?} should be refused");
    }
    assert_eq!(rule_text(&parse_allow("a/b:1,x").unwrap(), "z"), "a/b:1,x");
    assert_eq!(rule_text(&AllowRule::default(), "z"), "z/*");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
    assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
    assert!(parse_duration("0d").is_err());
    assert!(parse_duration("3y").is_err());
    assert!(parse_duration("d").is_err());
}

#[test]
fn team_peers_stay_in_their_namespace() {
    let rules = vec![parse_allow("team-a/web").unwrap(), parse_allow("team-b").unwrap()];
    assert!(check_rules("kuberaya-system", "kuberaya-system", &rules).is_ok());
    let e = check_rules("team-a", "kuberaya-system", &rules).unwrap_err();
    assert!(e.contains("team-b/*") && e.contains("without -n"), "{e}");
    assert!(check_rules("team-a", "kuberaya-system", &rules[..1]).is_ok());
}

pub(crate) fn with_status(mut p: VpnPeer, accepted: Option<(&str, &str)>, address: Option<&str>) -> VpnPeer {
    p.status = Some(VpnPeerStatus {
        conditions: accepted
            .map(|(status, reason)| Condition {
                type_: CONDITION_ACCEPTED.into(),
                status: status.into(),
                reason: reason.into(),
                message: format!("{reason} message"),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            })
            .into_iter()
            .collect(),
        address: address.map(Into::into),
        ..Default::default()
    });
    p
}

#[test]
fn acceptance_and_state() {
    let base = crate::reach::tests::peer("ns", "p", 1, vec![]);
    assert_eq!(acceptance(&base), Acceptance::Pending);
    let ok = with_status(base.clone(), Some(("True", "Accepted")), Some("100.64.0.2"));
    assert_eq!(
        acceptance(&ok),
        Acceptance::Accepted {
            address: Some(Ipv4Addr::new(100, 64, 0, 2))
        }
    );
    let mut stale = ok.clone();
    stale.metadata.generation = Some(2);
    stale.status.as_mut().unwrap().observed_generation = Some(1);
    assert_eq!(acceptance(&stale), Acceptance::Pending);
    let bad = with_status(base.clone(), Some(("False", "DuplicatePublicKey")), None);
    assert_eq!(
        state(&bad, Timestamp::UNIX_EPOCH),
        ("Rejected", Some("DuplicatePublicKey".into()))
    );
    let mut off = ok.clone();
    off.spec.disabled = true;
    assert_eq!(state(&off, Timestamp::UNIX_EPOCH).0, "Disabled");
    let mut old = ok;
    old.spec.expires_at = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(state(&old, Timestamp::from_second(10).unwrap()).0, "Expired");
}

#[test]
fn the_wait_ends_on_an_answer_to_the_generation_asked_about() {
    use kube::runtime::wait::Condition;
    let base = crate::reach::tests::peer("ns", "p", 1, vec![]);
    let mut accepted = with_status(base.clone(), Some(("True", "Accepted")), Some("100.64.0.2"));
    accepted.status.as_mut().unwrap().observed_generation = Some(1);
    assert!(settled(Some(1)).matches_object(Some(&accepted)));
    assert!(
        !settled(Some(2)).matches_object(Some(&accepted)),
        "an answer about an older generation"
    );
    let no_address = with_status(base.clone(), Some(("True", "Accepted")), None);
    assert!(!settled(None).matches_object(Some(&no_address)));
    assert!(!settled(None).matches_object(Some(&base)), "no answer yet");
    let rejected = with_status(base, Some(("False", "AddressTaken")), None);
    assert!(settled(None).matches_object(Some(&rejected)));
    assert!(settled(None).matches_object(None), "a peer gone: nothing to wait for");
}

#[test]
fn a_peer_not_served_shows_its_last_address_as_not_in_use() {
    let now = Timestamp::from_second(10).unwrap();
    let base = crate::reach::tests::peer("ns", "p", 1, vec![]);
    let ok = with_status(base.clone(), Some(("True", "Accepted")), Some("100.64.0.2"));
    let r = row_of(&ok, now);
    assert_eq!(
        (r.address.as_deref(), r.last_address.as_deref()),
        (Some("100.64.0.2"), None)
    );
    assert_eq!(address_text(&r), "100.64.0.2");
    // Disabled, as the gateway writes it: no address, the last one kept.
    let mut off = with_status(base.clone(), Some(("False", "Disabled")), None);
    off.spec.disabled = true;
    off.status.as_mut().unwrap().last_address = Some("100.64.0.2".into());
    let r = row_of(&off, now);
    assert_eq!(
        (r.address.as_deref(), r.last_address.as_deref()),
        (None, Some("100.64.0.2"))
    );
    assert_eq!(address_text(&r), "100.64.0.2 (not in use)");
    // Disabled before the gateway has answered: the address it still lists is not in use.
    let mut off = ok.clone();
    off.spec.disabled = true;
    assert_eq!(address_text(&row_of(&off, now)), "100.64.0.2 (not in use)");
    // Rejected with a fixed address it never had: that address, not in use.
    let mut dup = with_status(base.clone(), Some(("False", "AddressInUse")), None);
    dup.spec.address = Some("100.64.0.9".into());
    assert_eq!(address_text(&row_of(&dup, now)), "100.64.0.9 (not in use)");
    // Pending: the address asked for, as before; nothing at all: `-`.
    let mut asked = base.clone();
    asked.spec.address = Some("100.64.0.7".into());
    assert_eq!(row_of(&asked, now).address.as_deref(), Some("100.64.0.7"));
    assert_eq!(address_text(&row_of(&base, now)), "-");
}

//! Unit tests of the `peer` module.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kuberaya_gateway::crd::{AllowRule, CONDITION_ACCEPTED, Condition, PortRef, VpnPeer, VpnPeerStatus};

use super::view::{address_text, address_v6_text};
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

fn dual_gateway(v6: bool) -> crate::gateway::GatewayInfo {
    use kuberaya_gateway::keys::PrivateKey;
    let svc = crate::gateway::tests::gateway_service(&PrivateKey::generate().public_key(), Some("127.203.0.5"));
    let mut g = crate::gateway::from_service(&svc).unwrap();
    g.ingress.push("fd00:203::5".into());
    if v6 {
        g.tunnel_v6 = Some((
            "fd6b:7261:7961::1".parse().unwrap(),
            "fd6b:7261:7961::/64".parse().unwrap(),
        ));
    }
    g
}

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn texts(list: &[ipnet::IpNet]) -> Vec<String> {
    list.iter().map(|n| n.to_string()).collect()
}

#[test]
fn allowed_ips_route_ipv6_only_for_a_peer_with_an_ipv6_address() {
    use super::config::allowed_ips;
    let gw = dual_gateway(true);
    let both = nets(&["127.96.0.0/16", "fd00:96::/112"]);
    assert_eq!(
        texts(&allowed_ips(&both, &gw, true)),
        [
            "127.96.0.0/16",
            "100.64.0.1/32",
            "fd00:96::/112",
            "fd6b:7261:7961::1/128"
        ]
    );
    assert_eq!(
        texts(&allowed_ips(&both, &gw, false)),
        ["127.96.0.0/16", "100.64.0.1/32"],
        "no IPv6 tunnel address: no IPv6 routed"
    );
    // A range holding the gateway's address needs no host route beside it.
    let wide = nets(&["100.64.0.0/10", "fd6b:7261:7961::/48"]);
    assert_eq!(
        texts(&allowed_ips(&wide, &gw, true)),
        ["100.64.0.0/10", "fd6b:7261:7961::/48"]
    );
    // IPv4 only, as before dual-stack.
    assert_eq!(
        texts(&allowed_ips(&nets(&["10.96.0.0/12"]), &dual_gateway(false), false)),
        ["10.96.0.0/12", "100.64.0.1/32"]
    );
}

#[test]
fn a_dual_stack_peer_config_has_both_addresses_dns_servers_and_ranges() {
    use super::config::{PeerAddresses, config_addresses, peer_config};
    use crate::wgquick::{PeerKey, render};
    let gw = dual_gateway(true);
    let endpoint = gw.endpoint_for(Some(crate::gateway::EndpointFamily::Ipv6)).unwrap();
    let addresses = PeerAddresses {
        v4: Ipv4Addr::new(100, 64, 0, 7),
        v6: Some("fd6b:7261:7961::7".parse().unwrap()),
    };
    let cidrs = nets(&["127.96.0.0/16", "fd00:96::/112"]);
    let key = PeerKey::OnDevice(kuberaya_gateway::keys::PublicKey([3; 32]));
    let text = render(&peer_config(
        "team-a",
        "bob",
        &gw,
        endpoint,
        &cidrs,
        key.clone(),
        addresses,
        None,
    ));
    for line in [
        "Address = 100.64.0.7/32, fd6b:7261:7961::7/128",
        "DNS = 100.64.0.1, fd6b:7261:7961::1, team-a.svc.cluster.local, svc.cluster.local, cluster.local",
        "Endpoint = [fd00:203::5]:51820",
        "AllowedIPs = 127.96.0.0/16, 100.64.0.1/32, fd00:96::/112, fd6b:7261:7961::1/128",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }
    assert!(
        text.starts_with("# kuberaya peer team-a/bob (gateway [fd00:203::5]:51820)\n"),
        "{text}"
    );
    assert_eq!(config_addresses(&cidrs, addresses), addresses);
    // An IPv4-only cluster (no IPv6 service range): the config of before, though the
    // gateway gave the peer an IPv6 address.
    assert_eq!(config_addresses(&cidrs[..1], addresses).v6, None);

    // The same peer without an IPv6 address: the IPv4-only config of before.
    let v4 = config_addresses(&cidrs[..1], addresses);
    let text = render(&peer_config(
        "team-a",
        "bob",
        &gw,
        gw.endpoint.clone(),
        &cidrs,
        key,
        v4,
        None,
    ));
    for line in [
        "Address = 100.64.0.7/32",
        "DNS = 100.64.0.1, team-a.svc.cluster.local, svc.cluster.local, cluster.local",
        "Endpoint = 127.203.0.5:51820",
        "AllowedIPs = 127.96.0.0/16, 100.64.0.1/32",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
    }
}

#[test]
fn endpoint_flag_overrides_and_family_picks() {
    use super::config::endpoint;
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: ConfigArgs,
    }
    let gw = dual_gateway(true);
    let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()));
    let e = |args: &[&str]| endpoint(&parse(args).unwrap().config, &gw).unwrap();
    assert_eq!(e(&[]), "127.203.0.5:51820");
    assert_eq!(e(&["--endpoint-family", "ipv6"]), "[fd00:203::5]:51820");
    assert_eq!(e(&["--endpoint-family", "ipv4"]), "127.203.0.5:51820");
    assert_eq!(e(&["--endpoint", "vpn.example.com:443"]), "vpn.example.com:443");
    assert_eq!(e(&["--endpoint", "[2001:db8::1]:51820"]), "[2001:db8::1]:51820");
    assert!(
        parse(&["--endpoint", "a:1", "--endpoint-family", "ipv6"]).is_err(),
        "one or the other"
    );
    assert!(parse(&["--endpoint-family", "ipv5"]).is_err());
    let cidrs = parse(&["--service-cidr", "127.96.0.0/16,fd00:96::/112"])
        .unwrap()
        .config
        .service_cidr;
    assert_eq!(texts(&cidrs), ["127.96.0.0/16", "fd00:96::/112"]);
    let cidrs = parse(&["--service-cidr", "10.96.0.0/12", "--service-cidr", "fd00:96::/112"])
        .unwrap()
        .config
        .service_cidr;
    assert_eq!(texts(&cidrs), ["10.96.0.0/12", "fd00:96::/112"]);
    // An IPv6-only load balancer asked for IPv4: the error says what there is.
    let mut v6_only = gw.clone();
    v6_only.ingress = vec!["fd00:203::5".into()];
    let err = endpoint(&parse(&["--endpoint-family", "ipv4"]).unwrap().config, &v6_only).unwrap_err();
    assert!(
        err.to_string().contains("no IPv4 address (ingress: fd00:203::5)"),
        "{err}"
    );
}

#[test]
fn endpoints_are_parsed_with_brackets_around_ipv6() {
    assert_eq!(parse_endpoint("203.0.113.5:51820").unwrap(), "203.0.113.5:51820");
    assert_eq!(parse_endpoint("[2001:db8::1]:51820").unwrap(), "[2001:db8::1]:51820");
    assert_eq!(parse_endpoint("vpn.example.com:443").unwrap(), "vpn.example.com:443");
    let e = parse_endpoint("2001:db8::1:51820").unwrap_err();
    assert!(e.contains("[2001:db8::1:51820]:51820"), "{e}");
    for bad in [
        "vpn.example.com",
        "host:0",
        "host:70000",
        ":51820",
        "a b:1",
        "[::1]:0",
        "x..y:1",
    ] {
        assert!(parse_endpoint(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn the_ipv6_address_is_read_from_the_status() {
    let base = crate::reach::tests::peer("ns", "p", 1, vec![]);
    let mut ok = with_status(base.clone(), Some(("True", "Accepted")), Some("100.64.0.2"));
    assert_eq!(state::address_v6(&ok), None);
    ok.status.as_mut().unwrap().address_v6 = Some("fd6b:7261:7961::2".into());
    assert_eq!(state::address_v6(&ok), Some("fd6b:7261:7961::2".parse().unwrap()));
    ok.status.as_mut().unwrap().address_v6 = Some("garbage".into());
    assert_eq!(state::address_v6(&ok), None);
}

#[test]
fn the_ipv6_address_is_listed_in_use_or_last_and_left_out_when_absent() {
    let now = Timestamp::from_second(10).unwrap();
    let base = crate::reach::tests::peer("ns", "p", 1, vec![]);
    let mut ok = with_status(base.clone(), Some(("True", "Accepted")), Some("100.64.0.2"));
    let json = serde_json::to_value(row_of(&ok, now)).unwrap();
    assert!(
        json.get("addressV6").is_none() && json.get("lastAddressV6").is_none(),
        "{json}"
    );
    ok.status.as_mut().unwrap().address_v6 = Some("fd6b:7261:7961::2".into());
    let r = row_of(&ok, now);
    assert_eq!(address_v6_text(&r), "fd6b:7261:7961::2");
    assert_eq!(serde_json::to_value(&r).unwrap()["addressV6"], "fd6b:7261:7961::2");
    let mut off = with_status(base, Some(("False", "Disabled")), None);
    off.spec.disabled = true;
    off.status.as_mut().unwrap().last_address_v6 = Some("fd6b:7261:7961::2".into());
    let r = row_of(&off, now);
    assert_eq!(
        (r.address_v6.as_deref(), address_v6_text(&r).as_str()),
        (None, "fd6b:7261:7961::2 (not in use)")
    );
}

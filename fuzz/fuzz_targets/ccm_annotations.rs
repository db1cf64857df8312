//! The CCM's Service annotation parsing (`annotations::LbAnnotations::parse`) in the place
//! it is used: `desired_load_balancer` of a LoadBalancer Service over three nodes.
//!
//! Input: text, one `key=value` per line (split at the first `=`). A key `@N` stands for
//! the N-th documented annotation (`annotations::TABLE`), so that the fuzzer reaches
//! every parser without guessing key names. The keys `spec.loadBalancerIP`,
//! `spec.loadBalancerSourceRanges` (comma-separated), `spec.externalTrafficPolicy` and
//! `providerID` (of the third node) set those fields instead.
//!
//! Checked: no panic; a desired load balancer only ever carries values inside the
//! documented ranges, and only nodes the node selector matches as backends; a parsed
//! node selector reads back the same from its own rendering.
#![no_main]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use kuberaya_ccm::annotations::{self, Annotations, LbAnnotations, NodeSelector, Requirement, TABLE};
use kuberaya_ccm::platform::HealthCheckProtocol;
use kuberaya_ccm::service::desired::{DesiredConfig, Refusal, desired_load_balancer};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fn node(name: &str, labels: serde_json::Value, provider_id: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"providerID": provider_id},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
    }))
    .expect("a Node")
}

fn render(sel: &NodeSelector) -> String {
    sel.requirements
        .iter()
        .map(|r| match r {
            Requirement::Equals(k, v) => format!("{k}={v}"),
            Requirement::NotEquals(k, v) => format!("{k}!={v}"),
            Requirement::Exists(k) => k.clone(),
            Requirement::NotExists(k) => format!("!{k}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut ann = Annotations::new();
    let mut spec = json!({
        "type": "LoadBalancer",
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
            {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
        ],
        "healthCheckNodePort": 32000,
    });
    let mut third_provider_id = "cloudraya://vm-3".to_owned();
    for line in text.lines() {
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        match key {
            "spec.loadBalancerIP" => spec["loadBalancerIP"] = json!(value),
            "spec.loadBalancerSourceRanges" => {
                spec["loadBalancerSourceRanges"] = json!(value.split(',').collect::<Vec<_>>())
            }
            "spec.externalTrafficPolicy" => spec["externalTrafficPolicy"] = json!(value),
            "providerID" => third_provider_id = value.to_owned(),
            _ => {
                let key = match key.strip_prefix('@').and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => TABLE[n % TABLE.len()].key.to_owned(),
                    None => key.to_owned(),
                };
                ann.insert(key, value.to_owned());
            }
        }
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "web", "uid": "uid-1", "annotations": ann},
        "spec": spec,
    }))
    .expect("a Service");
    let nodes = [
        node("a", json!({"role": "lb", "zone": "a"}), "cloudraya://vm-1"),
        node("b", json!({"zone": "b", "gpu": ""}), "cloudraya://vm-2"),
        node("c", json!({"role": "worker"}), &third_provider_id),
    ];
    let cfg = DesiredConfig {
        cluster_id: "cl-1".into(),
        udp_supported: true,
        ip_versions: kuberaya_ccm::platform::ipv4_only(),
    };

    let parsed = LbAnnotations::parse(&ann);
    if let Ok(p) = &parsed
        && let Some(sel) = &p.node_selector
    {
        let mut again = Annotations::new();
        again.insert(annotations::NODE_SELECTOR.to_owned(), render(sel));
        let back = annotations::node_selector(&again).expect("a rendered selector parses");
        assert_eq!(back.as_ref(), Some(sel), "selector round trip");
    }

    match desired_load_balancer(&svc, &nodes, &cfg) {
        Ok(lb) => {
            let p = parsed.expect("a load balancer from annotations that do not parse");
            assert!(annotations::is_valid_lb_name(&lb.name), "name {:?}", lb.name);
            assert!(!lb.rules.is_empty() && lb.rules.len() <= 50);
            for rule in &lb.rules {
                assert!(rule.public_port > 0 && rule.private_port > 0);
                let hc = rule.health_check.as_ref().expect("an explicit health check");
                let (interval, timeout) = (hc.interval_s.unwrap(), hc.timeout_s.unwrap());
                assert!((1..=300).contains(&interval) && (1..=60).contains(&timeout) && timeout < interval);
                for t in [hc.healthy_threshold.unwrap(), hc.unhealthy_threshold.unwrap()] {
                    assert!((1..=10).contains(&t));
                }
                assert!(hc.port.is_some_and(|p| p > 0));
                match hc.protocol {
                    HealthCheckProtocol::Http => {
                        let path = hc.path.as_deref().expect("an HTTP check has a path");
                        assert!(
                            path.starts_with('/') && path.chars().all(|c| c.is_ascii_graphic()),
                            "{path:?}"
                        );
                    }
                    HealthCheckProtocol::Tcp => assert!(hc.path.is_none()),
                    HealthCheckProtocol::Other(ref o) => panic!("health check protocol {o:?}"),
                }
            }
            for b in &lb.backends {
                let n = nodes
                    .iter()
                    .find(|n| kuberaya_ccm::service::nodes::vm_id(n).as_deref() == Some(b.vm_id.as_str()))
                    .expect("a backend is a node's VM");
                let labels: BTreeMap<String, String> = n.metadata.labels.clone().unwrap_or_default();
                assert!(
                    p.node_selector.as_ref().is_none_or(|s| s.matches(&labels)),
                    "{b:?} not selected"
                );
            }
            assert!(
                lb.backend_ips
                    .keys()
                    .all(|vm| lb.backends.iter().any(|b| &b.vm_id == vm))
            );
        }
        Err(Refusal::Annotation(e)) => {
            let _ = e.to_string();
            assert!(
                ann.contains_key(&e.key) || e.key == annotations::HEALTH_CHECK_TIMEOUT,
                "error about an annotation that is not there: {e}"
            );
        }
        Err(e @ (Refusal::Unsupported { .. } | Refusal::Ipv6Unavailable { .. })) => {
            let _ = e.to_string();
        }
    }
});

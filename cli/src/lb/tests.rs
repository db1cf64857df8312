//! Unit tests of the `lb` module.

use k8s_openapi::api::core::v1::{Event, Service};
use kuberaya_ccm::config::{ENV_EMAIL, ENV_PASSWORD};
use kuberaya_ccm::platform::{
    Algorithm, Backend, BackendHealth, HealthCheck, HealthState, LABEL_CLUSTER_ID, LABEL_SERVICE_NAME,
    LABEL_SERVICE_NAMESPACE, LABEL_SERVICE_UID, Labels, LbPublicIp, LbStatus, LoadBalancer, Rule, RuleProtocol,
};

use super::*;

pub(crate) fn lb(id: &str, ns: &str, name: &str, uid: &str, ip: Option<&str>) -> LoadBalancer {
    LoadBalancer {
        id: id.into(),
        name: format!("{ns}-{name}"),
        region: "jkt".into(),
        vpc_id: "vpc-1".into(),
        subnet_id: "subnet-1".into(),
        ip_versions: kuberaya_ccm::platform::ipv4_only(),
        public_ipv6: None,
        public_ip: ip.map(|a| LbPublicIp {
            id: format!("pip-{id}"),
            address: a.parse().unwrap(),
        }),
        labels: Labels::from([
            (LABEL_CLUSTER_ID.to_string(), "cl-1".to_string()),
            (LABEL_SERVICE_UID.to_string(), uid.to_string()),
            (LABEL_SERVICE_NAMESPACE.to_string(), ns.to_string()),
            (LABEL_SERVICE_NAME.to_string(), name.to_string()),
        ]),
        status: LbStatus::Active,
        status_message: String::new(),
        rules: vec![Rule {
            name: "http".into(),
            protocol: RuleProtocol::Tcp,
            public_port: 80,
            private_port: 30080,
            algorithm: Algorithm::RoundRobin,
            allowed_sources: vec![],
            health_check: Some(HealthCheck::tcp(30080)),
        }],
        backends: vec![
            Backend {
                vm_id: "vm-1".into(),
                private_ip: Some("127.10.0.11".parse().unwrap()),
                private_ipv6: None,
            },
            Backend {
                vm_id: "vm-2".into(),
                private_ip: Some("127.10.0.12".parse().unwrap()),
                private_ipv6: None,
            },
        ],
        health: vec![
            BackendHealth {
                rule: "http".into(),
                vm_id: "vm-1".into(),
                state: HealthState::Healthy,
            },
            BackendHealth {
                rule: "http".into(),
                vm_id: "vm-2".into(),
                state: HealthState::Unhealthy,
            },
        ],
        created_at: None,
        updated_at: None,
    }
}

#[test]
fn health_counts_backends_healthy_for_every_rule() {
    let mut l = lb("lb-1", "shop", "web", "u1", Some("127.203.0.10"));
    assert_eq!(backend_health(&l), (1, 2));
    l.health.clear();
    assert_eq!(backend_health(&l), (0, 2), "unchecked backends are not healthy");
}

#[test]
fn orphans_are_the_ccms_and_unknown_lbs_are_apart() {
    let service = |name: &str, uid: &str, type_: &str| -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": name, "uid": uid},
            "spec": {"type": type_, "ports": [{"port": 80}]}
        }))
        .unwrap()
    };
    let mut hand = lb("lb-4", "shop", "hand", "-", None);
    hand.labels.remove(LABEL_SERVICE_UID);
    let mut deleting = lb("lb-5", "shop", "gone-too", "u5", None);
    deleting.status = kuberaya_ccm::platform::LbStatus::Deleting;
    let lbs = vec![
        lb("lb-1", "shop", "web", "u1", None),
        lb("lb-2", "shop", "gone", "u2", None),
        // Its Service was recreated while the CCM was down: adopted by its LB name.
        LoadBalancer {
            name: "kr-shop-recreated".into(),
            ..lb("lb-3", "shop", "recreated", "u3-old", None)
        },
        hand,
        deleting,
        lb("lb-6", "shop", "internal", "u6", None),
    ];
    let live = vec![
        service("web", "u1", "LoadBalancer"),
        service("recreated", "u3-new", "LoadBalancer"),
        // Exists, but is ClusterIP now and has no finalizer: no reconcile will clean up.
        service("internal", "u6", "ClusterIP"),
    ];
    let list = orphan_list("cl-1", &lbs, &live);
    let ids: Vec<&str> = list.items.iter().map(|o| o.lb.id.as_str()).collect();
    assert_eq!(ids, ["lb-2", "lb-6"]);
    let unknown: Vec<&str> = list.unknown.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(unknown, ["lb-4"]);
    let text = orphans_table(&list, false);
    assert!(text.contains("Unknown: not created by the CCM"), "{text}");
}

#[test]
fn credentials_from_env_or_say_what_is_missing() {
    let env = |k: &str| match k {
        ENV_API_URL => Some("http://127.0.0.1:9".to_string()),
        ENV_EMAIL => Some("a@b".to_string()),
        ENV_PASSWORD => Some("pw".to_string()),
        ENV_CLUSTER_ID => Some("cl-1".to_string()),
        _ => None,
    };
    let (c, cluster) = resolve_platform(None, None, env).unwrap();
    assert_eq!((c.base_url.as_str(), cluster.as_str()), ("http://127.0.0.1:9", "cl-1"));
    assert_eq!(resolve_platform(None, Some("cl-9"), env).unwrap().1, "cl-9");
    let e = resolve_platform(None, None, |_| None).unwrap_err();
    assert!(e.contains("--cloud-config") && e.contains(ENV_API_URL), "{e}");
}

#[test]
fn service_refs() {
    assert_eq!(parse_service_ref("a/b", None).unwrap(), ("a".into(), "b".into()));
    assert_eq!(parse_service_ref("b", Some("x")).unwrap(), ("x".into(), "b".into()));
    assert!(parse_service_ref("a/b/c", None).is_err());
    assert!(parse_service_ref("/b", None).is_err());
}

#[test]
fn events_count_their_series_or_their_deprecated_count() {
    use k8s_openapi::api::core::v1::EventSeries;
    let event = |count: Option<i32>, series: Option<i32>| Event {
        count,
        series: series.map(|n| EventSeries {
            count: Some(n),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut svc = Service::default();
    svc.metadata.name = Some("web".into());
    let events = [
        event(None, Some(3)),
        event(Some(4), None),
        event(None, None),
        event(Some(0), None),
    ];
    let d = describe_of(&svc, None, &events);
    let counts: Vec<i32> = d.events.iter().map(|e| e.count).collect();
    assert_eq!(counts, [3, 4, 1, 1]);
}

#[test]
fn diagnosis_names_the_problem() {
    let mut svc = Service::default();
    svc.metadata.name = Some("web".into());
    svc.metadata.namespace = Some("shop".into());
    svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
        type_: Some("LoadBalancer".into()),
        ..Default::default()
    });
    let d = describe_of(&svc, None, &[]);
    assert!(d.problems[0].contains("CCM has not created"), "{:?}", d.problems);
    let mut l = lb("lb-1", "shop", "web", "u1", Some("127.203.0.10"));
    l.status = LbStatus::Error;
    l.status_message = "no capacity".into();
    l.health.clear();
    let d = describe_of(&svc, Some(l), &[]);
    assert!(d.problems.iter().any(|p| p.contains("no capacity")));
    assert!(d.problems.iter().any(|p| p.contains("no backend is healthy")));
    assert!(d.problems.iter().any(|p| p.contains("not written it back")));
    svc.metadata.annotations = Some([("lb.cloudraya.com/algorithm".to_string(), "fastest".to_string())].into());
    let d = describe_of(&svc, None, &[]);
    assert!(
        d.problems.iter().any(|p| p.starts_with("invalid annotation")),
        "{:?}",
        d.problems
    );
}

//! Golden tests: the table and JSON output of every read command, rendered from fixed
//! fixtures and compared with `tests/golden/*` at the workspace root. Run with
//! `UPDATE_GOLDEN=1` to rewrite the files after an intended change (and review the diff).

use std::path::PathBuf;

use kuberaya_gateway::peers::PeerId;

use crate::output::{Format, Style, render};
use crate::{audit, lb, peer, reach};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("golden")
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(golden_dir()).expect("golden dir");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1 to create it", path.display()));
    assert!(
        expected == actual,
        "{} differs (UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn both<T: serde::Serialize>(name: &str, value: &T, table: impl Fn(bool) -> String) {
    check(&format!("{name}.txt"), &render(Format::Table, value, &table).unwrap());
    check(
        &format!("{name}.wide.txt"),
        &render(Format::Wide, value, &table).unwrap(),
    );
    check(&format!("{name}.json"), &render(Format::Json, value, &table).unwrap());
}

#[test]
fn peer_list_and_show() {
    let (services, peers, now) = audit::tests::fixture();
    let list = peer::PeerList {
        items: peers.iter().map(|p| peer::row_of(p, now)).collect(),
    };
    let style = Style::plain();
    both("peer-list", &list, |wide| {
        peer::list_table(&list, true, wide, now, &style)
    });
    let catalog: Vec<_> = services
        .iter()
        .filter_map(kuberaya_gateway::source::kube::service_from_k8s)
        .collect();
    let reach = reach::reach_of_all(&peers, &catalog, &reach::Grants::default(), "kuberaya-system", now)
        .remove(&PeerId::new("kuberaya-system", "alice"))
        .unwrap();
    let detail = peer::PeerDetail {
        peer: peer::row_of(&peers[0], now),
        message: None,
        reach,
    };
    both("peer-show", &detail, |wide| peer::show_text(&detail, wide, now, &style));
}

#[test]
fn lb_list_describe_orphans() {
    let style = Style::plain();
    let mut pending = lb::tests::lb("lb-2", "shop", "api", "u2", None);
    pending.status = kuberaya_ccm::platform::LbStatus::Provisioning;
    let lbs = [
        lb::tests::lb("lb-1", "shop", "web", "u1", Some("127.203.0.10")),
        pending,
    ];
    let list = lb::LbList {
        items: lbs.iter().map(lb::row_of).collect(),
    };
    both("lb-list", &list, |wide| lb::list_table(&list, wide, &style));

    let (services, _, _) = audit::tests::fixture();
    let mut svc = services[0].clone();
    svc.metadata.annotations =
        Some([("lb.cloudraya.com/algorithm".to_string(), "least_connection".to_string())].into());
    let event = k8s_openapi::api::core::v1::Event {
        type_: Some("Normal".into()),
        reason: Some("EnsuredLoadBalancer".into()),
        message: Some("Ensured load balancer lb-1".into()),
        count: Some(2),
        ..Default::default()
    };
    let d = lb::describe_of(&svc, Some(lbs[0].clone()), &[event]);
    both("lb-describe", &d, |wide| lb::describe_text(&d, wide, &style));

    let orphans = lb::OrphanList {
        items: vec![lb::OrphanRow {
            lb: lb::row_of(&lb::tests::lb("lb-9", "shop", "gone", "u9", Some("127.203.0.19"))),
            retain_public_ip: true,
        }],
        unknown: vec![lb::row_of(&{
            let mut hand = lb::tests::lb("lb-7", "shop", "hand-made", "-", None);
            hand.labels.remove(kuberaya_ccm::platform::LABEL_SERVICE_UID);
            hand
        })],
    };
    both("lb-orphans", &orphans, |wide| lb::orphans_table(&orphans, wide));
}

#[test]
fn expose_audit() {
    let (services, peers, now) = audit::tests::fixture();
    let a = audit::audit(
        &services,
        &peers,
        &crate::reach::Grants::default(),
        "kuberaya-system",
        now,
    );
    both("expose-audit", &a, |wide| audit::audit_table(&a, wide, &Style::plain()));
}

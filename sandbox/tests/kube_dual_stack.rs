//! Dual-stack Services (ipFamilyPolicy, ipFamilies, clusterIPs) through the real kubectl
//! (v1.32) and kube-rs, against the API server stand-in configured as kube-apiserver with
//! one or two `--service-cluster-ip-range`s.

#[path = "kube_support.rs"]
mod support;

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::*;

const DUAL: &str = "127.96.0.0/16,fd00:96::/112";

async fn client(s: &Server) -> Client {
    let kc = kube::config::Kubeconfig::read_from(&s.kubeconfig).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

fn service_yaml(name: &str, policy: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: LoadBalancer\n  ipFamilyPolicy: {policy}\n  selector:\n    app: web\n  ports:\n  - port: 80\n"
    )
}

fn spec_ips(out: &str) -> Value {
    let svc: Value = serde_json::from_str(out).expect("json");
    json!([
        svc["spec"]["clusterIPs"],
        svc["spec"]["ipFamilies"],
        svc["spec"]["ipFamilyPolicy"]
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_on_a_dual_stack_cluster_shows_both_cluster_ips_and_changes_policy() {
    let s = Server::start_with_service_cidrs(DUAL).await;
    let file = write(s.dir.path(), "web.yaml", &service_yaml("web", "PreferDualStack"));
    ok(&s, &["apply", "-f", file.to_str().unwrap()]).await;
    let out = ok(&s, &["get", "service", "web", "-o", "json"]).await;
    // `kubernetes` holds .1 of the primary range.
    assert_eq!(
        spec_ips(&out),
        json!([["127.96.0.2", "fd00:96::1"], ["IPv4", "IPv6"], "PreferDualStack"])
    );
    // kubectl describe (client-side) lists both families and addresses.
    let described = ok(&s, &["describe", "service", "web"]).await;
    for line in [
        "IP Family Policy:         PreferDualStack",
        "IP Families:              IPv4,IPv6",
        "IP:                       127.96.0.2",
        "IPs:                      127.96.0.2,fd00:96::1",
    ] {
        assert!(described.contains(line), "{line:?} not in:\n{described}");
    }
    // The table shows the primary ClusterIP, as kube-apiserver's.
    let table = ok(&s, &["get", "service", "web", "--no-headers"]).await;
    assert!(table.contains("127.96.0.2"), "{table}");
    // Back to SingleStack: the secondary address goes (and is free again).
    ok(
        &s,
        &[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"ipFamilyPolicy":"SingleStack"}}"#,
        ],
    )
    .await;
    let out = ok(&s, &["get", "service", "web", "-o", "json"]).await;
    assert_eq!(spec_ips(&out), json!([["127.96.0.2"], ["IPv4"], "SingleStack"]));
    // And up again: a new secondary address.
    ok(
        &s,
        &[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"ipFamilyPolicy":"RequireDualStack"}}"#,
        ],
    )
    .await;
    let out = ok(&s, &["get", "service", "web", "-o", "json"]).await;
    assert_eq!(
        spec_ips(&out),
        json!([["127.96.0.2", "fd00:96::1"], ["IPv4", "IPv6"], "RequireDualStack"])
    );
    // Dropping the secondary address under a dual-stack policy is refused.
    let err = fails(
        &s,
        &[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"clusterIPs":["127.96.0.2"]}}"#,
        ],
    )
    .await;
    assert!(
        err.contains(r#"spec.ipFamilyPolicy: Invalid value: "RequireDualStack": must be set to 'SingleStack' when releasing the secondary clusterIP"#),
        "{err}"
    );
    // IPv6 first, by ipFamilies.
    let v6 = "apiVersion: v1\nkind: Service\nmetadata:\n  name: v6\nspec:\n  ipFamilies: [IPv6]\n  ports:\n  - port: 53\n    protocol: UDP\n";
    ok_stdin(&s, &["apply", "-f", "-"], v6).await;
    let out = ok(&s, &["get", "service", "v6", "-o", "json"]).await;
    assert_eq!(spec_ips(&out), json!([["fd00:96::2"], ["IPv6"], "SingleStack"]));
    let table = ok(&s, &["get", "service", "v6", "--no-headers"]).await;
    assert!(table.contains("fd00:96::2"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_require_dual_stack_on_a_single_stack_cluster_is_a_422() {
    let s = Server::start().await;
    let file = write(s.dir.path(), "web.yaml", &service_yaml("web", "RequireDualStack"));
    let err = fails(&s, &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(
        err.contains(r#"The Service "web" is invalid: spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for dual-stack services"#),
        "{err}"
    );
    // PreferDualStack is fine and gets the one family.
    let file = write(s.dir.path(), "web.yaml", &service_yaml("web", "PreferDualStack"));
    ok(&s, &["apply", "-f", file.to_str().unwrap()]).await;
    let out = ok(&s, &["get", "service", "web", "-o", "json"]).await;
    assert_eq!(spec_ips(&out), json!([["127.96.0.2"], ["IPv4"], "PreferDualStack"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_sees_both_families_and_the_ingress_ip_mode_is_kept() {
    let s = Server::start_with_service_cidrs(DUAL).await;
    let api: Api<Service> = Api::namespaced(client(&s).await, "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "LoadBalancer", "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6", "IPv4"],
                 "selector": {"app": "web"}, "ports": [{"port": 80}]}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &svc).await.expect("create");
    let spec = created.spec.expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:96::1"));
    assert_eq!(
        spec.cluster_ips,
        Some(vec!["fd00:96::1".to_string(), "127.96.0.2".to_string()])
    );
    assert_eq!(spec.ip_families, Some(vec!["IPv6".to_string(), "IPv4".to_string()]));
    // The CCM's status write: one ingress per family, each with ipMode.
    let status = json!({"status": {"loadBalancer": {"ingress": [
        {"ip": "127.203.0.5", "ipMode": "VIP"}, {"ip": "fd00:203::5", "ipMode": "VIP"}]}}});
    api.patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status");
    let got = api.get("web").await.expect("get");
    let ingress = got.status.unwrap().load_balancer.unwrap().ingress.unwrap();
    let seen: Vec<(String, String)> = ingress
        .iter()
        .map(|i| (i.ip.clone().unwrap(), i.ip_mode.clone().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            ("127.203.0.5".to_string(), "VIP".to_string()),
            ("fd00:203::5".to_string(), "VIP".to_string())
        ]
    );
    // The table's EXTERNAL-IP lists both.
    let table = ok(&s, &["get", "service", "web", "--no-headers"]).await;
    assert!(table.contains("127.203.0.5,fd00:203::5"), "{table}");
    // A requested address of a family the cluster has not is refused by kube-rs too.
    let bad: Service = serde_json::from_value(json!({
        "metadata": {"name": "bad"},
        "spec": {"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"], "ports": [{"port": 80}]}
    }))
    .unwrap();
    let err = api.create(&PostParams::default(), &bad).await.unwrap_err();
    let kube::Error::Api(resp) = err else { panic!("{err}") };
    assert_eq!(resp.code, 422);
    assert!(
        resp.message.contains("The range of valid IPs is 127.96.0.0/16"),
        "{}",
        resp.message
    );
}

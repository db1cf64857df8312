//! The "try this" block `sandbox up` prints once ready, and the `web.yaml` it applies.

use std::fs;
use std::path::Path;

use anyhow::Context as _;

use super::UpArgs;
use super::gateway::{GATEWAY_PORT, InProcessGateway};
use super::state::{Runtime, default_state_dir};

const EXAMPLE_FILE: &str = "web.yaml";

/// `web.yaml` of the "try this" block: a Deployment and its LoadBalancer Service.
const EXAMPLE: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: any
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: LoadBalancer
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

/// `web.yaml` of a dual-stack sandbox: the Service asks for both families.
fn example(dual: bool) -> String {
    if dual {
        EXAMPLE.replace(
            "  type: LoadBalancer\n",
            "  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n",
        )
    } else {
        EXAMPLE.to_string()
    }
}

pub(super) fn write_example(dir: &Path, dual: bool) -> anyhow::Result<()> {
    let path = dir.join(EXAMPLE_FILE);
    fs::write(&path, example(dual)).with_context(|| format!("cannot write {}", path.display()))
}

pub(super) fn print_try_this(dir: &Path, args: &UpArgs, rt: &Runtime, gateway: Option<&InProcessGateway>) {
    let dir_flag = if args.dir.state_dir.is_some() && args.dir.state_dir != default_state_dir().ok() {
        format!(" --state-dir {}", dir.display())
    } else {
        String::new()
    };
    println!();
    println!("The sandbox is up. Try this in another shell:");
    println!();
    println!("  eval \"$(kuberaya sandbox env{dir_flag})\"");
    println!("  curl -s -X POST $CLOUDRAYA_API_URL/core/v1/auth/login -H 'content-type: application/json' \\");
    println!("       -d \"{{\\\"email\\\":\\\"$CLOUDRAYA_EMAIL\\\",\\\"password\\\":\\\"$CLOUDRAYA_PASSWORD\\\"}}\"");
    println!("  kuberaya sandbox status{dir_flag}");
    println!("  kubectl get nodes -o wide");
    println!("  kubectl apply -f {}", dir.join(EXAMPLE_FILE).display());
    if args.no_ccm || args.external_ccm {
        println!("  kubectl get service web    # no CCM in the sandbox: its EXTERNAL-IP stays <pending>");
    } else {
        println!("  kubectl wait --for=jsonpath='{{.status.loadBalancer.ingress}}' service/web --timeout=30s");
        println!("  curl http://$(kubectl get service web -o jsonpath='{{.status.loadBalancer.ingress[0].ip}}')/");
        if args.ip_family.is_dual() {
            println!("  kubectl get service web -o jsonpath='{{.spec.clusterIPs}} {{.status.loadBalancer.ingress}}'");
            println!(
                "  curl -6 \"http://[$(kubectl get service web -o jsonpath='{{.status.loadBalancer.ingress[1].ip}}')]/\""
            );
        }
        println!("  kuberaya lb list");
    }
    if args.ip_family.is_dual() {
        println!("  curl -6 \"http://[$(kubectl get service web -o jsonpath='{{.spec.clusterIPs[1]}}')]/\"");
    }
    if let Some(ip) = gateway.and_then(|g| g.public_ip.as_deref()) {
        println!();
        println!("A VPN peer, through the gateway's load balancer ({ip}:{GATEWAY_PORT}/udp), without root:");
        println!();
        println!("  kuberaya peer add alice --allow default/web --out alice.conf");
        println!("  onetun --private-key \"$(awk '/^PrivateKey/ {{print $3}}' alice.conf)\" \\");
        println!("    --endpoint-public-key \"$(awk '/^PublicKey/ {{print $3}}' alice.conf)\" \\");
        println!("    --endpoint-addr \"$(awk '/^Endpoint/ {{print $3}}' alice.conf)\" \\");
        println!("    --source-peer-ip \"$(awk '/^Address/ {{print $3}}' alice.conf | cut -d/ -f1)\" \\");
        println!("    \"127.0.0.1:18080:$(kubectl get service web -o jsonpath='{{.spec.clusterIP}}'):80:TCP\" &");
        println!("  curl http://127.0.0.1:18080/");
    }
    println!();
    println!("Platform API: {}  (cluster {})", rt.platform_url, rt.cluster_id);
    if args.detach || args.detached_child {
        println!("Stop it with: kuberaya sandbox down{dir_flag}");
    } else {
        println!("Press Ctrl-C to stop it.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dual_stack_example_asks_for_both_families() {
        assert!(!example(false).contains("ipFamilyPolicy"));
        let dual = example(true);
        assert!(
            dual.contains("  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n"),
            "{dual}"
        );
    }
}

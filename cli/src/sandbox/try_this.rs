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

pub(super) fn write_example(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(EXAMPLE_FILE);
    fs::write(&path, EXAMPLE).with_context(|| format!("cannot write {}", path.display()))
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
        println!("  kuberaya lb list");
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

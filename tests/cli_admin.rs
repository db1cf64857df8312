//! The admin CLI against a sandbox, checked with the real `kubectl` and `jq`:
//! - peers: `peer add` against the real `kuberaya-gateway` (started here on the sandbox
//!   kubeconfig; the gateway Service and its load-balancer status are made by hand with
//!   kubectl, the gateway annotates the Service itself): first refused with what to do
//!   while the gateway has not annotated it, then `peer add`, `peer list` (a disabled peer
//!   with its last address), `expose audit` with a LoadBalancer, a NodePort and two peers,
//!   bad input, `--context` picking the second context of a kubeconfig, and a peer the
//!   gateway rejects;
//! - load balancers: `lb list|describe|orphans` against LBs made through the platform API
//!   with the CCM's labels (the sandbox runs `--no-ccm`, so nothing sweeps them); then the
//!   real CCM is started on the same state and its sweep deletes exactly the orphans the
//!   CLI listed, never the LB without a Service UID that the CLI lists as unknown.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::cluster::Cluster;
use kuberaya_e2e::gateway::{self, Gateway};
use kuberaya_e2e::process::line_field;
use kuberaya_e2e::sandbox::{TempSandbox, output_text as text};
use kuberaya_e2e::{binary, poll_until_blocking};
use serde_json::Value;

/// A sandbox of two nodes in a temporary dir and what `sandbox env` exports.
struct Sandbox {
    sb: TempSandbox,
    env: BTreeMap<String, String>,
}

impl Deref for Sandbox {
    type Target = TempSandbox;
    fn deref(&self) -> &TempSandbox {
        &self.sb
    }
}

impl Sandbox {
    fn up() -> Result<Sandbox> {
        let sb = TempSandbox::up(&["--no-ccm", "--nodes", "2"])?;
        let env = sb.env()?;
        ensure!(env.contains_key("CLOUDRAYA_API_URL"), "sandbox env: {env:?}");
        Ok(Sandbox { sb, env })
    }

    /// `kuberaya ARGS --kubeconfig K` with the sandbox's platform credentials.
    fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    fn cli_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(binary("kuberaya"));
        cmd.args(args).arg("--kubeconfig").arg(self.kubeconfig());
        cmd.envs(&self.env).env_remove("KUBECONFIG").env("NO_COLOR", "1");
        cmd.envs(extra.iter().copied());
        cmd.stdin(Stdio::null());
        cmd.output().expect("running kuberaya")
    }
}

fn jq(filter: &str, input: &[u8]) -> Result<String> {
    let mut child = Command::new("jq")
        .args(["-r", filter])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running jq")?;
    child.stdin.take().context("stdin")?.write_all(input)?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "jq {filter}: {}", text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn one_clear_line(out: &Output) -> Result<()> {
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "expected failure: {}", text(out));
    ensure!(!err.contains("panicked"), "panic: {}", text(out));
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    ensure!(lines.len() == 1, "one error line: {}", text(out));
    Ok(())
}

fn service_yaml(ns: &str, name: &str, type_: &str, port: u16, protocol: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations:\n{annotations}\nspec:\n  type: {type_}\n  selector:\n    app: {name}\n  ports:\n  - name: p\n    port: {port}\n    protocol: {protocol}\n"
    )
}

#[test]
fn peers_and_exposure_audit() -> Result<()> {
    let sb = Sandbox::up()?;
    let crd = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crds/vpnpeer.yaml"))?;
    sb.apply(&crd)?;
    for ns in ["kuberaya-system", "shop"] {
        sb.kubectl(&["create", "namespace", ns])?;
    }
    // The gateway's Service, made before the gateway (as `kubectl apply -k` may).
    let none = "    {}";
    let no_annotations = |yaml: String| yaml.replace("  annotations:\n    {}\n", "");
    sb.apply(&no_annotations(service_yaml(
        "kuberaya-system",
        "kuberaya-gateway",
        "LoadBalancer",
        51820,
        "UDP",
        none,
    )))?;
    let gw_ip = format!("127.203.{}.50", sb.net);
    sb.kubectl(&[
        "patch",
        "service",
        "-n",
        "kuberaya-system",
        "kuberaya-gateway",
        "--subresource=status",
        "--type=merge",
        "-p",
        &format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{gw_ip}"}}]}}}}}}"#),
    ])?;
    // Not annotated yet (the gateway not started, or RBAC forbade it): one line that says
    // what to check and what to run, nothing created.
    let out = sb.cli(&["peer", "add", "early", "--out", "-"]);
    one_clear_line(&out)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("has no vpn.cloudraya.com/public-key annotation")
            && err.contains("kubectl -n kuberaya-system rollout status deployment/kuberaya-gateway")
            && err.contains("may not annotate the gateway Service"),
        "{}",
        text(&out)
    );
    ensure!(
        sb.kubectl(&["get", "vpnpeers", "-n", "kuberaya-system", "early"])
            .is_err(),
        "no peer before the gateway's facts"
    );

    // The real gateway, against the sandbox: it annotates its Service.
    let mut cmd = gateway::kube_command(sb.kubeconfig(), "kuberaya-system");
    cmd.args(["--listen", "127.0.0.1:0"]);
    let Gateway {
        process: mut gw, line, ..
    } = Gateway::spawn(cmd, Duration::from_secs(60))?;
    let field = |k: &str| line_field(&line, k);
    let (public_key, tunnel) = (field("public_key")?, field("tunnel_address")?);
    let published = poll_until_blocking(Duration::from_secs(30), || {
        let key = sb
            .kubectl(&[
                "get",
                "service",
                "-n",
                "kuberaya-system",
                "kuberaya-gateway",
                "-o",
                r#"jsonpath={.metadata.annotations.vpn\.cloudraya\.com/public-key}"#,
            ])
            .ok()?;
        (key.trim() == public_key).then_some(())
    });
    ensure!(
        published.is_some(),
        "the gateway did not annotate its Service\n{}",
        gw.output_tails()
    );
    sb.apply(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kuberaya-config\n  namespace: kuberaya-system\ndata:\n  service-cidr: 127.97.{}.0/24\n",
        sb.net
    ))?;
    sb.apply(&no_annotations(service_yaml(
        "shop",
        "web",
        "LoadBalancer",
        80,
        "TCP",
        none,
    )))?;
    sb.apply(&no_annotations(service_yaml(
        "shop", "debug", "NodePort", 8080, "TCP", none,
    )))?;

    // peer add: 0600 config, public key only in the cluster.
    let out_dir = sb.dir.path().join("peers");
    std::fs::create_dir_all(&out_dir)?;
    let alice_conf = out_dir.join("alice.conf");
    let out = sb.cli(&[
        "peer",
        "add",
        "alice",
        "--allow",
        "shop/web:80",
        "--out",
        alice_conf.to_str().expect("utf-8"),
        "--timeout",
        "60",
    ]);
    ensure!(
        out.status.success(),
        "peer add alice: {}\n{}",
        text(&out),
        gw.output_tails()
    );
    let conf = std::fs::read_to_string(&alice_conf)?;
    let mode = std::fs::metadata(&alice_conf)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "mode {mode:o}");
    let private = conf
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .context("PrivateKey")?
        .to_string();
    ensure!(conf.contains(&format!("Endpoint = {gw_ip}:51820")), "{conf}");
    ensure!(conf.contains(&format!("PublicKey = {public_key}")), "{conf}");
    ensure!(
        conf.contains(&format!("AllowedIPs = 127.97.{}.0/24, {tunnel}/32", sb.net)),
        "{conf}"
    );
    ensure!(
        conf.contains(&format!("DNS = {tunnel}, kuberaya-system.svc.cluster.local")),
        "{conf}"
    );
    ensure!(conf.contains("PersistentKeepalive = 25"), "{conf}");
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains(&private),
        "private key printed"
    );
    let peer = sb.kubectl(&["get", "vpnpeers", "-n", "kuberaya-system", "alice", "-o", "json"])?;
    ensure!(!peer.contains(&private), "the private key reached the cluster: {peer}");
    let v: Value = serde_json::from_str(&peer)?;
    ensure!(v["spec"]["publicKey"].as_str().is_some_and(|k| k.len() == 44), "{peer}");
    ensure!(
        jq(
            r#".status.conditions[] | select(.type=="Accepted") | .status"#,
            peer.as_bytes()
        )? == "True"
    );

    // A team peer with a preshared key.
    let bob_conf = out_dir.join("bob.conf");
    let out = sb.cli(&[
        "peer",
        "add",
        "-n",
        "shop",
        "bob",
        "--allow",
        "shop",
        "--psk",
        "--expires",
        "30d",
        "--out",
        bob_conf.to_str().expect("utf-8"),
    ]);
    ensure!(out.status.success(), "peer add bob: {}", text(&out));
    ensure!(std::fs::read_to_string(&bob_conf)?.contains("PresharedKey = "));
    sb.kubectl(&["get", "secret", "-n", "shop", "bob-psk"])?;

    // list and audit, as JSON through jq.
    let out = sb.cli(&["peer", "list", "-A", "-o", "json"]);
    ensure!(out.status.success(), "peer list: {}", text(&out));
    ensure!(jq("[.items[].name] | join(\",\")", &out.stdout)? == "alice,bob");
    let out = sb.cli(&["peer", "list", "-A"]);
    ensure!(
        String::from_utf8_lossy(&out.stdout).starts_with("NAMESPACE"),
        "{}",
        text(&out)
    );
    let out = sb.cli(&["expose", "audit", "-o", "json"]);
    ensure!(out.status.success(), "audit: {}", text(&out));
    ensure!(
        jq(r#".findings[] | select(.kind=="nodeport") | .name"#, &out.stdout)? == "debug",
        "{}",
        text(&out)
    );
    ensure!(
        jq(
            r#"[.findings[] | select(.kind=="loadbalancer") | .name] | sort | join(",")"#,
            &out.stdout
        )? == "kuberaya-gateway,web"
    );
    ensure!(
        jq(
            r#".findings[] | select(.name=="alice") | .reach[0].service + ":" + (.reach[0].ports[0].port|tostring)"#,
            &out.stdout
        )? == "web:80"
    );
    ensure!(
        jq(
            r#".findings[] | select(.name=="bob") | [.reach[].service] | sort | join(",")"#,
            &out.stdout
        )? == "debug,web"
    );
    let out = sb.cli(&["expose", "audit", "--fail-on", "nodeport"]);
    ensure!(out.status.code() == Some(1), "fail-on nodeport: {}", text(&out));
    let out = sb.cli(&["expose", "audit", "--fail-on", "expired"]);
    ensure!(out.status.code() == Some(0), "fail-on expired: {}", text(&out));

    // Bad input: one line, non-zero, nothing created.
    let out = sb.cli(&["peer", "add", "carol", "--allow", "shop/web:http_x"]);
    ensure!(
        out.status.code() == Some(2),
        "malformed --allow is a usage error: {}",
        text(&out)
    );
    let out = sb.cli(&["peer", "add", "-n", "nowhere", "carol", "--allow", "nowhere"]);
    one_clear_line(&out)?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("nowhere"),
        "{}",
        text(&out)
    );
    let out = sb.cli(&["peer", "add", "-n", "shop", "carol", "--allow", "kuberaya-system"]);
    one_clear_line(&out)?;
    let peers = sb.kubectl(&["get", "vpnpeers", "-A", "-o", "json"])?;
    ensure!(
        jq(".items | length", peers.as_bytes())? == "2",
        "nothing half-created: {peers}"
    );
    ensure!(!std::path::Path::new("carol.conf").exists());
    let bad_kc = sb.dir.path().join("bad-kubeconfig");
    std::fs::write(
        &bad_kc,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: https://127.0.0.1:1\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: x\ncurrent-context: x\nusers:\n- name: x\n  user:\n    token: t\n",
    )?;
    let out = Command::new(binary("kuberaya"))
        .args(["peer", "list", "--kubeconfig"])
        .arg(&bad_kc)
        .output()?;
    one_clear_line(&out)?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the cluster"),
        "{}",
        text(&out)
    );

    // --context: a kubeconfig whose current context is that unreachable server, and whose
    // second context is the sandbox. Without the flag the CLI uses the current context and
    // says where it could not connect; with `--context sandbox` it lists the sandbox's peers.
    let two_kc = sb.dir.path().join("two-contexts");
    std::fs::copy(sb.kubeconfig(), &two_kc)?;
    let kc = two_kc.to_str().expect("utf-8");
    let sandbox_context = sb.kubectl(&["config", "current-context"])?.trim().to_string();
    for args in [
        vec!["config", "set-cluster", "broken", "--server", "https://127.0.0.1:1"],
        vec!["config", "set-credentials", "broken", "--token", "t"],
        vec![
            "config",
            "set-context",
            "broken",
            "--cluster",
            "broken",
            "--user",
            "broken",
        ],
        vec!["config", "rename-context", &sandbox_context, "sandbox"],
        vec!["config", "use-context", "broken"],
    ] {
        let out = Command::new("kubectl")
            .args(&args)
            .args(["--kubeconfig", kc])
            .output()?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    }
    let kuberaya_two = |extra: &[&str]| {
        Command::new(binary("kuberaya"))
            .args(["peer", "list", "-A", "-o", "json", "--kubeconfig", kc])
            .args(extra)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
    };
    let out = kuberaya_two(&[])?;
    one_clear_line(&out)?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the cluster at https://127.0.0.1:1"),
        "without --context: the current context\n{}",
        text(&out)
    );
    let out = kuberaya_two(&["--context", "sandbox"])?;
    ensure!(out.status.success(), "--context sandbox: {}", text(&out));
    ensure!(
        jq("[.items[].name] | join(\",\")", &out.stdout)? == "alice,bob",
        "--context sandbox lists the sandbox's peers: {}",
        text(&out)
    );
    let out = kuberaya_two(&["--context", "nowhere"])?;
    one_clear_line(&out)?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("nowhere"),
        "an unknown context is named: {}",
        text(&out)
    );

    // Rejected by the gateway (an address outside its range): the reason and message of
    // its Accepted=False condition, a non-zero exit, and the peer removed again.
    let out = sb.cli(&["peer", "add", "carol", "--address", "192.0.2.7", "--out", "-"]);
    one_clear_line(&out)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && err.contains("the gateway rejected peer carol: AddressOutsideRange: ")
            && err.contains("nothing was kept"),
        "{}",
        text(&out)
    );
    ensure!(
        sb.kubectl(&["get", "vpnpeers", "-n", "kuberaya-system", "carol"])
            .is_err(),
        "the rejected peer is removed again"
    );

    // disable, remove.
    let out = sb.cli(&["peer", "disable", "alice"]);
    ensure!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("spec.disabled false -> true"));
    // Disabled: once the gateway has cut it off, no address in use; the list shows the
    // last one, not in use.
    let alice_address = v["status"]["address"].as_str().context("alice's address")?.to_string();
    let cut_off = poll_until_blocking(Duration::from_secs(30), || {
        let status = sb
            .kubectl(&[
                "get",
                "vpnpeer",
                "-n",
                "kuberaya-system",
                "alice",
                "-o",
                "jsonpath={.status}",
            ])
            .ok()?;
        let status: Value = serde_json::from_str(&status).ok()?;
        (status.get("address").is_none_or(Value::is_null) && status["lastAddress"].is_string()).then_some(())
    });
    ensure!(cut_off.is_some(), "alice still has an address\n{}", gw.output_tails());
    let out = sb.cli(&["peer", "list", "-o", "json"]);
    ensure!(out.status.success(), "peer list: {}", text(&out));
    let shown = jq(
        r#".items[] | select(.name=="alice") | "\(.address) \(.lastAddress) \(.state)""#,
        &out.stdout,
    )?;
    ensure!(shown == format!("null {alice_address} Disabled"), "{shown}");
    let out = sb.cli(&["peer", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with("alice") && l.contains(&format!("{alice_address} (not in use)"))),
        "{table}"
    );
    let out = sb.cli(&["peer", "remove", "-n", "shop", "bob"]);
    ensure!(out.status.success(), "remove: {}", text(&out));
    ensure!(
        sb.kubectl(&["get", "secret", "-n", "shop", "bob-psk"]).is_err(),
        "psk Secret removed"
    );
    gw.stop();
    Ok(())
}

#[test]
fn load_balancers_list_describe_orphans() -> Result<()> {
    use kuberaya_ccm::platform::{
        Algorithm, HttpPlatform, LABEL_CLUSTER_ID, LABEL_SERVICE_NAME, LABEL_SERVICE_NAMESPACE, LABEL_SERVICE_UID,
        Labels, LoadBalancerSpec, Platform, PlatformClientConfig, Rule, RuleProtocol,
    };
    let sb = Sandbox::up()?;
    sb.kubectl(&["create", "namespace", "shop"])?;
    sb.apply(
        &service_yaml("shop", "web", "LoadBalancer", 80, "TCP", "    {}").replace("  annotations:\n    {}\n", ""),
    )?;
    let uid = sb.kubectl(&["get", "svc", "-n", "shop", "web", "-o", "jsonpath={.metadata.uid}"])?;
    let cluster = sb.env["KUBERAYA_CLUSTER_ID"].clone();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let platform = HttpPlatform::new(PlatformClientConfig::new(
        &sb.env["CLOUDRAYA_API_URL"],
        &sb.env["CLOUDRAYA_EMAIL"],
        &sb.env["CLOUDRAYA_PASSWORD"],
    ))?;
    let labels = |name: &str, uid: &str| {
        Labels::from([
            (LABEL_CLUSTER_ID.to_string(), cluster.clone()),
            (LABEL_SERVICE_UID.to_string(), uid.to_string()),
            (LABEL_SERVICE_NAMESPACE.to_string(), "shop".to_string()),
            (LABEL_SERVICE_NAME.to_string(), name.to_string()),
        ])
    };
    let spec = |name: &str, uid: &str| LoadBalancerSpec {
        name: format!("shop-{name}"),
        public_ip_id: None,
        public_ipv6_id: None,
        ip_versions: None,
        labels: labels(name, uid),
        rules: vec![Rule {
            name: "p".into(),
            protocol: RuleProtocol::Tcp,
            public_port: 80,
            private_port: 30080,
            algorithm: Algorithm::RoundRobin,
            allowed_sources: vec![],
            health_check: None,
        }],
        backends: vec![],
    };
    sb.apply(
        &service_yaml("shop", "internal", "ClusterIP", 80, "TCP", "    {}").replace("  annotations:\n    {}\n", ""),
    )?;
    let internal_uid = sb.kubectl(&["get", "svc", "-n", "shop", "internal", "-o", "jsonpath={.metadata.uid}"])?;
    let rt = tokio::runtime::Runtime::new()?;
    let (web, gone, internal, hand) = rt.block_on(async {
        let web = platform.create_load_balancer(&cluster, &spec("web", &uid)).await?;
        let gone = platform
            .create_load_balancer(&cluster, &spec("gone", "no-such-uid"))
            .await?;
        // Its Service exists but is ClusterIP and has no finalizer: nothing will clean up.
        let internal = platform
            .create_load_balancer(&cluster, &spec("internal", &internal_uid))
            .await?;
        // This cluster's label and no Service UID: not the CCM's, never deleted.
        let mut by_hand = spec("hand", "-");
        by_hand.labels = Labels::from([(LABEL_CLUSTER_ID.to_string(), cluster.clone())]);
        let hand = platform.create_load_balancer(&cluster, &by_hand).await?;
        anyhow::Ok((web, gone, internal, hand))
    })?;
    let web_ip = rt
        .block_on(async {
            for _ in 0..100 {
                let lb = platform.get_load_balancer(&cluster, &web.id).await?;
                if let Some(ip) = lb.public_ip.filter(|_| lb.status.as_str() == "active") {
                    return anyhow::Ok(Some(ip.address.to_string()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(None)
        })?
        .context("LB active with an IP")?;

    let out = sb.cli(&["lb", "list", "-o", "json"]);
    ensure!(out.status.success(), "lb list: {}", text(&out));
    ensure!(jq(r#".items[] | select(.service=="web") | .publicIp"#, &out.stdout)? == web_ip);
    ensure!(
        jq(
            r#".items[] | select(.service=="web") | "\(.healthyBackends)/\(.backends)""#,
            &out.stdout
        )? == "0/0"
    );
    let out = sb.cli(&["lb", "list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        table.starts_with("SERVICE")
            && table
                .lines()
                .any(|l| l.starts_with("shop/web ") && l.contains(&format!("{web_ip}:80/tcp")) && l.contains("0/0")),
        "{}",
        text(&out)
    );
    let out = sb.cli(&["lb", "describe", "shop/web", "-o", "json"]);
    ensure!(out.status.success(), "describe: {}", text(&out));
    ensure!(jq(".loadBalancer.id", &out.stdout)? == web.id);
    ensure!(
        jq(
            ".problems | map(select(contains(\"no backends\"))) | length",
            &out.stdout
        )? == "1"
    );
    let out = sb.cli(&["lb", "describe", "shop/web"]);
    ensure!(String::from_utf8_lossy(&out.stdout).contains(&web.id), "{}", text(&out));

    let out = sb.cli(&["lb", "orphans", "-o", "json"]);
    ensure!(out.status.success(), "orphans: {}", text(&out));
    let mut orphans = vec![gone.id.clone(), internal.id.clone()];
    orphans.sort();
    ensure!(
        jq("[.items[].id] | sort | join(\",\")", &out.stdout)? == orphans.join(","),
        "{}",
        text(&out)
    );
    ensure!(
        jq("[.unknown[].id] | join(\",\")", &out.stdout)? == hand.id,
        "{}",
        text(&out)
    );
    let table = String::from_utf8_lossy(&sb.cli(&["lb", "orphans"]).stdout).into_owned();
    ensure!(
        table.contains("Unknown: not created by the CCM") && table.contains(&hand.id),
        "{table}"
    );
    let out = sb.cli(&["lb", "orphans", "--delete"]);
    one_clear_line(&out)?;
    ensure!(String::from_utf8_lossy(&out.stderr).contains("--yes"), "{}", text(&out));

    // The CCM's sweep, on the same platform state, deletes exactly the orphans the CLI
    // listed: it runs at the CCM's start.
    let state = tempfile::tempdir()?;
    let config = state.path().join("cloud-config.yaml");
    kuberaya_e2e::ccm::write_cloud_config(&config, &sb.env["CLOUDRAYA_API_URL"], &cluster)?;
    let mut ccm = kuberaya_e2e::ccm::Ccm::spawn_with(
        sb.kubeconfig(),
        &config,
        (&sb.env["CLOUDRAYA_EMAIL"], &sb.env["CLOUDRAYA_PASSWORD"]),
        "info",
        &[],
    )?;
    ccm.wait_leader(Duration::from_secs(30))?;
    let swept = poll_until_blocking(Duration::from_secs(20), || {
        (ccm.metric("kuberaya_ccm_orphans_deleted_total")? >= 2.0).then_some(())
    });
    // Anything more it would delete is deleted by now too (one sweep, one pass).
    std::thread::sleep(Duration::from_secs(1));
    let left = rt.block_on(platform.list_load_balancers(&cluster, &Labels::new()))?;
    drop(ccm);
    ensure!(swept.is_some(), "the CCM's orphan sweep did not delete 2 LBs: {left:?}");
    let mut deleted_by_ccm: Vec<String> = [&web, &gone, &internal, &hand]
        .iter()
        .filter(|lb| !left.iter().any(|l| l.id == lb.id && l.status.as_str() != "deleting"))
        .map(|lb| lb.id.clone())
        .collect();
    deleted_by_ccm.sort();
    ensure!(
        deleted_by_ccm == orphans,
        "the CCM deleted {deleted_by_ccm:?}, the CLI listed {orphans:?} as orphans"
    );

    // A new orphan for the CLI to delete: `--delete --yes` takes it and leaves the unknown.
    let gone2 = rt.block_on(platform.create_load_balancer(&cluster, &spec("gone2", "no-such-uid-2")))?;
    let out = sb.cli(&["lb", "orphans", "--delete", "--yes"]);
    ensure!(out.status.success(), "orphans --delete --yes: {}", text(&out));
    let left = rt.block_on(platform.list_load_balancers(&cluster, &Labels::new()))?;
    let alive = |id: &str| left.iter().any(|lb| lb.id == id && lb.status.as_str() != "deleting");
    ensure!(!alive(&gone2.id), "orphan deleted: {left:?}");
    ensure!(alive(&web.id), "web kept");
    ensure!(alive(&hand.id), "the LB not created by the CCM kept: {left:?}");

    // Bad platform credentials: one line, non-zero.
    let out = sb.cli_env(&["lb", "list"], &[("CLOUDRAYA_PASSWORD", "wrong")]);
    one_clear_line(&out)?;
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("CLOUDRAYA_PASSWORD"),
        "{}",
        text(&out)
    );
    Ok(())
}

//! What a running sandbox says about itself: `sandbox status` (the runtime file and the
//! platform stand-in's `/_sandbox/state`) and `sandbox env` (`export` lines).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::state::{running_runtime, state_dir};
use super::{StateDirArg, StatusArgs};
use crate::output::{OutputFormat, table};

/// `sandbox env`: `export` lines for the running sandbox's platform API and cluster.
pub(super) fn env(arg: StateDirArg) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&arg)?;
    let Some(rt) = running_runtime(&dir)? else {
        bail!(
            "no sandbox is running in {}; start one with `kuberaya sandbox up --detach`",
            dir.display()
        );
    };
    println!("export CLOUDRAYA_API_URL={}", shell_quote(&rt.platform_url));
    println!("export CLOUDRAYA_EMAIL={}", shell_quote(&rt.email));
    println!("export CLOUDRAYA_PASSWORD={}", shell_quote(&rt.password));
    println!("export KUBERAYA_CLUSTER_ID={}", shell_quote(&rt.cluster_id));
    if let Some(kubeconfig) = &rt.kubeconfig {
        println!("export KUBECONFIG={}", shell_quote(&kubeconfig.display().to_string()));
    }
    Ok(ExitCode::SUCCESS)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:@%+=,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `sandbox status`: whether it runs, and its VMs and load balancers from the platform stand-in.
pub(super) async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = state_dir(&args.dir)?;
    let Some(rt) = running_runtime(&dir)? else {
        match args.output {
            OutputFormat::Json => println!("{}", serde_json::json!({"running": false, "state_dir": dir})),
            OutputFormat::Table => println!("no sandbox is running in {}", dir.display()),
        }
        return Ok(ExitCode::from(1));
    };
    let state = fetch_state(&rt.platform_url).await;
    let mut gateways = Vec::new();
    for r in &rt.gateway_replicas {
        gateways.push(replica_status(r).await);
    }
    let gateways_ok = gateways.iter().all(|g| g.error.is_none() && g.ready);
    match args.output {
        OutputFormat::Json => {
            let doc = serde_json::json!({
                "running": true,
                "state_dir": dir,
                "pid": rt.pid,
                "platform_url": rt.platform_url,
                "cluster_id": rt.cluster_id,
                "ip_families": rt.ip_family.families(),
                "platform": state.as_ref().ok(),
                "platform_error": state.as_ref().err().map(|e| format!("{e:#}")),
                "gateway_replicas": gateways,
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        OutputFormat::Table => {
            println!("sandbox running in {} (pid {})", dir.display(), rt.pid);
            println!(
                "platform API: {}   cluster: {}   IP families: {}",
                rt.platform_url,
                rt.cluster_id,
                rt.ip_family.families().join(", ")
            );
            match &state {
                Ok(state) => print_state_tables(state),
                Err(e) => println!("the platform stand-in does not answer: {e:#}"),
            }
            if !gateways.is_empty() {
                println!();
                print!("{}", gateway_table(&gateways));
            }
        }
    }
    // A replica that does not answer, or is not ready, is a failed part.
    Ok(if state.is_ok() && gateways_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A gateway replica as its own endpoints report it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct ReplicaStatus {
    name: String,
    udp: std::net::SocketAddr,
    /// It holds the gateway Lease: it writes peers' status.
    leader: bool,
    ready: bool,
    peers: u64,
    error: Option<String>,
}

async fn replica_status(r: &super::state::GatewayReplica) -> ReplicaStatus {
    let mut s = ReplicaStatus {
        name: r.name.clone(),
        udp: r.udp,
        leader: false,
        ready: false,
        peers: 0,
        error: None,
    };
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(5)).build() {
        Ok(c) => c,
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    let metrics = async {
        client
            .get(format!("http://{}/metrics", r.metrics))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    };
    match metrics.await {
        Ok(text) => {
            s.leader = metric(&text, "kuberaya_gateway_leader ") == Some(1.0);
            s.peers = metric(&text, "kuberaya_gateway_peers{state=\"accepted\"} ").unwrap_or(0.0) as u64;
        }
        Err(e) => s.error = Some(format!("metrics: {e}")),
    }
    s.ready = client
        .get(format!("http://{}/readyz", r.health))
        .send()
        .await
        .is_ok_and(|resp| resp.status().is_success());
    s
}

/// The value of the sample line starting with `prefix` (name and labels, then a space).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn gateway_table(replicas: &[ReplicaStatus]) -> String {
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.udp.to_string(),
                if g.leader { "yes" } else { "no" }.into(),
                if g.ready { "yes" } else { "no" }.into(),
                g.peers.to_string(),
                g.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &["gateway replica", "udp", "writes status", "ready", "peers", "error"],
        &rows,
    )
}

async fn fetch_state(url: &str) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let resp = client.get(format!("{url}/_sandbox/state")).send().await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("the control API did not answer JSON")?;
    if !status.is_success() {
        bail!("control API answered {status}: {}", body["error"]);
    }
    Ok(body["data"].clone())
}

fn str_of(v: &serde_json::Value, key: &str) -> String {
    match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_state_tables(state: &serde_json::Value) {
    let vms: Vec<Vec<String>> = state["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|vm| {
            vec![
                str_of(vm, "name"),
                str_of(vm, "id"),
                str_of(vm, "state"),
                str_of(vm, "private_ip"),
                str_of(vm, "public_ip"),
            ]
        })
        .collect();
    println!();
    print!("{}", table(&["vm", "id", "state", "private ip", "public ip"], &vms));
    let lbs: Vec<Vec<String>> = state["load_balancers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|lb| {
            let ports: Vec<String> = lb["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| format!("{}/{}", r["public_port"], str_of(r, "protocol")))
                .collect();
            vec![
                str_of(lb, "name"),
                str_of(lb, "id"),
                str_of(lb, "status"),
                lb["public_ip"]["address"].as_str().unwrap_or("-").to_string(),
                ports.join(","),
            ]
        })
        .collect();
    println!();
    if lbs.is_empty() {
        println!("no load balancers yet");
    } else {
        print!(
            "{}",
            table(&["load balancer", "id", "status", "public ip", "ports"], &lbs)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_metrics_are_read_by_exact_name() {
        let text = "# HELP kuberaya_gateway_leader x\nkuberaya_gateway_leader 1\nkuberaya_gateway_leader_other 5\nkuberaya_gateway_peers{state=\"accepted\"} 3\nkuberaya_gateway_peers{state=\"rejected\"} 1\n";
        assert_eq!(metric(text, "kuberaya_gateway_leader "), Some(1.0));
        assert_eq!(metric(text, "kuberaya_gateway_peers{state=\"accepted\"} "), Some(3.0));
        assert_eq!(metric(text, "kuberaya_gateway_missing "), None);
        let t = gateway_table(&[ReplicaStatus {
            name: "kuberaya-gateway-0".into(),
            udp: "127.244.255.254:51820".parse().unwrap(),
            leader: true,
            ready: true,
            peers: 3,
            error: None,
        }]);
        let t = t.to_lowercase();
        assert!(
            t.contains("kuberaya-gateway-0") && t.contains("yes") && t.contains("writes status"),
            "{t}"
        );
    }

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}

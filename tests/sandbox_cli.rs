//! `kuberaya sandbox up|status|env|down` as a user runs them, with real `curl` against the
//! platform API the sandbox serves.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::sandbox::{output_text as text, parse_exports};
use kuberaya_e2e::{Process, binary, unique_net_index};
use serde_json::Value;

fn kuberaya(args: &[&str]) -> Result<Output> {
    Command::new(binary("kuberaya"))
        .args(args)
        .output()
        .context("running kuberaya")
}

fn ranges() -> (String, String) {
    let n = unique_net_index();
    (format!("127.203.{n}.0/24"), format!("127.10.{n}.0/24"))
}

#[test]
fn detached_sandbox_serves_the_platform_and_stops_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("sb");
    let state_s = state.to_str().context("utf-8 path")?;
    let (public, vm) = ranges();

    let up_detached = || {
        kuberaya(&[
            "sandbox",
            "up",
            "--detach",
            "--state-dir",
            state_s,
            "--public-ip-range",
            &public,
            "--vm-ip-range",
            &vm,
        ])
    };
    let up = up_detached()?;
    ensure!(up.status.success(), "sandbox up --detach failed: {}", text(&up));
    let out = String::from_utf8_lossy(&up.stdout);
    assert!(out.contains("kuberaya sandbox env"), "up prints how to use it: {out}");

    // A second sandbox in the same directory is refused with a clear message.
    let again = kuberaya(&["sandbox", "up", "--detach", "--state-dir", state_s])?;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already running"),
        "{}",
        text(&again)
    );

    // status -o json: running, three worker VMs from our range.
    let st = kuberaya(&["sandbox", "status", "--state-dir", state_s, "-o", "json"])?;
    ensure!(st.status.success(), "status: {}", text(&st));
    let doc: Value = serde_json::from_slice(&st.stdout)?;
    assert_eq!(doc["running"], true);
    let vms = doc["platform"]["vms"].as_array().context("status lists VMs")?;
    assert_eq!(vms.len(), 3, "{doc}");
    let prefix = vm.trim_end_matches("0/24");
    assert!(
        vms.iter()
            .all(|v| v["private_ip"].as_str().is_some_and(|ip| ip.starts_with(prefix))),
        "{doc}"
    );

    // env: the exported credentials log in with real curl.
    let env = kuberaya(&["sandbox", "env", "--state-dir", state_s])?;
    ensure!(env.status.success(), "env: {}", text(&env));
    let vars = parse_exports(&String::from_utf8_lossy(&env.stdout));
    let get = |k: &str| {
        vars.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("{k} exported"))
    };
    let url = get("CLOUDRAYA_API_URL")?;
    let body =
        serde_json::json!({"email": get("CLOUDRAYA_EMAIL")?, "password": get("CLOUDRAYA_PASSWORD")?}).to_string();
    assert_eq!(get("KUBERAYA_CLUSTER_ID")?, "cl-sandbox");
    let curl = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
        ])
        .arg(format!("{url}/core/v1/auth/login"))
        .output()?;
    let login: Value = serde_json::from_slice(&curl.stdout).with_context(|| text(&curl))?;
    assert_eq!(login["code"], 200, "{login}");
    assert!(
        login["data"]["token"]
            .as_str()
            .is_some_and(|t| t.split('.').count() == 3),
        "a JWT-shaped token: {login}"
    );

    // down: nothing left listening; status says so with exit code 1.
    let down = kuberaya(&["sandbox", "down", "--state-dir", state_s])?;
    ensure!(down.status.success(), "down: {}", text(&down));
    let addr = url.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(1)).is_err(),
        "the platform API is gone after down"
    );
    let st = kuberaya(&["sandbox", "status", "--state-dir", state_s])?;
    assert_eq!(st.status.code(), Some(1), "{}", text(&st));
    let env = kuberaya(&["sandbox", "env", "--state-dir", state_s])?;
    assert!(
        !env.status.success() && String::from_utf8_lossy(&env.stderr).contains("no sandbox is running"),
        "{}",
        text(&env)
    );

    // Up again: same state (same VMs), then down --purge removes it.
    let up = up_detached()?;
    ensure!(up.status.success(), "second up: {}", text(&up));
    let st = kuberaya(&["sandbox", "status", "--state-dir", state_s, "-o", "json"])?;
    let doc2: Value = serde_json::from_slice(&st.stdout)?;
    let ids = |d: &Value| -> Vec<String> {
        d["platform"]["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["id"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(ids(&doc), ids(&doc2), "the platform's state survives a restart");
    let down = kuberaya(&["sandbox", "down", "--purge", "--state-dir", state_s])?;
    ensure!(down.status.success(), "down --purge: {}", text(&down));
    assert!(!state.exists(), "--purge deletes the state directory");
    Ok(())
}

#[test]
fn foreground_sandbox_stops_on_ctrl_c() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("fg");
    let state_s = state.to_str().context("utf-8 path")?.to_string();
    let (public, vm) = ranges();
    let mut up = Process::start(
        "kuberaya",
        [
            "sandbox",
            "up",
            "--state-dir",
            &state_s,
            "--public-ip-range",
            &public,
            "--vm-ip-range",
            &vm,
        ],
    )?;
    let line = up.wait_for_stdout_line("Platform API: ", Duration::from_secs(30))?;
    let url = line
        .trim_start_matches("Platform API: ")
        .split_whitespace()
        .next()
        .context("url")?
        .to_string();
    up.signal(libc::SIGINT);
    let stopped = kuberaya_e2e::poll_until_blocking(Duration::from_secs(10), || (!up.is_running()).then_some(()));
    assert!(stopped.is_some(), "Ctrl-C stops the sandbox: {}", up.output_tails());
    assert!(up.stderr().contains("sandbox stopped"), "{}", up.output_tails());
    let addr = url.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(1)).is_err(),
        "nothing listens after Ctrl-C"
    );
    assert!(
        !state.join("sandbox.json").exists(),
        "a clean stop removes the runtime file"
    );
    Ok(())
}

/// `sandbox down --purge` of a state directory when dropped, however the test ends.
struct DownOnDrop(String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = kuberaya(&["sandbox", "down", "--purge", "--state-dir", &self.0]);
    }
}

/// The ranges a sandbox's state directory recorded (`ranges.json`).
fn recorded_ranges(state: &str) -> Result<Vec<ipnet::Ipv4Net>> {
    let doc: Value = serde_json::from_slice(&std::fs::read(format!("{state}/ranges.json"))?)?;
    ["publicIpRange", "vmIpRange", "serviceCidr", "podCidr"]
        .iter()
        .map(|k| Ok(doc[k].as_str().context("a range")?.parse()?))
        .collect()
}

/// Two sandboxes with default settings on one machine: the second takes ranges no running
/// sandbox holds and every part of it runs (kube-proxy listeners, the gateway behind its
/// LB); a third that names a range the first holds is refused, naming the flag.
#[test]
fn a_second_sandbox_gets_ranges_of_its_own_or_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, b, c) = (
        dir.path().join("a").display().to_string(),
        dir.path().join("b").display().to_string(),
        dir.path().join("c").display().to_string(),
    );
    let _down = (DownOnDrop(a.clone()), DownOnDrop(b.clone()), DownOnDrop(c.clone()));
    for state in [&a, &b] {
        let up = kuberaya(&["sandbox", "up", "--detach", "--state-dir", state])?;
        let out = text(&up);
        ensure!(up.status.success(), "sandbox up --state-dir {state}: {out}");
        ensure!(
            out.contains("ready in") && out.contains("gateway load balancer:") && !out.contains("! "),
            "{state}: every part runs: {out}"
        );
        let log = std::fs::read_to_string(format!("{state}/sandbox.log")).unwrap_or_default();
        ensure!(
            !log.contains("cannot listen"),
            "{state}: a kube-proxy listener failed:\n{log}"
        );
        let ingress = Command::new("kubectl")
            .args(["--kubeconfig", &format!("{state}/kubeconfig")])
            .args(["get", "service", "-n", "kuberaya-system", "kuberaya-gateway"])
            .args(["-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"])
            .output()?;
        ensure!(
            !String::from_utf8_lossy(&ingress.stdout).trim().is_empty(),
            "{state}: the gateway's Service has its LB: {}",
            text(&ingress)
        );
    }
    let (ra, rb) = (recorded_ranges(&a)?, recorded_ranges(&b)?);
    for x in &ra {
        for y in &rb {
            ensure!(
                !x.contains(&y.network()) && !y.contains(&x.network()),
                "{x} of one sandbox overlaps {y} of the other"
            );
        }
    }
    let service_cidr_of_a = ra[2].to_string();
    let clash = kuberaya(&[
        "sandbox",
        "up",
        "--detach",
        "--state-dir",
        &c,
        "--service-cidr",
        &service_cidr_of_a,
    ])?;
    let said = String::from_utf8_lossy(&clash.stderr).into_owned();
    ensure!(
        !clash.status.success(),
        "a clashing range was accepted: {}",
        text(&clash)
    );
    ensure!(
        said.contains(&format!("--service-cidr {service_cidr_of_a} overlaps")) && said.contains(&a),
        "the refusal names the flag and the sandbox holding the range: {said}"
    );
    Ok(())
}

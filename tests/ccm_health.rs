//! The CCM's `/healthz` (liveness) and `/readyz` (readiness), requested with the real
//! `curl` from the real `kuberaya-ccm` binary, as a kubelet's probes request them
//! (`deploy/ccm/deployment.yaml`): alive from the start; ready once it has reached the
//! platform and the API server and stands for the Lease, on the leader and on a standby
//! alike; not ready while its checks hang. Against a sandbox started with
//! `--external-ccm` (no CCM of its own, the Lease is free for the ones under test).

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::ccm::{Ccm, write_cloud_config};
use kuberaya_e2e::cloud::CloudSandbox;
use kuberaya_e2e::cluster::Cluster;
use kuberaya_e2e::sandbox::Ranges;
use kuberaya_e2e::{poll_until_blocking, unique_net_index};

/// `curl` of `url`: the status code and the body (`None`: no HTTP answer).
fn get(url: &str) -> Option<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "2", "-w", "\n%{http_code}", url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok().filter(|c| *c != 0)?, body.to_string()))
}

/// A replica against `sb` (or its cluster with the cloud config `config`), with its
/// health address.
fn spawn(sb: &CloudSandbox, config: &std::path::Path) -> Result<(Ccm, String)> {
    let (cmd, metrics) = Ccm::command(
        sb.kubeconfig(),
        config,
        (&sb.email, &sb.password),
        "info,kube_runtime=warn",
        &[],
    );
    let health = cmd
        .get_args()
        .skip_while(|a| *a != "--health-bind-address")
        .nth(1)
        .context("the harness gives the CCM a health address")?
        .to_string_lossy()
        .into_owned();
    Ok((Ccm::start(cmd, metrics)?, health))
}

/// Waits (bounded) until `url` answers `code`; returns the last answer.
fn wait_answer(url: &str, code: u16) -> Option<(u16, String)> {
    let mut last = None;
    poll_until_blocking(Duration::from_secs(20), || {
        last = get(url);
        last.as_ref().filter(|(c, _)| *c == code).cloned()
    })
    .or(last)
}

#[test]
fn healthz_and_readyz_answer_on_the_leader_the_standby_and_a_ccm_still_checking() -> Result<()> {
    let n = unique_net_index();
    // Services in 127.93.N.0/24: clear of the other test files' and of the ranges a
    // sandbox picks for itself (127.96.0.0/16, then 127.97.0.0/16, ...).
    let ranges = Ranges {
        service_cidr: format!("127.93.{n}.0/24"),
        ..Ranges::standard(n)
    };
    let sb = CloudSandbox::up(&ranges, &["--nodes", "1", "--external-ccm"], 1)?;
    let config = sb.state().join("cloud-config.yaml");
    write_cloud_config(&config, &sb.url, &sb.cluster_id)?;

    // The leader: alive and ready.
    let (mut leader, leader_health) = spawn(&sb, &config)?;
    leader.wait_leader(Duration::from_secs(20))?;
    let healthz = format!("http://{leader_health}/healthz");
    let readyz = format!("http://{leader_health}/readyz");
    ensure!(
        get(&healthz) == Some((200, "ok".into())),
        "the leader's /healthz: {:?}\n{}",
        get(&healthz),
        leader.process.output_tails()
    );
    ensure!(
        wait_answer(&readyz, 200) == Some((200, "ok".into())),
        "the leader's /readyz: {:?}\n{}",
        get(&readyz),
        leader.process.output_tails()
    );
    ensure!(leader.metric("kuberaya_ccm_leader") == Some(1.0), "the leader's gauge");

    // A standby (the Lease is held): alive and ready too, so that a two-replica
    // Deployment finishes its rollout; it does not lead.
    let (mut standby, standby_health) = spawn(&sb, &config)?;
    let ready = wait_answer(&format!("http://{standby_health}/readyz"), 200);
    ensure!(
        ready == Some((200, "ok".into())),
        "the standby's /readyz: {ready:?}\n{}",
        standby.process.output_tails()
    );
    ensure!(
        get(&format!("http://{standby_health}/healthz")) == Some((200, "ok".into())),
        "the standby's /healthz"
    );
    ensure!(
        standby.process.stdout().contains("waiting for leadership") && !standby.leads(),
        "the standby waits for the Lease\n{}",
        standby.process.output_tails()
    );
    ensure!(
        standby.metric("kuberaya_ccm_leader") == Some(0.0),
        "the standby's gauge"
    );
    ensure!(standby.process.is_running(), "the standby runs");

    // A CCM whose platform never answers (a listener nobody accepts on): alive, not ready.
    let silent = TcpListener::bind("127.0.0.1:0")?;
    let hung = sb.state().join("cloud-config-hung.yaml");
    std::fs::write(
        &hung,
        format!(
            "api_url: http://{}\ncluster_id: {}\ntimeout_s: 60\n",
            silent.local_addr()?,
            sb.cluster_id
        ),
    )?;
    let (mut checking, checking_health) = spawn(&sb, &hung)?;
    let alive = wait_answer(&format!("http://{checking_health}/healthz"), 200);
    ensure!(
        alive == Some((200, "ok".into())),
        "/healthz while the checks hang: {alive:?}\n{}",
        checking.process.output_tails()
    );
    let not_ready = get(&format!("http://{checking_health}/readyz"));
    ensure!(
        not_ready == Some((503, "not ready".into())),
        "/readyz while the checks hang: {not_ready:?}\n{}",
        checking.process.output_tails()
    );
    ensure!(
        checking.process.is_running() && !checking.leads(),
        "it is still checking"
    );
    checking.process.stop();

    // SIGTERM: the leader stops, its servers with it.
    leader.process.stop();
    ensure!(get(&healthz).is_none(), "nothing answers once the leader stopped");
    standby.process.stop();
    Ok(())
}

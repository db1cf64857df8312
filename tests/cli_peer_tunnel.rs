//! The peer lifecycle commands take effect on the tunnel itself: a peer made with
//! `kuberaya peer add` connects with the stock userspace client `onetun` through the
//! gateway's LoadBalancer (as in tests/sandbox_gateway.rs), and then
//!
//! - `peer rotate` writes a new config; the old key no longer gets through (neither the
//!   onetun that was running nor a fresh one), the new config does;
//! - `peer disable` cuts the running tunnel off, `peer enable` lets it through again;
//! - `peer remove` cuts it off within 2 s (measured).
//!
//! onetun 0.3.10 supports one TCP forward per process, so each tunnel is its own onetun
//! forwarding a local port to the `api` Service's ClusterIP ([`Tunnel`], in the harness).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use kuberaya_e2e::sandbox::{Sandbox, WgPeer, conf_value, onetun_path};
use kuberaya_e2e::tunnel::Tunnel;

#[test]
fn rotate_remove_disable_and_enable_take_effect_on_the_tunnel() -> Result<()> {
    eprintln!("using {}", onetun_path().display());
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let sandbox = Sandbox::up(&tmp.path().join("sandbox"), &[])?;
    let user = sandbox.user(&work);
    let api_ip = user.http_service("api")?;

    user.kuberaya_ok(&["peer", "add", "alice", "--allow", "default/api", "--out", "alice.conf"])?;
    let conf_path = work.join("alice.conf");
    let old_conf = std::fs::read_to_string(&conf_path)?;
    let old = WgPeer::from_conf(&old_conf);
    let first = Tunnel::open(&old, &api_ip);
    let took = first.wait_answers(Duration::from_secs(30), "after peer add");
    eprintln!("peer add: the tunnel answers after {took:?}");

    // Rotate: a new config replaces the old one, with a new key for the same peer.
    assert!(first.answers(), "a probe gets through before the rotation");
    let t0 = Instant::now();
    let printed = user.kuberaya_ok(&["peer", "rotate", "alice", "--out", "alice.conf"])?;
    let rotate_took = t0.elapsed();
    let t_rotated = Instant::now();
    ensure!(printed.contains("new key"), "peer rotate says what it did:\n{printed}");
    let new_conf = std::fs::read_to_string(&conf_path)?;
    assert_ne!(new_conf, old_conf, "peer rotate writes a new config");
    let new = WgPeer::from_conf(&new_conf);
    assert_ne!(new.private_key, old.private_key, "a new private key");
    assert_eq!(new.gateway_key, old.gateway_key, "the same gateway");
    assert_eq!(new.endpoint, old.endpoint, "the same endpoint");
    assert_eq!(conf_value(&new_conf, "AllowedIPs"), conf_value(&old_conf, "AllowedIPs"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&conf_path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the rewritten config stays private");
    }

    // The old key: the onetun that was running is cut off, and a fresh one never gets in.
    let rotate_cut = first.wait_cut_off(t_rotated, Duration::from_secs(5), "old key after rotate");
    first.stays_cut_off(3, "old key after rotate");
    let stale = Tunnel::open(&old, &api_ip);
    stale.stays_cut_off(4, "a fresh onetun with the old config");
    drop(stale);
    drop(first);

    // The new config works.
    let tunnel = Tunnel::open(&new, &api_ip);
    let new_took = tunnel.wait_answers(Duration::from_secs(30), "new config after rotate");

    // Disable cuts the running tunnel off; enable lets the same tunnel through again.
    assert!(tunnel.answers(), "a probe gets through before peer disable");
    let t0 = Instant::now();
    user.kuberaya_ok(&["peer", "disable", "alice"])?;
    let disable_cut = tunnel.wait_cut_off(t0, Duration::from_secs(5), "after peer disable");
    tunnel.stays_cut_off(3, "disabled");
    let listed = user.kuberaya_ok(&["peer", "list"])?;
    ensure!(
        listed.lines().any(|l| l.contains("alice") && l.contains("Disabled")),
        "a disabled peer is kept:\n{listed}"
    );
    let t0 = Instant::now();
    user.kuberaya_ok(&["peer", "enable", "alice"])?;
    tunnel.wait_answers(Duration::from_secs(45), "after peer enable");
    let enable_took = t0.elapsed();

    // Remove cuts the tunnel off within 2 s of the command returning.
    assert!(tunnel.answers(), "a probe gets through before peer remove");
    let t_cmd = Instant::now();
    user.kuberaya_ok(&["peer", "remove", "alice"])?;
    let t_removed = Instant::now();
    let remove_cut = tunnel.wait_cut_off(t_removed, Duration::from_secs(5), "after peer remove");
    tunnel.stays_cut_off(3, "removed");
    let shown = user.kuberaya(&["peer", "show", "alice"])?;
    assert!(!shown.status.success(), "the peer is gone");
    eprintln!(
        "figures: rotate command {rotate_took:?}, old key cut off {rotate_cut:?} after it; \
         new config answers after {new_took:?}; disable cut off after {disable_cut:?}; \
         enable answers again after {enable_took:?}; remove command {:?}, cut off {remove_cut:?} after it",
        t_removed - t_cmd
    );
    assert!(
        remove_cut <= Duration::from_secs(2),
        "peer remove: traffic stopped only {remove_cut:?} after the command returned"
    );
    assert!(
        disable_cut <= Duration::from_secs(2),
        "peer disable: traffic stopped only {disable_cut:?} after the command"
    );
    Ok(())
}

//! Bring your own key: `peer add --public-key` and `peer rotate --public-key` with a key
//! pair made by the real `wg` (as on the user's device), against the sandbox's gateway,
//! checked on the tunnel itself (onetun as the device):
//!
//! - the admin's side never sees the private key: the config is written without a
//!   `PrivateKey` line (a comment names the public key it belongs to), the VpnPeer holds the
//!   device's public key;
//! - completed with the device's private key, the config's tunnel works;
//! - `peer rotate --public-key` with the device's next key cuts the old key off, and the new
//!   completed config works; the same key again is refused;
//! - a malformed key is refused before anything is created.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::sandbox::{Sandbox, WgPeer, output_text};
use kuberaya_e2e::tunnel::Tunnel;

/// `wg genkey` and `wg pubkey`, as a user makes a key pair on their own device.
fn device_keypair() -> Result<(String, String)> {
    let private = Command::new("wg")
        .arg("genkey")
        .output()
        .context("wg genkey (wireguard-tools)")?;
    ensure!(private.status.success(), "wg genkey: {}", output_text(&private));
    let private = String::from_utf8(private.stdout)?.trim().to_string();
    let mut pubkey = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    pubkey.stdin.take().context("stdin")?.write_all(private.as_bytes())?;
    let out = pubkey.wait_with_output()?;
    ensure!(out.status.success(), "wg pubkey: {}", output_text(&out));
    Ok((private, String::from_utf8(out.stdout)?.trim().to_string()))
}

/// The config as the user completes it on the device: its private key added.
fn completed(conf: &str, private: &str) -> String {
    conf.lines()
        .map(|l| {
            if l.starts_with("# PrivateKey = ") {
                format!("PrivateKey = {private}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The written config has no private key, names the device's public key, and holds no
/// trace of `private`.
fn check_without_private_key(conf: &str, public: &str, private: &str) -> Result<()> {
    ensure!(
        !conf.lines().any(|l| l.trim_start().starts_with("PrivateKey")),
        "{conf}"
    );
    ensure!(
        conf.contains(&format!("# PrivateKey = <the private key of {public}")),
        "the config names the key to add:\n{conf}"
    );
    ensure!(!conf.contains(private), "the private key never reaches the admin");
    Ok(())
}

#[test]
fn a_key_made_on_the_device_never_leaves_it_and_its_tunnel_works() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let sandbox = Sandbox::up(&tmp.path().join("sandbox"), &[])?;
    let user = sandbox.user(&work);
    let api_ip = user.http_service("api")?;

    let (private, public) = device_keypair()?;
    let said = user.kuberaya_ok(&[
        "peer",
        "add",
        "erin",
        "--allow",
        "default/api",
        "--public-key",
        &public,
        "--out",
        "erin.conf",
    ])?;
    ensure!(
        said.contains("it has no PrivateKey"),
        "peer add says the key is the user's to add:\n{said}"
    );
    let conf = std::fs::read_to_string(work.join("erin.conf"))?;
    check_without_private_key(&conf, &public, &private)?;
    let held = user.kubectl(&[
        "get",
        "vpnpeer",
        "erin",
        "-n",
        "kuberaya-system",
        "-o",
        "jsonpath={.spec.publicKey}",
    ])?;
    ensure!(held.trim() == public, "the VpnPeer holds the device's key: {held}");

    // Completed on the device, the config works.
    let first = Tunnel::open(&WgPeer::from_conf(&completed(&conf, &private)), &api_ip);
    first.wait_answers(Duration::from_secs(30), "erin with her own key");

    // The device's next key: the old one is cut off, the new config works.
    let (private2, public2) = device_keypair()?;
    let t0 = Instant::now();
    user.kuberaya_ok(&["peer", "rotate", "erin", "--public-key", &public2, "--out", "erin.conf"])?;
    let conf2 = std::fs::read_to_string(work.join("erin.conf"))?;
    check_without_private_key(&conf2, &public2, &private2)?;
    first.wait_cut_off(t0, Duration::from_secs(20), "erin's old key after rotate");
    drop(first);
    let second = Tunnel::open(&WgPeer::from_conf(&completed(&conf2, &private2)), &api_ip);
    second.wait_answers(Duration::from_secs(30), "erin's rotated key");

    // The same key again is no rotation.
    let again = user.kuberaya(&["peer", "rotate", "erin", "--public-key", &public2, "--out", "-"])?;
    ensure!(!again.status.success(), "rotating to the current key is refused");
    ensure!(
        output_text(&again).contains("already has the key"),
        "{}",
        output_text(&again)
    );

    // A malformed key: refused before anything exists.
    let bad = user.kuberaya(&["peer", "add", "frank", "--public-key", "not-a-key", "--out", "-"])?;
    ensure!(!bad.status.success(), "a malformed key is refused");
    ensure!(output_text(&bad).contains("44 characters"), "{}", output_text(&bad));
    let none = user.kubectl(&["get", "vpnpeer", "-n", "kuberaya-system", "-o", "name"])?;
    ensure!(!none.contains("frank"), "nothing was created: {none}");
    Ok(())
}

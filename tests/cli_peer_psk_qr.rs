//! `peer add --qr` and `peer psk rotate` against the sandbox's real gateway, checked on
//! the tunnel itself (onetun as the peer, as in tests/cli_peer_tunnel.rs):
//!
//! - the QR code `peer add --psk --qr --out FILE` prints (Unicode half blocks) is turned
//!   back into modules and decoded with rqrr: it is exactly the config written to FILE,
//!   private and preshared key included;
//! - `peer psk rotate` of that peer (its Secret made by `peer add --psk` is rewritten): the
//!   running tunnel with the old preshared key is cut off, a fresh onetun with the old
//!   config never gets through, the rewritten config does;
//! - `peer psk rotate` of a peer added without one (a Secret is made and named in the
//!   peer): the same.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use kuberaya_e2e::sandbox::{Sandbox, User, WgPeer};
use kuberaya_e2e::tunnel::Tunnel;

/// The characters of a QR code drawn two modules a character (top and bottom half).
const HALF_BLOCKS: [char; 4] = [' ', '▀', '▄', '█'];

/// The QR code printed in `stdout`, decoded. `kuberaya` draws it for dark terminals: a
/// filled half is a light module, a blank one a dark module.
fn decode_qr(stdout: &str) -> Result<String> {
    let lines: Vec<Vec<char>> = stdout
        .lines()
        .map(|l| l.chars().collect::<Vec<char>>())
        .filter(|l| !l.is_empty() && l.iter().all(|c| HALF_BLOCKS.contains(c)))
        .collect();
    ensure!(!lines.is_empty(), "no QR code in the output:\n{stdout}");
    let width = lines[0].len();
    ensure!(
        lines.iter().all(|l| l.len() == width),
        "QR code lines of different widths:\n{stdout}"
    );
    // Two module rows a line; of an odd count, the last line's lower half is blank padding.
    let height = if lines.len() * 2 == width + 1 {
        width
    } else {
        lines.len() * 2
    };
    let light = |x: usize, y: usize| {
        let c = lines[y / 2][x];
        if y.is_multiple_of(2) {
            matches!(c, '▀' | '█')
        } else {
            matches!(c, '▄' | '█')
        }
    };
    // A few pixels a module, for the decoder's finder-pattern search.
    const SCALE: usize = 4;
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width * SCALE, height * SCALE, |x, y| {
        if light(x / SCALE, y / SCALE) { 255 } else { 0 }
    });
    let grids = image.detect_grids();
    ensure!(grids.len() == 1, "{} QR codes found in:\n{stdout}", grids.len());
    let (_, text) = grids[0].decode().map_err(|e| anyhow!("decoding the QR code: {e:?}"))?;
    Ok(text)
}

/// The `PresharedKey` of a wg-quick config, if it has one.
fn preshared_key(conf: &str) -> Option<String> {
    conf.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "PresharedKey")
        .map(|(_, v)| v.trim().to_string())
}

/// The config without its `PresharedKey` line.
fn without_psk(conf: &str) -> String {
    conf.lines()
        .filter(|l| !l.starts_with("PresharedKey"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `peer psk rotate NAME --config NAME.conf` while a tunnel with the current config is
/// up: the old preshared key stops getting through, the rewritten config gets through.
fn psk_rotation_takes_effect(user: &User, api_ip: &str, name: &str) -> Result<()> {
    let file = format!("{name}.conf");
    let path = user.work.join(&file);
    let old_conf = std::fs::read_to_string(&path)?;
    let old_psk = preshared_key(&old_conf);
    let peer = WgPeer::from_conf(&old_conf);
    let first = Tunnel::open_with_psk(&peer, api_ip, old_psk.as_deref());
    first.wait_answers(Duration::from_secs(30), &format!("{name} before psk rotate"));

    let t0 = Instant::now();
    let printed = user.kuberaya_ok(&["peer", "psk", "rotate", name, "--config", &file])?;
    let command_took = t0.elapsed();
    ensure!(
        printed.contains("new preshared key"),
        "peer psk rotate says what it did:\n{printed}"
    );
    let new_conf = std::fs::read_to_string(&path)?;
    let new_psk = preshared_key(&new_conf).context("psk rotate writes a PresharedKey")?;
    ensure!(Some(&new_psk) != old_psk.as_ref(), "{name}: a new preshared key");
    ensure!(
        without_psk(&new_conf) == without_psk(&old_conf),
        "{name}: only the PresharedKey line changes:\n{old_conf}\n---\n{new_conf}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{name}: the rewritten config stays private ({mode:o})");
    }

    // The gateway reads a new Secret reference at once and re-reads Secrets every 10 s.
    let cut = first.wait_cut_off(t0, Duration::from_secs(20), &format!("{name}: old preshared key"));
    first.stays_cut_off(3, &format!("{name}: old preshared key"));
    let stale = Tunnel::open_with_psk(&peer, api_ip, old_psk.as_deref());
    stale.stays_cut_off(4, &format!("{name}: a fresh onetun with the old config"));
    drop(stale);
    drop(first);

    let fresh = Tunnel::open_with_psk(&WgPeer::from_conf(&new_conf), api_ip, Some(&new_psk));
    let took = fresh.wait_answers(Duration::from_secs(30), &format!("{name}: new config"));
    eprintln!(
        "figures ({name}, {} preshared key before): psk rotate command {command_took:?}, old key cut off \
         {cut:?} after it started; the new config answers after {took:?}",
        if old_psk.is_some() { "a" } else { "no" }
    );
    Ok(())
}

#[test]
fn qr_decodes_to_the_config_and_psk_rotate_takes_effect_on_the_tunnel() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work)?;
    let sandbox = Sandbox::up(&tmp.path().join("sandbox"), &[])?;
    let user = sandbox.user(&work);
    let api_ip = user.http_service("api")?;

    // --qr: the code printed is the config written.
    let printed = user.kuberaya_ok(&[
        "peer",
        "add",
        "carol",
        "--allow",
        "default/api",
        "--psk",
        "--qr",
        "--out",
        "carol.conf",
    ])?;
    let written = std::fs::read_to_string(work.join("carol.conf"))?;
    ensure!(
        written.contains("PrivateKey = ") && preshared_key(&written).is_some(),
        "{written}"
    );
    let decoded = decode_qr(&printed)?;
    ensure!(
        decoded == written,
        "the QR code is not the config written:\n{decoded}\n---\n{written}"
    );

    // The peer's Secret exists: its key is replaced.
    psk_rotation_takes_effect(&user, &api_ip, "carol")?;

    // A peer without a preshared key gets one.
    user.kuberaya_ok(&["peer", "add", "dave", "--allow", "default/api", "--out", "dave.conf"])?;
    psk_rotation_takes_effect(&user, &api_ip, "dave")?;
    let secret = user.kubectl(&[
        "get",
        "vpnpeer",
        "dave",
        "-n",
        "kuberaya-system",
        "-o",
        "jsonpath={.spec.presharedKeySecretRef.name}",
    ])?;
    ensure!(
        secret.trim() == "dave-psk",
        "dave's peer names its new Secret: {secret:?}"
    );
    Ok(())
}

//! wireguard-go as a bench's reference peer, and the files and keys it takes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kuberaya_e2e::netns::{Netns, in_namespaces_of, run_ok};
use kuberaya_e2e::{Process, poll_until_blocking};

const CMD: Duration = Duration::from_secs(30);

/// A fresh WireGuard key pair (private, public) in base64, from `wg genkey | wg pubkey`.
pub fn keypair() -> (String, String) {
    let private = run_ok(cmd("wg", &["genkey"]), CMD).unwrap().trim().to_string();
    let mut pubkey = Command::new("sh");
    pubkey.args(["-c", "printf %s \"$0\" | wg pubkey", &private]);
    let public = run_ok(pubkey, CMD).unwrap().trim().to_string();
    (private, public)
}

pub fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// `text` written to `dir/name`; its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A wireguard-go interface `iface` in `ns`, configured with `wg setconf` from `conf`;
/// `prefix` goes before the program (say `taskset -c 0`).
pub fn wireguard_go(ns: &Netns, prefix: &[&str], iface: &str, conf: &Path, address: &str, routes: &[&str]) -> Process {
    let mut args: Vec<&str> = prefix.to_vec();
    args.extend(["wireguard-go", "-f", iface]);
    let p = ns.spawn_with_private_dir("/var/run/wireguard", &args).unwrap();
    let pid = p.pid();
    let up = poll_until_blocking(Duration::from_secs(15), || {
        run_ok(in_namespaces_of(pid, &["wg", "show", iface]), CMD).ok()
    });
    assert!(
        up.is_some(),
        "wireguard-go {iface} did not come up\n{}",
        p.output_tails()
    );
    run_ok(
        in_namespaces_of(
            pid,
            &["wg".as_ref(), "setconf".as_ref(), iface.as_ref(), conf.as_os_str()],
        ),
        CMD,
    )
    .unwrap();
    ns.ip(["address", "add", address, "dev", iface]).unwrap();
    ns.ip(["link", "set", "mtu", "1420", "up", "dev", iface]).unwrap();
    for r in routes {
        ns.ip(["route", "add", r, "dev", iface]).unwrap();
    }
    p
}

//! A wg-quick config brought up on a wireguard-go interface by hand: `wg-quick strip` and
//! `wg setconf`, then the addresses, MTU and routes with `ip` (wg-quick itself would pick
//! the kernel module when there is one, and rewrite the host's resolv.conf for `DNS`; the
//! tests want neither).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::netns::{Netns, in_namespaces_of, run_ok};

const CMD: Duration = Duration::from_secs(15);

pub struct WgQuick {
    pub path: PathBuf,
    pub text: String,
}

impl WgQuick {
    /// The config `text` written (mode 0600) to `dir/name`.
    pub fn write(dir: &Path, name: &str, text: &str) -> Result<WgQuick> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(WgQuick {
            path,
            text: text.to_string(),
        })
    }

    /// Every value of `key` (any section), comma lists split.
    pub fn values(&self, key: &str) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(key))
            .flat_map(|(_, v)| v.split(',').map(|s| s.trim().to_string()).collect::<Vec<_>>())
            .collect()
    }

    /// Configure `iface` of the wireguard-go process `pid` in `ns`: keys and peer through
    /// `wg setconf` (from `wg-quick strip`), then addresses, MTU, link and routes.
    pub fn up(&self, ns: &Netns, pid: u32, iface: &str, scratch: &Path) -> Result<()> {
        let mut strip = Command::new("wg-quick");
        strip.arg("strip").arg(&self.path);
        let stripped = WgQuick::write(scratch, "stripped.conf", &run_ok(strip, CMD)?)?;
        run_ok(
            in_namespaces_of(
                pid,
                &[
                    "wg".as_ref(),
                    "setconf".as_ref(),
                    iface.as_ref(),
                    stripped.path.as_os_str(),
                ],
            ),
            CMD,
        )?;
        for a in self.values("Address") {
            ns.ip(["address", "add", &a, "dev", iface])?;
        }
        ns.ip(["link", "set", "mtu", "1420", "up", "dev", iface])?;
        for r in self.values("AllowedIPs") {
            ns.ip(["route", "add", &r, "dev", iface])?;
        }
        Ok(())
    }
}

//! The dual-stack sandbox's IPv6 side (`sandbox up --ip-family dual`): its ranges, and the
//! `local` routes on `lo` that make every address of them this host's.
//!
//! IPv6 loopback has `::1` only, so each range gets one `ip -6 route replace local RANGE
//! dev lo` (which needs root, or CAP_NET_ADMIN in a network namespace); the stand-ins bind
//! their addresses with `IPV6_FREEBIND`. What is not a stand-in (the gateway replicas,
//! product code binding its pod address as in a real pod) gets its address on `lo`. The
//! routes and addresses added are recorded in the state dir (`ipv6-routes.json`) and
//! removed when `up` stops, fails, or, after a crash, by `sandbox down`.

use std::fs;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};

/// The address families of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    // Plain comments, not doc comments: clap would print them as a long help for the
    // whole command. IPv4 only, on 127.0.0.0/8; no root needed.
    #[default]
    Ipv4,
    // IPv4 and IPv6: every range also gets an IPv6 one; needs root.
    Dual,
}

impl IpFamily {
    pub fn is_dual(self) -> bool {
        self == IpFamily::Dual
    }

    /// The Kubernetes names of the families (`IPv4`, `IPv6`).
    pub fn families(self) -> &'static [&'static str] {
        match self {
            IpFamily::Ipv4 => &["IPv4"],
            IpFamily::Dual => &["IPv4", "IPv6"],
        }
    }
}

/// The IPv6 ranges of a dual-stack sandbox (docs/getting-started.md, "Dual-stack").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ipv6Ranges {
    pub public_ip_range: Ipv6Net,
    pub vm_ip_range: Ipv6Net,
    pub service_cidr: Ipv6Net,
    pub pod_cidr: Ipv6Net,
}

impl Default for Ipv6Ranges {
    fn default() -> Self {
        Ipv6Ranges {
            public_ip_range: "fd00:203::/112".parse().expect("valid"),
            vm_ip_range: "fd00:10::/112".parse().expect("valid"),
            service_cidr: "fd00:96::/112".parse().expect("valid"),
            pod_cidr: "fd00:244::/48".parse().expect("valid"),
        }
    }
}

impl Ipv6Ranges {
    /// Every range, each of which gets a `local` route.
    pub fn all(&self) -> [Ipv6Net; 4] {
        [self.public_ip_range, self.vm_ip_range, self.service_cidr, self.pod_cidr]
    }
}

const ROUTES_FILE: &str = "ipv6-routes.json";

/// `ip` arguments adding (`replace`) or removing (`del`) the local route of `net` on lo.
pub fn route_args(verb: &str, net: Ipv6Net) -> Vec<String> {
    ["-6", "route", verb, "local", &net.to_string(), "dev", "lo"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Why `--ip-family dual` cannot run here, if it cannot: it changes routes, which takes
/// root (CAP_NET_ADMIN; in a user and network namespace of your own, that one's root).
pub fn check_privileges(euid: u32) -> anyhow::Result<()> {
    if euid != 0 {
        bail!(
            "--ip-family dual needs root: it adds a `local` route on lo for each of its IPv6 ranges \
             (IPv6 loopback has only ::1); run it as root, or in a network namespace of your own \
             (e.g. `unshare -rn sh -c 'ip link set lo up && kuberaya sandbox up --ip-family dual'`), \
             or leave --ip-family at ipv4"
        );
    }
    Ok(())
}

fn run_ip(args: &[String]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2) to change routes")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What a dual-stack sandbox added on lo (`ipv6-routes.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Added {
    routes: Vec<Ipv6Net>,
    #[serde(default)]
    addresses: Vec<Ipv6Addr>,
}

/// `ip` arguments adding (`replace`) or removing (`del`) `addr` on lo.
/// (`nodad`: usable at once, no duplicate address detection on lo).
pub fn address_args(verb: &str, addr: Ipv6Addr) -> Vec<String> {
    let mut args: Vec<String> = ["-6", "addr", verb, &format!("{addr}/128"), "dev", "lo"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if verb != "del" {
        args.push("nodad".into());
    }
    args
}

/// The `local` routes (and addresses) of a running dual-stack sandbox; removed when dropped.
pub struct LocalRoutes {
    record: PathBuf,
    added: Added,
}

impl LocalRoutes {
    /// Adds a `local` route on lo for each of `ranges`, recording them in `dir` first (so
    /// that `sandbox down` removes them even if this process dies). On failure the routes
    /// added so far are removed.
    pub fn add(dir: &Path, ranges: &Ipv6Ranges) -> anyhow::Result<LocalRoutes> {
        let wanted = Added {
            routes: ranges.all().to_vec(),
            addresses: Vec::new(),
        };
        let mut added = LocalRoutes {
            record: dir.join(ROUTES_FILE),
            added: Added::default(),
        };
        added.write(&wanted)?;
        // `lo` carries IPv6 only when it is up (a fresh network namespace's is down).
        run_ip(&["link".into(), "set".into(), "lo".into(), "up".into()])?;
        for net in wanted.routes {
            run_ip(&route_args("replace", net))
                .with_context(|| format!("cannot add the local route of {net} on lo"))?;
            added.added.routes.push(net);
        }
        Ok(added)
    }

    /// Puts `addr` on lo (recorded first, like the routes).
    pub fn add_address(&mut self, addr: Ipv6Addr) -> anyhow::Result<()> {
        let mut wanted = self.added.clone();
        wanted.addresses.push(addr);
        self.write(&wanted)?;
        run_ip(&address_args("replace", addr)).with_context(|| format!("cannot add {addr} on lo"))?;
        self.added.addresses.push(addr);
        Ok(())
    }

    fn write(&self, added: &Added) -> anyhow::Result<()> {
        fs::write(&self.record, serde_json::to_vec_pretty(added)?)
            .with_context(|| format!("cannot write {}", self.record.display()))
    }
}

impl Drop for LocalRoutes {
    fn drop(&mut self) {
        remove(&self.added);
        let _ = fs::remove_file(&self.record);
    }
}

fn remove(added: &Added) -> Vec<String> {
    let commands = added
        .addresses
        .iter()
        .map(|a| address_args("del", *a))
        .chain(added.routes.iter().map(|n| route_args("del", *n)));
    let mut failures = Vec::new();
    for args in commands {
        if let Err(e) = run_ip(&args) {
            // Already gone (a namespace that went away, a manual cleanup) is fine.
            let text = format!("{e:#}");
            if ![
                "No such process",
                "Cannot find device",
                "Cannot assign requested address",
            ]
            .iter()
            .any(|gone| text.contains(gone))
            {
                failures.push(text);
            }
        }
    }
    failures
}

/// What `sandbox down` does after the sandbox stopped: removes the routes a sandbox that
/// did not stop cleanly left behind. Returns how many were removed.
pub fn remove_recorded(dir: &Path) -> anyhow::Result<usize> {
    let record = dir.join(ROUTES_FILE);
    let Ok(bytes) = fs::read(&record) else { return Ok(0) };
    let added: Added = serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", record.display()))?;
    let failures = remove(&added);
    if !failures.is_empty() {
        bail!(
            "cannot remove the sandbox's IPv6 routes ({}); remove them with `ip -6 route del local RANGE dev lo`",
            failures.join("; ")
        );
    }
    fs::remove_file(&record).with_context(|| format!("cannot delete {}", record.display()))?;
    Ok(added.routes.len() + added.addresses.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranges_and_their_route_commands() {
        let r = Ipv6Ranges::default();
        assert_eq!(
            r.all().map(|n| n.to_string()),
            ["fd00:203::/112", "fd00:10::/112", "fd00:96::/112", "fd00:244::/48"]
        );
        assert_eq!(
            route_args("replace", r.service_cidr).join(" "),
            "-6 route replace local fd00:96::/112 dev lo"
        );
        assert_eq!(
            route_args("del", r.pod_cidr).join(" "),
            "-6 route del local fd00:244::/48 dev lo"
        );
        let a: Ipv6Addr = "fd00:244:0:ff::fe".parse().unwrap();
        assert_eq!(
            address_args("replace", a).join(" "),
            "-6 addr replace fd00:244:0:ff::fe/128 dev lo nodad"
        );
        assert_eq!(
            address_args("del", a).join(" "),
            "-6 addr del fd00:244:0:ff::fe/128 dev lo"
        );
    }

    #[test]
    fn dual_needs_root_and_says_how() {
        assert!(check_privileges(0).is_ok());
        let e = check_privileges(1000).unwrap_err().to_string();
        assert!(e.contains("--ip-family dual needs root"), "{e}");
        assert!(e.contains("unshare -rn"), "{e}");
        assert_eq!(IpFamily::Dual.families(), ["IPv4", "IPv6"]);
        assert_eq!(IpFamily::default(), IpFamily::Ipv4);
    }

    #[test]
    fn nothing_recorded_nothing_removed_and_a_bad_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(remove_recorded(dir.path()).unwrap(), 0);
        fs::write(dir.path().join(ROUTES_FILE), b"not json").unwrap();
        let e = format!("{:#}", remove_recorded(dir.path()).unwrap_err());
        assert!(e.contains("ipv6-routes.json is not valid"), "{e}");
        assert!(dir.path().join(ROUTES_FILE).exists(), "kept for a second look");
    }
}

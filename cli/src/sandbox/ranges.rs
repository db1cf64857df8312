//! The loopback address ranges of a sandbox, kept apart from every other sandbox running on
//! the machine.
//!
//! Each running sandbox holds its state directory's lock and records its ranges in the
//! machine's registry (`$TMPDIR/kuberaya-sandboxes/`, one file per state directory). A new
//! sandbox reads the registry (under the registry's own lock, so that two starting at once
//! do not pick the same ranges) and, for each range:
//! - given by a flag: refuses to start when a running sandbox holds an overlapping range,
//!   naming it and the flag;
//! - not given: takes the range its state directory used last time (its platform and
//!   Kubernetes state hold VMs, public IPs and ClusterIPs from it), and refuses to start
//!   when a running sandbox holds it now; a new state directory takes the default, else
//!   the next free one (the default with its second octet moved up: `127.204.0.0/24`, ...).
//!
//! A stopped sandbox keeps its claim while its state directory remembers the ranges:
//! a new sandbox leaves them alone (the older claim wins), so the stopped one can start
//! again as it was. `sandbox down --purge` (the state gone) frees them; the entry is then
//! removed by the next sandbox that reads the registry.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// The four ranges a sandbox binds addresses in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ranges {
    pub public_ip_range: Ipv4Net,
    pub vm_ip_range: Ipv4Net,
    pub service_cidr: Ipv4Net,
    pub pod_cidr: Ipv4Net,
}

/// What the flags asked for (`None`: not given).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requested {
    pub public_ip_range: Option<Ipv4Net>,
    pub vm_ip_range: Option<Ipv4Net>,
    pub service_cidr: Option<Ipv4Net>,
    pub pod_cidr: Option<Ipv4Net>,
}

/// The defaults, as documented in DESIGN.md and `sandbox up --help`.
pub fn defaults() -> Ranges {
    Ranges {
        public_ip_range: "127.203.0.0/24".parse().expect("valid"),
        vm_ip_range: "127.10.0.0/24".parse().expect("valid"),
        service_cidr: "127.96.0.0/16".parse().expect("valid"),
        pod_cidr: "127.244.0.0/16".parse().expect("valid"),
    }
}

/// A running sandbox's ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claim {
    pub state_dir: PathBuf,
    pub ranges: Ranges,
}

impl Ranges {
    fn each(&self) -> [(&'static str, Ipv4Net); 4] {
        [
            ("--public-ip-range", self.public_ip_range),
            ("--vm-ip-range", self.vm_ip_range),
            ("--service-cidr", self.service_cidr),
            ("--pod-cidr", self.pod_cidr),
        ]
    }
}

fn overlap(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// `net` with its second octet moved up by `k` (127.203.0.0/24 -> 127.204.0.0/24), while
/// it stays inside 127.0.0.0/8.
fn shifted(net: Ipv4Net, k: u8) -> Option<Ipv4Net> {
    let [a, b, c, d] = net.network().octets();
    let b = b.checked_add(k)?;
    Ipv4Net::new([a, b, c, d].into(), net.prefix_len()).ok()
}

/// The ranges to use: see the module documentation. Pure: `running` are the other
/// sandboxes' claims, `remembered` what this state directory used last time.
pub fn choose(
    requested: &Requested,
    remembered: Option<&Ranges>,
    running: &[Claim],
    stopped: &[Claim],
) -> anyhow::Result<Ranges> {
    let def = defaults();
    let wanted = [
        (
            "--public-ip-range",
            requested.public_ip_range,
            def.public_ip_range,
            remembered.map(|r| r.public_ip_range),
        ),
        (
            "--vm-ip-range",
            requested.vm_ip_range,
            def.vm_ip_range,
            remembered.map(|r| r.vm_ip_range),
        ),
        (
            "--service-cidr",
            requested.service_cidr,
            def.service_cidr,
            remembered.map(|r| r.service_cidr),
        ),
        (
            "--pod-cidr",
            requested.pod_cidr,
            def.pod_cidr,
            remembered.map(|r| r.pod_cidr),
        ),
    ];
    // Which range of which claim `net` overlaps, described.
    let held = |claims: &[Claim], net: Ipv4Net, describe: &dyn Fn(&str, Ipv4Net, &Claim) -> String| {
        claims.iter().find_map(|c| {
            c.ranges
                .each()
                .into_iter()
                .find(|(_, r)| overlap(net, *r))
                .map(|(flag, r)| describe(flag, r, c))
        })
    };
    let by_running = |net: Ipv4Net| {
        held(running, net, &|flag, r, c| {
            format!("{flag} {r} of the sandbox running in {}", c.state_dir.display())
        })
    };
    let by_stopped = |net: Ipv4Net| {
        held(stopped, net, &|flag, r, c| {
            let dir = c.state_dir.display();
            format!(
                "{flag} {r} of the sandbox stopped in {dir} (its state uses it; `kuberaya sandbox down --purge --state-dir {dir}` frees it)"
            )
        })
    };
    let own = |net: Ipv4Net, mine: &[Ipv4Net]| {
        mine.iter()
            .find(|m| overlap(net, **m))
            .map(|m| format!("{m}, another range of this sandbox"))
    };
    let mut chosen: Vec<Ipv4Net> = Vec::new();
    for (flag, given, default, last) in wanted {
        let net = match (given, last) {
            (Some(net), _) => {
                if let Some(other) = by_running(net)
                    .or_else(|| by_stopped(net))
                    .or_else(|| own(net, &chosen))
                {
                    anyhow::bail!(
                        "{flag} {net} overlaps {other}; pass another {flag}, or stop that sandbox (`kuberaya sandbox down --state-dir ...`)"
                    );
                }
                net
            }
            // This state's objects use it: moving would leave them outside the range.
            (None, Some(net)) => {
                if let Some(other) = by_running(net) {
                    anyhow::bail!(
                        "{flag} {net}, which this sandbox's state uses, is held now by {other}; stop that sandbox, or start this one afresh (`kuberaya sandbox down --purge`)"
                    );
                }
                net
            }
            (None, None) => (0..=40)
                .filter_map(|k| shifted(default, k))
                .find(|n| by_running(*n).is_none() && by_stopped(*n).is_none() && own(*n, &chosen).is_none())
                .with_context(|| format!("no free range for {flag} near {default}; pass one with {flag}"))?,
        };
        chosen.push(net);
    }
    Ok(Ranges {
        public_ip_range: chosen[0],
        vm_ip_range: chosen[1],
        service_cidr: chosen[2],
        pod_cidr: chosen[3],
    })
}

/// The file in `state_dir` that remembers the ranges it used.
const REMEMBERED_FILE: &str = "ranges.json";

fn registry_dir() -> PathBuf {
    std::env::temp_dir().join("kuberaya-sandboxes")
}

/// Chooses the ranges of the sandbox in `state_dir` (whose lock the caller holds) and
/// registers them for the machine's other sandboxes to see, for as long as the state
/// directory remembers them.
pub fn claim(state_dir: &Path, requested: &Requested) -> anyhow::Result<Ranges> {
    claim_in(&registry_dir(), state_dir, requested)
}

/// The ranges the state directory `dir` remembers.
fn remembered_in(dir: &Path) -> Option<Ranges> {
    fs::read(dir.join(REMEMBERED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Ranges>(&b).ok())
}

fn claim_in(registry: &Path, state_dir: &Path, requested: &Requested) -> anyhow::Result<Ranges> {
    fs::create_dir_all(registry).with_context(|| format!("cannot create {}", registry.display()))?;
    // Shared by every user's sandboxes on the machine.
    let _ = fs::set_permissions(registry, std::os::unix::fs::PermissionsExt::from_mode(0o1777));
    let _registry_lock = lock(&registry.join(".lock"))?;
    let state_dir = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_path_buf());
    let (mut running, mut stopped) = (Vec::new(), Vec::new());
    for entry in fs::read_dir(registry)?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(claim) = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Claim>(&b).ok())
        else {
            continue;
        };
        if claim.state_dir == state_dir {
            continue;
        }
        if super::state::is_running(&claim.state_dir).unwrap_or(false) {
            running.push(claim);
        } else if remembered_in(&claim.state_dir) == Some(claim.ranges) {
            stopped.push(claim);
        } else {
            // Purged (or reused with other ranges): nothing holds these any more.
            let _ = fs::remove_file(&path);
        }
    }
    let remembered = remembered_in(&state_dir);
    let ranges = choose(requested, remembered.as_ref(), &running, &stopped)?;
    fs::write(state_dir.join(REMEMBERED_FILE), serde_json::to_vec_pretty(&ranges)?)?;
    let entry = registry.join(format!("{:016x}.json", path_hash(&state_dir)));
    let claim = Claim {
        state_dir: state_dir.clone(),
        ranges,
    };
    fs::write(&entry, serde_json::to_vec_pretty(&claim)?)
        .with_context(|| format!("cannot write {}", entry.display()))?;
    Ok(ranges)
}

fn path_hash(p: &Path) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}

/// An exclusive lock on `path` (waiting for it), held while the file is open.
fn lock(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o666)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim_of(dir: &str, ranges: Ranges) -> Claim {
        Claim {
            state_dir: dir.into(),
            ranges,
        }
    }

    #[test]
    fn alone_a_sandbox_takes_the_defaults() {
        assert_eq!(choose(&Requested::default(), None, &[], &[]).unwrap(), defaults());
    }

    #[test]
    fn a_second_sandbox_moves_every_range_it_was_not_given() {
        let a = claim_of("/a", defaults());
        let b = choose(&Requested::default(), None, std::slice::from_ref(&a), &[]).unwrap();
        assert_eq!(b.public_ip_range.to_string(), "127.204.0.0/24");
        assert_eq!(b.vm_ip_range.to_string(), "127.11.0.0/24");
        assert_eq!(b.service_cidr.to_string(), "127.97.0.0/16");
        assert_eq!(b.pod_cidr.to_string(), "127.245.0.0/16");
        let c = choose(&Requested::default(), None, &[a.clone(), claim_of("/b", b)], &[]).unwrap();
        assert_eq!(c.service_cidr.to_string(), "127.98.0.0/16");
        for (_, mine) in c.each() {
            for other in [a.ranges, b] {
                for (_, r) in other.each() {
                    assert!(!overlap(mine, r), "{mine} overlaps {r}");
                }
            }
        }
    }

    #[test]
    fn a_range_given_by_flag_that_clashes_is_refused_naming_the_flag_and_the_holder() {
        let a = claim_of("/srv/a", defaults());
        let requested = Requested {
            service_cidr: Some("127.96.128.0/17".parse().unwrap()),
            ..Requested::default()
        };
        let e = choose(&requested, None, &[a], &[]).unwrap_err().to_string();
        assert!(
            e.contains(
                "--service-cidr 127.96.128.0/17 overlaps --service-cidr 127.96.0.0/16 of the sandbox running in /srv/a"
            ),
            "{e}"
        );
        assert!(e.contains("pass another --service-cidr"), "{e}");
        // Two ranges of one sandbox must not overlap either.
        let own = Requested {
            vm_ip_range: Some("127.203.0.0/25".parse().unwrap()),
            ..Requested::default()
        };
        let e = choose(&own, None, &[], &[]).unwrap_err().to_string();
        assert!(e.contains("another range of this sandbox"), "{e}");
    }

    #[test]
    fn a_state_dir_gets_its_last_ranges_back_or_is_refused() {
        let last = choose(&Requested::default(), None, &[claim_of("/a", defaults())], &[]).unwrap();
        assert_eq!(choose(&Requested::default(), Some(&last), &[], &[]).unwrap(), last);
        // Taken meanwhile by a running sandbox: moving would leave this state's ClusterIPs,
        // VMs and public IPs outside its ranges, so it is refused, saying what to do.
        let e = choose(&Requested::default(), Some(&last), &[claim_of("/c", last)], &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("--public-ip-range {}, which this sandbox's state uses, is held now by --public-ip-range {} of the sandbox running in /c", last.public_ip_range, last.public_ip_range)),
            "{e}"
        );
        assert!(e.contains("sandbox down --purge"), "{e}");
    }

    #[test]
    fn a_stopped_sandbox_keeps_its_ranges_from_newer_ones() {
        let stopped = claim_of("/old", defaults());
        let new = choose(&Requested::default(), None, &[], std::slice::from_ref(&stopped)).unwrap();
        for (_, mine) in new.each() {
            for (_, r) in defaults().each() {
                assert!(!overlap(mine, r), "{mine} overlaps the stopped sandbox's {r}");
            }
        }
        let asked = Requested {
            vm_ip_range: Some(defaults().vm_ip_range),
            ..Requested::default()
        };
        let e = choose(&asked, None, &[], &[stopped]).unwrap_err().to_string();
        assert!(e.contains("of the sandbox stopped in /old"), "{e}");
        assert!(e.contains("kuberaya sandbox down --purge --state-dir /old"), "{e}");
    }

    #[test]
    fn the_registry_keeps_claims_while_their_state_remembers_them() {
        let registry = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a_lock = super::super::state::try_lock(a_dir.path()).unwrap().expect("a's lock");
        let a = claim_in(registry.path(), a_dir.path(), &Requested::default()).unwrap();
        assert_eq!(a, defaults());
        let _b_lock = super::super::state::try_lock(b_dir.path()).unwrap().expect("b's lock");
        let b = claim_in(registry.path(), b_dir.path(), &Requested::default()).unwrap();
        assert_ne!(b.service_cidr, a.service_cidr);
        let entries = || {
            fs::read_dir(registry.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some())
                .count()
        };
        // a stops (its lock is gone) but keeps its state: a new sandbox leaves its ranges.
        drop(a_lock);
        let c_dir = tempfile::tempdir().unwrap();
        let c = claim_in(registry.path(), c_dir.path(), &Requested::default()).unwrap();
        assert_ne!(c.service_cidr, a.service_cidr, "a's ranges stay a's");
        assert_ne!(c.service_cidr, b.service_cidr);
        // a starts again as it was.
        let _a_lock = super::super::state::try_lock(a_dir.path())
            .unwrap()
            .expect("a's lock again");
        assert_eq!(
            claim_in(registry.path(), a_dir.path(), &Requested::default()).unwrap(),
            a
        );
        // b is purged (its state gone): its ranges are free, its entry removed.
        let b_path = b_dir.path().to_path_buf();
        drop(_b_lock);
        drop(b_dir);
        assert!(!b_path.exists());
        let d_dir = tempfile::tempdir().unwrap();
        let d = claim_in(registry.path(), d_dir.path(), &Requested::default()).unwrap();
        assert_eq!(d.service_cidr, b.service_cidr, "b's ranges are free again");
        assert_eq!(entries(), 3, "a's, c's and d's entries; b's removed");
    }
}

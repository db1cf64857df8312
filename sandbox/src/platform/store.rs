//! The platform's state, and its persistence: one JSON file in the state directory,
//! replaced atomically (temp file, fsync, rename, fsync dir) before a mutating call is
//! answered, so a crash never loses an acknowledged change nor leaves a torn file.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::model::{Cluster, LbRecord, PublicIp, Region, Subnet, Vm, Vpc, new_id};

pub const STATE_FILE: &str = "platform-state.json";

/// Everything the platform knows (also the answer of `GET /_sandbox/state`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub regions: Vec<Region>,
    #[serde(default)]
    pub vpcs: Vec<Vpc>,
    #[serde(default)]
    pub subnets: Vec<Subnet>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    #[serde(default)]
    pub vms: Vec<Vm>,
    #[serde(default)]
    pub public_ips: Vec<PublicIp>,
    #[serde(default)]
    pub load_balancers: Vec<LbRecord>,
}

impl State {
    pub fn vm(&self, id: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.id == id)
    }

    pub fn vm_mut(&mut self, id: &str) -> Option<&mut Vm> {
        self.vms.iter_mut().find(|v| v.id == id)
    }

    pub fn cluster(&self, id: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.id == id)
    }

    pub fn public_ip(&self, id: &str) -> Option<&PublicIp> {
        self.public_ips.iter().find(|p| p.id == id)
    }

    pub fn public_ip_mut(&mut self, id: &str) -> Option<&mut PublicIp> {
        self.public_ips.iter_mut().find(|p| p.id == id)
    }

    pub fn lb(&self, id: &str) -> Option<&LbRecord> {
        self.load_balancers.iter().find(|l| l.lb.id == id)
    }

    pub fn lb_mut(&mut self, id: &str) -> Option<&mut LbRecord> {
        self.load_balancers.iter_mut().find(|l| l.lb.id == id)
    }

    /// A fresh id with `prefix` not used by any object.
    pub fn fresh_id(&self, prefix: &str) -> String {
        let used: HashSet<&str> = self
            .regions
            .iter()
            .map(|r| r.id.as_str())
            .chain(self.vpcs.iter().map(|v| v.id.as_str()))
            .chain(self.subnets.iter().map(|s| s.id.as_str()))
            .chain(self.clusters.iter().map(|c| c.id.as_str()))
            .chain(self.vms.iter().map(|v| v.id.as_str()))
            .chain(self.public_ips.iter().map(|p| p.id.as_str()))
            .chain(self.load_balancers.iter().map(|l| l.lb.id.as_str()))
            .collect();
        loop {
            let id = new_id(prefix);
            if !used.contains(id.as_str()) {
                return id;
            }
        }
    }

    /// The next private IP of `range` no VM holds.
    pub fn free_vm_ip(&self, range: Ipv4Net) -> Option<Ipv4Addr> {
        free_ip(range, self.vms.iter().map(|v| v.private_ip))
    }

    /// The next public IP of `range` not allocated.
    pub fn free_public_ip(&self, range: Ipv4Net) -> Option<Ipv4Addr> {
        free_ip(range, self.public_ips.iter().map(|p| p.address))
    }
}

/// The first host of `range` not in `used`. The first ten hosts of a range big enough are
/// left out, as a real network keeps its low addresses for gateways.
pub fn free_ip(range: Ipv4Net, used: impl IntoIterator<Item = Ipv4Addr>) -> Option<Ipv4Addr> {
    let used: HashSet<Ipv4Addr> = used.into_iter().collect();
    let skip = if range.prefix_len() <= 27 { 10 } else { 0 };
    range.hosts().skip(skip).find(|ip| !used.contains(ip))
}

#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    pub state: State,
}

impl Store {
    /// Loads the state of `dir` (created when missing; empty state when no file yet).
    pub fn open(dir: &Path) -> Result<Store> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create state dir {}", dir.display()), e))?;
        let path = dir.join(STATE_FILE);
        let state = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::StateFile {
                path: path.display().to_string(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        Ok(Store { path, state })
    }

    /// Runs `f` on a copy of the state and, when it succeeds, saves the copy and makes it
    /// the state. A failing `f` or save leaves the state as it was.
    pub async fn mutate<T>(&mut self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut next = self.state.clone();
        let out = f(&mut next)?;
        let bytes =
            serde_json::to_vec_pretty(&next).map_err(|e| Error::Internal(format!("cannot serialize state: {e}")))?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| Error::Internal(format!("state writer failed: {e}")))?
            .map_err(|e| Error::io(format!("cannot save {}", self.path.display()), e))?;
        self.state = next;
        Ok(out)
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    // The rename itself is only durable once the directory is.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::model::{Labels, VmState};

    fn vm(id: &str, ip: Ipv4Addr) -> Vm {
        Vm {
            id: id.into(),
            name: id.into(),
            region: "jkt".into(),
            zone: "jkt-a".into(),
            package: "standard-2".into(),
            state: VmState::Running,
            private_ip: ip,
            public_ip: None,
            vpc_id: "vpc-1".into(),
            subnet_id: "subnet-1".into(),
            labels: Labels::new(),
            created_at: String::new(),
        }
    }

    #[test]
    fn free_ips_skip_low_and_used_addresses() {
        let range: Ipv4Net = "127.10.0.0/24".parse().unwrap();
        assert_eq!(free_ip(range, []), Some(Ipv4Addr::new(127, 10, 0, 11)));
        assert_eq!(
            free_ip(range, [Ipv4Addr::new(127, 10, 0, 11)]),
            Some(Ipv4Addr::new(127, 10, 0, 12))
        );
        let small: Ipv4Net = "127.10.0.0/30".parse().unwrap();
        assert_eq!(free_ip(small, []), Some(Ipv4Addr::new(127, 10, 0, 1)));
        assert_eq!(
            free_ip(small, [Ipv4Addr::new(127, 10, 0, 1), Ipv4Addr::new(127, 10, 0, 2)]),
            None
        );
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.state, State::default());
        store
            .mutate(|s| {
                s.vms.push(vm("vm-1", Ipv4Addr::new(127, 10, 0, 11)));
                Ok(())
            })
            .await
            .unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.state, store.state);
        assert_eq!(reopened.state.vms.len(), 1);
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[tokio::test]
    async fn failed_mutation_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let err = store
            .mutate(|s| -> Result<()> {
                s.vms.push(vm("vm-1", Ipv4Addr::new(127, 10, 0, 11)));
                Err(Error::Conflict("no".into()))
            })
            .await;
        assert!(err.is_err());
        assert!(store.state.vms.is_empty());
        assert!(!dir.path().join(STATE_FILE).exists());
    }

    #[test]
    fn a_torn_temp_file_does_not_matter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        write_atomic(&path, br#"{"vms": []}"#).unwrap();
        // A crash mid-write leaves only a partial temp file beside the real one.
        fs::write(dir.path().join(format!("{STATE_FILE}.tmp")), b"{\"vms\": [").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.state, State::default());
    }

    #[test]
    fn a_corrupt_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"not json").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(STATE_FILE), "{err}");
    }

    #[test]
    fn fresh_ids_are_unique() {
        let s = State::default();
        let a = s.fresh_id("lb");
        assert!(a.starts_with("lb-"));
    }
}

//! The platform's state, and its persistence: a snapshot (one JSON file, replaced
//! atomically: temp file, fsync, rename, fsync dir) and a journal of the records each
//! mutation changed since. A mutating call is answered only once its journal line is on
//! disk (fsynced), so a crash never loses an acknowledged change; concurrent mutations
//! share one write and one fsync (group commit). A torn last line (a crash mid-append)
//! was never acknowledged and is ignored.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::model::{Cluster, IpVersion, LbRecord, PublicIp, Region, Subnet, Vm, Vpc, new_id};

pub const STATE_FILE: &str = "platform-state.json";
pub const JOURNAL_FILE: &str = "platform-state.journal";
/// The journal is folded into a new snapshot once it is larger than this and than the
/// last snapshot.
const COMPACT_AT: u64 = 8 << 20;

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
    /// Shared with the copy each mutation starts from: a mutation clones only the
    /// records it changes (`Arc::make_mut`), and those are what it journals.
    #[serde(default)]
    pub load_balancers: Vec<Arc<LbRecord>>,
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

    /// A cluster's `ip_versions`: `[4, 6]` when its subnet has an `ipv6_cidr`.
    pub fn cluster_ip_versions(&self, cluster: &Cluster) -> Vec<IpVersion> {
        let v6 = self
            .subnets
            .iter()
            .any(|sn| sn.id == cluster.subnet_id && sn.ipv6_cidr.is_some());
        if v6 {
            vec![IpVersion::V4, IpVersion::V6]
        } else {
            vec![IpVersion::V4]
        }
    }

    pub fn public_ip(&self, id: &str) -> Option<&PublicIp> {
        self.public_ips.iter().find(|p| p.id == id)
    }

    pub fn public_ip_mut(&mut self, id: &str) -> Option<&mut PublicIp> {
        self.public_ips.iter_mut().find(|p| p.id == id)
    }

    pub fn lb(&self, id: &str) -> Option<&LbRecord> {
        self.load_balancers.iter().find(|l| l.lb.id == id).map(|l| l.as_ref())
    }

    pub fn lb_mut(&mut self, id: &str) -> Option<&mut LbRecord> {
        self.load_balancers
            .iter_mut()
            .find(|l| l.lb.id == id)
            .map(Arc::make_mut)
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

    /// The next IPv6 private address of `range` no VM holds.
    pub fn free_vm_ipv6(&self, range: Ipv6Net) -> Option<Ipv6Addr> {
        free_ipv6(range, self.vms.iter().filter_map(|v| v.private_ipv6))
    }

    /// The next public IP of `range` not allocated.
    pub fn free_public_ip(&self, range: Ipv4Net) -> Option<Ipv4Addr> {
        free_ip(
            range,
            self.public_ips.iter().filter_map(|p| match p.address {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            }),
        )
    }

    /// The next IPv6 public IP of `range` not allocated.
    pub fn free_public_ipv6(&self, range: Ipv6Net) -> Option<Ipv6Addr> {
        free_ipv6(
            range,
            self.public_ips.iter().filter_map(|p| match p.address {
                IpAddr::V6(a) => Some(a),
                IpAddr::V4(_) => None,
            }),
        )
    }
}

/// The first address of `range` not in `used`, from the same offset as [`free_ip`] takes
/// its first address (11 in a range of 32 or more), so a VM's two addresses line up
/// (127.10.0.11 and fd00:10::b). The range's first address (the subnet-router anycast) is
/// never handed out.
pub fn free_ipv6(range: Ipv6Net, used: impl IntoIterator<Item = Ipv6Addr>) -> Option<Ipv6Addr> {
    let used: HashSet<Ipv6Addr> = used.into_iter().collect();
    let first = if range.prefix_len() <= 123 { 11 } else { 1 };
    let base = u128::from(range.network());
    let size_minus_one = u128::MAX.checked_shr(u32::from(range.prefix_len())).unwrap_or(0);
    (first..=size_minus_one)
        .map(|offset| Ipv6Addr::from(base + offset))
        .find(|ip| !used.contains(ip))
}

/// The first host of `range` not in `used`. The first ten hosts of a range big enough are
/// left out, as a real network keeps its low addresses for gateways.
pub fn free_ip(range: Ipv4Net, used: impl IntoIterator<Item = Ipv4Addr>) -> Option<Ipv4Addr> {
    let used: HashSet<Ipv4Addr> = used.into_iter().collect();
    let skip = if range.prefix_len() <= 27 { 10 } else { 0 };
    range.hosts().skip(skip).find(|ip| !used.contains(ip))
}

/// What the journal keys records by.
trait Keyed {
    fn key(&self) -> &str;
}

macro_rules! keyed_by_id {
    ($($t:ty),*) => {$(
        impl Keyed for $t {
            fn key(&self) -> &str {
                &self.id
            }
        }
    )*};
}
keyed_by_id!(Region, Vpc, Subnet, Cluster, Vm, PublicIp);

impl Keyed for Arc<LbRecord> {
    fn key(&self) -> &str {
        &self.lb.id
    }
}

/// One journal line: the records one mutation wrote (`Some`, whole) or removed (`None`),
/// as (collection, id, record).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Entry {
    seq: u64,
    changes: Vec<(String, String, Option<serde_json::Value>)>,
}

/// The snapshot file: the state and the last journal entry it includes.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    #[serde(flatten)]
    state: &'a State,
    seq: u64,
}

#[derive(Deserialize)]
struct SnapshotIn {
    #[serde(flatten)]
    state: State,
    #[serde(default)]
    seq: u64,
}

/// Appends to `out` the records of `new` that differ from `old` (by key; `same` decides)
/// and the keys of `old` that `new` lacks. O(records), no copy of unchanged records.
fn diff<T: Keyed + Serialize>(
    name: &str,
    old: &[T],
    new: &[T],
    same: impl Fn(&T, &T) -> bool,
    out: &mut Vec<(String, String, Option<serde_json::Value>)>,
) -> serde_json::Result<()> {
    let before: HashMap<&str, &T> = old.iter().map(|r| (r.key(), r)).collect();
    let mut kept = 0;
    for r in new {
        let was = before.get(r.key());
        kept += usize::from(was.is_some());
        if !was.is_some_and(|o| same(o, r)) {
            out.push((name.to_string(), r.key().to_string(), Some(serde_json::to_value(r)?)));
        }
    }
    if kept < old.len() {
        let after: HashSet<&str> = new.iter().map(|r| r.key()).collect();
        for r in old.iter().filter(|r| !after.contains(r.key())) {
            out.push((name.to_string(), r.key().to_string(), None));
        }
    }
    Ok(())
}

fn changes(old: &State, new: &State) -> serde_json::Result<Vec<(String, String, Option<serde_json::Value>)>> {
    let mut out = Vec::new();
    diff("regions", &old.regions, &new.regions, PartialEq::eq, &mut out)?;
    diff("vpcs", &old.vpcs, &new.vpcs, PartialEq::eq, &mut out)?;
    diff("subnets", &old.subnets, &new.subnets, PartialEq::eq, &mut out)?;
    diff("clusters", &old.clusters, &new.clusters, PartialEq::eq, &mut out)?;
    diff("vms", &old.vms, &new.vms, PartialEq::eq, &mut out)?;
    diff("public_ips", &old.public_ips, &new.public_ips, PartialEq::eq, &mut out)?;
    // A record a mutation did not touch is still the one shared with `old`.
    diff(
        "load_balancers",
        &old.load_balancers,
        &new.load_balancers,
        Arc::ptr_eq,
        &mut out,
    )?;
    Ok(out)
}

fn put<T: Keyed + serde::de::DeserializeOwned>(
    records: &mut Vec<T>,
    id: &str,
    record: &Option<serde_json::Value>,
) -> serde_json::Result<()> {
    match record {
        Some(v) => {
            let r: T = serde_json::from_value(v.clone())?;
            match records.iter().position(|x| x.key() == id) {
                Some(i) => records[i] = r,
                None => records.push(r),
            }
        }
        None => records.retain(|x| x.key() != id),
    }
    Ok(())
}

impl State {
    fn replay(&mut self, entry: &Entry) -> std::result::Result<(), String> {
        for (collection, id, record) in &entry.changes {
            match collection.as_str() {
                "regions" => put(&mut self.regions, id, record),
                "vpcs" => put(&mut self.vpcs, id, record),
                "subnets" => put(&mut self.subnets, id, record),
                "clusters" => put(&mut self.clusters, id, record),
                "vms" => put(&mut self.vms, id, record),
                "public_ips" => put(&mut self.public_ips, id, record),
                "load_balancers" => put(&mut self.load_balancers, id, record),
                other => return Err(format!("journal entry {}: unknown collection {other}", entry.seq)),
            }
            .map_err(|e| format!("journal entry {}: {collection} {id}: {e}", entry.seq))?;
        }
        Ok(())
    }
}

/// A write for the committer thread.
enum Job {
    /// One journal line (no newline).
    Append(Vec<u8>),
    /// A whole snapshot; the journal is emptied after it.
    Snapshot(Vec<u8>),
}

type Reply = tokio::sync::oneshot::Sender<std::result::Result<(), String>>;

/// The thread that writes the state dir. It takes every job queued while it was busy
/// and writes consecutive journal lines with one `write` and one `fdatasync` (group
/// commit), in the order the mutations happened.
struct Committer {
    jobs: std::sync::mpsc::Sender<(Job, Reply)>,
    /// Bytes in the journal, and of the last snapshot.
    journal_len: Arc<AtomicU64>,
    snapshot_len: Arc<AtomicU64>,
    /// A journal write failed: the next write must be a whole snapshot (the changes
    /// of the failed batch are in memory only, and the journal may end torn).
    broken: Arc<AtomicBool>,
}

impl Committer {
    fn start(state_path: PathBuf, journal: File, snapshot_len: u64) -> std::io::Result<Committer> {
        let (jobs, rx) = std::sync::mpsc::channel::<(Job, Reply)>();
        let journal_len = Arc::new(AtomicU64::new(journal.metadata()?.len()));
        let snapshot_len = Arc::new(AtomicU64::new(snapshot_len));
        let broken = Arc::new(AtomicBool::new(false));
        let (jl, sl, br) = (journal_len.clone(), snapshot_len.clone(), broken.clone());
        std::thread::Builder::new()
            .name("platform-state".into())
            .spawn(move || {
                let mut journal = journal;
                while let Ok(first) = rx.recv() {
                    let mut lines = Vec::new();
                    let mut waiting: Vec<Reply> = Vec::new();
                    for (job, reply) in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                        match job {
                            Job::Append(line) => {
                                lines.extend_from_slice(&line);
                                lines.push(b'\n');
                                waiting.push(reply);
                            }
                            Job::Snapshot(bytes) => {
                                append(&mut journal, &mut lines, &mut waiting, &jl, &br);
                                let r = write_atomic(&state_path, &bytes)
                                    .and_then(|()| journal.set_len(0))
                                    .and_then(|()| journal.sync_all());
                                match &r {
                                    Ok(()) => {
                                        jl.store(0, Ordering::SeqCst);
                                        sl.store(bytes.len() as u64, Ordering::SeqCst);
                                        br.store(false, Ordering::SeqCst);
                                    }
                                    Err(_) => br.store(true, Ordering::SeqCst),
                                }
                                let _ = reply.send(r.map_err(|e| format!("cannot save {}: {e}", state_path.display())));
                            }
                        }
                    }
                    append(&mut journal, &mut lines, &mut waiting, &jl, &br);
                }
            })?;
        Ok(Committer {
            jobs,
            journal_len,
            snapshot_len,
            broken,
        })
    }

    fn wants_snapshot(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
            || self.journal_len.load(Ordering::SeqCst) > COMPACT_AT.max(self.snapshot_len.load(Ordering::SeqCst))
    }

    fn submit(&self, job: Job) -> Saved {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.jobs.send((job, tx));
        Saved(Some(rx))
    }
}

/// Writes the queued journal lines with one write and one fsync, then answers their
/// writers. After a failure nothing more is appended until a snapshot.
fn append(journal: &mut File, lines: &mut Vec<u8>, waiting: &mut Vec<Reply>, len: &AtomicU64, broken: &AtomicBool) {
    if waiting.is_empty() {
        return;
    }
    let r = if broken.load(Ordering::SeqCst) {
        Err("an earlier write of the state failed".to_string())
    } else {
        journal
            .write_all(lines)
            .and_then(|()| journal.sync_data())
            .map_err(|e| e.to_string())
    };
    match &r {
        Ok(()) => {
            len.fetch_add(lines.len() as u64, Ordering::SeqCst);
        }
        Err(_) => broken.store(true, Ordering::SeqCst),
    }
    for w in waiting.drain(..) {
        let _ = w.send(r.clone());
    }
    lines.clear();
}

/// A mutation's write to the state dir; await it before answering.
#[must_use = "a mutation is durable only once saved"]
pub struct Saved(Option<tokio::sync::oneshot::Receiver<std::result::Result<(), String>>>);

impl Saved {
    /// Waits until the mutation is on disk.
    pub async fn wait(self) -> Result<()> {
        let Some(rx) = self.0 else { return Ok(()) };
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::io("cannot save the platform state", std::io::Error::other(e))),
            Err(_) => Err(Error::Internal("the state writer stopped".into())),
        }
    }
}

pub struct Store {
    path: PathBuf,
    pub state: State,
    /// Number of the last journal entry submitted.
    seq: u64,
    committer: Committer,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Store {
    /// Loads the state of `dir` (created when missing; empty state when no file yet):
    /// the snapshot, then the journal entries after it, folded into a new snapshot.
    pub fn open(dir: &Path) -> Result<Store> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("cannot create state dir {}", dir.display()), e))?;
        let path = dir.join(STATE_FILE);
        let (mut state, mut seq) = match fs::read(&path) {
            Ok(bytes) => {
                let s: SnapshotIn = serde_json::from_slice(&bytes).map_err(|source| Error::StateFile {
                    path: path.display().to_string(),
                    source,
                })?;
                (s.state, s.seq)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), 0),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        let journal_path = dir.join(JOURNAL_FILE);
        let data = match fs::read(&journal_path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(format!("cannot read {}", journal_path.display()), e)),
        };
        // Complete lines only; one that does not parse was torn by a crash mid-write
        // (never acknowledged), and nothing is appended after a failed write.
        let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let mut replayed = false;
        for line in data[..complete].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(entry) = serde_json::from_slice::<Entry>(line) else {
                break;
            };
            if entry.seq <= seq {
                continue;
            }
            state
                .replay(&entry)
                .map_err(|m| Error::Internal(format!("{}: {m}", journal_path.display())))?;
            seq = entry.seq;
            replayed = true;
        }
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(|e| Error::io(format!("cannot open {}", journal_path.display()), e))?;
        let mut snapshot_len = fs::metadata(&path).map_or(0, |m| m.len());
        if replayed || !data.is_empty() {
            let bytes = serde_json::to_vec(&SnapshotOut { state: &state, seq })
                .map_err(|e| Error::Internal(format!("cannot serialize state: {e}")))?;
            write_atomic(&path, &bytes)
                .and_then(|()| journal.set_len(0))
                .and_then(|()| journal.sync_all())
                .map_err(|e| Error::io(format!("cannot save {}", path.display()), e))?;
            snapshot_len = bytes.len() as u64;
        }
        let committer = Committer::start(path.clone(), journal, snapshot_len)
            .map_err(|e| Error::io("cannot start the state writer", e))?;
        Ok(Store {
            path,
            state,
            seq,
            committer,
        })
    }

    /// Runs `f` on the state; when it fails, the state is left as it was. On success the
    /// records it changed are queued for the journal (or, now and then, a whole snapshot):
    /// await the returned [`Saved`] — after releasing the store's lock, so that other
    /// mutations can join the same disk write — before answering the call. Until then
    /// other calls may already read the change.
    pub fn mutate<T>(&mut self, f: impl FnOnce(&mut State) -> Result<T>) -> Result<(T, Saved)> {
        // Cheap: the load balancers, the bulk of the state, are shared, not copied.
        let old = self.state.clone();
        let out = match f(&mut self.state) {
            Ok(out) => out,
            Err(e) => {
                self.state = old;
                return Err(e);
            }
        };
        let job = if self.committer.wants_snapshot() {
            serde_json::to_vec(&SnapshotOut {
                state: &self.state,
                seq: self.seq,
            })
            .map(Job::Snapshot)
        } else {
            match changes(&old, &self.state) {
                Ok(c) if c.is_empty() => return Ok((out, Saved(None))),
                Ok(changes) => serde_json::to_vec(&Entry {
                    seq: self.seq + 1,
                    changes,
                })
                .map(|line| {
                    self.seq += 1;
                    Job::Append(line)
                }),
                Err(e) => Err(e),
            }
        };
        match job {
            Ok(job) => Ok((out, self.committer.submit(job))),
            Err(e) => {
                self.state = old;
                Err(Error::Internal(format!("cannot serialize state: {e}")))
            }
        }
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
            private_ipv6: None,
            vpc_id: "vpc-1".into(),
            subnet_id: "subnet-1".into(),
            labels: Labels::new(),
            created_at: String::new(),
        }
    }

    #[test]
    fn free_ipv6_mirrors_the_ipv4_offsets() {
        let range: Ipv6Net = "fd00:10::/112".parse().unwrap();
        assert_eq!(free_ipv6(range, []), Some("fd00:10::b".parse().unwrap()));
        assert_eq!(
            free_ipv6(range, ["fd00:10::b".parse().unwrap()]),
            Some("fd00:10::c".parse().unwrap())
        );
        let v4: Ipv4Net = "127.10.0.0/24".parse().unwrap();
        assert_eq!(free_ip(v4, []), Some(Ipv4Addr::new(127, 10, 0, 11)));
        let tiny: Ipv6Net = "fd00:10::/126".parse().unwrap();
        let all: Vec<Ipv6Addr> = ["fd00:10::1", "fd00:10::2", "fd00:10::3"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(free_ipv6(tiny, all[..2].to_vec()), Some(all[2]));
        assert_eq!(free_ipv6(tiny, all), None);
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

    async fn mutate<T>(store: &mut Store, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let (out, saved) = store.mutate(f)?;
        saved.wait().await?;
        Ok(out)
    }

    fn lb(id: &str) -> Arc<LbRecord> {
        let v = serde_json::json!({
            "cluster_id": "cl", "id": id, "name": id, "region": "jkt", "vpc_id": "vpc-1",
            "subnet_id": "subnet-1", "public_ip": {"id": "ip-1", "address": "127.20.0.11"},
            "labels": {}, "status": "active", "status_message": "", "rules": [], "backends": [],
            "created_at": "", "updated_at": "", "public_ip_acquired": true
        });
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.state, State::default());
        mutate(&mut store, |s| {
            s.vms.push(vm("vm-1", Ipv4Addr::new(127, 10, 0, 11)));
            s.load_balancers.push(lb("lb-1"));
            s.load_balancers.push(lb("lb-2"));
            Ok(())
        })
        .await
        .unwrap();
        // Each later mutation journals only what it changed.
        mutate(&mut store, |s| {
            s.lb_mut("lb-1").unwrap().lb.name = "renamed".into();
            s.load_balancers.retain(|l| l.lb.id != "lb-2");
            s.vms[0].name = "w1".into();
            Ok(())
        })
        .await
        .unwrap();
        let journal = fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        let last: Entry = serde_json::from_str(journal.lines().last().unwrap()).unwrap();
        let ids: Vec<_> = last
            .changes
            .iter()
            .map(|(c, id, r)| (c.as_str(), id.as_str(), r.is_some()))
            .collect();
        assert_eq!(
            ids,
            [
                ("vms", "vm-1", true),
                ("load_balancers", "lb-1", true),
                ("load_balancers", "lb-2", false)
            ]
        );
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.state, store.state);
        assert_eq!(reopened.state.lb("lb-1").unwrap().lb.name, "renamed");
        // Opening folds the journal into the snapshot; no temp file is left behind.
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [JOURNAL_FILE, STATE_FILE]);
        assert_eq!(fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(), 0);
        drop(reopened);
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.state, store.state);
    }

    /// Mutations whose writes are queued together share one journal write; each is
    /// answered only once it is on disk, and all survive a reopen.
    #[tokio::test]
    async fn concurrent_mutations_are_committed_together() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let mut pending = Vec::new();
        for i in 0..50 {
            let ((), saved) = store
                .mutate(|s| {
                    s.load_balancers.push(lb(&format!("lb-{i}")));
                    Ok(())
                })
                .unwrap();
            pending.push(saved);
        }
        for saved in pending {
            saved.wait().await.unwrap();
        }
        let lines = fs::read_to_string(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .count();
        assert_eq!(lines, 50);
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.state.load_balancers.len(), 50);
    }

    /// A crash mid-append leaves a torn last line: it was never acknowledged and is
    /// ignored; the entries before it are kept.
    #[tokio::test]
    async fn a_torn_journal_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        mutate(&mut store, |s| {
            s.load_balancers.push(lb("lb-1"));
            Ok(())
        })
        .await
        .unwrap();
        drop(store);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(br#"{"seq":2,"changes":[["load_balancers","lb-2",{"clus"#)
            .unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        let ids: Vec<_> = reopened.state.load_balancers.iter().map(|l| l.lb.id.as_str()).collect();
        assert_eq!(ids, ["lb-1"]);
    }

    /// Past the threshold a mutation writes a whole snapshot and empties the journal.
    #[tokio::test]
    async fn the_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.committer.journal_len.store(COMPACT_AT + 1, Ordering::SeqCst);
        mutate(&mut store, |s| {
            s.load_balancers.push(lb("lb-1"));
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(), 0);
        mutate(&mut store, |s| {
            s.load_balancers.push(lb("lb-2"));
            Ok(())
        })
        .await
        .unwrap();
        assert!(fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len() > 0);
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.state, store.state);
    }

    #[tokio::test]
    async fn failed_mutation_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let err = store.mutate(|s| -> Result<()> {
            s.vms.push(vm("vm-1", Ipv4Addr::new(127, 10, 0, 11)));
            Err(Error::Conflict("no".into()))
        });
        assert!(err.is_err());
        assert!(store.state.vms.is_empty());
        assert!(!dir.path().join(STATE_FILE).exists());
        assert_eq!(fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(), 0);
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

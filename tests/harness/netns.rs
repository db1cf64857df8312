//! Network namespaces for end-to-end tests: the test's own hosts, joined by veth pairs,
//! so that traffic never leaves the namespaces the test created.
//!
//! - [`require_root`]: fail (not skip) with a clear message when not root.
//! - [`Netns`]: `ip netns add` on creation; on drop, every process still inside is killed
//!   and the namespace deleted (its interfaces go with it), also when the test panics.
//! - [`veth_pair`]: a veth pair between two namespaces, addressed and up.
//! - [`run`] / [`Netns::exec`] / [`in_namespaces_of`]: a command run to completion within
//!   a time limit, killed when it overruns.
//! - [`Netns::spawn_with_private_dir`]: a long-running process with its own tmpfs on a
//!   directory, for daemons that put a fixed-path socket there (wireguard-go and the
//!   gateway's UAPI socket in `/var/run/wireguard`, which namespaces otherwise share).

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Process;

/// The longest a setup command (`ip ...`) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Panic with a clear message unless running as root (`because`: what the test does that
/// needs it, e.g. creating network namespaces). Such tests are not skipped without root,
/// they fail, so CI cannot pass them by accident.
pub fn require_root(test: &str, because: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{test} needs root ({because}); run it as root, as CI does (euid is {euid})"
    );
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Panic unless every program in `programs` is on PATH, naming the missing ones and the
/// packages to install.
pub fn require_programs(programs: &[(&str, &str)]) {
    let missing: Vec<String> = programs
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(p, pkg)| format!("{p} (apt package {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "missing programs: {}; scripts/test installs them",
        missing.join(", ")
    );
}

/// Run `cmd` to completion, at most `timeout` (then it is killed and this fails).
pub fn run(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let text = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("spawning {text}"))?;
    // Readers on threads, so a chatty child never blocks on a full pipe; their results are
    // awaited within the same deadline (a grandchild could hold a pipe open).
    let (tx, rx) = std::sync::mpsc::channel::<(bool, Vec<u8>)>();
    let readers: [(bool, Box<dyn Read + Send>); 2] = [
        (true, Box::new(child.stdout.take().expect("piped stdout"))),
        (false, Box::new(child.stderr.take().expect("piped stderr"))),
    ];
    for (is_stdout, mut pipe) in readers {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            let _ = tx.send((is_stdout, v));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{text} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match rx.recv_timeout(left) {
            Ok((true, v)) => stdout = v,
            Ok((false, v)) => stderr = v,
            Err(_) => bail!("{text} exited ({status}) but its output stayed open past {timeout:?}"),
        }
    }
    Ok(Output { status, stdout, stderr })
}

/// [`run`], failing unless the command exits 0; returns its stdout.
pub fn run_ok(cmd: Command, timeout: Duration) -> Result<String> {
    let text = format!("{cmd:?}");
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{text} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command that runs `args` in the network and mount namespaces of process `pid` (for
/// talking to a daemon started by [`Netns::spawn_with_private_dir`], e.g. `wg show`).
pub fn in_namespaces_of<S: AsRef<OsStr>>(pid: u32, args: &[S]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg("-t").arg(pid.to_string()).args(["-m", "-n", "--"]).args(args);
    cmd
}

/// A network namespace of this test, deleted (with everything inside) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Made by this handle, and deleted when it drops (see [`Netns::attach`]).
    owned: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Create the namespace `name` with its loopback up. A leftover namespace of that name
    /// (from a killed run with the same pid) is deleted first.
    pub fn new(name: &str) -> Result<Netns> {
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("bad namespace name {name:?}");
        }
        if std::path::Path::new("/run/netns").join(name).exists() {
            delete(name);
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", name]);
        run_ok(cmd, SETUP_TIMEOUT).context("ip netns add (needs root)")?;
        let ns = Netns {
            name: name.to_string(),
            owned: true,
        };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace named `kr-<pid>-<n>-<role>`, unique within this machine while the test
    /// process lives.
    pub fn unique(role: &str) -> Result<Netns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Netns::new(&format!("kr-{}-{n}-{role}", std::process::id()))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle on the existing namespace `name` that does not delete it when dropped
    /// (another thread's view of a namespace its owner made).
    pub fn attach(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            owned: false,
        }
    }

    /// Moves the calling thread into this namespace: the sockets it opens from now on, and
    /// the processes it starts, are inside it (other threads are not affected).
    pub fn enter(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(std::path::Path::new("/run/netns").join(&self.name))?;
        // SAFETY: setns on an open namespace file changes only this thread's namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// `ip -n NAME args...`, failing on a non-zero exit.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run_ok(cmd, SETUP_TIMEOUT)
    }

    /// Makes every address of `cidr` local inside the namespace (`ip route add local CIDR
    /// dev lo`, `-6` for an IPv6 range), as `kuberaya sandbox up --ip-family dual` does on
    /// the host: a socket binding one of them with `IPV6_FREEBIND` (or `IP_FREEBIND`) then
    /// serves it, and the namespace's own clients reach it over `lo`.
    pub fn add_local_route(&self, cidr: &str) -> Result<()> {
        let net: ipnet::IpNet = cidr.parse().with_context(|| format!("bad CIDR {cidr:?}"))?;
        let family = if net.addr().is_ipv6() { "-6" } else { "-4" };
        self.ip([family, "route", "add", "local", cidr, "dev", "lo"]).map(drop)
    }

    /// Assigns `addr` (a single address, e.g. `fd00:10::b`) to `lo` inside the namespace,
    /// for test servers and clients that bind it without `IPV6_FREEBIND`.
    pub fn add_loopback_address(&self, addr: std::net::IpAddr) -> Result<()> {
        let cidr = match addr {
            std::net::IpAddr::V4(a) => format!("{a}/32"),
            std::net::IpAddr::V6(a) => format!("{a}/128"),
        };
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", "lo"];
        if addr.is_ipv6() {
            // Usable at once (no duplicate address detection on a namespace's own lo).
            args.push("nodad");
        }
        self.ip(args).map(drop)
    }

    /// A command that runs `args` inside the namespace (`ip netns exec`).
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Run `args` inside the namespace to completion, at most `timeout`.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Result<Output> {
        run(self.command(args), timeout)
    }

    /// Start a long-running `args` inside the namespace (killed when the [`Process`] drops;
    /// `ip netns exec` execs, so its pid is the program's).
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Process> {
        Process::spawn_command(self.command(args))
    }

    /// [`Netns::spawn`] with a fresh tmpfs on `dir` seen by this process only (its own
    /// mount namespace: `ip netns exec` gives each command one). Reach it afterwards with
    /// [`in_namespaces_of`] on the process's pid.
    pub fn spawn_with_private_dir<S: AsRef<OsStr>>(&self, dir: &str, args: &[S]) -> Result<Process> {
        let mut cmd = self.command(&[
            "sh",
            "-c",
            r#"mkdir -p "$0" && mount -t tmpfs tmpfs "$0" && exec "$@""#,
            dir,
        ]);
        cmd.args(args);
        Process::spawn_command(cmd)
    }

    /// The pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "pids", &self.name]);
        run_ok(cmd, SETUP_TIMEOUT)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

fn delete(name: &str) {
    let mut pids = Command::new("ip");
    pids.args(["netns", "pids", name]);
    if let Ok(list) = run_ok(pids, SETUP_TIMEOUT) {
        for pid in list.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
            // SAFETY: SIGKILL to a process inside a namespace this test created.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    // Killed processes may take a moment to leave; the namespace is freed when they do.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut del = Command::new("ip");
        del.args(["netns", "del", name]);
        match run(del, SETUP_TIMEOUT) {
            Ok(o) if o.status.success() => return,
            _ if Instant::now() >= deadline => {
                eprintln!("[harness] could not delete network namespace {name}");
                return;
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            delete(&self.name);
        }
    }
}

/// One end of a veth pair: its namespace, interface name and address (`a.b.c.d/len`).
#[derive(Debug, Clone, Copy)]
pub struct VethEnd<'a> {
    pub ns: &'a Netns,
    pub name: &'a str,
    pub address: &'a str,
}

/// A veth pair from `a` to `b`, both ends addressed and up. It goes away with the
/// namespaces.
pub fn veth_pair(a: VethEnd<'_>, b: VethEnd<'_>) -> Result<()> {
    a.ns.ip([
        "link", "add", a.name, "type", "veth", "peer", "name", b.name, "netns", &b.ns.name,
    ])?;
    for end in [a, b] {
        end.ns.ip(["addr", "add", end.address, "dev", end.name])?;
        end.ns.ip(["link", "set", end.name, "up"])?;
    }
    Ok(())
}

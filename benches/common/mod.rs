//! Helpers shared by the benchmarks: size knobs from the environment, the machine and its
//! load, and what `/proc` says of a process (peak RSS, CPU time).

#![allow(dead_code)]

use std::time::Duration;

pub mod gso_client;
pub mod wg;

/// An integer knob: `name` from the environment, else `default`.
pub fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Pin the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("sched_setaffinity({cpu}): {}", std::io::Error::last_os_error());
        }
    }
}

/// `setsockopt` of an int option on `sock`.
pub fn set_int(sock: &std::net::UdpSocket, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: an int option on an open socket.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the bench is asked to skip a part (`name=0`).
pub fn enabled(name: &str) -> bool {
    knob(name, 1) != 0
}

/// `nproc`, the CPU model, the memory, the date and the load average, for the report.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let date = std::process::Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "machine: nproc={cpus}, cpu={model}, memory={:.1} GiB, date={date}, {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        load_average()
    )
}

/// `load average: 1m 5m 15m` from /proc/loadavg.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let parts: Vec<&str> = text.split_whitespace().take(3).collect();
    format!("load average: {}", parts.join(" "))
}

/// A field of /proc/<pid>/status in KiB (`VmHWM`, `VmRSS`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
}

/// Peak resident set size of `pid` in MiB (VmHWM).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM").map(|k| k as f64 / 1024.0)
}

/// Current resident set size of `pid` in MiB (VmRSS).
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS").map(|k| k as f64 / 1024.0)
}

/// User plus system CPU time `pid` has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields after it start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')'.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Seconds with two decimals, or what was reached.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A ratio `a / b` written as `N.NNx`, or `n/a`.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}x", a / b)
    } else {
        "n/a".into()
    }
}

/// Median and max of samples (sorted copy); `None` when empty.
pub fn median_max(samples: &[Duration]) -> Option<(Duration, Duration)> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort();
    Some((s[s.len() / 2], s[s.len() - 1]))
}

/// One result line, `RESULT <name>: <value>`, easy to grep from a run's output.
pub fn result(name: &str, value: impl std::fmt::Display) {
    println!("RESULT {name}: {value}");
}

/// Makes the child started by `cmd` receive SIGTERM when the bench dies, so that a bench
/// stopped by a signal (Ctrl-C, `timeout`) leaves no stand-in, CCM or gateway behind (the
/// harness puts children in process groups of their own, which Ctrl-C does not reach).
pub fn die_with_parent(mut cmd: std::process::Command) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Variables cargo sets for a package's binaries, tests and benches (not the user's
/// configuration such as CARGO_HOME, CARGO_TARGET_DIR or CARGO_PROFILE_*).
fn is_cargo_package_var(k: &str) -> bool {
    k.starts_with("CARGO_PKG_")
        || k.starts_with("CARGO_MANIFEST_")
        || k.starts_with("CARGO_BIN_")
        || matches!(
            k,
            "CARGO_CRATE_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// `cargo build --release` with `args` (packages, binaries) in the workspace; whether it
/// succeeded. Cargo runs a bench with the variables it gives to a package's own programs
/// (CARGO_MANIFEST_DIR, CARGO_PKG_*, ...). Build scripts such as ring's rerun when they
/// change, so passing them on made every run rebuild ring, rustls and kube twice: once
/// here and once more in the next `cargo bench`. The nested build gets the user's
/// environment back.
/// Builds the release binaries the harness starts (the gateway and the sandbox; cargo does
/// nothing when they are up to date), unless `KURAYA_BIN_DIR` names others: the harness
/// takes whatever `target/release` holds, and a stale gateway would measure old code.
pub fn build_binaries() {
    if std::env::var_os("KURAYA_BIN_DIR").is_some() {
        return;
    }
    let status = release_build(&["--bin", "kuberaya-gateway", "--bin", "kuberaya-sandbox"]);
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "building the release binaries failed: {status:?}"
    );
}

pub fn release_build(args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--release"])
        .args(args);
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && is_cargo_package_var(k)
        {
            build.env_remove(k);
        }
    }
    build.status()
}

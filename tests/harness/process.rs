//! A spawned binary whose output goes to files, killed with its process group on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long [`Process::stop`] waits after SIGTERM before sending SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// A running child process (in its own process group), its stdout and stderr captured to
/// files in a temporary directory. Dropping it terminates the whole group: SIGTERM, then
/// SIGKILL after the grace period. When dropped during a panic, the tails of its output
/// are printed to stderr, so a failing test shows what the binary said.
pub struct Process {
    name: String,
    child: Child,
    logs: tempfile::TempDir,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    grace: Duration,
    exit: Option<ExitStatus>,
}

impl Process {
    /// Spawn the workspace binary `name` (see [`crate::binary`]) with `args`.
    pub fn start<I, S>(name: &str, args: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let path = crate::binary(name);
        Process::spawn(&path, args)
    }

    /// Spawn the executable at `path` with `args`.
    pub fn spawn<I, S>(path: &Path, args: I) -> Result<Process>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(path);
        cmd.args(args);
        Process::spawn_command(cmd)
    }

    /// Spawn a prepared command (stdin, stdout, stderr and the process group are set here).
    pub fn spawn_command(mut cmd: Command) -> Result<Process> {
        let name = Path::new(cmd.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".to_string());
        let logs = tempfile::Builder::new()
            .prefix(&format!("kuberaya-e2e-{name}-"))
            .tempdir()
            .context("creating a log directory")?;
        let stdout_path = logs.path().join("stdout.log");
        let stderr_path = logs.path().join("stderr.log");
        let stdout = File::create(&stdout_path)?;
        let stderr = File::create(&stderr_path)?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Process {
            name,
            child,
            logs,
            stdout_path,
            stderr_path,
            grace: DEFAULT_GRACE,
            exit: None,
        })
    }

    /// Change the grace period between SIGTERM and SIGKILL.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The directory holding `stdout.log` and `stderr.log` (removed on drop).
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Everything the process printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Everything the process printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Whether the process is still running (reaps it when it has exited).
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// The exit status once the child has exited. Before reaping it, whatever else of its
    /// process group is left is killed: while the exited child is a zombie its pid (the
    /// group's id) cannot be reused, so the signal reaches only our group. Once reaped,
    /// the group is never signalled again, since by then its id may belong to an
    /// unrelated process group (a sandbox, another test's binary).
    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() && self.exited_unreaped() {
            self.signal_group(libc::SIGKILL);
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Whether the child has exited (without reaping it).
    fn exited_unreaped(&self) -> bool {
        // SAFETY: waitid on our own child with WNOWAIT only reads its state; `info` is a
        // plain C struct that zeroed memory initialises.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            // With WNOHANG, si_pid stays 0 while the child runs; an error (ECHILD: reaped
            // elsewhere) counts as exited.
            rc != 0 || info.si_pid() != 0
        }
    }

    /// Wait (polling every 20 ms, at most `timeout`) until stdout has a complete line
    /// starting with `prefix`; returns that line without its newline. Fails when the
    /// process exits first or the time is up, with the tails of its output.
    pub fn wait_for_stdout_line(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            // Only complete lines: the last piece may still be being written.
            let mut complete = out.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            if let Some(line) = complete.find(|l| l.starts_with(prefix)) {
                return Ok(line.trim_end_matches(['\n', '\r']).to_string());
            }
            if let Some(status) = self.try_exit() {
                bail!(
                    "{} exited ({status}) before printing a line starting with {prefix:?}\n{}",
                    self.name,
                    self.output_tails()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} printed no line starting with {prefix:?} within {timeout:?}\n{}",
                    self.name,
                    self.output_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of stdout and stderr, for failure messages.
    pub fn output_tails(&self) -> String {
        fn tail(s: &str) -> String {
            // Backtrace frames ("  12: tokio::...", "      at ...") would push the error
            // they belong to out of the tail.
            let frame = |l: &&str| {
                let t = l.trim_start();
                t.starts_with("at ")
                    || t.split_once(": ")
                        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            };
            let lines: Vec<&str> = s.lines().filter(|l| !frame(l)).collect();
            let from = lines.len().saturating_sub(40);
            lines[from..].join("\n")
        }
        format!(
            "--- {} stdout (tail) ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(&self.stdout()),
            self.name,
            tail(&self.stderr())
        )
    }

    /// Send `signal` to the process group, unless the child has been reaped already (its
    /// pid, the group's id, may have been reused since: see [`Process::try_exit`]).
    pub fn signal(&self, signal: i32) {
        if self.exit.is_none() {
            self.signal_group(signal);
        }
    }

    fn signal_group(&self, signal: i32) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: signalling the process group we created (process_group(0) makes the
        // child's pid its group id), whose leader is not reaped yet (callers check).
        unsafe {
            libc::kill(-pgid, signal);
        }
    }

    /// Terminate the process group: SIGTERM, then SIGKILL after the grace period. Returns
    /// the exit status of the direct child.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        // Once exited, try_exit has killed the rest of the group before reaping the child.
        if let Some(status) = self.try_exit() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "[harness] {} (pid {}) ignored SIGTERM for {:?}; sending SIGKILL",
            self.name,
            self.pid(),
            self.grace
        );
        self.signal(libc::SIGKILL);
        self.exit = self.child.wait().ok();
        self.exit
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let status = self.stop();
        if std::thread::panicking() {
            eprintln!(
                "[harness] {} (pid {}) exit {:?}\n{}",
                self.name,
                self.child.id(),
                status,
                self.output_tails()
            );
        }
    }
}

/// The value of `key=value` among the words of `line` (a start line such as
/// `kuberaya-gateway listening udp=... public_key=... metrics=...`).
pub fn line_field(line: &str, key: &str) -> Result<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .with_context(|| format!("{key} in {line:?}"))
}

/// `text` without ANSI escape sequences (the log's field names are styled).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

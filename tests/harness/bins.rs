//! Locating (and, when missing, building) the workspace's binaries.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Serializes builds within this process; a file lock serializes them across processes.
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The directory holding the workspace's binaries: `KURAYA_BIN_DIR` when set, otherwise
/// `target/<profile>/`, the parent of the directory of the running test executable
/// (`target/<profile>/deps/<test>-<hash>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KURAYA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of the workspace binary `name`. When it is missing (and `KURAYA_BIN_DIR` is
/// not set), runs `cargo build --bin NAME` for the profile of the test executable, once
/// per process and serialized across processes by a file lock.
///
/// Panics when the binary cannot be found or built: a test cannot go on without it.
pub fn binary(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    if path.exists() {
        return path;
    }
    if std::env::var_os("KURAYA_BIN_DIR").is_some() {
        panic!("binary {name} not found in KURAYA_BIN_DIR={}", dir.display());
    }
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if path.exists() {
        return path;
    }
    let _flock = FileLock::acquire(&dir.join(".kuberaya-e2e-build.lock"));
    if path.exists() {
        return path;
    }
    build(name, &dir);
    assert!(
        path.exists(),
        "cargo build --bin {name} succeeded but {} does not exist",
        path.display()
    );
    path
}

fn build(name: &str, dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--bin").arg(name);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.arg("--profile").arg(profile);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    eprintln!("[harness] building missing binary: {cmd:?}");
    let status = cmd.status().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// An exclusive `flock` held until dropped.
struct FileLock(std::fs::File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening lock file {}: {e}", path.display()));
        // Exclusive (flock); blocks until the lock is ours.
        file.lock()
            .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
        FileLock(file)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the file would release the lock too.
        let _ = self.0.unlock();
    }
}

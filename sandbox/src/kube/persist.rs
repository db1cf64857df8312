//! Writes to the state dir: atomic (temp file, fsync, rename), and an append-only
//! journal of the changes since the last snapshot (one JSON line per write, fsynced).
//!
//! Every file is 0600: the objects include Secrets (the gateway's private key, peers'
//! preshared keys), and the TLS key and admin token are here too.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `data` to `path` atomically.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}.{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id(),
        rand::random::<u64>()
    ));
    {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The journal file: complete lines are entries; a torn last line (a crash mid-append)
/// is ignored and cut off at the next open.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    pub len: u64,
}

impl Journal {
    /// Opens `path` for appending (created when missing).
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        // A journal made before files were private.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let len = file.metadata()?.len();
        Ok(Journal {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    /// The complete lines of the journal at `path` (none when it does not exist).
    pub fn read(path: &Path) -> std::io::Result<Vec<Vec<u8>>> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        Ok(data[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect())
    }

    /// Appends one entry (a line without a newline) and waits until it is on disk.
    pub fn append(&mut self, entry: &[u8]) -> std::io::Result<()> {
        let mut line = Vec::with_capacity(entry.len() + 1);
        line.extend_from_slice(entry);
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Empties the journal (after a snapshot that includes every entry was written).
    pub fn clear(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn atomic_write_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.json");
        super::write_atomic(&p, b"1").unwrap();
        super::write_atomic(&p, b"2").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let j = d.path().join("j");
        std::fs::write(&j, b"").unwrap();
        super::Journal::open(&j).unwrap();
        assert_eq!(
            std::fs::metadata(&j).unwrap().permissions().mode() & 0o777,
            0o600,
            "an old journal too"
        );
    }

    #[test]
    fn journal_appends_and_ignores_a_torn_line() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        let mut j = super::Journal::open(&p).unwrap();
        j.append(b"{\"a\":1}").unwrap();
        j.append(b"{\"a\":2}").unwrap();
        assert_eq!(
            super::Journal::read(&p).unwrap(),
            vec![b"{\"a\":1}".to_vec(), b"{\"a\":2}".to_vec()]
        );
        // A crash mid-append leaves a line without its newline.
        std::io::Write::write_all(
            &mut std::fs::OpenOptions::new().append(true).open(&p).unwrap(),
            b"{\"a\"",
        )
        .unwrap();
        assert_eq!(super::Journal::read(&p).unwrap().len(), 2);
        j.clear().unwrap();
        assert!(super::Journal::read(&p).unwrap().is_empty());
        assert!(super::Journal::read(&d.path().join("missing")).unwrap().is_empty());
    }
}

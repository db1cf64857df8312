//! Writes the CRDs to `deploy/crds/` (`vpnpeer.yaml`, `vpnaccesspolicy.yaml`), or prints
//! them with `--stdout`.

fn main() -> std::io::Result<()> {
    let files = kuberaya_gateway::crd::crd_files();
    if std::env::args().any(|a| a == "--stdout") {
        for (i, (_, yaml)) in files.iter().enumerate() {
            if i > 0 {
                println!("---");
            }
            print!("{yaml}");
        }
        return Ok(());
    }
    for (file, yaml) in files {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, yaml)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

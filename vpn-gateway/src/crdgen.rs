//! Writes the `VpnPeer` CRD to `deploy/crds/vpnpeer.yaml` (or prints it with `--stdout`).

fn main() -> std::io::Result<()> {
    let yaml = kuberaya_gateway::crd::crd_yaml();
    if std::env::args().any(|a| a == "--stdout") {
        print!("{yaml}");
        return Ok(());
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(kuberaya_gateway::crd::CRD_PATH);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, yaml)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

//! wg-quick configuration files for peers: rendering (pure), the QR code, and writing them
//! with mode 0600.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use ipnet::IpNet;
use kuberaya_gateway::keys::{PresharedKey, PrivateKey, PublicKey};

/// What goes into a peer's wg-quick file.
#[derive(Debug, Clone)]
pub struct WgConfig {
    /// A comment naming the peer.
    pub title: String,
    pub key: PeerKey,
    pub address: Ipv4Addr,
    /// The peer's IPv6 tunnel address, when it has one (dual-stack).
    pub address_v6: Option<Ipv6Addr>,
    /// The gateway's tunnel address (the DNS server).
    pub dns_server: Ipv4Addr,
    /// The gateway's IPv6 tunnel address, a second DNS server (dual-stack).
    pub dns_server_v6: Option<Ipv6Addr>,
    /// DNS search domains, most specific first.
    pub search: Vec<String>,
    pub gateway_public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: u16,
}

/// The peer's own key: made here (the config carries it), or made on the user's device,
/// which keeps it (the config leaves it out for the user to add).
#[derive(Debug, Clone)]
pub enum PeerKey {
    Private(PrivateKey),
    OnDevice(PublicKey),
}

impl PeerKey {
    /// A fresh key pair made here, or the device's public key `given`.
    pub fn made_here_or(given: Option<PublicKey>) -> PeerKey {
        given.map_or_else(|| PeerKey::Private(PrivateKey::generate()), PeerKey::OnDevice)
    }

    pub fn public_key(&self) -> PublicKey {
        match self {
            PeerKey::Private(k) => k.public_key(),
            PeerKey::OnDevice(p) => *p,
        }
    }

    /// Whether the private key stays on the user's device.
    pub fn on_device(&self) -> bool {
        matches!(self, PeerKey::OnDevice(_))
    }
}

/// Seconds between keepalives: keeps NAT mappings open on the way to the gateway.
pub const DEFAULT_KEEPALIVE: u16 = 25;

/// The search domains of a peer in `namespace`: its own namespace first.
pub fn search_domains(namespace: &str, cluster_domain: &str) -> Vec<String> {
    vec![
        format!("{namespace}.svc.{cluster_domain}"),
        format!("svc.{cluster_domain}"),
        cluster_domain.to_string(),
    ]
}

/// The file's text.
pub fn render(c: &WgConfig) -> String {
    let mut s = String::new();
    s.push_str(&format!("# {}\n", c.title));
    s.push_str("[Interface]\n");
    match &c.key {
        PeerKey::Private(k) => s.push_str(&format!("PrivateKey = {}\n", k.to_base64())),
        // wg-quick and the WireGuard apps need the line: the user adds it on the device
        // that made the key (a phone's app: create the tunnel from this, keep its key).
        PeerKey::OnDevice(p) => s.push_str(&format!(
            "# PrivateKey = <the private key of {p}, which never left your device>\n"
        )),
    }
    match c.address_v6 {
        Some(v6) => s.push_str(&format!("Address = {}/32, {v6}/128\n", c.address)),
        None => s.push_str(&format!("Address = {}/32\n", c.address)),
    }
    let mut dns = vec![c.dns_server.to_string()];
    dns.extend(c.dns_server_v6.map(|a| a.to_string()));
    dns.extend(c.search.iter().cloned());
    s.push_str(&format!("DNS = {}\n", dns.join(", ")));
    s.push_str("\n[Peer]\n");
    s.push_str(&format!("PublicKey = {}\n", c.gateway_public_key));
    if let Some(psk) = &c.preshared_key {
        s.push_str(&format!("PresharedKey = {}\n", psk.to_base64()));
    }
    s.push_str(&format!("Endpoint = {}\n", c.endpoint));
    let allowed: Vec<String> = c.allowed_ips.iter().map(|n| n.to_string()).collect();
    s.push_str(&format!("AllowedIPs = {}\n", allowed.join(", ")));
    s.push_str(&format!("PersistentKeepalive = {}\n", c.persistent_keepalive));
    s
}

/// Replace (or add) the `PresharedKey` line of the `[Peer]` section of a config's text.
pub fn set_preshared_key(text: &str, psk: &PresharedKey) -> Result<String, String> {
    let mut out = Vec::new();
    let mut in_peer = false;
    let mut done = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if in_peer && !done {
                out.push(format!("PresharedKey = {}", psk.to_base64()));
                done = true;
            }
            in_peer = trimmed.eq_ignore_ascii_case("[peer]");
            out.push(line.to_string());
            continue;
        }
        let key = trimmed.split('=').next().unwrap_or_default().trim();
        if in_peer && key.eq_ignore_ascii_case("PresharedKey") {
            if !done {
                out.push(format!("PresharedKey = {}", psk.to_base64()));
                done = true;
            }
            continue;
        }
        if in_peer && !done && key.eq_ignore_ascii_case("PublicKey") {
            out.push(line.to_string());
            out.push(format!("PresharedKey = {}", psk.to_base64()));
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !done {
        return Err("the file has no [Peer] section with a PublicKey; is it a wg-quick config?".into());
    }
    let mut s = out.join("\n");
    s.push('\n');
    Ok(s)
}

/// The config as a QR code for a terminal (two rows of modules per line).
pub fn qr(text: &str) -> anyhow::Result<String> {
    use qrcode::render::unicode::Dense1x2;
    let code = qrcode::QrCode::new(text.as_bytes()).context("the config is too long for a QR code")?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Create `path` (which must not exist) with mode 0600 and write `text`.
pub fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Check that `path` can be created: it does not exist and its directory does.
pub fn check_creatable(path: &Path) -> Result<(), String> {
    if path.exists() {
        return Err(format!(
            "{} already exists; pass another --out FILE or remove it",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "directory {} does not exist; create it or pass another --out",
            dir.display()
        ));
    }
    Ok(())
}

/// Replace `path` atomically (a 0600 temporary file renamed over it).
pub fn replace(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp-kuberaya");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(psk: bool) -> WgConfig {
        WgConfig {
            title: "kuberaya peer team-a/alice".into(),
            key: PeerKey::Private(PrivateKey::parse("aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=").unwrap()),
            address: Ipv4Addr::new(100, 64, 0, 2),
            address_v6: None,
            dns_server: Ipv4Addr::new(100, 64, 0, 1),
            dns_server_v6: None,
            search: search_domains("team-a", "cluster.local"),
            gateway_public_key: PublicKey([1; 32]),
            preshared_key: psk.then_some(PresharedKey([2; 32])),
            endpoint: "127.203.0.5:51820".into(),
            allowed_ips: vec!["127.96.0.0/16".parse().unwrap(), "100.64.0.1/32".parse().unwrap()],
            persistent_keepalive: DEFAULT_KEEPALIVE,
        }
    }

    #[test]
    fn renders_a_wg_quick_file() {
        let text = render(&sample(true));
        assert_eq!(
            text,
            "# kuberaya peer team-a/alice\n[Interface]\nPrivateKey = aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8gd28=\n\
             Address = 100.64.0.2/32\nDNS = 100.64.0.1, team-a.svc.cluster.local, svc.cluster.local, cluster.local\n\n\
             [Peer]\nPublicKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\n\
             PresharedKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\n\
             Endpoint = 127.203.0.5:51820\nAllowedIPs = 127.96.0.0/16, 100.64.0.1/32\nPersistentKeepalive = 25\n"
        );
        assert!(!render(&sample(false)).contains("PresharedKey"));
    }

    #[test]
    fn a_dual_stack_peer_gets_both_addresses_and_both_dns_servers() {
        let mut c = sample(false);
        c.address_v6 = Some("fd6b:7261:7961::2".parse().unwrap());
        c.dns_server_v6 = Some("fd6b:7261:7961::1".parse().unwrap());
        c.endpoint = "[fd00:203::5]:51820".into();
        c.allowed_ips.push("fd00:96::/112".parse().unwrap());
        c.allowed_ips.push("fd6b:7261:7961::1/128".parse().unwrap());
        let text = render(&c);
        assert!(
            text.contains("\nAddress = 100.64.0.2/32, fd6b:7261:7961::2/128\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nDNS = 100.64.0.1, fd6b:7261:7961::1, team-a.svc.cluster.local, svc.cluster.local, cluster.local\n"
            ),
            "{text}"
        );
        assert!(text.contains("\nEndpoint = [fd00:203::5]:51820\n"), "{text}");
        assert!(
            text.contains("\nAllowedIPs = 127.96.0.0/16, 100.64.0.1/32, fd00:96::/112, fd6b:7261:7961::1/128\n"),
            "{text}"
        );
    }

    #[test]
    fn a_key_made_on_the_device_is_left_out_and_named() {
        let mut c = sample(false);
        c.key = PeerKey::OnDevice(PublicKey([3; 32]));
        let text = render(&c);
        assert!(!text.lines().any(|l| l.starts_with("PrivateKey")), "{text}");
        assert!(
            text.contains(&format!("# PrivateKey = <the private key of {}", PublicKey([3; 32]))),
            "{text}"
        );
        // The rest is the same config.
        let made_here = render(&sample(false));
        let rest = |t: &str| {
            t.lines()
                .filter(|l| !l.contains("PrivateKey"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(rest(&text), rest(&made_here));
    }

    #[test]
    fn preshared_key_is_replaced_or_added() {
        let new = PresharedKey([9; 32]);
        let with = set_preshared_key(&render(&sample(true)), &new).unwrap();
        assert_eq!(with.matches("PresharedKey").count(), 1);
        assert!(with.contains(&new.to_base64()));
        let added = set_preshared_key(&render(&sample(false)), &new).unwrap();
        assert!(added.contains(&format!(
            "PublicKey = {}\nPresharedKey = {}",
            PublicKey([1; 32]),
            new.to_base64()
        )));
        assert!(set_preshared_key("[Interface]\nAddress = 1.2.3.4/32\n", &new).is_err());
    }

    #[test]
    fn files_are_0600_and_never_overwritten_by_add() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.conf");
        assert!(check_creatable(&p).is_ok());
        write_new(&p, "x").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(check_creatable(&p).is_err());
        assert!(write_new(&p, "y").is_err());
        replace(&p, "z").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "z");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(check_creatable(&dir.path().join("missing/a.conf")).is_err());
    }

    #[test]
    fn qr_code_renders() {
        let q = qr(&render(&sample(true))).unwrap();
        assert!(q.lines().count() > 20);
    }
}

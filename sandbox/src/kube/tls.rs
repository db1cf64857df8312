//! The stand-in's CA and serving certificate: made with rcgen at first start, kept in the
//! state dir, loaded on later starts.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// PEM files under the state dir.
pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn generate(service_ip: Option<std::net::IpAddr>) -> Result<Pki, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "kuberaya-sandbox-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    // As kube-apiserver's serving certificate: the `kubernetes` Service's names and
    // ClusterIP (the first address of the Service range), so that pods may use them.
    let mut names = vec![
        "localhost".to_string(),
        "kubernetes".to_string(),
        "kubernetes.default".to_string(),
        "kubernetes.default.svc".to_string(),
        "kubernetes.default.svc.cluster.local".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "127.96.0.1".to_string(),
    ];
    if let Some(ip) = service_ip.map(|i| i.to_string())
        && !names.contains(&ip)
    {
        names.push(ip);
    }
    let mut p = CertificateParams::new(names)?;
    p.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Loads the PKI from `dir`, creating it on first start.
/// `service_ip`: the `kubernetes` Service's ClusterIP, named in a new certificate.
pub fn load_or_create(dir: &Path, service_ip: Option<std::net::IpAddr>) -> Result<Pki, super::Error> {
    let (ca, crt, key) = (dir.join("ca.crt"), dir.join("apiserver.crt"), dir.join("apiserver.key"));
    if ca.exists() && crt.exists() && key.exists() {
        return Ok(Pki {
            ca_pem: std::fs::read_to_string(&ca)?,
            cert_pem: std::fs::read_to_string(&crt)?,
            key_pem: std::fs::read_to_string(&key)?,
        });
    }
    let pki = generate(service_ip).map_err(|e| super::Error::Tls(e.to_string()))?;
    super::persist::write_atomic(&ca, pki.ca_pem.as_bytes())?;
    super::persist::write_atomic(&crt, pki.cert_pem.as_bytes())?;
    super::persist::write_atomic(&key, pki.key_pem.as_bytes())?;
    Ok(pki)
}

/// A rustls server config (ring provider) advertising h2 and http/1.1.
pub fn server_config(pki: &Pki) -> Result<Arc<rustls::ServerConfig>, super::Error> {
    let tls = |e: &dyn std::fmt::Display| super::Error::Tls(e.to_string());
    let mut chain: Vec<CertificateDer<'static>> = Vec::new();
    for c in CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes()) {
        chain.push(c.map_err(|e| tls(&e))?);
    }
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).map_err(|e| tls(&e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls(&e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

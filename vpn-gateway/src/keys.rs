//! WireGuard keys: 32 bytes, written in standard base64 (as `wg genkey` prints them).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// Why a key did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64")]
    Base64,
    #[error("decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
}

/// The 32 bytes of a base64 key, wiped on drop (as is the decoded buffer), since a
/// private key goes through here too.
fn decode32(s: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let bytes = Zeroizing::new(STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?);
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != key.len() {
        return Err(KeyError::Length(bytes.len()));
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// A public key. Not secret: `Debug` and `Display` print its base64 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(|k| PublicKey(*k))
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
    pub fn to_x25519(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.0)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A private key (the gateway's own). `Debug` never prints it, and its bytes are wiped
/// from memory when it (or a clone) drops, as the `StaticSecret`s made from it are.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl PrivateKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        // Clamping happens inside x25519-dalek on use; any 32 random bytes are a key.
        PrivateKey(Zeroizing::new(rand::random::<[u8; 32]>()))
    }
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(PrivateKey)
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(*self.0)
    }
    pub fn to_x25519(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(*self.0)
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.to_x25519()).to_bytes())
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A preshared key. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub [u8; 32]);

impl PresharedKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        decode32(s).map(|k| PresharedKey(*k))
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_public_derivation() {
        let k = PrivateKey::generate();
        let again = PrivateKey::parse(&k.to_base64()).unwrap();
        assert_eq!(k.public_key(), again.public_key());
        let p = k.public_key();
        assert_eq!(PublicKey::parse(&p.to_base64()).unwrap(), p);
    }

    #[test]
    fn rejects_bad_keys() {
        assert_eq!(PublicKey::parse("not base64!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::parse("AAAA"), Err(KeyError::Length(3)));
        assert!(PublicKey::parse("").is_err());
    }

    #[test]
    fn debug_redacts_secrets() {
        let k = PrivateKey::generate();
        let s = format!("{k:?}");
        assert!(!s.contains(&k.to_base64()));
        assert!(s.contains("redacted"));
        let psk = PresharedKey([7; 32]);
        assert!(!format!("{psk:?}").contains(&psk.to_base64()));
    }

    #[test]
    fn known_vector() {
        // RFC 7748 section 6.1: Alice's private and public key.
        let sk = PrivateKey(Zeroizing::new(
            hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .try_into()
                .unwrap(),
        ));
        let pk: [u8; 32] = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
            .try_into()
            .unwrap();
        assert_eq!(sk.public_key().0, pk);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}

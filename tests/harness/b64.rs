//! Standard base64 (WireGuard keys, kubeconfig CA data, Secret values), on the `base64`
//! crate the workspace already uses, instead of a hand-written codec per test file.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes padded standard base64; surrounding whitespace (a trailing newline) is ignored.
pub fn b64_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD.decode(s.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_padding_and_a_trailing_newline() {
        for input in [&b""[..], b"a", b"ab", b"abc", &[0xff; 32]] {
            let text = b64(input);
            assert_eq!(b64_decode(&format!("{text}\n")).unwrap(), input);
        }
        assert_eq!(b64(b"ab"), "YWI=");
        assert!(b64_decode("not base64!").is_err());
    }
}

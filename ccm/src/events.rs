//! Kubernetes Events of the CCM's controllers.
//!
//! kube-apiserver's validation of `events.k8s.io/v1` Events (the API kube-runtime's
//! [`Recorder`](kube::runtime::events::Recorder) writes) limits `note` to
//! [`NOTE_MAX_BYTES`] *bytes*; a longer note is refused with 422 and the Event is lost.
//! [`note`] cuts a note to fit, at a char boundary, so a note in another script or with
//! U+FFFD from a lossy decode still fits; [`fit_bytes`] does the same for the other
//! texts kube-apiserver limits in bytes (a condition's message).

/// kube-apiserver's limit on an `events.k8s.io/v1` Event's `note`, in bytes.
pub const NOTE_MAX_BYTES: usize = 1024;

/// What a cut note ends with.
const ELLIPSIS: char = '…';

/// `text` as an Event note: see [`fit_bytes`].
pub fn note(text: &str) -> String {
    fit_bytes(text, NOTE_MAX_BYTES)
}

/// `text` unchanged when it fits in `max` bytes (kube-apiserver counts bytes, Go's
/// `len`), else its longest start that ends at a char boundary and leaves room for a
/// closing `…`. `max` is at least the ellipsis' 3 bytes.
pub fn fit_bytes(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let budget = max.saturating_sub(ELLIPSIS.len_utf8());
    let cut = (0..=budget).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let mut out = String::with_capacity(cut + ELLIPSIS.len_utf8());
    out.push_str(&text[..cut]);
    out.push(ELLIPSIS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_that_fits_is_unchanged() {
        assert_eq!(note(""), "");
        let full = "a".repeat(NOTE_MAX_BYTES);
        assert_eq!(note(&full), full);
        // 341 three-byte chars (1023 bytes) are 341 chars, far below a char count of 1000
        // and still within the byte limit.
        let cjk = "負".repeat(341);
        assert_eq!(note(&cjk), cjk);
    }

    #[test]
    fn a_long_note_is_cut_by_bytes_at_a_char_boundary() {
        let ascii = note(&"a".repeat(NOTE_MAX_BYTES + 1));
        assert_eq!(ascii.len(), NOTE_MAX_BYTES);
        assert!(ascii.ends_with('…'));

        // 1000 chars of U+FFFD (3 bytes each, as a lossy decode leaves them) are 3000
        // bytes: cutting at 1000 chars let them through, cutting by bytes does not.
        for text in [
            "\u{FFFD}".repeat(1000),
            format!("x{}", "é".repeat(600)),
            format!("ab{}", "😀".repeat(300)),
            format!("{}😀", "a".repeat(1021)),
        ] {
            let cut = note(&text);
            assert!(cut.len() <= NOTE_MAX_BYTES, "{} bytes", cut.len());
            assert!(cut.len() >= NOTE_MAX_BYTES - 3 - 3, "{} bytes: cut too much", cut.len());
            let kept = cut.strip_suffix('…').expect("a cut note ends with …");
            assert!(text.starts_with(kept));
        }
    }

    #[test]
    fn any_byte_limit_is_kept_at_a_char_boundary() {
        // A condition message (32 KiB) of 3-byte chars: 32,768 of them are 98,304 bytes.
        let text = "\u{FFFD}".repeat(32 * 1024);
        let cut = fit_bytes(&text, 32 * 1024);
        assert!(cut.len() <= 32 * 1024 && cut.len() >= 32 * 1024 - 6, "{}", cut.len());
        assert_eq!(fit_bytes("short", 32 * 1024), "short");
        assert_eq!(fit_bytes("abcdef", 3), "…");
    }
}

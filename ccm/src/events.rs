//! Kubernetes Events of the CCM's controllers: the [`recorder`] of each controller,
//! [`event`] to build one, [`publish`] to send one now, and [`EventQueue`] to send them
//! off the reconcile path.
//!
//! kube-apiserver's validation of `events.k8s.io/v1` Events (the API kube-runtime's
//! [`Recorder`] writes) limits `note` to
//! [`NOTE_MAX_BYTES`] *bytes*; a longer note is refused with 422 and the Event is lost.
//! [`note`] cuts a note to fit, at a char boundary, so a note in another script or with
//! U+FFFD from a lossy decode still fits; [`fit_bytes`] does the same for the other
//! texts kube-apiserver limits in bytes (a condition's message).

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

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

/// The recorder of the controller named `controller`; the instance reporting is this pod
/// (`POD_NAME`, from the downward API).
pub fn recorder(client: Client, controller: &str) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: controller.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}

/// An Event whose action is its reason and whose note is cut to fit ([`note`]).
pub fn event(type_: EventType, reason: &str, note_text: &str) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note(note_text)),
        action: reason.into(),
        secondary: None,
    }
}

/// Publishes `ev` about `regarding` now. Events are best effort: a failure is logged.
pub async fn publish(recorder: &Recorder, ev: &Event, regarding: &ObjectReference) {
    if let Err(e) = recorder.publish(ev, regarding).await {
        warn!(error = %e, reason = %ev.reason, "could not publish event");
    }
}

/// Events published by a task of their own, not by the reconcile that reports them:
/// each is an API request (two per created or deleted LB), and a worker waiting on it is
/// a worker not talking to the platform. As client-go's recorder does, the queue is
/// bounded and an Event that does not fit is dropped (Events are best effort; the
/// object's condition and status carry what matters).
pub struct EventQueue {
    tx: tokio::sync::mpsc::Sender<(Event, ObjectReference)>,
}

impl EventQueue {
    /// Events waiting to be published (client-go: `maxQueuedEvents`).
    const CAPACITY: usize = 1000;
    /// Events being published at once.
    const PUBLISHERS: usize = 4;

    /// The queue and its publishing task, which ends once the queue is dropped and drained.
    pub fn start(recorder: Recorder) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Event, ObjectReference)>(Self::CAPACITY);
        tokio::spawn(async move {
            futures::stream::poll_fn(|cx| rx.poll_recv(cx))
                .for_each_concurrent(Self::PUBLISHERS, |(ev, regarding)| {
                    let recorder = &recorder;
                    async move { publish(recorder, &ev, &regarding).await }
                })
                .await;
        });
        EventQueue { tx }
    }

    /// Queues `ev` about `regarding`, never waiting.
    pub fn send(&self, ev: Event, regarding: ObjectReference) {
        if let Err(e) = self.tx.try_send((ev, regarding)) {
            let (ev, _) = e.into_inner();
            warn!(reason = %ev.reason, "event dropped: {} events already wait to be published", Self::CAPACITY);
        }
    }
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

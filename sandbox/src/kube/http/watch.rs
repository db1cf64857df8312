//! Watch streams: the history after the client's resourceVersion, then live changes,
//! bookmarks, and the timeout.

use super::Ctx;
use super::list::filter;
use super::negotiate::{Shape, metadata_only, shape, stored_form};
use super::path::Target;
use crate::kube::registry::ResourceType;
use crate::kube::status::ApiError;
use crate::kube::store::{Change, ListFilter};
use crate::kube::table;
use crate::kube::util::{now_rfc3339, to_json_bytes};
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};
use std::time::Duration;

/// A change as one watch sees it (None: not for this watch).
pub(super) fn event_for(
    rt: &ResourceType,
    f: &ListFilter,
    ch: &Change,
    present: &dyn Fn(&Value) -> Value,
) -> Option<(&'static str, Value)> {
    if ch.storage != rt.storage || f.namespace.as_ref().is_some_and(|ns| *ns != ch.namespace) {
        return None;
    }
    let now_match = f.matches(rt, &ch.object);
    match ch.typ {
        "ADDED" => now_match.then(|| ("ADDED", present(&ch.object))),
        "DELETED" => now_match.then(|| ("DELETED", present(&ch.object))),
        _ => {
            let was = ch.old.as_ref().is_some_and(|o| f.matches(rt, o));
            match (was, now_match) {
                (true, true) => Some(("MODIFIED", present(&ch.object))),
                (false, true) => Some(("ADDED", present(&ch.object))),
                (true, false) => Some(("DELETED", present(&ch.object))),
                (false, false) => None,
            }
        }
    }
}

pub(super) fn watch(c: &Ctx<'_>, t: &Target) -> Result<Response, ApiError> {
    let rt = t.rt.clone();
    let shape = shape(&c.accept())?;
    let mut f = filter(c, &rt, t.namespace.clone())?;
    if let Some(n) = &t.name {
        f.fields.0.push(("metadata.name".into(), true, n.clone()));
    }
    let bookmarks = matches!(c.q("allowWatchBookmarks"), Some("true" | "1"));
    let send_initial = matches!(c.q("sendInitialEvents"), Some("true" | "1"));
    let timeout = c
        .q("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800)
        .min(3600);
    let rv_param = c.q("resourceVersion").unwrap_or_default().to_string();
    let include_object = c.q("includeObject").map(str::to_string);
    let (initial, mut rx, start_rv, err) = {
        let s = c.api.lock();
        let rx = s.tx.subscribe();
        let present = |o: &Value| s.present(&rt, o);
        let mut initial: Vec<(&'static str, Value)> = Vec::new();
        let mut err = None;
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            let (items, _, _) = s.list(&rt, &f, None, 0);
            initial.extend(items.into_iter().map(|o| ("ADDED", o)));
        } else {
            let from: u64 = rv_param
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv_param}")))?;
            match s.changes_since(from) {
                Ok(chs) => initial.extend(chs.iter().filter_map(|ch| event_for(&rt, &f, ch, &present))),
                Err(e) => err = Some(e),
            }
        }
        (initial, rx, s.rv, err)
    };
    let (tx, out_rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(64);
    // A cut ends the body with an error, which breaks the connection mid-stream.
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<()>();
    let api = c.api.clone();
    let mut cuts = api.faults.watch_cuts();
    let mut stop = api.stop.subscribe();
    let every = api.bookmark_every;
    tokio::spawn(async move {
        let table_rt = rt.clone();
        let mut first_table = true;
        let mut encode = |typ: &str, obj: Value| -> axum::body::Bytes {
            let obj = match (shape, typ) {
                (_, "BOOKMARK") | (_, "ERROR") => obj,
                (Shape::Full, _) => obj,
                (Shape::Metadata, _) => metadata_only(&obj),
                (Shape::Table, _) => {
                    let stored = stored_form(&table_rt, &obj);
                    let shown = match include_object.as_deref() {
                        Some("None") => Value::Null,
                        Some("Object") => obj.clone(),
                        _ => metadata_only(&obj),
                    };
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let tbl = table::table(&table_rt, &[(stored, shown)], &rv, None, first_table);
                    first_table = false;
                    tbl
                }
            };
            let mut line = to_json_bytes(&json!({"type": typ, "object": obj}));
            line.push(b'\n');
            axum::body::Bytes::from(line)
        };
        let bookmark = |rv: u64, initial_end: bool| -> Value {
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let (kind, av) = match shape {
                Shape::Metadata => ("PartialObjectMetadata".to_string(), "meta.k8s.io/v1".to_string()),
                _ => (rt.kind.clone(), rt.api_version()),
            };
            json!({"kind": kind, "apiVersion": av, "metadata": meta})
        };
        if let Some(e) = err {
            let _ = tx.send(encode("ERROR", e.to_status())).await;
            return;
        }
        for (typ, obj) in initial {
            if tx.send(encode(typ, obj)).await.is_err() {
                return;
            }
        }
        let mut last_rv = start_rv;
        if send_initial && bookmarks && tx.send(encode("BOOKMARK", bookmark(last_rv, true))).await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if bookmarks {
                        let _ = tx.send(encode("BOOKMARK", bookmark(last_rv, false))).await;
                    }
                    return;
                }
                _ = tick.tick(), if bookmarks => {
                    if tx.send(encode("BOOKMARK", bookmark(last_rv, false))).await.is_err() {
                        return;
                    }
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => return,
                _ = cuts.changed() => {
                    let _ = cut_tx.send(());
                    return;
                }
                _ = tx.closed() => return,
                msg = rx.recv() => {
                    let batch = match msg {
                        Ok(ch) => vec![ch],
                        // Fell behind the live feed: catch up from the history, which
                        // reaches further back (410 only when it does not).
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let caught_up = api.lock().changes_since(last_rv);
                            match caught_up {
                                Ok(chs) => chs,
                                Err(e) => {
                                    let _ = tx.send(encode("ERROR", e.to_status())).await;
                                    return;
                                }
                            }
                        }
                        Err(_) => return,
                    };
                    for ch in batch {
                        if ch.typ == "ERROR" {
                            let e = ApiError::gone(format!("too old resource version: {last_rv} ({})", ch.rv));
                            let _ = tx.send(encode("ERROR", e.to_status())).await;
                            return;
                        }
                        if ch.rv <= last_rv {
                            continue;
                        }
                        last_rv = ch.rv;
                        let ev = {
                            let s = api.lock();
                            let present = |o: &Value| s.present(&rt, o);
                            event_for(&rt, &f, &ch, &present)
                        };
                        if let Some((typ, obj)) = ev
                            && tx.send(encode(typ, obj)).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }
        }
    });
    let stream = futures::stream::unfold((out_rx, Some(cut_rx)), |(mut rx, cut)| async move {
        match rx.recv().await {
            Some(b) => Some((Ok(b), (rx, cut))),
            // Ended: cleanly, unless it was cut.
            None => match cut?.await {
                Ok(()) => Some((
                    Err(std::io::Error::other("watch cut by /_sandbox/watches/cut")),
                    (rx, None),
                )),
                Err(_) => None,
            },
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    let _ = now_rfc3339;
    Ok(r)
}

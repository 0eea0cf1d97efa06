//! `kvclient watch` (docs/DESIGN.md §9.2): one line per event, flushed
//! as it comes, so a reader sees each event live.

use kvclient::{EventKind, WatchEvent};

/// The event as a line: `TYPE INDEX KEY[ VALUE]` (the value of a put),
/// fields escaped as `ls` does; with `json`, the event's JSON. `None`
/// for a progress event without `json`.
pub fn line(event: &WatchEvent, json: bool, escape: impl Fn(&[u8]) -> String) -> Option<String> {
    if json {
        return Some(event.json.to_string());
    }
    let kind = match event.kind {
        EventKind::Put => "put",
        EventKind::Delete => "delete",
        EventKind::Expire => "expire",
        EventKind::Progress => return None,
    };
    let key = escape(event.key.as_deref().unwrap_or_default().as_bytes());
    let mut out = format!("{kind} {} {key}", event.index);
    if let (EventKind::Put, Some(value)) = (event.kind, &event.value) {
        out.push(' ');
        out.push_str(&escape(value));
    }
    Some(out)
}

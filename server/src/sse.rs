//! Server-Sent Events framing. A payload's line breaks (CR, LF or CRLF)
//! end `data:` lines, so no payload can end an event or start a field.

/// One event of type `event` carrying `payload`.
pub(crate) fn event(event: &str, payload: &str) -> String {
    let mut out = String::with_capacity(payload.len() + 32);
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    let mut rest = payload;
    loop {
        let cut = rest.find(['\r', '\n']);
        out.push_str("data:");
        out.push_str(&rest[..cut.unwrap_or(rest.len())]);
        out.push('\n');
        let Some(at) = cut else { break };
        let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
        rest = &rest[at + skip..];
    }
    out.push('\n');
    out
}

/// A comment line, which keeps proxies from closing an idle connection.
pub(crate) const KEEP_ALIVE: &str = ":\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_in_a_payload_stay_data() {
        let framed = event("data", "a\r\n\r\nevent: control\rdata: x\nb");
        assert_eq!(
            framed,
            "event: data\ndata:a\ndata:\ndata:event: control\ndata:data: x\ndata:b\n\n"
        );
        // Exactly one blank line: one event.
        assert_eq!(framed.matches("\n\n").count(), 1);
        assert_eq!(event("control", "{}"), "event: control\ndata:{}\n\n");
    }
}

//! Express batches: what drivers send for each unprepared query (Parse of the unnamed
//! statement, Bind into the unnamed portal, Describe, Execute, Sync), when the text is the one
//! last classified and it has no session effect and is no COPY, goes to the server in one copy
//! with a single queue entry, its Sync's.
//!
//! Nothing in such a batch needs an entry of its own: no name is rewritten, nothing is
//! registered that an error would undo, no statement of ours can meet a stale plan, and no
//! CommandComplete changes session state. With only the Sync's entry at the front, every
//! answer up to its ReadyForQuery passes to the client as it is (an error too: the server then
//! skips to the Sync, whose entry stays until its ReadyForQuery), which is what the entries
//! one by one would have done.

use pgwarden_protocol::frame::{message_len, MAX_MESSAGE};
use pgwarden_protocol::frontend;

use super::{Context, Pending, Pipeline};
use crate::server::ServerConn;

impl Pipeline {
    /// Sends the express batch at the front of `buf` (complete frames through a Sync) and
    /// returns its length; 0 if the front of `buf` is not one, and nothing was done. The caller
    /// has brought the server's session state up to date.
    pub fn send_express(&mut self, buf: &[u8], conn: &mut ServerConn, cx: &Context<'_>) -> usize {
        if self.in_batch
            || self.copy_in
            || !self.statement_effects.is_empty()
            || !self.portal_effects.is_empty()
        {
            return 0;
        }
        let Some(last) = self.last_classified.as_ref().filter(|l| l.plain) else {
            return 0;
        };
        let mut at = 0;
        let mut runs = false;
        loop {
            let Ok(Some(n)) = message_len(&buf[at..], MAX_MESSAGE) else {
                return 0;
            };
            let (tag, body) = (buf[at], &buf[at + 5..at + n]);
            let ok = match tag {
                b'P' => body.first() == Some(&0) && last.parses(&body[1..]),
                // The first message parses the statement the rest use.
                _ if at == 0 => false,
                b'B' => body.starts_with(b"\0\0") && frontend::check_bind_rest(&body[2..]).is_ok(),
                b'D' => body == b"P\0" || body == b"S\0",
                b'E' => body.len() == 5 && body[0] == 0,
                b'H' | b'S' => body.is_empty(),
                _ => false,
            };
            if !ok {
                return 0;
            }
            runs |= matches!(tag, b'B' | b'E');
            at += n;
            if tag == b'S' {
                break;
            }
        }
        conn.framed.wbuf.extend_from_slice(&buf[..at]);
        if cx.capacity > 0 {
            self.batches.sent_unkept(runs);
        }
        self.queue.push_back(Pending::forward(b'S'));
        self.ends += 1;
        at
    }

    /// How many bytes at the front of `buf` (the server's answers) are complete messages that
    /// go to the client as they are with nothing to track: with a Sync's entry at the front
    /// of the queue, or a simple query's whose statements change no session state, everything
    /// before its ReadyForQuery except an error, a ParameterStatus and the start of a COPY
    /// (which `receive` handles one by one).
    pub fn passing(&self, buf: &[u8]) -> usize {
        if !matches!(
            self.queue.front(),
            Some(Pending::Forward { tag: b'S' | b'Q', effects, .. }) if effects.is_empty()
        ) {
            return 0;
        }
        let mut at = 0;
        while let Ok(Some(n)) = message_len(&buf[at..], MAX_MESSAGE) {
            if !matches!(
                buf[at],
                b'1' | b'2' | b'T' | b't' | b'n' | b's' | b'I' | b'D' | b'C' | b'N'
            ) {
                break;
            }
            at += n;
        }
        at
    }
}

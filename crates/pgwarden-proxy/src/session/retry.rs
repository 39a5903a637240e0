//! Recovering from `cached plan must not change result type` (0A000).
//!
//! Server-side statements are shared by every client of a pool and outlive a client's own
//! session, so DDL that changes a statement's result type makes its next Bind fail on every
//! server connection that prepared it before. When that happens on the first Bind of a batch
//! on a connection that was idle before the batch (so the batch ran in an implicit transaction
//! that the error undid and nothing else was lost), the proxy does not pass the error on: it
//! closes the stale statement, prepares it again and sends the batch again from that Bind
//! through its Sync, once, provided the batch describes its portal, so the client learns the new
//! result shape (libpq does; a driver that decodes rows with a cached description would misread
//! them). Inside an explicit transaction, when the batch had already done something, or without
//! that Describe, the client gets the error as PostgreSQL would give it.
//!
//! For this, [`Batches`] keeps a copy of the client's extended-protocol frames of every batch
//! that has not had its ReadyForQuery yet, from its first Bind or Describe of a named statement
//! on (a batch of unnamed statements only is not copied at all), one after another in one
//! buffer, reused from batch to batch; a batch past [`MAX_KEPT`] bytes is not kept, and so never
//! retried.

use std::collections::VecDeque;

use bytes::Bytes;
use pgwarden_protocol::backend::BackendMessage;
use pgwarden_protocol::SqlState;

/// The most bytes of frames kept for one batch.
pub const MAX_KEPT: usize = 1 << 20;

#[derive(Debug, Default)]
struct Batch {
    /// Its frames, one after another (empty once `oversized`).
    bytes: Vec<u8>,
    /// More than [`MAX_KEPT`] bytes: not kept, not retried.
    oversized: bool,
    /// The batch's Sync has been sent.
    closed: bool,
    /// A Bind of it has completed: the batch is past its first Bind.
    bound: bool,
    /// Already sent a second time.
    retried: bool,
    /// Frames are kept from the first Bind or Describe of a named statement on (only those can
    /// meet a stale plan of ours); before it nothing is kept, and `ran` says whether a Bind or
    /// Execute went by (then nothing after it can be sent again).
    keeping: bool,
    ran: bool,
}

/// Whether a frame body of type `tag` binds or describes a named statement: all of the proxy's
/// statements have names, so only these can fail on a stale plan of ours.
fn names_a_statement(tag: u8, body: &[u8]) -> bool {
    match tag {
        b'B' => body
            .iter()
            .position(|&c| c == 0)
            .is_some_and(|portal_end| body.get(portal_end + 1).is_some_and(|&c| c != 0)),
        b'D' => body.first() == Some(&b'S') && body.get(1).is_some_and(|&c| c != 0),
        _ => false,
    }
}

/// The client's unanswered extended-protocol batches, oldest first.
#[derive(Debug, Default)]
pub struct Batches {
    queue: VecDeque<Batch>,
    /// A finished batch's buffer, kept for the next batch (one allocation per session, not one
    /// per transaction).
    spare: Vec<u8>,
}

/// A batch to send again, and the statement to prepare anew first.
pub struct Retry {
    pub frames: Vec<Bytes>,
}

/// Frames stored one after another.
fn frames(mut rest: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize;
        let (frame, after) = rest.split_at((1 + len).min(rest.len()));
        rest = after;
        Some(frame)
    })
}

impl Batches {
    /// A client message of type `tag` went to the server.
    pub fn sent(&mut self, tag: u8, frame: &[u8]) {
        if !matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S') {
            return;
        }
        if self.queue.back().map_or(true, |b| b.closed) {
            self.queue.push_back(Batch {
                bytes: std::mem::take(&mut self.spare),
                ..Batch::default()
            });
        }
        let b = self.queue.back_mut().expect("just ensured");
        if !b.keeping {
            // What drivers send for each unprepared query (unnamed statements only) is never
            // copied.
            if !names_a_statement(tag, frame.get(5..).unwrap_or_default()) {
                b.ran |= matches!(tag, b'B' | b'E');
                b.closed = tag == b'S';
                return;
            }
            b.keeping = true;
        }
        if !b.oversized {
            if b.bytes.len() + frame.len() > MAX_KEPT {
                b.oversized = true;
                b.bytes = Vec::new();
            } else {
                b.bytes.extend_from_slice(frame);
            }
        }
        b.closed = tag == b'S';
    }

    /// A whole batch of unnamed statements went to the server (`runs`: it binds or executes),
    /// as `sent` would have recorded it frame by frame.
    pub fn sent_unkept(&mut self, runs: bool) {
        self.queue.push_back(Batch {
            bytes: std::mem::take(&mut self.spare),
            ran: runs,
            closed: true,
            ..Batch::default()
        });
    }

    /// The ReadyForQuery of the oldest batch arrived.
    pub fn done(&mut self) {
        if let Some(mut b) = self.queue.pop_front() {
            if b.bytes.capacity() <= 16 * 1024 {
                b.bytes.clear();
                self.spare = b.bytes;
            }
        }
    }

    /// A Bind completed.
    pub fn bound(&mut self) {
        if let Some(b) = self.queue.front_mut() {
            b.bound = true;
        }
    }

    /// Marks the newest batch as a retry (it must not be retried again).
    pub fn mark_retried(&mut self) {
        if let Some(b) = self.queue.back_mut() {
            b.retried = true;
        }
    }

    /// Whether the oldest batch may be sent again after a stale plan failed its first Bind
    /// (`failed` = `B`) or its first Describe of a statement (`D`); if so, takes it. Only when it
    /// is the only unanswered batch: a later one is already at the server, and its answers
    /// would overtake the retry's.
    pub fn take_retry(&mut self, failed: u8, idle_before: bool) -> Option<Retry> {
        if self.queue.len() != 1 {
            return None;
        }
        let b = self.queue.front()?;
        if !idle_before || b.bound || b.retried || !b.closed || b.oversized || b.ran {
            return None;
        }
        let all: Vec<&[u8]> = frames(&b.bytes).collect();
        let first = all.iter().position(|f| match failed {
            b'D' => f[0] == b'D' && f.get(5) == Some(&b'S'),
            t => f[0] == t,
        })?;
        // Nothing that runs may come before it (only Parse/Describe/Close/Flush).
        if all[..first]
            .iter()
            .any(|f| matches!(f[0], b'B' | b'E' | b'Q' | b'F'))
        {
            return None;
        }
        if failed == b'B' {
            // The client must learn the new result shape: a Describe of the portal before the
            // first Execute (libpq always sends one). A driver that decodes rows with a
            // description it cached would misread them, so it gets the error instead.
            let after = &all[first + 1..];
            let execute = after
                .iter()
                .position(|f| f[0] == b'E')
                .unwrap_or(after.len());
            if !after[..execute]
                .iter()
                .any(|f| f[0] == b'D' && f.get(5) == Some(&b'P'))
            {
                return None;
            }
        }
        let retry = Retry {
            frames: all[first..]
                .iter()
                .map(|f| Bytes::copy_from_slice(f))
                .collect(),
        };
        self.queue.pop_front();
        Some(retry)
    }
}

/// Whether an ErrorResponse body is `0A000 cached plan must not change result type`.
pub fn is_stale_plan(error_body: &[u8]) -> bool {
    matches!(
        BackendMessage::parse(b'E', error_body),
        Ok(BackendMessage::ErrorResponse(e))
            if e.code() == Some(SqlState::FEATURE_NOT_SUPPORTED)
                && e.message().is_some_and(|m| m.starts_with("cached plan must not change result type"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use pgwarden_protocol::error_response::ErrorReport;

    /// A frame; `D` is a Describe of the portal, `d` (sent as `D`) one of statement `s`, `B` a
    /// Bind of statement `s`, `b` (sent as `B`) one of the unnamed statement.
    fn frame(tag: u8) -> Bytes {
        match tag {
            b'D' => Bytes::from(vec![b'D', 0, 0, 0, 6, b'P', 0]),
            b'd' => Bytes::from(vec![b'D', 0, 0, 0, 7, b'S', b's', 0]),
            b'B' => Bytes::from(vec![b'B', 0, 0, 0, 13, 0, b's', 0, 0, 0, 0, 0, 0, 0]),
            b'b' => Bytes::from(vec![b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]),
            t => Bytes::from(vec![t, 0, 0, 0, 4]),
        }
    }

    fn send(b: &mut Batches, tags: &[u8]) {
        for &t in tags {
            let f = frame(t);
            b.sent(f[0], &f);
        }
    }

    fn stale() -> Vec<u8> {
        let mut b = BytesMut::new();
        ErrorReport::error(
            SqlState::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type",
        )
        .put_error(&mut b);
        b[5..].to_vec()
    }

    #[test]
    fn only_a_first_bind_in_an_implicit_transaction_is_retried_once() {
        let mut b = Batches::default();
        send(&mut b, b"PBDES");
        assert!(b.take_retry(b'B', false).is_none(), "inside a transaction");
        let mut other = BytesMut::new();
        ErrorReport::error(SqlState::FEATURE_NOT_SUPPORTED, "something else").put_error(&mut other);
        assert!(!is_stale_plan(&other[5..]));
        assert!(is_stale_plan(&stale()));
        let r = b.take_retry(b'B', true).expect("retry");
        let tags: Vec<u8> = r.frames.iter().map(|f| f[0]).collect();
        assert_eq!(tags, b"BDES", "from the Bind through the Sync");
        // Once bound, a batch is past its first Bind.
        send(&mut b, b"BDES");
        b.bound();
        assert!(b.take_retry(b'B', true).is_none());
        // Another batch pipelined behind it: its answers would come first.
        let mut b = Batches::default();
        send(&mut b, b"BDESBDES");
        assert!(b.take_retry(b'B', true).is_none());
        // A batch sent again is not retried a second time.
        let mut b = Batches::default();
        send(&mut b, b"BDES");
        b.mark_retried();
        assert!(b.take_retry(b'B', true).is_none());
        // An Execute before the Bind: that work is gone, no retry.
        let mut b = Batches::default();
        send(&mut b, b"PEBDES");
        assert!(b.take_retry(b'B', true).is_none());
        // No Sync sent yet: not retried.
        let mut b = Batches::default();
        send(&mut b, b"BDE");
        assert!(b.take_retry(b'B', true).is_none());
    }

    #[test]
    fn batches_of_unnamed_statements_are_not_kept() {
        let mut b = Batches::default();
        send(&mut b, b"PbDES");
        assert!(b.take_retry(b'B', true).is_none());
        assert!(b.queue[0].bytes.is_empty(), "nothing copied");
        b.done();
        // Kept from the first named Bind on; an unnamed Bind or an Execute before it rules a
        // retry out.
        send(&mut b, b"PBDES");
        let r = b.take_retry(b'B', true).expect("retry");
        assert_eq!(r.frames.iter().map(|f| f[0]).collect::<Vec<_>>(), b"BDES");
        let mut b = Batches::default();
        send(&mut b, b"PbEBDES");
        assert!(b.take_retry(b'B', true).is_none());
        assert!(names_a_statement(b'B', b"portal\0s\0"));
        assert!(!names_a_statement(b'B', b"portal\0\0"));
        assert!(!names_a_statement(b'B', b"portal"));
        assert!(!names_a_statement(b'D', b"S\0"));
        assert!(!names_a_statement(b'D', b"Ps\0"));
    }

    #[test]
    fn an_oversized_batch_is_not_kept_nor_retried() {
        let mut b = Batches::default();
        let len = (MAX_KEPT + 10) as u32;
        let mut big = vec![b'B'];
        big.extend_from_slice(&len.to_be_bytes());
        big.resize(1 + len as usize, 0);
        big[6] = b's'; // a Bind of statement "s"
        b.sent(b'B', &big);
        send(&mut b, b"DES");
        assert!(b.queue[0].oversized);
        assert!(b.take_retry(b'B', true).is_none());
        b.done();
        send(&mut b, b"BDES");
        let r = b
            .take_retry(b'B', true)
            .expect("the next batch is kept again");
        assert_eq!(r.frames.len(), 4);
    }

    #[test]
    fn a_statement_describe_is_retried_from_itself() {
        // tokio-postgres prepares with Parse, Describe statement, Sync.
        let mut b = Batches::default();
        send(&mut b, b"PdS");
        let r = b.take_retry(b'D', true).expect("retry");
        assert_eq!(
            r.frames.len(),
            2,
            "from the Describe: the Parse was answered already"
        );
        assert_eq!(r.frames[0][5], b'S');
    }

    #[test]
    fn without_a_portal_describe_the_client_gets_the_error() {
        let mut b = Batches::default();
        send(&mut b, b"BES");
        assert!(b.take_retry(b'B', true).is_none(), "no Describe at all");
        let mut b = Batches::default();
        send(&mut b, b"dBES");
        assert!(
            b.take_retry(b'B', true).is_none(),
            "a statement Describe before the Bind"
        );
        let mut b = Batches::default();
        send(&mut b, b"BEDS");
        assert!(
            b.take_retry(b'B', true).is_none(),
            "the Describe comes after the Execute"
        );
    }
}

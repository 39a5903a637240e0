//! A server lost under a client's statements (closed, failed, a FATAL error, fenced out).
//!
//! In transaction mode, outside a transaction block and with nothing pinning the client to that
//! server, the client's session outlives it: every batch still unanswered fails with one error,
//! exactly as if the server had answered it with that error (the rest of the batch skipped, what
//! it registered undone), and ends with ReadyForQuery (idle). The client's next transaction goes
//! wherever the router sends it, on another connection. Inside a transaction block, in session
//! mode or when pinned, the session ends with its server as it would without a proxy: what it
//! holds cannot be carried over.

use bytes::BytesMut;
use pgwarden_protocol::backend::{self, TxStatus};

use super::{Context, Pending, Pipeline};
use crate::error::ProxyError;
use crate::server::ServerConn;
use crate::session::retry::Batches;
use crate::session::state::SessionState;

impl Pipeline {
    /// Whether the client's session may outlive its server now (`status`: the server's
    /// transaction status at its last ReadyForQuery, which is where the unanswered work began).
    pub fn outlives_server(
        &self,
        status: TxStatus,
        session: &SessionState,
        capacity: usize,
    ) -> bool {
        capacity > 0
            && status == TxStatus::Idle
            && session.pinned().is_none()
            && !self.copy_in
            && !self
                .queue
                .iter()
                .any(|p| matches!(p, Pending::CopyEnd | Pending::SwallowReady))
    }

    /// Nothing in flight registered anything (names, effects, statements of ours): sending it
    /// all again elsewhere does what sending it here would have done.
    pub fn plain_in_flight(&self) -> bool {
        !self.in_batch
            && !self.copy_in
            && self.queue.iter().all(|p| match p {
                Pending::Forward {
                    undo,
                    stmt,
                    effects,
                    ..
                } => undo.is_empty() && stmt.is_none() && effects.is_empty(),
                Pending::Internal { .. } | Pending::Position { .. } => true,
                _ => false,
            })
    }

    /// The server is gone and what was in flight will be sent again elsewhere: forgotten.
    pub fn forget_in_flight(&mut self) {
        self.queue.clear();
        self.in_batch = false;
        self.stale.clear();
        self.batches = Batches::default();
        self.copy_in = false;
    }

    /// The server is gone: every unanswered batch gets `error` (an ErrorResponse frame of
    /// severity ERROR) and ReadyForQuery (idle), as a server that failed it would answer. The
    /// proxy's own queries in flight are dropped unseen. Returns whether the client is in the
    /// middle of a batch: its messages up to the next Sync are then to be skipped, and that Sync
    /// answered with ReadyForQuery.
    pub fn server_lost(
        &mut self,
        error: &[u8],
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
        client_out: &mut BytesMut,
    ) -> Result<bool, ProxyError> {
        conn.broken = true;
        let mut ready = BytesMut::new();
        backend::put_ready_for_query(&mut ready, TxStatus::Idle);
        loop {
            self.emit_injects(conn.status, client_out);
            while matches!(
                self.queue.front(),
                Some(Pending::Internal { .. } | Pending::Position { .. })
            ) {
                self.queue.pop_front();
            }
            if self.queue.is_empty() {
                break;
            }
            // Fails the front message; the rest of its batch is skipped up to its Sync.
            self.receive(error, conn, cx, client_out)?;
            if matches!(
                self.queue.front(),
                Some(Pending::Forward {
                    tag: b'S' | b'Q' | b'F',
                    ..
                })
            ) {
                self.receive(&ready, conn, cx, client_out)?;
            }
        }
        let unfinished = std::mem::take(&mut self.in_batch);
        // Everything else here was about that server.
        self.stale.clear();
        self.batches = Batches::default();
        self.copy_in = false;
        Ok(unfinished)
    }
}

//! A server lost under a client's statements: read batches sent again elsewhere when nothing
//! of their answer reached the client, otherwise each batch in flight failed with 08006 (see
//! `pipeline::lost`), or the session ended.

use pgwarden_protocol::backend::TxStatus;
use pgwarden_protocol::error_response::ErrorReport;

use super::{Client, Forwarder};
use crate::error::ProxyError;
use crate::pool::Lease;

impl Forwarder<'_> {
    /// The held server is gone (`cause`: closed, failed, ended with FATAL, fenced out) under the
    /// client's statements. When the session may outlive it (see `pipeline::lost`), each
    /// unanswered batch fails with 08006 and the session goes on without a server, its next
    /// transaction on another connection; otherwise `cause` ends the session. Either way the
    /// server is closed and nothing more it says reaches the client.
    pub(super) async fn lose_server(
        &mut self,
        lease: &mut Option<Lease>,
        c: &mut Client,
        cause: ProxyError,
    ) -> Result<(), ProxyError> {
        let capacity = self.capacity();
        if self.replays(lease, c).await {
            return Ok(());
        }
        let mut l = lease.take().expect("a server is attached here");
        if !c
            .pipeline
            .outlives_server(l.conn.status, &c.session, capacity)
        {
            self.drop_server(l, c).await;
            return Err(cause);
        }
        let what = match &cause {
            ProxyError::Fenced { node, epoch } => {
                format!("{node} no longer takes writes (epoch {epoch} ended)")
            }
            ProxyError::ServerGone { message } => {
                format!("the server ended the connection ({message})")
            }
            _ => "the server connection was lost".to_string(),
        };
        let message = format!(
            "{what}: the outcome of the statements in flight is unknown (a write may have \
             committed); the session goes on"
        );
        let mut error = bytes::BytesMut::new();
        ErrorReport::error(pgwarden_protocol::SqlState::CONNECTION_FAILURE, &message)
            .put_error(&mut error);
        let cache = &self.checkout.group.common.statements;
        let (pipeline, mut cx) = c.cx(cache, capacity);
        let unfinished = pipeline.server_lost(&error, &mut l.conn, &mut cx, &mut self.client.wbuf);
        tracing::info!(session = self.me.id, node = %l.pool.key.node, error = %cause, "server lost under the session's statements; the session goes on");
        self.drop_server(l, c).await;
        self.me.set_idle();
        c.skip_to_sync = unfinished?;
        c.query_started = None;
        c.xact_started = None;
        self.client.flush().await
    }

    /// A replica lost before answering any of the reads sent to it: they go back to the
    /// front of the client's buffer, to be routed again (at most three times), and the replica
    /// counts a failure. Whether that was done.
    pub(super) async fn replays(&mut self, lease: &mut Option<Lease>, c: &mut Client) -> bool {
        let Some(bytes) = c.replay.take() else {
            return false;
        };
        let lost_early = c.usage.bytes_sent == 0
            && c.replays < 3
            && !bytes.is_empty()
            && c.pipeline.plain_in_flight()
            && lease
                .as_ref()
                .is_some_and(|l| l.conn.status == TxStatus::Idle);
        if !lost_early {
            return false;
        }
        let l = lease.take().expect("a server is attached here");
        let node = l.pool.key.node.clone();
        tracing::info!(session = self.me.id, node = %node, "replica lost before answering: its reads go elsewhere");
        if let (Some(nodes), Some(shared)) = (self.checkout.nodes(), self.checkout.shared()) {
            nodes.get(&node).failed(&shared.config().proxy.routing);
        }
        self.drop_server(l, c).await;
        c.pipeline.forget_in_flight();
        let mut again = bytes::BytesMut::from(&bytes[..]);
        again.extend_from_slice(&self.client.rbuf);
        self.client.rbuf = again;
        c.replays += 1;
        if let Some(n) = self.checkout.nodes() {
            n.routes
                .replayed_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        c.query_started = None;
        c.xact_started = None;
        self.me.set_idle();
        true
    }

    /// Closes a server in the middle of its use (fenced out, timed out): cancels stop going to
    /// it, and it is never pooled.
    pub(super) async fn drop_server(&mut self, lease: Lease, c: &mut Client) {
        self.slot.set_server(None).await;
        lease.discard(&std::mem::take(&mut c.usage));
    }
}

//! Stale plans: sending a batch again after `cached plan must not change result type` (the
//! conditions are in `session::retry`), or dropping the stale statement from the server.

use std::sync::Arc;

use pgwarden_protocol::backend::TxStatus;
use pgwarden_protocol::frontend::{self, Target};

use super::{Context, Pending, Pipeline, Undo};
use crate::error::ProxyError;
use crate::prepared::Statement;
use crate::server::ServerConn;
use crate::session::retry::is_stale_plan;

impl Pipeline {
    /// After a Bind or statement Describe of `stmt` failed with a stale plan: sends the batch
    /// again if `retry` allows (see there) and returns true; false means the error goes to the
    /// client.
    pub(super) fn retry_stale_plan(
        &mut self,
        failed: u8,
        stmt: &Statement,
        conn: &mut ServerConn,
        cx: &mut Context<'_>,
    ) -> Result<bool, ProxyError> {
        // The failed batch must be the last thing in flight: its Sync ends the queue.
        let ends = |p: &Pending| {
            matches!(
                p,
                Pending::Forward {
                    tag: b'S' | b'Q' | b'F',
                    ..
                }
            )
        };
        // (Our position query may follow it: it is not the client's.)
        let last_of_client = self
            .queue
            .iter()
            .rev()
            .find(|p| !matches!(p, Pending::Position { .. }));
        let sync_last = matches!(last_of_client, Some(Pending::Forward { tag: b'S', .. }))
            && self.queue.iter().filter(|p| ends(p)).count() == 1;
        if cx.capacity == 0 || !sync_last {
            return Ok(false);
        }
        let Some(retry) = self
            .batches
            .take_retry(failed, conn.status == TxStatus::Idle)
        else {
            return Ok(false);
        };
        tracing::info!(statement = %stmt.server_name, "cached plan went stale; preparing it again and retrying once");
        // The server skips to the failed batch's Sync; its ReadyForQuery is ours.
        while let Some(p) = self.queue.pop_front() {
            if ends(&p) {
                break;
            }
            self.skipped(p, conn, cx.statements);
        }
        // Its ReadyForQuery comes first, before the answers to a position query behind it.
        self.queue.push_front(Pending::SwallowReady);
        self.stale.retain(|n| *n != stmt.server_name);
        self.close_on_server(stmt.server_name.clone(), conn);
        for (i, frame) in retry.frames.iter().enumerate() {
            self.send(frame, conn, cx)?;
            if i == 0 && failed == b'D' {
                // The failed Describe got as far as its ParameterDescription.
                let describe = self.queue.pop_back().expect("the Describe just queued");
                self.queue.push_back(Pending::SwallowTag(b't'));
                self.queue.push_back(describe);
            }
        }
        self.batches.mark_retried();
        Ok(true)
    }

    /// Closes one of our statements on `conn` (its answer swallowed); the next use prepares it
    /// again. Should the server skip the Close (an error earlier in the same batch), it is
    /// closed later.
    pub(super) fn close_on_server(&mut self, server_name: String, conn: &mut ServerConn) {
        frontend::put_close(&mut conn.framed.wbuf, Target::Statement, &server_name);
        conn.prepared.remove(&server_name);
        self.queue.push_back(Pending::Swallow {
            expect: b'3',
            undo: vec![Undo::CloseLater(server_name)],
            parsed: None,
        });
    }

    /// At the ReadyForQuery that ends a batch: closes the statements whose plan went stale in
    /// it, with a Sync of ours so that the server answers now and can go back to the pool
    /// (unless the client is in the middle of a batch, whose Sync will do).
    pub(super) fn close_stale(&mut self, conn: &mut ServerConn) {
        for name in std::mem::take(&mut self.stale) {
            self.close_on_server(name, conn);
        }
        if !self.in_batch && !self.copy_in {
            frontend::put_sync(&mut conn.framed.wbuf);
            self.queue.push_back(Pending::SwallowReady);
        }
    }

    /// Before `conn` is asked to prepare `server_name`: if the server still has it with a
    /// stale plan, closes it first.
    pub(super) fn close_if_stale(&mut self, conn: &mut ServerConn, server_name: &str) {
        if let Some(i) = self.stale.iter().position(|n| n == server_name) {
            let name = self.stale.swap_remove(i);
            self.close_on_server(name, conn);
        }
    }

    /// The failed message's statement and type, if the error is a stale plan of ours.
    pub(super) fn stale_statement(&self, error_body: &[u8]) -> Option<(u8, Arc<Statement>)> {
        match self.queue.front() {
            Some(Pending::Forward {
                tag: t @ (b'B' | b'D'),
                stmt: Some(stmt),
                ..
            }) if is_stale_plan(error_body) => Some((*t, stmt.clone())),
            _ => None,
        }
    }
}

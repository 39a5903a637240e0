//! Relaying between a logged-in client and server connections.
//!
//! In transaction mode a server is taken when the client sends something that needs one and given
//! back at a ReadyForQuery that says idle, provided every Query/Sync sent has been answered and
//! no extended-protocol message has been sent since the last Sync (so a pipeline is never split
//! between servers). In session mode the server stays until the client leaves.

use std::time::Duration;

use bytes::Bytes;
use pgwarden_config::PoolMode;
use pgwarden_protocol::backend::{BackendMessage, TxStatus};
use pgwarden_protocol::frame::{split, MAX_MESSAGE};
use pgwarden_protocol::frontend;
use tokio::net::TcpStream;

use crate::cancel::CancelSlot;
use crate::error::ProxyError;
use crate::framed::Framed;
use crate::pool::{Lease, Pool};
use crate::topology::Topology;

const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the exchange with the current server stands.
#[derive(Debug, Default)]
struct Exchange {
    /// Query/Sync/FunctionCall messages sent whose ReadyForQuery has not come back.
    outstanding: u32,
    /// Extended-protocol messages sent since the last Sync.
    in_batch: bool,
}

impl Exchange {
    fn sent(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => self.outstanding += 1,
            b'S' => {
                self.outstanding += 1;
                self.in_batch = false;
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.in_batch = true,
            _ => {}
        }
    }

    fn settled(&self) -> bool {
        self.outstanding == 0 && !self.in_batch
    }
}

pub struct Forwarder<'a> {
    pub client: &'a mut Framed<TcpStream>,
    pub pool: &'a Pool,
    pub topology: &'a Topology,
    pub slot: &'a CancelSlot,
    pub mode: PoolMode,
}

impl Forwarder<'_> {
    /// Runs until the client leaves (Ok) or something breaks (Err).
    pub async fn run(mut self) -> Result<(), ProxyError> {
        let mut lease: Option<Lease> = None;
        let mut ex = Exchange::default();
        let result = self.relay(&mut lease, &mut ex).await;
        if let Some(l) = lease.take() {
            self.give_back(l, &ex).await;
        }
        result
    }

    async fn relay(
        &mut self,
        lease: &mut Option<Lease>,
        ex: &mut Exchange,
    ) -> Result<(), ProxyError> {
        loop {
            if lease.is_none() {
                // Idle: wait for the client to need a server.
                let frame = self.client.read_frame(MAX_MESSAGE).await?;
                if frame[0] == b'X' {
                    return Ok(());
                }
                let l = self.pool.acquire(self.topology).await?;
                *self.slot.server.lock().await = Some((l.conn.target.clone(), l.conn.key));
                let l = lease.insert(l);
                ex.sent(frame[0]);
                l.conn.framed.wbuf.extend_from_slice(&frame);
            }
            let conn = &mut lease.as_mut().expect("a server is attached here").conn;
            // Everything the client has already sent goes to the server.
            while let Some(frame) = self.client.buffered(MAX_MESSAGE)? {
                if frame[0] == b'X' {
                    conn.framed.flush().await?;
                    return Ok(());
                }
                ex.sent(frame[0]);
                conn.framed.wbuf.extend_from_slice(&frame);
            }
            conn.framed.flush().await?;
            tokio::select! {
                r = self.client.fill() => r?,
                r = conn.framed.fill() => r?,
            }
            while let Some(frame) = conn.framed.buffered(MAX_MESSAGE)? {
                observe(conn, &frame, ex)?;
                self.client.wbuf.extend_from_slice(&frame);
            }
            self.client.flush().await?;
            if self.mode == PoolMode::Transaction && ex.settled() && conn.status == TxStatus::Idle {
                let l = lease.take().expect("a server is attached here");
                self.release(l).await;
            }
        }
    }

    async fn release(&self, lease: Lease) {
        *self.slot.server.lock().await = None;
        self.pool.release(lease, self.topology.epoch());
    }

    /// At the end of a session: a server in a clean state is reset and pooled, any other closed.
    async fn give_back(&self, mut lease: Lease, ex: &Exchange) {
        *self.slot.server.lock().await = None;
        let clean = ex.settled() && lease.conn.status == TxStatus::Idle && !lease.conn.broken;
        if !clean {
            self.pool.discard(lease);
            return;
        }
        if self.mode == PoolMode::Session {
            match tokio::time::timeout(RESET_TIMEOUT, reset(&mut lease)).await {
                Ok(Ok(())) => {}
                _ => {
                    self.pool.discard(lease);
                    return;
                }
            }
        }
        self.pool.release(lease, self.topology.epoch());
    }
}

/// Tracks what the server says: transaction status, parameter changes.
fn observe(
    conn: &mut crate::server::ServerConn,
    frame: &Bytes,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    let (tag, body) = split(frame);
    match tag {
        b'Z' | b'S' => {
            match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
                BackendMessage::ReadyForQuery(status) => {
                    conn.status = status;
                    ex.outstanding = ex.outstanding.saturating_sub(1);
                }
                BackendMessage::ParameterStatus { name, value } => {
                    conn.params.insert(name.to_string(), value.to_string());
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// `DISCARD ALL` before a session-mode server goes back to the pool.
async fn reset(lease: &mut Lease) -> Result<(), ProxyError> {
    let conn = &mut lease.conn;
    frontend::put_query(&mut conn.framed.wbuf, "DISCARD ALL");
    conn.framed.flush().await?;
    let mut ok = false;
    loop {
        let frame = conn.framed.read_frame(MAX_MESSAGE).await?;
        let (tag, body) = split(&frame);
        match BackendMessage::parse(tag, body).map_err(ProxyError::ServerProtocol)? {
            BackendMessage::CommandComplete(_) => ok = true,
            BackendMessage::ParameterStatus { name, value } => {
                conn.params.insert(name.to_string(), value.to_string());
            }
            BackendMessage::ReadyForQuery(status) => {
                conn.status = status;
                return if ok && status == TxStatus::Idle {
                    Ok(())
                } else {
                    conn.broken = true;
                    Err(ProxyError::ServerClosed)
                };
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_points() {
        let mut ex = Exchange::default();
        assert!(ex.settled());
        // Pipeline: P B E without Sync is not a release point even with nothing outstanding.
        for t in *b"PBE" {
            ex.sent(t);
        }
        assert!(!ex.settled());
        ex.sent(b'S');
        assert!(!ex.settled()); // waiting for its ReadyForQuery
        ex.outstanding -= 1;
        assert!(ex.settled());
        // Two simple queries in flight need two ReadyForQuery.
        ex.sent(b'Q');
        ex.sent(b'Q');
        ex.outstanding -= 1;
        assert!(!ex.settled());
        ex.outstanding -= 1;
        assert!(ex.settled());
        // COPY data does not change anything.
        ex.sent(b'd');
        ex.sent(b'c');
        assert!(ex.settled());
    }
}

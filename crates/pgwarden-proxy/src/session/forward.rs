//! Relaying between a logged-in client and server connections.
//!
//! In transaction mode a server is taken when the client sends something that needs one and given
//! back at a ReadyForQuery that says idle, provided nothing sent is still unanswered, no
//! extended-protocol message has been sent since the last Sync (a pipeline is never split
//! between servers) and nothing pins the client to its server. Named prepared statements are
//! rewritten to the pool's own names (see `pipeline`). On every checkout the server is given
//! the client's settings (see `state`). In session mode the server stays until the client
//! leaves and statements are not rewritten.

use std::time::Duration;

use bytes::Bytes;
use pgwarden_config::PoolMode;
use pgwarden_protocol::backend::TxStatus;
use pgwarden_protocol::frame::MAX_MESSAGE;
use tokio::net::TcpStream;

use super::pipeline::{ClientStatements, Context, Pipeline};
use super::state::SessionState;
use crate::cancel::CancelSlot;
use crate::error::ProxyError;
use crate::framed::Framed;
use crate::pool::{Lease, Pool};
use crate::server::simple_query;
use crate::topology::Topology;

const RESET_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Forwarder<'a> {
    pub client: &'a mut Framed<TcpStream>,
    pub pool: &'a Pool,
    pub topology: &'a Topology,
    pub slot: &'a CancelSlot,
    pub mode: PoolMode,
    pub statement_capacity: usize,
}

/// The client's state that outlives any one server connection.
struct Client {
    pipeline: Pipeline,
    statements: ClientStatements,
    session: SessionState,
}

impl Forwarder<'_> {
    /// Runs until the client leaves (Ok) or something breaks (Err).
    pub async fn run(mut self, session: SessionState) -> Result<(), ProxyError> {
        let mut lease: Option<Lease> = None;
        let mut c = Client {
            pipeline: Pipeline::default(),
            statements: ClientStatements::new(),
            session,
        };
        let result = self.relay(&mut lease, &mut c).await;
        if let Some(l) = lease.take() {
            self.give_back(l, &c).await;
        }
        result
    }

    fn capacity(&self) -> usize {
        match self.mode {
            PoolMode::Transaction => self.statement_capacity,
            PoolMode::Session => 0,
        }
    }

    async fn relay(&mut self, lease: &mut Option<Lease>, c: &mut Client) -> Result<(), ProxyError> {
        let capacity = self.capacity();
        let cache = &self.pool.statements;
        loop {
            if lease.is_none() {
                // Idle: wait for the client to need a server.
                let frame = self.next_needing_server(c).await?;
                if frame[0] == b'X' {
                    return Ok(());
                }
                let l = self.pool.acquire(self.topology).await?;
                *self.slot.server.lock().await = Some((l.conn.target.clone(), l.conn.key));
                let conn = &mut lease.insert(l).conn;
                if let Some(sql) = c.session.sync(&mut conn.applied) {
                    c.pipeline.send_internal(&sql, conn);
                }
                let mut cx = Context {
                    statements: &mut c.statements,
                    session: &mut c.session,
                    cache,
                    capacity,
                };
                c.pipeline.send(&frame, conn, &mut cx)?;
            }
            let conn = &mut lease.as_mut().expect("a server is attached here").conn;
            // Everything the client has already sent goes to the server.
            while let Some(frame) = self.client.buffered(MAX_MESSAGE)? {
                if frame[0] == b'X' {
                    conn.framed.flush().await?;
                    return Ok(());
                }
                if c.session.is_dirty() && c.pipeline.settled() && conn.status == TxStatus::Idle {
                    if let Some(sql) = c.session.sync(&mut conn.applied) {
                        c.pipeline.send_internal(&sql, conn);
                    }
                }
                let mut cx = Context {
                    statements: &mut c.statements,
                    session: &mut c.session,
                    cache,
                    capacity,
                };
                c.pipeline.send(&frame, conn, &mut cx)?;
            }
            c.pipeline.emit_injects(conn.status, &mut self.client.wbuf);
            conn.framed.flush().await?;
            self.client.flush().await?;
            tokio::select! {
                r = self.client.fill() => r?,
                r = conn.framed.fill() => r?,
            }
            while let Some(frame) = conn.framed.buffered(MAX_MESSAGE)? {
                let mut cx = Context {
                    statements: &mut c.statements,
                    session: &mut c.session,
                    cache,
                    capacity,
                };
                c.pipeline
                    .receive(&frame, conn, &mut cx, &mut self.client.wbuf)?;
            }
            self.client.flush().await?;
            if self.mode == PoolMode::Transaction
                && c.pipeline.settled()
                && conn.status == TxStatus::Idle
                && c.session.pinned().is_none()
            {
                let l = lease.take().expect("a server is attached here");
                self.release(l).await;
            }
        }
    }

    /// Reads client messages while no server is attached, answering those that need none (see
    /// [`Pipeline::answer_detached`]), until one needs a server (or is Terminate).
    async fn next_needing_server(&mut self, c: &mut Client) -> Result<Bytes, ProxyError> {
        let capacity = self.capacity();
        loop {
            let frame = match self.client.buffered(MAX_MESSAGE)? {
                Some(f) => f,
                None => {
                    self.client.flush().await?;
                    self.client.read_frame(MAX_MESSAGE).await?
                }
            };
            let local = self.mode == PoolMode::Transaction && {
                let mut cx = Context {
                    statements: &mut c.statements,
                    session: &mut c.session,
                    cache: &self.pool.statements,
                    capacity,
                };
                c.pipeline
                    .answer_detached(&frame, &mut cx, &mut self.client.wbuf)
            };
            if !local {
                return Ok(frame);
            }
        }
    }

    async fn release(&self, lease: Lease) {
        *self.slot.server.lock().await = None;
        self.pool.release(lease, self.topology.epoch());
    }

    /// At the end of a session: a server in a clean state is pooled, reset first if the client
    /// had it to itself (session mode, or pinned); any other is closed, never returned dirty.
    async fn give_back(&self, mut lease: Lease, c: &Client) {
        *self.slot.server.lock().await = None;
        let clean =
            c.pipeline.settled() && lease.conn.status == TxStatus::Idle && !lease.conn.broken;
        if !clean {
            self.pool.discard(lease);
            return;
        }
        if self.mode == PoolMode::Session || c.session.pinned().is_some() {
            let conn = &mut lease.conn;
            match simple_query(conn, "DISCARD ALL", RESET_TIMEOUT).await {
                Ok(o) if o.error.is_none() => {
                    conn.prepared.clear();
                    conn.applied.clear();
                }
                Ok(o) => {
                    tracing::debug!(error = ?o.error, "DISCARD ALL failed; closing the server connection");
                    self.pool.discard(lease);
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "server reset failed");
                    self.pool.discard(lease);
                    return;
                }
            }
        }
        self.pool.release(lease, self.topology.epoch());
    }
}

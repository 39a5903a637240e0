//! Relaying between a logged-in client and server connections.
//!
//! In transaction mode a server is taken when the client sends something that needs one and given
//! back at a ReadyForQuery that says idle, provided nothing sent is still unanswered and no
//! extended-protocol message has been sent since the last Sync (a pipeline is never split
//! between servers). Named prepared statements are rewritten to the pool's own names (see
//! `pipeline`). In session mode the server stays until the client leaves and nothing is rewritten.

use std::time::Duration;

use bytes::Bytes;
use pgwarden_config::PoolMode;
use pgwarden_protocol::backend::{BackendMessage, TxStatus};
use pgwarden_protocol::frame::{split, MAX_MESSAGE};
use pgwarden_protocol::frontend;
use tokio::net::TcpStream;

use super::pipeline::{ClientStatements, Context, Pipeline};
use crate::cancel::CancelSlot;
use crate::error::ProxyError;
use crate::framed::Framed;
use crate::pool::{Lease, Pool};
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

impl Forwarder<'_> {
    /// Runs until the client leaves (Ok) or something breaks (Err).
    pub async fn run(mut self) -> Result<(), ProxyError> {
        let mut lease: Option<Lease> = None;
        let mut pipeline = Pipeline::default();
        let mut statements = ClientStatements::new();
        let result = self.relay(&mut lease, &mut pipeline, &mut statements).await;
        if let Some(l) = lease.take() {
            self.give_back(l, &pipeline).await;
        }
        result
    }

    async fn relay(
        &mut self,
        lease: &mut Option<Lease>,
        pipeline: &mut Pipeline,
        statements: &mut ClientStatements,
    ) -> Result<(), ProxyError> {
        let capacity = match self.mode {
            PoolMode::Transaction => self.statement_capacity,
            PoolMode::Session => 0,
        };
        loop {
            if lease.is_none() {
                // Idle: wait for the client to need a server.
                let frame = self
                    .next_needing_server(pipeline, statements, capacity)
                    .await?;
                if frame[0] == b'X' {
                    return Ok(());
                }
                let l = self.pool.acquire(self.topology).await?;
                *self.slot.server.lock().await = Some((l.conn.target.clone(), l.conn.key));
                let l = lease.insert(l);
                let mut cx = Context {
                    statements,
                    cache: &self.pool.statements,
                    capacity,
                };
                pipeline.send(&frame, &mut l.conn, &mut cx)?;
            }
            let conn = &mut lease.as_mut().expect("a server is attached here").conn;
            // Everything the client has already sent goes to the server.
            while let Some(frame) = self.client.buffered(MAX_MESSAGE)? {
                if frame[0] == b'X' {
                    conn.framed.flush().await?;
                    return Ok(());
                }
                let mut cx = Context {
                    statements,
                    cache: &self.pool.statements,
                    capacity,
                };
                pipeline.send(&frame, conn, &mut cx)?;
            }
            pipeline.emit_injects(&mut self.client.wbuf);
            conn.framed.flush().await?;
            self.client.flush().await?;
            tokio::select! {
                r = self.client.fill() => r?,
                r = conn.framed.fill() => r?,
            }
            while let Some(frame) = conn.framed.buffered(MAX_MESSAGE)? {
                pipeline.receive(&frame, conn, statements, &mut self.client.wbuf)?;
            }
            self.client.flush().await?;
            if self.mode == PoolMode::Transaction
                && pipeline.settled()
                && conn.status == TxStatus::Idle
            {
                let l = lease.take().expect("a server is attached here");
                self.release(l).await;
            }
        }
    }

    /// Reads client messages while no server is attached, answering those that need none (see
    /// [`Pipeline::answer_detached`]), until one needs a server (or is Terminate).
    async fn next_needing_server(
        &mut self,
        pipeline: &mut Pipeline,
        statements: &mut ClientStatements,
        capacity: usize,
    ) -> Result<Bytes, ProxyError> {
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
                    statements,
                    cache: &self.pool.statements,
                    capacity,
                };
                pipeline.answer_detached(&frame, &mut cx, &mut self.client.wbuf)
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

    /// At the end of a session: a server in a clean state is reset (session mode) and pooled;
    /// any other is closed, never returned dirty.
    async fn give_back(&self, mut lease: Lease, pipeline: &Pipeline) {
        *self.slot.server.lock().await = None;
        let clean = pipeline.settled() && lease.conn.status == TxStatus::Idle && !lease.conn.broken;
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

/// `DISCARD ALL` before a session-mode server goes back to the pool.
async fn reset(lease: &mut Lease) -> Result<(), ProxyError> {
    let conn = &mut lease.conn;
    frontend::put_query(&mut conn.framed.wbuf, "DISCARD ALL");
    conn.framed.flush().await?;
    conn.prepared.clear();
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

//! Connections to PostgreSQL servers.

mod applied;
mod login;
mod query;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_protocol::backend::TxStatus;
use tokio::net::TcpStream;

pub use applied::Applied;
pub use login::{close, connect, Credential, Login};
pub use query::{
    query_lsn, query_rows, query_with_param, simple_query, Outcome, INSERT_LSN, REPLAY_LSN,
};

use crate::framed::Framed;
use crate::registry::{ServerEntry, ServerInfo};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The key a server gave at login, for cancelling its queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// A logged-in server connection.
pub struct ServerConn {
    pub framed: Framed<TcpStream>,
    pub target: Arc<Target>,
    pub key: BackendKey,
    /// Every ParameterStatus the server reported, kept current.
    pub params: BTreeMap<String, String>,
    pub status: TxStatus,
    /// The leader epoch it was opened under (a fencing token): a new epoch retires it.
    pub epoch: pgwarden_core::Epoch,
    pub created: Instant,
    /// `created + lifetime`, for the lifetime last checked against (so a checkout compares
    /// instants rather than subtracting them); `None` inside: never (an overflow).
    retire_at: Option<(Duration, Option<Instant>)>,
    pub last_used: Instant,
    /// Set when its state is unknown (an error mid-exchange): it must not be reused.
    pub broken: bool,
    /// Which of the pool's named statements this connection has prepared.
    pub prepared: crate::prepared::ServerStatements,
    /// Settings the proxy gave it beyond its login defaults (see `session::state`).
    pub applied: Applied,
    /// Its entry in the pool's registry (for `SHOW SERVERS`); removed when it is dropped.
    pub entry: ServerEntry,
    pub info: Arc<ServerInfo>,
}

impl ServerConn {
    fn past_lifetime(&mut self, lifetime: Duration, now: Instant) -> bool {
        let deadline = match self.retire_at {
            Some((l, deadline)) if l == lifetime => deadline,
            _ => {
                let deadline = self.created.checked_add(lifetime);
                self.retire_at = Some((lifetime, deadline));
                deadline
            }
        };
        deadline.is_some_and(|d| now > d)
    }

    /// Whether the connection looks usable without a round trip: not broken, not past its
    /// lifetime, nothing left unread, and with `peek`, nothing unexpected (EOF, an error the
    /// server sent while idle) waiting on the socket.
    pub fn is_reusable(&mut self, lifetime: Duration, peek: bool, now: Instant) -> bool {
        if self.broken || self.past_lifetime(lifetime, now) || self.status != TxStatus::Idle {
            return false;
        }
        if !self.framed.rbuf.is_empty() {
            return false;
        }
        if !peek {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.framed.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

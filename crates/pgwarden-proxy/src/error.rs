//! What can go wrong in a session, and what the client is told.

use std::time::Duration;

use pgwarden_core::format_duration;
use pgwarden_protocol::{ProtocolError, SqlState};

/// Errors of the proxy. [`ProxyError::sqlstate`] and [`ProxyError::client_message`] are the only
/// things a client sees; everything else goes to the log.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("client protocol error: {0}")]
    ClientProtocol(#[source] ProtocolError),
    #[error("server protocol error: {0}")]
    ServerProtocol(#[source] ProtocolError),
    #[error("client I/O: {0}")]
    ClientIo(#[source] std::io::Error),
    #[error("server I/O: {0}")]
    ServerIo(#[source] std::io::Error),
    #[error("client closed the connection")]
    ClientClosed,
    #[error("server closed the connection")]
    ServerClosed,
    /// The server ended the session with a FATAL error, which the client has been sent.
    #[error("the server ended the session (FATAL error passed to the client)")]
    ServerFatal,
    /// The server ended the connection with a FATAL error that the client was not shown: its
    /// session outlives the server (see `pipeline::lost`).
    #[error("the server ended the connection: {message}")]
    ServerGone { message: String },
    #[error("invalid command-line argument for server process: {0}")]
    StartupOption(String),
    #[error("invalid value for parameter \"{name}\": \"{value}\" (expected {expected})")]
    BadSetting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// A startup packet with a request code not allowed now (a repeated SSLRequest).
    #[error("unsupported frontend protocol {}.{}: server supports 3.0 to 3.0", .0 >> 16, .0 & 0xffff)]
    UnsupportedFrontendProtocol(u32),
    #[error("password authentication failed for user \"{0}\"")]
    AuthFailed(String),
    /// A `reject` rule matched (PostgreSQL's pg_hba.conf rejection).
    #[error("no proxy.auth rule admits host \"{addr}\", user \"{user}\", database \"{database}\"")]
    Rejected {
        user: String,
        database: String,
        addr: std::net::IpAddr,
    },
    #[error("user \"{0}\" may not use the admin console (proxy.admin_users)")]
    NotAdmin(String),
    #[error("terminating connection due to administrator command")]
    Killed,
    #[error("terminating connection due to idle-in-transaction timeout ({})", format_duration(*.0))]
    IdleInTransaction(Duration),
    #[error("TLS is required: connect with sslmode=require (proxy.client_tls.mode = require)")]
    TlsRequired,
    #[error("auth_query: {0}")]
    AuthQuery(String),
    #[error("authentication timed out")]
    AuthTimeout,
    /// No node can take the session's transaction (no leader, a stale view, a refused
    /// promotion) within the wait.
    #[error("{why} (waited {})", format_duration(*waited))]
    Unavailable {
        why: crate::router::Unavailable,
        waited: Duration,
    },
    /// The server held writes to a node that no longer leads: the connection was cut.
    #[error("terminating connection because {node} no longer takes writes (epoch {epoch} ended)")]
    Fenced {
        node: pgwarden_core::NodeId,
        epoch: pgwarden_core::Epoch,
    },
    #[error("cannot connect to server {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to server {addr} took longer than {}", format_duration(*timeout))]
    ConnectTimeout { addr: String, timeout: Duration },
    /// The server refused the login; its error is passed on.
    #[error("server refused login: {message}")]
    ServerRefused { code: SqlState, message: String },
    #[error("the server asked for an authentication method the proxy does not support ({0})")]
    UnsupportedServerAuth(String),
    #[error("no server connection available within query_wait_timeout ({})", format_duration(*.0))]
    WaitTimeout(Duration),
    #[error("sorry, too many clients already (max_client_conn = {0})")]
    TooManyClients(u32),
    #[error("sorry, too many connections are logging in (max_pending_logins = {0})")]
    TooManyLogins(u32),
    #[error("a query of the proxy's own took longer than {}", format_duration(*.0))]
    QueryTimeout(Duration),
    /// A client's query went unanswered for `query_timeout`: its server was closed.
    #[error("terminating connection: the query went unanswered for query_timeout ({}); its server connection was closed", format_duration(*.0))]
    QueryTimedOut(Duration),
    /// A cancel came while the client waited for a server; answered, the session goes on.
    #[error("canceling statement due to user request")]
    CancelledWaiting,
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Unsupported(&'static str),
    /// Giving a server connection the client's settings failed.
    #[error("could not restore the session's settings on a server connection: {message}")]
    RestoreFailed { code: SqlState, message: String },
}

impl ProxyError {
    pub fn sqlstate(&self) -> SqlState {
        use ProxyError::*;
        match self {
            ClientProtocol(e) => e.sqlstate(),
            ServerProtocol(_)
            | ServerIo(_)
            | ServerClosed
            | ServerFatal
            | ServerGone { .. }
            | Connect { .. }
            | ConnectTimeout { .. }
            | QueryTimeout(_) => SqlState::CONNECTION_FAILURE,
            ClientIo(_) | ClientClosed => SqlState::CONNECTION_FAILURE,
            NoUser => SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            UnsupportedFrontendProtocol(_) => SqlState::FEATURE_NOT_SUPPORTED,
            StartupOption(_) => SqlState::SYNTAX_ERROR,
            BadSetting { .. } => SqlState::INVALID_PARAMETER_VALUE,
            AuthFailed(_) => SqlState::INVALID_PASSWORD,
            AuthTimeout => SqlState::PROTOCOL_VIOLATION,
            AuthQuery(_) => SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            TlsRequired => SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            NotAdmin(_) | Rejected { .. } => SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            Killed => SqlState::ADMIN_SHUTDOWN,
            IdleInTransaction(_) => SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            Unavailable { .. } => SqlState::CANNOT_CONNECT_NOW,
            Fenced { .. } => SqlState::ADMIN_SHUTDOWN,
            ServerRefused { code, .. } => *code,
            UnsupportedServerAuth(_) => SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            WaitTimeout(_) | TooManyClients(_) | TooManyLogins(_) => SqlState::TOO_MANY_CONNECTIONS,
            ShuttingDown => SqlState::ADMIN_SHUTDOWN,
            CancelledWaiting | QueryTimedOut(_) => SqlState::QUERY_CANCELED,
            Unsupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
            RestoreFailed { code, .. } => *code,
        }
    }

    /// The message for the client, in PostgreSQL's style: an explicit allowlist, so a new
    /// variant shows nothing until it is added here. Server-side details (addresses, I/O
    /// errors, internal causes) are not shown to clients; they go to the log.
    pub fn client_message(&self) -> String {
        use ProxyError::*;
        match self {
            ServerIo(_) | ServerClosed | ServerFatal | ServerProtocol(_) | QueryTimeout(_) => {
                "server connection lost".to_string()
            }
            ServerGone { .. } => self.to_string(),
            Connect { .. } | ConnectTimeout { .. } => {
                "could not connect to the database server".to_string()
            }
            ServerRefused { message, .. } | RestoreFailed { message, .. } => message.clone(),
            // The cause of a failed lookup is for the log only.
            AuthQuery(_) => "authentication failed".to_string(),
            ClientProtocol(_)
            | AuthFailed(_)
            | ClientIo(_)
            | ClientClosed
            | StartupOption(_)
            | BadSetting { .. }
            | NoUser
            | UnsupportedFrontendProtocol(_)
            | NotAdmin(_)
            | Rejected { .. }
            | Killed
            | IdleInTransaction(_)
            | TlsRequired
            | AuthTimeout
            | Unavailable { .. }
            | Fenced { .. }
            | UnsupportedServerAuth(_)
            | WaitTimeout(_)
            | TooManyClients(_)
            | TooManyLogins(_)
            | CancelledWaiting
            | QueryTimedOut(_)
            | ShuttingDown
            | Unsupported(_) => self.to_string(),
        }
    }

    /// Expected ends of a session, logged at debug rather than warn.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ProxyError::ClientClosed | ProxyError::ClientIo(_))
    }
}

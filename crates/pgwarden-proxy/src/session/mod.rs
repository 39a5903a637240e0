//! One client connection, from the first packet to the last.

mod auth;
mod auth_query;
mod checkout;
mod forward;
mod params;
mod pipeline;
mod retry;
mod route;
mod startup;
mod state;

pub use auth::VerifierCache;
pub use auth_query::AuthQueryCache;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pgwarden_config::TlsMode;
use pgwarden_protocol::backend::{self, TxStatus};
use pgwarden_protocol::error_response::ErrorReport;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::framed::{Framed, Side};
use crate::registry::NewClient;
use crate::tls::ClientStream;
use crate::Shared;

const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// The slot a connection holds until it is logged in (released when dropped).
pub struct Pending {
    /// Held, not read: dropping it frees the login slot.
    #[allow(dead_code)]
    pub slot: tokio::sync::OwnedSemaphorePermit,
    /// Every login slot was busy: only the admin console may be reached.
    pub admin_only: bool,
}

pub async fn run(socket: TcpStream, peer: SocketAddr, shared: Arc<Shared>, pending: Pending) {
    let _ = socket.set_nodelay(true);
    let local = socket.local_addr().ok();
    let mut client = Framed::new(ClientStream::Plain(socket), Side::Client);
    if let Err(e) = session(&mut client, &shared, peer, local, pending).await {
        if e.is_disconnect() {
            tracing::debug!(client_addr = %peer, error = %e, "client disconnected");
        } else if matches!(e, ProxyError::ServerFatal) {
            tracing::debug!(client_addr = %peer, "the server ended the session");
        } else {
            tracing::info!(client_addr = %peer, error = %e, "session ended with an error");
            report_fatal(&mut client, &e).await;
        }
    }
}

/// Tells the client why its session ends (best effort: it may be gone already).
pub(crate) async fn report_fatal(client: &mut Framed<ClientStream>, e: &ProxyError) {
    let message = e.client_message();
    ErrorReport::fatal(e.sqlstate(), &message).put_error(&mut client.wbuf);
    let _ = client.flush().await;
}

async fn session(
    client: &mut Framed<ClientStream>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    pending: Pending,
) -> Result<(), ProxyError> {
    let config = shared.config();
    // One bound for the whole login: startup, encryption, authentication.
    let deadline = tokio::time::Instant::now() + config.proxy.login_timeout;
    let start = tokio::time::timeout_at(deadline, startup::read(client, shared.tls.as_ref()))
        .await
        .map_err(|_| ProxyError::AuthTimeout)??;
    let start = match start {
        startup::Start::Cancel { pid, secret } => {
            shared.cancels.cancel(pid, secret, CANCEL_TIMEOUT).await;
            return Ok(());
        }
        startup::Start::Session(s) => s,
    };
    let mut requested = params::requested(&start)?;
    let session_route = route::from_startup(&mut requested, &shared.config().proxy.routing)?;
    if config.proxy.client_tls.mode == TlsMode::Require && !client.io.is_tls() {
        return Err(ProxyError::TlsRequired);
    }
    // The first `[[proxy.auth.rules]]` entry that matches decides, as pg_hba.conf does.
    let Some(method) = config
        .proxy
        .auth
        .method_for(&start.user, &start.database, peer.ip())
    else {
        return Err(ProxyError::Rejected {
            user: start.user.clone(),
            database: start.database.clone(),
            addr: peer.ip(),
        });
    };
    let looked_up;
    let user = match config.users.iter().find(|u| u.name == start.user) {
        Some(u) => Some(u),
        None => {
            looked_up = match auth_query::lookup(shared, &config, &start.database, &start.user)
                .await
            {
                Ok(u) => u,
                Err(e) => {
                    // The client learns only that the login failed; the cause is for the log.
                    tracing::warn!(user = %start.user, db = %start.database, error = %e, "auth_query lookup failed");
                    None
                }
            };
            looked_up.as_ref()
        }
    };
    let credential = tokio::time::timeout_at(
        deadline,
        auth::authenticate(client, method, &start.user, user, &shared.verifiers),
    )
    .await
    .map_err(|_| ProxyError::AuthTimeout)??;
    let application_name = requested
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case("application_name"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // Logged in: from now on the session counts toward max_client_conn (the console has its
    // reserve beyond it), no longer as a pending login.
    let admin = start.database == crate::ADMIN_DATABASE;
    if !admin && pending.admin_only {
        return Err(ProxyError::TooManyLogins(config.proxy.max_pending_logins));
    }
    let _slot = match shared.client_slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) if admin => shared
            .admin_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProxyError::TooManyClients(config.proxy.max_client_conn))?,
        Err(_) => return Err(ProxyError::TooManyClients(config.proxy.max_client_conn)),
    };
    drop(pending);
    let entry = shared.clients.register(NewClient {
        addr: peer,
        local,
        user: start.user.clone(),
        database: start.database.clone(),
        application_name,
        tls: client.io.is_tls(),
    });
    if start.database == crate::ADMIN_DATABASE {
        if !config.proxy.admin_users.contains(&start.user) {
            return Err(ProxyError::NotAdmin(start.user.clone()));
        }
        let registration = shared.cancels.register();
        put_login_ok(
            client,
            &admin_params(),
            &[],
            registration.pid,
            registration.secret,
        );
        client.flush().await?;
        return crate::admin::run(client, shared, &entry.info).await;
    }
    let group = shared.group(&start.database, &start.user, credential, &config);
    let mut checkout = checkout::Checkout::new(
        &group,
        &shared.topology,
        config.proxy.server_connect_timeout,
    )
    .with_reads(checkout::Reads {
        nodes: &shared.nodes,
        shared,
    });
    let logged_in = params::login(&mut checkout, &requested).await?;
    let registration = shared.cancels.register();
    put_login_ok(
        client,
        &logged_in.shown,
        &logged_in.notices,
        registration.pid,
        registration.secret,
    );
    client.flush().await?;
    forward::Forwarder {
        client,
        checkout,
        slot: &registration.slot,
        mode: config.proxy.pool_mode,
        statement_capacity: config.proxy.max_prepared_statements as usize,
        me: &entry.info,
        idle_transaction_timeout: config.proxy.idle_transaction_timeout,
        query_timeout: config.proxy.query_timeout,
        route: session_route,
    }
    .run(state::SessionState::new(logged_in.settings))
    .await
}

fn put_login_ok(
    client: &mut Framed<ClientStream>,
    params: &BTreeMap<String, String>,
    notices: &[bytes::Bytes],
    pid: i32,
    secret: i32,
) {
    backend::put_auth_ok(&mut client.wbuf);
    for n in notices {
        client.wbuf.extend_from_slice(n);
    }
    for (name, value) in params {
        backend::put_parameter_status(&mut client.wbuf, name, value);
    }
    backend::put_backend_key_data(&mut client.wbuf, pid, secret);
    backend::put_ready_for_query(&mut client.wbuf, TxStatus::Idle);
}

/// What the admin console reports at login: enough for psql and drivers.
fn admin_params() -> BTreeMap<String, String> {
    [
        (
            "server_version",
            concat!("15.0 (pgwarden ", env!("CARGO_PKG_VERSION"), ")"),
        ),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

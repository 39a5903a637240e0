//! What a running proxy says about where writes go (`SHOW LEADER` on its admin console), for
//! `pgwarden status`: a one-shot probe sees the nodes as they are now, but cannot know which
//! leader the proxy followed before, so it cannot tell that a primary lacks that leader's writes.

use std::time::Duration;

use pgwarden_config::Config;
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// The proxy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyLeader {
    pub leader: Option<String>,
    /// `routed` or `refused`.
    pub writes: String,
    pub reason: Option<String>,
    /// Primaries the proxy does not follow, and why.
    pub not_followed: Vec<String>,
}

impl ProxyLeader {
    /// Lines for the status warnings (none when writes are routed and nothing is refused).
    pub fn warnings(&self, listen: std::net::SocketAddr) -> Vec<String> {
        let mut out = Vec::new();
        if self.writes != "routed" {
            out.push(format!(
                "proxy {listen}: {}",
                self.reason.as_deref().unwrap_or("writes are refused")
            ));
        }
        for why in &self.not_followed {
            out.push(format!("proxy {listen}: primary not followed: {why}"));
        }
        out
    }
}

/// Asks the proxy of `config` (`proxy.listen`, as an admin user whose plaintext password the
/// config holds), within `timeout`. `None` when there is no such user or no proxy answers.
pub async fn ask(config: &Config, timeout: Duration) -> Option<ProxyLeader> {
    let admin = config
        .proxy
        .admin_users
        .iter()
        .find_map(|a| config.users.iter().find(|u| &u.name == a))?;
    let password = admin.password.expose();
    // A stored verifier or hash cannot log in anywhere.
    if pgwarden_protocol::scram::Verifier::parse(password).is_some()
        || pgwarden_protocol::md5::is_stored(password)
    {
        return None;
    }
    let listen = config.proxy.listen;
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        listen.ip().to_string()
    };
    let asked = async {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&host)
            .port(listen.port())
            .user(&admin.name)
            .password(password)
            .dbname("pgwarden")
            .application_name("pgwarden-status")
            .connect_timeout(timeout);
        let (client, conn) = cfg.connect(NoTls).await.ok()?;
        let conn = tokio::spawn(conn);
        let rows = client.simple_query("SHOW LEADER").await.ok();
        conn.abort();
        parse(&rows?)
    };
    tokio::time::timeout(timeout, asked).await.ok().flatten()
}

fn parse(messages: &[SimpleQueryMessage]) -> Option<ProxyLeader> {
    let mut rows = messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    });
    let first = rows.next()?;
    let text = |r: &tokio_postgres::SimpleQueryRow, col: &str| {
        r.try_get(col).ok().flatten().map(str::to_string)
    };
    Some(ProxyLeader {
        leader: text(first, "leader"),
        writes: text(first, "writes")?,
        reason: text(first, "reason"),
        not_followed: rows.filter_map(|r| text(r, "reason")).collect(),
    })
}

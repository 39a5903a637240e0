//! The validated configuration: what the rest of pgwarden reads.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use pgwarden_core::ByteSize;

/// A password: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The cluster's name, shown by `status` and used as a key prefix by later services.
    pub cluster: String,
    pub postgres: PostgresConfig,
    pub replication: ReplicationConfig,
    pub monitor: MonitorConfig,
    pub nodes: Vec<NodeConfig>,
    /// Login roles clients use (`[[proxy.users]]`).
    pub users: Vec<UserConfig>,
    /// `[proxy]` (defaults when absent).
    pub proxy: ProxyConfig,
    /// `[agent]` (defaults when absent).
    pub agent: AgentConfig,
    /// `[dcs]`: the consensus store; `None` when the cluster has no HA agents.
    pub dcs: Option<DcsConfig>,
    /// The file this was loaded from, if any.
    pub source: Option<PathBuf>,
}

impl Config {
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Where `postgres`, `initdb`, `pg_basebackup` live; `None` means search for them.
    pub bin_dir: Option<PathBuf>,
    /// The OS user PostgreSQL programs run as when pgwarden runs as root.
    pub os_user: String,
    pub superuser: String,
    pub superuser_password: Secret,
    pub replication_user: String,
    pub replication_password: Option<Secret>,
    /// Extra `postgresql.conf` settings, values already in PostgreSQL's text form.
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    Async,
    /// `synchronous_standby_names = 'FIRST k (...)'`
    Sync,
    /// `synchronous_standby_names = 'ANY k (...)'`
    Quorum,
}

impl ReplicationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Async => "async",
            ReplicationMode::Sync => "sync",
            ReplicationMode::Quorum => "quorum",
        }
    }
}

impl std::str::FromStr for ReplicationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "async" => Ok(ReplicationMode::Async),
            "sync" => Ok(ReplicationMode::Sync),
            "quorum" => Ok(ReplicationMode::Quorum),
            other => Err(format!(
                "unknown replication mode \"{other}\": expected async, sync or quorum"
            )),
        }
    }
}

impl fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    pub mode: ReplicationMode,
    /// How many standbys must confirm a commit in `sync` / `quorum` mode.
    pub sync_count: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// How often nodes are probed (`status --watch`, the proxy's role discovery).
    pub interval: Duration,
    /// Bound on one probe of one node: connect plus queries.
    pub timeout: Duration,
    pub lag_medium: ByteSize,
    pub lag_high: ByteSize,
    /// Which promotions the monitor follows as the new leader.
    pub follow_promotions: FollowPromotions,
}

/// `monitor.follow_promotions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FollowPromotions {
    /// Only a node whose timeline history holds everything seen on the previous leader.
    #[default]
    Descendant,
    /// The primary on the newest timeline, whatever it lost.
    Any,
}

impl std::fmt::Display for FollowPromotions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FollowPromotions::Descendant => "descendant",
            FollowPromotions::Any => "any",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// PGDATA, for nodes this host manages.
    pub data_dir: Option<PathBuf>,
    /// Where this node's agent serves its API.
    pub api: Option<std::net::SocketAddr>,
    /// Preferred among equally advanced failover candidates (and synchronous standbys).
    pub priority: u32,
    /// Never promoted automatically.
    pub nofailover: bool,
    /// Never a synchronous standby.
    pub nosync: bool,
    /// Its share of reads under `balance = "weighted"`.
    pub weight: u32,
}

impl NodeConfig {
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A client login (`[[proxy.users]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    pub name: String,
    /// Plaintext, a `SCRAM-SHA-256$...` verifier or an md5 hash.
    pub password: Secret,
    pub pool_size: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client for the client's whole session.
    Session,
    /// A server connection per transaction; released at ReadyForQuery with status idle.
    Transaction,
}

impl std::fmt::Display for PoolMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    /// TLS if the client asks for it.
    Allow,
    /// Clients without TLS are refused.
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ScramSha256,
    Md5,
    Trust,
}

/// One hba-style rule; `None` fields match everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRule {
    pub user: Option<String>,
    pub database: Option<String>,
    pub address: Option<Cidr>,
    /// `None`: the login is rejected.
    pub method: Option<AuthMethod>,
}

/// An address range, `127.0.0.1/32` or `::1/128` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.parse::<std::net::IpAddr>().ok()?,
                Some(p.parse::<u8>().ok()?),
            ),
            None => (s.parse().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        match (self.addr, ip.to_canonical()) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl AuthConfig {
    /// The method for a login of `user` to `database` from `ip`; `None`: rejected.
    pub fn method_for(
        &self,
        user: &str,
        database: &str,
        ip: std::net::IpAddr,
    ) -> Option<AuthMethod> {
        let matches = |r: &AuthRule| {
            r.user.as_deref().map_or(true, |u| u == user)
                && r.database.as_deref().map_or(true, |d| d == database)
                && r.address.map_or(true, |a| a.contains(ip))
        };
        match self.rules.iter().find(|r| matches(r)) {
            Some(r) => r.method,
            None => Some(self.method),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsConfig {
    pub mode: TlsMode,
    /// PEM certificate chain and key; both present unless `mode` is `Disable`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// For logins no rule matches.
    pub method: AuthMethod,
    /// `[[proxy.auth.rules]]`, in order: the first that matches a login decides its method.
    pub rules: Vec<AuthRule>,
    /// Looks up users not in `[[proxy.users]]` with `auth_query`; itself a listed user.
    pub auth_user: Option<String>,
    pub auth_query: String,
}

/// `[proxy]`: the pooler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub listen: std::net::SocketAddr,
    /// Runtime worker threads; 0 = one per core.
    pub workers: usize,
    pub pool_mode: PoolMode,
    pub default_pool_size: u32,
    pub min_pool_size: u32,
    /// Logged-in clients (the admin console has a reserve beyond it).
    pub max_client_conn: u32,
    /// Connections still in startup or authentication, counted apart from logged-in clients.
    pub max_pending_logins: u32,
    /// How long a connection may take from its first byte to being logged in.
    pub login_timeout: Duration,
    pub server_connect_timeout: Duration,
    pub query_wait_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub server_lifetime: Duration,
    /// `None` when off (`"0s"`).
    pub idle_transaction_timeout: Option<Duration>,
    /// A query unanswered this long ends the session and closes its server; `None` when off.
    pub query_timeout: Option<Duration>,
    /// How long running transactions may go on after SIGINT/SIGTERM/`SHUTDOWN`.
    pub shutdown_timeout: Duration,
    /// Per server connection; 0 disables prepared-statement tracking.
    pub max_prepared_statements: u32,
    /// Writes are refused while the cluster view is older than this (its source went silent).
    pub max_view_age: Duration,
    pub admin_users: Vec<String>,
    pub client_tls: ClientTlsConfig,
    pub auth: AuthConfig,
    pub routing: RoutingConfig,
}

/// `[proxy.routing]`: read/write splitting, balancing, replica health and consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Reads may go to replicas (when the cluster has any).
    pub read_write_split: bool,
    pub consistency: Consistency,
    pub balance: Balance,
    pub primary_reads: PrimaryReads,
    /// A replica further behind than this (replay lag in bytes) leaves rotation...
    pub max_replica_lag: ByteSize,
    /// Or further behind than this in time (its replay of what it received, as the view says),
    /// when set.
    pub max_replica_lag_time: Option<Duration>,
    /// ...and comes back once below this percentage of each (`lag_hysteresis` in the file, a
    /// fraction).
    pub lag_return_percent: u32,
    /// Volatile functions a standby runs anyway (lower case, unqualified).
    pub read_only_functions: Vec<String>,
    /// How long a `session` read waits for a replica to replay the client's last write before it
    /// goes to the primary.
    pub read_your_writes_wait: Duration,
    /// Failures in a row (connects, probes) that take a replica out of rotation...
    pub ban_after: u32,
    /// ...for this long at first, doubling on each ban that follows, up to `max_ban_time`.
    pub ban_time: Duration,
    pub max_ban_time: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            read_write_split: true,
            consistency: Consistency::Session,
            balance: Balance::Latency,
            primary_reads: PrimaryReads::Fallback,
            max_replica_lag: ByteSize(16 * 1024 * 1024),
            max_replica_lag_time: None,
            lag_return_percent: 50,
            read_only_functions: Vec::new(),
            read_your_writes_wait: Duration::from_millis(20),
            ban_after: 3,
            ban_time: Duration::from_secs(2),
            max_ban_time: Duration::from_secs(60),
        }
    }
}

/// What a client's reads are guaranteed to see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Any replica in rotation.
    Eventual,
    /// Read-your-writes and monotonic reads, by WAL position.
    Session,
    /// The primary.
    Strong,
}

impl Consistency {
    pub fn parse(s: &str) -> Option<Consistency> {
        match s.to_ascii_lowercase().as_str() {
            "eventual" => Some(Consistency::Eventual),
            "session" => Some(Consistency::Session),
            "strong" => Some(Consistency::Strong),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Eventual => "eventual",
            Consistency::Session => "session",
            Consistency::Strong => "strong",
        }
    }
}

/// How a read picks among eligible replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    Random,
    /// Random, in proportion to `[[nodes]] weight`.
    Weighted,
    LeastConnections,
    /// Power of two choices on latency (EWMA) times connections in flight.
    Latency,
}

/// Whether reads may go to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryReads {
    /// Never: a read no replica can take fails.
    Never,
    /// When no replica can take it.
    Fallback,
    /// The primary is one more candidate for every read.
    Always,
}

/// The default `auth_query`, as PgBouncer's.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1";

/// `[agent]`: how the HA agents decide. The timing rule (checked by validation):
/// `loop_wait + 2 * retry_timeout + fence_margin <= ttl`, so a leader fences itself before its
/// lease can run out, after having had two full store timeouts to renew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The leader lease's lifetime: a silent leader is replaced this long after its last renewal.
    pub ttl: Duration,
    /// How often an agent looks and publishes (and the lease is renewed).
    pub loop_wait: Duration,
    /// The bound on one store call.
    pub retry_timeout: Duration,
    /// The leader stops its PostgreSQL this long before the lease could run out.
    pub fence_margin: Duration,
    /// How long the leader may take to restart a crashed PostgreSQL before it hands over.
    pub primary_restart_timeout: Duration,
    pub on_postgres_crash: OnPostgresCrash,
    /// A standby further behind the leader's last position than this is never promoted.
    pub maximum_lag_on_failover: Option<ByteSize>,
    pub synchronous_mode: SynchronousMode,
    pub rejoin: RejoinMode,
    /// Failsafe mode: a leader that cannot reach the store keeps its primary while every other
    /// member confirms over the API that it cannot reach the store either and does not lead.
    pub failsafe: bool,
    pub api: AgentApiConfig,
}

/// `[agent.api]`: HTTP basic authentication for the agents' API. Mutating calls
/// (`POST /switchover`) need the credentials and are refused when none are configured; reads
/// (health checks, `/cluster`) need them only with `auth_reads`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentApiConfig {
    pub credentials: Option<(String, Secret)>,
    pub auth_reads: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            ttl: Duration::from_secs(7),
            loop_wait: Duration::from_secs(1),
            retry_timeout: Duration::from_secs(1),
            fence_margin: Duration::from_secs(2),
            primary_restart_timeout: Duration::from_secs(5),
            on_postgres_crash: OnPostgresCrash::Restart,
            maximum_lag_on_failover: Some(ByteSize::mib(1)),
            synchronous_mode: SynchronousMode::Off,
            rejoin: RejoinMode::Rewind,
            failsafe: false,
            api: AgentApiConfig::default(),
        }
    }
}

/// `agent.on_postgres_crash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPostgresCrash {
    Restart,
    Failover,
}

/// `agent.synchronous_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynchronousMode {
    Off,
    On,
    Strict,
}

/// `agent.rejoin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejoinMode {
    Rewind,
    Clone,
    Manual,
}

/// `[dcs]`: the etcd cluster the agents (and the proxy) agree through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcsConfig {
    /// `host:port` or `http(s)://host:port`.
    pub endpoints: Vec<String>,
    /// The key prefix: keys live under `/<namespace>/<cluster>/`.
    pub namespace: String,
    /// The bound on one store call (`agent.retry_timeout` unless given).
    pub timeout: Duration,
    /// How long an agent waits at start for the store to answer before it exits with the cause
    /// (a machine booting with its etcd, an etcd member restarting). The proxy waits as long as
    /// it takes, listening and refusing clients with the reason.
    pub start_wait: Duration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

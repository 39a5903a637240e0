//! The agent's driver: observe, [`decide`](crate::decide::decide), act, for one node.
//!
//! The agent is its PostgreSQL's parent. The server is started with a parent-death signal, so
//! it dies with its agent: a leader whose agent was killed stops taking writes at once (and
//! the replicas see both gone), and a restarted agent consults the store before it starts the
//! server again. Its lease is kept alive by [`lease`]'s task; its state is published in the
//! store every round and served by [`crate::api`].
//!
//! Rounds run every `loop_wait`, at once after an action, when the leader key changes, and when
//! a child exits (the postmaster's crash is seen within milliseconds, not at the next tick).

mod act;
pub mod lease;
mod observe;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_config::{Config, NodeConfig};
use pgwarden_core::{Epoch, NodeId};
use pgwarden_dcs::{ClusterStore, DcsError, Kv, Snapshot};
use pgwarden_postgres::{Instance, PgEnv, PgError, Postmaster, StopMode};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::ApiView;
use crate::decide::{self, Action, Decision, Observation, Pg, Role};
use crate::member::MemberState;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("node \"{0}\" is not in [[nodes]]")]
    UnknownNode(String),
    #[error("node \"{0}\" has no data_dir: the agent manages a local data directory")]
    NoDataDir(String),
    #[error("node \"{0}\" has no api address ([[nodes]] api = \"ip:port\")")]
    NoApi(String),
    #[error("cannot serve the agent API on {addr}: {source}")]
    ApiListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error(transparent)]
    Store(#[from] DcsError),
    #[error("{0}")]
    Sql(String),
    #[error("{0}")]
    NotReady(&'static str),
    #[error("cannot wait for signals: {0}")]
    Signals(#[source] std::io::Error),
}

/// What the loop remembers between rounds.
#[derive(Debug, Default)]
struct Memory {
    pg_down_since: Option<Instant>,
    not_streaming_since: Option<Instant>,
    /// The member this standby's `primary_conninfo` names.
    upstream: Option<NodeId>,
    rewind_failed: bool,
    /// The leader's ports were first found refusing connections at this time.
    refused_since: Option<Instant>,
    /// When each peer last answered on its API.
    heard: HashMap<NodeId, Instant>,
    /// The epoch for which the other members' slots were made on this leader.
    slots_for: Option<Epoch>,
    roles_ready: bool,
    /// `synchronous_standby_names` as last applied by this agent.
    sync_applied: Vec<NodeId>,
    /// Ask again soon (a refusal to confirm, a server starting).
    soon: bool,
    /// The server was started and has not answered since: if it exits now, the start failed.
    starting: bool,
    /// Starts that failed in a row, and no new start before this.
    failed_starts: u32,
    start_not_before: Option<Instant>,
    /// The standby's replay as last read.
    replay: observe::Replay,
    /// This leader drains for a switchover: rounds come quickly.
    draining: bool,
    /// Its PostgreSQL answers again after being down since then (a restart, for history).
    recovered: Option<Instant>,
    /// This node was promoted (for history): when, and the WAL it had received.
    promoted: Option<(u64, Option<pgwarden_core::Lsn>)>,
    /// The leader key as last read from the store (failsafe mode: who led when it went).
    last_key: Option<pgwarden_dcs::Leader>,
    /// Failsafe mode: this leader's last round had every other member's confirmation.
    failsafe_confirmed: bool,
    /// Failsafe mode: the epoch this primary went on writing under without the store (it
    /// takes the key again under it when the store is back).
    failsafe_confirmed_epoch: Option<u64>,
    /// The dynamic settings' text last seen in the store (applied, or refused and logged).
    dynamic_seen: Option<String>,
    /// When this node last took the leader key (for history).
    took_ms: Option<u64>,
}

pub struct Agent<K: Kv> {
    /// The config in effect: the file's, with the store's dynamic settings applied.
    config: Arc<Config>,
    /// The file's, as the agent started.
    file_config: Arc<Config>,
    me: NodeConfig,
    id: NodeId,
    rules: decide::Settings,
    store: Arc<ClusterStore<K>>,
    instance: Instance,
    postmaster: Option<Postmaster>,
    client: Option<tokio_postgres::Client>,
    lease: Arc<lease::Lease>,
    lease_task: tokio::task::JoinHandle<()>,
    api_task: tokio::task::JoinHandle<()>,
    view: watch::Sender<Arc<ApiView>>,
    origin: Instant,
    mem: Memory,
    snapshot: Option<Snapshot<MemberState>>,
    /// The key this agent took in this round (the snapshot predates it).
    took: Option<pgwarden_dcs::Leader>,
    /// Failsafe confirmations this member gave on its API.
    acks: Arc<crate::failsafe::Acks>,
}

/// How long a peer's API may take to answer during an election.
const PEER_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a draining leader counts its clients' open transactions.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How far apart the two refusals that prove a leader's processes gone must be.
const GONE_RECHECK: Duration = Duration::from_millis(200);

impl<K: Kv> Agent<K> {
    /// Checks the node, binds its API and starts the lease keeper. Nothing is started yet.
    pub async fn new(
        config: Arc<Config>,
        node: &str,
        store: ClusterStore<K>,
    ) -> Result<Self, AgentError> {
        let me = config
            .node(node)
            .cloned()
            .ok_or_else(|| AgentError::UnknownNode(node.to_string()))?;
        let data_dir = me
            .data_dir
            .clone()
            .ok_or_else(|| AgentError::NoDataDir(node.to_string()))?;
        let api_addr = me.api.ok_or_else(|| AgentError::NoApi(node.to_string()))?;
        let pg = &config.postgres;
        let env = PgEnv::discover(pg.bin_dir.as_deref(), &pg.os_user)?;
        env.run_as.check_reachable(&data_dir)?;
        env.run_as.check_owner(&data_dir)?;
        let instance = Instance::new(env, &me.name, &me.host, me.port, &data_dir).die_with_parent();
        let listener = tokio::net::TcpListener::bind(api_addr)
            .await
            .map_err(|source| AgentError::ApiListen {
                addr: api_addr,
                source,
            })?;
        let rules = rules(&config);
        let store = Arc::new(store);
        let (lease, lease_task) = lease::spawn(
            store.clone(),
            rules.ttl,
            rules.loop_wait,
            rules.ttl.saturating_sub(rules.fence_margin),
        );
        let id = NodeId::new(&me.name);
        let (view, view_rx) = watch::channel(Arc::new(ApiView {
            member: observe::blank_state(&me),
            writable_leader: false,
            synchronous: false,
            published: std::time::Instant::now(),
            live_for: rules.loop_wait * 3,
            cluster: crate::status::HaStatus::unreadable("not read yet".into()),
            store_reachable: false,
            failsafe: None,
        }));
        let acks = Arc::new(crate::failsafe::Acks::default());
        let operator = Arc::new(crate::api_write::Operator {
            store: store.clone(),
            config: config.clone(),
            node: me.name.clone(),
            acks: acks.clone(),
        });
        let api_task = tokio::spawn(crate::api::serve(listener, view_rx, operator));
        let mem = Memory {
            upstream: instance.upstream().and_then(|(host, port)| {
                config
                    .nodes
                    .iter()
                    .find(|n| n.host == host && n.port == port)
                    .map(|n| NodeId::new(&n.name))
            }),
            ..Memory::default()
        };
        Ok(Agent {
            file_config: config.clone(),
            config,
            me,
            id,
            rules,
            store,
            instance,
            postmaster: None,
            client: None,
            lease,
            lease_task,
            api_task,
            view,
            origin: Instant::now(),
            mem,
            snapshot: None,
            took: None,
            acks,
        })
    }

    /// What the API serves (for tests and the demo).
    pub fn view(&self) -> watch::Receiver<Arc<ApiView>> {
        self.view.subscribe()
    }

    /// The postmaster's PID while one runs (for fault tests).
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(|p| p.pid())
    }

    /// Runs until `stop` turns true; then stops PostgreSQL and gives up the leader key so a
    /// replica takes over at once.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), AgentError> {
        let mut children = signal(SignalKind::child()).map_err(AgentError::Signals)?;
        // A round comes at once when the leader key or the switchover key changes.
        let mut keys = [
            self.store.watch_leader().await.ok(),
            self.store.watch_switchover().await.ok(),
        ];
        tracing::info!(node = %self.id, "agent started");
        loop {
            if *stop.borrow() {
                break;
            }
            self.took = None;
            let o = self.observe().await;
            let keep: Vec<u32> = self.postmaster.iter().map(|p| p.pid()).collect();
            pgwarden_postgres::reap_orphans(&keep);
            let d = decide::decide(&o, &self.rules);
            self.publish(&o, &d).await;
            self.lease.loop_turned(d.role == Role::Leader);
            let writable = matches!(o.pg, Pg::Running(ref r) if r.primary)
                || matches!(o.pg, Pg::Starting { as_primary: true });
            self.lease.guard(
                self.postmaster
                    .as_ref()
                    .map(|p| p.pid())
                    .filter(|_| writable && !d.actions.contains(&Action::Fence)),
            );
            let mut wait = if self.mem.soon || matches!(o.pg, Pg::Starting { .. }) {
                Duration::from_millis(100)
            } else {
                self.rules.loop_wait
            };
            let start = d
                .actions
                .iter()
                .any(|a| matches!(a, Action::StartPrimary | Action::StartStandby { .. }));
            if start
                && self
                    .mem
                    .start_not_before
                    .is_some_and(|t| Instant::now() < t)
            {
                // Its last starts failed at once (a port or lock in use, a bad setting):
                // back off rather than spin.
                self.wait(wait, &mut children, &mut keys, &mut stop).await;
                continue;
            }
            for a in &d.actions {
                if a != &Action::Lead {
                    tracing::info!(node = %self.id, action = ?a, "acting");
                    wait = Duration::from_millis(10);
                }
                if let Err(e) = self.act(a).await {
                    tracing::warn!(node = %self.id, action = ?a, error = %e, "action failed");
                    wait = self.rules.loop_wait;
                    break;
                }
            }
            if self.mem.soon {
                wait = wait.min(Duration::from_millis(100));
            }
            if self.mem.draining {
                wait = wait.min(DRAIN_POLL);
            }
            self.wait(wait, &mut children, &mut keys, &mut stop).await;
        }
        self.shut_down().await;
        Ok(())
    }

    /// Until `wait` has passed, a watched key (the leader's, the switchover's) changed, the
    /// postmaster exited or `stop`. Other children's exits (a pg_basebackup's) do not end the
    /// wait.
    async fn wait(
        &mut self,
        wait: Duration,
        children: &mut tokio::signal::unix::Signal,
        keys: &mut [Option<watch::Receiver<pgwarden_dcs::Revision>>; 2],
        stop: &mut watch::Receiver<bool>,
    ) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let [a, b] = &mut *keys;
            let key_changed = async {
                tokio::select! { _ = changed(a) => {}, _ = changed(b) => {} }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = key_changed => return,
                _ = stop.changed() => return,
                _ = children.recv() => {
                    if self.postmaster.as_mut().is_some_and(|p| p.try_wait().is_some()) {
                        return;
                    }
                }
            }
        }
    }

    async fn shut_down(&mut self) {
        tracing::info!(node = %self.id, "agent stopping");
        if let Some(pm) = self.postmaster.as_mut() {
            pm.stop(StopMode::Fast, Duration::from_secs(10)).await;
        }
        self.postmaster = None;
        if let Some(l) = self.snapshot.as_ref().and_then(|s| s.leader.clone()) {
            if l.node == self.id {
                let _ = self.store.release_leader(&l).await;
            }
        }
        if let Some(id) = self.lease.id() {
            let _ = self.store.kv().revoke(id).await;
        }
        self.lease_task.abort();
        self.api_task.abort();
    }

    fn tick(&self, at: Instant) -> decide::Tick {
        at.saturating_duration_since(self.origin)
    }

    async fn publish(&mut self, o: &Observation, d: &Decision) {
        let state = observe::member_state(
            &self.me,
            o,
            d,
            self.snapshot.as_ref(),
            self.mem.roles_ready,
            self.mem.replay,
        );
        let holds = self
            .snapshot
            .as_ref()
            .and_then(|s| s.leader.as_ref())
            .is_some_and(|l| l.node == self.id && l.lease.is_some() && l.lease == self.lease.id());
        let writable = matches!(&o.pg, Pg::Running(r) if r.primary) && d.role == Role::Leader;
        let failsafe = (self.mem.failsafe_confirmed && writable).then(|| {
            let epoch = self.mem.last_key.as_ref().map_or(0, |l| l.epoch.0);
            let fence_after = self.rules.ttl.saturating_sub(self.rules.fence_margin);
            (
                epoch,
                self.lease
                    .fences_at(fence_after)
                    .unwrap_or_else(Instant::now),
            )
        });
        // Not to a store this round could not read: the write would only wait its timeout.
        let readable = self.snapshot.is_some();
        if let (Some(lease), true) = (self.lease.id(), readable) {
            if let Err(e) = self.store.put_member(&self.id, &state, lease).await {
                tracing::debug!(node = %self.id, error = %e, "cannot publish the member state");
                if matches!(e, DcsError::LeaseGone(_)) {
                    self.lease.forget(lease);
                }
            }
        }
        let synchronous = self
            .snapshot
            .as_ref()
            .and_then(|s| s.synchronous_set.as_ref())
            .is_some_and(|set| set.contains(&self.id));
        let view = ApiView {
            member: state,
            writable_leader: (holds || failsafe.is_some()) && writable,
            store_reachable: self.snapshot.is_some(),
            failsafe,
            synchronous,
            published: std::time::Instant::now(),
            live_for: self.rules.loop_wait * 3,
            cluster: match self.snapshot.as_ref() {
                Some(s) => crate::status::HaStatus::from_snapshot(s),
                None => crate::status::HaStatus::unreadable(
                    "this agent could not read the store in its last round".into(),
                ),
            },
        };
        self.view.send_if_modified(|v| {
            if **v == view {
                false
            } else {
                *v = Arc::new(view);
                true
            }
        });
    }
}

/// A change of a watched key; never, for a watch that could not be made or has ended.
async fn changed(w: &mut Option<watch::Receiver<pgwarden_dcs::Revision>>) {
    match w.as_mut() {
        Some(w) => {
            if w.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// An agent dropped without [`Agent::run`]'s orderly stop (its task aborted) takes its
/// PostgreSQL with it at once, as its process's death would.
impl<K: Kv> Drop for Agent<K> {
    fn drop(&mut self) {
        if let Some(pm) = self.postmaster.as_mut() {
            pm.stop_blocking(StopMode::Immediate, Duration::from_secs(5));
        }
        self.lease_task.abort();
        self.api_task.abort();
    }
}

/// How an agent (or the demo) connects to a node as the superuser.
pub fn superuser<'a>(
    config: &'a Config,
    host: &'a str,
    port: u16,
    timeout: Duration,
) -> pgwarden_postgres::sql::ConnectSpec<'a> {
    pgwarden_postgres::sql::ConnectSpec {
        host,
        port,
        user: &config.postgres.superuser,
        password: config.postgres.superuser_password.expose(),
        dbname: "postgres",
        application_name: "pgwarden-agent",
        timeout,
    }
}

/// The decision rules from the config.
pub fn rules(config: &Config) -> decide::Settings {
    use pgwarden_config::{OnPostgresCrash, RejoinMode, SynchronousMode};
    let a = &config.agent;
    decide::Settings {
        ttl: a.ttl,
        loop_wait: a.loop_wait,
        fence_margin: a.fence_margin,
        primary_restart_timeout: a.primary_restart_timeout,
        on_crash: match a.on_postgres_crash {
            OnPostgresCrash::Restart => decide::OnCrash::Restart,
            OnPostgresCrash::Failover => decide::OnCrash::Failover,
        },
        maximum_lag_on_failover: a.maximum_lag_on_failover.map(|b| b.bytes()),
        synchronous_mode: match a.synchronous_mode {
            SynchronousMode::Off => decide::SyncMode::Off,
            SynchronousMode::On => decide::SyncMode::On,
            SynchronousMode::Strict => decide::SyncMode::Strict,
        },
        rejoin: match a.rejoin {
            RejoinMode::Rewind => decide::Rejoin::Rewind,
            RejoinMode::Clone => decide::Rejoin::Clone,
            RejoinMode::Manual => decide::Rejoin::Manual,
        },
        diverged_after: a.loop_wait * 10,
    }
}

//! One round's observation: the store in one read, this node's PostgreSQL from its own
//! answers, the leader's liveness by its ports, and (only when there is an election) every
//! peer's position asked on its API.

use std::time::{Duration, Instant};

use pgwarden_config::NodeConfig;
use pgwarden_core::{Lsn, NodeId};
use pgwarden_dcs::{Kv, SwitchoverPhase};
use pgwarden_postgres::sql;

use super::{Agent, AgentError, PEER_TIMEOUT};
use crate::api;
use crate::candidates::Candidate;
use crate::decide::{Decision, LeaderKey, Observation, Pg, Role, Running, Store};
use crate::member::MemberState;
use crate::switchover::{self, Plan, Stage, Target};

/// Client transactions running on this server, other than this query's.
pub(super) const OPEN_TRANSACTIONS: &str = "\
SELECT count(*) FROM pg_stat_activity
 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start IS NOT NULL";

/// Failsafe mode: how many times a leader asks the members in one round, how far apart.
const FAILSAFE_ATTEMPTS: usize = 6;
const FAILSAFE_RETRY: Duration = Duration::from_millis(250);

/// How long the members wait for a manual failover's target before the ordinary rules apply.
pub(crate) const FAILOVER_WAIT: Duration = Duration::from_secs(30);

/// The bound on connecting to this node's PostgreSQL, and on one query.
const SQL_TIMEOUT: Duration = Duration::from_secs(2);

const STATE_SQL: &str = "\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery()
            THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text
            ELSE pg_current_wal_lsn()::text END,
       CASE WHEN pg_is_in_recovery()
            THEN greatest((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()),
                          (SELECT min_recovery_end_timeline FROM pg_control_recovery()),
                          (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int)
                             FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{8}[.]history$'))::int8
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END,
       COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false),
       CASE WHEN pg_is_in_recovery()
            THEN greatest((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()),
                          (SELECT min_recovery_end_timeline FROM pg_control_recovery()))::int8
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8 END,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END,
       CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() IS NOT NULL
                 AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())
       END::float8,
       (extract(epoch FROM pg_postmaster_start_time()) * 1000)::int8";

/// A standby's replay, as its server reports it (published for the proxy's read routing). Its
/// lag in time is 0 when it has replayed all it received, else the age of the last transaction
/// it replayed, unknown when it has replayed none since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Replay {
    pub lsn: Option<Lsn>,
    pub lag_seconds: Option<f64>,
    /// When the running server's postmaster started (Unix milliseconds): published with the
    /// replay so that a restart can be told from the state before it.
    pub started_ms: Option<i64>,
}

impl<K: Kv> Agent<K> {
    pub(super) async fn observe(&mut self) -> Observation {
        let now = Instant::now();
        self.mem.soon = false;
        self.snapshot = match self.store.snapshot::<MemberState>().await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(node = %self.id, error = %e, "cannot read the store");
                None
            }
        };
        if self.snapshot.as_ref().is_some_and(|s| s.paused) {
            // Paused, a crashed server is left down: its restart timer starts when the agents
            // may act again, so resuming restarts it in place rather than failing over.
            self.mem.pg_down_since = None;
        }
        let pg = self.observe_pg(now).await;
        let dynamic = self.snapshot.as_ref().map(|s| {
            s.dynamic
                .as_ref()
                .map(|d| d.value.clone())
                .unwrap_or_default()
        });
        if let Some(text) = dynamic.filter(|t| Some(t) != self.mem.dynamic_seen.as_ref()) {
            self.apply_dynamic(text, &pg).await;
        }
        if let Some(s) = &self.snapshot {
            self.mem.last_key = s.leader.clone();
            if s.leader.as_ref().is_some_and(|l| l.node == self.id) {
                // Leading again with the key: failsafe is over.
                self.mem.failsafe_confirmed_epoch = None;
            }
        }
        self.mem.failsafe_confirmed = self.failsafe_confirmation(&pg).await;
        let (switchover, switchover_target, shut_down_at) = self.observe_switchover(&pg).await;
        let lease = self.lease.id();
        let store = self.snapshot.as_ref().map(|s| Store {
            leader: s.leader.as_ref().map(|l| LeaderKey {
                node: l.node.clone(),
                epoch: l.epoch,
                ours: l.lease.is_some() && l.lease == lease,
            }),
            last_epoch: s.last_epoch,
            initialized_by: s.initialized_by.clone(),
            last_leader: s.last_leader.as_ref().map(|l| (l.node.clone(), l.lsn)),
            last_leader_timeline: s
                .last_leader
                .as_ref()
                .map(|l| l.timeline)
                .filter(|t| *t > 0),
            leader_timeline: s.leader.as_ref().and_then(|l| {
                s.members
                    .iter()
                    .find(|m| m.node == l.node && m.state.primary)
                    .and_then(|m| m.state.timeline)
            }),
            leader_ready: s.leader.as_ref().is_some_and(|l| {
                s.members
                    .iter()
                    .any(|m| m.node == l.node && m.state.primary && m.state.ready)
            }),
            synchronous_set: s.synchronous_set.clone(),
            paused: s.paused,
            switchover,
            request: s
                .requests
                .iter()
                .find(|(n, _)| n == &self.id)
                .map(|(_, r)| r.value.action),
            failover: s.failover.as_ref().map(|f| {
                let waited = switchover::unix_ms().saturating_sub(f.value.requested_ms);
                (
                    NodeId::new(&f.value.to),
                    Duration::from_millis(waited) >= FAILOVER_WAIT,
                )
            }),
        });
        let other_leader = store
            .as_ref()
            .and_then(|s| s.leader.as_ref())
            .filter(|l| l.node != self.id)
            .map(|l| l.node.clone());
        let leader_gone = match &other_leader {
            Some(l) => self.leader_gone(l, now).await,
            None => {
                self.mem.refused_since = None;
                false
            }
        };
        let electing = store.as_ref().is_some_and(|s| s.leader.is_none()) || leader_gone;
        let candidates = if electing {
            self.candidates(&pg, now).await
        } else {
            Vec::new()
        };
        Observation {
            node: self.id.clone(),
            now: self.tick(now),
            pg,
            pg_down_since: self.mem.pg_down_since.map(|t| self.tick(t)),
            store,
            renewed_at: self.lease.renewed_at().map(|t| self.tick(t)),
            candidates,
            leader_gone,
            rewind_failed: self.mem.rewind_failed,
            switchover_target,
            shut_down_at,
            failsafe_ack: self.acks.fresh(self.rules.ttl),
            failsafe_confirmed: self.mem.failsafe_confirmed,
        }
    }

    /// The store's dynamic settings over the file's config: the rules from the next decision
    /// on, PostgreSQL's parameters (and the synchronous standbys' setting) by reload. Settings
    /// that do not pass the checks are refused, logged once, and the previous ones stay.
    async fn apply_dynamic(&mut self, text: String, pg: &Pg) {
        self.mem.dynamic_seen = Some(text.clone());
        let new = match pgwarden_config::dynamic::apply(&self.file_config, &text) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(node = %self.id, error = %e, "the store's dynamic settings are refused; the previous ones stay");
                return;
            }
        };
        let reload = new.postgres.parameters != self.config.postgres.parameters
            || new.agent.synchronous_mode != self.config.agent.synchronous_mode;
        self.config = std::sync::Arc::new(new);
        self.rules = super::rules(&self.config);
        tracing::info!(node = %self.id, "applied the store's dynamic settings");
        if reload && matches!(pg, Pg::Running(_)) {
            let applied = self
                .instance
                .configure(&self.pg_settings(), &self.config.postgres.replication_user)
                .map_err(AgentError::from);
            let reloaded = match applied {
                Ok(()) => self.query("SELECT pg_reload_conf()", &[]).await.map(|_| ()),
                Err(e) => Err(e),
            };
            if let Err(e) = reloaded {
                tracing::warn!(node = %self.id, error = %e, "cannot reload postgres with the dynamic settings");
            }
        }
    }

    /// Failsafe mode, on a leader whose last round could not read the store: asks every other
    /// member to confirm that it cannot reach the store either and does not lead; if all do,
    /// the confirmation counts as a renewal from when the requests were sent.
    async fn failsafe_confirmation(&mut self, pg: &Pg) -> bool {
        let led = self
            .mem
            .last_key
            .as_ref()
            .filter(|l| l.node == self.id)
            .map(|l| l.epoch.0);
        let primary = matches!(pg, Pg::Running(r) if r.primary);
        let (Some(epoch), true, true, None) = (
            led,
            primary,
            self.config.agent.failsafe,
            self.snapshot.as_ref(),
        ) else {
            return false;
        };
        let others: Vec<String> = self
            .config
            .nodes
            .iter()
            .filter(|n| n.name != self.me.name)
            .map(|n| n.api.map(|a| a.to_string()).unwrap_or_default())
            .collect();
        let auth = crate::api_write::peer_authorization(&self.config);
        let body = serde_json::json!({ "leader": self.id.as_str(), "epoch": epoch }).to_string();
        // The members notice the store is gone in their own rounds: ask again a few times,
        // each member's confirmation counted from when the request it answered was sent, the
        // leader's from the earliest of them.
        let mut confirmed: Vec<Option<Instant>> = vec![None; others.len()];
        for attempt in 0..FAILSAFE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(FAILSAFE_RETRY).await;
            }
            let sent = Instant::now();
            let answers =
                futures::future::join_all(others.iter().zip(&confirmed).map(|(addr, done)| {
                    let (auth, body) = (auth.clone(), body.clone());
                    async move {
                        if done.is_some() || addr.is_empty() {
                            return false;
                        }
                        let answer = api::call(
                            addr,
                            "POST",
                            "/failsafe",
                            auth.as_deref(),
                            &body,
                            PEER_TIMEOUT,
                        )
                        .await;
                        matches!(answer, Some((200, _)))
                    }
                }))
                .await;
            for (slot, ok) in confirmed.iter_mut().zip(answers) {
                if ok {
                    *slot = Some(sent);
                }
            }
            if confirmed.iter().all(Option::is_some) {
                break;
            }
        }
        let answers: Vec<bool> = confirmed.iter().map(Option::is_some).collect();
        let all = answers.iter().all(|ok| *ok);
        if let (true, Some(sent)) = (all, confirmed.iter().flatten().min().copied()) {
            self.lease.confirmed_by_peers(sent);
            self.mem.failsafe_confirmed_epoch = Some(epoch);
            tracing::info!(node = %self.id, epoch, "failsafe: the store is unreachable and every member confirmed this leader");
        } else {
            tracing::warn!(node = %self.id, confirmed = answers.iter().filter(|ok| **ok).count(), of = answers.len(), "failsafe: not every member confirmed; the leader fences at its deadline");
            // The members may notice the store is gone only in their next rounds: ask again
            // soon rather than a whole round later, as the deadline nears.
            self.mem.soon = true;
        }
        all
    }

    /// The switchover in the store as this agent sees it: its stage (whether this leader's
    /// drain is done is asked of its own server), the target asked on its API when it is due
    /// here, and this data directory's clean shutdown point when it was the old leader.
    async fn observe_switchover(&mut self, pg: &Pg) -> (Option<Plan>, Option<Target>, Option<Lsn>) {
        self.mem.draining = false;
        let Some(sw) = self
            .snapshot
            .as_ref()
            .and_then(|s| s.switchover.as_ref())
            .map(|s| s.value.clone())
        else {
            return (None, None, None);
        };
        let mine = sw.from == self.id.as_str();
        let leading = self
            .snapshot
            .as_ref()
            .and_then(|s| s.leader.as_ref())
            .is_some_and(|l| l.node == self.id);
        let primary = matches!(pg, Pg::Running(r) if r.primary);
        let mut drained = false;
        if mine && leading && primary && sw.phase == SwitchoverPhase::Draining {
            self.mem.draining = true;
            drained = match self.query(OPEN_TRANSACTIONS, &[]).await {
                Ok(rows) => rows.first().is_some_and(|r| r.get::<_, i64>(0) == 0),
                Err(e) => {
                    tracing::debug!(node = %self.id, error = %e, "cannot count open transactions");
                    false
                }
            };
        }
        let plan = switchover::plan_of(&sw, switchover::unix_ms(), self.rules.ttl, drained);
        let target = if mine && leading && plan.stage == Stage::Due {
            let to = NodeId::new(&sw.to);
            let api = self.config.node(&sw.to).and_then(|n| n.api);
            match api {
                Some(addr) => api::fetch_state(&addr.to_string(), PEER_TIMEOUT)
                    .await
                    .map(|m| Target::of(to, &m)),
                None => None,
            }
        } else {
            None
        };
        let shut_down_at = if mine && matches!(pg, Pg::Stopped { standby: false }) {
            match self.instance.control_data().await {
                Ok(c) if c.shut_down => Some(c.checkpoint),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(node = %self.id, error = %e, "cannot read the control file");
                    None
                }
            }
        } else {
            None
        };
        (Some(plan), target, shut_down_at)
    }

    async fn observe_pg(&mut self, now: Instant) -> Pg {
        if let Some(pm) = self.postmaster.as_mut() {
            if let Some(status) = pm.try_wait() {
                tracing::warn!(
                    node = %self.id,
                    %status,
                    log = %pgwarden_postgres::log_tail(&self.instance.data_dir, 3),
                    "postgres exited"
                );
                self.postmaster = None;
                self.client = None;
                self.mem.pg_down_since.get_or_insert(now);
                if std::mem::take(&mut self.mem.starting) {
                    self.mem.failed_starts += 1;
                    let pause = (self.rules.loop_wait * self.mem.failed_starts.min(30))
                        .min(Duration::from_secs(30));
                    self.mem.start_not_before = Some(now + pause);
                }
            }
        }
        if self.postmaster.is_none() {
            return if self.instance.is_initialised() {
                Pg::Stopped {
                    standby: self.instance.is_standby(),
                }
            } else {
                Pg::Missing
            };
        }
        self.mem.replay = Replay::default();
        match self.query_state().await {
            Ok((mut r, streaming, replay)) => {
                self.mem.replay = replay;
                if let Some(since) = self.mem.pg_down_since.take() {
                    self.mem.recovered = Some(since);
                }
                self.mem.starting = false;
                self.mem.failed_starts = 0;
                self.mem.start_not_before = None;
                if r.primary || streaming {
                    self.mem.not_streaming_since = None;
                } else {
                    self.mem.not_streaming_since.get_or_insert(now);
                }
                r.not_streaming_since = self.mem.not_streaming_since.map(|t| self.tick(t));
                r.upstream = if r.primary {
                    None
                } else {
                    self.mem.upstream.clone()
                };
                Pg::Running(r)
            }
            Err(e) => {
                tracing::debug!(node = %self.id, error = %e, "postgres does not answer yet");
                self.client = None;
                self.mem.pg_down_since.get_or_insert(now);
                Pg::Starting {
                    as_primary: !self.instance.is_standby(),
                }
            }
        }
    }

    /// A connection to this node's own server as the superuser (kept between rounds).
    pub(super) async fn client(&mut self) -> Result<&tokio_postgres::Client, AgentError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let spec = super::superuser(&self.config, &self.me.host, self.me.port, SQL_TIMEOUT);
            let c = sql::connect(&spec).await?;
            self.client = Some(c);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// Runs `sql` on this node's server within the bound.
    pub(super) async fn query(
        &mut self,
        text: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, AgentError> {
        let client = self.client().await?;
        match tokio::time::timeout(SQL_TIMEOUT, client.query(text, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                self.client = None;
                Err(AgentError::Sql(format!("{text:.40}...: {e}")))
            }
            Err(_) => {
                self.client = None;
                Err(AgentError::Sql(format!(
                    "{text:.40}... took longer than {SQL_TIMEOUT:?}"
                )))
            }
        }
    }

    async fn query_state(&mut self) -> Result<(Running, bool, Replay), AgentError> {
        let rows = self.query(STATE_SQL, &[]).await?;
        let row = rows
            .first()
            .ok_or(AgentError::NotReady("no row from the state query"))?;
        let in_recovery: bool = row.get(0);
        let lsn: Option<String> = row.get(1);
        let timeline: Option<i64> = row.get(2);
        let streaming: bool = row.get(3);
        let data_timeline: Option<i64> = row.get(4);
        let replay = Replay {
            lsn: row.get::<_, Option<String>>(5).and_then(|s| s.parse().ok()),
            lag_seconds: row.get(6),
            started_ms: row.get(7),
        };
        Ok((
            Running {
                primary: !in_recovery,
                timeline: timeline.unwrap_or(0) as u32,
                data_timeline: data_timeline.unwrap_or(0) as u32,
                lsn: lsn.and_then(|s| s.parse().ok()).unwrap_or(Lsn(0)),
                upstream: None,
                not_streaming_since: None,
            },
            streaming,
            replay,
        ))
    }

    /// Process death: the leader's PostgreSQL and agent ports both refuse connections, twice,
    /// at least [`super::GONE_RECHECK`] apart. A timeout is not a refusal (a partition is not a
    /// death: that case waits for the lease).
    async fn leader_gone(&mut self, leader: &NodeId, now: Instant) -> bool {
        let Some(node) = self.config.node(leader.as_str()) else {
            return false;
        };
        let Some(api) = node.api else {
            return false;
        };
        let (pg, api) = (node.address(), api.to_string());
        let (a, b) = tokio::join!(refused(&pg), refused(&api));
        if !(a && b) {
            self.mem.refused_since = None;
            return false;
        }
        match self.mem.refused_since {
            Some(first) if now.duration_since(first) >= super::GONE_RECHECK => true,
            Some(_) => {
                self.mem.soon = true;
                false
            }
            None => {
                tracing::info!(node = %self.id, leader = %leader, "the leader's ports refuse connections; checking again");
                self.mem.refused_since = Some(now);
                self.mem.soon = true;
                false
            }
        }
    }

    /// This node and every published member, with positions asked on their APIs.
    async fn candidates(&mut self, pg: &Pg, now: Instant) -> Vec<Candidate> {
        let mut out = vec![Candidate {
            node: self.id.clone(),
            age: Duration::ZERO,
            standby_running: matches!(pg, Pg::Running(r) if !r.primary),
            received: match pg {
                Pg::Running(r) if !r.primary => Some(r.lsn),
                _ => None,
            },
            timeline: match pg {
                Pg::Running(r) => Some(r.timeline),
                _ => None,
            },
            priority: self.me.priority,
            nofailover: self.me.nofailover,
        }];
        let Some(snap) = &self.snapshot else {
            return out;
        };
        let peers: Vec<(NodeId, MemberState)> = snap
            .members
            .iter()
            .filter(|m| m.node != self.id)
            .map(|m| (m.node.clone(), m.state.clone()))
            .collect();
        let answers = futures::future::join_all(peers.iter().map(|(_, st)| async move {
            match &st.api {
                Some(addr) => api::fetch_state(addr, PEER_TIMEOUT).await,
                None => Some(st.clone()),
            }
        }))
        .await;
        for ((node, published), answer) in peers.into_iter().zip(answers) {
            let (state, age) = match answer {
                Some(s) => {
                    self.mem.heard.insert(node.clone(), now);
                    (s, Duration::ZERO)
                }
                None => {
                    let since = self.mem.heard.get(&node).copied().unwrap_or(self.origin);
                    (published, now.duration_since(since))
                }
            };
            out.push(candidate(node, &state, age));
        }
        out
    }
}

fn candidate(node: NodeId, s: &MemberState, age: Duration) -> Candidate {
    Candidate {
        node,
        age,
        standby_running: s.state == "running" && !s.primary,
        received: s.lsn.as_deref().and_then(|l| l.parse().ok()),
        timeline: s.timeline,
        priority: s.priority,
        nofailover: s.nofailover,
    }
}

async fn refused(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// The state of a node before its first round.
pub(super) fn blank_state(me: &NodeConfig) -> MemberState {
    MemberState {
        role: "down".into(),
        state: "stopped".into(),
        primary: false,
        timeline: None,
        lsn: None,
        streaming: false,
        lag_bytes: None,
        replay_lsn: None,
        replay_lag_bytes: None,
        replay_lag_ms: None,
        epoch: None,
        ready: false,
        host: me.host.clone(),
        port: me.port,
        api: me.api.map(|a| a.to_string()),
        priority: me.priority,
        nofailover: me.nofailover,
        nosync: me.nosync,
        reason: None,
        reason_code: None,
        started_ms: None,
    }
}

/// The state published after a decision.
pub(super) fn member_state(
    me: &NodeConfig,
    o: &Observation,
    d: &Decision,
    snap: Option<&pgwarden_dcs::Snapshot<MemberState>>,
    roles_ready: bool,
    replay: Replay,
) -> MemberState {
    let mut s = blank_state(me);
    s.role = match d.role {
        Role::Leader => "leader",
        Role::Replica => "replica",
        Role::Down => "down",
    }
    .into();
    s.state = match &o.pg {
        Pg::Missing => "missing",
        Pg::Stopped { .. } => "stopped",
        Pg::Starting { .. } => "starting",
        Pg::Running(_) => "running",
    }
    .into();
    if let Pg::Running(r) = &o.pg {
        s.started_ms = replay.started_ms.map(|t| t.max(0) as u64);
        s.primary = r.primary;
        s.timeline = Some(r.timeline);
        s.lsn = Some(r.lsn.to_string());
        s.streaming = !r.primary && r.not_streaming_since.is_none();
        let last = snap.and_then(|x| x.last_leader.as_ref());
        if let Some(last) = last {
            s.lag_bytes = Some(last.lsn.bytes_since(r.lsn));
        }
        if !r.primary {
            s.replay_lsn = replay.lsn.map(|l| l.to_string());
            s.replay_lag_bytes = last.zip(replay.lsn).map(|(l, r)| l.lsn.bytes_since(r));
            s.replay_lag_ms = replay.lag_seconds.map(|x| (x.max(0.0) * 1000.0) as u64);
        }
    }
    if d.role == Role::Leader {
        s.epoch = snap
            .and_then(|x| x.leader.as_ref())
            .filter(|l| l.node == o.node)
            .map(|l| l.epoch.0);
        s.ready = roles_ready && s.primary;
    }
    s.reason = d.waiting.as_ref().map(|r| r.to_string());
    s.reason_code = d.waiting.as_ref().map(|r| r.code());
    s
}

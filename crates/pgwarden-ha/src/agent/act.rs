//! Carrying out one [`Action`].

use std::time::Duration;

use pgwarden_core::NodeId;
use pgwarden_dcs::{Event, EventKind, Kv, LastLeader, Leader, Switchover, SwitchoverPhase};
use pgwarden_postgres::sql;
use pgwarden_postgres::{Endpoint, ReplicationLogin, Settings, StopMode, SyncStandbys};

use super::observe::OPEN_TRANSACTIONS;
use super::{Agent, AgentError};
use crate::decide::{Action, SyncMode};
use crate::switchover;
use crate::sync::{self, Streaming, SyncStep};

const CLONE_TIMEOUT: Duration = Duration::from_secs(3600);
const REWIND_TIMEOUT: Duration = Duration::from_secs(600);
const PROMOTE_WAIT: Duration = Duration::from_secs(30);
const PROMOTE_POLL: Duration = Duration::from_millis(5);

impl<K: Kv> Agent<K> {
    pub(super) async fn act(&mut self, a: &Action) -> Result<(), AgentError> {
        match a {
            Action::ClaimInitialize => {
                if self.store.initialize(&self.id).await? {
                    tracing::info!(node = %self.id, "this node initialises the cluster");
                }
            }
            Action::Initdb => {
                let pg = &self.config.postgres;
                self.instance
                    .initdb(&pg.superuser, pg.superuser_password.expose())
                    .await?;
                self.instance
                    .configure(&self.pg_settings(), &pg.replication_user)?;
            }
            Action::Clone { from } => {
                let upstream = self.endpoint(from)?;
                let pw = self.replication_password();
                let pg = &self.config.postgres;
                let login = ReplicationLogin {
                    user: &pg.replication_user,
                    password: &pw,
                };
                tracing::info!(node = %self.id, from = %from, "cloning");
                self.instance
                    .clone_from(&upstream, &login, self.id.as_str(), CLONE_TIMEOUT)
                    .await?;
                self.instance
                    .configure(&self.pg_settings(), &pg.replication_user)?;
                self.mem.upstream = Some(from.clone());
            }
            Action::TakeLeader => {
                let lease = self.lease_id()?;
                // A primary that kept writing without the store (failsafe) under the last
                // epoch granted keeps it.
                let again = self.snapshot.as_ref().and_then(|s| {
                    let last = s.last_leader.as_ref()?;
                    let writing = self.mem.failsafe_confirmed_epoch?;
                    (last.node == self.id
                        && last.epoch.0 == writing
                        && s.last_epoch == Some(last.epoch))
                    .then_some(last.epoch)
                });
                let taken = match again {
                    Some(epoch) => match self.store.retake_leader(&self.id, lease, epoch).await? {
                        Some(l) => Some(l),
                        None => self.store.take_leader(&self.id, lease).await?,
                    },
                    None => self.store.take_leader(&self.id, lease).await?,
                };
                match taken {
                    Some(l) => {
                        tracing::info!(node = %self.id, epoch = %l.epoch, "took the leader key");
                        self.took = Some(l);
                        self.mem.took_ms = Some(switchover::unix_ms());
                    }
                    None => {
                        // Not an error to log loudly, but what follows it (a promotion) must
                        // not run.
                        tracing::info!(node = %self.id, "another node took the leader key first");
                        return Err(AgentError::NotReady(
                            "another node took the leader key first",
                        ));
                    }
                }
            }
            Action::TakeOver { from } => {
                let lease = self.lease_id()?;
                let held = self.held_by(from)?;
                match self.store.take_over(&held, &self.id, lease).await? {
                    Some(l) => {
                        tracing::info!(node = %self.id, from = %from, epoch = %l.epoch, "took the leader key from a leader whose processes are gone")
                    }
                    None => tracing::info!(node = %self.id, "the leader key changed first"),
                }
            }
            Action::AdoptLeader => {
                let lease = self.lease_id()?;
                let held = self.held_by(&self.id.clone())?;
                if self.store.adopt_leader(&held, lease).await? {
                    tracing::info!(node = %self.id, epoch = %held.epoch, "kept the leader key from an earlier run");
                }
            }
            Action::ReleaseLeader => {
                let held = self.held_by(&self.id.clone())?;
                self.store.release_leader(&held).await?;
                tracing::warn!(node = %self.id, epoch = %held.epoch, "released the leader key");
            }
            Action::StartPrimary => self.start()?,
            Action::StartStandby { upstream } => {
                match upstream {
                    Some(u) => {
                        self.follow(u)?;
                        self.name_sync_standbys_as_standby_of(u);
                    }
                    None => {
                        let signal = self.instance.data_dir.join("standby.signal");
                        self.instance.env().run_as.write_file(&signal, "", 0o600)?;
                    }
                }
                self.start()?;
            }
            Action::Promote => self.promote().await?,
            Action::Follow { upstream } => {
                self.follow(upstream)?;
                self.name_sync_standbys_as_standby_of(upstream);
                self.instance
                    .configure(&self.pg_settings(), &self.config.postgres.replication_user)?;
                self.query("SELECT pg_reload_conf()", &[]).await?;
                self.mem.not_streaming_since = Some(std::time::Instant::now());
                tracing::info!(node = %self.id, upstream = %upstream, "following a new leader");
            }
            Action::Fence => {
                if let Some(pm) = self.postmaster.as_mut() {
                    tracing::warn!(node = %self.id, "fencing: stopping postgres at once");
                    pm.stop(StopMode::Immediate, Duration::from_secs(2)).await;
                }
                self.postmaster = None;
                self.client = None;
            }
            Action::Rewind { from } => {
                self.stop_cleanly().await;
                let source = self.endpoint(from)?;
                let pg = &self.config.postgres;
                let pw = self.replication_password();
                let superuser = ReplicationLogin {
                    user: &pg.superuser,
                    password: pg.superuser_password.expose(),
                };
                let repl = ReplicationLogin {
                    user: &pg.replication_user,
                    password: &pw,
                };
                // pg_rewind reads the source's timeline from its control file, which a fresh
                // promotion updates only at its first checkpoint: without one it would find
                // nothing to rewind.
                self.checkpoint_on(&source).await?;
                tracing::info!(node = %self.id, from = %from, "rewinding");
                let result = self
                    .instance
                    .rewind_from(&source, &superuser, &repl, self.id.as_str(), REWIND_TIMEOUT)
                    .await;
                self.mem.rewind_failed = result.is_err();
                result?;
                self.instance
                    .configure(&self.pg_settings(), &pg.replication_user)?;
                self.mem.upstream = Some(from.clone());
            }
            Action::Reclone { from } => {
                self.stop_cleanly().await;
                tracing::warn!(node = %self.id, from = %from, "removing the data directory to clone it again");
                self.instance.remove_data()?;
                self.mem.rewind_failed = false;
                Box::pin(self.act(&Action::Clone { from: from.clone() })).await?;
            }
            Action::Lead => self.lead().await?,
            Action::BeginSwitchover { to } => self.begin_switchover(to).await?,
            Action::HandOver { to } => self.hand_over(to).await?,
            Action::PrepareTakeOver => self.name_sync_standbys().await?,
            Action::Restart => {
                tracing::info!(node = %self.id, "restarting postgres, as asked");
                self.stop_cleanly().await;
                self.start()?;
            }
            Action::Reinit { from } => {
                tracing::info!(node = %self.id, from = %from, "re-cloning, as asked");
                Box::pin(self.act(&Action::Reclone { from: from.clone() })).await?;
            }
            Action::DoneWithRequest => {
                let stored = self
                    .snapshot
                    .as_ref()
                    .and_then(|s| s.requests.iter().find(|(n, _)| n == &self.id))
                    .map(|(_, r)| r.revision);
                if let Some(revision) = stored {
                    let name = format!("requests/{}", self.id);
                    self.store.done_with(&name, revision).await?;
                }
            }
            Action::DoneWithFailover => {
                if let Some(f) = self.snapshot.as_ref().and_then(|s| s.failover.as_ref()) {
                    self.store.done_with("failover", f.revision).await?;
                }
            }
            Action::FinishSwitchover => {
                let held = self.held_by(&self.id.clone())?;
                let mut sw = self.current_switchover()?;
                sw.phase = SwitchoverPhase::Done;
                sw.finished_ms = Some(switchover::unix_ms());
                sw.epoch = Some(held.epoch.0);
                self.store.update_switchover(&held, &sw).await?;
                tracing::info!(node = %self.id, from = %sw.from, epoch = %held.epoch, write_gap_ms = ?sw.write_gap_ms(), "switchover done");
                let event = Event {
                    kind: EventKind::Switchover,
                    detected_ms: sw.stopped_ms,
                    promoted_ms: self.mem.promoted.take().map(|(at, _)| at),
                    down_ms: sw.draining_ms.unwrap_or_default(),
                    up_ms: sw.finished_ms.unwrap_or_default(),
                    from: Some(sw.from.clone()),
                    to: sw.to.clone(),
                    epoch: held.epoch.0,
                    timeline: sw.stopped_timeline.map(|t| t + 1),
                    lost_bytes: Some(0),
                };
                if let Err(err) = self.store.put_event(&held, &event).await {
                    tracing::warn!(node = %self.id, error = %err, "cannot record the switchover in the history");
                }
            }
            Action::FailSwitchover { why } => {
                let held = self.held_by(&self.id.clone())?;
                let mut sw = self.current_switchover()?;
                sw.phase = SwitchoverPhase::Failed;
                sw.finished_ms = Some(switchover::unix_ms());
                sw.note = Some(why.clone());
                self.store.update_switchover(&held, &sw).await?;
                tracing::warn!(node = %self.id, to = %sw.to, why = %why, "switchover failed");
            }
        }
        Ok(())
    }

    fn current_switchover(&self) -> Result<Switchover, AgentError> {
        self.snapshot
            .as_ref()
            .and_then(|s| s.switchover.as_ref())
            .map(|s| s.value.clone())
            .ok_or(AgentError::NotReady("the switchover key changed"))
    }

    /// The drain begins: the proxies hold new transactions from when they see it.
    async fn begin_switchover(&mut self, to: &NodeId) -> Result<(), AgentError> {
        let held = self.held_by(&self.id.clone())?;
        let mut sw = self.current_switchover()?;
        sw.phase = SwitchoverPhase::Draining;
        sw.draining_ms = Some(switchover::unix_ms());
        self.store.update_switchover(&held, &sw).await?;
        self.mem.draining = true;
        tracing::info!(node = %self.id, to = %to, drain_ms = sw.drain_ms, "switchover: holding new transactions, draining");
        Ok(())
    }

    /// The old leader's last step: a checkpoint (so the shutdown checkpoint has little to
    /// write), a fast shutdown (PostgreSQL sends every byte of WAL to the connected standbys
    /// before it exits), then `stopped` at the shutdown checkpoint, `last_leader` there and
    /// the leader key deleted, in one transaction.
    async fn hand_over(&mut self, to: &NodeId) -> Result<(), AgentError> {
        let held = self.held_by(&self.id.clone())?;
        let mut sw = self.current_switchover()?;
        let cut = match self.query(OPEN_TRANSACTIONS, &[]).await {
            Ok(rows) => rows.first().map(|r| r.get::<_, i64>(0) as u64),
            Err(_) => None,
        };
        let me = self.endpoint(&self.id.clone())?;
        if let Err(e) = self.checkpoint_on(&me).await {
            tracing::warn!(node = %self.id, error = %e, "switchover: the checkpoint before the stop failed; stopping anyway");
        }
        tracing::info!(node = %self.id, to = %to, cut = ?cut, "switchover: stopping postgres cleanly");
        self.stop_cleanly().await;
        let control = self.instance.control_data().await;
        let now = switchover::unix_ms();
        match control {
            Ok(c) if c.shut_down => {
                sw.phase = SwitchoverPhase::Stopped;
                sw.stopped_ms = Some(now);
                sw.stopped_lsn = Some(c.checkpoint.to_string());
                sw.stopped_timeline = Some(c.timeline);
                sw.cut_transactions = cut;
                let last = LastLeader {
                    at_ms: now,
                    node: self.id.clone(),
                    epoch: held.epoch,
                    lsn: c.checkpoint,
                    timeline: c.timeline,
                };
                if !self.store.hand_over(&held, &sw, &last).await? {
                    return Err(AgentError::NotReady(
                        "the leader key changed while this leader stopped for the switchover",
                    ));
                }
                tracing::info!(node = %self.id, to = %to, lsn = %c.checkpoint, "switchover: stopped cleanly, the key given up");
            }
            other => {
                // It did not stop cleanly: its last position is unknown, so nobody may take
                // over as in a switchover. Hand over as a failover would.
                let why = match other {
                    Ok(_) => "postgres did not shut down cleanly".to_string(),
                    Err(e) => format!("cannot read the control file: {e}"),
                };
                sw.phase = SwitchoverPhase::Failed;
                sw.finished_ms = Some(now);
                sw.note = Some(format!("{why}; the key was released for a failover"));
                self.store.update_switchover(&held, &sw).await?;
                self.store.release_leader(&held).await?;
                tracing::warn!(node = %self.id, why = %why, "switchover failed at the stop; released the key");
            }
        }
        Ok(())
    }

    fn lease_id(&self) -> Result<pgwarden_dcs::LeaseId, AgentError> {
        self.lease
            .id()
            .ok_or(AgentError::NotReady("the agent has no lease yet"))
    }

    /// The leader key as last read, if `node` holds it.
    fn held_by(&self, node: &NodeId) -> Result<Leader, AgentError> {
        self.snapshot
            .as_ref()
            .and_then(|s| s.leader.clone())
            .filter(|l| &l.node == node)
            .ok_or(AgentError::NotReady("the leader key changed"))
    }

    fn endpoint(&self, node: &NodeId) -> Result<Endpoint, AgentError> {
        let n = self
            .config
            .node(node.as_str())
            .ok_or_else(|| AgentError::UnknownNode(node.to_string()))?;
        Ok(Endpoint {
            host: n.host.clone(),
            port: n.port,
        })
    }

    async fn checkpoint_on(&self, node: &Endpoint) -> Result<(), AgentError> {
        let spec = super::superuser(&self.config, &node.host, node.port, Duration::from_secs(5));
        let client = sql::connect(&spec).await?;
        tokio::time::timeout(Duration::from_secs(120), client.batch_execute("CHECKPOINT"))
            .await
            .map_err(|_| {
                AgentError::Sql(format!(
                    "CHECKPOINT on {} took longer than 120s",
                    spec.addr()
                ))
            })?
            .map_err(|e| AgentError::Sql(format!("CHECKPOINT on {}: {e}", spec.addr())))
    }

    fn replication_password(&self) -> String {
        self.config
            .postgres
            .replication_password
            .as_ref()
            .map(|s| s.expose().to_string())
            .unwrap_or_default()
    }

    fn follow(&mut self, upstream: &NodeId) -> Result<(), AgentError> {
        let ep = self.endpoint(upstream)?;
        let pw = self.replication_password();
        let login = ReplicationLogin {
            user: &self.config.postgres.replication_user,
            password: &pw,
        };
        self.instance.follow(&ep, &login, self.id.as_str())?;
        self.mem.upstream = Some(upstream.clone());
        Ok(())
    }

    fn start(&mut self) -> Result<(), AgentError> {
        self.instance
            .configure(&self.pg_settings(), &self.config.postgres.replication_user)?;
        self.postmaster = Some(self.instance.spawn()?);
        self.mem.starting = true;
        Ok(())
    }

    async fn stop_cleanly(&mut self) {
        if let Some(pm) = self.postmaster.as_mut() {
            pm.stop(StopMode::Fast, Duration::from_secs(10)).await;
        }
        self.postmaster = None;
        self.client = None;
    }

    /// Slots for the other members first (so they can stream the moment they repoint), the
    /// synchronous standbys named before the first write in synchronous mode, then promote.
    async fn promote(&mut self) -> Result<(), AgentError> {
        self.ensure_slots().await?;
        self.name_sync_standbys().await?;
        let received = self
            .query(
                "SELECT greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text",
                &[],
            )
            .await?
            .first()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|l| l.parse().ok());
        // pg_promote(wait) checks every 100 ms; asked without waiting, the end of recovery is
        // seen within PROMOTE_POLL.
        self.query("SELECT pg_promote(false)", &[]).await?;
        let deadline = std::time::Instant::now() + PROMOTE_WAIT;
        loop {
            let rows = self.query("SELECT pg_is_in_recovery()", &[]).await?;
            if rows.first().is_some_and(|r| !r.get::<_, bool>(0)) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(AgentError::Sql(format!(
                    "the promotion did not finish within {}",
                    pgwarden_core::format_duration(PROMOTE_WAIT)
                )));
            }
            tokio::time::sleep(PROMOTE_POLL).await;
        }
        self.mem.upstream = None;
        self.mem.promoted = Some((switchover::unix_ms(), received));
        // A restart of it as a standby earlier is no outage of the leader's.
        self.mem.recovered = None;
        let epoch = self
            .took
            .as_ref()
            .or(self.snapshot.as_ref().and_then(|s| s.leader.as_ref()))
            .map(|l| l.epoch);
        tracing::info!(node = %self.id, epoch = ?epoch, "promoted");
        Ok(())
    }

    /// Synchronous mode, before a promotion: the standbys it will wait for from its first
    /// write, in effect (reloaded) unless they already are. A reload right before the promotion
    /// can cost it up to `wal_retrieve_retry_interval` (the startup process, woken by the
    /// reload, sleeps again before it sees the promotion), so a switchover's target does it
    /// while the leader drains.
    async fn name_sync_standbys(&mut self) -> Result<(), AgentError> {
        if self.rules.synchronous_mode == SyncMode::Off {
            return Ok(());
        }
        let previous = self
            .snapshot
            .as_ref()
            .and_then(|s| s.last_leader.as_ref())
            .map(|l| l.node.clone());
        let want = self.configured_sync_standbys(previous.as_ref());
        if want == self.mem.sync_applied {
            return Ok(());
        }
        let before = std::mem::replace(&mut self.mem.sync_applied, want);
        let applied = async {
            self.instance
                .configure(&self.pg_settings(), &self.config.postgres.replication_user)?;
            self.query("SELECT pg_reload_conf()", &[]).await.map(|_| ())
        }
        .await;
        if applied.is_err() {
            self.mem.sync_applied = before;
        }
        applied
    }

    /// Synchronous mode: a standby of `leader` names, in advance, the standbys it would wait
    /// for if it were promoted when `leader` is gone (a standby ignores the setting). Its
    /// promotion then needs no reload. Takes effect at the caller's start or reload.
    fn name_sync_standbys_as_standby_of(&mut self, leader: &NodeId) {
        if self.rules.synchronous_mode != SyncMode::Off {
            self.mem.sync_applied = self.configured_sync_standbys(Some(leader));
        }
    }

    /// The leader's round: roles and slots once, its position every round, synchronous
    /// standbys kept in step with the healthy members.
    async fn lead(&mut self) -> Result<(), AgentError> {
        let held = self.held_by(&self.id.clone())?;
        let led_before = self.mem.slots_for == Some(held.epoch);
        if self.mem.slots_for != Some(held.epoch) {
            self.ensure_slots().await?;
            self.mem.slots_for = Some(held.epoch);
        }
        if !self.mem.roles_ready {
            self.ensure_roles().await?;
            self.mem.roles_ready = true;
            // Published next round, which waiting clones need: make it soon.
            self.mem.soon = true;
        }
        let rows = self
            .query(
                "SELECT pg_current_wal_lsn()::text, \
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                &[],
            )
            .await?;
        let position = rows
            .first()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)));
        self.record_outage(
            &held,
            led_before,
            position.as_ref().map(|(_, tl)| *tl as u32),
        )
        .await;
        if let Some((lsn, timeline)) = position {
            if let Ok(lsn) = lsn.parse() {
                self.store
                    .put_last_leader(&held, lsn, timeline as u32)
                    .await?;
            }
        }
        if self.rules.synchronous_mode != SyncMode::Off {
            self.manage_sync(&held).await?;
        }
        Ok(())
    }

    /// History: a promotion that was not a switchover's is a failover from the last leader
    /// the store recorded; a restart of this leader's PostgreSQL under the same epoch is a
    /// restart. (A switchover is recorded when it is finished.) A failed write of the event is
    /// logged, not retried: history is not worth a round.
    async fn record_outage(&mut self, held: &Leader, led_before: bool, timeline: Option<u32>) {
        let now = switchover::unix_ms();
        let snap = self.snapshot.as_ref();
        let event = if let Some((at, received)) = self.mem.promoted.take() {
            let switching = snap
                .and_then(|s| s.switchover.as_ref())
                .is_some_and(|s| s.value.to == self.id.as_str() && !s.value.phase.is_over());
            let last = snap
                .and_then(|s| s.last_leader.clone())
                .filter(|l| l.node != self.id);
            (!switching).then(|| Event {
                kind: EventKind::Failover,
                detected_ms: self.mem.took_ms.take(),
                promoted_ms: Some(at),
                down_ms: last
                    .as_ref()
                    .map_or(at, |l| if l.at_ms > 0 { l.at_ms } else { at }),
                up_ms: now,
                from: last.as_ref().map(|l| l.node.to_string()),
                to: self.id.to_string(),
                epoch: held.epoch.0,
                timeline,
                lost_bytes: last
                    .as_ref()
                    .zip(received)
                    .map(|(l, r)| l.lsn.bytes_since(r)),
            })
        } else if let Some(since) = self.mem.recovered.take() {
            // Only a leader that led under this epoch before (not a first start).
            led_before.then(|| Event {
                kind: EventKind::Restart,
                detected_ms: None,
                promoted_ms: None,
                down_ms: now.saturating_sub(since.elapsed().as_millis() as u64),
                up_ms: now,
                from: Some(self.id.to_string()),
                to: self.id.to_string(),
                epoch: held.epoch.0,
                timeline,
                lost_bytes: Some(0),
            })
        } else {
            None
        };
        if let Some(e) = event {
            tracing::info!(node = %self.id, kind = ?e.kind, down_ms = e.duration_ms(), "recording the outage in the history");
            if let Err(err) = self.store.put_event(held, &e).await {
                tracing::warn!(node = %self.id, error = %err, "cannot record the outage in the history");
            }
        }
    }

    /// Every node's name but this one's.
    fn other_nodes(&self) -> Vec<String> {
        self.config
            .nodes
            .iter()
            .filter(|n| n.name != self.me.name)
            .map(|n| n.name.clone())
            .collect()
    }

    async fn ensure_slots(&mut self) -> Result<(), AgentError> {
        for slot in self.other_nodes() {
            self.query(
                "SELECT pg_create_physical_replication_slot($1, true) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await?;
        }
        Ok(())
    }

    async fn ensure_roles(&mut self) -> Result<(), AgentError> {
        let pg = &self.config.postgres;
        let Some(pw) = pg.replication_password.clone() else {
            return Ok(());
        };
        let user = pg.replication_user.clone();
        let spec = super::superuser(
            &self.config,
            &self.me.host,
            self.me.port,
            Duration::from_secs(5),
        );
        let client = sql::connect(&spec).await?;
        sql::ensure_role(&client, &spec.addr(), &user, pw.expose(), "REPLICATION").await?;
        Ok(())
    }

    async fn manage_sync(&mut self, held: &Leader) -> Result<(), AgentError> {
        let rows = self
            .query(
                "SELECT application_name, sync_state FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await?;
        let streaming: Vec<Streaming> = rows
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let state: String = r.get(1);
                let n = self.config.node(&name)?;
                Some(Streaming {
                    node: NodeId::new(&name),
                    priority: n.priority,
                    nosync: n.nosync,
                    synchronous: state == "sync",
                })
            })
            .collect();
        let count = self.config.replication.sync_count;
        let mut want = sync::wanted(
            self.rules.synchronous_mode,
            count,
            &self.mem.sync_applied,
            &streaming,
        );
        if self.rules.synchronous_mode == SyncMode::Strict {
            // Strict: never fewer than sync_count named, healthy or not, so writes wait.
            for n in self.configured_sync_standbys_all() {
                if want.len() >= count as usize {
                    break;
                }
                if !want.contains(&n) {
                    want.push(n);
                }
            }
        }
        let recorded = self
            .snapshot
            .as_ref()
            .and_then(|s| s.synchronous_set.clone())
            .unwrap_or_default();
        match sync::next_step(&recorded, &self.mem.sync_applied, &want, &streaming) {
            None => {}
            Some(SyncStep::Record(set)) => {
                tracing::info!(node = %self.id, set = ?set, "recording the synchronous set");
                self.store.put_synchronous_set(held, &set).await?;
            }
            Some(SyncStep::Apply(set)) => {
                tracing::info!(node = %self.id, standbys = ?set, "naming the synchronous standbys");
                self.mem.sync_applied = set;
                self.instance
                    .configure(&self.pg_settings(), &self.config.postgres.replication_user)?;
                self.query("SELECT pg_reload_conf()", &[]).await?;
            }
        }
        Ok(())
    }

    /// Before the first promotion's write: the best `sync_count` other members by priority
    /// (no member has reported yet; strict mode must not take a write unprotected).
    /// `previous` (the leader before this node's promotion) comes last: it is stopped (a
    /// switchover) or gone (a failover), so naming it would hold the first commits until it
    /// is back as a standby.
    fn configured_sync_standbys(&self, previous: Option<&NodeId>) -> Vec<NodeId> {
        let mut all = self.configured_sync_standbys_all();
        // A stable sort: the others keep their order by priority and name.
        all.sort_by_key(|n| Some(n) == previous);
        all.truncate(self.config.replication.sync_count as usize);
        all
    }

    /// Every other member that may be synchronous, by priority then name.
    fn configured_sync_standbys_all(&self) -> Vec<NodeId> {
        let mut others: Vec<_> = self
            .config
            .nodes
            .iter()
            .filter(|n| n.name != self.me.name && !n.nosync)
            .collect();
        others.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
        others.iter().map(|n| NodeId::new(&n.name)).collect()
    }

    fn static_sync_standbys(&self) -> SyncStandbys {
        let others = self.other_nodes();
        let k = self.config.replication.sync_count;
        match self.config.replication.mode {
            _ if others.is_empty() => SyncStandbys::None,
            pgwarden_config::ReplicationMode::Async => SyncStandbys::None,
            pgwarden_config::ReplicationMode::Sync => SyncStandbys::First(k, others),
            pgwarden_config::ReplicationMode::Quorum => SyncStandbys::Any(k, others),
        }
    }

    /// `pgwarden.conf` for this cluster, with the synchronous standbys this agent named.
    pub(super) fn pg_settings(&self) -> Settings {
        let senders = (self.config.nodes.len() as u32 * 2 + 2).max(10);
        let names: Vec<String> = self
            .mem
            .sync_applied
            .iter()
            .map(|n| n.to_string())
            .collect();
        let k = self.config.replication.sync_count;
        let sync = match (self.rules.synchronous_mode, names.is_empty()) {
            // Not managed: `replication.mode` names every other node, as a cluster without
            // agents would (PostgreSQL waits for them; promotion is not restricted to them).
            (SyncMode::Off, _) => self.static_sync_standbys(),
            (_, true) => SyncStandbys::None,
            (SyncMode::Strict, false) => SyncStandbys::First(k, names),
            // FIRST k with exactly the named ones: each of them holds every acknowledged
            // commit, which is what the recorded set promises (ANY k would not).
            (SyncMode::On, false) => SyncStandbys::First(k.min(names.len() as u32), names),
        };
        Settings {
            max_wal_senders: senders,
            max_replication_slots: senders,
            sync,
            parameters: self.config.postgres.parameters.clone(),
            ..Settings::default()
        }
    }
}

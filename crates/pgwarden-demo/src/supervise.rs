//! Watching the cluster in the foreground: what changes is printed as it happens (a server
//! that stops, a leader that changes), and when the cluster heals, how long it took.

use std::time::{Duration, Instant};

use pgwarden_dcs::Snapshot;
use pgwarden_ha::MemberState;
use tokio::signal::unix::{signal, SignalKind};

use crate::bootstrap::{Agents, Store};
use crate::DemoError;

const TICK: Duration = Duration::from_millis(100);

/// An agent process that exited is started again after this long (its node then rejoins).
const RESTART_AFTER: Duration = Duration::from_secs(5);

/// A receiver that turns true on the first SIGINT or SIGTERM.
pub fn stop_signal() -> Result<tokio::sync::watch::Receiver<bool>, DemoError> {
    let mut term = signal(SignalKind::terminate()).map_err(DemoError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DemoError::Signals)?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the cluster"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the cluster"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Reports changes until `stop`; restarts agent processes that exit.
pub async fn supervise(
    store: &Store,
    agents: &mut Agents,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), DemoError> {
    let mut tick = tokio::time::interval(TICK);
    let mut watcher = Watcher::default();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = tick.tick() => {
                if let Ok(s) = store.snapshot().await {
                    let reachable = leader_reachable(&s).await;
                    for line in watcher.see(s, reachable, Instant::now()) {
                        println!("{line}");
                    }
                }
                for line in agents.check(RESTART_AFTER) {
                    println!("{line}");
                }
            }
        }
    }
}

/// What changed between two snapshots, as lines for a person.
#[derive(Default)]
pub struct Watcher {
    last: Option<Snapshot<MemberState>>,
    /// Since when the cluster has had no writable leader, and why.
    broken: Option<(Instant, String)>,
}

impl Watcher {
    /// `reachable`: the leader's PostgreSQL port took a connection just now.
    pub fn see(&mut self, s: Snapshot<MemberState>, reachable: bool, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(last) = &self.last {
            for m in &s.members {
                match last.members.iter().find(|o| o.node == m.node) {
                    Some(o) if o.state.state != m.state.state => out.push(format!(
                        "{}: postgres {} (was {}){}",
                        m.node,
                        m.state.state,
                        o.state.state,
                        m.state
                            .reason
                            .as_ref()
                            .map_or(String::new(), |r| format!(": {r}"))
                    )),
                    Some(o) if o.state.role != m.state.role => out.push(format!(
                        "{}: now {} (was {})",
                        m.node, m.state.role, o.state.role
                    )),
                    Some(_) => {}
                    None => out.push(format!("{}: agent joined ({})", m.node, m.state.role)),
                }
            }
            for o in &last.members {
                if !s.members.iter().any(|m| m.node == o.node) {
                    out.push(format!("{}: agent gone (its member key expired)", o.node));
                }
            }
            if last.paused != s.paused {
                out.push(if s.paused {
                    "paused: the agents take no automatic action until pgwarden resume".to_string()
                } else {
                    "resumed: the agents act again".to_string()
                });
            }
            let stage = |x: &Snapshot<MemberState>| {
                x.switchover
                    .as_ref()
                    .map(|w| (w.value.requested_ms, w.value.phase))
            };
            if stage(last) != stage(&s) {
                if let Some(w) = s.switchover.as_ref().map(|w| &w.value) {
                    let phase = w.phase.name();
                    let detail = match (w.write_gap_ms(), &w.note) {
                        (Some(ms), _) => format!(", writes held {ms} ms"),
                        (None, Some(note)) => format!(": {note}"),
                        (None, None) => String::new(),
                    };
                    out.push(format!(
                        "switchover {} -> {}: {phase}{detail}",
                        w.from, w.to
                    ));
                }
            }
            let (was, is) = (last.leader.as_ref(), s.leader.as_ref());
            if was.map(|l| (&l.node, l.epoch)) != is.map(|l| (&l.node, l.epoch)) {
                out.push(match is {
                    Some(l) => format!("leader: {} (epoch {})", l.node, l.epoch),
                    None => "leader: none (the leader key is free)".to_string(),
                });
            }
        }
        let healthy = s.leader.as_ref().filter(|_| reachable).and_then(|l| {
            s.members
                .iter()
                .find(|m| m.node == l.node && m.state.primary && m.state.epoch == Some(l.epoch.0))
                .map(|_| (l.node.clone(), l.epoch))
        });
        match (&self.broken, healthy) {
            (None, None) if self.last.is_some() => {
                self.broken = Some((now, "no writable leader".into()));
            }
            (Some((since, _)), Some((node, epoch))) => {
                out.push(format!(
                    "healed in {:.1}s: {node} takes writes (epoch {epoch})",
                    (now - *since).as_secs_f64()
                ));
                self.broken = None;
            }
            _ => {}
        }
        self.last = Some(s);
        out
    }
}

/// Whether the leader's PostgreSQL port takes a TCP connection (a dead node's member key
/// outlives it by up to the lease: this sees the death at once).
async fn leader_reachable(s: &Snapshot<MemberState>) -> bool {
    let Some(m) = s
        .leader
        .as_ref()
        .and_then(|l| s.members.iter().find(|m| m.node == l.node))
    else {
        return false;
    };
    let addr = (m.state.host.as_str(), m.state.port);
    matches!(
        tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(
        paused: bool,
        phase: Option<pgwarden_dcs::SwitchoverPhase>,
    ) -> Snapshot<MemberState> {
        Snapshot {
            paused,
            switchover: phase.map(|p| pgwarden_dcs::StoredSwitchover {
                value: pgwarden_dcs::Switchover {
                    phase: p,
                    draining_ms: Some(1000),
                    finished_ms: Some(1450),
                    ..pgwarden_dcs::Switchover::requested(
                        1,
                        &pgwarden_core::NodeId::new("n1"),
                        &pgwarden_core::NodeId::new("n2"),
                        None,
                        2000,
                    )
                },
                revision: 1,
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_demo_says_when_the_cluster_is_paused_and_how_a_switchover_goes() {
        use pgwarden_dcs::SwitchoverPhase::*;
        let mut w = Watcher::default();
        let now = Instant::now();
        w.see(snapshot(false, None), true, now);
        let lines = w.see(snapshot(true, None), true, now);
        assert!(lines.iter().any(|l| l.starts_with("paused:")), "{lines:?}");
        let lines = w.see(snapshot(false, Some(Draining)), true, now);
        assert!(
            lines.iter().any(|l| l == "resumed: the agents act again"),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l == "switchover n1 -> n2: draining"),
            "{lines:?}"
        );
        let lines = w.see(snapshot(false, Some(Done)), true, now);
        assert!(
            lines
                .iter()
                .any(|l| l == "switchover n1 -> n2: done, writes held 450 ms"),
            "{lines:?}"
        );
        assert!(
            w.see(snapshot(false, Some(Done)), true, now).is_empty(),
            "nothing new"
        );
    }
}

//! Managed synchronous replication: which standbys the leader names in
//! `synchronous_standby_names` (`FIRST k (...)`), and the order in which that and the recorded
//! synchronous set change so that every member of the recorded set holds every acknowledged
//! commit at all times.
//!
//! - A member joins the recorded set only after PostgreSQL reports it synchronous (it then
//!   holds every commit acknowledged since it was named, and all WAL before).
//! - A member leaves the recorded set before it is dropped from `synchronous_standby_names`
//!   (commits acknowledged after that need not be on it).
//!
//! The failover rule in [`crate::candidates`] promotes only members of the recorded set, so
//! no acknowledged commit is lost by an automatic action.

use pgwarden_core::NodeId;

use crate::decide::SyncMode;

/// A standby the leader sees in `pg_stat_replication`, streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streaming {
    pub node: NodeId,
    pub priority: u32,
    /// Tagged `nosync`: never named.
    pub nosync: bool,
    /// `sync_state` is `sync` (it confirms commits now).
    pub synchronous: bool,
}

/// The next change, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncStep {
    /// Write this set to the store (guarded by the leader key).
    Record(Vec<NodeId>),
    /// Set `synchronous_standby_names` to these (in order) and reload.
    Apply(Vec<NodeId>),
}

/// Which standbys should be synchronous: the `count` best healthy ones by priority, then name.
/// In strict mode a named standby that is not healthy stays named while fewer than `count`
/// healthy ones are available, so writes wait rather than go on unprotected.
pub fn wanted(
    mode: SyncMode,
    count: u32,
    applied: &[NodeId],
    streaming: &[Streaming],
) -> Vec<NodeId> {
    if mode == SyncMode::Off {
        return Vec::new();
    }
    let mut healthy: Vec<&Streaming> = streaming.iter().filter(|s| !s.nosync).collect();
    // Already named first among equals, so a standby is not swapped for an equal one.
    healthy.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(applied.contains(&b.node).cmp(&applied.contains(&a.node)))
            .then(a.node.cmp(&b.node))
    });
    let count = count as usize;
    let mut want: Vec<NodeId> = healthy.iter().take(count).map(|s| s.node.clone()).collect();
    if mode == SyncMode::Strict {
        for n in applied {
            if want.len() >= count {
                break;
            }
            if !want.contains(n) {
                want.push(n.clone());
            }
        }
    }
    want
}

/// The next step from the recorded set and what PostgreSQL has applied towards `want`;
/// `None` when all three agree.
pub fn next_step(
    recorded: &[NodeId],
    applied: &[NodeId],
    want: &[NodeId],
    streaming: &[Streaming],
) -> Option<SyncStep> {
    // Narrow the recorded set before anyone is dropped from the applied one.
    if recorded.iter().any(|n| !want.contains(n)) {
        return Some(SyncStep::Record(
            recorded
                .iter()
                .filter(|n| want.contains(n))
                .cloned()
                .collect(),
        ));
    }
    if applied != want {
        return Some(SyncStep::Apply(want.to_vec()));
    }
    // Widen only with members PostgreSQL reports synchronous.
    let confirmed: Vec<NodeId> = want
        .iter()
        .filter(|n| {
            recorded.contains(n) || streaming.iter().any(|s| &s.node == *n && s.synchronous)
        })
        .cloned()
        .collect();
    (confirmed.len() != recorded.len()).then_some(SyncStep::Record(confirmed))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ids = Vec<NodeId>;
    /// What, mode, count, applied, streaming, wanted.
    type WantCase = (&'static str, SyncMode, u32, Ids, Vec<Streaming>, Ids);
    /// What, [recorded, applied, wanted], streaming, the next step.
    type StepCase = (&'static str, [Ids; 3], Vec<Streaming>, Option<SyncStep>);

    fn ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|n| NodeId::new(n)).collect()
    }

    fn st(name: &str, priority: u32, synchronous: bool) -> Streaming {
        Streaming {
            node: NodeId::new(name),
            priority,
            nosync: false,
            synchronous,
        }
    }

    #[test]
    fn who_is_named() {
        let nosync = Streaming {
            nosync: true,
            ..st("n2", 9, false)
        };
        #[rustfmt::skip]
        let cases: Vec<WantCase> = vec![
            ("off names nobody", SyncMode::Off, 1, ids(&["n2"]), vec![st("n2", 1, true)], ids(&[])),
            ("the best by priority", SyncMode::On, 1, ids(&[]), vec![st("n2", 1, false), st("n3", 5, false)], ids(&["n3"])),
            ("then by name", SyncMode::On, 1, ids(&[]), vec![st("n3", 1, false), st("n2", 1, false)], ids(&["n2"])),
            ("an equal one is not swapped in", SyncMode::On, 1, ids(&["n3"]), vec![st("n2", 1, false), st("n3", 1, true)], ids(&["n3"])),
            ("nosync never", SyncMode::On, 1, ids(&[]), vec![nosync.clone(), st("n3", 1, false)], ids(&["n3"])),
            ("on: a dead one is dropped", SyncMode::On, 1, ids(&["n2"]), vec![], ids(&[])),
            ("on: two wanted, one healthy", SyncMode::On, 2, ids(&["n2", "n3"]), vec![st("n3", 1, true)], ids(&["n3"])),
            ("strict: a dead one stays named", SyncMode::Strict, 1, ids(&["n2"]), vec![], ids(&["n2"])),
            ("strict: a healthy one replaces it only up to the count", SyncMode::Strict, 2, ids(&["n2", "n3"]), vec![st("n4", 1, false), st("n3", 1, true)], ids(&["n3", "n4"])),
            ("strict: only nosync left, the dead one stays", SyncMode::Strict, 1, ids(&["n3"]), vec![nosync], ids(&["n3"])),
        ];
        for (what, mode, count, applied, streaming, want) in cases {
            assert_eq!(wanted(mode, count, &applied, &streaming), want, "{what}");
        }
    }

    #[test]
    fn changes_come_in_a_safe_order() {
        let sync = |n: &str| st(n, 1, true);
        let asyn = |n: &str| st(n, 1, false);
        #[rustfmt::skip]
        let cases: Vec<StepCase> = vec![
            ("settled", [ids(&["n2"]), ids(&["n2"]), ids(&["n2"])], vec![sync("n2")], None),
            ("a new one is named first", [ids(&[]), ids(&[]), ids(&["n2"])], vec![asyn("n2")], Some(SyncStep::Apply(ids(&["n2"])))),
            ("named but not yet synchronous: not recorded", [ids(&[]), ids(&["n2"]), ids(&["n2"])], vec![asyn("n2")], None),
            ("recorded once synchronous", [ids(&[]), ids(&["n2"]), ids(&["n2"])], vec![sync("n2")], Some(SyncStep::Record(ids(&["n2"])))),
            ("a dead one leaves the record before it is unnamed", [ids(&["n2"]), ids(&["n2"]), ids(&[])], vec![], Some(SyncStep::Record(ids(&[])))),
            ("then it is unnamed", [ids(&[]), ids(&["n2"]), ids(&[])], vec![], Some(SyncStep::Apply(ids(&[])))),
            ("a swap: narrow first", [ids(&["n2"]), ids(&["n2"]), ids(&["n3"])], vec![asyn("n3")], Some(SyncStep::Record(ids(&[])))),
            ("a swap: then name", [ids(&[]), ids(&["n2"]), ids(&["n3"])], vec![asyn("n3")], Some(SyncStep::Apply(ids(&["n3"])))),
            ("a swap: then record", [ids(&[]), ids(&["n3"]), ids(&["n3"])], vec![sync("n3")], Some(SyncStep::Record(ids(&["n3"])))),
            ("two: the confirmed one is recorded alone", [ids(&[]), ids(&["n2", "n3"]), ids(&["n2", "n3"])], vec![sync("n2"), asyn("n3")], Some(SyncStep::Record(ids(&["n2"])))),
            ("strict keeps a dead recorded one", [ids(&["n2"]), ids(&["n2"]), ids(&["n2"])], vec![], None),
        ];
        for (what, [recorded, applied, want], streaming, step) in cases {
            assert_eq!(
                next_step(&recorded, &applied, &want, &streaming),
                step,
                "{what}"
            );
        }
    }

    /// Walks every step from one set to another and checks the invariant after each: every
    /// recorded member is applied and confirmed synchronous (so it holds every acknowledged
    /// commit), and a member is never unnamed while recorded.
    #[test]
    fn the_recorded_set_is_always_safe() {
        for (from, to) in [
            (ids(&["n2"]), ids(&["n3"])),
            (ids(&["n2", "n3"]), ids(&["n4"])),
            (ids(&[]), ids(&["n2", "n3"])),
            (ids(&["n2", "n3"]), ids(&[])),
        ] {
            let (mut recorded, mut applied) = (from.clone(), from.clone());
            for _ in 0..10 {
                // Named members become synchronous one round after they are named.
                let streaming: Vec<Streaming> = to
                    .iter()
                    .map(|n| st(n.as_str(), 1, applied.contains(n)))
                    .collect();
                match next_step(&recorded, &applied, &to, &streaming) {
                    None => break,
                    Some(SyncStep::Record(r)) => recorded = r,
                    Some(SyncStep::Apply(a)) => applied = a,
                }
                assert!(
                    recorded.iter().all(|n| applied.contains(n)),
                    "{from:?} -> {to:?}: recorded {recorded:?} not all applied {applied:?}"
                );
            }
            assert_eq!(
                (&recorded, &applied),
                (&to, &to),
                "{from:?} -> {to:?} settles"
            );
        }
    }
}

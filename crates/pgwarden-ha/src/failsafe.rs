//! Failsafe mode (`agent.failsafe = true`): when the store cannot be reached, a healthy leader
//! keeps its primary instead of fencing it, as long as every other member confirms over the
//! API, each round, that it cannot reach the store either and does not lead.
//!
//! Why it is safe:
//! - The leader counts a confirmation from the time it *sent* the request, and fences, as
//!   always, `ttl - fence_margin` after its last renewal or confirmation.
//! - A member that confirmed takes no leader key and promotes nothing for `ttl` from its answer,
//!   which came after the request was sent. So nobody else can lead before the leader fences,
//!   even if the store comes back to the others first.
//! - A member that can reach the store, does not answer, or runs a primary, does not confirm.
//!   The leader then fences at its ordinary deadline: any doubt gives the safe behaviour.
//!
//! The proxy, when it cannot read the store either, asks the leader it knew (`GET
//! /failsafe`) whether it still leads in failsafe, and until when it may take writes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgwarden_core::NodeId;

/// What this member confirmed last: to which leader, when.
#[derive(Debug, Default)]
pub struct Acks {
    last: Mutex<Option<(NodeId, Instant)>>,
}

impl Acks {
    pub fn record(&self, leader: NodeId) {
        *self.lock() = Some((leader, Instant::now()));
    }

    /// The leader confirmed within `within`, if any.
    pub fn fresh(&self, within: Duration) -> Option<NodeId> {
        self.lock()
            .as_ref()
            .filter(|(_, at)| at.elapsed() < within)
            .map(|(n, _)| n.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(NodeId, Instant)>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether this member may confirm a failsafe leader: its own last round could not read the
/// store, and its PostgreSQL is not a primary.
pub fn may_confirm(store_reachable: bool, runs_primary: bool) -> bool {
    !store_reachable && !runs_primary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_confirms_only_without_the_store_and_without_a_primary() {
        assert!(may_confirm(false, false));
        assert!(
            !may_confirm(true, false),
            "it reaches the store: the leader must fence"
        );
        assert!(!may_confirm(false, true), "it runs a primary itself");
        let acks = Acks::default();
        assert_eq!(acks.fresh(Duration::from_secs(7)), None);
        acks.record(NodeId::new("n1"));
        assert_eq!(acks.fresh(Duration::from_secs(7)), Some(NodeId::new("n1")));
        assert_eq!(acks.fresh(Duration::ZERO), None);
    }
}

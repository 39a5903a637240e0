//! The proxy's reading of its view source: the latest [`ClusterView`], whether it is fresh, and
//! a generation number that changes whenever what routing and fencing depend on changes (the
//! leader, the epoch, a node's role or address, freshness). A task follows the source; sessions
//! read the generation with one atomic load and wait on it with a [`ViewWatch`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use pgwarden_cluster::view::ClusterView;
use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// What routing decides on: a view and whether it is too old to trust.
#[derive(Debug)]
pub struct Routing {
    pub generation: u64,
    pub view: Arc<ClusterView>,
    /// The source has been silent for longer than `proxy.max_view_age`: writes are refused.
    pub stale: Option<Duration>,
    /// The view's `writes_hold_from` has passed: the leader's lease is running out unrenewed
    /// and it may fence itself any moment. New transactions wait (running ones go on).
    pub lease_ending: bool,
}

struct Inner {
    current: RwLock<Arc<Routing>>,
    /// The latest view, lag and positions included (changes every round without a new
    /// generation).
    latest: RwLock<Arc<ClusterView>>,
    generation: AtomicU64,
    changed: Notify,
}

#[derive(Clone)]
pub struct Topology {
    inner: Arc<Inner>,
}

impl Topology {
    /// Follows the views `rx` brings, on the current runtime, until every handle is dropped.
    /// A view counts as stale once no new one has come for `max_age`.
    pub fn new(mut rx: watch::Receiver<Arc<ClusterView>>, max_age: Duration) -> Self {
        let first = rx.borrow_and_update().clone();
        let first_hold = first.writes_hold_from;
        let inner = Arc::new(Inner {
            current: RwLock::new(Arc::new(Routing {
                generation: 1,
                lease_ending: lease_ending(&first),
                view: first.clone(),
                stale: None,
            })),
            latest: RwLock::new(first),
            generation: AtomicU64::new(1),
            changed: Notify::new(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut heard = Instant::now();
            let mut stale = false;
            let mut hold_from = first_hold;
            loop {
                let silence = async {
                    if stale {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep_until(heard + max_age).await;
                };
                // The moment the current view's leader may start fencing itself, if still ahead.
                let hold = async {
                    match hold_from {
                        Some(t) if Instant::from_std(t) > Instant::now() => {
                            tokio::time::sleep_until(Instant::from_std(t)).await
                        }
                        _ => std::future::pending::<()>().await,
                    }
                };
                let event = tokio::select! {
                    r = rx.changed() => Event::View(r.is_ok().then(|| rx.borrow_and_update().clone())),
                    _ = silence => Event::Silence,
                    _ = hold => Event::Hold,
                };
                let Some(inner) = weak.upgrade() else { return };
                match event {
                    Event::View(Some(view)) => {
                        (heard, stale) = (Instant::now(), false);
                        hold_from = view.writes_hold_from;
                        inner.publish(view, None);
                    }
                    Event::Hold => {
                        let view = inner.latest.read().expect("view lock").clone();
                        inner.publish(view, stale.then(|| heard.elapsed()));
                    }
                    Event::Silence if !stale && heard.elapsed() >= max_age => {
                        stale = true;
                        let view = inner.latest.read().expect("view lock").clone();
                        inner.publish(view, Some(heard.elapsed()));
                    }
                    Event::Silence => {}
                    Event::View(None) => {
                        // The source is gone: the view goes stale at its bound, then stays so.
                        drop(inner);
                        if !stale {
                            tokio::time::sleep_until(heard + max_age).await;
                            if let Some(inner) = weak.upgrade() {
                                let view = inner.latest.read().expect("view lock").clone();
                                inner.publish(view, Some(heard.elapsed()));
                            }
                        }
                        return;
                    }
                }
            }
        });
        Topology { inner }
    }

    /// The current generation (one atomic load).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// What routing decides on now.
    pub fn routing(&self) -> Arc<Routing> {
        self.inner.current.read().expect("routing lock").clone()
    }

    /// The latest view, with this round's positions and lag.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.latest.read().expect("view lock").clone()
    }

    /// Completes when the generation is no longer `seen`.
    pub fn watch(&self, seen: u64) -> ViewWatch<'_> {
        ViewWatch {
            inner: &self.inner,
            seen,
            notified: Box::pin(self.inner.changed.notified()),
            armed_at: None,
        }
    }
}

/// Whether two views route the same: same leader, epoch and nodes (names, addresses, roles).
fn routes_alike(a: &ClusterView, b: &ClusterView) -> bool {
    a.leader == b.leader
        && a.epoch == b.epoch
        && a.refused == b.refused
        && a.nodes.len() == b.nodes.len()
        && a.nodes
            .iter()
            .zip(&b.nodes)
            .all(|(x, y)| x.id == y.id && x.host == y.host && x.port == y.port && x.role == y.role)
}

/// What woke the follower.
enum Event {
    /// A new view, or `None`: the source is gone.
    View(Option<Arc<ClusterView>>),
    /// Nothing heard for the bound.
    Silence,
    /// The view's `writes_hold_from` came.
    Hold,
}

/// Whether `view`'s leader may be fencing itself now (by the runtime's clock, as the timer).
fn lease_ending(view: &ClusterView) -> bool {
    view.writes_hold_from
        .is_some_and(|t| Instant::now() >= Instant::from_std(t))
}

impl Inner {
    fn publish(&self, view: Arc<ClusterView>, stale: Option<Duration>) {
        *self.latest.write().expect("view lock") = view.clone();
        let ending = lease_ending(&view);
        let mut current = self.current.write().expect("routing lock");
        let same = routes_alike(&current.view, &view)
            && current.stale.is_some() == stale.is_some()
            && current.lease_ending == ending;
        if same {
            return;
        }
        if ending && !current.lease_ending {
            tracing::warn!(
                epoch = %view.epoch,
                leader = view.leader.as_ref().map_or("none", |l| l.as_str()),
                "the leader's lease is running out unrenewed: new transactions wait for a renewal or the next leader"
            );
        }
        let generation = current.generation + 1;
        if let Some(age) = stale {
            tracing::warn!(
                epoch = %view.epoch,
                silent = %pgwarden_core::format_duration(age),
                "the cluster view is stale: writes are refused until the view source is heard again"
            );
        }
        *current = Arc::new(Routing {
            generation,
            view,
            stale,
            lease_ending: ending,
        });
        self.generation.store(generation, Ordering::Release);
        drop(current);
        self.changed.notify_waiters();
    }
}

/// A future that completes once the generation differs from the one it was made with; polled
/// again while nothing changed, it costs two atomic loads. Like the kill watch, it must stay
/// in one task.
pub struct ViewWatch<'a> {
    inner: &'a Inner,
    seen: u64,
    notified: Pin<Box<Notified<'a>>>,
    /// The generation when `notified` was registered.
    armed_at: Option<u64>,
}

impl ViewWatch<'_> {
    /// The generation the caller has now acted on.
    pub fn seen(&mut self, generation: u64) {
        self.seen = generation;
    }
}

impl Future for ViewWatch<'_> {
    type Output = u64;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u64> {
        loop {
            // The Notified was made before this load, so a change in between is not missed.
            let g = self.inner.generation.load(Ordering::Acquire);
            if g != self.seen {
                return Poll::Ready(g);
            }
            if self.armed_at == Some(g) {
                return Poll::Pending;
            }
            match self.notified.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let fresh = self.inner.changed.notified();
                    self.notified.set(fresh);
                }
                Poll::Pending => {
                    self.armed_at = Some(g);
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_cluster::status::Role;
    use pgwarden_cluster::view::NodeView;
    use pgwarden_core::{Epoch, NodeId};

    fn view(leader: Option<&str>, epoch: u64) -> Arc<ClusterView> {
        Arc::new(ClusterView {
            epoch: Epoch(epoch),
            leader: leader.map(NodeId::new),
            nodes: vec![NodeView {
                id: NodeId::new("n1"),
                host: "127.0.0.1".into(),
                port: 1,
                role: Role::Primary,
                timeline: Some(1),
                lsn: None,
                replay_lag_bytes: None,
                replay_lag_seconds: None,
                reason: None,
                reason_code: None,
            }],
            ..ClusterView::empty()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn new_transactions_are_held_while_the_leader_lease_runs_out() {
        let holding = |after: Duration| {
            let mut v = (*view(Some("n1"), 1)).clone();
            v.writes_hold_from = Some(Instant::now().into_std() + after);
            Arc::new(v)
        };
        let (tx, rx) = watch::channel(holding(Duration::from_secs(2)));
        let t = Topology::new(rx, Duration::from_secs(60));
        assert!(!t.routing().lease_ending);
        let g1 = t.generation();
        // Nothing renews it: at its instant, a new generation that holds new transactions.
        let g2 = tokio::time::timeout(Duration::from_secs(3), t.watch(g1))
            .await
            .expect("woken at the hold");
        assert!(t.routing().lease_ending);
        // A renewal moves the instant ahead: released at once.
        tx.send(holding(Duration::from_secs(4))).expect("send");
        tokio::time::timeout(Duration::from_secs(1), t.watch(g2))
            .await
            .expect("woken by the renewal");
        assert!(!t.routing().lease_ending);
        assert_eq!(t.routing().view.epoch, Epoch(1));
    }

    #[tokio::test(start_paused = true)]
    async fn generations_change_with_routing_and_freshness_only() {
        let (tx, rx) = watch::channel(view(Some("n1"), 1));
        let t = Topology::new(rx, Duration::from_secs(5));
        let g1 = t.generation();
        let mut w = t.watch(g1);
        // The same routing again (a new round): no new generation.
        tx.send(view(Some("n1"), 1)).expect("send");
        let r = tokio::time::timeout(Duration::from_secs(1), &mut w).await;
        assert!(r.is_err(), "nothing that routing depends on changed");
        // A new epoch: a new generation, and the watch wakes.
        tx.send(view(Some("n1"), 2)).expect("send");
        let g2 = tokio::time::timeout(Duration::from_secs(1), &mut w)
            .await
            .expect("woken");
        assert_ne!(g2, g1);
        assert_eq!(t.routing().view.epoch, Epoch(2));
        assert!(t.routing().stale.is_none());
        // Silence past the bound: stale.
        w.seen(g2);
        let g3 = tokio::time::timeout(Duration::from_secs(10), &mut w)
            .await
            .expect("stale after 5 s");
        assert!(t.routing().stale.is_some());
        // Heard again: fresh.
        w.seen(g3);
        tx.send(view(Some("n1"), 2)).expect("send");
        tokio::time::timeout(Duration::from_secs(1), &mut w)
            .await
            .expect("fresh again");
        assert!(t.routing().stale.is_none());
    }
}

//! Where writes go: the proxy's reading of the monitor's [`ClusterView`]s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgwarden_cluster::monitor::ClusterView;
use tokio::sync::watch;

use crate::error::ProxyError;
use crate::server::Target;

#[derive(Clone)]
pub struct Topology {
    rx: watch::Receiver<Arc<ClusterView>>,
    /// The current view's epoch, kept by a task that follows the views: read on every checkout
    /// and release, so an atomic load instead of the watch channel's lock.
    epoch: Arc<AtomicU64>,
}

impl Topology {
    /// Follows the views `rx` brings (a task on the current runtime keeps the epoch).
    pub fn new(rx: watch::Receiver<Arc<ClusterView>>) -> Self {
        let epoch = Arc::new(AtomicU64::new(rx.borrow().epoch));
        let (mut follow, kept) = (rx.clone(), epoch.clone());
        tokio::spawn(async move {
            while follow.changed().await.is_ok() {
                let e = follow.borrow_and_update().epoch;
                kept.store(e, Ordering::Release);
            }
        });
        Self { rx, epoch }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.rx.borrow().clone()
    }

    /// The primary and the epoch it belongs to, waiting up to `timeout` for one to appear.
    pub async fn wait_primary(&self, timeout: Duration) -> Result<(Target, u64), ProxyError> {
        let mut rx = self.rx.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let view = rx.borrow_and_update();
                if let Some(p) = view.primary() {
                    return Ok((
                        Target {
                            host: p.host.clone(),
                            port: p.port,
                        },
                        view.epoch,
                    ));
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(ProxyError::NoPrimary(timeout)),
            }
        }
    }
}

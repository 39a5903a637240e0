//! Where writes go: the proxy's reading of the monitor's [`ClusterView`]s.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_cluster::monitor::ClusterView;
use tokio::sync::watch;

use crate::error::ProxyError;
use crate::server::Target;

#[derive(Clone)]
pub struct Topology {
    rx: watch::Receiver<Arc<ClusterView>>,
}

impl Topology {
    pub fn new(rx: watch::Receiver<Arc<ClusterView>>) -> Self {
        Self { rx }
    }

    pub fn epoch(&self) -> u64 {
        self.rx.borrow().epoch
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

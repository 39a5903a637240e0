//! The etcd v3 store, for real deployments (`[dcs] endpoints`). Every call is bounded by the
//! timeout it was made with; an unanswered call is [`DcsError::Timeout`], a refused one
//! [`DcsError::Unavailable`], both retryable.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::watch;

use crate::kv::{Compare, Entry, Kv, LeaseId, Op, Revision};
use crate::DcsError;

#[derive(Clone)]
pub struct EtcdKv {
    client: Client,
    timeout: Duration,
}

async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DcsError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DcsError::Unavailable(e.to_string())),
        Err(_) => Err(DcsError::Timeout(timeout)),
    }
}

fn entry(kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `host:port` or `http(s)://host:port`.
    pub endpoints: Vec<String>,
    pub user: Option<(String, String)>,
    /// PEM CA certificate to verify the servers with (turns TLS on).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key (client-certificate authentication).
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The bound on connecting and on every call.
    pub timeout: Duration,
}

impl EtcdKv {
    /// Connects within `options.timeout`.
    pub async fn connect(options: &EtcdOptions) -> Result<EtcdKv, DcsError> {
        let timeout = options.timeout;
        let tls = options.ca_pem.is_some() || options.identity_pem.is_some();
        let endpoints: Vec<String> = options
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else if tls {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        if let Some((name, password)) = &options.user {
            opts = opts.with_user(name.clone(), password.clone());
        }
        if tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &options.ca_pem {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &options.identity_pem {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        let client = bounded(timeout, Client::connect(endpoints, Some(opts))).await?;
        Ok(EtcdKv { client, timeout })
    }
}

impl Kv for EtcdKv {
    async fn get(&self, key: &str) -> Result<Option<Entry>, DcsError> {
        let mut c = self.client.clone();
        let r = bounded(self.timeout, c.get(key, None)).await?;
        Ok(r.kvs().first().map(entry))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, DcsError> {
        let mut c = self.client.clone();
        let r = bounded(
            self.timeout,
            c.get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut all: Vec<Entry> = r.kvs().iter().map(entry).collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<bool, DcsError> {
        let leases: Vec<i64> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { lease: Some(l), .. } => Some(l.0),
                _ => None,
            })
            .collect();
        let when: Vec<EtcdCompare> = compares
            .into_iter()
            .map(|c| EtcdCompare::mod_revision(c.key, CompareOp::Equal, c.mod_revision))
            .collect();
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l.0)))
                }
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let mut c = self.client.clone();
        match bounded(self.timeout, c.txn(Txn::new().when(when).and_then(then))).await {
            Ok(r) => Ok(r.succeeded()),
            Err(DcsError::Unavailable(e)) if e.contains("lease not found") => {
                Err(DcsError::LeaseGone(leases.first().copied().unwrap_or(0)))
            }
            Err(e) => Err(e),
        }
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, DcsError> {
        let secs = i64::try_from(ttl.as_secs_f64().ceil() as u64)
            .unwrap_or(i64::MAX)
            .max(1);
        let mut c = self.client.clone();
        let r = bounded(self.timeout, c.lease_grant(secs, None)).await?;
        Ok(LeaseId(r.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        let timeout = self.timeout;
        let renewed = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease.0).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match bounded(timeout, renewed).await? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(DcsError::LeaseGone(lease.0)),
        }
    }

    async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, DcsError> {
        let mut c = self.client.clone();
        match bounded(self.timeout, c.lease_time_to_live(lease.0, None)).await {
            // -1 for a lease that expired or never was.
            Ok(r) => Ok(u64::try_from(r.ttl()).ok().map(Duration::from_secs)),
            Err(DcsError::Unavailable(e)) if e.contains("lease not found") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), DcsError> {
        let mut c = self.client.clone();
        match bounded(self.timeout, c.lease_revoke(lease.0)).await {
            Ok(_) => Ok(()),
            // Already gone is what a revoke wants.
            Err(DcsError::Unavailable(e)) if e.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str) -> Result<watch::Receiver<Revision>, DcsError> {
        let mut c = self.client.clone();
        let now = bounded(self.timeout, c.get(prefix, None)).await?;
        let start = now.header().map_or(0, |h| h.revision());
        let (watcher, mut stream) = bounded(
            self.timeout,
            c.watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start + 1),
                ),
            ),
        )
        .await?;
        let (tx, rx) = watch::channel(start);
        tokio::spawn(async move {
            // Cancelled when dropped: kept for as long as anyone watches.
            let _watcher = watcher;
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => match m {
                        Ok(Some(r)) => {
                            if let Some(h) = r.header() {
                                tx.send_replace(h.revision());
                            }
                        }
                        // The stream ended: receivers see the sender go and re-watch.
                        Ok(None) | Err(_) => return,
                    },
                }
            }
        });
        Ok(rx)
    }
}

//! Every pool, by (database, user) and then by node.
//!
//! A [`Group`] is one (database, user): what its node pools share — the login and its latest
//! credential, the named statements (the same text is the same statement on every node of a
//! physical cluster, so a client's statement keeps one server name wherever it runs), the
//! startup parameters already checked, the parameters shown at login, the pool settings — and
//! one [`Pool`] per node, made when routing first sends the group there. Pools know nothing of
//! the topology: the caller names the node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pgwarden_cluster::view::NodeView;
use pgwarden_protocol::SqlState;

use crate::pool::{Pool, PoolKey, PoolSettings};
use crate::prepared::StatementCache;
use crate::server::{Credential, Login, Target};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub database: String,
    pub user: String,
}

/// Startup parameters a client asked for, as (lower-case name, value).
pub type StartupPair = (String, String);

/// What setting a pair on a server did: what it reported, or its error.
pub type Checked = Result<Accepted, (SqlState, String)>;

/// A startup pair the server took.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    /// The ParameterStatus values it reported.
    pub reported: Vec<(String, String)>,
    /// NoticeResponse frames it sent (relayed to every client logging in with the pair, as
    /// PostgreSQL sends them at login).
    pub notices: Vec<bytes::Bytes>,
}

/// Pairs recorded per group, at most; past it a pair is checked on every login that asks.
const MAX_CHECKED: usize = 1024;

/// Per group: the outcome of setting each startup pair on a server.
#[derive(Default)]
pub struct StartupChecks {
    by_pair: Mutex<HashMap<StartupPair, Checked>>,
}

impl StartupChecks {
    pub fn get(&self, pair: &StartupPair) -> Option<Checked> {
        self.by_pair
            .lock()
            .expect("startup checks lock")
            .get(pair)
            .cloned()
    }

    pub fn put(&self, pair: StartupPair, checked: Checked) {
        let mut map = self.by_pair.lock().expect("startup checks lock");
        if map.len() < MAX_CHECKED {
            map.insert(pair, checked);
        }
    }
}

/// What the node pools of one (database, user) share.
pub struct Common {
    pub key: GroupKey,
    login: RwLock<Login>,
    /// Named statements by text, shared by every server connection of every node.
    pub statements: StatementCache,
    pub startup_checks: StartupChecks,
    /// What the catalog said of function names (routing).
    pub functions: crate::functions::Functions,
    /// ParameterStatus values of the first server connection, shown to clients at login.
    params: Mutex<Option<BTreeMap<String, String>>>,
}

impl Common {
    pub fn login(&self) -> Login {
        self.login.read().expect("login lock").clone()
    }

    pub fn params(&self) -> Option<BTreeMap<String, String>> {
        self.params.lock().expect("params lock").clone()
    }

    /// Keeps the first server's parameters (later ones are the same server settings).
    pub fn learn_params(&self, params: &BTreeMap<String, String>) {
        self.params
            .lock()
            .expect("params lock")
            .get_or_insert_with(|| params.clone());
    }
}

/// One (database, user) and its pool on each node.
pub struct Group {
    pub common: Arc<Common>,
    settings: Mutex<PoolSettings>,
    nodes: RwLock<Vec<Arc<Pool>>>,
    paused: AtomicBool,
    server_ids: Arc<AtomicU64>,
}

impl Group {
    pub fn key(&self) -> &GroupKey {
        &self.common.key
    }

    /// The credential for new server connections: the latest client login's.
    pub fn set_credential(&self, credential: Credential) {
        self.common.login.write().expect("login lock").credential = credential;
    }

    /// The pool on `node`, made on first use.
    pub fn pool(&self, node: &NodeView) -> Arc<Pool> {
        let target = Target {
            host: node.host.clone(),
            port: node.port,
        };
        let found = |pools: &[Arc<Pool>]| {
            pools
                .iter()
                .find(|p| p.key.node == node.id && *p.target == target)
                .cloned()
        };
        if let Some(p) = found(&self.nodes.read().expect("pools lock")) {
            return p;
        }
        let mut nodes = self.nodes.write().expect("pools lock");
        if let Some(p) = found(&nodes) {
            return p;
        }
        let key = PoolKey {
            node: node.id.clone(),
            database: self.common.key.database.clone(),
            user: self.common.key.user.clone(),
        };
        let pool = Pool::new(
            key,
            target,
            self.common.clone(),
            *self.settings.lock().expect("settings lock"),
            self.server_ids.clone(),
            self.paused.load(Ordering::SeqCst),
        );
        nodes.push(pool.clone());
        pool
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.nodes.read().expect("pools lock").clone()
    }

    pub fn update(&self, settings: PoolSettings) {
        *self.settings.lock().expect("settings lock") = settings;
        for p in self.pools() {
            p.update(settings);
        }
    }

    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        for p in self.pools() {
            p.set_paused(paused);
        }
    }
}

#[derive(Default)]
struct Paused {
    all: bool,
    databases: HashSet<String>,
}

impl Paused {
    fn covers(&self, db: &str) -> bool {
        self.all || self.databases.contains(db)
    }
}

/// Every group; pausing and killing by database.
#[derive(Default)]
pub struct Pools {
    groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
    /// Databases paused by `PAUSE db` / `KILL db` (groups made later start paused too).
    paused: Mutex<Paused>,
    server_ids: Arc<AtomicU64>,
}

impl Pools {
    /// The group for (database, user), made on first use; `credential` becomes the one new
    /// server connections log in with.
    pub fn group(
        &self,
        database: &str,
        user: &str,
        credential: Credential,
        settings: PoolSettings,
    ) -> Arc<Group> {
        let key = GroupKey {
            database: database.to_string(),
            user: user.to_string(),
        };
        let mut groups = self.groups.lock().expect("groups lock");
        if let Some(g) = groups.get(&key) {
            g.set_credential(credential);
            return g.clone();
        }
        let paused = self.paused.lock().expect("paused lock").covers(database);
        let group = Arc::new(Group {
            common: Arc::new(Common {
                login: RwLock::new(Login {
                    user: user.to_string(),
                    database: database.to_string(),
                    application_name: "pgwarden".to_string(),
                    credential,
                }),
                key: key.clone(),
                statements: Default::default(),
                startup_checks: Default::default(),
                functions: Default::default(),
                params: Mutex::new(None),
            }),
            settings: Mutex::new(settings),
            nodes: RwLock::new(Vec::new()),
            paused: AtomicBool::new(paused),
            server_ids: self.server_ids.clone(),
        });
        groups.insert(key, group.clone());
        group
    }

    pub fn groups(&self) -> Vec<Arc<Group>> {
        let mut v: Vec<_> = self
            .groups
            .lock()
            .expect("groups lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.key().cmp(b.key()));
        v
    }

    /// Every node pool, in (node, database, user) order.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.groups().iter().flat_map(|g| g.pools()).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    fn of(&self, db: Option<&str>) -> Vec<Arc<Group>> {
        self.groups()
            .into_iter()
            .filter(|g| db.map_or(true, |d| d == g.key().database))
            .collect()
    }

    /// Holds new checkouts for `db` (or every database), then waits until no server of theirs
    /// is in use.
    pub async fn pause(&self, db: Option<&str>) {
        {
            let mut p = self.paused.lock().expect("paused lock");
            match db {
                None => p.all = true,
                Some(d) => {
                    p.databases.insert(d.to_string());
                }
            }
        }
        let groups = self.of(db);
        for g in &groups {
            g.set_paused(true);
        }
        let busy = || {
            groups
                .iter()
                .flat_map(|g| g.pools())
                .any(|p| p.active_count() > 0)
        };
        while busy() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn resume(&self, db: Option<&str>) {
        let mut paused = self.paused.lock().expect("paused lock");
        match db {
            None => {
                paused.all = false;
                paused.databases.clear();
            }
            Some(d) => {
                paused.databases.remove(d);
            }
        }
        for g in self.groups() {
            g.set_paused(paused.covers(&g.key().database));
        }
    }

    pub fn is_paused(&self, db: &str) -> bool {
        self.paused.lock().expect("paused lock").covers(db)
    }

    /// `KILL db`: holds new checkouts for `db` until `RESUME` and closes its server
    /// connections (those in use at their release).
    pub fn kill(&self, db: &str) {
        self.paused
            .lock()
            .expect("paused lock")
            .databases
            .insert(db.to_string());
        for g in self.of(Some(db)) {
            g.set_paused(true);
            for p in g.pools() {
                for s in p.servers.all() {
                    s.close_needed.store(true, Ordering::Relaxed);
                }
                p.close_idle();
            }
        }
    }
}

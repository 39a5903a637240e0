//! Building and starting the demo's nodes.

use std::time::Duration;

use pgwarden_config::{Config, NodeConfig, ReplicationMode};
use pgwarden_postgres::sql::{self, ConnectSpec};
use pgwarden_postgres::{Instance, PgEnv, Postmaster, ReplicationLogin, Settings, SyncStandbys};

use crate::DemoError;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const CLONE_TIMEOUT: Duration = Duration::from_secs(600);
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);

/// A node the demo started.
pub struct RunningNode {
    pub instance: Instance,
    pub postmaster: Postmaster,
    pub primary: bool,
    /// Set once its death has been reported.
    pub reported_dead: bool,
}

/// The nodes started so far and what went wrong, so the caller can stop them.
pub type BringUpError = (Vec<RunningNode>, DemoError);

/// Initialises (first run) or reuses every node, starts them, and waits until every standby
/// streams from the primary.
pub async fn bring_up(config: &Config) -> Result<Vec<RunningNode>, BringUpError> {
    let mut running = Vec::new();
    match bring_up_inner(config, &mut running).await {
        Ok(()) => Ok(running),
        Err(e) => Err((running, e)),
    }
}

async fn bring_up_inner(config: &Config, running: &mut Vec<RunningNode>) -> Result<(), DemoError> {
    let pg = &config.postgres;
    let env = PgEnv::discover(pg.bin_dir.as_deref(), &pg.os_user)?;
    let instances = instances(config, &env)?;
    let primary_idx = find_primary(&instances)?;
    let primary = instances[primary_idx].clone();
    let standby_names: Vec<String> = instances
        .iter()
        .filter(|i| i.name != primary.name)
        .map(|i| i.name.clone())
        .collect();
    let settings = settings(config, standby_names);
    if !primary.is_initialised() {
        tracing::info!(node = %primary.name, "initialising the primary");
        primary
            .initdb(&pg.superuser, pg.superuser_password.expose())
            .await?;
    }
    primary.configure(&settings, &pg.replication_user)?;
    let pm = primary.start(START_TIMEOUT).await?;
    running.push(RunningNode {
        instance: primary.clone(),
        postmaster: pm,
        primary: true,
        reported_dead: false,
    });
    set_up_roles(config, &primary).await?;

    let repl_password = pg
        .replication_password
        .as_ref()
        .map(|s| s.expose())
        .unwrap_or_default();
    let upstream = primary.endpoint();
    let primary_name = primary.name.as_str();
    let starts = instances
        .iter()
        .filter(|i| i.name != primary_name)
        .map(|inst| {
            let (settings, upstream) = (&settings, &upstream);
            async move {
                let login = ReplicationLogin {
                    user: &pg.replication_user,
                    password: repl_password,
                };
                if inst.is_initialised() {
                    inst.configure(settings, &pg.replication_user)?;
                    inst.follow(upstream, &login, &inst.name)?;
                } else {
                    tracing::info!(node = %inst.name, from = %primary_name, "cloning a standby");
                    inst.clone_from(upstream, &login, &inst.name, CLONE_TIMEOUT)
                        .await?;
                    inst.configure(settings, &pg.replication_user)?;
                }
                inst.start(START_TIMEOUT).await
            }
        });
    // Clones run concurrently: pg_basebackup is I/O bound and each has its own slot.
    let results = futures::future::join_all(starts).await;
    let mut first_err = None;
    for (inst, r) in instances
        .iter()
        .filter(|i| i.name != primary.name)
        .zip(results)
    {
        match r {
            Ok(pm) => running.push(RunningNode {
                instance: inst.clone(),
                postmaster: pm,
                primary: false,
                reported_dead: false,
            }),
            Err(e) => {
                first_err.get_or_insert(DemoError::Postgres(e));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    wait_streaming(config, &primary, instances.len() - 1).await
}

fn instances(config: &Config, env: &PgEnv) -> Result<Vec<Instance>, DemoError> {
    config
        .nodes
        .iter()
        .filter_map(|n: &NodeConfig| n.data_dir.as_ref().map(|d| (n, d)))
        .map(|(n, dir)| {
            env.run_as.check_reachable(dir)?;
            Ok(Instance::new(env.clone(), &n.name, &n.host, n.port, dir).die_with_parent())
        })
        .collect()
}

/// The node that is (or, on a first run, will be) the primary: the one initialised node without
/// `standby.signal`, else the first node when nothing is initialised yet.
fn find_primary(instances: &[Instance]) -> Result<usize, DemoError> {
    let primaries: Vec<usize> = instances
        .iter()
        .enumerate()
        .filter(|(_, i)| i.is_initialised() && !i.is_standby())
        .map(|(idx, _)| idx)
        .collect();
    match primaries.as_slice() {
        [one] => Ok(*one),
        [] if instances.iter().all(|i| !i.is_initialised()) => Ok(0),
        [] => Err(DemoError::Cluster(
            "every initialised node is a standby: there is no primary to start from".into(),
        )),
        many => Err(DemoError::Cluster(format!(
            "{} nodes are primaries ({}); refusing to start a split cluster",
            many.len(),
            many.iter()
                .map(|&i| instances[i].name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn settings(config: &Config, standbys: Vec<String>) -> Settings {
    let k = config.replication.sync_count;
    let sync = match config.replication.mode {
        ReplicationMode::Async => SyncStandbys::None,
        ReplicationMode::Sync => SyncStandbys::First(k, standbys),
        ReplicationMode::Quorum => SyncStandbys::Any(k, standbys),
    };
    let senders = (config.nodes.len() as u32 * 2 + 2).max(10);
    Settings {
        max_wal_senders: senders,
        max_replication_slots: senders,
        sync,
        parameters: config.postgres.parameters.clone(),
        ..Settings::default()
    }
}

/// The replication role, and the `app` role and database for every `[[proxy.users]]` entry.
async fn set_up_roles(config: &Config, primary: &Instance) -> Result<(), DemoError> {
    let pg = &config.postgres;
    let spec = superuser_spec(config, primary);
    let client = sql::connect(&spec).await?;
    let addr = spec.addr();
    if let Some(pw) = &pg.replication_password {
        sql::ensure_role(
            &client,
            &addr,
            &pg.replication_user,
            pw.expose(),
            "REPLICATION",
        )
        .await?;
    }
    for user in &config.users {
        sql::ensure_role(&client, &addr, &user.name, user.password.expose(), "").await?;
        sql::ensure_database(&client, &addr, &user.name, &user.name).await?;
    }
    Ok(())
}

async fn wait_streaming(
    config: &Config,
    primary: &Instance,
    standbys: usize,
) -> Result<(), DemoError> {
    if standbys == 0 {
        return Ok(());
    }
    let spec = superuser_spec(config, primary);
    let client = sql::connect(&spec).await?;
    let deadline = tokio::time::Instant::now() + STREAMING_TIMEOUT;
    loop {
        let rows = client
            .query(
                "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .map_err(|e| DemoError::Cluster(format!("cannot read pg_stat_replication: {e}")))?;
        if rows.len() >= standbys {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let streaming: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            return Err(DemoError::Cluster(format!(
                "only {} of {standbys} standbys streaming after {}s ({})",
                rows.len(),
                STREAMING_TIMEOUT.as_secs(),
                streaming.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn superuser_spec<'a>(config: &'a Config, node: &'a Instance) -> ConnectSpec<'a> {
    ConnectSpec {
        host: &node.host,
        port: node.port,
        user: &config.postgres.superuser,
        password: config.postgres.superuser_password.expose(),
        dbname: "postgres",
        application_name: "pgwarden-demo",
        timeout: Duration::from_secs(10),
    }
}

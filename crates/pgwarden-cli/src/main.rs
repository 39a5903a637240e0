//! `pgwarden`: the one binary. Each subcommand parses its arguments, loads config, sets up
//! logging and calls into a library crate; no logic lives here.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod operator;

use clap::{Parser, Subcommand};
use pgwarden_config::{Config, ReplicationMode};

#[derive(Parser)]
#[command(name = "pgwarden", version, about = "High availability for PostgreSQL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with pgwarden.toml.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Show every node's role, replication lag and the cluster's activity.
    Status {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the stable JSON document instead of a table.
        #[arg(long)]
        json: bool,
        /// Redraw every monitor.interval until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// List the HA members as the agents publish them in the store: role, state, timeline,
    /// position, lag and why each does not act. Needs [dcs].
    List {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the JSON document (the agents' `GET /cluster`) instead of a table.
        #[arg(long)]
        json: bool,
        /// Redraw every loop_wait until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Maintenance mode: the HA agents take no automatic action (no failover, no restart of a
    /// crashed PostgreSQL) until `pgwarden resume`. Fencing stays on. Needs [dcs].
    Pause {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// End maintenance mode: the agents act again from their next round.
    Resume {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Planned switchover: the proxies hold new transactions while running ones finish, the
    /// leader stops cleanly, the target catches up exactly and is promoted, and the old leader
    /// follows it without a rewind. Refused, with the reason, before anything is touched when
    /// it cannot proceed. Needs [dcs].
    Switchover {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The member to hand over to [default: the eligible standby furthest ahead].
        #[arg(long)]
        to: Option<String>,
        /// When: an RFC 3339 time (`2026-12-05T14:00:00Z`; UTC without an offset) or `+DURATION`
        /// (`+10m`) [default: now]. A scheduled switchover is checked now and again when due.
        #[arg(long, value_parser = parse_at)]
        at: Option<u64>,
        /// Hand over to a target that lags more than maximum_lag_on_failover (the leader
        /// waits for it to catch up).
        #[arg(long)]
        force: bool,
        /// How long the leader waits for running transactions to end before it stops anyway.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        drain: std::time::Duration,
    },
    /// The history of outages of the cluster's writes (failovers, switchovers, restarts in
    /// place) from the store, and availability, MTTR and MTBF over a window. Needs [dcs].
    History {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the events (and the report) as JSON.
        #[arg(long)]
        json: bool,
        /// Availability, MTTR and MTBF over this window back from now (e.g. 30d).
        #[arg(long, value_parser = parse_duration)]
        availability: Option<std::time::Duration>,
    },
    /// Manual failover, for when no member leads (the leader is gone and the election's rules
    /// let nobody take over): promote NODE, a running standby, whatever its lag. Refused while a
    /// leader holds the key (use switchover). Needs [dcs].
    Failover {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The standby to promote.
        #[arg(long)]
        to: String,
    },
    /// Restart NODE's PostgreSQL (a clean stop and a start, in the same role). Needs [dcs].
    Restart {
        #[arg(short, long)]
        config: Option<PathBuf>,
        node: String,
    },
    /// Re-clone NODE from the leader (its data directory is emptied). Not the leader. Needs
    /// [dcs].
    Reinit {
        #[arg(short, long)]
        config: Option<PathBuf>,
        node: String,
    },
    /// Show the cluster's dynamic settings: those in the store (pgwarden edit-config) and
    /// the agents' rules and PostgreSQL parameters in effect. Needs [dcs].
    ShowConfig {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Change the cluster's dynamic settings in the store, checked before they are written:
    /// `--set agent.synchronous_mode=on`, `--set postgres.parameters.work_mem=64MB`,
    /// `--unset KEY`. The agents apply them at their next round (parameters by reload). The
    /// lease's timing and the API's credentials stay in the file. Needs [dcs].
    EditConfig {
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// KEY=VALUE (repeatable).
        #[arg(long = "set", value_parser = parse_assignment)]
        set: Vec<(String, String)>,
        /// KEY (repeatable): back to the file's value.
        #[arg(long)]
        unset: Vec<String>,
    },
    /// Run the connection pooler in front of the cluster's primary.
    Proxy {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Run the HA agent of one node: it owns the node's PostgreSQL and fails over with the
    /// other agents through the store in [dcs].
    Agent {
        /// Config file (default: $PGWARDEN_CONFIG, else ./pgwarden.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// This node's name in [[nodes]].
        #[arg(long)]
        node: String,
    },
    /// Run a local replicated cluster in the foreground.
    Demo {
        /// Where the cluster lives.
        #[arg(long, default_value = "./pgwarden-demo")]
        dir: PathBuf,
        /// Number of nodes (one primary, the rest standbys).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
        nodes: u16,
        /// Port of the first node; the others follow [default on a first run: 55432; later runs
        /// keep the demo's].
        #[arg(long)]
        port_base: Option<u16>,
        /// Replication mode: async, sync (FIRST 1) or quorum (ANY 1).
        #[arg(long, default_value = "async", value_parser = parse_mode)]
        replication: ReplicationMode,
        /// Where the proxy listens on 127.0.0.1 [default on a first run: 6432; a later run may
        /// change it].
        #[arg(long)]
        proxy_port: Option<u16>,
        /// Where the agents agree: `memory` (all in this process) or `etcd` (a local etcd and
        /// one `pgwarden agent` process per node) [default: the demo's own, memory on a first run].
        #[arg(long, value_parser = parse_dcs)]
        dcs: Option<pgwarden_demo::Dcs>,
        /// Stop the cluster in DIR and remove DIR.
        #[arg(long)]
        destroy: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file: prints `ok`, or every error with its path (exit 2).
    Check {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn parse_mode(s: &str) -> Result<ReplicationMode, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    pgwarden_core::parse_duration(s).map_err(|e| e.to_string())
}

/// `--at`: `+DURATION` from now, or an RFC 3339 time; Unix milliseconds.
fn parse_at(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now();
    let at = match s.strip_prefix('+') {
        Some(d) => now + parse_duration(d)?,
        None => humantime::parse_rfc3339_weak(s).map_err(|e| {
            format!("{e}: expected an RFC 3339 time such as 2026-12-05T14:00:00Z, or +DURATION")
        })?,
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| "a time before 1970".to_string())
}

fn parse_assignment(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| "expected KEY=VALUE".to_string())
}

fn parse_dcs(s: &str) -> Result<pgwarden_demo::Dcs, String> {
    match s {
        "memory" => Ok(pgwarden_demo::Dcs::Memory),
        "etcd" => Ok(pgwarden_demo::Dcs::Etcd),
        other => Err(format!(
            "unknown store \"{other}\": expected memory or etcd"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo { .. } | Command::Proxy { .. } | Command::Agent { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGWARDEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    // The proxy sizes its runtime from its config; everything else uses the default.
    if let Command::Proxy { config } = cli.command {
        return proxy(config);
    }
    // The demo runs PostgreSQL beside its proxy: sized as `workers = 0` on such a host.
    let threads = match &cli.command {
        Command::Demo { .. } => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            pgwarden_proxy::auto_workers(cores, true)
        }
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let runtime = match pgwarden_proxy::runtime(threads) {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}"), 1),
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Config {
            command: ConfigCommand::Check { config },
        } => match load(config) {
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Status {
            config,
            json,
            watch,
        } => {
            let config = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            status(&config, json, watch).await
        }
        Command::List {
            config,
            json,
            watch,
        } => {
            let config = match load(config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            list(&config, json, watch).await
        }
        Command::Pause { config } => operator::pause_or_resume(config, true).await,
        Command::Resume { config } => operator::pause_or_resume(config, false).await,
        Command::Failover { config, to } => operator::failover(config, &to).await,
        Command::ShowConfig { config } => operator::show_config(config).await,
        Command::EditConfig { config, set, unset } => {
            operator::edit_config(config, &set, &unset).await
        }
        Command::Restart { config, node } => {
            operator::node_request(config, &node, pgwarden_dcs::NodeAction::Restart).await
        }
        Command::Reinit { config, node } => {
            operator::node_request(config, &node, pgwarden_dcs::NodeAction::Reinit).await
        }
        Command::History {
            config,
            json,
            availability,
        } => operator::history(config, json, availability).await,
        Command::Switchover {
            config,
            to,
            at,
            force,
            drain,
        } => {
            let request = pgwarden_ha::operate::Request {
                leader: None,
                to,
                at_ms: at,
                force,
                drain,
            };
            operator::switchover(config, request).await
        }
        Command::Proxy { .. } => unreachable!("handled in main"),
        Command::Agent { config, node } => {
            let config = match load(config) {
                Ok(c) => std::sync::Arc::new(c),
                Err(code) => return code,
            };
            agent(config, &node).await
        }
        Command::Demo {
            dir,
            nodes,
            port_base,
            replication,
            proxy_port,
            dcs,
            destroy,
        } => {
            let opts = pgwarden_demo::DemoOptions {
                dir,
                nodes: nodes as usize,
                port_base,
                replication,
                proxy_port,
                dcs,
            };
            let result = if destroy {
                pgwarden_demo::destroy(&opts).await
            } else {
                pgwarden_demo::run(&opts).await
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e.to_string(), 1),
            }
        }
    }
}

/// Loads config, printing every error (one per line) and returning exit code 2 on failure.
fn load(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    let given = path.is_some() || std::env::var_os(pgwarden_config::ENV_VAR).is_some();
    let path = pgwarden_config::resolve_path(path.as_deref());
    Config::load(&path).map_err(|e| {
        if let pgwarden_config::ConfigError::Read { source, .. } = &e {
            if source.kind() == std::io::ErrorKind::NotFound && !given {
                eprintln!(
                    "pgwarden: no config file at {}: pass -c FILE or set ${} (pgwarden demo writes one in its --dir)",
                    path.display(),
                    pgwarden_config::ENV_VAR
                );
                return ExitCode::from(2);
            }
        }
        let lines = e.lines();
        if lines.len() > 1 {
            eprintln!("{}: {} errors", path.display(), lines.len());
        }
        for line in lines {
            eprintln!("{}: {line}", path.display());
        }
        ExitCode::from(2)
    })
}

async fn status(config: &Config, json: bool, watch: bool) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let colour = std::io::stdout().is_terminal();
    // One SIGINT stream for the whole watch, made before the first probe: a Ctrl-C that comes
    // while a probe runs is kept for the next select, not lost.
    let mut interrupt = match watch.then(|| signal(SignalKind::interrupt())).transpose() {
        Ok(i) => i,
        Err(e) => return fail(&format!("cannot listen for Ctrl-C: {e}"), 1),
    };
    loop {
        let check = async {
            // With [dcs], what the agents publish too.
            let ha = async {
                match config.dcs {
                    Some(_) => Some(pgwarden_ha::status::HaStatus::read(config).await),
                    None => None,
                }
            };
            futures::join!(pgwarden_cluster::check(config), ha)
        };
        let (mut status, ha) = match interrupt.as_mut() {
            Some(int) => tokio::select! {
                s = check => s,
                _ = int.recv() => return ExitCode::SUCCESS,
            },
            None => check.await,
        };
        if let Some(ha) = &ha {
            status.warnings.extend(ha.warnings(config));
        }
        let text = match (json, &ha) {
            (true, None) => status.to_json(),
            (true, Some(ha)) => {
                let mut v = serde_json::to_value(&status).expect("status serialises");
                v["ha"] = serde_json::to_value(ha).expect("ha status serialises");
                serde_json::to_string_pretty(&v).expect("json")
            }
            (false, None) => pgwarden_cluster::render::table(&status, colour),
            (false, Some(ha)) => format!(
                "{}\n{}",
                pgwarden_cluster::render::table(&status, colour),
                ha.render()
            ),
        };
        if !watch {
            println!("{text}");
            if json {
                // The JSON schema carries facts; why the exit code is 1 goes to stderr.
                for w in &status.warnings {
                    eprintln!("warning: {w}");
                }
            }
            return ExitCode::from(status.exit_code() as u8);
        }
        if colour {
            print!("\x1b[2J\x1b[H");
        }
        println!("{text}");
        let int = interrupt.as_mut().expect("watching");
        tokio::select! {
            _ = tokio::time::sleep(config.monitor.interval) => {}
            _ = int.recv() => return ExitCode::SUCCESS,
        }
    }
}

fn proxy(config: Option<PathBuf>) -> ExitCode {
    let config = match load(config) {
        Ok(c) => std::sync::Arc::new(c),
        Err(code) => return code,
    };
    let threads = pgwarden_proxy::worker_threads(&config);
    let runtime = match pgwarden_proxy::runtime(threads) {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}"), 1),
    };
    runtime.block_on(async move {
        let listen = config.proxy.listen;
        // With [dcs] the agents decide who leads and the proxy follows the store; without it,
        // the monitor's probes of a cluster managed by something else.
        // A proxy started before etcd answers listens at once and holds, then refuses, writes
        // until it does.
        let view = if config.dcs.is_some() {
            if let Err(e) = pgwarden_ha::store::check(&config) {
                return fail(&e.to_string(), 1);
            }
            pgwarden_ha::view::spawn_etcd(config.clone())
        } else {
            pgwarden_cluster::monitor::spawn(config.clone()).await
        };
        let proxy = match pgwarden_proxy::Proxy::bind(config, view).await {
            Ok(p) => p,
            Err(e) => return fail(&format!("cannot start the proxy on {listen}: {e}"), 1),
        };
        tracing::info!(%listen, "proxy listening");
        tokio::spawn(pgwarden_proxy::reload_on_sighup(proxy.shared()));
        proxy.serve(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

async fn agent(config: std::sync::Arc<Config>, node: &str) -> ExitCode {
    if config.node(node).is_none() {
        return fail(
            &format!("node \"{node}\" is not in [[nodes]] of the config"),
            2,
        );
    }
    pgwarden_postgres::become_subreaper();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    // Nothing is started before the store has been read: an agent that cannot reach it waits,
    // up to dcs.start_wait, then exits with the cause.
    let bound = config.dcs.as_ref().map(|d| d.start_wait);
    let store = match pgwarden_ha::store::connect_waiting(&config, bound, &mut stopped).await {
        Ok(Some(s)) => s,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => return fail(&e.to_string(), 1),
    };
    let agent = match pgwarden_ha::Agent::new(config, node, store).await {
        Ok(a) => a,
        Err(e) => return fail(&e.to_string(), 1),
    };
    match agent.run(stopped).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string(), 1),
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `pgwarden list`: the store's members. Exit 0 when the store was read and a leader holds
/// the key, 1 when it was read and something is wrong (the warnings, on stderr), 2 when it
/// could not be read.
async fn list(config: &Config, json: bool, watch: bool) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    if config.dcs.is_none() {
        return fail(
            "list shows what the HA agents publish in the store, and this config has no [dcs] (use pgwarden status)",
            2,
        );
    }
    let colour = std::io::stdout().is_terminal();
    let mut interrupt = match watch.then(|| signal(SignalKind::interrupt())).transpose() {
        Ok(i) => i,
        Err(e) => return fail(&format!("cannot listen for Ctrl-C: {e}"), 1),
    };
    loop {
        let read = pgwarden_ha::status::HaStatus::read(config);
        let ha = match interrupt.as_mut() {
            Some(int) => tokio::select! {
                s = read => s,
                _ = int.recv() => return ExitCode::SUCCESS,
            },
            None => read.await,
        };
        let warnings = ha.warnings(config);
        let text = if json {
            serde_json::to_string_pretty(&ha).expect("ha status serialises")
        } else {
            ha.render()
        };
        if !watch {
            println!("{text}");
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            return match (&ha.error, warnings.is_empty()) {
                (Some(e), _) => fail(&format!("cannot read the store: {e}"), 2),
                (None, true) => ExitCode::SUCCESS,
                (None, false) => ExitCode::from(1),
            };
        }
        if colour {
            print!("\x1b[2J\x1b[H");
        }
        println!("{text}");
        for w in &warnings {
            println!("warning: {w}");
        }
        let int = interrupt.as_mut().expect("watching");
        tokio::select! {
            _ = tokio::time::sleep(config.agent.loop_wait) => {}
            _ = int.recv() => return ExitCode::SUCCESS,
        }
    }
}

fn fail(message: &str, code: u8) -> ExitCode {
    eprintln!("pgwarden: {message}");
    ExitCode::from(code)
}

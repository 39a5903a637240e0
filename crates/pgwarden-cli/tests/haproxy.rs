//! A real HAProxy (Debian `haproxy`) in front of the agents, configured as for Patroni:
//! `option httpchk GET /primary` on the read-write port and `GET /replica` on the read-only
//! one. It follows a switchover and a failover with no change to its configuration.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::ha::Ha;
use pgwarden_testkit::eventually;
use pgwarden_testkit::ports::free_ports;

const BOOT: Duration = Duration::from_secs(120);
const HEAL: Duration = Duration::from_secs(40);

/// HAProxy in the foreground, killed (by PID) when dropped.
struct HaProxy(Child);

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The recipe of the README: each server checked on its agent's API every 200 ms, taken out
/// at the first failed check (its sessions shut down), back at the first good one.
fn haproxy(ha: &Ha, rw: u16, ro: u16) -> HaProxy {
    let mut servers = String::new();
    for n in &ha.nodes {
        servers.push_str(&format!(
            "  server {} 127.0.0.1:{} check port {}\n",
            n.name, n.pg_port, n.api_port
        ));
    }
    let config = format!(
        "global\n  maxconn 200\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\
         \x20 default-server inter 200ms fall 1 rise 1 on-marked-down shutdown-sessions\n\
         listen primary\n  bind 127.0.0.1:{rw}\n  option httpchk GET /primary\n  http-check expect status 200\n{servers}\
         listen replicas\n  bind 127.0.0.1:{ro}\n  balance roundrobin\n  option httpchk GET /replica\n  http-check expect status 200\n{servers}"
    );
    let path = ha.dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).expect("write haproxy.cfg");
    let log = std::fs::File::create(ha.dir.path().join("haproxy.log")).expect("log");
    let child = std::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start haproxy (Debian package haproxy)");
    HaProxy(child)
}

/// The PostgreSQL port a new connection through `port` reaches, and whether it is a standby.
async fn reached(port: u16) -> Option<(i32, bool)> {
    let c = common::ha::connect(port).await?;
    let row = c
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_with_the_patroni_checks_follows_a_switchover_and_a_failover() {
    let mut ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let ports = free_ports(2);
    let (rw, ro) = (ports[0], ports[1]);
    let _haproxy = haproxy(&ha, rw, ro);
    let pg_ports: Vec<i32> = ha.nodes.iter().map(|n| i32::from(n.pg_port)).collect();
    let pg = |i: usize| pg_ports[i];
    let primary_is = |i: usize| {
        let want = pg(i);
        async move {
            eventually(HEAL, "the read-write port reaches the leader", || async {
                (reached(rw).await? == (want, false)).then_some(())
            })
            .await
        }
    };
    primary_is(leader).await;
    // Once the checks have run (HAProxy counts a server up until its first check), the
    // read-only port spreads over the two standbys and never reaches the primary.
    let seen = eventually(
        HEAL,
        "six connections in a row on the two standbys",
        || async {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..6 {
                let (port, standby) = reached(ro).await?;
                if !standby {
                    return None;
                }
                seen.insert(port);
            }
            (seen.len() == 2).then_some(seen)
        },
    )
    .await;
    assert!(!seen.contains(&pg(leader)));

    // A switchover: HAProxy sends new connections to the new leader.
    let config = ha.dir.path().join("proxy.toml");
    let r = tokio::task::spawn_blocking(move || {
        common::run(&[
            "switchover",
            "--to",
            "n2",
            "-c",
            config.to_str().expect("path"),
        ])
    })
    .await
    .expect("run");
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let (l, e) = ha.settled(2, epoch + 1, HEAL).await;
    assert_eq!(l, 1);
    primary_is(1).await;

    // A failover (the leader's node killed): the same.
    ha.kill_agent_and_postgres(1).await;
    let (l, _) = ha.settled(1, e + 1, HEAL).await;
    assert_ne!(l, 1);
    primary_is(l).await;
    let (port, standby) =
        eventually(HEAL, "a standby behind the read-only port", || reached(ro)).await;
    assert!(standby && port != pg(l), "read-only reached {port}");
}

//! Operator commands with real etcd and `pgwarden agent` processes: a manual failover out of
//! a paused cluster whose leader died, `restart` and `reinit` of a member.

mod common;

use std::time::Duration;

use common::ha::Ha;
use pgwarden_testkit::eventually;

const BOOT: Duration = Duration::from_secs(120);
const HEAL: Duration = Duration::from_secs(40);

/// `pgwarden ARGS -c <the proxy's config>` off the runtime's threads.
async fn pgwarden(ha: &Ha, args: &[&str]) -> common::Run {
    common::run_with_config(&ha.dir.path().join("proxy.toml"), args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_out_of_a_paused_cluster_then_restart_and_reinit() {
    let mut ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    assert_eq!(leader, 0);
    let store = ha.store().await;

    // Paused, the leader's node dies: nobody takes over by themselves.
    let r = pgwarden(&ha, &["pause"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = pgwarden(&ha, &["failover", "--to", "n3"]).await;
    assert_eq!(r.code, 1, "refused while n1 leads: {}", r.stdout);
    assert!(
        r.stderr
            .contains("n1 holds the leader key: use pgwarden switchover"),
        "{}",
        r.stderr
    );
    ha.kill_agent_and_postgres(0).await;
    eventually(HEAL, "the dead leader's key expires", || async {
        store.leader().await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(
        store.leader().await.expect("read"),
        None,
        "paused: nobody took over"
    );
    let r = pgwarden(&ha, &["failover", "--to", "n9"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("n9 is not a member"), "{}", r.stderr);

    // The operator picks n3.
    let r = pgwarden(&ha, &["failover", "--to", "n3"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("failover to n3: done"), "{}", r.stdout);
    // Still paused, nobody follows it yet; it leads under the next epoch.
    let (l, e) = ha.settled(0, epoch + 1, HEAL).await;
    assert_eq!(l, 2, "n3 leads");
    eventually(HEAL, "the request is cleared by the new leader", || async {
        let s = store.snapshot::<pgwarden_ha::MemberState>().await.ok()?;
        s.failover.is_none().then_some(())
    })
    .await;
    let r = pgwarden(&ha, &["resume"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    ha.start_agent(0);
    let (l, e) = ha.settled(2, e, HEAL).await;
    assert_eq!(l, 2);

    // restart: the same node, a new postmaster, the same role.
    let before = ha.postmaster_pid(1).expect("n2 runs");
    let r = pgwarden(&ha, &["restart", "n2"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("restart of n2: done, replica running"),
        "{}",
        r.stdout
    );
    assert_ne!(ha.postmaster_pid(1), Some(before), "a new postmaster");
    ha.settled(2, e, HEAL).await;

    // reinit: a new clone of a replica; never of the leader.
    let r = pgwarden(&ha, &["reinit", "n3"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("n3 leads and its data is the cluster's"),
        "{}",
        r.stderr
    );
    let r = pgwarden(&ha, &["reinit", "n2"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(ha.agent_log(1).contains("re-cloning, as asked"));
    let (l, _) = ha.settled(2, e, HEAL).await;
    assert_eq!(l, 2, "n3 still leads");

    // The history has the manual failover.
    let r = pgwarden(&ha, &["history", "--json"]).await;
    let h: serde_json::Value = serde_json::from_str(&r.stdout).expect("history --json");
    let failovers: Vec<_> = h["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "failover")
        .collect();
    assert_eq!(failovers.len(), 1, "{h}");
    assert_eq!(
        (&failovers[0]["from"], &failovers[0]["to"]),
        (&"n1".into(), &"n3".into()),
        "{h}"
    );
}

/// `edit-config`: checked against the file before anything is written, then applied by every
/// agent at its next round: PostgreSQL parameters by reload, the rules (synchronous mode) from
/// the next decision; `show-config` shows both layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_settings_are_checked_written_and_applied() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, _) = ha.settled(2, 1, BOOT).await;
    let store = ha.store().await;
    let r = pgwarden(&ha, &["edit-config", "--set", "agent.ttl=10s"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("agent.ttl: not a dynamic setting"),
        "{}",
        r.stderr
    );
    let r = pgwarden(
        &ha,
        &[
            "edit-config",
            "--set",
            "postgres.parameters.work_mem=lots",
            "--set",
            "agent.rejoin=pray",
        ],
    )
    .await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("agent.rejoin: unknown value \"pray\""),
        "{}",
        r.stderr
    );
    assert_eq!(
        store.dynamic_config().await.expect("read"),
        None,
        "nothing written"
    );

    let r = pgwarden(
        &ha,
        &[
            "edit-config",
            "--set",
            "postgres.parameters.work_mem=64MB",
            "--set",
            "agent.synchronous_mode=on",
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let setting = |name: &'static str| {
        let port = ha.nodes[leader].pg_port;
        async move {
            let c = common::ha::connect(port).await?;
            let row = c.query_one(&format!("SHOW {name}"), &[]).await.ok()?;
            Some(row.get::<_, String>(0))
        }
    };
    eventually(HEAL, "the leader reloads with the new work_mem", || async {
        (setting("work_mem").await? == "64MB").then_some(())
    })
    .await;
    eventually(HEAL, "synchronous mode names a standby", || async {
        let names = setting("synchronous_standby_names").await?;
        let s = store.snapshot::<pgwarden_ha::MemberState>().await.ok()?;
        (!names.is_empty() && s.synchronous_set.is_some_and(|set| !set.is_empty())).then_some(())
    })
    .await;
    let r = pgwarden(&ha, &["show-config"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("work_mem = \"64MB\""), "{}", r.stdout);
    assert!(
        r.stdout.contains("synchronous_mode = \"on\""),
        "{}",
        r.stdout
    );

    // The API: GET /config shows both layers; PATCH /config needs the credentials (none are
    // configured here, so it is refused) and nothing changes.
    let api = format!("127.0.0.1:{}", ha.nodes[0].api_port);
    let (status, body) = pgwarden_ha::api::get(&api, "/config", Duration::from_secs(2))
        .await
        .expect("GET /config");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(
        v["effective"]
            .as_str()
            .is_some_and(|t| t.contains("work_mem = \"64MB\"")),
        "{v}"
    );
    let patch = r#"{"unset": ["postgres.parameters.work_mem"]}"#;
    let (status, body) = pgwarden_ha::api::call(
        &api,
        "PATCH",
        "/config",
        None,
        patch,
        Duration::from_secs(2),
    )
    .await
    .expect("PATCH /config");
    assert_eq!(status, 403, "{body}");
    let r = pgwarden(
        &ha,
        &["edit-config", "--unset", "postgres.parameters.work_mem"],
    )
    .await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    eventually(
        HEAL,
        "back to the file's (PostgreSQL's default)",
        || async { (setting("work_mem").await? == "4MB").then_some(()) },
    )
    .await;
}

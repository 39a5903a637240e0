//! Planned switchover with real etcd, `pgwarden agent` processes and the proxy following the
//! store: under a write load through the proxy, no client between transactions sees an error,
//! no acknowledged write is lost, and the old leader follows the new one without a rewind.

mod common;

use std::time::{Duration, Instant};

use common::ha::Ha;
use pgwarden_testkit::eventually;

const BOOT: Duration = Duration::from_secs(120);
/// Loose: a test, not a benchmark (bench/failover.sh measures).
const HEAL: Duration = Duration::from_secs(40);
const WRITE_EVERY: Duration = Duration::from_millis(15);

async fn wait_acks(w: &common::ha::Writer, more: usize) {
    let target = w.acked() + more;
    eventually(HEAL, "the writer makes progress", || async {
        (w.acked() >= target).then_some(())
    })
    .await;
}

/// `pgwarden ARGS -c <the proxy's config>` off the runtime's threads.
async fn pgwarden(ha: &Ha, args: &[&str]) -> common::Run {
    common::run_with_config(&ha.dir.path().join("proxy.toml"), args).await
}

/// A switchover to `to` (or the best member) that must succeed: the new leader's index and
/// epoch once every other member streams from it.
async fn switch(ha: &Ha, to: Option<&str>, epoch: u64) -> (usize, u64) {
    let mut args = vec!["switchover"];
    if let Some(to) = to {
        args.extend(["--to", to]);
    }
    let r = pgwarden(ha, &args).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(": done, epoch"), "{}", r.stdout);
    ha.settled(ha.nodes.len() - 1, epoch + 1, HEAL).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_writes_errors_no_client_and_loses_nothing() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    assert_eq!(leader, 0);
    // An idle client of the proxy, between transactions throughout.
    let idle = ha.proxied().await.expect("an idle client");
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;

    let started = Instant::now();
    let (new_leader, new_epoch) = switch(&ha, Some("n2"), epoch).await;
    assert_eq!(
        (new_leader, new_epoch),
        (1, epoch + 1),
        "n2 leads, one epoch on"
    );
    wait_acks(&w, 30).await;
    // The old leader followed without a rewind: it stopped exactly where n2 took over.
    let old = ha.agent_log(0);
    assert!(
        !old.contains("rewinding"),
        "no rewind after a switchover:\n{old}"
    );
    let sw = ha
        .store()
        .await
        .switchover()
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(
        sw.value.phase,
        pgwarden_dcs::SwitchoverPhase::Done,
        "{sw:?}"
    );
    assert_eq!(sw.value.epoch, Some(new_epoch), "{sw:?}");
    let gap = sw.value.write_gap_ms().expect("a write gap");
    let r = pgwarden(&ha, &["list", "--json"]).await;
    let listed: serde_json::Value = serde_json::from_str(&r.stdout).expect("list --json");
    assert_eq!(listed["switchover"]["phase"], "done", "{listed}");
    assert_eq!(listed["switchover"]["to"], "n2", "{listed}");
    assert_eq!(listed["switchover"]["write_gap_ms"], gap, "{listed}");
    eprintln!(
        "switchover n1 -> n2: writes held {gap} ms (store), longest gap between acks {:?}",
        w.log.lock().expect("log").longest_gap_after(started)
    );

    // And back, to the best member (n1 or n3, whichever is furthest ahead).
    let first = w.acked();
    let (back, _) = switch(&ha, None, new_epoch).await;
    assert_ne!(back, 1, "someone else leads");
    wait_acks(&w, 30).await;

    let log = w.stop();
    assert_eq!(log.errors, Vec::new(), "no client saw an error");
    assert_eq!(log.reconnects, 0, "no session was ended");
    // One writer at a time, in each switchover (n1 may write again after the second).
    for part in [&log.acks[..first], &log.acks[first..]] {
        let part = common::ha::Log {
            acks: part.to_vec(),
            ..Default::default()
        };
        part.writers_in_order().expect("one writer at a time");
    }
    assert_eq!(
        ha.lost(back, &log).await,
        Vec::<i64>::new(),
        "no acknowledged write lost"
    );
    // Both are in the history, with the write gap each recorded.
    let r = pgwarden(&ha, &["history", "--json", "--availability", "1h"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let h: serde_json::Value = serde_json::from_str(&r.stdout).expect("history --json");
    let events = h["events"].as_array().expect("events");
    let switchovers: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "switchover")
        .collect();
    assert_eq!(switchovers.len(), 2, "{h}");
    assert_eq!(switchovers[0]["from"], "n1", "{h}");
    assert_eq!(switchovers[0]["to"], "n2", "{h}");
    assert_eq!(
        switchovers[0]["up_ms"].as_u64().unwrap_or(0)
            - switchovers[0]["down_ms"].as_u64().unwrap_or(0),
        gap,
        "{h}"
    );
    assert_eq!(h["availability"]["outages"], 2, "{h}");
    assert_eq!(h["availability"]["unplanned"], 0, "{h}");
    assert!(
        h["availability"]["mttr_ms"].is_null(),
        "no unplanned outage: {h}"
    );
    let row = idle
        .query_one("SELECT inet_server_port()", &[])
        .await
        .expect("the idle client goes on");
    assert!(row.get::<_, Option<i32>>(0).is_some());
    for i in 0..3 {
        assert!(!ha.agent_log(i).contains("rewinding"), "n{} rewound", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_that_cannot_proceed_is_refused_with_its_reason_and_one_can_be_scheduled() {
    let ha = Ha::start(3, "", &|i| {
        if i == 2 {
            "nofailover = true".into()
        } else {
            String::new()
        }
    })
    .await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    assert_eq!(leader, 0);
    let store = ha.store().await;
    for (args, phrase) in [
        (vec!["switchover", "--to", "n1"], "n1 already leads"),
        (vec!["switchover", "--to", "n9"], "n9 is not a member"),
        (vec!["switchover", "--to", "n3"], "n3 is tagged nofailover"),
    ] {
        let r = pgwarden(&ha, &args).await;
        assert_ne!(r.code, 0, "{args:?}: {}", r.stdout);
        assert!(r.stderr.contains(phrase), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
        assert_eq!(
            store.switchover().await.expect("read"),
            None,
            "{args:?}: nothing written"
        );
    }
    let r = pgwarden(&ha, &["switchover", "--at", "tomorrow"]).await;
    assert_eq!(r.code, 2, "{}", r.stdout);
    let first = r.stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains("'tomorrow'") && first.contains("RFC 3339"),
        "{}",
        r.stderr
    );
    let r = pgwarden(&ha, &["pause"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = pgwarden(&ha, &["switchover", "--to", "n2"]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("paused"), "{}", r.stderr);
    let r = pgwarden(&ha, &["resume"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Scheduled: asked for now, carried out when due, not before.
    let asked = Instant::now();
    let r = pgwarden(&ha, &["switchover", "--at", "+4s"]).await;
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("from n1 to n2 scheduled at"),
        "{}",
        r.stdout
    );
    let r = pgwarden(&ha, &["switchover", "--to", "n2"]).await;
    assert_eq!(r.code, 1, "one at a time: {}", r.stdout);
    assert!(r.stderr.contains("already under way"), "{}", r.stderr);
    let (l, e) = ha.settled(2, epoch + 1, HEAL).await;
    assert_eq!((l, e), (1, epoch + 1));
    assert!(
        asked.elapsed() >= Duration::from_secs(3),
        "not before it was due: {:?}",
        asked.elapsed()
    );
    let sw = store.switchover().await.expect("read").expect("recorded");
    assert_eq!(
        sw.value.phase,
        pgwarden_dcs::SwitchoverPhase::Done,
        "{sw:?}"
    );
}

/// A hundred switchovers around the three members in a loop (about 90 s), under writes and
/// reads through the proxy: each one done, no client error, nothing lost, never two writers,
/// never a rewind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_in_a_loop_error_no_client() {
    switchovers_in_a_loop("", 100).await;
}

/// The same in synchronous mode, where the target names its synchronous standbys while the
/// leader drains (a reload just before the promotion could delay it by up to a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_in_synchronous_mode_error_no_client() {
    switchovers_in_a_loop("synchronous_mode = \"on\"", 4).await;
}

async fn switchovers_in_a_loop(agent_toml: &str, rounds: usize) {
    let ha = Ha::start(3, agent_toml, &|_| String::new()).await;
    let (mut leader, mut epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 10).await;
    let reader = ha.proxied().await.expect("a reader");
    let read_errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reads = {
        let errors = read_errors.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                match reader.query_one("SELECT count(*) FROM w", &[]).await {
                    Ok(_) => n += 1,
                    Err(e) => errors.lock().expect("errors").push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                if n > 1_000_000 {
                    break;
                }
            }
        })
    };
    let mut bounds = vec![0];
    let mut gaps = Vec::new();
    for _ in 0..rounds {
        let to = format!("n{}", (leader + 1) % 3 + 1);
        let (l, e) = switch(&ha, Some(&to), epoch).await;
        assert_eq!(ha.nodes[l].name, to);
        (leader, epoch) = (l, e);
        let sw = ha
            .store()
            .await
            .switchover()
            .await
            .expect("read")
            .expect("recorded");
        gaps.push(sw.value.write_gap_ms().expect("done"));
        wait_acks(&w, 5).await;
        bounds.push(w.acked());
    }
    reads.abort();
    let log = w.stop();
    eprintln!("writes held per switchover (ms): {gaps:?}");
    assert_eq!(log.errors, Vec::new(), "no writer error");
    assert_eq!(log.reconnects, 0, "no session ended");
    assert_eq!(
        *read_errors.lock().expect("errors"),
        Vec::<String>::new(),
        "no reader error"
    );
    for pair in bounds.windows(2) {
        let part = common::ha::Log {
            acks: log.acks[pair[0]..pair[1]].to_vec(),
            ..Default::default()
        };
        part.writers_in_order().expect("one writer at a time");
    }
    assert_eq!(
        ha.lost(leader, &log).await,
        Vec::<i64>::new(),
        "nothing lost"
    );
    for i in 0..3 {
        assert!(!ha.agent_log(i).contains("rewinding"), "n{} rewound", i + 1);
    }
}

/// `POST /switchover` on any agent's API: refused without the credentials of `[agent.api]`,
/// refused with its reason when it cannot proceed, carried out and answered when it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_switches_over_with_credentials_and_refuses_without() {
    use base64::Engine;
    let ha = Ha::start(
        3,
        "[agent.api]\nusername = \"ops\"\npassword = \"pw\"",
        &|_| String::new(),
    )
    .await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    assert_eq!(leader, 0);
    let api = format!("127.0.0.1:{}", ha.nodes[2].api_port);
    let basic = |user: &str, pw: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
    };
    let post = |target: &'static str, auth: Option<String>, body: &'static str| {
        let api = api.clone();
        async move {
            pgwarden_ha::api::call(
                &api,
                "POST",
                target,
                auth.as_deref(),
                body,
                Duration::from_secs(90),
            )
            .await
            .expect("an answer")
        }
    };
    let store = ha.store().await;
    let (status, body) = post("/switchover", None, r#"{"candidate": "n2"}"#).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = post(
        "/switchover",
        Some(basic("ops", "wrong")),
        r#"{"candidate": "n2"}"#,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        store.switchover().await.expect("read"),
        None,
        "nothing written"
    );
    // Reads stay open (no auth_reads): a load balancer's checks need no credentials.
    let (status, _) = pgwarden_ha::api::get(
        &format!("127.0.0.1:{}", ha.nodes[0].api_port),
        "/primary",
        Duration::from_secs(2),
    )
    .await
    .expect("GET /primary");
    assert_eq!(status, 200);
    let ops = || Some(basic("ops", "pw"));
    let (status, body) = post(
        "/switchover",
        ops(),
        r#"{"leader": "n2", "candidate": "n3"}"#,
    )
    .await;
    assert_eq!(status, 412, "{body}");
    assert!(
        body.contains("it was asked of n2, and n1 leads now"),
        "{body}"
    );
    let (status, body) = post("/switchover", ops(), r#"{"candidat": "n3"}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post("/failover", ops(), r#"{"candidate": "n3"}"#).await;
    assert_eq!(status, 412, "{body}");
    assert!(body.contains("n1 holds the leader key"), "{body}");
    assert_eq!(
        store.switchover().await.expect("read"),
        None,
        "nothing written"
    );

    let (status, body) = post(
        "/switchover",
        ops(),
        r#"{"leader": "n1", "candidate": "n2"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let done: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(done["phase"], "done", "{done}");
    assert_eq!(done["to"], "n2", "{done}");
    assert_eq!(done["epoch"], epoch + 1, "{done}");
    let (l, e) = ha.settled(2, epoch + 1, HEAL).await;
    assert_eq!((l, e), (1, epoch + 1));
}

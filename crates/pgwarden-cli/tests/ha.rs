//! Fault tests of the HA agents as processes: real etcd, `pgwarden agent` per node, the proxy
//! following the store, and a writer through it. Each checks that the cluster heals within a
//! loose bound, that no server acknowledged a write after another took over, and what was lost.

mod common;

use std::time::{Duration, Instant};

use common::ha::Ha;
use nix::sys::signal::Signal;
use pgwarden_testkit::eventually;
use pgwarden_testkit::fault::Fault;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_restarts_in_place() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    let pid = ha.postmaster_pid(leader).expect("postmaster");
    let fault = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    wait_acks(&w, 50).await;
    let (l, e) = ha.settled(2, 1, HEAL).await;
    assert_eq!(
        (l, e),
        (leader, epoch),
        "restarted in place: same leader, same epoch"
    );
    let log = w.stop();
    log.writers_in_order().expect("one writer at a time");
    assert_eq!(
        ha.lost(leader, &log).await,
        Vec::<i64>::new(),
        "a crash loses no commit"
    );
    eprintln!(
        "write gap after the crash: {:?}, errors {:?}",
        log.longest_gap_after(fault),
        log.errors
    );
    // At most the statement running when the server died; the next ones wait for it.
    assert!(
        log.errors.len() <= 1,
        "clients between transactions saw errors: {:?}",
        log.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_fails_over_and_comes_back_as_a_replica() {
    let mut ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    let pm = ha.postmaster_pid(leader).expect("postmaster");
    let fault = Instant::now();
    // The agent alone is killed: its PostgreSQL dies with it (the design), so this is
    // process death of the node.
    ha.kill_agent(leader);
    eventually(
        Duration::from_secs(10),
        "postgres died with its agent",
        || async {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pm), None)
                .is_err()
                .then_some(())
        },
    )
    .await;
    let (new_leader, new_epoch) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    wait_acks(&w, 50).await;
    // The old node comes back: it rejoins as a replica of the new leader, on its timeline.
    ha.start_agent(leader);
    let (l, e) = ha.settled(2, new_epoch, HEAL).await;
    assert_eq!((l, e), (new_leader, new_epoch));
    let log = w.stop();
    log.writers_in_order().expect("one writer at a time");
    let lost = ha.lost(new_leader, &log).await;
    eprintln!(
        "write gap {:?}, {} acknowledged writes lost (asynchronous), client errors {:?}",
        log.longest_gap_after(fault),
        lost.len(),
        log.errors
    );
    assert!(
        log.errors.len() <= 1,
        "clients between transactions saw errors: {:?}",
        log.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_replaced_and_rejoins() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    ha.signal_tree(leader, Signal::SIGSTOP);
    let (new_leader, new_epoch) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    wait_acks(&w, 50).await;
    ha.signal_tree(leader, Signal::SIGCONT);
    // Woken, the old primary's agent finds its lease long gone: it fences before anything
    // else, then rejoins.
    let (l, _) = ha.settled(2, new_epoch, HEAL).await;
    assert_eq!(l, new_leader);
    wait_acks(&w, 20).await;
    let log = w.stop();
    log.writers_in_order()
        .expect("the old primary took no write after the promotion");
    assert!(
        ha.agent_log(leader).contains("fencing"),
        "the woken leader fenced itself:\n{}",
        ha.agent_log(leader)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_from_etcd_fences_itself_before_anyone_is_promoted() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let direct = ha.direct(leader).await.expect("connect to the leader");
    direct
        .batch_execute("CREATE TABLE probe (x int)")
        .await
        .expect("create");
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    ha.link(leader, Fault::Blackhole);
    // Clients can still reach its PostgreSQL; the moment a new leader's epoch appears, the old
    // one must already refuse writes.
    let store = ha.store().await;
    eventually(HEAL, "a new epoch", || async {
        let l = store.leader().await.ok()??;
        (l.epoch.0 > epoch).then_some(())
    })
    .await;
    let late = direct.execute("INSERT INTO probe VALUES (1)", &[]).await;
    assert!(
        late.is_err(),
        "the old leader took a write after the new epoch"
    );
    let (new_leader, new_epoch) = ha.settled(1, epoch + 1, HEAL).await;
    assert_ne!(new_leader, leader);
    ha.link(leader, Fault::Pass);
    let (l, _) = ha.settled(2, new_epoch, HEAL).await;
    assert_eq!(l, new_leader, "healed: the old leader rejoined");
    wait_acks(&w, 20).await;
    w.stop().writers_in_order().expect("one writer at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_blip_to_etcd_causes_no_failover() {
    let ha = Ha::start(3, "", &|_| String::new()).await;
    let (leader, epoch) = ha.settled(2, 1, BOOT).await;
    let w = ha.writer(WRITE_EVERY).await;
    wait_acks(&w, 20).await;
    // 3 s of silence between every agent and etcd, with the default ttl of 7 s.
    for i in 0..3 {
        ha.link(i, Fault::Blackhole);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..3 {
        ha.link(i, Fault::Pass);
    }
    // Past the lease's lifetime: had anything lapsed, a new epoch would be out by now.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (l, e) = ha.settled(2, 1, HEAL).await;
    assert_eq!((l, e), (leader, epoch), "no failover for a 3 s blip");
    wait_acks(&w, 20).await;
    let log = w.stop();
    assert!(
        log.errors.is_empty(),
        "clients saw errors: {:?}",
        log.errors
    );
}

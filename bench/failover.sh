#!/usr/bin/env bash
# Failover benchmark: pgwarden and Patroni side by side on this machine, same etcd and
# PostgreSQL, three members on 127.0.0.1. Faults: kill-postgres (the leader's postmaster),
# kill-node (its agent and every PostgreSQL process, stopped then killed as one unit), freeze
# (SIGSTOP of the same, SIGCONT after the failover) and partition (the leader's agent cut from
# etcd by a fault proxy while clients still reach its PostgreSQL). Each fault lands at a random
# phase of the agents' loop; a writer inserts one increasing id every 15 ms (pgwarden: through
# pgwarden proxy; Patroni: each host in turn, as libpq's target_session_attrs=read-write does, which
# gives up on an insert unanswered for 1 s and reconnects on any error).
#
#   bench/failover.sh [--runs N] [--patroni-runs M] [--only pgwarden|pgwarden-sync|patroni]
#                     [--fault kill-postgres|kill-node|freeze|partition|switchover]
#
# `switchover` is no fault: a planned switchover to the next member (pgwarden switchover --to;
# patronictl switchover --candidate --force), its "RTO" the write gap from the command's start.
#
# Prints per system and fault: RTO p50 / p99 / max (fault -> first acknowledged write from a
# server that could not have taken it before), failed writes (in flight at the fault; "errors":
# sent after it, by a client between transactions), sessions reopened, lost acknowledged writes,
# writes acknowledged by a non-leader, timeline bumps on a crash, and runs without recovery; then
# the p50 ratios. Patroni runs with its defaults (ttl 30 / loop_wait 10 / retry_timeout 10) and
# tuned (10 / 2 / 3); pgwarden with its defaults (asynchronous) and with synchronous_mode = "on"
# ("pgwarden (sync on)", where no acknowledged write may be lost). Not a test: numbers depend on
# the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v patroni >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends patroni >/dev/null; }
command -v etcd >/dev/null || { apt-get update -qq && apt-get install -y -qq etcd-server etcd-client >/dev/null; }
exec cargo bench -q -p pgwarden-cli --bench failover -- "$@"

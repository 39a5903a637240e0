#!/usr/bin/env bash
# Routing benchmark: what read/write splitting costs the proxy and where reads land. A 3-node
# demo cluster (a primary, two streaming standbys) and two `pgwarden proxy` processes over it,
# one with read_write_split = false ("off": everything to the primary, no classification) and
# one with consistency = "strong" ("classify": every batch classified, reads kept on the
# primary: the classifier's cost alone, same server work as off), and one with the defaults
# ("on": reads to the replicas by latency, session consistency). Alternating runs of:
#   - pgbench -S -M prepared and -M simple (a new literal in every query text): tps and the
#     proxy's CPU seconds per 10,000 transactions, classify vs off and on vs off;
#   - read-your-writes (pgbench script: UPDATE a row, then SELECT it), on vs off: tps, and where
#     the SELECTs went (SHOW NODES routed_reads before and after) and how many position probes
#     it took; and the same with read_your_writes_wait = "0ms" (a read goes to the primary
#     unless the replica has replayed the write when it is first asked).
# PgBouncer has no read/write splitting, so "off" is the reference.
#
#   bench/routing.sh [-T seconds per run] [-r rounds] [-c clients] [-s scale]
set -euo pipefail
cd "$(dirname "$0")/.."

T=6; ROUNDS=4; CLIENTS=16; SCALE=10
while getopts "T:r:c:s:" o; do
  case $o in T) T=$OPTARG;; r) ROUNDS=$OPTARG;; c) CLIENTS=$OPTARG;; s) SCALE=$OPTARG;; *) exit 2;; esac
done

cargo build --release -q -p pgwarden-cli
PGW=$PWD/target/release/pgwarden
BIN=$(dirname "$(readlink -f "$(ls /usr/lib/postgresql/*/bin/pgbench | sort -V | tail -1)")")
WORK=$(mktemp -d /tmp/pgwarden-routing.XXXXXX); chmod 755 "$WORK"
PG_PORT=27732; DEMO_PROXY_PORT=27745; OFF_PORT=27746; ON_PORT=27747; CLS_PORT=27748; NOW_PORT=27749

cleanup() {
  for p in ${OFF_PID:-} ${ON_PID:-} ${CLS_PID:-} ${NOW_PID:-}; do kill "$p" 2>/dev/null || true; done
  [ -n "${DEMO_PID:-}" ] && kill "$DEMO_PID" 2>/dev/null && wait "$DEMO_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$PGW" demo --dir "$WORK/demo" --nodes 3 --port-base $PG_PORT --proxy-port $DEMO_PROXY_PORT > "$WORK/demo.out" 2> "$WORK/demo.err" &
DEMO_PID=$!
until grep -q "pgwarden demo ready" "$WORK/demo.out" 2>/dev/null; do
  kill -0 $DEMO_PID 2>/dev/null || { cat "$WORK/demo.err"; exit 1; }; sleep 0.2
done
CONFIG=$WORK/demo/pgwarden.toml
APP_PW=$(awk '/\[\[proxy.users\]\]/{u=1} u && /^password/{gsub(/"/,"",$3); print $3; exit}' "$CONFIG")
export PGPASSWORD=$APP_PW

proxy_config() { # port routing-lines -> a config: the demo's, with a [proxy] section of its own
  cat <<TOML
$(sed -e '/^\[proxy\]$/,/^\[\[proxy.users\]\]/{/^\[\[proxy.users\]\]/!d}' -e '/^\[\[proxy.users\]\]/,$d' "$CONFIG")
[proxy]
listen = "127.0.0.1:$1"
pool_mode = "transaction"
default_pool_size = 20
max_client_conn = 2000
admin_users = ["app"]
[proxy.routing]
$2
$(sed -n '/^\[\[proxy.users\]\]/,$p' "$CONFIG")
TOML
}
proxy_config $OFF_PORT "read_write_split = false" | sed "s|^data_dir = \"\(n[0-9]\)\"|data_dir = \"$WORK/demo/\1\"|" > "$WORK/off.toml"
proxy_config $ON_PORT "" | sed "s|^data_dir = \"\(n[0-9]\)\"|data_dir = \"$WORK/demo/\1\"|" > "$WORK/on.toml"
proxy_config $CLS_PORT "consistency = \"strong\"" | sed "s|^data_dir = \"\(n[0-9]\)\"|data_dir = \"$WORK/demo/\1\"|" > "$WORK/cls.toml"
proxy_config $NOW_PORT "read_your_writes_wait = \"0ms\"" | sed "s|^data_dir = \"\(n[0-9]\)\"|data_dir = \"$WORK/demo/\1\"|" > "$WORK/now.toml"
for v in off on cls now; do
  PGWARDEN_LOG=warn setsid "$PGW" proxy -c "$WORK/$v.toml" 2> "$WORK/$v.err" < /dev/null &
  eval "${v^^}_PID=$!"
done
for p in $OFF_PORT $ON_PORT $CLS_PORT $NOW_PORT; do
  for _ in $(seq 100); do "$BIN/pg_isready" -q -h 127.0.0.1 -p $p && break; sleep 0.1; done
  "$BIN/pg_isready" -q -h 127.0.0.1 -p $p || { echo "nothing listens on $p" >&2; cat "$WORK"/*.err >&2; exit 1; }
done

"$BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p $PG_PORT -U app app > /dev/null 2>&1
# The standbys have the tables before anything is measured.
sleep 2

cat > "$WORK/ryw.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

run() { # port pid pgbench-args... -> "tps cpu_s_per_10k"
  local port=$1 pid=$2; shift 2
  "$BIN/pgbench" -n "$@" -c "$CLIENTS" -j 2 -T 1 -h 127.0.0.1 -p "$port" -U app app > /dev/null 2>&1 || true
  local log="$WORK/run.log" c0 c1
  "$BIN/pgbench" -n "$@" -c "$CLIENTS" -j 2 -T $((T + 3)) -P 1 --progress-timestamp \
    -h 127.0.0.1 -p "$port" -U app app > "$log" 2>&1 &
  local bench=$! t0 t1
  sleep 2
  t0=$(date +%s.%N); c0=$(cpu_of "$pid")
  sleep "$T"
  t1=$(date +%s.%N); c1=$(cpu_of "$pid")
  if ! wait "$bench"; then echo "pgbench $* failed: $(grep -m1 -iE 'error|fatal' "$log")" >&2; echo "n/a n/a"; return; fi
  local tps failed tx
  tps=$(awk '/^tps/{print $3; exit}' "$log")
  failed=$(awk '/number of failed transactions/{print $5; exit}' "$log")
  if [ -z "$tps" ] || [ "${failed:-0}" != "0" ]; then echo "n/a n/a"; return; fi
  tx=$(awk -v a="$t0" -v b="$t1" '/^progress: /{
      ts = $2 + 0; lo = (prev ? prev : ts - 1); prev = ts
      s = (lo > a ? lo : a); e = (ts < b ? ts : b); if (e > s) n += $4 * (e - s) }
    END { printf "%.0f", n }' "$log")
  awk -v tps="$tps" -v a="$c0" -v b="$c1" -v hz="$HZ" -v tx="$tx" 'BEGIN{printf "%s %.3f\n", tps, (tx > 0 ? (b-a)/hz/tx*10000 : 0)}'
}

median() {
  printf "%s\n" "$@" | { grep -v '^n/a$' || true; } | sort -g |
    awk '{a[NR]=$1} END{ if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else print "-" }'; }

# routed reads per node on the "on" proxy, and position probes of the replicas: "primary replicas probes"
routed() { # [port]
  "$BIN/psql" -X -q -A -t -F '|' -h 127.0.0.1 -p "${1:-$ON_PORT}" -U app pgwarden -c "SHOW NODES" |
    awk -F'|' '{ if ($4 == "primary") p += $16; else if ($4 == "replica") { r += $16; q += $18 } } END { printf "%d %d %d\n", p, r, q }'
}

printf "%-20s %7s | %10s %8s | %10s %8s %6s | %10s %8s %6s %6s\n" workload clients off_tps cpu/10k classify cpu/10k cpu_x on_tps cpu/10k tps_x cpu_x
for mode in prepared simple; do
  OT=(); OC=(); KT=(); KC=(); NT=(); NC=(); KR=(); XR=(); CR=()
  for r in $(seq "$ROUNDS"); do
    # Rotate the order so that none always runs first.
    order=("off" "cls" "on"); [ $((r % 3)) -eq 1 ] && order=("cls" "on" "off"); [ $((r % 3)) -eq 2 ] && order=("on" "off" "cls")
    for v in "${order[@]}"; do
      case $v in
        off) read -r ot oc < <(run $OFF_PORT "$OFF_PID" -S -M "$mode");;
        cls) read -r kt kc < <(run $CLS_PORT "$CLS_PID" -S -M "$mode");;
        on) read -r nt nc < <(run $ON_PORT "$ON_PID" -S -M "$mode");;
      esac
    done
    OT+=("$ot"); OC+=("$oc"); KT+=("$kt"); KC+=("$kc"); NT+=("$nt"); NC+=("$nc")
    KR+=("$(ratio "$kc" "$oc")"); XR+=("$(ratio "$nt" "$ot")"); CR+=("$(ratio "$nc" "$oc")")
  done
  printf "%-20s %7s | %10.0f %8s | %10.0f %8s %6s | %10.0f %8s %6s %6s\n" "pgbench -S $mode" "$CLIENTS" \
    "$(median "${OT[@]}")" "$(median "${OC[@]}")" "$(median "${KT[@]}")" "$(median "${KC[@]}")" "$(median "${KR[@]}")" \
    "$(median "${NT[@]}")" "$(median "${NC[@]}")" "$(median "${XR[@]}")" "$(median "${CR[@]}")"
done

read -r p0 r0 q0 < <(routed)
RT=(); RC=()
for r in $(seq "$ROUNDS"); do
  read -r t c < <(run $ON_PORT "$ON_PID" -f "$WORK/ryw.sql" -M prepared)
  RT+=("$t"); RC+=("$c")
done
read -r p1 r1 q1 < <(routed)
read -r w0 v0 x0 < <(routed $NOW_PORT)
WT=(); WC=()
for r in $(seq "$ROUNDS"); do
  read -r t c < <(run $NOW_PORT "$NOW_PID" -f "$WORK/ryw.sql" -M prepared)
  WT+=("$t"); WC+=("$c")
done
read -r w1 v1 x1 < <(routed $NOW_PORT)
OT=(); OC=()
for r in $(seq "$ROUNDS"); do
  read -r t c < <(run $OFF_PORT "$OFF_PID" -f "$WORK/ryw.sql" -M prepared)
  OT+=("$t"); OC+=("$c")
done
printf "%-20s %7s | %10.0f %8s | %10s %8s %6s | %10.0f %8s %6s %6s\n" "read-your-writes" "$CLIENTS" \
  "$(median "${OT[@]}")" "$(median "${OC[@]}")" - - - "$(median "${RT[@]}")" "$(median "${RC[@]}")" \
  "$(ratio "$(median "${RT[@]}")" "$(median "${OT[@]}")")" "$(ratio "$(median "${RC[@]}")" "$(median "${OC[@]}")")"
printf "%-20s %7s | %10.0f %8s | %10s %8s %6s | %10.0f %8s %6s %6s\n" "  ryw, wait 0ms" "$CLIENTS" \
  "$(median "${OT[@]}")" "$(median "${OC[@]}")" - - - "$(median "${WT[@]}")" "$(median "${WC[@]}")" \
  "$(ratio "$(median "${WT[@]}")" "$(median "${OT[@]}")")" "$(ratio "$(median "${WC[@]}")" "$(median "${OC[@]}")")"
echo
awk -v p=$((w1 - w0)) -v r=$((v1 - v0)) -v q=$((x1 - x0)) 'BEGIN{ printf "read-your-writes, read_your_writes_wait = 0ms: %.1f%% of reads on replicas; %.2f probes a read\n", (r + p > 0 ? 100 * r / (r + p) : 0), (r + p > 0 ? q / (r + p) : 0) }'
awk -v p=$((p1 - p0)) -v r=$((r1 - r0)) -v q=$((q1 - q0)) 'BEGIN{ printf "read-your-writes (session consistency): %d reads on replicas, %d on the primary: %.1f%% on replicas; %d position probes of the replicas (%.2f a read)\n", r, p, (r + p > 0 ? 100 * r / (r + p) : 0), q, (r + p > 0 ? q / (r + p) : 0) }'
echo
echo "on proxy, SHOW ROUTES:"
"$BIN/psql" -X -q -h 127.0.0.1 -p $ON_PORT -U app pgwarden -c "SHOW ROUTES"

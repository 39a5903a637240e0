#!/usr/bin/env bash
# Proxy benchmark: pgbench -S against PostgreSQL directly, PgBouncer and pgwarden (transaction
# pooling, same pool size), for -M simple/extended/prepared and several client counts, alternating
# runs. Prints tps, average latency, the proxy's CPU seconds per 10,000 transactions, and ratios to
# PgBouncer. Not a test: numbers depend on the machine.
#
#   bench/proxy.sh [-T seconds per run] [-r rounds] [-c "1 16 64 256"]
#                  [-M "simple extended prepared"] [-s scale]
#                  [-w proxy worker threads: 0 (default: what pgwarden chooses, as users get it), 1, 2, ...]
#
# Each cell is the median of -r rounds (default 4, an even number so that each proxy runs first
# equally often) that alternate which proxy runs first; each run follows a one-second warm-up
# run of its own (connections made, pools filled, the machine on this target); runs
# of the same setup on a small VM vary by ±20%, so single runs cannot settle 10% differences.
# The ratios are the medians of the per-round ratios (each round's two proxies ran back to back,
# so a slow spell of the machine hits both), the last column their range. CPU is per transaction
# in a window after every client has logged in; the CPU of a login is printed on its own (with
# a plaintext password PgBouncer derives the SCRAM keys at every login, ~20x pgwarden's cost, which
# would otherwise count against it at 256 clients).
set -euo pipefail
cd "$(dirname "$0")/.."

T=6; ROUNDS=4; CLIENTS="1 16 64 256"; MODES="simple extended prepared"; SCALE=10; POOL=20; WORKERS=0
while getopts "T:r:c:M:s:w:" o; do
  case $o in T) T=$OPTARG;; r) ROUNDS=$OPTARG;; c) CLIENTS=$OPTARG;; M) MODES=$OPTARG;; s) SCALE=$OPTARG;; w) WORKERS=$OPTARG;; *) exit 2;; esac
done

command -v pgbouncer >/dev/null || { apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null; }
cargo build --release -q -p pgwarden-cli
PGW=$PWD/target/release/pgwarden
BIN=$(dirname "$(readlink -f "$(ls /usr/lib/postgresql/*/bin/pgbench | sort -V | tail -1)")")
WORK=$(mktemp -d /tmp/pgwarden-bench.XXXXXX); chmod 755 "$WORK"
# Below the ephemeral port range (32768-60999), so no outgoing connection can hold them.
PG_PORT=27432; BOUNCER_PORT=27532; PGW_PORT=27533; DEMO_PROXY_PORT=27534

cleanup() {
  [ -n "${PGW_PID:-}" ] && kill "$PGW_PID" 2>/dev/null || true
  [ -n "${BOUNCER_PID:-}" ] && kill "$BOUNCER_PID" 2>/dev/null || true
  [ -n "${DEMO_PID:-}" ] && kill "$DEMO_PID" 2>/dev/null && wait "$DEMO_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# PostgreSQL: a one-node demo cluster.
"$PGW" demo --dir "$WORK/demo" --nodes 1 --port-base $PG_PORT --proxy-port $DEMO_PROXY_PORT > "$WORK/demo.out" 2> "$WORK/demo.err" &
DEMO_PID=$!
until grep -q "pgwarden demo ready" "$WORK/demo.out" 2>/dev/null; do
  kill -0 $DEMO_PID 2>/dev/null || { cat "$WORK/demo.err"; exit 1; }; sleep 0.2
done
CONFIG=$WORK/demo/pgwarden.toml
# Room for 256 direct clients next to both proxies' pools: raise max_connections, restart.
sed -i 's/max_connections = 100/max_connections = 400/' "$CONFIG"
kill $DEMO_PID; wait $DEMO_PID || true
"$PGW" demo --dir "$WORK/demo" > "$WORK/demo.out" 2> "$WORK/demo.err" &
DEMO_PID=$!
until grep -q "pgwarden demo ready" "$WORK/demo.out" 2>/dev/null; do
  kill -0 $DEMO_PID 2>/dev/null || { cat "$WORK/demo.err"; exit 1; }; sleep 0.2
done
APP_PW=$(awk '/\[\[proxy.users\]\]/{u=1} u && /^password/{gsub(/"/,"",$3); print $3; exit}' "$CONFIG")
export PGPASSWORD=$APP_PW

# pgwarden proxy: the demo config with a [proxy] section of its own instead of the demo's.
cat > "$WORK/proxy.toml" <<TOML
$(sed -e '/^\[proxy\]$/,/^\[\[proxy.users\]\]/{/^\[\[proxy.users\]\]/!d}' -e '/^\[\[proxy.users\]\]/,$d' "$CONFIG")
[proxy]
listen = "127.0.0.1:$PGW_PORT"
pool_mode = "transaction"
workers = $WORKERS
default_pool_size = $POOL
max_client_conn = 20000
$(sed -n '/^\[\[proxy.users\]\]/,$p' "$CONFIG")
TOML
sed -i "s|^data_dir = \"n1\"|data_dir = \"$WORK/demo/n1\"|" "$WORK/proxy.toml"
# In a session of its own, as PgBouncer (-d) is: with the kernel's autogroup scheduling a
# process that shares pgbench's session also shares its CPU share (pgwarden then woke about
# twice as often per transaction and lost ~7% tps to the same binary in its own session).
PGWARDEN_LOG=warn setsid "$PGW" proxy -c "$WORK/proxy.toml" 2> "$WORK/proxy.err" < /dev/null &
PGW_PID=$!

# PgBouncer 1.18 as postgres (it refuses root), same pool size, SCRAM.
mkdir -p "$WORK/bouncer"
echo "\"app\" \"$APP_PW\"" > "$WORK/bouncer/userlist.txt"
cat > "$WORK/bouncer/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$PG_PORT dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/bouncer/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 20000
logfile = $WORK/bouncer/pgbouncer.log
pidfile = $WORK/bouncer/pgbouncer.pid
INI
chown -R postgres "$WORK/bouncer"
if [ "$(id -u)" -eq 0 ]; then
  runuser -u postgres -- pgbouncer -q -d "$WORK/bouncer/pgbouncer.ini"
else
  pgbouncer -q -d "$WORK/bouncer/pgbouncer.ini"
fi
for p in $PGW_PORT $BOUNCER_PORT; do
  for _ in $(seq 100); do "$BIN/pg_isready" -q -h 127.0.0.1 -p $p && break; sleep 0.1; done
  "$BIN/pg_isready" -q -h 127.0.0.1 -p $p || { echo "nothing listens on $p:" >&2; cat "$WORK/proxy.err" >&2; exit 1; }
done
BOUNCER_PID=$(cat "$WORK/bouncer/pgbouncer.pid")

"$BIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p $PG_PORT -U app app > /dev/null 2>&1

cpu_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # utime + stime, in clock ticks
HZ=$(getconf CLK_TCK)

run() { # target mode clients -> "tps latency_ms cpu_s_per_10k"
  local port pid
  case $1 in direct) port=$PG_PORT; pid=;; pgbouncer) port=$BOUNCER_PORT; pid=$BOUNCER_PID;; pgwarden) port=$PGW_PORT; pid=$PGW_PID;; esac
  "$BIN/pgbench" -n -S -M "$2" -c "$3" -j 2 -T 1 -h 127.0.0.1 -p "$port" -U app app > /dev/null 2>&1 || true
  # The proxy's CPU is measured over a window of T seconds that starts 2 s into a run of T + 3
  # seconds, once every client has logged in: per transaction, not per login (logins are
  # measured on their own, below). The window's transactions come from pgbench's progress
  # reports (rate per interval, by timestamp).
  local log="$WORK/run.log" t0 t1 c0 c1
  "$BIN/pgbench" -n -S -M "$2" -c "$3" -j 2 -T $((T + 3)) -P 1 --progress-timestamp \
    -h 127.0.0.1 -p "$port" -U app app > "$log" 2>&1 &
  local bench=$!
  sleep 2
  t0=$(date +%s.%N); [ -n "$pid" ] && c0=$(cpu_of "$pid")
  sleep "$T"
  t1=$(date +%s.%N); [ -n "$pid" ] && c1=$(cpu_of "$pid")
  if ! wait "$bench"; then
    echo "$1 -M $2 -c $3 failed: $(grep -m1 -iE 'error|fatal' "$log")" >&2; echo "n/a n/a n/a"; return
  fi
  local tps lat failed window_tx
  tps=$(awk '/^tps/{print $3; exit}' "$log")
  lat=$(awk '/latency average/{print $4; exit}' "$log")
  failed=$(awk '/number of failed transactions/{print $5; exit}' "$log")
  if [ -z "$tps" ] || [ "${failed:-0}" != "0" ]; then echo "n/a n/a n/a"; return; fi
  window_tx=$(awk -v a="$t0" -v b="$t1" '/^progress: /{
      ts = $2 + 0; lo = (prev ? prev : ts - 1); prev = ts
      s = (lo > a ? lo : a); e = (ts < b ? ts : b); if (e > s) n += $4 * (e - s) }
    END { printf "%.0f", n }' "$log")
  local cpu="-"; [ -n "$pid" ] && [ "${window_tx:-0}" -gt 0 ] &&
    cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$HZ" -v tx="$window_tx" 'BEGIN{printf "%.3f", (b-a)/hz/tx*10000}')
  echo "$tps $lat $cpu"
}

login_ms() { # port pid -> the proxy's CPU milliseconds per client login (SCRAM), 400 logins
  local c0 c1
  c0=$(cpu_of "$2")
  "$BIN/pgbench" -n -S -C -c 4 -j 2 -t 100 -h 127.0.0.1 -p "$1" -U app app > /dev/null 2>&1 || { echo n/a; return; }
  c1=$(cpu_of "$2")
  awk -v a="$c0" -v b="$c1" -v hz="$HZ" 'BEGIN{printf "%.2f", (b-a)/hz/400*1000}'
}

median() { # values (n/a ignored) -> median, or n/a
  printf "%s\n" "$@" | { grep -v '^n/a$' || true; } | sort -g |
    awk '{a[NR]=$1} END{ if (NR == 0) print "n/a"; else if (NR % 2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (a+0 > 0 && b+0 > 0) printf "%.2f", a/b; else print "-" }'; }
paired() { # per-round ratios ("-" ignored) -> their median, or "-"
  local m; m=$(median "$(printf "%s\n" "$@" | sed 's/^-$/n\/a/')")
  if [ "$m" = n/a ]; then echo -; else printf "%.2f" "$m"; fi
}

printf "%-9s %7s | %10s %8s | %10s %8s %8s | %10s %8s %8s | %7s %7s %11s\n" \
  mode clients direct_tps lat_ms bouncer_tps lat_ms cpu/10k pgw_tps lat_ms cpu/10k tps_x cpu_x tps_x_range
for mode in $MODES; do
  for c in $CLIENTS; do
    DT=(); DL=(); WT=(); WL=(); WC=(); BT=(); BL=(); BC=(); XR=(); CR=()
    for r in $(seq "$ROUNDS"); do
      read -r dt dl _ < <(run direct "$mode" "$c")
      # Alternate the order so neither proxy always runs first.
      if [ "$mode" = prepared ]; then
        # PgBouncer 1.18 cannot do prepared statements in transaction mode.
        read -r wt wl wc < <(run pgwarden "$mode" "$c"); bt=n/a; bl=n/a; bc=n/a
      elif [ $((r % 2)) -eq 1 ]; then
        read -r wt wl wc < <(run pgwarden "$mode" "$c")
        read -r bt bl bc < <(run pgbouncer "$mode" "$c")
      else
        read -r bt bl bc < <(run pgbouncer "$mode" "$c")
        read -r wt wl wc < <(run pgwarden "$mode" "$c")
      fi
      DT+=("$dt"); DL+=("$dl"); WT+=("$wt"); WL+=("$wl"); WC+=("$wc"); BT+=("$bt"); BL+=("$bl"); BC+=("$bc")
      XR+=("$(ratio "$wt" "$bt")"); CR+=("$(ratio "$wc" "$bc")")
    done
    dt=$(median "${DT[@]}"); dl=$(median "${DL[@]}"); wt=$(median "${WT[@]}"); wl=$(median "${WL[@]}")
    wc=$(median "${WC[@]}"); bt=$(median "${BT[@]}"); bl=$(median "${BL[@]}"); bc=$(median "${BC[@]}")
    range=$(printf "%s\n" "${XR[@]}" | { grep -v '^-$' || true; } | sort -g | awk 'NR==1{lo=$1} {hi=$1} END{ if (NR) printf "%s-%s", lo, hi; else print "-" }')
    num() { if [ "$1" = n/a ]; then echo n/a; else printf "%.0f" "$1"; fi; }
    printf "%-9s %7s | %10s %8s | %10s %8s %8s | %10s %8s %8s | %7s %7s %11s\n" \
      "$mode" "$c" "$(num "$dt")" "$dl" "$(num "$bt")" "$bl" "$bc" "$(num "$wt")" "$wl" "$wc" \
      "$(paired "${XR[@]}")" "$(paired "${CR[@]}")" "$range"
  done
done

echo
echo "CPU per client login (SCRAM, pgbench -C): PgBouncer $(login_ms $BOUNCER_PORT $BOUNCER_PID) ms, pgwarden $(login_ms $PGW_PORT $PGW_PID) ms"

# Memory with idle clients: logged in (SCRAM), then silent.
IDLE=${IDLE_CLIENTS:-10000}
ulimit -n $(( IDLE * 2 + 1024 )) 2>/dev/null || true
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
r0=$(rss $PGW_PID)
rm -f /tmp/pgwarden-bench-idle-ready
python3 - "$PGW_PORT" "$IDLE" "$APP_PW" <<'PY' &
import base64, hashlib, hmac, os, resource, socket, struct, sys, time
port, n, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, n + 1024))

def recv_msg(s):
    head = b""
    while len(head) < 5:
        head += s.recv(5 - len(head))
    tag, length = head[0:1], struct.unpack("!i", head[1:5])[0]
    body = b""
    while len(body) < length - 4:
        body += s.recv(length - 4 - len(body))
    return tag, body

def msg(tag, body):
    return tag + struct.pack("!i", len(body) + 4) + body

salted = {}
def login():
    s = socket.create_connection(("127.0.0.1", port))
    body = b"user\0app\0database\0app\0\0"
    s.sendall(struct.pack("!ii", len(body) + 8, 196608) + body)
    recv_msg(s)  # AuthenticationSASL
    nonce = base64.b64encode(os.urandom(18))
    first_bare = b"n=,r=" + nonce
    first = b"n,," + first_bare
    s.sendall(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
    _, body = recv_msg(s)  # SASLContinue
    server_first = body[4:]
    attrs = dict(kv.split(b"=", 1) for kv in server_first.split(b","))
    key = (attrs[b"s"], int(attrs[b"i"]))
    if key not in salted:
        salted[key] = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(attrs[b"s"]), key[1])
    sp = salted[key]
    client_key = hmac.new(sp, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    final_bare = b"c=biws,r=" + attrs[b"r"]
    auth = first_bare + b"," + server_first + b"," + final_bare
    sig = hmac.new(stored_key, auth, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig)))
    s.sendall(msg(b"p", final_bare + b",p=" + proof))
    while True:
        tag, body = recv_msg(s)
        if tag == b"E":
            raise SystemExit(f"login failed: {body!r}")
        if tag == b"Z":
            return s

socks = [login() for _ in range(n)]
open("/tmp/pgwarden-bench-idle-ready", "w").write("ok")
time.sleep(8)
PY
IDLE_PID=$!
until [ -f /tmp/pgwarden-bench-idle-ready ]; do
  kill -0 $IDLE_PID 2>/dev/null || { echo "idle clients failed to log in" >&2; break; }
  sleep 0.2
done
sleep 1
r1=$(rss $PGW_PID); rm -f /tmp/pgwarden-bench-idle-ready
echo
echo "pgwarden RSS: $r0 KiB before, $r1 KiB with $IDLE idle logged-in clients: $(( (r1 - r0) * 1024 / IDLE )) bytes per idle client"
wait $IDLE_PID || true

#!/usr/bin/env bash
# relayqd end to end against a real Postfix peer: smtp-sink -d (one dump
# file per message) receives a 2,000-message run; relayqd is killed with
# SIGKILL in the middle and started again. Every message's token is in the
# dumps (none lost), duplicates are at most the leases left by the killed
# daemon, the queue ends empty, and the restarted daemon exits 0 on SIGTERM
# with no sanitizer report.
set -euo pipefail

RELAYQD=${RELAYQD_BIN:?RELAYQD_BIN is not set}
SRC=${RQ_SOURCE_ROOT:?RQ_SOURCE_ROOT is not set}
N=2000
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rq-dsink.XXXXXX")
chmod 755 "$TMP"
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	rm -rf "$TMP"
}
trap cleanup EXIT

die() { echo "FAIL: $*" >&2; for f in "$TMP"/relayqd*.log; do [ -f "$f" ] && tail -20 "$f" >&2; done; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for SECONDS COMMAND...: polls every 50 ms until COMMAND succeeds
wait_for() {
	local secs=$1; shift
	local end=$((SECONDS + secs))
	while ! "$@"; do
		[ $SECONDS -lt $end ] || return 1
		sleep 0.05
	done
}

# ---- redis ----
SOCK="$TMP/redis.sock"
redis-server --port 0 --unixsocket "$SOCK" --unixsocketperm 700 --save '' --dir "$TMP" \
	--daemonize no >"$TMP/redis.log" 2>&1 &
pids+=($!)
wait_for 15 redis-cli -s "$SOCK" ping >/dev/null 2>&1 || die "redis-server did not start"
redis-cli -s "$SOCK" -x FUNCTION LOAD REPLACE <"$SRC/lua/redis/relayq.lua" >/dev/null
rc() { redis-cli -s "$SOCK" "$@"; }
Q="sink-$$"
P="relayq:{$Q}"

# ---- smtp-sink, dumping every message ----
PORT=$(free_port)
mkdir -p "$TMP/dump"
chown nobody "$TMP/dump" 2>/dev/null || chmod 777 "$TMP/dump"
SINK_USER=$(id -un)
[ "$(id -u)" -eq 0 ] && SINK_USER=nobody
smtp-sink -u "$SINK_USER" -d "$TMP/dump/%M%S." "127.0.0.1:$PORT" 256 >"$TMP/sink.log" 2>&1 &
pids+=($!)
sink_up() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
wait_for 15 sink_up || die "smtp-sink did not listen"

# ---- enqueue N messages, pipelined (RESP through redis-cli --pipe) ----
ENV='{"from":"sender@example.com","to":["rcpt@example.net"]}'
awk -v n=$N -v key="$P" -v env="$ENV" 'BEGIN {
	for (i = 0; i < n; i++) {
		body = "Subject: sink " i "\r\nX-Token: sink-" i "-end\r\n\r\nmessage " i "\r\n"
		printf "*6\r\n$5\r\nFCALL\r\n$14\r\nrelayq_enqueue\r\n$1\r\n1\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n",
			length(key), key, length(env), env, length(body), body
	}
}' >"$TMP/enqueue.resp"
rc --pipe <"$TMP/enqueue.resp" >"$TMP/pipe.out" 2>&1 || die "enqueue failed: $(cat "$TMP/pipe.out")"
[ "$(rc LLEN "$P:ready")" -eq $N ] || die "enqueued $(rc LLEN "$P:ready") of $N"

cat >"$TMP/relayq.lua" <<LUA
relayq.config {
  redis = "unix:$SOCK",
  queue = "$Q",
  relay = "[127.0.0.1]:$PORT",
  tls = "none",
  helo = "relayq.test",
  batch = 100,
  lease = "10s",
  connections = 8, per_destination = 8,
}
relayq.backoff { first = "1s", factor = 2, max = "2s", jitter = 0 }
LUA

dumped() { find "$TMP/dump" -type f | wc -l; }
no_sanitizer() { ! grep -q 'ERROR: AddressSanitizer\|ERROR: LeakSanitizer\|runtime error:' "$1"; }

"$RELAYQD" -c "$TMP/relayq.lua" >"$TMP/relayqd-1.log" 2>&1 &
D1=$!
pids+=($D1)
at_least() { [ "$(dumped)" -ge "$1" ]; }
wait_for 60 at_least 500 || die "fewer than 500 messages dumped in 60 s"
kill -9 $D1
wait $D1 2>/dev/null || true
inflight=$(rc ZCARD "$P:inflight")
settled=$(rc HGET "$P:stats" delivered)
echo "killed after $(dumped) dumps, ${settled:-0} settled, $inflight in flight"
no_sanitizer "$TMP/relayqd-1.log" || die "sanitizer report in the killed daemon's log"
[ "${settled:-0}" -lt $N ] || die "the run ended before the kill: nothing tested"
[ "$inflight" -le 200 ] || die "$inflight in flight at the kill, over 2 batches of 100"

"$RELAYQD" -c "$TMP/relayq.lua" >"$TMP/relayqd-2.log" 2>&1 &
D2=$!
pids+=($D2)
all_settled() {
	kill -0 $D2 2>/dev/null || die "the restarted relayqd exited"
	[ "$(rc HGET "$P:stats" delivered)" = "$N" ] &&
		[ "$(rc LLEN "$P:ready")" -eq 0 ] && [ "$(rc ZCARD "$P:scheduled")" -eq 0 ] &&
		[ "$(rc ZCARD "$P:inflight")" -eq 0 ]
}
wait_for 90 all_settled || die "not all settled: delivered $(rc HGET "$P:stats" delivered) of $N, inflight $(rc ZCARD "$P:inflight"), scheduled $(rc ZCARD "$P:scheduled"), dead $(rc ZCARD "$P:dead")"
[ "$(rc ZCARD "$P:dead")" -eq 0 ] || die "dead messages: $(rc ZCARD "$P:dead")"
kill -TERM $D2
st=0
wait $D2 || st=$?
[ $st -eq 0 ] || die "relayqd exited $st on SIGTERM (want 0)"
no_sanitizer "$TMP/relayqd-2.log" || die "sanitizer report in relayqd's log"

# every token at least once; duplicates at most the leases left at the kill
grep -rhoa 'X-Token: sink-[0-9]*-end' "$TMP/dump" | sort | uniq -c >"$TMP/counts"
distinct=$(wc -l <"$TMP/counts")
total=$(awk '{ s += $1 } END { print s + 0 }' "$TMP/counts")
dups=$((total - distinct))
echo "dumped $total messages, $distinct distinct of $N, $dups duplicates (bound $inflight)"
[ "$distinct" -eq $N ] || die "$((N - distinct)) messages lost"
[ "$dups" -le "$inflight" ] || die "$dups duplicates, more than the $inflight in flight at the kill"
echo ok

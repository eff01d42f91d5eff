#!/usr/bin/env bash
# relayqd's runner against a real redis-server and Postfix's smtp-sink:
# a 1,000-message drain over reused connections (and /metrics), 4xx retried / 5xx dead
# with a hint, SIGTERM in the middle of a run (exit 0, nothing lost),
# --check, SIGHUP reload (good and broken file).
#
# Env: RELAYQD_BIN, RELAYQ_BIN (the built binaries), RQ_SOURCE_ROOT.
set -u

TEST_TAG=runner-test
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_redis

start_sink() {  # name, extra args...: sets SINK_PORT, SINK_PID
	local name=$1; shift
	SINK_PORT=$(free_port)
	smtp-sink -c -u nobody "$@" "127.0.0.1:$SINK_PORT" 1000 >"$TMP/$name.log" 2>&1 &
	SINK_PID=$!
	PIDS+=($SINK_PID)
	wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$SINK_PORT" ||
		{ echo "smtp-sink did not start" >&2; exit 1; }
}

write_config() {  # file, queue, port, extra keys, rest
	cat >"$1" <<EOF
relayq.config {
  redis = "unix:$SOCK",
  queue = "$2",
  relay = "[127.0.0.1]:$3",
  tls = "none",
  helo = "relayq.test",
  $4
}
$5
EOF
}

# enqueue QUEUE N DOMAIN: N one-recipient messages in one pipe
enqueue() {
	python3 - "$1" "$2" "$3" <<'PY' | redis-cli -s "$SOCK" --pipe >/dev/null
import sys
q, n, dom = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def cmd(*a):
    out = "*%d\r\n" % len(a)
    for x in a:
        out += "$%d\r\n%s\r\n" % (len(x.encode()), x)
    return out
body = "Subject: test\r\nFrom: a@example.com\r\n\r\n" + ("x" * 70 + "\r\n") * 20
for i in range(n):
    env = '{"from":"a@example.com","to":["r%d@%s"]}' % (i, dom)
    sys.stdout.write(cmd("FCALL", "relayq_enqueue", "1", "relayq:{%s}" % q, env, body))
PY
}

stat() {  # queue, counter
	local v
	v=$(rcli HGET "relayq:{$1}:stats" "$2")
	echo "${v:-0}"
}
count() {  # queue, key suffix (zset or list)
	local t
	t=$(rcli TYPE "relayq:{$1}:$2")
	case $t in
	list) rcli LLEN "relayq:{$1}:$2" ;;
	zset) rcli ZCARD "relayq:{$1}:$2" ;;
	*) echo 0 ;;
	esac
}
stat_ge() { [ "$(stat "$1" "$2")" -ge "$3" ]; }

start_daemon() {  # config, log: sets DPID
	"$D" -c "$1" >>"$2" 2>&1 &
	DPID=$!
	PIDS+=($DPID)
}

sanitizer_report() { grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$1"; }

stop_daemon() {  # log, what: SIGTERM, exit 0 within 30 s, no sanitizer report
	kill -TERM "$DPID"
	local end=$((SECONDS + 30))
	while kill -0 "$DPID" 2>/dev/null && ((SECONDS <= end)); do sleep 0.05; done
	if kill -0 "$DPID" 2>/dev/null; then
		bad "$2: relayqd still running 30 s after SIGTERM"
		kill -9 "$DPID"
	fi
	wait "$DPID"
	local rc=$?
	if [ $rc -eq 0 ]; then ok; else bad "$2: relayqd exit $rc, want 0"; tail -20 "$1" >&2; fi
	if sanitizer_report "$1"; then bad "$2: sanitizer report"; grep -A20 Sanitizer "$1" | head -40 >&2; else ok; fi
}

# ---- 1. 1,000 messages drain over reused connections ----
start_sink sink1
P1=$SINK_PORT
Q1=drain-$$-$RANDOM
MPORT=$(free_port)
write_config "$TMP/c1.lua" "$Q1" "$SINK_PORT" "per_destination = 4, metrics = \"127.0.0.1:$MPORT\"," ''

enqueue "$Q1" 1000 example.net
start_daemon "$TMP/c1.lua" "$TMP/d1.log"
if wait_for 120 stat_ge "$Q1" delivered 1000; then ok; else bad "drain: delivered $(stat "$Q1" delivered) of 1000"; fi
# /metrics: counters of this run
metrics() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "http://127.0.0.1:$MPORT/metrics"; }
if m=$(metrics); then
	echo "$m" | grep -q "^relayq_recipients_total{queue=\"$Q1\",outcome=\"delivered\"} 1000\$" && ok ||
		bad "metrics: delivered counter: $(echo "$m" | grep recipients_total)"
	echo "$m" | grep -q "^relayq_redis_up{queue=\"$Q1\"} 1\$" && ok || bad "metrics: redis_up"
	echo "$m" | grep -q "^relayq_inflight_messages{queue=\"$Q1\"} 0\$" && ok || bad "metrics: inflight"
	echo "$m" | grep -q '^# TYPE relayq_smtp_transactions_total counter$' && ok || bad "metrics: TYPE line"
else
	bad "metrics: no answer on 127.0.0.1:$MPORT"
fi
stop_daemon "$TMP/d1.log" "drain"
[ "$(count "$Q1" ready)" -eq 0 ] && [ "$(count "$Q1" inflight)" -eq 0 ] && [ "$(count "$Q1" scheduled)" -eq 0 ] && ok ||
	bad "drain: queue not empty"
n=$(grep -c 'event=delivered' "$TMP/d1.log")
[ "$n" -eq 1000 ] && ok || bad "drain: $n delivered log lines, want 1000"
# smtp-sink -c: the last counters line; sessions far fewer than messages
sess=$(tr '\r' '\n' <"$TMP/sink1.log" | grep -o 'sess=[0-9]*' | tail -1 | cut -d= -f2)
mesg=$(tr '\r' '\n' <"$TMP/sink1.log" | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2)
[ "${mesg:-0}" -ge 1000 ] && ok || bad "drain: smtp-sink counted ${mesg:-0} messages"
# 4 connections per destination, 100 messages per connection: about 10-14
[ "${sess:-0}" -ge 1 ] && [ "${sess:-0}" -le 40 ] && ok || bad "drain: ${sess:-?} sessions for 1000 messages (no reuse?)"
grep -q 'event=start .*redis=unix:.*queue='"$Q1"'.*mode=relay.*tls=none' "$TMP/d1.log" && ok ||
	bad "drain: no start line with redis, queue, mode, tls"

# ---- 2. SIGTERM in the middle: exit 0, nothing lost ----
Q2=term-$$-$RANDOM
write_config "$TMP/c2.lua" "$Q2" "$P1" 'per_destination = 2, batch = 50,' ''
enqueue "$Q2" 3000 example.net
start_daemon "$TMP/c2.lua" "$TMP/d2.log"
wait_for 60 stat_ge "$Q2" delivered 200 || bad "term: nothing delivered"
stop_daemon "$TMP/d2.log" "term"
inflight=$(count "$Q2" inflight)
[ "$inflight" -eq 0 ] && ok || bad "term: $inflight messages still leased after the stop"
delivered=$(stat "$Q2" delivered)
left=$(( $(count "$Q2" ready) + $(count "$Q2" scheduled) ))
[ $((delivered + left)) -eq 3000 ] && ok || bad "term: delivered $delivered + left $left != 3000"
[ "$left" -gt 0 ] && ok || echo "note: term: everything was delivered before the stop" >&2
# attempts not counted for what was handed back
start_daemon "$TMP/c2.lua" "$TMP/d2.log"
if wait_for 120 stat_ge "$Q2" delivered 3000; then ok; else bad "term: after restart delivered $(stat "$Q2" delivered) of 3000"; fi
stop_daemon "$TMP/d2.log" "term restart"
[ "$(count "$Q2" dead)" -eq 0 ] && ok || bad "term: dead messages"

# ---- 3. 4xx deferred, 5xx dead with a hint ----
start_sink sink4 -r RCPT
P4=$SINK_PORT
start_sink sink5 -f RCPT
P5=$SINK_PORT
Q4=t4-$$-$RANDOM
Q5=t5-$$-$RANDOM
write_config "$TMP/c4.lua" "$Q4" "$P4" '' 'relayq.backoff { first = "1h", jitter = 0 }'
write_config "$TMP/c5.lua" "$Q5" "$P5" '' ''
printf 'Subject: t\r\n\r\nbody\r\n' >"$TMP/m.eml"
ID4=$("$B" --queue "$Q4" enqueue --from a@example.com --to x@example.net "$TMP/m.eml")
ID5=$("$B" --queue "$Q5" enqueue --from a@example.com --to y@example.net --to z@example.org "$TMP/m.eml")
start_daemon "$TMP/c4.lua" "$TMP/d4.log"
D4=$DPID
start_daemon "$TMP/c5.lua" "$TMP/d5.log"
D5=$DPID
wait_for 30 bash -c "[ \"\$(redis-cli -s '$SOCK' HGET 'relayq:{$Q4}:msg:$ID4' state)\" = scheduled ]" &&
	ok || bad "4xx: not scheduled"
wait_for 30 bash -c "[ \"\$(redis-cli -s '$SOCK' HGET 'relayq:{$Q5}:msg:$ID5' state)\" = dead ]" &&
	ok || bad "5xx: not dead"
show4=$(rcli FCALL relayq_show 1 "relayq:{$Q4}" "$ID4")
echo "$show4" | grep -q '"attempts":1' && echo "$show4" | grep -q '"last_code":450' && ok ||
	bad "4xx: show: $show4"
next=$(rcli HGET "relayq:{$Q4}:msg:$ID4" next)
now=$(python3 -c 'import time; print(int(time.time()*1000))')
[ $((next - now)) -gt 3000000 ] && ok || bad "4xx: next in $((next - now)) ms, want about 1 h"
show5=$(rcli FCALL relayq_show 1 "relayq:{$Q5}" "$ID5")
echo "$show5" | grep -q '"hint":"[^"]' && ok || bad "5xx: no hint: $show5"
[ "$(echo "$show5" | grep -o '"s":"failed"' | wc -l)" -eq 2 ] && ok || bad "5xx: not both failed: $show5"
grep -q "level=info event=deferred .*id=$ID4 rcpt=x@example.net .*code=450 enhanced=4.3.0 .*stage=rcpt attempt=1 next=[0-9]" "$TMP/d4.log" &&
	ok || bad "4xx: no deferred log line"
grep -q "level=warn event=failed .*id=$ID5 rcpt=y@example.net .*code=500 .*rule=builtin:5xx" "$TMP/d5.log" &&
	ok || bad "5xx: no failed log line"
DPID=$D4 stop_daemon "$TMP/d4.log" "4xx"
DPID=$D5 stop_daemon "$TMP/d5.log" "5xx"

# ---- 4. --check ----
"$D" --check -c "$TMP/c1.lua" >"$TMP/out" 2>&1 && ok || bad "--check of a good file: $(cat "$TMP/out")"
printf 'relayq.config {\n  queue = "x",\n  connections = "many",\n}\n' >"$TMP/bad.lua"
"$D" --check -c "$TMP/bad.lua" >"$TMP/out" 2>&1
rc=$?
[ $rc -eq 1 ] && ok || bad "--check of a bad file: exit $rc"
grep -q "bad.lua:3:" "$TMP/out" && ok || bad "--check: no file:line: $(cat "$TMP/out")"
"$D" --version | grep -q '^relayqd ' && ok || bad "--version"
"$D" --help | grep -q -- '--check' && ok || bad "--help"

# ---- 5. SIGHUP: a good file is taken, a broken one keeps the old policy ----
Q6=hup-$$-$RANDOM
write_config "$TMP/c6.lua" "$Q6" "$P1" '' ''
start_daemon "$TMP/c6.lua" "$TMP/d6.log"
wait_for 10 grep -q event=redis_ready "$TMP/d6.log" || bad "hup: not ready"
write_config "$TMP/c6.lua" "$Q6" "$P1" '' 'relayq.on(550, function(r) return relayq.retry { after = "1m" } end)'
kill -HUP "$DPID"
wait_for 10 grep -q 'event=reloaded .*rules=1' "$TMP/d6.log" && ok || bad "hup: no reloaded line"
printf 'relayq.config { queue = \n' >"$TMP/c6.lua"
kill -HUP "$DPID"
wait_for 10 grep -q 'event=reload_failed' "$TMP/d6.log" && ok || bad "hup: broken file not reported"
kill -0 "$DPID" && ok || bad "hup: daemon died on a broken reload"
enqueue "$Q6" 5 example.net
wait_for 30 stat_ge "$Q6" delivered 5 && ok || bad "hup: no delivery after the reloads"
stop_daemon "$TMP/d6.log" "hup"

echo "test_runner_drain: $passed passed, $failed failed"
[ $failed -eq 0 ]

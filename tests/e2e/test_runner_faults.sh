#!/usr/bin/env bash
# relayqd's destination health and shutdown against the fakesmtpd fixture:
# - a relay that answers 421 at the greeting twice: the destination is
#   suspended after each failure, with one connection attempt per
#   suspension (no hammering), the messages' attempts are not burnt, and
#   the first success resumes it;
# - too many recipients (452 4.5.3 after the 3rd): the rest goes in new
#   transactions at once, every recipient delivered exactly once;
# - SIGTERM while a transaction stalls: after the grace period the
#   transaction is abandoned, the message handed back (scheduled now,
#   attempts 0), exit 0.
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (for tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=faults-test
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }

start_redis


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

printf 'Subject: t\r\n\r\nbody\r\n' >"$TMP/m.eml"
enq() {  # queue, rcpts...
	local q=$1; shift
	local args=()
	for r in "$@"; do args+=(--to "$r"); done
	"$B" --queue "$q" enqueue --from a@example.com "${args[@]}" "$TMP/m.eml"
}
stat() { local v; v=$(rcli HGET "relayq:{$1}:stats" "$2"); echo "${v:-0}"; }
stat_ge() { [ "$(stat "$1" "$2")" -ge "$3" ]; }

start_daemon() {  # config, log: sets DPID
	"$D" -c "$1" >>"$2" 2>&1 &
	DPID=$!
	PIDS+=($DPID)
}
sanitizer_report() { grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$1"; }
stop_daemon() {  # log, what
	kill -TERM "$DPID"
	local end=$((SECONDS + 40))
	while kill -0 "$DPID" 2>/dev/null && ((SECONDS <= end)); do sleep 0.05; done
	if kill -0 "$DPID" 2>/dev/null; then
		bad "$2: relayqd still running 40 s after SIGTERM"
		kill -9 "$DPID"
	fi
	wait "$DPID"
	local rc=$?
	if [ $rc -eq 0 ]; then ok; else bad "$2: relayqd exit $rc, want 0"; tail -20 "$1" >&2; fi
	if sanitizer_report "$1"; then bad "$2: sanitizer report"; grep -A20 Sanitizer "$1" | head -40 >&2; else ok; fi
}

# ---- 1. suspension: one attempt per suspension, attempts not burnt ----
start_fake f1 'greeting times=2 reply 421 4.3.2 Too busy, try later'
Q1=susp-$$-$RANDOM
write_config "$TMP/c1.lua" "$Q1" "$FAKE_PORT" 'per_destination = 5,' \
	'relayq.backoff { first = "1s", factor = 2, max = "10s", jitter = 0 }'
for i in $(seq 1 20); do enq "$Q1" "r$i@example.net" >/dev/null; done
start_daemon "$TMP/c1.lua" "$TMP/d1.log"
if wait_for 60 stat_ge "$Q1" delivered 20; then ok; else bad "suspend: delivered $(stat "$Q1" delivered) of 20"; fi
stop_daemon "$TMP/d1.log" "suspend"
n=$(grep -c 'event=destination_suspended' "$TMP/d1.log")
[ "$n" -eq 2 ] && ok || bad "suspend: $n suspensions, want 2"
n=$(grep -c 'event=destination_resumed' "$TMP/d1.log")
[ "$n" -eq 1 ] && ok || bad "suspend: $n resumes, want 1"
# for= is the decided length (backoff 1s, 2s, jitter 0), not a clock
# difference: exact by design, whatever the machine's load
grep -q 'event=destination_suspended dest=relay for=1s' "$TMP/d1.log" &&
	grep -q 'event=destination_suspended dest=relay for=2s' "$TMP/d1.log" && ok ||
	bad "suspend: suspensions do not grow 1s, 2s: $(grep suspended "$TMP/d1.log")"
# one connection per suspension: 2 refused greetings, then the good ones
conns_refused=$(grep -c '^S: 421' "$TMP"/f1/conn-*.log 2>/dev/null | awk -F: '{s+=$2} END {print s+0}')
[ "$conns_refused" -eq 2 ] && ok || bad "suspend: $conns_refused greetings refused, want 2 (hammering?)"
# the messages' attempts: only the delivery counts
# (deferred events of the suspensions carry attempt 0: nothing counted)
attempts=$(rcli XRANGE "relayq:{$Q1}:events" - + |
	awk 'k == "type" {t = $0} k == "attempt" {print t ":" $0} {k = $0}' | sort | uniq -c)
delivered_att=$(echo "$attempts" | awk '$2 ~ /^delivered:/' | sed 's/.*://' | sort -u | tr '\n' ' ')
[ "$delivered_att" = "1 " ] && ok || bad "suspend: delivered with attempts: $attempts"
echo "$attempts" | grep -q 'deferred:[1-9]' && bad "suspend: a deferral counted an attempt: $attempts" || ok
[ "$(stat "$Q1" failed)" -eq 0 ] && ok || bad "suspend: failures"

# ---- 2. too many recipients: the rest at once, each exactly once ----
start_fake f2 'rcpt rcpt=4- reply 452 4.5.3 Too many recipients'
Q2=many-$$-$RANDOM
write_config "$TMP/c2.lua" "$Q2" "$FAKE_PORT" '' ''
rcpts=()
for i in $(seq 1 10); do rcpts+=("m$i@example.net"); done
ID2=$(enq "$Q2" "${rcpts[@]}")
start_daemon "$TMP/c2.lua" "$TMP/d2.log"
if wait_for 30 stat_ge "$Q2" delivered 10; then ok; else bad "too many: delivered $(stat "$Q2" delivered) of 10"; fi
stop_daemon "$TMP/d2.log" "too many"
msgs=$(fake_stat f2 messages)
[ "${msgs:-0}" -eq 4 ] && ok || bad "too many: $msgs messages at the server, want 4 (3+3+3+1)"
for r in "${rcpts[@]}"; do
	n=$(cat "$TMP"/f2/msg-*.env | grep -c "^RCPT TO:<$r>")
	[ "$n" -eq 1 ] || bad "too many: $r accepted $n times"
done
ok
[ "$(stat "$Q2" deferred)" -eq 0 ] && ok || bad "too many: deferred recipients"
rcli EXISTS "relayq:{$Q2}:msg:$ID2" | grep -q '^0$' && ok || bad "too many: message still there"

# ---- 3. SIGTERM while a transaction stalls ----
start_fake f3 'dot stall'
Q3=stall-$$-$RANDOM
write_config "$TMP/c3.lua" "$Q3" "$FAKE_PORT" '' ''
ID3=$(enq "$Q3" "s@example.net")
start_daemon "$TMP/c3.lua" "$TMP/d3.log"
wait_for 20 bash -c "grep -qE '^C: \.[[:space:]]*\$' '$TMP'/f3/conn-*.log" ||
	bad "stall: the body never reached the server"
t0=$SECONDS
stop_daemon "$TMP/d3.log" "stall"
took=$((SECONDS - t0))
[ "$took" -ge 5 ] && ok || bad "stall: stopped after $took s, before the grace period"
grep -q 'event=transaction_aborted' "$TMP/d3.log" && ok || bad "stall: no transaction_aborted line"
state=$(rcli HGET "relayq:{$Q3}:msg:$ID3" state)
attempts=$(rcli HGET "relayq:{$Q3}:msg:$ID3" attempts)
[ "$state" = scheduled ] && [ "$attempts" = 0 ] && ok ||
	bad "stall: message $state with $attempts attempts, want scheduled with 0"
next=$(rcli HGET "relayq:{$Q3}:msg:$ID3" next)
now=$(python3 -c 'import time; print(int(time.time()*1000))')
[ $((next - now)) -le 1000 ] && ok || bad "stall: handed back for $((next - now)) ms from now, want now"

echo "test_runner_faults: $passed passed, $failed failed"
[ $failed -eq 0 ]

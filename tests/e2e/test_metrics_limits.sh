#!/usr/bin/env bash
# relayqd's /metrics under connection floods with few file descriptors
# (issue 15, item 5). relayqd runs with `ulimit -n 24` (set in its own
# subshell): about 11 descriptors at rest, so 300 slow clients would take
# every descriptor without the endpoint's bounds. Checks:
# - a slowloris client (one byte every 4 s, never a whole request) is
#   closed by the head deadline, whatever it sends;
# - 300 slow clients at once: relayqd does not spin (CPU time well under
#   the wall time), logs a bounded number of metrics_accept_paused lines
#   and never libevent's "Error from accept() call";
# - a message enqueued during the flood is delivered to the fakesmtpd relay
#   with no destination suspension and no connect_failed (an EMFILE at
#   connect is local_failure, retried soon);
# - /metrics answers once the clients are gone.
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (for tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=metrics-limits
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }

start_redis
start_fake relay
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
Q=mlim-$$-$RANDOM
cat >"$TMP/c.lua" <<EOC
relayq.config {
  redis = "unix:$SOCK",
  queue = "$Q",
  relay = "[127.0.0.1]:$FAKE_PORT",
  tls = "none",
  helo = "relayq.test",
  metrics = "127.0.0.1:$MPORT",
}
EOC
( ulimit -n 24 && exec "$D" -c "$TMP/c.lua" ) >"$TMP/d.log" 2>&1 &
DPID=$!
PIDS+=($DPID)

scrape() {
	python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
		"http://127.0.0.1:$MPORT/metrics"
}
wait_for 20 scrape || { bad "no /metrics at start"; cat "$TMP/d.log" >&2; exit 1; }
scrape | grep -q '^relayq_metrics_connections 1$' && ok || bad "metrics: connections gauge: $(scrape | grep metrics_conn)"

# ---- slowloris: one byte every 4 s is closed by the head deadline ----
python3 - "$MPORT" <<'PY' && ok || bad "slowloris: not closed by the head deadline"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(4)
start = time.monotonic()
for ch in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
    try:
        s.send(bytes([ch]))
        if s.recv(1) == b"":
            sys.exit(0)          # closed by the server
    except socket.timeout:
        pass
    except OSError:
        sys.exit(0)
    if time.monotonic() - start > 20:
        break
sys.exit(1)
PY

# ---- 300 slow clients with few descriptors ----
cpu() { awk '{print $14 + $15}' "/proc/$DPID/stat"; }
cpu0=$(cpu)
t0=$SECONDS
python3 - "$MPORT" >"$TMP/flood.out" 2>&1 <<'PY' &
import socket, sys, time, errno
port = int(sys.argv[1])
socks = []
for i in range(300):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    socks.append(s)
end = time.monotonic() + 10
while time.monotonic() < end:
    for s in socks:
        try:
            s.send(b"G")
        except OSError:
            pass
    time.sleep(2)
for s in socks:
    s.close()
print("done")
PY
FLOOD=$!
PIDS+=($FLOOD)
sleep 1
ID=$("$B" --queue "$Q" enqueue --from a@example.com --to r@example.net <<<'Subject: t

during the flood')
fds_max=0
while kill -0 "$FLOOD" 2>/dev/null; do
	n=$(ls "/proc/$DPID/fd" 2>/dev/null | wc -l)
	((n > fds_max)) && fds_max=$n
	sleep 0.5
done
wait "$FLOOD"
wall=$((SECONDS - t0))
used=$(( $(cpu) - cpu0 ))   # clock ticks, 100 a second
echo "flood: ${wall}s wall, $used ticks of CPU, at most $fds_max descriptors" >&2
kill -0 "$DPID" 2>/dev/null && ok || { bad "relayqd died in the flood"; tail -20 "$TMP/d.log" >&2; exit 1; }
# a busy loop on accept() would use about the whole wall time
((used < wall * 100 / 3)) && ok || bad "flood: relayqd used $used ticks of CPU in ${wall}s"
((fds_max <= 24)) && ok || bad "flood: $fds_max descriptors"

# /metrics answers again once the clients are gone
if wait_for 30 scrape; then ok; else bad "no /metrics after the flood"; fi

# the message: delivered, the relay never suspended
delivered() { [ "$(rcli HGET "relayq:{$Q}:stats" delivered)" = 1 ]; }
if wait_for 90 delivered; then ok; else bad "message $ID not delivered: $(rcli HGETALL "relayq:{$Q}:msg:$ID" | tr '\n' ' ')"; fi
grep -q 'event=destination_suspended' "$TMP/d.log" && bad "the relay was suspended: $(grep suspended "$TMP/d.log")" || ok
grep -q 'event=connect_failed' "$TMP/d.log" && bad "a local fault was logged as the relay's: $(grep connect_failed "$TMP/d.log")" || ok
n=$(grep -c 'event=local_failure' "$TMP/d.log")
echo "local_failure lines: $n" >&2
grep -q 'Error from accept' "$TMP/d.log" && bad "libevent's accept error lines: $(grep -c 'Error from accept' "$TMP/d.log")" || ok
n=$(grep -c 'event=metrics_accept_paused' "$TMP/d.log")
echo "metrics_accept_paused lines: $n" >&2
((n <= 10)) && ok || bad "$n accept pause lines, want at most 10 (one per pause, pauses growing)"
[ "$(wc -l <"$TMP/d.log")" -lt 200 ] && ok || bad "log has $(wc -l <"$TMP/d.log") lines"
scrape | grep -qE '^relayq_metrics_accept_errors_total [0-9]+$' && ok || bad "metrics: accept errors counter"

kill -TERM "$DPID"
wait_for 30 bash -c "! kill -0 $DPID" || bad "relayqd did not stop"
if grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$TMP/d.log"; then
	bad "sanitizer report"; grep -A20 Sanitizer "$TMP/d.log" | head -40 >&2
else ok; fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

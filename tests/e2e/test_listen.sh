#!/usr/bin/env bash
# relayqd's SMTP listener end to end: relayqd with relayq.listen (STARTTLS
# with the test CA's certificate, AUTH against a credentials file made by
# `relayq passwd`, no trusted CIDRs) relaying to fakesmtpd.
# - swaks sends with STARTTLS + AUTH PLAIN and with AUTH LOGIN: both are
#   delivered, and the bytes at the sink are what swaks sent plus the one
#   Received: line the listener adds (the message has its own Date and
#   Message-ID, so nothing else is added; swaks ends the data with a CRLF
#   of its own after the file);
# - a wrong password gets 535; AUTH in clear gets 530 (and AUTH is not
#   even offered); MAIL without AUTH gets 530;
# - /metrics has the relayq_listen_* counters with the listener label;
# - SIGTERM with a session open: the client reads 421 4.3.2, relayqd exits 0.
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (for tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=listen-test
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

command -v swaks >/dev/null || { echo "swaks is missing (apt-get install -y swaks libnet-ssleay-perl)" >&2; exit 1; }
[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sanitizer_report() { grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$1"; }

start_redis
start_fake sink
PORT=$(free_port)
MPORT=$(free_port)
TLSD=$ROOT/tests/fixtures/tls
CRED=$TMP/users
printf 's3cret-pw\n' | "$B" passwd --file "$CRED" app@example.com >/dev/null ||
	{ echo "relayq passwd failed" >&2; exit 1; }

cat >"$TMP/relayq.lua" <<EOF
relayq.config {
  redis = "unix:$SOCK",
  relay = "[127.0.0.1]:$FAKE_PORT",
  tls = "none",
  helo = "relayq.test",
  metrics = "127.0.0.1:$MPORT",
}
relayq.listen {
  "127.0.0.1:$PORT",
  tls_cert = "$TLSD/server.pem",
  tls_key = "$TLSD/server.key",
  auth_file = "$CRED",
  hostname = "mx.relayq.test",
  meta = { source = "e2e" },
}
EOF
"$D" --check -c "$TMP/relayq.lua" >"$TMP/check.out" 2>&1 && ok ||
	bad "relayqd --check: $(cat "$TMP/check.out")"

"$D" -c "$TMP/relayq.lua" >"$TMP/relayqd.log" 2>&1 &
DPID=$!
PIDS+=($DPID)
wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" ||
	{ cat "$TMP/relayqd.log" >&2; echo "relayqd does not listen" >&2; exit 1; }
wait_for 10 grep -q listen_redis_ready "$TMP/relayqd.log"

# The message: CRLF lines, its own Date and Message-ID, a dotted line.
msg() {  # n
	printf 'From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: listen %s\r\nDate: Thu, 03 Dec 2026 18:00:00 +0000\r\nMessage-ID: <m%s@example.com>\r\n\r\nline one\r\n.starts with a dot\r\nlast\r\n' "$1" "$1"
}
msg 1 >"$TMP/m1.eml"
msg 2 >"$TMP/m2.eml"

sw() {  # log, swaks args...
	local log=$1; shift
	swaks --server "127.0.0.1:$PORT" --helo client.test --from app@example.com \
		--to user@example.net "$@" >"$log" 2>&1
}

sw "$TMP/sw1.log" --tls --auth PLAIN --auth-user app@example.com --auth-password s3cret-pw \
	--data "@$TMP/m1.eml" && ok || bad "swaks STARTTLS + AUTH PLAIN failed: $(tail -5 "$TMP/sw1.log")"
grep -q '^<~  235 2.7.0' "$TMP/sw1.log" && ok || bad "no 235 for AUTH PLAIN"
grep -q '^<~  250 2.0.0 Ok: queued as' "$TMP/sw1.log" && ok || bad "message 1 not queued"
sw "$TMP/sw2.log" --tls --auth LOGIN --auth-user app@example.com --auth-password s3cret-pw \
	--data "@$TMP/m2.eml" && ok || bad "swaks STARTTLS + AUTH LOGIN failed: $(tail -5 "$TMP/sw2.log")"

# both delivered; the bytes at the sink: Received + what swaks sent
wait_for 20 test -f "$FAKE_DIR/msg-2.eml" && ok || bad "messages not delivered to the sink"
for f in "$FAKE_DIR"/msg-*.eml; do
	[ -f "$f" ] || continue
	n=$(sed -n 's/^Subject: listen \([0-9]\).*/\1/p' "$f" | tr -d '\r')
	first=$(head -1 "$f")
	case "$first" in
	"Received: from client.test (unknown [127.0.0.1]) by mx.relayq.test (relayq) with ESMTPSA for <user@example.net>; "*) ok ;;
	*) bad "message $n: first line is not our Received: $first" ;;
	esac
	tail -n +2 "$f" >"$TMP/rest.$n"
	# swaks puts a CRLF of its own after the --data text, before the dot
	{ cat "$TMP/m$n.eml"; printf '\r\n'; } >"$TMP/wire.$n"
	cmp -s "$TMP/rest.$n" "$TMP/wire.$n" && ok || bad "message $n: bytes differ from what swaks sent"
done

# wrong password: 535; AUTH in clear: not offered and refused (530)
sw "$TMP/sw3.log" --tls --auth PLAIN --auth-user app@example.com --auth-password wrong \
	--data "@$TMP/m1.eml"
grep -q '^<~\* 535 5.7.8' "$TMP/sw3.log" && ok || bad "wrong password: no 535: $(grep '<' "$TMP/sw3.log" | tail -3)"
clear=$(printf 'EHLO c.test\r\nAUTH PLAIN AGFwcEBleGFtcGxlLmNvbQBzM2NyZXQtcHc=\r\nMAIL FROM:<a@example.com>\r\nQUIT\r\n' |
	timeout 10 python3 -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.stdin.buffer.read())
d = b""
while True:
    b = s.recv(65536)
    if not b: break
    d += b
sys.stdout.write(d.decode())' "$PORT")
grep -q '^530 5.7.0 Must issue a STARTTLS command first' <<<"$clear" && ok || bad "AUTH in clear not refused: $clear"
grep -q '^530 5.7.0 Authentication required' <<<"$clear" && ok || bad "MAIL without AUTH not refused: $clear"
grep -q 'AUTH PLAIN' <<<"$clear" && bad "AUTH offered in clear" || ok
grep -q 's3cret' "$TMP/relayqd.log" && bad "the password is in the log" || ok

# metrics
curl -sf "http://127.0.0.1:$MPORT/metrics" >"$TMP/metrics" && ok || bad "no /metrics"
grep -q "^relayq_listen_messages_total{listener=\"127.0.0.1:$PORT\"} 2$" "$TMP/metrics" && ok ||
	bad "relayq_listen_messages_total: $(grep listen_messages "$TMP/metrics")"
grep -q "^relayq_listen_auth_ok_total{listener=\"127.0.0.1:$PORT\"} 2$" "$TMP/metrics" && ok || bad "auth_ok metric"
grep -q "^relayq_listen_auth_failed_total{listener=\"127.0.0.1:$PORT\"} 1$" "$TMP/metrics" && ok || bad "auth_failed metric"
grep -q "^relayq_listen_rejected_total{listener=\"127.0.0.1:$PORT\",reason=\"auth_required\"} 1$" "$TMP/metrics" &&
	ok || bad "rejected metric: $(grep listen_rejected "$TMP/metrics")"
grep -q 'event=listen_accepted .*user=app@example.com' "$TMP/relayqd.log" && ok || bad "no listen_accepted log line"

# SIGTERM with a session open: 421, exit 0
python3 -c '
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = s.makefile("rb")
f.readline()
s.sendall(b"EHLO c.test\r\n")
while True:
    l = f.readline()
    if l[3:4] != b"-": break
open(sys.argv[2], "w").write("ready\n")
s.settimeout(20)
print(f.readline().decode().strip())' "$PORT" "$TMP/ready" >"$TMP/open.out" 2>&1 &
CPID=$!
PIDS+=($CPID)
wait_for 10 test -f "$TMP/ready" || bad "the open session did not start"
kill -TERM "$DPID"
wait "$CPID"
grep -q '^421 4.3.2 mx.relayq.test Service shutting down' "$TMP/open.out" && ok ||
	bad "open session did not get 421: $(cat "$TMP/open.out")"
end=$((SECONDS + 30))
while kill -0 "$DPID" 2>/dev/null && ((SECONDS <= end)); do sleep 0.05; done
if kill -0 "$DPID" 2>/dev/null; then
	bad "relayqd did not stop"
else
	wait "$DPID"
	rc=$?
	[ $rc -eq 0 ] && ok || bad "relayqd exit status $rc"
fi
sanitizer_report "$TMP/relayqd.log" && bad "sanitizer report: $(grep -A5 Sanitizer "$TMP/relayqd.log" | head -20)" || ok

echo "test_listen: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

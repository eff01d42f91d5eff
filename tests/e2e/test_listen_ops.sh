#!/usr/bin/env bash
# relayqd's SMTP listener as an operator runs it:
# - an implicit_tls listener (port-465 style): swaks --tlsc and Python's
#   smtplib.SMTP_SSL verifying the chain of the test CA for "localhost";
#   both messages are delivered to fakesmtpd;
# - 1,000 connections at once against a listener with max_connections =
#   600: every one is accepted (220) or refused with 421 4.7.0, exactly 600
#   are accepted, and while they are open /metrics answers and shows 600
#   sessions; once they are gone a message goes through;
# - SIGHUP inside relayqd: a second certificate (made here with openssl,
#   signed by the test CA) replaces the first in the same files and a user
#   added to auth_file can log in; a client after the reload sees the new
#   certificate, the new user gets 235, a removed one 535.
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (for tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=listen-ops
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

command -v swaks >/dev/null || { echo "swaks is missing (apt-get install -y swaks libnet-ssleay-perl)" >&2; exit 1; }
[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
count_ge() { [ "$(grep -c -- "$1" "$2")" -ge "$3" ]; }  # pattern, file, n
sanitizer_report() { grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$1"; }

start_redis
start_fake sink
PORT=$(free_port)    # STARTTLS + AUTH, max_connections 600
IPORT=$(free_port)   # implicit TLS
MPORT=$(free_port)
TLSD=$ROOT/tests/fixtures/tls
CA=$TLSD/ca.pem

# the certificate files the config names: the fixture's first
cp "$TLSD/server.pem" "$TMP/cert.pem"
cp "$TLSD/server.key" "$TMP/key.pem"
CRED=$TMP/users
printf 'old-pw\n' | "$B" passwd --file "$CRED" old@example.com >/dev/null ||
	{ echo "relayq passwd failed" >&2; exit 1; }

cat >"$TMP/relayq.lua" <<CONF
relayq.config {
  redis = "unix:$SOCK",
  relay = "[127.0.0.1]:$FAKE_PORT",
  tls = "none",
  helo = "relayq.test",
  metrics = "127.0.0.1:$MPORT",
}
relayq.listen {
  "127.0.0.1:$PORT",
  trusted = { "127.0.0.0/8" },
  tls_cert = "$TMP/cert.pem", tls_key = "$TMP/key.pem",
  auth_file = "$CRED",
  hostname = "mx.relayq.test",
  max_connections = 600, max_per_ip = 5000,
}
relayq.listen {
  "127.0.0.1:$IPORT",
  trusted = { "127.0.0.0/8" },
  tls_cert = "$TMP/cert.pem", tls_key = "$TMP/key.pem",
  implicit_tls = true,
  hostname = "smtps.relayq.test",
}
CONF
"$D" -c "$TMP/relayq.lua" >"$TMP/relayqd.log" 2>&1 &
DPID=$!
PIDS+=($DPID)
wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$IPORT" ||
	{ cat "$TMP/relayqd.log" >&2; echo "relayqd does not listen" >&2; exit 1; }
wait_for 10 count_ge listen_redis_ready "$TMP/relayqd.log" 2

# ---- implicit TLS ----
swaks --server "127.0.0.1:$IPORT" --tlsc --helo client.test --from app@example.com \
	--to user@example.net --header "Subject: implicit swaks" >"$TMP/swaks-tlsc.log" 2>&1 &&
	ok || bad "swaks --tlsc failed: $(tail -5 "$TMP/swaks-tlsc.log")"
grep -q '^<~  220 smtps.relayq.test ESMTP' "$TMP/swaks-tlsc.log" && ok || bad "no greeting inside TLS (swaks)"
grep -q '^<~  250 2.0.0 Ok: queued as' "$TMP/swaks-tlsc.log" && ok || bad "swaks --tlsc: not queued"
python3 - "$IPORT" "$CA" >"$TMP/ssl.out" 2>&1 <<'PY' && ok || bad "SMTP_SSL failed: $(cat "$TMP/ssl.out")"
import smtplib, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])   # verifies chain and name
with smtplib.SMTP_SSL("localhost", int(sys.argv[1]), local_hostname="client.test",
                      context=ctx, timeout=20) as s:
    assert "starttls" not in s.ehlo_resp.decode().lower() if s.ehlo_resp else True
    s.sendmail("app@example.com", ["user@example.net"],
               b"Subject: implicit smtplib\r\n\r\nover TLS from the first byte\r\n")
PY
wait_for 30 test -f "$FAKE_DIR/msg-2.eml" && ok || bad "implicit-TLS messages not delivered"
grep -l 'Subject: implicit smtplib' "$FAKE_DIR"/msg-*.eml 2>/dev/null | head -1 | xargs -r head -1 |
	grep -q 'by smtps.relayq.test (relayq) with ESMTPS' && ok || bad "implicit TLS: Received: does not say ESMTPS"

# ---- 1,000 connections at once ----
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 2300 ]; then
	echo "SKIP part: ulimit -n $(ulimit -n) is below 2300 (1,000 connections on both sides)"
else
	python3 - "$PORT" "$MPORT" "$TMP" >"$TMP/thousand.out" 2>&1 <<'PY'
import socket, sys, urllib.request, time, selectors
port, mport, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
N = 1000
socks = []
for i in range(N):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", port))
    socks.append(s)
# the first line each connection gets (or a close), with a deadline
sel = selectors.DefaultSelector()
for i, s in enumerate(socks):
    sel.register(s, selectors.EVENT_READ, i)
first = {}
bufs = {}
deadline = time.time() + 60
while len(first) < N and time.time() < deadline:
    for key, _ in sel.select(timeout=1):
        i = key.data
        try:
            b = key.fileobj.recv(4096)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            b = b""
        bufs[i] = bufs.get(i, b"") + b
        if not b or b"\r\n" in bufs[i]:
            first[i] = bufs[i].split(b"\r\n")[0].decode("latin-1") if bufs[i] else "closed"
            sel.unregister(key.fileobj)
acc = sum(1 for v in first.values() if v.startswith("220 "))
ref = sum(1 for v in first.values() if v.startswith("421 4.7.0 "))
other = [v for v in first.values() if not (v.startswith("220 ") or v.startswith("421 4.7.0 "))]
print("answered", len(first), "accepted", acc, "refused", ref, "other", len(other), other[:3])
# relayqd still answers while they are open
m = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=20).read().decode()
sess = [l for l in m.splitlines() if l.startswith('relayq_listen_sessions{listener="127.0.0.1:%d"}' % port)]
print("metrics", sess[0] if sess else "none")
for s in socks:
    s.close()
PY
	grep -q '^answered 1000 accepted 600 refused 400 other 0' "$TMP/thousand.out" && ok ||
		bad "1,000 connections: $(cat "$TMP/thousand.out")"
	grep -q "^metrics relayq_listen_sessions{listener=\"127.0.0.1:$PORT\"} 600$" "$TMP/thousand.out" && ok ||
		bad "/metrics with 600 sessions open: $(tail -2 "$TMP/thousand.out")"
	# they are gone again, and the listener takes mail
	wait_for 30 bash -c "curl -sf http://127.0.0.1:$MPORT/metrics | grep -q '^relayq_listen_sessions{listener=\"127.0.0.1:$PORT\"} 0$'" &&
		ok || bad "sessions not closed after the clients left"
	curl -sf "http://127.0.0.1:$MPORT/metrics" | grep -q "^relayq_listen_rejected_total{listener=\"127.0.0.1:$PORT\",reason=\"connections\"} 400$" &&
		ok || bad "rejected{connections} is not 400"
	swaks --server "127.0.0.1:$PORT" --helo client.test --from app@example.com --to user@example.net \
		--header "Subject: after the thousand" >"$TMP/after.log" 2>&1 && ok || bad "no mail after 1,000 connections"
fi

# ---- SIGHUP: a new certificate and a new auth_file ----
fp() {  # port, starttls(0/1): the sha256 of the server's certificate
	python3 - "$1" "$2" "$CA" <<'PY'
import hashlib, socket, ssl, sys
port, starttls, ca = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
s = socket.create_connection(("127.0.0.1", port), timeout=20)
if starttls:
    f = s.makefile("rb")
    f.readline()
    s.sendall(b"EHLO c.test\r\n")
    while f.readline()[3:4] == b"-":
        pass
    s.sendall(b"STARTTLS\r\n")
    f.readline()
t = ctx.wrap_socket(s, server_hostname="localhost")
print(hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest(), t.getpeercert()["subject"][0][0][1])
t.close()
PY
}
before_i=$(fp "$IPORT" 0)
before_s=$(fp "$PORT" 1)
[ -n "$before_i" ] && [ "$before_i" = "$before_s" ] && ok || bad "certificate before the reload: '$before_i' '$before_s'"

# the second certificate: same CA, another name, another key
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=reloaded.test" \
	-keyout "$TMP/new.key" -out "$TMP/new.csr" >/dev/null 2>&1
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:reloaded.test,DNS:localhost,IP:127.0.0.1\n' >"$TMP/new.ext"
openssl x509 -req -in "$TMP/new.csr" -CA "$CA" -CAkey "$TLSD/ca.key" -set_serial 0x$(openssl rand -hex 8) \
	-sha256 -days 2 -extfile "$TMP/new.ext" -out "$TMP/new.pem" >/dev/null 2>&1 &&
	ok || bad "cannot make the second certificate"
cp "$TMP/new.pem" "$TMP/cert.pem"
cp "$TMP/new.key" "$TMP/key.pem"
# the credentials: a new user; the old one goes
printf 'new-pw\n' | "$B" passwd --file "$CRED" new@example.com >/dev/null || bad "relayq passwd (new)"
grep -v '^old@example.com:' "$CRED" >"$CRED.tmp" && cat "$CRED.tmp" >"$CRED" && rm -f "$CRED.tmp"

# before the reload the new user is unknown
sw_auth() {  # log, user, password
	swaks --server "127.0.0.1:$PORT" --tls --tls-ca-path "$CA" --helo client.test \
		--from app@example.com --to user@example.net --auth PLAIN --auth-user "$2" \
		--auth-password "$3" --quit-after AUTH >"$1" 2>&1
}
sw_auth "$TMP/pre.log" new@example.com new-pw
grep -q '^<~\* 535 5.7.8' "$TMP/pre.log" && ok || bad "new user accepted before the reload: $(grep '<' "$TMP/pre.log" | tail -2)"

nreload=$(grep -c 'event=listen_reloaded' "$TMP/relayqd.log")
kill -HUP "$DPID"
wait_for 20 count_ge 'event=listen_reloaded' "$TMP/relayqd.log" $((nreload + 2)) && ok ||
	bad "no listen_reloaded after SIGHUP: $(grep -E 'reload' "$TMP/relayqd.log" | tail -3)"
grep -q 'event=listen_reload_failed' "$TMP/relayqd.log" && bad "a listener reload failed: $(grep reload_failed "$TMP/relayqd.log")" || ok

after_i=$(fp "$IPORT" 0)
after_s=$(fp "$PORT" 1)
case "$after_i" in *" reloaded.test") ok ;; *) bad "implicit TLS after the reload: '$after_i'" ;; esac
case "$after_s" in *" reloaded.test") ok ;; *) bad "STARTTLS after the reload: '$after_s'" ;; esac
[ "$after_i" != "$before_i" ] && ok || bad "the certificate did not change"
sw_auth "$TMP/post-new.log" new@example.com new-pw
grep -q '^<~  235 2.7.0' "$TMP/post-new.log" && ok || bad "new user refused after the reload: $(grep '<' "$TMP/post-new.log" | tail -2)"
sw_auth "$TMP/post-old.log" old@example.com old-pw
grep -q '^<~\* 535 5.7.8' "$TMP/post-old.log" && ok || bad "removed user still accepted: $(grep '<' "$TMP/post-old.log" | tail -2)"
grep -q 'new-pw\|old-pw' "$TMP/relayqd.log" && bad "a password is in the log" || ok

kill -TERM "$DPID"
wait "$DPID"
rc=$?
[ $rc -eq 0 ] && ok || bad "relayqd exit status $rc"
sanitizer_report "$TMP/relayqd.log" && bad "sanitizer report: $(grep -A5 Sanitizer "$TMP/relayqd.log" | head -20)" || ok

echo "test_listen_ops: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

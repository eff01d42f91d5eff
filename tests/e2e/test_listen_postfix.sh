#!/usr/bin/env bash
# Clients of relayqd's SMTP listener that nobody here wrote: Postfix.
# - a private Postfix instance (its own config and queue, TESTING.md "A
#   private Postfix smtpd") with relayhost = the listener: a message posted
#   with Postfix's own `sendmail -C`, and one sent to its smtpd, are relayed
#   by Postfix's smtp client into the listener, queued by relayqd and
#   delivered to fakesmtpd (the listener's Received: on top of Postfix's);
# - Postfix's smtp-source -s 4 -m 200 straight into a second listener whose
#   queue no runner serves: all 200 are in Redis (the ready list and one
#   hash each), none lost, none twice.
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (for tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=listen-postfix
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

for c in postfix smtp-source postconf sendmail; do
	command -v $c >/dev/null || { echo "$c is missing (scripts/setup installs postfix)" >&2; exit 1; }
done
[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "SKIP: a private Postfix instance needs root"; exit 77; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
count_ge() { [ "$(grep -c -- "$1" "$2")" -ge "$3" ]; }  # pattern, file, n
sanitizer_report() { grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$1"; }

start_redis
start_fake sink
LPORT=$(free_port)   # listener, queue "default" (delivered)
SPORT=$(free_port)   # listener, queue "intake" (no runner)
PPORT=$(free_port)   # Postfix smtpd

cat >"$TMP/relayq.lua" <<CONF
relayq.config {
  redis = "unix:$SOCK",
  relay = "[127.0.0.1]:$FAKE_PORT",
  tls = "none",
  helo = "relayq.test",
}
relayq.listen { "127.0.0.1:$LPORT", trusted = { "127.0.0.0/8" }, hostname = "mx.relayq.test" }
relayq.listen { "127.0.0.1:$SPORT", trusted = { "127.0.0.0/8" }, queue = "intake",
                hostname = "intake.relayq.test" }
CONF
"$D" -c "$TMP/relayq.lua" >"$TMP/relayqd.log" 2>&1 &
DPID=$!
PIDS+=($DPID)
wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$SPORT" ||
	{ cat "$TMP/relayqd.log" >&2; echo "relayqd does not listen" >&2; exit 1; }
wait_for 10 count_ge listen_redis_ready "$TMP/relayqd.log" 2

# ---- the private Postfix, relaying to the listener ----
P=$TMP/postfix
mkdir -p "$P/conf" "$P/queue" "$P/data"
chmod 755 "$P"
chown postfix "$P/data"
cp /etc/postfix/master.cf "$P/conf/"
sed -i "s/^smtp      inet  n       -       y/$PPORT      inet  n       -       n/" "$P/conf/master.cf"
grep -q "^$PPORT " "$P/conf/master.cf" || { echo "cannot set the smtpd port in master.cf" >&2; exit 1; }
cat >"$P/conf/main.cf" <<CONF
compatibility_level = 3.6
queue_directory = $P/queue
data_directory = $P/data
maillog_file = $P/postfix.log
maillog_file_prefixes = $P
myhostname = pfx.test
mydomain = pfx.test
myorigin = pfx.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:$LPORT
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
CONF
pstop() { postfix -c "$P/conf" stop >/dev/null 2>&1; }
trap 'pstop; cleanup' EXIT
if ! postfix -c "$P/conf" start >"$TMP/pstart.out" 2>&1; then
	# the default instance may have to allow the folder
	postconf -e "alternate_config_directories = $P/conf" >>"$TMP/pstart.out" 2>&1
	postfix -c "$P/conf" start >>"$TMP/pstart.out" 2>&1 ||
		{ cat "$TMP/pstart.out" "$P/postfix.log" >&2; echo "Postfix did not start" >&2; exit 1; }
fi
wait_for 15 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PPORT" ||
	{ cat "$P/postfix.log" >&2; echo "Postfix does not listen" >&2; exit 1; }

# 1. Postfix's sendmail -C: postdrop, pickup, cleanup, qmgr, smtp -> the listener
printf 'From: cron@pfx.test\nTo: ops@example.net\nSubject: via postfix sendmail\n\nfirst line\n.dotted\nlast\n' |
	sendmail -C "$P/conf" -f cron@pfx.test ops@example.net && ok || bad "postfix sendmail failed"
# 2. Postfix's smtpd, then its smtp client -> the listener
python3 - "$PPORT" <<'PY' && ok || bad "smtplib into Postfix failed"
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), local_hostname="app.test", timeout=20) as s:
    s.sendmail("app@example.com", ["user@example.net"],
               b"From: app@example.com\r\nTo: user@example.net\r\nSubject: via postfix smtpd\r\n\r\nhello\r\n")
PY

wait_for 90 test -f "$FAKE_DIR/msg-2.eml" && ok ||
	bad "the messages Postfix relayed did not reach fakesmtpd: $(tail -5 "$P/postfix.log")"
f1=$(grep -l 'Subject: via postfix sendmail' "$FAKE_DIR"/msg-*.eml 2>/dev/null | head -1)
f2=$(grep -l 'Subject: via postfix smtpd' "$FAKE_DIR"/msg-*.eml 2>/dev/null | head -1)
[ -n "$f1" ] && [ -n "$f2" ] && ok || bad "a message is missing at the sink"
for f in $f1 $f2; do
	head -1 "$f" | grep -q '^Received: from pfx.test (localhost \[127.0.0.1\]) by mx.relayq.test (relayq) with ESMTP\|^Received: from pfx.test (unknown \[127.0.0.1\]) by mx.relayq.test (relayq) with ESMTP' &&
		ok || bad "$f: the listener's Received: is not first: $(head -1 "$f")"
	grep -q 'by pfx.test (Postfix' "$f" && ok || bad "$f: no Postfix Received:"
done
[ -n "$f1" ] && grep -q $'^\\.dotted\r$' "$f1" && grep -q $'^last\r$' "$f1" && ok ||
	bad "the body of the sendmail message changed"
grep -q 'status=sent (250 2.0.0 Ok: queued as ' "$P/postfix.log" && ok ||
	bad "Postfix did not log the listener's 250"
[ "$(grep -c 'event=listen_accepted' "$TMP/relayqd.log")" = 2 ] && ok || bad "listen_accepted lines"

# 3. smtp-source -s 4 -m 200 straight into the intake listener
smtp-source -s 4 -m 200 -f src@example.com -t dst@example.net 127.0.0.1:"$SPORT" >"$TMP/source.out" 2>&1 &&
	ok || bad "smtp-source failed: $(tail -3 "$TMP/source.out")"
n=$(rcli LLEN 'relayq:{intake}:ready')
[ "$n" = 200 ] && ok || bad "intake ready list has $n, not 200"
k=$(rcli --scan --pattern 'relayq:{intake}:msg:*' | wc -l)
[ "$k" = 200 ] && ok || bad "intake has $k message hashes, not 200"
u=$(rcli LRANGE 'relayq:{intake}:ready' 0 -1 | sort -u | wc -l)
[ "$u" = 200 ] && ok || bad "intake ready list has $u distinct ids"
one=$(rcli LINDEX 'relayq:{intake}:ready' 0)
rcli HGET "relayq:{intake}:msg:$one" to | grep -q '"dst@example.net"' && ok || bad "envelope of an smtp-source message"

pstop
kill -TERM "$DPID"
wait "$DPID"
rc=$?
[ $rc -eq 0 ] && ok || bad "relayqd exit status $rc"
sanitizer_report "$TMP/relayqd.log" && bad "sanitizer report: $(grep -A5 Sanitizer "$TMP/relayqd.log" | head -20)" || ok

echo "test_listen_postfix: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# relayqd delivering by MX (no relay) with dnsmasq as the DNS server and the
# fakesmtpd fixture as every MX host (RELAYQ_DNS_SERVERS, RELAYQ_MX_PORT):
# one message to recipients in five domains is delivered per domain, split
# by recipients_per_transaction (and a per-domain override), a null MX and
# an NXDOMAIN recipient fail for good with their hints, and with
# bounce = true one DSN goes back to the sender (once, even when the
# failure is settled again); one connection in all is shared by two
# domains without waiting for the idle timeout. A recipient domain in UTF-8
# is looked up by its A-labels (IDNA2008) and sent in them to an MX without
# SMTPUTF8, one libidn2 refuses fails for good (553 5.1.3); an MX offering
# CHUNKING gets BDAT, unless chunking = false.
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=mx-test
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

command -v dnsmasq >/dev/null || { echo "dnsmasq is not installed" >&2; exit 77; }
[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }

start_redis

start_dnsmasq --mx-host=example.test,mx1.example.test,10 --mx-host=other.test,mx1.example.test,10 \
	--mx-host=sender.test,mx1.example.test,10 --host-record=mx1.example.test,127.0.0.1 \
	--mx-host=nullmx.test,.,0 --mx-host=xn--bcher-kva.test,mx1.example.test,10

mkdir -p "$TMP/rec"
"$FAKE" --listen 127.0.0.1:0 --record "$TMP/rec" >"$TMP/fake.log" 2>&1 &
PIDS+=($!)
wait_for 10 grep -q '^ready ' "$TMP/fake.log" || { echo "fakesmtpd did not start" >&2; exit 1; }
FAKE_PORT=$(sed -n 's/^ready //p' "$TMP/fake.log" | head -1)

Q=mx-$$-$RANDOM
cat >"$TMP/c.lua" <<EOF
relayq.config {
  redis = "unix:$SOCK",
  queue = "$Q",
  tls = "none",
  helo = "relayq.test",
  bounce = true,
  recipients_per_transaction = 2,
}
relayq.on_domain("other.test", { recipients_per_transaction = 1 })
EOF
printf 'Subject: multi\r\nMessage-ID: <m1@sender.test>\r\n\r\nbody\r\n' >"$TMP/m.eml"
ID=$("$B" --queue "$Q" enqueue --from a@sender.test --to a@example.test --to b@example.test \
	--to c@example.test --to d@other.test --to e@other.test --to f@nullmx.test \
	--to g@nx.test "$TMP/m.eml")
[ -n "$ID" ] || { echo "enqueue failed" >&2; exit 1; }

RELAYQ_DNS_SERVERS=127.0.0.1:$DNSPORT RELAYQ_MX_PORT=$FAKE_PORT "$D" -c "$TMP/c.lua" >"$TMP/d.log" 2>&1 &
DPID=$!
PIDS+=($DPID)
stat() { local v; v=$(rcli HGET "relayq:{$Q}:stats" "$1"); echo "${v:-0}"; }
stat_ge() { [ "$(stat "$1")" -ge "$2" ]; }
# 5 recipients + the bounce delivered
wait_for 30 stat_ge delivered 6 && ok || bad "delivered $(stat delivered), want 5 + the bounce"
state=$(rcli HGET "relayq:{$Q}:msg:$ID" state)
[ "$state" = dead ] && ok || bad "message $state, want dead (2 recipients failed)"
show=$(rcli FCALL relayq_show 1 "relayq:{$Q}" "$ID")
echo "$show" | grep -q '"to":"f@nullmx.test","s":"failed","code":556,"enh":"5.1.10"' && ok ||
	bad "null MX recipient: $show"
echo "$show" | grep -q '"to":"g@nx.test","s":"failed","code":550,"enh":"5.1.2"' && ok ||
	bad "NXDOMAIN recipient: $show"
[ "$(echo "$show" | grep -o '"hint":"[^"]' | wc -l)" -eq 2 ] && ok || bad "hints missing: $show"
[ "$(echo "$show" | grep -o '"s":"delivered"' | wc -l)" -eq 5 ] && ok || bad "delivered recipients: $show"

# transactions: example.test 2 (2 + 1 recipients), other.test 2 (1 + 1), the bounce
envs=$(cat "$TMP"/rec/msg-*.env)
n=$(ls "$TMP"/rec/msg-*.env | wc -l)
[ "$n" -eq 5 ] && ok || bad "$n messages at the MX, want 5: $envs"
for f in "$TMP"/rec/msg-*.env; do
	if grep -q 'RCPT TO:<[de]@other.test>' "$f"; then
		[ "$(grep -c '^RCPT' "$f")" -eq 1 ] || bad "other.test: more than 1 recipient per transaction: $(cat "$f")"
	elif grep -q 'RCPT TO:<[abc]@example.test>' "$f"; then
		[ "$(grep -c '^RCPT' "$f")" -le 2 ] || bad "example.test: more than 2 recipients per transaction: $(cat "$f")"
		grep -q 'RCPT TO:<[de]@other.test>' "$f" && bad "domains mixed in one transaction: $(cat "$f")"
	fi
done
ok
for r in a@example.test b@example.test c@example.test d@other.test e@other.test; do
	[ "$(echo "$envs" | grep -c "^RCPT TO:<$r>")" -eq 1 ] || bad "$r delivered $(echo "$envs" | grep -c "^RCPT TO:<$r>") times"
done
ok

# the bounce: null sender, to the sender, a multipart/report naming both
bounce=$(grep -l '^MAIL FROM:<>' "$TMP"/rec/msg-*.env | head -1)
if [ -n "$bounce" ]; then
	ok
	grep -q '^RCPT TO:<a@sender.test>' "$bounce" && ok || bad "bounce not to the sender: $(cat "$bounce")"
	eml=${bounce%.env}.eml
	grep -qi 'multipart/report' "$eml" && grep -q 'f@nullmx.test' "$eml" && grep -q 'g@nx.test' "$eml" &&
		ok || bad "bounce content: $(head -c 2000 "$eml")"
	grep -q 'Message-ID: <m1@sender.test>' "$eml" && ok || bad "bounce lacks the original header"
else
	bad "no bounce at the MX"
fi
[ "$(stat enqueued)" -eq 2 ] && ok || bad "enqueued $(stat enqueued), want the message and one bounce"
grep -q 'event=bounce_queued' "$TMP/d.log" && ok || bad "no bounce_queued log line"
grep -q "event=failed .*id=$ID rcpt=f@nullmx.test .*code=556 .*stage=dns" "$TMP/d.log" && ok ||
	bad "no failed log line for the null MX recipient"

# the same bounce key again (a retried settle) returns the first bounce: no second DSN
key="bounce:$ID:1"
again=$(rcli FCALL relayq_enqueue 1 "relayq:{$Q}" "{\"from\":\"\",\"to\":[\"a@sender.test\"],\"key\":\"$key\"}" "x")
[ "$(stat enqueued)" -eq 2 ] && ok || bad "the bounce key $key did not dedupe ($again)"

# ---- connections = 1 shared by two domains: the idle connection of one
# makes room for the other (no wait for the 60 s idle timeout) ----
Q2=lim-$$-$RANDOM
cat >"$TMP/c2.lua" <<EOF
relayq.config {
  redis = "unix:$SOCK",
  queue = "$Q2",
  tls = "none",
  helo = "relayq.test",
  connections = 1,
  timeouts = { idle = "60s" },
}
EOF
for i in 1 2 3 4 5; do
	"$B" --queue "$Q2" enqueue --from a@sender.test --to "x$i@example.test" "$TMP/m.eml" >/dev/null
	"$B" --queue "$Q2" enqueue --from a@sender.test --to "y$i@other.test" "$TMP/m.eml" >/dev/null
done
RELAYQ_DNS_SERVERS=127.0.0.1:$DNSPORT RELAYQ_MX_PORT=$FAKE_PORT "$D" -c "$TMP/c2.lua" >"$TMP/d2.log" 2>&1 &
D2=$!
PIDS+=($D2)
stat2_ge() { local v; v=$(rcli HGET "relayq:{$Q2}:stats" delivered); [ "${v:-0}" -ge "$1" ]; }
wait_for 30 stat2_ge 10 && ok ||
	bad "connections = 1: $(rcli HGET "relayq:{$Q2}:stats" delivered) of 10 delivered in 30 s (waiting for the idle timeout?)"
kill -TERM "$D2"
wait_for 30 bash -c "! kill -0 $D2"
wait "$D2"
rc=$?
[ $rc -eq 0 ] && ok || bad "relayqd (connections = 1) exit $rc"
grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$TMP/d2.log" && bad "sanitizer report (connections = 1)" || ok

# ---- IDNA and CHUNKING: an MX that offers CHUNKING but not SMTPUTF8 ----
FAKE_OPTS=--chunking start_fake chunk
Q3=idn-$$-$RANDOM
cat >"$TMP/c3.lua" <<EOF
relayq.config {
  redis = "unix:$SOCK",
  queue = "$Q3",
  tls = "none",
  helo = "relayq.test",
}
EOF
ID3=$("$B" --queue "$Q3" enqueue --from a@sender.test --to $'user@b\xc3\xbccher.test' \
	--to $'bad@-b\xc3\xbccher.test' "$TMP/m.eml")
[ -n "$ID3" ] && ok || bad "enqueue to UTF-8 domains failed"
RELAYQ_DNS_SERVERS=127.0.0.1:$DNSPORT RELAYQ_MX_PORT=$FAKE_PORT "$D" -c "$TMP/c3.lua" >"$TMP/d3.log" 2>&1 &
D3=$!
PIDS+=($D3)
stat3() { local v; v=$(rcli HGET "relayq:{$Q3}:stats" "$1"); echo "${v:-0}"; }
stat3_ge() { [ "$(stat3 "$1")" -ge "$2" ]; }
wait_for 30 stat3_ge delivered 1 && ok || bad "UTF-8 domain: delivered $(stat3 delivered) of 1"
wait_for 30 stat3_ge failed 1 && ok || bad "invalid UTF-8 domain: failed $(stat3 failed) of 1"
show=$(rcli FCALL relayq_show 1 "relayq:{$Q3}" "$ID3")
echo "$show" | grep -q '"s":"failed","code":553,"enh":"5.1.3"' && ok || bad "invalid IDN recipient: $show"
echo "$show" | grep -q 'internationalized' && ok || bad "invalid IDN recipient without its reason: $show"
grep -qx 'RCPT TO:<user@xn--bcher-kva.test>' "$FAKE_DIR"/msg-*.env && ok ||
	bad "the MX did not get the A-label: $(cat "$FAKE_DIR"/msg-*.env 2>/dev/null)"
grep -q $'^C: BDAT [0-9]* LAST\r$' "$FAKE_DIR"/conn-*.log && ok || bad "no BDAT at the CHUNKING MX"
grep -q $'^C: DATA\r$' "$FAKE_DIR"/conn-*.log && bad "DATA at the CHUNKING MX" || ok
cmp -s <(tr -d '\r' <"$TMP/m.eml") <(tr -d '\r' <"$(ls "$FAKE_DIR"/msg-*.eml | head -1)") && ok ||
	bad "the message at the MX differs from the one enqueued"
kill -TERM "$D3"
wait_for 30 bash -c "! kill -0 $D3"
wait "$D3"
[ $? -eq 0 ] && ok || bad "relayqd (IDNA) exit status"
grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$TMP/d3.log" && bad "sanitizer report (IDNA)" || ok

# chunking = false: DATA to the same MX
Q4=nochunk-$$-$RANDOM
sed -e "s/$Q3/$Q4/" -e 's/^}$/  chunking = false,\n}/' "$TMP/c3.lua" >"$TMP/c4.lua"
"$B" --queue "$Q4" enqueue --from a@sender.test --to x@example.test "$TMP/m.eml" >/dev/null
before=$(ls "$FAKE_DIR"/conn-*.log | wc -l)
RELAYQ_DNS_SERVERS=127.0.0.1:$DNSPORT RELAYQ_MX_PORT=$FAKE_PORT "$D" -c "$TMP/c4.lua" >"$TMP/d4.log" 2>&1 &
D4=$!
PIDS+=($D4)
stat4_ge() { local v; v=$(rcli HGET "relayq:{$Q4}:stats" delivered); [ "${v:-0}" -ge "$1" ]; }
wait_for 30 stat4_ge 1 && ok || bad "chunking = false: not delivered"
last=$(ls -t "$FAKE_DIR"/conn-*.log | head -1)
[ "$(ls "$FAKE_DIR"/conn-*.log | wc -l)" -gt "$before" ] && ok || bad "chunking = false: no new connection"
grep -q $'^C: DATA\r$' "$last" && ! grep -q '^C: BDAT' "$last" && ok ||
	bad "chunking = false: not DATA: $(cat "$last")"
kill -TERM "$D4"
wait_for 30 bash -c "! kill -0 $D4"
wait "$D4"

kill -TERM "$DPID"
wait_for 30 bash -c "! kill -0 $DPID"
wait "$DPID"
rc=$?
[ $rc -eq 0 ] && ok || bad "relayqd exit $rc"
grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$TMP/d.log" && bad "sanitizer report" || ok

echo "test_runner_mx: $passed passed, $failed failed"
[ $failed -eq 0 ]

#!/usr/bin/env bash
# `relayq explain` says what relayqd records: for each case relayqd delivers
# one message per recipient to the fakesmtpd fixture (by relay, or by MX
# through dnsmasq), and the state it records (the events stream: delivered,
# deferred, failed, expired, dropped, held) and whether the attempt counted
# (the event's attempt number: 1 = counted against the message, 0 = against
# the destination) are compared with `relayq explain --json` for the same
# reply under the same config. Cases: every built-in rule (2xx, 4xx, 5xx,
# 421 mid-session, greeting 554 with one host and with two MX hosts, a 421
# greeting at the last MX, 535 at AUTH, too many recipients once and again),
# every Lua action (retry, fail, drop, hold, suspend), expiry by age and by
# attempts.
#
# Env: RELAYQD_BIN, RELAYQ_BIN, RQ_BUILD_ROOT (tests/fakesmtpd),
# RQ_SOURCE_ROOT.
set -u

TEST_TAG=decision-e2e
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "$0")/lib.sh"

[ -x "$FAKE" ] || { echo "no fakesmtpd at $FAKE" >&2; exit 1; }

start_redis


printf 'Subject: t\r\n\r\nbody\r\n' >"$TMP/m.eml"
# one message per recipient; prints "rcpt id" lines
enq_each() {  # queue, extra enqueue args (one word or ''), rcpts...
	local q=$1 extra=$2; shift 2
	for r in "$@"; do
		# shellcheck disable=SC2086
		echo "$r $("$B" --queue "$q" enqueue --from a@example.com --to "$r" $extra "$TMP/m.eml")"
	done
}
# How many recipient events the queue has (held is a message event).
nevents() { rcli XRANGE "relayq:{$1}:events" - + | grep -cxE 'delivered|deferred|failed|expired|dropped'; }
nevents_ge() { [ "$(nevents "$1")" -ge "$2" ]; }

# The recorded "state attempt" of message id: held when a held event came,
# else the type of its recipient event.
recorded() {  # queue, id
	rcli XRANGE "relayq:{$1}:events" - + | python3 -c '
import sys
lines = [l.rstrip("\n") for l in sys.stdin]
want = sys.argv[1]
evs, cur = [], None
i = 0
while i < len(lines):
    if lines[i] == "type":
        cur = {}; evs.append(cur)
    if cur is not None and i + 1 < len(lines) and lines[i] in ("type", "id", "attempt"):
        cur[lines[i]] = lines[i + 1]; i += 2; continue
    i += 1
mine = [e for e in evs if e.get("id") == want]
held = [e for e in mine if e["type"] == "held"]
rc = [e for e in mine if e["type"] != "held"]
if not rc:
    print("none -"); sys.exit()
e = held[0] if held else rc[0]
print(("held" if held else e["type"]), "yes" if e.get("attempt", "0") != "0" else "no")
' "$2"
}

# explain's "state attempt destination" for the same reply.
explained() {  # config, explain args...
	"$B" explain -c "$1" --json "${@:2}" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["state"], "yes" if d["attempt"] else "no", d["destination"])'
}

agree() {  # what, queue, id, config, explain args...
	local what=$1 q=$2 id=$3 cfg=$4; shift 4
	local rec exp
	rec=$(recorded "$q" "$id")
	exp=$(explained "$cfg" "$@")
	if [ "$rec" = "${exp% *}" ]; then
		ok
	else
		bad "$what: relayqd recorded '$rec', explain says '$exp' (state attempt destination) for: $*"
	fi
	LAST_EXPLAINED=$exp
}

write_config() {  # file, queue, relay line ('' for MX), extra settings, rest
	cat >"$1" <<EOF
relayq.config {
  redis = "unix:$SOCK",
  queue = "$2",
  $3
  tls = "none",
  helo = "relayq.test",
  $4
}
relayq.backoff { first = "1h", factor = 2, max = "4h", jitter = 0 }
$5
EOF
}

run_daemon() {  # config, log, queue, events to wait for, extra env...
	local cfg=$1 log=$2 q=$3 n=$4; shift 4
	env "$@" "$D" -c "$cfg" >>"$log" 2>&1 &
	DPID=$!
	PIDS+=($DPID)
	wait_for 60 nevents_ge "$q" "$n" || bad "$q: $(nevents "$q") of $n outcomes recorded"
	kill -TERM "$DPID"
	wait "$DPID" || bad "$q: relayqd exit $?"
	if grep -qE 'ERROR: (Address|Leak|Undefined)Sanitizer|runtime error:' "$log"; then
		bad "$q: sanitizer report"; grep -A20 Sanitizer "$log" | head -40 >&2
	fi
}

# ---- 1. one relay, one recipient per rule: built-in rules and Lua actions ----
start_fake f1 \
	'rcpt addr=r450@example.net reply 450 4.2.0 Mailbox busy' \
	'rcpt addr=r550@example.net reply 550 5.1.1 No such user' \
	'rcpt addr=r452@example.net reply 452 4.2.2 Over quota' \
	'rcpt addr=lretry@example.net reply 553 5.1.3 Bad address syntax' \
	'rcpt addr=lfail@example.net reply 451 4.7.1 Try later' \
	'rcpt addr=ldrop@example.net reply 554 5.7.1 Spam' \
	'rcpt addr=lhold@example.net reply 552 5.2.2 Mailbox full' \
	'rcpt addr=many@example.net reply 452 4.5.3 Too many recipients'
Q1=dec1-$$-$RANDOM
write_config "$TMP/c1.lua" "$Q1" "relay = \"[127.0.0.1]:$FAKE_PORT\"," '' '
relayq.on(553, function(r) return relayq.retry { after = "2h" } end)
relayq.on("4.7.1", function(r) return relayq.fail { reason = "no retries here" } end)
relayq.on("5.7.1", function(r) return relayq.drop() end)
relayq.on("5.2.2", function(r) return relayq.hold() end)'
rcpts=(ok@example.net r450@example.net r550@example.net r452@example.net lretry@example.net
	lfail@example.net ldrop@example.net lhold@example.net many@example.net)
enq_each "$Q1" '' "${rcpts[@]}" >"$TMP/ids1"
run_daemon "$TMP/c1.lua" "$TMP/d1.log" "$Q1" "${#rcpts[@]}"
id_of() { awk -v r="$1" '$1 == r {print $2}' "$2"; }
agree "250" "$Q1" "$(id_of ok@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 250 --enhanced 2.0.0 --stage dot
agree "450" "$Q1" "$(id_of r450@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 450 --enhanced 4.2.0 --text 'Mailbox busy'
agree "550" "$Q1" "$(id_of r550@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 550 --enhanced 5.1.1 --text 'No such user'
agree "452 over quota" "$Q1" "$(id_of r452@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 452 --enhanced 4.2.2 --text 'Over quota'
agree "lua retry" "$Q1" "$(id_of lretry@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 553 --enhanced 5.1.3
agree "lua fail" "$Q1" "$(id_of lfail@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 451 --enhanced 4.7.1
agree "lua drop" "$Q1" "$(id_of ldrop@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 554 --enhanced 5.7.1
agree "lua hold" "$Q1" "$(id_of lhold@example.net "$TMP/ids1")" "$TMP/c1.lua" --code 552 --enhanced 5.2.2
# too many recipients to the first recipient of every transaction: sent
# again once at once (explain: resend), then deferred (explain --resends 1)
st=$(explained "$TMP/c1.lua" --code 452 --enhanced 4.5.3 --text 'Too many recipients')
[ "${st%% *}" = resend ] && ok || bad "too many: explain says '$st', want resend"
agree "too many, again" "$Q1" "$(id_of many@example.net "$TMP/ids1")" "$TMP/c1.lua" \
	--code 452 --enhanced 4.5.3 --text 'Too many recipients' --resends 1
n=$(cat "$TMP"/f1/conn-*.log | grep -c '^C: RCPT TO:<many@example.net>')
[ "$n" -eq 2 ] && ok || bad "too many: RCPT for it sent $n times, want 2 (the try and one resend)"

# ---- 2. 421 mid-session ----
start_fake f2 'rcpt reply 421 4.3.2 Shutting down'
Q2=dec2-$$-$RANDOM
write_config "$TMP/c2.lua" "$Q2" "relay = \"[127.0.0.1]:$FAKE_PORT\"," '' ''
enq_each "$Q2" '' m421@example.net >"$TMP/ids2"
run_daemon "$TMP/c2.lua" "$TMP/d2.log" "$Q2" 1
agree "421 at rcpt" "$Q2" "$(id_of m421@example.net "$TMP/ids2")" "$TMP/c2.lua" --code 421 --enhanced 4.3.2 --stage rcpt

# ---- 3. 554 at the greeting, one host ----
start_fake f3 'greeting reply 554 5.7.1 Go away'
Q3=dec3-$$-$RANDOM
write_config "$TMP/c3.lua" "$Q3" "relay = \"[127.0.0.1]:$FAKE_PORT\"," '' ''
enq_each "$Q3" '' g@example.net >"$TMP/ids3"
run_daemon "$TMP/c3.lua" "$TMP/d3.log" "$Q3" 1
agree "greeting 554" "$Q3" "$(id_of g@example.net "$TMP/ids3")" "$TMP/c3.lua" --code 554 --enhanced 5.7.1 --stage greeting

# ---- 4. 535 at AUTH ----
printf 'wrong\n' >"$TMP/secret"
FAKE_OPTS='--auth PLAIN' start_fake f4 'auth reply 535 5.7.8 Authentication credentials invalid'
Q4=dec4-$$-$RANDOM
write_config "$TMP/c4.lua" "$Q4" "relay = \"[127.0.0.1]:$FAKE_PORT\"," \
	"auth = { user = \"alice\", password_file = \"$TMP/secret\", allow_plaintext = true }," ''
enq_each "$Q4" '' au@example.net >"$TMP/ids4"
run_daemon "$TMP/c4.lua" "$TMP/d4.log" "$Q4" 1
agree "535 at auth" "$Q4" "$(id_of au@example.net "$TMP/ids4")" "$TMP/c4.lua" --code 535 --enhanced 5.7.8 --stage auth

# ---- 5. a Lua suspend ----
start_fake f5 'rcpt reply 450 4.7.0 Slow down'
Q5=dec5-$$-$RANDOM
write_config "$TMP/c5.lua" "$Q5" "relay = \"[127.0.0.1]:$FAKE_PORT\"," '' '
relayq.on("4.7.0", function(r) return relayq.suspend { after = "30m" } end)'
enq_each "$Q5" '' s@example.net >"$TMP/ids5"
run_daemon "$TMP/c5.lua" "$TMP/d5.log" "$Q5" 1
agree "lua suspend" "$Q5" "$(id_of s@example.net "$TMP/ids5")" "$TMP/c5.lua" --code 450 --enhanced 4.7.0
[ "${LAST_EXPLAINED##* }" = suspend ] && ok || bad "lua suspend: explain's destination action is '${LAST_EXPLAINED##* }'"
grep -q 'event=destination_suspended dest=relay for=30m' "$TMP/d5.log" && ok ||
	bad "lua suspend: relayqd did not suspend the relay for 30m: $(grep suspended "$TMP/d5.log")"

# ---- 6. expiry by age and by attempts ----
start_fake f6 'rcpt reply 451 4.3.0 Try again later'
Q6=dec6-$$-$RANDOM
write_config "$TMP/c6.lua" "$Q6" "relay = \"[127.0.0.1]:$FAKE_PORT\"," '' '
relayq.expire { max_age = "1d" }
relayq.on_domain("attempts.example", { expire = { max_age = "5d", max_attempts = 1 } })'
enq_each "$Q6" '' old@example.net a@attempts.example >"$TMP/ids6"
# the first message was created two days ago
old_id=$(id_of old@example.net "$TMP/ids6")
created=$(rcli HGET "relayq:{$Q6}:msg:$old_id" created)
rcli HSET "relayq:{$Q6}:msg:$old_id" created $((created - 2 * 86400 * 1000)) >/dev/null
run_daemon "$TMP/c6.lua" "$TMP/d6.log" "$Q6" 2
agree "expired by age" "$Q6" "$old_id" "$TMP/c6.lua" --code 451 --enhanced 4.3.0 --age 2d
agree "expired by attempts" "$Q6" "$(id_of a@attempts.example "$TMP/ids6")" "$TMP/c6.lua" \
	--code 451 --enhanced 4.3.0 --rcpt a@attempts.example --attempt 1
st=$(explained "$TMP/c6.lua" --code 451 --enhanced 4.3.0 --age 2d)
[ "${st%% *}" = expired ] && ok || bad "expired by age: explain says '$st'"

# ---- 7. by MX: 554 at the greeting of both hosts; 421 at the last MX ----
if command -v dnsmasq >/dev/null; then
	start_dnsmasq --mx-host=two.test,mx1.two.test,10 --mx-host=two.test,mx2.two.test,20 \
		--host-record=mx1.two.test,127.0.0.1 --host-record=mx2.two.test,127.0.0.2
	# both MX hosts on one port: mx1 refuses with 554, mx2 (the last) with
	# 554 on its first connection and 421 on its second
	start_fake f7a 'greeting reply 554 5.7.1 No thanks'
	FAKE_LISTEN=127.0.0.2:$FAKE_PORT start_fake f7b 'greeting conn=1 reply 554 5.7.1 No thanks' \
		'greeting reply 421 4.3.2 Busy'
	Q7=dec7-$$-$RANDOM
	write_config "$TMP/c7.lua" "$Q7" '' '' ''
	enq_each "$Q7" '' x@two.test >"$TMP/ids7"
	run_daemon "$TMP/c7.lua" "$TMP/d7.log" "$Q7" 1 \
		RELAYQ_DNS_SERVERS="127.0.0.1:$DNSPORT" RELAYQ_MX_PORT="$FAKE_PORT"
	[ "$(fake_stat f7a connections)" -ge 1 ] && [ "$(fake_stat f7b connections)" -ge 1 ] && ok ||
		bad "two MX: not both hosts were tried"
	agree "greeting 554, two MX hosts" "$Q7" "$(id_of x@two.test "$TMP/ids7")" "$TMP/c7.lua" \
		--code 554 --enhanced 5.7.1 --stage greeting --rcpt x@two.test
	Q8=dec8-$$-$RANDOM
	write_config "$TMP/c8.lua" "$Q8" '' '' ''
	enq_each "$Q8" '' y@two.test >"$TMP/ids8"
	run_daemon "$TMP/c8.lua" "$TMP/d8.log" "$Q8" 1 \
		RELAYQ_DNS_SERVERS="127.0.0.1:$DNSPORT" RELAYQ_MX_PORT="$FAKE_PORT"
	agree "421 greeting at the last MX" "$Q8" "$(id_of y@two.test "$TMP/ids8")" "$TMP/c8.lua" \
		--code 421 --enhanced 4.3.2 --stage greeting --rcpt y@two.test
	grep -q 'enhanced=4\.3\.2' "$TMP/d8.log" && ok ||
		bad "last MX: relayqd did not record the last host's 421: $(grep -E 'deferred|failed' "$TMP/d8.log")"
else
	echo "dnsmasq is not installed: MX cases skipped" >&2
fi

echo "test_decision_e2e: $passed passed, $failed failed"
[ $failed -eq 0 ]

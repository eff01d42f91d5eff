#!/usr/bin/env bash
# The relayq command-line client against a real redis-server.
#
# Env: RELAYQ_BIN (the built relayq), RELAYQ_TEST_REDIS (unix:/path of a
# shared redis-server; when unset a private one is started here),
# RQ_SOURCE_ROOT (the source tree).
set -u

B=${RELAYQ_BIN:?RELAYQ_BIN must name the relayq binary}
ROOT=${RQ_SOURCE_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/relayq-cli-test.XXXXXX")
chmod 755 "$TMP"
PIDS=()          # processes started here, stopped by pid at exit
passed=0
failed=0

cleanup() {
	for p in "${PIDS[@]}"; do
		kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
	done
	rm -rf "$TMP"
}
trap cleanup EXIT

ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }

# Waits up to $1 seconds for the command in "$2..." to succeed.
wait_for() {
	local secs=$1; shift
	local end=$((SECONDS + secs))
	while ((SECONDS <= end)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	"$@" >/dev/null 2>&1
}

start_redis() {  # sock, extra args...
	local sock=$1; shift
	redis-server --port 0 --unixsocket "$sock" --unixsocketperm 700 --save '' \
		--appendonly no --dir "$TMP" --daemonize no "$@" >>"$TMP/redis.log" 2>&1 &
	PIDS+=($!)
}

if [ -n "${RELAYQ_TEST_REDIS:-}" ]; then
	SOCK=${RELAYQ_TEST_REDIS#unix:}
	OWN_REDIS=0
else
	SOCK=$TMP/redis.sock
	start_redis "$SOCK"
	OWN_REDIS=1
fi
rcli() { redis-cli -s "$SOCK" "$@"; }
wait_for 10 rcli ping || { echo "redis-server did not start" >&2; cat "$TMP/redis.log" >&2; exit 1; }

Q=clitest-$$-$RANDOM
P="relayq:{$Q}"
export RELAYQ_REDIS="unix:$SOCK"
unset RELAYQ_REDIS_PASSWORD
MSG=$TMP/msg.eml
printf 'Subject: test\r\n\r\nHello.\r\n' >"$MSG"

# run ARGS...: runs relayq, stdout in $TMP/out, stderr in $TMP/err, status in RC.
run() {
	"$B" "$@" >"$TMP/out" 2>"$TMP/err" </dev/null
	RC=$?
}
run_in() {  # stdin-file ARGS...
	local in=$1; shift
	"$B" "$@" >"$TMP/out" 2>"$TMP/err" <"$in"
	RC=$?
}
OUT() { cat "$TMP/out"; }
ERR() { cat "$TMP/err"; }

expect_rc() {  # code, what
	if [ "$RC" -eq "$1" ]; then ok; else bad "$2: exit $RC, want $1 (stderr: $(ERR))"; fi
}
expect_out() {  # grep -E pattern, what
	if grep -Eq -- "$1" "$TMP/out"; then ok; else bad "$2: stdout lacks /$1/: $(OUT)"; fi
}
expect_err() {  # grep -F text, what: stderr is one line holding the text
	if grep -Fq -- "$1" "$TMP/err" && [ "$(wc -l <"$TMP/err")" -eq 1 ]; then ok
	else bad "$2: stderr is not one line with '$1': $(ERR)"; fi
}
expect_no_err() {
	if [ ! -s "$TMP/err" ]; then ok; else bad "$1: unexpected stderr: $(ERR)"; fi
}
# json_check 'python expression on d' what  (stdout is one JSON document)
json_check() {
	if python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read()); sys.exit(0 if eval(sys.argv[2]) else 1)' \
		"$TMP/out" "$1" 2>"$TMP/py.err"; then ok; else bad "$2: $1 is false for $(OUT) $(cat "$TMP/py.err")"; fi
}
# json_lines_check: stdout is one JSON object per line; d is the list
json_lines_check() {
	if python3 -c 'import json,sys; d=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]; sys.exit(0 if eval(sys.argv[2]) else 1)' \
		"$TMP/out" "$1" 2>"$TMP/py.err"; then ok; else bad "$2: $1 is false for $(OUT) $(cat "$TMP/py.err")"; fi
}
free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ---- help and version ----
run --version
expect_rc 0 "--version"
expect_out '^relayq [0-9]+\.[0-9]+' "--version"
run --help
expect_rc 0 "--help"
expect_out 'Commands:' "--help"
for c in enqueue list show stats flush requeue hold release delete tail; do
	run "$c" --help
	expect_rc 0 "$c --help"
	expect_out "^Usage: relayq $c" "$c --help"
done
run
expect_rc 2 "no command"

# ---- the functions library is loaded by the CLI when missing ----
if [ "$OWN_REDIS" -eq 1 ]; then
	rcli FUNCTION FLUSH >/dev/null
	run --queue "$Q" stats
	expect_rc 0 "stats on an empty server"
	if rcli FUNCTION LIST LIBRARYNAME relayq | grep -q relayq_enqueue; then ok
	else bad "the CLI did not load the relayq functions"; fi
	# An older library (version 0, no other function) is replaced.
	printf '#!lua name=relayq\nredis.register_function("relayq_version", function() return 0 end)\n' \
		| rcli -x FUNCTION LOAD REPLACE >/dev/null
	run --queue "$Q" stats --json
	expect_rc 0 "stats over an older library"
	json_check "d['ready'] == 0" "stats over an older library"
	[ "$(rcli FCALL relayq_version 0)" -ge 1 ] && ok || bad "the older library was not replaced"
else
	# Shared server: load the current source as the harness does.
	rcli -x FUNCTION LOAD REPLACE <"$ROOT/lua/redis/relayq.lua" >/dev/null
fi

# ---- enqueue ----
run --queue "$Q" enqueue --from sender@example.org --to one@example.net --to two@example.net "$MSG"
expect_rc 0 "enqueue from a file"
expect_no_err "enqueue from a file"
ID1=$(OUT)
[[ "$ID1" =~ ^[0-9a-z]{1,32}$ ]] && ok || bad "enqueue printed '$ID1', not an id"

run_in "$MSG" --redis "unix:$SOCK" enqueue --queue "$Q" --from '' --to three@example.net \
	--delay 1h --meta '{"order":42,"s":"a\"b\\c\u0000d\r\n\u00e9"}' -
expect_rc 0 "enqueue from stdin (options after the command)"
ID2=$(OUT)
[[ "$ID2" =~ ^[0-9a-z]{1,32}$ ]] && [ "$ID2" != "$ID1" ] && ok || bad "second id '$ID2'"

run_in "$MSG" --queue "$Q" enqueue --from a@example.org --to b@example.org --key order-7
K1=$(OUT)
run_in "$MSG" --queue "$Q" enqueue --from a@example.org --to b@example.org --key order-7
expect_rc 0 "enqueue with an idempotency key again"
[ "$(OUT)" = "$K1" ] && ok || bad "the same --key gave a new id: $K1 vs $(OUT)"

# ---- list ----
run --queue "$Q" list
expect_rc 0 "list"
expect_out '^ID +STATE +AGE +ATT +NEXT +FROM +RCPTS +LAST REPLY' "list header"
expect_out "^$ID1 +ready +[0-9]+s +0 +now +sender@example.org +one@example.net,\+1 " "list row of a ready message"
expect_out "^$ID2 +scheduled +[0-9]+s +0 +in (60m|1h) +<> +three@example.net " "list row of a scheduled message"
run --queue "$Q" list --json
expect_rc 0 "list --json"
json_lines_check "len(d) == 3 and {m['id'] for m in d} == {'$ID1', '$ID2', '$K1'}" "list --json ids"
json_lines_check "[m for m in d if m['id'] == '$ID1'][0]['to'] == ['one@example.net', 'two@example.net']" "list --json recipients"
run --queue "$Q" list --state scheduled --json
json_lines_check "[m['id'] for m in d] == ['$ID2']" "list --state scheduled"
run --queue "$Q" list --state bogus
expect_rc 2 "list --state bogus"
expect_err "invalid --state 'bogus'" "list --state bogus"

# ---- show ----
run --queue "$Q" show "$ID2" --json
expect_rc 0 "show --json"
json_check "d['id'] == '$ID2' and d['state'] == 'scheduled' and d['from'] == ''" "show --json fields"
json_check "d['meta'] == {'order': 42, 's': 'a\"b\\\\c\\x00d\\r\\n\\u00e9'}" "show --json keeps a hostile --meta intact"
json_check "[r['to'] for r in d['rcpts']] == ['three@example.net'] and d['rcpts'][0]['s'] == 'pending'" "show --json recipients"
run --queue "$Q" show "$ID1"
expect_rc 0 "show"
expect_out "^id: +$ID1\$" "show id"
expect_out '^from: +sender@example.org$' "show from"
expect_out '^recipients: +2$' "show recipient count"
expect_out '^lease: +0$' "show prints fields beyond the known ones"
expect_out '^  two@example.net +pending' "show recipient state"

# ---- stats ----
run --queue "$Q" stats
expect_rc 0 "stats"
expect_out '^ready: +2$' "stats ready"
expect_out '^scheduled: +1$' "stats scheduled"
run --queue "$Q" stats --json
json_check "d['ready'] == 2 and d['scheduled'] == 1 and d['enqueued'] == 3" "stats --json"

# ---- hold / release / flush ----
run --queue "$Q" hold "$ID1" "$ID2"
expect_rc 0 "hold"
expect_out '^held 2 messages$' "hold output"
run --queue "$Q" list --state held --json
json_lines_check "sorted(m['id'] for m in d) == sorted(['$ID1', '$ID2']) and all(m['state'] == 'held' for m in d)" "held list"
run --queue "$Q" release "$ID1" "$ID2"
expect_rc 0 "release"
expect_out '^released 2 messages$' "release output"
run --queue "$Q" show "$ID2" --json
json_check "d['state'] == 'ready'" "released message is ready"
run_in "$MSG" --queue "$Q" enqueue --from a@example.org --to later@example.org --delay 2h
ID3=$(OUT)
run --queue "$Q" flush "$ID3"
expect_rc 0 "flush ID"
expect_out '^flushed 1 message$' "flush output"
run --queue "$Q" show "$ID3" --json
json_check "d['state'] == 'ready'" "flushed message is ready"
run --queue "$Q" flush
expect_rc 2 "flush without ids or --all"
run --queue "$Q" flush --all
expect_rc 0 "flush --all"
run --queue "$Q" release "$ID3"
expect_rc 1 "release of a message that is not held"
expect_err "is ready, not held" "release of a message that is not held"

# ---- tail, and a dead message to requeue ----
"$B" --queue "$Q" tail >"$TMP/tail.out" 2>"$TMP/tail.err" </dev/null &
TAIL=$!
PIDS+=($TAIL)
"$B" --queue "$Q" tail --json >"$TMP/tailj.out" 2>"$TMP/tailj.err" </dev/null &
TAILJ=$!
PIDS+=($TAILJ)
tail_ready() { rcli CLIENT LIST | grep -q "name=relayq-tail-$1 .*cmd=xread"; }
wait_for 10 tail_ready "$TAIL" && wait_for 10 tail_ready "$TAILJ" && ok || bad "tail did not start reading events"

rcli --json FCALL relayq_claim 1 "$P" 100 60000 >"$TMP/claim.json"
LEASE=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print([m[7] for m in d[2] if m[0]==sys.argv[2]][0])' "$TMP/claim.json" "$ID1")
[ -n "$LEASE" ] && ok || bad "claim did not return $ID1"
rcli FCALL relayq_settle 1 "$P" "[{\"id\":\"$ID1\",\"lease\":$LEASE,\"attempt\":true,\"rcpts\":[
 {\"to\":\"one@example.net\",\"s\":\"delivered\",\"code\":250,\"enh\":\"2.0.0\",\"text\":\"queued as X\",\"stage\":\"dot\"},
 {\"to\":\"two@example.net\",\"s\":\"failed\",\"code\":550,\"enh\":\"5.1.1\",\"text\":\"no such user\",\"stage\":\"rcpt\",\"hint\":\"check the address\"}]}]" >"$TMP/settle.out"
grep -q done "$TMP/settle.out" && ok || bad "settle: $(cat "$TMP/settle.out")"

wait_for 10 grep -q "failed $ID1 two@example.net 550 5.1.1 no such user" "$TMP/tail.out" && ok \
	|| bad "tail did not print the failed event: $(cat "$TMP/tail.out")"
grep -Eq "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z delivered $ID1 one@example.net 250 2.0.0 queued as X$" "$TMP/tail.out" && ok \
	|| bad "tail line for the delivered event: $(cat "$TMP/tail.out")"
wait_for 10 grep -q "no such user" "$TMP/tailj.out" && ok || bad "tail --json got no event"
cp "$TMP/tailj.out" "$TMP/out"
json_lines_check "[(e['type'], e['rcpt'], e['code']) for e in d] == [('delivered', 'one@example.net', 250), ('failed', 'two@example.net', 550)] and d[1]['id'] == '$ID1'" "tail --json events"

kill -INT "$TAIL" "$TAILJ"
gone() { ! kill -0 "$1" 2>/dev/null; }
if wait_for 10 gone "$TAIL" && wait_for 10 gone "$TAILJ"; then
	wait "$TAIL"; T1=$?
	wait "$TAILJ"; T2=$?
	[ "$T1" -eq 0 ] && [ "$T2" -eq 0 ] && ok || bad "tail exit status on SIGINT: $T1 $T2"
else
	bad "tail did not exit on SIGINT"
fi
[ ! -s "$TMP/tail.err" ] && [ ! -s "$TMP/tailj.err" ] && ok || bad "tail wrote to stderr: $(cat "$TMP/tail.err" "$TMP/tailj.err")"

# tail ends when its reader goes away (SIGPIPE / EPIPE), quietly.
( "$B" --queue "$Q" tail --json 2>"$TMP/pipe.err" </dev/null | head -n 1 >"$TMP/head.out"; exit "${PIPESTATUS[0]}" ) &
PIPE=$!
PIDS+=($PIPE)
tail_in_pipe() {  # a reading tail whose parent is the subshell $PIPE
	local p
	for p in $(rcli CLIENT LIST | sed -n 's/.*name=relayq-tail-\([0-9]*\) .*cmd=xread.*/\1/p'); do
		[ "$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')" = "$PIPE" ] && return 0
	done
	return 1
}
wait_for 10 tail_in_pipe && ok || bad "tail in a pipe did not start"
rcli FCALL relayq_hold 1 "$P" "$K1" >/dev/null
if wait_for 10 gone "$PIPE"; then
	wait "$PIPE"; PS=$?
	[ "$PS" -eq 0 ] && ok || bad "tail | head: tail exit status $PS"
	grep -q '"type":"held"' "$TMP/head.out" && ok || bad "tail | head got: $(cat "$TMP/head.out")"
	[ ! -s "$TMP/pipe.err" ] && ok || bad "tail | head stderr: $(cat "$TMP/pipe.err")"
else
	bad "tail did not exit after its reader closed the pipe"
fi

run --queue "$Q" show "$ID1"
expect_rc 0 "show a dead message"
expect_out '^state: +dead$' "show dead state"
expect_out '^last reply: +550 5.1.1 no such user \(at rcpt\)$' "show last reply"
expect_out '^  two@example.net +failed +550 5.1.1 no such user \(at rcpt\)' "show failed recipient"
expect_out 'hint: check the address$' "show recipient hint"
run --queue "$Q" list --state dead
expect_out "^$ID1 +dead +[0-9]+s +1 +- +sender@example.org +one@example.net,\+1 +550 5.1.1 no such user$" "list dead row"
run --queue "$Q" requeue "$K1"
expect_rc 1 "requeue of a message that is not dead"
expect_err "relayq: requeue: $K1 is held, not dead" "requeue of a message that is not dead"
run --queue "$Q" requeue --dead
expect_rc 0 "requeue --dead"
expect_out '^requeued 1 message$' "requeue --dead output"
run --queue "$Q" show "$ID1" --json
json_check "d['state'] == 'ready' and d['attempts'] == 0" "requeued message"

# ---- delete ----
run --queue "$Q" delete "$ID1" "$ID2"
expect_rc 0 "delete"
expect_out '^deleted 2 messages$' "delete output"
run --queue "$Q" show "$ID1"
expect_rc 1 "show a deleted message"
expect_err "unknown id: $ID1" "show a deleted message"

# ---- errors ----
run --queue "$Q" show nosuchid
expect_rc 1 "show an unknown id"
expect_err "relayq: unknown id: nosuchid" "show an unknown id"
run --queue "$Q" hold nosuchid
expect_rc 1 "hold an unknown id"
expect_err "unknown id: nosuchid" "hold an unknown id"
run --queue "$Q" delete nosuchid
expect_rc 1 "delete an unknown id"
expect_err "unknown id: nosuchid" "delete an unknown id"
run_in "$MSG" --queue "$Q" enqueue --from a@example.org --to $'a\rb@x'
expect_rc 1 "enqueue to an address with CR"
expect_err "relayq: invalid address in to[0]: contains CR" "enqueue to an address with CR"
run_in "$MSG" --queue "$Q" enqueue --from $'a@x\n' --to b@example.org
expect_rc 1 "enqueue from an address with LF"
expect_err "invalid address in from: contains LF" "enqueue from an address with LF"
run_in "$MSG" --queue "$Q" enqueue --from a@example.org
expect_rc 2 "enqueue without --to"
expect_err "relayq: enqueue: at least one --to is required" "enqueue without --to"
run_in "$MSG" --queue "$Q" enqueue --to b@example.org
expect_rc 2 "enqueue without --from"
run_in "$MSG" --queue "$Q" enqueue --from a@example.org --to b@example.org --meta '{"a":'
expect_rc 2 "enqueue with bad --meta"
expect_err "relayq: enqueue: --meta is not valid JSON" "enqueue with bad --meta"
run_in "$MSG" --queue "$Q" enqueue --from a@example.org --to b@example.org --meta '[1]'
expect_rc 2 "enqueue with a --meta array"
expect_err "--meta must be a JSON object" "enqueue with a --meta array"
run_in "$MSG" --queue "$Q" enqueue --from a@example.org --to b@example.org --delay soon
expect_rc 2 "enqueue with a bad --delay"
run --queue "$Q" enqueue --from a@example.org --to b@example.org "$TMP/missing.eml"
expect_rc 1 "enqueue of a missing file"
expect_err "cannot open $TMP/missing.eml" "enqueue of a missing file"
run_in /dev/null --queue "$Q" enqueue --from a@example.org --to b@example.org
expect_rc 1 "enqueue of an empty message"
expect_err "message is empty" "enqueue of an empty message"
run --queue "$Q" frobnicate
expect_rc 2 "unknown command"
expect_err "relayq: unknown command 'frobnicate'" "unknown command"
run --queue "$Q" list --frob
expect_rc 2 "unknown option"
expect_err "relayq: list: unknown option '--frob'" "unknown option"
run --queue 'bad{queue}' stats
expect_rc 2 "invalid queue name"
expect_err "invalid queue name" "invalid queue name"
# -c reads redis and queue from relayqd's config (options still win).
printf 'relayq.config { redis = "unix:%s", queue = "%s" }\n' "$SOCK" "$Q" >"$TMP/relayq.lua"
printf 'relayq.config { redis = 5 }\n' >"$TMP/bad.lua"
RELAYQ_REDIS="unix:$TMP/nowhere.sock" run -c "$TMP/relayq.lua" stats --json
expect_rc 0 "-c config"
json_check "d['enqueued'] >= 3" "-c config: stats of the configured queue"
run -c "$TMP/relayq.lua" --redis "unix:$TMP/nowhere.sock" stats
expect_rc 1 "--redis wins over -c"
run list --queue "$Q-empty" -c "$TMP/relayq.lua" --state inflight
expect_rc 0 "--queue wins over -c"
expect_out "^queue $Q-empty: no messages in state inflight\$" "--queue wins over -c"
run -c "$TMP/bad.lua" stats
expect_rc 1 "-c with an invalid config"
grep -q "^$TMP/bad.lua:1: error: " "$TMP/err" && tail -n 1 "$TMP/err" | grep -q "relayq: cannot load config $TMP/bad.lua" \
	&& ok || bad "-c with an invalid config: $(ERR)"
run -c "$TMP/none.lua" stats
expect_rc 1 "-c with a missing file"
# explain is dispatched to cli_explain.c, a global -c passed on.
run explain --code 550
expect_rc 0 "explain"
expect_out '^action: fail$' "explain 550"
run -c "$TMP/relayq.lua" explain --code 421 --json
expect_rc 0 "explain with -c"
json_check "d['action'] == 'retry'" "explain 421 with -c"
run explain --frobnicate
expect_rc 2 "explain with a bad option"

# Unreachable Redis: the message names the (redacted) URL.
run --redis "unix:$TMP/nowhere.sock" --queue "$Q" stats
expect_rc 1 "unreachable Redis (socket)"
expect_err "relayq: cannot connect to Redis at unix:$TMP/nowhere.sock" "unreachable Redis (socket)"
PORT=$(free_port)
SECRET=Pw-$RANDOM-s3cr3t
RELAYQ_REDIS="redis://app:$SECRET@127.0.0.1:$PORT/3" run --queue "$Q" stats
expect_rc 1 "unreachable Redis (TCP, password in URL)"
expect_err "relayq: cannot connect to Redis at redis://app:***@127.0.0.1:$PORT/3: Connection refused" "password redacted"
grep -q "$SECRET" "$TMP/out" "$TMP/err" && bad "the password appears in the output" || ok
run --redis "redis://app:$SECRET@127.0.0.1:$PORT/3" --queue "$Q" stats
expect_rc 2 "a password on the command line"
expect_err "--redis redis://app:***@127.0.0.1:$PORT/3: a password does not belong on the command line" "a password on the command line"
grep -q "$SECRET" "$TMP/out" "$TMP/err" && bad "the password appears in the output" || ok
RELAYQ_REDIS_PASSWORD=$SECRET run --redis "unix:$TMP/nowhere.sock" --queue "$Q" stats
expect_rc 1 "unreachable Redis, password from the environment"
grep -q "$SECRET" "$TMP/out" "$TMP/err" && bad "the password appears in the output" || ok
RELAYQ_REDIS="redis://:$SECRET@127.0.0.1:$PORT" run --queue "$Q" list
expect_err "redis://:***@127.0.0.1:$PORT/0" "password from RELAYQ_REDIS redacted"
grep -q "$SECRET" "$TMP/out" "$TMP/err" && bad "the password appears in the output" || ok
run --redis "http://u:$SECRET@host" stats
expect_rc 2 "invalid URL"
grep -q "$SECRET" "$TMP/out" "$TMP/err" && bad "the password appears in an invalid-URL message" || ok

# A Redis that needs a password: from the environment, a file or the URL.
AUTH_SOCK=$TMP/auth.sock
APORT=$(free_port)
redis-server --port "$APORT" --bind 127.0.0.1 --unixsocket "$AUTH_SOCK" --unixsocketperm 700 \
	--save '' --appendonly no --dir "$TMP" --daemonize no --requirepass "$SECRET" >>"$TMP/redis-auth.log" 2>&1 &
PIDS+=($!)
wait_for 10 redis-cli -s "$AUTH_SOCK" -a "$SECRET" --no-auth-warning ping || bad "password redis did not start"
run --redis "unix:$AUTH_SOCK" --queue "$Q" stats
expect_rc 1 "no password for a server that needs one"
expect_err "NOAUTH" "no password for a server that needs one"
RELAYQ_REDIS_PASSWORD=$SECRET run --redis "unix:$AUTH_SOCK" --queue "$Q" stats --json
expect_rc 0 "password from RELAYQ_REDIS_PASSWORD"
json_check "d['ready'] == 0" "stats with a password"
printf '%s\n' "$SECRET" >"$TMP/pw"
run --redis "unix:$AUTH_SOCK" --redis-password-file "$TMP/pw" --queue "$Q" stats
expect_rc 0 "password from --redis-password-file"
RELAYQ_REDIS="redis://default:$SECRET@127.0.0.1:$APORT/0" run --queue "$Q" stats
expect_rc 0 "password in the URL of RELAYQ_REDIS"
RELAYQ_REDIS_PASSWORD=$SECRET run --redis "redis://default@127.0.0.1:$APORT" --queue "$Q" stats
expect_rc 0 "user in --redis, password from the environment"
RELAYQ_REDIS="redis://default:wrong-$SECRET@127.0.0.1:$APORT/0" run --queue "$Q" stats
expect_rc 1 "wrong password in the URL"
expect_err "relayq: Redis at redis://default:***@127.0.0.1:$APORT/0 refused authentication" "wrong password in the URL"
grep -q "$SECRET" "$TMP/out" "$TMP/err" && bad "the wrong password appears in the output" || ok
printf 'wrong-%s\n' "$SECRET" >"$TMP/pw"
run --redis "unix:$AUTH_SOCK" --redis-password-file "$TMP/pw" --queue "$Q" stats
expect_rc 1 "wrong password"
expect_err "refused authentication" "wrong password"
grep -q "$SECRET" "$TMP/out" "$TMP/err" && bad "the wrong password appears in the output" || ok
run --redis "unix:$AUTH_SOCK" --redis-password-file "$TMP/nopw" --queue "$Q" stats
expect_rc 1 "missing password file"
expect_err "cannot read --redis-password-file" "missing password file"

# One URL rule for relayq and relayqd (rq_queue_url_parse): special characters
# in a password are %-encoded; unencoded ones are refused, never guessed, and
# no message shows the password.
OPSPW='p#ss@w/rd?:x'
redis-cli -s "$AUTH_SOCK" -a "$SECRET" --no-auth-warning ACL SETUSER ops on ">$OPSPW" '~*' '&*' '+@all' >/dev/null
RELAYQ_REDIS="redis://ops:p%23ss%40w%2Frd%3F:x@127.0.0.1:$APORT/0" run --queue "$Q" stats
expect_rc 0 "%-encoded '#', '@', '/', '?' and a ':' in the password"
for url in "redis://ops:$OPSPW@127.0.0.1:$APORT/0" "redis://:pa#$SECRET@127.0.0.1:$APORT" \
	"redis://:pa?$SECRET@127.0.0.1:$APORT" "redis:/:$SECRET@127.0.0.1:$APORT" \
	"redis://:$SECRET@127.0.0.1:$APORT?db=1" "redis://:%zz$SECRET@127.0.0.1"; do
	RELAYQ_REDIS=$url run --queue "$Q" stats
	expect_rc 2 "URL refused: $url"
	expect_err "invalid Redis URL" "URL refused: $url"
	grep -qF -e "$SECRET" -e "ss@w" "$TMP/out" "$TMP/err" && bad "a password appears in the message for $url: $(ERR)" || ok
done
RELAYQ_REDIS="redis://:pa#$SECRET@127.0.0.1:$APORT" run --queue "$Q" stats
expect_err "%23" "the refusal names the encoding"

# -c: relayqd's redis_user / redis_password_file / redis_password_env.
printf '%s\n' "$OPSPW" >"$TMP/opspw"
chmod 600 "$TMP/opspw"
printf 'relayq.config { redis = "redis://127.0.0.1:%s/0", queue = "%s",\n  redis_user = "ops", redis_password_file = "%s" }\n' \
	"$APORT" "$Q" "$TMP/opspw" >"$TMP/auth-file.lua"
run -c "$TMP/auth-file.lua" stats
expect_rc 0 "-c with redis_user and redis_password_file"
printf 'relayq.config { redis = "redis://127.0.0.1:%s/0", queue = "%s",\n  redis_password_env = "RQ_CLI_TEST_PW" }\n' \
	"$APORT" "$Q" >"$TMP/auth-env.lua"
RQ_CLI_TEST_PW=$SECRET run -c "$TMP/auth-env.lua" stats
expect_rc 0 "-c with redis_password_env"
RQ_CLI_TEST_PW=wrong-$SECRET run -c "$TMP/auth-env.lua" stats
expect_rc 1 "-c with redis_password_env, wrong password"
grep -qF "$SECRET" "$TMP/out" "$TMP/err" && bad "the password appears in the output" || ok
if [ -n "${RELAYQD_BIN:-}" ]; then
	# relayqd --check: the URL's password never printed
	printf 'relayq.config { redis = "redis://:%s@127.0.0.1:%s/0" }\n' "$SECRET" "$APORT" >"$TMP/pw-url.lua"
	"$RELAYQD_BIN" --check -c "$TMP/pw-url.lua" >"$TMP/out" 2>"$TMP/err"
	RC=$?
	expect_rc 0 "relayqd --check, password in the URL"
	grep -qF "$SECRET" "$TMP/out" "$TMP/err" && bad "relayqd --check prints the password: $(ERR)" || ok
	printf 'relayq.config { redis = "redis:/:%s@127.0.0.1" }\n' "$SECRET" >"$TMP/pw-url.lua"
	"$RELAYQD_BIN" --check -c "$TMP/pw-url.lua" >"$TMP/out" 2>"$TMP/err"
	RC=$?
	expect_rc 1 "relayqd --check, broken URL with a password"
	grep -qF "$SECRET" "$TMP/out" "$TMP/err" && bad "relayqd --check prints the password: $(ERR)" || ok
fi

# C1 controls (U+0080-U+009F, UTF-8 C2 80..C2 9F) in stored text reach the
# terminal escaped, like the other control bytes.
QC=$Q-c1
run_in "$MSG" --queue "$QC" enqueue --from a@example.org --to b@example.org --meta '{"k":"a\u009b31mb\u0085c"}'
expect_rc 0 "enqueue with C1 controls in --meta"
IDC=$(OUT)
rcli HSET "relayq:{$QC}:msg:$IDC" last_code 451 last_text $'greylisted \xc2\x9b2J now' >/dev/null
run --queue "$QC" show "$IDC"
expect_rc 0 "show with C1 controls"
LC_ALL=C grep -q $'\xc2[\x80-\x9f]' "$TMP/out" && bad "show prints a C1 control: $(OUT | od -c | head)" || ok
expect_out 'a\\xc2\\x9b31mb\\xc2\\x85c' "show escapes C1 in meta"
expect_out 'greylisted \\xc2\\x9b2J now' "show escapes C1 in the reply"
run --queue "$QC" list
expect_rc 0 "list with C1 controls"
LC_ALL=C grep -q $'\xc2[\x80-\x9f]' "$TMP/out" && bad "list prints a C1 control: $(OUT | od -c | head)" || ok
expect_out 'greylisted \\xc2\\x9b2J now' "list escapes C1 in the reply"
run --queue "$QC" show "$IDC" --json
json_check "d['meta'] == {'k': 'a\u009b31mb\u0085c'}" "show --json keeps C1 in meta as data"
rcli --scan --pattern "relayq:{$QC}:*" | while read -r k; do rcli DEL "$k" >/dev/null; done

# Deeply nested meta (issue 15, item 10). Enqueue refuses more than 32
# levels (RQ_JSON_META_MAX_DEPTH); a message that has deeper meta anyway (an
# older library, a stray HSET) is still listed and shown, its meta marked
# unreadable, never left out.
QD=deep-$$-$RANDOM
deep() { python3 -c 'import sys; n=int(sys.argv[1]); print("{\"a\":" * n + "1" + "}" * n)' "$1"; }
run --queue "$QD" enqueue --from a@example.com --to b@example.net --meta "$(deep 32)" "$MSG"
expect_rc 0 "enqueue --meta 32 levels deep"
run --queue "$QD" enqueue --from a@example.com --to b@example.net --meta "$(deep 33)" "$MSG"
expect_rc 2 "enqueue --meta 33 levels deep"
expect_err "enqueue: --meta is nested deeper than 32 levels" "enqueue --meta 33 levels deep"
ENV33=$(python3 -c 'import sys; n=33; print("{\"from\":\"\",\"to\":[\"b@example.net\"],\"meta\":" + "{\"a\":" * n + "1" + "}" * n + "}")')
[ "$(rcli FCALL relayq_enqueue 1 "relayq:{$QD}" "$ENV33" 'x' 2>&1)" = "ERR relayq: meta is nested deeper than 32 levels" ] \
	&& ok || bad "FCALL enqueue with meta 33 deep: $(rcli FCALL relayq_enqueue 1 "relayq:{$QD}" "$ENV33" x 2>&1)"
run --queue "$QD" enqueue --from a@example.com --to c@example.net "$MSG"
IDD=$(OUT)
deep 900 | rcli -x HSET "relayq:{$QD}:msg:$IDD" meta >/dev/null
run --queue "$QD" list
expect_rc 0 "list with a 900-deep meta"
expect_no_err "list with a 900-deep meta"
expect_out "^$IDD +ready .*c@example\.net" "list shows the message with a 900-deep meta"
[ "$(grep -c '@example' "$TMP/out")" -eq 2 ] && ok || bad "list omits a message: $(OUT)"
run --queue "$QD" list --json
expect_rc 0 "list --json with a 900-deep meta"
json_lines_check "len(d) == 2 and [m for m in d if m['id'] == '$IDD' and m['meta'] is None and m['unreadable'] == ['meta'] and m['to'] == ['c@example.net']]" \
	"list --json marks the meta unreadable"
run --queue "$QD" show "$IDD"
expect_rc 0 "show with a 900-deep meta"
expect_out '^meta: +\(unreadable: nested deeper than 64 levels\)$' "show marks the meta unreadable"
expect_out '^recipients: +1$' "show still shows the recipients"
run --queue "$QD" show "$IDD" --json
json_check "d['id'] == '$IDD' and d['meta'] is None and d['unreadable'] == ['meta'] and d['rcpts'][0]['to'] == 'c@example.net'" \
	"show --json marks the meta unreadable"
# a record the CLI cannot read at all (a number JSON does not allow, which
# Redis' cjson passes) is still a row, with the reason on stderr
run --queue "$QD" enqueue --from a@example.com --to d@example.net "$MSG"
IDX=$(OUT)
rcli HSET "relayq:{$QD}:msg:$IDX" meta '{"n":0x10}' >/dev/null
run --queue "$QD" list
expect_rc 1 "list with an unreadable record"
expect_out "^$IDX .*unreadable record" "list shows the unreadable record as a row"
[ "$(grep -c '@example' "$TMP/out")" -eq 2 ] && ok || bad "list omits a message: $(OUT)"
rcli --scan --pattern "relayq:{$QD}:*" | while read -r k; do rcli DEL "$k" >/dev/null; done

# Leave the shared server clean.
rcli --scan --pattern "relayq:{$Q}:*" | while read -r k; do rcli DEL "$k" >/dev/null; done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

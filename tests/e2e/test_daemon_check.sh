#!/usr/bin/env bash
# relayqd --check -c FILE: exit 0 and "FILE: ok" on a good file; on a bad
# one exit 1 with every problem as FILE:LINE. And relayqd -c BAD refuses to
# start (non-zero exit, FILE:LINE on stderr) instead of running with a
# half-read config.
set -euo pipefail

BIN=${RELAYQD_BIN:?RELAYQD_BIN is not set}
SRC=${RQ_SOURCE_ROOT:?RQ_SOURCE_ROOT is not set}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rq-dcheck.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

fails=0
fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }

# good FILE: --check exits 0 and says ok
good() {
	local f=$1 rc=0
	"$BIN" --check -c "$f" >"$TMP/out" 2>"$TMP/err" || rc=$?
	[ $rc -eq 0 ] || { fail "$f: --check exit $rc: $(cat "$TMP/err")"; return; }
	grep -q "$f: ok" "$TMP/out" "$TMP/err" || fail "$f: --check printed no '$f: ok': $(cat "$TMP/out" "$TMP/err")"
	if grep -q 'AddressSanitizer\|LeakSanitizer\|runtime error:' "$TMP/err"; then
		fail "$f: sanitizer report"; cat "$TMP/err" >&2
	fi
}

# bad NAME LINE PATTERN: --check exits 1, names FILE:LINE and the problem
bad() {
	local name=$1 line=$2 pat=$3 f="$TMP/$1.lua" rc=0
	"$BIN" --check -c "$f" >"$TMP/out" 2>"$TMP/err" || rc=$?
	[ $rc -eq 1 ] || fail "$name: --check exit $rc (want 1): $(cat "$TMP/out" "$TMP/err")"
	grep -q -- "$f:$line:" "$TMP/err" || fail "$name: no '$f:$line:' on stderr: $(cat "$TMP/err")"
	grep -qi -- "$pat" "$TMP/err" || fail "$name: stderr does not match /$pat/: $(cat "$TMP/err")"
	if grep -q 'AddressSanitizer\|LeakSanitizer\|runtime error:' "$TMP/err"; then
		fail "$name: sanitizer report"; cat "$TMP/err" >&2
	fi
	# the daemon does not start with it either
	rc=0
	timeout 20 "$BIN" -c "$f" >"$TMP/out" 2>"$TMP/err" || rc=$?
	[ $rc -ne 0 ] && [ $rc -ne 124 ] || fail "$name: relayqd -c started with a bad file (exit $rc)"
	grep -q -- "$f" "$TMP/out" "$TMP/err" || fail "$name: relayqd -c does not name the file: $(cat "$TMP/err")"
}

cat >"$TMP/good.lua" <<'LUA'
relayq.config {
  redis = "unix:/nonexistent/redis.sock",
  queue = "q",
  relay = "[127.0.0.1]:2525",
  tls = "none",
  helo = "relayq.test",
  batch = 100,
  lease = "30s",
  timeouts = { connect = "5s", rcpt = "1m", idle = 0 },
}
relayq.backoff { first = "1s", factor = 2, max = "4s", jitter = 0 }
relayq.expire { max_age = "5d" }
relayq.on(550, function(r, msg)
  if r.text:find("greylist", 1, true) then return relayq.retry { after = "10m" } end
end)
relayq.on_domain("example.net", { per_destination = 2 })
LUA
good "$TMP/good.lua"
good "$SRC/contrib/relayq.example.lua"

printf 'relayq.config {\n  queue = "q",\n  bogus_key = 1,\n}\n' >"$TMP/unknown.lua"
bad unknown 3 'bogus_key'

printf 'relayq.config { queue = "q" }\nrelayq.backoff { first = "1s" }\n\nrelayq.on(550 function(r) return end)\nrelayq.expire { max_age = "5d" }\n' >"$TMP/syntax.lua"
bad syntax 4 'expected\|near'

printf 'relayq.config {\n  queue = "q",\n  batch = "many",\n}\n' >"$TMP/type.lua"
bad type 3 'batch'

printf 'relayq.config {\n  queue = "q",\n  lease = "1d",\n  relay = "[127.0.0.1]:2525",\n  tls = "sometimes",\n}\n' >"$TMP/tls.lua"
bad tls 5 'tls'

printf 'relayq.config { queue = "q" }\nrelayq.backoff { first = "1s", factor = 2,\n  max = "forever" }\n' >"$TMP/duration.lua"
bad duration 3 'max'

if [ $fails -ne 0 ]; then
	echo "$fails failure(s)" >&2
	exit 1
fi
echo "ok"

#!/usr/bin/env bash
# relayq explain: the built-in policy and Lua overrides, through the real
# binary ($RELAYQ_BIN), against policy files written here. Sends nothing.
set -euo pipefail

BIN=${RELAYQ_BIN:?RELAYQ_BIN is not set}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rq-explain.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

if ! "$BIN" explain --help >"$TMP/help" 2>&1; then
	echo "SKIP: '$BIN explain' is not dispatched to rq_cli_explain yet:" >&2
	cat "$TMP/help" >&2
	exit 77
fi

fails=0
pass() { :; }
fail() { echo "FAIL: $*" >&2; fails=$((fails + 1)); }

# expect "<description>" "<grep -E pattern>" -- explain args...
# Every pattern must match the output (one per line, all of them).
expect() {
	local desc=$1; shift
	local pats=()
	while [ "$1" != "--" ]; do pats+=("$1"); shift; done
	shift
	local out rc=0
	out=$("$BIN" explain "$@" 2>"$TMP/err") || rc=$?
	if [ $rc -ne 0 ]; then
		fail "$desc: exit $rc: $(cat "$TMP/err")"
		return
	fi
	for p in "${pats[@]}"; do
		if ! grep -Eq -- "$p" <<<"$out"; then
			fail "$desc: no line matching /$p/ in:"; echo "$out" >&2
			return
		fi
	done
}

# ---- built-in policy (no -c) ----
expect "250 delivered" '^action: delivered$' '^rule: builtin:2xx$' -- --code 250 --stage dot
expect "421 retry" '^action: retry$' '^rule: builtin:421$' '^counts_against: destination$' -- --code 421
expect "450 retry" '^action: retry$' '^rule: builtin:4xx$' '^after: 300 ' '^jitter: 255\.\.345$' -- --code 450
expect "451 third attempt" '^action: retry$' '^after: 1200 \(20m\)$' -- --code 451 --enhanced 4.7.1 --attempt 3
expect "452 storage" '^action: retry$' '^rule: builtin:4xx$' -- --code 452 --enhanced 4.3.1
expect "452 too many" '^action: not_tried$' '^rule: builtin:too-many-recipients$' -- --code 452 --enhanced 4.5.3 --stage rcpt
expect "552 5.5.3" '^action: not_tried$' -- --code 552 --enhanced 5.5.3
expect "451 4.5.3" '^action: not_tried$' '^state: resend$' -- --code 451 --enhanced 4.5.3
for c in 550 551 552 553 554; do
	expect "$c fail" '^action: fail$' '^rule: builtin:5xx$' '^counts_against: message$' -- --code $c
done
expect "greeting 554" '^action: next_host$' '^rule: builtin:greeting-5xx$' '^counts_against: destination$' -- --code 554 --stage greeting
expect "535 auth" '^action: retry$' '^rule: builtin:auth$' '^loud: yes' -- --code 535 --enhanced 5.7.8 --stage auth
expect "530" '^action: retry$' '^rule: builtin:auth$' -- --code 530 --stage mail
for ev in timeout refused lost tls dns protocol; do
	expect "$ev" '^action: retry$' "^rule: builtin:$ev\$" '^counts_against: destination$' -- --code $ev
done
expect "expired by age" '^action: fail$' '^rule: builtin:expired$' '^expired: yes$' 'max_age 5d' -- --code 451 --age 5d
expect "not yet expired" '^action: retry$' -- --code 451 --age 4d
expect "hint" '^hint: ' '^fix: ' -- --code 550 --enhanced 5.1.1
expect "json" '^\{"action":"retry","after":300\.0,"after_min":255\.0,"after_max":345\.0,"counts_against":"message","rule":"builtin:4xx"' -- --code 451 --json

# ---- Lua overrides ----
cat >"$TMP/policy.lua" <<'EOF'
relayq.config { queue = "explain" }
relayq.backoff { first = "1m", factor = 2, max = "1h", jitter = 0 }
relayq.expire { max_age = "2d", max_attempts = 5 }
relayq.on(550, function(r)
  if r.text:find("greylist", 1, true) then return relayq.retry { after = "10m" } end
end)
relayq.on(421, function(r) return relayq.fail { reason = "421 is final here" } end)
relayq.on("5.7.26", function(r) return relayq.fail { reason = "dmarc" } end)
relayq.on("4xx", function(r) return relayq.retry { after = "3m" } end)
relayq.on("*", function(r) return relayq.hold() end)
relayq.on("timeout", function(r) return relayq.suspend { after = "15m" } end)
relayq.on(552, function(r) error("broken handler") end)
relayq.on(553, function(r) while true do end end)
relayq.on(554, function(r) local s = "x" while true do s = s .. s end end)
relayq.on(551, function(r) if io or os.execute or require then return relayq.drop() end
  return relayq.fail { reason = "sandboxed" } end)
relayq.on_domain("yahoo.com", { on = { [421] = function() return relayq.retry { after = "30m" } end } })
EOF
P="-c $TMP/policy.lua"
expect "550 greylist -> retry" '^action: retry$' '^after: 600 ' '^rule: lua:550$' -- $P --code 550 --text "greylisted, come back"
expect "550 other -> builtin" '^action: fail$' '^rule: builtin:5xx$' -- $P --code 550 --text "no such user"
expect "421 -> fail" '^action: fail$' '^rule: lua:421$' '^reason: 421 is final here$' -- $P --code 421
expect "enhanced beats code" '^rule: lua:5.7.26$' '^reason: dmarc$' -- $P --code 550 --enhanced 5.7.26
expect "class rule" '^action: retry$' '^after: 180 ' '^rule: lua:4xx$' -- $P --code 450
expect "star rule" '^action: hold$' '^rule: lua:\*$' -- $P --code 555
expect "event rule" '^action: suspend$' '^after: 900 ' '^rule: lua:timeout$' -- $P --code timeout
expect "domain rule" '^action: retry$' '^after: 1800 ' '^rule: lua:yahoo.com:421$' -- $P --code 421 --rcpt user@yahoo.com
expect "raising handler" '^action: fail$' '^rule: builtin:5xx$' 'lua:552 error:.*broken handler' -- $P --code 552
expect "endless handler" '^rule: builtin:5xx$' 'instruction budget' -- $P --code 553
expect "greedy handler" '^rule: builtin:5xx$' 'memory' -- $P --code 554
expect "sandbox" '^reason: sandboxed$' -- $P --code 551
expect "lua retry expires" '^action: fail$' '^rule: builtin:expired$' -- $P --code 450 --age 3d
expect "max_attempts" '^action: fail$' '^expired: yes$' '5 attempts' -- $P --code 450 --attempt 5
expect "lua json" '"rule":"lua:550"' '"after":600\.0' -- $P --code 550 --text greylist --json

# ---- errors ----
expect_rc() {
	local desc=$1 want=$2; shift 2
	local rc=0
	"$BIN" explain "$@" >"$TMP/out" 2>"$TMP/err" || rc=$?
	if [ $rc -ne "$want" ]; then
		fail "$desc: exit $rc, wanted $want"
	elif [ "$want" -ne 0 ] && [ ! -s "$TMP/err" ]; then
		fail "$desc: no error message"
	fi
}
expect_rc "no code" 2
expect_rc "bad code" 2 --code 700
expect_rc "bad event" 2 --code sometimes
expect_rc "bad enhanced" 2 --code 550 --enhanced 5.x.1
expect_rc "bad stage" 2 --code 550 --stage lunch
expect_rc "bad attempt" 2 --code 550 --attempt -1
expect_rc "bad age" 2 --code 550 --age soon
expect_rc "unknown option" 2 --code 550 --frobnicate
expect_rc "missing value" 2 --code
expect_rc "missing config" 1 -c "$TMP/nonexistent.lua" --code 550
printf 'relayq.config {\n  conections = 1,\n}\n' >"$TMP/bad.lua"
expect_rc "bad config" 1 -c "$TMP/bad.lua" --code 550
grep -q "bad.lua:2: error: unknown key conections" "$TMP/err" || fail "bad config: no file:line in: $(cat "$TMP/err")"

# ---- handlers that try to outlive their budget (issue 15) ----
# `timeout` only keeps a regression from hanging the suite; the bounds are
# generous (the handler's limit is 1 s, the load's 10 s; the box is loaded).
timed() {
	local start=$SECONDS rc=0
	timeout 60 "$@" || rc=$?
	took=$((SECONDS - start))
	return $rc
}
cat >"$TMP/escape.lua" <<'EOF'
relayq.on(550, function() xpcall(error, function() while true do end end) end)
relayq.on(551, function()
  xpcall(function() while true do end end, function() while true do end end) end)
relayq.on(552, function()
  local x <close> = setmetatable({}, { __close = function() while true do pcall(error) end end })
  while true do end end)
relayq.on(553, function()
  local t = {} for i = 1, 40 do t[i] = string.rep("a", 200000) .. i end
  while true do table.sort(t) end end)
EOF
for code in 550 551 552 553; do
	rc=0
	timed "$BIN" explain -c "$TMP/escape.lua" --code $code >"$TMP/out" 2>"$TMP/err" || rc=$?
	if [ $rc -ne 0 ]; then
		fail "escape $code: exit $rc: $(cat "$TMP/err")"
	elif [ $took -gt 20 ]; then
		fail "escape $code: took ${took}s"
	elif ! grep -Eq "^reason: permanent failure: .*lua:$code error: .*(instruction budget exceeded|time limit exceeded)" "$TMP/out"; then
		fail "escape $code: no budget error in: $(cat "$TMP/out")"
	elif ! grep -q '^rule: builtin:5xx$' "$TMP/out"; then
		fail "escape $code: not the built-in decision: $(cat "$TMP/out")"
	fi
done
# At load time the file is refused (exit 1): it does not hang.
printf 'xpcall(function() while true do end end, function() while true do end end)\n' \
	>"$TMP/escape_load.lua"
rc=0
timed "$BIN" explain -c "$TMP/escape_load.lua" --code 550 >"$TMP/out" 2>"$TMP/err" || rc=$?
if [ $rc -ne 1 ]; then
	fail "escape at load: exit $rc, wanted 1"
elif [ $took -gt 40 ]; then
	fail "escape at load: took ${took}s"
elif ! grep -q "instruction budget exceeded" "$TMP/err"; then
	fail "escape at load: no budget error in: $(cat "$TMP/err")"
fi

# ---- a dry run calls the handler once, as relayqd does ----
cat >"$TMP/count.lua" <<'EOF'
relayq.backoff { first = "10m", factor = 2, max = "1h", jitter = 0.5 }
local n, m = 0, 0
relayq.on(450, function() n = n + 1 return relayq.retry { after = n .. "m" } end)
relayq.on(451, function() m = m + 1
  if m > 1 then return relayq.fail { reason = "called " .. m .. " times" } end
  return relayq.retry() end)
EOF
P="-c $TMP/count.lua"
expect "handler called once" '^action: retry$' '^after: 60 \(1m\)$' '^rule: lua:450$' -- $P --code 450
expect "fixed after: no jitter" '"after":60\.0,"after_min":60\.0,"after_max":60\.0' -- $P --code 450 --json
expect "once, backoff range" '^action: retry$' '^after: 600 ' '^jitter: 300\.\.900$' '^rule: lua:451$' -- $P --code 451

if [ $fails -ne 0 ]; then
	echo "$fails failures" >&2
	exit 1
fi
echo "ok"

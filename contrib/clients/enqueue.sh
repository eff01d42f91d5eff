#!/bin/sh
# Enqueue mail into relayq from a shell (redis-cli >= 7.0 and jq >= 1.6),
# and follow the outcomes.
#
#   KEY=welcome:user-42 META='{"order":42}' \
#     ./enqueue.sh send app@example.com user@example.net < message.eml
#   ./enqueue.sh events [STREAM-ID]      # one JSON line per event, forever
#
# RELAYQ_REDIS is a redis:// URL (default redis://127.0.0.1:6379/0); put a
# password in REDISCLI_AUTH, not in the URL (redis-cli warns about -u with a
# password). The contract is lua/redis/README.md.
set -eu

QUEUE=${RELAYQ_QUEUE:-default}
# Every key of a queue starts with relayq:{<queue>}; the {hash tag} keeps
# them in one Redis Cluster slot. This prefix is the one key FCALL gets.
PREFIX="relayq:{$QUEUE}"
EVENTS="$PREFIX:events"

rcli() { redis-cli -u "${RELAYQ_REDIS:-redis://127.0.0.1:6379/0}" "$@"; }

send() {
	[ $# -ge 2 ] || { echo "usage: $0 send FROM TO [TO...] < message" >&2; exit 2; }
	from=$1; shift
	# jq builds the JSON (quoting, escaping); never paste addresses into a
	# JSON string by hand. KEY: idempotency key (same key within 24 h: same
	# id, nothing queued). META: a JSON object carried into every event.
	# DELAY: seconds before the first attempt.
	envelope=$(jq -cn --arg from "$from" --arg key "${KEY:-}" \
		--argjson meta "${META:-null}" --arg delay "${DELAY:-}" '
		{from: $from, to: $ARGS.positional}
		+ (if $key != "" then {key: $key} else {} end)
		+ (if $meta != null then {meta: $meta} else {} end)
		+ (if $delay != "" then {delay: ($delay | tonumber)} else {} end)
		' --args "$@")
	# -x: the message (stdin, raw RFC 5322 text, LF or CRLF) is the last
	# argument. -e: exit 1 when Redis answers with an error.
	if out=$(rcli -e -x FCALL relayq_enqueue 1 "$PREFIX" "$envelope" 2>&1); then
		echo "$out"            # the message id
	else
		case $out in
		*"ERR relayq: "*)      # refused: nothing was written; do not retry
			echo "rejected: $out" >&2; exit 3 ;;
		*)                     # connection trouble, OOM, library not loaded...
			# unknown whether it was queued: retrying with the same KEY is safe
			echo "failed: $out" >&2; exit 1 ;;
		esac
	fi
}

events() {
	# Start after STREAM-ID, or at the current end of the stream. Keep the
	# last id you handled to resume after a restart; the stream is capped
	# (events_cap), so a reader away too long misses entries.
	last=${1:-$(rcli -2 --json XREVRANGE "$EVENTS" + - COUNT 1 | jq -r '.[0][0] // "0-0"')}
	while :; do
		batch=$(rcli -e -2 --json XREAD COUNT 100 BLOCK 5000 STREAMS "$EVENTS" "$last")
		[ "$batch" = null ] && continue        # 5 s without events
		# [[stream, [[id, [field, value, ...]], ...]]] -> one object per event:
		# type (delivered | deferred | failed | expired | dropped | held), id,
		# rcpt, code, enh, text, stage, attempt, next ("" = absent), meta.
		printf '%s\n' "$batch" | jq -c '.[0][1][] | .[0] as $sid | .[1] as $f
			| [range(0; $f | length; 2) | {($f[.]): $f[. + 1]}] | add
			| .meta |= (if . == "" then {} else fromjson end)
			| .stream_id = $sid'
		last=$(printf '%s\n' "$batch" | jq -r '.[0][1][-1][0]')
	done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
send) send "$@" ;;
events) events "$@" ;;
*) echo "usage: $0 send FROM TO [TO...] < message | $0 events [STREAM-ID]" >&2; exit 2 ;;
esac

# Shared by the shell tests of the daemon: source it after `set -u` with
# TEST_TAG set. Gives D (relayqd), B (relayq), ROOT, FAKE (fakesmtpd), a
# private TMP removed at exit, PIDS (killed at exit), ok / bad counters and
# wait_for.
D=${RELAYQD_BIN:?RELAYQD_BIN must name the relayqd binary}
B=${RELAYQ_BIN:?RELAYQ_BIN must name the relayq binary}
ROOT=${RQ_SOURCE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
FAKE=${RQ_BUILD_ROOT:-$(dirname "$D")}/tests/fakesmtpd
TMP=$(mktemp -d "${TMPDIR:-/tmp}/relayq-${TEST_TAG:-test}.XXXXXX")
chmod 755 "$TMP"
PIDS=()
passed=0
failed=0

cleanup() {
	for p in "${PIDS[@]}"; do
		kill -9 "$p" 2>/dev/null && wait "$p" 2>/dev/null
	done
	rm -rf "$TMP"
}
trap cleanup EXIT

ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*" >&2; }

wait_for() {  # secs, command...: true once the command succeeds
	local secs=$1; shift
	local end=$((SECONDS + secs))
	while ((SECONDS <= end)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	"$@" >/dev/null 2>&1
}

# A private redis-server on a unix socket in TMP, with the Functions library
# loaded: sets SOCK, rcli and RELAYQ_REDIS.
start_redis() {
	SOCK=$TMP/redis.sock
	redis-server --port 0 --unixsocket "$SOCK" --unixsocketperm 700 --save '' \
		--appendonly no --dir "$TMP" --daemonize no >>"$TMP/redis.log" 2>&1 &
	PIDS+=($!)
	wait_for 10 rcli ping || { echo "redis-server did not start" >&2; cat "$TMP/redis.log" >&2; exit 1; }
	rcli -x FUNCTION LOAD REPLACE <"$ROOT/lua/redis/relayq.lua" >/dev/null ||
		{ echo "cannot load the Functions library" >&2; exit 1; }
	export RELAYQ_REDIS="unix:$SOCK"
}
rcli() { redis-cli -s "$SOCK" "$@"; }

# A loopback port free for both TCP and UDP (for a DNS server).
free_tcp_udp_port() {
	python3 -c '
import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass
    finally:
        u.close(); t.close()'
}

# dnsmasq on loopback answering for .test from its arguments (--mx-host,
# --host-record, ...), NXDOMAIN for the rest of .test: sets DNSPORT.
start_dnsmasq() {
	DNSPORT=$(free_tcp_udp_port)
	dnsmasq --keep-in-foreground --port="$DNSPORT" --listen-address=127.0.0.1 --bind-interfaces \
		--no-resolv --no-hosts --conf-file=/dev/null --local=/test/ \
		--pid-file="$TMP/dnsmasq.pid" "$@" >"$TMP/dnsmasq.log" 2>&1 &
	PIDS+=($!)
	wait_for 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$DNSPORT" ||
		{ echo "dnsmasq did not start" >&2; cat "$TMP/dnsmasq.log" >&2; exit 1; }
}

# fakesmtpd recording into TMP/NAME: sets FAKE_PORT and FAKE_DIR.
# FAKE_LISTEN (default 127.0.0.1:0) and FAKE_OPTS (more options) apply.
start_fake() {  # name, rules...
	local name=$1; shift
	FAKE_DIR=$TMP/$name
	mkdir -p "$FAKE_DIR"
	local args=()
	for r in "$@"; do args+=(--rule "$r"); done
	# shellcheck disable=SC2086
	"$FAKE" --listen "${FAKE_LISTEN:-127.0.0.1:0}" --record "$FAKE_DIR" ${FAKE_OPTS:-} \
		"${args[@]}" >"$TMP/$name.log" 2>&1 &
	PIDS+=($!)
	wait_for 10 grep -q '^ready ' "$TMP/$name.log" ||
		{ echo "fakesmtpd $name did not start" >&2; cat "$TMP/$name.log" >&2; exit 1; }
	FAKE_PORT=$(sed -n 's/^ready //p' "$TMP/$name.log" | head -1)
}
fake_stat() {  # name, field: from the fixture's stats file
	sed -n "s/^$2=//p" "$TMP/$1/stats" 2>/dev/null | tail -1
}

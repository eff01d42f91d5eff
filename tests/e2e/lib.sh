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

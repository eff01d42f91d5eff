/*
 * relayqd end to end, crash recovery: kill -9 of the daemon in the middle
 * of a 5,000-message run to fakesmtpd (which records every message), then
 * a restart. Every message is delivered, none is lost, and the duplicates
 * are at most the messages that were in flight (leased, not settled) when
 * the daemon died. The runner keeps at most two batches in flight
 * (engine/runner.c: maybe_claim), so that is also at most 2 x batch.
 *
 * The lease is 10 s, the shortest the config accepts (config.h: lease
 * 10s-1d), so the restarted daemon takes the dead one's messages back
 * after at most 10 s.
 */
#include "daemon.h"

#define N 5000
#define BATCH 100

static bool cond_recorded(struct dt *t, void *arg)
{
	return dt_smtp_stat(t, "messages") >= *(long *)arg;
}

static bool cond_all_settled(struct dt *t, void *arg)
{
	return dt_stat(t, "delivered") >= N && dt_cond_queue_empty(t, NULL);
}

static void test_kill9_mid_run(void **state)
{
	struct dt *t = *state;
	const char *args[] = {"--no-keep-records", NULL};
	dt_smtp_start_argv(t, 0, args);
	char keys[256];
	snprintf(keys, sizeof(keys),
		 "  batch = %d, lease = \"10s\", connections = 8, per_destination = 8,", BATCH);
	dt_config(t, keys,
		  "relayq.backoff { first = \"1s\", factor = 2, max = \"2s\", jitter = 0 }\n");
	dt_enqueue_bulk(t, "kill", N);
	assert_int_equal(dt_count(t, "ready"), N);
	dt_daemon_start(t, 0);

	long want = 1500;
	DT_WAIT(t, cond_recorded, &want, 60000, "fewer than %ld messages delivered in 60 s", want);
	dt_daemon_kill9(t, 0);
	long long inflight = dt_count(t, "inflight");
	long long delivered_before = dt_stat(t, "delivered");
	long recorded_before = dt_smtp_stat(t, "messages");
	print_message("killed after %ld messages recorded, %lld settled, %lld in flight\n",
		      recorded_before, delivered_before, inflight);
	if (inflight > 2 * BATCH)
		DT_FAIL(t, "%lld messages in flight at the kill, over 2 batches of %d", inflight,
			BATCH);
	if (delivered_before >= N)
		DT_FAIL(t, "the run ended before the kill: nothing tested");

	dt_daemon_start(t, 0);
	DT_WAIT(t, cond_all_settled, NULL, 90000,
		"after the restart: %lld delivered of %d, ready %lld scheduled %lld inflight %lld dead %lld",
		dt_stat(t, "delivered"), N, dt_count(t, "ready"), dt_count(t, "scheduled"),
		dt_count(t, "inflight"), dt_count(t, "dead"));
	assert_int_equal(dt_count(t, "dead"), 0);
	assert_int_equal(dt_count(t, "held"), 0);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);

	size_t missing, dups, first_missing;
	size_t total = dt_token_check(t, "kill", N, &missing, &dups, &first_missing);
	print_message("recorded %zu messages for %d enqueued: %zu duplicates (bound %lld)\n", total,
		      N, dups, inflight);
	if (missing)
		DT_FAIL(t, "%zu messages lost (first: token %zu)", missing, first_missing);
	if ((long long)dups > inflight)
		DT_FAIL(t, "%zu duplicates, more than the %lld messages in flight at the kill", dups,
			inflight);
	assert_int_equal(dt_stat(t, "delivered"), N);
}

/* SIGTERM mid-run: the daemon finishes or hands back what it holds and
 * exits 0; no lease is left behind, nothing is delivered twice; a
 * restart delivers the rest. */
static void test_sigterm_mid_run(void **state)
{
	struct dt *t = *state;
	const char *args[] = {"--no-keep-records", NULL};
	dt_smtp_start_argv(t, 0, args);
	char keys[256];
	snprintf(keys, sizeof(keys),
		 "  batch = %d, lease = \"10s\", connections = 8, per_destination = 8,", BATCH);
	dt_config(t, keys,
		  "relayq.backoff { first = \"1s\", factor = 2, max = \"2s\", jitter = 0 }\n");
	dt_enqueue_bulk(t, "term", N);
	dt_daemon_start(t, 0);
	long want = 1500;
	DT_WAIT(t, cond_recorded, &want, 60000, "fewer than %ld messages delivered in 60 s", want);
	dt_daemon_stop(t, 0);
	long long inflight = dt_count(t, "inflight");
	long long delivered = dt_stat(t, "delivered");
	print_message("SIGTERM after %lld settled; %lld leases left\n", delivered, inflight);
	if (inflight != 0)
		DT_FAIL(t, "%lld messages still leased after a clean stop (want every one "
			"settled or handed back)", inflight);
	if (delivered >= N)
		DT_FAIL(t, "the run ended before SIGTERM: nothing tested");
	dt_daemon_start(t, 0);
	DT_WAIT(t, cond_all_settled, NULL, 90000,
		"after the restart: %lld delivered of %d, ready %lld scheduled %lld inflight %lld dead %lld",
		dt_stat(t, "delivered"), N, dt_count(t, "ready"), dt_count(t, "scheduled"),
		dt_count(t, "inflight"), dt_count(t, "dead"));
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	assert_int_equal(dt_stat(t, "recovered"), 0);
	size_t missing, dups, first_missing;
	size_t total = dt_token_check(t, "term", N, &missing, &dups, &first_missing);
	if (missing)
		DT_FAIL(t, "%zu messages lost (first: token %zu)", missing, first_missing);
	if (dups)
		DT_FAIL(t, "%zu messages delivered twice across a clean stop", dups);
	assert_int_equal(total, N);
	assert_int_equal(dt_stat(t, "delivered"), N);
}

static int setup(void **state)
{
	return dt_state_setup(state, "dkill", false);
}

static int teardown(void **state)
{
	return dt_state_teardown(state);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_kill9_mid_run, setup, teardown),
		cmocka_unit_test_setup_teardown(test_sigterm_mid_run, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

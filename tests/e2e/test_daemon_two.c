/*
 * relayqd end to end, two daemons on one queue: 10,000 messages (each with
 * a unique token) drained by two relayqd processes at once into fakesmtpd.
 * No crash, every message delivered exactly once (the fixture's record has
 * each token once), the queue empty, both exit 0 on SIGTERM.
 */
#include "daemon.h"

#define N 10000

static bool cond_all_settled(struct dt *t, void *arg)
{
	return dt_stat(t, "delivered") >= N && dt_cond_queue_empty(t, NULL);
}

static void test_two_daemons(void **state)
{
	struct dt *t = *state;
	const char *args[] = {"--no-keep-records", NULL};
	dt_smtp_start_argv(t, 0, args);
	dt_config(t, "  batch = 100, lease = \"30s\", connections = 8, per_destination = 8,",
		  "relayq.backoff { first = \"1s\", factor = 2, max = \"2s\", jitter = 0 }\n");
	dt_enqueue_bulk(t, "two", N);
	assert_int_equal(dt_count(t, "ready"), N);
	dt_daemon_start(t, 0);
	dt_daemon_start(t, 1);
	DT_WAIT(t, cond_all_settled, NULL, 120000,
		"%lld delivered of %d, ready %lld scheduled %lld inflight %lld dead %lld",
		dt_stat(t, "delivered"), N, dt_count(t, "ready"), dt_count(t, "scheduled"),
		dt_count(t, "inflight"), dt_count(t, "dead"));
	dt_daemon_stop(t, 0);
	dt_daemon_stop(t, 1);
	dt_smtp_stop(t);
	assert_int_equal(dt_count(t, "dead"), 0);
	assert_int_equal(dt_count(t, "held"), 0);
	assert_int_equal(dt_stat(t, "delivered"), N);
	assert_int_equal(dt_stat(t, "recovered"), 0);

	size_t missing, dups, first_missing;
	size_t total = dt_token_check(t, "two", N, &missing, &dups, &first_missing);
	print_message("recorded %zu messages for %d enqueued\n", total, N);
	if (missing)
		DT_FAIL(t, "%zu messages never delivered (first: token %zu)", missing, first_missing);
	if (dups)
		DT_FAIL(t, "%zu messages delivered more than once", dups);
	assert_int_equal(total, N);
}

static int setup(void **state)
{
	return dt_state_setup(state, "dtwo", false);
}

static int teardown(void **state)
{
	return dt_state_teardown(state);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_two_daemons, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

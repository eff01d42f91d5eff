/*
 * relayqd end to end, Redis restarted mid-run: a 3,000-message run to
 * fakesmtpd; Redis (appendonly yes) is killed with SIGKILL while the daemon
 * delivers and started again on the same socket. The daemon reconnects by
 * itself, nothing is lost (every token recorded at least once; duplicates
 * only for messages whose settle died with Redis), the queue ends empty,
 * and the daemon exits 0 on SIGTERM.
 */
#include "daemon.h"

#define N 3000

static bool cond_recorded(struct dt *t, void *arg)
{
	return dt_smtp_stat(t, "messages") >= *(long *)arg;
}

static bool cond_all_recorded(struct dt *t, void *arg)
{
	size_t missing, dups, first;
	(void)arg;
	if (dt_smtp_stat(t, "messages") < N)
		return false;
	dt_token_check(t, "redis", N, &missing, &dups, &first);
	return missing == 0;
}

static void test_redis_restart(void **state)
{
	struct dt *t = *state;
	const char *args[] = {"--no-keep-records", NULL};
	dt_smtp_start_argv(t, 0, args);
	dt_config(t, "  batch = 100, lease = \"10s\", connections = 8, per_destination = 8,",
		  "relayq.backoff { first = \"1s\", factor = 2, max = \"2s\", jitter = 0 }\n");
	/* The enqueues must be on disk before the SIGKILL: with everysec,
	 * Redis may postpone the AOF write past its reply while a slow fsync
	 * runs (a loaded machine), and that loss would be Redis's, not ours. */
	freeReplyObject(dt_cmd(t, "CONFIG SET appendfsync always"));
	dt_enqueue_bulk(t, "redis", N);
	assert_int_equal(dt_count(t, "ready"), N);
	dt_daemon_start(t, 0);

	long want = 600;
	DT_WAIT(t, cond_recorded, &want, 60000, "fewer than %ld messages delivered in 60 s", want);
	th_redis_kill(&t->redis, true);
	long at_kill = dt_smtp_stat(t, "messages");
	th_redis_restart(&t->redis);
	dt_reconnect(t);
	print_message("Redis killed after %ld messages recorded\n", at_kill);
	if (at_kill >= N)
		DT_FAIL(t, "the run ended before Redis was killed: nothing tested");

	/* delivery resumes by itself */
	DT_WAIT(t, cond_all_recorded, NULL, 90000,
		"after the Redis restart not every message was delivered (recorded %ld)",
		dt_smtp_stat(t, "messages"));
	DT_WAIT(t, dt_cond_queue_empty, NULL, 60000,
		"the queue is not empty: ready %lld scheduled %lld inflight %lld",
		dt_count(t, "ready"), dt_count(t, "scheduled"), dt_count(t, "inflight"));
	assert_int_equal(dt_count(t, "dead"), 0);
	assert_int_equal(dt_count(t, "held"), 0);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	size_t missing, dups, first;
	size_t total = dt_token_check(t, "redis", N, &missing, &dups, &first);
	print_message("recorded %zu messages for %d enqueued, %zu duplicates\n", total, N, dups);
	if (missing)
		DT_FAIL(t, "%zu messages lost (first: token %zu)", missing, first);
}

static int setup(void **state)
{
	return dt_state_setup(state, "dredis", true);
}

static int teardown(void **state)
{
	return dt_state_teardown(state);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_redis_restart, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

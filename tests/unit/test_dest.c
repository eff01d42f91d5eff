/* The pure parts of dest.c: destination keys and the health rules; and
 * that a suspension's logged length is the decided one, whatever the clock
 * did between the decision and the log line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>

#include "relayq/dest.h"
#include "relayq/log.h"

static double half(void *ctx)
{
	(void)ctx;
	return 0.5;
}

static const struct rq_policy_rand rnd = {half, NULL};
static const struct rq_backoff b = {.first = 60, .factor = 2, .max = 600, .jitter = 0};

static void key_relay_and_domains(void **state)
{
	(void)state;
	char key[RQ_DEST_KEY_MAX];
	assert_int_equal(rq_dest_key(true, "a@Example.NET", key), 0);
	assert_string_equal(key, "relay");
	assert_int_equal(rq_dest_key(false, "a@Example.NET", key), 0);
	assert_string_equal(key, "example.net");
	/* the domain after the last @ of a quoted local part */
	assert_int_equal(rq_dest_key(false, "\"x@y\"@Mail.Example.org", key), 0);
	assert_string_equal(key, "mail.example.org");
	/* a trailing dot names the same domain */
	assert_int_equal(rq_dest_key(false, "a@example.net.", key), 0);
	assert_string_equal(key, "example.net");
	/* address literals stay as written */
	assert_int_equal(rq_dest_key(false, "a@[127.0.0.1]", key), 0);
	assert_string_equal(key, "[127.0.0.1]");
	/* no domain: refused */
	assert_int_equal(rq_dest_key(false, "nodomain", key), -1);
	assert_int_equal(rq_dest_key(false, "a@", key), -1);
	assert_int_equal(rq_dest_key(false, NULL, key), -1);
}

static void one_failure_with_others_alive_does_not_suspend(void **state)
{
	(void)state;
	struct rq_dest_health h = {0};
	assert_int_equal(rq_dest_health_failed(&h, 1000, true, &b, &rnd), 0);
	assert_int_equal(rq_dest_health_failed(&h, 1000, true, &b, &rnd), 0);
	assert_false(rq_dest_health_suspended(&h, 1000));
	/* the third in a row does */
	int64_t until = rq_dest_health_failed(&h, 1000, true, &b, &rnd);
	assert_int_equal(until, 1000 + 60000);
	assert_true(rq_dest_health_suspended(&h, 1000));
	assert_true(rq_dest_health_suspended(&h, 60999));
	assert_false(rq_dest_health_suspended(&h, 61000));
}

static void failure_with_nothing_alive_suspends_at_once(void **state)
{
	(void)state;
	struct rq_dest_health h = {0};
	assert_int_equal(rq_dest_health_failed(&h, 0, false, &b, &rnd), 60000);
	assert_true(rq_dest_health_suspended(&h, 1));
}

static void suspensions_grow_until_a_success(void **state)
{
	(void)state;
	struct rq_dest_health h = {0};
	assert_int_equal(rq_dest_health_failed(&h, 0, false, &b, &rnd), 60000);
	assert_int_equal(rq_dest_health_failed(&h, 60000, false, &b, &rnd), 60000 + 120000);
	assert_int_equal(rq_dest_health_failed(&h, 180000, false, &b, &rnd), 180000 + 240000);
	assert_int_equal(rq_dest_health_failed(&h, 0, false, &b, &rnd), 480000);
	/* capped at max */
	assert_int_equal(rq_dest_health_failed(&h, 0, false, &b, &rnd), 600000);
	/* a success resumes and starts over */
	assert_true(rq_dest_health_ok(&h));
	assert_false(rq_dest_health_suspended(&h, 1));
	assert_false(rq_dest_health_ok(&h));  /* nothing to resume */
	assert_int_equal(rq_dest_health_failed(&h, 0, false, &b, &rnd), 60000);
}

static void success_clears_the_run_of_failures(void **state)
{
	(void)state;
	struct rq_dest_health h = {0};
	assert_int_equal(rq_dest_health_failed(&h, 0, true, &b, &rnd), 0);
	assert_int_equal(rq_dest_health_failed(&h, 0, true, &b, &rnd), 0);
	rq_dest_health_ok(&h);
	assert_int_equal(rq_dest_health_failed(&h, 0, true, &b, &rnd), 0);
	assert_int_equal(rq_dest_health_failed(&h, 0, true, &b, &rnd), 0);
	assert_false(rq_dest_health_suspended(&h, 0));
}

static void the_health_keeps_the_decided_length(void **state)
{
	(void)state;
	struct rq_dest_health h = {0};
	assert_int_equal(rq_dest_health_failed(&h, 1234, false, &b, &rnd), 1234 + 60000);
	assert_int_equal(h.suspended_for_ms, 60000);
	assert_int_equal(rq_dest_health_failed(&h, 5555, false, &b, &rnd), 5555 + 120000);
	assert_int_equal(h.suspended_for_ms, 120000);
	rq_dest_health_ok(&h);
	assert_int_equal(h.suspended_for_ms, 0);
}

/* A clock that moves on by 7 ms at every read: any duration computed as
 * the difference of two reads comes out short by a multiple of 7 ms. */
static int64_t ticking_clock(void *arg)
{
	int64_t *t = arg;
	*t += 7;
	return *t;
}

static void job_done(struct rq_dest_job *job, void *arg)
{
	(void)job;
	(void)arg;
}

/* The lines logged while fn runs on a pool with the ticking clock. */
static char *logged_around(void (*fn)(struct rq_dest *d, int64_t *until))
{
	int64_t clock = 1000000;
	struct event_base *base = event_base_new();
	assert_non_null(base);
	struct rq_dests_opts o = {
		.helo = "relayq.test",
		.tls = "none",
		.connections = 4,
		.per_destination = 2,
		.messages_per_connection = 10,
		.relay_host = "127.0.0.1",
		.relay_port = 9,   /* never reached: the loop does not run */
		.now_ms = ticking_clock,
		.now_arg = &clock,
		.rnd = rnd,
	};
	char err[256];
	struct rq_dests *ds = rq_dests_create(base, &o, err, sizeof(err));
	assert_non_null(ds);

	struct rq_dest_rcpt rc = {.addr = "a@example.net", .len = strlen("a@example.net")};
	struct rq_dest_job job = {
		.from = "f@example.com", .from_len = strlen("f@example.com"),
		.body = "x\r\n", .body_len = 3,
		.rcpts = &rc, .nrcpt = 1, .done = job_done,
	};
	char key[RQ_DEST_KEY_MAX];
	assert_int_equal(rq_dest_key(true, rc.addr, key), 0);
	assert_int_equal(rq_dests_submit(ds, key, &job), 0);
	assert_non_null(job.dest);

	FILE *f = tmpfile();
	assert_non_null(f);
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, f);
	int64_t until = 0;
	fn(job.dest, &until);
	rq_log_flush();
	rq_log_init(RQ_LOG_WARN, RQ_LOG_LOGFMT, NULL);
	/* the deadline itself is the clock at the decision plus the length */
	assert_true(until > 1000000);

	long n = ftell(f);
	assert_true(n > 0);
	char *out = calloc(1, (size_t)n + 1);
	assert_non_null(out);
	rewind(f);
	assert_int_equal(fread(out, 1, (size_t)n, f), (size_t)n);
	fclose(f);

	rq_dests_destroy(ds);
	event_base_free(base);
	return out;
}

static void fail_now(struct rq_dest *d, int64_t *until)
{
	*until = rq_dest_failed(d, &b);  /* nothing alive: suspends at once */
}

static void suspend_for_2_5s(struct rq_dest *d, int64_t *until)
{
	*until = rq_dest_suspend(d, 2.5);
}

static void a_suspension_logs_its_decided_length(void **state)
{
	(void)state;
	char *out = logged_around(fail_now);
	/* backoff first = 60 s, no jitter: exactly that, not 59.993s */
	if (!strstr(out, "event=destination_suspended dest=relay for=1m"))
		fail_msg("logged: %s", out);
	free(out);
	out = logged_around(suspend_for_2_5s);
	if (!strstr(out, "event=destination_suspended dest=relay for=2.5s"))
		fail_msg("logged: %s", out);
	free(out);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(key_relay_and_domains),
		cmocka_unit_test(one_failure_with_others_alive_does_not_suspend),
		cmocka_unit_test(failure_with_nothing_alive_suspends_at_once),
		cmocka_unit_test(suspensions_grow_until_a_success),
		cmocka_unit_test(success_clears_the_run_of_failures),
		cmocka_unit_test(the_health_keeps_the_decided_length),
		cmocka_unit_test(a_suspension_logs_its_decided_length),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The pure parts of dest.c: destination keys and the health rules. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "relayq/dest.h"

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

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(key_relay_and_domains),
		cmocka_unit_test(one_failure_with_others_alive_does_not_suspend),
		cmocka_unit_test(failure_with_nothing_alive_suspends_at_once),
		cmocka_unit_test(suspensions_grow_until_a_success),
		cmocka_unit_test(success_clears_the_run_of_failures),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

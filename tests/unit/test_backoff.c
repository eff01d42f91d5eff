#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "relayq/policy.h"

static double fixed_rand(void *ctx)
{
	return *(const double *)ctx;
}

static double backoff_with(const struct rq_backoff *b, unsigned attempt, double u)
{
	struct rq_policy_rand r = {fixed_rand, &u};
	return rq_policy_backoff(b, attempt, &r);
}

static void grows_then_caps(void **state)
{
	(void)state;
	struct rq_backoff b = {.first = 300, .factor = 2, .max = 14400, .jitter = 0};
	const double want[] = {300, 300, 600, 1200, 2400, 4800, 9600, 14400, 14400};
	for (unsigned a = 0; a < sizeof(want) / sizeof(want[0]); a++)
		assert_true(fabs(backoff_with(&b, a, 0.3) - want[a]) < 1e-9);
	/* No overflow for huge attempt numbers. */
	assert_true(backoff_with(&b, 100000, 0.3) == 14400);
	assert_true(backoff_with(&b, 4000000000u, 0.3) == 14400);
	/* factor 1: constant. */
	b.factor = 1;
	assert_true(backoff_with(&b, 50, 0.3) == 300);
}

static void jitter_bounds(void **state)
{
	(void)state;
	struct rq_backoff b = {.first = 300, .factor = 2, .max = 14400, .jitter = 0.15};
	assert_true(fabs(backoff_with(&b, 1, 0.0) - 255) < 1e-9);
	assert_true(fabs(backoff_with(&b, 1, 0.5) - 300) < 1e-9);
	double hi = backoff_with(&b, 1, 0.999999);
	assert_true(hi < 345 && hi > 344.99);
	/* Jitter is applied after the cap. */
	assert_true(fabs(backoff_with(&b, 20, 0.0) - 14400 * 0.85) < 1e-6);
	for (int i = 0; i < 1000; i++) {
		double u = i / 1000.0;
		double v = backoff_with(&b, 3, u);
		assert_true(v >= 1200 * 0.85 - 1e-9 && v < 1200 * 1.15);
	}
	/* A broken random source (out of [0,1)) means no jitter, not chaos. */
	assert_true(fabs(backoff_with(&b, 1, 7.0) - 300) < 1e-9);
	assert_true(fabs(backoff_with(&b, 1, NAN) - 300) < 1e-9);
	/* The default source stays in bounds. */
	for (int i = 0; i < 1000; i++) {
		double v = rq_policy_backoff(&b, 1, NULL);
		assert_true(v >= 255 - 1e-9 && v < 345);
	}
}

static void never_below_one_second(void **state)
{
	(void)state;
	struct rq_backoff b = {.first = 1, .factor = 2, .max = 10, .jitter = 1};
	assert_true(backoff_with(&b, 1, 0.0) == 1.0);
	struct rq_backoff z = {.first = 0, .factor = 0, .max = 0, .jitter = 0};
	assert_true(backoff_with(&z, 1, 0.5) >= 1.0);
}

static void durations(void **state)
{
	(void)state;
	static const struct {
		const char *s;
		double v;
	} ok[] = {
		{"30s", 30}, {"5m", 300}, {"2h", 7200}, {"5d", 432000}, {"1w", 604800},
		{"1h30m", 5400}, {"1.5h", 5400}, {"90", 90}, {" 10m", 600}, {"0s", 0},
		{"1d 12h", 129600},
	};
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		double v = -1;
		assert_int_equal(rq_duration_parse(ok[i].s, &v), 0);
		assert_true(fabs(v - ok[i].v) < 1e-9);
	}
	static const char *const bad[] = {"", "5x", "-5m", "1h30", "m", "5 m m",
					  "inf", "nan", "1e400s", "99999w", NULL};
	for (size_t i = 0; bad[i]; i++) {
		double v = -1;
		assert_int_equal(rq_duration_parse(bad[i], &v), -1);
	}
	assert_int_equal(rq_duration_parse(NULL, &(double){0}), -1);
	char buf[32];
	rq_duration_format(300, buf, sizeof(buf));
	assert_string_equal(buf, "5m");
	rq_duration_format(5400, buf, sizeof(buf));
	assert_string_equal(buf, "1h30m");
	rq_duration_format(432000, buf, sizeof(buf));
	assert_string_equal(buf, "5d");
	rq_duration_format(1.5, buf, sizeof(buf));
	assert_string_equal(buf, "1.5s");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(grows_then_caps),
		cmocka_unit_test(jitter_bounds),
		cmocka_unit_test(never_below_one_second),
		cmocka_unit_test(durations),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

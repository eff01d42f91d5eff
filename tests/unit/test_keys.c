/* Queue names and key prefixes (keys.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "relayq/keys.h"

static bool valid(const char *s)
{
	return rq_keys_queue_valid(s, strlen(s));
}

static void names(void **state)
{
	assert_true(valid(RQ_KEYS_QUEUE_DEFAULT));
	assert_true(valid("a"));
	assert_true(valid("Mail_out.eu:1-b"));
	char max[RQ_KEYS_QUEUE_MAX + 2];
	memset(max, 'q', sizeof(max));
	max[RQ_KEYS_QUEUE_MAX] = '\0';
	assert_true(valid(max));
	max[RQ_KEYS_QUEUE_MAX] = 'q';
	max[RQ_KEYS_QUEUE_MAX + 1] = '\0';
	assert_false(valid(max));
	const char *bad[] = {"", "a b", "a{b", "b}", "a/b", "a*", "é", "a\n", "a\t", "tab\x7f"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (valid(bad[i]))
			fail_msg("accepted '%s'", bad[i]);
	assert_false(rq_keys_queue_valid("a\0b", 3));
	assert_false(rq_keys_queue_valid(NULL, 0));
	assert_true(rq_keys_queue_valid("ab!", 2));   /* only len bytes count */
}

static void prefix(void **state)
{
	char buf[RQ_KEYS_PREFIX_MAX];
	assert_int_equal(rq_keys_prefix("default", buf, sizeof(buf)), 0);
	assert_string_equal(buf, "relayq:{default}");
	char max[RQ_KEYS_QUEUE_MAX + 1];
	memset(max, 'z', RQ_KEYS_QUEUE_MAX);
	max[RQ_KEYS_QUEUE_MAX] = '\0';
	assert_int_equal(rq_keys_prefix(max, buf, sizeof(buf)), 0);
	assert_int_equal(strlen(buf), RQ_KEYS_QUEUE_MAX + 9);
	assert_int_equal(rq_keys_prefix("a b", buf, sizeof(buf)), -1);
	assert_int_equal(rq_keys_prefix(NULL, buf, sizeof(buf)), -1);
	assert_int_equal(rq_keys_prefix("default", buf, 8), -1);   /* too small */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(names),
		cmocka_unit_test(prefix),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

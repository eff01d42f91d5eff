#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "relayq/log.h"

static char *capture(enum rq_log_format fmt, const char *k, const char *v)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	rq_log_init(RQ_LOG_INFO, fmt, f);
	rq_log(RQ_LOG_INFO, "ev", k, v, NULL);
	rq_log(RQ_LOG_DEBUG, "hidden", NULL);
	fclose(f);
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, NULL);
	return buf;
}

static void logfmt_quotes_and_escapes(void **state)
{
	(void)state;
	char *s = capture(RQ_LOG_LOGFMT, "text", "a b\r\nRCPT TO:<x>");
	assert_non_null(strstr(s, " event=ev text=\"a b\\r\\nRCPT TO:<x>\"\n"));
	assert_null(strstr(s, "hidden"));
	assert_int_equal(strchr(s, '\n') - s + 1, (long)strlen(s));
	free(s);
	s = capture(RQ_LOG_LOGFMT, "id", "abc");
	assert_non_null(strstr(s, " id=abc\n"));
	free(s);
}

static void json_escapes(void **state)
{
	(void)state;
	char *s = capture(RQ_LOG_JSON, "t", "q\"\x01");
	assert_non_null(strstr(s, "\"event\":\"ev\",\"t\":\"q\\\"\\u0001\"}\n"));
	assert_int_equal(s[0], '{');
	free(s);
}

static void level_parse(void **state)
{
	(void)state;
	assert_int_equal(rq_log_level_parse("warn"), RQ_LOG_WARN);
	assert_int_equal(rq_log_level_parse("nope"), -1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(logfmt_quotes_and_escapes),
		cmocka_unit_test(json_escapes),
		cmocka_unit_test(level_parse),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

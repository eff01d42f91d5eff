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

static int pending_calls;
static void on_pending(void *arg)
{
	(void)arg;
	pending_calls++;
}

static void buffered_until_flush(void **state)
{
	(void)state;
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, f);
	pending_calls = 0;
	rq_log_set_buffered(on_pending, NULL);
	rq_log(RQ_LOG_INFO, "one", NULL);
	rq_log(RQ_LOG_INFO, "two", NULL);
	fflush(f);
	assert_int_equal(len, 0);          /* nothing written yet */
	assert_int_equal(pending_calls, 1); /* told once: empty -> pending */
	rq_log_flush();
	fflush(f);
	assert_non_null(strstr(buf, "event=one\n"));
	assert_non_null(strstr(buf, "event=two\n"));
	assert_true(strstr(buf, "event=one") < strstr(buf, "event=two"));

	/* a warning goes out at once, after what was pending, in order */
	rq_log(RQ_LOG_INFO, "three", NULL);
	assert_int_equal(pending_calls, 2);
	rq_log(RQ_LOG_WARN, "four", NULL);
	fflush(f);
	assert_non_null(strstr(buf, "event=four\n"));
	assert_true(strstr(buf, "event=three") < strstr(buf, "event=four"));

	/* a full buffer is written, nothing is lost */
	size_t before = len;
	for (int i = 0; i < 2000; i++)
		rq_log(RQ_LOG_INFO, "many", "i", "0123456789012345678901234567890123456789", NULL);
	rq_log_flush();
	fflush(f);
	size_t lines = 0;
	for (const char *p = buf + before; (p = strstr(p, "event=many")); p++)
		lines++;
	assert_int_equal(lines, 2000);

	rq_log_set_buffered(NULL, NULL);
	rq_log(RQ_LOG_INFO, "direct", NULL);
	fflush(f);
	assert_non_null(strstr(buf, "event=direct\n"));
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, NULL);
	fclose(f);
	free(buf);
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
		cmocka_unit_test(buffered_until_flush),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/* The one reader of secret files (secret.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "relayq/secret.h"

static char *dir;

static int setup(void **state)
{
	dir = th_mkdtemp("secret");
	return dir ? 0 : -1;
}

static int teardown(void **state)
{
	th_rmrf(dir);
	free(dir);
	return 0;
}

/* Writes len bytes of data to a file of dir; returns its path (static). */
static const char *put(const char *name, const char *data, size_t len)
{
	static char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(data, 1, len, f), len);
	fclose(f);
	return path;
}

static char *read_ok(const char *path)
{
	char err[512] = "";
	char *s = rq_secret_read_file(path, "test secret", err, sizeof(err));
	if (!s)
		fail_msg("refused: %s", err);
	return s;
}

/* Refused; err names what and path, never the secret. */
static void refused(const char *path, const char *reason, const char *secret)
{
	char err[512] = "";
	assert_null(rq_secret_read_file(path, "test secret", err, sizeof(err)));
	assert_non_null(strstr(err, "test secret"));
	assert_non_null(strstr(err, path));
	if (reason && !strstr(err, reason))
		fail_msg("err '%s' lacks '%s'", err, reason);
	if (secret)
		assert_null(strstr(err, secret));
}

static void line_ends(void **state)
{
	char *s = read_ok(put("lf", "s3cret\nsecond line\n", 19));
	assert_string_equal(s, "s3cret");
	rq_secret_free(s);
	s = read_ok(put("crlf", "s3cret\r\n", 8));
	assert_string_equal(s, "s3cret");
	rq_secret_free(s);
	s = read_ok(put("none", "s3cret", 6));
	assert_string_equal(s, "s3cret");
	rq_secret_free(s);
	/* only the last CR goes; spaces are part of the secret */
	s = read_ok(put("inner", " a\rb \r\n", 7));
	assert_string_equal(s, " a\rb ");
	rq_secret_free(s);
}

static void empty(void **state)
{
	refused(put("empty", "", 0), "no secret", NULL);
	refused(put("nl", "\n", 1), "no secret", NULL);
	refused(put("crlf", "\r\nsecret-on-line-2\n", 19), "no secret", "secret-on-line-2");
}

static void too_long(void **state)
{
	size_t n = RQ_SECRET_MAX + 1;
	char *buf = malloc(n + 1);
	assert_non_null(buf);
	memset(buf, 'k', n);
	buf[n] = '\n';
	refused(put("long", buf, n + 1), "longer than", "kkkkkkkk");
	/* exactly the maximum, with CRLF, is fine */
	buf[RQ_SECRET_MAX] = '\r';
	buf[RQ_SECRET_MAX + 1] = '\n';
	char *s = read_ok(put("max", buf, RQ_SECRET_MAX + 2));
	assert_int_equal(strlen(s), RQ_SECRET_MAX);
	rq_secret_free(s);
	free(buf);
}

static void nul_byte(void **state)
{
	refused(put("nul", "ab\0cd\n", 6), "NUL", NULL);
}

static void missing(void **state)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/does-not-exist", dir);
	refused(path, "No such file", NULL);
	refused(dir, NULL, NULL);   /* a directory: refused one way or another */
	rq_secret_free(NULL);
	/* no error buffer at all */
	assert_null(rq_secret_read_file(path, "x", NULL, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(line_ends),
		cmocka_unit_test(empty),
		cmocka_unit_test(too_long),
		cmocka_unit_test(nul_byte),
		cmocka_unit_test(missing),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

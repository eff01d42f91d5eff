/* Redis URLs: parse, redaction, password sources (redis_url.h). Pure: no
 * Redis needed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "relayq/redis_url.h"
#include "relayq/secret.h"

static void parse_ok(const char *url, struct rq_redis_url *u)
{
	char err[200] = "";
	if (rq_redis_url_parse(url, u, err, sizeof(err)) != 0)
		fail_msg("refused %s: %s", url, err);
}

static void fields(void **state)
{
	struct rq_redis_url u;
	parse_ok(RQ_REDIS_URL_DEFAULT, &u);
	assert_false(u.is_unix);
	assert_string_equal(u.host, "127.0.0.1");
	assert_int_equal(u.port, 6379);
	assert_int_equal(u.db, 0);
	assert_string_equal(u.user, "");
	assert_false(u.has_password);

	parse_ok("redis://redis-1.example_x", &u);
	assert_string_equal(u.host, "redis-1.example_x");
	assert_int_equal(u.port, 6379);
	parse_ok("redis://h:65535/1000000", &u);
	assert_int_equal(u.port, 65535);
	assert_int_equal(u.db, RQ_REDIS_URL_DB_MAX);
	parse_ok("redis://h/", &u);
	assert_int_equal(u.db, 0);
	parse_ok("redis://[2001:db8::1]", &u);
	assert_string_equal(u.host, "2001:db8::1");

	/* user and password: %-decoding, ':' in a password as it is */
	parse_ok("redis://app%3Aone:p%20w:x@h:1/2", &u);
	assert_string_equal(u.user, "app:one");
	assert_true(u.has_password);
	assert_string_equal(u.password, "p w:x");
	rq_redis_url_wipe(&u);
	assert_string_equal(u.password, "");
	rq_redis_url_wipe(NULL);
	parse_ok("redis://:pw@h", &u);
	assert_string_equal(u.user, "");
	assert_string_equal(u.password, "pw");
	parse_ok("redis://user@h", &u);   /* RFC 3986: a user, no password */
	assert_string_equal(u.user, "user");
	assert_false(u.has_password);
	parse_ok("redis://user:@h", &u);  /* an empty password is none */
	assert_false(u.has_password);

	parse_ok("unix:/run/redis.sock", &u);
	assert_true(u.is_unix);
	assert_string_equal(u.path, "/run/redis.sock");
	assert_int_equal(u.db, 0);
	parse_ok("unix:///run/redis.sock?db=9", &u);
	assert_string_equal(u.path, "/run/redis.sock");
	assert_int_equal(u.db, 9);
}

static void limits(void **state)
{
	struct rq_redis_url u;
	char err[200];
	char url[RQ_REDIS_URL_MAX + 64];
	/* the longest user and password decode; one more byte is refused */
	char user[RQ_REDIS_URL_USER_MAX + 2], pw[RQ_REDIS_URL_PASSWORD_MAX + 2];
	memset(user, 'u', sizeof(user));
	memset(pw, 'p', sizeof(pw));
	snprintf(url, sizeof(url), "redis://%.*s:%.*s@h", RQ_REDIS_URL_USER_MAX, user,
		 RQ_REDIS_URL_PASSWORD_MAX, pw);
	parse_ok(url, &u);
	assert_int_equal(strlen(u.user), RQ_REDIS_URL_USER_MAX);
	assert_int_equal(strlen(u.password), RQ_REDIS_URL_PASSWORD_MAX);
	snprintf(url, sizeof(url), "redis://:%.*s@h", RQ_REDIS_URL_PASSWORD_MAX + 1, pw);
	assert_int_equal(rq_redis_url_parse(url, &u, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "password too long"));
	assert_null(strstr(err, "ppp"));
	assert_string_equal(u.password, "");
	snprintf(url, sizeof(url), "redis://%.*s:x@h", RQ_REDIS_URL_USER_MAX + 1, user);
	assert_int_equal(rq_redis_url_parse(url, &u, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "user name too long"));
	/* a whole URL past the maximum */
	memset(url, 'a', sizeof(url));
	memcpy(url, "redis://", 8);
	url[RQ_REDIS_URL_MAX + 1] = '\0';
	assert_int_equal(rq_redis_url_parse(url, &u, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "too long"));
	assert_int_equal(rq_redis_url_parse("redis://h/1000001", &u, err, sizeof(err)), -1);
	/* no error buffer */
	assert_int_equal(rq_redis_url_parse("nope", &u, NULL, 0), -1);
	assert_int_equal(rq_redis_url_parse(NULL, &u, err, sizeof(err)), -1);
}

static void bad_urls(void **state)
{
	const char *bad[] = {
		"redis://:s3cret#pw@h", "redis://:s3cret@pw@h", "redis://u:s3cret@h:port",
		"redis://:s3cret@h:-1", "redis://:s3cret@h:01234567890", "redis://:s3cret@h//1",
		"redis://:s3cret@h/1/2", "redis://:s3cret@[::1]x", "redis://:s3cret@[::1]:",
		"redis://:s3cret@h:", "redis://:s3cret@:1", "redis://:s3cret%0@h",
		"redis://:s3cret%g0@h", "redis://%00:s3cret@h", "redis://:s3cret@h\x01",
		"redis://:s3cret@h\x7f", "REDIS://:s3cret@h", "unix:", "unix://", "unix:?db=1",
		"unix:/s3cret.sock?db=1&x=2", "unix:/s3cret.sock?db=-1", "unix:/s3cret.sock#x",
		" redis://h",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct rq_redis_url u;
		char err[200] = "", red[300];
		if (rq_redis_url_parse(bad[i], &u, err, sizeof(err)) == 0)
			fail_msg("accepted %s", bad[i]);
		assert_non_null(strstr(err, "redis URL: "));
		assert_null(strstr(err, "s3cret"));
		assert_string_equal(u.password, "");
		rq_redis_url_redact(bad[i], red, sizeof(red));
		if (strstr(red, "s3cret"))
			fail_msg("redaction of %s shows %s", bad[i], red);
	}
	/* a unix path too long for sockaddr_un */
	char url[300] = "unix:/";
	memset(url + 6, 'p', 200);
	url[206] = '\0';
	struct rq_redis_url u;
	char err[200];
	assert_int_equal(rq_redis_url_parse(url, &u, err, sizeof(err)), -1);
}

static void redaction(void **state)
{
	char red[64];
	rq_redis_url_redact("redis://app:s3cret@h:1/2", red, sizeof(red));
	assert_string_equal(red, "redis://app:***@h:1/2");
	rq_redis_url_redact("redis://s3cret@h", red, sizeof(red));
	assert_string_equal(red, "redis://***@h");
	rq_redis_url_redact("redis://[::1]:6380/4", red, sizeof(red));
	assert_string_equal(red, "redis://[::1]:6380/4");
	rq_redis_url_redact("rediss://:s3cret@h", red, sizeof(red));
	assert_string_equal(red, "rediss://...");
	rq_redis_url_redact("s3cret", red, sizeof(red));
	assert_string_equal(red, "...");
	rq_redis_url_redact(NULL, red, sizeof(red));
	assert_string_equal(red, "");
	/* truncated output is still terminated and still hides the password */
	char tiny[12];
	rq_redis_url_redact("redis://app:s3cret@h", tiny, sizeof(tiny));
	assert_int_equal(strlen(tiny), sizeof(tiny) - 1);
	assert_null(strstr(tiny, "s3c"));
	rq_redis_url_redact("redis://h", red, 0);   /* no room: no write */
}

static void password_sources(void **state)
{
	struct rq_redis_url u;
	char err[300];
	char *pw = (char *)"untouched";

	/* none */
	parse_ok("redis://h", &u);
	assert_int_equal(rq_redis_url_password(&u, NULL, NULL, &pw, err, sizeof(err)), 0);
	assert_null(pw);
	/* the URL's */
	parse_ok("redis://:fr%40m-url@h", &u);
	assert_int_equal(rq_redis_url_password(&u, NULL, NULL, &pw, err, sizeof(err)), 0);
	assert_string_equal(pw, "fr@m-url");
	rq_secret_free(pw);
	/* twice: refused, without the password */
	setenv("RQ_TEST_URL_PW", "from-env", 1);
	assert_int_equal(rq_redis_url_password(&u, "RQ_TEST_URL_PW", NULL, &pw, err,
					       sizeof(err)), -1);
	assert_non_null(strstr(err, "more than once"));
	assert_null(strstr(err, "fr@m"));
	assert_null(strstr(err, "from-env"));
	rq_redis_url_wipe(&u);
	/* the environment's */
	parse_ok("redis://app@h", &u);
	assert_int_equal(rq_redis_url_password(&u, "RQ_TEST_URL_PW", NULL, &pw, err,
					       sizeof(err)), 0);
	assert_string_equal(pw, "from-env");
	rq_secret_free(pw);
	setenv("RQ_TEST_URL_PW", "", 1);
	assert_int_equal(rq_redis_url_password(&u, "RQ_TEST_URL_PW", NULL, &pw, err,
					       sizeof(err)), -1);
	assert_non_null(strstr(err, "RQ_TEST_URL_PW is not set"));
	unsetenv("RQ_TEST_URL_PW");
	assert_int_equal(rq_redis_url_password(&u, "RQ_TEST_URL_PW", NULL, &pw, err,
					       sizeof(err)), -1);
	/* a file's (the secret reader's rules) */
	char *dir = th_mkdtemp("redis-url");
	char path[512];
	snprintf(path, sizeof(path), "%s/pw", dir);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs("from-file\r\nnot this\n", f);
	fclose(f);
	assert_int_equal(rq_redis_url_password(&u, NULL, path, &pw, err, sizeof(err)), 0);
	assert_string_equal(pw, "from-file");
	rq_secret_free(pw);
	assert_int_equal(rq_redis_url_password(&u, "X", path, &pw, err, sizeof(err)), -1);
	assert_null(pw);
	snprintf(path, sizeof(path), "%s/missing", dir);
	assert_int_equal(rq_redis_url_password(&u, NULL, path, &pw, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "redis password file"));
	assert_null(pw);
	/* no URL at all */
	assert_int_equal(rq_redis_url_password(NULL, NULL, NULL, &pw, err, sizeof(err)), 0);
	assert_null(pw);
	th_rmrf(dir);
	free(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(fields),
		cmocka_unit_test(limits),
		cmocka_unit_test(bad_urls),
		cmocka_unit_test(redaction),
		cmocka_unit_test(password_sources),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

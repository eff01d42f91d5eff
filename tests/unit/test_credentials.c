/* The listener's credentials file (credentials.h): hashing, checking,
 * loading, replacing a user's line. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>

#include "harness.h"
#include "relayq/credentials.h"

static char *dir;

static int setup(void **state)
{
	dir = th_mkdtemp("credentials");
	return dir ? 0 : -1;
}

static int teardown(void **state)
{
	th_rmrf(dir);
	free(dir);
	return 0;
}

/* Writes text to dir/name with mode; returns its path (static). */
static const char *put(const char *name, const char *text, mode_t mode)
{
	static char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
	assert_int_equal(chmod(path, mode), 0);
	return path;
}

static char *hash(const char *pw)
{
	char err[200] = "";
	char *h = rq_credentials_hash(pw, strlen(pw), err, sizeof(err));
	if (!h)
		fail_msg("hash: %s", err);
	return h;
}

static struct rq_credentials *load_ok(const char *path)
{
	char err[600] = "";
	struct rq_credentials *c = rq_credentials_load(path, err, sizeof(err));
	if (!c)
		fail_msg("load %s: %s", path, err);
	return c;
}

static void load_bad(const char *path, const char *reason)
{
	char err[600] = "";
	assert_null(rq_credentials_load(path, err, sizeof(err)));
	if (!strstr(err, reason))
		fail_msg("err '%s' lacks '%s'", err, reason);
}

static void test_round_trip(void **state)
{
	char *h1 = hash("correct horse");
	char *h2 = hash("s3cret:with\tbytes \xc3\xa9");
	/* yescrypt here (libxcrypt 4.4), a fresh salt each time */
	assert_true(strncmp(h1, "$y$", 3) == 0 || strncmp(h1, "$6$", 3) == 0);
	char *h3 = hash("correct horse");
	assert_string_not_equal(h1, h3);
	char text[1200];
	snprintf(text, sizeof(text), "# relayq listener users\n\nalice:%s\nbob@example.com:%s\r\n"
		 "carol:%s", h1, h2, h3);
	const char *path = put("users", text, 0600);
	struct rq_credentials *c = load_ok(path);
	assert_int_equal(rq_credentials_count(c), 3);
	assert_true(rq_credentials_check(c, "alice", "correct horse", 13));
	assert_true(rq_credentials_check(c, "carol", "correct horse", 13));
	const char *p2 = "s3cret:with\tbytes \xc3\xa9";
	assert_true(rq_credentials_check(c, "bob@example.com", p2, strlen(p2)));
	/* wrong password, prefix, longer, empty, NUL inside, another's */
	assert_false(rq_credentials_check(c, "alice", "correct horsE", 13));
	assert_false(rq_credentials_check(c, "alice", "correct hors", 12));
	assert_false(rq_credentials_check(c, "alice", "correct horse!", 14));
	assert_false(rq_credentials_check(c, "alice", "", 0));
	assert_false(rq_credentials_check(c, "alice", "correct horse\0x", 15));
	assert_false(rq_credentials_check(c, "bob@example.com", "correct horse", 13));
	/* user names are exact (case too) */
	assert_false(rq_credentials_check(c, "Alice", "correct horse", 13));
	assert_false(rq_credentials_check(c, "alic", "correct horse", 13));
	assert_false(rq_credentials_check(c, NULL, "correct horse", 13));
	assert_false(rq_credentials_check(NULL, "alice", "correct horse", 13));
	/* too long never matches */
	char *longpw = malloc(RQ_CREDENTIALS_PASSWORD_MAX + 2);
	memset(longpw, 'p', RQ_CREDENTIALS_PASSWORD_MAX + 1);
	assert_false(rq_credentials_check(c, "alice", longpw, RQ_CREDENTIALS_PASSWORD_MAX + 1));
	free(longpw);
	rq_credentials_destroy(c);
	rq_credentials_destroy(NULL);
	free(h1);
	free(h2);
	free(h3);
}

static void test_unknown_user(void **state)
{
	char *h = hash("pw");
	char text[300];
	snprintf(text, sizeof(text), "alice:%s\n", h);
	struct rq_credentials *c = load_ok(put("u1", text, 0640));
	/* unknown users never pass, even with the first user's password (the
	 * dummy run uses her hash) */
	assert_false(rq_credentials_check(c, "mallory", "pw", 2));
	assert_false(rq_credentials_check(c, "", "pw", 2));
	rq_credentials_destroy(c);
	/* an empty file: valid, nobody passes */
	c = load_ok(put("u2", "# nobody yet\n", 0600));
	assert_int_equal(rq_credentials_count(c), 0);
	assert_false(rq_credentials_check(c, "alice", "pw", 2));
	rq_credentials_destroy(c);
	free(h);
}

static void test_bad_files(void **state)
{
	char *h = hash("pw");
	char text[300];
	snprintf(text, sizeof(text), "alice:%s\n", h);
	load_bad(put("o1", text, 0644), "others may read");
	load_bad(put("o2", text, 0602), "others may read");
	load_bad(put("o3", text, 0604), "chmod o=");
	load_bad("/nonexistent/relayq/users", "No such file");
	load_bad(dir, "not a regular file");
	load_bad(put("b1", "alice\n", 0600), "line 1: no ':'");
	load_bad(put("b2", "# c\nal ice:$y$x\n", 0600), "line 2: bad user name");
	load_bad(put("b3", ":$y$x\n", 0600), "bad user name");
	load_bad(put("b4", "alice:\n", 0600), "bad hash for alice");
	load_bad(put("b5", "alice:plaintext\n", 0600), "bad hash");
	load_bad(put("b6", "alice:$y$a:b\n", 0600), "bad hash");
	load_bad(put("b7", "alice:$y$a b\n", 0600), "bad hash");
	char dup[700];
	snprintf(dup, sizeof(dup), "alice:%s\nbob:%s\nalice:%s\n", h, h, h);
	load_bad(put("b8", dup, 0600), "line 3: user alice a second time");
	char user[100];
	memset(user, 'u', 65);
	user[65] = '\0';
	snprintf(dup, sizeof(dup), "%s:%s\n", user, h);
	load_bad(put("b9", dup, 0600), "bad user name");
	user[64] = '\0';
	snprintf(dup, sizeof(dup), "%s:%s\n", user, h);
	struct rq_credentials *c = load_ok(put("ok64", dup, 0600));
	rq_credentials_destroy(c);
	free(h);
}

static void test_user_names(void **state)
{
	assert_true(rq_credentials_user_valid("a", 1));
	assert_true(rq_credentials_user_valid("A.b_c@d+e-f9", 12));
	assert_false(rq_credentials_user_valid("", 0));
	assert_false(rq_credentials_user_valid("a:b", 3));
	assert_false(rq_credentials_user_valid("a b", 3));
	assert_false(rq_credentials_user_valid("a\nb", 3));
	assert_false(rq_credentials_user_valid("\xc3\xa9", 2));
	assert_false(rq_credentials_user_valid(NULL, 0));
}

static void test_hash_refuses(void **state)
{
	char err[200];
	assert_null(rq_credentials_hash("", 0, err, sizeof(err)));
	assert_non_null(strstr(err, "empty"));
	assert_null(rq_credentials_hash("a\0b", 3, err, sizeof(err)));
	assert_non_null(strstr(err, "NUL"));
	char *big = calloc(1, RQ_CREDENTIALS_PASSWORD_MAX + 2);
	memset(big, 'x', RQ_CREDENTIALS_PASSWORD_MAX + 1);
	assert_null(rq_credentials_hash(big, RQ_CREDENTIALS_PASSWORD_MAX + 1, err, sizeof(err)));
	big[RQ_CREDENTIALS_PASSWORD_MAX] = '\0';
	char *h = rq_credentials_hash(big, RQ_CREDENTIALS_PASSWORD_MAX, err, sizeof(err));
	assert_non_null(h);
	free(h);
	free(big);
}

static void test_file_set(void **state)
{
	char err[600] = "";
	char path[512];
	snprintf(path, sizeof(path), "%s/set", dir);
	char *ha = hash("pa"), *hb = hash("pb"), *hc = hash("pc");
	/* created 0600 */
	assert_int_equal(rq_credentials_file_set(path, "alice", ha, err, sizeof(err)), 0);
	struct stat st;
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	/* appended, then replaced in place; comments and order kept */
	FILE *f = fopen(path, "a");
	fputs("# a comment\n", f);
	fclose(f);
	assert_int_equal(rq_credentials_file_set(path, "bob", hb, err, sizeof(err)), 0);
	assert_int_equal(rq_credentials_file_set(path, "alice", hc, err, sizeof(err)), 0);
	char *text = th_read_file(path, NULL);
	char want[1200];
	snprintf(want, sizeof(want), "alice:%s\n# a comment\nbob:%s\n", hc, hb);
	assert_string_equal(text, want);
	free(text);
	struct rq_credentials *c = load_ok(path);
	assert_true(rq_credentials_check(c, "alice", "pc", 2));
	assert_false(rq_credentials_check(c, "alice", "pa", 2));
	assert_true(rq_credentials_check(c, "bob", "pb", 2));
	rq_credentials_destroy(c);
	/* a group-readable file stays so; a last line without LF gets one */
	assert_int_equal(chmod(path, 0640), 0);
	f = fopen(path, "a");
	fputs("# no end", f);
	fclose(f);
	assert_int_equal(rq_credentials_file_set(path, "carol", ha, err, sizeof(err)), 0);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0640);
	text = th_read_file(path, NULL);
	assert_non_null(strstr(text, "# no end\ncarol:"));
	free(text);
	/* refusals change nothing and leave no temporary file */
	assert_int_equal(chmod(path, 0644), 0);
	assert_int_equal(rq_credentials_file_set(path, "dave", ha, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "others may read"));
	assert_int_equal(chmod(path, 0600), 0);
	assert_int_equal(rq_credentials_file_set(path, "bad user", ha, err, sizeof(err)), -1);
	assert_int_equal(rq_credentials_file_set(path, "dave", "nohash", err, sizeof(err)), -1);
	char nodir[600];
	snprintf(nodir, sizeof(nodir), "%s/missing/users", dir);
	assert_int_equal(rq_credentials_file_set(nodir, "dave", ha, err, sizeof(err)), -1);
	DIR *d = opendir(dir);
	assert_non_null(d);
	for (struct dirent *e; (e = readdir(d));)
		if (strstr(e->d_name, ".tmp."))
			fail_msg("left behind: %s", e->d_name);
	closedir(d);
	free(ha);
	free(hb);
	free(hc);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_round_trip),
		cmocka_unit_test(test_unknown_user),
		cmocka_unit_test(test_bad_files),
		cmocka_unit_test(test_user_names),
		cmocka_unit_test(test_hash_refuses),
		cmocka_unit_test(test_file_set),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

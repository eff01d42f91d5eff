/* relayq passwd as a process: what it writes is what the listener's checker
 * (rq_credentials_check) accepts; replacing, refusals, exit codes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "harness.h"
#include "relayq/credentials.h"

static char *dir;
static char file[600];

static int setup(void **state)
{
	dir = th_mkdtemp("passwd");
	if (!dir || !getenv("RELAYQ_BIN"))
		return -1;
	snprintf(file, sizeof(file), "%s/users", dir);
	return 0;
}

static int teardown(void **state)
{
	th_rmrf(dir);
	free(dir);
	return 0;
}

/* printf INPUT | relayq passwd ARGS; returns the exit status. */
static int passwd(const char *input, const char *args)
{
	char cmd[2000];
	snprintf(cmd, sizeof(cmd), "printf '%s' | '%s' passwd %s 2>'%s/err'", input,
		 getenv("RELAYQ_BIN"), args, dir);
	return th_run(cmd, NULL);
}

static bool check(const char *user, const char *pw)
{
	char err[600] = "";
	struct rq_credentials *c = rq_credentials_load(file, err, sizeof(err));
	if (!c)
		fail_msg("load: %s", err);
	bool ok = rq_credentials_check(c, user, pw, strlen(pw));
	rq_credentials_destroy(c);
	return ok;
}

static const char *err_text(void)
{
	static char *text;
	char path[700];
	snprintf(path, sizeof(path), "%s/err", dir);
	free(text);
	text = th_read_file(path, NULL);
	return text ? text : "";
}

static void test_passwd(void **state)
{
	char args[800];
	snprintf(args, sizeof(args), "--file '%s' alice", file);
	assert_int_equal(passwd("s3cret pass\\n", args), 0);
	assert_string_equal(err_text(), "");
	struct stat st;
	assert_int_equal(stat(file, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0600);
	assert_true(check("alice", "s3cret pass"));
	assert_false(check("alice", "s3cret"));
	assert_false(check("bob", "s3cret pass"));

	/* a second user, CRLF and no final line end; then alice replaced */
	snprintf(args, sizeof(args), "--file '%s' bob@example.com", file);
	assert_int_equal(passwd("pw:bob\\r\\n", args), 0);
	snprintf(args, sizeof(args), "--file='%s' alice", file);
	assert_int_equal(passwd("new", args), 0);
	assert_true(check("alice", "new"));
	assert_false(check("alice", "s3cret pass"));
	assert_true(check("bob@example.com", "pw:bob"));
	char *text = th_read_file(file, NULL);
	assert_true(strncmp(text, "alice:$", 7) == 0);
	assert_non_null(strstr(text, "\nbob@example.com:$"));
	free(text);

	/* refusals: usage 2, operation 1; the file unchanged */
	text = th_read_file(file, NULL);
	snprintf(args, sizeof(args), "--file '%s' 'bad user'", file);
	assert_int_equal(passwd("x\\n", args), 2);
	assert_non_null(strstr(err_text(), "relayq: passwd: bad user name"));
	snprintf(args, sizeof(args), "'%s' alice", file);
	assert_int_equal(passwd("x\\n", args), 2);
	snprintf(args, sizeof(args), "--file '%s' alice", file);
	assert_int_equal(passwd("", args), 1);
	assert_non_null(strstr(err_text(), "no password"));
	assert_int_equal(passwd("\\n", args), 1);
	assert_non_null(strstr(err_text(), "empty password"));
	assert_int_equal(chmod(file, 0604), 0);
	assert_int_equal(passwd("x\\n", args), 1);
	assert_non_null(strstr(err_text(), "others may read"));
	assert_int_equal(chmod(file, 0600), 0);
	char *after = th_read_file(file, NULL);
	assert_string_equal(text, after);
	free(text);
	free(after);
	assert_int_equal(passwd("", "--help"), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_passwd),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

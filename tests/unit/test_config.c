#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "harness.h"
#include "relayq/config.h"
#include "relayq/log.h"
#include "relayq/policy_lua.h"

static char *dir;

static int setup(void **state)
{
	(void)state;
	dir = th_mkdtemp("config");
	/* Keep policy_print and the like out of the test output. */
	rq_log_init(RQ_LOG_OFF, RQ_LOG_LOGFMT, NULL);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	th_rmrf(dir);
	free(dir);
	return 0;
}

static const char *write_file(const char *name, const char *text)
{
	static char path[512];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(text, f);
	fclose(f);
	return path;
}

/* Loads text; returns the config or NULL, with the problems in diag. */
static struct rq_config *load(const char *text, struct rq_config_diag *diag)
{
	const char *path = write_file("relayq.lua", text);
	rq_config_diag_init(diag, path);
	return rq_config_lua_load(path, 0, diag);
}

/* True when diag has a problem at line with msg containing needle. */
static bool has_problem(const struct rq_config_diag *d, int line, bool warning,
			const char *needle)
{
	for (size_t i = 0; i < d->n; i++)
		if (d->items[i].line == line && d->items[i].warning == warning &&
		    strstr(d->items[i].msg, needle))
			return true;
	return false;
}

static void dump(const struct rq_config_diag *d)
{
	rq_config_diag_print(d, stderr);
}

static void defaults(void **state)
{
	(void)state;
	struct rq_config *c = rq_config_create();
	assert_non_null(c);
	assert_string_equal(c->redis, "redis://127.0.0.1:6379/0");
	assert_int_equal(c->nqueues, 1);
	assert_string_equal(c->queues[0], "default");
	assert_null(c->relay_host);
	assert_int_equal(c->tls, RQ_TLS_OPPORTUNISTIC);
	assert_true(c->tls_verify);
	assert_false(c->auth);
	assert_non_null(c->helo);
	assert_int_equal(c->connections, 100);
	assert_int_equal(c->per_destination, 20);
	assert_int_equal(c->messages_per_connection, 100);
	assert_int_equal(c->recipients_per_transaction, 100);
	assert_int_equal(c->batch, 100);
	assert_true(c->lease == 300);
	assert_true(c->timeouts.connect == 30 && c->timeouts.greeting == 300 &&
		    c->timeouts.rcpt == 300 && c->timeouts.dot == 600 &&
		    c->timeouts.data_block == 180 && c->timeouts.idle == 10);
	assert_int_equal(c->log_format, RQ_LOG_LOGFMT);
	assert_int_equal(c->log_level, RQ_LOG_INFO);
	assert_int_equal(c->events_cap, 100000);
	assert_false(c->bounce);
	assert_true(c->chunking);
	assert_null(c->metrics);
	assert_true(c->params.backoff.first == 300 && c->params.backoff.factor == 2 &&
		    c->params.backoff.max == 14400 &&
		    fabs(c->params.backoff.jitter - 0.15) < 1e-12);
	assert_true(c->params.expire.max_age == 5 * 86400);
	assert_int_equal(c->params.expire.max_attempts, 0);
	assert_null(c->lua);
	rq_config_destroy(c);
	rq_config_destroy(NULL);

	/* An empty file is a valid config with every default. */
	struct rq_config_diag d;
	c = load("-- nothing\n", &d);
	assert_non_null(c);
	assert_int_equal(d.errors, 0);
	assert_string_equal(c->queues[0], "default");
	assert_non_null(c->lua);
	rq_config_destroy(c);
}

static void every_key(void **state)
{
	(void)state;
	const char *secret = write_file("secret", "s3cret\n");
	chmod(secret, 0600);
	char *text = NULL;
	assert_true(asprintf(&text,
		"relayq.config {\n"
		"  redis = 'unix:/run/redis/redis.sock',\n"
		"  queue = { 'mail', 'bulk' },\n"
		"  relay = '[smtp.example.com]:587',\n"
		"  tls = 'required', tls_ca_file = '%s', tls_verify = false,\n"
		"  auth = { user = 'apikey', password_file = '%s' },\n"
		"  helo = 'relay.example.org',\n"
		"  connections = 50, per_destination = 10,\n"
		"  messages_per_connection = 7, recipients_per_transaction = 30,\n"
		"  batch = 64, lease = '2m',\n"
		"  timeouts = { connect = 5, greeting = '1m', helo = '2m', mail = '3m',\n"
		"               rcpt = '4m', data = '5m', data_block = '6m', dot = '7m',\n"
		"               quit = '8s', idle = 0 },\n"
		"  log_format = 'json', log_level = 'debug',\n"
		"  events_cap = 500, bounce = true, metrics = '127.0.0.1:9465',\n"
		"  chunking = false,\n"
		"}\n"
		"relayq.backoff { first = '1m', factor = 3, max = '1h', jitter = 0 }\n"
		"relayq.expire { max_age = '2d', max_attempts = 12 }\n", secret, secret) > 0);
	struct rq_config_diag d;
	struct rq_config *c = load(text, &d);
	free(text);
	if (!c)
		dump(&d);
	assert_non_null(c);
	assert_int_equal(d.errors, 0);
	assert_int_equal(d.warnings, 0);
	assert_string_equal(c->redis, "unix:/run/redis/redis.sock");
	assert_int_equal(c->nqueues, 2);
	assert_string_equal(c->queues[0], "mail");
	assert_string_equal(c->queues[1], "bulk");
	assert_string_equal(c->relay_host, "smtp.example.com");
	assert_int_equal(c->relay_port, 587);
	assert_false(c->relay_mx);
	assert_int_equal(c->tls, RQ_TLS_REQUIRED);
	assert_non_null(c->tls_ca_file);
	assert_false(c->tls_verify);
	assert_true(c->auth);
	assert_string_equal(c->auth_user, "apikey");
	assert_string_equal(c->auth_password, "s3cret");
	assert_string_equal(c->helo, "relay.example.org");
	assert_int_equal(c->connections, 50);
	assert_int_equal(c->per_destination, 10);
	assert_int_equal(c->messages_per_connection, 7);
	assert_int_equal(c->recipients_per_transaction, 30);
	assert_int_equal(c->batch, 64);
	assert_true(c->lease == 120);
	assert_true(c->timeouts.connect == 5 && c->timeouts.greeting == 60 &&
		    c->timeouts.helo == 120 && c->timeouts.mail == 180 &&
		    c->timeouts.rcpt == 240 && c->timeouts.data == 300 &&
		    c->timeouts.data_block == 360 && c->timeouts.dot == 420 &&
		    c->timeouts.quit == 8 && c->timeouts.idle == 0);
	assert_int_equal(c->log_format, RQ_LOG_JSON);
	assert_int_equal(c->log_level, RQ_LOG_DEBUG);
	assert_int_equal(c->events_cap, 500);
	assert_true(c->bounce);
	assert_false(c->chunking);
	assert_string_equal(c->metrics, "127.0.0.1:9465");
	assert_true(c->params.backoff.first == 60 && c->params.backoff.factor == 3 &&
		    c->params.backoff.max == 3600 && c->params.backoff.jitter == 0);
	assert_true(c->params.expire.max_age == 2 * 86400);
	assert_int_equal(c->params.expire.max_attempts, 12);
	rq_config_destroy(c);
}

static void relay_forms(void **state)
{
	(void)state;
	struct rq_config_diag d;
	struct rq_config *c = load("relayq.config { relay = 'mx.example.com' }\n", &d);
	assert_non_null(c);
	assert_string_equal(c->relay_host, "mx.example.com");
	assert_int_equal(c->relay_port, 25);
	assert_true(c->relay_mx);
	rq_config_destroy(c);
	c = load("relayq.config { relay = '127.0.0.1:2525', redis = 'redis://localhost:6380/2' }\n", &d);
	assert_non_null(c);
	assert_string_equal(c->relay_host, "127.0.0.1");
	assert_int_equal(c->relay_port, 2525);
	rq_config_destroy(c);
	c = load("relayq.config { relay = '[::1]:2525' }\n", &d);
	assert_non_null(c);
	assert_string_equal(c->relay_host, "::1");
	assert_false(c->relay_mx);
	rq_config_destroy(c);
	static const char *const bad[] = {"'bad host:25'", "'host:0'", "'host:99999'",
					  "'[host'", "'host:'", "''", "'h\\r\\nx'", NULL};
	for (size_t i = 0; bad[i]; i++) {
		char text[200];
		snprintf(text, sizeof(text), "\n\nrelayq.config { relay = %s }\n", bad[i]);
		c = load(text, &d);
		assert_null(c);
		if (!has_problem(&d, 3, false, "relay")) {
			dump(&d);
			fail_msg("relay %s", bad[i]);
		}
	}
}

static void durations(void **state)
{
	(void)state;
	struct rq_config_diag d;
	struct rq_config *c = load(
		"relayq.config { lease = 90, timeouts = { rcpt = '1h', dot = '90s' } }\n"
		"relayq.expire { max_age = '1w' }\n", &d);
	assert_non_null(c);
	assert_true(c->lease == 90);
	assert_true(c->timeouts.rcpt == 3600 && c->timeouts.dot == 90);
	assert_true(c->params.expire.max_age == 7 * 86400);
	rq_config_destroy(c);
	c = load("relayq.config {\n  lease = '5x',\n}\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "lease: \"5x\" is not a duration"));
	c = load("relayq.config {\n  lease = '1s',\n}\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "lease: 1s is out of range"));
	c = load("relayq.config {\n  timeouts = {\n    rcpt = true,\n  },\n}\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 3, false, "timeouts.rcpt: expected a duration"));
}

static void unknown_key_has_its_line(void **state)
{
	(void)state;
	struct rq_config_diag d;
	struct rq_config *c = load(
		"-- a config\n"
		"relayq.config {\n"
		"  queue = 'mail',\n"
		"  conections = 10,\n"
		"  timeouts = {\n"
		"    connect = '10s',\n"
		"    rpct = '1m',\n"
		"  },\n"
		"}\n"
		"relayq.backoff { first = '1m', fist = 3 }\n", &d);
	assert_null(c);
	if (!has_problem(&d, 4, false, "unknown key conections"))
		dump(&d);
	assert_true(has_problem(&d, 4, false, "unknown key conections"));
	assert_true(has_problem(&d, 7, false, "unknown key timeouts.rpct"));
	assert_true(has_problem(&d, 10, false, "unknown key fist"));
	assert_int_equal(d.errors, 3);
}

static void wrong_types_and_ranges(void **state)
{
	(void)state;
	static const struct {
		const char *line;
		const char *needle;
	} cases[] = {
		{"connections = 'many'", "connections: expected a number, got a string"},
		{"connections = 0", "connections: 0 is out of range (1 to 100000)"},
		{"per_destination = 2.5", "per_destination: expected an integer"},
		{"tls = 'maybe'", "tls: \"maybe\" is not none"},
		{"tls_verify = 'yes'", "tls_verify: expected a boolean"},
		{"bounce = 1", "bounce: expected a boolean"},
		{"chunking = 'no'", "chunking: expected a boolean"},
		{"queue = 'no spaces'", "is not a queue name"},
		{"queue = { 'a', 3 }", "queue: expected a string"},
		{"queue = { 'a', 'a' }", "listed twice"},
		{"redis = 'http://x'", "redis: \"...\" is not a Redis URL (redis URL: must start"},
		{"redis = 'redis://host:99999'", "redis: \"redis://...\" is not a Redis URL"},
		{"redis_user = ''", "redis_user: must be 1 to 255 bytes"},
		{"redis_password_file = 5", "redis_password_file: expected a string"},
		{"redis_password_env = 'A\\nB'", "redis_password_env: control character"},
		{"log_format = 'xml'", "log_format"},
		{"log_level = 'loud'", "log_level"},
		{"events_cap = -1", "events_cap: -1 is out of range"},
		{"metrics = 'nope'", "metrics"},
		{"helo = 'bad name!'", "helo"},
		{"auth = 'user:pass'", "auth: expected a table"},
		{"timeouts = 5", "timeouts: expected a table"},
		{"relay = print", "relay: expected a string, got a function"},
		{"tls_ca_file = '/nonexistent/ca.pem'", "tls_ca_file: cannot read"},
		{"batch = 1e9", "batch: 1e+09 is out of range"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char text[300];
		snprintf(text, sizeof(text), "\nrelayq.config {\n  %s,\n}\n", cases[i].line);
		struct rq_config_diag d;
		struct rq_config *c = load(text, &d);
		if (c || !has_problem(&d, 3, false, cases[i].needle)) {
			dump(&d);
			fail_msg("case %s", cases[i].line);
		}
	}
	struct rq_config_diag d;
	struct rq_config *c = load("relayq.backoff { first = '1h', max = '1m' }\n"
				   "relayq.backoff { factor = 2 }\n"
				   "relayq.expire { max_attempts = 0 }\n"
				   "relayq.config(5)\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "max is less than first"));
	assert_true(has_problem(&d, 2, false, "relayq.backoff called again (first at line 1)"));
	assert_true(has_problem(&d, 3, false, "max_attempts: 0 is out of range"));
	assert_true(has_problem(&d, 4, false, "relayq.config: expected a table"));
}

static void auth_sources(void **state)
{
	(void)state;
	struct rq_config_diag d;
	setenv("RQ_TEST_PW", "from-env", 1);
	struct rq_config *c = load("relayq.config { auth = { user = 'u', "
				   "password_env = 'RQ_TEST_PW' } }\n", &d);
	assert_non_null(c);
	assert_string_equal(c->auth_password, "from-env");
	rq_config_destroy(c);

	c = load("relayq.config {\n auth = { user = 'u', password = 'lit' } }\n", &d);
	assert_non_null(c);
	assert_string_equal(c->auth_password, "lit");
	assert_true(has_problem(&d, 2, true, "discouraged"));
	rq_config_destroy(c);

	c = load("relayq.config {\n auth = { password = 'lit' } }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "auth: user is missing"));

	c = load("relayq.config {\n auth = { user = 'u', password = 'a', "
		 "password_env = 'RQ_TEST_PW' } }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "exactly one of"));

	c = load("relayq.config {\n auth = { user = 'u', password_env = 'RQ_TEST_UNSET_X' } }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "RQ_TEST_UNSET_X is not set"));

	c = load("relayq.config {\n auth = { user = 'u', password_file = '/nonexistent/pw' } }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "cannot open /nonexistent/pw"));

	/* The CLI never sends mail: it loads the same file without the SMTP
	 * secret (neither read nor required), and gets everything else. */
	const char *cli_path = write_file("cli.lua",
		"relayq.config {\n queue = 'q1',\n auth = { user = 'u', password_file = '/nonexistent/pw' } }\n");
	rq_config_diag_init(&d, cli_path);
	c = rq_config_lua_load(cli_path, RQ_CONFIG_LOAD_NO_SMTP_SECRET, &d);
	assert_non_null(c);
	assert_int_equal(d.errors, 0);
	assert_string_equal(c->queues[0], "q1");
	assert_null(c->auth_password);
	rq_config_destroy(c);

	/* AUTH over plaintext only when allowed. */
	c = load("relayq.config { tls = 'none',\n auth = { user = 'u', password_env = 'RQ_TEST_PW' } }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "allow_plaintext"));
	c = load("relayq.config { tls = 'none', auth = { user = 'u', "
		 "password_env = 'RQ_TEST_PW', allow_plaintext = true } }\n", &d);
	assert_non_null(c);
	assert_true(c->auth_allow_plaintext);
	rq_config_destroy(c);

	/* A world-readable password file is a warning. */
	const char *pw = write_file("pw", "x\n");
	chmod(pw, 0644);
	char text[600];
	snprintf(text, sizeof(text), "relayq.config { auth = { user = 'u', password_file = '%s' } }\n", pw);
	c = load(text, &d);
	assert_non_null(c);
	assert_true(has_problem(&d, 1, true, "readable by group or others"));
	rq_config_destroy(c);
}

/* Text rq_config_check prints for a config file (stdout + stderr). */
static char *check_text(const char *text, int *rc)
{
	const char *path = write_file("check.lua", text);
	char *out = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&out, &len);
	assert_non_null(f);
	*rc = rq_config_lua_check(path, f, f);
	fclose(f);
	return out;
}

static void redis_url_and_password_sources(void **state)
{
	(void)state;
	struct rq_config_diag d;
	int rc;
	/* The URL may carry a user and a password (%-encoded): accepted with
	 * a warning that never shows the password. */
	char *out = check_text("relayq.config {\n"
			       "  redis = 'redis://app:s3cr%40t:x@127.0.0.1:6379/0' }\n", &rc);
	assert_int_equal(rc, 0);
	assert_non_null(strstr(out, "a password in the URL"));
	assert_null(strstr(out, "s3cr"));
	free(out);
	/* Broken URLs: the message never holds the password, whatever its
	 * shape (no "://", unencoded '#', '?', second '@'). */
	const char *bad[] = {
		"redis:/:s3cretpw@127.0.0.1",
		"redis://:s3cret#pw@127.0.0.1",
		"redis://:s3cret?pw@127.0.0.1",
		"redis://:s3cret@pw@127.0.0.1",
		"redis://:s3cretpw@127.0.0.1:99999",
		"redis://:s3cretpw@127.0.0.1/x",
		"redis://:%zzs3cretpw@127.0.0.1",
		"s3cretpw",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char text[300];
		snprintf(text, sizeof(text), "relayq.config { redis = '%s' }\n", bad[i]);
		out = check_text(text, &rc);
		if (rc != 1 || !strstr(out, "is not a Redis URL") || strstr(out, "s3cret"))
			fail_msg("URL %s: rc %d, output %s", bad[i], rc, out);
		free(out);
	}

	/* The password from a file or an environment variable. */
	char pw[512];
	snprintf(pw, sizeof(pw), "%s", write_file("redis.pw", "from-file\n"));
	chmod(pw, 0600);
	char text[800];
	snprintf(text, sizeof(text), "relayq.config {\n redis = 'redis://127.0.0.1',\n"
		 " redis_user = 'app', redis_password_file = '%s' }\n", pw);
	struct rq_config *c = load(text, &d);
	if (!c)
		dump(&d);
	assert_non_null(c);
	assert_int_equal(d.warnings, 0);
	assert_string_equal(c->redis_user, "app");
	assert_string_equal(c->redis_password_file, pw);
	assert_null(c->redis_password_env);
	rq_config_destroy(c);

	setenv("RQ_TEST_REDIS_PW", "from-env", 1);
	c = load("relayq.config { redis_password_env = 'RQ_TEST_REDIS_PW' }\n", &d);
	assert_non_null(c);
	assert_string_equal(c->redis_password_env, "RQ_TEST_REDIS_PW");
	assert_null(c->redis_user);
	assert_null(c->redis_password_file);
	rq_config_destroy(c);

	/* Mistakes. */
	c = load("relayq.config {\n redis_password_env = 'RQ_TEST_UNSET_Z' }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "redis_password_env: RQ_TEST_UNSET_Z is not set"));
	c = load("relayq.config {\n redis_password_file = '/nonexistent/pw' }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "redis_password_file: cannot open /nonexistent/pw"));
	c = load("relayq.config {\n redis = 'redis://:p@127.0.0.1',\n"
		 " redis_password_env = 'RQ_TEST_REDIS_PW' }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "give the password once"));
	snprintf(text, sizeof(text), "relayq.config {\n redis_password_file = '%s',\n"
		 " redis_password_env = 'RQ_TEST_REDIS_PW' }\n", pw);
	c = load(text, &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "give the password once"));
	c = load("relayq.config {\n redis_user = 'app' }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "a Redis user needs a password"));
	c = load("relayq.config {\n redis = 'redis://u:p@127.0.0.1', redis_user = 'app' }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "the redis URL has a user already"));
	/* a password file others can read is a warning */
	chmod(pw, 0644);
	snprintf(text, sizeof(text), "relayq.config { redis_password_file = '%s' }\n", pw);
	c = load(text, &d);
	assert_non_null(c);
	assert_true(has_problem(&d, 1, true, "redis_password_file: "));
	assert_true(has_problem(&d, 1, true, "readable by group or others"));
	rq_config_destroy(c);
	unsetenv("RQ_TEST_REDIS_PW");
}

static void domains(void **state)
{
	(void)state;
	struct rq_config_diag d;
	struct rq_config *c = load(
		"relayq.backoff { first = '10m' }\n"
		"relayq.on_domain('Yahoo.com', { per_destination = 5,\n"
		"  backoff = { first = '30m', max = '8h' }, expire = { max_age = '1d' } })\n"
		"relayq.on_domain('gmail.com', { recipients_per_transaction = 50 })\n", &d);
	if (!c)
		dump(&d);
	assert_non_null(c);
	assert_int_equal(c->ndomains, 2);
	const struct rq_config_domain *y = rq_config_domain(c, "yahoo.COM");
	assert_non_null(y);
	assert_string_equal(y->name, "yahoo.com");
	assert_true(y->has_per_destination);
	assert_int_equal(y->per_destination, 5);
	assert_false(y->has_recipients_per_transaction);
	struct rq_policy_params p;
	rq_config_params(c, "yahoo.com", &p);
	assert_true(p.backoff.first == 1800 && p.backoff.max == 8 * 3600);
	assert_true(p.expire.max_age == 86400);
	rq_config_params(c, "gmail.com", &p);
	assert_true(p.backoff.first == 600 && p.expire.max_age == 5 * 86400);
	rq_config_params(c, "other.org", &p);
	assert_true(p.backoff.first == 600);
	rq_config_params(c, NULL, &p);
	assert_true(p.backoff.first == 600);
	assert_int_equal(rq_config_domain(c, "gmail.com")->recipients_per_transaction, 50);
	struct rq_config_limits lim;
	rq_config_limits(c, "YAHOO.com", &lim);
	assert_int_equal(lim.per_destination, 5);
	assert_int_equal(lim.recipients_per_transaction, 100);
	rq_config_limits(c, "gmail.com", &lim);
	assert_int_equal(lim.per_destination, 20);
	assert_int_equal(lim.recipients_per_transaction, 50);
	assert_int_equal(lim.messages_per_connection, 100);
	assert_null(rq_config_domain(c, "other.org"));
	rq_config_destroy(c);

	/* A partial domain backoff takes the rest from relayq.backoff, even
	 * when that comes later in the file. */
	c = load("relayq.on_domain('x.com', { backoff = { first = '1m' } })\n"
		 "relayq.backoff { first = '10m', factor = 3, max = '2h' }\n"
		 "relayq.on_domain('y.com', {\n backoff = { first = '3h' } })\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 3, false, "backoff max is less than first"));
	c = load("relayq.on_domain('x.com', { backoff = { first = '1m' } })\n"
		 "relayq.backoff { first = '10m', factor = 3, max = '2h' }\n", &d);
	assert_non_null(c);
	rq_config_params(c, "x.com", &p);
	assert_true(p.backoff.first == 60 && p.backoff.factor == 3 && p.backoff.max == 7200);
	rq_config_params(c, "z.com", &p);
	assert_true(p.backoff.first == 600);
	rq_config_destroy(c);

	c = load("relayq.on_domain('a.com', { per_destination = 5 })\n"
		 "relayq.on_domain('A.com', { per_destination = 6 })\n"
		 "relayq.on_domain('bad domain', {})\n"
		 "relayq.on_domain('b.com', {\n  connections = 3 })\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "called again (first at line 1)"));
	assert_true(has_problem(&d, 3, false, "not a domain name"));
	assert_true(has_problem(&d, 5, false, "unknown key connections"));
}

static void lua_errors_and_env(void **state)
{
	(void)state;
	struct rq_config_diag d;
	struct rq_config *c = load("relayq.config {\n queue = 'a'\n\n", &d);
	assert_null(c);
	assert_int_equal(d.n, 1);
	assert_true(d.items[0].line >= 3);
	assert_non_null(strstr(d.items[0].msg, "expected"));

	c = load("local x = 1\nrelayq.confg { }\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "confg"));

	/* Runaway code at load time is stopped by the budget. */
	c = load("\nwhile true do end\n", &d);
	assert_null(c);
	assert_true(has_problem(&d, 2, false, "instruction budget"));

	setenv("RQ_TEST_QUEUE", "from_env", 1);
	c = load("relayq.config { queue = relayq.getenv('RQ_TEST_QUEUE', 'x'),\n"
		 "  redis = relayq.getenv('RQ_TEST_UNSET_Y', 'unix:/tmp/r.sock') }\n", &d);
	assert_non_null(c);
	assert_string_equal(c->queues[0], "from_env");
	assert_string_equal(c->redis, "unix:/tmp/r.sock");
	rq_config_destroy(c);

	/* Missing file. */
	rq_config_diag_init(&d, "/nonexistent/relayq.lua");
	assert_null(rq_config_lua_load("/nonexistent/relayq.lua", 0, &d));
	assert_true(has_problem(&d, 0, false, "cannot open"));
}

static void check_output(void **state)
{
	(void)state;
	const char *path = write_file("check.lua",
		"relayq.config {\n"
		"  queue = 'mail',\n"
		"  conections = 10,\n"
		"}\n"
		"relayq.on(250, function() end)\n");
	char *out = NULL, *err = NULL;
	size_t olen = 0, elen = 0;
	FILE *o = open_memstream(&out, &olen);
	FILE *e = open_memstream(&err, &elen);
	int rc = rq_config_lua_check(path, o, e);
	fclose(o);
	fclose(e);
	assert_int_equal(rc, 1);
	char want[600];
	snprintf(want, sizeof(want), "%s:3: error: unknown key conections in relayq.config\n", path);
	assert_non_null(strstr(err, want));
	snprintf(want, sizeof(want), "%s:5: error: relayq.on: selector 250", path);
	assert_non_null(strstr(err, want));
	/* Sorted by line. */
	assert_true(strstr(err, ":3:") < strstr(err, ":5:"));
	assert_int_equal(olen, 0);
	free(out);
	free(err);

	path = write_file("ok.lua", "relayq.config { queue = 'mail' }\n"
				    "relayq.on(550, function() end)\n");
	o = open_memstream(&out, &olen);
	e = open_memstream(&err, &elen);
	rc = rq_config_lua_check(path, o, e);
	fclose(o);
	fclose(e);
	assert_int_equal(rc, 0);
	assert_int_equal(elen, 0);
	assert_non_null(strstr(out, ": ok (1 policy rules, 0 domains)"));
	free(out);
	free(err);
}

static void example_config_checks(void **state)
{
	(void)state;
	char path[600];
	snprintf(path, sizeof(path), "%s/contrib/relayq.example.lua", th_source_root());
	FILE *f = fopen(path, "r");
	if (!f)
		skip();
	fclose(f);
	char *out = NULL, *err = NULL;
	size_t olen = 0, elen = 0;
	FILE *o = open_memstream(&out, &olen);
	FILE *e = open_memstream(&err, &elen);
	int rc = rq_config_lua_check(path, o, e);
	fclose(o);
	fclose(e);
	if (rc != 0)
		fprintf(stderr, "%s", err);
	assert_int_equal(rc, 0);
	free(out);
	free(err);
}

static void listen_settings(void **state)
{
	(void)state;
	struct rq_config_diag d;
	char text[2000];
	snprintf(text, sizeof(text),
		 "relayq.config { queue = { \"a\", \"b\" } }\n"
		 "relayq.listen { \"127.0.0.1:2525\", trusted = { \"127.0.0.0/8\", \"::1/128\" },\n"
		 "  tls_cert = \"%s/tests/fixtures/tls/server.pem\",\n"
		 "  tls_key = \"%s/tests/fixtures/tls/server.key\",\n"
		 "  max_size = \"10M\", max_recipients = 5, max_per_ip = 3, queue = \"b\",\n"
		 "  add_date = false, meta = { app = \"x\", n = 2, on = true }, timeout = \"2m\" }\n"
		 "relayq.listen { \"[::1]:2526\", trusted = { \"::1\" } }\n",
		 RQ_SOURCE_ROOT, RQ_SOURCE_ROOT);
	struct rq_config *c = load(text, &d);
	if (!c)
		dump(&d);
	assert_non_null(c);
	assert_int_equal(c->nlistens, 2);
	const struct rq_config_listen *l = &c->listens[0];
	assert_string_equal(l->address, "127.0.0.1:2525");
	assert_int_equal(l->ntrusted, 2);
	assert_string_equal(l->trusted[1], "::1/128");
	assert_true(l->max_size == 10.0 * 1024 * 1024);
	assert_int_equal(l->max_recipients, 5);
	assert_int_equal(l->max_per_ip, 3);
	assert_int_equal(l->max_connections, 1000);
	assert_string_equal(l->queue, "b");
	assert_true(l->add_message_id);
	assert_false(l->add_date);
	assert_true(l->timeout == 120);
	assert_string_equal(l->meta_json, "{\"app\":\"x\",\"n\":2,\"on\":true}");
	assert_null(c->listens[1].queue);
	assert_null(c->listens[1].meta_json);
	rq_config_destroy(c);

	/* each problem on its line */
	c = load("relayq.listen {\n"
		 "  \"127.0.0.1:0\",\n"
		 "  trusted = { \"10.0.0.0/33\" },\n"
		 "  tls_key = \"/nonexistent/key\",\n"
		 "  auth_file = \"/nonexistent/users\",\n"
		 "  max_size = \"1T\",\n"
		 "  meta = { user = \"x\" },\n"
		 "  bogus = 1,\n"
		 "}\n"
		 "relayq.listen { \"localhost:25\" }\n", &d);
	assert_null(c);
	/* the address has no key: its problems are at the line of the call */
	assert_true(has_problem(&d, 1, false, "port must be 1 to 65535"));
	assert_true(has_problem(&d, 3, false, "prefix length"));
	assert_true(has_problem(&d, 4, false, "cannot read /nonexistent/key"));
	assert_true(has_problem(&d, 5, false, "cannot read /nonexistent/users"));
	assert_true(has_problem(&d, 6, false, "not a size"));
	assert_true(has_problem(&d, 7, false, "set by the listener"));
	assert_true(has_problem(&d, 8, false, "unknown key bogus in relayq.listen"));
	assert_true(has_problem(&d, 10, false, "is not \"IPv4:port\""));

	/* AUTH only over TLS unless allowed; a wrong key */
	snprintf(text, sizeof(text),
		 "relayq.listen { \"127.0.0.1:2525\", auth_file = \"%s/relayq.lua\" }\n"
		 "relayq.listen { \"127.0.0.1:2526\", trusted = { \"127.0.0.1\" },\n"
		 "  tls_cert = \"%s/tests/fixtures/tls/server.pem\",\n"
		 "  tls_key = \"%s/tests/fixtures/tls/wrongname.key\" }\n",
		 dir, RQ_SOURCE_ROOT, RQ_SOURCE_ROOT);
	c = load(text, &d);
	assert_null(c);
	assert_true(has_problem(&d, 1, false, "AUTH is only offered over TLS"));
	assert_true(has_problem(&d, 2, false, "cannot load key"));
}

static void reload_keeps_old_on_error(void **state)
{
	(void)state;
	const char *path = write_file("reload.lua", "relayq.config { queue = 'one' }\n");
	char p[512];
	snprintf(p, sizeof(p), "%s", path);
	struct rq_config_diag d;
	rq_config_diag_init(&d, p);
	struct rq_config *cur = rq_config_lua_load(p, 0, &d);
	assert_non_null(cur);
	struct rq_config *before = cur;
	write_file("reload.lua", "relayq.config { queue = 'two' \n");
	rq_config_diag_init(&d, p);
	assert_int_equal(rq_config_lua_reload(&cur, p, &d), -1);
	assert_ptr_equal(cur, before);
	assert_string_equal(cur->queues[0], "one");
	assert_true(d.errors > 0);
	write_file("reload.lua", "relayq.config { queue = 'three' }\n");
	rq_config_diag_init(&d, p);
	assert_int_equal(rq_config_lua_reload(&cur, p, &d), 0);
	assert_string_equal(cur->queues[0], "three");
	rq_config_destroy(cur);
}

/* ---- the key table, straight through rq_config_apply (no Lua) ---- */

static struct rq_config_value vnum(double n)
{
	return (struct rq_config_value){.type = RQ_CONFIG_NUMBER, .num = n};
}

static struct rq_config_value vstr(const char *s)
{
	return (struct rq_config_value){.type = RQ_CONFIG_STRING, .str = s,
					.len = strlen(s)};
}

static struct rq_config_value vbool(bool b)
{
	return (struct rq_config_value){.type = RQ_CONFIG_BOOL, .b = b};
}

static const struct rq_config_value vtable = {.type = RQ_CONFIG_TABLE};

/* Applies one key and expects it to fail with exactly msg. */
static void apply_fails(struct rq_config *c, enum rq_config_section sec,
			const char *key, struct rq_config_value v, const char *msg)
{
	struct rq_config_diag d;
	rq_config_diag_init(&d, "t");
	assert_int_equal(rq_config_apply(c, sec, key, &v, 7, &d), -1);
	assert_int_equal(d.errors, 1);
	if (strcmp(d.items[0].msg, msg) != 0)
		fprintf(stderr, "key %s: got \"%s\"\n", key, d.items[0].msg);
	assert_string_equal(d.items[0].msg, msg);
	assert_int_equal(d.items[0].line, 7);
}

static void apply_ok(struct rq_config *c, enum rq_config_section sec,
		     const char *key, struct rq_config_value v)
{
	struct rq_config_diag d;
	rq_config_diag_init(&d, "t");
	int r = rq_config_apply(c, sec, key, &v, 1, &d);
	if (r != 0)
		rq_config_diag_print(&d, stderr);
	assert_int_equal(r, 0);
	assert_int_equal(d.errors, 0);
}

static void key_table_types(void **state)
{
	(void)state;
	struct rq_config *c = rq_config_create();
	assert_non_null(c);
	const enum rq_config_section S = RQ_CONFIG_SEC_CONFIG;

	/* int */
	apply_ok(c, S, "connections", vnum(7));
	assert_int_equal(c->connections, 7);
	apply_fails(c, S, "connections", vnum(100001),
		    "connections: 100001 is out of range (1 to 100000)");
	apply_fails(c, S, "batch", vnum(1.5), "batch: expected an integer, got 1.5");
	apply_fails(c, S, "batch", vstr("1"), "batch: expected a number, got a string");
	assert_int_equal(c->connections, 7);
	/* long */
	apply_ok(c, S, "events_cap", vnum(0));
	assert_int_equal(c->events_cap, 0);
	apply_fails(c, S, "events_cap", vnum(1e9),
		    "events_cap: 1e+09 is out of range (0 to 100000000)");
	/* bool */
	apply_ok(c, S, "bounce", vbool(true));
	assert_true(c->bounce);
	apply_fails(c, S, "tls_verify", vnum(1),
		    "tls_verify: expected a boolean, got a number");
	/* duration */
	apply_ok(c, S, "lease", vstr("2m"));
	assert_true(c->lease == 120);
	apply_ok(c, S, "timeouts.idle", vnum(0));
	assert_true(c->timeouts.idle == 0);
	apply_fails(c, S, "timeouts.rcpt", vnum(0), "timeouts.rcpt: 0s is out of range (1s to 1h)");
	apply_fails(c, S, "lease", vbool(true),
		    "lease: expected a duration (number or string), got a boolean");
	/* string */
	apply_ok(c, S, "redis_user", vstr("app"));
	assert_string_equal(c->redis_user, "app");
	apply_fails(c, S, "redis_password_env", vstr(""),
		    "redis_password_env: must be 1 to 255 bytes long");
	apply_ok(c, S, "auth.user", vstr("u"));
	assert_string_equal(c->auth_user, "u");
	/* table */
	apply_ok(c, S, "timeouts", vtable);
	apply_fails(c, S, "timeouts", vnum(5), "timeouts: expected a table, got a number");
	assert_false(c->auth);
	apply_ok(c, S, "auth", vtable);
	assert_true(c->auth);
	/* keys with their own checks */
	apply_ok(c, S, "tls", vstr("required"));
	assert_int_equal(c->tls, RQ_TLS_REQUIRED);
	apply_ok(c, S, "log_format", vstr("json"));
	assert_int_equal(c->log_format, RQ_LOG_JSON);
	apply_ok(c, S, "log_level", vstr("warn"));
	assert_int_equal(c->log_level, RQ_LOG_WARN);
	apply_ok(c, S, "relay", vstr("[smtp.example.com]:587"));
	assert_string_equal(c->relay_host, "smtp.example.com");
	assert_int_equal(c->relay_port, 587);
	assert_false(c->relay_mx);
	apply_ok(c, S, "metrics", vstr("127.0.0.1:9100"));
	assert_string_equal(c->metrics, "127.0.0.1:9100");
	apply_ok(c, S, "helo", vstr("mx.example.org"));
	assert_string_equal(c->helo, "mx.example.org");
	apply_ok(c, S, "queue", vtable);
	apply_ok(c, S, "queue[]", vstr("q.2"));
	assert_string_equal(c->queues[c->nqueues - 1], "q.2");
	apply_fails(c, S, "queue[]", vstr("q 3"),
		    "queue: \"q 3\" is not a queue name (1-64 of A-Z a-z 0-9 _ . : -)");

	/* relayq.backoff / expire: numbers, durations, a count */
	apply_ok(c, RQ_CONFIG_SEC_BACKOFF, "factor", vnum(3));
	assert_true(c->params.backoff.factor == 3);
	apply_fails(c, RQ_CONFIG_SEC_BACKOFF, "jitter", vnum(2),
		    "jitter: 2 is out of range (0 to 1)");
	apply_ok(c, RQ_CONFIG_SEC_EXPIRE, "max_attempts", vnum(9));
	assert_int_equal(c->params.expire.max_attempts, 9);
	apply_fails(c, RQ_CONFIG_SEC_EXPIRE, "max_age", vnum(30),
		    "max_age: 30s is out of range (1m to 366d)");

	/* a domain: its own keys mark what it sets */
	struct rq_config_diag d;
	rq_config_diag_init(&d, "t");
	assert_int_equal(rq_config_section_begin(c, RQ_CONFIG_SEC_DOMAIN, "Example.COM",
						 3, &d), 0);
	const enum rq_config_section DS = RQ_CONFIG_SEC_DOMAIN;
	apply_ok(c, DS, "per_destination", vnum(4));
	apply_ok(c, DS, "backoff", vtable);
	apply_ok(c, DS, "backoff.first", vnum(60));
	apply_fails(c, DS, "recipients_per_transaction", vnum(0),
		    "recipients_per_transaction: 0 is out of range (1 to 100000)");
	const struct rq_config_domain *dom = rq_config_domain(c, "example.com");
	assert_non_null(dom);
	assert_true(dom->has_per_destination);
	assert_false(dom->has_recipients_per_transaction);
	assert_true(dom->has_backoff);
	assert_false(dom->has_expire);
	assert_int_equal(dom->set, RQ_CONFIG_SET_FIRST);
	struct rq_config_limits lim;
	rq_config_limits(c, "EXAMPLE.com", &lim);
	assert_int_equal(lim.per_destination, 4);
	struct rq_policy_params p;
	rq_config_params(c, "example.com", &p);
	assert_true(p.backoff.first == 60);
	assert_true(p.backoff.factor == 3);
	rq_config_destroy(c);
}

static void key_table_unknown_keys(void **state)
{
	(void)state;
	struct rq_config *c = rq_config_create();
	assert_non_null(c);
	apply_fails(c, RQ_CONFIG_SEC_CONFIG, "conections", vnum(1),
		    "unknown key conections in relayq.config");
	apply_fails(c, RQ_CONFIG_SEC_CONFIG, "[1]", vnum(1),
		    "unknown key [1] in relayq.config");
	apply_fails(c, RQ_CONFIG_SEC_CONFIG, "timeouts.rpct", vnum(1),
		    "unknown key timeouts.rpct (timeouts: connect, greeting, helo, mail, "
		    "rcpt, data, data_block, dot, quit, idle)");
	apply_fails(c, RQ_CONFIG_SEC_CONFIG, "auth.pass", vstr("x"),
		    "unknown key auth.pass (auth keys: user, password_file, "
		    "password_env, password, allow_plaintext)");
	apply_fails(c, RQ_CONFIG_SEC_BACKOFF, "fist", vnum(1),
		    "unknown key fist (backoff keys: first, factor, max, jitter)");
	apply_fails(c, RQ_CONFIG_SEC_EXPIRE, "age", vnum(1),
		    "unknown key age (expire keys: max_age, max_attempts)");
	struct rq_config_diag d;
	rq_config_diag_init(&d, "t");
	assert_int_equal(rq_config_section_begin(c, RQ_CONFIG_SEC_DOMAIN, "a.example",
						 1, &d), 0);
	apply_fails(c, RQ_CONFIG_SEC_DOMAIN, "connections", vnum(1),
		    "unknown key connections in relayq.on_domain(\"a.example\") (keys: "
		    "per_destination, messages_per_connection, "
		    "recipients_per_transaction, backoff, expire, on)");
	apply_fails(c, RQ_CONFIG_SEC_DOMAIN, "backoff.fist", vnum(1),
		    "unknown key backoff.fist (backoff keys: first, factor, max, jitter)");
	apply_fails(c, RQ_CONFIG_SEC_DOMAIN, "expire.x", vnum(1),
		    "unknown key expire.x (expire keys: max_age, max_attempts)");
	rq_config_destroy(c);
}

static void validate_domains(void **state)
{
	(void)state;
	struct rq_config *c = rq_config_create();
	assert_non_null(c);
	struct rq_config_diag d;
	rq_config_diag_init(&d, "t");
	assert_int_equal(rq_config_validate(c, &d), 0);
	assert_int_equal(rq_config_section_begin(c, RQ_CONFIG_SEC_DOMAIN, "b.example",
						 4, &d), 0);
	apply_ok(c, RQ_CONFIG_SEC_DOMAIN, "backoff.first", vstr("5h"));
	assert_int_equal(rq_config_validate(c, &d), -1);
	assert_int_equal(d.errors, 1);
	assert_int_equal(d.items[0].line, 4);
	assert_string_equal(d.items[0].msg,
			    "relayq.on_domain(\"b.example\"): backoff max is less than first");
	rq_config_destroy(c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(defaults),
		cmocka_unit_test(key_table_types),
		cmocka_unit_test(key_table_unknown_keys),
		cmocka_unit_test(validate_domains),
		cmocka_unit_test(every_key),
		cmocka_unit_test(relay_forms),
		cmocka_unit_test(durations),
		cmocka_unit_test(unknown_key_has_its_line),
		cmocka_unit_test(wrong_types_and_ranges),
		cmocka_unit_test(auth_sources),
		cmocka_unit_test(redis_url_and_password_sources),
		cmocka_unit_test(domains),
		cmocka_unit_test(lua_errors_and_env),
		cmocka_unit_test(check_output),
		cmocka_unit_test(example_config_checks),
		cmocka_unit_test(reload_keeps_old_on_error),
		cmocka_unit_test(listen_settings),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

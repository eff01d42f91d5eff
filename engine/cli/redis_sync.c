/* relayq CLI: the synchronous Redis connection (cli.h). */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "relayq/err.h"
#include "relayq/fnlib.h"
#include "relayq/queue_codec.h"
#include "relayq/secret.h"

#define CONNECT_TIMEOUT_S 5
#define COMMAND_TIMEOUT_S 60

void cli_target_clear(struct cli_target *t)
{
	rq_secret_free(t->password);
	memset(t, 0, sizeof(*t));
}

/* t->shown: the target without its password. */
void cli_target_show(struct cli_target *t)
{
	if (t->unix_socket) {
		char *c = cli_clean_str(t->path, 200);
		if (t->db)
			snprintf(t->shown, sizeof(t->shown), "unix:%s?db=%d", c, t->db);
		else
			snprintf(t->shown, sizeof(t->shown), "unix:%s", c);
		free(c);
		return;
	}
	char *user = cli_clean_str(t->user, 100);
	bool v6 = strchr(t->host, ':') != NULL;
	snprintf(t->shown, sizeof(t->shown), "redis://%s%s%s%s%s%s:%d/%d",
			user, t->password ? ":***" : "",
			(t->user[0] || t->password) ? "@" : "",
			v6 ? "[" : "", t->host, v6 ? "]" : "", t->port, t->db);
	free(user);
}

/* A URL for messages when it does not parse: redis_url.h's redaction, which
 * shows nothing that could be a password. */
void cli_redact_raw(const char *url, char *out, size_t len)
{
	char red[1200];
	rq_redis_url_redact(url, red, sizeof(red));
	char *c = cli_clean_str(red, 120);
	snprintf(out, len, "%s", c);
	free(c);
}

/* Parses a Redis URL with the parser relayqd uses (rq_redis_url_parse:
 * redis://[user:password@]host[:port][/db] or unix:/path[?db=N]). */
int cli_target_parse(struct cli_target *t, const char *url, char *err, size_t errlen)
{
	struct rq_redis_url u;
	int rc = -1;
	memset(t, 0, sizeof(*t));
	if (rq_redis_url_parse(url, &u, err, errlen) != 0)
		goto cleanup;
	t->unix_socket = u.is_unix;
	t->port = u.port;
	t->db = u.db;
	snprintf(t->path, sizeof(t->path), "%s", u.path);
	snprintf(t->host, sizeof(t->host), "%s", u.host);
	snprintf(t->user, sizeof(t->user), "%s", u.user);
	if (u.has_password && !(t->password = strdup(u.password))) {
		rq_err_set(err, errlen, "out of memory");
		goto cleanup;
	}
	cli_target_show(t);
	rc = 0;
cleanup:
	rq_redis_url_wipe(&u);
	return rc;
}

/* First line of a file, without the line end. */

/* Prints a Redis error reply: the function's sentence when it is one. */
void cli_print_redis_error(const struct cli *cli, const redisReply *r)
{
	const char *s = r->str ? r->str : "";
	size_t len = r->str ? r->len : 0;
	const char *mark = "relayq: ";
	const char *hit = len > 0 ? strstr(s, mark) : NULL;
	if (hit && (size_t)(hit - s) <= 4) {
		const char *msg = hit + strlen(mark);
		char *c = cli_clean(msg, len - (size_t)(msg - s), 500);
		cli_errorf("%s", c);
		free(c);
		return;
	}
	char *c = cli_clean(s, len, 500);
	cli_errorf("Redis at %s: %s", cli->t.shown, c);
	free(c);
}

/* Sends one command. Returns the reply, or NULL after printing an error
 * (connection problem, or an error reply). */
redisReply *cli_command(struct cli *cli, int argc, const char **argv, const size_t *lens)
{
	redisReply *r = redisCommandArgv(cli->rc, argc, argv, lens);
	if (!r) {
		cli_errorf("lost the connection to Redis at %s: %s", cli->t.shown,
				cli->rc->errstr[0] ? cli->rc->errstr : "unknown error");
		return NULL;
	}
	if (r->type == REDIS_REPLY_ERROR) {
		cli_print_redis_error(cli, r);
		freeReplyObject(r);
		return NULL;
	}
	return r;
}

/* FCALL name 1 prefix args... */
redisReply *cli_fcall(struct cli *cli, const char *name, int nargs,
		const char **args, const size_t *lens)
{
	const char **argv = calloc((size_t)nargs + 4, sizeof(*argv));
	size_t *argl = calloc((size_t)nargs + 4, sizeof(*argl));
	redisReply *r = NULL;
	if (!argv || !argl) {
		cli_errorf("out of memory");
		goto cleanup;
	}
	argv[0] = "FCALL";
	argv[1] = name;
	argv[2] = "1";
	argv[3] = cli->prefix;
	for (int i = 0; i < 4; i++)
		argl[i] = strlen(argv[i]);
	for (int i = 0; i < nargs; i++) {
		argv[4 + i] = args[i];
		argl[4 + i] = lens ? lens[i] : strlen(args[i]);
	}
	r = cli_command(cli, nargs + 4, argv, argl);
cleanup:
	free(argv);
	free(argl);
	return r;
}

/* FUNCTION LOAD REPLACE of the embedded library when Redis has none or an
 * older one: the same check as relayqd's (rq_queue_version_check). */
static int ensure_functions(struct cli *cli)
{
	redisReply *r = redisCommand(cli->rc, "FCALL relayq_version 0");
	if (!r) {
		cli_errorf("lost the connection to Redis at %s: %s", cli->t.shown,
			   cli->rc->errstr);
		return -1;
	}
	enum rq_queue_version_check v = rq_queue_version_check(r, rq_fnlib_version());
	if (v == RQ_QUEUE_VERSION_ERROR) {
		if (r->type == REDIS_REPLY_ERROR)
			cli_print_redis_error(cli, r);
		else
			cli_errorf("Redis at %s: unexpected reply to FCALL relayq_version",
				   cli->t.shown);
	}
	freeReplyObject(r);
	if (v != RQ_QUEUE_VERSION_LOAD)
		return v == RQ_QUEUE_VERSION_OK ? 0 : -1;
	const char *argv[] = {"FUNCTION", "LOAD", "REPLACE", rq_fnlib_source};
	size_t lens[] = {8, 4, 7, rq_fnlib_source_len};
	r = redisCommandArgv(cli->rc, 4, argv, lens);
	if (!r || r->type == REDIS_REPLY_ERROR) {
		char *c = r ? cli_clean(r->str, r->len, 300) : cli_clean_str(cli->rc->errstr, 300);
		cli_errorf("cannot load the relayq functions into Redis at %s: %s", cli->t.shown, c);
		free(c);
		freeReplyObject(r);
		return -1;
	}
	freeReplyObject(r);
	return 0;
}

/* Connects, authenticates, selects the database, loads the functions. */
int cli_redis_connect(struct cli *cli)
{
	struct timeval tv = {CONNECT_TIMEOUT_S, 0};
	const struct cli_target *t = &cli->t;
	cli->rc = t->unix_socket ? redisConnectUnixWithTimeout(t->path, tv) :
			redisConnectWithTimeout(t->host, t->port, tv);
	if (!cli->rc || cli->rc->err) {
		cli_errorf("cannot connect to Redis at %s: %s", t->shown,
				cli->rc ? cli->rc->errstr : "out of memory");
		return -1;
	}
	struct timeval ctv = {COMMAND_TIMEOUT_S, 0};
	redisSetTimeout(cli->rc, ctv);
	if (t->password) {
		const char *argv[3] = {"AUTH"};
		size_t lens[3] = {4};
		int n = 1;
		if (t->user[0]) {
			argv[n] = t->user;
			lens[n++] = strlen(t->user);
		}
		argv[n] = t->password;
		lens[n++] = strlen(t->password);
		redisReply *r = redisCommandArgv(cli->rc, n, argv, lens);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			/* The reply never echoes the password; clean it anyway. */
			char *c = r ? cli_clean(r->str, r->len, 200) : cli_clean_str(cli->rc->errstr, 200);
			cli_errorf("Redis at %s refused authentication: %s", t->shown, c);
			free(c);
			freeReplyObject(r);
			return -1;
		}
		freeReplyObject(r);
	}
	if (t->db) {
		redisReply *r = redisCommand(cli->rc, "SELECT %d", t->db);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			char *c = r ? cli_clean(r->str, r->len, 200) : cli_clean_str(cli->rc->errstr, 200);
			cli_errorf("Redis at %s: cannot select database %d: %s", t->shown, t->db, c);
			free(c);
			freeReplyObject(r);
			return -1;
		}
		freeReplyObject(r);
	}
	return ensure_functions(cli);
}

void cli_redis_close(struct cli *cli)
{
	if (cli->rc)
		redisFree(cli->rc);
	cli->rc = NULL;
	cli_target_clear(&cli->t);
}

/* Redis time in ms; 0 after printing an error. */
int64_t cli_redis_now(struct cli *cli)
{
	const char *argv[] = {"TIME"};
	redisReply *r = cli_command(cli, 1, argv, NULL);
	int64_t now = 0;
	if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
			r->element[0]->type == REDIS_REPLY_STRING &&
			r->element[1]->type == REDIS_REPLY_STRING)
		now = strtoll(r->element[0]->str, NULL, 10) * 1000 +
			strtoll(r->element[1]->str, NULL, 10) / 1000;
	else if (r)
		cli_errorf("Redis at %s: unexpected reply to TIME", cli->t.shown);
	freeReplyObject(r);
	return now;
}

/*
 * relayq: the command-line client. Talks to Redis synchronously through the
 * relayq Redis Functions (lua/redis/README.md), loading the embedded library
 * when the server has none or an older one.
 *
 * Exit codes: 0 ok, 1 operation error, 2 usage error. Errors are one line on
 * stderr starting "relayq: ". A Redis password never appears in any output.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "relayq/cli_explain.h"
#include "relayq/config.h"
#include "relayq/config_lua.h"
#include "relayq/fnlib.h"
#include "relayq/json.h"
#include "relayq/queue.h"

#define EXIT_OPERATION 1
#define EXIT_USAGE 2

#define DEFAULT_REDIS "redis://127.0.0.1:6379/0"
#define DEFAULT_QUEUE "default"
#define QUEUE_MAX 64
#define MESSAGE_MAX ((size_t)512 * 1024 * 1024)   /* Redis' proto-max-bulk-len */
#define PASSWORD_MAX 4096
#define LIST_PAGE 1000
#define CONNECT_TIMEOUT_S 5
#define COMMAND_TIMEOUT_S 60

/* Where to reach Redis, parsed from a URL. */
struct target {
	bool unix_socket;
	char host[256];
	int port;
	char path[1024];
	int db;
	char user[256];
	char *password;            /* secret: never printed; freed zeroed */
	char shown[1400];          /* the URL with the password redacted */
};

struct cli {
	const char *cmd;           /* the command name, for messages */
	const char *config_path;
	const char *redis_url;     /* --redis */
	const char *queue;         /* --queue */
	const char *password_file; /* --redis-password-file */
	char *config_redis;        /* from -c (may hold a password: wiped) */
	char *config_queue;
	char *config_user;         /* -c: redis_user */
	char *config_password_file;    /* -c: redis_password_file */
	char *config_password_env;     /* -c: redis_password_env */
	struct target t;
	char qname[QUEUE_MAX + 1];
	char prefix[QUEUE_MAX + 16];   /* relayq:{<queue>} */
	redisContext *rc;
};

/* ---- messages ---- */

static void errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void errorf(const char *fmt, ...)
{
	va_list ap;
	fflush(stdout);
	fputs("relayq: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* Copies untrusted text for a terminal: control bytes become escapes
 * (\r, \n, \t, \xNN), and so do the UTF-8 encoded C1 controls U+0080 to
 * U+009F (bytes C2 80 .. C2 9F, shown as \xc2\xNN: some terminals act on
 * them as on ESC sequences); at most max display characters (0: no
 * limit), "..." when cut. Returns a malloc'd string (never NULL: aborts on OOM). */
static char *clean(const char *s, size_t len, size_t max)
{
	char *out = malloc(len * 4 + 4);
	if (!out) {
		fputs("relayq: out of memory\n", stderr);
		exit(EXIT_OPERATION);
	}
	size_t n = 0, shown = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (max && shown >= max) {
			memcpy(out + n, "...", 3);
			n += 3;
			break;
		}
		if (c == 0xc2 && i + 1 < len && (unsigned char)s[i + 1] >= 0x80 &&
		    (unsigned char)s[i + 1] <= 0x9f) {
			n += (size_t)sprintf(out + n, "\\xc2\\x%02x", (unsigned char)s[i + 1]);
			shown += 8;
			i++;
			continue;
		}
		if (c < 0x20 || c == 0x7f) {
			const char *e = c == '\r' ? "\\r" : c == '\n' ? "\\n" : c == '\t' ? "\\t" : NULL;
			if (e) {
				memcpy(out + n, e, 2);
				n += 2;
				shown += 2;
			} else {
				n += (size_t)sprintf(out + n, "\\x%02x", c);
				shown += 4;
			}
			continue;
		}
		out[n++] = (char)c;
		if ((c & 0xc0) != 0x80)
			shown++;
	}
	out[n] = '\0';
	return out;
}

static char *clean_str(const char *s, size_t max)
{
	return clean(s ? s : "", s ? strlen(s) : 0, max);
}

/* Display width: UTF-8 lead bytes. */
static size_t width(const char *s)
{
	size_t w = 0;
	for (; *s; s++)
		if (((unsigned char)*s & 0xc0) != 0x80)
			w++;
	return w;
}

static void put_padded(const char *s, size_t w, bool last)
{
	fputs(s, stdout);
	if (last)
		return;
	for (size_t i = width(s); i < w + 2; i++)
		fputc(' ', stdout);
}

/* "5s", "5m", "2h", "3d" (rounded to the nearest unit) */
static void fmt_duration(char *out, size_t len, int64_t ms)
{
	int64_t s = ms < 0 ? 0 : (ms + 500) / 1000;
	if (s < 60)
		snprintf(out, len, "%" PRId64 "s", s);
	else if (s < 3600 - 30)
		snprintf(out, len, "%" PRId64 "m", (s + 30) / 60);
	else if (s < 86400 - 1800)
		snprintf(out, len, "%" PRId64 "h", (s + 1800) / 3600);
	else
		snprintf(out, len, "%" PRId64 "d", (s + 43200) / 86400);
}

/* "2026-11-28 12:00:00 UTC" */
static void fmt_time(char *out, size_t len, int64_t ms)
{
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	if (ms <= 0 || !gmtime_r(&t, &tm) ||
			strftime(out, len, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
		snprintf(out, len, "-");
}

/* ---- options ---- */

enum {
	OPT_REDIS = 1000,
	OPT_QUEUE,
	OPT_PASSWORD_FILE,
	OPT_HELP,
	OPT_VERSION,
	OPT_JSON,
	OPT_FROM,
	OPT_TO,
	OPT_DELAY,
	OPT_KEY,
	OPT_META,
	OPT_STATE,
	OPT_ALL,
	OPT_DEAD,
};

#define COMMON_OPTIONS \
	{"config", required_argument, NULL, 'c'}, \
	{"redis", required_argument, NULL, OPT_REDIS}, \
	{"queue", required_argument, NULL, OPT_QUEUE}, \
	{"redis-password-file", required_argument, NULL, OPT_PASSWORD_FILE}, \
	{"help", no_argument, NULL, OPT_HELP}

static const char *const main_usage =
	"Usage: relayq [OPTIONS] COMMAND [ARGS]\n"
	"\n"
	"Inspect and manage a relayq mail queue in Redis.\n"
	"\n"
	"Options (also accepted after the command):\n"
	"  -c, --config FILE            read redis and queue from relayqd's config\n"
	"      --redis URL              redis://[user@]host:port/db or unix:/path\n"
	"                               (default $RELAYQ_REDIS, else\n"
	"                               " DEFAULT_REDIS ")\n"
	"      --redis-password-file F  Redis password from a file (first line);\n"
	"                               or $RELAYQ_REDIS_PASSWORD, or in the URL of\n"
	"                               $RELAYQ_REDIS (never on the command line)\n"
	"      --queue NAME             queue name (default \"" DEFAULT_QUEUE "\")\n"
	"      --help                   this help; COMMAND --help for a command\n"
	"      --version                print the version\n"
	"\n"
	"Commands:\n"
	"  enqueue   put a message in the queue, print its id\n"
	"  list      one line per message (like mailq)\n"
	"  show      every field of one message and its recipients\n"
	"  stats     queue counts and counters\n"
	"  flush     make scheduled messages due now\n"
	"  requeue   move dead messages back to ready\n"
	"  hold      park messages\n"
	"  release   release held messages\n"
	"  delete    delete messages\n"
	"  tail      follow the events stream\n"
	"  explain   what the policy decides for a reply\n"
	"\n"
	"Exit status: 0 ok, 1 operation error, 2 usage error.\n";

/*
 * Runs getopt_long over a command's arguments; handles the common options.
 * Returns the command's option code, -1 at the end of options, or -2 when
 * the command must exit with *rc (error printed or help shown).
 */
static int next_option(struct cli *cli, int argc, char **argv,
		const struct option *opts, const char *usage, int *rc)
{
	for (;;) {
		int longidx = -1;
		int o = getopt_long(argc, argv, "c:", opts, &longidx);
		switch (o) {
		case 'c':
			cli->config_path = optarg;
			continue;
		case OPT_REDIS:
			cli->redis_url = optarg;
			continue;
		case OPT_QUEUE:
			cli->queue = optarg;
			continue;
		case OPT_PASSWORD_FILE:
			cli->password_file = optarg;
			continue;
		case OPT_HELP:
			fputs(usage, stdout);
			*rc = 0;
			return -2;
		case '?': {
			const char *bad = optind > 0 && optind <= argc ? argv[optind - 1] : "";
			char *c = clean(bad, strcspn(bad, "="), 60);
			if (optopt == 'c' || optopt >= OPT_REDIS)
				errorf("%s: option '%s' needs a value (see relayq %s --help)",
						cli->cmd, c, cli->cmd);
			else if (optopt)
				errorf("%s: unknown option '-%c' (see relayq %s --help)",
						cli->cmd, isprint(optopt) ? optopt : '?', cli->cmd);
			else
				errorf("%s: unknown option '%s' (see relayq %s --help)",
						cli->cmd, c, cli->cmd);
			free(c);
			*rc = EXIT_USAGE;
			return -2;
		}
		default:
			return o;
		}
	}
}

static void start_options(void)
{
	optind = 0;                 /* glibc: full re-initialisation */
	opterr = 0;
}

/* ---- Redis target ---- */

static void target_clear(struct target *t)
{
	if (t->password) {
		explicit_bzero(t->password, strlen(t->password));
		free(t->password);
	}
	memset(t, 0, sizeof(*t));
}

/* t->shown: the target without its password. */
static void target_show(struct target *t)
{
	if (t->unix_socket) {
		char *c = clean_str(t->path, 200);
		if (t->db)
			snprintf(t->shown, sizeof(t->shown), "unix:%s?db=%d", c, t->db);
		else
			snprintf(t->shown, sizeof(t->shown), "unix:%s", c);
		free(c);
		return;
	}
	char *user = clean_str(t->user, 100);
	bool v6 = strchr(t->host, ':') != NULL;
	snprintf(t->shown, sizeof(t->shown), "redis://%s%s%s%s%s%s:%d/%d",
			user, t->password ? ":***" : "",
			(t->user[0] || t->password) ? "@" : "",
			v6 ? "[" : "", t->host, v6 ? "]" : "", t->port, t->db);
	free(user);
}

/* A URL for messages when it does not parse: queue.h's redaction, which
 * shows nothing that could be a password. */
static void redact_raw(const char *url, char *out, size_t len)
{
	char red[1200];
	rq_queue_redact_url(url, red, sizeof(red));
	char *c = clean_str(red, 120);
	snprintf(out, len, "%s", c);
	free(c);
}

/* Parses a Redis URL with the parser relayqd uses (rq_queue_url_parse:
 * redis://[user:password@]host[:port][/db] or unix:/path[?db=N]). */
static int target_parse(struct target *t, const char *url, char *err, size_t errlen)
{
	struct rq_queue_url u;
	int rc = -1;
	memset(t, 0, sizeof(*t));
	if (rq_queue_url_parse(url, &u, err, errlen) != 0)
		goto cleanup;
	t->unix_socket = u.is_unix;
	t->port = u.port;
	t->db = u.db;
	snprintf(t->path, sizeof(t->path), "%s", u.path);
	snprintf(t->host, sizeof(t->host), "%s", u.host);
	snprintf(t->user, sizeof(t->user), "%s", u.user);
	if (u.has_password && !(t->password = strdup(u.password))) {
		snprintf(err, errlen, "out of memory");
		goto cleanup;
	}
	target_show(t);
	rc = 0;
cleanup:
	rq_queue_url_wipe(&u);
	return rc;
}

/* First line of a file, without the line end. */
static char *read_password_file(const char *path)
{
	char *buf = NULL;
	FILE *f = fopen(path, "r");
	if (!f) {
		errorf("cannot read --redis-password-file %s: %s", path, strerror(errno));
		return NULL;
	}
	buf = calloc(1, PASSWORD_MAX + 2);
	if (!buf || !fgets(buf, PASSWORD_MAX + 2, f)) {
		errorf("cannot read --redis-password-file %s: %s", path,
				buf ? "empty file" : "out of memory");
		goto error;
	}
	size_t n = strcspn(buf, "\r\n");
	if (n > PASSWORD_MAX) {
		errorf("--redis-password-file %s: first line is too long", path);
		goto error;
	}
	buf[n] = '\0';
	fclose(f);
	return buf;
error:
	if (buf) {
		explicit_bzero(buf, PASSWORD_MAX + 2);
		free(buf);
	}
	fclose(f);
	return NULL;
}

static bool valid_queue(const char *q)
{
	size_t n = strlen(q);
	if (n == 0 || n > QUEUE_MAX)
		return false;
	for (; *q; q++)
		if (!isalnum((unsigned char)*q) && !strchr("_.:-", *q))
			return false;
	return true;
}

/* Reads redis and the first queue from relayqd's config file. */
static int load_config(struct cli *cli)
{
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, cli->config_path);
	struct rq_config *cfg = rq_config_load_flags(cli->config_path,
						     RQ_CONFIG_LOAD_NO_SMTP_SECRET, &diag);
	if (!cfg) {
		rq_config_diag_print(&diag, stderr);
		errorf("cannot load config %s", cli->config_path);
		return -1;
	}
	int rc = -1;
	if (cfg->redis && !(cli->config_redis = strdup(cfg->redis)))
		goto cleanup;
	if (cfg->nqueues > 0 && !(cli->config_queue = strdup(cfg->queues[0])))
		goto cleanup;
	if (cfg->redis_user && !(cli->config_user = strdup(cfg->redis_user)))
		goto cleanup;
	if (cfg->redis_password_file &&
	    !(cli->config_password_file = strdup(cfg->redis_password_file)))
		goto cleanup;
	if (cfg->redis_password_env &&
	    !(cli->config_password_env = strdup(cfg->redis_password_env)))
		goto cleanup;
	rc = 0;
cleanup:
	if (rc < 0)
		errorf("out of memory");
	rq_config_destroy(cfg);
	return rc;
}

/* Resolves URL, password and queue (options > config > environment >
 * defaults). Returns 0, or an exit code. */
static int cli_resolve(struct cli *cli)
{
	if (cli->config_path && load_config(cli) < 0)
		return EXIT_OPERATION;
	const char *url = cli->redis_url;
	if (!url)
		url = cli->config_redis;
	if (!url)
		url = getenv("RELAYQ_REDIS");
	if (!url || !*url)
		url = DEFAULT_REDIS;
	char err[200];
	if (target_parse(&cli->t, url, err, sizeof(err)) < 0) {
		char shown[200];
		redact_raw(url, shown, sizeof(shown));
		errorf("invalid Redis URL '%s': %s", shown, err);
		return EXIT_USAGE;
	}
	if (cli->t.password && url == cli->redis_url) {
		/* Other users see the command line (ps, /proc). */
		errorf("--redis %s: a password does not belong on the command line; "
				"use RELAYQ_REDIS_PASSWORD or --redis-password-file", cli->t.shown);
		return EXIT_USAGE;
	}
	/* the user and password sources of relayqd's config (-c), when the
	 * URL comes from it too */
	bool cfg_target = url == cli->config_redis && url;
	if (cfg_target && cli->config_user && !cli->t.user[0]) {
		snprintf(cli->t.user, sizeof(cli->t.user), "%s", cli->config_user);
		target_show(&cli->t);
	}
	const char *pw_file = cli->password_file;
	if (!pw_file && cfg_target && !cli->t.password)
		pw_file = cli->config_password_file;
	if (!pw_file && cfg_target && !cli->t.password && cli->config_password_env) {
		const char *env = getenv(cli->config_password_env);
		if (!env || !*env) {
			errorf("redis_password_env of %s: %s is not set", cli->config_path,
					cli->config_password_env);
			return EXIT_OPERATION;
		}
		if (!(cli->t.password = strdup(env))) {
			errorf("out of memory");
			return EXIT_OPERATION;
		}
		target_show(&cli->t);
	}
	if (pw_file) {
		char *pw = read_password_file(pw_file);
		if (!pw)
			return EXIT_OPERATION;
		if (cli->t.password) {
			explicit_bzero(cli->t.password, strlen(cli->t.password));
			free(cli->t.password);
		}
		cli->t.password = pw;
		target_show(&cli->t);
	} else if (!cli->t.password) {
		const char *env = getenv("RELAYQ_REDIS_PASSWORD");
		if (env && *env && !(cli->t.password = strdup(env))) {
			errorf("out of memory");
			return EXIT_OPERATION;
		}
	}
	const char *q = cli->queue ? cli->queue : cli->config_queue ? cli->config_queue : DEFAULT_QUEUE;
	if (!valid_queue(q)) {
		char *c = clean_str(q, 80);
		errorf("invalid queue name '%s': use 1-%d of A-Z a-z 0-9 _ . : -", c, QUEUE_MAX);
		free(c);
		return EXIT_USAGE;
	}
	snprintf(cli->qname, sizeof(cli->qname), "%s", q);
	snprintf(cli->prefix, sizeof(cli->prefix), "relayq:{%s}", q);
	return 0;
}

/* ---- Redis ---- */

/* Prints a Redis error reply: the function's sentence when it is one. */
static void print_redis_error(const struct cli *cli, const redisReply *r)
{
	const char *s = r->str ? r->str : "";
	size_t len = r->str ? r->len : 0;
	const char *mark = "relayq: ";
	const char *hit = len > 0 ? strstr(s, mark) : NULL;
	if (hit && (size_t)(hit - s) <= 4) {
		const char *msg = hit + strlen(mark);
		char *c = clean(msg, len - (size_t)(msg - s), 500);
		errorf("%s", c);
		free(c);
		return;
	}
	char *c = clean(s, len, 500);
	errorf("Redis at %s: %s", cli->t.shown, c);
	free(c);
}

/* Sends one command. Returns the reply, or NULL after printing an error
 * (connection problem, or an error reply). */
static redisReply *command(struct cli *cli, int argc, const char **argv, const size_t *lens)
{
	redisReply *r = redisCommandArgv(cli->rc, argc, argv, lens);
	if (!r) {
		errorf("lost the connection to Redis at %s: %s", cli->t.shown,
				cli->rc->errstr[0] ? cli->rc->errstr : "unknown error");
		return NULL;
	}
	if (r->type == REDIS_REPLY_ERROR) {
		print_redis_error(cli, r);
		freeReplyObject(r);
		return NULL;
	}
	return r;
}

/* FCALL name 1 prefix args... */
static redisReply *fcall(struct cli *cli, const char *name, int nargs,
		const char **args, const size_t *lens)
{
	const char **argv = calloc((size_t)nargs + 4, sizeof(*argv));
	size_t *argl = calloc((size_t)nargs + 4, sizeof(*argl));
	redisReply *r = NULL;
	if (!argv || !argl) {
		errorf("out of memory");
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
	r = command(cli, nargs + 4, argv, argl);
cleanup:
	free(argv);
	free(argl);
	return r;
}

/* FUNCTION LOAD REPLACE of the embedded library when Redis has none or an
 * older one. */
static int ensure_functions(struct cli *cli)
{
	int want = rq_fnlib_version();
	redisReply *r = redisCommand(cli->rc, "FCALL relayq_version 0");
	if (!r) {
		errorf("lost the connection to Redis at %s: %s", cli->t.shown, cli->rc->errstr);
		return -1;
	}
	bool load;
	if (r->type == REDIS_REPLY_INTEGER)
		load = want >= 0 && r->integer < want;
	else if (r->type == REDIS_REPLY_ERROR && r->str && strstr(r->str, "not found"))
		load = true;
	else if (r->type == REDIS_REPLY_ERROR) {
		print_redis_error(cli, r);
		freeReplyObject(r);
		return -1;
	} else
		load = true;
	freeReplyObject(r);
	if (!load)
		return 0;
	const char *argv[] = {"FUNCTION", "LOAD", "REPLACE", rq_fnlib_source};
	size_t lens[] = {8, 4, 7, rq_fnlib_source_len};
	r = redisCommandArgv(cli->rc, 4, argv, lens);
	if (!r || r->type == REDIS_REPLY_ERROR) {
		char *c = r ? clean(r->str, r->len, 300) : clean_str(cli->rc->errstr, 300);
		errorf("cannot load the relayq functions into Redis at %s: %s", cli->t.shown, c);
		free(c);
		freeReplyObject(r);
		return -1;
	}
	freeReplyObject(r);
	return 0;
}

/* Connects, authenticates, selects the database, loads the functions. */
static int cli_connect(struct cli *cli)
{
	struct timeval tv = {CONNECT_TIMEOUT_S, 0};
	const struct target *t = &cli->t;
	cli->rc = t->unix_socket ? redisConnectUnixWithTimeout(t->path, tv) :
			redisConnectWithTimeout(t->host, t->port, tv);
	if (!cli->rc || cli->rc->err) {
		errorf("cannot connect to Redis at %s: %s", t->shown,
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
			char *c = r ? clean(r->str, r->len, 200) : clean_str(cli->rc->errstr, 200);
			errorf("Redis at %s refused authentication: %s", t->shown, c);
			free(c);
			freeReplyObject(r);
			return -1;
		}
		freeReplyObject(r);
	}
	if (t->db) {
		redisReply *r = redisCommand(cli->rc, "SELECT %d", t->db);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			char *c = r ? clean(r->str, r->len, 200) : clean_str(cli->rc->errstr, 200);
			errorf("Redis at %s: cannot select database %d: %s", t->shown, t->db, c);
			free(c);
			freeReplyObject(r);
			return -1;
		}
		freeReplyObject(r);
	}
	return ensure_functions(cli);
}

static int cli_open(struct cli *cli)
{
	int rc = cli_resolve(cli);
	if (rc)
		return rc;
	return cli_connect(cli) < 0 ? EXIT_OPERATION : 0;
}

static void cli_close(struct cli *cli)
{
	if (cli->rc)
		redisFree(cli->rc);
	cli->rc = NULL;
	target_clear(&cli->t);
	if (cli->config_redis)
		explicit_bzero(cli->config_redis, strlen(cli->config_redis));
	free(cli->config_redis);
	free(cli->config_queue);
	free(cli->config_user);
	free(cli->config_password_file);
	free(cli->config_password_env);
	cli->config_redis = cli->config_queue = NULL;
	cli->config_user = cli->config_password_file = cli->config_password_env = NULL;
}

/* Redis time in ms; 0 after printing an error. */
static int64_t redis_now(struct cli *cli)
{
	const char *argv[] = {"TIME"};
	redisReply *r = command(cli, 1, argv, NULL);
	int64_t now = 0;
	if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
			r->element[0]->type == REDIS_REPLY_STRING &&
			r->element[1]->type == REDIS_REPLY_STRING)
		now = strtoll(r->element[0]->str, NULL, 10) * 1000 +
			strtoll(r->element[1]->str, NULL, 10) / 1000;
	else if (r)
		errorf("Redis at %s: unexpected reply to TIME", cli->t.shown);
	freeReplyObject(r);
	return now;
}

/* Parses a JSON reply of a function (lax about UTF-8: Redis passes bytes). */
static struct rq_json *parse_reply_json(const redisReply *r, const char *what)
{
	if (r->type != REDIS_REPLY_STRING) {
		errorf("unexpected reply from %s (not a string)", what);
		return NULL;
	}
	char err[160];
	struct rq_json *v = rq_json_parse(r->str, r->len, RQ_JSON_LAX_UTF8, err, sizeof(err));
	if (!v)
		errorf("unexpected reply from %s: %s", what, err);
	else if (v->type != RQ_JSON_OBJECT) {
		errorf("unexpected reply from %s: not a JSON object", what);
		rq_json_free(v);
		v = NULL;
	}
	return v;
}

/* Writes v as one compact JSON line. */
static void print_json_line(const struct rq_json *v)
{
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_value(&b, v);
	if (rq_json_buf_ok(&b))
		printf("%s\n", b.data);
	rq_json_buf_finish(&b);
}

static int64_t field_int(const struct rq_json *v, const char *key, int64_t dflt)
{
	int64_t i;
	return rq_json_get_int(v, key, true, &i) ? i : dflt;
}

/* Text of a field for humans: strings cleaned, numbers and JSON written. */
static char *field_text(const struct rq_json *v, size_t max)
{
	if (!v || v->type == RQ_JSON_NULL)
		return clean_str("", 0);
	if (v->type == RQ_JSON_STRING)
		return clean(v->str, v->len, max);
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_value(&b, v);
	char *s = clean(b.data ? b.data : "", b.len, max);
	rq_json_buf_finish(&b);
	return s;
}

/* "450 4.2.0 Greylisted" from a message's last_* or a recipient's fields. */
static char *reply_text(const struct rq_json *v, const char *code_key,
		const char *enh_key, const char *text_key, size_t max)
{
	int64_t code = field_int(v, code_key, 0);
	const char *enh = rq_json_get_str(v, enh_key);
	const struct rq_json *text = rq_json_get(v, text_key);
	char head[64] = "";
	if (code > 0)
		snprintf(head, sizeof(head), "%" PRId64, code);
	if (enh && *enh && strlen(enh) < 20)
		snprintf(head + strlen(head), sizeof(head) - strlen(head), "%s%s",
				head[0] ? " " : "", enh);
	char *t = rq_json_is(text, RQ_JSON_STRING) ? clean(text->str, text->len, max) : clean_str("", 0);
	size_t n = strlen(head) + strlen(t) + 2;
	char *out = malloc(n);
	if (!out) {
		free(t);
		return clean_str("", 0);
	}
	snprintf(out, n, "%s%s%s", head, head[0] && t[0] ? " " : "", t);
	free(t);
	return out;
}

/* A JSON array of strings as "a@x, b@y"; v may be a JSON text too. */
static char *address_list(const struct rq_json *v, size_t *count, size_t max_items)
{
	struct rq_json *parsed = NULL;
	if (rq_json_is(v, RQ_JSON_STRING)) {
		parsed = rq_json_parse(v->str, v->len, RQ_JSON_LAX_UTF8, NULL, 0);
		v = parsed;
	}
	struct rq_json_buf b;   /* used as a plain growing buffer */
	rq_json_buf_init(&b);
	size_t n = 0;
	if (rq_json_is(v, RQ_JSON_ARRAY)) {
		for (const struct rq_json *c = v->child; c; c = c->next, n++) {
			if (max_items && n >= max_items)
				continue;
			char *s = field_text(c, 80);
			if (n)
				rq_json_buf_raw(&b, ",", 1);
			rq_json_buf_raw(&b, s, strlen(s));
			free(s);
		}
	}
	if (max_items && n > max_items) {
		char more[32];
		snprintf(more, sizeof(more), ",+%zu", n - max_items);
		rq_json_buf_raw(&b, more, strlen(more));
	}
	if (count)
		*count = n;
	rq_json_free(parsed);
	char *s = rq_json_buf_take(&b, NULL);
	return s ? s : clean_str("", 0);
}

/* ---- enqueue ---- */

static const char *const enqueue_usage =
	"Usage: relayq enqueue --from ADDR --to ADDR [--to ADDR ...] [--delay SECS]\n"
	"                      [--key KEY] [--meta JSON] [FILE|-]\n"
	"\n"
	"Puts the message read from FILE (default: standard input) in the queue\n"
	"and prints its id.\n"
	"\n"
	"  --from ADDR    envelope sender ('' for the null sender)\n"
	"  --to ADDR      a recipient (repeat for more)\n"
	"  --delay SECS   first attempt after this long (seconds, or 30s 5m 2h 1d)\n"
	"  --key KEY      idempotency key: the same key returns the same id\n"
	"  --meta JSON    a JSON object carried with the message into events\n";

/* Seconds from "90", "1.5", "30s", "5m", "2h", "1d"; -1 when invalid. */
static double parse_delay(const char *s)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (end == s || errno || !isfinite(v) || v < 0 || !isdigit((unsigned char)s[0]))
		return -1;
	double mult = 1;
	if (*end) {
		if (end[1])
			return -1;
		switch (*end) {
		case 's': mult = 1; break;
		case 'm': mult = 60; break;
		case 'h': mult = 3600; break;
		case 'd': mult = 86400; break;
		default: return -1;
		}
	}
	return v * mult;
}

static char *read_all(FILE *f, size_t *len)
{
	size_t cap = 65536, n = 0;
	char *buf = malloc(cap);
	if (!buf)
		return NULL;
	for (;;) {
		if (n == cap) {
			if (cap >= MESSAGE_MAX) {
				errno = EFBIG;
				free(buf);
				return NULL;
			}
			char *nb = realloc(buf, cap * 2);
			if (!nb) {
				free(buf);
				return NULL;
			}
			buf = nb;
			cap *= 2;
		}
		size_t got = fread(buf + n, 1, cap - n, f);
		n += got;
		if (got == 0) {
			if (ferror(f)) {
				free(buf);
				return NULL;
			}
			break;
		}
	}
	*len = n;
	return buf;
}

static int cmd_enqueue(struct cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"from", required_argument, NULL, OPT_FROM},
		{"to", required_argument, NULL, OPT_TO},
		{"delay", required_argument, NULL, OPT_DELAY},
		{"key", required_argument, NULL, OPT_KEY},
		{"meta", required_argument, NULL, OPT_META},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	int rc = 0;
	const char *from = NULL, *key = NULL, *meta_text = NULL;
	const char **to = calloc((size_t)argc, sizeof(*to));
	size_t nto = 0;
	double delay = -1;
	struct rq_json *meta = NULL;
	char *body = NULL;
	size_t body_len = 0;
	struct rq_json_buf env;
	redisReply *r = NULL;
	rq_json_buf_init(&env);
	if (!to) {
		errorf("out of memory");
		return EXIT_OPERATION;
	}
	start_options();
	int o;
	while ((o = next_option(cli, argc, argv, opts, enqueue_usage, &rc)) != -1) {
		switch (o) {
		case -2:
			goto cleanup;
		case OPT_FROM:
			from = optarg;
			break;
		case OPT_TO:
			to[nto++] = optarg;
			break;
		case OPT_DELAY:
			delay = parse_delay(optarg);
			if (delay < 0) {
				char *c = clean_str(optarg, 40);
				errorf("enqueue: invalid --delay '%s' (seconds, or like 30s 5m 2h 1d)", c);
				free(c);
				rc = EXIT_USAGE;
				goto cleanup;
			}
			break;
		case OPT_KEY:
			key = optarg;
			break;
		case OPT_META:
			meta_text = optarg;
			break;
		}
	}
	if (!from) {
		errorf("enqueue: --from is required (use --from '' for the null sender)");
		rc = EXIT_USAGE;
		goto cleanup;
	}
	if (nto == 0) {
		errorf("enqueue: at least one --to is required");
		rc = EXIT_USAGE;
		goto cleanup;
	}
	if (argc - optind > 1) {
		errorf("enqueue: one message FILE at most");
		rc = EXIT_USAGE;
		goto cleanup;
	}
	if (meta_text) {
		char err[160];
		meta = rq_json_parse(meta_text, strlen(meta_text), 0, err, sizeof(err));
		if (!meta) {
			errorf("enqueue: --meta is not valid JSON: %s", err);
			rc = EXIT_USAGE;
			goto cleanup;
		}
		if (meta->type != RQ_JSON_OBJECT) {
			errorf("enqueue: --meta must be a JSON object, not %s %s",
					meta->type == RQ_JSON_ARRAY ? "an" : "a",
					rq_json_type_name(meta->type));
			rc = EXIT_USAGE;
			goto cleanup;
		}
	}
	const char *file = optind < argc ? argv[optind] : "-";
	if (strcmp(file, "-") == 0) {
		body = read_all(stdin, &body_len);
		if (!body) {
			errorf("enqueue: cannot read the message from standard input: %s", strerror(errno));
			rc = EXIT_OPERATION;
			goto cleanup;
		}
	} else {
		FILE *f = fopen(file, "rb");
		if (f) {
			body = read_all(f, &body_len);
			if (!body)
				errorf("enqueue: cannot read %s: %s", file, strerror(errno));
			fclose(f);
		} else {
			errorf("enqueue: cannot open %s: %s", file, strerror(errno));
		}
		if (!body) {
			rc = EXIT_OPERATION;
			goto cleanup;
		}
	}
	/* The envelope, escaped by the JSON writer. */
	rq_json_buf_obj_begin(&env);
	rq_json_buf_kv_str(&env, "from", from);
	rq_json_buf_key(&env, "to");
	rq_json_buf_arr_begin(&env);
	for (size_t i = 0; i < nto; i++)
		rq_json_buf_str(&env, to[i]);
	rq_json_buf_arr_end(&env);
	if (delay >= 0) {
		rq_json_buf_key(&env, "delay");
		if (delay == floor(delay) && delay < 9e15)
			rq_json_buf_int(&env, (int64_t)delay);
		else
			rq_json_buf_double(&env, delay);
	}
	if (key)
		rq_json_buf_kv_str(&env, "key", key);
	if (meta) {
		rq_json_buf_key(&env, "meta");
		rq_json_buf_value(&env, meta);
	}
	rq_json_buf_obj_end(&env);
	if (!rq_json_buf_ok(&env)) {
		errorf("out of memory");
		rc = EXIT_OPERATION;
		goto cleanup;
	}
	if ((rc = cli_open(cli)) != 0)
		goto cleanup;
	const char *args[] = {env.data, body};
	size_t lens[] = {env.len, body_len};
	r = fcall(cli, "relayq_enqueue", 2, args, lens);
	if (!r) {
		rc = EXIT_OPERATION;
		goto cleanup;
	}
	if (r->type != REDIS_REPLY_STRING) {
		errorf("unexpected reply from relayq_enqueue");
		rc = EXIT_OPERATION;
		goto cleanup;
	}
	char *id = clean(r->str, r->len, 64);
	printf("%s\n", id);
	free(id);
cleanup:
	freeReplyObject(r);
	rq_json_buf_finish(&env);
	rq_json_free(meta);
	free(body);
	free(to);
	return rc;
}

/* ---- list ---- */

static const char *const list_usage =
	"Usage: relayq list [--state ready|scheduled|inflight|dead|held|all] [--json]\n"
	"\n"
	"One line per message: id, state, age, attempts, next attempt, sender,\n"
	"recipients (pending ones when some are done) and the last reply.\n"
	"With --json, one JSON object per line.\n";

enum { COL_ID, COL_STATE, COL_AGE, COL_ATT, COL_NEXT, COL_FROM, COL_TO, COL_LAST, NCOLS };

static const char *const col_names[NCOLS] = {
	"ID", "STATE", "AGE", "ATT", "NEXT", "FROM", "RCPTS", "LAST REPLY",
};

struct row {
	char *col[NCOLS];
};

static void row_free(struct row *row)
{
	for (int i = 0; i < NCOLS; i++)
		free(row->col[i]);
}

static void row_fill(struct row *row, const struct rq_json *m, int64_t now)
{
	char tmp[64];
	row->col[COL_ID] = field_text(rq_json_get(m, "id"), 40);
	const char *state = rq_json_get_str(m, "state");
	row->col[COL_STATE] = clean_str(state ? state : "?", 12);
	fmt_duration(tmp, sizeof(tmp), now - field_int(m, "created", now));
	row->col[COL_AGE] = strdup(tmp);
	snprintf(tmp, sizeof(tmp), "%" PRId64, field_int(m, "attempts", 0));
	row->col[COL_ATT] = strdup(tmp);
	int64_t next = field_int(m, "next", 0);
	if (state && strcmp(state, "scheduled") == 0 && next > now) {
		char d[32];
		fmt_duration(d, sizeof(d), next - now);
		snprintf(tmp, sizeof(tmp), "in %s", d);
	} else if (state && (strcmp(state, "ready") == 0 || strcmp(state, "scheduled") == 0)) {
		snprintf(tmp, sizeof(tmp), "now");
	} else {
		snprintf(tmp, sizeof(tmp), "-");
	}
	row->col[COL_NEXT] = strdup(tmp);
	const char *from = rq_json_get_str(m, "from");
	row->col[COL_FROM] = from && *from ? clean_str(from, 40) : strdup("<>");
	/* Pending recipients; all of them when none is pending (dead). */
	const struct rq_json *pending = rq_json_get(m, "pending");
	if (!rq_json_is(pending, RQ_JSON_ARRAY) || pending->count == 0)
		pending = rq_json_get(m, "to");
	row->col[COL_TO] = address_list(pending, NULL, 1);
	row->col[COL_LAST] = reply_text(m, "last_code", "last_enhanced", "last_text", 80);
	for (int i = 0; i < NCOLS; i++)
		if (!row->col[i])
			row->col[i] = clean_str("", 0);
}

static void row_print(const struct row *row, const size_t *w)
{
	for (int i = 0; i < NCOLS; i++)
		put_padded(row->col[i][0] ? row->col[i] : "-", w[i], i == NCOLS - 1);
	fputc('\n', stdout);
}

static int cmd_list(struct cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"state", required_argument, NULL, OPT_STATE},
		{"json", no_argument, NULL, OPT_JSON},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	static const char *const states[] = {"ready", "scheduled", "inflight", "dead", "held", "all"};
	int rc = 0;
	const char *state = "all";
	bool json = false;
	redisReply *r = NULL;
	start_options();
	int o;
	while ((o = next_option(cli, argc, argv, opts, list_usage, &rc)) != -1) {
		switch (o) {
		case -2:
			return rc;
		case OPT_STATE: {
			bool ok = false;
			for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++)
				ok |= strcmp(optarg, states[i]) == 0;
			if (!ok) {
				char *c = clean_str(optarg, 40);
				errorf("list: invalid --state '%s' (ready, scheduled, inflight, dead, held or all)", c);
				free(c);
				return EXIT_USAGE;
			}
			state = optarg;
			break;
		}
		case OPT_JSON:
			json = true;
			break;
		}
	}
	if (optind < argc) {
		errorf("list: unexpected argument '%s'", argv[optind]);
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	int64_t now = json ? 0 : redis_now(cli);
	if (!json && now == 0)
		return EXIT_OPERATION;
	size_t w[NCOLS] = {0};
	bool header = false;
	size_t total = 0;
	for (long offset = 0;; offset += LIST_PAGE) {
		char off[32], cnt[32];
		snprintf(off, sizeof(off), "%ld", offset);
		snprintf(cnt, sizeof(cnt), "%d", LIST_PAGE);
		const char *args[] = {state, off, cnt};
		r = fcall(cli, "relayq_list", 3, args, NULL);
		if (!r)
			return EXIT_OPERATION;
		if (r->type != REDIS_REPLY_ARRAY) {
			errorf("unexpected reply from relayq_list");
			rc = EXIT_OPERATION;
			goto cleanup;
		}
		size_t n = r->elements;
		struct row *rows = calloc(n ? n : 1, sizeof(*rows));
		if (!rows) {
			errorf("out of memory");
			rc = EXIT_OPERATION;
			goto cleanup;
		}
		for (size_t i = 0; i < n; i++) {
			struct rq_json *m = parse_reply_json(r->element[i], "relayq_list");
			if (!m) {
				rc = EXIT_OPERATION;
				continue;
			}
			if (json)
				print_json_line(m);
			else
				row_fill(&rows[i], m, now);
			rq_json_free(m);
		}
		if (!json) {
			/* Column widths from the first page (later pages just push). */
			if (!header && n > 0) {
				for (int c = 0; c < NCOLS; c++)
					w[c] = width(col_names[c]);
				for (size_t i = 0; i < n; i++)
					for (int c = 0; c < NCOLS; c++)
						if (rows[i].col[c] && width(rows[i].col[c]) > w[c])
							w[c] = width(rows[i].col[c]);
				struct row h;
				for (int c = 0; c < NCOLS; c++)
					h.col[c] = (char *)col_names[c];
				row_print(&h, w);
				header = true;
			}
			for (size_t i = 0; i < n; i++)
				if (rows[i].col[0])
					row_print(&rows[i], w);
		}
		for (size_t i = 0; i < n; i++)
			row_free(&rows[i]);
		free(rows);
		total += n;
		freeReplyObject(r);
		r = NULL;
		if (n < LIST_PAGE || ferror(stdout))
			break;
	}
	if (!json && total == 0)
		printf("queue %s: no messages%s%s\n", cli->qname,
				strcmp(state, "all") ? " in state " : "",
				strcmp(state, "all") ? state : "");
cleanup:
	freeReplyObject(r);
	return rc;
}

/* ---- show ---- */

static const char *const show_usage =
	"Usage: relayq show ID [--json]\n"
	"\n"
	"Every field of a message and each recipient's state and last reply.\n";

static void show_line(const char *name, const char *value)
{
	printf("%-14s %s\n", name, value && *value ? value : "-");
}

static void show_time(const char *name, const struct rq_json *m, const char *key, int64_t now)
{
	int64_t t = field_int(m, key, 0);
	char when[64], rel[32], line[128];
	if (t <= 0) {
		show_line(name, "-");
		return;
	}
	fmt_time(when, sizeof(when), t);
	fmt_duration(rel, sizeof(rel), t > now ? t - now : now - t);
	snprintf(line, sizeof(line), "%s (%s%s%s)", when, t > now ? "in " : "", rel,
			t > now ? "" : " ago");
	show_line(name, line);
}

static void show_human(const struct rq_json *m, int64_t now)
{
	static const char *const known[] = {
		"id", "state", "from", "to", "pending", "created", "attempts", "next",
		"size", "key", "last_code", "last_enhanced", "last_text", "last_stage",
		"meta", "rcpts",
	};
	char *s = field_text(rq_json_get(m, "id"), 0);
	show_line("id:", s);
	free(s);
	s = field_text(rq_json_get(m, "state"), 0);
	show_line("state:", s);
	free(s);
	const char *from = rq_json_get_str(m, "from");
	s = from && *from ? clean_str(from, 0) : strdup("<> (null sender)");
	show_line("from:", s);
	free(s);
	show_time("created:", m, "created", now);
	char tmp[64];
	snprintf(tmp, sizeof(tmp), "%" PRId64, field_int(m, "attempts", 0));
	show_line("attempts:", tmp);
	const char *state = rq_json_get_str(m, "state");
	if (state && (strcmp(state, "scheduled") == 0 || strcmp(state, "ready") == 0))
		show_time("next attempt:", m, "next", now);
	else
		show_line("next attempt:", "-");
	snprintf(tmp, sizeof(tmp), "%" PRId64 " bytes", field_int(m, "size", 0));
	show_line("size:", tmp);
	if (rq_json_get(m, "key")) {
		s = field_text(rq_json_get(m, "key"), 0);
		show_line("key:", s);
		free(s);
	}
	s = reply_text(m, "last_code", "last_enhanced", "last_text", 0);
	const char *stage = rq_json_get_str(m, "last_stage");
	if (*s && stage && *stage) {
		char *st = clean_str(stage, 20);
		size_t n = strlen(s) + strlen(st) + 16;
		char *t = malloc(n);
		if (t) {
			snprintf(t, n, "%s (at %s)", s, st);
			free(s);
			s = t;
		}
		free(st);
	}
	show_line("last reply:", s);
	free(s);
	s = field_text(rq_json_get(m, "meta"), 0);
	show_line("meta:", s);
	free(s);
	/* Fields this version does not know, as they are. */
	for (const struct rq_json *c = m->child; c; c = c->next) {
		bool seen = false;
		for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
			seen |= strcmp(c->key, known[i]) == 0;
		if (seen)
			continue;
		char *k = clean(c->key, c->key_len, 40);
		char name[64];
		snprintf(name, sizeof(name), "%s:", k);
		s = field_text(c, 0);
		show_line(name, s);
		free(s);
		free(k);
	}
	const struct rq_json *rcpts = rq_json_get(m, "rcpts");
	size_t nr = rq_json_is(rcpts, RQ_JSON_ARRAY) ? rcpts->count : 0;
	snprintf(tmp, sizeof(tmp), "%zu", nr);
	show_line("recipients:", tmp);
	if (!nr)
		return;
	size_t wto = 0;
	for (const struct rq_json *c = rcpts->child; c; c = c->next) {
		char *t = field_text(rq_json_get(c, "to"), 60);
		if (width(t) > wto)
			wto = width(t);
		free(t);
	}
	for (const struct rq_json *c = rcpts->child; c; c = c->next) {
		char *to = field_text(rq_json_get(c, "to"), 60);
		char *st = field_text(rq_json_get(c, "s"), 12);
		char *rep = reply_text(c, "code", "enh", "text", 0);
		fputs("  ", stdout);
		put_padded(to, wto, false);
		put_padded(st[0] ? st : "?", 9, !rep[0]);
		fputs(rep, stdout);
		const char *rstage = rq_json_get_str(c, "stage");
		if (rep[0] && rstage && *rstage) {
			char *t = clean_str(rstage, 20);
			printf(" (at %s)", t);
			free(t);
		}
		int64_t at = field_int(c, "at", 0);
		if (at > 0) {
			char when[64];
			fmt_time(when, sizeof(when), at);
			printf(" [%s]", when);
		}
		fputc('\n', stdout);
		const char *hint = rq_json_get_str(c, "hint");
		if (hint && *hint) {
			char *h = clean_str(hint, 0);
			printf("  %*s  hint: %s\n", (int)wto, "", h);
			free(h);
		}
		free(to);
		free(st);
		free(rep);
	}
}

static int cmd_show(struct cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"json", no_argument, NULL, OPT_JSON},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	int rc = 0;
	bool json = false;
	start_options();
	int o;
	while ((o = next_option(cli, argc, argv, opts, show_usage, &rc)) != -1) {
		if (o == -2)
			return rc;
		if (o == OPT_JSON)
			json = true;
	}
	if (argc - optind != 1) {
		errorf("show: give exactly one message id (see relayq show --help)");
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	const char *args[] = {argv[optind]};
	redisReply *r = fcall(cli, "relayq_show", 1, args, NULL);
	if (!r)
		return EXIT_OPERATION;
	struct rq_json *m = parse_reply_json(r, "relayq_show");
	freeReplyObject(r);
	if (!m)
		return EXIT_OPERATION;
	if (json) {
		print_json_line(m);
	} else {
		int64_t now = redis_now(cli);
		if (now)
			show_human(m, now);
		else
			rc = EXIT_OPERATION;
	}
	rq_json_free(m);
	return rc;
}

/* The options of a command that takes only --json and no argument, then
 * the connection. Returns -1 to go on, or the exit status. */
static int json_only_options(struct cli *cli, int argc, char **argv, const char *name,
			     const char *usage, bool *json)
{
	static const struct option opts[] = {
		{"json", no_argument, NULL, OPT_JSON},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	int rc = 0;
	start_options();
	int o;
	while ((o = next_option(cli, argc, argv, opts, usage, &rc)) != -1) {
		if (o == -2)
			return rc;
		if (o == OPT_JSON)
			*json = true;
	}
	if (optind < argc) {
		errorf("%s: unexpected argument '%s'", name, argv[optind]);
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	return -1;
}

/* ---- stats ---- */

static const char *const stats_usage =
	"Usage: relayq stats [--json]\n"
	"\n"
	"Current counts (ready, scheduled, inflight, dead, held) and the queue's\n"
	"counters.\n";

static int cmd_stats(struct cli *cli, int argc, char **argv)
{
	bool json = false;
	int rc = json_only_options(cli, argc, argv, "stats", stats_usage, &json);
	if (rc >= 0)
		return rc;
	rc = 0;
	redisReply *r = fcall(cli, "relayq_stats", 0, NULL, NULL);
	if (!r)
		return EXIT_OPERATION;
	if (r->type != REDIS_REPLY_ARRAY || r->elements % 2) {
		errorf("unexpected reply from relayq_stats");
		freeReplyObject(r);
		return EXIT_OPERATION;
	}
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_obj_begin(&b);
	size_t wname = 0;
	for (size_t i = 0; i + 1 < r->elements; i += 2)
		if (r->element[i]->type == REDIS_REPLY_STRING && r->element[i]->len > wname)
			wname = r->element[i]->len;
	for (size_t i = 0; i + 1 < r->elements; i += 2) {
		const redisReply *k = r->element[i], *v = r->element[i + 1];
		if (k->type != REDIS_REPLY_STRING)
			continue;
		long long n = 0;
		if (v->type == REDIS_REPLY_INTEGER)
			n = v->integer;
		else if (v->type == REDIS_REPLY_STRING)
			n = strtoll(v->str, NULL, 10);
		char *name = clean(k->str, k->len, 40);
		if (json) {
			rq_json_buf_kv_int(&b, name, n);
		} else {
			printf("%s:", name);
			printf("%*s%lld\n", (int)(wname - strlen(name) + 1), "", n);
		}
		free(name);
	}
	rq_json_buf_obj_end(&b);
	if (json && rq_json_buf_ok(&b))
		printf("%s\n", b.data);
	rq_json_buf_finish(&b);
	freeReplyObject(r);
	return 0;
}

/* ---- hold, release, delete, requeue, flush ---- */

struct id_op {
	const char *name;          /* the command */
	const char *function;      /* the Redis Function */
	const char *done;          /* "held", ... */
	const char *from_state;    /* what an id must be in, NULL: any */
	const char *all_flag;      /* "all" / "dead": the flag for every id */
	const char *usage;
};

static const char hold_usage[] =
	"Usage: relayq hold ID ...\n\nParks messages (ready, scheduled or inflight) until released.\n";
static const char release_usage[] =
	"Usage: relayq release ID ...\n\nMakes held messages ready again.\n";
static const char delete_usage[] =
	"Usage: relayq delete ID ...\n\nDeletes messages in any state.\n";
static const char requeue_usage[] =
	"Usage: relayq requeue ID ... | --dead\n\n"
	"Moves dead messages back to ready (attempts reset, failed recipients\n"
	"pending again); --dead for every dead message.\n";
static const char flush_usage[] =
	"Usage: relayq flush ID ... | --all\n\n"
	"Makes scheduled messages due now; --all for every scheduled message.\n";

static const struct id_op ops[] = {
	{"hold", "relayq_hold", "held", NULL, NULL, hold_usage},
	{"release", "relayq_release", "released", "held", NULL, release_usage},
	{"delete", "relayq_delete", "deleted", NULL, NULL, delete_usage},
	{"requeue", "relayq_requeue", "requeued", "dead", "dead", requeue_usage},
	{"flush", "relayq_flush", "flushed", "scheduled", "all", flush_usage},
};

/* After a partial count: says which ids were not acted on, and why. */
static void explain_shortfall(struct cli *cli, const struct id_op *op, int n, char **ids)
{
	for (int i = 0; i < n; i++) {
		char key[QUEUE_MAX + 200];
		if (strlen(ids[i]) > 100)
			continue;
		snprintf(key, sizeof(key), "%s:msg:%s", cli->prefix, ids[i]);
		redisReply *r = redisCommand(cli->rc, "HGET %s state", key);
		if (!r)
			return;
		char *c = clean_str(ids[i], 40);
		if (r->type == REDIS_REPLY_NIL)
			errorf("%s: unknown id: %s", op->name, c);
		else if (r->type == REDIS_REPLY_STRING && op->from_state &&
				strcmp(r->str, op->from_state) != 0 &&
				strcmp(r->str, op->done) != 0) {
			char *s = clean(r->str, r->len, 20);
			errorf("%s: %s is %s, not %s", op->name, c, s, op->from_state);
			free(s);
		}
		free(c);
		freeReplyObject(r);
	}
}

static int cmd_ids(struct cli *cli, const struct id_op *op, int argc, char **argv)
{
	static const struct option opts_plain[] = {
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	static const struct option opts_all[] = {
		{"all", no_argument, NULL, OPT_ALL},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	static const struct option opts_dead[] = {
		{"dead", no_argument, NULL, OPT_DEAD},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	const struct option *opts = !op->all_flag ? opts_plain :
			strcmp(op->all_flag, "all") == 0 ? opts_all : opts_dead;
	int rc = 0;
	bool every = false;
	start_options();
	int o;
	while ((o = next_option(cli, argc, argv, opts, op->usage, &rc)) != -1) {
		if (o == -2)
			return rc;
		if (o == OPT_ALL || o == OPT_DEAD)
			every = true;
	}
	int nids = argc - optind;
	char **ids = argv + optind;
	if (every && nids > 0) {
		errorf("%s: give ids or --%s, not both", op->name, op->all_flag);
		return EXIT_USAGE;
	}
	if (!every && nids == 0) {
		if (op->all_flag)
			errorf("%s: give message ids or --%s (see relayq %s --help)",
					op->name, op->all_flag, op->name);
		else
			errorf("%s: give message ids (see relayq %s --help)", op->name, op->name);
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	redisReply *r;
	if (every && strcmp(op->all_flag, "dead") == 0) {
		const char *args[] = {"--dead"};
		r = fcall(cli, op->function, 1, args, NULL);
	} else {
		r = fcall(cli, op->function, nids, (const char **)ids, NULL);
	}
	if (!r)
		return EXIT_OPERATION;
	if (r->type != REDIS_REPLY_INTEGER) {
		errorf("unexpected reply from %s", op->function);
		freeReplyObject(r);
		return EXIT_OPERATION;
	}
	long long n = r->integer;
	freeReplyObject(r);
	printf("%s %lld message%s\n", op->done, n, n == 1 ? "" : "s");
	if (!every) {
		/* Distinct ids given: fewer done means some were unknown or in
		 * another state. */
		int distinct = 0;
		for (int i = 0; i < nids; i++) {
			bool dup = false;
			for (int j = 0; j < i && !dup; j++)
				dup = strcmp(ids[i], ids[j]) == 0;
			distinct += !dup;
		}
		if (n < distinct) {
			fflush(stdout);
			explain_shortfall(cli, op, nids, ids);
			return EXIT_OPERATION;
		}
	}
	return 0;
}

/* ---- tail ---- */

static const char *const tail_usage =
	"Usage: relayq tail [--json]\n"
	"\n"
	"Follows the queue's events (delivered, deferred, failed, dropped,\n"
	"expired, held) as they happen, one line each, until interrupted.\n";

static volatile sig_atomic_t tail_stop;

static void on_stop_signal(int sig)
{
	(void)sig;
	tail_stop = 1;
}

/* One event entry: [id, [field, value, ...]]. */
static void print_event(const redisReply *e, bool json)
{
	if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
			e->element[0]->type != REDIS_REPLY_STRING ||
			e->element[1]->type != REDIS_REPLY_ARRAY)
		return;
	const redisReply *f = e->element[1];
	const char *sid = e->element[0]->str;
	int64_t ms = strtoll(sid, NULL, 10);
	if (json) {
		struct rq_json_buf b;
		rq_json_buf_init(&b);
		rq_json_buf_obj_begin(&b);
		rq_json_buf_kv_str(&b, "event_id", sid);
		rq_json_buf_kv_int(&b, "ts", ms);
		for (size_t i = 0; i + 1 < f->elements; i += 2) {
			const redisReply *k = f->element[i], *v = f->element[i + 1];
			if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
				continue;
			char *name = clean(k->str, k->len, 40);
			rq_json_buf_key(&b, name);
			free(name);
			char *end;
			long long num = v->len ? strtoll(v->str, &end, 10) : 0;
			bool numeric = v->len && v->len < 19 && *end == '\0' &&
				(strcmp(k->str, "code") == 0 || strcmp(k->str, "attempt") == 0 ||
				 strcmp(k->str, "next") == 0);
			struct rq_json *meta = NULL;
			if (strcmp(k->str, "meta") == 0)
				meta = rq_json_parse(v->str, v->len, RQ_JSON_LAX_UTF8, NULL, 0);
			if (meta)
				rq_json_buf_value(&b, meta);
			else if (numeric)
				rq_json_buf_int(&b, num);
			else
				rq_json_buf_strn(&b, v->str, v->len);
			rq_json_free(meta);
		}
		rq_json_buf_obj_end(&b);
		if (rq_json_buf_ok(&b))
			printf("%s\n", b.data);
		rq_json_buf_finish(&b);
		return;
	}
	/* time type id rcpt code enh text */
	static const char *const shown[] = {"type", "id", "rcpt", "code", "enh", "text"};
	char when[64];
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	if (gmtime_r(&t, &tm))
		strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	else
		snprintf(when, sizeof(when), "-");
	printf("%s.%03dZ", when, (int)(ms % 1000));
	for (size_t s = 0; s < sizeof(shown) / sizeof(shown[0]); s++) {
		for (size_t i = 0; i + 1 < f->elements; i += 2) {
			const redisReply *k = f->element[i], *v = f->element[i + 1];
			if (k->type != REDIS_REPLY_STRING || strcmp(k->str, shown[s]) != 0 ||
					v->type != REDIS_REPLY_STRING || v->len == 0)
				continue;
			char *c = clean(v->str, v->len, strcmp(shown[s], "text") == 0 ? 200 : 80);
			printf(" %s", c);
			free(c);
			break;
		}
	}
	fputc('\n', stdout);
}

/* Waits for a reply while watching for signals and a closed stdout.
 * Returns 1 with *reply, 0 to stop quietly, -1 on a connection error. */
static int tail_wait(struct cli *cli, const sigset_t *unblocked, redisReply **reply)
{
	for (;;) {
		void *aux = NULL;
		if (redisGetReplyFromReader(cli->rc, &aux) != REDIS_OK)
			return -1;
		if (aux) {
			*reply = aux;
			return 1;
		}
		struct pollfd pfd[2] = {
			{.fd = cli->rc->fd, .events = POLLIN},
			{.fd = STDOUT_FILENO, .events = 0},
		};
		int n = ppoll(pfd, 2, NULL, unblocked);
		if (tail_stop)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (pfd[1].revents & (POLLERR | POLLHUP))
			return 0;       /* the reader of our output went away */
		if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))
			if (redisBufferRead(cli->rc) != REDIS_OK)
				return -1;
	}
}

static int cmd_tail(struct cli *cli, int argc, char **argv)
{
	bool json = false;
	int rc = json_only_options(cli, argc, argv, "tail", tail_usage, &json);
	if (rc >= 0)
		return rc;
	rc = 0;
	/* A name tests and operators can find in CLIENT LIST. */
	redisReply *r = redisCommand(cli->rc, "CLIENT SETNAME relayq-tail-%d", (int)getpid());
	freeReplyObject(r);
	r = NULL;

	sigset_t block, unblocked;
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGHUP);
	sigprocmask(SIG_BLOCK, &block, &unblocked);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_stop_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);

	char key[QUEUE_MAX + 32];
	snprintf(key, sizeof(key), "%s:events", cli->prefix);
	char last[64] = "$";
	while (!tail_stop) {
		const char *args[] = {"XREAD", "COUNT", "100", "BLOCK", "0", "STREAMS", key, last};
		if (redisAppendCommandArgv(cli->rc, 8, args, NULL) != REDIS_OK) {
			rc = EXIT_OPERATION;
			break;
		}
		int done = 0;
		while (!done)
			if (redisBufferWrite(cli->rc, &done) != REDIS_OK)
				break;
		int w = done ? tail_wait(cli, &unblocked, &r) : -1;
		if (w == 0)
			break;
		if (w < 0) {
			errorf("lost the connection to Redis at %s: %s", cli->t.shown,
					cli->rc->errstr[0] ? cli->rc->errstr : "closed");
			rc = EXIT_OPERATION;
			break;
		}
		if (r->type == REDIS_REPLY_ERROR) {
			print_redis_error(cli, r);
			rc = EXIT_OPERATION;
			break;
		}
		/* [[key, [entry, ...]]] or nil */
		if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
				r->element[0]->type == REDIS_REPLY_ARRAY &&
				r->element[0]->elements == 2 &&
				r->element[0]->element[1]->type == REDIS_REPLY_ARRAY) {
			const redisReply *entries = r->element[0]->element[1];
			for (size_t i = 0; i < entries->elements; i++) {
				const redisReply *e = entries->element[i];
				print_event(e, json);
				if (e->type == REDIS_REPLY_ARRAY && e->elements == 2 &&
						e->element[0]->type == REDIS_REPLY_STRING &&
						e->element[0]->len < sizeof(last))
					snprintf(last, sizeof(last), "%s", e->element[0]->str);
			}
		}
		freeReplyObject(r);
		r = NULL;
		if (fflush(stdout) != 0 || ferror(stdout))
			break;              /* EPIPE: the reader went away */
	}
	freeReplyObject(r);
	sigprocmask(SIG_SETMASK, &unblocked, NULL);
	return rc;
}

/* ---- explain ---- */

/* Handled by cli_explain.c; a -c given before the command is passed on. */
static int cmd_explain(struct cli *cli, int argc, char **argv)
{
	if (!cli->config_path)
		return rq_cli_explain(argc, argv);
	char **args = calloc((size_t)argc + 3, sizeof(*args));
	if (!args) {
		errorf("out of memory");
		return EXIT_OPERATION;
	}
	args[0] = argv[0];
	args[1] = (char *)"-c";
	args[2] = (char *)cli->config_path;
	for (int i = 1; i < argc; i++)
		args[i + 2] = argv[i];
	int rc = rq_cli_explain(argc + 2, args);
	free(args);
	return rc;
}

/* ---- main ---- */

static int dispatch(struct cli *cli, int argc, char **argv)
{
	const char *name = argv[0];
	cli->cmd = name;
	if (strcmp(name, "enqueue") == 0)
		return cmd_enqueue(cli, argc, argv);
	if (strcmp(name, "list") == 0)
		return cmd_list(cli, argc, argv);
	if (strcmp(name, "show") == 0)
		return cmd_show(cli, argc, argv);
	if (strcmp(name, "stats") == 0)
		return cmd_stats(cli, argc, argv);
	if (strcmp(name, "tail") == 0)
		return cmd_tail(cli, argc, argv);
	if (strcmp(name, "explain") == 0)
		return cmd_explain(cli, argc, argv);
	for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
		if (strcmp(name, ops[i].name) == 0)
			return cmd_ids(cli, &ops[i], argc, argv);
	if (strcmp(name, "help") == 0) {
		fputs(main_usage, stdout);
		return 0;
	}
	char *c = clean_str(name, 40);
	errorf("unknown command '%s' (see relayq --help)", c);
	free(c);
	return EXIT_USAGE;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		COMMON_OPTIONS,
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	struct cli cli = {.cmd = ""};
	int rc = 0;
	/* Redis or stdout going away must be an error, not a silent death. */
	signal(SIGPIPE, SIG_IGN);

	/* Global options stop at the command ('+'). */
	optind = 0;
	opterr = 0;
	for (;;) {
		int o = getopt_long(argc, argv, "+c:", opts, NULL);
		if (o == -1)
			break;
		switch (o) {
		case 'c':
			cli.config_path = optarg;
			break;
		case OPT_REDIS:
			cli.redis_url = optarg;
			break;
		case OPT_QUEUE:
			cli.queue = optarg;
			break;
		case OPT_PASSWORD_FILE:
			cli.password_file = optarg;
			break;
		case OPT_HELP:
			fputs(main_usage, stdout);
			return 0;
		case OPT_VERSION:
			printf("relayq %s (functions library version %d)\n", RQ_VERSION,
					rq_fnlib_version());
			return 0;
		default: {
			const char *bad = optind > 0 && optind <= argc ? argv[optind - 1] : "";
			char *c = clean(bad, strcspn(bad, "="), 60);
			if (optopt == 'c' || optopt >= OPT_REDIS)
				errorf("option '%s' needs a value (see relayq --help)", c);
			else if (optopt)
				errorf("unknown option '-%c' (see relayq --help)",
						isprint(optopt) ? optopt : '?');
			else
				errorf("unknown option '%s' (see relayq --help)", c);
			free(c);
			return EXIT_USAGE;
		}
		}
	}
	if (optind >= argc) {
		fputs(main_usage, stderr);
		errorf("no command given");
		return EXIT_USAGE;
	}
	rc = dispatch(&cli, argc - optind, argv + optind);
	cli_close(&cli);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		if (errno != EPIPE) {
			errorf("cannot write the output: %s", strerror(errno));
			if (rc == 0)
				rc = EXIT_OPERATION;
		}
	}
	return rc;
}

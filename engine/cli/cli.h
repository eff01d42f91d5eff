#ifndef RELAYQ_CLI_H
#define RELAYQ_CLI_H

/*
 * relayq, the command-line client: what its files share. Not part of the
 * engine library; only the files of engine/cli/ include this.
 *
 *   main.c        argv dispatch, common options, where Redis and the queue
 *                 come from (options > config > environment > defaults)
 *   text.c        messages and terminal-safe text, JSON reply fields
 *   redis_sync.c  the synchronous Redis connection (AUTH, SELECT, the
 *                 Functions library check of queue_codec.h, FCALL)
 *   enqueue.c     enqueue
 *   inspect.c     list, show, stats, tail
 *   admin.c       hold, release, delete, requeue, flush
 *   explain.c     explain (explain.h)
 *   sendmail.c    sendmail: a drop-in /usr/sbin/sendmail for applications
 *                 (also when the binary is run as "sendmail")
 *   passwd.c      passwd: entries of the listener's credentials file
 *
 * Exit codes: 0 ok, 1 operation error, 2 usage error; sendmail uses
 * <sysexits.h>. Errors are one line on stderr starting "relayq: " (or
 * cli_prog's name; cli_errorf). A Redis password never appears in any
 * output.
 */

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include "relayq/keys.h"
#include "relayq/redis_url.h"

struct rq_json;

#define EXIT_OPERATION 1
#define EXIT_USAGE 2

/* Where to reach Redis, from a parsed URL (redis_url.h). */
struct cli_target {
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
	struct cli_target t;
	char qname[RQ_KEYS_QUEUE_MAX + 1];
	char prefix[RQ_KEYS_PREFIX_MAX];   /* relayq:{<queue>} */
	redisContext *rc;
};

/* ---- options (main.c) ---- */

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

/* Every command accepts these after its name too. */
#define COMMON_OPTIONS \
	{"config", required_argument, NULL, 'c'}, \
	{"redis", required_argument, NULL, OPT_REDIS}, \
	{"queue", required_argument, NULL, OPT_QUEUE}, \
	{"redis-password-file", required_argument, NULL, OPT_PASSWORD_FILE}, \
	{"help", no_argument, NULL, OPT_HELP}

/* Resets getopt for a command's arguments. */
void cli_start_options(void);

/*
 * Runs getopt_long over a command's arguments; handles the common options.
 * Returns the command's option code, -1 at the end of options, or -2 when
 * the command must exit with *rc (error printed or help shown).
 */
int cli_next_option(struct cli *cli, int argc, char **argv,
		    const struct option *opts, const char *usage, int *rc);

/* Resolves the target and queue (options > config > environment >
 * defaults) without connecting. Returns 0, or an exit code (1: the config
 * or a password file cannot be read, 2: a bad URL or queue name) after
 * printing why. */
int cli_resolve(struct cli *cli);

/* Resolves the target and queue, then connects (cli_redis_connect).
 * Returns 0, or an exit code after printing why. */
int cli_open(struct cli *cli);

/* The options of a command that takes only --json and no argument, then
 * cli_open. Returns -1 to go on, or the exit status. */
int cli_json_only_options(struct cli *cli, int argc, char **argv, const char *name,
			  const char *usage, bool *json);

/* ---- text (text.c) ---- */

/* The name errors start with: "relayq" (sendmail sets "sendmail"). */
extern const char *cli_prog;

/* "relayq: <message>\n" on stderr (stdout flushed first). */
void cli_errorf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Copies untrusted text for a terminal: control bytes become escapes
 * (\r, \n, \t, \xNN), and so do the UTF-8 encoded C1 controls U+0080 to
 * U+009F (bytes C2 80 .. C2 9F, shown as \xc2\xNN: some terminals act on
 * them as on ESC sequences); at most max display characters (0: no
 * limit), "..." when cut. Returns a malloc'd string (never NULL: exits on
 * OOM). */
char *cli_clean(const char *s, size_t len, size_t max);
/* cli_clean of a C string (NULL: ""). */
char *cli_clean_str(const char *s, size_t max);
/* Display width: UTF-8 lead bytes. */
size_t cli_width(const char *s);
/* Writes s padded to w + 2 columns (not padded when last). */
void cli_put_padded(const char *s, size_t w, bool last);
/* "5s", "5m", "2h", "3d" (rounded to the nearest unit). */
void cli_fmt_duration(char *out, size_t len, int64_t ms);
/* "2026-11-28 12:00:00 UTC", "-" for <= 0. */
void cli_fmt_time(char *out, size_t len, int64_t ms);

/* A function's JSON object reply (lax about UTF-8: Redis passes bytes), or
 * NULL after printing why. A value nested deeper than the parser's limit
 * (a meta written before enqueue bounded it, or by hand) does not make the
 * reply unreadable: it stands as a too_deep node (rq_json_has_deep), which
 * cli_field_text shows as CLI_UNREADABLE_DEEP and cli_print_json_line as
 * null named in "unreadable". Free with rq_json_free. */
struct rq_json *cli_reply_json(const redisReply *r, const char *what);
#define CLI_UNREADABLE_DEEP "(unreadable: nested deeper than 64 levels)"
/* Writes v as one compact JSON line on stdout. Members of an object v that
 * hold a too_deep node are written as null, and their names listed in a
 * last member "unreadable": ["meta", ...]. */
void cli_print_json_line(const struct rq_json *v);
/* The id of a function's JSON reply that does not parse at all, when it
 * starts {"id":"<id>" as relayq_show / relayq_list write it (malloc'd,
 * cleaned), else "?". */
char *cli_reply_id_guess(const redisReply *r);
/* An integer field, or dflt. */
int64_t cli_field_int(const struct rq_json *v, const char *key, int64_t dflt);
/* Text of a field for humans: strings cleaned, numbers and JSON written.
 * malloc'd. */
char *cli_field_text(const struct rq_json *v, size_t max);
/* "450 4.2.0 Greylisted" from a message's last_* or a recipient's fields.
 * malloc'd. */
char *cli_reply_text(const struct rq_json *v, const char *code_key,
		     const char *enh_key, const char *text_key, size_t max);
/* A JSON array of strings as "a@x, b@y"; v may be a JSON text too.
 * malloc'd. */
char *cli_address_list(const struct rq_json *v, size_t *count, size_t max_items);

/* ---- Redis (redis_sync.c) ---- */

/* Parses url (rq_redis_url_parse) into t, password included (wipe with
 * cli_target_clear). 0, or -1 with err (never any of the URL). */
int cli_target_parse(struct cli_target *t, const char *url, char *err, size_t errlen);
/* Sets t->shown: the target without its password. */
void cli_target_show(struct cli_target *t);
/* Wipes and frees the password; zeroes t. */
void cli_target_clear(struct cli_target *t);
/* A URL that does not parse, for messages: rq_redis_url_redact, cleaned. */
void cli_redact_raw(const char *url, char *out, size_t len);

/* Connects to cli->t, authenticates, selects the database and loads the
 * embedded Functions library when Redis has none or an older one
 * (rq_queue_version_check). 0, or -1 after printing why. */
int cli_redis_connect(struct cli *cli);
/* Closes the connection and clears the target. */
void cli_redis_close(struct cli *cli);
/* Prints a Redis error reply: the function's sentence when it is one. */
void cli_print_redis_error(const struct cli *cli, const redisReply *r);
/* Sends one command. Returns the reply, or NULL after printing an error
 * (connection problem, or an error reply). */
redisReply *cli_command(struct cli *cli, int argc, const char **argv, const size_t *lens);
/* FCALL name 1 <prefix> args... (lens NULL: C strings); as cli_command. */
redisReply *cli_fcall(struct cli *cli, const char *name, int nargs,
		      const char **args, const size_t *lens);
/* Redis time in ms; 0 after printing an error. */
int64_t cli_redis_now(struct cli *cli);

/* ---- commands: argv[0] is the command's name; return the exit status ---- */

int cmd_enqueue(struct cli *cli, int argc, char **argv);
/* FCALL relayq_enqueue of env + body: 0 (the id in *id if id), 1 when
 * relayq refused it, -1 on any other failure; errors are printed. */
int cli_enqueue_send(struct cli *cli, const char *env, size_t envlen, const char *body,
		     size_t bodylen, char **id);
int cmd_list(struct cli *cli, int argc, char **argv);
int cmd_show(struct cli *cli, int argc, char **argv);
int cmd_stats(struct cli *cli, int argc, char **argv);
int cmd_tail(struct cli *cli, int argc, char **argv);
/* hold, release, delete, requeue, flush; -1 when name is none of them. */
int cmd_admin(struct cli *cli, const char *name, int argc, char **argv);
/* sendmail: exit codes of <sysexits.h> (sendmail.c). */
int cmd_sendmail(struct cli *cli, int argc, char **argv);
/* passwd (passwd.c). */
int cmd_passwd(struct cli *cli, int argc, char **argv);

#endif

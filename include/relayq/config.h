#ifndef RELAYQ_CONFIG_H
#define RELAYQ_CONFIG_H

/*
 * The daemon's settings: defaults, applying one key (from a table of
 * keys: name, type, field, bounds), validating, looking up. No Lua here:
 * the config file (contrib/relayq.example.lua) is read by config_lua.h,
 * which hands every key to rq_config_apply; its calls
 *
 *   relayq.config { ... }      settings (keys below)
 *   relayq.backoff { first, factor, max, jitter }
 *   relayq.expire { max_age, max_attempts }
 *   relayq.on(selector, fn)    policy overrides (policy_lua.h)
 *   relayq.on_domain(domain, { settings..., on = { [selector] = fn } })
 *
 * come each at most once (on / on_domain once per selector / domain).
 * Unknown keys, wrong types and out-of-range values are errors, reported
 * with the file's line. Durations are numbers (seconds) or strings ("30s",
 * "5m", "2h", "5d", "1h30m").
 *
 * relayq.config keys and defaults:
 *   redis         "redis://127.0.0.1:6379/0"  (any URL rq_redis_url_parse
 *                 takes, queue.h: redis://[user:password@]host[:port][/db]
 *                 or unix:/path[?db=N]; a password in it is warned about)
 *   redis_password_file  a file whose first line is the Redis password
 *                 (checked readable; warned when group/other can read it)
 *   redis_password_env   an environment variable holding it (must be set)
 *                 At most one password source: the URL or one of these.
 *   redis_user    the Redis ACL user (not also in the URL; needs a
 *                 password source)
 *   queue         "default"  (a name, or a list of names: [A-Za-z0-9_.:-],
 *                 1-64 bytes)
 *   relay         absent = deliver by MX. "[host]:port" (no MX lookup) or
 *                 "host:port" / "host" (MX lookup of host, as Postfix
 *                 relayhost); port default 25
 *   tls           "opportunistic" | "none" | "required" | "implicit"
 *   tls_ca_file   absent = system store; must be readable
 *   tls_verify    true (required / implicit fail on a certificate that does
 *                 not verify; opportunistic never fails on it)
 *   auth          { user = "..", password_file = "/path" | password_env =
 *                 "VAR" | password = "..." (discouraged, warned),
 *                 allow_plaintext = false }  (AUTH with tls = "none" needs
 *                 allow_plaintext = true)
 *   helo          the host name (gethostname), 1-255 bytes
 *   connections   100 (total, 1-100000)
 *   per_destination 20 (1-10000)
 *   messages_per_connection 100 (1-1000000)
 *   recipients_per_transaction 100 (1-100000)
 *   batch         100 (messages claimed per round trip, 1-10000)
 *   lease         "5m" (10s-1d)
 *   timeouts      { connect = "30s", greeting = "5m", helo = "5m",
 *                   mail = "5m", rcpt = "5m", data = "2m",
 *                   data_block = "3m", dot = "10m", quit = "20s",
 *                   idle = "10s" }  (each 1s-1h; idle 0-1h: 0 = close
 *                 connections when idle). Each is the total deadline of
 *                 its stage's reply, from the command's write to the end
 *                 of the reply, not restarted by bytes that trickle in;
 *                 data_block bounds each block of the body written
 *                 (write progress); quit: QUIT's reply, then the close
 *   log_format    "logfmt" | "json"
 *   log_level     "info" (debug | info | warn | error | off)
 *   events_cap    100000 (0-100000000)
 *   bounce        false (send DSNs to the sender on failure)
 *   chunking      true (send messages with BDAT, RFC 3030, to servers that
 *                 offer CHUNKING; false: always DATA)
 *   metrics       absent = off; "host:port" or "[v6]:port" to listen on
 * relayq.backoff: first "5m", factor 2 (1-100), max "4h", jitter 0.15 (0-1)
 * relayq.expire: max_age "5d" (60s-365d), max_attempts absent (1-100000)
 * relayq.on_domain settings: per_destination, messages_per_connection,
 *   recipients_per_transaction, backoff {..}, expire {..}, on {..}.
 * relayq.listen { "ip:port", ... }: an SMTP listener (listen.h), once per
 *   address (at most RQ_CONFIG_LISTEN_MAX):
 *   [1]           "127.0.0.1:2525" or "[::1]:2525" (required, port 1-65535)
 *   trusted       { "127.0.0.0/8", "::1/128" }: CIDRs that may send
 *                 without AUTH (default none)
 *   queue         the queue messages go to (default: the first queue)
 *   tls_cert, tls_key   PEM files (loaded and checked); STARTTLS is
 *                 offered when tls_cert is set; tls_key absent: in the cert
 *   implicit_tls  false (true: TLS from the first byte, port 465 style)
 *   auth_file     the credentials file of AUTH PLAIN / LOGIN (loaded and
 *                 checked, credentials.h); needs tls_cert unless
 *   auth_allow_plaintext  false
 *   max_size      "25M" (bytes, or a string with K / M / G; 1K-500M)
 *   max_recipients 1000 (1-100000), max_connections 1000 (1-100000),
 *   max_per_ip    50 (1-100000), max_commands 10000 (10-10000000),
 *   max_bad_commands 20 (1-1000)
 *   hostname      the greeting's and Received's name (default: helo)
 *   add_message_id true, add_date true (when the message has none)
 *   meta          { key = string | number | boolean, ... } added to every
 *                 message's meta (not via, client, user: those are set)
 *   timeout       "5m" per command (1s-1h), data_timeout "3m" per DATA
 *                 block (1s-1h), redis_timeout "30s" from the final dot to
 *                 Redis' answer (1s-10m)
 *   auth_threads  2 (1-16) threads that check AUTH passwords off the event
 *                 loop; auth_queue 64 (1-10000) checks queued or running,
 *                 past that AUTH gets 454 4.7.0
 *
 * Besides relayq.*, a config file can read the environment with
 * relayq.getenv(name [, default]).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "relayq/policy.h"
#include "relayq/tls.h"  /* enum rq_tls_mode, rq_tls_mode_name/parse */

struct rq_policy_lua;

struct rq_timeouts {
	double connect, greeting, helo, mail, rcpt, data, data_block, dot, quit,
		idle;
};

/* Per-domain settings (relayq.on_domain). A field is used only when its
 * has_ flag (for backoff / expire: its bit in set) is set; otherwise the
 * global value applies, wherever relayq.backoff / expire are in the file.
 * Use rq_config_params for the merged backoff / expire. */
enum {
	RQ_CONFIG_SET_FIRST = 1 << 0,
	RQ_CONFIG_SET_FACTOR = 1 << 1,
	RQ_CONFIG_SET_MAX = 1 << 2,
	RQ_CONFIG_SET_JITTER = 1 << 3,
	RQ_CONFIG_SET_MAX_AGE = 1 << 4,
	RQ_CONFIG_SET_MAX_ATTEMPTS = 1 << 5,
};

struct rq_config_domain {
	char *name;                /* lower case */
	int line;
	bool has_per_destination, has_messages_per_connection,
		has_recipients_per_transaction, has_backoff, has_expire;
	int per_destination;
	int messages_per_connection;
	int recipients_per_transaction;
	unsigned set;                    /* RQ_CONFIG_SET_* */
	struct rq_policy_params params;  /* the fields in set */
};

#define RQ_CONFIG_QUEUES_MAX 64
#define RQ_CONFIG_LISTEN_MAX 16
#define RQ_CONFIG_TRUSTED_MAX 256

/* One relayq.listen call (listen.h has what each setting does). */
struct rq_config_listen {
	int line;
	char *address;
	char *trusted[RQ_CONFIG_TRUSTED_MAX];
	size_t ntrusted;
	char *queue;               /* NULL: the config's first queue */
	char *tls_cert;
	char *tls_key;
	bool implicit_tls;
	char *auth_file;
	bool auth_allow_plaintext;
	double max_size;           /* bytes */
	int max_recipients;
	int max_connections;
	int max_per_ip;
	int max_commands;
	int max_bad_commands;
	int auth_threads;
	int auth_queue;
	char *hostname;            /* NULL: the config's helo */
	bool add_message_id;
	bool add_date;
	char *meta_json;           /* a JSON object, or NULL */
	double timeout, data_timeout, redis_timeout;  /* seconds */
};

struct rq_config {
	char *path;                /* the file it came from, or NULL */
	char *redis;
	/* The Redis password sources besides the URL, for rq_queue_opts
	 * (user, password_file, password_env); NULL when not set. The file is
	 * not read here: the queue client reads it (and the variable) when it
	 * is created. */
	char *redis_user;
	char *redis_password_file;
	char *redis_password_env;
	char *queues[RQ_CONFIG_QUEUES_MAX];
	size_t nqueues;
	char *relay_host;          /* NULL = MX delivery */
	int relay_port;
	bool relay_mx;             /* "host:port": MX lookup of relay_host */
	enum rq_tls_mode tls;
	char *tls_ca_file;
	bool tls_verify;
	bool auth;
	char *auth_user;
	char *auth_password;       /* secret: never log; zeroed on destroy */
	bool auth_allow_plaintext;
	char *helo;
	int connections;
	int per_destination;
	int messages_per_connection;
	int recipients_per_transaction;
	int batch;
	double lease;
	struct rq_timeouts timeouts;
	int log_format;            /* enum rq_log_format */
	int log_level;             /* enum rq_log_level */
	long events_cap;
	bool bounce;
	bool chunking;             /* BDAT when a server offers CHUNKING */
	char *metrics;             /* NULL = off */
	struct rq_policy_params params;
	struct rq_config_domain *domains;
	size_t ndomains;
	struct rq_config_listen listens[RQ_CONFIG_LISTEN_MAX];
	size_t nlistens;
	struct rq_policy_lua *lua; /* owned; NULL = built-in policy only */
	/* How rq_config_destroy frees lua: set by whoever makes it
	 * (config_lua), so config.c knows nothing of Lua. */
	void (*lua_destroy)(struct rq_policy_lua *lua);
	unsigned load_flags;        /* RQ_CONFIG_LOAD_* it was loaded with */
};

/* Problems found while loading, each with the file's line (0 = none). */
#define RQ_CONFIG_PROBLEMS_MAX 32
#define RQ_CONFIG_PROBLEM_LEN 240

struct rq_config_problem {
	int line;
	bool warning;
	char msg[RQ_CONFIG_PROBLEM_LEN];
};

struct rq_config_diag {
	char file[256];
	size_t n;                  /* kept problems */
	size_t errors;             /* all errors, kept or not */
	size_t warnings;
	struct rq_config_problem items[RQ_CONFIG_PROBLEMS_MAX];
};

void rq_config_diag_init(struct rq_config_diag *d, const char *file);
/* Records a problem (printf format). */
void rq_config_diag_add(struct rq_config_diag *d, int line, bool warning,
			const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* Writes "file:line: error: msg" lines to f. */
void rq_config_diag_print(const struct rq_config_diag *d, FILE *f);

/* A config with every default and no Lua policy; NULL on allocation
 * failure. The caller frees it with rq_config_destroy. */
struct rq_config *rq_config_create(void);
/* Frees everything, the Lua policy too (through cfg->lua_destroy; password
 * zeroed). NULL: no-op. */
void rq_config_destroy(struct rq_config *cfg);

/* Flags of rq_config_lua_load (config_lua.h), kept in load_flags. */
enum {
	/* The caller never sends mail (the relayq CLI): the SMTP AUTH password
	 * is neither read nor required, so an operator who may read the
	 * config but not the relay's secret can still use `relayq -c`. */
	RQ_CONFIG_LOAD_NO_SMTP_SECRET = 1u << 0,
};

/*
 * Checks that need the whole file (after every section ran): each
 * domain's merged backoff. Problems go to diag. Returns 0, or -1 when it
 * added an error.
 */
int rq_config_validate(struct rq_config *cfg, struct rq_config_diag *diag);

/* The policy parameters for a recipient domain (global ones, with the
 * domain's backoff / expire when it has them). domain may be NULL. */
void rq_config_params(const struct rq_config *cfg, const char *domain,
		      struct rq_policy_params *out);
/* Connection limits for a recipient domain: the global ones, with the
 * domain's overrides. domain may be NULL. */
struct rq_config_limits {
	int per_destination;
	int messages_per_connection;
	int recipients_per_transaction;
};
void rq_config_limits(const struct rq_config *cfg, const char *domain,
		      struct rq_config_limits *out);

/* The on_domain entry for a domain (case-insensitive), or NULL. */
const struct rq_config_domain *rq_config_domain(const struct rq_config *cfg,
						const char *domain);


/*
 * Settings as the Lua loader hands them over: config_lua.c walks the tables
 * and calls rq_config_apply for every key (nested keys dotted:
 * "timeouts.rcpt", "auth.user"; array items as "queue[]"), a table value
 * first as RQ_CONFIG_TABLE (return -1 to skip its contents).
 */
enum rq_config_vtype {
	RQ_CONFIG_NIL = 0,
	RQ_CONFIG_BOOL,
	RQ_CONFIG_NUMBER,
	RQ_CONFIG_STRING,
	RQ_CONFIG_TABLE,
	RQ_CONFIG_OTHER,           /* function, userdata, ...: always wrong */
};

struct rq_config_value {
	enum rq_config_vtype type;
	bool b;
	double num;
	const char *str;           /* STRING: NUL-ended (len bytes) */
	size_t len;
};

enum rq_config_section {
	RQ_CONFIG_SEC_CONFIG = 0,  /* relayq.config */
	RQ_CONFIG_SEC_BACKOFF,     /* relayq.backoff */
	RQ_CONFIG_SEC_EXPIRE,      /* relayq.expire */
	RQ_CONFIG_SEC_DOMAIN,      /* relayq.on_domain settings */
	RQ_CONFIG_SEC_LISTEN,      /* relayq.listen: one listener */
};

/* Starts a section (a second relayq.config etc. is an error). For DOMAIN,
 * name is the domain (validated; a repeated domain is an error). Returns 0,
 * or -1 (problem recorded) to skip the section. */
int rq_config_section_begin(struct rq_config *cfg, enum rq_config_section sec,
			    const char *name, int line,
			    struct rq_config_diag *diag);
/* Applies one key of the current section: looked up in the section's key
 * table (name, type, field, bounds), checked, stored. An unknown key's
 * message lists the keys of its table. Returns 0, or -1 with a problem
 * recorded. */
int rq_config_apply(struct rq_config *cfg, enum rq_config_section sec,
		    const char *key, const struct rq_config_value *v, int line,
		    struct rq_config_diag *diag);
/* Ends a section: cross-key checks (backoff max >= first, auth ...). */
void rq_config_section_end(struct rq_config *cfg, enum rq_config_section sec,
			   int line, struct rq_config_diag *diag);

#endif

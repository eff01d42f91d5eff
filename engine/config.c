/*
 * config: the daemon's settings. Defaults, one key at a time from a table
 * (name, type, field, bounds), the checks across keys, and the look-ups
 * the rest of the engine uses. No Lua: config_lua reads the file.
 */
#include "relayq/config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "relayq/credentials.h"
#include "relayq/json.h"
#include "relayq/keys.h"
#include "relayq/listen.h"
#include "relayq/log.h"
#include "relayq/redis_url.h"
#include "relayq/secret.h"
#include "relayq/str.h"

/* Where relayq.config / backoff / expire were called, to refuse a second
 * call; and the password sources until the auth table is complete. Kept
 * out of the public struct. */
struct config_private {
	int section_line[3];
	char *password_file;
	char *password_env;
	bool password_literal;
	int auth_line;
};

/* The public struct is followed in memory by the private part. */
struct config_box {
	struct rq_config cfg;
	struct config_private priv;
};

static struct config_private *priv(struct rq_config *cfg)
{
	return &((struct config_box *)cfg)->priv;
}

/* ---- diagnostics ---- */

void rq_config_diag_init(struct rq_config_diag *d, const char *file)
{
	memset(d, 0, sizeof(*d));
	snprintf(d->file, sizeof(d->file), "%s", file ? file : "config");
}

void rq_config_diag_add(struct rq_config_diag *d, int line, bool warning,
			const char *fmt, ...)
{
	if (!d)
		return;
	if (warning)
		d->warnings++;
	else
		d->errors++;
	if (d->n >= RQ_CONFIG_PROBLEMS_MAX)
		return;
	struct rq_config_problem *p = &d->items[d->n++];
	p->line = line;
	p->warning = warning;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(p->msg, sizeof(p->msg), fmt, ap);
	va_end(ap);
	rq_str_one_line(p->msg);
}

void rq_config_diag_print(const struct rq_config_diag *d, FILE *f)
{
	/* By line, stable: problems come in table order from Lua. */
	size_t order[RQ_CONFIG_PROBLEMS_MAX];
	for (size_t i = 0; i < d->n; i++)
		order[i] = i;
	for (size_t i = 1; i < d->n; i++) {
		size_t v = order[i], j = i;
		while (j > 0 && d->items[order[j - 1]].line > d->items[v].line) {
			order[j] = order[j - 1];
			j--;
		}
		order[j] = v;
	}
	for (size_t i = 0; i < d->n; i++) {
		const struct rq_config_problem *p = &d->items[order[i]];
		if (p->line > 0)
			fprintf(f, "%s:%d: %s: %s\n", d->file, p->line,
				p->warning ? "warning" : "error", p->msg);
		else
			fprintf(f, "%s: %s: %s\n", d->file,
				p->warning ? "warning" : "error", p->msg);
	}
	size_t total = d->errors + d->warnings;
	if (total > d->n)
		fprintf(f, "%s: %zu more problems not shown\n", d->file, total - d->n);
}

/* ---- create / destroy ---- */

static char *default_helo(void)
{
	char name[256];
	if (gethostname(name, sizeof(name)) != 0 || name[0] == '\0')
		return strdup("localhost");
	name[sizeof(name) - 1] = '\0';
	return strdup(name);
}

void rq_config_destroy(struct rq_config *cfg)
{
	if (!cfg)
		return;
	struct config_private *p = priv(cfg);
	if (cfg->lua && cfg->lua_destroy)
		cfg->lua_destroy(cfg->lua);
	free(cfg->path);
	rq_secret_free(cfg->redis);
	free(cfg->redis_user);
	free(cfg->redis_password_file);
	free(cfg->redis_password_env);
	for (size_t i = 0; i < cfg->nqueues; i++)
		free(cfg->queues[i]);
	free(cfg->relay_host);
	free(cfg->tls_ca_file);
	free(cfg->auth_user);
	rq_secret_free(cfg->auth_password);
	free(cfg->helo);
	free(cfg->metrics);
	for (size_t i = 0; i < cfg->ndomains; i++)
		free(cfg->domains[i].name);
	free(cfg->domains);
	for (size_t i = 0; i < cfg->nlistens; i++) {
		struct rq_config_listen *l = &cfg->listens[i];
		free(l->address);
		for (size_t k = 0; k < l->ntrusted; k++)
			free(l->trusted[k]);
		free(l->queue);
		free(l->tls_cert);
		free(l->tls_key);
		free(l->auth_file);
		free(l->hostname);
		free(l->meta_json);
	}
	free(p->password_file);
	free(p->password_env);
	free(cfg);
}

struct rq_config *rq_config_create(void)
{
	struct config_box *box = calloc(1, sizeof(*box));
	if (!box)
		return NULL;
	struct rq_config *cfg = &box->cfg;
	cfg->redis = strdup(RQ_REDIS_URL_DEFAULT);
	cfg->queues[0] = strdup(RQ_KEYS_QUEUE_DEFAULT);
	cfg->nqueues = 1;
	cfg->helo = default_helo();
	if (!cfg->redis || !cfg->queues[0] || !cfg->helo)
		goto fail;
	cfg->relay_port = 25;
	cfg->tls = RQ_TLS_OPPORTUNISTIC;
	cfg->tls_verify = true;
	cfg->connections = 100;
	cfg->per_destination = 20;
	cfg->messages_per_connection = 100;
	cfg->recipients_per_transaction = 100;
	cfg->batch = 100;
	cfg->lease = 300;
	cfg->timeouts = (struct rq_timeouts){
		.connect = 30, .greeting = 300, .helo = 300, .mail = 300,
		.rcpt = 300, .data = 120, .data_block = 180, .dot = 600,
		.quit = 20, .idle = 10,
	};
	cfg->log_format = RQ_LOG_LOGFMT;
	cfg->log_level = RQ_LOG_INFO;
	cfg->events_cap = 100000;
	cfg->bounce = false;
	cfg->chunking = true;
	rq_policy_params_default(&cfg->params);
	return cfg;
fail:
	rq_config_destroy(cfg);
	return NULL;
}

/* ---- value helpers ---- */

struct key;

/* What the checks of one key get: the config, the key and the field it
 * fills, the name shown in messages, the value and its line. */
struct key_arg {
	struct rq_config *cfg;
	const struct key *k;
	void *field;
	const char *shown;
	const struct rq_config_value *v;
	int line;
	struct rq_config_diag *diag;
};

static const char *vtype_name(enum rq_config_vtype t)
{
	switch (t) {
	case RQ_CONFIG_NIL: return "nil";
	case RQ_CONFIG_BOOL: return "boolean";
	case RQ_CONFIG_NUMBER: return "number";
	case RQ_CONFIG_STRING: return "string";
	case RQ_CONFIG_TABLE: return "table";
	case RQ_CONFIG_OTHER: break;
	}
	return "function or other value";
}

static int want(const struct key_arg *a, enum rq_config_vtype t)
{
	if (a->v->type == t)
		return 0;
	rq_config_diag_add(a->diag, a->line, false, "%s: expected a %s, got a %s", a->shown,
			   vtype_name(t), vtype_name(a->v->type));
	return -1;
}

/* A string without NUL or control bytes, 1..max bytes. */
static int get_str(const struct key_arg *a, size_t max, char **out)
{
	if (want(a, RQ_CONFIG_STRING) < 0)
		return -1;
	if (a->v->len == 0 || a->v->len > max) {
		rq_config_diag_add(a->diag, a->line, false, "%s: must be 1 to %zu bytes long",
				   a->shown, max);
		return -1;
	}
	for (size_t i = 0; i < a->v->len; i++) {
		unsigned char c = (unsigned char)a->v->str[i];
		if (c < 0x20 || c == 0x7f) {
			rq_config_diag_add(a->diag, a->line, false,
					   "%s: control character in value", a->shown);
			return -1;
		}
	}
	char *s = strdup(a->v->str);
	if (!s) {
		rq_config_diag_add(a->diag, a->line, false, "%s: out of memory", a->shown);
		return -1;
	}
	if (out) {
		free(*out);
		*out = s;
	} else {
		free(s);
	}
	return 0;
}

static int get_int(const struct key_arg *a, long lo, long hi, long *out)
{
	if (want(a, RQ_CONFIG_NUMBER) < 0)
		return -1;
	if (!isfinite(a->v->num) || a->v->num != floor(a->v->num)) {
		rq_config_diag_add(a->diag, a->line, false, "%s: expected an integer, got %g",
				   a->shown, a->v->num);
		return -1;
	}
	if (a->v->num < (double)lo || a->v->num > (double)hi) {
		rq_config_diag_add(a->diag, a->line, false,
				   "%s: %g is out of range (%ld to %ld)", a->shown, a->v->num,
				   lo, hi);
		return -1;
	}
	*out = (long)a->v->num;
	return 0;
}

static int set_int(const struct key_arg *a, long lo, long hi, int *out)
{
	long n;
	if (get_int(a, lo, hi, &n) < 0)
		return -1;
	*out = (int)n;
	return 0;
}

static int get_num(const struct key_arg *a, double lo, double hi, double *out)
{
	if (want(a, RQ_CONFIG_NUMBER) < 0)
		return -1;
	if (!isfinite(a->v->num) || a->v->num < lo || a->v->num > hi) {
		rq_config_diag_add(a->diag, a->line, false, "%s: %g is out of range (%g to %g)",
				   a->shown, a->v->num, lo, hi);
		return -1;
	}
	*out = a->v->num;
	return 0;
}

static int get_bool(const struct key_arg *a, bool *out)
{
	if (want(a, RQ_CONFIG_BOOL) < 0)
		return -1;
	*out = a->v->b;
	return 0;
}

/* A duration (number of seconds or "5m"), in [lo, hi]. */
static int get_dur(const struct key_arg *a, double lo, double hi, double *out)
{
	double d;
	if (a->v->type == RQ_CONFIG_NUMBER) {
		d = a->v->num;
		if (!isfinite(d) || d < 0) {
			rq_config_diag_add(a->diag, a->line, false,
					   "%s: a duration must be a number of seconds >= 0",
					   a->shown);
			return -1;
		}
	} else if (a->v->type == RQ_CONFIG_STRING) {
		if (strlen(a->v->str) != a->v->len || rq_duration_parse(a->v->str, &d) < 0) {
			rq_config_diag_add(a->diag, a->line, false,
					   "%s: \"%.40s\" is not a duration (like 30s, 5m, 2h, 5d)",
					   a->shown, a->v->str);
			return -1;
		}
	} else {
		rq_config_diag_add(a->diag, a->line, false,
				   "%s: expected a duration (number or string), got a %s",
				   a->shown, vtype_name(a->v->type));
		return -1;
	}
	if (d < lo || d > hi) {
		char got[32], b[32], c[32];
		rq_duration_format(d, got, sizeof(got));
		rq_duration_format(lo, b, sizeof(b));
		rq_duration_format(hi, c, sizeof(c));
		rq_config_diag_add(a->diag, a->line, false, "%s: %s is out of range (%s to %s)",
				   a->shown, got, b, c);
		return -1;
	}
	*out = d;
	return 0;
}

/* ---- syntax checks of addresses ---- */

static bool host_ok(const char *h, size_t len, bool bracketed)
{
	if (len == 0 || len > 255)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)h[i];
		if (isalnum(c) || c == '.' || c == '-' || c == '_')
			continue;
		if (bracketed && c == ':')
			continue;
		return false;
	}
	return true;
}

static bool port_ok(const char *s, int *port)
{
	if (!*s || strlen(s) > 5)
		return false;
	for (const char *p = s; *p; p++)
		if (!isdigit((unsigned char)*p))
			return false;
	int n = atoi(s);
	if (n < 1 || n > 65535)
		return false;
	*port = n;
	return true;
}

/*
 * "[host]:port", "[host]", "host:port", "host". Returns 0 and a malloc'd
 * host, or -1.
 */
static int parse_hostport(const char *s, bool port_required, char **host,
			  int *port, bool *bracketed)
{
	const char *h = s, *rest;
	size_t hlen;
	*bracketed = false;
	if (*s == '[') {
		const char *close = strchr(s, ']');
		if (!close)
			return -1;
		h = s + 1;
		hlen = (size_t)(close - h);
		rest = close + 1;
		*bracketed = true;
	} else {
		const char *colon = strchr(s, ':');
		hlen = colon ? (size_t)(colon - s) : strlen(s);
		rest = s + hlen;
	}
	if (!host_ok(h, hlen, *bracketed))
		return -1;
	if (*rest == ':') {
		if (!port_ok(rest + 1, port))
			return -1;
	} else if (*rest != '\0' || port_required) {
		return -1;
	}
	*host = strndup(h, hlen);
	return *host ? 0 : -1;
}

static bool domain_ok(const char *s, size_t len)
{
	if (len == 0 || len > 253 || s[0] == '.' || s[0] == '-')
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!(isalnum(c) || c == '.' || c == '-' || c == '_'))
			return false;
	}
	return true;
}

/* ---- sections ---- */

int rq_config_section_begin(struct rq_config *cfg, enum rq_config_section sec,
			    const char *name, int line,
			    struct rq_config_diag *diag)
{
	static const char *const fn[] = {"relayq.config", "relayq.backoff",
					 "relayq.expire"};
	struct config_private *p = priv(cfg);
	if (sec == RQ_CONFIG_SEC_LISTEN) {
		if (cfg->nlistens >= RQ_CONFIG_LISTEN_MAX) {
			rq_config_diag_add(diag, line, false, "relayq.listen: more than %d listeners",
					   RQ_CONFIG_LISTEN_MAX);
			return -1;
		}
		struct rq_config_listen *l = &cfg->listens[cfg->nlistens++];
		memset(l, 0, sizeof(*l));
		l->line = line;
		l->max_size = (double)RQ_LISTEN_MAX_SIZE_DEFAULT;
		l->max_recipients = 1000;
		l->max_connections = 1000;
		l->max_per_ip = 50;
		l->max_commands = 10000;
		l->max_bad_commands = 20;
		l->auth_threads = 2;
		l->auth_queue = 64;
		l->add_message_id = true;
		l->add_date = true;
		l->timeout = 300;
		l->data_timeout = 180;
		l->redis_timeout = 30;
		return 0;
	}
	if (sec != RQ_CONFIG_SEC_DOMAIN) {
		if (p->section_line[sec] != 0) {
			rq_config_diag_add(diag, line, false,
					   "%s called again (first at line %d)", fn[sec],
					   p->section_line[sec]);
			return -1;
		}
		p->section_line[sec] = line > 0 ? line : -1;
		if (sec == RQ_CONFIG_SEC_CONFIG) {
			/* A list given in the file replaces the default queue. */
			for (size_t i = 0; i < cfg->nqueues; i++)
				free(cfg->queues[i]);
			cfg->nqueues = 0;
		}
		return 0;
	}
	size_t len = name ? strlen(name) : 0;
	if (!name || !domain_ok(name, len)) {
		rq_config_diag_add(diag, line, false,
				   "relayq.on_domain: \"%.60s\" is not a domain name",
				   name ? name : "");
		return -1;
	}
	const struct rq_config_domain *old = rq_config_domain(cfg, name);
	if (old) {
		rq_config_diag_add(diag, line, false,
				   "relayq.on_domain(\"%s\") called again (first at line %d)",
				   old->name, old->line);
		return -1;
	}
	struct rq_config_domain *d = realloc(cfg->domains,
					     (cfg->ndomains + 1) * sizeof(*d));
	if (!d) {
		rq_config_diag_add(diag, line, false, "out of memory");
		return -1;
	}
	cfg->domains = d;
	d = &cfg->domains[cfg->ndomains];
	memset(d, 0, sizeof(*d));
	d->name = strdup(name);
	if (!d->name) {
		rq_config_diag_add(diag, line, false, "out of memory");
		return -1;
	}
	for (char *c = d->name; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	d->line = line;
	d->params = cfg->params;
	cfg->ndomains++;
	return 0;
}


/* ---- the keys ----
 *
 * Every key of every section in a table: its dotted name, its type, the
 * field it fills (an offset into the section's struct), its bounds, and
 * for the few that need more than a type check a function. The unknown
 * key messages list the keys of the table they were looked for in.
 */

enum ktype {
	K_TABLE = 0,   /* a table (its keys follow); fn runs after */
	K_BOOL,        /* bool */
	K_INT,         /* int in [lo, hi] */
	K_LONG,        /* long in [lo, hi] */
	K_COUNT,       /* unsigned in [lo, hi] */
	K_NUM,         /* double in [lo, hi] */
	K_DUR,         /* double seconds in [lo, hi], number or "5m" */
	K_STR,         /* char *, 1..hi bytes, no control bytes; fn checks after */
	K_FN,          /* fn does it all */
};

typedef int (*key_fn)(const struct key_arg *a);

struct key {
	const char *name;
	enum ktype type;
	size_t field;      /* offset in the section's struct */
	double lo, hi;
	key_fn fn;
	unsigned set;      /* RQ_CONFIG_SET_* marked in a domain's set */
	bool has;          /* has_field: offset of a bool set true on success */
	size_t has_field;
};

static void *at(void *base, size_t off)
{
	return (char *)base + off;
}

/* relayq.config: fields of struct config_box (the public struct first). */
#define C(f) offsetof(struct config_box, cfg.f)
#define P(f) offsetof(struct config_box, priv.f)
/* relayq.listen. */
#define L(f) offsetof(struct rq_config_listen, f)
/* relayq.backoff / expire and a domain's backoff / expire. */
#define PP(f) offsetof(struct rq_policy_params, f)
/* relayq.on_domain. */
#define D(f) offsetof(struct rq_config_domain, f)

#define DAY 86400.0
#define PER_DESTINATION_MAX 10000
#define MESSAGES_PER_CONNECTION_MAX 1000000
#define RECIPIENTS_PER_TRANSACTION_MAX 100000

static int key_queue(const struct key_arg *);
static int key_redis(const struct key_arg *);
static int key_relay(const struct key_arg *);
static int key_tls(const struct key_arg *);
static int key_readable(const struct key_arg *);
static int key_helo(const struct key_arg *);
static int key_log_format(const struct key_arg *);
static int key_log_level(const struct key_arg *);
static int key_metrics(const struct key_arg *);
static int key_auth(const struct key_arg *);
static int key_password(const struct key_arg *);
static int key_listen_address(const struct key_arg *);
static int key_listen_trusted(const struct key_arg *);
static int key_listen_queue(const struct key_arg *);
static int key_listen_size(const struct key_arg *);
static int key_listen_meta(const struct key_arg *);

static const struct key config_keys[] = {
	{"queue", K_FN, 0, 0, 0, key_queue, 0, false, 0},
	{"queue[]", K_FN, 0, 0, 0, key_queue, 0, false, 0},
	{"redis", K_FN, C(redis), 0, 1024, key_redis, 0, false, 0},
	{"redis_user", K_STR, C(redis_user), 0, RQ_REDIS_URL_USER_MAX, NULL, 0, false, 0},
	{"redis_password_file", K_STR, C(redis_password_file), 0, 4096, NULL, 0, false, 0},
	{"redis_password_env", K_STR, C(redis_password_env), 0, 255, NULL, 0, false, 0},
	{"relay", K_FN, 0, 0, 300, key_relay, 0, false, 0},
	{"tls", K_FN, C(tls), 0, 0, key_tls, 0, false, 0},
	{"tls_ca_file", K_STR, C(tls_ca_file), 0, 4096, key_readable, 0, false, 0},
	{"tls_verify", K_BOOL, C(tls_verify), 0, 0, NULL, 0, false, 0},
	{"auth", K_TABLE, 0, 0, 0, key_auth, 0, false, 0},
	{"auth.user", K_STR, C(auth_user), 0, 255, NULL, 0, false, 0},
	{"auth.password_file", K_STR, P(password_file), 0, 4096, NULL, 0, false, 0},
	{"auth.password_env", K_STR, P(password_env), 0, 255, NULL, 0, false, 0},
	{"auth.password", K_FN, C(auth_password), 0, 1024, key_password, 0, false, 0},
	{"auth.allow_plaintext", K_BOOL, C(auth_allow_plaintext), 0, 0, NULL, 0, false, 0},
	{"helo", K_FN, C(helo), 0, 255, key_helo, 0, false, 0},
	{"connections", K_INT, C(connections), 1, 100000, NULL, 0, false, 0},
	{"per_destination", K_INT, C(per_destination), 1, PER_DESTINATION_MAX,
	 NULL, 0, false, 0},
	{"messages_per_connection", K_INT, C(messages_per_connection), 1,
	 MESSAGES_PER_CONNECTION_MAX, NULL, 0, false, 0},
	{"recipients_per_transaction", K_INT, C(recipients_per_transaction), 1,
	 RECIPIENTS_PER_TRANSACTION_MAX, NULL, 0, false, 0},
	{"batch", K_INT, C(batch), 1, 10000, NULL, 0, false, 0},
	{"lease", K_DUR, C(lease), 10, DAY, NULL, 0, false, 0},
	{"timeouts", K_TABLE, 0, 0, 0, NULL, 0, false, 0},
	{"timeouts.connect", K_DUR, C(timeouts.connect), 1, 3600, NULL, 0, false, 0},
	{"timeouts.greeting", K_DUR, C(timeouts.greeting), 1, 3600, NULL, 0, false, 0},
	{"timeouts.helo", K_DUR, C(timeouts.helo), 1, 3600, NULL, 0, false, 0},
	{"timeouts.mail", K_DUR, C(timeouts.mail), 1, 3600, NULL, 0, false, 0},
	{"timeouts.rcpt", K_DUR, C(timeouts.rcpt), 1, 3600, NULL, 0, false, 0},
	{"timeouts.data", K_DUR, C(timeouts.data), 1, 3600, NULL, 0, false, 0},
	{"timeouts.data_block", K_DUR, C(timeouts.data_block), 1, 3600, NULL, 0, false, 0},
	{"timeouts.dot", K_DUR, C(timeouts.dot), 1, 3600, NULL, 0, false, 0},
	{"timeouts.quit", K_DUR, C(timeouts.quit), 1, 3600, NULL, 0, false, 0},
	{"timeouts.idle", K_DUR, C(timeouts.idle), 0, 3600, NULL, 0, false, 0},
	{"log_format", K_FN, C(log_format), 0, 0, key_log_format, 0, false, 0},
	{"log_level", K_FN, C(log_level), 0, 0, key_log_level, 0, false, 0},
	{"events_cap", K_LONG, C(events_cap), 0, 100000000, NULL, 0, false, 0},
	{"bounce", K_BOOL, C(bounce), 0, 0, NULL, 0, false, 0},
	{"chunking", K_BOOL, C(chunking), 0, 0, NULL, 0, false, 0},
	{"metrics", K_FN, C(metrics), 0, 300, key_metrics, 0, false, 0},
};

static const struct key params_keys[] = {
	{"backoff.first", K_DUR, PP(backoff.first), 1, 30 * DAY, NULL,
	 RQ_CONFIG_SET_FIRST, false, 0},
	{"backoff.factor", K_NUM, PP(backoff.factor), 1, 100, NULL,
	 RQ_CONFIG_SET_FACTOR, false, 0},
	{"backoff.max", K_DUR, PP(backoff.max), 1, 30 * DAY, NULL,
	 RQ_CONFIG_SET_MAX, false, 0},
	{"backoff.jitter", K_NUM, PP(backoff.jitter), 0, 1, NULL,
	 RQ_CONFIG_SET_JITTER, false, 0},
	{"expire.max_age", K_DUR, PP(expire.max_age), 60, 366 * DAY, NULL,
	 RQ_CONFIG_SET_MAX_AGE, false, 0},
	{"expire.max_attempts", K_COUNT, PP(expire.max_attempts), 1, 100000, NULL,
	 RQ_CONFIG_SET_MAX_ATTEMPTS, false, 0},
};

static const struct key domain_keys[] = {
	{"per_destination", K_INT, D(per_destination), 1, PER_DESTINATION_MAX,
	 NULL, 0, true, D(has_per_destination)},
	{"messages_per_connection", K_INT, D(messages_per_connection), 1,
	 MESSAGES_PER_CONNECTION_MAX, NULL, 0, true, D(has_messages_per_connection)},
	{"recipients_per_transaction", K_INT, D(recipients_per_transaction), 1,
	 RECIPIENTS_PER_TRANSACTION_MAX, NULL, 0, true, D(has_recipients_per_transaction)},
	{"backoff", K_TABLE, 0, 0, 0, NULL, 0, true, D(has_backoff)},
	{"expire", K_TABLE, 0, 0, 0, NULL, 0, true, D(has_expire)},
};

static const struct key listen_keys[] = {
	{"[1]", K_FN, L(address), 0, 300, key_listen_address, 0, false, 0},
	{"trusted", K_FN, 0, 0, 0, key_listen_trusted, 0, false, 0},
	{"trusted[]", K_FN, 0, 0, 0, key_listen_trusted, 0, false, 0},
	{"queue", K_FN, L(queue), 0, 0, key_listen_queue, 0, false, 0},
	{"tls_cert", K_STR, L(tls_cert), 0, 4096, key_readable, 0, false, 0},
	{"tls_key", K_STR, L(tls_key), 0, 4096, key_readable, 0, false, 0},
	{"implicit_tls", K_BOOL, L(implicit_tls), 0, 0, NULL, 0, false, 0},
	{"auth_file", K_STR, L(auth_file), 0, 4096, key_readable, 0, false, 0},
	{"auth_allow_plaintext", K_BOOL, L(auth_allow_plaintext), 0, 0, NULL, 0, false, 0},
	{"max_size", K_FN, L(max_size), 1024, 500.0 * 1024 * 1024, key_listen_size, 0, false, 0},
	{"max_recipients", K_INT, L(max_recipients), 1, 100000, NULL, 0, false, 0},
	{"max_connections", K_INT, L(max_connections), 1, 100000, NULL, 0, false, 0},
	{"max_per_ip", K_INT, L(max_per_ip), 1, 100000, NULL, 0, false, 0},
	{"max_commands", K_INT, L(max_commands), 10, 10000000, NULL, 0, false, 0},
	{"max_bad_commands", K_INT, L(max_bad_commands), 1, 1000, NULL, 0, false, 0},
	{"auth_threads", K_INT, L(auth_threads), 1, 16, NULL, 0, false, 0},
	{"auth_queue", K_INT, L(auth_queue), 1, 10000, NULL, 0, false, 0},
	{"hostname", K_FN, L(hostname), 0, 255, key_helo, 0, false, 0},
	{"add_message_id", K_BOOL, L(add_message_id), 0, 0, NULL, 0, false, 0},
	{"add_date", K_BOOL, L(add_date), 0, 0, NULL, 0, false, 0},
	{"meta", K_TABLE, 0, 0, 0, NULL, 0, false, 0},
	{"timeout", K_DUR, L(timeout), 1, 3600, NULL, 0, false, 0},
	{"data_timeout", K_DUR, L(data_timeout), 1, 3600, NULL, 0, false, 0},
	{"redis_timeout", K_DUR, L(redis_timeout), 1, 600, NULL, 0, false, 0},
};

#define NKEYS(t) (sizeof(t) / sizeof((t)[0]))

static const struct key *key_find(const struct key *t, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(t[i].name, name) == 0)
			return &t[i];
	return NULL;
}

/* "a, b, c": the names in t under prefix ("timeouts.") without it; with
 * prefix "", the names without a dot. */
static void key_list(const struct key *t, size_t n, const char *prefix, char *buf,
		     size_t len)
{
	size_t plen = strlen(prefix), used = 0;
	buf[0] = '\0';
	for (size_t i = 0; i < n; i++) {
		const char *name = t[i].name;
		if (strncmp(name, prefix, plen) != 0 || strchr(name + plen, '.') ||
		    strchr(name + plen, '['))
			continue;
		int w = snprintf(buf + used, len - used, "%s%s", used ? ", " : "",
				 name + plen);
		if (w < 0 || (size_t)w >= len - used)
			return;
		used += (size_t)w;
	}
}

/* Applies the value to the key's field (base: the section's struct). */
static int key_apply(struct rq_config *cfg, const struct key *k, void *base,
		     unsigned *set, void *has_base, const char *shown,
		     const struct rq_config_value *v, int line,
		     struct rq_config_diag *diag)
{
	void *field = at(base, k->field);
	const struct key_arg a = {cfg, k, field, shown, v, line, diag};
	int r = -1;
	long n;
	switch (k->type) {
	case K_TABLE:
		r = want(&a, RQ_CONFIG_TABLE);
		break;
	case K_BOOL:
		r = get_bool(&a, field);
		break;
	case K_INT:
		r = set_int(&a, (long)k->lo, (long)k->hi, field);
		break;
	case K_LONG:
		r = get_int(&a, (long)k->lo, (long)k->hi, field);
		break;
	case K_COUNT:
		r = get_int(&a, (long)k->lo, (long)k->hi, &n);
		if (r == 0)
			*(unsigned *)field = (unsigned)n;
		break;
	case K_NUM:
		r = get_num(&a, k->lo, k->hi, field);
		break;
	case K_DUR:
		r = get_dur(&a, k->lo, k->hi, field);
		break;
	case K_STR:
		r = get_str(&a, (size_t)k->hi, field);
		break;
	case K_FN:
		return k->fn(&a);
	}
	if (r == 0 && k->fn)
		r = k->fn(&a);
	if (r == 0 && set)
		*set |= k->set;
	if (r == 0 && k->has && has_base)
		*(bool *)at(has_base, k->has_field) = true;
	return r;
}

/* ---- keys that need more than a type ---- */

/* A string that is a queue name (relayq.config's and a listener's queue). */
static int get_queue_name(const struct key_arg *a)
{
	if (want(a, RQ_CONFIG_STRING) < 0)
		return -1;
	if (!rq_keys_queue_valid(a->v->str, a->v->len)) {
		rq_config_diag_add(a->diag, a->line, false,
				   "queue: \"%.70s\" is not a queue name (%s)", a->v->str,
				   RQ_KEYS_QUEUE_RULE);
		return -1;
	}
	return 0;
}

static int key_queue(const struct key_arg *a)
{
	if (strcmp(a->k->name, "queue") == 0 && a->v->type == RQ_CONFIG_TABLE)
		return 0;  /* items follow as queue[] */
	struct key_arg item = *a;
	item.shown = "queue";  /* not "queue[]" */
	if (get_queue_name(&item) < 0)
		return -1;
	for (size_t i = 0; i < a->cfg->nqueues; i++) {
		if (strcmp(a->cfg->queues[i], a->v->str) == 0) {
			rq_config_diag_add(a->diag, a->line, false,
					   "queue: \"%s\" listed twice", a->v->str);
			return -1;
		}
	}
	if (a->cfg->nqueues >= RQ_CONFIG_QUEUES_MAX) {
		rq_config_diag_add(a->diag, a->line, false, "queue: more than %d queues",
				   RQ_CONFIG_QUEUES_MAX);
		return -1;
	}
	a->cfg->queues[a->cfg->nqueues] = strdup(a->v->str);
	if (!a->cfg->queues[a->cfg->nqueues])
		return -1;
	a->cfg->nqueues++;
	return 0;
}

static int key_redis(const struct key_arg *a)
{
	char *s = NULL;
	char why[160], red[200];
	struct rq_redis_url u;
	if (get_str(a, (size_t)a->k->hi, &s) < 0)
		return -1;
	if (rq_redis_url_parse(s, &u, why, sizeof(why)) != 0) {
		rq_redis_url_redact(s, red, sizeof(red));
		rq_config_diag_add(a->diag, a->line, false,
				   "redis: \"%.80s\" is not a Redis URL (%s); expected "
				   "redis://[user:password@]host[:port][/db] or "
				   "unix:/path[?db=N]", red, why);
		rq_secret_free(s);
		return -1;
	}
	if (u.has_password)
		rq_config_diag_add(a->diag, a->line, true,
				   "redis: a password in the URL is visible to whoever "
				   "reads this file (consider redis_password_file or "
				   "redis_password_env)");
	rq_redis_url_wipe(&u);
	char **dst = a->field;
	rq_secret_free(*dst);
	*dst = s;
	return 0;
}

/* The string (*s) and its parse_hostport parts; forms for the message. */
static int get_hostport(const struct key_arg *a, bool port_required, const char *forms,
			char **s, char **host, int *port, bool *br)
{
	if (get_str(a, (size_t)a->k->hi, s) < 0)
		return -1;
	if (parse_hostport(*s, port_required, host, port, br) < 0) {
		rq_config_diag_add(a->diag, a->line, false, "%s: \"%.80s\" is not %s",
				   a->shown, *s, forms);
		free(*s);
		return -1;
	}
	return 0;
}

static int key_relay(const struct key_arg *a)
{
	char *s = NULL, *host = NULL;
	int port = 25;
	bool br;
	if (get_hostport(a, false, "\"[host]:port\", \"host:port\" or \"host\"", &s, &host,
			 &port, &br) < 0)
		return -1;
	free(s);
	free(a->cfg->relay_host);
	a->cfg->relay_host = host;
	a->cfg->relay_port = port;
	a->cfg->relay_mx = !br;
	return 0;
}

/* A name that parse turns into a number >= 0; choices for the message. */
static int named(const struct key_arg *a, int (*parse)(const char *), const char *choices)
{
	if (want(a, RQ_CONFIG_STRING) < 0)
		return -1;
	int m = parse(a->v->str);
	if (m < 0)
		rq_config_diag_add(a->diag, a->line, false, "%s: \"%.40s\" is not %s",
				   a->shown, a->v->str, choices);
	return m;
}

static int key_tls(const struct key_arg *a)
{
	int m = named(a, rq_tls_mode_parse, "none, opportunistic, required or implicit");
	if (m < 0)
		return -1;
	*(enum rq_tls_mode *)a->field = (enum rq_tls_mode)m;
	return 0;
}

/* After K_STR: the file must be readable. */
static int key_readable(const struct key_arg *a)
{
	const char *path = *(char **)a->field;
	if (access(path, R_OK) != 0) {
		rq_config_diag_add(a->diag, a->line, false, "%s: cannot read %s: %s", a->shown,
				   path, strerror(errno));
		return -1;
	}
	return 0;
}

static int key_helo(const struct key_arg *a)
{
	char *s = NULL;
	if (get_str(a, (size_t)a->k->hi, &s) < 0)
		return -1;
	bool lit = s[0] == '[';
	if (!lit && !host_ok(s, strlen(s), false)) {
		rq_config_diag_add(a->diag, a->line, false,
				   "helo: \"%.80s\" is not a host name", s);
		free(s);
		return -1;
	}
	char **dst = a->field;
	free(*dst);
	*dst = s;
	return 0;
}

static int key_log_format(const struct key_arg *a)
{
	if (want(a, RQ_CONFIG_STRING) < 0)
		return -1;
	if (strcmp(a->v->str, "logfmt") == 0) {
		*(int *)a->field = RQ_LOG_LOGFMT;
	} else if (strcmp(a->v->str, "json") == 0) {
		*(int *)a->field = RQ_LOG_JSON;
	} else {
		rq_config_diag_add(a->diag, a->line, false,
				   "log_format: \"%.40s\" is not logfmt or json", a->v->str);
		return -1;
	}
	return 0;
}

static int key_log_level(const struct key_arg *a)
{
	int l = named(a, rq_log_level_parse, "debug, info, warn, error or off");
	if (l < 0)
		return -1;
	*(int *)a->field = l;
	return 0;
}

static int key_metrics(const struct key_arg *a)
{
	char *s = NULL, *host = NULL;
	int port = 0;
	bool br;
	if (get_hostport(a, true, "\"host:port\"", &s, &host, &port, &br) < 0)
		return -1;
	free(host);
	char **dst = a->field;
	free(*dst);
	*dst = s;
	return 0;
}

/* After K_TABLE: auth is on; its checks run at the end of the section. */
static int key_auth(const struct key_arg *a)
{
	a->cfg->auth = true;
	priv(a->cfg)->auth_line = a->line;
	return 0;
}

static int key_password(const struct key_arg *a)
{
	if (want(a, RQ_CONFIG_STRING) < 0)
		return -1;
	if (a->v->len == 0 || a->v->len > (size_t)a->k->hi || strlen(a->v->str) != a->v->len) {
		rq_config_diag_add(a->diag, a->line, false,
				   "%s: must be 1 to %zu bytes, no NUL", a->shown,
				   (size_t)a->k->hi);
		return -1;
	}
	char **dst = a->field;
	rq_secret_free(*dst);
	*dst = strdup(a->v->str);
	if (!*dst)
		return -1;
	priv(a->cfg)->password_literal = true;
	rq_config_diag_add(a->diag, a->line, true,
			   "%s: a password in the config file is discouraged "
			   "(use password_file or password_env)", a->shown);
	return 0;
}

/* ---- relayq.listen ---- */

static struct rq_config_listen *cur_listen(struct rq_config *cfg)
{
	return cfg->nlistens ? &cfg->listens[cfg->nlistens - 1] : NULL;
}

static int key_listen_address(const struct key_arg *a)
{
	char *s = NULL, err[160];
	struct sockaddr_storage ss;
	socklen_t len;
	struct key_arg b = *a;
	b.shown = "relayq.listen address";
	if (get_str(&b, (size_t)a->k->hi, &s) < 0)
		return -1;
	if (rq_listen_addr_parse(s, &ss, &len, err, sizeof(err)) < 0) {
		rq_config_diag_add(a->diag, a->line, false, "relayq.listen: %s", err);
		free(s);
		return -1;
	}
	unsigned port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						       : ((struct sockaddr_in *)&ss)->sin_port);
	if (port == 0) {
		rq_config_diag_add(a->diag, a->line, false,
				   "relayq.listen: \"%s\": the port must be 1 to 65535", s);
		free(s);
		return -1;
	}
	for (size_t i = 0; i + 1 < a->cfg->nlistens; i++) {
		if (a->cfg->listens[i].address && strcmp(a->cfg->listens[i].address, s) == 0) {
			rq_config_diag_add(a->diag, a->line, false,
					   "relayq.listen: \"%s\" listed twice (first at line %d)",
					   s, a->cfg->listens[i].line);
			free(s);
			return -1;
		}
	}
	char **dst = a->field;
	free(*dst);
	*dst = s;
	return 0;
}

static int key_listen_trusted(const struct key_arg *a)
{
	struct rq_config_listen *l = cur_listen(a->cfg);
	if (strcmp(a->k->name, "trusted") == 0) {
		struct key_arg b = *a;
		b.shown = "trusted";
		return want(&b, RQ_CONFIG_TABLE);  /* items follow as trusted[] */
	}
	struct key_arg item = *a;
	item.shown = "trusted";
	char *s = NULL, err[160];
	struct rq_cidr c;
	if (get_str(&item, 100, &s) < 0)
		return -1;
	if (rq_listen_cidr_parse(s, &c, err, sizeof(err)) < 0) {
		rq_config_diag_add(a->diag, a->line, false, "trusted: %s", err);
		free(s);
		return -1;
	}
	if (l->ntrusted >= RQ_CONFIG_TRUSTED_MAX) {
		rq_config_diag_add(a->diag, a->line, false, "trusted: more than %d CIDRs",
				   RQ_CONFIG_TRUSTED_MAX);
		free(s);
		return -1;
	}
	l->trusted[l->ntrusted++] = s;
	return 0;
}

static int key_listen_queue(const struct key_arg *a)
{
	if (get_queue_name(a) < 0)
		return -1;
	char **dst = a->field;
	free(*dst);
	*dst = strdup(a->v->str);
	return *dst ? 0 : -1;
}

/* Bytes: a number, or "25M" / "512K" / "1G" (powers of 1024). */
static int key_listen_size(const struct key_arg *a)
{
	double v;
	if (a->v->type == RQ_CONFIG_NUMBER) {
		v = a->v->num;
	} else if (a->v->type == RQ_CONFIG_STRING) {
		char *end = NULL;
		errno = 0;
		v = strtod(a->v->str, &end);
		double mul = 1;
		if (end && (*end == 'K' || *end == 'k'))
			mul = 1024.0, end++;
		else if (end && (*end == 'M' || *end == 'm'))
			mul = 1024.0 * 1024, end++;
		else if (end && (*end == 'G' || *end == 'g'))
			mul = 1024.0 * 1024 * 1024, end++;
		if (end == a->v->str || errno || !end || *end || strlen(a->v->str) != a->v->len ||
		    !isdigit((unsigned char)a->v->str[0])) {
			rq_config_diag_add(a->diag, a->line, false,
					   "%s: \"%.40s\" is not a size (bytes, or like 512K, 25M, 1G)",
					   a->shown, a->v->str);
			return -1;
		}
		v *= mul;
	} else {
		rq_config_diag_add(a->diag, a->line, false,
				   "%s: expected a size (number of bytes or \"25M\"), got a %s",
				   a->shown, vtype_name(a->v->type));
		return -1;
	}
	if (!isfinite(v) || v != floor(v) || v < a->k->lo || v > a->k->hi) {
		rq_config_diag_add(a->diag, a->line, false,
				   "%s: %.0f bytes is out of range (1K to 500M)", a->shown, v);
		return -1;
	}
	*(double *)a->field = v;
	return 0;
}

/* meta.KEY = string | number | boolean, into the listener's meta JSON. */
static int key_listen_meta(const struct key_arg *a)
{
	struct rq_config_listen *l = cur_listen(a->cfg);
	const char *name = a->shown + 5;
	if (strcmp(name, "via") == 0 || strcmp(name, "client") == 0 ||
	    strcmp(name, "user") == 0) {
		rq_config_diag_add(a->diag, a->line, false,
				   "%s: via, client and user are set by the listener", a->shown);
		return -1;
	}
	/* each pair is made as {"k":v}, then joined to the object so far */
	struct rq_json_buf v;
	rq_json_buf_init(&v);
	rq_json_buf_obj_begin(&v);
	rq_json_buf_key(&v, name);
	switch (a->v->type) {
	case RQ_CONFIG_STRING: rq_json_buf_strn(&v, a->v->str, a->v->len); break;
	case RQ_CONFIG_NUMBER:
		if (isfinite(a->v->num) && a->v->num == floor(a->v->num) &&
		    fabs(a->v->num) < 9007199254740992.0)
			rq_json_buf_int(&v, (int64_t)a->v->num);
		else
			rq_json_buf_double(&v, a->v->num);
		break;
	case RQ_CONFIG_BOOL: rq_json_buf_bool(&v, a->v->b); break;
	default:
		rq_json_buf_finish(&v);
		rq_config_diag_add(a->diag, a->line, false,
				   "%s: expected a string, number or boolean, got a %s", a->shown,
				   vtype_name(a->v->type));
		return -1;
	}
	rq_json_buf_obj_end(&v);
	size_t vlen = 0;
	char *one = rq_json_buf_take(&v, &vlen);  /* {"k":v} */
	rq_json_buf_finish(&v);
	if (!one)
		return -1;
	char *merged;
	if (!l->meta_json) {
		merged = one;
	} else {
		size_t ol = strlen(l->meta_json);
		merged = malloc(ol + vlen + 2);
		if (!merged) {
			free(one);
			return -1;
		}
		/* {"a":1} + {"b":2} -> {"a":1,"b":2} */
		memcpy(merged, l->meta_json, ol - 1);
		merged[ol - 1] = ',';
		memcpy(merged + ol, one + 1, vlen - 1);
		merged[ol + vlen - 1] = '\0';
		free(one);
	}
	free(l->meta_json);
	l->meta_json = merged;
	return 0;
}

static int apply_listen(struct rq_config *cfg, const char *key,
			const struct rq_config_value *v, int line,
			struct rq_config_diag *diag)
{
	struct rq_config_listen *l = cur_listen(cfg);
	if (!l)
		return -1;
	const struct key *k = key_find(listen_keys, NKEYS(listen_keys), key);
	if (k)
		return key_apply(cfg, k, l, NULL, NULL, key, v, line, diag);
	if (strncmp(key, "meta.", 5) == 0 && !strchr(key + 5, '.') && !strchr(key + 5, '[')) {
		const struct key mk = {"meta.*", K_FN, 0, 0, 0, key_listen_meta, 0, false, 0};
		const struct key_arg a = {cfg, &mk, NULL, key, v, line, diag};
		return key_listen_meta(&a);
	}
	char list[500];
	key_list(listen_keys, NKEYS(listen_keys), "", list, sizeof(list));
	rq_config_diag_add(diag, line, false, "unknown key %s in relayq.listen (keys: %s)", key,
			   list);
	return -1;
}

/* ---- apply ---- */

/* The unknown key message of a group of keys ("timeouts." ...). */
static int unknown_in(const struct key *t, size_t n, const char *prefix,
		      const char *what, const char *shown, int line,
		      struct rq_config_diag *diag)
{
	char list[400];
	key_list(t, n, prefix, list, sizeof(list));
	rq_config_diag_add(diag, line, false, "unknown key %s (%s: %s)", shown, what,
			   list);
	return -1;
}

static int apply_config(struct rq_config *cfg, const char *key,
			const struct rq_config_value *v, int line,
			struct rq_config_diag *diag)
{
	const struct key *k = key_find(config_keys, NKEYS(config_keys), key);
	if (k)
		return key_apply(cfg, k, cfg, NULL, NULL, key, v, line, diag);
	if (strncmp(key, "timeouts.", 9) == 0)
		return unknown_in(config_keys, NKEYS(config_keys), "timeouts.", "timeouts",
				  key, line, diag);
	if (strncmp(key, "auth.", 5) == 0)
		return unknown_in(config_keys, NKEYS(config_keys), "auth.", "auth keys",
				  key, line, diag);
	rq_config_diag_add(diag, line, false, "unknown key %s in relayq.config", key);
	return -1;
}

/* relayq.backoff / expire (group "backoff" / "expire"), or a domain's. */
static int apply_params(struct rq_config *cfg, const char *group, const char *key,
			const char *shown, struct rq_policy_params *params,
			unsigned *set, const struct rq_config_value *v, int line,
			struct rq_config_diag *diag)
{
	char name[200], prefix[16], what[32];
	snprintf(name, sizeof(name), "%s.%s", group, key);
	const struct key *k = key_find(params_keys, NKEYS(params_keys), name);
	if (k)
		return key_apply(cfg, k, params, set, NULL, shown, v, line, diag);
	snprintf(prefix, sizeof(prefix), "%s.", group);
	snprintf(what, sizeof(what), "%s keys", group);
	return unknown_in(params_keys, NKEYS(params_keys), prefix, what, shown, line,
			  diag);
}

static int apply_domain(struct rq_config *cfg, const char *key,
			const struct rq_config_value *v, int line,
			struct rq_config_diag *diag)
{
	if (cfg->ndomains == 0)
		return -1;
	struct rq_config_domain *d = &cfg->domains[cfg->ndomains - 1];
	const struct key *k = key_find(domain_keys, NKEYS(domain_keys), key);
	if (k)
		return key_apply(cfg, k, d, NULL, d, key, v, line, diag);
	if (strncmp(key, "backoff.", 8) == 0)
		return apply_params(cfg, "backoff", key + 8, key, &d->params, &d->set, v,
				    line, diag);
	if (strncmp(key, "expire.", 7) == 0)
		return apply_params(cfg, "expire", key + 7, key, &d->params, &d->set, v,
				    line, diag);
	char list[300];
	key_list(domain_keys, NKEYS(domain_keys), "", list, sizeof(list));
	rq_config_diag_add(diag, line, false,
			   "unknown key %s in relayq.on_domain(\"%s\") (keys: %s, on)",
			   key, d->name, list);
	return -1;
}

int rq_config_apply(struct rq_config *cfg, enum rq_config_section sec,
		    const char *key, const struct rq_config_value *v, int line,
		    struct rq_config_diag *diag)
{
	switch (sec) {
	case RQ_CONFIG_SEC_CONFIG:
		return apply_config(cfg, key, v, line, diag);
	case RQ_CONFIG_SEC_BACKOFF:
		return apply_params(cfg, "backoff", key, key, &cfg->params, NULL, v, line,
				    diag);
	case RQ_CONFIG_SEC_EXPIRE:
		return apply_params(cfg, "expire", key, key, &cfg->params, NULL, v, line,
				    diag);
	case RQ_CONFIG_SEC_DOMAIN:
		return apply_domain(cfg, key, v, line, diag);
	case RQ_CONFIG_SEC_LISTEN:
		return apply_listen(cfg, key, v, line, diag);
	}
	return -1;
}

/*
 * The SMTP AUTH password from its file (rq_secret_read_file: the first
 * line); a file group or others can read is a warning.
 */
static char *read_password(const char *path, int line, struct rq_config_diag *diag)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		rq_config_diag_add(diag, line, false, "auth.password_file: cannot open %s: %s",
				   path, strerror(errno));
		return NULL;
	}
	struct stat st;
	if (fstat(fd, &st) == 0 && (st.st_mode & 0077))
		rq_config_diag_add(diag, line, true,
				   "auth.password_file: %s is readable by group or others",
				   path);
	close(fd);
	char err[RQ_CONFIG_PROBLEM_LEN];
	char *pw = rq_secret_read_file(path, "auth.password_file", err, sizeof(err));
	if (!pw)
		rq_config_diag_add(diag, line, false, "%s", err);
	return pw;
}

/* The Redis password sources: at most one; a user needs one; the file
 * readable, the variable set. */
static void end_redis(struct rq_config *cfg, int line, struct rq_config_diag *diag)
{
	struct rq_redis_url u;
	bool url_pw = false, url_user = false;
	if (cfg->redis && rq_redis_url_parse(cfg->redis, &u, NULL, 0) == 0) {
		url_pw = u.has_password;
		url_user = u.user[0] != '\0';
		rq_redis_url_wipe(&u);
	}
	int sources = url_pw + (cfg->redis_password_file != NULL) +
		      (cfg->redis_password_env != NULL);
	if (sources > 1)
		rq_config_diag_add(diag, line, false,
				   "redis: give the password once: in the redis URL, "
				   "redis_password_file or redis_password_env");
	if (cfg->redis_user && url_user)
		rq_config_diag_add(diag, line, false,
				   "redis_user: the redis URL has a user already");
	if ((cfg->redis_user || url_user) && sources == 0)
		rq_config_diag_add(diag, line, false,
				   "redis_user: a Redis user needs a password (redis URL, "
				   "redis_password_file or redis_password_env)");
	if (cfg->redis_password_file) {
		int fd = open(cfg->redis_password_file, O_RDONLY | O_CLOEXEC);
		struct stat st;
		if (fd < 0) {
			rq_config_diag_add(diag, line, false,
					   "redis_password_file: cannot open %s: %s",
					   cfg->redis_password_file, strerror(errno));
		} else {
			if (fstat(fd, &st) != 0)
				rq_config_diag_add(diag, line, false,
						   "redis_password_file: cannot stat %s: %s",
						   cfg->redis_password_file, strerror(errno));
			else if (!S_ISREG(st.st_mode))
				rq_config_diag_add(diag, line, false,
						   "redis_password_file: %s is not a file",
						   cfg->redis_password_file);
			else if (st.st_size == 0)
				rq_config_diag_add(diag, line, false,
						   "redis_password_file: %s is empty",
						   cfg->redis_password_file);
			else if (st.st_mode & 0077)
				rq_config_diag_add(diag, line, true,
						   "redis_password_file: %s is readable by "
						   "group or others", cfg->redis_password_file);
			close(fd);
		}
	}
	if (cfg->redis_password_env) {
		const char *e = getenv(cfg->redis_password_env);
		if (!e || !*e)
			rq_config_diag_add(diag, line, false,
					   "redis_password_env: %s is not set",
					   cfg->redis_password_env);
	}
}

static void end_config(struct rq_config *cfg, int line, struct rq_config_diag *diag)
{
	struct config_private *p = priv(cfg);
	if (cfg->nqueues == 0) {
		cfg->queues[0] = strdup(RQ_KEYS_QUEUE_DEFAULT);
		if (cfg->queues[0])
			cfg->nqueues = 1;
	}
	end_redis(cfg, line, diag);
	if (cfg->per_destination > cfg->connections)
		rq_config_diag_add(diag, line, true,
				   "per_destination (%d) is more than connections (%d)",
				   cfg->per_destination, cfg->connections);
	if (!cfg->auth)
		return;
	int aline = p->auth_line ? p->auth_line : line;
	int sources = (p->password_file != NULL) + (p->password_env != NULL) +
		      p->password_literal;
	if (!cfg->auth_user)
		rq_config_diag_add(diag, aline, false, "auth: user is missing");
	if (sources != 1) {
		rq_config_diag_add(diag, aline, false,
				   "auth: give exactly one of password_file, "
				   "password_env, password");
		return;
	}
	if (cfg->load_flags & RQ_CONFIG_LOAD_NO_SMTP_SECRET) {
		/* not needed by this caller: neither read nor required */
	} else if (p->password_file) {
		rq_secret_free(cfg->auth_password);
		cfg->auth_password = read_password(p->password_file, aline, diag);
	} else if (p->password_env) {
		const char *e = getenv(p->password_env);
		if (!e || !*e) {
			rq_config_diag_add(diag, aline, false,
					   "auth.password_env: %s is not set", p->password_env);
		} else {
			rq_secret_free(cfg->auth_password);
			cfg->auth_password = strdup(e);
		}
	}
	if (cfg->tls == RQ_TLS_NONE && !cfg->auth_allow_plaintext)
		rq_config_diag_add(diag, aline, false,
				   "auth with tls = \"none\" sends the password in clear: "
				   "set auth.allow_plaintext = true to allow it");
}

/* A listener's checks across keys: its address, the certificate and key
 * (loaded), the credentials file (loaded), AUTH only where it is offered. */
static void end_listen(struct rq_config *cfg, int line, struct rq_config_diag *diag)
{
	struct rq_config_listen *l = cur_listen(cfg);
	char err[300];
	if (!l)
		return;
	if (!l->address) {
		rq_config_diag_add(diag, line, false,
				   "relayq.listen: the address is missing "
				   "(relayq.listen { \"127.0.0.1:2525\", ... })");
		return;
	}
	if (l->tls_key && !l->tls_cert)
		rq_config_diag_add(diag, line, false, "relayq.listen: tls_key without tls_cert");
	if (l->implicit_tls && !l->tls_cert)
		rq_config_diag_add(diag, line, false, "relayq.listen: implicit_tls needs tls_cert");
	if (l->tls_cert && access(l->tls_cert, R_OK) == 0 &&
	    (!l->tls_key || access(l->tls_key, R_OK) == 0)) {
		struct rq_tls_ctx *t = rq_tls_server_ctx_create(l->tls_cert, l->tls_key, err,
								sizeof(err));
		if (!t)
			rq_config_diag_add(diag, line, false, "relayq.listen: %s", err);
		rq_tls_ctx_destroy(t);
	}
	if (l->auth_file && access(l->auth_file, R_OK) == 0) {
		struct rq_credentials *c = rq_credentials_load(l->auth_file, err, sizeof(err));
		if (!c)
			rq_config_diag_add(diag, line, false, "relayq.listen: auth_file: %s", err);
		else if (rq_credentials_count(c) == 0)
			rq_config_diag_add(diag, line, true,
					   "relayq.listen: auth_file %s has no users", l->auth_file);
		rq_credentials_destroy(c);
	}
	if (l->auth_file && !l->tls_cert && !l->auth_allow_plaintext)
		rq_config_diag_add(diag, line, false,
				   "relayq.listen: auth_file without tls_cert: AUTH is only "
				   "offered over TLS (set auth_allow_plaintext = true to allow "
				   "passwords in clear)");
	if (l->ntrusted == 0 && !l->auth_file)
		rq_config_diag_add(diag, line, true,
				   "relayq.listen: no trusted CIDRs and no auth_file: every "
				   "client gets 530 at MAIL");
}

static void end_backoff(const struct rq_backoff *b, const char *what, int line,
			struct rq_config_diag *diag)
{
	if (b->max < b->first)
		rq_config_diag_add(diag, line, false, "%s: max is less than first", what);
}

void rq_config_section_end(struct rq_config *cfg, enum rq_config_section sec,
			   int line, struct rq_config_diag *diag)
{
	switch (sec) {
	case RQ_CONFIG_SEC_CONFIG:
		end_config(cfg, line, diag);
		break;
	case RQ_CONFIG_SEC_BACKOFF:
		end_backoff(&cfg->params.backoff, "relayq.backoff", line, diag);
		break;
	case RQ_CONFIG_SEC_LISTEN:
		end_listen(cfg, line, diag);
		break;
	case RQ_CONFIG_SEC_EXPIRE:
	case RQ_CONFIG_SEC_DOMAIN:
		/* Domains are checked merged with the global values, once the
		 * whole file ran (rq_config_lua_load). */
		break;
	}
}


int rq_config_validate(struct rq_config *cfg, struct rq_config_diag *diag)
{
	size_t errors = diag->errors;
	for (size_t i = 0; i < cfg->ndomains; i++) {
		struct rq_policy_params p;
		rq_config_params(cfg, cfg->domains[i].name, &p);
		if (p.backoff.max < p.backoff.first)
			rq_config_diag_add(diag, cfg->domains[i].line, false,
					   "relayq.on_domain(\"%s\"): backoff max is less "
					   "than first", cfg->domains[i].name);
	}
	return diag->errors > errors ? -1 : 0;
}

/* ---- lookups ---- */

const struct rq_config_domain *rq_config_domain(const struct rq_config *cfg,
						const char *domain)
{
	if (!cfg || !domain)
		return NULL;
	for (size_t i = 0; i < cfg->ndomains; i++)
		if (strcasecmp(cfg->domains[i].name, domain) == 0)
			return &cfg->domains[i];
	return NULL;
}

void rq_config_params(const struct rq_config *cfg, const char *domain,
		      struct rq_policy_params *out)
{
	if (!cfg) {
		rq_policy_params_default(out);
		return;
	}
	*out = cfg->params;
	const struct rq_config_domain *d = rq_config_domain(cfg, domain);
	if (!d)
		return;
	const struct rq_policy_params *dp = &d->params;
	if (d->set & RQ_CONFIG_SET_FIRST)
		out->backoff.first = dp->backoff.first;
	if (d->set & RQ_CONFIG_SET_FACTOR)
		out->backoff.factor = dp->backoff.factor;
	if (d->set & RQ_CONFIG_SET_MAX)
		out->backoff.max = dp->backoff.max;
	if (d->set & RQ_CONFIG_SET_JITTER)
		out->backoff.jitter = dp->backoff.jitter;
	if (d->set & RQ_CONFIG_SET_MAX_AGE)
		out->expire.max_age = dp->expire.max_age;
	if (d->set & RQ_CONFIG_SET_MAX_ATTEMPTS)
		out->expire.max_attempts = dp->expire.max_attempts;
}

void rq_config_limits(const struct rq_config *cfg, const char *domain,
		      struct rq_config_limits *out)
{
	out->per_destination = cfg->per_destination;
	out->messages_per_connection = cfg->messages_per_connection;
	out->recipients_per_transaction = cfg->recipients_per_transaction;
	const struct rq_config_domain *d = rq_config_domain(cfg, domain);
	if (!d)
		return;
	if (d->has_per_destination)
		out->per_destination = d->per_destination;
	if (d->has_messages_per_connection)
		out->messages_per_connection = d->messages_per_connection;
	if (d->has_recipients_per_transaction)
		out->recipients_per_transaction = d->recipients_per_transaction;
}

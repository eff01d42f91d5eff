#include "relayq/config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "relayq/log.h"
#include "relayq/policy_lua.h"
#include "relayq/queue.h"

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
	for (char *c = p->msg; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f)
			*c = ' ';
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

struct rq_config *rq_config_create(void)
{
	struct config_box *box = calloc(1, sizeof(*box));
	if (!box)
		return NULL;
	struct rq_config *cfg = &box->cfg;
	cfg->redis = strdup("redis://127.0.0.1:6379/0");
	cfg->queues[0] = strdup("default");
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
	rq_policy_params_default(&cfg->params);
	return cfg;
fail:
	rq_config_destroy(cfg);
	return NULL;
}

static void free_secret(char *s)
{
	if (!s)
		return;
	explicit_bzero(s, strlen(s));
	free(s);
}

void rq_config_destroy(struct rq_config *cfg)
{
	if (!cfg)
		return;
	struct config_private *p = priv(cfg);
	rq_policy_lua_destroy(cfg->lua);
	free(cfg->path);
	free_secret(cfg->redis);
	free(cfg->redis_user);
	free(cfg->redis_password_file);
	free(cfg->redis_password_env);
	for (size_t i = 0; i < cfg->nqueues; i++)
		free(cfg->queues[i]);
	free(cfg->relay_host);
	free(cfg->tls_ca_file);
	free(cfg->auth_user);
	free_secret(cfg->auth_password);
	free(cfg->helo);
	free(cfg->metrics);
	for (size_t i = 0; i < cfg->ndomains; i++)
		free(cfg->domains[i].name);
	free(cfg->domains);
	free(p->password_file);
	free(p->password_env);
	free(cfg);
}

/* ---- value helpers ---- */

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

static int want(const struct rq_config_value *v, enum rq_config_vtype t,
		const char *key, int line, struct rq_config_diag *diag)
{
	if (v->type == t)
		return 0;
	rq_config_diag_add(diag, line, false, "%s: expected a %s, got a %s", key,
			   vtype_name(t), vtype_name(v->type));
	return -1;
}

/* A string without NUL or control bytes, 1..max bytes. */
static int get_str(const struct rq_config_value *v, const char *key, size_t max,
		   int line, struct rq_config_diag *diag, char **out)
{
	if (want(v, RQ_CONFIG_STRING, key, line, diag) < 0)
		return -1;
	if (v->len == 0 || v->len > max) {
		rq_config_diag_add(diag, line, false, "%s: must be 1 to %zu bytes long",
				   key, max);
		return -1;
	}
	for (size_t i = 0; i < v->len; i++) {
		unsigned char c = (unsigned char)v->str[i];
		if (c < 0x20 || c == 0x7f) {
			rq_config_diag_add(diag, line, false,
					   "%s: control character in value", key);
			return -1;
		}
	}
	char *s = strdup(v->str);
	if (!s) {
		rq_config_diag_add(diag, line, false, "%s: out of memory", key);
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

static int get_int(const struct rq_config_value *v, const char *key, long lo,
		   long hi, int line, struct rq_config_diag *diag, long *out)
{
	if (want(v, RQ_CONFIG_NUMBER, key, line, diag) < 0)
		return -1;
	if (!isfinite(v->num) || v->num != floor(v->num)) {
		rq_config_diag_add(diag, line, false, "%s: expected an integer, got %g",
				   key, v->num);
		return -1;
	}
	if (v->num < (double)lo || v->num > (double)hi) {
		rq_config_diag_add(diag, line, false,
				   "%s: %g is out of range (%ld to %ld)", key, v->num,
				   lo, hi);
		return -1;
	}
	*out = (long)v->num;
	return 0;
}

static int set_int(const struct rq_config_value *v, const char *key, long lo,
		   long hi, int line, struct rq_config_diag *diag, int *out)
{
	long n;
	if (get_int(v, key, lo, hi, line, diag, &n) < 0)
		return -1;
	*out = (int)n;
	return 0;
}

static int get_num(const struct rq_config_value *v, const char *key, double lo,
		   double hi, int line, struct rq_config_diag *diag, double *out)
{
	if (want(v, RQ_CONFIG_NUMBER, key, line, diag) < 0)
		return -1;
	if (!isfinite(v->num) || v->num < lo || v->num > hi) {
		rq_config_diag_add(diag, line, false, "%s: %g is out of range (%g to %g)",
				   key, v->num, lo, hi);
		return -1;
	}
	*out = v->num;
	return 0;
}

static int get_bool(const struct rq_config_value *v, const char *key, int line,
		    struct rq_config_diag *diag, bool *out)
{
	if (want(v, RQ_CONFIG_BOOL, key, line, diag) < 0)
		return -1;
	*out = v->b;
	return 0;
}

/* A duration (number of seconds or "5m"), in [lo, hi]. */
static int get_dur(const struct rq_config_value *v, const char *key, double lo,
		   double hi, int line, struct rq_config_diag *diag, double *out)
{
	double d;
	if (v->type == RQ_CONFIG_NUMBER) {
		d = v->num;
		if (!isfinite(d) || d < 0) {
			rq_config_diag_add(diag, line, false,
					   "%s: a duration must be a number of seconds >= 0",
					   key);
			return -1;
		}
	} else if (v->type == RQ_CONFIG_STRING) {
		if (strlen(v->str) != v->len || rq_duration_parse(v->str, &d) < 0) {
			rq_config_diag_add(diag, line, false,
					   "%s: \"%.40s\" is not a duration (like 30s, 5m, 2h, 5d)",
					   key, v->str);
			return -1;
		}
	} else {
		rq_config_diag_add(diag, line, false,
				   "%s: expected a duration (number or string), got a %s",
				   key, vtype_name(v->type));
		return -1;
	}
	if (d < lo || d > hi) {
		char a[32], b[32], c[32];
		rq_duration_format(d, a, sizeof(a));
		rq_duration_format(lo, b, sizeof(b));
		rq_duration_format(hi, c, sizeof(c));
		rq_config_diag_add(diag, line, false, "%s: %s is out of range (%s to %s)",
				   key, a, b, c);
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

static bool queue_name_ok(const char *s, size_t len)
{
	if (len == 0 || len > 64)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!(isalnum(c) || c == '_' || c == '.' || c == ':' || c == '-'))
			return false;
	}
	return true;
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

static int mark(int r, unsigned *set, unsigned bit)
{
	if (r == 0 && set)
		*set |= bit;
	return r;
}

static int apply_backoff(struct rq_backoff *b, unsigned *set, const char *key,
			 const char *shown, const struct rq_config_value *v, int line,
			 struct rq_config_diag *diag)
{
	if (strcmp(key, "first") == 0)
		return mark(get_dur(v, shown, 1, 30 * 86400, line, diag, &b->first), set,
			    RQ_CONFIG_SET_FIRST);
	if (strcmp(key, "factor") == 0)
		return mark(get_num(v, shown, 1, 100, line, diag, &b->factor), set,
			    RQ_CONFIG_SET_FACTOR);
	if (strcmp(key, "max") == 0)
		return mark(get_dur(v, shown, 1, 30 * 86400, line, diag, &b->max), set,
			    RQ_CONFIG_SET_MAX);
	if (strcmp(key, "jitter") == 0)
		return mark(get_num(v, shown, 0, 1, line, diag, &b->jitter), set,
			    RQ_CONFIG_SET_JITTER);
	rq_config_diag_add(diag, line, false,
			   "unknown key %s (backoff keys: first, factor, max, jitter)",
			   shown);
	return -1;
}

static int apply_expire(struct rq_expire *e, unsigned *set, const char *key,
			const char *shown, const struct rq_config_value *v, int line,
			struct rq_config_diag *diag)
{
	if (strcmp(key, "max_age") == 0)
		return mark(get_dur(v, shown, 60, 366 * 86400, line, diag, &e->max_age),
			    set, RQ_CONFIG_SET_MAX_AGE);
	if (strcmp(key, "max_attempts") == 0) {
		long n;
		if (get_int(v, shown, 1, 100000, line, diag, &n) < 0)
			return -1;
		e->max_attempts = (unsigned)n;
		return mark(0, set, RQ_CONFIG_SET_MAX_ATTEMPTS);
	}
	rq_config_diag_add(diag, line, false,
			   "unknown key %s (expire keys: max_age, max_attempts)", shown);
	return -1;
}

static int apply_timeout(struct rq_timeouts *t, const char *key, const char *shown,
			 const struct rq_config_value *v, int line,
			 struct rq_config_diag *diag)
{
	static const struct {
		const char *name;
		size_t off;
	} keys[] = {
		{"connect", offsetof(struct rq_timeouts, connect)},
		{"greeting", offsetof(struct rq_timeouts, greeting)},
		{"helo", offsetof(struct rq_timeouts, helo)},
		{"mail", offsetof(struct rq_timeouts, mail)},
		{"rcpt", offsetof(struct rq_timeouts, rcpt)},
		{"data", offsetof(struct rq_timeouts, data)},
		{"data_block", offsetof(struct rq_timeouts, data_block)},
		{"dot", offsetof(struct rq_timeouts, dot)},
		{"quit", offsetof(struct rq_timeouts, quit)},
		{"idle", offsetof(struct rq_timeouts, idle)},
	};
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		if (strcmp(key, keys[i].name) != 0)
			continue;
		double *dst = (double *)((char *)t + keys[i].off);
		double lo = strcmp(key, "idle") == 0 ? 0 : 1;
		return get_dur(v, shown, lo, 3600, line, diag, dst);
	}
	rq_config_diag_add(diag, line, false,
			   "unknown key %s (timeouts: connect, greeting, helo, mail, "
			   "rcpt, data, data_block, dot, quit, idle)", shown);
	return -1;
}

static int apply_auth(struct rq_config *cfg, const char *key, const char *shown,
		      const struct rq_config_value *v, int line,
		      struct rq_config_diag *diag)
{
	struct config_private *p = priv(cfg);
	if (strcmp(key, "user") == 0)
		return get_str(v, shown, 255, line, diag, &cfg->auth_user);
	if (strcmp(key, "password_file") == 0)
		return get_str(v, shown, 4096, line, diag, &p->password_file);
	if (strcmp(key, "password_env") == 0)
		return get_str(v, shown, 255, line, diag, &p->password_env);
	if (strcmp(key, "allow_plaintext") == 0)
		return get_bool(v, shown, line, diag, &cfg->auth_allow_plaintext);
	if (strcmp(key, "password") == 0) {
		if (want(v, RQ_CONFIG_STRING, shown, line, diag) < 0)
			return -1;
		if (v->len == 0 || v->len > 1024 || strlen(v->str) != v->len) {
			rq_config_diag_add(diag, line, false,
					   "%s: must be 1 to 1024 bytes, no NUL", shown);
			return -1;
		}
		free_secret(cfg->auth_password);
		cfg->auth_password = strdup(v->str);
		if (!cfg->auth_password)
			return -1;
		p->password_literal = true;
		rq_config_diag_add(diag, line, true,
				   "%s: a password in the config file is discouraged "
				   "(use password_file or password_env)", shown);
		return 0;
	}
	rq_config_diag_add(diag, line, false,
			   "unknown key %s (auth keys: user, password_file, "
			   "password_env, password, allow_plaintext)", shown);
	return -1;
}

/* The settings a domain can override, shared with relayq.config. */
static int apply_limits(int *per_destination, int *messages_per_connection,
			int *recipients_per_transaction, const char *key,
			const struct rq_config_value *v, int line,
			struct rq_config_diag *diag, int *matched)
{
	*matched = 1;
	if (strcmp(key, "per_destination") == 0)
		return set_int(v, key, 1, 10000, line, diag, per_destination);
	if (strcmp(key, "messages_per_connection") == 0)
		return set_int(v, key, 1, 1000000, line, diag, messages_per_connection);
	if (strcmp(key, "recipients_per_transaction") == 0)
		return set_int(v, key, 1, 100000, line, diag, recipients_per_transaction);
	*matched = 0;
	return -1;
}

/* Splits "a.b" into head "a" and tail "b" (tail NULL when no dot). */
static const char *split(const char *key, char *head, size_t len)
{
	const char *dot = strchr(key, '.');
	size_t n = dot ? (size_t)(dot - key) : strlen(key);
	if (n >= len)
		n = len - 1;
	memcpy(head, key, n);
	head[n] = '\0';
	return dot ? dot + 1 : NULL;
}

static int apply_config(struct rq_config *cfg, const char *key,
			const struct rq_config_value *v, int line,
			struct rq_config_diag *diag)
{
	char head[64];
	const char *tail = split(key, head, sizeof(head));
	int matched;

	if (strcmp(head, "timeouts") == 0 || strcmp(head, "auth") == 0) {
		if (!tail) {
			if (want(v, RQ_CONFIG_TABLE, key, line, diag) < 0)
				return -1;
			if (strcmp(head, "auth") == 0) {
				cfg->auth = true;
				priv(cfg)->auth_line = line;
			}
			return 0;
		}
		if (strcmp(head, "auth") == 0)
			return apply_auth(cfg, tail, key, v, line, diag);
		return apply_timeout(&cfg->timeouts, tail, key, v, line, diag);
	}
	if (tail)
		goto unknown;
	if (strcmp(key, "queue") == 0) {
		if (v->type == RQ_CONFIG_TABLE)
			return 0;  /* items follow as queue[] */
		/* fall through to a single name */
	}
	if (strcmp(key, "queue") == 0 || strcmp(key, "queue[]") == 0) {
		if (want(v, RQ_CONFIG_STRING, "queue", line, diag) < 0)
			return -1;
		if (!queue_name_ok(v->str, v->len) || strlen(v->str) != v->len) {
			rq_config_diag_add(diag, line, false,
					   "queue: \"%.70s\" is not a queue name "
					   "(1-64 of A-Z a-z 0-9 _ . : -)", v->str);
			return -1;
		}
		for (size_t i = 0; i < cfg->nqueues; i++) {
			if (strcmp(cfg->queues[i], v->str) == 0) {
				rq_config_diag_add(diag, line, false,
						   "queue: \"%s\" listed twice", v->str);
				return -1;
			}
		}
		if (cfg->nqueues >= RQ_CONFIG_QUEUES_MAX) {
			rq_config_diag_add(diag, line, false, "queue: more than %d queues",
					   RQ_CONFIG_QUEUES_MAX);
			return -1;
		}
		cfg->queues[cfg->nqueues] = strdup(v->str);
		if (!cfg->queues[cfg->nqueues])
			return -1;
		cfg->nqueues++;
		return 0;
	}
	if (strcmp(key, "redis") == 0) {
		char *s = NULL;
		char why[160], shown[200];
		struct rq_queue_url u;
		if (get_str(v, key, 1024, line, diag, &s) < 0)
			return -1;
		if (rq_queue_url_parse(s, &u, why, sizeof(why)) != 0) {
			rq_queue_redact_url(s, shown, sizeof(shown));
			rq_config_diag_add(diag, line, false,
					   "redis: \"%.80s\" is not a Redis URL (%s); expected "
					   "redis://[user:password@]host[:port][/db] or "
					   "unix:/path[?db=N]", shown, why);
			explicit_bzero(s, strlen(s));
			free(s);
			return -1;
		}
		if (u.has_password)
			rq_config_diag_add(diag, line, true,
					   "redis: a password in the URL is visible to whoever "
					   "reads this file (consider redis_password_file or "
					   "redis_password_env)");
		rq_queue_url_wipe(&u);
		free_secret(cfg->redis);
		cfg->redis = s;
		return 0;
	}
	if (strcmp(key, "redis_user") == 0)
		return get_str(v, key, RQ_QUEUE_URL_USER_MAX, line, diag, &cfg->redis_user);
	if (strcmp(key, "redis_password_file") == 0)
		return get_str(v, key, 4096, line, diag, &cfg->redis_password_file);
	if (strcmp(key, "redis_password_env") == 0)
		return get_str(v, key, 255, line, diag, &cfg->redis_password_env);
	if (strcmp(key, "relay") == 0) {
		char *s = NULL, *host = NULL;
		int port = 25;
		bool br;
		if (get_str(v, key, 300, line, diag, &s) < 0)
			return -1;
		if (parse_hostport(s, false, &host, &port, &br) < 0) {
			rq_config_diag_add(diag, line, false,
					   "relay: \"%.80s\" is not \"[host]:port\", "
					   "\"host:port\" or \"host\"", s);
			free(s);
			return -1;
		}
		free(s);
		free(cfg->relay_host);
		cfg->relay_host = host;
		cfg->relay_port = port;
		cfg->relay_mx = !br;
		return 0;
	}
	if (strcmp(key, "tls") == 0) {
		if (want(v, RQ_CONFIG_STRING, key, line, diag) < 0)
			return -1;
		int m = rq_tls_mode_parse(v->str);
		if (m < 0) {
			rq_config_diag_add(diag, line, false,
					   "tls: \"%.40s\" is not none, opportunistic, "
					   "required or implicit", v->str);
			return -1;
		}
		cfg->tls = (enum rq_tls_mode)m;
		return 0;
	}
	if (strcmp(key, "tls_ca_file") == 0) {
		if (get_str(v, key, 4096, line, diag, &cfg->tls_ca_file) < 0)
			return -1;
		if (access(cfg->tls_ca_file, R_OK) != 0) {
			rq_config_diag_add(diag, line, false, "tls_ca_file: cannot read %s: %s",
					   cfg->tls_ca_file, strerror(errno));
			return -1;
		}
		return 0;
	}
	if (strcmp(key, "tls_verify") == 0)
		return get_bool(v, key, line, diag, &cfg->tls_verify);
	if (strcmp(key, "helo") == 0) {
		char *s = NULL;
		if (get_str(v, key, 255, line, diag, &s) < 0)
			return -1;
		bool lit = s[0] == '[';
		if (!lit && !host_ok(s, strlen(s), false)) {
			rq_config_diag_add(diag, line, false,
					   "helo: \"%.80s\" is not a host name", s);
			free(s);
			return -1;
		}
		free(cfg->helo);
		cfg->helo = s;
		return 0;
	}
	if (strcmp(key, "connections") == 0)
		return set_int(v, key, 1, 100000, line, diag, &cfg->connections);
	{
		int r = apply_limits(&cfg->per_destination, &cfg->messages_per_connection,
				     &cfg->recipients_per_transaction, key, v, line, diag,
				     &matched);
		if (matched)
			return r;
	}
	if (strcmp(key, "batch") == 0)
		return set_int(v, key, 1, 10000, line, diag, &cfg->batch);
	if (strcmp(key, "lease") == 0)
		return get_dur(v, key, 10, 86400, line, diag, &cfg->lease);
	if (strcmp(key, "log_format") == 0) {
		if (want(v, RQ_CONFIG_STRING, key, line, diag) < 0)
			return -1;
		if (strcmp(v->str, "logfmt") == 0) {
			cfg->log_format = RQ_LOG_LOGFMT;
		} else if (strcmp(v->str, "json") == 0) {
			cfg->log_format = RQ_LOG_JSON;
		} else {
			rq_config_diag_add(diag, line, false,
					   "log_format: \"%.40s\" is not logfmt or json", v->str);
			return -1;
		}
		return 0;
	}
	if (strcmp(key, "log_level") == 0) {
		if (want(v, RQ_CONFIG_STRING, key, line, diag) < 0)
			return -1;
		int l = rq_log_level_parse(v->str);
		if (l < 0) {
			rq_config_diag_add(diag, line, false,
					   "log_level: \"%.40s\" is not debug, info, warn, "
					   "error or off", v->str);
			return -1;
		}
		cfg->log_level = l;
		return 0;
	}
	if (strcmp(key, "events_cap") == 0)
		return get_int(v, key, 0, 100000000, line, diag, &cfg->events_cap);
	if (strcmp(key, "bounce") == 0)
		return get_bool(v, key, line, diag, &cfg->bounce);
	if (strcmp(key, "metrics") == 0) {
		char *s = NULL, *host = NULL;
		int port = 0;
		bool br;
		if (get_str(v, key, 300, line, diag, &s) < 0)
			return -1;
		if (parse_hostport(s, true, &host, &port, &br) < 0) {
			rq_config_diag_add(diag, line, false,
					   "metrics: \"%.80s\" is not \"host:port\"", s);
			free(s);
			return -1;
		}
		free(host);
		free(cfg->metrics);
		cfg->metrics = s;
		return 0;
	}
unknown:
	rq_config_diag_add(diag, line, false, "unknown key %s in relayq.config", key);
	return -1;
}

static int apply_domain(struct rq_config *cfg, const char *key,
			const struct rq_config_value *v, int line,
			struct rq_config_diag *diag)
{
	if (cfg->ndomains == 0)
		return -1;
	struct rq_config_domain *d = &cfg->domains[cfg->ndomains - 1];
	char head[64];
	const char *tail = split(key, head, sizeof(head));
	int matched;
	if (!tail) {
		int r = apply_limits(&d->per_destination, &d->messages_per_connection,
				     &d->recipients_per_transaction, key, v, line, diag,
				     &matched);
		if (matched) {
			if (r == 0) {
				if (strcmp(key, "per_destination") == 0)
					d->has_per_destination = true;
				else if (strcmp(key, "messages_per_connection") == 0)
					d->has_messages_per_connection = true;
				else
					d->has_recipients_per_transaction = true;
			}
			return r;
		}
	}
	if (strcmp(head, "backoff") == 0 || strcmp(head, "expire") == 0) {
		if (!tail) {
			if (want(v, RQ_CONFIG_TABLE, key, line, diag) < 0)
				return -1;
			if (head[0] == 'b')
				d->has_backoff = true;
			else
				d->has_expire = true;
			return 0;
		}
		if (head[0] == 'b')
			return apply_backoff(&d->params.backoff, &d->set, tail, key, v,
					     line, diag);
		return apply_expire(&d->params.expire, &d->set, tail, key, v, line, diag);
	}
	rq_config_diag_add(diag, line, false,
			   "unknown key %s in relayq.on_domain(\"%s\") (keys: "
			   "per_destination, messages_per_connection, "
			   "recipients_per_transaction, backoff, expire, on)", key, d->name);
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
		return apply_backoff(&cfg->params.backoff, NULL, key, key, v, line, diag);
	case RQ_CONFIG_SEC_EXPIRE:
		return apply_expire(&cfg->params.expire, NULL, key, key, v, line, diag);
	case RQ_CONFIG_SEC_DOMAIN:
		return apply_domain(cfg, key, v, line, diag);
	}
	return -1;
}

/* Reads a one-line secret file (trailing CR/LF removed). */
static char *read_secret(const char *path, int line, struct rq_config_diag *diag)
{
	char buf[1100];
	char *out = NULL;
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
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	if (n < 0) {
		rq_config_diag_add(diag, line, false, "auth.password_file: cannot read %s: %s",
				   path, strerror(errno));
		goto cleanup;
	}
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		buf[--n] = '\0';
	if (n == 0 || n > 1024 || strlen(buf) != (size_t)n || strchr(buf, '\n')) {
		rq_config_diag_add(diag, line, false,
				   "auth.password_file: %s must hold one line of 1 to 1024 bytes",
				   path);
		goto cleanup;
	}
	out = strdup(buf);
cleanup:
	explicit_bzero(buf, sizeof(buf));
	close(fd);
	return out;
}

/* The Redis password sources: at most one; a user needs one; the file
 * readable, the variable set. */
static void end_redis(struct rq_config *cfg, int line, struct rq_config_diag *diag)
{
	struct rq_queue_url u;
	bool url_pw = false, url_user = false;
	if (cfg->redis && rq_queue_url_parse(cfg->redis, &u, NULL, 0) == 0) {
		url_pw = u.has_password;
		url_user = u.user[0] != '\0';
		rq_queue_url_wipe(&u);
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
		cfg->queues[0] = strdup("default");
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
		free_secret(cfg->auth_password);
		cfg->auth_password = read_secret(p->password_file, aline, diag);
	} else if (p->password_env) {
		const char *e = getenv(p->password_env);
		if (!e || !*e) {
			rq_config_diag_add(diag, aline, false,
					   "auth.password_env: %s is not set", p->password_env);
		} else {
			free_secret(cfg->auth_password);
			cfg->auth_password = strdup(e);
		}
	}
	if (cfg->tls == RQ_TLS_NONE && !cfg->auth_allow_plaintext)
		rq_config_diag_add(diag, aline, false,
				   "auth with tls = \"none\" sends the password in clear: "
				   "set auth.allow_plaintext = true to allow it");
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
	case RQ_CONFIG_SEC_EXPIRE:
	case RQ_CONFIG_SEC_DOMAIN:
		/* Domains are checked merged with the global values, once the
		 * whole file ran (rq_config_load). */
		break;
	}
}

/* ---- load ---- */

struct rq_config *rq_config_load(const char *path, struct rq_config_diag *diag)
{
	return rq_config_load_flags(path, 0, diag);
}

struct rq_config *rq_config_load_flags(const char *path, unsigned flags,
				       struct rq_config_diag *diag)
{
	struct rq_config *cfg = rq_config_create();
	if (!cfg) {
		rq_config_diag_add(diag, 0, false, "out of memory");
		return NULL;
	}
	cfg->load_flags = flags;
	size_t errors = diag->errors;
	cfg->path = strdup(path);
	cfg->lua = rq_policy_lua_load(path, cfg, NULL, diag);
	if (!cfg->lua || !cfg->path || diag->errors > errors)
		goto fail;
	for (size_t i = 0; i < cfg->ndomains; i++) {
		struct rq_policy_params p;
		rq_config_params(cfg, cfg->domains[i].name, &p);
		if (p.backoff.max < p.backoff.first)
			rq_config_diag_add(diag, cfg->domains[i].line, false,
					   "relayq.on_domain(\"%s\"): backoff max is less "
					   "than first", cfg->domains[i].name);
	}
	if (diag->errors > errors)
		goto fail;
	return cfg;
fail:
	if (diag->errors == errors)
		rq_config_diag_add(diag, 0, false, "cannot load the configuration");
	rq_config_destroy(cfg);
	return NULL;
}

int rq_config_reload(struct rq_config **cur, const char *path,
		     struct rq_config_diag *diag)
{
	struct rq_config *cfg = rq_config_load(path, diag);
	if (!cfg)
		return -1;
	rq_config_destroy(*cur);
	*cur = cfg;
	return 0;
}

int rq_config_check(const char *path, FILE *out, FILE *err)
{
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, path);
	struct rq_config *cfg = rq_config_load(path, &diag);
	rq_config_diag_print(&diag, err);
	if (!cfg)
		return 1;
	struct rq_policy_lua_stats st;
	rq_policy_lua_stats(cfg->lua, &st);
	fprintf(out, "%s: ok (%zu policy rules, %zu domains)\n", path, st.rules,
		cfg->ndomains);
	rq_config_destroy(cfg);
	return 0;
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

/*
 * listen: the SMTP listener, intake of mail from applications (see
 * listen.h). Server sessions as an explicit state machine, AUTH, limits;
 * accepted messages go to Redis with relayq_enqueue through the listener's
 * own queue client. Shares nothing with the delivery side but Redis.
 */
#include "relayq/listen.h"

#include "relayq/clock.h"
#include "relayq/credentials.h"
#include "relayq/json.h"
#include "relayq/keys.h"
#include "relayq/log.h"
#include "relayq/message.h"
#include "relayq/queue.h"
#include "relayq/submit.h"
#include "relayq/tls.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define LINE_BUF RQ_LISTEN_AUTH_LINE_MAX   /* the longest command line read */
#define DATA_BUF 1024                      /* the longest DATA line copied */
#define OUT_MAX (256 * 1024)               /* replies waiting: stop reading */
#define IN_MAX (256 * 1024)                /* read high watermark */
#define AUTH_FREE_FAILURES 3               /* failures before the delays */
#define HELO_MAX 255
#define AUTH_THREADS_MAX 16
#define REFUSING_MAX 32                    /* implicit TLS: handshakes only to say 421 */
#define LISTEN_BACKLOG 1024                /* a burst of connects waits here (somaxconn caps it) */

/* ------------------------------------------------------------------------
 * CIDRs and addresses
 */

int rq_listen_cidr_parse(const char *s, struct rq_cidr *out, char *err, size_t errlen)
{
	char host[INET6_ADDRSTRLEN + 1];
	memset(out, 0, sizeof(*out));
	if (!s || !*s) {
		snprintf(err, errlen, "empty CIDR");
		return -1;
	}
	const char *slash = strchr(s, '/');
	size_t hlen = slash ? (size_t)(slash - s) : strlen(s);
	if (hlen == 0 || hlen >= sizeof(host)) {
		snprintf(err, errlen, "\"%.60s\" is not an address or CIDR", s);
		return -1;
	}
	memcpy(host, s, hlen);
	host[hlen] = '\0';
	unsigned maxbits;
	if (inet_pton(AF_INET, host, out->addr) == 1) {
		out->family = AF_INET;
		maxbits = 32;
	} else if (inet_pton(AF_INET6, host, out->addr) == 1) {
		out->family = AF_INET6;
		maxbits = 128;
	} else {
		snprintf(err, errlen, "\"%.60s\" is not an IPv4 or IPv6 address", host);
		return -1;
	}
	out->bits = maxbits;
	if (slash) {
		const char *p = slash + 1;
		unsigned v = 0;
		size_t nd = 0;
		for (; *p; p++, nd++) {
			if (!isdigit((unsigned char)*p) || nd >= 3) {
				snprintf(err, errlen, "\"%.60s\": bad prefix length", s);
				return -1;
			}
			v = v * 10 + (unsigned)(*p - '0');
		}
		if (nd == 0 || v > maxbits || (nd > 1 && slash[1] == '0')) {
			snprintf(err, errlen, "\"%.60s\": prefix length must be 0 to %u", s,
				 maxbits);
			return -1;
		}
		out->bits = v;
	}
	/* clear the host bits */
	for (unsigned i = 0; i < maxbits / 8; i++) {
		unsigned lo = i * 8;
		if (lo >= out->bits)
			out->addr[i] = 0;
		else if (out->bits - lo < 8)
			out->addr[i] &= (unsigned char)(0xff << (8 - (out->bits - lo)));
	}
	return 0;
}

/* The address bytes of sa, IPv4-mapped IPv6 as IPv4. */
static int sa_bytes(const struct sockaddr *sa, unsigned char *b)
{
	if (sa->sa_family == AF_INET) {
		memcpy(b, &((const struct sockaddr_in *)sa)->sin_addr, 4);
		return AF_INET;
	}
	if (sa->sa_family == AF_INET6) {
		const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
		if (IN6_IS_ADDR_V4MAPPED(a)) {
			memcpy(b, a->s6_addr + 12, 4);
			return AF_INET;
		}
		memcpy(b, a->s6_addr, 16);
		return AF_INET6;
	}
	return -1;
}

bool rq_listen_cidr_match(const struct rq_cidr *c, const struct sockaddr *sa)
{
	unsigned char b[16];
	if (!c || !sa || sa_bytes(sa, b) != c->family)
		return false;
	unsigned full = c->bits / 8, rest = c->bits % 8;
	if (memcmp(b, c->addr, full) != 0)
		return false;
	if (rest) {
		unsigned char m = (unsigned char)(0xff << (8 - rest));
		if ((b[full] & m) != c->addr[full])
			return false;
	}
	return true;
}

int rq_listen_addr_parse(const char *s, struct sockaddr_storage *ss, socklen_t *len,
			 char *err, size_t errlen)
{
	char host[INET6_ADDRSTRLEN + 1];
	const char *h, *colon;
	size_t hlen;
	memset(ss, 0, sizeof(*ss));
	if (!s || !*s)
		goto bad;
	if (s[0] == '[') {
		const char *close = strchr(s, ']');
		if (!close || close[1] != ':')
			goto bad;
		h = s + 1;
		hlen = (size_t)(close - h);
		colon = close + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon || memchr(s, ':', (size_t)(colon - s)))
			goto bad;
		h = s;
		hlen = (size_t)(colon - s);
	}
	if (hlen == 0 || hlen >= sizeof(host))
		goto bad;
	memcpy(host, h, hlen);
	host[hlen] = '\0';
	const char *p = colon + 1;
	unsigned port = 0;
	size_t nd = 0;
	for (; *p; p++, nd++) {
		if (!isdigit((unsigned char)*p) || nd >= 5)
			goto bad;
		port = port * 10 + (unsigned)(*p - '0');
	}
	if (nd == 0 || port > 65535)
		goto bad;
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	if (s[0] != '[' && inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons((uint16_t)port);
		*len = sizeof(*a4);
		return 0;
	}
	if (s[0] == '[' && inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons((uint16_t)port);
		*len = sizeof(*a6);
		return 0;
	}
bad:
	snprintf(err, errlen, "\"%.80s\" is not \"IPv4:port\" or \"[IPv6]:port\"", s ? s : "");
	return -1;
}

/* ------------------------------------------------------------------------
 * Commands
 */

static bool word_is(const char *p, size_t n, const char *w)
{
	size_t wl = strlen(w);
	return n == wl && strncasecmp(p, w, wl) == 0;
}

enum rq_listen_verb rq_listen_verb_parse(const char *line, size_t len, size_t *arg)
{
	static const struct {
		const char *w;
		enum rq_listen_verb v;
	} verbs[] = {
		{"HELO", RQ_LISTEN_V_HELO}, {"EHLO", RQ_LISTEN_V_EHLO},
		{"DATA", RQ_LISTEN_V_DATA}, {"RSET", RQ_LISTEN_V_RSET},
		{"NOOP", RQ_LISTEN_V_NOOP}, {"QUIT", RQ_LISTEN_V_QUIT},
		{"VRFY", RQ_LISTEN_V_VRFY}, {"HELP", RQ_LISTEN_V_HELP},
		{"STARTTLS", RQ_LISTEN_V_STARTTLS}, {"AUTH", RQ_LISTEN_V_AUTH},
		{"EXPN", RQ_LISTEN_V_NOTIMPL}, {"TURN", RQ_LISTEN_V_NOTIMPL},
		{"ETRN", RQ_LISTEN_V_NOTIMPL}, {"BDAT", RQ_LISTEN_V_NOTIMPL},
		{"ATRN", RQ_LISTEN_V_NOTIMPL}, {"SEND", RQ_LISTEN_V_NOTIMPL},
		{"SOML", RQ_LISTEN_V_NOTIMPL}, {"SAML", RQ_LISTEN_V_NOTIMPL},
	};
	*arg = len;
	if (len >= 10 && strncasecmp(line, "MAIL FROM:", 10) == 0) {
		*arg = 10;
		return RQ_LISTEN_V_MAIL;
	}
	if (len >= 8 && strncasecmp(line, "RCPT TO:", 8) == 0) {
		*arg = 8;
		return RQ_LISTEN_V_RCPT;
	}
	size_t w = 0;
	while (w < len && line[w] != ' ')
		w++;
	for (size_t i = 0; i < sizeof(verbs) / sizeof(verbs[0]); i++) {
		if (word_is(line, w, verbs[i].w)) {
			*arg = w < len ? w + 1 : len;
			return verbs[i].v;
		}
	}
	return RQ_LISTEN_V_UNKNOWN;
}

static int parse_params(const char *p, const char *end, bool mail,
			struct rq_listen_params *out, const char **why)
{
	while (p < end) {
		while (p < end && *p == ' ')
			p++;
		if (p >= end)
			break;
		const char *k = p;
		while (p < end && *p != ' ')
			p++;
		size_t n = (size_t)(p - k);
		const char *eq = memchr(k, '=', n);
		size_t kn = eq ? (size_t)(eq - k) : n;
		const char *v = eq ? eq + 1 : NULL;
		size_t vn = eq ? (size_t)(p - v) : 0;
		if (!mail) {
			*why = "5.5.4 Unsupported RCPT TO parameter";
			return 555;
		}
		if (word_is(k, kn, "SIZE") && v) {
			uint64_t s = 0;
			if (vn == 0 || vn > 19) {
				*why = "5.5.4 Bad SIZE parameter";
				return 501;
			}
			for (size_t i = 0; i < vn; i++) {
				if (!isdigit((unsigned char)v[i])) {
					*why = "5.5.4 Bad SIZE parameter";
					return 501;
				}
				s = s * 10 + (uint64_t)(v[i] - '0');
			}
			out->has_size = true;
			out->size = s;
		} else if (word_is(k, kn, "BODY") && v) {
			if (word_is(v, vn, "8BITMIME")) {
				out->body_8bit = true;
			} else if (!word_is(v, vn, "7BIT")) {
				*why = "5.5.4 Unsupported BODY parameter";
				return 555;
			}
		} else if (word_is(k, kn, "SMTPUTF8") && !v) {
			out->smtputf8 = true;
		} else if (word_is(k, kn, "AUTH") && v) {
			/* RFC 4954 5: accepted, not used */
		} else {
			*why = "5.5.4 Unsupported MAIL FROM parameter";
			return 555;
		}
	}
	return 0;
}

int rq_listen_path_parse(const char *arg, size_t len, bool mail, char *addr, size_t cap,
			 size_t *addrlen, struct rq_listen_params *p, const char **why)
{
	const char *s = arg, *end = arg + len;
	char verr[160];
	memset(p, 0, sizeof(*p));
	*addrlen = 0;
	if (cap)
		addr[0] = '\0';
	while (s < end && *s == ' ')
		s++;
	if (s >= end || *s != '<') {
		*why = mail ? "5.5.4 Syntax: MAIL FROM:<address>" : "5.5.4 Syntax: RCPT TO:<address>";
		return 501;
	}
	s++;
	/* the closing '>' outside a quoted local part */
	const char *a = s, *q = s;
	bool quoted = false;
	for (; q < end; q++) {
		if (quoted && *q == '\\' && q + 1 < end) {
			q++;
			continue;
		}
		if (*q == '"')
			quoted = !quoted;
		else if (!quoted && *q == '>')
			break;
	}
	if (q >= end) {
		*why = "5.5.4 Syntax: missing >";
		return 501;
	}
	/* a source route "@a,@b:" is dropped (RFC 5321 4.1.1.3, C) */
	if (a < q && *a == '@') {
		const char *c = memchr(a, ':', (size_t)(q - a));
		if (!c) {
			*why = mail ? "5.1.7 Bad sender address syntax" : "5.1.3 Bad recipient address syntax";
			return 553;
		}
		a = c + 1;
	}
	size_t n = (size_t)(q - a);
	if (n + 1 > cap || n > RQ_ADDR_PATH_MAX) {
		*why = mail ? "5.1.7 Sender address too long" : "5.1.3 Recipient address too long";
		return 553;
	}
	if (!rq_addr_valid(a, n, mail, verr, sizeof(verr))) {
		*why = mail ? "5.1.7 Bad sender address syntax" : "5.1.3 Bad recipient address syntax";
		return 553;
	}
	memcpy(addr, a, n);
	addr[n] = '\0';
	*addrlen = n;
	q++;
	if (q < end && *q != ' ') {
		*why = "5.5.4 Syntax: text after the address";
		return 501;
	}
	return parse_params(q, end, mail, p, why);
}

/* ------------------------------------------------------------------------
 * DATA
 */

void rq_listen_data_init(struct rq_listen_data *d, uint64_t max)
{
	memset(d, 0, sizeof(*d));
	d->max = max;
	d->prev_crlf = true;
}

void rq_listen_data_finish(struct rq_listen_data *d)
{
	free(d->buf);
	d->buf = NULL;
	d->len = d->cap = 0;
}

static void data_drop(struct rq_listen_data *d)
{
	rq_listen_data_finish(d);
}

static int data_put(struct rq_listen_data *d, const char *p, size_t n)
{
	if (d->len + n + 2 > d->cap) {
		size_t cap = d->cap ? d->cap : 4096;
		while (cap < d->len + n + 2)
			cap *= 2;
		if (cap > d->max + 2 && d->max + 2 >= d->len + n + 2)
			cap = (size_t)d->max + 2;
		char *b = realloc(d->buf, cap);
		if (!b)
			return -1;
		d->buf = b;
		d->cap = cap;
	}
	memcpy(d->buf + d->len, p, n);
	d->buf[d->len + n] = '\r';
	d->buf[d->len + n + 1] = '\n';
	d->len += n + 2;
	return 0;
}

int rq_listen_data_line(struct rq_listen_data *d, const char *line, size_t len, bool complete)
{
	if (d->done)
		return 1;
	if (!complete) {
		d->too_long = true;
		d->skipping = true;
		d->prev_crlf = false;
		d->size += len;
		data_drop(d);
		return 0;
	}
	size_t n = len;
	if (n && line[n - 1] == '\n')
		n--;
	bool crlf = n && line[n - 1] == '\r' && n < len;
	if (crlf)
		n--;
	if (d->skipping) {
		d->skipping = false;
		d->prev_crlf = crlf;
		d->size += n + 2;
		return 0;
	}
	if (n == 1 && line[0] == '.' && crlf && d->prev_crlf) {
		d->done = true;
		return 1;
	}
	const char *p = line;
	if (n && p[0] == '.') {  /* dot-unstuffing; the dot is not counted */
		p++;
		n--;
	}
	d->prev_crlf = crlf;
	if (n + 2 > RQ_LISTEN_DATA_LINE_MAX)
		d->too_long = true;
	if (memchr(p, '\0', n))
		d->nul = true;
	d->size += n + 2;
	if (d->size > d->max)
		d->too_big = true;
	if (d->too_big || d->too_long || d->nul || d->oom) {
		data_drop(d);
		return 0;
	}
	if (data_put(d, p, n) < 0) {
		d->oom = true;
		data_drop(d);
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * Names
 */

static const char *const state_names[RQ_LISTEN_ST_COUNT_] = {
	"tls", "greet", "ready", "auth-plain", "auth-user", "auth-pass", "auth-wait",
	"auth-check", "mail", "rcpt", "data", "enqueue", "starttls", "quit", "closed",
};

const char *rq_listen_state_name(enum rq_listen_state st)
{
	if ((int)st < 0 || st >= RQ_LISTEN_ST_COUNT_)
		return "?";
	return state_names[st];
}

static const char *const reject_names[RQ_LISTEN_REJ_COUNT_] = {
	"auth_required", "size", "recipients", "address", "line", "content", "redis",
	"lost", "connections", "per_ip",
};

const char *rq_listen_reject_name(enum rq_listen_reject r)
{
	if ((int)r < 0 || r >= RQ_LISTEN_REJ_COUNT_)
		return "?";
	return reject_names[r];
}

/* ------------------------------------------------------------------------
 * The listener and its sessions
 */

struct sess;

/* The credentials as loaded; the listener holds one reference, each
 * password check in flight one more. Counted on the loop thread only. */
struct creds_ref {
	struct rq_credentials *c;
	unsigned refs;
};

/* One password check, handed to a worker and back. */
struct auth_job {
	struct auth_job *next;
	struct sess *s;                /* its auth_pending keeps it alive */
	struct creds_ref *cr;
	char user[RQ_CREDENTIALS_USER_MAX + 1];
	char *pw;                      /* heap, wiped by the worker */
	size_t pwlen;
	bool ok;                       /* written by the worker */
};

/* The password-check threads. mu guards todo, done, quit and hold. */
struct auth_pool {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct auth_job *todo, *todo_tail, *done;
	bool quit, hold;
	pthread_t threads[AUTH_THREADS_MAX];
	int nthreads;
	int pipe[2];                   /* a worker writes a byte when done grows */
	struct event *ev;              /* the read end, on the loop */
	unsigned outstanding;          /* loop thread: submitted, not handled */
	bool mu_ok, cv_ok;
};

struct rq_listen {
	struct event_base *base;
	struct rq_listen_opts o;       /* strings below are our copies */
	char *name, *queue_name, *hostname, *redis_url, *redis_user, *redis_pw_file,
		*redis_pw_env, *tls_cert, *tls_key, *auth_file, *meta_json;
	struct rq_cidr *trusted;
	size_t ntrusted;
	struct evconnlistener *lev;
	int port;
	struct rq_tls_ctx *tls;
	struct creds_ref *creds;
	struct auth_pool *pool;
	size_t nrefusing;              /* implicit TLS sessions that only get 421 */
	struct rq_queue *q;
	struct event *requeue;         /* builds a new queue client after a reset */
	struct sess *sessions;         /* list of open sessions */
	size_t nsessions;
	uint64_t next_id;
	struct rq_listen_stats st;
	bool stopping;
	void (*stop_done)(void *);
	void *stop_arg;
	struct event *stop_ev;         /* runs stop_done from the loop */
	int depth;                     /* inside a queue callback */
};

struct sess {
	struct rq_listen *l;
	struct sess *prev, *next;
	uint64_t id;
	char log_id[24];
	int fd;                        /* owned while plain; -1 once TLS owns it */
	struct bufferevent *bev;
	enum rq_listen_state st;
	struct sockaddr_storage peer;
	char ip[INET6_ADDRSTRLEN];
	bool trusted;
	bool tls, esmtp, helo_done, authed;
	bool via_starttls;             /* TLS came after a plain greeting */
	char helo[HELO_MAX + 1];
	char user[RQ_CREDENTIALS_USER_MAX + 1];
	struct event *timer;           /* inactivity */
	struct event *deadline;        /* per message */
	struct event *wait;            /* AUTH failure delay, enqueue timeout */
	struct event *kick;            /* resume reading from the loop */
	int depth;
	bool dead;                     /* free at the next safe point */
	bool enqueue_pending;          /* the queue still holds our callback */
	bool auth_pending;             /* a worker holds a check of ours */
	int refusing;                  /* implicit TLS: 421 after the handshake
					* (enum rq_listen_reject + 1), or 0 */
	bool stop_after;               /* 421 once the pending answer is out */
	bool skip_long;                /* inside an over-long command line */
	bool out_full;                 /* reading paused: replies not read */
	unsigned commands, bad, auth_failures;
	char pending[160];             /* the reply an AUTH_WAIT delays */
	/* the transaction */
	char *from;
	char **rcpts;
	size_t nrcpts, rcpts_cap;
	struct rq_listen_params mp;
	bool in_data;
	struct rq_listen_data data;
	bool nul_reported;
	/* AUTH LOGIN: the user name between the two prompts (wiped) */
	char login_user[RQ_CREDENTIALS_USER_MAX + 1];
};

static void to_state(struct sess *s, enum rq_listen_state st);
static void process(struct sess *s);
static void sess_close(struct sess *s);
static void queue_create(struct rq_listen *l);

static void enter(struct sess *s)
{
	s->depth++;
}

static void really_free(struct sess *s)
{
	struct rq_listen *l = s->l;
	if (s->prev)
		s->prev->next = s->next;
	else if (l->sessions == s)
		l->sessions = s->next;
	if (s->next)
		s->next->prev = s->prev;
	if (l->nsessions)
		l->nsessions--;
	if (s->refusing && l->nrefusing)
		l->nrefusing--;
	if (s->timer)
		event_free(s->timer);
	if (s->deadline)
		event_free(s->deadline);
	if (s->wait)
		event_free(s->wait);
	if (s->kick)
		event_free(s->kick);
	free(s->from);
	for (size_t i = 0; i < s->nrcpts; i++)
		free(s->rcpts[i]);
	free(s->rcpts);
	rq_listen_data_finish(&s->data);
	OPENSSL_cleanse(s->login_user, sizeof(s->login_user));
	OPENSSL_cleanse(s->pending, sizeof(s->pending));
	free(s);
	if (l->stopping && l->nsessions == 0 && l->stop_ev)
		event_active(l->stop_ev, EV_TIMEOUT, 1);
}

static void maybe_free(struct sess *s)
{
	if (s->depth == 0 && s->dead && !s->enqueue_pending && !s->auth_pending)
		really_free(s);
}

static void leave(struct sess *s)
{
	s->depth--;
	maybe_free(s);
}

static void arm(struct event *ev, int ms)
{
	if (ms <= 0) {
		event_del(ev);
		return;
	}
	struct timeval tv = rq_clock_tv(ms);
	event_add(ev, &tv);
}

/* ---- replies ---- */

static void reply(struct sess *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply(struct sess *s, const char *fmt, ...)
{
	char buf[600];
	if (!s->bev)
		return;
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(buf) - 3)
		n = (int)sizeof(buf) - 3;
	for (int i = 0; i < n; i++)  /* never a line end or NUL inside a reply */
		if ((unsigned char)buf[i] < 0x20)
			buf[i] = ' ';
	buf[n++] = '\r';
	buf[n++] = '\n';
	evbuffer_add(bufferevent_get_output(s->bev), buf, (size_t)n);
}

static void log_msg(struct sess *s, bool ok, const char *reason, const char *code,
		    const char *id, uint64_t size)
{
	char sz[24], nr[24];
	snprintf(sz, sizeof(sz), "%llu", (unsigned long long)size);
	snprintf(nr, sizeof(nr), "%zu", s->nrcpts);
	rq_log(ok ? RQ_LOG_INFO : RQ_LOG_WARN, ok ? "listen_accepted" : "listen_rejected",
	       "listener", s->l->name, "session", s->log_id, "client", s->ip,
	       "user", s->authed ? s->user : "", "from", s->from ? s->from : "",
	       "rcpts", nr, "size", sz, "id", id ? id : "", "reason", reason ? reason : "",
	       "code", code ? code : "", NULL);
}

static void reject(struct sess *s, enum rq_listen_reject why, const char *code, uint64_t size)
{
	s->l->st.rejected[why]++;
	log_msg(s, false, rq_listen_reject_name(why), code, NULL, size);
}

/* ---- the transaction ---- */

static void txn_reset(struct sess *s)
{
	free(s->from);
	s->from = NULL;
	for (size_t i = 0; i < s->nrcpts; i++)
		free(s->rcpts[i]);
	s->nrcpts = 0;
	memset(&s->mp, 0, sizeof(s->mp));
	rq_listen_data_finish(&s->data);
	s->in_data = false;
	if (s->deadline)
		event_del(s->deadline);
}

/* ---- closing ---- */

static void sess_free_bev(struct sess *s)
{
	if (s->bev) {
		bufferevent_disable(s->bev, EV_READ | EV_WRITE);
		bufferevent_setcb(s->bev, NULL, NULL, NULL, NULL);
		bufferevent_free(s->bev);
		s->bev = NULL;
	}
	if (s->fd >= 0) {
		close(s->fd);
		s->fd = -1;
	}
}

/* Closes now, without a reply. */
static void sess_close(struct sess *s)
{
	if (s->dead)
		return;
	if (s->in_data)
		reject(s, RQ_LISTEN_REJ_LOST, NULL, s->data.size);
	if (rq_log_enabled(RQ_LOG_DEBUG))
		rq_log(RQ_LOG_DEBUG, "listen_close", "listener", s->l->name, "session",
		       s->log_id, "client", s->ip, "state", state_names[s->st], NULL);
	txn_reset(s);
	sess_free_bev(s);
	event_del(s->timer);
	event_del(s->wait);
	event_del(s->kick);
	s->st = RQ_LISTEN_ST_CLOSED;
	s->dead = true;
	maybe_free(s);
}

/* A last reply (221, 421), then close once it is written. */
static void sess_quit(struct sess *s, const char *code, const char *text)
{
	if (s->in_data)
		reject(s, RQ_LISTEN_REJ_LOST, NULL, s->data.size);
	txn_reset(s);
	reply(s, "%s %s %s", code, s->l->hostname, text);
	to_state(s, RQ_LISTEN_ST_QUIT);
}

/* ---- states ---- */

static void ehlo_reply(struct sess *s)
{
	struct rq_listen *l = s->l;
	struct evbuffer *out = bufferevent_get_output(s->bev);
	evbuffer_add_printf(out, "250-%s Hello %s [%s]\r\n", l->hostname, s->helo, s->ip);
	evbuffer_add_printf(out, "250-PIPELINING\r\n");
	evbuffer_add_printf(out, "250-SIZE %llu\r\n", (unsigned long long)l->o.max_size);
	evbuffer_add_printf(out, "250-8BITMIME\r\n");
	evbuffer_add_printf(out, "250-SMTPUTF8\r\n");
	if (l->tls && !s->tls)
		evbuffer_add_printf(out, "250-STARTTLS\r\n");
	if (l->creds && (s->tls || l->o.auth_allow_plaintext) && !s->authed)
		evbuffer_add_printf(out, "250-AUTH PLAIN LOGIN\r\n");
	evbuffer_add_printf(out, "250 ENHANCEDSTATUSCODES\r\n");
}

static void state_timeouts(struct sess *s, enum rq_listen_state st, int *t)
{
	switch (st) {
	case RQ_LISTEN_ST_DATA: *t = s->l->o.data_timeout_ms; break;
	case RQ_LISTEN_ST_ENQUEUE:
	case RQ_LISTEN_ST_AUTH_WAIT: *t = 0; break;  /* the wait timer runs */
	case RQ_LISTEN_ST_AUTH_CHECK: *t = 0; break; /* the worker answers */
	case RQ_LISTEN_ST_QUIT:
	case RQ_LISTEN_ST_STARTTLS: *t = s->l->o.close_timeout_ms; break;
	case RQ_LISTEN_ST_CLOSED: *t = 0; break;
	default: *t = s->l->o.timeout_ms; break;
	}
}

/*
 * Enters a state and sends the reply that goes with it: the only place
 * those replies are written. Other replies (250, errors) are the answers
 * of commands that leave the state as it is or move it here afterwards.
 */
static void to_state(struct sess *s, enum rq_listen_state st)
{
	int t;
	if (rq_log_enabled(RQ_LOG_DEBUG) && st != s->st)
		rq_log(RQ_LOG_DEBUG, "listen_state", "listener", s->l->name, "session",
		       s->log_id, "from", state_names[s->st], "to", state_names[st], NULL);
	s->st = st;
	state_timeouts(s, st, &t);
	arm(s->timer, t);
	switch (st) {
	case RQ_LISTEN_ST_GREET:
		s->helo_done = s->esmtp = false;
		s->helo[0] = '\0';
		/* after STARTTLS the client speaks first (EHLO) */
		if (!s->via_starttls)
			reply(s, "220 %s ESMTP relayq", s->l->hostname);
		break;
	case RQ_LISTEN_ST_AUTH_PLAIN:
		reply(s, "334 ");
		break;
	case RQ_LISTEN_ST_AUTH_USER:
		reply(s, "334 VXNlcm5hbWU6");   /* "Username:" */
		break;
	case RQ_LISTEN_ST_AUTH_PASS:
		reply(s, "334 UGFzc3dvcmQ6");   /* "Password:" */
		break;
	case RQ_LISTEN_ST_DATA:
		rq_listen_data_init(&s->data, s->l->o.max_size);
		s->in_data = true;
		reply(s, "354 End data with <CR><LF>.<CR><LF>");
		break;
	case RQ_LISTEN_ST_STARTTLS: {
		/* Nothing read after STARTTLS may count as said under TLS
		 * (CVE-2011-0411 class): drop it, read no more until the
		 * handshake, which starts once the 220 has left. */
		struct evbuffer *in = bufferevent_get_input(s->bev);
		size_t extra = evbuffer_get_length(in);
		if (extra) {
			char n[24];
			snprintf(n, sizeof(n), "%zu", extra);
			rq_log(RQ_LOG_WARN, "listen_starttls_injection", "listener", s->l->name,
			       "session", s->log_id, "client", s->ip, "discarded", n, NULL);
			evbuffer_drain(in, extra);
		}
		bufferevent_disable(s->bev, EV_READ);
		reply(s, "220 2.0.0 Ready to start TLS");
		break;
	}
	case RQ_LISTEN_ST_QUIT:
		if (s->bev) {
			bufferevent_disable(s->bev, EV_READ);
			evbuffer_drain(bufferevent_get_input(s->bev),
				       evbuffer_get_length(bufferevent_get_input(s->bev)));
		}
		event_del(s->wait);
		break;
	default:
		break;
	}
}

/* ---- TLS ---- */

static const char *refuse_text(enum rq_listen_reject why);
static void bev_read_cb(struct bufferevent *bev, void *arg);
static void bev_write_cb(struct bufferevent *bev, void *arg);
static void bev_event_cb(struct bufferevent *bev, short what, void *arg);

static void setup_bev(struct sess *s)
{
	bufferevent_setcb(s->bev, bev_read_cb, bev_write_cb, bev_event_cb, s);
	bufferevent_setwatermark(s->bev, EV_READ, 0, IN_MAX);
	bufferevent_setwatermark(s->bev, EV_WRITE, 0, 0);
	bufferevent_enable(s->bev, EV_READ | EV_WRITE);
}

/* Replaces the plain connection by a TLS one on the same socket. */
static int tls_start(struct sess *s)
{
	char err[256];
	SSL *ssl = rq_tls_server_ssl_new(s->l->tls, err, sizeof(err));
	if (!ssl) {
		rq_log(RQ_LOG_ERROR, "listen_tls_error", "listener", s->l->name, "error", err, NULL);
		return -1;
	}
	int fd = s->fd;
	if (s->bev) {
		s->via_starttls = true;
		bufferevent_setcb(s->bev, NULL, NULL, NULL, NULL);
		bufferevent_free(s->bev);
		s->bev = NULL;
	}
	s->bev = bufferevent_openssl_socket_new(s->l->base, fd, ssl,
						BUFFEREVENT_SSL_ACCEPTING,
						BEV_OPT_CLOSE_ON_FREE);
	if (!s->bev) {
		SSL_free(ssl);
		return -1;
	}
	s->fd = -1;  /* the TLS bufferevent closes it */
	bufferevent_openssl_set_allow_dirty_shutdown(s->bev, 1);
	setup_bev(s);
	to_state(s, RQ_LISTEN_ST_TLS);
	if (s->refusing)  /* only a 421 to say: a short handshake */
		arm(s->timer, s->l->o.close_timeout_ms);
	return 0;
}

/* ---- enqueue ---- */

static void kick_soon(struct sess *s)
{
	event_active(s->kick, EV_TIMEOUT, 1);
}

static void enqueue_done(struct sess *s, bool ok, const char *id, const char *err,
			 size_t size)
{
	struct rq_listen *l = s->l;
	event_del(s->wait);
	s->enqueue_pending = false;
	s->in_data = false;
	if (s->dead)
		return;  /* the client left: nobody to tell */
	if (ok) {
		l->st.messages++;
		l->st.bytes += size;
		reply(s, "250 2.0.0 Ok: queued as %s", id);
		log_msg(s, true, NULL, "250", id, size);
	} else if (err && strncmp(err, "OOM ", 4) == 0) {
		/* Redis is at maxmemory (noeviction): nothing was written */
		reply(s, "452 4.3.1 Error: queue storage full, try again later");
		rq_log(RQ_LOG_WARN, "listen_redis_error", "listener", l->name, "session",
		       s->log_id, "error", err, NULL);
		reject(s, RQ_LISTEN_REJ_REDIS, "452", size);
	} else if (err && strncmp(err, "ERR relayq: ", 12) == 0) {
		/* the queue refuses the message itself: asking again will not help */
		reply(s, "554 5.6.0 Error: message refused by the queue: %.200s", err + 12);
		reject(s, RQ_LISTEN_REJ_CONTENT, "554", size);
	} else {
		reply(s, "451 4.3.0 Error: queue unavailable, try again later");
		if (err && *err)
			rq_log(RQ_LOG_WARN, "listen_redis_error", "listener", l->name, "session",
			       s->log_id, "error", err, NULL);
		reject(s, RQ_LISTEN_REJ_REDIS, "451", size);
	}
	txn_reset(s);
	if (s->stop_after) {
		sess_quit(s, "421 4.3.2", "Service shutting down");
		return;
	}
	to_state(s, RQ_LISTEN_ST_READY);
	kick_soon(s);
}

struct enq {
	struct sess *s;
	size_t size;
};

static void on_enqueued(struct rq_queue *q, enum rq_queue_status st, const char *err,
			const char *id, void *arg)
{
	struct enq *e = arg;
	struct sess *s = e->s;
	size_t size = e->size;
	free(e);
	if (!s)
		return;
	enter(s);
	enqueue_done(s, st == RQ_QUEUE_OK, id, st == RQ_QUEUE_ECANCEL ? "timeout or shutdown" : err,
		     size);
	leave(s);
}

static int build_meta(struct sess *s, struct rq_json **out)
{
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_obj_begin(&b);
	rq_json_buf_kv_str(&b, "via", "smtp");
	rq_json_buf_kv_str(&b, "client", s->ip);
	if (s->authed)
		rq_json_buf_kv_str(&b, "user", s->user);
	if (s->l->meta_json) {
		struct rq_json *m = rq_json_parse(s->l->meta_json, strlen(s->l->meta_json), 0,
						  NULL, 0);
		for (const struct rq_json *c = m ? m->child : NULL; c; c = c->next) {
			rq_json_buf_key(&b, c->key);
			rq_json_buf_value(&b, c);
		}
		rq_json_free(m);
	}
	rq_json_buf_obj_end(&b);
	int rc = -1;
	if (rq_json_buf_ok(&b)) {
		*out = rq_json_parse(b.data, b.len, 0, NULL, 0);
		rc = *out ? 0 : -1;
	}
	rq_json_buf_finish(&b);
	return rc;
}

static void enqueue_timeout(struct rq_listen *l);

/* The final dot: build the message and hand it to Redis. */
static void data_end(struct sess *s)
{
	struct rq_listen *l = s->l;
	struct rq_listen_data *d = &s->data;
	char err[200], received[RQ_SUBMIT_RECEIVED_LEN];
	char *msg = NULL;
	size_t msglen = 0;
	struct rq_json *meta = NULL;
	event_del(s->deadline);
	s->in_data = false;
	if (d->too_long) {
		reply(s, "500 5.5.2 Error: line too long");
		reject(s, RQ_LISTEN_REJ_LINE, "500", d->size);
		goto done;
	}
	if (d->too_big) {
		reply(s, "552 5.3.4 Error: message size exceeds fixed maximum message size");
		reject(s, RQ_LISTEN_REJ_SIZE, "552", d->size);
		goto done;
	}
	if (d->nul) {
		reply(s, "554 5.6.0 Error: NUL character in message");
		reject(s, RQ_LISTEN_REJ_CONTENT, "554", d->size);
		goto done;
	}
	if (d->oom || d->len == 0) {
		reply(s, d->oom ? "451 4.3.0 Error: out of memory" : "554 5.6.0 Error: empty message");
		reject(s, d->oom ? RQ_LISTEN_REJ_REDIS : RQ_LISTEN_REJ_CONTENT,
		       d->oom ? "451" : "554", d->size);
		goto done;
	}
	struct rq_queue_stats qs;
	if (l->q)
		rq_queue_get_stats(l->q, &qs);
	if (!l->q || qs.state != RQ_QUEUE_READY) {
		reply(s, "451 4.3.0 Error: queue unavailable, try again later");
		reject(s, RQ_LISTEN_REJ_REDIS, "451", d->size);
		goto done;
	}
	int64_t now = rq_clock_wall_ms();
	const char *proto = s->esmtp ? (s->tls ? (s->authed ? "ESMTPSA" : "ESMTPS")
					       : (s->authed ? "ESMTPA" : "ESMTP"))
				     : "SMTP";
	if (rq_submit_received(received, sizeof(received), s->helo, NULL, s->ip, l->hostname,
			       proto, s->nrcpts == 1 ? s->rcpts[0] : NULL, now) < 0)
		received[0] = '\0';
	struct rq_submit_fix fix = {
		.received = received[0] ? received : NULL,
		.add_message_id = l->o.add_message_id,
		.add_date = l->o.add_date,
		.hostname = l->hostname,
		.now_ms = now,
	};
	if (rq_submit_fix(d->buf, d->len, &fix, &msg, &msglen, err, sizeof(err)) < 0) {
		reply(s, "451 4.3.0 Error: cannot prepare the message");
		rq_log(RQ_LOG_ERROR, "listen_submit_error", "listener", l->name, "session",
		       s->log_id, "error", err, NULL);
		reject(s, RQ_LISTEN_REJ_REDIS, "451", d->size);
		goto done;
	}
	rq_listen_data_finish(d);
	if (build_meta(s, &meta) < 0) {
		reply(s, "451 4.3.0 Error: out of memory");
		reject(s, RQ_LISTEN_REJ_REDIS, "451", msglen);
		goto done;
	}
	unsigned char rnd[12];
	char key[64];
	if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
		reply(s, "451 4.3.0 Error: no randomness");
		reject(s, RQ_LISTEN_REJ_REDIS, "451", msglen);
		goto done;
	}
	int k = snprintf(key, sizeof(key), "smtp:");
	for (size_t i = 0; i < sizeof(rnd); i++)
		k += snprintf(key + k, sizeof(key) - (size_t)k, "%02x", rnd[i]);
	struct rq_queue_enqueue_req req = {
		.from = s->from,
		.to = (const char *const *)s->rcpts,
		.nto = s->nrcpts,
		.body = msg,
		.body_len = msglen,
		.key = key,
		.delay_s = -1,
		.meta = meta,
	};
	struct enq *e = calloc(1, sizeof(*e));
	if (!e) {
		reply(s, "451 4.3.0 Error: out of memory");
		reject(s, RQ_LISTEN_REJ_REDIS, "451", msglen);
		goto done;
	}
	e->s = s;
	e->size = msglen;
	if (rq_queue_enqueue(l->q, &req, on_enqueued, e) < 0) {
		free(e);
		reply(s, "451 4.3.0 Error: queue unavailable, try again later");
		reject(s, RQ_LISTEN_REJ_REDIS, "451", msglen);
		goto done;
	}
	s->enqueue_pending = true;
	to_state(s, RQ_LISTEN_ST_ENQUEUE);
	arm(s->wait, l->o.enqueue_timeout_ms);
	free(msg);
	rq_json_free(meta);
	return;
done:
	free(msg);
	rq_json_free(meta);
	txn_reset(s);
	to_state(s, RQ_LISTEN_ST_READY);
}

/* ---- AUTH ---- */

static bool auth_allowed(const struct sess *s)
{
	return s->l->creds && (s->tls || s->l->o.auth_allow_plaintext);
}

/* Decodes base64 (no line breaks); -1 when invalid. *out heap (wipe it). */
static int b64_decode(const char *in, size_t n, unsigned char **out, size_t *outlen)
{
	*out = NULL;
	if (n % 4 != 0)
		return -1;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)in[i];
		if (!(isalnum(c) || c == '+' || c == '/' || (c == '=' && i >= n - 2)))
			return -1;
		if (c == '=' && i == n - 2 && in[n - 1] != '=')
			return -1;
	}
	unsigned char *b = malloc(n / 4 * 3 + 1);
	if (!b)
		return -1;
	int r = n ? EVP_DecodeBlock(b, (const unsigned char *)in, (int)n) : 0;
	if (r < 0) {
		free(b);
		return -1;
	}
	size_t len = (size_t)r;
	if (n >= 1 && in[n - 1] == '=')
		len--;
	if (n >= 2 && in[n - 2] == '=')
		len--;
	b[len] = '\0';
	*out = b;
	*outlen = len;
	return 0;
}

static void wipe_free(unsigned char *p, size_t n)
{
	if (p) {
		OPENSSL_cleanse(p, n);
		free(p);
	}
}

static void bad_command(struct sess *s);

/* The outcome of one AUTH: 235, or 535 (delayed after the third failure). */
static void auth_result(struct sess *s, bool ok, const char *user)
{
	struct rq_listen *l = s->l;
	if (ok) {
		l->st.auth_ok++;
		s->authed = true;
		snprintf(s->user, sizeof(s->user), "%s", user);
		rq_log(RQ_LOG_INFO, "listen_auth", "listener", l->name, "session", s->log_id,
		       "client", s->ip, "user", s->user, "result", "ok", NULL);
		reply(s, "235 2.7.0 Authentication successful");
		to_state(s, RQ_LISTEN_ST_READY);
		return;
	}
	l->st.auth_failed++;
	s->auth_failures++;
	char u[RQ_CREDENTIALS_USER_MAX + 1] = "";
	if (user && rq_credentials_user_valid(user, strlen(user)))
		snprintf(u, sizeof(u), "%s", user);
	rq_log(RQ_LOG_WARN, "listen_auth", "listener", l->name, "session", s->log_id,
	       "client", s->ip, "user", u, "result", "failed", NULL);
	snprintf(s->pending, sizeof(s->pending), "535 5.7.8 Error: authentication failed");
	s->bad++;
	l->st.bad_commands++;
	if (s->auth_failures > AUTH_FREE_FAILURES) {
		to_state(s, RQ_LISTEN_ST_AUTH_WAIT);
		arm(s->wait, (int)(s->auth_failures - AUTH_FREE_FAILURES) * l->o.auth_delay_ms);
		return;
	}
	reply(s, "%s", s->pending);
	s->pending[0] = '\0';
	to_state(s, RQ_LISTEN_ST_READY);
	if ((int)s->bad >= l->o.max_bad_commands)
		sess_quit(s, "421 4.7.0", "Error: too many errors");
}

/* ---- password checks on worker threads ---- */

static void creds_release(struct creds_ref *cr)
{
	if (cr && --cr->refs == 0) {
		rq_credentials_destroy(cr->c);
		free(cr);
	}
}

static void job_free(struct auth_job *j)
{
	if (!j)
		return;
	if (j->pw) {
		OPENSSL_cleanse(j->pw, j->pwlen);
		free(j->pw);
	}
	OPENSSL_cleanse(j->user, sizeof(j->user));
	free(j);
}

/* A worker: takes a job, runs crypt without the lock, puts it on done and
 * wakes the loop. Touches nothing of the listener but the pool. */
static void *auth_worker(void *arg)
{
	struct auth_pool *p = arg;
	pthread_mutex_lock(&p->mu);
	for (;;) {
		while (!p->quit && (p->hold || !p->todo))
			pthread_cond_wait(&p->cv, &p->mu);
		if (p->quit)
			break;
		struct auth_job *j = p->todo;
		p->todo = j->next;
		if (!p->todo)
			p->todo_tail = NULL;
		pthread_mutex_unlock(&p->mu);
		j->ok = rq_credentials_user_valid(j->user, strlen(j->user)) &&
			rq_credentials_check(j->cr->c, j->user, j->pw, j->pwlen);
		OPENSSL_cleanse(j->pw, j->pwlen);
		pthread_mutex_lock(&p->mu);
		j->next = p->done;
		p->done = j;
		/* a full pipe already says "look": nothing to add */
		ssize_t w = write(p->pipe[1], "x", 1);
		(void)w;
	}
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

static void auth_finished(struct sess *s, struct auth_job *j);

/* The loop side: every finished check, in the order they finished. */
static void pool_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_listen *l = arg;
	struct auth_pool *p = l->pool;
	char buf[64];
	while (read(p->pipe[0], buf, sizeof(buf)) > 0) {
	}
	pthread_mutex_lock(&p->mu);
	struct auth_job *done = p->done, *rev = NULL;
	p->done = NULL;
	pthread_mutex_unlock(&p->mu);
	while (done) {  /* the list is newest first */
		struct auth_job *n = done->next;
		done->next = rev;
		rev = done;
		done = n;
	}
	while (rev) {
		struct auth_job *j = rev;
		rev = j->next;
		struct sess *s = j->s;
		p->outstanding--;
		creds_release(j->cr);
		j->cr = NULL;
		s->auth_pending = false;
		enter(s);
		if (!s->dead)
			auth_finished(s, j);
		job_free(j);
		leave(s);  /* frees a session that went away meanwhile */
	}
}

static void pool_destroy(struct auth_pool *p)
{
	if (!p)
		return;
	if (p->mu_ok && p->cv_ok) {
		pthread_mutex_lock(&p->mu);
		p->quit = true;
		pthread_cond_broadcast(&p->cv);
		pthread_mutex_unlock(&p->mu);
	}
	for (int i = 0; i < p->nthreads; i++)
		pthread_join(p->threads[i], NULL);
	/* the threads are gone: the lists are ours */
	struct auth_job *lists[2] = {p->todo, p->done};
	for (int k = 0; k < 2; k++) {
		for (struct auth_job *j = lists[k], *n; j; j = n) {
			n = j->next;
			j->s->auth_pending = false;
			creds_release(j->cr);
			job_free(j);
		}
	}
	if (p->ev)
		event_free(p->ev);
	for (int i = 0; i < 2; i++)
		if (p->pipe[i] >= 0)
			close(p->pipe[i]);
	if (p->cv_ok)
		pthread_cond_destroy(&p->cv);
	if (p->mu_ok)
		pthread_mutex_destroy(&p->mu);
	free(p);
}

static struct auth_pool *pool_create(struct rq_listen *l, char *err, size_t errlen)
{
	struct auth_pool *p = calloc(1, sizeof(*p));
	if (!p) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	p->pipe[0] = p->pipe[1] = -1;
	p->mu_ok = pthread_mutex_init(&p->mu, NULL) == 0;
	p->cv_ok = pthread_cond_init(&p->cv, NULL) == 0;
	if (!p->mu_ok || !p->cv_ok || pipe2(p->pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
		snprintf(err, errlen, "cannot set up the password-check threads: %s",
			 strerror(errno));
		goto fail;
	}
	p->ev = event_new(l->base, p->pipe[0], EV_READ | EV_PERSIST, pool_cb, l);
	if (!p->ev || event_add(p->ev, NULL) != 0) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	/* the workers take no signal: the loop's handlers stay on its thread */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (int i = 0; i < l->o.auth_threads; i++) {
		int rc = pthread_create(&p->threads[i], NULL, auth_worker, p);
		if (rc != 0) {
			pthread_sigmask(SIG_SETMASK, &old, NULL);
			snprintf(err, errlen, "cannot start a password-check thread: %s",
				 strerror(rc));
			goto fail;
		}
		p->nthreads++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return p;
fail:
	pool_destroy(p);
	return NULL;
}

void rq_listen_auth_hold(struct rq_listen *l, bool hold)
{
	if (!l || !l->pool)
		return;
	pthread_mutex_lock(&l->pool->mu);
	l->pool->hold = hold;
	pthread_cond_broadcast(&l->pool->cv);
	pthread_mutex_unlock(&l->pool->mu);
}

/* Hands the check to a worker: the session waits in AUTH_CHECK. A full
 * queue is 454 at once. */
static void auth_check(struct sess *s, const char *user, const char *pw, size_t pwlen)
{
	struct rq_listen *l = s->l;
	struct auth_pool *p = l->pool;
	struct auth_job *j = NULL;
	if (!p || !l->creds || p->outstanding >= (unsigned)l->o.auth_queue_max)
		goto busy;
	j = calloc(1, sizeof(*j));
	if (!j)
		goto busy;
	snprintf(j->user, sizeof(j->user), "%s", user);
	j->pw = malloc(pwlen + 1);
	if (!j->pw)
		goto busy;
	memcpy(j->pw, pw, pwlen);
	j->pw[pwlen] = '\0';
	j->pwlen = pwlen;
	j->s = s;
	j->cr = l->creds;
	j->cr->refs++;
	p->outstanding++;
	s->auth_pending = true;
	to_state(s, RQ_LISTEN_ST_AUTH_CHECK);
	pthread_mutex_lock(&p->mu);
	if (p->todo_tail)
		p->todo_tail->next = j;
	else
		p->todo = j;
	p->todo_tail = j;
	pthread_cond_signal(&p->cv);
	pthread_mutex_unlock(&p->mu);
	return;
busy:
	job_free(j);
	l->st.auth_busy++;
	rq_log(RQ_LOG_WARN, "listen_auth_busy", "listener", l->name, "session", s->log_id,
	       "client", s->ip, NULL);
	reply(s, "454 4.7.0 Temporary authentication failure");
	to_state(s, RQ_LISTEN_ST_READY);
}

/* A check came back to a session still open. */
static void auth_finished(struct sess *s, struct auth_job *j)
{
	auth_result(s, j->ok, j->user);
	if (s->dead || s->st == RQ_LISTEN_ST_QUIT || s->st == RQ_LISTEN_ST_AUTH_WAIT)
		return;  /* AUTH_WAIT: wait_cb says 421 when stopping */
	if (s->stop_after || s->l->stopping) {
		sess_quit(s, "421 4.3.2", "Service shutting down");
		return;
	}
	process(s);  /* the commands pipelined behind the AUTH */
}

/* A refused AUTH exchange: the reply, back to READY, one bad command. */
static void auth_bad(struct sess *s, const char *text)
{
	reply(s, "%s", text);
	to_state(s, RQ_LISTEN_ST_READY);
	bad_command(s);
}

/* The client's answer to an AUTH challenge, base64-decoded into raw. "*"
 * cancels; what does not decode is refused with bad_b64. -1 when it was
 * answered here (raw NULL), 0 with raw to wipe_free. */
static int auth_response(struct sess *s, const char *resp, size_t n, const char *bad_b64,
			 unsigned char **raw, size_t *rl)
{
	if (n == 1 && resp[0] == '*') {
		reply(s, "501 5.7.0 Authentication cancelled");
		to_state(s, RQ_LISTEN_ST_READY);
		return -1;
	}
	if (b64_decode(resp, n, raw, rl) < 0) {
		auth_bad(s, bad_b64);
		return -1;
	}
	return 0;
}

/* PLAIN: authzid NUL authcid NUL password (RFC 4616); authzid empty or
 * the same user. */
static void auth_plain(struct sess *s, const char *resp, size_t n)
{
	unsigned char *raw = NULL;
	size_t rl = 0;
	if (auth_response(s, resp, n, "501 5.5.2 Error: invalid base64", &raw, &rl) < 0)
		return;
	const char *a = (const char *)raw, *end = (const char *)raw + rl;
	const char *n1 = memchr(a, '\0', rl);
	const char *n2 = n1 ? memchr(n1 + 1, '\0', (size_t)(end - n1 - 1)) : NULL;
	if (!n1 || !n2) {
		wipe_free(raw, rl);
		auth_bad(s, "501 5.5.2 Error: malformed PLAIN response");
		return;
	}
	const char *user = n1 + 1, *pw = n2 + 1;
	size_t pwlen = (size_t)(end - pw);
	bool authz_ok = n1 == a || strcmp(a, user) == 0;
	if (!authz_ok)
		auth_result(s, false, user);
	else
		auth_check(s, user, pw, pwlen);
	wipe_free(raw, rl);
}

static void auth_login_user(struct sess *s, const char *resp, size_t n)
{
	static const char bad[] = "501 5.5.2 Error: invalid user name";
	unsigned char *raw = NULL;
	size_t rl = 0;
	if (auth_response(s, resp, n, bad, &raw, &rl) < 0)
		return;
	if (rl >= sizeof(s->login_user) || memchr(raw, '\0', rl)) {
		wipe_free(raw, rl);
		auth_bad(s, bad);
		return;
	}
	memcpy(s->login_user, raw, rl + 1);
	wipe_free(raw, rl);
	to_state(s, RQ_LISTEN_ST_AUTH_PASS);
}

static void auth_login_pass(struct sess *s, const char *resp, size_t n)
{
	unsigned char *raw = NULL;
	size_t rl = 0;
	/* the user name is wiped from the session before any reply */
	char user[sizeof(s->login_user)];
	memcpy(user, s->login_user, sizeof(user));
	OPENSSL_cleanse(s->login_user, sizeof(s->login_user));
	if (auth_response(s, resp, n, "501 5.5.2 Error: invalid base64", &raw, &rl) == 0) {
		auth_check(s, user, (const char *)raw, rl);
		wipe_free(raw, rl);
	}
	OPENSSL_cleanse(user, sizeof(user));
}

static void cmd_auth(struct sess *s, const char *arg, size_t n)
{
	if (!s->l->creds) {
		reply(s, "502 5.5.1 Error: AUTH not available");
		bad_command(s);
		return;
	}
	if (!auth_allowed(s)) {
		reply(s, "530 5.7.0 Must issue a STARTTLS command first");
		bad_command(s);
		return;
	}
	if (!s->esmtp) {
		reply(s, "503 5.5.1 Error: send EHLO first");
		bad_command(s);
		return;
	}
	if (s->authed) {
		reply(s, "503 5.5.1 Error: already authenticated");
		bad_command(s);
		return;
	}
	if (s->st != RQ_LISTEN_ST_READY) {
		reply(s, "503 5.5.1 Error: AUTH not allowed during a mail transaction");
		bad_command(s);
		return;
	}
	size_t m = 0;
	while (m < n && arg[m] != ' ')
		m++;
	const char *ir = m < n ? arg + m + 1 : NULL;
	size_t irn = ir ? n - m - 1 : 0;
	if (word_is(arg, m, "PLAIN")) {
		if (!ir) {
			to_state(s, RQ_LISTEN_ST_AUTH_PLAIN);
		} else if (irn == 1 && ir[0] == '=') {
			auth_plain(s, "", 0);
		} else {
			auth_plain(s, ir, irn);
		}
	} else if (word_is(arg, m, "LOGIN")) {
		if (!ir) {
			to_state(s, RQ_LISTEN_ST_AUTH_USER);
		} else {
			auth_login_user(s, ir, irn);  /* the user name came along */
		}
	} else {
		reply(s, "504 5.5.4 Error: unsupported authentication mechanism");
		bad_command(s);
	}
}

/* ---- commands ---- */

static void bad_command(struct sess *s)
{
	s->bad++;
	s->l->st.bad_commands++;
	if ((int)s->bad >= s->l->o.max_bad_commands && s->st != RQ_LISTEN_ST_QUIT)
		sess_quit(s, "421 4.7.0", "Error: too many errors");
}

static bool rcpt_dup(const struct sess *s, const char *a)
{
	const char *at = strrchr(a, '@');
	size_t lp = at ? (size_t)(at - a) : strlen(a);
	for (size_t i = 0; i < s->nrcpts; i++) {
		const char *b = s->rcpts[i];
		const char *bt = strrchr(b, '@');
		size_t blp = bt ? (size_t)(bt - b) : strlen(b);
		if (lp == blp && memcmp(a, b, lp) == 0 &&
		    ((!at && !bt) || (at && bt && strcasecmp(at, bt) == 0)))
			return true;
	}
	return false;
}

static bool may_send(const struct sess *s)
{
	return s->trusted || s->authed;
}

static void cmd_helo(struct sess *s, bool ehlo, const char *arg, size_t n)
{
	while (n && arg[n - 1] == ' ')
		n--;
	while (n && *arg == ' ') {
		arg++;
		n--;
	}
	if (n == 0) {
		reply(s, "501 5.5.4 Syntax: %s hostname", ehlo ? "EHLO" : "HELO");
		bad_command(s);
		return;
	}
	if (n > HELO_MAX)
		n = HELO_MAX;
	memcpy(s->helo, arg, n);
	s->helo[n] = '\0';
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s->helo[i] < 0x21 || (unsigned char)s->helo[i] > 0x7e)
			s->helo[i] = '_';
	txn_reset(s);
	s->helo_done = true;
	s->esmtp = ehlo;
	if (ehlo)
		ehlo_reply(s);
	else
		reply(s, "250 %s", s->l->hostname);
	to_state(s, RQ_LISTEN_ST_READY);
}

static void cmd_mail(struct sess *s, const char *arg, size_t n)
{
	char addr[RQ_ADDR_PATH_MAX + 1];
	size_t alen;
	const char *why = "";
	if (!s->helo_done) {
		reply(s, "503 5.5.1 Error: send HELO/EHLO first");
		bad_command(s);
		return;
	}
	if (s->st == RQ_LISTEN_ST_MAIL || s->st == RQ_LISTEN_ST_RCPT) {
		reply(s, "503 5.5.1 Error: nested MAIL command");
		bad_command(s);
		return;
	}
	if (!may_send(s)) {
		reply(s, "530 5.7.0 Authentication required");
		reject(s, RQ_LISTEN_REJ_AUTH_REQUIRED, "530", 0);
		bad_command(s);
		return;
	}
	struct rq_listen_params p;
	int code = rq_listen_path_parse(arg, n, true, addr, sizeof(addr), &alen, &p, &why);
	if (code == 0 && !s->esmtp && (p.has_size || p.body_8bit || p.smtputf8)) {
		code = 555;
		why = "5.5.4 Parameters need EHLO";
	}
	if (code != 0) {
		reply(s, "%d %s", code, why);
		reject(s, RQ_LISTEN_REJ_ADDRESS, code == 501 ? "501" : code == 553 ? "553" : "555", 0);
		bad_command(s);
		return;
	}
	if (p.has_size && p.size > s->l->o.max_size) {
		reply(s, "552 5.3.4 Error: message size exceeds fixed maximum message size");
		reject(s, RQ_LISTEN_REJ_SIZE, "552", p.size);
		return;
	}
	if (rq_addr_needs_utf8(addr, alen) && !p.smtputf8) {
		reply(s, "553 5.6.7 Error: SMTPUTF8 is required for this address");
		reject(s, RQ_LISTEN_REJ_ADDRESS, "553", 0);
		return;
	}
	s->from = strdup(addr);
	if (!s->from) {
		reply(s, "451 4.3.0 Error: out of memory");
		return;
	}
	s->mp = p;
	reply(s, "250 2.1.0 Ok");
	to_state(s, RQ_LISTEN_ST_MAIL);
	arm(s->deadline, s->l->o.message_deadline_ms);
}

static void cmd_rcpt(struct sess *s, const char *arg, size_t n)
{
	char addr[RQ_ADDR_PATH_MAX + 1];
	size_t alen;
	const char *why = "";
	if (s->st != RQ_LISTEN_ST_MAIL && s->st != RQ_LISTEN_ST_RCPT) {
		reply(s, "503 5.5.1 Error: need MAIL command");
		bad_command(s);
		return;
	}
	if (s->nrcpts >= (size_t)s->l->o.max_recipients) {
		reply(s, "452 4.5.3 Error: too many recipients");
		reject(s, RQ_LISTEN_REJ_RECIPIENTS, "452", 0);
		return;
	}
	struct rq_listen_params p;
	int code = rq_listen_path_parse(arg, n, false, addr, sizeof(addr), &alen, &p, &why);
	if (code == 0 && alen == 0) {
		code = 553;
		why = "5.1.3 Bad recipient address syntax";
	}
	if (code != 0) {
		reply(s, "%d %s", code, why);
		reject(s, RQ_LISTEN_REJ_ADDRESS, code == 501 ? "501" : code == 553 ? "553" : "555", 0);
		bad_command(s);
		return;
	}
	if (rq_addr_needs_utf8(addr, alen) && !s->mp.smtputf8) {
		reply(s, "553 5.6.7 Error: SMTPUTF8 is required for this address");
		reject(s, RQ_LISTEN_REJ_ADDRESS, "553", 0);
		return;
	}
	if (!rcpt_dup(s, addr)) {
		if (s->nrcpts == s->rcpts_cap) {
			size_t cap = s->rcpts_cap ? s->rcpts_cap * 2 : 8;
			char **r = realloc(s->rcpts, cap * sizeof(*r));
			if (!r) {
				reply(s, "451 4.3.0 Error: out of memory");
				return;
			}
			s->rcpts = r;
			s->rcpts_cap = cap;
		}
		s->rcpts[s->nrcpts] = strdup(addr);
		if (!s->rcpts[s->nrcpts]) {
			reply(s, "451 4.3.0 Error: out of memory");
			return;
		}
		s->nrcpts++;
	}
	reply(s, "250 2.1.5 Ok");
	to_state(s, RQ_LISTEN_ST_RCPT);
}

static void cmd_data(struct sess *s, size_t n)
{
	if (s->st == RQ_LISTEN_ST_MAIL) {
		reply(s, "554 5.5.1 Error: no valid recipients");
		bad_command(s);
		return;
	}
	if (s->st != RQ_LISTEN_ST_RCPT) {
		reply(s, "503 5.5.1 Error: need RCPT command");
		bad_command(s);
		return;
	}
	if (n) {
		reply(s, "501 5.5.4 Syntax: DATA");
		bad_command(s);
		return;
	}
	to_state(s, RQ_LISTEN_ST_DATA);
}

static void cmd_starttls(struct sess *s, size_t n)
{
	if (!s->l->tls || s->tls) {
		reply(s, s->tls ? "503 5.5.1 Error: TLS already active"
				: "502 5.5.1 Error: STARTTLS not available");
		bad_command(s);
		return;
	}
	if (n) {
		reply(s, "501 5.5.4 Syntax: STARTTLS");
		bad_command(s);
		return;
	}
	if (s->st == RQ_LISTEN_ST_MAIL || s->st == RQ_LISTEN_ST_RCPT) {
		reply(s, "503 5.5.1 Error: STARTTLS not allowed during a mail transaction");
		bad_command(s);
		return;
	}
	to_state(s, RQ_LISTEN_ST_STARTTLS);
}

static bool is_auth_line(const char *line, size_t len)
{
	return len >= 4 && strncasecmp(line, "AUTH", 4) == 0 && (len == 4 || line[4] == ' ');
}

/* One command line (without its line end). */
static void command(struct sess *s, const char *line, size_t len)
{
	struct rq_listen *l = s->l;
	size_t a;
	switch (s->st) {
	case RQ_LISTEN_ST_AUTH_PLAIN:
		auth_plain(s, line, len);
		return;
	case RQ_LISTEN_ST_AUTH_USER:
		auth_login_user(s, line, len);
		return;
	case RQ_LISTEN_ST_AUTH_PASS:
		auth_login_pass(s, line, len);
		return;
	default:
		break;
	}
	s->commands++;
	l->st.commands++;
	if ((int)s->commands > l->o.max_commands) {
		sess_quit(s, "421 4.7.0", "Error: too many commands");
		return;
	}
	if (len + 2 > RQ_LISTEN_CMD_LINE_MAX && !is_auth_line(line, len)) {
		reply(s, "500 5.5.2 Error: line too long");
		bad_command(s);
		return;
	}
	if (memchr(line, '\0', len) || memchr(line, '\r', len)) {
		reply(s, "500 5.5.2 Error: bad character in command");
		bad_command(s);
		return;
	}
	if (rq_log_enabled(RQ_LOG_DEBUG)) {
		char shown[80];
		snprintf(shown, sizeof(shown), "%.*s", (int)(len < 64 ? len : 64), line);
		if (is_auth_line(line, len))
			snprintf(shown, sizeof(shown), "AUTH <hidden>");
		rq_log(RQ_LOG_DEBUG, "listen_command", "listener", l->name, "session", s->log_id,
		       "state", state_names[s->st], "line", shown, NULL);
	}
	enum rq_listen_verb v = rq_listen_verb_parse(line, len, &a);
	const char *arg = line + a;
	size_t n = len - a;
	switch (v) {
	case RQ_LISTEN_V_HELO:
	case RQ_LISTEN_V_EHLO:
		cmd_helo(s, v == RQ_LISTEN_V_EHLO, arg, n);
		break;
	case RQ_LISTEN_V_MAIL:
		cmd_mail(s, arg, n);
		break;
	case RQ_LISTEN_V_RCPT:
		cmd_rcpt(s, arg, n);
		break;
	case RQ_LISTEN_V_DATA:
		cmd_data(s, n);
		break;
	case RQ_LISTEN_V_RSET:
		txn_reset(s);
		reply(s, "250 2.0.0 Ok");
		if (s->helo_done)
			to_state(s, RQ_LISTEN_ST_READY);
		break;
	case RQ_LISTEN_V_NOOP:
		reply(s, "250 2.0.0 Ok");
		break;
	case RQ_LISTEN_V_QUIT:
		sess_quit(s, "221 2.0.0", "Bye");
		break;
	case RQ_LISTEN_V_VRFY:
		reply(s, "252 2.0.0 Cannot VRFY user, but will accept message");
		break;
	case RQ_LISTEN_V_HELP:
		reply(s, "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP%s%s",
		      l->tls ? " STARTTLS" : "", l->creds ? " AUTH" : "");
		break;
	case RQ_LISTEN_V_STARTTLS:
		cmd_starttls(s, n);
		break;
	case RQ_LISTEN_V_AUTH:
		cmd_auth(s, arg, n);
		break;
	case RQ_LISTEN_V_NOTIMPL:
		reply(s, "502 5.5.1 Error: command not implemented");
		bad_command(s);
		break;
	case RQ_LISTEN_V_UNKNOWN:
	default:
		reply(s, "500 5.5.2 Error: command not recognized");
		bad_command(s);
		break;
	}
}

/* ---- input ---- */

/* The DATA lines in the input; true when the final dot was read. */
static bool data_input(struct sess *s, struct evbuffer *in)
{
	char line[DATA_BUF];
	for (;;) {
		struct evbuffer_ptr p = evbuffer_search_eol(in, NULL, NULL, EVBUFFER_EOL_LF);
		if (p.pos < 0) {
			size_t have = evbuffer_get_length(in);
			if (have > sizeof(line)) {
				/* an over-long line: count it, drop it (the last
				 * byte may be the CR of its CRLF: kept) */
				rq_listen_data_line(&s->data, NULL, have - 1, false);
				evbuffer_drain(in, have - 1);
			}
			return false;
		}
		size_t total = (size_t)p.pos + 1;
		if (total > sizeof(line)) {
			/* keep the line end (with the byte before it) */
			rq_listen_data_line(&s->data, NULL, total - 2, false);
			evbuffer_drain(in, total - 2);
			continue;
		}
		evbuffer_remove(in, line, total);
		if (rq_listen_data_line(&s->data, line, total, true) == 1)
			return true;
	}
}

/* Reads and handles what the input holds, as long as the state reads. */
static void process(struct sess *s)
{
	char line[LINE_BUF + 1];
	while (!s->dead && s->bev) {
		struct evbuffer *in = bufferevent_get_input(s->bev);
		struct evbuffer *out = bufferevent_get_output(s->bev);
		if (evbuffer_get_length(out) > OUT_MAX) {
			/* the client does not read its replies: wait */
			s->out_full = true;
			bufferevent_disable(s->bev, EV_READ);
			return;
		}
		switch (s->st) {
		case RQ_LISTEN_ST_GREET:
		case RQ_LISTEN_ST_READY:
		case RQ_LISTEN_ST_MAIL:
		case RQ_LISTEN_ST_RCPT:
		case RQ_LISTEN_ST_AUTH_PLAIN:
		case RQ_LISTEN_ST_AUTH_USER:
		case RQ_LISTEN_ST_AUTH_PASS:
			break;
		case RQ_LISTEN_ST_DATA:
			if (!data_input(s, in))
				return;
			arm(s->timer, s->l->o.timeout_ms);
			data_end(s);
			continue;
		default:
			return;  /* TLS, waiting for Redis or a delay, closing */
		}
		struct evbuffer_ptr p = evbuffer_search_eol(in, NULL, NULL, EVBUFFER_EOL_LF);
		if (p.pos < 0) {
			size_t have = evbuffer_get_length(in);
			if (have > LINE_BUF) {
				evbuffer_drain(in, have);
				s->skip_long = true;
			}
			return;
		}
		size_t total = (size_t)p.pos + 1;
		if (s->skip_long || total > LINE_BUF) {
			evbuffer_drain(in, total);
			s->skip_long = false;
			if (s->st == RQ_LISTEN_ST_AUTH_PLAIN || s->st == RQ_LISTEN_ST_AUTH_USER ||
			    s->st == RQ_LISTEN_ST_AUTH_PASS) {
				OPENSSL_cleanse(s->login_user, sizeof(s->login_user));
				to_state(s, RQ_LISTEN_ST_READY);
			}
			s->commands++;
			s->l->st.commands++;
			reply(s, "500 5.5.2 Error: line too long");
			bad_command(s);
			continue;
		}
		evbuffer_remove(in, line, total);
		size_t len = total - 1;
		if (len && line[len - 1] == '\r')
			len--;
		line[len] = '\0';
		arm(s->timer, s->l->o.timeout_ms);
		command(s, line, len);
		OPENSSL_cleanse(line, total);
	}
}

/* ---- events ---- */

static void bev_read_cb(struct bufferevent *bev, void *arg)
{
	struct sess *s = arg;
	enter(s);
	if (s->st == RQ_LISTEN_ST_DATA)
		arm(s->timer, s->l->o.data_timeout_ms);
	process(s);
	leave(s);
}

static void bev_write_cb(struct bufferevent *bev, void *arg)
{
	struct sess *s = arg;
	enter(s);
	if (s->st == RQ_LISTEN_ST_QUIT) {
		sess_close(s);
	} else if (s->st == RQ_LISTEN_ST_STARTTLS) {
		if (tls_start(s) < 0) {
			s->l->st.tls_failed++;
			sess_close(s);
		}
	} else if (s->out_full) {
		s->out_full = false;
		bufferevent_enable(s->bev, EV_READ);
		process(s);
	}
	leave(s);
}

static void bev_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct sess *s = arg;
	enter(s);
	if (what & BEV_EVENT_CONNECTED) {
		if (s->st == RQ_LISTEN_ST_TLS) {
			s->tls = true;
			s->l->st.tls++;
			/* RFC 3207 4.2: forget what the client said before TLS */
			s->authed = false;
			s->user[0] = '\0';
			txn_reset(s);
			if (rq_log_enabled(RQ_LOG_DEBUG)) {
				char info[96] = "";
				rq_tls_describe(bufferevent_openssl_get_ssl(s->bev), info, sizeof(info));
				rq_log(RQ_LOG_DEBUG, "listen_tls", "listener", s->l->name, "session",
				       s->log_id, "tls", info, NULL);
			}
			if (s->l->stopping) {
				sess_quit(s, "421 4.3.2", "Service shutting down");
			} else if (s->refusing) {
				sess_quit(s, "421 4.7.0",
					  refuse_text((enum rq_listen_reject)(s->refusing - 1)));
			} else {
				to_state(s, RQ_LISTEN_ST_GREET);
			}
			process(s);
		}
	} else if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
		if (s->st == RQ_LISTEN_ST_TLS) {
			s->l->st.tls_failed++;
			unsigned long e = bufferevent_get_openssl_error(bev);
			char text[256];
			rq_tls_error_text(NULL, e, "connection closed during the TLS handshake",
					  text, sizeof(text));
			rq_log(RQ_LOG_INFO, "listen_tls_failed", "listener", s->l->name, "session",
			       s->log_id, "client", s->ip, "error", text, NULL);
		}
		sess_close(s);
	}
	leave(s);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sess *s = arg;
	enter(s);
	s->l->st.timeouts++;
	rq_log(RQ_LOG_INFO, "listen_timeout", "listener", s->l->name, "session", s->log_id,
	       "client", s->ip, "state", state_names[s->st], NULL);
	if (s->st == RQ_LISTEN_ST_QUIT || s->st == RQ_LISTEN_ST_STARTTLS ||
	    s->st == RQ_LISTEN_ST_TLS)
		sess_close(s);
	else
		sess_quit(s, "421 4.4.2", "Error: timeout exceeded");
	leave(s);
}

static void wait_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sess *s = arg;
	enter(s);
	if (s->st == RQ_LISTEN_ST_AUTH_WAIT) {
		reply(s, "%s", s->pending);
		s->pending[0] = '\0';
		if (s->l->stopping) {
			sess_quit(s, "421 4.3.2", "Service shutting down");
		} else if ((int)s->bad >= s->l->o.max_bad_commands) {
			sess_quit(s, "421 4.7.0", "Error: too many errors");
		} else {
			to_state(s, RQ_LISTEN_ST_READY);
			process(s);
		}
	} else if (s->st == RQ_LISTEN_ST_ENQUEUE) {
		/* Redis does not answer: give up on every waiting message (a
		 * new queue client takes over; the old one cancels them). */
		rq_log(RQ_LOG_WARN, "listen_redis_timeout", "listener", s->l->name, "session",
		       s->log_id, NULL);
		enqueue_timeout(s->l);
	}
	leave(s);
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct sess *s = arg;
	enter(s);
	process(s);
	leave(s);
}

/* ---- accepting ---- */

static size_t count_ip(const struct rq_listen *l, const char *ip)
{
	size_t n = 0;
	for (const struct sess *s = l->sessions; s; s = s->next)
		if (!s->dead && !s->refusing && strcmp(s->ip, ip) == 0)
			n++;
	return n;
}

static void refuse_count(struct rq_listen *l, const char *ip, enum rq_listen_reject why)
{
	l->st.rejected[why]++;
	rq_log(RQ_LOG_WARN, "listen_refused", "listener", l->name, "client", ip, "reason",
	       rq_listen_reject_name(why), NULL);
}

static const char *refuse_text(enum rq_listen_reject why)
{
	return why == RQ_LISTEN_REJ_PER_IP ? "Error: too many connections from your address"
					   : "Error: too many connections";
}

/* A plain listener says 421 at once. An implicit-TLS one can only say it
 * inside TLS: past REFUSING_MAX such handshakes at a time (each costs the
 * server a private-key operation) it closes without a word. */
static void refuse(struct rq_listen *l, evutil_socket_t fd, const char *ip,
		   enum rq_listen_reject why)
{
	refuse_count(l, ip, why);
	if (!l->o.implicit_tls) {
		char buf[200];
		int n = snprintf(buf, sizeof(buf), "421 4.7.0 %s %s\r\n", l->hostname,
				 refuse_text(why));
		if (n > 0 && write(fd, buf, (size_t)n) < 0) {
			/* best effort: the socket is non-blocking and new */
		}
	}
	close(fd);
}

static void accept_cb(struct evconnlistener *lev, evutil_socket_t fd, struct sockaddr *sa,
		      int salen, void *arg)
{
	struct rq_listen *l = arg;
	char ip[INET6_ADDRSTRLEN] = "?";
	unsigned char b[16];
	int fam = sa_bytes(sa, b);
	if (fam > 0)
		inet_ntop(fam, b, ip, sizeof(ip));
	if (l->stopping) {
		close(fd);
		return;
	}
	int refusing = 0;
	if (l->nsessions - l->nrefusing >= (size_t)l->o.max_connections)
		refusing = RQ_LISTEN_REJ_CONNECTIONS + 1;
	else if (count_ip(l, ip) >= (size_t)l->o.max_per_ip)
		refusing = RQ_LISTEN_REJ_PER_IP + 1;
	if (refusing) {
		if (!l->o.implicit_tls || l->nrefusing >= REFUSING_MAX) {
			refuse(l, fd, ip, (enum rq_listen_reject)(refusing - 1));
			return;
		}
		refuse_count(l, ip, (enum rq_listen_reject)(refusing - 1));
	}
	struct sess *s = calloc(1, sizeof(*s));
	if (!s) {
		close(fd);
		return;
	}
	s->l = l;
	s->fd = fd;
	s->refusing = refusing;
	if (refusing)
		l->nrefusing++;
	s->id = ++l->next_id;
	snprintf(s->log_id, sizeof(s->log_id), "%llu", (unsigned long long)s->id);
	memcpy(&s->peer, sa, (size_t)salen < sizeof(s->peer) ? (size_t)salen : sizeof(s->peer));
	snprintf(s->ip, sizeof(s->ip), "%s", ip);
	for (size_t i = 0; i < l->ntrusted && !s->trusted; i++)
		s->trusted = rq_listen_cidr_match(&l->trusted[i], sa);
	s->next = l->sessions;
	if (l->sessions)
		l->sessions->prev = s;
	l->sessions = s;
	l->nsessions++;
	if (!refusing)
		l->st.connections++;
	s->st = RQ_LISTEN_ST_CLOSED;
	s->timer = evtimer_new(l->base, timer_cb, s);
	s->deadline = evtimer_new(l->base, timer_cb, s);
	s->wait = evtimer_new(l->base, wait_cb, s);
	s->kick = event_new(l->base, -1, 0, kick_cb, s);
	if (!s->timer || !s->deadline || !s->wait || !s->kick)
		goto fail;
	enter(s);
	if (rq_log_enabled(RQ_LOG_DEBUG))
		rq_log(RQ_LOG_DEBUG, "listen_connect", "listener", l->name, "session", s->log_id,
		       "client", ip, "trusted", s->trusted ? "yes" : "no", NULL);
	if (l->o.implicit_tls) {
		if (tls_start(s) < 0) {
			l->st.tls_failed++;
			sess_close(s);
		}
	} else {
		s->bev = bufferevent_socket_new(l->base, fd, 0);
		if (!s->bev) {
			sess_close(s);
		} else {
			setup_bev(s);
			to_state(s, RQ_LISTEN_ST_GREET);
		}
	}
	leave(s);
	return;
fail:
	s->dead = true;
	sess_free_bev(s);
	really_free(s);
}

/* ---- the queue client ---- */

static void queue_state_cb(struct rq_queue *q, enum rq_queue_conn_state st, const char *err,
			   void *arg)
{
	struct rq_listen *l = arg;
	if (st == RQ_QUEUE_READY)
		rq_log(RQ_LOG_INFO, "listen_redis_ready", "listener", l->name, NULL);
	else
		rq_log(RQ_LOG_WARN, "listen_redis_down", "listener", l->name, "error",
		       err ? err : "", NULL);
}

static void queue_create(struct rq_listen *l)
{
	char err[300];
	struct rq_queue_opts qo = {
		.url = l->redis_url,
		.queue = l->queue_name,
		.user = l->redis_user,
		.password_file = l->redis_pw_file,
		.password_env = l->redis_pw_env,
		.on_state = queue_state_cb,
		.arg = l,
		.sub_ping_ms = -1,
	};
	l->q = rq_queue_create(l->base, &qo, err, sizeof(err));
	if (!l->q)
		rq_log(RQ_LOG_ERROR, "listen_redis_error", "listener", l->name, "error", err, NULL);
}

static void requeue_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_listen *l = arg;
	if (!l->q && !l->stopping)
		queue_create(l);
	if (!l->q) {
		struct timeval tv = {1, 0};
		evtimer_add(l->requeue, &tv);
	}
}

/* Every message waiting for Redis gets 451 (the old client cancels them);
 * a new client is made from the loop. */
static void enqueue_timeout(struct rq_listen *l)
{
	struct rq_queue *q = l->q;
	l->q = NULL;
	rq_queue_destroy(q);
	event_active(l->requeue, EV_TIMEOUT, 1);
}

/* ---- create, stop, destroy ---- */

static char *dup_opt(const char *s, bool *oom)
{
	if (!s)
		return NULL;
	char *d = strdup(s);
	if (!d)
		*oom = true;
	return d;
}

static void stop_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_listen *l = arg;
	if (l->nsessions == 0 && l->stop_done) {
		void (*done)(void *) = l->stop_done;
		l->stop_done = NULL;
		rq_log(RQ_LOG_INFO, "listen_stopped", "listener", l->name, NULL);
		done(l->stop_arg);
	}
}

struct rq_listen *rq_listen_create(struct event_base *base, const struct rq_listen_opts *opts,
				   char *err, size_t errlen)
{
	struct sockaddr_storage ss;
	socklen_t sslen;
	bool oom = false;
	struct rq_listen *l = calloc(1, sizeof(*l));
	if (!l) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	l->base = base;
	l->o = *opts;
	if (rq_listen_addr_parse(opts->address, &ss, &sslen, err, errlen) < 0)
		goto fail;
	if (!l->o.max_size)
		l->o.max_size = RQ_LISTEN_MAX_SIZE_DEFAULT;
	if (l->o.max_size > RQ_SUBMIT_MAX - RQ_SUBMIT_RECEIVED_LEN - 1024)
		l->o.max_size = RQ_SUBMIT_MAX - RQ_SUBMIT_RECEIVED_LEN - 1024;
#define DEF(f, v) do { if (l->o.f <= 0) l->o.f = (v); } while (0)
	DEF(max_recipients, 1000);
	DEF(max_connections, 1000);
	DEF(max_per_ip, 50);
	DEF(max_commands, 10000);
	DEF(max_bad_commands, 20);
	DEF(timeout_ms, 300000);
	DEF(data_timeout_ms, 180000);
	DEF(message_deadline_ms, 1800000);
	DEF(enqueue_timeout_ms, 30000);
	DEF(auth_delay_ms, 1000);
	DEF(close_timeout_ms, 10000);
	DEF(auth_threads, 2);
	DEF(auth_queue_max, 64);
#undef DEF
	if (l->o.auth_threads > AUTH_THREADS_MAX)
		l->o.auth_threads = AUTH_THREADS_MAX;
	l->name = dup_opt(opts->address, &oom);
	l->queue_name = dup_opt(opts->queue ? opts->queue : RQ_KEYS_QUEUE_DEFAULT, &oom);
	l->redis_url = dup_opt(opts->redis_url, &oom);
	l->redis_user = dup_opt(opts->redis_user, &oom);
	l->redis_pw_file = dup_opt(opts->redis_password_file, &oom);
	l->redis_pw_env = dup_opt(opts->redis_password_env, &oom);
	l->tls_cert = dup_opt(opts->tls_cert, &oom);
	l->tls_key = dup_opt(opts->tls_key, &oom);
	l->auth_file = dup_opt(opts->auth_file, &oom);
	l->meta_json = dup_opt(opts->meta_json, &oom);
	if (opts->hostname) {
		l->hostname = dup_opt(opts->hostname, &oom);
	} else {
		char h[256];
		if (gethostname(h, sizeof(h)) != 0 || !h[0])
			snprintf(h, sizeof(h), "localhost");
		h[sizeof(h) - 1] = '\0';
		l->hostname = dup_opt(h, &oom);
	}
	if (oom) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	if (l->meta_json) {
		char jerr[120];
		struct rq_json *m = rq_json_parse(l->meta_json, strlen(l->meta_json), 0, jerr,
						  sizeof(jerr));
		bool obj = rq_json_is(m, RQ_JSON_OBJECT);
		rq_json_free(m);
		if (!obj) {
			snprintf(err, errlen, "meta: not a JSON object");
			goto fail;
		}
	}
	if (opts->ntrusted > RQ_LISTEN_TRUSTED_MAX) {
		snprintf(err, errlen, "more than %d trusted CIDRs", RQ_LISTEN_TRUSTED_MAX);
		goto fail;
	}
	if (opts->ntrusted) {
		l->trusted = calloc(opts->ntrusted, sizeof(*l->trusted));
		if (!l->trusted) {
			snprintf(err, errlen, "out of memory");
			goto fail;
		}
		for (size_t i = 0; i < opts->ntrusted; i++)
			if (rq_listen_cidr_parse(opts->trusted[i], &l->trusted[i], err, errlen) < 0)
				goto fail;
		l->ntrusted = opts->ntrusted;
	}
	if (l->o.implicit_tls && !l->tls_cert) {
		snprintf(err, errlen, "implicit_tls needs tls_cert");
		goto fail;
	}
	if (l->tls_cert && rq_listen_reload_tls(l, err, errlen) < 0)
		goto fail;
	if (l->auth_file && rq_listen_reload_auth(l, err, errlen) < 0)
		goto fail;
	if (l->auth_file && !(l->pool = pool_create(l, err, errlen)))
		goto fail;
	l->requeue = evtimer_new(base, requeue_cb, l);
	l->stop_ev = evtimer_new(base, stop_cb, l);
	if (!l->requeue || !l->stop_ev) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	queue_create(l);
	if (!l->q) {
		snprintf(err, errlen, "cannot create the queue client (see the log)");
		goto fail;
	}
	l->lev = evconnlistener_new_bind(base, accept_cb, l,
					 LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE |
					 LEV_OPT_CLOSE_ON_EXEC,
					 LISTEN_BACKLOG, (struct sockaddr *)&ss, (int)sslen);
	if (!l->lev) {
		snprintf(err, errlen, "cannot listen on %s: %s", opts->address, strerror(errno));
		goto fail;
	}
	struct sockaddr_storage bound;
	socklen_t bl = sizeof(bound);
	if (getsockname(evconnlistener_get_fd(l->lev), (struct sockaddr *)&bound, &bl) == 0)
		l->port = ntohs(bound.ss_family == AF_INET6
					? ((struct sockaddr_in6 *)&bound)->sin6_port
					: ((struct sockaddr_in *)&bound)->sin_port);
	char port[16];
	snprintf(port, sizeof(port), "%d", l->port);
	rq_log(RQ_LOG_INFO, "listen_start", "listener", l->name, "port", port, "queue",
	       l->queue_name, "tls", l->o.implicit_tls ? "implicit" : l->tls ? "starttls" : "none",
	       "auth", l->creds ? "on" : "off", NULL);
	return l;
fail:
	rq_listen_destroy(l);
	return NULL;
}

int rq_listen_port(const struct rq_listen *l)
{
	return l ? l->port : 0;
}

const char *rq_listen_name(const struct rq_listen *l)
{
	return l ? l->name : "";
}

int rq_listen_reload_tls(struct rq_listen *l, char *err, size_t errlen)
{
	if (!l->tls_cert)
		return 0;
	struct rq_tls_ctx *t = rq_tls_server_ctx_create(l->tls_cert, l->tls_key, err, errlen);
	if (!t)
		return -1;
	rq_tls_ctx_destroy(l->tls);  /* SSLs made from it keep their reference */
	l->tls = t;
	return 0;
}

int rq_listen_reload_auth(struct rq_listen *l, char *err, size_t errlen)
{
	if (!l->auth_file)
		return 0;
	struct rq_credentials *c = rq_credentials_load(l->auth_file, err, errlen);
	if (!c)
		return -1;
	struct creds_ref *cr = calloc(1, sizeof(*cr));
	if (!cr) {
		rq_credentials_destroy(c);
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	cr->c = c;
	cr->refs = 1;
	/* checks in flight keep the old file until they come back */
	creds_release(l->creds);
	l->creds = cr;
	return 0;
}

void rq_listen_stop(struct rq_listen *l, void (*done)(void *arg), void *arg)
{
	if (!l)
		return;
	l->stop_done = done;
	l->stop_arg = arg;
	if (!l->stopping) {
		l->stopping = true;
		if (l->lev)
			evconnlistener_disable(l->lev);
		char n[24];
		snprintf(n, sizeof(n), "%zu", l->nsessions);
		rq_log(RQ_LOG_INFO, "listen_stopping", "listener", l->name, "sessions", n, NULL);
		struct sess *next;
		for (struct sess *s = l->sessions; s; s = next) {
			next = s->next;
			if (s->dead)
				continue;
			enter(s);
			switch (s->st) {
			case RQ_LISTEN_ST_ENQUEUE:
			case RQ_LISTEN_ST_AUTH_CHECK:
				s->stop_after = true;
				break;
			case RQ_LISTEN_ST_QUIT:
				break;
			case RQ_LISTEN_ST_TLS:
			case RQ_LISTEN_ST_STARTTLS:
			case RQ_LISTEN_ST_CLOSED:
				sess_close(s);
				break;
			default:
				sess_quit(s, "421 4.3.2", "Service shutting down");
				break;
			}
			leave(s);
		}
	}
	if (l->nsessions == 0)
		event_active(l->stop_ev, EV_TIMEOUT, 1);
}

void rq_listen_destroy(struct rq_listen *l)
{
	if (!l)
		return;
	if (l->lev)
		evconnlistener_free(l->lev);
	/* the workers first: then no check of a session is in flight */
	pool_destroy(l->pool);
	l->pool = NULL;
	/* every pending enqueue gets ECANCEL: its session is freed there */
	struct rq_queue *q = l->q;
	l->q = NULL;
	l->stopping = true;
	rq_queue_destroy(q);
	while (l->sessions) {
		struct sess *s = l->sessions;
		sess_free_bev(s);
		s->dead = true;
		s->enqueue_pending = false;
		really_free(s);
	}
	if (l->requeue)
		event_free(l->requeue);
	if (l->stop_ev)
		event_free(l->stop_ev);
	rq_tls_ctx_destroy(l->tls);
	creds_release(l->creds);
	free(l->trusted);
	free(l->name);
	free(l->queue_name);
	free(l->hostname);
	free(l->redis_url);
	free(l->redis_user);
	free(l->redis_pw_file);
	free(l->redis_pw_env);
	free(l->tls_cert);
	free(l->tls_key);
	free(l->auth_file);
	free(l->meta_json);
	free(l);
}

void rq_listen_get_stats(const struct rq_listen *l, struct rq_listen_stats *st)
{
	*st = l->st;
	st->sessions = l->nsessions;
	st->auth_pending = l->pool ? l->pool->outstanding : 0;
	struct rq_queue_stats qs;
	st->redis_ready = false;
	if (l->q) {
		rq_queue_get_stats(l->q, &qs);
		st->redis_ready = qs.state == RQ_QUEUE_READY;
	}
}

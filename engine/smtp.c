/* The SMTP client session: an explicit state machine over one connection
 * (see smtp.h). */
#include "relayq/smtp.h"
#include "relayq/clock.h"

#include "relayq/secret.h"
#include "relayq/str.h"
#include "relayq/log.h"
#include "relayq/message.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ------------------------------------------------------------------------
 * Capabilities
 */

void rq_smtp_caps_reset(struct rq_smtp_caps *c)
{
	memset(c, 0, sizeof(*c));
}

static bool word_eq(const char *p, size_t n, const char *w)
{
	return strlen(w) == n && strncasecmp(p, w, n) == 0;
}

static uint64_t parse_size(const char *p, size_t n)
{
	uint64_t v = 0;
	if (n == 0 || n > 19)
		return 0;
	for (size_t i = 0; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return 0;
		v = v * 10 + (uint64_t)(p[i] - '0');
	}
	return v;
}

static unsigned auth_mech(const char *p, size_t n)
{
	if (word_eq(p, n, "PLAIN"))
		return RQ_SMTP_AUTH_PLAIN;
	if (word_eq(p, n, "LOGIN"))
		return RQ_SMTP_AUTH_LOGIN;
	if (word_eq(p, n, "CRAM-MD5"))
		return RQ_SMTP_AUTH_CRAM_MD5;
	if (word_eq(p, n, "XOAUTH2"))
		return RQ_SMTP_AUTH_XOAUTH2;
	return RQ_SMTP_AUTH_OTHER;
}

void rq_smtp_caps_line(struct rq_smtp_caps *c, const char *line, size_t len)
{
	const char *p = line, *end;
	c->lines++;
	if (len >= 3 && isdigit((unsigned char)p[0]) && isdigit((unsigned char)p[1]) &&
	    isdigit((unsigned char)p[2]) && (len == 3 || p[3] == '-' || p[3] == ' ')) {
		p += len == 3 ? 3 : 4;
	}
	end = line + len;
	if (c->lines == 1)
		return;
	while (p < end && (*p == ' ' || *p == '\t'))
		p++;
	const char *kw = p;
	while (p < end && *p != ' ' && *p != '\t' && *p != '=')
		p++;
	size_t kwn = (size_t)(p - kw);
	if (kwn == 0)
		return;
	if (p < end)
		p++; /* the separator */
	/* params: from p to end, with trailing spaces trimmed */
	while (end > p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
		end--;
	if (word_eq(kw, kwn, "PIPELINING")) {
		c->flags |= RQ_SMTP_CAP_PIPELINING;
	} else if (word_eq(kw, kwn, "SIZE")) {
		c->flags |= RQ_SMTP_CAP_SIZE;
		while (p < end && *p == ' ')
			p++;
		c->size_max = parse_size(p, (size_t)(end - p));
	} else if (word_eq(kw, kwn, "8BITMIME")) {
		c->flags |= RQ_SMTP_CAP_8BITMIME;
	} else if (word_eq(kw, kwn, "SMTPUTF8")) {
		c->flags |= RQ_SMTP_CAP_SMTPUTF8;
	} else if (word_eq(kw, kwn, "STARTTLS")) {
		c->flags |= RQ_SMTP_CAP_STARTTLS;
	} else if (word_eq(kw, kwn, "ENHANCEDSTATUSCODES")) {
		c->flags |= RQ_SMTP_CAP_ENHANCEDSTATUSCODES;
	} else if (word_eq(kw, kwn, "DSN")) {
		c->flags |= RQ_SMTP_CAP_DSN;
	} else if (word_eq(kw, kwn, "CHUNKING")) {
		c->flags |= RQ_SMTP_CAP_CHUNKING;
	} else if (word_eq(kw, kwn, "AUTH")) {
		c->flags |= RQ_SMTP_CAP_AUTH;
		while (p < end) {
			while (p < end && (*p == ' ' || *p == '\t'))
				p++;
			const char *m = p;
			while (p < end && *p != ' ' && *p != '\t')
				p++;
			if (p > m)
				c->auth |= auth_mech(m, (size_t)(p - m));
		}
	}
}

void rq_smtp_caps_parse(struct rq_smtp_caps *c, const char *reply, size_t len)
{
	rq_smtp_caps_reset(c);
	size_t i = 0;
	while (i < len) {
		size_t j = rq_str_end(reply, i, len, '\n');
		size_t n = j - i;
		if (n && reply[i + n - 1] == '\r')
			n--;
		rq_smtp_caps_line(c, reply + i, n);
		i = j + 1;
	}
}

void rq_smtp_caps_describe(const struct rq_smtp_caps *c, char *buf, size_t len)
{
	static const struct {
		unsigned flag;
		const char *name;
	} names[] = {
		{RQ_SMTP_CAP_PIPELINING, "PIPELINING"},
		{RQ_SMTP_CAP_8BITMIME, "8BITMIME"},
		{RQ_SMTP_CAP_SMTPUTF8, "SMTPUTF8"},
		{RQ_SMTP_CAP_STARTTLS, "STARTTLS"},
		{RQ_SMTP_CAP_ENHANCEDSTATUSCODES, "ENHANCEDSTATUSCODES"},
		{RQ_SMTP_CAP_DSN, "DSN"},
		{RQ_SMTP_CAP_CHUNKING, "CHUNKING"},
	};
	size_t off = 0;
	if (!len)
		return;
	buf[0] = '\0';
#define PUT(...) do { \
		int k_ = snprintf(buf + off, len - off, __VA_ARGS__); \
		if (k_ > 0) off += (size_t)k_; \
		if (off >= len) { off = len - 1; } \
	} while (0)
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (c->flags & names[i].flag)
			PUT("%s%s", off ? " " : "", names[i].name);
	if (c->flags & RQ_SMTP_CAP_SIZE)
		PUT("%sSIZE=%llu", off ? " " : "", (unsigned long long)c->size_max);
	if (c->flags & RQ_SMTP_CAP_AUTH) {
		PUT("%sAUTH=", off ? " " : "");
		const char *sep = "";
		if (c->auth & RQ_SMTP_AUTH_PLAIN) { PUT("%sPLAIN", sep); sep = ","; }
		if (c->auth & RQ_SMTP_AUTH_LOGIN) { PUT("%sLOGIN", sep); sep = ","; }
		if (c->auth & RQ_SMTP_AUTH_CRAM_MD5) { PUT("%sCRAM-MD5", sep); sep = ","; }
		if (c->auth & RQ_SMTP_AUTH_XOAUTH2) { PUT("%sXOAUTH2", sep); sep = ","; }
		if (c->auth & RQ_SMTP_AUTH_OTHER) { PUT("%sOTHER", sep); }
	}
#undef PUT
}

/* ------------------------------------------------------------------------
 * Options and hosts
 */

void rq_smtp_opts_init(struct rq_smtp_opts *o)
{
	memset(o, 0, sizeof(*o));
	o->tls = RQ_TLS_NONE;
	o->tls_verify = true;
	o->auth_mechs = RQ_SMTP_AUTH_PLAIN | RQ_SMTP_AUTH_LOGIN;
	o->timeout = (struct rq_smtp_timeouts){
		.connect = 30000, .greeting = 300000, .ehlo = 300000,
		.tls = 120000, .auth = 120000, .mail = 300000, .rcpt = 300000,
		.data = 120000, .block = 180000, .dot = 600000, .rset = 120000,
		.quit = 60000,
	};
	o->data_total = 1800000;
	o->chunking = true;
	o->chunk_size = RQ_SMTP_CHUNK_SIZE;
	o->max_txns = 100;
	o->idle_ms = 5000;
}

int rq_smtp_host_set(struct rq_smtp_host *h, const char *ip, int port, const char *name)
{
	memset(h, 0, sizeof(*h));
	struct sockaddr_in *in4 = (struct sockaddr_in *)&h->addr;
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&h->addr;
	if (port < 0 || port > 65535)
		return -1;
	if (inet_pton(AF_INET, ip, &in4->sin_addr) == 1) {
		in4->sin_family = AF_INET;
		in4->sin_port = htons((uint16_t)port);
		h->addrlen = sizeof(*in4);
	} else if (inet_pton(AF_INET6, ip, &in6->sin6_addr) == 1) {
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons((uint16_t)port);
		h->addrlen = sizeof(*in6);
	} else {
		return -1;
	}
	snprintf(h->name, sizeof(h->name), "%s", name ? name : "");
	return 0;
}

static void host_numeric(const struct rq_smtp_host *h, char *buf, size_t len, bool with_port)
{
	char ip[INET6_ADDRSTRLEN] = "?";
	int port = 0;
	bool v6 = false;
	if (h->addr.ss_family == AF_INET) {
		const struct sockaddr_in *a = (const struct sockaddr_in *)&h->addr;
		inet_ntop(AF_INET, &a->sin_addr, ip, sizeof(ip));
		port = ntohs(a->sin_port);
	} else if (h->addr.ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&h->addr;
		inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof(ip));
		port = ntohs(a->sin6_port);
		v6 = true;
	}
	if (!with_port)
		snprintf(buf, len, "%s", ip);
	else if (v6)
		snprintf(buf, len, "[%s]:%d", ip, port);
	else
		snprintf(buf, len, "%s:%d", ip, port);
}

/* ------------------------------------------------------------------------
 * The session
 */

static const char *const state_names[RQ_SMTP_ST_COUNT_] = {
	"init", "connecting", "tls-implicit", "greeting", "ehlo", "helo",
	"starttls", "tls", "auth", "auth-user", "auth-pass", "ready", "rset",
	"mail", "rcpt", "data", "body", "bdat", "dot", "abort-dot", "quit", "closed",
};

const char *rq_smtp_state_name(enum rq_smtp_state st)
{
	if ((int)st < 0 || st >= RQ_SMTP_ST_COUNT_)
		return "?";
	return state_names[st];
}

/* Per-recipient progress inside a transaction. */
enum rcpt_st {
	R_SKIP = 0,   /* failed before sending (result already set) */
	R_SEND,       /* to be sent */
	R_WAIT,       /* sent, reply pending */
	R_OK,         /* RCPT accepted */
	R_BAD,        /* RCPT refused (result set) */
	R_NOT,        /* not tried (too many recipients) */
};

struct rq_smtp {
	struct event_base *base;
	struct rq_smtp_opts o;
	char *helo, *servername, *user, *pass, *log_id;
	struct rq_smtp_callbacks cb;

	struct rq_smtp_host *hosts;
	size_t nhosts, hi;
	bool connect_requested;
	bool plain_retry;        /* this host again, without TLS (fallback) */
	struct rq_outcome best;  /* most relevant failure over the hosts */
	bool have_best;

	enum rq_smtp_state st;
	struct bufferevent *bev;
	SSL *ssl;
	bool tls_active, tls_verified, authed, ready_once;
	char tls_info[96];
	char peer_addr[64];
	char peer_ip[64];        /* numeric, without port */
	struct rq_smtp_caps caps;
	struct rq_reply_parser rp;

	struct event *timer;     /* the reply's deadline / body progress / idle */
	struct event *deadline;  /* the whole body (data_total) */
	struct event *kick;      /* deferred work from API calls */
	int timer_ms;            /* timeout of the current state */

	/* commands of one state, written to the connection in one piece */
	char *wbuf;
	size_t wlen, wcap;
	bool wsecret;            /* wbuf held a secret: wiped after use */
	bool unsolicited;        /* input was waiting when a command went out */
	size_t unsolicited_len;

	/* a deliberate end in progress (conn_end): QUIT, then this outcome as
	 * if it had happened in end_st */
	bool ending;
	enum rq_smtp_state end_st;
	struct rq_outcome end;

	int depth;               /* >0 while inside one of our event callbacks */
	bool dead;               /* destroy requested */
	bool closed_done;        /* closed callback was called */
	bool quit_requested;

	/* transaction */
	struct rq_smtp_txn *txn;
	bool txn_running;
	unsigned ntxn;           /* started on this connection */
	unsigned txn_replies;    /* replies received in the running txn */
	bool pipelined;
	unsigned char *rst;      /* enum rcpt_st per recipient */
	size_t *order;           /* indices of recipients sent, in order */
	size_t nsend, si, ri;    /* sent count, next to send, next reply */
	size_t accepted;
	bool too_many;
	bool mail_ok;
	bool sent_any;           /* a command of this txn went out */
	bool batch_sent;         /* pipelined: MAIL..DATA already written */
	unsigned auth_mech;      /* RQ_SMTP_AUTH_PLAIN or _LOGIN, chosen */
	struct rq_outcome mail_out;
	struct rq_outcome last_rcpt_fail;
	uint64_t body_size;
	bool body_8bit, need_utf8;
	/* IDNA: the A-label forms sent instead (NULL: the address as given) */
	char *from_ascii;
	char **rcpt_ascii;       /* one per recipient */
	size_t nascii;
	/* CHUNKING: this transaction's BDAT stream, chunks in all, written,
	 * answered; chunk bytes still in the output; a refused chunk */
	bool bdat;
	struct evbuffer *bdat_buf;
	size_t bdat_len;
	size_t bdat_n, bdat_sent, bdat_acked;
	bool bdat_writing;
	bool bdat_failed;
	struct rq_outcome bdat_fail;
};

static void run_state(struct rq_smtp *s);
static void to_state(struct rq_smtp *s, enum rq_smtp_state st);
static void out_drain_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg);
static void conn_fail(struct rq_smtp *s, const struct rq_outcome *o);
static void txn_finish(struct rq_smtp *s, const struct rq_outcome *o, bool aborted);
static void go_ready(struct rq_smtp *s);
static void host_start(struct rq_smtp *s);
static void process_input(struct rq_smtp *s);

/* Drops what a transaction holds beyond its results: the A-label forms and
 * the BDAT stream (references into the caller's body: released before its
 * done callback, after which the body may be gone). */
static void txn_release(struct rq_smtp *s)
{
	free(s->from_ascii);
	s->from_ascii = NULL;
	for (size_t i = 0; s->rcpt_ascii && i < s->nascii; i++)
		free(s->rcpt_ascii[i]);
	free(s->rcpt_ascii);
	s->rcpt_ascii = NULL;
	s->nascii = 0;
	if (s->bdat_buf)
		evbuffer_free(s->bdat_buf);
	s->bdat_buf = NULL;
}

static enum rq_stage stage_of(enum rq_smtp_state st)
{
	switch (st) {
	case RQ_SMTP_ST_INIT:
	case RQ_SMTP_ST_CONNECTING: return RQ_STAGE_CONNECT;
	case RQ_SMTP_ST_TLS_IMPLICIT:
	case RQ_SMTP_ST_TLS: return RQ_STAGE_TLS;
	case RQ_SMTP_ST_GREETING: return RQ_STAGE_GREETING;
	case RQ_SMTP_ST_EHLO: return RQ_STAGE_EHLO;
	case RQ_SMTP_ST_HELO: return RQ_STAGE_HELO;
	case RQ_SMTP_ST_STARTTLS: return RQ_STAGE_STARTTLS;
	case RQ_SMTP_ST_AUTH:
	case RQ_SMTP_ST_AUTH_USER:
	case RQ_SMTP_ST_AUTH_PASS: return RQ_STAGE_AUTH;
	case RQ_SMTP_ST_READY: return RQ_STAGE_NONE;
	case RQ_SMTP_ST_RSET: return RQ_STAGE_RSET;
	case RQ_SMTP_ST_MAIL: return RQ_STAGE_MAIL;
	case RQ_SMTP_ST_RCPT: return RQ_STAGE_RCPT;
	case RQ_SMTP_ST_DATA:
	case RQ_SMTP_ST_BODY:
	case RQ_SMTP_ST_BDAT: return RQ_STAGE_DATA;
	case RQ_SMTP_ST_DOT:
	case RQ_SMTP_ST_ABORT_DOT: return RQ_STAGE_DOT;
	case RQ_SMTP_ST_QUIT:
	case RQ_SMTP_ST_CLOSED: return RQ_STAGE_QUIT;
	default: return RQ_STAGE_NONE;
	}
}

static bool before_ready(enum rq_smtp_state st)
{
	return st <= RQ_SMTP_ST_AUTH_PASS;
}

/*
 * The timer of a state (ms; 0 = none), armed once when the state is entered
 * (its command written) and never restarted by bytes read: a reply has to
 * be complete within it however its bytes trickle in. In BODY it is the
 * write progress of the data (restarted whenever bytes leave) and d bounds
 * the whole body; in READY it is the idle time.
 */
static void state_timeouts(const struct rq_smtp *s, enum rq_smtp_state st, int *t, int *d)
{
	const struct rq_smtp_timeouts *T = &s->o.timeout;
	*d = 0;
	switch (st) {
	case RQ_SMTP_ST_CONNECTING: *t = T->connect; break;
	case RQ_SMTP_ST_TLS_IMPLICIT:
	case RQ_SMTP_ST_TLS:
	case RQ_SMTP_ST_STARTTLS: *t = T->tls; break;
	case RQ_SMTP_ST_GREETING: *t = T->greeting; break;
	case RQ_SMTP_ST_EHLO:
	case RQ_SMTP_ST_HELO: *t = T->ehlo; break;
	case RQ_SMTP_ST_AUTH:
	case RQ_SMTP_ST_AUTH_USER:
	case RQ_SMTP_ST_AUTH_PASS: *t = T->auth; break;
	case RQ_SMTP_ST_RSET: *t = T->rset; break;
	case RQ_SMTP_ST_MAIL: *t = T->mail; break;
	case RQ_SMTP_ST_RCPT: *t = T->rcpt; break;
	case RQ_SMTP_ST_DATA: *t = T->data; break;
	case RQ_SMTP_ST_BODY:
	case RQ_SMTP_ST_BDAT: *t = T->block; *d = s->o.data_total; break;
	case RQ_SMTP_ST_DOT:
	case RQ_SMTP_ST_ABORT_DOT: *t = T->dot; break;
	case RQ_SMTP_ST_QUIT: *t = T->quit; break;
	case RQ_SMTP_ST_READY: *t = s->o.idle_ms; break;
	default: *t = 0; break;
	}
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

static void set_state(struct rq_smtp *s, enum rq_smtp_state st)
{
	int t, d;
	/* the next BDAT chunk (lock-step): data_total keeps running */
	bool keep_deadline = st == RQ_SMTP_ST_BDAT && s->st == RQ_SMTP_ST_BDAT;
	if (rq_log_enabled(RQ_LOG_DEBUG) && st != s->st)
		rq_log(RQ_LOG_DEBUG, "smtp_state", "id", s->log_id, "peer", s->peer_addr,
		       "from", state_names[s->st], "to", state_names[st], NULL);
	s->st = st;
	state_timeouts(s, st, &t, &d);
	s->timer_ms = t;
	arm(s->timer, t);
	if (!keep_deadline)
		arm(s->deadline, d);
}

static void trace(struct rq_smtp *s, char dir, const char *line, size_t len)
{
	if (s->cb.trace && !s->dead)
		s->cb.trace(s, dir, line, len, s->cb.arg);
}

/* Queues one command line. The formatted line must not contain CR, LF or
 * NUL: every address was checked with rq_addr_valid; a violation is a bug. */
static void send_cmd(struct rq_smtp *s, const char *secret_trace, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void send_cmd(struct rq_smtp *s, const char *secret_trace, const char *fmt, ...)
{
	char buf[RQ_ADDR_PATH_MAX + 1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(buf) - 2 || memchr(buf, '\r', (size_t)n) ||
	    memchr(buf, '\n', (size_t)n)) {
		fprintf(stderr, "relayq smtp: refusing to send a malformed command\n");
		abort();
	}
	if (secret_trace)
		trace(s, '>', secret_trace, strlen(secret_trace));
	else
		trace(s, '>', buf, (size_t)n);
	buf[n++] = '\r';
	buf[n++] = '\n';
	if (s->wlen + (size_t)n > s->wcap) {
		size_t cap = s->wcap ? s->wcap : 1024;
		while (cap < s->wlen + (size_t)n)
			cap *= 2;
		char *nb = malloc(cap);
		if (!nb) {
			fprintf(stderr, "relayq smtp: out of memory for a command\n");
			abort();
		}
		if (s->wlen)
			memcpy(nb, s->wbuf, s->wlen);
		if (s->wbuf) {
			OPENSSL_cleanse(s->wbuf, s->wcap);
			free(s->wbuf);
		}
		s->wbuf = nb;
		s->wcap = cap;
	}
	memcpy(s->wbuf + s->wlen, buf, (size_t)n);
	s->wlen += (size_t)n;
	if (secret_trace) {
		s->wsecret = true;
		OPENSSL_cleanse(buf, sizeof(buf));
	}
}

/* A command was just written: input already waiting is unsolicited. */
static void note_unread(struct rq_smtp *s)
{
	if (!s->bev || s->unsolicited)
		return;
	size_t left = evbuffer_get_length(bufferevent_get_input(s->bev));
	if (left) {
		s->unsolicited = true;
		s->unsolicited_len = left;
	}
}

/*
 * Writes the commands of the state just entered in one piece: one
 * evbuffer_add, so a pipelined group (MAIL, every RCPT, DATA) is one write
 * and, over TLS, one record (up to the record size). Bytes already waiting
 * in the input at that moment were sent by the server before it could
 * have seen these commands: they answer nothing we sent, and the session
 * is failed (unsolicited) at the next safe point.
 */
static void flush_cmds(struct rq_smtp *s)
{
	if (s->bev && s->wlen)
		evbuffer_add(bufferevent_get_output(s->bev), s->wbuf, s->wlen);
	if (s->wsecret)
		OPENSSL_cleanse(s->wbuf, s->wlen);
	bool wrote = s->wlen > 0;
	s->wlen = 0;
	s->wsecret = false;
	if (wrote)
		note_unread(s);
}

static void outcome_synth(struct rq_outcome *o, enum rq_stage stage, int code,
			  const char *enh, const char *text)
{
	rq_outcome_set(o, stage, RQ_FAIL_NONE, code, enh, "%s", text);
	o->synthetic = true;
}

/* How a connection is closed (never waiting: the close is immediate). */
enum close_how {
	CLOSE_ABORT,  /* drop it: the connection failed, or we are being freed */
	CLOSE_FLUSH,  /* first write what is queued for the socket (a TLS alert
			 after a failed handshake) */
	CLOSE_CLEAN,  /* the connection works and we end it: a TLS close_notify
			 (SSL_shutdown) first, then as FLUSH */
};

/* One non-blocking attempt to write what waits for the socket; what does
 * not fit in the socket buffer at once is dropped with the connection. */
static void flush_socket(struct rq_smtp *s)
{
	struct bufferevent *u = bufferevent_get_underlying(s->bev);
	if (!u)
		u = s->bev;
	struct evbuffer *uo = bufferevent_get_output(u);
	evutil_socket_t fd = bufferevent_getfd(u);
	if (fd < 0 || evbuffer_get_length(uo) == 0)
		return;
	/* a socket bufferevent keeps its output's front frozen for itself;
	 * it is about to be freed */
	evbuffer_unfreeze(uo, 1);
	(void)evbuffer_write(uo, fd);
}

/* Closes the connection (no QUIT: see conn_end); references into the body
 * are dropped. */
static void close_bev(struct rq_smtp *s, enum close_how how)
{
	if (!s->bev)
		return;
	struct evbuffer *out = bufferevent_get_output(s->bev);
	evbuffer_remove_cb(out, out_drain_cb, s);
	if (evbuffer_get_length(out) > 0)
		how = CLOSE_ABORT; /* mid-body: nothing more is written */
	if (how == CLOSE_CLEAN && s->ssl && s->tls_active) {
		/* the TLS close_notify, written through the filter's BIO into
		 * the socket's output (we do not wait for the server's) */
		(void)SSL_shutdown(s->ssl);
		ERR_clear_error();
	}
	if (how != CLOSE_ABORT)
		flush_socket(s);
	evbuffer_drain(out, evbuffer_get_length(out));
	bufferevent_disable(s->bev, EV_READ | EV_WRITE);
	bufferevent_setcb(s->bev, NULL, NULL, NULL, NULL);
	bufferevent_free(s->bev);
	s->bev = NULL;
	s->ssl = NULL;
	s->unsolicited = false;
	if (s->wlen)
		OPENSSL_cleanse(s->wbuf, s->wlen);
	s->wlen = 0;
	s->wsecret = false;
	event_del(s->timer);
	event_del(s->deadline);
}

static void report_closed(struct rq_smtp *s, const struct rq_outcome *why)
{
	close_bev(s, CLOSE_ABORT);
	to_state(s, RQ_SMTP_ST_CLOSED);
	if (s->closed_done)
		return;
	s->closed_done = true;
	if (s->cb.closed && !s->dead)
		s->cb.closed(s, why, s->cb.arg);
}

/* A session-level outcome for a transaction that never started. */
static void txn_fail_all(struct rq_smtp *s, const struct rq_outcome *o)
{
	struct rq_smtp_txn *t = s->txn;
	for (size_t i = 0; i < t->nrcpt; i++) {
		t->rcpts[i].result = RQ_SMTP_RCPT_FAILED;
		t->rcpts[i].outcome = *o;
	}
	txn_finish(s, o, false);
}

static bool is_reply(const struct rq_outcome *o)
{
	return o->fail == RQ_FAIL_NONE && o->code > 0;
}

/* Every host tried: report the most relevant failure. */
static void all_hosts_failed(struct rq_smtp *s)
{
	struct rq_outcome o = s->best;
	if (s->txn && !s->txn_running) {
		txn_fail_all(s, &o);
		if (s->dead)
			return;
	}
	report_closed(s, &o);
}

/* A positive reply where it makes no sense is never an outcome a caller
 * could take for success: it becomes a protocol error. */
static void as_protocol(struct rq_outcome *o)
{
	if (o->fail != RQ_FAIL_NONE || o->code >= 400 || o->synthetic)
		return;
	char text[RQ_REPLY_TEXT_MAX];
	snprintf(text, sizeof(text), "unexpected reply %d: %.400s", o->code, o->text);
	rq_outcome_set(o, o->stage, RQ_FAIL_PROTOCOL, 0, NULL, "%s", text);
}

/*
 * What follows the end of a connection that was in state st, closed
 * already: the next host (before ready), the running or waiting
 * transaction's results, then closed.
 */
static void conn_after(struct rq_smtp *s, enum rq_smtp_state st, const struct rq_outcome *o)
{
	if (before_ready(st) && !s->ready_once) {
		if (!s->have_best || !is_reply(&s->best) || is_reply(o) ||
		    o->fail == RQ_FAIL_LOCAL) {
			s->best = *o;
			s->have_best = true;
		}
		/* a local fault would hit the next host the same way: stop */
		if (stage_of(st) != RQ_STAGE_AUTH && s->hi + 1 < s->nhosts &&
		    o->fail != RQ_FAIL_LOCAL) {
			s->hi++;
			s->plain_retry = false;
			to_state(s, RQ_SMTP_ST_INIT);
			event_active(s->kick, EV_TIMEOUT, 1);
			return;
		}
		all_hosts_failed(s);
		return;
	}
	if (s->txn && s->txn_running) {
		struct rq_smtp_txn *t = s->txn;
		/* A reused connection lost before the server answered anything of
		 * this transaction: the server went away while idle (the race of
		 * every connection cache). Nothing was done; the recipients can
		 * go at once on a new connection. */
		bool stale = s->ntxn > 1 && s->txn_replies == 0 && o->fail == RQ_FAIL_LOST;
		for (size_t i = 0; i < t->nrcpt; i++) {
			switch (s->rst[i]) {
			case R_SEND:
			case R_WAIT:
			case R_OK:
				if (stale) {
					s->rst[i] = R_NOT;
					t->rcpts[i].result = RQ_SMTP_RCPT_NOT_TRIED;
					memset(&t->rcpts[i].outcome, 0, sizeof(t->rcpts[i].outcome));
				} else {
					/* pipelined after a refused MAIL: MAIL's reply */
					bool mail_refused = s->mail_out.code && !s->mail_ok;
					t->rcpts[i].result = RQ_SMTP_RCPT_FAILED;
					t->rcpts[i].outcome = mail_refused ? s->mail_out : *o;
				}
				break;
			default:
				break;
			}
		}
		txn_finish(s, o, false);
		if (s->dead)
			return;
	} else if (s->txn && !s->txn_running) {
		/* the connection died before the pending txn could start */
		struct rq_smtp_txn *t = s->txn;
		for (size_t i = 0; i < t->nrcpt; i++) {
			t->rcpts[i].result = RQ_SMTP_RCPT_NOT_TRIED;
			memset(&t->rcpts[i].outcome, 0, sizeof(t->rcpts[i].outcome));
		}
		txn_finish(s, o, false);
		if (s->dead)
			return;
	}
	report_closed(s, o);
}

/* The QUIT exchange is over (221, another reply, its timeout, or the
 * connection gone): close as said, then either the outcome of a deliberate
 * end (conn_end) or a clean end. */
static void quit_over(struct rq_smtp *s, enum close_how how, const struct rq_outcome *clean)
{
	close_bev(s, how);
	if (s->ending) {
		struct rq_outcome o = s->end;
		enum rq_smtp_state st = s->end_st;
		s->ending = false;
		conn_after(s, st, &o);
		return;
	}
	report_closed(s, clean);
}

/* The connection failed or broke: how says how. Closed as said (the
 * callers below: dropped, CLOSE_ABORT). */
static void conn_fail_how(struct rq_smtp *s, const struct rq_outcome *how, enum close_how ch)
{
	enum rq_smtp_state st = s->st;
	struct rq_outcome out = *how;
	as_protocol(&out);
	if (rq_log_enabled(RQ_LOG_DEBUG))
		rq_log(RQ_LOG_DEBUG, "smtp_fail", "id", s->log_id, "peer", s->peer_addr,
		       "state", state_names[st], "fail", rq_fail_name(out.fail),
		       "text", out.text, NULL);
	if (st == RQ_SMTP_ST_QUIT) {
		struct rq_outcome clean;
		rq_outcome_set(&clean, RQ_STAGE_QUIT, RQ_FAIL_NONE, 0, NULL,
			       "connection closed after QUIT");
		quit_over(s, ch, &clean);
		return;
	}
	close_bev(s, ch);
	conn_after(s, st, &out);
}

static void conn_fail(struct rq_smtp *s, const struct rq_outcome *how)
{
	conn_fail_how(s, how, CLOSE_ABORT);
}

/*
 * A deliberate end of a connection that still works: the server refused
 * something (not with 421) or cannot give what we require (STARTTLS, an
 * AUTH mechanism). QUIT is sent and its reply awaited within the quit
 * timeout, TLS is closed with a close_notify, then how is the outcome as
 * conn_fail would have reported it from this state (next host, results,
 * closed). A 421 means the server is closing: no QUIT, a clean close.
 */
static void conn_end(struct rq_smtp *s, const struct rq_outcome *how)
{
	if (how->fail == RQ_FAIL_NONE && how->code == 421) {
		conn_fail_how(s, how, CLOSE_CLEAN);
		return;
	}
	if (s->ending || !s->bev || s->st == RQ_SMTP_ST_QUIT) {
		conn_fail(s, how);
		return;
	}
	s->ending = true;
	s->end = *how;
	as_protocol(&s->end);
	s->end_st = s->st;
	if (rq_log_enabled(RQ_LOG_DEBUG))
		rq_log(RQ_LOG_DEBUG, "smtp_end", "id", s->log_id, "peer", s->peer_addr,
		       "state", state_names[s->st], "text", s->end.text, NULL);
	to_state(s, RQ_SMTP_ST_QUIT);
}

static void fail_here(struct rq_smtp *s, enum rq_fail fail, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void fail_here(struct rq_smtp *s, enum rq_fail fail, const char *fmt, ...)
{
	struct rq_outcome o;
	char text[RQ_REPLY_TEXT_MAX];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(text, sizeof(text), fmt, ap);
	va_end(ap);
	rq_outcome_set(&o, stage_of(s->st), fail, 0, NULL, "%s", text);
	conn_fail(s, &o);
}

/* ------------------------------------------------------------------------
 * Entering and leaving event callbacks (the deferred free)
 */

static void really_free(struct rq_smtp *s)
{
	close_bev(s, CLOSE_ABORT);
	if (s->timer)
		event_free(s->timer);
	if (s->deadline)
		event_free(s->deadline);
	if (s->kick)
		event_free(s->kick);
	rq_secret_free(s->pass);
	free(s->user);
	free(s->helo);
	free(s->servername);
	free(s->log_id);
	free(s->hosts);
	free(s->rst);
	free(s->order);
	txn_release(s);
	if (s->wbuf) {
		OPENSSL_cleanse(s->wbuf, s->wcap);
		free(s->wbuf);
	}
	free(s);
}

static void enter(struct rq_smtp *s)
{
	s->depth++;
}

static void fail_unsolicited(struct rq_smtp *s);

static void leave(struct rq_smtp *s)
{
	/* a command went out while input was waiting (kick, timers) */
	if (s->depth == 1 && s->unsolicited && !s->dead)
		fail_unsolicited(s);
	if (--s->depth == 0 && s->dead)
		really_free(s);
}

/* ------------------------------------------------------------------------
 * TLS
 */

static const char *tls_name(struct rq_smtp *s)
{
	if (s->servername)
		return s->servername;
	return s->hosts[s->hi].name[0] ? s->hosts[s->hi].name : s->peer_ip;
}

static bool tls_enforced(const struct rq_smtp *s)
{
	return (s->o.tls == RQ_TLS_REQUIRED || s->o.tls == RQ_TLS_IMPLICIT) && s->o.tls_verify;
}

static void bev_read_cb(struct bufferevent *bev, void *arg);
static void bev_write_cb(struct bufferevent *bev, void *arg);
static void bev_event_cb(struct bufferevent *bev, short what, void *arg);

static void out_drain_cb(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
	struct rq_smtp *s = arg;
	if (info->n_deleted > 0 && (s->st == RQ_SMTP_ST_BODY ||
				    (s->st == RQ_SMTP_ST_BDAT && s->bdat_writing)))
		arm(s->timer, s->timer_ms);
}

static void setup_bev(struct rq_smtp *s)
{
	bufferevent_setcb(s->bev, bev_read_cb, bev_write_cb, bev_event_cb, s);
	bufferevent_setwatermark(s->bev, EV_READ, 0, 256 * 1024);
	bufferevent_setwatermark(s->bev, EV_WRITE, 0, 0);
	evbuffer_add_cb(bufferevent_get_output(s->bev), out_drain_cb, s);
	bufferevent_enable(s->bev, EV_READ | EV_WRITE);
}

/* Wraps the connection in TLS; the handshake result comes as an event. */
static void tls_start(struct rq_smtp *s, enum rq_smtp_state st)
{
	char err[256];
	const char *name = tls_name(s);
	SSL *ssl = rq_tls_ssl_new(s->o.tls_ctx, name, tls_enforced(s), err, sizeof(err));
	if (!ssl) {
		fail_here(s, RQ_FAIL_TLS, "%s", err);
		return;
	}
	bufferevent_setcb(s->bev, NULL, NULL, NULL, NULL);
	evbuffer_remove_cb(bufferevent_get_output(s->bev), out_drain_cb, s);
	struct bufferevent *tb = bufferevent_openssl_filter_new(
		s->base, s->bev, ssl, BUFFEREVENT_SSL_CONNECTING,
		BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (!tb) {
		SSL_free(ssl);
		fail_here(s, RQ_FAIL_TLS, "cannot start TLS");
		return;
	}
	bufferevent_openssl_set_allow_dirty_shutdown(tb, 1);
	s->bev = tb;
	s->ssl = ssl;
	setup_bev(s);
	to_state(s, st);
}

static void tls_done(struct rq_smtp *s)
{
	s->tls_active = true;
	s->tls_verified = rq_tls_verified(s->ssl);
	rq_tls_describe(s->ssl, s->tls_info, sizeof(s->tls_info));
	if (rq_log_enabled(RQ_LOG_DEBUG))
		rq_log(RQ_LOG_DEBUG, "smtp_tls", "id", s->log_id, "peer", s->peer_addr,
		       "tls", s->tls_info, "verified", s->tls_verified ? "yes" : "no", NULL);
}

static void tls_failed(struct rq_smtp *s, unsigned long ossl_err, const char *fallback)
{
	char text[RQ_REPLY_TEXT_MAX];
	rq_tls_error_text(tls_enforced(s) ? s->ssl : NULL, ossl_err, fallback, text, sizeof(text));
	if (s->o.tls == RQ_TLS_OPPORTUNISTIC && s->o.tls_fallback_plain && !s->plain_retry) {
		if (rq_log_enabled(RQ_LOG_DEBUG))
			rq_log(RQ_LOG_DEBUG, "smtp_tls_fallback", "id", s->log_id,
			       "peer", s->peer_addr, "error", text, NULL);
		close_bev(s, CLOSE_FLUSH);
		s->plain_retry = true;
		to_state(s, RQ_SMTP_ST_INIT);
		event_active(s->kick, EV_TIMEOUT, 1);
		return;
	}
	/* The handshake failed (a certificate that does not verify, or the
	 * server's alert): OpenSSL has queued its alert; it goes out before
	 * the close. No QUIT over a channel we do not trust. */
	close_bev(s, CLOSE_FLUSH);
	struct rq_outcome o;
	rq_outcome_set(&o, RQ_STAGE_TLS, RQ_FAIL_TLS, 0, NULL, "%s", text);
	conn_fail(s, &o);
}

/* ------------------------------------------------------------------------
 * Commands: one function enters a state and writes its command
 */

static void b64(const unsigned char *in, size_t n, char *out)
{
	EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

/* AUTH PLAIN with its initial response (RFC 4616), or AUTH LOGIN. */
static void put_auth(struct rq_smtp *s)
{
	if (s->auth_mech != RQ_SMTP_AUTH_PLAIN) {
		send_cmd(s, NULL, "AUTH LOGIN");
		return;
	}
	size_t ul = strlen(s->user), pl = strlen(s->pass);
	size_t n = ul + pl + 2;
	unsigned char *raw = malloc(n);
	char *enc = malloc(4 * ((n + 2) / 3) + 1);
	if (!raw || !enc) {
		free(raw);
		free(enc);
		fail_here(s, RQ_FAIL_PROTOCOL, "out of memory");
		return;
	}
	raw[0] = '\0';
	memcpy(raw + 1, s->user, ul);
	raw[1 + ul] = '\0';
	memcpy(raw + 2 + ul, s->pass, pl);
	b64(raw, n, enc);
	send_cmd(s, "AUTH PLAIN <secret>", "AUTH PLAIN %s", enc);
	OPENSSL_cleanse(raw, n);
	OPENSSL_cleanse(enc, strlen(enc));
	free(raw);
	free(enc);
}

/* One AUTH LOGIN answer: base64 of the user name or the password. */
static void put_secret(struct rq_smtp *s, const char *secret)
{
	size_t n = strlen(secret);
	char *enc = malloc(4 * ((n + 2) / 3) + 1);
	if (!enc) {
		fail_here(s, RQ_FAIL_PROTOCOL, "out of memory");
		return;
	}
	b64((const unsigned char *)secret, n, enc);
	send_cmd(s, "<secret>", "%s", enc);
	OPENSSL_cleanse(enc, strlen(enc));
	free(enc);
}

/* MAIL FROM with its parameters. */
static void put_mail(struct rq_smtp *s)
{
	struct rq_smtp_txn *t = s->txn;
	char params[96] = "";
	size_t off = 0;
	if (s->caps.flags & RQ_SMTP_CAP_SIZE)
		off += (size_t)snprintf(params + off, sizeof(params) - off, " SIZE=%llu",
					(unsigned long long)s->body_size);
	if (s->body_8bit && (s->caps.flags & RQ_SMTP_CAP_8BITMIME))
		off += (size_t)snprintf(params + off, sizeof(params) - off, " BODY=8BITMIME");
	if (s->need_utf8)
		snprintf(params + off, sizeof(params) - off, " SMTPUTF8");
	if (s->from_ascii)
		send_cmd(s, NULL, "MAIL FROM:<%s>%s", s->from_ascii, params);
	else
		send_cmd(s, NULL, "MAIL FROM:<%.*s>%s", (int)t->from_len, t->from, params);
}

static void put_rcpt(struct rq_smtp *s, size_t idx)
{
	struct rq_smtp_rcpt *r = &s->txn->rcpts[idx];
	s->rst[idx] = R_WAIT;
	if (s->rcpt_ascii && s->rcpt_ascii[idx])
		send_cmd(s, NULL, "RCPT TO:<%s>", s->rcpt_ascii[idx]);
	else
		send_cmd(s, NULL, "RCPT TO:<%.*s>", (int)r->len, r->addr);
}

/* PIPELINING: MAIL, every RCPT and DATA in one write (BDAT: the chunks
 * follow the RCPT replies, see bdat_write). */
static void put_batch(struct rq_smtp *s)
{
	put_mail(s);
	for (size_t k = 0; k < s->nsend; k++)
		put_rcpt(s, s->order[k]);
	s->si = s->nsend;
	if (!s->bdat)
		send_cmd(s, NULL, "DATA");
	s->batch_sent = true;
}

/*
 * Writes BDAT chunks from the stream built at the start of the transaction:
 * with PIPELINING all that are left, else the next one. Each chunk is its
 * command line and its bytes, moved (not copied: message.h) from bdat_buf
 * into the output; the command is traced, the bytes are not.
 */
static void bdat_write(struct rq_smtp *s)
{
	struct evbuffer *out = bufferevent_get_output(s->bev);
	size_t upto = s->pipelined ? s->bdat_n : s->bdat_sent + 1;
	size_t chunk = s->o.chunk_size ? s->o.chunk_size : RQ_SMTP_CHUNK_SIZE;
	for (; s->bdat_sent < upto; s->bdat_sent++) {
		size_t n = rq_bdat_chunk_len(s->bdat_len, chunk, s->bdat_sent);
		bool last = s->bdat_sent + 1 == s->bdat_n;
		char cmd[64];
		int k = snprintf(cmd, sizeof(cmd), "BDAT %zu%s", n, last ? " LAST" : "");
		trace(s, '>', cmd, (size_t)k);
		size_t want = (size_t)k + 2 + n;
		if (evbuffer_remove_buffer(s->bdat_buf, out, want) != (int)want) {
			fail_here(s, RQ_FAIL_PROTOCOL, "out of memory while queueing BDAT chunk %zu",
				  s->bdat_sent + 1);
			return;
		}
		s->txn->chunks++;
	}
	s->bdat_writing = true;
	note_unread(s);
}

/*
 * Enters a state and writes its command: the only place commands are
 * written, in one piece per state (flush_cmds). With PIPELINING a
 * transaction's commands all go out when it starts (in MAIL), so RCPT and
 * DATA then add nothing; in lock-step each RCPT state entered sends the
 * next recipient.
 */
static void to_state(struct rq_smtp *s, enum rq_smtp_state st)
{
	set_state(s, st);
	switch (st) {
	case RQ_SMTP_ST_EHLO:
		rq_smtp_caps_reset(&s->caps);
		send_cmd(s, NULL, "EHLO %s", s->helo);
		break;
	case RQ_SMTP_ST_HELO:
		send_cmd(s, NULL, "HELO %s", s->helo);
		break;
	case RQ_SMTP_ST_STARTTLS:
		send_cmd(s, NULL, "STARTTLS");
		break;
	case RQ_SMTP_ST_AUTH:
		put_auth(s);
		break;
	case RQ_SMTP_ST_AUTH_USER:
		put_secret(s, s->user);
		break;
	case RQ_SMTP_ST_AUTH_PASS:
		put_secret(s, s->pass);
		break;
	case RQ_SMTP_ST_RSET:
		send_cmd(s, NULL, "RSET");
		break;
	case RQ_SMTP_ST_MAIL:
		if (s->batch_sent)
			break;
		if (s->pipelined)
			put_batch(s);
		else
			put_mail(s);
		break;
	case RQ_SMTP_ST_RCPT:
		if (!s->batch_sent)
			put_rcpt(s, s->order[s->si++]);
		break;
	case RQ_SMTP_ST_DATA:
		if (!s->batch_sent)
			send_cmd(s, NULL, "DATA");
		break;
	case RQ_SMTP_ST_BODY:
		if (rq_data_append(bufferevent_get_output(s->bev), s->txn->body,
				   s->txn->body_len) != 0) {
			fail_here(s, RQ_FAIL_PROTOCOL, "out of memory while queueing the body");
			return;
		}
		/* no unsolicited check here: a reply already waiting is a
		 * server giving up on the data (354 then 5xx at once, e.g.
		 * smtp-sink -A), the message's outcome (on_reply, BODY) */
		break;
	case RQ_SMTP_ST_BDAT:
		bdat_write(s);
		break;
	case RQ_SMTP_ST_ABORT_DOT:
		send_cmd(s, NULL, ".");
		break;
	case RQ_SMTP_ST_QUIT:
		send_cmd(s, NULL, "QUIT");
		break;
	default:
		/* nothing to send: connecting, greeting, TLS, ready, dot, closed */
		break;
	}
	flush_cmds(s);
}

/* AUTH: only over TLS (unless allowed), with a mechanism both sides know. */
static void start_auth(struct rq_smtp *s)
{
	unsigned allowed = s->caps.auth & s->o.auth_mechs;
	struct rq_outcome o;
	if (!s->tls_active && !s->o.auth_plaintext_ok) {
		outcome_synth(&o, RQ_STAGE_AUTH, 454, "4.7.0",
			      "relayq: refusing to send credentials over an unencrypted connection");
		conn_end(s, &o);
		return;
	}
	if (!(s->caps.flags & RQ_SMTP_CAP_AUTH) ||
	    !(allowed & (RQ_SMTP_AUTH_PLAIN | RQ_SMTP_AUTH_LOGIN))) {
		outcome_synth(&o, RQ_STAGE_AUTH, 454, "4.7.0",
			      "relayq: the server offers no AUTH mechanism we may use");
		conn_end(s, &o);
		return;
	}
	s->auth_mech = (allowed & RQ_SMTP_AUTH_PLAIN) ? RQ_SMTP_AUTH_PLAIN : RQ_SMTP_AUTH_LOGIN;
	to_state(s, RQ_SMTP_ST_AUTH);
}

/* After EHLO/HELO: STARTTLS, AUTH, or ready. */
static void after_hello(struct rq_smtp *s)
{
	if (!s->tls_active && !s->plain_retry &&
	    (s->o.tls == RQ_TLS_OPPORTUNISTIC || s->o.tls == RQ_TLS_REQUIRED)) {
		if (s->caps.flags & RQ_SMTP_CAP_STARTTLS) {
			to_state(s, RQ_SMTP_ST_STARTTLS);
			return;
		}
		if (s->o.tls == RQ_TLS_REQUIRED) {
			struct rq_outcome o;
			rq_outcome_set(&o, RQ_STAGE_STARTTLS, RQ_FAIL_TLS, 0, NULL,
				       "TLS required but the server does not offer STARTTLS");
			conn_end(s, &o);
			return;
		}
	}
	if (s->user && !s->authed) {
		start_auth(s);
		return;
	}
	s->ready_once = true;
	s->have_best = false;
	to_state(s, RQ_SMTP_ST_READY);
	if (s->cb.ready && !s->dead)
		s->cb.ready(s, s->cb.arg);
	if (s->dead || s->st != RQ_SMTP_ST_READY)
		return;
	go_ready(s);
}

/* Prepares and sends a transaction (from READY). */
static void txn_start(struct rq_smtp *s)
{
	struct rq_smtp_txn *t = s->txn;
	struct rq_outcome o;
	char err[256];

	s->txn_running = true;
	s->sent_any = false;
	s->batch_sent = false;
	s->nsend = s->si = s->ri = s->accepted = 0;
	s->too_many = false;
	s->mail_ok = false;
	txn_release(s);
	s->bdat = false;
	s->bdat_len = s->bdat_n = s->bdat_sent = s->bdat_acked = 0;
	s->bdat_writing = s->bdat_failed = false;
	memset(&s->mail_out, 0, sizeof(s->mail_out));
	memset(&s->last_rcpt_fail, 0, sizeof(s->last_rcpt_fail));
	free(s->rst);
	free(s->order);
	s->rst = calloc(t->nrcpt ? t->nrcpt : 1, 1);
	s->order = calloc(t->nrcpt ? t->nrcpt : 1, sizeof(size_t));
	s->rcpt_ascii = calloc(t->nrcpt ? t->nrcpt : 1, sizeof(char *));
	s->nascii = t->nrcpt;
	if (!s->rst || !s->order || !s->rcpt_ascii) {
		rq_outcome_set(&o, RQ_STAGE_MAIL, RQ_FAIL_PROTOCOL, 0, NULL, "out of memory");
		txn_fail_all(s, &o);
		return;
	}
	for (size_t i = 0; i < t->nrcpt; i++) {
		t->rcpts[i].result = RQ_SMTP_RCPT_NOT_TRIED;
		memset(&t->rcpts[i].outcome, 0, sizeof(t->rcpts[i].outcome));
	}

	/* Checks before anything goes on the wire. */
	if (!rq_addr_valid(t->from, t->from_len, true, err, sizeof(err))) {
		outcome_synth(&o, RQ_STAGE_MAIL, 553, "5.1.7", "");
		snprintf(o.text, sizeof(o.text), "relayq: invalid sender address: %s", err);
		txn_fail_all(s, &o);
		return;
	}
	/* CHUNKING: the whole BDAT stream now (by reference), which also
	 * gives the exact size */
	s->bdat = s->o.chunking && (s->caps.flags & RQ_SMTP_CAP_CHUNKING);
	t->chunked = s->bdat;
	t->chunks = 0;
	if (s->bdat) {
		size_t chunk = s->o.chunk_size ? s->o.chunk_size : RQ_SMTP_CHUNK_SIZE;
		s->bdat_buf = evbuffer_new();
		if (!s->bdat_buf || rq_bdat_append(s->bdat_buf, t->body, t->body_len, chunk,
						   &s->bdat_len) != 0) {
			rq_outcome_set(&o, RQ_STAGE_MAIL, RQ_FAIL_PROTOCOL, 0, NULL,
				       "out of memory while preparing BDAT chunks");
			txn_fail_all(s, &o);
			return;
		}
		s->bdat_n = rq_bdat_chunks(s->bdat_len, chunk);
	}
	/* SIZE= (RFC 1870): the message as it will be sent, line endings
	 * normalised (with DATA dot-stuffing counted too: a slight
	 * overestimate; with BDAT exact) */
	s->body_size = t->body_len;
	if (s->bdat) {
		s->body_size = s->bdat_len;
	} else if (s->caps.flags & RQ_SMTP_CAP_SIZE) {
		s->body_size = rq_data_encode(t->body, t->body_len, NULL, 0);
		if (s->body_size >= 3)
			s->body_size -= 3; /* the final ".\r\n" */
	}
	if (s->caps.size_max && s->body_size > s->caps.size_max) {
		outcome_synth(&o, RQ_STAGE_MAIL, 552, "5.3.4", "");
		snprintf(o.text, sizeof(o.text),
			 "relayq: message size %llu exceeds the server's limit of %llu",
			 (unsigned long long)s->body_size, (unsigned long long)s->caps.size_max);
		txn_fail_all(s, &o);
		return;
	}
	bool has_utf8 = s->caps.flags & RQ_SMTP_CAP_SMTPUTF8;
	char ascii[RQ_ADDR_PATH_MAX + 1];
	s->need_utf8 = false;
	if (rq_addr_needs_utf8(t->from, t->from_len)) {
		enum rq_addr_ascii a = has_utf8 ? RQ_ADDR_ASCII_SAME :
			rq_addr_to_ascii(t->from, t->from_len, ascii, err, sizeof(err));
		if (has_utf8) {
			s->need_utf8 = true;
		} else if (a == RQ_ADDR_ASCII_ALABEL) {
			s->from_ascii = strdup(ascii);
			if (!s->from_ascii) {
				rq_outcome_set(&o, RQ_STAGE_MAIL, RQ_FAIL_PROTOCOL, 0, NULL,
					       "out of memory");
				txn_fail_all(s, &o);
				return;
			}
		} else if (a == RQ_ADDR_ASCII_INVALID) {
			outcome_synth(&o, RQ_STAGE_MAIL, 553, "5.1.7", "");
			snprintf(o.text, sizeof(o.text),
				 "relayq: the sender's domain cannot be sent without SMTPUTF8: %s", err);
			txn_fail_all(s, &o);
			return;
		} else {
			outcome_synth(&o, RQ_STAGE_MAIL, 553, "5.6.7",
				      "relayq: the sender address needs SMTPUTF8, which the server does not offer");
			txn_fail_all(s, &o);
			return;
		}
	}
	for (size_t i = 0; i < t->nrcpt; i++) {
		struct rq_smtp_rcpt *r = &t->rcpts[i];
		if (!r->addr || !rq_addr_valid(r->addr, r->len, false, err, sizeof(err))) {
			outcome_synth(&r->outcome, RQ_STAGE_RCPT, 553, "5.1.3", "");
			snprintf(r->outcome.text, sizeof(r->outcome.text),
				 "relayq: invalid recipient address: %s", r->addr ? err : "missing");
			r->result = RQ_SMTP_RCPT_FAILED;
			s->rst[i] = R_SKIP;
			continue;
		}
		if (rq_addr_needs_utf8(r->addr, r->len)) {
			enum rq_addr_ascii a = has_utf8 ? RQ_ADDR_ASCII_SAME :
				rq_addr_to_ascii(r->addr, r->len, ascii, err, sizeof(err));
			if (has_utf8) {
				s->need_utf8 = true;
			} else if (a == RQ_ADDR_ASCII_ALABEL) {
				s->rcpt_ascii[i] = strdup(ascii);
				if (!s->rcpt_ascii[i]) {
					rq_outcome_set(&o, RQ_STAGE_RCPT, RQ_FAIL_PROTOCOL, 0, NULL,
						       "out of memory");
					txn_fail_all(s, &o);
					return;
				}
			} else if (a == RQ_ADDR_ASCII_INVALID) {
				outcome_synth(&r->outcome, RQ_STAGE_RCPT, 553, "5.1.3", "");
				snprintf(r->outcome.text, sizeof(r->outcome.text),
					 "relayq: the recipient's domain cannot be sent without SMTPUTF8: %s",
					 err);
				r->result = RQ_SMTP_RCPT_FAILED;
				s->rst[i] = R_SKIP;
				continue;
			} else {
				outcome_synth(&r->outcome, RQ_STAGE_RCPT, 553, "5.6.7",
					      "relayq: the recipient address needs SMTPUTF8, which the server does not offer");
				r->result = RQ_SMTP_RCPT_FAILED;
				s->rst[i] = R_SKIP;
				continue;
			}
		}
		s->rst[i] = R_SEND;
		s->order[s->nsend++] = i;
	}
	if (s->nsend == 0) {
		o = t->nrcpt ? t->rcpts[t->nrcpt - 1].outcome : (struct rq_outcome){0};
		if (!t->nrcpt)
			outcome_synth(&o, RQ_STAGE_RCPT, 554, "5.5.1", "relayq: no recipients");
		txn_finish(s, &o, false);
		return;
	}
	s->body_8bit = rq_body_is_8bit(t->body, t->body_len);
	s->pipelined = (s->caps.flags & RQ_SMTP_CAP_PIPELINING) != 0;
	t->pipelined = s->pipelined;

	s->ntxn++;
	s->sent_any = true;
	s->txn_replies = 0;
	/* straight to MAIL: the previous transaction on this connection
	 * completed (the reply to "."), or was ended by its own RSET */
	to_state(s, RQ_SMTP_ST_MAIL);
}

/* READY: start a waiting transaction, quit, or idle. */
static void go_ready(struct rq_smtp *s)
{
	if (s->st != RQ_SMTP_ST_READY)
		to_state(s, RQ_SMTP_ST_READY);
	if (s->txn && !s->txn_running) {
		txn_start(s);
		return;
	}
	if (s->quit_requested || (s->o.max_txns && s->ntxn >= s->o.max_txns))
		to_state(s, RQ_SMTP_ST_QUIT);
	/* else idle: the READY timer is idle_ms */
}

/* The transaction ends: results complete, done called. */
static void txn_finish(struct rq_smtp *s, const struct rq_outcome *o, bool aborted)
{
	struct rq_smtp_txn *t = s->txn;
	t->outcome = *o;
	t->delivered = t->failed = t->not_tried = 0;
	for (size_t i = 0; i < t->nrcpt; i++) {
		switch (t->rcpts[i].result) {
		case RQ_SMTP_RCPT_DELIVERED: t->delivered++; break;
		case RQ_SMTP_RCPT_FAILED: t->failed++; break;
		default: t->not_tried++; break;
		}
	}
	s->txn = NULL;
	s->txn_running = false;
	s->sent_any = false;
	txn_release(s);
	s->bdat_writing = false;
	if (t->done && !s->dead)
		t->done(t, t->arg);
	if (s->dead || !s->bev)
		return;
	if (aborted) {
		/* end the half-open transaction now: the only RSET we send */
		to_state(s, RQ_SMTP_ST_RSET);
		return;
	}
	if (s->st != RQ_SMTP_ST_CLOSED && s->st != RQ_SMTP_ST_QUIT)
		go_ready(s);
}

/* Ends a transaction in which MAIL or every recipient failed. */
static void txn_no_delivery(struct rq_smtp *s, const struct rq_outcome *o)
{
	struct rq_smtp_txn *t = s->txn;
	for (size_t i = 0; i < t->nrcpt; i++) {
		if (s->rst[i] == R_SEND || s->rst[i] == R_WAIT || s->rst[i] == R_OK) {
			t->rcpts[i].result = RQ_SMTP_RCPT_FAILED;
			t->rcpts[i].outcome = *o;
		}
	}
	txn_finish(s, o, true);
}

/* Marks recipients not sent (lock-step) or refused after "too many" as not tried. */
static void mark_rest_not_tried(struct rq_smtp *s, size_t from_k)
{
	struct rq_smtp_txn *t = s->txn;
	for (size_t k = from_k; k < s->nsend; k++) {
		size_t i = s->order[k];
		if (s->rst[i] == R_SEND || s->rst[i] == R_WAIT) {
			s->rst[i] = R_NOT;
			t->rcpts[i].result = RQ_SMTP_RCPT_NOT_TRIED;
			memset(&t->rcpts[i].outcome, 0, sizeof(t->rcpts[i].outcome));
		}
	}
}

/* Every RCPT has its reply: DATA (lock-step), or the BDAT chunks. */
static void after_rcpts(struct rq_smtp *s)
{
	if (s->bdat && !s->mail_ok) {
		txn_no_delivery(s, &s->mail_out);
		return;
	}
	if (s->accepted == 0) {
		txn_no_delivery(s, &s->last_rcpt_fail);
		return;
	}
	to_state(s, s->bdat ? RQ_SMTP_ST_BDAT : RQ_SMTP_ST_DATA);
}

/* The chunk bytes left the output: wait for the next reply, within data's
 * timeout, or dot's when only the reply to LAST is left. data_total ends
 * once the last chunk is written. */
static void bdat_drained(struct rq_smtp *s)
{
	s->bdat_writing = false;
	if (s->bdat_sent == s->bdat_n) {
		if (!s->bdat_failed && s->bdat_acked + 1 == s->bdat_n) {
			to_state(s, RQ_SMTP_ST_DOT);
			return;
		}
		event_del(s->deadline);
	}
	s->timer_ms = s->o.timeout.data;
	arm(s->timer, s->timer_ms);
}

/* ------------------------------------------------------------------------
 * Replies: one function switches on the state
 */

static bool r2(const struct rq_outcome *o) { return o->code >= 200 && o->code < 300; }

/* Which positive (< 400) replies a state accepts. */
static bool positive_ok(enum rq_smtp_state st, int code)
{
	switch (st) {
	case RQ_SMTP_ST_GREETING:
	case RQ_SMTP_ST_STARTTLS: return code == 220;
	case RQ_SMTP_ST_AUTH: return code == 235 || code == 334;
	case RQ_SMTP_ST_AUTH_USER: return code == 334;
	case RQ_SMTP_ST_AUTH_PASS: return code == 235;
	case RQ_SMTP_ST_DATA: return code == 354;
	case RQ_SMTP_ST_EHLO:
	case RQ_SMTP_ST_HELO:
	case RQ_SMTP_ST_RSET:
	case RQ_SMTP_ST_MAIL:
	case RQ_SMTP_ST_RCPT:
	case RQ_SMTP_ST_BDAT:
	case RQ_SMTP_ST_DOT: return code >= 200 && code < 300;
	case RQ_SMTP_ST_ABORT_DOT:
	case RQ_SMTP_ST_QUIT: return true;
	default: return false;
	}
}

/* The reply to "." or to BDAT LAST: the message's outcome. */
static void final_reply(struct rq_smtp *s, struct rq_outcome *o)
{
	struct rq_smtp_txn *t = s->txn;
	if (s->st != RQ_SMTP_ST_DOT)
		set_state(s, RQ_SMTP_ST_DOT);
	o->stage = RQ_STAGE_DOT;
	for (size_t i = 0; i < t->nrcpt; i++) {
		if (s->rst[i] != R_OK)
			continue;
		t->rcpts[i].result = r2(o) ? RQ_SMTP_RCPT_DELIVERED : RQ_SMTP_RCPT_FAILED;
		t->rcpts[i].outcome = *o;
	}
	to_state(s, RQ_SMTP_ST_READY);
	txn_finish(s, o, false);
}

/*
 * The reply to a BDAT chunk. Replies come in the order of the chunks. A
 * refusal is the outcome of every accepted recipient: at once when
 * nothing more is due (RSET follows), after the replies to the chunks
 * already sent otherwise; while chunk bytes are still being written the
 * connection is closed instead (as a refusal during DATA).
 */
static void on_bdat_reply(struct rq_smtp *s, struct rq_outcome *o)
{
	struct evbuffer *out = bufferevent_get_output(s->bev);
	if (s->bdat_writing && evbuffer_get_length(out) == 0)
		s->bdat_writing = false; /* the write callback has not run yet */
	bool last = s->bdat_acked + 1 == s->bdat_n;
	s->bdat_acked++;
	if (s->bdat_failed) {
		/* a chunk was refused: the rest are read and forgotten */
		if (s->bdat_acked < s->bdat_sent || s->bdat_writing) {
			arm(s->timer, s->timer_ms);
			return;
		}
		struct rq_outcome f = s->bdat_fail;
		txn_no_delivery(s, &f);
		return;
	}
	if (last) {
		final_reply(s, o);
		return;
	}
	if (!r2(o)) {
		if (s->bdat_writing) {
			conn_fail(s, o);
			return;
		}
		if (s->bdat_acked < s->bdat_sent) {
			s->bdat_failed = true;
			s->bdat_fail = *o;
			s->timer_ms = s->o.timeout.data;
			arm(s->timer, s->timer_ms);
			return;
		}
		txn_no_delivery(s, o);
		return;
	}
	if (s->bdat_writing)
		return; /* the write progress timer runs */
	if (s->bdat_sent < s->bdat_n) {
		to_state(s, RQ_SMTP_ST_BDAT); /* lock-step: the next chunk */
		return;
	}
	if (s->bdat_acked + 1 == s->bdat_n) {
		to_state(s, RQ_SMTP_ST_DOT);
		return;
	}
	arm(s->timer, s->timer_ms); /* the next reply, from this one */
}

static void on_reply(struct rq_smtp *s, struct rq_outcome *o)
{
	struct rq_smtp_txn *t = s->txn;

	if (t && s->txn_running)
		s->txn_replies++;

	/* a positive reply the state does not expect: protocol error */
	if (o->code < 400 && !positive_ok(s->st, o->code)) {
		fail_here(s, RQ_FAIL_PROTOCOL, "unexpected reply %d in state %s: %.200s", o->code,
			  state_names[s->st], o->text);
		return;
	}

	/* 421 anywhere in a transaction: the server is closing the connection;
	 * it is the outcome of every recipient still open */
	if (o->code == 421 && s->st >= RQ_SMTP_ST_RSET && s->st <= RQ_SMTP_ST_ABORT_DOT) {
		conn_end(s, o);
		return;
	}

	switch (s->st) {
	case RQ_SMTP_ST_GREETING:
		if (o->code != 220) {
			conn_end(s, o);
			return;
		}
		to_state(s, RQ_SMTP_ST_EHLO);
		return;

	case RQ_SMTP_ST_EHLO:
	case RQ_SMTP_ST_HELO:
		if (r2(o)) {
			after_hello(s);
			return;
		}
		if (s->st == RQ_SMTP_ST_EHLO) {
			rq_smtp_caps_reset(&s->caps);
			if (o->code >= 500) {
				to_state(s, RQ_SMTP_ST_HELO);
				return;
			}
		}
		conn_end(s, o);
		return;

	case RQ_SMTP_ST_STARTTLS:
		if (o->code == 220) {
			size_t left = evbuffer_get_length(bufferevent_get_input(s->bev));
			if (left) {
				fail_here(s, RQ_FAIL_PROTOCOL,
					  "%zu bytes after the 220 reply to STARTTLS (response injection): connection dropped",
					  left);
				return;
			}
			tls_start(s, RQ_SMTP_ST_TLS);
			return;
		}
		if (s->o.tls == RQ_TLS_REQUIRED) {
			o->fail = RQ_FAIL_TLS;
			conn_end(s, o);
			return;
		}
		/* opportunistic: go on in plain text, no second STARTTLS */
		s->plain_retry = true;
		after_hello(s);
		return;

	case RQ_SMTP_ST_AUTH:
	case RQ_SMTP_ST_AUTH_PASS:
		if (o->code == 235) {
			s->authed = true;
			after_hello(s);
			return;
		}
		if (s->st == RQ_SMTP_ST_AUTH && o->code == 334 &&
		    s->auth_mech == RQ_SMTP_AUTH_LOGIN) {
			to_state(s, RQ_SMTP_ST_AUTH_USER);
			return;
		}
		conn_end(s, o);
		return;

	case RQ_SMTP_ST_AUTH_USER:
		if (o->code == 334) {
			to_state(s, RQ_SMTP_ST_AUTH_PASS);
			return;
		}
		conn_end(s, o);
		return;

	case RQ_SMTP_ST_RSET:
		if (!r2(o)) {
			/* a server that cannot RSET is not fit for reuse */
			conn_end(s, o);
			return;
		}
		go_ready(s);
		return;

	case RQ_SMTP_ST_MAIL:
		s->mail_ok = r2(o);
		s->mail_out = *o;
		if (!s->pipelined && !s->mail_ok) {
			txn_no_delivery(s, o);
			return;
		}
		to_state(s, RQ_SMTP_ST_RCPT);
		return;

	case RQ_SMTP_ST_RCPT: {
		size_t i = s->order[s->ri++];
		if (s->mail_ok && r2(o)) {
			s->rst[i] = R_OK;
			s->accepted++;
		} else if (!s->mail_ok) {
			s->rst[i] = R_BAD; /* failed with MAIL's outcome below */
			t->rcpts[i].result = RQ_SMTP_RCPT_FAILED;
			t->rcpts[i].outcome = s->mail_out;
		} else if (s->too_many || (s->accepted > 0 && rq_reply_too_many_rcpts(o))) {
			s->too_many = true;
			s->rst[i] = R_NOT;
			t->rcpts[i].result = RQ_SMTP_RCPT_NOT_TRIED;
			memset(&t->rcpts[i].outcome, 0, sizeof(t->rcpts[i].outcome));
		} else {
			s->rst[i] = R_BAD;
			t->rcpts[i].result = RQ_SMTP_RCPT_FAILED;
			t->rcpts[i].outcome = *o;
			s->last_rcpt_fail = *o;
		}
		if (s->pipelined) {
			/* the next RCPT reply (timers restarted), or DATA's; with
			 * BDAT the chunks go now */
			if (s->bdat && s->ri >= s->nsend) {
				after_rcpts(s);
				return;
			}
			to_state(s, s->ri >= s->nsend ? RQ_SMTP_ST_DATA : RQ_SMTP_ST_RCPT);
			return;
		}
		if (s->too_many) {
			mark_rest_not_tried(s, s->ri);
			after_rcpts(s);
			return;
		}
		if (s->si < s->nsend) {
			to_state(s, RQ_SMTP_ST_RCPT);
			return;
		}
		after_rcpts(s);
		return;
	}

	case RQ_SMTP_ST_DATA:
		if (o->code == 354) {
			if (!s->mail_ok || s->accepted == 0) {
				/* pipelined and nothing to send: end the data at once */
				to_state(s, RQ_SMTP_ST_ABORT_DOT);
				return;
			}
			to_state(s, RQ_SMTP_ST_BODY);
			return;
		}
		if (!s->mail_ok) {
			txn_no_delivery(s, &s->mail_out);
			return;
		}
		if (s->accepted == 0) {
			txn_no_delivery(s, &s->last_rcpt_fail);
			return;
		}
		txn_no_delivery(s, o);
		return;

	case RQ_SMTP_ST_BODY:
		/*
		 * A reply before the end of the data: the server gave up on the
		 * message (e.g. 552 or 554 mid-body, then stops reading). It is
		 * the message's outcome; the connection cannot be reused (body
		 * bytes are still queued), so it is closed.
		 */
		if (r2(o)) {
			fail_here(s, RQ_FAIL_PROTOCOL, "%d reply before the end of the message data",
				  o->code);
			return;
		}
		conn_fail(s, o);
		return;

	case RQ_SMTP_ST_ABORT_DOT:
		txn_no_delivery(s, s->mail_ok ? &s->last_rcpt_fail : &s->mail_out);
		return;

	case RQ_SMTP_ST_BDAT:
		on_bdat_reply(s, o);
		return;

	case RQ_SMTP_ST_DOT:
		final_reply(s, o);
		return;

	case RQ_SMTP_ST_QUIT: {
		struct rq_outcome clean = *o;
		quit_over(s, CLOSE_CLEAN, &clean);
		return;
	}

	case RQ_SMTP_ST_READY:
		/* unsolicited: 421 on idle timeout / shutdown */
		if (o->code == 421) {
			conn_end(s, o);
			return;
		}
		fail_here(s, RQ_FAIL_PROTOCOL, "unexpected reply while idle: %d", o->code);
		return;

	default:
		fail_here(s, RQ_FAIL_PROTOCOL, "unexpected reply in state %s", state_names[s->st]);
		return;
	}
}

static bool expects_reply(enum rq_smtp_state st)
{
	switch (st) {
	case RQ_SMTP_ST_INIT:
	case RQ_SMTP_ST_CONNECTING:
	case RQ_SMTP_ST_TLS_IMPLICIT:
	case RQ_SMTP_ST_TLS:
	case RQ_SMTP_ST_CLOSED:
		return false;
	default:
		return true;
	}
}

/*
 * Bytes that were waiting in the input when a command went out: the server
 * sent them before it could have seen that command, so they answer nothing
 * we asked (outside a pipelined group, which goes out in one write before
 * any of its replies can come). Taking them for the next replies would
 * record words the server never said about this message: the connection is
 * dropped as a protocol error instead.
 */
static void fail_unsolicited(struct rq_smtp *s)
{
	size_t n = s->unsolicited_len;
	s->unsolicited = false;
	if (!s->bev || s->st == RQ_SMTP_ST_CLOSED)
		return;
	fail_here(s, RQ_FAIL_PROTOCOL,
		  "%zu bytes arrived before the command they would answer was sent "
		  "(unsolicited reply): connection dropped", n);
}

/* Reads complete reply lines, bounded, and dispatches complete replies. */
static void process_input(struct rq_smtp *s)
{
	char line[RQ_REPLY_LINE_MAX + 1];
	while (!s->dead && s->bev && expects_reply(s->st)) {
		if (s->unsolicited) {
			fail_unsolicited(s);
			return;
		}
		struct evbuffer *in = bufferevent_get_input(s->bev);
		size_t avail = evbuffer_get_length(in);
		if (avail == 0)
			return;
		size_t eol_len = 0;
		struct evbuffer_ptr p = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_CRLF);
		if (p.pos < 0) {
			if (avail > RQ_REPLY_LINE_MAX) {
				fail_here(s, RQ_FAIL_PROTOCOL,
					  "reply line longer than %d bytes", RQ_REPLY_LINE_MAX);
			}
			return;
		}
		if ((size_t)p.pos > RQ_REPLY_LINE_MAX) {
			fail_here(s, RQ_FAIL_PROTOCOL, "reply line longer than %d bytes",
				  RQ_REPLY_LINE_MAX);
			return;
		}
		size_t n = (size_t)p.pos;
		evbuffer_remove(in, line, n);
		evbuffer_drain(in, eol_len);
		line[n] = '\0';
		trace(s, '<', line, n);
		if (s->dead)
			return;
		if (s->st == RQ_SMTP_ST_EHLO)
			rq_smtp_caps_line(&s->caps, line, n);
		enum rq_reply_status r = rq_reply_parser_line(&s->rp, line, n);
		if (r == RQ_REPLY_ERROR) {
			char err[sizeof(s->rp.err)];
			memcpy(err, s->rp.err, sizeof(err));
			rq_reply_parser_init(&s->rp);
			fail_here(s, RQ_FAIL_PROTOCOL, "bad reply: %s", err);
			return;
		}
		if (r == RQ_REPLY_MORE)
			continue;
		struct rq_outcome o;
		rq_reply_parser_outcome(&s->rp, stage_of(s->st), &o);
		rq_reply_parser_init(&s->rp);
		on_reply(s, &o);
	}
}

/* ------------------------------------------------------------------------
 * libevent callbacks
 */

static void bev_read_cb(struct bufferevent *bev, void *arg)
{
	struct rq_smtp *s = arg;
	enter(s);
	/* bytes read never restart the timer: it bounds the whole reply */
	process_input(s);
	leave(s);
}

static void bev_write_cb(struct bufferevent *bev, void *arg)
{
	struct rq_smtp *s = arg;
	enter(s);
	if (s->st == RQ_SMTP_ST_BODY) {
		to_state(s, RQ_SMTP_ST_DOT);
		process_input(s); /* a reply may have arrived already */
	} else if (s->st == RQ_SMTP_ST_BDAT && s->bdat_writing) {
		bdat_drained(s);
		if (!s->dead)
			process_input(s);
	}
	leave(s);
}

static void bev_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct rq_smtp *s = arg;
	int err = EVUTIL_SOCKET_ERROR();
	enter(s);
	if (what & BEV_EVENT_CONNECTED) {
		if (s->st == RQ_SMTP_ST_CONNECTING) {
			/* Commands and the end of data are small writes that wait
			 * for a reply: Nagle's algorithm would hold them for the
			 * peer's delayed ACK. */
			int one = 1;
			evutil_socket_t fd = bufferevent_getfd(s->bev);
			if (fd >= 0)
				(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			if (s->o.tls == RQ_TLS_IMPLICIT && !s->plain_retry)
				tls_start(s, RQ_SMTP_ST_TLS_IMPLICIT);
			else
				to_state(s, RQ_SMTP_ST_GREETING);
		} else if (s->st == RQ_SMTP_ST_TLS_IMPLICIT) {
			tls_done(s);
			to_state(s, RQ_SMTP_ST_GREETING);
		} else if (s->st == RQ_SMTP_ST_TLS) {
			tls_done(s);
			to_state(s, RQ_SMTP_ST_EHLO);
		}
		if (!s->dead)
			process_input(s);
		goto out;
	}
	if (what & (BEV_EVENT_ERROR | BEV_EVENT_EOF)) {
		if (s->st == RQ_SMTP_ST_TLS || s->st == RQ_SMTP_ST_TLS_IMPLICIT) {
			unsigned long e = bufferevent_get_openssl_error(bev);
			tls_failed(s, e, (what & BEV_EVENT_EOF) ? "connection closed during the TLS handshake"
								: "TLS handshake failed");
			goto out;
		}
		if (s->st == RQ_SMTP_ST_CONNECTING) {
			fail_here(s, rq_fail_connect_errno(err), "connect to %s: %s", s->peer_addr,
				  err ? evutil_socket_error_to_string(err) : "failed");
			goto out;
		}
		/* a complete reply may still be in the buffer */
		process_input(s);
		if (s->dead || !s->bev)
			goto out;
		if (what & BEV_EVENT_EOF)
			fail_here(s, RQ_FAIL_LOST, "connection closed by %s", s->peer_addr);
		else
			fail_here(s, RQ_FAIL_LOST, "connection to %s lost: %s", s->peer_addr,
				  err ? evutil_socket_error_to_string(err) : "error");
		goto out;
	}
	if (what & BEV_EVENT_TIMEOUT)
		fail_here(s, RQ_FAIL_TIMEOUT, "timeout");
out:
	leave(s);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_smtp *s = arg;
	enter(s);
	if (s->st == RQ_SMTP_ST_READY) {
		if (!s->txn) {
			to_state(s, RQ_SMTP_ST_QUIT);
		}
	} else if (s->st == RQ_SMTP_ST_QUIT) {
		/* no reply to QUIT in time: close all the same, cleanly */
		struct rq_outcome clean;
		rq_outcome_set(&clean, RQ_STAGE_QUIT, RQ_FAIL_NONE, 0, NULL,
			       "no reply to QUIT within %d ms", s->timer_ms);
		quit_over(s, CLOSE_CLEAN, &clean);
	} else if (s->st == RQ_SMTP_ST_BODY || (s->st == RQ_SMTP_ST_BDAT && s->bdat_writing)) {
		fail_here(s, RQ_FAIL_TIMEOUT, "timeout: the message data made no progress for %d ms",
			  s->timer_ms);
	} else if (s->st != RQ_SMTP_ST_CLOSED && s->st != RQ_SMTP_ST_INIT) {
		fail_here(s, RQ_FAIL_TIMEOUT, "timeout: no complete reply within %d ms in state %s",
			  s->timer_ms, state_names[s->st]);
	}
	leave(s);
}

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_smtp *s = arg;
	enter(s);
	if (s->st == RQ_SMTP_ST_BODY || s->st == RQ_SMTP_ST_BDAT)
		fail_here(s, RQ_FAIL_TIMEOUT, "timeout: the message data took longer than %d ms",
			  s->o.data_total);
	leave(s);
}

static void host_start(struct rq_smtp *s)
{
	const struct rq_smtp_host *h = &s->hosts[s->hi];
	host_numeric(h, s->peer_addr, sizeof(s->peer_addr), true);
	host_numeric(h, s->peer_ip, sizeof(s->peer_ip), false);
	s->tls_active = s->tls_verified = s->authed = false;
	s->tls_info[0] = '\0';
	s->ntxn = 0;
	s->ending = false;
	rq_smtp_caps_reset(&s->caps);
	rq_reply_parser_init(&s->rp);
	s->bev = bufferevent_socket_new(s->base, -1, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (!s->bev) {
		to_state(s, RQ_SMTP_ST_CONNECTING);
		fail_here(s, RQ_FAIL_LOCAL, "cannot connect to %s: out of memory", s->peer_addr);
		return;
	}
	setup_bev(s);
	to_state(s, RQ_SMTP_ST_CONNECTING);
	if (bufferevent_socket_connect(s->bev, (const struct sockaddr *)&h->addr,
				       (int)h->addrlen) != 0) {
		/* socket() or connect() failed at once: EMFILE, ENFILE,
		 * ENOBUFS, ENOMEM are ours, not the peer's */
		int err = EVUTIL_SOCKET_ERROR();
		enum rq_fail f = rq_fail_connect_errno(err);
		fail_here(s, f, "%s %s: %s", f == RQ_FAIL_LOCAL ? "local: cannot connect to" : "connect to",
			  s->peer_addr, evutil_socket_error_to_string(err));
	}
}

static void kick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_smtp *s = arg;
	enter(s);
	run_state(s);
	leave(s);
}

/* Deferred work requested by API calls. */
static void run_state(struct rq_smtp *s)
{
	if (s->dead)
		return;
	if (s->st == RQ_SMTP_ST_INIT && s->connect_requested) {
		host_start(s);
		return;
	}
	if (s->st == RQ_SMTP_ST_READY)
		go_ready(s);
}

/* ------------------------------------------------------------------------
 * Public API
 */

static bool clean_str(const char *v)
{
	if (!v)
		return true;
	for (const unsigned char *p = (const unsigned char *)v; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			return false;
	return true;
}

void rq_smtp_destroy(struct rq_smtp *s)
{
	if (!s)
		return;
	if (s->depth > 0) {
		s->dead = true;
		close_bev(s, CLOSE_ABORT);
		txn_release(s);
		return;
	}
	really_free(s);
}

struct rq_smtp *rq_smtp_create(struct event_base *base, const struct rq_smtp_opts *opts,
			       const struct rq_smtp_callbacks *cbs, char *err, size_t errlen)
{
	struct rq_smtp *s = NULL;
	bool oom = false;
	if (!base || !opts || !opts->helo_name || !*opts->helo_name) {
		snprintf(err, errlen, "helo_name is required");
		goto fail;
	}
	if (!clean_str(opts->helo_name) || strchr(opts->helo_name, ' ') ||
	    strlen(opts->helo_name) > 255) {
		snprintf(err, errlen, "invalid helo_name");
		goto fail;
	}
	if (opts->tls != RQ_TLS_NONE && !opts->tls_ctx) {
		snprintf(err, errlen, "TLS mode %s needs a TLS context", rq_tls_mode_name(opts->tls));
		goto fail;
	}
	if ((int)opts->tls < 0 || opts->tls >= RQ_TLS_MODE_COUNT_) {
		snprintf(err, errlen, "invalid TLS mode");
		goto fail;
	}
	if (opts->auth_user && (!opts->auth_password || !*opts->auth_user ||
				strlen(opts->auth_user) > 255 || strlen(opts->auth_password) > 255)) {
		snprintf(err, errlen, "AUTH needs a user and a password (up to 255 bytes each)");
		goto fail;
	}
	if (!clean_str(opts->servername)) {
		snprintf(err, errlen, "invalid servername");
		goto fail;
	}
	s = calloc(1, sizeof(*s));
	if (!s) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	s->base = base;
	s->o = *opts;
	if (cbs)
		s->cb = *cbs;
	s->helo = rq_str_dup(opts->helo_name, &oom);
	s->servername = rq_str_dup(opts->servername, &oom);
	s->user = rq_str_dup(opts->auth_user, &oom);
	s->pass = opts->auth_user ? rq_str_dup(opts->auth_password, &oom) : NULL;
	s->log_id = rq_str_dup(opts->log_id ? opts->log_id : "", &oom);
	s->o.helo_name = s->o.servername = s->o.auth_user = s->o.auth_password = s->o.log_id = NULL;
	s->timer = evtimer_new(base, timer_cb, s);
	s->deadline = evtimer_new(base, deadline_cb, s);
	s->kick = event_new(base, -1, 0, kick_cb, s);
	if (oom || !s->timer || !s->deadline || !s->kick) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	s->st = RQ_SMTP_ST_INIT;
	rq_reply_parser_init(&s->rp);
	return s;
fail:
	if (s)
		really_free(s);
	return NULL;
}

int rq_smtp_connect(struct rq_smtp *s, const struct rq_smtp_host *hosts, size_t n)
{
	if (!s || s->connect_requested || !hosts || n == 0)
		return -1;
	for (size_t i = 0; i < n; i++) {
		sa_family_t f = hosts[i].addr.ss_family;
		if (!((f == AF_INET && hosts[i].addrlen == sizeof(struct sockaddr_in)) ||
		      (f == AF_INET6 && hosts[i].addrlen == sizeof(struct sockaddr_in6))))
			return -1;
	}
	s->hosts = calloc(n, sizeof(*hosts));
	if (!s->hosts)
		return -1;
	memcpy(s->hosts, hosts, n * sizeof(*hosts));
	for (size_t i = 0; i < n; i++)
		s->hosts[i].name[sizeof(s->hosts[i].name) - 1] = '\0';
	s->nhosts = n;
	s->hi = 0;
	s->connect_requested = true;
	host_numeric(&s->hosts[0], s->peer_addr, sizeof(s->peer_addr), true);
	event_active(s->kick, EV_TIMEOUT, 1);
	return 0;
}

int rq_smtp_send(struct rq_smtp *s, struct rq_smtp_txn *txn)
{
	if (!s || !txn || s->dead || !s->connect_requested || s->txn ||
	    s->st == RQ_SMTP_ST_CLOSED || s->st == RQ_SMTP_ST_QUIT || s->quit_requested)
		return -1;
	if ((txn->nrcpt && !txn->rcpts) || (txn->body_len && !txn->body) ||
	    (txn->from_len && !txn->from))
		return -1;
	if (!txn->from)
		txn->from = "";
	if (s->o.max_txns && s->ntxn >= s->o.max_txns)
		return -1;
	s->txn = txn;
	s->txn_running = false;
	memset(&txn->outcome, 0, sizeof(txn->outcome));
	txn->delivered = txn->failed = txn->not_tried = 0;
	txn->pipelined = false;
	txn->chunked = false;
	txn->chunks = 0;
	if (s->st == RQ_SMTP_ST_READY)
		event_active(s->kick, EV_TIMEOUT, 1);
	return 0;
}

void rq_smtp_quit(struct rq_smtp *s)
{
	if (!s || s->quit_requested || s->st == RQ_SMTP_ST_CLOSED)
		return;
	s->quit_requested = true;
	if (s->st == RQ_SMTP_ST_INIT && !s->connect_requested) {
		s->st = RQ_SMTP_ST_CLOSED;
		return;
	}
	if (s->st == RQ_SMTP_ST_READY)
		event_active(s->kick, EV_TIMEOUT, 1);
}

enum rq_smtp_state rq_smtp_state(const struct rq_smtp *s)
{
	return s->st;
}

const struct rq_smtp_caps *rq_smtp_caps(const struct rq_smtp *s)
{
	return &s->caps;
}

const char *rq_smtp_peer_name(const struct rq_smtp *s)
{
	if (s->nhosts && s->hosts[s->hi].name[0])
		return s->hosts[s->hi].name;
	return s->peer_addr;
}

const char *rq_smtp_peer_addr(const struct rq_smtp *s)
{
	return s->peer_addr;
}

size_t rq_smtp_host_index(const struct rq_smtp *s)
{
	return s->hi;
}

bool rq_smtp_reusable(const struct rq_smtp *s)
{
	return s->connect_requested && !s->dead && !s->txn && !s->quit_requested &&
	       s->st != RQ_SMTP_ST_QUIT && s->st != RQ_SMTP_ST_CLOSED &&
	       !(s->o.max_txns && s->ntxn >= s->o.max_txns);
}

unsigned rq_smtp_txn_count(const struct rq_smtp *s)
{
	return s->ntxn;
}

bool rq_smtp_tls_active(const struct rq_smtp *s)
{
	return s->tls_active;
}

bool rq_smtp_tls_verified(const struct rq_smtp *s)
{
	return s->tls_active && s->tls_verified;
}

const char *rq_smtp_tls_info(const struct rq_smtp *s)
{
	return s->tls_info;
}

bool rq_smtp_authenticated(const struct rq_smtp *s)
{
	return s->authed;
}

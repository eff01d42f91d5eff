/* The queue: the async Redis client of the relayq Functions (hiredis on
 * libevent): connections, setup, commands, wake-ups (see queue.h). */
#include "relayq/queue.h"

#include "relayq/clock.h"
#include "relayq/err.h"
#include "relayq/fnlib.h"
#include "relayq/json.h"
#include "relayq/keys.h"
#include "relayq/queue_codec.h"
#include "relayq/redis_url.h"
#include "relayq/secret.h"

#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

/*
 * Structure.
 *
 * A queue has two links (command, subscriber). Each connection attempt is a
 * heap `struct conn` owning one redisAsyncContext; the conn is freed only
 * where hiredis no longer calls back with it: in on_connect(REDIS_ERR), in
 * on_disconnect, or right after our own redisAsyncFree() outside hiredis
 * callbacks (sync_free). A drop requested from inside a hiredis reply
 * callback uses hiredis' own deferral (REDIS_IN_CALLBACK: redisAsyncFree
 * only flags, the context is freed after the callback returns, and
 * on_disconnect follows).
 *
 * Commands live in q->cmds in submit order. Replies come in order on one
 * connection, so the commands written on the current connection are always
 * a prefix of the list; q->unsent is the first one not written. When a
 * connection goes, hiredis calls every pending callback with NULL, the
 * commands are marked unsent and the whole list is written again after the
 * next setup. A command object that hiredis still holds when the queue is
 * destroyed becomes an orphan: its user callback has run (ECANCEL), and the
 * hiredis callback only frees it.
 *
 * User callbacks are called only from reply callbacks (where hiredis defers
 * frees), from our own timers, and from destroy; never from on_connect or
 * on_disconnect (a "down" notification goes through a zero timer).
 */

enum cmd_kind {
	CMD_CLAIM,
	CMD_SETTLE,
	CMD_COUNT,
	CMD_ENQUEUE,
	CMD_RAW,
};

struct cmd {
	TAILQ_ENTRY(cmd) entry;
	enum cmd_kind kind;
	char *buf;                  /* the RESP command (redisFormatCommandArgv) */
	size_t len;
	union {
		rq_queue_claim_cb *claim;
		rq_queue_settle_cb *settle;
		rq_queue_count_cb *count;
		rq_queue_enqueue_cb *enqueue;
		rq_queue_reply_cb *raw;
	} cb;
	void *arg;
	size_t nmsgs;               /* settle: messages in the batch */
	int64_t sent_ms;
	int notfound;               /* "Function not found" retries */
	bool sent;                  /* written on the current connection */
	bool orphan;                /* queue gone, callback done: free only */
};

TAILQ_HEAD(cmd_list, cmd);

enum link_kind {
	LINK_CMD,
	LINK_SUB,
};

struct link;

struct conn {
	struct rq_queue *q;         /* NULL once detached by destroy */
	struct link *link;
	redisAsyncContext *ac;
	bool connected;
	bool dropping;              /* redisAsyncFree requested */
	bool sync_free;             /* our caller frees the conn */
	bool gone;                  /* conn_gone ran */
	char reason[256];           /* why we dropped it */
};

struct link {
	struct rq_queue *q;
	enum link_kind kind;
	enum rq_queue_conn_state state;
	struct conn *conn;
	struct event *retry_ev;
	int backoff_ms;
	int64_t phase_ms;           /* start of CONNECTING / SETUP */
	struct event *ping_ev;      /* subscriber: liveness probe timer */
	int64_t ping_sent_ms;       /* subscriber: probe unanswered since, -1 */
	bool drop_pending;          /* drop at the next drop_ev */
};


struct rq_queue {
	struct event_base *base;
	struct link cmdl, subl;
	struct cmd_list cmds;
	struct cmd *unsent;         /* first command not written, NULL: none */
	size_t ncmds, ninflight;

	struct event *wd_ev;        /* watchdog */
	struct event *wake_ev;      /* earliest scheduled time */
	struct event *notify_ev;    /* deferred on_state(DOWN) */
	struct event *drop_ev;      /* deferred drops (from on_connect) */
	int64_t wake_deadline;      /* monotonic ms, -1: not armed */

	/* where */
	bool is_unix;
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char ip[INET6_ADDRSTRLEN];
	int port;
	int db;
	char *user;
	char *password;
	char *url_redacted;
	char prefix[RQ_KEYS_PREFIX_MAX];
	char channel[RQ_KEYS_PREFIX_MAX + 8];

	int timeout_ms, backoff_min, backoff_max;
	int sub_ping_ms;            /* <= 0: no liveness probe */
	void (*on_wake)(struct rq_queue *, enum rq_queue_wake, void *);
	void (*on_state)(struct rq_queue *, enum rq_queue_conn_state,
			 const char *, void *);
	void *arg;

	int depth;                  /* user callbacks running */
	bool destroying;
	bool destroy_requested;
	bool notify_pending;
	char notified_err[256];     /* last error given to on_state */
	char err[256];

	struct rq_queue_stats st;
};

static void destroy_now(struct rq_queue *q);
static void on_cmd_reply(redisAsyncContext *ac, void *reply, void *priv);
static void link_drop(struct link *l, const char *reason);
static void flush(struct rq_queue *q);
static void wd_arm(struct rq_queue *q);

/* ---- small helpers ---- */

/* Copies s into dst, replacing every occurrence of the password by ***. */
static void set_text(const struct rq_queue *q, char *dst, size_t dstlen, const char *s)
{
	size_t n = 0;
	size_t plen = q->password ? strlen(q->password) : 0;
	while (*s && n + 1 < dstlen) {
		if (plen > 0 && strncmp(s, q->password, plen) == 0) {
			for (const char *r = "***"; *r && n + 1 < dstlen; r++)
				dst[n++] = *r;
			s += plen;
			continue;
		}
		unsigned char ch = (unsigned char)*s++;
		dst[n++] = (ch < 0x20 || ch == 0x7f) ? ' ' : (char)ch;
	}
	dst[n] = '\0';
}

static void set_err(struct rq_queue *q, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void set_err(struct rq_queue *q, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	set_text(q, q->err, sizeof(q->err), buf);
}

/* Runs around every user callback. Returns false when the queue was
 * destroyed meanwhile: the caller must not touch q again. */
static void enter(struct rq_queue *q)
{
	q->depth++;
}

static bool leave(struct rq_queue *q)
{
	q->depth--;
	if (q->depth == 0 && q->destroy_requested && !q->destroying) {
		destroy_now(q);
		return false;
	}
	return true;
}

/* ---- replies kept past their callback ----
 *
 * hiredis frees a reply right after its callback returns. A claim hands the
 * reply to the caller instead of copying bodies: the command connection's
 * reader gets our object functions, whose freeObject skips the one reply
 * the claim callback just kept. */

static _Thread_local void *kept_reply;
static redisReplyObjectFunctions keep_fns;
static pthread_once_t keep_once = PTHREAD_ONCE_INIT;

static void free_unless_kept(void *reply)
{
	if (reply != NULL && reply == kept_reply) {
		kept_reply = NULL;
		return;
	}
	freeReplyObject(reply);
}

static void keep_fns_init(void)
{
	redisReader *r = redisReaderCreate();
	if (!r)
		abort();
	keep_fns = *r->fn;
	keep_fns.freeObject = free_unless_kept;
	redisReaderFree(r);
}


static int resolve_host(struct rq_queue *q, const char *host, char *err, size_t errlen)
{
	unsigned char buf[sizeof(struct in6_addr)];
	if (inet_pton(AF_INET, host, buf) == 1)
		return inet_ntop(AF_INET, buf, q->ip, sizeof(q->ip)) ? 0 : -1;
	if (inet_pton(AF_INET6, host, buf) == 1)
		return inet_ntop(AF_INET6, buf, q->ip, sizeof(q->ip)) ? 0 : -1;
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
	struct addrinfo *res = NULL;
	int rc = getaddrinfo(host, NULL, &hints, &res);
	if (rc != 0 || !res) {
		rq_err_set(err, errlen, "redis host %s: %s", host, rc ? gai_strerror(rc) : "no address");
		return -1;
	}
	const void *addr = res->ai_family == AF_INET6
		? (const void *)&((struct sockaddr_in6 *)res->ai_addr)->sin6_addr
		: (const void *)&((struct sockaddr_in *)res->ai_addr)->sin_addr;
	if (!inet_ntop(res->ai_family, addr, q->ip, sizeof(q->ip))) {
		freeaddrinfo(res);
		rq_err_set(err, errlen, "redis host %s: cannot print its address", host);
		return -1;
	}
	freeaddrinfo(res);
	return 0;
}

/* ---- connections ---- */

static void on_connect(const redisAsyncContext *ac, int status);
static void on_disconnect(const redisAsyncContext *ac, int status);

static void arm_retry(struct link *l)
{
	struct rq_queue *q = l->q;
	int b = l->backoff_ms;
	/* jitter: 80 % .. 120 % */
	int64_t delay = (int64_t)b * (80 + random() % 41) / 100;
	struct timeval tv = rq_clock_tv(delay);
	evtimer_add(l->retry_ev, &tv);
	l->backoff_ms = b * 2 > q->backoff_max ? q->backoff_max : b * 2;
}

static void notify_down(struct rq_queue *q)
{
	if (!q->on_state || q->destroying)
		return;
	q->notify_pending = true;
	struct timeval tv = {0, 0};
	evtimer_add(q->notify_ev, &tv);
}

/* Delivers a pending DOWN notification; false when the queue is gone. */
static bool notify_flush(struct rq_queue *q)
{
	if (!q->notify_pending)
		return true;
	q->notify_pending = false;
	evtimer_del(q->notify_ev);
	if (q->cmdl.state == RQ_QUEUE_READY || strcmp(q->notified_err, q->err) == 0)
		return true;
	snprintf(q->notified_err, sizeof(q->notified_err), "%s", q->err);
	enter(q);
	q->on_state(q, RQ_QUEUE_DOWN, q->err, q->arg);
	return leave(q);
}

static void notify_cb(evutil_socket_t fd, short what, void *arg)
{
	notify_flush(arg);
}

/* The connection of a link is over (hiredis is done with it or about to be):
 * requeue its commands and plan the reconnect. Runs once per conn. */
static void conn_gone(struct conn *cn, const char *reason)
{
	if (cn->gone)
		return;
	cn->gone = true;
	struct rq_queue *q = cn->q;
	if (!q)
		return;
	struct link *l = cn->link;
	if (l->conn == cn)
		l->conn = NULL;
	l->drop_pending = false;   /* it was for this connection */
	if (cn->connected)
		q->st.disconnects++;
	l->state = RQ_QUEUE_DOWN;
	if (cn->reason[0])
		reason = cn->reason;
	if (l->kind == LINK_CMD) {
		struct cmd *c;
		TAILQ_FOREACH(c, &q->cmds, entry)
			c->sent = false;
		q->unsent = TAILQ_FIRST(&q->cmds);
		q->ninflight = 0;
		set_err(q, "%s", reason);
		notify_down(q);
	} else {
		q->st.subscribed = false;
		l->ping_sent_ms = -1;
		if (l->ping_ev)
			evtimer_del(l->ping_ev);
		if (!q->err[0])
			set_err(q, "%s", reason);
	}
	if (!q->destroying)
		arm_retry(l);
	wd_arm(q);
}

static void link_connect(struct link *l)
{
	struct rq_queue *q = l->q;
	struct conn *cn = calloc(1, sizeof(*cn));
	redisAsyncContext *ac = NULL;

	if (!cn) {
		set_err(q, "redis connect: out of memory");
		goto fail;
	}
	cn->q = q;
	cn->link = l;
	ac = q->is_unix ? redisAsyncConnectUnix(q->path) : redisAsyncConnect(q->ip, q->port);
	if (!ac) {
		set_err(q, "redis connect %s: out of memory", q->url_redacted);
		goto fail;
	}
	if (ac->err) {
		set_err(q, "redis connect %s: %s", q->url_redacted, ac->errstr);
		redisAsyncFree(ac);
		goto fail;
	}
	if (!q->is_unix)
		redisEnableKeepAlive(&ac->c);
	if (l->kind == LINK_CMD) {
		pthread_once(&keep_once, keep_fns_init);
		ac->c.reader->fn = &keep_fns;
	}
	ac->data = cn;
	cn->ac = ac;
	if (redisLibeventAttach(ac, q->base) != REDIS_OK) {
		set_err(q, "redis connect: cannot attach to the event base");
		redisAsyncFree(ac);
		goto fail;
	}
	redisAsyncSetConnectCallback(ac, on_connect);
	redisAsyncSetDisconnectCallback(ac, on_disconnect);
	l->conn = cn;
	l->state = RQ_QUEUE_CONNECTING;
	l->phase_ms = rq_clock_mono_ms();
	wd_arm(q);
	return;
fail:
	free(cn);
	l->state = RQ_QUEUE_DOWN;
	if (l->kind == LINK_CMD)
		notify_down(q);
	arm_retry(l);
}

static void retry_cb(evutil_socket_t fd, short what, void *arg)
{
	struct link *l = arg;
	if (l->conn || l->q->destroying)
		return;
	link_connect(l);
}

/* Drops the link's connection now (from a timer or API call) or as soon as
 * the running hiredis callback returns. Commands in flight are retried. */
static void link_drop(struct link *l, const char *reason)
{
	struct conn *cn = l->conn;
	if (!cn || cn->dropping)
		return;
	cn->dropping = true;
	if (reason && !cn->reason[0])
		set_text(l->q, cn->reason, sizeof(cn->reason), reason);
	l->state = RQ_QUEUE_DOWN;
	redisAsyncContext *ac = cn->ac;
	if (ac->c.flags & REDIS_IN_CALLBACK) {
		redisAsyncFree(ac);   /* hiredis frees after the callback */
		return;
	}
	cn->sync_free = true;
	redisAsyncFree(ac);
	conn_gone(cn, cn->reason[0] ? cn->reason : "dropped");
	free(cn);
}

static void drop_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_queue *q = arg;
	struct link *ls[2] = {&q->cmdl, &q->subl};
	for (int i = 0; i < 2; i++) {
		if (ls[i]->drop_pending) {
			ls[i]->drop_pending = false;
			link_drop(ls[i], NULL);
		}
	}
}

static void drop_later(struct link *l, const char *reason)
{
	struct rq_queue *q = l->q;
	if (l->conn && !l->conn->reason[0])
		set_text(q, l->conn->reason, sizeof(l->conn->reason), reason);
	l->drop_pending = true;
	struct timeval tv = {0, 0};
	evtimer_add(q->drop_ev, &tv);
}

/* ---- watchdog ---- */

static int64_t link_deadline(const struct link *l, const struct rq_queue *q)
{
	if (l->conn && !l->conn->dropping &&
	    (l->state == RQ_QUEUE_CONNECTING || l->state == RQ_QUEUE_SETUP))
		return l->phase_ms + q->timeout_ms;
	if (l->kind == LINK_CMD && l->state == RQ_QUEUE_READY) {
		struct cmd *c = TAILQ_FIRST(&q->cmds);
		if (c && c->sent)
			return c->sent_ms + q->timeout_ms;
	}
	if (l->kind == LINK_SUB && l->state == RQ_QUEUE_READY && l->conn &&
	    !l->conn->dropping && l->ping_sent_ms >= 0)
		return l->ping_sent_ms + q->timeout_ms;
	return -1;
}

static void wd_arm(struct rq_queue *q)
{
	if (q->destroying || evtimer_pending(q->wd_ev, NULL))
		return;
	int64_t a = link_deadline(&q->cmdl, q), b = link_deadline(&q->subl, q);
	int64_t d = a < 0 ? b : (b < 0 || a < b ? a : b);
	if (d < 0)
		return;
	struct timeval tv = rq_clock_tv(d - rq_clock_mono_ms());
	evtimer_add(q->wd_ev, &tv);
}

static void wd_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_queue *q = arg;
	int64_t now = rq_clock_mono_ms();
	struct link *ls[2] = {&q->cmdl, &q->subl};
	for (int i = 0; i < 2; i++) {
		int64_t d = link_deadline(ls[i], q);
		if (d >= 0 && d <= now) {
			char why[128];
			snprintf(why, sizeof(why), "redis %s timed out after %d ms",
				 ls[i]->state == RQ_QUEUE_READY ?
				 (ls[i]->kind == LINK_SUB ? "subscriber ping" : "command") :
				 ls[i]->state == RQ_QUEUE_SETUP ? "connection setup" : "connect",
				 q->timeout_ms);
			q->st.watchdog_drops++;
			link_drop(ls[i], why);
		}
	}
	wd_arm(q);
}

/* ---- command connection setup ---- */

static bool is_transient(const char *s, bool *notfound)
{
	/* "BUSY " with its space: BUSYKEY and BUSYGROUP are not transient */
	static const char *const prefixes[] = {"LOADING ", "BUSY ", "NOAUTH ",
					       "READONLY ", "MASTERDOWN ", "TRYAGAIN ",
					       "CLUSTERDOWN "};
	*notfound = false;
	for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++)
		if (strncmp(s, prefixes[i], strlen(prefixes[i])) == 0)
			return true;
	if (strstr(s, "Function not found")) {
		*notfound = true;
		return true;
	}
	return false;
}

/* The queue of a reply's connection, or NULL when there is no reply
 * or the connection is going away (nothing to do then). */
static struct rq_queue *live_reply(redisAsyncContext *ac, const redisReply *r,
				   struct conn **out)
{
	struct conn *cn = ac->data;
	*out = cn;
	if (!r || !cn || !cn->q || cn->dropping)
		return NULL;
	return cn->q;
}

static void link_ready(struct rq_queue *q)
{
	struct link *l = &q->cmdl;
	l->state = RQ_QUEUE_READY;
	l->backoff_ms = q->backoff_min;
	q->st.connects++;
	q->err[0] = '\0';
	q->notified_err[0] = '\0';
	flush(q);
	wd_arm(q);
	if (!notify_flush(q))
		return;
	if (q->on_state) {
		enter(q);
		q->on_state(q, RQ_QUEUE_READY, NULL, q->arg);
		leave(q);
	}
}

static void setup_fail(struct rq_queue *q, struct link *l, const char *what,
		       const redisReply *r)
{
	char buf[400];
	snprintf(buf, sizeof(buf), "redis %s failed: %.300s", what,
		 r && (r->type == REDIS_REPLY_ERROR || r->type == REDIS_REPLY_STATUS) && r->str
		 ? r->str : "unexpected reply");
	if (l->kind == LINK_CMD || !q->err[0])
		set_err(q, "%s", buf);
	link_drop(l, buf);
}

static void on_setup_reply(redisAsyncContext *ac, void *reply, void *priv)
{
	struct conn *cn;
	redisReply *r = reply;
	struct rq_queue *q = live_reply(ac, r, &cn);
	if (q && r->type == REDIS_REPLY_ERROR)
		setup_fail(q, cn->link, priv, r);
}

static void on_load(redisAsyncContext *ac, void *reply, void *priv)
{
	struct conn *cn;
	redisReply *r = reply;
	struct rq_queue *q = live_reply(ac, r, &cn);
	if (!q)
		return;
	if (r->type == REDIS_REPLY_ERROR) {
		setup_fail(q, cn->link, "FUNCTION LOAD of the relayq library", r);
		return;
	}
	q->st.library_loads++;
	link_ready(q);
}

static void on_version(redisAsyncContext *ac, void *reply, void *priv)
{
	struct conn *cn;
	redisReply *r = reply;
	struct rq_queue *q = live_reply(ac, r, &cn);
	if (!q)
		return;
	switch (rq_queue_version_check(r, rq_fnlib_version())) {
	case RQ_QUEUE_VERSION_OK:
		link_ready(q);
		return;
	case RQ_QUEUE_VERSION_ERROR:
		setup_fail(q, cn->link, "FCALL relayq_version", r);
		return;
	case RQ_QUEUE_VERSION_LOAD:
		break;
	}
	if (redisAsyncCommand(ac, on_load, NULL, "FUNCTION LOAD REPLACE %b",
			      rq_fnlib_source, rq_fnlib_source_len) != REDIS_OK)
		setup_fail(q, cn->link, "FUNCTION LOAD of the relayq library", NULL);
}

/* AUTH, formatted in a buffer of ours that is wiped after hiredis copied
 * it (hiredis' own output buffer we cannot wipe: see queue.h). */
static int send_auth(struct rq_queue *q, redisAsyncContext *ac, redisCallbackFn *fn, void *priv)
{
	if (!q->password)
		return REDIS_OK;
	const char *argv[3] = {"AUTH"};
	int argc = 1;
	if (q->user)
		argv[argc++] = q->user;
	argv[argc++] = q->password;
	char *buf = NULL;
	int len = redisFormatCommandArgv(&buf, argc, argv, NULL);
	if (len < 0)
		return REDIS_ERR;
	int rc = redisAsyncFormattedCommand(ac, fn, priv, buf, (size_t)len);
	explicit_bzero(buf, (size_t)len);
	redisFreeCommand(buf);
	return rc;
}

static void on_sub(redisAsyncContext *ac, void *reply, void *priv);

static void on_connect(const redisAsyncContext *cac, int status)
{
	redisAsyncContext *ac = (redisAsyncContext *)cac;
	struct conn *cn = ac->data;
	struct rq_queue *q = cn->q;
	if (status != REDIS_OK) {
		/* hiredis frees the context after this returns */
		char why[300];
		snprintf(why, sizeof(why), "redis connect %s: %s",
			 q ? q->url_redacted : "", ac->c.errstr[0] ? ac->c.errstr : "failed");
		conn_gone(cn, why);
		free(cn);
		return;
	}
	cn->connected = true;
	if (!q)
		return;
	struct link *l = cn->link;
	l->state = RQ_QUEUE_SETUP;
	l->phase_ms = rq_clock_mono_ms();
	int rc = send_auth(q, ac, on_setup_reply, "AUTH");
	if (l->kind == LINK_CMD) {
		if (rc == REDIS_OK && q->db != 0)
			rc = redisAsyncCommand(ac, on_setup_reply, "SELECT", "SELECT %d", q->db);
		if (rc == REDIS_OK)
			rc = redisAsyncCommand(ac, on_version, NULL, "FCALL relayq_version 0");
	} else if (rc == REDIS_OK) {
		rc = redisAsyncCommand(ac, on_sub, NULL, "SUBSCRIBE %s", q->channel);
	}
	if (rc != REDIS_OK)
		drop_later(l, "redis: cannot send the connection setup");
}

static void on_disconnect(const redisAsyncContext *cac, int status)
{
	redisAsyncContext *ac = (redisAsyncContext *)cac;
	struct conn *cn = ac->data;
	char why[300];
	snprintf(why, sizeof(why), "redis connection lost: %s",
		 ac->c.err && ac->c.errstr[0] ? ac->c.errstr : "closed");
	conn_gone(cn, why);
	if (!cn->sync_free)
		free(cn);
}

/* ---- subscriber ---- */

static void wake(struct rq_queue *q, enum rq_queue_wake why)
{
	q->st.wakes++;
	if (!q->on_wake)
		return;
	enter(q);
	q->on_wake(q, why, q->arg);
	leave(q);
}

static void ping_arm(struct rq_queue *q)
{
	if (q->sub_ping_ms <= 0 || !q->subl.ping_ev)
		return;
	struct timeval tv = rq_clock_tv(q->sub_ping_ms);
	evtimer_add(q->subl.ping_ev, &tv);
}

/* The liveness probe of the subscriber connection. Not a PING: hiredis 0.14
 * hands the reply of a PING sent in subscribed mode to no callback. A
 * SUBSCRIBE of the channel we are on changes nothing in Redis and its
 * answer comes back to on_sub. */
static void ping_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_queue *q = arg;
	struct link *l = &q->subl;
	if (q->destroying || l->state != RQ_QUEUE_READY || !l->conn || l->conn->dropping)
		return;
	if (l->ping_sent_ms < 0) {
		if (redisAsyncCommand(l->conn->ac, on_sub, NULL, "SUBSCRIBE %s",
				      q->channel) != REDIS_OK) {
			drop_later(l, "redis: cannot send the subscriber ping");
			return;
		}
		l->ping_sent_ms = rq_clock_mono_ms();
		q->st.sub_pings++;
		evtimer_del(q->wd_ev);
		wd_arm(q);
	}
	ping_arm(q);
}

static void on_sub(redisAsyncContext *ac, void *reply, void *priv)
{
	struct conn *cn;
	redisReply *r = reply;
	struct rq_queue *q = live_reply(ac, r, &cn);
	if (!q)
		return;
	q->subl.ping_sent_ms = -1;   /* anything heard: the link is alive */
	if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 ||
	    r->element[0]->type != REDIS_REPLY_STRING) {
		if (r->type == REDIS_REPLY_ERROR)
			set_err(q, "redis SUBSCRIBE failed: %.300s", r->str);
		return;
	}
	const char *type = r->element[0]->str;
	if (strcmp(type, "subscribe") == 0) {
		if (q->subl.state == RQ_QUEUE_READY)
			return;   /* the answer to a liveness probe */
		q->subl.state = RQ_QUEUE_READY;
		ping_arm(q);
		q->subl.backoff_ms = q->backoff_min;
		q->st.subscribed = true;
		wake(q, RQ_QUEUE_WAKE_CONNECT);
	} else if (strcmp(type, "message") == 0) {
		wake(q, RQ_QUEUE_WAKE_PUBLISH);
	}
}

/* ---- wake timer ---- */

static void wake_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_queue *q = arg;
	q->wake_deadline = -1;
	wake(q, RQ_QUEUE_WAKE_TIMER);
}

void rq_queue_wake_at(struct rq_queue *q, int64_t delay_ms)
{
	if (q->destroying)
		return;
	if (delay_ms < 0)
		delay_ms = 0;
	if (delay_ms > INT64_C(1) << 40)
		delay_ms = INT64_C(1) << 40;
	int64_t d = rq_clock_mono_ms() + delay_ms;
	if (q->wake_deadline >= 0 && q->wake_deadline <= d)
		return;
	q->wake_deadline = d;
	struct timeval tv = rq_clock_tv(delay_ms);
	evtimer_add(q->wake_ev, &tv);
}

int64_t rq_queue_wake_in(const struct rq_queue *q)
{
	if (q->wake_deadline < 0)
		return -1;
	int64_t d = q->wake_deadline - rq_clock_mono_ms();
	return d < 0 ? 0 : d;
}

/* ---- commands ---- */

static void cmd_free(struct cmd *c)
{
	if (!c)
		return;
	redisFreeCommand(c->buf);
	free(c);
}

static void flush(struct rq_queue *q)
{
	struct link *l = &q->cmdl;
	if (l->state != RQ_QUEUE_READY || !l->conn)
		return;
	int64_t now = rq_clock_mono_ms();
	while (q->unsent) {
		struct cmd *c = q->unsent;
		if (redisAsyncFormattedCommand(l->conn->ac, on_cmd_reply, c, c->buf, c->len) != REDIS_OK) {
			drop_later(l, "redis: cannot write a command");
			return;
		}
		c->sent = true;
		c->sent_ms = now;
		q->ninflight++;
		q->st.sent++;
		q->unsent = TAILQ_NEXT(c, entry);
	}
	wd_arm(q);
}

static struct cmd *cmd_new(struct rq_queue *q, enum cmd_kind kind, int argc,
			   const char **argv, const size_t *lens)
{
	if (!q || q->destroying || q->destroy_requested)
		return NULL;
	struct cmd *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->kind = kind;
	int n = redisFormatCommandArgv(&c->buf, argc, argv, lens);
	if (n < 0) {
		free(c);
		return NULL;
	}
	c->len = (size_t)n;
	return c;
}

static void cmd_submit(struct rq_queue *q, struct cmd *c)
{
	TAILQ_INSERT_TAIL(&q->cmds, c, entry);
	q->ncmds++;
	if (!q->unsent)
		q->unsent = c;
	flush(q);
}

/* Calls the command's callback with status st (reply NULL unless OK /
 * EREDIS); c stays the caller's. Returns false when the queue was destroyed
 * meanwhile. */
static bool cmd_finish(struct rq_queue *q, struct cmd *c, enum rq_queue_status st,
		       const char *err, redisReply *r)
{
	enter(q);
	switch (c->kind) {
	case CMD_CLAIM: {
		struct rq_queue_claim *claim = NULL;
		if (st == RQ_QUEUE_OK) {
			const char *why = NULL;
			claim = rq_queue_claim_parse(r, &why);
			if (!claim) {
				st = RQ_QUEUE_EPROTO;
				err = why;
			} else {
				kept_reply = r;
				/* +1: Redis and our clock round to ms apart */
				if (claim->next_due >= 0)
					rq_queue_wake_at(q, claim->next_due - claim->now + 1);
			}
		}
		if (c->cb.claim)
			c->cb.claim(q, st, err, claim, c->arg);
		else
			rq_queue_claim_free(claim);
		break;
	}
	case CMD_SETTLE: {
		enum rq_queue_settled small[64], *res = NULL;
		if (st == RQ_QUEUE_OK) {
			res = c->nmsgs <= 64 ? small : calloc(c->nmsgs, sizeof(*res));
			if (!res) {
				st = RQ_QUEUE_EPROTO;
				err = "relayq_settle: out of memory";
			} else if (rq_queue_settle_parse(r, c->nmsgs, res) != 0) {
				st = RQ_QUEUE_EPROTO;
				err = "relayq_settle: reply is not one status per message";
			}
		}
		if (c->cb.settle)
			c->cb.settle(q, st, err, st == RQ_QUEUE_OK ? res : NULL,
				     st == RQ_QUEUE_OK ? c->nmsgs : 0, c->arg);
		if (res != small)
			free(res);
		break;
	}
	case CMD_COUNT: {
		int64_t n = 0;
		if (st == RQ_QUEUE_OK && !rq_queue_reply_int(r, &n)) {
			st = RQ_QUEUE_EPROTO;
			err = "reply is not an integer";
		}
		if (c->cb.count)
			c->cb.count(q, st, err, (long long)n, c->arg);
		break;
	}
	case CMD_ENQUEUE: {
		char id[RQ_QUEUE_ID_MAX + 1] = "";
		if (st == RQ_QUEUE_OK) {
			if (!rq_queue_reply_id(r, id, sizeof(id))) {
				st = RQ_QUEUE_EPROTO;
				err = "relayq_enqueue: reply is not a message id";
			}
		}
		if (c->cb.enqueue)
			c->cb.enqueue(q, st, err, st == RQ_QUEUE_OK ? id : NULL, c->arg);
		break;
	}
	case CMD_RAW:
		if (c->cb.raw)
			c->cb.raw(q, st, err, r, c->arg);
		break;
	}
	return leave(q);
}

static void on_cmd_reply(redisAsyncContext *ac, void *reply, void *priv)
{
	struct cmd *c = priv;
	struct conn *cn = ac->data;
	redisReply *r = reply;
	if (c->orphan) {
		cmd_free(c);
		return;
	}
	struct rq_queue *q = cn->q;
	if (!r || !q || cn->dropping) {
		/* connection going: the command is sent again later */
		if (c->sent && q) {
			c->sent = false;
			q->st.retried++;
			if (q->ninflight > 0)
				q->ninflight--;
		}
		return;
	}
	bool notfound = false;
	if (r->type == REDIS_REPLY_ERROR && r->str && is_transient(r->str, &notfound) &&
	    (!notfound || c->notfound++ < 3)) {
		char why[400];
		snprintf(why, sizeof(why), "redis: %.300s (will retry)", r->str);
		c->sent = false;
		q->ninflight--;
		q->st.retried++;
		link_drop(&q->cmdl, why);
		return;
	}
	TAILQ_REMOVE(&q->cmds, c, entry);
	q->ncmds--;
	q->ninflight--;
	bool more = TAILQ_FIRST(&q->cmds) && TAILQ_FIRST(&q->cmds)->sent;
	if (more && !evtimer_pending(q->wd_ev, NULL))
		wd_arm(q);
	if (r->type == REDIS_REPLY_ERROR)
		cmd_finish(q, c, RQ_QUEUE_EREDIS, r->str, r);
	else
		cmd_finish(q, c, RQ_QUEUE_OK, NULL, r);
	cmd_free(c);
}

int rq_queue_claim(struct rq_queue *q, int count, int64_t lease_ms,
		   rq_queue_claim_cb *cb, void *arg)
{
	char cnt[24], lease[24];
	if (!q || count <= 0 || lease_ms <= 0)
		return -1;
	snprintf(cnt, sizeof(cnt), "%d", count);
	snprintf(lease, sizeof(lease), "%" PRId64, lease_ms);
	const char *argv[] = {"FCALL", "relayq_claim", "1", q->prefix, cnt, lease};
	struct cmd *c = cmd_new(q, CMD_CLAIM, 6, argv, NULL);
	if (!c)
		return -1;
	c->cb.claim = cb;
	c->arg = arg;
	cmd_submit(q, c);
	return 0;
}

int rq_queue_settle_json(struct rq_queue *q, const char *json, size_t len,
			 size_t nmsgs, rq_queue_settle_cb *cb, void *arg)
{
	if (!q || !json || nmsgs == 0)
		return -1;
	const char *argv[] = {"FCALL", "relayq_settle", "1", q->prefix, json};
	size_t lens[] = {5, 13, 1, strlen(q->prefix), len};
	struct cmd *c = cmd_new(q, CMD_SETTLE, 5, argv, lens);
	if (!c)
		return -1;
	c->cb.settle = cb;
	c->arg = arg;
	c->nmsgs = nmsgs;
	cmd_submit(q, c);
	return 0;
}

int rq_queue_settle(struct rq_queue *q, struct rq_queue_outcomes *o,
		    rq_queue_settle_cb *cb, void *arg)
{
	size_t len;
	if (!q || !o)
		return -1;
	const char *json = rq_queue_outcomes_json(o, &len);
	if (!json)
		return -1;
	return rq_queue_settle_json(q, json, len, o->nmsgs, cb, arg);
}

int rq_queue_renew(struct rq_queue *q, int64_t lease_ms,
		   const struct rq_queue_lease *leases, size_t n,
		   rq_queue_count_cb *cb, void *arg)
{
	if (!q || n == 0 || lease_ms <= 0 || n > 100000)
		return -1;
	size_t argc = 5 + 2 * n;
	const char **argv = calloc(argc, sizeof(*argv));
	char *nums = calloc(n + 1, 24);
	struct cmd *c = NULL;
	int rc = -1;
	if (!argv || !nums)
		goto cleanup;
	argv[0] = "FCALL";
	argv[1] = "relayq_renew";
	argv[2] = "1";
	argv[3] = q->prefix;
	snprintf(nums, 24, "%" PRId64, lease_ms);
	argv[4] = nums;
	for (size_t i = 0; i < n; i++) {
		if (!leases[i].id)
			goto cleanup;
		argv[5 + 2 * i] = leases[i].id;
		snprintf(nums + 24 * (i + 1), 24, "%" PRId64, leases[i].lease);
		argv[6 + 2 * i] = nums + 24 * (i + 1);
	}
	c = cmd_new(q, CMD_COUNT, (int)argc, argv, NULL);
	if (!c)
		goto cleanup;
	c->cb.count = cb;
	c->arg = arg;
	cmd_submit(q, c);
	rc = 0;
cleanup:
	free(argv);
	free(nums);
	return rc;
}

int rq_queue_recover(struct rq_queue *q, rq_queue_count_cb *cb, void *arg)
{
	if (!q)
		return -1;
	const char *argv[] = {"FCALL", "relayq_recover", "1", q->prefix};
	struct cmd *c = cmd_new(q, CMD_COUNT, 4, argv, NULL);
	if (!c)
		return -1;
	c->cb.count = cb;
	c->arg = arg;
	cmd_submit(q, c);
	return 0;
}

int rq_queue_enqueue(struct rq_queue *q, const struct rq_queue_enqueue_req *req,
		     rq_queue_enqueue_cb *cb, void *arg)
{
	struct rq_json_buf env;
	int rc = -1;
	if (!q || !req || !req->body)
		return -1;
	rq_json_buf_init(&env);
	if (rq_queue_enqueue_envelope(req, &env) != 0)
		goto cleanup;
	const char *argv[] = {"FCALL", "relayq_enqueue", "1", q->prefix, env.data, req->body};
	size_t lens[] = {5, 14, 1, strlen(q->prefix), env.len, req->body_len};
	struct cmd *c = cmd_new(q, CMD_ENQUEUE, 6, argv, lens);
	if (!c)
		goto cleanup;
	c->cb.enqueue = cb;
	c->arg = arg;
	cmd_submit(q, c);
	rc = 0;
cleanup:
	rq_json_buf_finish(&env);
	return rc;
}

int rq_queue_command(struct rq_queue *q, int argc, const char **argv,
		     const size_t *argvlen, rq_queue_reply_cb *cb, void *arg)
{
	if (!q || argc <= 0 || !argv)
		return -1;
	struct cmd *c = cmd_new(q, CMD_RAW, argc, argv, argvlen);
	if (!c)
		return -1;
	c->cb.raw = cb;
	c->arg = arg;
	cmd_submit(q, c);
	return 0;
}

/* ---- lifecycle ---- */

void rq_queue_destroy(struct rq_queue *q)
{
	if (!q || q->destroying)
		return;
	if (q->depth > 0) {
		q->destroy_requested = true;
		return;
	}
	destroy_now(q);
}

struct rq_queue *rq_queue_create(struct event_base *base,
				 const struct rq_queue_opts *opts,
				 char *err, size_t errlen)
{
	struct rq_queue *q = NULL;
	char red[512];
	struct rq_redis_url u;

	memset(&u, 0, sizeof(u));

	if (!base || !opts || !opts->url) {
		rq_err_set(err, errlen, "redis URL missing");
		goto fail;
	}
	if (!opts->queue || !rq_keys_queue_valid(opts->queue, strlen(opts->queue))) {
		rq_err_set(err, errlen, "invalid queue name (use " RQ_KEYS_QUEUE_RULE ")");
		goto fail;
	}
	q = calloc(1, sizeof(*q));
	if (!q) {
		rq_err_set(err, errlen, "out of memory");
		goto fail;
	}
	q->base = base;
	TAILQ_INIT(&q->cmds);
	q->wake_deadline = -1;
	q->timeout_ms = opts->cmd_timeout_ms > 0 ? opts->cmd_timeout_ms : RQ_QUEUE_TIMEOUT_DEFAULT_MS;
	q->backoff_min = opts->backoff_min_ms > 0 ? opts->backoff_min_ms : RQ_QUEUE_BACKOFF_MIN_DEFAULT_MS;
	q->backoff_max = opts->backoff_max_ms > 0 ? opts->backoff_max_ms : RQ_QUEUE_BACKOFF_MAX_DEFAULT_MS;
	if (q->backoff_max < q->backoff_min)
		q->backoff_max = q->backoff_min;
	q->on_wake = opts->on_wake;
	q->on_state = opts->on_state;
	q->arg = opts->arg;
	rq_keys_prefix(opts->queue, q->prefix, sizeof(q->prefix));
	snprintf(q->channel, sizeof(q->channel), "relayq:{%s}:wake", opts->queue);

	rq_redis_url_redact(opts->url, red, sizeof(red));
	q->url_redacted = strdup(red);
	if (!q->url_redacted) {
		rq_err_set(err, errlen, "out of memory");
		goto fail;
	}
	if (rq_redis_url_parse(opts->url, &u, err, errlen) != 0)
		goto fail;
	q->db = u.db;
	if (u.is_unix) {
		q->is_unix = true;
		snprintf(q->path, sizeof(q->path), "%s", u.path);
	} else {
		q->port = u.port;
		if (resolve_host(q, u.host, err, errlen) != 0)
			goto fail;
	}
	if (u.user[0] && !(q->user = strdup(u.user))) {
		rq_err_set(err, errlen, "out of memory");
		goto fail;
	}
	if (rq_redis_url_password(&u, opts->password_env, opts->password_file,
				  &q->password, err, errlen) != 0)
		goto fail;
	rq_redis_url_wipe(&u);
	if (opts->user) {
		if (q->user) {
			rq_err_set(err, errlen, "redis user given both in the URL and in the options");
			goto fail;
		}
		q->user = strdup(opts->user);
		if (!q->user) {
			rq_err_set(err, errlen, "out of memory");
			goto fail;
		}
	}
	if (q->user && !q->password) {
		rq_err_set(err, errlen, "redis user given without a password (a password "
			 "alone goes in the URL as redis://:password@host)");
		goto fail;
	}

	q->cmdl.q = q->subl.q = q;
	q->cmdl.kind = LINK_CMD;
	q->subl.kind = LINK_SUB;
	q->cmdl.backoff_ms = q->subl.backoff_ms = q->backoff_min;
	q->cmdl.ping_sent_ms = q->subl.ping_sent_ms = -1;
	q->sub_ping_ms = opts->sub_ping_ms == 0 ? RQ_QUEUE_SUB_PING_MS : opts->sub_ping_ms;
	q->subl.ping_ev = evtimer_new(base, ping_cb, q);
	q->cmdl.retry_ev = evtimer_new(base, retry_cb, &q->cmdl);
	q->subl.retry_ev = evtimer_new(base, retry_cb, &q->subl);
	q->wd_ev = evtimer_new(base, wd_cb, q);
	q->wake_ev = evtimer_new(base, wake_timer_cb, q);
	q->notify_ev = evtimer_new(base, notify_cb, q);
	q->drop_ev = evtimer_new(base, drop_cb, q);
	if (!q->cmdl.retry_ev || !q->subl.retry_ev || !q->wd_ev || !q->wake_ev ||
	    !q->notify_ev || !q->drop_ev || !q->subl.ping_ev) {
		rq_err_set(err, errlen, "out of memory");
		goto fail;
	}
	link_connect(&q->cmdl);
	link_connect(&q->subl);
	return q;
fail:
	rq_redis_url_wipe(&u);
	if (q)
		destroy_now(q);
	return NULL;
}

static void link_close(struct link *l)
{
	struct conn *cn = l->conn;
	if (l->retry_ev)
		event_free(l->retry_ev);
	l->retry_ev = NULL;
	if (l->ping_ev)
		event_free(l->ping_ev);
	l->ping_ev = NULL;
	if (!cn)
		return;
	l->conn = NULL;
	cn->q = NULL;
	if (cn->dropping)
		return;   /* hiredis frees it after the running callback */
	cn->dropping = true;
	redisAsyncContext *ac = cn->ac;
	if (ac->c.flags & REDIS_IN_CALLBACK) {
		redisAsyncFree(ac);   /* on_disconnect frees cn */
		return;
	}
	cn->sync_free = true;
	redisAsyncFree(ac);
	free(cn);
}

static void destroy_now(struct rq_queue *q)
{
	q->destroying = true;
	struct event **evs[] = {&q->wd_ev, &q->wake_ev, &q->notify_ev, &q->drop_ev};
	for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++) {
		if (*evs[i])
			event_free(*evs[i]);
		*evs[i] = NULL;
	}
	/* every pending command: callback once with ECANCEL */
	struct cmd *c;
	q->depth++;
	while ((c = TAILQ_FIRST(&q->cmds)) != NULL) {
		TAILQ_REMOVE(&q->cmds, c, entry);
		q->ncmds--;
		cmd_finish(q, c, RQ_QUEUE_ECANCEL, "relayq queue client destroyed", NULL);
		if (c->sent)
			c->orphan = true;   /* hiredis frees it at its callback */
		else
			cmd_free(c);
	}
	q->depth--;
	link_close(&q->cmdl);
	link_close(&q->subl);
	rq_secret_free(q->password);
	free(q->user);
	free(q->url_redacted);
	free(q);
}

const char *rq_queue_url_redacted(const struct rq_queue *q)
{
	return q->url_redacted;
}

const char *rq_queue_prefix(const struct rq_queue *q)
{
	return q->prefix;
}

const char *rq_queue_last_error(const struct rq_queue *q)
{
	return q->err;
}

void rq_queue_get_stats(const struct rq_queue *q, struct rq_queue_stats *st)
{
	*st = q->st;
	st->state = q->cmdl.state;
	st->inflight = q->ninflight;
	st->queued = q->ncmds - q->ninflight;
}

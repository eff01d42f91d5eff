/* The /metrics endpoint over evhttp (see metrics.h). */
#include "relayq/metrics.h"
#include "relayq/clock.h"

#include "relayq/log.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>

/*
 * A small HTTP/1.x server of one resource. libevent 2.1's evhttp has no
 * connection cap and no deadline for the request head (its timeout is per
 * read, so a client sending a byte every few seconds stays forever), and
 * its listener logs every failed accept and tries again at once: out of
 * file descriptors, that is a busy loop and millions of lines. Here:
 *  - at most RQ_METRICS_CONNS_MAX connections; at the cap the listener is
 *    disabled (new clients wait in the kernel's backlog, using no
 *    descriptor of ours) until one closes;
 *  - the whole request head within RQ_METRICS_HEAD_MS of the accept, else
 *    closed; no byte for RQ_METRICS_IDLE_MS (either way), closed;
 *  - a failed accept (EMFILE, ENFILE, ENOBUFS, ...) pauses accepting for
 *    RQ_METRICS_PAUSE_MS, doubling up to RQ_METRICS_PAUSE_MAX_MS while it
 *    keeps failing, with one log line per pause;
 *  - one request per connection, answered with Connection: close.
 */

struct conn {
	struct rq_metrics *m;
	struct bufferevent *bev;
	struct event *head_timer;
	bool dead;                 /* closed: freed by the reaper */
	struct conn *prev, *next;
};

struct rq_metrics {
	struct event_base *base;
	struct evconnlistener *lev;
	struct event *resume;      /* ends a pause of accepting */
	struct event *reap;        /* frees closed connections */
	rq_metrics_fill_cb fill;
	void *arg;
	struct conn *conns;        /* open */
	struct conn *dead;         /* closed, to free */
	size_t nconns;
	bool paused;               /* accepting paused after an error */
	int pause_ms;              /* the next pause */
	struct timeval last_error; /* of accept() */
	struct timeval last_line;  /* the last metrics_accept_paused line */
	uint64_t accept_errors;    /* since start */
	uint64_t unlogged;         /* accept errors not in a line yet */
};

void rq_metrics_head(struct evbuffer *out, const char *name, const char *type,
		     const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void rq_metrics_sample(struct evbuffer *out, const char *name, const char *labels,
		       uint64_t value)
{
	if (labels && *labels)
		evbuffer_add_printf(out, "%s{%s} %" PRIu64 "\n", name, labels, value);
	else
		evbuffer_add_printf(out, "%s %" PRIu64 "\n", name, value);
}

static void listener_update(struct rq_metrics *m)
{
	if (!m->lev)
		return;
	if (!m->paused && m->nconns < RQ_METRICS_CONNS_MAX)
		evconnlistener_enable(m->lev);
	else
		evconnlistener_disable(m->lev);
}

/* Closes c now (socket, timers) and leaves the struct to the reaper: this
 * runs inside c's own callbacks. */
static void conn_close(struct conn *c)
{
	struct rq_metrics *m = c->m;
	if (c->dead)
		return;
	c->dead = true;
	if (c->prev)
		c->prev->next = c->next;
	else
		m->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = NULL;
	c->next = m->dead;
	m->dead = c;
	bufferevent_disable(c->bev, EV_READ | EV_WRITE);
	evtimer_del(c->head_timer);
	m->nconns--;
	event_active(m->reap, EV_TIMEOUT, 1);
	/* a descriptor is free again: an accept paused for want of one may
	 * go on (when the shortage is elsewhere, it fails and pauses again:
	 * at most once per connection closed, never a loop) */
	if (m->paused) {
		m->paused = false;
		evtimer_del(m->resume);
	}
	listener_update(m);
}

static void conn_free(struct conn *c)
{
	if (c->bev)
		bufferevent_free(c->bev);
	if (c->head_timer)
		event_free(c->head_timer);
	free(c);
}

static void on_reap(evutil_socket_t fd, short what, void *arg)
{
	struct rq_metrics *m = arg;
	(void)fd;
	(void)what;
	while (m->dead) {
		struct conn *c = m->dead;
		m->dead = c->next;
		conn_free(c);
	}
}

/* The response is out: close. */
static void on_written(struct bufferevent *bev, void *arg)
{
	(void)bev;
	conn_close(arg);
}

static void respond(struct conn *c, int status, const char *reason, const char *ctype,
		    struct evbuffer *body, bool head_only, const char *extra)
{
	struct evbuffer *out = bufferevent_get_output(c->bev);
	size_t len = body ? evbuffer_get_length(body) : 0;
	evbuffer_add_printf(out,
			    "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
			    "%sConnection: close\r\n\r\n",
			    status, reason, ctype, len, extra ? extra : "");
	if (body && !head_only)
		evbuffer_add_buffer(out, body);
	evtimer_del(c->head_timer);
	bufferevent_disable(c->bev, EV_READ);
	bufferevent_setcb(c->bev, NULL, on_written, NULL, c);
	bufferevent_setwatermark(c->bev, EV_WRITE, 0, 0);
	bufferevent_enable(c->bev, EV_WRITE);
}

static void respond_text(struct conn *c, int status, const char *reason, bool head_only,
			 const char *extra)
{
	struct evbuffer *b = evbuffer_new();
	if (b)
		evbuffer_add_printf(b, "%s\n", reason);
	respond(c, status, reason, "text/plain", b, head_only, extra);
	if (b)
		evbuffer_free(b);
}

/* The request head is in: answer it. */
static void serve(struct conn *c, const char *line)
{
	struct rq_metrics *m = c->m;
	char method[16], target[1024], version[16];
	if (sscanf(line, "%15s %1023s %15s", method, target, version) != 3 ||
	    strncmp(version, "HTTP/1.", 7) != 0) {
		respond_text(c, 400, "Bad Request", false, NULL);
		return;
	}
	bool head = strcmp(method, "HEAD") == 0;
	if (!head && strcmp(method, "GET") != 0) {
		respond_text(c, 405, "Method Not Allowed", false, "Allow: GET, HEAD\r\n");
		return;
	}
	if (strcmp(target, "/metrics") != 0 && strncmp(target, "/metrics?", 9) != 0) {
		respond_text(c, 404, "Not Found", head, NULL);
		return;
	}
	struct evbuffer *b = evbuffer_new();
	if (!b) {
		respond_text(c, 500, "Internal Server Error", head, NULL);
		return;
	}
	m->fill(b, m->arg);
	respond(c, 200, "OK", "text/plain; version=0.0.4", b, head, NULL);
	evbuffer_free(b);
}

static void on_read(struct bufferevent *bev, void *arg)
{
	struct conn *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
	if (end.pos < 0)
		end = evbuffer_search(in, "\n\n", 2, NULL);
	if (end.pos < 0) {
		if (evbuffer_get_length(in) > RQ_METRICS_HEAD_MAX)
			respond_text(c, 431, "Request Header Fields Too Large", false, NULL);
		return;
	}
	if (end.pos > RQ_METRICS_HEAD_MAX) {
		respond_text(c, 431, "Request Header Fields Too Large", false, NULL);
		return;
	}
	size_t n = 0;
	char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF);
	if (!line) {
		respond_text(c, 400, "Bad Request", false, NULL);
		return;
	}
	serve(c, line);
	free(line);
}

static void on_event(struct bufferevent *bev, short what, void *arg)
{
	(void)bev;
	(void)what;  /* EOF, error or an idle timeout: all end the connection */
	conn_close(arg);
}

static void on_head_timeout(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	conn_close(arg);
}

static void on_accept(struct evconnlistener *lev, evutil_socket_t fd,
		      struct sockaddr *sa, int socklen, void *arg)
{
	struct rq_metrics *m = arg;
	(void)lev;
	(void)sa;
	(void)socklen;
	struct conn *c = calloc(1, sizeof(*c));
	if (c) {
		c->m = m;
		c->bev = bufferevent_socket_new(m->base, fd, BEV_OPT_CLOSE_ON_FREE);
		c->head_timer = evtimer_new(m->base, on_head_timeout, c);
	}
	if (!c || !c->bev || !c->head_timer) {
		if (c && c->bev)
			fd = -1;  /* closed with the bufferevent */
		if (c)
			conn_free(c);
		if (fd >= 0)
			evutil_closesocket(fd);
		return;
	}
	c->next = m->conns;
	if (m->conns)
		m->conns->prev = c;
	m->conns = c;
	m->nconns++;
	struct timeval idle = {RQ_METRICS_IDLE_MS / 1000, (RQ_METRICS_IDLE_MS % 1000) * 1000};
	struct timeval head = {RQ_METRICS_HEAD_MS / 1000, (RQ_METRICS_HEAD_MS % 1000) * 1000};
	bufferevent_set_timeouts(c->bev, &idle, &idle);
	bufferevent_setwatermark(c->bev, EV_READ, 0, RQ_METRICS_HEAD_MAX + 1);
	bufferevent_setcb(c->bev, on_read, NULL, on_event, c);
	evtimer_add(c->head_timer, &head);
	bufferevent_enable(c->bev, EV_READ);
	listener_update(m);
}

static void on_resume(evutil_socket_t fd, short what, void *arg)
{
	struct rq_metrics *m = arg;
	(void)fd;
	(void)what;
	m->paused = false;
	listener_update(m);
}

/* accept() failed with something other than "try again": most often out of
 * descriptors (EMFILE, ENFILE) or kernel memory (ENOBUFS, ENOMEM). Retrying
 * at once would fail again at once: pause, and say so once per pause. */
static void on_accept_error(struct evconnlistener *lev, void *arg)
{
	struct rq_metrics *m = arg;
	int err = EVUTIL_SOCKET_ERROR();
	(void)lev;
	m->accept_errors++;
	/* the pause grows while errors keep coming; after a quiet spell
	 * (twice the longest pause) it starts short again */
	struct timeval now, quiet;
	event_base_gettimeofday_cached(m->base, &now);
	timersub(&now, &m->last_error, &quiet);
	if (quiet.tv_sec * 1000 + quiet.tv_usec / 1000 > 2 * RQ_METRICS_PAUSE_MAX_MS)
		m->pause_ms = RQ_METRICS_PAUSE_MS;
	m->last_error = now;
	m->paused = true;
	listener_update(m);
	struct timeval tv = rq_clock_tv(m->pause_ms);
	evtimer_add(m->resume, &tv);
	/* at most one line per RQ_METRICS_PAUSE_MAX_MS, with the errors since
	 * the last one */
	m->unlogged++;
	struct timeval since;
	timersub(&now, &m->last_line, &since);
	if (m->last_line.tv_sec == 0 ||
	    since.tv_sec * 1000 + since.tv_usec / 1000 >= RQ_METRICS_PAUSE_MAX_MS) {
		char errors[32], total[32], pause[32], conns[32];
		snprintf(conns, sizeof(conns), "%zu", m->nconns);
		snprintf(errors, sizeof(errors), "%" PRIu64, m->unlogged);
		snprintf(total, sizeof(total), "%" PRIu64, m->accept_errors);
		snprintf(pause, sizeof(pause), "%dms", m->pause_ms);
		rq_log(RQ_LOG_WARN, "metrics_accept_paused", "error",
		       evutil_socket_error_to_string(err), "errors", errors, "errors_total", total,
		       "pause", pause, "connections", conns, NULL);
		m->unlogged = 0;
		m->last_line = now;
	}
	m->pause_ms = m->pause_ms * 2 > RQ_METRICS_PAUSE_MAX_MS ? RQ_METRICS_PAUSE_MAX_MS
								 : m->pause_ms * 2;
}

size_t rq_metrics_connections(const struct rq_metrics *m)
{
	return m ? m->nconns : 0;
}

uint64_t rq_metrics_accept_errors(const struct rq_metrics *m)
{
	return m ? m->accept_errors : 0;
}

/* Splits "host:port" / "[v6]:port" into host and port. 0 or -1. */
static int split_listen(const char *s, char *host, size_t hostlen, int *port)
{
	const char *colon;
	const char *h = s;
	size_t hl;
	if (*s == '[') {
		const char *end = strchr(s, ']');
		if (!end || end[1] != ':')
			return -1;
		h = s + 1;
		hl = (size_t)(end - h);
		colon = end + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return -1;
		hl = (size_t)(colon - s);
	}
	if (hl == 0 || hl >= hostlen)
		return -1;
	memcpy(host, h, hl);
	host[hl] = '\0';
	char *e = NULL;
	long p = strtol(colon + 1, &e, 10);
	if (!e || *e || e == colon + 1 || p < 0 || p > 65535)
		return -1;
	*port = (int)p;
	return 0;
}

void rq_metrics_destroy(struct rq_metrics *m)
{
	if (!m)
		return;
	if (m->lev)
		evconnlistener_free(m->lev);
	while (m->conns) {
		struct conn *c = m->conns;
		m->conns = c->next;
		conn_free(c);
	}
	while (m->dead) {
		struct conn *c = m->dead;
		m->dead = c->next;
		conn_free(c);
	}
	if (m->resume)
		event_free(m->resume);
	if (m->reap)
		event_free(m->reap);
	free(m);
}

struct rq_metrics *rq_metrics_create(struct event_base *base, const char *listen,
				     rq_metrics_fill_cb fill, void *arg,
				     char *err, size_t errlen)
{
	char host[256], port_s[16];
	int port = 0;
	if (!listen || split_listen(listen, host, sizeof(host), &port) < 0) {
		snprintf(err, errlen, "metrics: \"%.80s\" is not host:port", listen ? listen : "");
		return NULL;
	}
	if (strcmp(host, "localhost") == 0)
		snprintf(host, sizeof(host), "127.0.0.1");
	snprintf(port_s, sizeof(port_s), "%d", port);
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC,
		.ai_socktype = SOCK_STREAM,
		.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE,
	};
	struct addrinfo *ai = NULL;
	if (getaddrinfo(host, port_s, &hints, &ai) != 0 || !ai) {
		snprintf(err, errlen, "metrics: \"%.80s\" is not an IP address", host);
		return NULL;
	}
	struct rq_metrics *m = calloc(1, sizeof(*m));
	if (!m) {
		freeaddrinfo(ai);
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	m->base = base;
	m->fill = fill;
	m->arg = arg;
	m->pause_ms = RQ_METRICS_PAUSE_MS;
	m->resume = evtimer_new(base, on_resume, m);
	m->reap = event_new(base, -1, 0, on_reap, m);
	if (!m->resume || !m->reap) {
		freeaddrinfo(ai);
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	m->lev = evconnlistener_new_bind(base, on_accept, m,
					 LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE |
					 LEV_OPT_CLOSE_ON_EXEC, 128, ai->ai_addr,
					 (int)ai->ai_addrlen);
	freeaddrinfo(ai);
	if (!m->lev) {
		snprintf(err, errlen, "metrics: cannot listen on %s: %s", listen,
			 evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
		goto fail;
	}
	evconnlistener_set_error_cb(m->lev, on_accept_error);
	return m;
fail:
	rq_metrics_destroy(m);
	return NULL;
}

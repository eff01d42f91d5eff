/*
 * bench_sink: a fast SMTP sink for scripts/bench that counts messages and
 * timestamps the end of each DATA, plus a latency probe.
 *
 * Sink mode:
 *   bench_sink --port N [--expect N] [--status FILE]
 * Listens on 127.0.0.1:PORT and answers every command at once (EHLO offers
 * PIPELINING and 8BITMIME; MAIL, RCPT, RSET, NOOP get 250; DATA gets 354 and
 * the message is discarded; QUIT closes). Every STATUS_EVERY messages, and
 * when the count reaches --expect, it writes one line to FILE (atomically,
 * via FILE.tmp + rename):
 *   count=N first_ns=T last_ns=T done=0|1
 * where the times are CLOCK_REALTIME in ns at the end of DATA (the final
 * "." line read, before our 250) of the first and of the last message
 * counted, and done=1 once count >= --expect. It keeps serving after that.
 * SIGTERM / SIGINT stop it.
 *
 * Probe mode:
 *   bench_sink --port N --probe COUNT --redis-port N --queue NAME [--size N]
 * The same sink, plus a Redis client in the same event loop: COUNT times,
 * one message at a time, it calls FCALL relayq_enqueue (a --size octet
 * message, one recipient), notes CLOCK_MONOTONIC before sending the call,
 * and again when the sink reads the end of that message's DATA; then it
 * waits until relayq_stats counts the message delivered (so the daemon has
 * settled and is idle) before the next enqueue. Prints
 *   latency_ms_p50=X latency_ms_p90=X latency_ms_p99=X latency_ms_max=X
 * one per line. A delivery daemon (relayqd) must relay the queue to PORT.
 *
 * Depends on libevent and hiredis only (not on the engine library).
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#define LINE_MAX_LEN 4096
#define PROBE_TIMEOUT_S 30
#define STATUS_EVERY 1000

enum conn_state {
	CONN_COMMAND,
	CONN_DATA,
};

struct conn {
	struct conn *prev, *next;  /* all open connections */
	struct bufferevent *bev;
	enum conn_state state;
	bool data_start;  /* nothing of the message read yet */
	bool closing;
};

struct opts {
	int port;
	long expect;
	const char *status;
	long probe;
	int redis_port;
	const char *queue;
	long size;
};

static struct opts O;
static struct event_base *base;
static struct conn *conns;
static long count;
static int64_t first_ns, last_ns;

/* probe state */
static redisAsyncContext *rc;
static char qkey[128];
static char *body;
static long probe_i;       /* messages enqueued so far */
static int64_t probe_t0;   /* CLOCK_MONOTONIC ns at the enqueue call */
static bool probe_waiting; /* enqueued, not yet seen by the sink */
static double *lat_ms;
static struct event *poll_ev, *deadline_ev;
static int exit_code;

__attribute__((format(printf, 1, 2), noreturn))
static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("bench_sink: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static int64_t now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void write_status(void)
{
	char tmp[1024];
	if (!O.status)
		return;
	snprintf(tmp, sizeof(tmp), "%s.tmp", O.status);
	FILE *f = fopen(tmp, "w");
	if (!f)
		die("%s: %s", tmp, strerror(errno));
	fprintf(f, "count=%ld first_ns=%lld last_ns=%lld done=%d\n", count, (long long)first_ns,
		(long long)last_ns, O.expect && count >= O.expect);
	if (fclose(f) != 0 || rename(tmp, O.status) != 0)
		die("%s: %s", O.status, strerror(errno));
}

static void probe_message_seen(void);

static void message_done(void)
{
	int64_t t = now_ns(CLOCK_REALTIME);
	if (count == 0)
		first_ns = t;
	last_ns = t;
	count++;
	if ((O.expect && count == O.expect) || count % STATUS_EVERY == 0)
		write_status();
	if (O.probe)
		probe_message_seen();
}

static void conn_free(struct conn *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	bufferevent_free(c->bev);
	free(c);
}

static void reply(struct conn *c, const char *s)
{
	bufferevent_write(c->bev, s, strlen(s));
}

static void command(struct conn *c, const char *line, size_t len)
{
	if (len >= 4 && (strncasecmp(line, "EHLO", 4) == 0)) {
		reply(c, "250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n");
	} else if (len >= 4 && strncasecmp(line, "HELO", 4) == 0) {
		reply(c, "250 sink.test\r\n");
	} else if (len >= 4 && (strncasecmp(line, "MAIL", 4) == 0 || strncasecmp(line, "RCPT", 4) == 0 ||
				strncasecmp(line, "RSET", 4) == 0 || strncasecmp(line, "NOOP", 4) == 0)) {
		reply(c, "250 2.0.0 Ok\r\n");
	} else if (len >= 4 && strncasecmp(line, "DATA", 4) == 0) {
		reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
		c->state = CONN_DATA;
		c->data_start = true;
	} else if (len >= 4 && strncasecmp(line, "QUIT", 4) == 0) {
		reply(c, "221 2.0.0 Bye\r\n");
		c->closing = true;
	} else {
		reply(c, "502 5.5.2 Error: command not recognized\r\n");
	}
}

/* Consumes message text; true when the end of DATA was found. */
static bool data(struct conn *c, struct evbuffer *in)
{
	size_t len = evbuffer_get_length(in);
	if (c->data_start) {
		if (len < 3)
			return false;
		unsigned char p[3];
		evbuffer_copyout(in, p, 3);
		if (memcmp(p, ".\r\n", 3) == 0) {
			evbuffer_drain(in, 3);
			return true;
		}
		c->data_start = false;
	}
	struct evbuffer_ptr at = evbuffer_search(in, "\r\n.\r\n", 5, NULL);
	if (at.pos >= 0) {
		evbuffer_drain(in, (size_t)at.pos + 5);
		return true;
	}
	/* keep a tail that may be the start of the end marker */
	if (len > 4)
		evbuffer_drain(in, len - 4);
	return false;
}

static void read_cb(struct bufferevent *bev, void *arg)
{
	struct conn *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	while (!c->closing) {
		if (c->state == CONN_DATA) {
			if (!data(c, in))
				break;
			c->state = CONN_COMMAND;
			message_done();
			reply(c, "250 2.0.0 Ok: queued\r\n");
			continue;
		}
		size_t n = 0;
		char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF);
		if (!line) {
			if (evbuffer_get_length(in) > LINE_MAX_LEN) {
				reply(c, "500 5.5.2 Error: line too long\r\n");
				c->closing = true;
			}
			break;
		}
		command(c, line, n);
		free(line);
	}
	if (c->closing)
		evbuffer_drain(in, evbuffer_get_length(in));
}

static void write_cb(struct bufferevent *bev, void *arg)
{
	struct conn *c = arg;
	(void)bev;
	if (c->closing)
		conn_free(c);
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct conn *c = arg;
	(void)bev;
	if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
		conn_free(c);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
	(void)l;
	(void)sa;
	(void)salen;
	(void)arg;
	struct conn *c = calloc(1, sizeof(*c));
	if (!c)
		die("out of memory");
	c->bev = bufferevent_socket_new(base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (!c->bev)
		die("bufferevent_socket_new failed");
	c->next = conns;
	if (conns)
		conns->prev = c;
	conns = c;
	bufferevent_setcb(c->bev, read_cb, write_cb, event_cb, c);
	bufferevent_enable(c->bev, EV_READ | EV_WRITE);
	reply(c, "220 sink.test ESMTP bench_sink\r\n");
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
	(void)sig;
	(void)what;
	(void)arg;
	event_base_loopexit(base, NULL);
}

/* ---- probe ---- */

static void probe_enqueue(void);

static void probe_finish(int code)
{
	exit_code = code;
	event_base_loopexit(base, NULL);
}

static void enqueue_cb(redisAsyncContext *ac, void *r, void *priv)
{
	redisReply *reply = r;
	(void)ac;
	(void)priv;
	if (!reply || reply->type == REDIS_REPLY_ERROR) {
		fprintf(stderr, "bench_sink: enqueue failed: %s\n", reply ? reply->str : "connection lost");
		probe_finish(1);
	}
}

static void stats_cb(redisAsyncContext *ac, void *r, void *priv)
{
	redisReply *reply = r;
	(void)ac;
	(void)priv;
	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		fprintf(stderr, "bench_sink: relayq_stats failed\n");
		probe_finish(1);
		return;
	}
	long long delivered = -1;
	for (size_t i = 0; i + 1 < reply->elements; i += 2)
		if (reply->element[i]->type == REDIS_REPLY_STRING && strcmp(reply->element[i]->str, "delivered") == 0)
			delivered = reply->element[i + 1]->integer;
	if (delivered >= probe_i) {
		if (probe_i == O.probe)
			probe_finish(0);
		else
			probe_enqueue();
		return;
	}
	struct timeval ms = {0, 1000};
	evtimer_add(poll_ev, &ms);
}

static void poll_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	redisAsyncCommand(rc, stats_cb, NULL, "FCALL relayq_stats 1 %s", qkey);
}

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	fprintf(stderr, "bench_sink: message %ld not delivered and settled within %d s\n", probe_i,
		PROBE_TIMEOUT_S);
	probe_finish(1);
}

static void probe_enqueue(void)
{
	static const char env[] = "{\"from\":\"bench@example.org\",\"to\":[\"rcpt@example.net\"]}";
	struct timeval dl = {PROBE_TIMEOUT_S, 0};
	evtimer_add(deadline_ev, &dl);
	probe_waiting = true;
	probe_t0 = now_ns(CLOCK_MONOTONIC);
	probe_i++;
	redisAsyncCommand(rc, enqueue_cb, NULL, "FCALL relayq_enqueue 1 %s %s %b", qkey, env, body,
			  (size_t)O.size);
}

static void probe_message_seen(void)
{
	int64_t t = now_ns(CLOCK_MONOTONIC);
	if (!probe_waiting) {
		fprintf(stderr, "bench_sink: a message arrived that the probe did not enqueue\n");
		probe_finish(1);
		return;
	}
	probe_waiting = false;
	lat_ms[probe_i - 1] = (double)(t - probe_t0) / 1e6;
	struct timeval zero = {0, 0};
	evtimer_add(poll_ev, &zero);
}

static void connect_cb(const redisAsyncContext *ac, int status)
{
	(void)ac;
	if (status != REDIS_OK) {
		fprintf(stderr, "bench_sink: cannot connect to redis\n");
		rc = NULL;
		probe_finish(1);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double pct(const double *v, long n, double p)
{
	long i = (long)(p / 100.0 * (double)n + 0.999999) - 1;
	if (i < 0)
		i = 0;
	if (i >= n)
		i = n - 1;
	return v[i];
}

/* A message of exactly size octets: headers, then 76-octet CRLF lines. */
static char *make_body(long size)
{
	char *b = malloc((size_t)size + 1);
	if (!b)
		die("out of memory");
	const char *hdr = "From: bench@example.org\r\nTo: rcpt@example.net\r\nSubject: probe\r\n\r\n";
	long n = 0;
	for (; n < size && hdr[n]; n++)
		b[n] = hdr[n];
	long col = 0;
	while (n < size) {
		if (col == 76 && n + 2 <= size) {
			b[n++] = '\r';
			b[n++] = '\n';
			col = 0;
			continue;
		}
		b[n] = (char)('a' + (n % 26));
		n++;
		col++;
	}
	b[size] = '\0';
	return b;
}

static long parse_long(const char *s, const char *name)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || v < 1)
		die("%s must be a positive integer", name);
	return v;
}

static void usage(void)
{
	fputs("usage: bench_sink --port N [--expect N] [--status FILE]\n"
	      "       bench_sink --port N --probe COUNT --redis-port N --queue NAME [--size N]\n", stderr);
	exit(2);
}

static void parse(int argc, char **argv)
{
	O = (struct opts){.size = 2048};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			usage();
		if (strcmp(a, "--port") == 0)
			O.port = (int)parse_long(v, a);
		else if (strcmp(a, "--expect") == 0)
			O.expect = parse_long(v, a);
		else if (strcmp(a, "--status") == 0)
			O.status = v;
		else if (strcmp(a, "--probe") == 0)
			O.probe = parse_long(v, a);
		else if (strcmp(a, "--redis-port") == 0)
			O.redis_port = (int)parse_long(v, a);
		else if (strcmp(a, "--queue") == 0)
			O.queue = v;
		else if (strcmp(a, "--size") == 0)
			O.size = parse_long(v, a);
		else
			usage();
		i++;
	}
	if (!O.port || O.port > 65535)
		usage();
	if (O.probe && (!O.redis_port || !O.queue))
		usage();
}

int main(int argc, char **argv)
{
	parse(argc, argv);
	signal(SIGPIPE, SIG_IGN);
	base = event_base_new();
	if (!base)
		die("event_base_new failed");
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)O.port)};
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	struct evconnlistener *l = evconnlistener_new_bind(base, accept_cb, NULL,
		LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, 1024, (struct sockaddr *)&sin, sizeof(sin));
	if (!l)
		die("cannot listen on 127.0.0.1:%d: %s", O.port, strerror(errno));
	struct event *sigterm = evsignal_new(base, SIGTERM, signal_cb, NULL);
	struct event *sigint = evsignal_new(base, SIGINT, signal_cb, NULL);
	evsignal_add(sigterm, NULL);
	evsignal_add(sigint, NULL);

	if (O.probe) {
		snprintf(qkey, sizeof(qkey), "relayq:{%s}", O.queue);
		body = make_body(O.size);
		lat_ms = calloc((size_t)O.probe, sizeof(*lat_ms));
		if (!lat_ms)
			die("out of memory");
		rc = redisAsyncConnect("127.0.0.1", O.redis_port);
		if (!rc || rc->err)
			die("redis connect: %s", rc ? rc->errstr : "out of memory");
		redisLibeventAttach(rc, base);
		redisAsyncSetConnectCallback(rc, connect_cb);
		poll_ev = evtimer_new(base, poll_cb, NULL);
		deadline_ev = evtimer_new(base, deadline_cb, NULL);
		probe_enqueue();
	}

	event_base_dispatch(base);

	if (O.probe) {
		if (exit_code == 0) {
			qsort(lat_ms, (size_t)O.probe, sizeof(*lat_ms), cmp_double);
			printf("latency_ms_p50=%.3f\n", pct(lat_ms, O.probe, 50));
			printf("latency_ms_p90=%.3f\n", pct(lat_ms, O.probe, 90));
			printf("latency_ms_p99=%.3f\n", pct(lat_ms, O.probe, 99));
			printf("latency_ms_max=%.3f\n", lat_ms[O.probe - 1]);
			printf("latency_ms_min=%.3f\n", lat_ms[0]);
		}
		if (rc)
			redisAsyncDisconnect(rc);
		event_free(poll_ev);
		event_free(deadline_ev);
		free(lat_ms);
		free(body);
	}
	while (conns)
		conn_free(conns);
	event_free(sigterm);
	event_free(sigint);
	evconnlistener_free(l);
	event_base_free(base);
	return exit_code;
}

/*
 * engine/listen.c in-process on 127.0.0.1:0 against a real redis-server,
 * driven by real clients (tests/component/listen_client.py: Python's
 * smtplib and raw sockets, run as processes while the test runs the event
 * loop): plain and pipelined messages, two on one connection, SMTPUTF8 and
 * 8-bit bodies, the queue entry checked byte for byte (body, envelope,
 * meta); the hostile cases: no AUTH from outside the trusted CIDRs, a 1 MiB
 * line, NUL bytes, commands before the greeting, STARTTLS injection, size,
 * recipients and per-address connection limits, too many errors; AUTH
 * PLAIN / LOGIN over TLS, refused in clear, wrong passwords and their
 * delays; Redis killed mid-DATA and stopped (SIGSTOP) at the final dot:
 * 451 and nothing written; stop with open sessions: 421. Password checks
 * on the worker threads (held by the test hook): other connections are
 * served meanwhile, the bound answers 454, a session that left mid-check
 * is freed when its check comes back, stop and destroy with checks in
 * flight. Implicit TLS (SMTP_SSL verifying the test CA) and its 421 when
 * full; max_connections in total; max_commands; 10,000 RCPTs in one
 * transaction; slowloris against the command timeout; Redis at maxmemory
 * (452 4.3.1, nothing written).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "relayq/credentials.h"
#include "relayq/listen.h"
#include "relayq/log.h"

static struct event_base *base;
static struct th_redis R;
static char *tmpdir;
static char credfile[512];

/* ---- the event loop ---- */

struct waiter {
	bool (*cond)(void *);
	void *arg;
};

static void check_cb(evutil_socket_t fd, short what, void *arg)
{
	struct waiter *w = arg;
	if (w->cond(w->arg))
		event_base_loopbreak(base);
}

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	event_base_loopbreak(base);
}

static bool run_until(bool (*cond)(void *), void *arg, int ms)
{
	if (cond(arg))
		return true;
	struct waiter w = {cond, arg};
	struct event *chk = event_new(base, -1, EV_PERSIST, check_cb, &w);
	struct event *dl = evtimer_new(base, deadline_cb, NULL);
	struct timeval tick = {0, 5000};
	struct timeval until = {ms / 1000, (ms % 1000) * 1000};
	event_add(chk, &tick);
	evtimer_add(dl, &until);
	event_base_dispatch(base);
	event_free(chk);
	event_free(dl);
	return cond(arg);
}

static bool proc_done(void *arg)
{
	return !th_alive(arg);
}

static bool never(void *arg)
{
	return false;
}

/* ---- clients ---- */

/* Runs listen_client.py CASE PORT ARGS... while the loop runs; returns its
 * output (malloc'd). */
static char *client(const char *cas, int port, ...)
{
	char script[600], portstr[16], log[600];
	snprintf(script, sizeof(script), "%s/tests/component/listen_client.py", th_source_root());
	snprintf(portstr, sizeof(portstr), "%d", port);
	static int n;
	snprintf(log, sizeof(log), "%s/client-%d.log", tmpdir, ++n);
	char *argv[40] = {"/usr/bin/python3", script, (char *)cas, portstr};
	int argc = 4;
	va_list ap;
	va_start(ap, port);
	const char *a;
	while ((a = va_arg(ap, const char *)) && argc < 39)
		argv[argc++] = (char *)a;
	va_end(ap);
	argv[argc] = NULL;
	struct th_proc p;
	if (th_spawn(&p, argv, log) != 0)
		fail_msg("cannot run the client");
	if (!run_until(proc_done, &p, 60000)) {
		th_stop(&p, SIGKILL);
		fail_msg("client %s did not finish", cas);
	}
	char *out = th_read_file(log, NULL);
	assert_non_null(out);
	return out;
}

/* Asserts that the lines appear in out in this order. */
static void in_order(const char *out, ...)
{
	va_list ap;
	va_start(ap, out);
	const char *p = out, *s;
	while ((s = va_arg(ap, const char *))) {
		const char *f = strstr(p, s);
		if (!f)
			fail_msg("\"%s\" not found (in order) in:\n%s", s, out);
		p = f + strlen(s);
	}
	va_end(ap);
}

/* ---- the listener ---- */

static void opts_default(struct rq_listen_opts *o, const char *queue)
{
	static const char *trusted[] = {"127.0.0.0/8", "::1/128"};
	memset(o, 0, sizeof(*o));
	o->address = "127.0.0.1:0";
	o->trusted = trusted;
	o->ntrusted = 2;
	o->queue = queue;
	o->redis_url = R.url;
	o->hostname = "listen.test";
	o->add_message_id = true;
	o->add_date = true;
	o->meta_json = "{\"app\":\"tests\",\"n\":7}";
}

static bool redis_ready(void *arg)
{
	struct rq_listen_stats st;
	rq_listen_get_stats(arg, &st);
	return st.redis_ready;
}

static struct rq_listen *start(const struct rq_listen_opts *o)
{
	char err[300];
	struct rq_listen *l = rq_listen_create(base, o, err, sizeof(err));
	if (!l)
		fail_msg("rq_listen_create: %s", err);
	assert_true(run_until(redis_ready, l, 10000));
	return l;
}

/* ---- Redis ---- */

static redisReply *cmd(const char *fmt, ...)
{
	redisContext *c = th_redis_connect(&R);
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(c, fmt, ap);
	va_end(ap);
	redisFree(c);
	assert_non_null(r);
	return r;
}

static char *hget(const char *queue, const char *id, const char *field, size_t *len)
{
	redisReply *r = cmd("HGET relayq:{%s}:msg:%s %s", queue, id, field);
	if (r->type != REDIS_REPLY_STRING)
		fail_msg("HGET %s %s: type %d", id, field, r->type);
	char *s = malloc(r->len + 1);
	memcpy(s, r->str, r->len);
	s[r->len] = '\0';
	if (len)
		*len = r->len;
	freeReplyObject(r);
	return s;
}

static long long nmsgs(const char *queue)
{
	redisReply *r = cmd("EVAL %s 0 %s", "return #redis.call('KEYS', ARGV[1])",
			    "relayq:*:msg:*");
	long long n = r->integer;
	freeReplyObject(r);
	(void)queue;
	return n;
}

/* The id from "... queued as ID". */
static void queued_id(const char *out, int nth, char *id, size_t len)
{
	const char *p = out;
	for (int i = 0; i <= nth; i++) {
		p = strstr(p, "queued as ");
		if (!p)
			fail_msg("no queued id #%d in:\n%s", nth, out);
		p += 10;
	}
	size_t n = strcspn(p, " \r\n");
	snprintf(id, len, "%.*s", (int)n, p);
}

/* ---- tests ---- */

static void test_plain_exact(void **st)
{
	const char *q = th_unique_queue("exact");
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.add_message_id = false;
	o.add_date = false;
	struct rq_listen *l = start(&o);
	char *out = client("smtplib", rq_listen_port(l), "app@example.com", "rcpt@example.net",
			   "Subject: hi\\r\\nX-A: 1\\r\\n\\r\\n.dotted line\\r\\nbody\\nbare lf\\r\\n",
			   NULL);
	in_order(out, "esmtp=8bitmime enhancedstatuscodes pipelining size smtputf8", "mail 250",
		 "rcpt 250", "data 250 2.0.0 Ok: queued as ", NULL);
	char id[64];
	queued_id(out, 0, id, sizeof(id));
	size_t blen;
	char *body = hget(q, id, "body", &blen);
	const char *rx = "Received: from client.test (unknown [127.0.0.1]) by listen.test "
			 "(relayq) with ESMTP for <rcpt@example.net>; ";
	assert_memory_equal(body, rx, strlen(rx));
	const char *rest = strstr(body, "\r\n");
	assert_non_null(rest);
	/* smtplib dot-stuffed ".dotted": we unstuff; the bare LF is CRLF now */
	assert_string_equal(rest + 2, "Subject: hi\r\nX-A: 1\r\n\r\n.dotted line\r\nbody\r\nbare lf\r\n");
	char *from = hget(q, id, "from", NULL);
	assert_string_equal(from, "app@example.com");
	char *to = hget(q, id, "to", NULL);
	assert_string_equal(to, "[\"rcpt@example.net\"]");
	char *meta = hget(q, id, "meta", NULL);
	assert_non_null(strstr(meta, "\"via\":\"smtp\""));
	assert_non_null(strstr(meta, "\"client\":\"127.0.0.1\""));
	assert_non_null(strstr(meta, "\"app\":\"tests\""));
	assert_non_null(strstr(meta, "\"n\":7"));
	assert_null(strstr(meta, "\"user\""));
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.messages, 1);
	assert_int_equal(s.bytes, blen);
	assert_int_equal(s.connections, 1);
	free(body);
	free(from);
	free(to);
	free(meta);
	free(out);
	rq_listen_destroy(l);
}

static void test_two_utf8_8bit(void **st)
{
	const char *q = th_unique_queue("two");
	struct rq_listen_opts o;
	opts_default(&o, q);
	struct rq_listen *l = start(&o);
	char *out = client("two", rq_listen_port(l), NULL);
	in_order(out, "R: data 250 2.0.0 Ok: queued as", "R: data 250 2.0.0 Ok: queued as", NULL);
	char id1[64], id2[64];
	queued_id(out, 0, id1, sizeof(id1));
	queued_id(out, 1, id2, sizeof(id2));
	assert_string_not_equal(id1, id2);
	char *from = hget(q, id2, "from", NULL);
	assert_string_equal(from, "j\xc3\xb6rg@example.com");
	char *to = hget(q, id2, "to", NULL);
	assert_string_equal(to, "[\"r2@example.net\",\"r3@example.net\"]");
	char *body = hget(q, id2, "body", NULL);
	/* two recipients: no "for"; Message-ID and Date added after Subject */
	assert_non_null(strstr(body, "with ESMTP; "));
	in_order(body, "\r\nSubject: two\r\nMessage-ID: <", "@listen.test>\r\nDate: ",
		 "\r\n\r\nGr\xc3\xbc\xc3\x9f" "e\r\n.dot\r\n", NULL);
	char *b1 = hget(q, id1, "body", NULL);
	in_order(b1, "Subject: one\r\n", "\r\n\r\nfirst\r\n", NULL);
	free(from);
	free(to);
	free(body);
	free(b1);
	free(out);
	rq_listen_destroy(l);
}

static void test_pipelining_and_commands(void **st)
{
	const char *q = th_unique_queue("pipe");
	struct rq_listen_opts o;
	opts_default(&o, q);
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	/* everything before the greeting, in one write */
	char *out = client("raw", port,
			   "EHLO c.test\\r\\nNOOP\\r\\nVRFY x\\r\\nHELP\\r\\nMAIL FROM:<a@example.com>\\r\\n"
			   "RCPT TO:<b@example.net>\\r\\nRCPT TO:<b@EXAMPLE.NET>\\r\\nDATA\\r\\n"
			   "Subject: p\\r\\n\\r\\nhi\\r\\n.\\r\\nRSET\\r\\nEXPN x\\r\\nFOO\\r\\n"
			   "DATA\\r\\nRCPT TO:<c@example.net>\\r\\nMAIL FROM:<a@example.com>\\r\\n"
			   "MAIL FROM:<a@example.com>\\r\\nDATA\\r\\nQUIT\\r\\n",
			   NULL);
	in_order(out, "S: 220 listen.test ESMTP", "S: 250-listen.test Hello c.test [127.0.0.1]",
		 "S: 250 ENHANCEDSTATUSCODES", "S: 250 2.0.0 Ok", "S: 252 2.0.0", "S: 214 2.0.0",
		 "S: 250 2.1.0 Ok", "S: 250 2.1.5 Ok", "S: 250 2.1.5 Ok", "S: 354 ",
		 "S: 250 2.0.0 Ok: queued as ", "S: 250 2.0.0 Ok", "S: 502 5.5.1",
		 "S: 500 5.5.2", "S: 503 5.5.1", "S: 503 5.5.1", "S: 250 2.1.0 Ok",
		 "S: 503 5.5.1 Error: nested", "S: 554 5.5.1 Error: no valid recipients",
		 "S: 221 2.0.0", NULL);
	char id[64];
	queued_id(out, 0, id, sizeof(id));
	/* b@EXAMPLE.NET repeats b@example.net (domains are case-insensitive) */
	char *to = hget(q, id, "to", NULL);
	assert_string_equal(to, "[\"b@example.net\"]");
	free(to);
	free(out);
	rq_listen_destroy(l);
}

static void test_untrusted_needs_auth(void **st)
{
	const char *q = th_unique_queue("untrusted");
	static const char *far[] = {"10.0.0.0/8"};
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.trusted = far;
	o.ntrusted = 1;
	struct rq_listen *l = start(&o);
	char *out = client("raw", rq_listen_port(l),
			   "EHLO c.test\\r\\nMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.net>\\r\\n"
			   "DATA\\r\\nAUTH PLAIN AGEAYg==\\r\\nQUIT\\r\\n", NULL);
	in_order(out, "S: 530 5.7.0 Authentication required", "S: 503 5.5.1", "S: 503 5.5.1",
		 "S: 502 5.5.1 Error: AUTH not available", "S: 221", NULL);
	assert_null(strstr(out, "AUTH PLAIN"));  /* not offered */
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_AUTH_REQUIRED], 1);
	assert_int_equal(s.messages, 0);
	free(out);
	rq_listen_destroy(l);
}

static void test_hostile_lines(void **st)
{
	const char *q = th_unique_queue("hostile");
	struct rq_listen_opts o;
	opts_default(&o, q);
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	char *out = client("longline", port, NULL);
	in_order(out, "S: 250 ENHANCEDSTATUSCODES", "S: 500 5.5.2 Error: line too long",
		 "S: 250 2.0.0 Ok", "S: 221", NULL);
	free(out);
	/* NUL and CR inside commands; a 600-octet command */
	char big[700];
	snprintf(big, sizeof(big), "NOOP %0600d\\r\\n", 0);
	char payload[1200];
	snprintf(payload, sizeof(payload),
		 "EHLO c.test\\r\\nNOOP\\x00x\\r\\nMAIL FROM:<a\\x00@example.com>\\r\\n"
		 "NOOP\\rRSET\\r\\n%sMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b\\x01@example.net>\\r\\n"
		 "RCPT TO:<b@example.net> NOTIFY=NEVER\\r\\nQUIT\\r\\n", big);
	out = client("raw", port, payload, NULL);
	in_order(out, "S: 250 ENHANCEDSTATUSCODES", "S: 500 5.5.2 Error: bad character",
		 "S: 500 5.5.2 Error: bad character", "S: 500 5.5.2 Error: bad character",
		 "S: 500 5.5.2 Error: line too long", "S: 250 2.1.0", "S: 553 5.1.3",
		 "S: 555 5.5.4", "S: 221", NULL);
	free(out);
	/* a NUL in the message: refused, nothing written; a long DATA line too */
	char data[4000];
	char longl[1100];
	memset(longl, 'x', 1000);
	longl[1000] = '\0';
	snprintf(data, sizeof(data),
		 "EHLO c.test\\r\\nMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.net>\\r\\nDATA\\r\\n"
		 "a\\x00b\\r\\n.\\r\\nMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.net>\\r\\nDATA\\r\\n"
		 "%s\\r\\n.\\r\\nQUIT\\r\\n", longl);
	long long before = nmsgs(q);
	out = client("raw", port, data, NULL);
	in_order(out, "S: 354", "S: 554 5.6.0 Error: NUL", "S: 354", "S: 500 5.5.2 Error: line too long",
		 "S: 221", NULL);
	assert_int_equal(nmsgs(q), before);
	free(out);
	/* too many errors: closed with 421 */
	out = client("raw", port,
		     "X1\\r\\nX2\\r\\nX3\\r\\nX4\\r\\nX5\\r\\nX6\\r\\nX7\\r\\nX8\\r\\nX9\\r\\nX10\\r\\n"
		     "X11\\r\\nX12\\r\\nX13\\r\\nX14\\r\\nX15\\r\\nX16\\r\\nX17\\r\\nX18\\r\\nX19\\r\\n"
		     "X20\\r\\nNOOP\\r\\n", NULL);
	in_order(out, "S: 500 5.5.2", "S: 421 4.7.0 listen.test Error: too many errors", NULL);
	assert_null(strstr(out, "250 2.0.0 Ok"));
	free(out);
	rq_listen_destroy(l);
}

static void test_starttls_injection(void **st)
{
	const char *q = th_unique_queue("tls");
	char cert[512], key[512];
	snprintf(cert, sizeof(cert), "%s/tests/fixtures/tls/server.pem", th_source_root());
	snprintf(key, sizeof(key), "%s/tests/fixtures/tls/server.key", th_source_root());
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.tls_cert = cert;
	o.tls_key = key;
	struct rq_listen *l = start(&o);
	char *out = client("starttls_inject", rq_listen_port(l), NULL);
	in_order(out, "S: 250-STARTTLS", "R: starttls 220",
		 /* the injected MAIL was dropped and EHLO forgotten: RCPT is out
		  * of sequence, not the answer to a MAIL */
		 "R: rcpt-after-tls 503", "R: ehlo 250", NULL);
	assert_null(strstr(out, "2.1.0"));
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.tls, 1);
	/* reload: the same files load again */
	char err[300];
	assert_int_equal(rq_listen_reload_tls(l, err, sizeof(err)), 0);
	free(out);
	rq_listen_destroy(l);
}

static void test_limits(void **st)
{
	const char *q = th_unique_queue("limits");
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.max_size = 1000;
	o.max_recipients = 2;
	o.max_per_ip = 2;
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	char body[3000] = "";
	for (int i = 0; i < 30; i++)
		strcat(body, "0123456789012345678901234567890123456789012345678901234567890123456789\\r\\n");
	char payload[4000];
	snprintf(payload, sizeof(payload),
		 "EHLO c.test\\r\\nMAIL FROM:<a@example.com> SIZE=2000\\r\\n"
		 "MAIL FROM:<a@example.com> SIZE=900\\r\\nRCPT TO:<b1@example.net>\\r\\n"
		 "RCPT TO:<b2@example.net>\\r\\nRCPT TO:<b3@example.net>\\r\\nDATA\\r\\n%s.\\r\\n"
		 "QUIT\\r\\n", body);
	long long before = nmsgs(q);
	char *out = client("raw", port, payload, NULL);
	in_order(out, "S: 250-SIZE 1000", "S: 552 5.3.4", "S: 250 2.1.0", "S: 250 2.1.5",
		 "S: 250 2.1.5", "S: 452 4.5.3", "S: 354", "S: 552 5.3.4", "S: 221", NULL);
	assert_int_equal(nmsgs(q), before);
	free(out);
	/* two recipients are fine */
	out = client("smtplib", port, "a@example.com", "b1@example.net,b2@example.net",
		     "Subject: s\\r\\n\\r\\nsmall\\r\\n", NULL);
	in_order(out, "rcpt 250", "rcpt 250", "data 250", NULL);
	free(out);
	/* per address: the third connection gets 421 */
	out = client("conns", port, "3", NULL);
	in_order(out, "R: conn0 220 ", "R: conn1 220 ", "R: conn2 421 4.7.0", NULL);
	free(out);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_PER_IP], 1);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_SIZE], 2);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_RECIPIENTS], 1);
	rq_listen_destroy(l);
}

static void make_credentials(void)
{
	char err[300];
	snprintf(credfile, sizeof(credfile), "%s/users", tmpdir);
	char *h = rq_credentials_hash("s3cret pass", 11, err, sizeof(err));
	if (!h)
		fail_msg("hash: %s", err);
	if (rq_credentials_file_set(credfile, "alice@example.com", h, err, sizeof(err)) != 0)
		fail_msg("file_set: %s", err);
	free(h);
}

static void test_auth(void **st)
{
	const char *q = th_unique_queue("auth");
	static const char *far[] = {"10.0.0.0/8"};
	char cert[512], key[512];
	snprintf(cert, sizeof(cert), "%s/tests/fixtures/tls/server.pem", th_source_root());
	snprintf(key, sizeof(key), "%s/tests/fixtures/tls/server.key", th_source_root());
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.trusted = far;
	o.ntrusted = 1;
	o.tls_cert = cert;
	o.tls_key = key;
	o.auth_file = credfile;
	o.auth_delay_ms = 300;
	o.max_bad_commands = 6;
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	/* in clear: not offered, refused */
	char *out = client("auth", port, "0", "PLAIN", "alice@example.com", "s3cret pass", NULL);
	in_order(out, "R: auth PLAIN 530", "R: mail 530", NULL);
	assert_null(strstr(out, "250-AUTH"));
	free(out);
	/* over TLS: PLAIN ok, then MAIL goes through */
	out = client("auth", port, "1", "PLAIN", "alice@example.com", "s3cret pass", NULL);
	in_order(out, "S: 250-AUTH PLAIN LOGIN", "R: auth PLAIN 235", "R: mail 250", NULL);
	free(out);
	out = client("auth", port, "1", "LOGIN", "alice@example.com", "s3cret pass", NULL);
	in_order(out, "R: auth LOGIN 235", "R: mail 250", NULL);
	free(out);
	/* wrong passwords: 535; from the fourth one each reply waits longer;
	 * after max_bad_commands the session is closed */
	out = client("auth", port, "1", "PLAIN", "alice@example.com", "nope",
		     "LOGIN", "alice@example.com", "nope", "PLAIN", "bob@example.com", "x",
		     "PLAIN", "alice@example.com", "nope", "PLAIN", "alice@example.com", "nope",
		     "PLAIN", "alice@example.com", "nope", "PLAIN", "alice@example.com", "nope", NULL);
	in_order(out, "R: auth PLAIN 535", "R: auth LOGIN 535", "R: auth PLAIN 535",
		 "R: auth PLAIN 535 ", "R: auth PLAIN 535 ", "R: auth PLAIN 535 ", NULL);
	/* fourth failure: >= 0.3 s, fifth >= 0.6 s */
	const char *p = out;
	for (int i = 0; i < 3; i++)
		p = strstr(p, "R: auth") + 1;
	char *r4 = strstr(p, "R: auth PLAIN 535 ");
	assert_non_null(r4);
	assert_true(atof(r4 + strlen("R: auth PLAIN 535 ")) >= 0.28);
	char *r5 = strstr(r4 + 1, "R: auth PLAIN 535 ");
	assert_non_null(r5);
	assert_true(atof(r5 + strlen("R: auth PLAIN 535 ")) >= 0.58);
	assert_non_null(strstr(out, "421 4.7.0"));
	free(out);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.auth_ok, 2);
	assert_true(s.auth_failed >= 6);
	/* an authenticated message carries the user in its meta */
	rq_listen_destroy(l);
}

static void test_redis_killed_mid_data(void **st)
{
	const char *q = th_unique_queue("killed");
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.enqueue_timeout_ms = 2000;
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	long long before = nmsgs(q);
	/* DATA starts, Redis goes away, the dot comes: 451 */
	char script[600], portstr[16], log[600];
	snprintf(script, sizeof(script), "%s/tests/component/listen_client.py", th_source_root());
	snprintf(portstr, sizeof(portstr), "%d", port);
	snprintf(log, sizeof(log), "%s/killed.log", tmpdir);
	char *argv[] = {"/usr/bin/python3", script, "raw", portstr,
			"EHLO c.test\\r\\nMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.net>\\r\\n"
			"DATA\\r\\nSubject: k\\r\\n\\r\\n",
			"part\\r\\n.\\r\\nQUIT\\r\\n", NULL};
	struct th_proc p;
	assert_int_equal(th_spawn(&p, argv, log), 0);
	run_until(never, NULL, 100);   /* the first part is in */
	kill(R.proc.pid, SIGKILL);
	waitpid(R.proc.pid, NULL, 0);
	assert_true(run_until(proc_done, &p, 30000));
	char *out = th_read_file(log, NULL);
	in_order(out, "S: 354", "S: 451 4.3.0", "S: 221", NULL);
	free(out);
	th_redis_restart(&R);  /* appendonly: whatever was written is back */
	assert_true(run_until(redis_ready, l, 15000));
	assert_int_equal(nmsgs(q), before);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_REDIS], 1);
	/* and it works again */
	out = client("smtplib", port, "a@example.com", "b@example.net", "Subject: again\\r\\n\\r\\nx\\r\\n",
		     NULL);
	in_order(out, "data 250 2.0.0 Ok: queued as", NULL);
	free(out);
	rq_listen_destroy(l);
}

static void test_redis_stopped_at_dot(void **st)
{
	const char *q = th_unique_queue("stopped");
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.enqueue_timeout_ms = 1500;
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	th_pause(R.proc.pid);
	char *out = client("hold", port, "5",
			   "EHLO c.test\\r\\nMAIL FROM:<a@example.com>\\r\\nRCPT TO:<b@example.net>\\r\\n"
			   "DATA\\r\\nSubject: s\\r\\n\\r\\nx\\r\\n.\\r\\nNOOP\\r\\nQUIT\\r\\n", NULL);
	kill(R.proc.pid, SIGCONT);
	/* 451 after enqueue_timeout_ms; the pipelined NOOP waited for it */
	in_order(out, "S: 354", "S: 451 4.3.0", "S: 250 2.0.0 Ok", "S: 221", NULL);
	free(out);
	/* a new queue client takes over */
	assert_true(run_until(redis_ready, l, 15000));
	out = client("smtplib", port, "a@example.com", "b@example.net", "Subject: after\\r\\n\\r\\nx\\r\\n",
		     NULL);
	in_order(out, "data 250 2.0.0 Ok: queued as", NULL);
	free(out);
	rq_listen_destroy(l);
}

static bool stopped_flag;
static void on_stopped(void *arg)
{
	stopped_flag = true;
}
static bool is_stopped(void *arg)
{
	return stopped_flag;
}

static void test_stop(void **st)
{
	const char *q = th_unique_queue("stop");
	struct rq_listen_opts o;
	opts_default(&o, q);
	struct rq_listen *l = start(&o);
	char script[600], portstr[16], log[600];
	snprintf(script, sizeof(script), "%s/tests/component/listen_client.py", th_source_root());
	snprintf(portstr, sizeof(portstr), "%d", rq_listen_port(l));
	snprintf(log, sizeof(log), "%s/stop.log", tmpdir);
	char *argv[] = {"/usr/bin/python3", script, "hold", portstr, "10",
			"EHLO c.test\\r\\nMAIL FROM:<a@example.com>\\r\\n", NULL};
	struct th_proc p;
	assert_int_equal(th_spawn(&p, argv, log), 0);
	struct rq_listen_stats s;
	for (int i = 0; i < 200; i++) {
		run_until(never, NULL, 20);
		rq_listen_get_stats(l, &s);
		if (s.commands >= 2)
			break;
	}
	stopped_flag = false;
	rq_listen_stop(l, on_stopped, NULL);
	assert_true(run_until(is_stopped, NULL, 10000));
	assert_true(run_until(proc_done, &p, 15000));
	char *out = th_read_file(log, NULL);
	in_order(out, "S: 250 2.1.0", "S: 421 4.3.2 listen.test Service shutting down", NULL);
	free(out);
	rq_listen_destroy(l);
}


/* ---- password checks off the loop ---- */

struct stat_at_least {
	struct rq_listen *l;
	uint64_t pending;
};

static bool auth_pending_reached(void *arg)
{
	struct stat_at_least *w = arg;
	struct rq_listen_stats st;
	rq_listen_get_stats(w->l, &st);
	return st.auth_pending == w->pending;
}

static bool no_sessions(void *arg)
{
	struct rq_listen_stats st;
	rq_listen_get_stats(arg, &st);
	return st.sessions == 0 && st.auth_pending == 0;
}

static char *spawn_client(struct th_proc *p, const char *name, char **argv)
{
	static char log[600];
	snprintf(log, sizeof(log), "%s/%s.log", tmpdir, name);
	if (th_spawn(p, argv, log) != 0)
		fail_msg("cannot run the client");
	return log;
}

static void test_auth_threads(void **st)
{
	const char *q = th_unique_queue("authpool");
	static const char *far[] = {"10.0.0.0/8"};
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.trusted = far;
	o.ntrusted = 1;
	o.auth_file = credfile;
	o.auth_allow_plaintext = true;
	o.auth_threads = 2;
	o.auth_queue_max = 5;
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	char script[600], portstr[16];
	snprintf(script, sizeof(script), "%s/tests/component/listen_client.py", th_source_root());
	snprintf(portstr, sizeof(portstr), "%d", port);

	/* The workers start nothing while held: four sessions send AUTH, a
	 * fifth sends AUTH and goes away. Five checks wait: the queue is full. */
	rq_listen_auth_hold(l, true);
	char *many[] = {"/usr/bin/python3", script, "authmany", portstr, "4",
			"alice@example.com", "s3cret pass", NULL};
	struct th_proc pm;
	char *mlog = strdup(spawn_client(&pm, "authmany", many));
	char *fire[] = {"/usr/bin/python3", script, "fire", portstr,
			"EHLO c.test\\r\\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHMzY3JldCBwYXNz\\r\\n",
			NULL};
	struct th_proc pf;
	spawn_client(&pf, "fire", fire);
	struct stat_at_least w = {l, 5};
	assert_true(run_until(auth_pending_reached, &w, 30000));
	assert_true(run_until(proc_done, &pf, 30000));  /* that client left */

	/* The loop is free meanwhile: another connection is served, and an
	 * AUTH past the bound gets 454 at once, its session goes on. */
	char *out = client("raw", port,
			   "EHLO c.test\\r\\nNOOP\\r\\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHMzY3JldCBwYXNz\\r\\n"
			   "NOOP\\r\\nQUIT\\r\\n", NULL);
	in_order(out, "S: 250 ENHANCEDSTATUSCODES", "S: 250 2.0.0 Ok",
		 "S: 454 4.7.0 Temporary authentication failure", "S: 250 2.0.0 Ok", "S: 221", NULL);
	free(out);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.auth_ok, 0);      /* no check has come back yet */
	assert_int_equal(s.auth_failed, 0);
	assert_int_equal(s.auth_busy, 1);
	assert_int_equal(s.auth_pending, 5);
	assert_true(th_alive(&pm));          /* the four still wait for their 235 */

	/* Released: every check comes back; the session that left is freed
	 * only then (ASan would see a use after free). */
	rq_listen_auth_hold(l, false);
	assert_true(run_until(proc_done, &pm, 60000));
	out = th_read_file(mlog, NULL);
	in_order(out, "R: auth0 235", "R: noop0 250", "R: auth1 235", "R: noop1 250",
		 "R: auth2 235", "R: noop2 250", "R: auth3 235", "R: noop3 250", NULL);
	free(out);
	free(mlog);
	assert_true(run_until(no_sessions, l, 30000));
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.auth_ok, 4);     /* the fifth session was gone */

	/* Stop while a check is in flight: the answer first, then 421. */
	rq_listen_auth_hold(l, true);
	char *hold[] = {"/usr/bin/python3", script, "hold", portstr, "20",
			"EHLO c.test\\r\\nAUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHMzY3JldCBwYXNz\\r\\n",
			NULL};
	struct th_proc ph;
	char *hlog = strdup(spawn_client(&ph, "authstop", hold));
	w.pending = 1;
	assert_true(run_until(auth_pending_reached, &w, 30000));
	stopped_flag = false;
	rq_listen_stop(l, on_stopped, NULL);
	run_until(never, NULL, 100);
	assert_false(stopped_flag);          /* the session waits for its check */
	rq_listen_auth_hold(l, false);
	assert_true(run_until(is_stopped, NULL, 30000));
	assert_true(run_until(proc_done, &ph, 30000));
	out = th_read_file(hlog, NULL);
	in_order(out, "S: 235 2.7.0", "S: 421 4.3.2 listen.test Service shutting down", NULL);
	free(out);
	free(hlog);
	rq_listen_destroy(l);
}

/* Destroyed with checks queued and running: nothing leaks, nothing hangs. */
static void test_auth_destroy_in_flight(void **st)
{
	const char *q = th_unique_queue("authdestroy");
	static const char *far[] = {"10.0.0.0/8"};
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.trusted = far;
	o.ntrusted = 1;
	o.auth_file = credfile;
	o.auth_allow_plaintext = true;
	o.auth_threads = 1;
	struct rq_listen *l = start(&o);
	char script[600], portstr[16];
	snprintf(script, sizeof(script), "%s/tests/component/listen_client.py", th_source_root());
	snprintf(portstr, sizeof(portstr), "%d", rq_listen_port(l));
	char *many[] = {"/usr/bin/python3", script, "authmany", portstr, "3",
			"alice@example.com", "wrong", NULL};
	struct th_proc pm;
	spawn_client(&pm, "authdestroy", many);
	struct stat_at_least w = {l, 3};
	rq_listen_auth_hold(l, true);
	assert_true(run_until(auth_pending_reached, &w, 30000));
	rq_listen_auth_hold(l, false);       /* one may be running now */
	rq_listen_destroy(l);
	assert_true(run_until(proc_done, &pm, 30000));
}

static void test_implicit_tls(void **st)
{
	const char *q = th_unique_queue("implicit");
	char cert[512], key[512], ca[512];
	snprintf(cert, sizeof(cert), "%s/tests/fixtures/tls/server.pem", th_source_root());
	snprintf(key, sizeof(key), "%s/tests/fixtures/tls/server.key", th_source_root());
	snprintf(ca, sizeof(ca), "%s/tests/fixtures/tls/ca.pem", th_source_root());
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.tls_cert = cert;
	o.tls_key = key;
	o.implicit_tls = true;
	o.max_connections = 2;
	o.max_per_ip = 100;
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	char *out = client("ssl", port, ca, "app@example.com", "rcpt@example.net",
			   "Subject: implicit\\r\\n\\r\\nover TLS\\r\\n", NULL);
	in_order(out, "R: tls TLSv1.", "R: esmtp=", "R: mail 250", "R: rcpt 250",
		 "R: data 250 2.0.0 Ok: queued as ", NULL);
	/* no STARTTLS inside TLS */
	assert_null(strstr(out, "starttls"));
	char id[64];
	queued_id(out, 0, id, sizeof(id));
	char *body = hget(q, id, "body", NULL);
	assert_non_null(strstr(body, "(relayq) with ESMTPS for <rcpt@example.net>"));
	free(body);
	free(out);
	/* max_connections on an implicit-TLS listener: the third connection
	 * completes its handshake and reads 421, not a bare close */
	out = client("sslconns", port, ca, "3", NULL);
	in_order(out, "R: conn0 220 ", "R: conn1 220 ",
		 "R: conn2 421 4.7.0 listen.test Error: too many connections", NULL);
	free(out);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_CONNECTIONS], 1);
	assert_true(s.tls >= 4);
	assert_true(run_until(no_sessions, l, 30000));
	rq_listen_destroy(l);
}

static void test_max_connections_and_commands(void **st)
{
	const char *q = th_unique_queue("maxconn");
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.max_connections = 2;
	o.max_per_ip = 100;
	o.max_commands = 10;
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	/* in total (not per address): the third gets 421 */
	char *out = client("conns", port, "3", NULL);
	in_order(out, "R: conn0 220 ", "R: conn1 220 ",
		 "R: conn2 421 4.7.0 listen.test Error: too many connections", NULL);
	assert_null(strstr(out, "from your address"));
	free(out);
	assert_true(run_until(no_sessions, l, 30000));
	/* max_commands: EHLO and nine NOOPs are answered, the eleventh
	 * command closes the session */
	char payload[400] = "EHLO c.test\\r\\n";
	for (int i = 0; i < 11; i++)
		strcat(payload, "NOOP\\r\\n");
	out = client("raw", port, payload, NULL);
	const char *p = out;
	int oks = 0;
	while ((p = strstr(p, "S: 250 2.0.0 Ok")))
		oks++, p++;
	assert_int_equal(oks, 9);
	in_order(out, "S: 250 ENHANCEDSTATUSCODES", "S: 421 4.7.0 listen.test Error: too many commands",
		 NULL);
	free(out);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_CONNECTIONS], 1);
	rq_listen_destroy(l);
}

static void test_ten_thousand_rcpts(void **st)
{
	const char *q = th_unique_queue("manyrcpt");
	struct rq_listen_opts o;
	opts_default(&o, q);   /* max_recipients: the default, 1000 */
	o.max_commands = 20000; /* the default (10000) would end the session first */
	struct rq_listen *l = start(&o);
	char *out = client("manyrcpt", rq_listen_port(l), "10000", NULL);
	in_order(out, "R: rcpt-250 1000", "R: rcpt-452 9000", "S: 354 ",
		 "S: 250 2.0.0 Ok: queued as ", "S: 221", NULL);
	char id[64];
	queued_id(out, 0, id, sizeof(id));
	redisReply *r;
	char key[200];
	snprintf(key, sizeof(key), "relayq:{%s}:msg:%s", q, id);
	r = cmd("EVAL %s 1 %s", "return #cjson.decode(redis.call('HGET', KEYS[1], 'to'))", key);
	assert_int_equal(r->type, REDIS_REPLY_INTEGER);
	assert_int_equal(r->integer, 1000);
	freeReplyObject(r);
	char *to = hget(q, id, "to", NULL);
	assert_non_null(strstr(to, "\"r0@example.net\""));
	assert_non_null(strstr(to, "\"r999@example.net\""));
	assert_null(strstr(to, "\"r1000@example.net\""));
	free(to);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_RECIPIENTS], 9000);
	assert_int_equal(s.messages, 1);
	free(out);
	rq_listen_destroy(l);
}

static void test_slowloris(void **st)
{
	const char *q = th_unique_queue("slow");
	struct rq_listen_opts o;
	opts_default(&o, q);
	o.timeout_ms = 2000;
	struct rq_listen *l = start(&o);
	/* one byte a second: the bytes do not restart the command timeout */
	char *out = client("slow", rq_listen_port(l), "EHLO a-rather-slow-client.example\\r\\n", NULL);
	in_order(out, "S: 421 4.4.2 listen.test Error: timeout exceeded", "closed yes", NULL);
	assert_null(strstr(out, "sent 35 of 35"));
	assert_null(strstr(out, "S: 250"));
	free(out);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.timeouts, 1);
	assert_true(run_until(no_sessions, l, 30000));
	rq_listen_destroy(l);
}

static void test_redis_oom(void **st)
{
	const char *q = th_unique_queue("oom");
	struct rq_listen_opts o;
	opts_default(&o, q);
	struct rq_listen *l = start(&o);
	int port = rq_listen_port(l);
	/* Redis over its maxmemory, nothing to evict */
	freeReplyObject(cmd("SET oom-ballast %b", "", (size_t)0));
	freeReplyObject(cmd("SETRANGE oom-ballast %d x", 4 * 1024 * 1024));
	freeReplyObject(cmd("CONFIG SET maxmemory-policy noeviction"));
	freeReplyObject(cmd("CONFIG SET maxmemory 1mb"));
	long long before = nmsgs(q);
	char *out = client("smtplib", port, "a@example.com", "b@example.net",
			   "Subject: oom\\r\\n\\r\\nno room\\r\\n", NULL);
	freeReplyObject(cmd("CONFIG SET maxmemory 0"));
	freeReplyObject(cmd("DEL oom-ballast"));
	in_order(out, "R: data 452 4.3.1", NULL);
	assert_int_equal(nmsgs(q), before);
	free(out);
	struct rq_listen_stats s;
	rq_listen_get_stats(l, &s);
	assert_int_equal(s.rejected[RQ_LISTEN_REJ_REDIS], 1);
	/* room again: accepted */
	out = client("smtplib", port, "a@example.com", "b@example.net",
		     "Subject: room\\r\\n\\r\\nx\\r\\n", NULL);
	in_order(out, "R: data 250 2.0.0 Ok: queued as", NULL);
	free(out);
	rq_listen_destroy(l);
}

static int setup(void **st)
{
	signal(SIGPIPE, SIG_IGN);
	rq_log_init(getenv("RQ_TEST_DEBUG") ? RQ_LOG_DEBUG : RQ_LOG_ERROR, RQ_LOG_LOGFMT, stderr);
	tmpdir = th_mkdtemp("listen");
	th_redis_start(&R, true);
	base = event_base_new();
	make_credentials();
	return 0;
}

static int teardown(void **st)
{
	event_base_free(base);
	th_redis_stop(&R);
	th_rmrf(tmpdir);
	free(tmpdir);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_plain_exact),
		cmocka_unit_test(test_two_utf8_8bit),
		cmocka_unit_test(test_pipelining_and_commands),
		cmocka_unit_test(test_untrusted_needs_auth),
		cmocka_unit_test(test_hostile_lines),
		cmocka_unit_test(test_starttls_injection),
		cmocka_unit_test(test_limits),
		cmocka_unit_test(test_auth),
		cmocka_unit_test(test_stop),
		cmocka_unit_test(test_redis_stopped_at_dot),
		cmocka_unit_test(test_auth_threads),
		cmocka_unit_test(test_auth_destroy_in_flight),
		cmocka_unit_test(test_implicit_tls),
		cmocka_unit_test(test_max_connections_and_commands),
		cmocka_unit_test(test_ten_thousand_rcpts),
		cmocka_unit_test(test_slowloris),
		cmocka_unit_test(test_redis_oom),
		cmocka_unit_test(test_redis_killed_mid_data),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

/*
 * The fakesmtp fixture, driven by a plain blocking socket client (with
 * OpenSSL for TLS) in a thread while the test's event loop runs the server;
 * and fakesmtpd as a separate process.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "fakesmtp.h"
#include "harness.h"

/* ------------------------------------------------------------------ */
/* a blocking SMTP client */

struct cl {
	int fd;
	SSL_CTX *ctx;
	SSL *ssl;
	char *buf;
	size_t len;
	size_t cap;
	int reads;       /* recv calls that returned data */
	bool eof;
	bool timeout;
};

static int cl_connect(struct cl *c, int port, int timeout_ms)
{
	memset(c, 0, sizeof(*c));
	c->fd = socket(AF_INET, SOCK_STREAM, 0);
	if (c->fd < 0)
		return -1;
	if (timeout_ms <= 0)
		timeout_ms = 10000;
	struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return connect(c->fd, (struct sockaddr *)&sa, sizeof(sa));
}

static void cl_close(struct cl *c)
{
	if (c->ssl)
		SSL_free(c->ssl);
	if (c->ctx)
		SSL_CTX_free(c->ctx);
	if (c->fd >= 0)
		close(c->fd);
	free(c->buf);
	memset(c, 0, sizeof(*c));
	c->fd = -1;
}

static int cl_send(struct cl *c, const void *data, size_t n)
{
	const char *p = data;
	while (n > 0) {
		ssize_t k = c->ssl ? SSL_write(c->ssl, p, (int)n) : send(c->fd, p, n, MSG_NOSIGNAL);
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* Reads more bytes into the buffer; false on EOF, error or timeout. */
static bool cl_fill(struct cl *c)
{
	if (c->cap - c->len < 65536) {
		c->cap = c->cap ? c->cap * 2 : 131072;
		c->buf = realloc(c->buf, c->cap);
	}
	ssize_t k = c->ssl ? SSL_read(c->ssl, c->buf + c->len, 65536) :
		recv(c->fd, c->buf + c->len, 65536, 0);
	if (k <= 0) {
		if (!c->ssl && k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			c->timeout = true;
		else
			c->eof = true;
		return false;
	}
	c->len += (size_t)k;
	c->reads++;
	return true;
}

/* One complete reply (every line, CRLF kept), malloc'd; NULL on EOF or
 * timeout. */
static char *cl_reply(struct cl *c)
{
	size_t pos = 0;
	for (;;) {
		char *nl = c->len > pos ? memchr(c->buf + pos, '\n', c->len - pos) : NULL;
		if (!nl) {
			if (!cl_fill(c))
				return NULL;
			continue;
		}
		size_t end = (size_t)(nl - c->buf) + 1;
		bool last = end - pos < 4 || c->buf[pos + 3] != '-';
		pos = end;
		if (last)
			break;
	}
	char *r = malloc(pos + 1);
	memcpy(r, c->buf, pos);
	r[pos] = '\0';
	memmove(c->buf, c->buf + pos, c->len - pos);
	c->len -= pos;
	return r;
}

/* TLS on the connection, verifying the chain against the test CA and the
 * name host; 0, or -1 (reason in why). */
static int cl_tls(struct cl *c, const char *host, char *why, size_t whylen)
{
	c->ctx = SSL_CTX_new(TLS_client_method());
	SSL_CTX_set_verify(c->ctx, SSL_VERIFY_PEER, NULL);
	if (SSL_CTX_load_verify_locations(c->ctx, fsmtp_tls_path("ca.pem"), NULL) != 1) {
		snprintf(why, whylen, "cannot load ca.pem");
		return -1;
	}
	c->ssl = SSL_new(c->ctx);
	SSL_set_tlsext_host_name(c->ssl, host);
	SSL_set1_host(c->ssl, host);
	SSL_set_fd(c->ssl, c->fd);
	if (SSL_connect(c->ssl) != 1) {
		long v = SSL_get_verify_result(c->ssl);
		snprintf(why, whylen, "handshake failed: %s",
			v != X509_V_OK ? X509_verify_cert_error_string(v) : "error");
		ERR_clear_error();
		return -1;
	}
	return 0;
}

/* ------------------------------------------------------------------ */
/* conversations: a client thread runs steps while the test's event loop
 * runs the server; results are strings checked after the join. */

#define MAX_STEPS 64

struct conv {
	int port;
	bool implicit_tls;
	const char *host;                 /* TLS name (default mx.test) */
	int timeout_ms;                   /* per read (default 10 s) */
	const char *steps[MAX_STEPS];     /* ">bytes" send, "<" read a reply,
	                                   * "T" STARTTLS handshake, "E" wait
	                                   * for the server to close */
	size_t send_len[MAX_STEPS];       /* for ">" with NULs: bytes, 0=strlen */
	char *res[MAX_STEPS];             /* one per "<", "T", "E" */
	int nres;
	int reads_last;                   /* recv calls for the last reply */
	atomic_bool done;
};

static void conv_add(struct conv *cv, char *r)
{
	if (cv->nres < MAX_STEPS)
		cv->res[cv->nres++] = r;
	else
		free(r);
}

static void *conv_thread(void *arg)
{
	struct conv *cv = arg;
	struct cl c;
	char why[256];
	const char *host = cv->host ? cv->host : "mx.test";
	if (cl_connect(&c, cv->port, cv->timeout_ms) < 0) {
		conv_add(cv, strdup("CONNECT FAILED"));
		goto done;
	}
	if (cv->implicit_tls && cl_tls(&c, host, why, sizeof(why)) < 0) {
		conv_add(cv, strdup(why));
		goto done;
	}
	for (int i = 0; i < MAX_STEPS && cv->steps[i]; i++) {
		const char *st = cv->steps[i];
		if (st[0] == '>') {
			size_t n = cv->send_len[i] ? cv->send_len[i] : strlen(st + 1);
			if (cl_send(&c, st + 1, n) < 0) {
				conv_add(cv, strdup("SEND FAILED"));
				break;
			}
		} else if (st[0] == '<') {
			int before = c.reads;
			char *r = cl_reply(&c);
			cv->reads_last = c.reads - before;
			conv_add(cv, r ? r : strdup(c.eof ? "EOF" : "TIMEOUT"));
		} else if (st[0] == 'T') {
			conv_add(cv, strdup(cl_tls(&c, host, why, sizeof(why)) == 0 ? "TLS OK" : why));
		} else if (st[0] == 'E') {
			while (cl_fill(&c))
				;
			conv_add(cv, strdup(c.len == 0 ? "EOF" : "EOF AFTER DATA"));
		}
	}
done:
	cl_close(&c);
	atomic_store(&cv->done, true);
	return NULL;
}

static bool conv_done(void *arg)
{
	return atomic_load(&((struct conv *)arg)->done);
}

/* Runs the conversation against s (on base) and waits for its end. */
static void converse(struct event_base *base, struct fsmtp *s, struct conv *cv)
{
	pthread_t t;
	cv->port = fsmtp_port(s);
	atomic_store(&cv->done, false);
	assert_int_equal(pthread_create(&t, NULL, conv_thread, cv), 0);
	bool ok = fsmtp_run_until(base, conv_done, cv, 60000);
	pthread_join(t, NULL);
	assert_true(ok);
}

static void conv_free(struct conv *cv)
{
	for (int i = 0; i < cv->nres; i++)
		free(cv->res[i]);
	cv->nres = 0;
}

static bool has_line(const char *reply, const char *line)
{
	size_t n = strlen(line);
	for (const char *p = reply; p && *p; ) {
		const char *nl = strstr(p, "\r\n");
		size_t len = nl ? (size_t)(nl - p) : strlen(p);
		if (len == n && !memcmp(p, line, n))
			return true;
		p = nl ? nl + 2 : NULL;
	}
	return false;
}

struct fx {
	struct event_base *base;
	struct fsmtp *s;
};

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));
	f->base = event_base_new();
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;
	fsmtp_destroy(f->s);
	event_base_free(f->base);
	free(f);
	return 0;
}

#define EHLO_STEPS "<", ">EHLO client.test\r\n", "<"

/* ------------------------------------------------------------------ */

static void ehlo_default_capabilities(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, NULL);
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">QUIT\r\n", "<", "E"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 5);
	assert_string_equal(cv.res[0], "220 mx.test ESMTP fakesmtp\r\n");
	assert_true(has_line(cv.res[1], "250-mx.test"));
	assert_true(has_line(cv.res[1], "250-PIPELINING"));
	assert_true(has_line(cv.res[1], "250-8BITMIME"));
	assert_true(has_line(cv.res[1], "250-ENHANCEDSTATUSCODES"));
	assert_null(strstr(cv.res[1], "SIZE"));
	assert_null(strstr(cv.res[1], "STARTTLS"));
	assert_null(strstr(cv.res[1], "AUTH"));
	assert_null(strstr(cv.res[1], "SMTPUTF8"));
	assert_string_equal(cv.res[2], "250 2.1.0 Ok\r\n");
	assert_string_equal(cv.res[3], "221 2.0.0 Bye\r\n");
	assert_string_equal(cv.res[4], "EOF");
	assert_true(fsmtp_wait_closed(f->s, 1, 5000));
	const struct fsmtp_conn *c = fsmtp_conn_at(f->s, 0);
	assert_non_null(c);
	assert_string_equal(c->ehlo, "client.test");
	assert_true(c->ehlo_used);
	assert_true(c->closed_by_server);
	conv_free(&cv);
}

static void ehlo_options(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base,
		"hostname other.test\npipelining off\nsize 5000\nsmtputf8 on\n"
		"enhancedstatuscodes off\n8bitmime off\nstarttls on\nauth PLAIN LOGIN\n");
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 3);
	assert_string_equal(cv.res[0], "220 other.test ESMTP fakesmtp\r\n");
	assert_true(has_line(cv.res[1], "250-other.test"));
	assert_true(has_line(cv.res[1], "250-SIZE 5000"));
	assert_true(has_line(cv.res[1], "250-SMTPUTF8"));
	assert_true(has_line(cv.res[1], "250-STARTTLS"));
	assert_true(has_line(cv.res[1], "250-AUTH PLAIN LOGIN"));
	assert_null(strstr(cv.res[1], "PIPELINING"));
	assert_null(strstr(cv.res[1], "8BITMIME"));
	assert_null(strstr(cv.res[1], "ENHANCEDSTATUSCODES"));
	/* no enhanced code in default replies */
	assert_string_equal(cv.res[2], "250 Ok\r\n");
	conv_free(&cv);
}

static void helo_fallback(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "ehlo reply 502 5.5.1 Not implemented\n");
	struct conv cv = {.steps = {EHLO_STEPS, ">HELO client.test\r\n", "<",
		">MAIL FROM:<a@example.org>\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 4);
	assert_string_equal(cv.res[1], "502 5.5.1 Not implemented\r\n");
	assert_string_equal(cv.res[2], "250 mx.test\r\n");
	assert_string_equal(cv.res[3], "250 2.1.0 Ok\r\n");
	const struct fsmtp_conn *c = fsmtp_conn_at(f->s, 0);
	assert_false(c->ehlo_used);
	conv_free(&cv);
}

static void per_recipient_replies(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base,
		"rcpt addr=unknown@example.net reply 550 5.1.1 No such user\n"
		"rcpt addr=@grey.example reply 450 4.2.0 Greylisted\n"
		"rcpt rcpt=4- reply 452 4.5.3 Too many recipients\n");
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<>\r\n", "<",
		">RCPT TO:<a@example.net>\r\n", "<",
		">RCPT TO:<Unknown@Example.NET>\r\n", "<",
		">RCPT TO:<b@grey.example>\r\n", "<",
		">RCPT TO:<c@example.net>\r\n", "<",
		">RCPT TO:<d@example.net>\r\n", "<",
		">DATA\r\n", "<", ">hello\r\n.\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 10);
	assert_string_equal(cv.res[2], "250 2.1.0 Ok\r\n");
	assert_string_equal(cv.res[3], "250 2.1.5 Ok\r\n");
	assert_string_equal(cv.res[4], "550 5.1.1 No such user\r\n");
	assert_string_equal(cv.res[5], "450 4.2.0 Greylisted\r\n");
	assert_string_equal(cv.res[6], "452 4.5.3 Too many recipients\r\n");
	assert_string_equal(cv.res[7], "452 4.5.3 Too many recipients\r\n");
	assert_string_equal(cv.res[8], "354 End data with <CR><LF>.<CR><LF>\r\n");
	assert_string_equal(cv.res[9], "250 2.0.0 Ok: queued as 1\r\n");
	const struct fsmtp_txn *t = fsmtp_last_message(f->s);
	assert_non_null(t);
	assert_string_equal(t->mail_from, "");
	assert_int_equal(t->nrcpts, 1);
	assert_string_equal(t->rcpts[0], "a@example.net");
	assert_int_equal(t->rcpt_commands, 5);
	assert_string_equal(t->content, "hello\r\n");
	conv_free(&cv);
}

static void attempt_dependent_replies(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base,
		"greeting conn=1 reply 421 4.3.2 Busy, come back later\n"
		"dot txn=1-2 reply 451 4.3.0 Try again later\n"
		"mail txn=4 times=1 reply 421 4.7.0 Too fast\n");
	/* first connection: 421 and closed */
	struct conv c1 = {.steps = {"<", "E"}};
	converse(f->base, f->s, &c1);
	assert_string_equal(c1.res[0], "421 4.3.2 Busy, come back later\r\n");
	assert_string_equal(c1.res[1], "EOF");
	conv_free(&c1);
	/* second: transactions 1 and 2 deferred at ".", 3 accepted, 4 refused */
#define TXN ">MAIL FROM:<a@example.org>\r\n", "<", ">RCPT TO:<b@example.net>\r\n", "<", \
	">DATA\r\n", "<", ">Subject: x\r\n\r\nbody\r\n.\r\n", "<"
	struct conv c2 = {.steps = {EHLO_STEPS, TXN, TXN, TXN,
		">MAIL FROM:<a@example.org>\r\n", "<", "E"}};
	converse(f->base, f->s, &c2);
	assert_int_equal(c2.nres, 2 + 3 * 4 + 2);
	assert_string_equal(c2.res[2 + 3], "451 4.3.0 Try again later\r\n");
	assert_string_equal(c2.res[2 + 4 + 3], "451 4.3.0 Try again later\r\n");
	assert_string_equal(c2.res[2 + 8 + 3], "250 2.0.0 Ok: queued as 3\r\n");
	assert_string_equal(c2.res[2 + 12], "421 4.7.0 Too fast\r\n");
	assert_string_equal(c2.res[2 + 13], "EOF");
	assert_true(fsmtp_wait_closed(f->s, 2, 5000));
	struct fsmtp_stats st;
	fsmtp_get_stats(f->s, &st);
	assert_int_equal(st.connections, 2);
	assert_int_equal(st.transactions, 3);
	assert_int_equal(st.messages, 1);
	assert_int_equal(st.rejected, 2);
	assert_int_equal(fsmtp_ntxns(f->s), 3);
	assert_int_equal(fsmtp_txn_at(f->s, 0)->final_code, 451);
	assert_false(fsmtp_txn_at(f->s, 1)->accepted);
	assert_true(fsmtp_txn_at(f->s, 2)->accepted);
	assert_int_equal(fsmtp_txn_at(f->s, 2)->seq_in_conn, 3);
	conv_free(&c2);
}

static void multiline_garbage_overlong(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base,
		"mail times=1 reply 250 2.1.0 first line\\n250 2.1.0 second line\\n250 2.1.0 last\n"
		"rcpt rcpt=1 lines=10000 reply 250 2.1.5 Ok\n"
		"rcpt rcpt=2 long=10485760 reply 250 2.1.5 Ok\n"
		"rcpt rcpt=3 raw garbage without code\\r\\n\n"
		"rset raw 250 no newline");
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">RCPT TO:<b@example.net>\r\n", "<", ">RCPT TO:<c@example.net>\r\n", "<",
		">RCPT TO:<d@example.net>\r\n", "<", ">RSET\r\n", ">QUIT\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 7);
	assert_string_equal(cv.res[2], "250-2.1.0 first line\r\n250-2.1.0 second line\r\n250 2.1.0 last\r\n");
	/* 10,000 continuation lines, then the reply */
	int lines = 0;
	for (const char *p = cv.res[3]; (p = strstr(p, "\r\n")); p += 2)
		lines++;
	assert_int_equal(lines, 10001);
	assert_memory_equal(cv.res[3], "250-continuation line 1\r\n", 25);
	assert_non_null(strstr(cv.res[3], "\r\n250 2.1.5 Ok\r\n"));
	/* one 10 MB line */
	assert_int_equal(strlen(cv.res[4]), 10485760 + 2);
	assert_memory_equal(cv.res[4], "250 2.1.5 Okxxx", 15);
	assert_string_equal(cv.res[5], "garbage without code\r\n");
	/* raw without CRLF: the client's reply reader sees it glued to 221 */
	assert_string_equal(cv.res[6], "250 no newline221 2.0.0 Bye\r\n");
	const struct fsmtp_conn *c = fsmtp_conn_at(f->s, 0);
	assert_true(c->out_len > 10485760 + 10000 * 20);
	conv_free(&cv);
}

static void stall_close_drop(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base,
		"mail conn=1 drop\nmail conn=2 close\nrcpt conn=3 stall\n");
	struct conv c1 = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<"}};
	converse(f->base, f->s, &c1);
	assert_int_equal(c1.nres, 3);
	assert_string_equal(c1.res[2], "EOF");
	conv_free(&c1);
	struct conv c2 = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<", "E"}};
	converse(f->base, f->s, &c2);
	assert_int_equal(c2.nres, 4);
	assert_string_equal(c2.res[2], "250 2.1.0 Ok\r\n");
	assert_string_equal(c2.res[3], "EOF");
	conv_free(&c2);
	/* stalled: no reply to RCPT nor to anything after it */
	struct conv c3 = {.timeout_ms = 300, .steps = {EHLO_STEPS,
		">MAIL FROM:<a@example.org>\r\n", "<", ">RCPT TO:<b@example.net>\r\n", "<",
		">QUIT\r\n", "<"}};
	converse(f->base, f->s, &c3);
	assert_int_equal(c3.nres, 5);
	assert_string_equal(c3.res[2], "250 2.1.0 Ok\r\n");
	assert_string_equal(c3.res[3], "TIMEOUT");
	assert_string_equal(c3.res[4], "TIMEOUT");
	assert_true(fsmtp_wait_closed(f->s, 3, 5000));
	assert_true(fsmtp_conn_at(f->s, 0)->closed_by_server);
	assert_true(fsmtp_conn_at(f->s, 1)->closed_by_server);
	const struct fsmtp_conn *c = fsmtp_conn_at(f->s, 2);
	assert_false(c->closed_by_server);
	/* what the stalled server received is still recorded */
	assert_non_null(strstr(c->in, "RCPT TO:<b@example.net>\r\nQUIT\r\n"));
	conv_free(&c3);
}

static void size_limit(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "size 100\n");
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org> SIZE=101\r\n", "<",
		">MAIL FROM:<a@example.org> SIZE=50\r\n", "<", ">RCPT TO:<b@example.net>\r\n", "<",
		">DATA\r\n", "<",
		">0123456789012345678901234567890123456789012345678901234567890123456789\r\n"
		"0123456789012345678901234567890123456789\r\n.\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 7);
	assert_true(has_line(cv.res[1], "250-SIZE 100"));
	assert_string_equal(cv.res[2], "552 5.3.4 Message size exceeds fixed limit\r\n");
	assert_string_equal(cv.res[3], "250 2.1.0 Ok\r\n");
	assert_string_equal(cv.res[6], "552 5.3.4 Message size exceeds fixed limit\r\n");
	struct fsmtp_stats st;
	fsmtp_get_stats(f->s, &st);
	assert_int_equal(st.messages, 0);
	assert_int_equal(st.rejected, 1);
	assert_string_equal(fsmtp_txn_at(f->s, 0)->mail_params, "SIZE=50");
	conv_free(&cv);
}

static void disconnect_mid_data(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "data drop-after=100\n");
	static char body[2001];
	memset(body, 'a', 2000);
	body[0] = '>';
	for (int i = 80; i < 2000; i += 80) {
		body[i - 1] = '\r';
		body[i] = '\n';
	}
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">RCPT TO:<b@example.net>\r\n", "<", ">DATA\r\n", "<", body, "E"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 6);
	assert_string_equal(cv.res[4], "354 End data with <CR><LF>.<CR><LF>\r\n");
	assert_string_equal(cv.res[5], "EOF");
	assert_true(fsmtp_wait_closed(f->s, 1, 5000));
	const struct fsmtp_txn *t = fsmtp_txn_at(f->s, 0);
	assert_non_null(t);
	assert_true(t->data_started);
	assert_false(t->data_complete);
	assert_false(t->accepted);
	assert_int_equal(t->raw_len, 100);
	assert_true(fsmtp_conn_at(f->s, 0)->closed_by_server);
	struct fsmtp_stats st;
	fsmtp_get_stats(f->s, &st);
	assert_int_equal(st.messages, 0);
	conv_free(&cv);
}

/* CHUNKING: BDAT chunks recorded exactly (no transparency: a "." line is
 * content), a reply per chunk, rules on stage bdat (chunk=, 4xx, drop,
 * drop-after), BDAT outside a transaction, a syntax error, and BDAT to a
 * server without CHUNKING. */
static void chunking_bdat(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "chunking on\n");
	/* two chunks pipelined: 5 octets (a dot-line and half a line), then
	 * LAST with a lone "." line, which is content here */
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">RCPT TO:<b@example.net>\r\n", "<",
		">BDAT 5\r\n.a\r\nbBDAT 6 LAST\r\nc\r\n.\r\n", "<", "<",
		">NOOP\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 7);
	assert_true(has_line(cv.res[1], "250-CHUNKING"));
	assert_string_equal(cv.res[4], "250 2.0.0 Ok: 5 octets\r\n");
	assert_string_equal(cv.res[5], "250 2.0.0 Ok: queued as 1\r\n");
	assert_string_equal(cv.res[6], "250 2.0.0 Ok\r\n");
	const struct fsmtp_txn *t = fsmtp_txn_at(f->s, 0);
	assert_non_null(t);
	assert_true(t->bdat);
	assert_int_equal(t->chunks, 2);
	assert_true(t->data_complete);
	assert_true(t->accepted);
	assert_int_equal(t->final_code, 250);
	assert_false(t->data_started);
	assert_string_equal(t->raw, ".a\r\nbc\r\n.\r\n");
	assert_string_equal(t->content, ".a\r\nbc\r\n.\r\n");
	assert_ptr_equal(fsmtp_last_message(f->s), t);
	conv_free(&cv);

	/* a refused second chunk: the third is refused too (503), the message
	 * is not accepted; DATA after BDAT is a bad sequence */
	fsmtp_must(f->s, "bdat chunk=2 reply 452 4.3.1 Insufficient system storage\n");
	struct conv c2 = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">RCPT TO:<b@example.net>\r\n", "<",
		">BDAT 3\r\nabcBDAT 3\r\ndefBDAT 0 LAST\r\n", "<", "<", "<",
		">MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 1\r\nxDATA\r\n",
		"<", "<", "<", "<", ">RSET\r\n", "<"}};
	converse(f->base, f->s, &c2);
	assert_int_equal(c2.nres, 12);
	assert_string_equal(c2.res[4], "250 2.0.0 Ok: 3 octets\r\n");
	assert_string_equal(c2.res[5], "452 4.3.1 Insufficient system storage\r\n");
	assert_string_equal(c2.res[6], "503 5.5.1 Error: a chunk of this transaction was refused\r\n");
	assert_string_equal(c2.res[9], "250 2.0.0 Ok: 1 octets\r\n");
	assert_string_equal(c2.res[10], "503 5.5.1 Error: DATA after BDAT\r\n");
	t = fsmtp_txn_at(f->s, 1);
	assert_non_null(t);
	assert_int_equal(t->chunks, 3);
	assert_false(t->accepted);
	assert_int_equal(t->final_code, 452);
	assert_string_equal(t->raw, "abcdef");
	struct fsmtp_stats st;
	fsmtp_get_stats(f->s, &st);
	assert_int_equal(st.messages, 1);
	assert_int_equal(st.rejected, 1);
	conv_free(&c2);

	/* BDAT outside a transaction: its bytes are read, 503; a bad size is a
	 * syntax error */
	fsmtp_clear_rules(f->s);
	struct conv c3 = {.steps = {EHLO_STEPS, ">BDAT 4 LAST\r\nQUIT", "<", ">BDAT 12x\r\n", "<",
		">NOOP\r\n", "<"}};
	converse(f->base, f->s, &c3);
	assert_int_equal(c3.nres, 5);
	assert_string_equal(c3.res[2], "503 5.5.1 Error: need MAIL command\r\n");
	assert_string_equal(c3.res[3], "501 5.5.4 Syntax: BDAT count [LAST]\r\n");
	assert_string_equal(c3.res[4], "250 2.0.0 Ok\r\n");
	conv_free(&c3);

	/* disconnects: after 3 bytes of the first chunk, or instead of the
	 * reply to the second */
	fsmtp_must(f->s, "bdat txn=4 chunk=1 drop-after=3\nbdat txn=5 chunk=2 drop\n");
	struct conv c4 = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">RCPT TO:<b@example.net>\r\n", "<", ">BDAT 10 LAST\r\n0123456789", "E"}};
	converse(f->base, f->s, &c4);
	assert_string_equal(c4.res[4], "EOF");
	t = fsmtp_txn_at(f->s, 3);
	assert_non_null(t);
	assert_int_equal(t->raw_len, 3);
	assert_false(t->data_complete);
	conv_free(&c4);
	struct conv c5 = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">RCPT TO:<b@example.net>\r\n", "<", ">BDAT 1\r\na", "<", ">BDAT 1 LAST\r\nb", "E"}};
	converse(f->base, f->s, &c5);
	assert_string_equal(c5.res[4], "250 2.0.0 Ok: 1 octets\r\n");
	assert_string_equal(c5.res[5], "EOF");
	conv_free(&c5);
	assert_true(fsmtp_wait_closed(f->s, 5, 5000));

	/* without CHUNKING, BDAT is an unknown command */
	fsmtp_must(f->s, "chunking off\n");
	struct conv c6 = {.steps = {EHLO_STEPS, ">BDAT 0 LAST\r\n", "<"}};
	converse(f->base, f->s, &c6);
	assert_null(strstr(c6.res[1], "CHUNKING"));
	assert_string_equal(c6.res[2], "502 5.5.2 Error: command not recognized\r\n");
	conv_free(&c6);
}

static void trickle_and_delay(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "mail trickle=20\nrcpt delay=50\n");
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 3);
	assert_string_equal(cv.res[2], "250 2.1.0 Ok\r\n");
	/* one byte every 20 ms: the client needed more than one read */
	assert_true(cv.reads_last > 1);
	conv_free(&cv);
	/* pipelined commands wait for the delayed reply, order kept */
	struct conv c2 = {.steps = {EHLO_STEPS,
		">MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nNOOP\r\n", "<", "<", "<"}};
	converse(f->base, f->s, &c2);
	assert_int_equal(c2.nres, 5);
	assert_string_equal(c2.res[2], "250 2.1.0 Ok\r\n");
	assert_string_equal(c2.res[3], "250 2.1.5 Ok\r\n");
	assert_string_equal(c2.res[4], "250 2.0.0 Ok\r\n");
	conv_free(&c2);
}

static void wire_recording(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, NULL);
	const char *pipelined = "MAIL FROM:<a@example.org> BODY=8BITMIME\r\n"
		"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n";
	const char *data = "Subject: dots\r\n\r\n..leading dot\r\n...\r\nbare\nlf\r\n.\r\n";
	char p1[512], p2[512];
	snprintf(p1, sizeof(p1), ">%s", pipelined);
	snprintf(p2, sizeof(p2), ">%s", data);
	struct conv cv = {.steps = {EHLO_STEPS, p1, "<", "<", "<", "<", p2, "<",
		">MAIL FROM:<x@example.org>\r\n", "<", ">RCPT TO:<y@example.net>\r\n", "<",
		">RSET\r\n", "<", ">QUIT\r\n", "<", "E"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 12);
	assert_string_equal(cv.res[6], "250 2.0.0 Ok: queued as 1\r\n");
	assert_true(fsmtp_wait_closed(f->s, 1, 5000));
	const struct fsmtp_conn *c = fsmtp_conn_at(f->s, 0);
	char want[2048];
	snprintf(want, sizeof(want), "EHLO client.test\r\n%s%sMAIL FROM:<x@example.org>\r\n"
		"RCPT TO:<y@example.net>\r\nRSET\r\nQUIT\r\n", pipelined, data);
	assert_int_equal(c->in_len, strlen(want));
	assert_memory_equal(c->in, want, c->in_len);
	assert_int_equal(c->max_burst, 4);
	assert_memory_equal(c->out, "220 mx.test ESMTP fakesmtp\r\n250-mx.test\r\n", 41);
	assert_int_equal(fsmtp_ntxns(f->s), 2);
	const struct fsmtp_txn *t = fsmtp_txn_at(f->s, 0);
	assert_string_equal(t->mail_from, "a@example.org");
	assert_string_equal(t->mail_params, "BODY=8BITMIME");
	assert_int_equal(t->burst_at_mail, 4);
	assert_int_equal(t->nrcpts, 2);
	assert_string_equal(t->rcpts[1], "c@example.net");
	assert_string_equal(t->raw, "Subject: dots\r\n\r\n..leading dot\r\n...\r\nbare\nlf\r\n");
	assert_string_equal(t->content, "Subject: dots\r\n\r\n.leading dot\r\n..\r\nbare\nlf\r\n");
	assert_true(t->data_complete);
	const struct fsmtp_txn *t2 = fsmtp_txn_at(f->s, 1);
	assert_int_equal(t2->burst_at_mail, 1);
	assert_true(t2->rset);
	assert_false(t2->data_started);
	conv_free(&cv);
}

static void starttls_with_test_ca(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "starttls on\n");
	struct conv cv = {.steps = {EHLO_STEPS, ">STARTTLS\r\n", "<", "T",
		">EHLO client.test\r\n", "<", ">MAIL FROM:<secret@example.org>\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 6);
	assert_true(has_line(cv.res[1], "250-STARTTLS"));
	assert_string_equal(cv.res[2], "220 2.0.0 Ready to start TLS\r\n");
	assert_string_equal(cv.res[3], "TLS OK");
	assert_null(strstr(cv.res[4], "STARTTLS"));
	assert_string_equal(cv.res[5], "250 2.1.0 Ok\r\n");
	const struct fsmtp_conn *c = fsmtp_conn_at(f->s, 0);
	assert_true(c->tls);
	assert_true(c->starttls);
	assert_int_equal(c->starttls_leftover, 0);
	/* recorded after decryption */
	assert_non_null(strstr(c->in, "STARTTLS\r\nEHLO client.test\r\nMAIL FROM:<secret@example.org>\r\n"));
	conv_free(&cv);

	/* response injection: extra bytes in the same write as the 220 */
	fsmtp_must(f->s, "starttls inject=\"250 injected\\r\\n\"");
	struct conv c2 = {.steps = {EHLO_STEPS, ">STARTTLS\r\n", "<", "<"}};
	converse(f->base, f->s, &c2);
	assert_int_equal(c2.nres, 4);
	assert_string_equal(c2.res[2], "220 2.0.0 Ready to start TLS\r\n");
	assert_string_equal(c2.res[3], "250 injected\r\n");
	conv_free(&c2);

	/* a certificate for another name fails verification */
	fsmtp_clear_rules(f->s);
	fsmtp_must(f->s, "tls-cert %s\n", fsmtp_tls_path("wrongname.pem"));
	fsmtp_must(f->s, "tls-key %s\n", fsmtp_tls_path("wrongname.key"));
	struct conv c3 = {.steps = {EHLO_STEPS, ">STARTTLS\r\n", "<", "T"}};
	converse(f->base, f->s, &c3);
	assert_int_equal(c3.nres, 4);
	assert_string_equal(c3.res[3], "handshake failed: hostname mismatch");
	conv_free(&c3);

	/* and the self-signed one is not from the CA */
	fsmtp_must(f->s, "tls-cert %s\n", fsmtp_tls_path("selfsigned.pem"));
	fsmtp_must(f->s, "tls-key %s\n", fsmtp_tls_path("selfsigned.key"));
	struct conv c4 = {.steps = {EHLO_STEPS, ">STARTTLS\r\n", "<", "T"}};
	converse(f->base, f->s, &c4);
	assert_int_equal(c4.nres, 4);
	assert_string_equal(c4.res[3], "handshake failed: self-signed certificate");
	conv_free(&c4);
	struct fsmtp_stats st;
	fsmtp_get_stats(f->s, &st);
	assert_int_equal(st.tls, 1);
}

static void implicit_tls(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "implicit-tls on\nauth PLAIN\nauth-requires-tls on\n");
	struct conv cv = {.implicit_tls = true, .host = "localhost",
		.steps = {EHLO_STEPS, ">QUIT\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 3);
	assert_string_equal(cv.res[0], "220 mx.test ESMTP fakesmtp\r\n");
	assert_true(has_line(cv.res[1], "250-AUTH PLAIN"));
	assert_string_equal(cv.res[2], "221 2.0.0 Bye\r\n");
	assert_true(fsmtp_conn_at(f->s, 0)->tls);
	assert_false(fsmtp_conn_at(f->s, 0)->starttls);
	conv_free(&cv);
}

static void auth_plain_and_login(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "auth PLAIN LOGIN\nuser alice wonderland\nrequire-auth on\n");
	/* "\0alice\0wonderland" and "\0alice\0wrong" */
	struct conv cv = {.steps = {EHLO_STEPS, ">MAIL FROM:<a@example.org>\r\n", "<",
		">AUTH PLAIN AGFsaWNlAHdyb25n\r\n", "<",
		">AUTH PLAIN\r\n", "<", ">AGFsaWNlAHdvbmRlcmxhbmQ=\r\n", "<",
		">MAIL FROM:<a@example.org>\r\n", "<"}};
	converse(f->base, f->s, &cv);
	assert_int_equal(cv.nres, 7);
	assert_true(has_line(cv.res[1], "250-AUTH PLAIN LOGIN"));
	assert_string_equal(cv.res[2], "530 5.7.0 Authentication required\r\n");
	assert_string_equal(cv.res[3], "535 5.7.8 Authentication credentials invalid\r\n");
	assert_string_equal(cv.res[4], "334 \r\n");
	assert_string_equal(cv.res[5], "235 2.7.0 Authentication successful\r\n");
	assert_string_equal(cv.res[6], "250 2.1.0 Ok\r\n");
	const struct fsmtp_conn *c = fsmtp_conn_at(f->s, 0);
	assert_string_equal(c->auth_user, "alice");
	assert_string_equal(c->auth_mech, "PLAIN");
	assert_int_equal(c->auth_failures, 1);
	conv_free(&cv);

	/* LOGIN: "alice" / "wonderland" */
	struct conv c2 = {.steps = {EHLO_STEPS, ">AUTH LOGIN\r\n", "<", ">YWxpY2U=\r\n", "<",
		">d29uZGVybGFuZA==\r\n", "<"}};
	converse(f->base, f->s, &c2);
	assert_int_equal(c2.nres, 5);
	assert_string_equal(c2.res[2], "334 VXNlcm5hbWU6\r\n");
	assert_string_equal(c2.res[3], "334 UGFzc3dvcmQ6\r\n");
	assert_string_equal(c2.res[4], "235 2.7.0 Authentication successful\r\n");
	assert_string_equal(fsmtp_conn_at(f->s, 1)->auth_mech, "LOGIN");
	conv_free(&c2);

	/* not over plaintext when configured so */
	fsmtp_must(f->s, "auth-requires-tls on");
	struct conv c3 = {.steps = {EHLO_STEPS, ">AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=\r\n", "<"}};
	converse(f->base, f->s, &c3);
	assert_int_equal(c3.nres, 3);
	assert_null(strstr(c3.res[1], "AUTH"));
	assert_string_equal(c3.res[2], "538 5.7.11 Encryption required for requested authentication mechanism\r\n");
	conv_free(&c3);
	struct fsmtp_stats st;
	fsmtp_get_stats(f->s, &st);
	assert_int_equal(st.auth_ok, 2);
	assert_int_equal(st.auth_failed, 1);
}

static void concurrent_connections(void **state)
{
	struct fx *f = *state;
	f->s = fsmtp_must_start(f->base, "rcpt delay=10\n");
	enum { N = 4 };
	struct conv cv[N];
	pthread_t t[N];
	memset(cv, 0, sizeof(cv));
	for (int i = 0; i < N; i++) {
		const char *steps[] = {EHLO_STEPS, TXN, TXN, TXN, ">QUIT\r\n", "<", NULL};
		memcpy(cv[i].steps, steps, sizeof(steps));
		cv[i].port = fsmtp_port(f->s);
		assert_int_equal(pthread_create(&t[i], NULL, conv_thread, &cv[i]), 0);
	}
	assert_true(fsmtp_wait_messages(f->s, 3 * N, 30000));
	assert_true(fsmtp_wait_closed(f->s, N, 30000));
	for (int i = 0; i < N; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(cv[i].nres, 2 + 12 + 1);
		assert_string_equal(cv[i].res[14], "221 2.0.0 Bye\r\n");
		conv_free(&cv[i]);
	}
	struct fsmtp_stats st;
	fsmtp_get_stats(f->s, &st);
	assert_int_equal(st.connections, N);
	assert_int_equal(st.messages, 3 * N);
	assert_int_equal(st.active, 0);
}

static bool file_has(const char *path, const char *needle)
{
	char *s = th_read_file(path, NULL);
	bool ok = s && strstr(s, needle);
	free(s);
	return ok;
}

struct ready_arg {
	const char *log;
	int port;
};

static bool daemon_ready(void *arg)
{
	struct ready_arg *r = arg;
	char *s = th_read_file(r->log, NULL);
	const char *p = s ? strstr(s, "ready ") : NULL;
	if (p)
		r->port = atoi(p + 6);
	free(s);
	return p && r->port > 0;
}

static bool msg_file_exists(void *arg)
{
	struct stat st;
	return stat(arg, &st) == 0;
}

static void fakesmtpd_process(void **state)
{
	(void)state;
	char *dir = th_mkdtemp("fakesmtpd");
	char log[512], rec[512], scen[512], bin[512], path[600];
	snprintf(log, sizeof(log), "%s/out.log", dir);
	snprintf(rec, sizeof(rec), "%s/rec", dir);
	snprintf(scen, sizeof(scen), "%s/scenario", dir);
	snprintf(bin, sizeof(bin), "%s/tests/fakesmtpd", th_build_root());
	FILE *sf = fopen(scen, "w");
	assert_non_null(sf);
	fputs("# rejects one address, defers the first attempt\n"
		"rcpt addr=unknown@example.net reply 550 5.1.1 No such user\n"
		"dot txn=1 reply 451 4.3.0 Try again later\n", sf);
	fclose(sf);
	char *argv[] = {bin, "--listen", "127.0.0.1:0", "--scenario", scen, "--record", rec,
		"--size", "100000", "--no-pipelining", NULL};
	struct th_proc p;
	assert_int_equal(th_spawn(&p, argv, log), 0);
	struct ready_arg ra = {log, 0};
	assert_true(th_wait_for(daemon_ready, &ra, 10000));

	struct conv cv = {.port = ra.port, .steps = {EHLO_STEPS, TXN, TXN,
		">MAIL FROM:<a@example.org>\r\n", "<", ">RCPT TO:<unknown@example.net>\r\n", "<",
		">QUIT\r\n", "<"}};
	conv_thread(&cv);
	assert_int_equal(cv.nres, 2 + 8 + 3);
	assert_true(has_line(cv.res[1], "250-SIZE 100000"));
	assert_null(strstr(cv.res[1], "PIPELINING"));
	assert_string_equal(cv.res[5], "451 4.3.0 Try again later\r\n");
	assert_string_equal(cv.res[9], "250 2.0.0 Ok: queued as 2\r\n");
	assert_string_equal(cv.res[11], "550 5.1.1 No such user\r\n");
	conv_free(&cv);

	snprintf(path, sizeof(path), "%s/msg-2.eml", rec);
	assert_true(th_wait_for(msg_file_exists, path, 5000));
	size_t len = 0;
	char *m = th_read_file(path, &len);
	assert_non_null(m);
	assert_string_equal(m, "Subject: x\r\n\r\nbody\r\n");
	free(m);
	snprintf(path, sizeof(path), "%s/msg-2.env", rec);
	assert_true(file_has(path, "MAIL FROM:<a@example.org>\nRCPT TO:<b@example.net>\n"));
	snprintf(path, sizeof(path), "%s/msg-1.eml", rec);
	assert_false(msg_file_exists(path));
	snprintf(path, sizeof(path), "%s/conn-1.in", rec);
	assert_true(file_has(path, "EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"));
	snprintf(path, sizeof(path), "%s/conn-1.out", rec);
	assert_true(file_has(path, "221 2.0.0 Bye\r\n"));
	snprintf(path, sizeof(path), "%s/conn-1.log", rec);
	assert_true(file_has(path, "S: 220 mx.test ESMTP fakesmtp\r\nC: EHLO client.test\r\nS: 250-mx.test\r\n"));
	snprintf(path, sizeof(path), "%s/stats", rec);
	assert_true(file_has(path, "messages=1\n"));

	int status = th_stop(&p, SIGTERM);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	th_rmrf(dir);
	free(dir);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(ehlo_default_capabilities, setup, teardown),
		cmocka_unit_test_setup_teardown(ehlo_options, setup, teardown),
		cmocka_unit_test_setup_teardown(helo_fallback, setup, teardown),
		cmocka_unit_test_setup_teardown(per_recipient_replies, setup, teardown),
		cmocka_unit_test_setup_teardown(attempt_dependent_replies, setup, teardown),
		cmocka_unit_test_setup_teardown(multiline_garbage_overlong, setup, teardown),
		cmocka_unit_test_setup_teardown(stall_close_drop, setup, teardown),
		cmocka_unit_test_setup_teardown(size_limit, setup, teardown),
		cmocka_unit_test_setup_teardown(disconnect_mid_data, setup, teardown),
		cmocka_unit_test_setup_teardown(chunking_bdat, setup, teardown),
		cmocka_unit_test_setup_teardown(trickle_and_delay, setup, teardown),
		cmocka_unit_test_setup_teardown(wire_recording, setup, teardown),
		cmocka_unit_test_setup_teardown(starttls_with_test_ca, setup, teardown),
		cmocka_unit_test_setup_teardown(implicit_tls, setup, teardown),
		cmocka_unit_test_setup_teardown(auth_plain_and_login, setup, teardown),
		cmocka_unit_test_setup_teardown(concurrent_connections, setup, teardown),
		cmocka_unit_test(fakesmtpd_process),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

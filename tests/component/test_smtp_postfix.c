/*
 * The SMTP client against real Postfix (Debian), started here on loopback:
 *  - smtp-sink: the fast path (many messages over one connection), soft and
 *    hard RCPT rejects (-r / -f), and the delivered bytes (-d dumps);
 *  - a private Postfix smtpd (its own config and queue) with an access map
 *    (550 and 450 recipients), message_size_limit and STARTTLS with the test
 *    certificate, relaying what it accepts to an smtp-sink -d, where the
 *    delivered message is checked.
 * If Postfix cannot be started the test fails (it does not skip).
 */
#include "test_smtp_common.h"

#include "relayq/message.h"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *const one[] = {"a@example.net", NULL};

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct sink {
	struct th_proc proc;
	int port;
	char dir[300];
	char log[400];
};

/* Starts smtp-sink on 127.0.0.1:port with extra options; dumps to dir/m. */
static void sink_start(struct sink *k, const char *tmp, const char *tag, const char *opt1,
		       const char *opt2)
{
	char addr[64], tmpl[400];
	memset(k, 0, sizeof(*k));
	k->port = th_free_port();
	snprintf(k->dir, sizeof(k->dir), "%s/%s", tmp, tag);
	mkdir(k->dir, 0777);
	chmod(k->dir, 0777); /* smtp-sink runs as nobody */
	snprintf(k->log, sizeof(k->log), "%s/%s.log", tmp, tag);
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", k->port);
	snprintf(tmpl, sizeof(tmpl), "%s/m.", k->dir);
	char *argv[16];
	int n = 0;
	argv[n++] = "smtp-sink";
	argv[n++] = "-c";
	argv[n++] = "-u";
	argv[n++] = "nobody";
	argv[n++] = "-d";
	argv[n++] = tmpl;
	if (opt1)
		argv[n++] = (char *)opt1;
	if (opt2)
		argv[n++] = (char *)opt2;
	argv[n++] = addr;
	argv[n++] = "100";
	argv[n] = NULL;
	if (th_spawn(&k->proc, argv, k->log) != 0 || th_wait_port(k->port, 10000) != 0) {
		char *log = th_read_file(k->log, NULL);
		fail_msg("smtp-sink could not be started (is Debian's postfix installed?): %s",
			 log ? log : "");
	}
}

static void sink_stop(struct sink *k)
{
	th_stop(&k->proc, SIGTERM);
}

/* The files smtp-sink dumped (each one message), concatenated. */
static int sink_dumps(const struct sink *k, char **all)
{
	DIR *d = opendir(k->dir);
	int n = 0;
	size_t len = 0;
	*all = calloc(1, 1);
	if (!d)
		return 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char p[700];
		snprintf(p, sizeof(p), "%s/%s", k->dir, e->d_name);
		size_t fl = 0;
		char *c = th_read_file(p, &fl);
		if (!c)
			continue;
		*all = realloc(*all, len + fl + 1);
		memcpy(*all + len, c, fl);
		len += fl;
		(*all)[len] = '\0';
		free(c);
		n++;
	}
	closedir(d);
	return n;
}

struct dump_wait {
	const struct sink *k;
	const char *needle;
};

static bool cond_dump(void *arg)
{
	struct dump_wait *w = arg;
	char *all;
	sink_dumps(w->k, &all);
	bool ok = strstr(all, w->needle) != NULL;
	free(all);
	return ok;
}

static char *tmpdir;

/* ----------------------------------------------------------------------
 * smtp-sink
 */

/* Transactions chained from the done callback, as a runner would. */
struct chain {
	struct run *r;
	int left;
	int bad;
	bool pipelined;
};

static void chain_done(struct rq_smtp_txn *t, void *arg)
{
	struct chain *c = arg;
	c->r->ndone++;
	if (t->delivered != 1 || t->pipelined != c->pipelined)
		c->bad++;
	if (--c->left > 0 && rq_smtp_send(c->r->s, t) != 0)
		c->bad++;
	if (c->left == 0)
		event_base_loopbreak(c->r->base);
}

/* Many messages over one connection (pipelined, or lock-step against
 * smtp-sink -p); the sink counts them. Prints messages per second next to
 * smtp-source's over one connection to the same sink (not asserted). */
static void fast_path(bool pipelining)
{
	struct sink k;
	memset(&k, 0, sizeof(k));
	k.port = th_free_port();
	snprintf(k.log, sizeof(k.log), "%s/fast-%d.log", tmpdir, pipelining);
	char addr[64];
	snprintf(addr, sizeof(addr), "127.0.0.1:%d", k.port);
	char *argv[] = {"smtp-sink", "-c", "-u", "nobody", pipelining ? "-c" : "-p", addr, "100", NULL};
	if (th_spawn(&k.proc, argv, k.log) != 0 || th_wait_port(k.port, 10000) != 0)
		fail_msg("smtp-sink could not be started");

	const int N = 2000;
	struct run r;
	run_init(&r);
	r.opts.max_txns = 0;
	run_connect(&r, k.port, NULL);
	wait_ready(&r);
	char body[1100];
	memset(body, 'x', sizeof(body) - 1);
	for (size_t i = 76; i < sizeof(body); i += 78)
		body[i] = '\n';
	body[sizeof(body) - 1] = '\0';
	struct chain c = {&r, N, 0, pipelining};
	txn_set(&r, "s@example.com", one, body);
	r.txn.done = chain_done;
	r.txn.arg = &c;
	double t0 = now_s();
	assert_int_equal(rq_smtp_send(r.s, &r.txn), 0);
	wait_done(&r, N);
	double ours = now_s() - t0;
	assert_int_equal(c.bad, 0);
	assert_int_equal(rq_smtp_txn_count(r.s), N);
	run_finish(&r);
	run_free_base(&r);

	/* the sink counted N messages (its counter is updated at "." and QUIT) */
	char want[32], *log = NULL;
	snprintf(want, sizeof(want), "mesg=%d", N);
	/* polled up to 30 s: a deadline, not a guess of how long it takes */
	struct timespec poll0, poll1;
	clock_gettime(CLOCK_MONOTONIC, &poll0);
	for (;;) {
		free(log);
		log = th_read_file(k.log, NULL);
		if (log && strstr(log, want))
			break;
		clock_gettime(CLOCK_MONOTONIC, &poll1);
		if (poll1.tv_sec - poll0.tv_sec > 30)
			break;
		usleep(10000);
	}
	if (!log || !strstr(log, want))
		fail_msg("smtp-sink did not count %d messages: %s", N, log ? log : "(no log)");
	free(log);

	char cmd[512];
	snprintf(cmd, sizeof(cmd),
		 "smtp-source -d -s 1 -m %d -l %zu -f s@example.com -t a@example.net 127.0.0.1:%d 2>&1",
		 N, sizeof(body) - 1, k.port);
	double t1 = now_s();
	int rc = th_run(cmd, NULL);
	double theirs = now_s() - t1;
	fprintf(stderr, "measure (%s): relayq %d msgs of %zu bytes over one connection to smtp-sink: "
			"%.3f s = %.0f msg/s; smtp-source -d: %.3f s = %.0f msg/s (rc %d); ratio %.2f\n",
		pipelining ? "pipelined" : "lock-step", N, sizeof(body) - 1, ours, N / ours, theirs,
		N / theirs, rc, (N / ours) / (N / theirs));
	sink_stop(&k);
}

static void test_sink_fast_path(void **state)
{
	fast_path(true);
	fast_path(false);
}

/* -r RCPT: soft reject (450); -f RCPT: hard reject (500). */
static void reject_case(const char *opt, int code, const char *enh)
{
	struct sink k;
	sink_start(&k, tmpdir, opt[1] == 'r' ? "soft" : "hard", opt, "RCPT");
	struct run r;
	run_init(&r);
	run_connect(&r, k.port, NULL);
	txn_set(&r, "s@example.com", one, "x\r\n");
	send_wait(&r);
	assert_rcpt(&r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, code);
	assert_string_equal(r.rcpts[0].outcome.enhanced, enh);
	assert_outcome(&r.txn.outcome, RQ_STAGE_RCPT, RQ_FAIL_NONE, code);
	/* the connection stays usable: RSET, then the next is refused the same */
	send_wait(&r);
	assert_rcpt(&r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, code);
	run_finish(&r);
	assert_outcome(&r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 221);
	run_free_base(&r);
	char *all;
	assert_int_equal(sink_dumps(&k, &all), 0);
	free(all);
	sink_stop(&k);
}

static void test_sink_soft_reject(void **state)
{
	reject_case("-r", 450, "4.3.0");
}

static void test_sink_hard_reject(void **state)
{
	reject_case("-f", 500, "5.3.0");
}

/* The bytes the sink received: dot-stuffing undone, CRLF lines. */
static void test_sink_dump_bytes(void **state)
{
	struct sink k;
	sink_start(&k, tmpdir, "dump", NULL, NULL);
	struct run r;
	run_init(&r);
	run_connect(&r, k.port, NULL);
	const char *body = "Subject: dump test\n\n.starts with a dot\n..two\nbare CR\rend of body";
	const char *const rc[] = {"x1@example.net", "x2@example.net", NULL};
	txn_set(&r, "sender@example.com", rc, body);
	send_wait(&r);
	assert_int_equal(r.txn.delivered, 2);
	run_finish(&r);
	run_free_base(&r);
	struct dump_wait w = {&k, "end of body"};
	assert_true(th_wait_for(cond_dump, &w, 10000));
	char *all;
	assert_int_equal(sink_dumps(&k, &all), 1);
	/* smtp-sink writes lines with "\n" */
	assert_non_null(strstr(all, "X-Mail-Args: <sender@example.com>"));
	assert_non_null(strstr(all, "X-Rcpt-Args: <x1@example.net>\nX-Rcpt-Args: <x2@example.net>\n"));
	assert_non_null(strstr(all, "Subject: dump test\n\n.starts with a dot\n..two\nbare CR\nend of body\n"));
	free(all);
	sink_stop(&k);
}

static char *big_body(size_t n)
{
	char *b = malloc(n + 1);
	assert_non_null(b);
	for (size_t i = 0; i < n; i++)
		b[i] = (i % 100 == 99) ? '\n' : 'z';
	b[n] = '\0';
	return b;
}

/* smtp-sink -A 0: 354, then at once 550 and no more reading. The early
 * reply is the message's outcome (the socket buffers cannot take 32 MB). */
static void test_sink_abort_mid_data(void **state)
{
	struct sink k;
	sink_start(&k, tmpdir, "abort", "-A", "0");
	struct run r;
	run_init(&r);
	short_timeouts(&r.opts, 5000);
	run_connect(&r, k.port, NULL);
	char *big = big_body(32u << 20);
	txn_set(&r, "s@example.com", one, big);
	send_wait(&r);
	assert_int_equal(r.txn.failed, 1);
	assert_int_equal(r.rcpts[0].outcome.code, 550);
	assert_int_equal(r.rcpts[0].outcome.fail, RQ_FAIL_NONE);
	assert_int_equal(r.rcpts[0].outcome.stage, RQ_STAGE_DATA);
	wait_closed(&r);
	run_finish(&r);
	run_free_base(&r);
	free(big);
	sink_stop(&k);
}

/* smtp-sink -H 5 -T 1024: no reading for 5 s after DATA, small window. The
 * body stops making progress: the block timeout, at stage data. */
static void test_sink_block_timeout(void **state)
{
	struct sink k;
	sink_start(&k, tmpdir, "slow", "-H", "5");
	struct run r;
	run_init(&r);
	/* commands may be slow on a loaded machine; only the body's is short */
	short_timeouts(&r.opts, 4000);
	r.opts.timeout.block = 500;
	r.opts.data_total = 3000;
	run_connect(&r, k.port, NULL);
	char *big = big_body(32u << 20);
	txn_set(&r, "s@example.com", one, big);
	send_wait(&r);
	assert_rcpt(&r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_DATA, RQ_FAIL_TIMEOUT, 0);
	assert_outcome(&r.txn.outcome, RQ_STAGE_DATA, RQ_FAIL_TIMEOUT, 0);
	wait_closed(&r);
	run_finish(&r);
	run_free_base(&r);
	free(big);
	sink_stop(&k);
}

/* ----------------------------------------------------------------------
 * A private Postfix smtpd relaying to an smtp-sink
 */

struct pfx {
	char dir[300];
	int port;
	int port_plain;    /* a second smtpd without STARTTLS */
	struct sink sink;
};

static struct pfx P;

static void pfx_fail(const char *what)
{
	char p[400], *log;
	snprintf(p, sizeof(p), "%s/postfix.log", P.dir);
	log = th_read_file(p, NULL);
	fail_msg("private Postfix %s. Its log:\n%s", what, log ? log : "(none)");
}

static void pfx_start(void)
{
	char cmd[2048], *out = NULL;
	snprintf(P.dir, sizeof(P.dir), "%s/postfix", tmpdir);
	sink_start(&P.sink, tmpdir, "relayed", NULL, NULL);
	P.port = th_free_port();
	do
		P.port_plain = th_free_port();
	while (P.port_plain == P.port);
	snprintf(cmd, sizeof(cmd),
		 "set -e; D='%s'; mkdir -p \"$D/conf\" \"$D/queue\" \"$D/data\"; chmod 755 \"$D\"; "
		 "chown postfix \"$D/data\"; cp /etc/postfix/master.cf \"$D/conf/\"; "
		 "cp '%s/tests/fixtures/tls/server.pem' '%s/tests/fixtures/tls/server.key' \"$D/\"; "
		 "chmod 644 \"$D/server.pem\"; chmod 600 \"$D/server.key\"; "
		 "sed -i 's/^smtp      inet  n       -       y/%d      inet  n       -       n/' \"$D/conf/master.cf\"; "
		 "grep -q '^%d ' \"$D/conf/master.cf\"; "
		 "printf '%d      inet  n       -       n       -       -       smtpd\\n"
		 "  -o smtpd_tls_security_level=none\\n' >> \"$D/conf/master.cf\"",
		 P.dir, th_source_root(), th_source_root(), P.port, P.port, P.port_plain);
	if (th_run(cmd, &out) != 0)
		fail_msg("cannot prepare the Postfix folder: %s", out ? out : "");
	free(out);
	snprintf(cmd, sizeof(cmd), "%s/conf/main.cf", P.dir);
	FILE *f = fopen(cmd, "w");
	assert_non_null(f);
	fprintf(f,
		"compatibility_level = 3.6\n"
		"queue_directory = %s/queue\n"
		"data_directory = %s/data\n"
		"maillog_file = %s/postfix.log\n"
		"maillog_file_prefixes = %s\n"
		"myhostname = mx.test\n"
		"mydestination =\n"
		"inet_interfaces = 127.0.0.1\n"
		"inet_protocols = ipv4\n"
		"mynetworks = 127.0.0.0/8\n"
		"relayhost = [127.0.0.1]:%d\n"
		"smtpd_relay_restrictions = permit_mynetworks, reject\n"
		"smtpd_recipient_restrictions = check_recipient_access inline:{ "
		"{unknown@example.net=550 5.1.1 no such user}, {grey@example.net=450 4.2.0 Greylisted} }, "
		"permit_mynetworks, reject\n"
		"message_size_limit = 200000\n"
		"smtpd_tls_cert_file = %s/server.pem\n"
		"smtpd_tls_key_file = %s/server.key\n"
		"smtpd_tls_security_level = may\n"
		"smtp_tls_security_level = none\n",
		P.dir, P.dir, P.dir, P.dir, P.sink.port, P.dir, P.dir);
	fclose(f);
	snprintf(cmd, sizeof(cmd), "postfix -c '%s/conf' start 2>&1", P.dir);
	if (th_run(cmd, &out) != 0) {
		/* the default instance may have to allow the folder */
		free(out);
		snprintf(cmd, sizeof(cmd),
			 "postconf -e 'alternate_config_directories = %s/conf' 2>&1 && "
			 "postfix -c '%s/conf' start 2>&1", P.dir, P.dir);
		if (th_run(cmd, &out) != 0) {
			fprintf(stderr, "%s\n", out ? out : "");
			pfx_fail("could not be started (postfix -c DIR start failed)");
		}
	}
	free(out);
	if (th_wait_port(P.port, 15000) != 0 || th_wait_port(P.port_plain, 15000) != 0)
		pfx_fail("does not listen");
}

static void pfx_stop(void)
{
	char cmd[512];
	snprintf(cmd, sizeof(cmd), "postfix -c '%s/conf' stop >/dev/null 2>&1", P.dir);
	th_run(cmd, NULL);
	sink_stop(&P.sink);
}

static void pfx_session(struct run *r, enum rq_tls_mode mode)
{
	run_init(r);
	short_timeouts(&r->opts, 10000);
	if (mode != RQ_TLS_NONE) {
		char ca[512];
		snprintf(ca, sizeof(ca), "%s/tests/fixtures/tls/ca.pem", th_source_root());
		r->tls = test_tls_ctx(ca);
		r->opts.tls_ctx = r->tls;
		r->opts.tls = mode;
	}
	run_connect(r, P.port, "mx.test");
}

/* STARTTLS verified against the test CA; a message relayed into the sink
 * with its bytes intact; per-recipient 550 / 450 from the access map. */
static void test_postfix_tls_and_access_map(void **state)
{
	struct run r;
	pfx_session(&r, RQ_TLS_REQUIRED);
	const char *const rc[] = {"ok@example.net", "unknown@example.net", "grey@example.net", NULL};
	const char *body = "Subject: via postfix\r\nMessage-ID: <pfx-1@relayq.test>\r\n\r\n"
			   ".dot line\r\nsecond line\r\n";
	txn_set(&r, "sender@example.com", rc, body);
	send_wait(&r);
	assert_true(rq_smtp_tls_active(r.s));
	assert_true(rq_smtp_tls_verified(r.s));
	assert_true(r.txn.pipelined);
	assert_rcpt(&r.rcpts[0], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_rcpt(&r.rcpts[1], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550);
	assert_string_equal(r.rcpts[1].outcome.enhanced, "5.1.1");
	assert_non_null(strstr(r.rcpts[1].outcome.text, "no such user"));
	assert_rcpt(&r.rcpts[2], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 450);
	assert_string_equal(r.rcpts[2].outcome.enhanced, "4.2.0");
	assert_true(rq_smtp_caps(r.s)->size_max == 200000);
	run_finish(&r);
	assert_outcome(&r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 221);
	run_free_base(&r);

	/* what Postfix relayed to the sink */
	struct dump_wait w = {&P.sink, "pfx-1@relayq.test"};
	if (!th_wait_for(cond_dump, &w, 30000))
		pfx_fail("did not relay the message to the sink within 30 s");
	char *all;
	sink_dumps(&P.sink, &all);
	assert_non_null(strstr(all, "X-Mail-Args: <sender@example.com>"));
	assert_non_null(strstr(all, "X-Rcpt-Args: <ok@example.net>"));
	assert_null(strstr(all, "unknown@example.net"));
	assert_non_null(strstr(all, "Subject: via postfix\n"));
	assert_non_null(strstr(all, "\n.dot line\nsecond line\n"));
	free(all);
}

/* A message larger than message_size_limit: refused before MAIL, 552. */
static void test_postfix_size_limit(void **state)
{
	struct run r;
	pfx_session(&r, RQ_TLS_OPPORTUNISTIC);
	size_t n = 300000;
	char *big = malloc(n + 1);
	for (size_t i = 0; i < n; i++)
		big[i] = (i % 70 == 69) ? '\n' : 'b';
	big[n] = '\0';
	txn_set(&r, "sender@example.com", one, big);
	send_wait(&r);
	assert_rcpt(&r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 552);
	assert_true(r.rcpts[0].outcome.synthetic);
	assert_string_equal(r.rcpts[0].outcome.enhanced, "5.3.4");
	assert_null(strstr(r.trace, "MAIL FROM"));
	/* the same connection still delivers a small one */
	txn_set(&r, "sender@example.com", one, "Message-ID: <pfx-2@relayq.test>\r\n\r\nsmall\r\n");
	send_wait(&r);
	assert_int_equal(r.txn.delivered, 1);
	assert_true(rq_smtp_tls_active(r.s));
	run_finish(&r);
	run_free_base(&r);
	free(big);
}

/* tls none: STARTTLS offered but not used; ten messages over one
 * connection, all relayed. */
static void test_postfix_reuse_plain(void **state)
{
	struct run r;
	pfx_session(&r, RQ_TLS_NONE);
	char body[128];
	for (int i = 0; i < 10; i++) {
		snprintf(body, sizeof(body), "Message-ID: <pfx-reuse-%d@relayq.test>\r\n\r\nn %d\r\n", i, i);
		txn_set(&r, "sender@example.com", one, body);
		send_wait(&r);
		assert_int_equal(r.txn.delivered, 1);
	}
	assert_false(rq_smtp_tls_active(r.s));
	assert_null(strstr(r.trace, "> STARTTLS"));
	assert_int_equal(rq_smtp_txn_count(r.s), 10);
	run_finish(&r);
	run_free_base(&r);
	struct dump_wait w = {&P.sink, "pfx-reuse-9@relayq.test"};
	if (!th_wait_for(cond_dump, &w, 30000))
		pfx_fail("did not relay the 10 messages within 30 s");
}

static char *pfx_log(size_t *len)
{
	char p[400];
	snprintf(p, sizeof(p), "%s/postfix.log", P.dir);
	char *log = th_read_file(p, len);
	if (!log) {
		log = calloc(1, 1);
		*len = 0;
	}
	return log;
}

struct log_wait {
	size_t from;
	int disconnects;
};

static bool cond_log(void *arg)
{
	struct log_wait *w = arg;
	size_t n;
	char *log = pfx_log(&n);
	bool ok = n >= w->from && count_str(log + w->from, " disconnect from ") >= w->disconnects;
	free(log);
	return ok;
}

/*
 * Issue 15 item 11a against Postfix's smtpd: relayq ends a connection it
 * gives up on (no AUTH mechanism offered while credentials are configured;
 * TLS required but no STARTTLS) with QUIT, and a TLS one with a
 * close_notify: Postfix logs no "lost connection after" for it. A
 * certificate that does not verify ends in the handshake with an alert.
 */
static void pfx_end_case(const char *what, int port, const char *name, bool with_auth,
			 enum rq_stage stage, enum rq_fail fail, int code, bool want_quit)
{
	size_t from;
	free(pfx_log(&from));
	struct run r;
	run_init(&r);
	short_timeouts(&r.opts, 10000);
	char ca[512];
	snprintf(ca, sizeof(ca), "%s/tests/fixtures/tls/ca.pem", th_source_root());
	r.tls = test_tls_ctx(ca);
	r.opts.tls_ctx = r.tls;
	r.opts.tls = RQ_TLS_REQUIRED;
	if (with_auth) {
		r.opts.auth_user = "user";
		r.opts.auth_password = "password";
	}
	run_connect(&r, port, name);
	txn_set(&r, "sender@example.com", one, "x\r\n");
	assert_int_equal(rq_smtp_send(r.s, &r.txn), 0);
	wait_done(&r, 1);
	wait_closed(&r);
	assert_outcome(&r.why, stage, fail, code);
	bool quit = r.trace && strstr(r.trace, "> QUIT\n< 221") != NULL;
	if (quit != want_quit)
		fail_msg("%s: QUIT %s expected; trace:\n%s", what, want_quit ? "" : "not",
			 r.trace ? r.trace : "");
	run_finish(&r);
	run_free_base(&r);
	struct log_wait w = {from, 1};
	if (!th_wait_for(cond_log, &w, 30000))
		pfx_fail("logged no disconnect within 30 s");
	size_t n;
	char *log = pfx_log(&n);
	const char *mine = log + from;
	fprintf(stderr, "postfix log for %s:\n%s", what, mine);
	if (want_quit && strstr(mine, "lost connection after"))
		fail_msg("%s: Postfix saw a lost connection:\n%s", what, mine);
	if (want_quit && !strstr(mine, "quit=1"))
		fail_msg("%s: Postfix counted no QUIT:\n%s", what, mine);
	free(log);
}

static void test_postfix_clean_ends(void **state)
{
	/* Postfix without SASL offers no AUTH: we have credentials */
	pfx_end_case("no AUTH mechanism", P.port, "mx.test", true, RQ_STAGE_AUTH, RQ_FAIL_NONE,
		     454, true);
	pfx_end_case("TLS required, no STARTTLS", P.port_plain, "mx.test", false,
		     RQ_STAGE_STARTTLS, RQ_FAIL_TLS, 0, true);
	pfx_end_case("certificate for another name", P.port, "other.test", false, RQ_STAGE_TLS,
		     RQ_FAIL_TLS, 0, false);
}

/* The dump (one file a message) holding needle, malloc'd; NULL when none. */
static char *sink_file_with(const struct sink *k, const char *needle)
{
	DIR *d = opendir(k->dir);
	char *found = NULL;
	struct dirent *e;
	while (d && !found && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char p[700];
		snprintf(p, sizeof(p), "%s/%s", k->dir, e->d_name);
		char *c = th_read_file(p, NULL);
		if (c && strstr(c, needle))
			found = c;
		else
			free(c);
	}
	if (d)
		closedir(d);
	return found;
}

/* One message with dot lines (and a line of a lone ".") and n_lines more
 * lines of 64 octets, sent in chunks of chunk bytes (0: the default);
 * Postfix relays it to the sink, where it must be ours byte for byte (the
 * sink writes LF line ends; Postfix and the sink put their own fields
 * above ours). Returns the chunks sent. */
static size_t pfx_bdat_case(const char *id, size_t n_lines, bool split_crlf, bool chunking)
{
	size_t cap = 1000 + n_lines * 70;
	char *body = malloc(cap);
	size_t n = (size_t)snprintf(body, cap,
		"Message-ID: <%s@relayq.test>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
		"From: sender@example.com\r\nTo: ok@example.net\r\nSubject: bdat %s\r\n\r\n"
		".leading dot\r\n..two dots\r\n.\r\n. dot space\r\nnot a dot\r\n", id, id);
	for (size_t i = 0; i < n_lines; i++)
		n += (size_t)snprintf(body + n, cap - n, "%s%06zu %055d\r\n",
				      i % 7 == 0 ? "." : "l", i, 0);
	struct run r;
	pfx_session(&r, RQ_TLS_NONE);
	if (split_crlf || !chunking) {
		/* the first chunk ends between the CR and the LF of the first line,
		 * and so does every one after it that lands there */
		if (split_crlf)
			r.opts.chunk_size = (size_t)(strchr(body, '\r') - body) + 1;
		r.opts.chunking = chunking;
		rq_smtp_destroy(r.s);
		r.s = NULL;
		run_connect(&r, P.port, "mx.test");
	}
	txn_set(&r, "sender@example.com", one, body);
	r.rcpts[0].addr = "ok@example.net";
	r.rcpts[0].len = strlen("ok@example.net");
	send_wait(&r);
	assert_true(rq_smtp_caps(r.s)->flags & RQ_SMTP_CAP_CHUNKING);
	if (r.txn.delivered != 1)
		fail_msg("%s: not delivered: %d %s; trace:\n%s", id, r.rcpts[0].outcome.code,
			 r.rcpts[0].outcome.text, r.trace);
	assert_int_equal(r.txn.chunked, chunking);
	size_t chunks = r.txn.chunks;
	size_t chunk = r.opts.chunk_size ? r.opts.chunk_size : RQ_SMTP_CHUNK_SIZE;
	if (chunking) {
		assert_int_equal(chunks, rq_bdat_chunks(rq_bdat_encode(body, n, NULL, 0), chunk));
		assert_null(strstr(r.trace, "> DATA"));
	} else {
		assert_null(strstr(r.trace, "> BDAT"));
	}
	run_finish(&r);
	run_free_base(&r);

	char needle[128];
	snprintf(needle, sizeof(needle), "<%s@relayq.test>", id);
	struct dump_wait w = {&P.sink, needle};
	if (!th_wait_for(cond_dump, &w, 30000))
		pfx_fail("did not relay the BDAT message within 30 s");
	char *dump = sink_file_with(&P.sink, needle);
	assert_non_null(dump);
	/* ours, CRLF as LF, from our first field to the end, and the empty
	 * line smtp-sink ends each dump with (the DATA control has it too) */
	char *lf = malloc(n + 2);
	size_t k = 0;
	for (size_t i = 0; i < n; i++)
		if (!(body[i] == '\r' && i + 1 < n && body[i + 1] == '\n'))
			lf[k++] = body[i];
	lf[k++] = '\n';
	lf[k] = '\0';
	const char *at = strstr(dump, "Message-ID: <");
	assert_non_null(at);
	if (strcmp(at, lf) != 0)
		fail_msg("%s: Postfix relayed other bytes than we sent (%zu / %zu octets):\n%s\n--- sent:\n%s",
			 id, strlen(at), k, dump, lf);
	free(lf);
	free(dump);
	free(body);
	return chunks;
}

/*
 * CHUNKING: Postfix 3.7's smtpd offers it, and relayq sends BDAT by
 * default: a small message (one BDAT LAST) with dot lines, one larger than
 * a chunk (128 KiB), and one in small chunks cut between CR and LF; the
 * bytes Postfix passed on are ours, and its log counts BDAT, not DATA.
 */
static void test_postfix_bdat(void **state)
{
	size_t from;
	free(pfx_log(&from));
	assert_int_equal(pfx_bdat_case("pfx-bdat-small", 0, false, true), 1);
	assert_int_equal(pfx_bdat_case("pfx-bdat-big", 2500, false, true), 2);
	assert_true(pfx_bdat_case("pfx-bdat-split", 40, true, true) > 50);
	struct log_wait w = {from, 3};
	if (!th_wait_for(cond_log, &w, 30000))
		pfx_fail("logged no disconnect within 30 s");
	size_t n;
	char *log = pfx_log(&n);
	const char *mine = log + from;
	for (const char *p = strstr(mine, " disconnect from "); p; p = strstr(p + 1, " disconnect from ")) {
		const char *eol = strchr(p, '\n');
		char line[512];
		snprintf(line, sizeof(line), "%.*s", eol ? (int)(eol - p) : (int)strlen(p), p);
		if (!strstr(line, " bdat=") || strstr(line, " data=") || !strstr(line, " quit=1"))
			fail_msg("Postfix's count of commands: %s", line);
	}
	if (strstr(mine, "lost connection") || strstr(mine, "warning:") || strstr(mine, "error"))
		fail_msg("Postfix logged trouble:\n%s", mine);
	free(log);
	/* the same check on a message sent with DATA: both ways store the
	 * same bytes */
	assert_int_equal(pfx_bdat_case("pfx-data-control", 10, false, false), 0);
}

static int group_setup(void **state)
{
	tmpdir = th_mkdtemp("smtp-postfix");
	chmod(tmpdir, 0755);
	pfx_start();
	return 0;
}

static int group_teardown(void **state)
{
	pfx_stop();
	th_rmrf(tmpdir);
	free(tmpdir);
	return 0;
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN); /* as relayqd does (see smtp.h) */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sink_fast_path),
		cmocka_unit_test(test_sink_soft_reject),
		cmocka_unit_test(test_sink_hard_reject),
		cmocka_unit_test(test_sink_dump_bytes),
		cmocka_unit_test(test_sink_abort_mid_data),
		cmocka_unit_test(test_sink_block_timeout),
		cmocka_unit_test(test_postfix_tls_and_access_map),
		cmocka_unit_test(test_postfix_size_limit),
		cmocka_unit_test(test_postfix_reuse_plain),
		cmocka_unit_test(test_postfix_clean_ends),
		cmocka_unit_test(test_postfix_bdat),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

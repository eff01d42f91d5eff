/*
 * The SMTP client session under faults injected by fakesmtp: a stalled
 * server (timeout), a trickling server (deadline), disconnects at every
 * stage (lost), garbage and overlong replies (protocol), each reported with
 * the right stage and class, without leak or crash.
 */
#include "test_smtp_common.h"

#include "fakesmtp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

static const char *const two[] = {"a@example.net", "b@example.net", NULL};
static const char *body1 = "Subject: hi\r\n\r\nhello\r\n";

struct fx {
	struct run r;
	struct fsmtp *f;
};

static void fx_start(struct fx *x, const char *scenario, int timeout_ms)
{
	run_init(&x->r);
	short_timeouts(&x->r.opts, timeout_ms);
	x->f = fsmtp_must_start(x->r.base, scenario);
	run_connect(&x->r, fsmtp_port(x->f), "mx.test");
}

static void fx_end(struct fx *x)
{
	run_finish(&x->r);
	fsmtp_destroy(x->f);
	run_free_base(&x->r);
}

/*
 * One transaction against a faulty server: the transaction and the session
 * end with (stage, fail); every recipient gets that outcome.
 */
static size_t fault_chunk; /* opts.chunk_size for the next fault_case (0: default) */

static void fault_case(const char *scenario, int timeout_ms, const char *body,
		       enum rq_stage stage, enum rq_fail fail, const char *text_has)
{
	struct fx x;
	run_init(&x.r);
	short_timeouts(&x.r.opts, timeout_ms);
	x.r.opts.chunk_size = fault_chunk;
	x.f = fsmtp_must_start(x.r.base, scenario);
	run_connect(&x.r, fsmtp_port(x.f), "mx.test");
	txn_set(&x.r, "s@example.com", two, body);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	wait_done(&x.r, 1);
	wait_closed(&x.r);
	if (x.r.txn.outcome.stage != stage || x.r.txn.outcome.fail != fail)
		fail_msg("scenario \"%s\": outcome stage %s fail %s (%s); expected %s %s",
			 scenario, rq_stage_name(x.r.txn.outcome.stage),
			 rq_fail_name(x.r.txn.outcome.fail), x.r.txn.outcome.text,
			 rq_stage_name(stage), rq_fail_name(fail));
	assert_int_equal(x.r.txn.failed, 2);
	for (int i = 0; i < 2; i++)
		assert_rcpt(&x.r.rcpts[i], RQ_SMTP_RCPT_FAILED, stage, fail, 0);
	assert_outcome(&x.r.why, stage, fail, 0);
	if (text_has && !strstr(x.r.why.text, text_has))
		fail_msg("scenario \"%s\": text \"%s\" lacks \"%s\"", scenario, x.r.why.text, text_has);
	assert_int_equal(rq_smtp_state(x.r.s), RQ_SMTP_ST_CLOSED);
	assert_false(rq_smtp_reusable(x.r.s));
	/* at DOT the server has the whole message: whether it took it is
	 * exactly what the client cannot know */
	if (stage != RQ_STAGE_DOT)
		assert_null(fsmtp_last_message(x.f));
	fx_end(&x);
}

/* A server that stops answering: the stage's timeout. */
static void test_stall_every_stage(void **state)
{
	fault_case("greeting stall", 600, body1, RQ_STAGE_GREETING, RQ_FAIL_TIMEOUT, "timeout");
	fault_case("ehlo stall", 600, body1, RQ_STAGE_EHLO, RQ_FAIL_TIMEOUT, "timeout");
	fault_case("pipelining off\nhelo stall\nehlo reply 500 no", 600, body1, RQ_STAGE_HELO,
		   RQ_FAIL_TIMEOUT, NULL);
	fault_case("mail stall", 600, body1, RQ_STAGE_MAIL, RQ_FAIL_TIMEOUT, NULL);
	fault_case("pipelining off\nmail stall", 600, body1, RQ_STAGE_MAIL, RQ_FAIL_TIMEOUT, NULL);
	fault_case("rcpt stall", 600, body1, RQ_STAGE_RCPT, RQ_FAIL_TIMEOUT, NULL);
	fault_case("rcpt rcpt=2 stall", 600, body1, RQ_STAGE_RCPT, RQ_FAIL_TIMEOUT, NULL);
	fault_case("data stall", 600, body1, RQ_STAGE_DATA, RQ_FAIL_TIMEOUT, NULL);
	fault_case("dot stall", 600, body1, RQ_STAGE_DOT, RQ_FAIL_TIMEOUT, NULL);
	/* BDAT: the reply to a chunk that is not the last is stage data, to
	 * LAST stage dot, pipelined or not */
	fault_case("chunking on\nbdat stall", 600, body1, RQ_STAGE_DOT, RQ_FAIL_TIMEOUT,
		   "no complete reply");
	fault_chunk = 8; /* body1 is 3 chunks */
	fault_case("chunking on\nbdat chunk=2 stall", 600, body1, RQ_STAGE_DATA, RQ_FAIL_TIMEOUT,
		   "no complete reply");
	fault_case("chunking on\npipelining off\nbdat chunk=1 stall", 600, body1, RQ_STAGE_DATA,
		   RQ_FAIL_TIMEOUT, NULL);
	fault_case("chunking on\nbdat chunk=3 stall", 600, body1, RQ_STAGE_DOT, RQ_FAIL_TIMEOUT,
		   NULL);
	fault_case("chunking on\nbdat chunk=1 drop", 600, body1, RQ_STAGE_DATA, RQ_FAIL_LOST,
		   NULL);
	fault_case("chunking on\nbdat chunk=2 drop-after=3", 600, body1, RQ_STAGE_DATA,
		   RQ_FAIL_LOST, NULL);
	fault_case("chunking on\npipelining off\nbdat chunk=3 drop", 600, body1, RQ_STAGE_DOT,
		   RQ_FAIL_LOST, NULL);
	fault_chunk = 0;
}

/* A server that answers one byte at a time, each byte well within the
 * timeout, but too slowly overall: the timeout bounds the whole reply. */
static void test_trickle_deadline(void **state)
{
	fault_case("greeting trickle=100", 400, body1, RQ_STAGE_GREETING, RQ_FAIL_TIMEOUT,
		   "no complete reply");
	fault_case("ehlo trickle=100", 400, body1, RQ_STAGE_EHLO, RQ_FAIL_TIMEOUT, "no complete reply");
	fault_case("mail trickle=100", 400, body1, RQ_STAGE_MAIL, RQ_FAIL_TIMEOUT, "no complete reply");
	fault_case("rcpt rcpt=2 trickle=100", 400, body1, RQ_STAGE_RCPT, RQ_FAIL_TIMEOUT,
		   "no complete reply");
	fault_case("pipelining off\ndata trickle=100", 400, body1, RQ_STAGE_DATA, RQ_FAIL_TIMEOUT,
		   "no complete reply");
	fault_case("dot trickle=100", 400, body1, RQ_STAGE_DOT, RQ_FAIL_TIMEOUT, "no complete reply");

	/* a trickle that ends in time is fine */
	struct fx x;
	fx_start(&x, "mail trickle=5\nrcpt trickle=5", 1000);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	fx_end(&x);
}

/* The server closes the connection at every stage: "lost". */
static void test_disconnect_every_stage(void **state)
{
	fault_case("greeting drop", 2000, body1, RQ_STAGE_GREETING, RQ_FAIL_LOST, NULL);
	fault_case("ehlo drop", 2000, body1, RQ_STAGE_EHLO, RQ_FAIL_LOST, NULL);
	fault_case("mail drop", 2000, body1, RQ_STAGE_MAIL, RQ_FAIL_LOST, NULL);
	fault_case("pipelining off\nmail drop", 2000, body1, RQ_STAGE_MAIL, RQ_FAIL_LOST, NULL);
	fault_case("pipelining off\nrcpt drop", 2000, body1, RQ_STAGE_RCPT, RQ_FAIL_LOST, NULL);
	fault_case("pipelining off\nrcpt rcpt=2 drop", 2000, body1, RQ_STAGE_RCPT, RQ_FAIL_LOST, NULL);
	fault_case("pipelining off\ndata drop", 2000, body1, RQ_STAGE_DATA, RQ_FAIL_LOST, NULL);
	fault_case("dot drop", 2000, body1, RQ_STAGE_DOT, RQ_FAIL_LOST, NULL);
	fault_case("pipelining off\ndot drop", 2000, body1, RQ_STAGE_DOT, RQ_FAIL_LOST, NULL);
}

/* Disconnect in the middle of the message data. */
static void test_disconnect_mid_data(void **state)
{
	size_t n = 4 * 1024 * 1024;
	char *big = malloc(n + 1);
	for (size_t i = 0; i < n; i++)
		big[i] = (i % 80 == 79) ? '\n' : 'm';
	big[n] = '\0';
	fault_case("data drop-after=1000", 2000, big, RQ_STAGE_DATA, RQ_FAIL_LOST, NULL);
	free(big);
}

/* Garbage and overlong replies: "protocol", the connection dropped. */
static void test_garbage(void **state)
{
	/* escapes (\\r \\n \\xHH) are the fixture's */
	fault_case("greeting raw garbage here\\r\\n", 2000, body1, RQ_STAGE_GREETING,
		   RQ_FAIL_PROTOCOL, NULL);
	fault_case("pipelining off\nmail raw 25\\r\\n", 2000, body1, RQ_STAGE_MAIL,
		   RQ_FAIL_PROTOCOL, NULL);
	fault_case("pipelining off\nmail raw 999 out of range\\r\\n", 2000, body1, RQ_STAGE_MAIL,
		   RQ_FAIL_PROTOCOL, NULL);
	fault_case("pipelining off\nrcpt raw 250-2.1.5 one\\r\\n550 5.1.1 other code\\r\\n", 2000,
		   body1, RQ_STAGE_RCPT, RQ_FAIL_PROTOCOL, NULL);
	fault_case("ehlo raw \\x01\\x02\\x03\\r\\n", 2000, body1, RQ_STAGE_EHLO,
		   RQ_FAIL_PROTOCOL, NULL);
	/* a bare CR is no line end: the line grows until the bound */
	fault_case("greeting raw 220 x\\r", 300, body1, RQ_STAGE_GREETING, RQ_FAIL_TIMEOUT, NULL);
}

static void test_overlong(void **state)
{
	/* a 10 MB line: refused as soon as the bound is passed */
	fault_case("mail long=10485760", 2000, body1, RQ_STAGE_MAIL, RQ_FAIL_PROTOCOL, "longer than");
	fault_case("greeting long=10485760", 2000, body1, RQ_STAGE_GREETING, RQ_FAIL_PROTOCOL,
		   "longer than");
	/* a line just over the bound */
	fault_case("rcpt long=3000", 2000, body1, RQ_STAGE_RCPT, RQ_FAIL_PROTOCOL, NULL);
	/* 10,000 continuation lines */
	fault_case("mail lines=10000", 2000, body1, RQ_STAGE_MAIL, RQ_FAIL_PROTOCOL, NULL);
	fault_case("ehlo lines=10000", 2000, body1, RQ_STAGE_EHLO, RQ_FAIL_PROTOCOL, NULL);

	/* within bounds: fine */
	struct fx x;
	fx_start(&x, "mail long=1000\nrcpt lines=50", 2000);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	fx_end(&x);
}

/* A reused connection found dead before the server answered anything of
 * the next transaction (no RSET probe any more: MAIL goes straight out):
 * nothing was tried, the recipients can go at once elsewhere. On a fresh
 * connection the same loss is a failure (test_disconnect_every_stage). */
static void dead_on_reuse(const char *scenario)
{
	struct fx x;
	fx_start(&x, scenario, 2000);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.not_tried, 2);
	assert_int_equal(x.r.rcpts[0].result, RQ_SMTP_RCPT_NOT_TRIED);
	assert_int_equal(x.r.rcpts[1].result, RQ_SMTP_RCPT_NOT_TRIED);
	assert_outcome(&x.r.txn.outcome, RQ_STAGE_MAIL, RQ_FAIL_LOST, 0);
	wait_closed(&x.r);
	assert_null(strstr(fsmtp_conn_at(x.f, 0)->in, "RSET"));
	fx_end(&x);
}

static void test_dead_on_reuse(void **state)
{
	dead_on_reuse("mail txn=2 drop");
	dead_on_reuse("pipelining off\nmail txn=2 drop");
}

/*
 * Issue 15 item 7: replies the server sent before the command they would
 * answer. The EHLO reply comes with "250 2.1.0 extra1" and "554 5.0.0
 * extra2" in the same write; the transaction waiting for the session must
 * not take them for its MAIL and RCPT replies: a protocol error, the
 * connection dropped before MAIL leaves, nothing of the server's words
 * recorded for any recipient.
 */
static void unsolicited_case(const char *scenario, enum rq_stage stage)
{
	struct fx x;
	const char *const r[] = {"a@example.net", "b@example.net", "c@example.net", NULL};
	fx_start(&x, scenario, 2000);
	txn_set(&x.r, "s@example.com", r, body1);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0); /* waits for ready */
	wait_done(&x.r, 1);
	wait_closed(&x.r);
	assert_int_equal(x.r.txn.delivered, 0);
	assert_int_equal(x.r.txn.failed, 3);
	assert_outcome(&x.r.txn.outcome, stage, RQ_FAIL_PROTOCOL, 0);
	assert_non_null(strstr(x.r.txn.outcome.text, "unsolicited"));
	for (int i = 0; i < 3; i++) {
		assert_rcpt(&x.r.rcpts[i], RQ_SMTP_RCPT_FAILED, stage, RQ_FAIL_PROTOCOL, 0);
		assert_null(strstr(x.r.rcpts[i].outcome.text, "extra"));
	}
	assert_outcome(&x.r.why, stage, RQ_FAIL_PROTOCOL, 0);
	assert_null(fsmtp_last_message(x.f));
	fx_end(&x);
}

static void test_unsolicited_replies(void **state)
{
	/* pipelined: MAIL+RCPTs+DATA would have been matched with them */
	unsolicited_case("ehlo inject=\"250 2.1.0 extra1\\r\\n554 5.0.0 extra2\\r\\n\"",
			 RQ_STAGE_MAIL);
	unsolicited_case("pipelining off\nehlo inject=\"250 2.1.0 extra1\\r\\n554 5.0.0 extra2\\r\\n\"",
			 RQ_STAGE_MAIL);
	/* lock-step: a second reply to MAIL would be taken for the RCPT's */
	unsolicited_case("pipelining off\nmail inject=\"554 5.0.0 extra2\\r\\n\"", RQ_STAGE_RCPT);
	/* even a partial line that was waiting */
	unsolicited_case("pipelining off\nmail inject=\"554 5.0\"", RQ_STAGE_RCPT);

	/* nothing went out after the unsolicited bytes were seen */
	struct fx x;
	fx_start(&x, "ehlo inject=\"250 2.1.0 extra1\\r\\n554 5.0.0 extra2\\r\\n\"", 2000);
	txn_set(&x.r, "s@example.com", two, body1);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	wait_done(&x.r, 1);
	wait_closed(&x.r);
	assert_true(fsmtp_wait_closed(x.f, 1, 10000));
	assert_null(strstr(fsmtp_conn_at(x.f, 0)->in, "MAIL FROM"));
	fx_end(&x);

	/* when idle (no transaction waiting) they are just as unexpected */
	fx_start(&x, "ehlo inject=\"250 2.1.0 extra1\\r\\n\"", 2000);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_NONE, RQ_FAIL_PROTOCOL, 0);
	fx_end(&x);
}

/*
 * Issue 15 item 8: the configured timeout of a stage is the total deadline
 * of its reply. Options as relayqd builds them (defaults, then only the
 * configured greeting timeout); a server dripping a long greeting one byte
 * every 50 ms, each byte far within the timeout: the session ends with
 * "timeout" before the whole greeting arrived.
 */
static void test_trickle_configured_timeout(void **state)
{
	struct run r;
	run_init(&r);
	rq_smtp_opts_init(&r.opts);
	r.opts.helo_name = "client.test";
	r.opts.timeout.greeting = 1000;
	/* a 400-byte greeting line: 20 s at this pace */
	struct fsmtp *f = fsmtp_must_start(r.base, "greeting trickle=50 long=400");
	run_connect(&r, fsmtp_port(f), "mx.test");
	wait_closed(&r);
	assert_outcome(&r.why, RQ_STAGE_GREETING, RQ_FAIL_TIMEOUT, 0);
	assert_non_null(strstr(r.why.text, "timeout"));
	/* the client never saw a complete line; the server had not sent it all */
	assert_true(r.trace == NULL || strstr(r.trace, "< ") == NULL);
	assert_true(fsmtp_wait_closed(f, 1, 10000));
	const struct fsmtp_conn *c = fsmtp_conn_at(f, 0);
	assert_non_null(c);
	assert_true(c->out_len < 400);
	assert_false(c->closed_by_server);
	run_finish(&r);
	fsmtp_destroy(f);
	run_free_base(&r);
}

/* A server 421 mid-transaction (closing after it), lock-step and pipelined. */
static void case_421(const char *scenario)
{
	struct fx x;
	fx_start(&x, scenario, 2000);
	const char *const r[] = {"a@example.net", "b@example.net", "c@example.net", NULL};
	txn_set(&x.r, "s@example.com", r, body1);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	wait_done(&x.r, 1);
	wait_closed(&x.r);
	assert_int_equal(x.r.txn.delivered, 0);
	/* the 421 is every open recipient's outcome: a (accepted), b (got it),
	 * c (not sent yet) */
	for (int i = 0; i < 3; i++)
		assert_rcpt(&x.r.rcpts[i], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 421);
	assert_outcome(&x.r.why, RQ_STAGE_RCPT, RQ_FAIL_NONE, 421);
	assert_null(fsmtp_last_message(x.f));
	fx_end(&x);
}

static void test_421_mid_session(void **state)
{
	case_421("pipelining off\nrcpt rcpt=2 reply 421 4.4.2 closing");
	case_421("rcpt rcpt=2 reply 421 4.4.2 closing");
}

/* 421 to MAIL, pipelined: every recipient gets it, not "lost". */
static void test_421_mail_pipelined(void **state)
{
	struct fx x;
	fx_start(&x, "mail reply 421 4.3.2 system shutting down", 2000);
	txn_set(&x.r, "s@example.com", two, body1);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	wait_done(&x.r, 1);
	wait_closed(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 421);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 421);
	fx_end(&x);
}

/* Connect timeout: a listener whose accept queue is full (Linux drops the
 * SYN, so connect neither succeeds nor fails). */
static void test_connect_timeout(void **state)
{
	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t al = sizeof(a);
	assert_int_equal(bind(lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(lfd, 0), 0);
	assert_int_equal(getsockname(lfd, (struct sockaddr *)&a, &al), 0);
	int fill[4];
	for (int i = 0; i < 4; i++) {
		fill[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		connect(fill[i], (struct sockaddr *)&a, sizeof(a));
	}
	struct run r;
	run_init(&r);
	short_timeouts(&r.opts, 300);
	struct rq_smtp_host h;
	assert_int_equal(rq_smtp_host_set(&h, "127.0.0.1", ntohs(a.sin_port), NULL), 0);
	run_connect_hosts(&r, &h, 1);
	wait_closed(&r);
	assert_outcome(&r.why, RQ_STAGE_CONNECT, RQ_FAIL_TIMEOUT, 0);
	run_finish(&r);
	run_free_base(&r);
	for (int i = 0; i < 4; i++)
		close(fill[i]);
	close(lfd);
}

/* Every fault at every stage, pipelined and lock-step, two transactions:
 * whatever happens, each transaction's done comes exactly once with a
 * result for every recipient, closed comes exactly once, nothing leaks. */
static void test_fault_matrix(void **state)
{
	static const char *const stages[] = {"greeting", "ehlo", "mail", "rcpt", "data",
					     "dot", "rset", "quit"};
	static const char *const actions[] = {
		"stall", "drop", "close", "raw garbage\\r\\n", "long=5000", "lines=200",
		"reply 421 4.3.2 bye", "reply 500 5.5.1 no", "reply 250 2.0.0 odd",
		"trickle=30",
	};
	int runs = 0;
	for (int p = 0; p < 2; p++)
	for (size_t si = 0; si < sizeof(stages) / sizeof(stages[0]); si++)
	for (size_t ai = 0; ai < sizeof(actions) / sizeof(actions[0]); ai++) {
		char sc[256];
		snprintf(sc, sizeof(sc), "pipelining %s\n%s txn=2- %s", p ? "on" : "off",
			 stages[si], actions[ai]);
		if (strcmp(stages[si], "greeting") == 0 || strcmp(stages[si], "ehlo") == 0 ||
		    strcmp(stages[si], "quit") == 0)
			snprintf(sc, sizeof(sc), "pipelining %s\n%s %s", p ? "on" : "off",
				 stages[si], actions[ai]);
		struct fx x;
		fx_start(&x, sc, 150);
		const char *const r3[] = {"a@example.net", "b@example.net", "c@example.net", NULL};
		for (int t = 0; t < 2; t++) {
			txn_set(&x.r, "s@example.com", r3, body1);
			int before = x.r.ndone;
			if (rq_smtp_send(x.r.s, &x.r.txn) != 0)
				break;
			wait_done(&x.r, before + 1);
			assert_int_equal(x.r.ndone, before + 1);
			assert_int_equal(x.r.txn.delivered + x.r.txn.failed + x.r.txn.not_tried, 3);
			for (int i = 0; i < 3; i++) {
				const struct rq_smtp_rcpt *rc = &x.r.rcpts[i];
				if (rc->result == RQ_SMTP_RCPT_NOT_TRIED)
					continue;
				if (rc->outcome.stage == RQ_STAGE_NONE)
					fail_msg("%s: recipient %d without a stage", sc, i);
				if (rc->result == RQ_SMTP_RCPT_DELIVERED &&
				    (rc->outcome.code < 200 || rc->outcome.code > 299))
					fail_msg("%s: delivered with %d", sc, rc->outcome.code);
				if (rc->result == RQ_SMTP_RCPT_FAILED && rc->outcome.fail == RQ_FAIL_NONE &&
				    rc->outcome.code < 400)
					fail_msg("%s: failed with %d (%s)", sc, rc->outcome.code,
						 rc->outcome.text);
			}
		}
		if (x.r.nclosed == 0) {
			rq_smtp_quit(x.r.s);
			wait_closed(&x.r);
		}
		/* one more loop turn: no second closed */
		event_base_loop(x.r.base, EVLOOP_NONBLOCK);
		assert_int_equal(x.r.nclosed, 1);
		fx_end(&x);
		runs++;
	}
	assert_int_equal(runs, 160);
}

/* The same with CHUNKING: every fault at the BDAT replies (three chunks of
 * 8 bytes, pipelined and lock-step) and at the stages around them. */
static void test_bdat_fault_matrix(void **state)
{
	static const char *const rules[] = {"bdat", "bdat chunk=1", "bdat chunk=2",
					    "bdat chunk=3", "rcpt", "rset"};
	static const char *const actions[] = {
		"stall", "drop", "close", "raw garbage\\r\\n", "long=5000", "lines=200",
		"reply 421 4.3.2 bye", "reply 500 5.5.1 no", "reply 452 4.3.1 full",
		"reply 354 odd", "trickle=30", "drop-after=2",
	};
	int runs = 0;
	for (int p = 0; p < 2; p++)
	for (size_t si = 0; si < sizeof(rules) / sizeof(rules[0]); si++)
	for (size_t ai = 0; ai < sizeof(actions) / sizeof(actions[0]); ai++) {
		char sc[256];
		snprintf(sc, sizeof(sc), "chunking on\npipelining %s\n%s txn=2- %s",
			 p ? "on" : "off", rules[si], actions[ai]);
		struct fx x;
		run_init(&x.r);
		short_timeouts(&x.r.opts, 150);
		x.r.opts.chunk_size = 8;
		x.f = fsmtp_must_start(x.r.base, sc);
		run_connect(&x.r, fsmtp_port(x.f), "mx.test");
		const char *const r3[] = {"a@example.net", "b@example.net", "c@example.net", NULL};
		for (int t = 0; t < 3; t++) {
			txn_set(&x.r, "s@example.com", r3, body1);
			int before = x.r.ndone;
			if (rq_smtp_send(x.r.s, &x.r.txn) != 0)
				break;
			wait_done(&x.r, before + 1);
			assert_int_equal(x.r.ndone, before + 1);
			assert_true(x.r.txn.chunked);
			assert_int_equal(x.r.txn.delivered + x.r.txn.failed + x.r.txn.not_tried, 3);
			for (int i = 0; i < 3; i++) {
				const struct rq_smtp_rcpt *rc = &x.r.rcpts[i];
				if (rc->result == RQ_SMTP_RCPT_NOT_TRIED)
					continue;
				if (rc->outcome.stage == RQ_STAGE_NONE)
					fail_msg("%s: recipient %d without a stage", sc, i);
				if (rc->result == RQ_SMTP_RCPT_DELIVERED &&
				    (rc->outcome.code < 200 || rc->outcome.code > 299 ||
				     rc->outcome.stage != RQ_STAGE_DOT))
					fail_msg("%s: delivered with %d at %s", sc, rc->outcome.code,
						 rq_stage_name(rc->outcome.stage));
				if (rc->result == RQ_SMTP_RCPT_FAILED && rc->outcome.fail == RQ_FAIL_NONE &&
				    rc->outcome.code < 400)
					fail_msg("%s: failed with %d (%s)", sc, rc->outcome.code,
						 rc->outcome.text);
			}
			/* the first transaction is untouched by the rules */
			if (t == 0 && x.r.txn.delivered != 3)
				fail_msg("%s: first transaction not delivered", sc);
		}
		if (x.r.nclosed == 0) {
			rq_smtp_quit(x.r.s);
			wait_closed(&x.r);
		}
		event_base_loop(x.r.base, EVLOOP_NONBLOCK);
		assert_int_equal(x.r.nclosed, 1);
		fx_end(&x);
		runs++;
	}
	assert_int_equal(runs, 144);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN); /* as relayqd does (see smtp.h) */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_stall_every_stage),
		cmocka_unit_test(test_bdat_fault_matrix),
		cmocka_unit_test(test_trickle_deadline),
		cmocka_unit_test(test_disconnect_every_stage),
		cmocka_unit_test(test_disconnect_mid_data),
		cmocka_unit_test(test_garbage),
		cmocka_unit_test(test_overlong),
		cmocka_unit_test(test_dead_on_reuse),
		cmocka_unit_test(test_unsolicited_replies),
		cmocka_unit_test(test_trickle_configured_timeout),
		cmocka_unit_test(test_421_mid_session),
		cmocka_unit_test(test_421_mail_pipelined),
		cmocka_unit_test(test_connect_timeout),
		cmocka_unit_test(test_fault_matrix),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

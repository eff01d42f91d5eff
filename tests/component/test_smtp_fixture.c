/*
 * The SMTP client session against the in-process fault-injecting server
 * (tests/fixtures/fakesmtp): replies at every stage, per-recipient results,
 * too many recipients, pipelined and lock-step wire, DATA bytes, SIZE,
 * 8BITMIME, SMTPUTF8, address injection, connection reuse, next host.
 * Faults (stall, trickle, drops, garbage) are in test_smtp_faults.c, TLS and
 * AUTH in test_smtp_tls.c.
 */
#include "test_smtp_common.h"

#include "fakesmtp.h"
#include "relayq/message.h"

struct fx {
	struct run r;
	struct fsmtp *f;
};

static void fx_start(struct fx *x, const char *scenario)
{
	run_init(&x->r);
	x->f = fsmtp_must_start(x->r.base, scenario);
}

static void fx_connect(struct fx *x)
{
	run_connect(&x->r, fsmtp_port(x->f), "mx.test");
}

static void fx_end(struct fx *x)
{
	run_finish(&x->r);
	fsmtp_destroy(x->f);
	run_free_base(&x->r);
}

static const struct fsmtp_conn *conn0(struct fx *x)
{
	const struct fsmtp_conn *c = fsmtp_conn_at(x->f, 0);
	assert_non_null(c);
	return c;
}

static const char *const two[] = {"a@example.net", "b@example.net", NULL};
static const char *const one[] = {"a@example.net", NULL};
static const char *body1 = "Subject: hi\r\n\r\nhello\r\n";

/* One message, two recipients: delivered, envelope and content as sent. */
static void test_plain_delivery(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	fx_connect(&x);
	txn_set(&x.r, "sender@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.nready, 1);
	assert_int_equal(x.r.txn.delivered, 2);
	assert_int_equal(x.r.txn.failed, 0);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_outcome(&x.r.txn.outcome, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_string_equal(x.r.txn.outcome.enhanced, "2.0.0");
	assert_true(rq_smtp_caps(x.r.s)->flags & RQ_SMTP_CAP_PIPELINING);
	assert_string_equal(rq_smtp_peer_name(x.r.s), "mx.test");
	assert_true(rq_smtp_reusable(x.r.s));
	const struct fsmtp_txn *t = fsmtp_last_message(x.f);
	assert_non_null(t);
	assert_string_equal(t->mail_from, "sender@example.com");
	assert_int_equal(t->nrcpts, 2);
	assert_string_equal(t->rcpts[0], "a@example.net");
	assert_string_equal(t->rcpts[1], "b@example.net");
	assert_string_equal(t->content, body1);
	fx_end(&x);
	/* QUIT was said and the server saw a clean end */
	assert_int_equal(x.r.nclosed, 1);
	assert_outcome(&x.r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 221);
}

/* The null sender, EHLO name on the wire, QUIT at the end. */
static void test_null_sender_and_quit(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	fx_connect(&x);
	txn_set(&x.r, "", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	const struct fsmtp_conn *c = conn0(&x);
	assert_non_null(strstr(c->in, "EHLO client.test\r\n"));
	assert_non_null(strstr(c->in, "MAIL FROM:<>"));
	assert_non_null(strstr(c->in, "QUIT\r\n"));
	assert_true(c->ehlo_used);
	fx_end(&x);
}

/* A 4xx or 5xx greeting: the session ends with that reply; a waiting
 * transaction fails with it. */
static void greeting_case(const char *rule, int code)
{
	struct fx x;
	fx_start(&x, rule);
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", one, body1);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	wait_done(&x.r, 1);
	wait_closed(&x.r);
	assert_int_equal(x.r.nready, 0);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_GREETING, RQ_FAIL_NONE, code);
	assert_outcome(&x.r.why, RQ_STAGE_GREETING, RQ_FAIL_NONE, code);
	assert_int_equal(rq_smtp_state(x.r.s), RQ_SMTP_ST_CLOSED);
	fx_end(&x);
}

static void test_greeting_4xx(void **state)
{
	greeting_case("greeting reply 421 4.3.2 busy", 421);
}

static void test_greeting_5xx(void **state)
{
	greeting_case("greeting reply 554 5.7.1 go away", 554);
}

/* EHLO 5xx: HELO, then delivery without extensions. */
static void test_ehlo_helo_fallback(void **state)
{
	struct fx x;
	fx_start(&x, "ehlo reply 502 5.5.1 Not implemented");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	assert_int_equal(rq_smtp_caps(x.r.s)->flags, 0);
	assert_false(x.r.txn.pipelined);
	const struct fsmtp_conn *c = conn0(&x);
	assert_false(c->ehlo_used);
	assert_non_null(strstr(c->in, "HELO client.test\r\n"));
	/* without PIPELINING, no SIZE=: plain MAIL */
	assert_non_null(strstr(c->in, "MAIL FROM:<s@example.com>\r\n"));
	fx_end(&x);
}

/* EHLO 421 is not a reason for HELO: the connection is over. */
static void test_ehlo_421(void **state)
{
	struct fx x;
	fx_start(&x, "ehlo reply 421 4.3.2 shutting down");
	fx_connect(&x);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_EHLO, RQ_FAIL_NONE, 421);
	assert_null(strstr(conn0(&x)->in, "HELO"));
	fx_end(&x);
}

/* HELO refused too. */
static void test_helo_refused(void **state)
{
	struct fx x;
	fx_start(&x, "ehlo reply 500 5.5.1 no\nhelo reply 550 5.7.1 not you");
	fx_connect(&x);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_HELO, RQ_FAIL_NONE, 550);
	fx_end(&x);
}

/* MAIL refused: every recipient fails with MAIL's reply; pipelined RCPT and
 * DATA replies are consumed; the connection stays usable. */
static void mail_case(const char *pipelining, const char *reply, int code)
{
	struct fx x;
	char sc[256];
	snprintf(sc, sizeof(sc), "pipelining %s\nmail txn=1 reply %s", pipelining, reply);
	fx_start(&x, sc);
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.failed, 2);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, code);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, code);
	assert_outcome(&x.r.txn.outcome, RQ_STAGE_MAIL, RQ_FAIL_NONE, code);
	/* next transaction on the same connection works */
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(fsmtp_nconns(x.f), 1);
	assert_non_null(strstr(conn0(&x)->in, "RSET\r\n"));
	fx_end(&x);
}

static void test_mail_4xx(void **state)
{
	mail_case("on", "451 4.3.0 try later", 451);
	mail_case("off", "451 4.3.0 try later", 451);
}

static void test_mail_5xx(void **state)
{
	mail_case("on", "553 5.1.8 bad sender domain", 553);
	mail_case("off", "553 5.1.8 bad sender domain", 553);
}

/* Per-recipient replies in one transaction: each kept with its recipient. */
static void rcpt_mix(const char *pipelining)
{
	struct fx x;
	char sc[512];
	snprintf(sc, sizeof(sc),
		 "pipelining %s\n"
		 "rcpt addr=unknown@example.net reply 550 5.1.1 no such user\n"
		 "rcpt addr=grey@example.net reply 450 4.2.0 greylisted\n"
		 "rcpt addr=full@example.net reply 452 4.2.2 mailbox full\n",
		 pipelining);
	fx_start(&x, sc);
	fx_connect(&x);
	const char *const r[] = {"ok1@example.net", "unknown@example.net", "grey@example.net",
				 "full@example.net", "ok2@example.net", NULL};
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550);
	assert_string_equal(x.r.rcpts[1].outcome.enhanced, "5.1.1");
	assert_non_null(strstr(x.r.rcpts[1].outcome.text, "no such user"));
	assert_rcpt(&x.r.rcpts[2], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 450);
	/* 452 4.2.2 is "mailbox full", not "too many recipients" */
	assert_rcpt(&x.r.rcpts[3], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 452);
	assert_rcpt(&x.r.rcpts[4], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_int_equal(x.r.txn.delivered, 2);
	assert_int_equal(x.r.txn.failed, 3);
	const struct fsmtp_txn *t = fsmtp_last_message(x.f);
	assert_non_null(t);
	assert_int_equal(t->nrcpts, 2);
	assert_string_equal(t->rcpts[0], "ok1@example.net");
	assert_string_equal(t->rcpts[1], "ok2@example.net");
	fx_end(&x);
}

static void test_rcpt_mix_pipelined(void **state)
{
	rcpt_mix("on");
}

static void test_rcpt_mix_lockstep(void **state)
{
	rcpt_mix("off");
}

/* Every recipient refused: no message, the transaction ends cleanly with
 * RSET (pipelined: the DATA reply is read; lock-step: DATA is not sent). */
static void check_all_refused_wire(const char *pipelining, bool unexpected_354,
				   const char *expect_tail)
{
	struct fx x;
	char sc[512];
	snprintf(sc, sizeof(sc), "pipelining %s\nrcpt reply 550 5.1.1 no\n%s", pipelining,
		 unexpected_354 ? "data reply 354 go ahead anyway\n" : "");
	fx_start(&x, sc);
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.failed, 2);
	assert_int_equal(x.r.txn.delivered, 0);
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	const struct fsmtp_conn *c = conn0(&x);
	const char *m = strstr(c->in, "MAIL FROM");
	assert_non_null(m);
	if (strcmp(m + strcspn(m, "\n") + 1, expect_tail) != 0) {
		/* the tail after the MAIL line */
		fail_msg("wire after MAIL:\n%s\nexpected:\n%s", m, expect_tail);
	}
	fx_end(&x);
}

static void test_all_refused(void **state)
{
	check_all_refused_wire("on", false,
			       "RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nRSET\r\nQUIT\r\n");
	check_all_refused_wire("off", false,
			       "RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nRSET\r\nQUIT\r\n");
	/* a server that answers 354 although no recipient was accepted gets a
	 * lone "." and no message */
	check_all_refused_wire("on", true,
			       "RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n.\r\nRSET\r\nQUIT\r\n");
}

/* DATA refused, and the reply to "." refused. */
static void data_case(const char *rule, enum rq_stage stage, int code)
{
	struct fx x;
	fx_start(&x, rule);
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.failed, 2);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, stage, RQ_FAIL_NONE, code);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, stage, RQ_FAIL_NONE, code);
	assert_outcome(&x.r.txn.outcome, stage, RQ_FAIL_NONE, code);
	assert_null(fsmtp_last_message(x.f));
	/* reusable afterwards */
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(fsmtp_nconns(x.f), 1);
	fx_end(&x);
}

static void test_data_4xx(void **state)
{
	data_case("data txn=1 reply 451 4.3.0 local error", RQ_STAGE_DATA, 451);
	data_case("pipelining off\ndata txn=1 reply 451 4.3.0 local error", RQ_STAGE_DATA, 451);
}

static void test_data_5xx(void **state)
{
	data_case("data txn=1 reply 554 5.3.0 no", RQ_STAGE_DATA, 554);
}

static void test_dot_4xx(void **state)
{
	data_case("dot txn=1 reply 451 4.3.0 try again later", RQ_STAGE_DOT, 451);
}

static void test_dot_5xx(void **state)
{
	data_case("dot txn=1 reply 554 5.7.1 spam", RQ_STAGE_DOT, 554);
}

/* Too many recipients: the rest is not tried; sent again at once in a new
 * transaction on the same connection, all get delivered. */
static void too_many(const char *pipelining, const char *reply)
{
	struct fx x;
	char sc[256];
	snprintf(sc, sizeof(sc), "pipelining %s\nrcpt rcpt=3- reply %s", pipelining, reply);
	fx_start(&x, sc);
	fx_connect(&x);
	const char *const r[] = {"r1@example.net", "r2@example.net", "r3@example.net",
				 "r4@example.net", "r5@example.net", NULL};
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	assert_int_equal(x.r.txn.not_tried, 3);
	assert_int_equal(x.r.txn.failed, 0);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	for (int i = 2; i < 5; i++)
		assert_int_equal(x.r.rcpts[i].result, RQ_SMTP_RCPT_NOT_TRIED);
	if (strcmp(pipelining, "off") == 0) {
		/* lock-step: RCPTs after the refusal were not sent */
		assert_int_equal(count_str(conn0(&x)->in, "RCPT TO"), 3);
	}
	/* the rest, in a new transaction */
	const char *const rest[] = {"r3@example.net", "r4@example.net", NULL};
	txn_set(&x.r, "s@example.com", rest, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	const char *const last[] = {"r5@example.net", NULL};
	txn_set(&x.r, "s@example.com", last, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	struct fsmtp_stats st;
	fsmtp_get_stats(x.f, &st);
	assert_int_equal(st.messages, 3);
	assert_int_equal(st.connections, 1);
	fx_end(&x);
}

static void test_too_many_rcpts(void **state)
{
	too_many("on", "452 4.5.3 Error: too many recipients");
	too_many("off", "452 4.5.3 Error: too many recipients");
	too_many("on", "452 Too many recipients");
	too_many("off", "552 too many recipients");
}

/* "Too many" at the first recipient is not progress: a plain failure (no
 * endless not-tried loop). */
static void test_too_many_first(void **state)
{
	struct fx x;
	fx_start(&x, "rcpt reply 452 4.5.3 too many recipients");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 452);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 452);
	assert_int_equal(x.r.txn.not_tried, 0);
	fx_end(&x);
}

/* PIPELINING: MAIL, every RCPT and DATA in one write; replies matched. */
static void test_pipelined_wire(void **state)
{
	struct fx x;
	fx_start(&x, "size 100000");
	fx_connect(&x);
	const char *const r[] = {"r1@example.net", "r2@example.net", "r3@example.net", NULL};
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	assert_true(x.r.txn.pipelined);
	assert_int_equal(x.r.txn.delivered, 3);
	const struct fsmtp_txn *t = fsmtp_txn_at(x.f, 0);
	assert_non_null(t);
	/* MAIL + 3 RCPT + DATA buffered together */
	assert_int_equal(t->burst_at_mail, 5);
	char want[512];
	snprintf(want, sizeof(want),
		 "MAIL FROM:<s@example.com> SIZE=%zu\r\n"
		 "RCPT TO:<r1@example.net>\r\nRCPT TO:<r2@example.net>\r\nRCPT TO:<r3@example.net>\r\n"
		 "DATA\r\n",
		 strlen(body1));
	assert_non_null(strstr(conn0(&x)->in, want));
	char sz[32];
	snprintf(sz, sizeof(sz), "SIZE=%zu", strlen(body1));
	assert_string_equal(t->mail_params, sz);
	fx_end(&x);
}

/* Without PIPELINING: strict lock-step, one command at a time. */
static void test_lockstep_wire(void **state)
{
	struct fx x;
	fx_start(&x, "pipelining off");
	fx_connect(&x);
	const char *const r[] = {"r1@example.net", "r2@example.net", "r3@example.net", NULL};
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	/* a second transaction: straight to MAIL (the first completed), also
	 * lock-step */
	send_wait(&x.r);
	assert_false(x.r.txn.pipelined);
	assert_int_equal(x.r.txn.delivered, 3);
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	const struct fsmtp_conn *c = conn0(&x);
	assert_int_equal(c->max_burst, 1);
	assert_int_equal(fsmtp_txn_at(x.f, 0)->burst_at_mail, 1);
	const char *m = strstr(c->in, "MAIL FROM");
	assert_non_null(m);
	/* order of commands (the body between DATA and RSET left out) */
	assert_true(strncmp(m, "MAIL FROM:<s@example.com>\r\nRCPT TO:<r1@example.net>\r\n"
			       "RCPT TO:<r2@example.net>\r\nRCPT TO:<r3@example.net>\r\nDATA\r\n",
			    strlen("MAIL FROM:<s@example.com>\r\nRCPT TO:<r1@example.net>\r\n"
				   "RCPT TO:<r2@example.net>\r\nRCPT TO:<r3@example.net>\r\nDATA\r\n")) == 0);
	const char *second = strstr(m, ".\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r1@example.net>\r\n");
	assert_non_null(second);
	assert_null(strstr(c->in, "RSET"));
	assert_non_null(strstr(second, ".\r\nQUIT\r\n"));
	fx_end(&x);
}

/* Issue 15 item 11c: no RSET after a completed transaction (two messages
 * go MAIL after "."); exactly one after an aborted one, right then. */
static void rset_case(const char *pipelining)
{
	struct fx x;
	char sc[128];
	snprintf(sc, sizeof(sc), "pipelining %s\nrcpt txn=3 reply 550 5.1.1 no", pipelining);
	fx_start(&x, sc);
	fx_connect(&x);
	for (int i = 1; i <= 4; i++) {
		txn_set(&x.r, "s@example.com", one, body1);
		send_wait(&x.r);
		assert_int_equal(x.r.txn.delivered, i == 3 ? 0 : 1);
	}
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	const char *in = conn0(&x)->in;
	assert_int_equal(count_str(in, "RSET\r\n"), 1);
	assert_int_equal(count_str(in, "MAIL FROM"), 4);
	/* messages 1 and 2: "." then MAIL */
	assert_int_equal(count_str(in, ".\r\nMAIL FROM:<s@example.com>"), 2);
	/* message 3 refused: RSET, then message 4's MAIL */
	assert_non_null(strstr(in, "RSET\r\nMAIL FROM:<s@example.com>"));
	assert_int_equal(fsmtp_nconns(x.f), 1);
	fx_end(&x);
}

static void test_rset_only_after_abort(void **state)
{
	rset_case("on");
	rset_case("off");
}

/* DATA bytes exactly: CRLF normalisation, dot-stuffing, final CRLF.CRLF. */
static void test_data_bytes(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	fx_connect(&x);
	const char *body = "Subject: dots\n\n.leading dot\n..two dots\nbare LF\r\nCRLF\rbare CR\n.\nend";
	txn_set(&x.r, "s@example.com", one, body);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	const struct fsmtp_txn *t = fsmtp_last_message(x.f);
	assert_non_null(t);
	const char *want_raw = "Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\nbare LF\r\nCRLF\r\n"
			       "bare CR\r\n..\r\nend\r\n";
	assert_int_equal(t->raw_len, strlen(want_raw));
	assert_memory_equal(t->raw, want_raw, t->raw_len);
	assert_string_equal(t->content, "Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\nbare LF\r\n"
					"CRLF\r\nbare CR\r\n.\r\nend\r\n");
	/* the wire: DATA, 354, raw, ".\r\n" */
	char want_wire[512];
	snprintf(want_wire, sizeof(want_wire), "DATA\r\n%s.\r\n", want_raw);
	assert_non_null(strstr(conn0(&x)->in, want_wire));
	fx_end(&x);
}

/* A large body (1 MB, long lines) arrives intact. */
static void test_large_body(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	fx_connect(&x);
	size_t n = 1024 * 1024;
	char *body = malloc(n + 1);
	for (size_t i = 0; i < n; i++)
		body[i] = (i % 100 == 99) ? '\n' : (char)('a' + i % 26);
	body[n] = '\0';
	txn_set(&x.r, "s@example.com", one, body);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	const struct fsmtp_txn *t = fsmtp_last_message(x.f);
	assert_non_null(t);
	/* every LF became CRLF; the unterminated last line got one */
	assert_int_equal(t->content_len, n + n / 100 + 2);
	fx_end(&x);
	free(body);
}

/* SIZE: a message larger than advertised fails at once, nothing sent. */
static void test_size_refused_early(void **state)
{
	struct fx x;
	fx_start(&x, "size 100");
	fx_connect(&x);
	char body[300];
	memset(body, 'x', sizeof(body) - 1);
	body[sizeof(body) - 1] = '\0';
	txn_set(&x.r, "s@example.com", two, body);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.failed, 2);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 552);
	assert_true(x.r.rcpts[0].outcome.synthetic);
	assert_string_equal(x.r.rcpts[0].outcome.enhanced, "5.3.4");
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 552);
	assert_null(strstr(conn0(&x)->in, "MAIL FROM"));
	/* a small one still goes, with SIZE= */
	txn_set(&x.r, "s@example.com", one, "small\r\n");
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_string_equal(fsmtp_last_message(x.f)->mail_params, "SIZE=7");
	fx_end(&x);
}

/* 8BITMIME: BODY=8BITMIME for an 8-bit body when offered, not otherwise. */
static void test_8bitmime(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", one, "Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve\r\n");
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_string_equal(fsmtp_last_message(x.f)->mail_params, "BODY=8BITMIME");
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_string_equal(fsmtp_last_message(x.f)->mail_params, "");
	fx_end(&x);

	fx_start(&x, "8bitmime off");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", one, "caf\xc3\xa9\r\n");
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_string_equal(fsmtp_last_message(x.f)->mail_params, "");
	fx_end(&x);
}

/* SMTPUTF8: used when an address needs it and the server offers it; a clear
 * permanent failure for that recipient when not. */
static void test_smtputf8(void **state)
{
	struct fx x;
	const char *const r[] = {"j\xc3\xb6rg@example.net", "plain@example.net", NULL};
	fx_start(&x, "smtputf8 on");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	assert_non_null(strstr(fsmtp_last_message(x.f)->mail_params, "SMTPUTF8"));
	fx_end(&x);

	fx_start(&x, "smtputf8 off");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 553);
	assert_true(x.r.rcpts[0].outcome.synthetic);
	assert_string_equal(x.r.rcpts[0].outcome.enhanced, "5.6.7");
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_null(strstr(conn0(&x)->in, "j\xc3\xb6rg"));
	assert_null(strstr(conn0(&x)->in, "SMTPUTF8"));
	/* a UTF-8 sender without SMTPUTF8: the whole transaction */
	txn_set(&x.r, "j\xc3\xb6rg@example.com", r + 1, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 553);
	assert_string_equal(x.r.rcpts[0].outcome.enhanced, "5.6.7");
	fx_end(&x);
}

/*
 * IDNA: a server without SMTPUTF8 gets the domains in A-labels when only
 * the domain is non-ASCII; a UTF-8 local part still fails (5.6.7), an
 * invalid U-label fails its recipient with the reason (5.1.3) and never
 * reaches the wire. With SMTPUTF8 the UTF-8 forms go as they are.
 */
static void test_idna_alabels(void **state)
{
	struct fx x;
	const char *const r[] = {"user@B\xc3\xbc" "cher.example", "j\xc3\xb6rg@b\xc3\xbc" "cher.example",
				 "bad@\xff.example", "snow@\xe2\x98\x83.net", "plain@example.net", NULL};
	fx_start(&x, "smtputf8 off");
	fx_connect(&x);
	txn_set(&x.r, "sender@fa\xc3\x9f.de", r, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 553);
	assert_string_equal(x.r.rcpts[1].outcome.enhanced, "5.6.7");
	for (int i = 2; i <= 3; i++) {
		assert_rcpt(&x.r.rcpts[i], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 553);
		assert_true(x.r.rcpts[i].outcome.synthetic);
		assert_string_equal(x.r.rcpts[i].outcome.enhanced, "5.1.3");
		assert_non_null(strstr(x.r.rcpts[i].outcome.text, "internationalized domain name"));
	}
	assert_non_null(strstr(x.r.rcpts[2].outcome.text, "encoding"));
	assert_non_null(strstr(x.r.rcpts[3].outcome.text, "disallowed"));
	assert_rcpt(&x.r.rcpts[4], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	const struct fsmtp_txn *t = fsmtp_last_message(x.f);
	assert_non_null(t);
	/* non-transitional: fass.de would be another domain */
	assert_string_equal(t->mail_from, "sender@xn--fa-hia.de");
	assert_string_equal(t->mail_params, "");
	assert_int_equal(t->nrcpts, 2);
	assert_string_equal(t->rcpts[0], "user@xn--bcher-kva.example");
	assert_string_equal(t->rcpts[1], "plain@example.net");
	/* nothing but ASCII went out, and no SMTPUTF8 */
	const char *in = conn0(&x)->in;
	for (const char *p = in; *p; p++)
		if ((unsigned char)*p >= 0x80)
			fail_msg("a non-ASCII byte on the wire: %s", in);
	assert_null(strstr(in, "SMTPUTF8"));
	assert_int_equal(count_str(in, "RCPT TO:"), 2);

	/* a sender whose domain libidn2 refuses: the whole transaction, 5.1.7 */
	txn_set(&x.r, "s@-b\xc3\xbc" "cher.example", r + 4, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 553);
	assert_string_equal(x.r.rcpts[0].outcome.enhanced, "5.1.7");
	assert_non_null(strstr(x.r.rcpts[0].outcome.text, "hyphen"));
	assert_int_equal(count_str(conn0(&x)->in, "MAIL FROM"), 1);
	fx_end(&x);

	/* SMTPUTF8 offered: the UTF-8 form, with SMTPUTF8 on MAIL */
	fx_start(&x, "smtputf8 on");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 5);
	t = fsmtp_last_message(x.f);
	assert_string_equal(t->rcpts[0], "user@B\xc3\xbc" "cher.example");
	assert_string_equal(t->rcpts[1], "j\xc3\xb6rg@b\xc3\xbc" "cher.example");
	assert_non_null(strstr(t->mail_params, "SMTPUTF8"));
	assert_null(strstr(conn0(&x)->in, "xn--"));
	fx_end(&x);
}

/* The BDAT content the server recorded is exactly rq_bdat_encode's, and so
 * the same message as DATA stores. */
static void assert_bdat_content(const struct fsmtp_txn *t, const char *body)
{
	size_t n = rq_bdat_encode(body, strlen(body), NULL, 0);
	char *want = malloc(n + 1);
	rq_bdat_encode(body, strlen(body), want, n);
	assert_true(t->bdat);
	if (t->content_len != n || memcmp(t->content, want, n) != 0)
		fail_msg("BDAT content differs (%zu / %zu octets)", t->content_len, n);
	free(want);
}

static const char *dotted_body =
	"Subject: chunks\r\n\r\n.a dot line\r\n..two dots\r\n.\r\nbare LF\nbare CR\rend";

/*
 * CHUNKING (RFC 3030): with PIPELINING every chunk goes in one write right
 * after the RCPT replies, without waiting for the chunk replies; no
 * dot-stuffing, no terminator; the content is what DATA would store.
 */
static void test_bdat_pipelined(void **state)
{
	struct fx x;
	fx_start(&x, "chunking on\nsize 100000");
	x.r.opts.chunk_size = 10;
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, dotted_body);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	assert_true(x.r.txn.pipelined);
	assert_true(x.r.txn.chunked);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	size_t cl = rq_bdat_encode(dotted_body, strlen(dotted_body), NULL, 0);
	size_t nch = rq_bdat_chunks(cl, 10);
	assert_int_equal(x.r.txn.chunks, nch);
	const struct fsmtp_txn *t = fsmtp_last_message(x.f);
	assert_non_null(t);
	assert_int_equal(t->chunks, (int)nch);
	assert_bdat_content(t, dotted_body);
	assert_string_equal(t->content, "Subject: chunks\r\n\r\n.a dot line\r\n..two dots\r\n.\r\n"
					"bare LF\r\nbare CR\r\nend\r\n");
	/* SIZE is the exact content size */
	char sz[32];
	snprintf(sz, sizeof(sz), "SIZE=%zu", cl);
	assert_string_equal(t->mail_params, sz);
	/* MAIL and the RCPTs in one write, no DATA; then every BDAT before
	 * the first chunk reply */
	assert_int_equal(t->burst_at_mail, 3);
	assert_null(strstr(conn0(&x)->in, "DATA"));
	const char *first = strstr(x.r.trace, "> BDAT 10\n");
	assert_non_null(first);
	char last[64];
	snprintf(last, sizeof(last), "> BDAT %zu LAST\n< 250", rq_bdat_chunk_len(cl, 10, nch - 1));
	const char *l = strstr(first, last);
	assert_non_null(l);
	assert_null(memmem(first, (size_t)(l - first), "< ", 2));
	assert_int_equal(count_str(x.r.trace, "> BDAT"), (int)nch);
	assert_int_equal(count_str(x.r.trace, "< 250 2.0.0 Ok: 10 octets"), (int)nch - 1);
	/* the connection goes on: a second message */
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(x.r.txn.chunks, 3);
	assert_non_null(strstr(x.r.trace, "> BDAT 10\n> BDAT 10\n> BDAT 2 LAST\n< 250 2.0.0 Ok: 10"));
	assert_bdat_content(fsmtp_last_message(x.f), body1);
	fx_end(&x);
}

/* Without PIPELINING each chunk waits for the reply to the one before. */
static void test_bdat_lockstep(void **state)
{
	struct fx x;
	fx_start(&x, "chunking on\npipelining off");
	x.r.opts.chunk_size = 16;
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, dotted_body);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 2);
	assert_false(x.r.txn.pipelined);
	size_t cl = rq_bdat_encode(dotted_body, strlen(dotted_body), NULL, 0);
	size_t nch = rq_bdat_chunks(cl, 16);
	assert_true(nch >= 4);
	/* every BDAT is followed by its reply in the trace */
	int n = 0;
	for (const char *p = strstr(x.r.trace, "> BDAT"); p; p = strstr(p + 1, "> BDAT")) {
		const char *nl = strchr(p, '\n');
		assert_non_null(nl);
		assert_true(strncmp(nl + 1, "< 250", 5) == 0);
		n++;
	}
	assert_int_equal(n, (int)nch);
	assert_bdat_content(fsmtp_last_message(x.f), dotted_body);
	fx_end(&x);
}

/* A message of more than one default chunk (128 KiB); an empty one is
 * "BDAT 0 LAST". */
static void test_bdat_default_chunks(void **state)
{
	struct fx x;
	fx_start(&x, "chunking on");
	fx_connect(&x);
	size_t len = 300000;
	char *big = malloc(len + 1);
	for (size_t i = 0; i < len; i++)
		big[i] = i % 100 == 98 ? '\r' : i % 100 == 99 ? '\n' : i % 100 == 0 ? '.' : 'q';
	big[len] = '\0';
	txn_set(&x.r, "s@example.com", one, big);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(x.r.txn.chunks, 3);
	assert_non_null(strstr(x.r.trace, "> BDAT 131072\n> BDAT 131072\n> BDAT 37856 LAST\n"));
	assert_bdat_content(fsmtp_last_message(x.f), big);
	txn_set(&x.r, "s@example.com", one, "");
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_non_null(strstr(x.r.trace, "> BDAT 0 LAST\n< 250"));
	fx_end(&x);
	free(big);
}

/*
 * A refused chunk is the outcome of every accepted recipient: stage data
 * for a chunk before the last (the replies to the chunks already sent are
 * read, then RSET), stage dot for LAST; the connection is reused. Not
 * offered, or turned off: DATA.
 */
static void bdat_refused_case(const char *sc, size_t chunk, enum rq_stage stage, int code,
			      int bdat_lines)
{
	struct fx x;
	fx_start(&x, sc);
	x.r.opts.chunk_size = chunk;
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, dotted_body);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.failed, 2);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, stage, RQ_FAIL_NONE, code);
	assert_rcpt(&x.r.rcpts[1], RQ_SMTP_RCPT_FAILED, stage, RQ_FAIL_NONE, code);
	assert_outcome(&x.r.txn.outcome, stage, RQ_FAIL_NONE, code);
	assert_null(fsmtp_last_message(x.f));
	assert_int_equal(count_str(x.r.trace, "> BDAT"), bdat_lines);
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(fsmtp_nconns(x.f), 1);
	const char *in = conn0(&x)->in;
	assert_int_equal(count_str(in, "RSET\r\n"), stage == RQ_STAGE_DOT ? 0 : 1);
	fx_end(&x);
}

static void test_bdat_refused(void **state)
{
	size_t cl = rq_bdat_encode(dotted_body, strlen(dotted_body), NULL, 0);
	int n = (int)rq_bdat_chunks(cl, 10);
	/* pipelined: every chunk was sent; lock-step: none after the refusal */
	bdat_refused_case("chunking on\nbdat txn=1 chunk=2 reply 452 4.3.1 full", 10,
			  RQ_STAGE_DATA, 452, n);
	bdat_refused_case("chunking on\npipelining off\nbdat txn=1 chunk=2 reply 452 4.3.1 full", 10,
			  RQ_STAGE_DATA, 452, 2);
	bdat_refused_case("chunking on\nbdat txn=1 chunk=1 reply 554 5.6.0 bad content", 10,
			  RQ_STAGE_DATA, 554, n);
	char sc[128];
	snprintf(sc, sizeof(sc), "chunking on\nbdat txn=1 chunk=%d reply 554 5.7.1 spam", n);
	bdat_refused_case(sc, 10, RQ_STAGE_DOT, 554, n);
	snprintf(sc, sizeof(sc), "chunking on\npipelining off\nbdat txn=1 chunk=%d reply 451 4.3.0 later", n);
	bdat_refused_case(sc, 10, RQ_STAGE_DOT, 451, n);
}

static void test_bdat_no_recipient_and_off(void **state)
{
	/* every recipient refused: no BDAT at all, RSET */
	struct fx x;
	fx_start(&x, "chunking on\nrcpt reply 550 5.1.1 no");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.failed, 2);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550);
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	const char *m = strstr(conn0(&x)->in, "MAIL FROM");
	assert_string_equal(m + strcspn(m, "\n") + 1,
			    "RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nRSET\r\nQUIT\r\n");
	fx_end(&x);
	/* MAIL refused (pipelined): nothing after the RCPTs either */
	fx_start(&x, "chunking on\nmail reply 451 4.3.0 later");
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 451);
	assert_null(strstr(conn0(&x)->in, "BDAT"));
	fx_end(&x);
	/* chunking = false: DATA although CHUNKING is offered */
	fx_start(&x, "chunking on");
	x.r.opts.chunking = false;
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", one, dotted_body);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_false(x.r.txn.chunked);
	assert_true(rq_smtp_caps(x.r.s)->flags & RQ_SMTP_CAP_CHUNKING);
	assert_null(strstr(conn0(&x)->in, "BDAT"));
	assert_true(fsmtp_last_message(x.f)->data_started);
	assert_false(fsmtp_last_message(x.f)->bdat);
	fx_end(&x);
}

/* CR, LF or NUL in an address never reach the wire. */
static void test_address_injection(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	fx_connect(&x);
	const char *const r[] = {"ok@example.net", "a@example.net>\r\nRSET\r\nRCPT TO:<evil@example.org",
				 "lf@example.net\nDATA", NULL};
	txn_set(&x.r, "s@example.com", r, body1);
	/* and a NUL inside a recipient with an explicit length */
	static const char nul_addr[] = "n@example.net\0RSET";
	x.r.rcpts[3].addr = nul_addr;
	x.r.rcpts[3].len = sizeof(nul_addr) - 1;
	x.r.txn.nrcpt = 4;
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_DELIVERED, RQ_STAGE_DOT, RQ_FAIL_NONE, 250);
	for (int i = 1; i < 4; i++) {
		assert_rcpt(&x.r.rcpts[i], RQ_SMTP_RCPT_FAILED, RQ_STAGE_RCPT, RQ_FAIL_NONE, 553);
		assert_true(x.r.rcpts[i].outcome.synthetic);
		assert_string_equal(x.r.rcpts[i].outcome.enhanced, "5.1.3");
	}
	/* an invalid sender: nothing at all is sent */
	const char *const ok[] = {"ok@example.net", NULL};
	txn_set(&x.r, "s@example.com\r\nRCPT TO:<evil@example.org>", ok, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 553);
	assert_string_equal(x.r.rcpts[0].outcome.enhanced, "5.1.7");
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	const struct fsmtp_conn *c = conn0(&x);
	assert_null(strstr(c->in, "evil"));
	assert_null(strstr(c->in, "lf@"));
	assert_null(strstr(c->in, "n@example.net"));
	assert_int_equal(count_str(c->in, "RCPT TO"), 1);
	assert_int_equal(count_str(c->in, "MAIL FROM"), 1);
	fx_end(&x);
}

/* 100 transactions over one connection. */
static void test_reuse_100(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	x.r.opts.max_txns = 100;
	fx_connect(&x);
	for (int i = 0; i < 100; i++) {
		txn_set(&x.r, "s@example.com", two, body1);
		send_wait(&x.r);
		assert_int_equal(x.r.txn.delivered, 2);
	}
	assert_int_equal(rq_smtp_txn_count(x.r.s), 100);
	/* the limit: no 101st on this connection, and the session QUITs */
	assert_false(rq_smtp_reusable(x.r.s));
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), -1);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 221);
	struct fsmtp_stats st;
	fsmtp_get_stats(x.f, &st);
	assert_int_equal(st.connections, 1);
	assert_int_equal(st.messages, 100);
	assert_int_equal(st.rcpts, 200);
	fx_end(&x);
}

/* Transactions chained from the done callback. */
struct chain {
	struct run *r;
	int left;
};

static void chain_done(struct rq_smtp_txn *t, void *arg)
{
	struct chain *c = arg;
	c->r->ndone++;
	assert_int_equal(t->delivered, 1);
	if (--c->left > 0)
		assert_int_equal(rq_smtp_send(c->r->s, t), 0);
}

static void test_send_from_done(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	x.r.opts.max_txns = 0;
	fx_connect(&x);
	struct chain c = {&x.r, 20};
	txn_set(&x.r, "s@example.com", one, body1);
	x.r.txn.done = chain_done;
	x.r.txn.arg = &c;
	/* sent before the session is ready: waits for it */
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), -1); /* busy */
	wait_done(&x.r, 20);
	struct fsmtp_stats st;
	fsmtp_get_stats(x.f, &st);
	assert_int_equal(st.messages, 20);
	assert_int_equal(st.connections, 1);
	fx_end(&x);
}

/* The idle timeout ends an unused connection with QUIT. */
static void test_idle_quit(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	x.r.opts.idle_ms = 200;
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 221);
	assert_non_null(strstr(conn0(&x)->in, "QUIT\r\n"));
	fx_end(&x);
}

/* Next host: the first address refuses, the second accepts. */
static void test_next_host_refused(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	struct rq_smtp_host h[2];
	assert_int_equal(rq_smtp_host_set(&h[0], "127.0.0.1", th_free_port(), "mx1.test"), 0);
	assert_int_equal(rq_smtp_host_set(&h[1], "127.0.0.1", fsmtp_port(x.f), "mx2.test"), 0);
	run_connect_hosts(&x.r, h, 2);
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(rq_smtp_host_index(x.r.s), 1);
	assert_string_equal(rq_smtp_peer_name(x.r.s), "mx2.test");
	fx_end(&x);
}

/* Next host on a 421 / 5xx greeting; the first connection is not reused. */
static void test_next_host_greeting(void **state)
{
	struct fx x;
	fx_start(&x, "greeting conn=1 reply 421 4.3.2 busy\ngreeting conn=2 reply 554 5.7.1 no");
	struct rq_smtp_host h[3];
	for (int i = 0; i < 3; i++)
		assert_int_equal(rq_smtp_host_set(&h[i], "127.0.0.1", fsmtp_port(x.f), NULL), 0);
	run_connect_hosts(&x.r, h, 3);
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(rq_smtp_host_index(x.r.s), 2);
	assert_int_equal(fsmtp_nconns(x.f), 3);
	fx_end(&x);
}

/* Next host on a timeout (the first server never greets) and on a lost
 * connection (the second closes at EHLO). */
static void test_next_host_timeout_lost(void **state)
{
	struct fx x;
	fx_start(&x, "greeting conn=1 stall\nehlo conn=2 drop");
	short_timeouts(&x.r.opts, 300);
	struct rq_smtp_host h[3];
	for (int i = 0; i < 3; i++)
		assert_int_equal(rq_smtp_host_set(&h[i], "127.0.0.1", fsmtp_port(x.f), NULL), 0);
	run_connect_hosts(&x.r, h, 3);
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(rq_smtp_host_index(x.r.s), 2);
	fx_end(&x);
}

/* Every host failed: one outcome, the most relevant (a reply beats a
 * refused connection even when the refusal came last). */
static void test_all_hosts_failed(void **state)
{
	struct fx x;
	fx_start(&x, "greeting reply 554 5.7.1 blocked");
	struct rq_smtp_host h[2];
	assert_int_equal(rq_smtp_host_set(&h[0], "127.0.0.1", fsmtp_port(x.f), NULL), 0);
	assert_int_equal(rq_smtp_host_set(&h[1], "127.0.0.1", th_free_port(), NULL), 0);
	run_connect_hosts(&x.r, h, 2);
	txn_set(&x.r, "s@example.com", one, body1);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	wait_done(&x.r, 1);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_GREETING, RQ_FAIL_NONE, 554);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_GREETING, RQ_FAIL_NONE, 554);
	fx_end(&x);
}

/* A refused port alone: "refused". */
static void test_refused(void **state)
{
	struct run r;
	run_init(&r);
	run_connect(&r, th_free_port(), NULL);
	txn_set(&r, "s@example.com", one, body1);
	assert_int_equal(rq_smtp_send(r.s, &r.txn), 0);
	wait_done(&r, 1);
	wait_closed(&r);
	assert_outcome(&r.why, RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0);
	assert_rcpt(&r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0);
	run_finish(&r);
	run_free_base(&r);
}

/* IPv6 loopback. */
static void test_ipv6(void **state)
{
	struct fx x;
	char err[256];
	run_init(&x.r);
	x.f = fsmtp_create(x.r.base, err, sizeof(err));
	assert_non_null(x.f);
	if (fsmtp_listen(x.f, "[::1]:0", err, sizeof(err)) != 0)
		fail_msg("IPv6 loopback not available here: %s", err);
	struct rq_smtp_host h;
	assert_int_equal(rq_smtp_host_set(&h, "::1", fsmtp_port(x.f), NULL), 0);
	run_connect_hosts(&x.r, &h, 1);
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	char want[64];
	snprintf(want, sizeof(want), "[::1]:%d", fsmtp_port(x.f));
	assert_string_equal(rq_smtp_peer_addr(x.r.s), want);
	fx_end(&x);
}

/* Destroying the session inside its callbacks is safe (no leak, no crash). */
static void test_destroy_in_callbacks(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	x.r.destroy_in_done = true;
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", one, body1);
	send_wait(&x.r);
	assert_null(x.r.s);
	assert_int_equal(x.r.nclosed, 0); /* nothing after destroy */
	fx_end(&x);

	fx_start(&x, "greeting reply 554 no");
	x.r.destroy_in_closed = true;
	fx_connect(&x);
	wait_closed(&x.r);
	assert_null(x.r.s);
	fx_end(&x);

	/* destroy while connecting, outside callbacks */
	fx_start(&x, NULL);
	fx_connect(&x);
	rq_smtp_destroy(x.r.s);
	x.r.s = NULL;
	fx_end(&x);
}

/* Many sessions at once on one event loop, each with several transactions. */
struct many {
	struct rq_smtp *s;
	struct rq_smtp_txn txn;
	struct rq_smtp_rcpt rcpt[2];
	int left;
	int delivered;
	int closed;
};

static void many_done(struct rq_smtp_txn *t, void *arg)
{
	struct many *m = arg;
	m->delivered += (int)t->delivered;
	if (--m->left > 0)
		assert_int_equal(rq_smtp_send(m->s, t), 0);
	else
		rq_smtp_quit(m->s);
}

static void many_closed(struct rq_smtp *s, const struct rq_outcome *why, void *arg)
{
	struct many *m = arg;
	m->closed++;
}

struct many_all {
	struct many *m;
	int n;
};

static bool cond_many_closed(void *arg)
{
	struct many_all *a = arg;
	for (int i = 0; i < a->n; i++)
		if (!a->m[i].closed)
			return false;
	return true;
}

static void test_many_sessions(void **state)
{
	enum { NS = 40, NT = 10 };
	struct fx x;
	fx_start(&x, "rcpt addr=b@example.net reply 450 4.2.0 later");
	struct many *m = calloc(NS, sizeof(*m));
	struct rq_smtp_host h;
	assert_int_equal(rq_smtp_host_set(&h, "127.0.0.1", fsmtp_port(x.f), NULL), 0);
	for (int i = 0; i < NS; i++) {
		char err[128];
		struct rq_smtp_callbacks cbs = {NULL, many_closed, NULL, &m[i]};
		m[i].s = rq_smtp_create(x.r.base, &x.r.opts, &cbs, err, sizeof(err));
		assert_non_null(m[i].s);
		assert_int_equal(rq_smtp_connect(m[i].s, &h, 1), 0);
		m[i].rcpt[0].addr = "a@example.net";
		m[i].rcpt[0].len = 13;
		m[i].rcpt[1].addr = "b@example.net";
		m[i].rcpt[1].len = 13;
		m[i].txn.from = "s@example.com";
		m[i].txn.from_len = 13;
		m[i].txn.rcpts = m[i].rcpt;
		m[i].txn.nrcpt = 2;
		m[i].txn.body = body1;
		m[i].txn.body_len = strlen(body1);
		m[i].txn.done = many_done;
		m[i].txn.arg = &m[i];
		m[i].left = NT;
		assert_int_equal(rq_smtp_send(m[i].s, &m[i].txn), 0);
	}
	struct many_all a = {m, NS};
	assert_true(loop_until(x.r.base, cond_many_closed, &a, 30000));
	for (int i = 0; i < NS; i++) {
		assert_int_equal(m[i].delivered, NT);
		assert_int_equal(m[i].closed, 1);
		assert_int_equal(m[i].rcpt[1].result, RQ_SMTP_RCPT_FAILED);
		assert_int_equal(m[i].rcpt[1].outcome.code, 450);
		rq_smtp_destroy(m[i].s);
	}
	struct fsmtp_stats st;
	fsmtp_get_stats(x.f, &st);
	assert_int_equal(st.connections, NS);
	assert_int_equal(st.messages, NS * NT);
	free(m);
	fx_end(&x);
}

/* quit while still connecting: the waiting transaction goes, then QUIT. */
static void test_quit_while_connecting(void **state)
{
	struct fx x;
	fx_start(&x, NULL);
	fx_connect(&x);
	txn_set(&x.r, "s@example.com", one, body1);
	assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
	rq_smtp_quit(x.r.s);
	assert_false(rq_smtp_reusable(x.r.s));
	wait_done(&x.r, 1);
	assert_int_equal(x.r.txn.delivered, 1);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 221);
	fx_end(&x);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN); /* as relayqd does (see smtp.h) */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_plain_delivery),
		cmocka_unit_test(test_null_sender_and_quit),
		cmocka_unit_test(test_greeting_4xx),
		cmocka_unit_test(test_greeting_5xx),
		cmocka_unit_test(test_ehlo_helo_fallback),
		cmocka_unit_test(test_ehlo_421),
		cmocka_unit_test(test_helo_refused),
		cmocka_unit_test(test_mail_4xx),
		cmocka_unit_test(test_mail_5xx),
		cmocka_unit_test(test_rcpt_mix_pipelined),
		cmocka_unit_test(test_rcpt_mix_lockstep),
		cmocka_unit_test(test_all_refused),
		cmocka_unit_test(test_data_4xx),
		cmocka_unit_test(test_data_5xx),
		cmocka_unit_test(test_dot_4xx),
		cmocka_unit_test(test_dot_5xx),
		cmocka_unit_test(test_too_many_rcpts),
		cmocka_unit_test(test_too_many_first),
		cmocka_unit_test(test_pipelined_wire),
		cmocka_unit_test(test_lockstep_wire),
		cmocka_unit_test(test_rset_only_after_abort),
		cmocka_unit_test(test_data_bytes),
		cmocka_unit_test(test_large_body),
		cmocka_unit_test(test_size_refused_early),
		cmocka_unit_test(test_8bitmime),
		cmocka_unit_test(test_smtputf8),
		cmocka_unit_test(test_idna_alabels),
		cmocka_unit_test(test_bdat_pipelined),
		cmocka_unit_test(test_bdat_lockstep),
		cmocka_unit_test(test_bdat_default_chunks),
		cmocka_unit_test(test_bdat_refused),
		cmocka_unit_test(test_bdat_no_recipient_and_off),
		cmocka_unit_test(test_address_injection),
		cmocka_unit_test(test_reuse_100),
		cmocka_unit_test(test_send_from_done),
		cmocka_unit_test(test_idle_quit),
		cmocka_unit_test(test_next_host_refused),
		cmocka_unit_test(test_next_host_greeting),
		cmocka_unit_test(test_next_host_timeout_lost),
		cmocka_unit_test(test_all_hosts_failed),
		cmocka_unit_test(test_refused),
		cmocka_unit_test(test_ipv6),
		cmocka_unit_test(test_destroy_in_callbacks),
		cmocka_unit_test(test_many_sessions),
		cmocka_unit_test(test_quit_while_connecting),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

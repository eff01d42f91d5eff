/*
 * The SMTP client's TLS and AUTH against fakesmtp: STARTTLS in each mode
 * (none, opportunistic, required), certificate and host name verification,
 * STARTTLS response injection, implicit TLS (port 465 style), AUTH PLAIN and
 * LOGIN, 535, and the refusal to send credentials over plain text.
 */
#include "test_smtp_common.h"

#include "fakesmtp.h"

#include <unistd.h>

#include "relayq/log.h"

static const char *const two[] = {"a@example.net", "b@example.net", NULL};
static const char *body1 = "Subject: tls\r\n\r\nsecret body\r\n";

struct fx {
	struct run r;
	struct fsmtp *f;
};

/* scenario, then TLS certificate/key names under tests/fixtures/tls (NULL:
 * the fixture's default, CN mx.test signed by ca.pem) */
static void fx_init(struct fx *x, const char *scenario, const char *cert)
{
	char sc[2048];
	run_init(&x->r);
	if (cert) {
		char certp[512], keyp[512], key[64];
		snprintf(certp, sizeof(certp), "%s", fsmtp_tls_path(cert));
		snprintf(key, sizeof(key), "%.*s.key", (int)(strlen(cert) - 4), cert);
		snprintf(keyp, sizeof(keyp), "%s", fsmtp_tls_path(key));
		snprintf(sc, sizeof(sc), "tls-cert %s\ntls-key %s\n%s", certp, keyp, scenario);
	} else {
		snprintf(sc, sizeof(sc), "%s", scenario);
	}
	x->f = fsmtp_must_start(x->r.base, sc);
	x->r.tls = test_tls_ctx(fsmtp_tls_path("ca.pem"));
	x->r.opts.tls_ctx = x->r.tls;
}

static void fx_connect(struct fx *x, const char *name)
{
	run_connect(&x->r, fsmtp_port(x->f), name);
}

static void fx_end(struct fx *x)
{
	run_finish(&x->r);
	fsmtp_destroy(x->f);
	run_free_base(&x->r);
}

static const struct fsmtp_conn *conn_at(struct fx *x, size_t i)
{
	const struct fsmtp_conn *c = fsmtp_conn_at(x->f, i);
	assert_non_null(c);
	return c;
}

/* Delivers one transaction, expecting both recipients delivered. */
static void deliver_ok(struct fx *x)
{
	txn_set(&x->r, "s@example.com", two, body1);
	send_wait(&x->r);
	if (x->r.txn.delivered != 2)
		fail_msg("not delivered: %s %s %d %s", rq_stage_name(x->r.txn.outcome.stage),
			 rq_fail_name(x->r.txn.outcome.fail), x->r.txn.outcome.code,
			 x->r.txn.outcome.text);
	assert_string_equal(fsmtp_last_message(x->f)->content, body1);
}

/* Expects the session to end before any transaction with (stage, fail). */
static void expect_fail(struct fx *x, enum rq_stage stage, enum rq_fail fail, int code)
{
	txn_set(&x->r, "s@example.com", two, body1);
	assert_int_equal(rq_smtp_send(x->r.s, &x->r.txn), 0);
	wait_done(&x->r, 1);
	wait_closed(&x->r);
	assert_int_equal(x->r.txn.failed, 2);
	assert_outcome(&x->r.why, stage, fail, code);
	assert_rcpt(&x->r.rcpts[0], RQ_SMTP_RCPT_FAILED, stage, fail, code);
	assert_int_equal(x->r.nready, 0);
	for (size_t i = 0; i < fsmtp_nconns(x->f); i++)
		assert_null(strstr(conn_at(x, i)->in, "MAIL FROM"));
}

/* required: STARTTLS, chain and name verified, EHLO again, delivered. */
static void test_required_ok(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_true(rq_smtp_tls_active(x.r.s));
	assert_true(rq_smtp_tls_verified(x.r.s));
	assert_non_null(strstr(rq_smtp_tls_info(x.r.s), "TLS"));
	/* capabilities were forgotten and asked again (RFC 3207) */
	assert_false(rq_smtp_caps(x.r.s)->flags & RQ_SMTP_CAP_STARTTLS);
	const struct fsmtp_conn *c = conn_at(&x, 0);
	assert_true(c->tls);
	assert_true(c->starttls);
	assert_int_equal(count_str(c->in, "EHLO client.test\r\n"), 2);
	assert_int_equal(count_str(c->in, "STARTTLS\r\n"), 1);
	fx_end(&x);
}

/* A large body through the TLS layer. */
static void test_required_large_body(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	size_t n = 2 * 1024 * 1024;
	char *big = malloc(n + 1);
	for (size_t i = 0; i < n; i++)
		big[i] = (i % 64 == 63) ? '\n' : (char)('A' + i % 26);
	big[n] = '\0';
	const char *const one[] = {"a@example.net", NULL};
	txn_set(&x.r, "s@example.com", one, big);
	send_wait(&x.r);
	assert_int_equal(x.r.txn.delivered, 1);
	assert_int_equal(fsmtp_last_message(x.f)->content_len, n + n / 64);
	fx_end(&x);
	free(big);
}

/* required: a certificate for another name is a TLS failure. */
static void test_required_wrong_name(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on", "wrongname.pem");
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
	assert_non_null(strstr(x.r.why.text, "verif"));
	fx_end(&x);

	/* the right certificate, but we expect another host name */
	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "other.test");
	expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
	fx_end(&x);

	/* no name: the certificate's IP address (SAN 127.0.0.1) is checked */
	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, NULL);
	deliver_ok(&x);
	assert_true(rq_smtp_tls_verified(x.r.s));
	fx_end(&x);
	fx_init(&x, "starttls on", "wrongname.pem");
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, NULL);
	expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
	fx_end(&x);

	/* servername overrides the host's name */
	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	x.r.opts.servername = "mx.test";
	fx_connect(&x, "other.test");
	deliver_ok(&x);
	fx_end(&x);
}

/* required: a self-signed certificate fails; with verification off it is
 * accepted (and reported as not verified). */
static void test_required_selfsigned(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on", "selfsigned.pem");
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
	fx_end(&x);

	fx_init(&x, "starttls on", "selfsigned.pem");
	x.r.opts.tls = RQ_TLS_REQUIRED;
	x.r.opts.tls_verify = false;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_true(rq_smtp_tls_active(x.r.s));
	assert_false(rq_smtp_tls_verified(x.r.s));
	fx_end(&x);
}

/* required: no STARTTLS offered, nothing sent in the clear. */
static void test_required_not_offered(void **state)
{
	struct fx x;
	fx_init(&x, "starttls off", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_STARTTLS, RQ_FAIL_TLS, 0);
	fx_end(&x);

	/* offered but refused (454) */
	fx_init(&x, "starttls on\nstarttls reply 454 4.7.0 TLS not available", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_STARTTLS, RQ_FAIL_TLS, 454);
	fx_end(&x);
}

/* opportunistic: plain when not offered (or refused); TLS when offered,
 * even with a certificate that does not verify. */
static void test_opportunistic(void **state)
{
	struct fx x;
	fx_init(&x, "starttls off", NULL);
	x.r.opts.tls = RQ_TLS_OPPORTUNISTIC;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_false(rq_smtp_tls_active(x.r.s));
	assert_false(conn_at(&x, 0)->tls);
	fx_end(&x);

	fx_init(&x, "starttls on\nstarttls reply 454 4.7.0 not now", NULL);
	x.r.opts.tls = RQ_TLS_OPPORTUNISTIC;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_false(rq_smtp_tls_active(x.r.s));
	assert_int_equal(count_str(conn_at(&x, 0)->in, "STARTTLS"), 1);
	fx_end(&x);

	fx_init(&x, "starttls on", "selfsigned.pem");
	x.r.opts.tls = RQ_TLS_OPPORTUNISTIC;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_true(rq_smtp_tls_active(x.r.s));
	assert_false(rq_smtp_tls_verified(x.r.s));
	assert_true(conn_at(&x, 0)->tls);
	fx_end(&x);

	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_OPPORTUNISTIC;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_true(rq_smtp_tls_verified(x.r.s));
	fx_end(&x);
}

/* opportunistic: a failed handshake is a failure, unless fallback to plain
 * is configured: then a new connection without STARTTLS. */
static void test_opportunistic_handshake_failure(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on\nstarttls conn=1 close", NULL);
	x.r.opts.tls = RQ_TLS_OPPORTUNISTIC;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
	fx_end(&x);

	fx_init(&x, "starttls on\nstarttls conn=1 close", NULL);
	x.r.opts.tls = RQ_TLS_OPPORTUNISTIC;
	x.r.opts.tls_fallback_plain = true;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_false(rq_smtp_tls_active(x.r.s));
	assert_int_equal(fsmtp_nconns(x.f), 2);
	assert_null(strstr(conn_at(&x, 1)->in, "STARTTLS"));
	fx_end(&x);
}

/* none: STARTTLS offered but not used. */
static void test_none_ignores_starttls(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_NONE;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_null(strstr(conn_at(&x, 0)->in, "STARTTLS"));
	fx_end(&x);
}

/* Bytes after the 220 to STARTTLS: refused, the connection dropped. */
static void test_starttls_injection(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on\nstarttls inject=250-injected\\r\\n250\\x20PIPELINING\\r\\n", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_STARTTLS, RQ_FAIL_PROTOCOL, 0);
	assert_non_null(strstr(x.r.why.text, "injection"));
	assert_false(conn_at(&x, 0)->tls);
	fx_end(&x);
}

/* Implicit TLS (port 465 style). */
static void test_implicit(void **state)
{
	struct fx x;
	fx_init(&x, "implicit-tls on", NULL);
	x.r.opts.tls = RQ_TLS_IMPLICIT;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_true(rq_smtp_tls_verified(x.r.s));
	assert_true(conn_at(&x, 0)->tls);
	assert_false(conn_at(&x, 0)->starttls);
	fx_end(&x);

	fx_init(&x, "implicit-tls on", "wrongname.pem");
	x.r.opts.tls = RQ_TLS_IMPLICIT;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
	fx_end(&x);

	/* implicit TLS against a plain server: a TLS failure, not a hang */
	fx_init(&x, "", NULL);
	x.r.opts.tls = RQ_TLS_IMPLICIT;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
	fx_end(&x);
}

static bool trace_has_secret(struct run *r)
{
	/* the password, and base64 of "\0user\0pass" / of the password */
	return r->trace && (strstr(r->trace, FSMTP_TEST_PASS) ||
			    strstr(r->trace, "AHJlbGF5cS10ZXN0AHMzY3JldC1wYXNz") ||
			    strstr(r->trace, "czNjcmV0LXBhc3M="));
}

static void auth_ok(const char *mechs_offered, unsigned mechs_allowed, const char *want_mech)
{
	struct fx x;
	char sc[256];
	snprintf(sc, sizeof(sc), "starttls on\nauth %s\nrequire-auth on", mechs_offered);
	fx_init(&x, sc, NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	x.r.opts.auth_user = FSMTP_TEST_USER;
	x.r.opts.auth_password = FSMTP_TEST_PASS;
	x.r.opts.auth_mechs = mechs_allowed;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_true(rq_smtp_authenticated(x.r.s));
	const struct fsmtp_conn *c = conn_at(&x, 0);
	assert_non_null(c->auth_user);
	assert_string_equal(c->auth_user, FSMTP_TEST_USER);
	assert_string_equal(c->auth_mech, want_mech);
	assert_false(trace_has_secret(&x.r));
	assert_non_null(strstr(x.r.trace, "> AUTH "));
	fx_end(&x);
}

static void test_auth_plain_login(void **state)
{
	auth_ok("PLAIN LOGIN", RQ_SMTP_AUTH_PLAIN | RQ_SMTP_AUTH_LOGIN, "PLAIN");
	auth_ok("PLAIN LOGIN", RQ_SMTP_AUTH_LOGIN, "LOGIN");
	auth_ok("LOGIN", RQ_SMTP_AUTH_PLAIN | RQ_SMTP_AUTH_LOGIN, "LOGIN");
}

/* Wrong password: 535 reported at stage auth, no secret in any text. */
static void auth_535(unsigned mechs)
{
	struct fx x;
	fx_init(&x, "starttls on\nauth PLAIN LOGIN", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	x.r.opts.auth_user = FSMTP_TEST_USER;
	x.r.opts.auth_password = "wrong-" FSMTP_TEST_PASS;
	x.r.opts.auth_mechs = mechs;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_AUTH, RQ_FAIL_NONE, 535);
	assert_string_equal(x.r.why.enhanced, "5.7.8");
	assert_int_equal(conn_at(&x, 0)->auth_failures, 1);
	assert_null(strstr(x.r.why.text, FSMTP_TEST_PASS));
	assert_null(strstr(x.r.rcpts[0].outcome.text, FSMTP_TEST_PASS));
	assert_false(trace_has_secret(&x.r));
	assert_null(strstr(x.r.trace, "wrong-"));
	fx_end(&x);
}

static void test_auth_535(void **state)
{
	/* with debug logging on: no secret in the logs either */
	char path[] = "/tmp/rq-smtp-log-XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	FILE *logf = fdopen(fd, "w+");
	rq_log_init(RQ_LOG_DEBUG, RQ_LOG_LOGFMT, logf);
	auth_535(RQ_SMTP_AUTH_PLAIN);
	auth_535(RQ_SMTP_AUTH_LOGIN);
	auth_ok("PLAIN LOGIN", RQ_SMTP_AUTH_PLAIN, "PLAIN");
	auth_ok("PLAIN LOGIN", RQ_SMTP_AUTH_LOGIN, "LOGIN");
	fflush(logf);
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, NULL);
	fclose(logf);
	size_t n = 0;
	char *log = th_read_file(path, &n);
	unlink(path);
	assert_non_null(log);
	assert_non_null(strstr(log, "smtp_state"));   /* the log was written */
	assert_null(strstr(log, FSMTP_TEST_PASS));
	assert_null(strstr(log, "AHJlbGF5cS10ZXN0AHMzY3JldC1wYXNz"));
	assert_null(strstr(log, "czNjcmV0LXBhc3M="));
	free(log);
}

/* AUTH is never sent over plain text unless allowed explicitly. */
static void test_auth_refused_in_plaintext(void **state)
{
	struct fx x;
	fx_init(&x, "auth PLAIN LOGIN", NULL);
	x.r.opts.tls = RQ_TLS_OPPORTUNISTIC; /* STARTTLS not offered */
	x.r.opts.auth_user = FSMTP_TEST_USER;
	x.r.opts.auth_password = FSMTP_TEST_PASS;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_AUTH, RQ_FAIL_NONE, 454);
	assert_true(x.r.why.synthetic);
	assert_null(strstr(conn_at(&x, 0)->in, "AUTH"));
	fx_end(&x);

	fx_init(&x, "auth PLAIN LOGIN\nrequire-auth on", NULL);
	x.r.opts.tls = RQ_TLS_NONE;
	x.r.opts.auth_user = FSMTP_TEST_USER;
	x.r.opts.auth_password = FSMTP_TEST_PASS;
	x.r.opts.auth_plaintext_ok = true;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	assert_string_equal(conn_at(&x, 0)->auth_user, FSMTP_TEST_USER);
	fx_end(&x);

	/* credentials configured, the server offers no AUTH: not silently
	 * unauthenticated */
	fx_init(&x, "starttls on", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	x.r.opts.auth_user = FSMTP_TEST_USER;
	x.r.opts.auth_password = FSMTP_TEST_PASS;
	fx_connect(&x, "mx.test");
	expect_fail(&x, RQ_STAGE_AUTH, RQ_FAIL_NONE, 454);
	fx_end(&x);
}

/* A server that requires AUTH, no credentials: MAIL's 530 is reported. */
static void test_auth_required_by_server(void **state)
{
	struct fx x;
	fx_init(&x, "auth PLAIN\nrequire-auth on", NULL);
	fx_connect(&x, "mx.test");
	txn_set(&x.r, "s@example.com", two, body1);
	send_wait(&x.r);
	assert_rcpt(&x.r.rcpts[0], RQ_SMTP_RCPT_FAILED, RQ_STAGE_MAIL, RQ_FAIL_NONE, 530);
	fx_end(&x);
}

/* Faults at every stage of a TLS + AUTH session: done and closed exactly
 * once, results for every recipient, no secret anywhere, no leak. */
static void test_tls_fault_matrix(void **state)
{
	static const char *const stages[] = {"starttls", "ehlo", "auth", "mail", "rcpt",
					     "data", "dot", "quit"};
	static const char *const actions[] = {
		"stall", "drop", "close", "raw garbage\\r\\n", "reply 421 4.3.2 bye",
		"reply 500 5.5.1 no", "reply 250 2.0.0 odd", "lines=200",
	};
	for (size_t si = 0; si < sizeof(stages) / sizeof(stages[0]); si++)
	for (size_t ai = 0; ai < sizeof(actions) / sizeof(actions[0]); ai++) {
		char sc[256];
		snprintf(sc, sizeof(sc), "starttls on\nauth PLAIN LOGIN\n%s %s", stages[si],
			 actions[ai]);
		/* ehlo: the fault hits the second EHLO (after STARTTLS) */
		if (strcmp(stages[si], "ehlo") == 0)
			snprintf(sc, sizeof(sc), "starttls on\nauth PLAIN LOGIN\nehlo conn=1 times=1\nehlo %s",
				 actions[ai]);
		struct fx x;
		fx_init(&x, sc, NULL);
		short_timeouts(&x.r.opts, 150);
		x.r.opts.tls = RQ_TLS_REQUIRED;
		x.r.opts.auth_user = FSMTP_TEST_USER;
		x.r.opts.auth_password = FSMTP_TEST_PASS;
		fx_connect(&x, "mx.test");
		txn_set(&x.r, "s@example.com", two, body1);
		assert_int_equal(rq_smtp_send(x.r.s, &x.r.txn), 0);
		wait_done(&x.r, 1);
		assert_int_equal(x.r.txn.delivered + x.r.txn.failed + x.r.txn.not_tried, 2);
		for (int i = 0; i < 2; i++) {
			const struct rq_smtp_rcpt *rc = &x.r.rcpts[i];
			if (rc->result == RQ_SMTP_RCPT_FAILED && rc->outcome.fail == RQ_FAIL_NONE &&
			    rc->outcome.code < 400)
				fail_msg("%s: failed with %d", sc, rc->outcome.code);
			if (rc->result == RQ_SMTP_RCPT_DELIVERED && rc->outcome.code != 250)
				fail_msg("%s: delivered with %d", sc, rc->outcome.code);
		}
		if (x.r.nclosed == 0) {
			rq_smtp_quit(x.r.s);
			wait_closed(&x.r);
		}
		event_base_loop(x.r.base, EVLOOP_NONBLOCK);
		assert_int_equal(x.r.nclosed, 1);
		assert_false(trace_has_secret(&x.r));
		fx_end(&x);
	}
}

/* Issue 15 item 11a: the server refused us (or cannot give what we
 * require) on a connection that still works: QUIT is said and answered
 * before the close, the outcome stays the refusal. */
static void quit_case(const char *scenario, const char *cert, enum rq_tls_mode mode,
		      const char *password, enum rq_stage stage, enum rq_fail fail, int code)
{
	struct fx x;
	fx_init(&x, scenario, cert);
	x.r.opts.tls = mode;
	if (password) {
		x.r.opts.auth_user = FSMTP_TEST_USER;
		x.r.opts.auth_password = password;
	}
	fx_connect(&x, "mx.test");
	expect_fail(&x, stage, fail, code);
	assert_true(fsmtp_wait_closed(x.f, 1, 10000));
	const struct fsmtp_conn *c = conn_at(&x, 0);
	if (!strstr(c->in, "QUIT\r\n"))
		fail_msg("%s: no QUIT; the server received:\n%s", scenario, c->in);
	/* QUIT was the last command, answered 221, and the server closed */
	assert_non_null(strstr(c->out, "221 "));
	assert_true(c->closed_by_server);
	assert_non_null(strstr(x.r.trace, "> QUIT\n< 221"));
	fx_end(&x);
}

static void test_quit_on_refusal(void **state)
{
	/* 535 */
	quit_case("starttls on\nauth PLAIN LOGIN", NULL, RQ_TLS_REQUIRED, "wrong", RQ_STAGE_AUTH,
		  RQ_FAIL_NONE, 535);
	/* no AUTH mechanism offered */
	quit_case("starttls on", NULL, RQ_TLS_REQUIRED, FSMTP_TEST_PASS, RQ_STAGE_AUTH, RQ_FAIL_NONE,
		  454);
	/* TLS required, no STARTTLS */
	quit_case("starttls off", NULL, RQ_TLS_REQUIRED, NULL, RQ_STAGE_STARTTLS, RQ_FAIL_TLS, 0);
	/* STARTTLS refused while required */
	quit_case("starttls on\nstarttls reply 454 4.7.0 not now", NULL, RQ_TLS_REQUIRED, NULL,
		  RQ_STAGE_STARTTLS, RQ_FAIL_TLS, 454);
	/* a refusing greeting and EHLO/HELO */
	quit_case("greeting reply 554 5.7.1 go away", NULL, RQ_TLS_NONE, NULL, RQ_STAGE_GREETING,
		  RQ_FAIL_NONE, 554);
	quit_case("ehlo reply 500 5.5.1 no\nhelo reply 550 5.7.1 not you", NULL, RQ_TLS_NONE, NULL,
		  RQ_STAGE_HELO, RQ_FAIL_NONE, 550);
}

/* A certificate that does not verify: no QUIT over the untrusted channel,
 * but OpenSSL's alert reaches the server before the close. */
static void test_cert_failure_alert(void **state)
{
	const char *certs[] = {"wrongname.pem", "selfsigned.pem"};
	for (int i = 0; i < 2; i++) {
		struct fx x;
		fx_init(&x, "starttls on", certs[i]);
		x.r.opts.tls = RQ_TLS_REQUIRED;
		fx_connect(&x, "mx.test");
		expect_fail(&x, RQ_STAGE_TLS, RQ_FAIL_TLS, 0);
		assert_true(fsmtp_wait_closed(x.f, 1, 10000));
		const struct fsmtp_conn *c = conn_at(&x, 0);
		assert_false(c->tls);
		assert_null(strstr(c->in, "QUIT"));
		assert_false(c->closed_by_server);
		if (!c->tls_alert_seen)
			fail_msg("%s: the server got no TLS alert", certs[i]);
		fx_end(&x);
	}
}

/* A clean end of a TLS connection sends a close_notify (the server here
 * does not answer QUIT, so it is still reading when we close). */
static void test_close_notify(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on\nquit stall", NULL);
	short_timeouts(&x.r.opts, 2000);
	x.r.opts.timeout.quit = 300;
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	deliver_ok(&x);
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	assert_outcome(&x.r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 0);
	assert_true(fsmtp_wait_closed(x.f, 1, 10000));
	const struct fsmtp_conn *c = conn_at(&x, 0);
	assert_true(c->tls);
	assert_non_null(strstr(c->in, "QUIT\r\n"));
	assert_true(c->tls_close_notify_in);
	assert_false(c->closed_by_server);
	fx_end(&x);
}

/* Issue 15 item 11b: a pipelined group over TLS is one write, so one TLS
 * record: MAIL, the RCPTs and DATA arrive together. DATA is refused so no
 * body follows: the client's records are EHLO, the group, RSET, QUIT. */
static void test_pipelined_group_one_record(void **state)
{
	struct fx x;
	fx_init(&x, "starttls on\ndata reply 554 5.5.1 no thanks", NULL);
	x.r.opts.tls = RQ_TLS_REQUIRED;
	fx_connect(&x, "mx.test");
	const char *const r[] = {"a@example.net", "b@example.net", "c@example.net", NULL};
	txn_set(&x.r, "s@example.com", r, body1);
	send_wait(&x.r);
	assert_true(x.r.txn.pipelined);
	assert_int_equal(x.r.txn.failed, 3);
	rq_smtp_quit(x.r.s);
	wait_closed(&x.r);
	assert_true(fsmtp_wait_closed(x.f, 1, 10000));
	const struct fsmtp_conn *c = conn_at(&x, 0);
	assert_true(c->tls);
	assert_int_equal(fsmtp_txn_at(x.f, 0)->burst_at_mail, 5);
	if (c->tls_records_in != 4)
		fail_msg("%d application-data records from the client (want 4: EHLO, "
			 "MAIL+RCPT*3+DATA, RSET, QUIT)", c->tls_records_in);
	fx_end(&x);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN); /* as relayqd does (see smtp.h) */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_required_ok),
		cmocka_unit_test(test_required_large_body),
		cmocka_unit_test(test_required_wrong_name),
		cmocka_unit_test(test_required_selfsigned),
		cmocka_unit_test(test_required_not_offered),
		cmocka_unit_test(test_opportunistic),
		cmocka_unit_test(test_opportunistic_handshake_failure),
		cmocka_unit_test(test_none_ignores_starttls),
		cmocka_unit_test(test_starttls_injection),
		cmocka_unit_test(test_implicit),
		cmocka_unit_test(test_auth_plain_login),
		cmocka_unit_test(test_auth_535),
		cmocka_unit_test(test_auth_refused_in_plaintext),
		cmocka_unit_test(test_auth_required_by_server),
		cmocka_unit_test(test_tls_fault_matrix),
		cmocka_unit_test(test_quit_on_refusal),
		cmocka_unit_test(test_cert_failure_alert),
		cmocka_unit_test(test_close_notify),
		cmocka_unit_test(test_pipelined_group_one_record),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

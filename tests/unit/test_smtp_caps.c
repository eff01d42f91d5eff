/* The EHLO capability parser and the "too many recipients" classifier. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/smtp.h"

static void parse(struct rq_smtp_caps *c, const char *text)
{
	rq_smtp_caps_parse(c, text, strlen(text));
}

static void test_postfix_reply(void **state)
{
	struct rq_smtp_caps c;
	parse(&c, "250-mx.example.net\r\n"
		  "250-PIPELINING\r\n"
		  "250-SIZE 10240000\r\n"
		  "250-VRFY\r\n"
		  "250-ETRN\r\n"
		  "250-STARTTLS\r\n"
		  "250-AUTH PLAIN LOGIN\r\n"
		  "250-ENHANCEDSTATUSCODES\r\n"
		  "250-8BITMIME\r\n"
		  "250-DSN\r\n"
		  "250-SMTPUTF8\r\n"
		  "250 CHUNKING\r\n");
	assert_int_equal(c.flags, RQ_SMTP_CAP_PIPELINING | RQ_SMTP_CAP_SIZE |
					  RQ_SMTP_CAP_STARTTLS | RQ_SMTP_CAP_AUTH |
					  RQ_SMTP_CAP_ENHANCEDSTATUSCODES | RQ_SMTP_CAP_8BITMIME |
					  RQ_SMTP_CAP_DSN | RQ_SMTP_CAP_SMTPUTF8 |
					  RQ_SMTP_CAP_CHUNKING);
	assert_true(c.size_max == 10240000);
	assert_int_equal(c.auth, RQ_SMTP_AUTH_PLAIN | RQ_SMTP_AUTH_LOGIN);
	assert_int_equal(c.lines, 12);
	char buf[256];
	rq_smtp_caps_describe(&c, buf, sizeof(buf));
	assert_non_null(strstr(buf, "PIPELINING"));
	assert_non_null(strstr(buf, "SIZE=10240000"));
	assert_non_null(strstr(buf, "AUTH=PLAIN,LOGIN"));
}

/* The first line is the server's domain, even when it looks like a keyword. */
static void test_first_line_is_domain(void **state)
{
	struct rq_smtp_caps c;
	parse(&c, "250-PIPELINING greets you\r\n250 8BITMIME\r\n");
	assert_int_equal(c.flags, RQ_SMTP_CAP_8BITMIME);
	parse(&c, "250 STARTTLS\r\n");
	assert_int_equal(c.flags, 0);
}

static void test_case_insensitive(void **state)
{
	struct rq_smtp_caps c;
	parse(&c, "250-x\r\n250-pipelining\r\n250-StartTLS\r\n250-size 42\r\n"
		  "250-auth plain Login cram-md5\r\n250 smtputf8\r\n");
	assert_true(c.flags & RQ_SMTP_CAP_PIPELINING);
	assert_true(c.flags & RQ_SMTP_CAP_STARTTLS);
	assert_true(c.flags & RQ_SMTP_CAP_SMTPUTF8);
	assert_true(c.size_max == 42);
	assert_int_equal(c.auth, RQ_SMTP_AUTH_PLAIN | RQ_SMTP_AUTH_LOGIN | RQ_SMTP_AUTH_CRAM_MD5);
}

static void test_size_values(void **state)
{
	struct rq_smtp_caps c;
	/* absent */
	parse(&c, "250-x\r\n250 PIPELINING\r\n");
	assert_false(c.flags & RQ_SMTP_CAP_SIZE);
	assert_true(c.size_max == 0);
	/* no value */
	parse(&c, "250-x\r\n250 SIZE\r\n");
	assert_true(c.flags & RQ_SMTP_CAP_SIZE);
	assert_true(c.size_max == 0);
	/* zero: no limit */
	parse(&c, "250-x\r\n250 SIZE 0\r\n");
	assert_true(c.flags & RQ_SMTP_CAP_SIZE);
	assert_true(c.size_max == 0);
	/* garbage: no limit, still advertised */
	parse(&c, "250-x\r\n250 SIZE 12abc\r\n");
	assert_true(c.flags & RQ_SMTP_CAP_SIZE);
	assert_true(c.size_max == 0);
	parse(&c, "250-x\r\n250 SIZE -5\r\n");
	assert_true(c.size_max == 0);
	/* overflow: no limit rather than a wrapped value */
	parse(&c, "250-x\r\n250 SIZE 99999999999999999999999\r\n");
	assert_true(c.size_max == 0);
	/* large but valid */
	parse(&c, "250-x\r\n250 SIZE 52428800000\r\n");
	assert_true(c.size_max == 52428800000ULL);
	/* trailing spaces */
	parse(&c, "250-x\r\n250 SIZE 1000  \r\n");
	assert_true(c.size_max == 1000);
}

static void test_auth_lists(void **state)
{
	struct rq_smtp_caps c;
	parse(&c, "250-x\r\n250 AUTH\r\n");
	assert_true(c.flags & RQ_SMTP_CAP_AUTH);
	assert_int_equal(c.auth, 0);
	parse(&c, "250-x\r\n250 AUTH=LOGIN PLAIN\r\n");  /* pre-standard form */
	assert_true(c.flags & RQ_SMTP_CAP_AUTH);
	assert_int_equal(c.auth, RQ_SMTP_AUTH_PLAIN | RQ_SMTP_AUTH_LOGIN);
	parse(&c, "250-x\r\n250-AUTH GSSAPI XOAUTH2  SCRAM-SHA-256\r\n250 AUTH=PLAIN\r\n");
	assert_int_equal(c.auth, RQ_SMTP_AUTH_XOAUTH2 | RQ_SMTP_AUTH_OTHER | RQ_SMTP_AUTH_PLAIN);
	/* "PLAINX" is not PLAIN */
	parse(&c, "250-x\r\n250 AUTH PLAINX\r\n");
	assert_int_equal(c.auth, RQ_SMTP_AUTH_OTHER);
}

static void test_line_forms(void **state)
{
	struct rq_smtp_caps c;
	/* bare LF, no final newline, lines without the code prefix */
	parse(&c, "250-x\n250-PIPELINING\nENHANCEDSTATUSCODES\n250 8BITMIME");
	assert_int_equal(c.flags, RQ_SMTP_CAP_PIPELINING | RQ_SMTP_CAP_ENHANCEDSTATUSCODES |
					  RQ_SMTP_CAP_8BITMIME);
	/* keyword prefixes and unknown keywords do not count */
	parse(&c, "250-x\r\n250-PIPELININGX\r\n250-XSTARTTLS\r\n250-8BITMIMEX\r\n250 X-UNKNOWN 1\r\n");
	assert_int_equal(c.flags, 0);
	/* empty lines and lines of spaces are harmless */
	parse(&c, "250-x\r\n250-\r\n250-   \r\n250 SIZE 5\r\n");
	assert_int_equal(c.flags, RQ_SMTP_CAP_SIZE);
	/* line by line after a reset */
	rq_smtp_caps_reset(&c);
	rq_smtp_caps_line(&c, "250-mx", 6);
	rq_smtp_caps_line(&c, "250 STARTTLS", 12);
	assert_int_equal(c.flags, RQ_SMTP_CAP_STARTTLS);
	/* a reset forgets everything (after STARTTLS) */
	rq_smtp_caps_reset(&c);
	assert_int_equal(c.flags, 0);
	assert_int_equal(c.lines, 0);
}

static struct rq_outcome reply(int code, const char *enh, const char *text)
{
	struct rq_outcome o;
	memset(&o, 0, sizeof(o));
	o.stage = RQ_STAGE_RCPT;
	o.code = code;
	strcpy(o.enhanced, enh);
	strcpy(o.text, text);
	return o;
}

static void test_too_many(void **state)
{
	struct rq_outcome o;
	o = reply(452, "4.5.3", "Error: too many recipients");
	assert_true(rq_reply_too_many_rcpts(&o));
	o = reply(452, "", "Too many recipients");
	assert_true(rq_reply_too_many_rcpts(&o));
	o = reply(552, "5.5.3", "Too many recipients");
	assert_true(rq_reply_too_many_rcpts(&o));
	o = reply(552, "", "too many recipients");
	assert_true(rq_reply_too_many_rcpts(&o));
	/* mailbox full / storage: not "too many" */
	o = reply(452, "4.2.2", "The email account that you tried to reach is over quota");
	assert_false(rq_reply_too_many_rcpts(&o));
	o = reply(552, "5.2.2", "Mailbox full");
	assert_false(rq_reply_too_many_rcpts(&o));
	o = reply(552, "", "Requested mail action aborted: exceeded storage allocation");
	assert_false(rq_reply_too_many_rcpts(&o));
	/* X.5.3 whatever the code (OpenSMTPD: 451 4.5.3) */
	o = reply(450, "4.5.3", "too many");
	assert_true(rq_reply_too_many_rcpts(&o));
	o = reply(451, "4.5.3", "Too many recipients");
	assert_true(rq_reply_too_many_rcpts(&o));
	o = reply(451, "4.3.0", "too many connections");
	assert_false(rq_reply_too_many_rcpts(&o));
	o = reply(550, "", "too many recipients");
	assert_false(rq_reply_too_many_rcpts(&o));
	/* a transport event is never a reply */
	o = reply(0, "", "");
	o.fail = RQ_FAIL_TIMEOUT;
	assert_false(rq_reply_too_many_rcpts(&o));
}

static void test_host_set_and_names(void **state)
{
	struct rq_smtp_host h;
	assert_int_equal(rq_smtp_host_set(&h, "127.0.0.1", 25, "mx.test"), 0);
	assert_string_equal(h.name, "mx.test");
	assert_int_equal(rq_smtp_host_set(&h, "::1", 2525, NULL), 0);
	assert_int_equal(h.addr.ss_family, AF_INET6);
	assert_int_equal(rq_smtp_host_set(&h, "mx.test", 25, NULL), -1);
	assert_int_equal(rq_smtp_host_set(&h, "127.0.0.1", 70000, NULL), -1);
	assert_string_equal(rq_smtp_state_name(RQ_SMTP_ST_RCPT), "rcpt");
	assert_string_equal(rq_smtp_state_name(RQ_SMTP_ST_CLOSED), "closed");
	assert_string_equal(rq_smtp_state_name(RQ_SMTP_ST_COUNT_), "?");
	assert_string_equal(rq_tls_mode_name(RQ_TLS_REQUIRED), "required");
	assert_int_equal(rq_tls_mode_parse("may"), RQ_TLS_OPPORTUNISTIC);
	assert_int_equal(rq_tls_mode_parse("Implicit"), RQ_TLS_IMPLICIT);
	assert_int_equal(rq_tls_mode_parse("bogus"), -1);
	struct rq_smtp_opts o;
	rq_smtp_opts_init(&o);
	assert_int_equal(o.timeout.greeting, 300000);
	assert_int_equal(o.timeout.dot, 600000);
	assert_int_equal(o.timeout.data, 120000);
	assert_int_equal(o.timeout.block, 180000);
	assert_true(o.tls_verify);
	assert_false(o.auth_plaintext_ok);
}

/* Random bytes never crash the parser; its output stays in range. */
static void test_random_lines(void **state)
{
	unsigned seed = 12345;
	char line[300];
	struct rq_smtp_caps c;
	rq_smtp_caps_reset(&c);
	for (int i = 0; i < 200000; i++) {
		size_t n = (size_t)(rand_r(&seed) % sizeof(line));
		for (size_t k = 0; k < n; k++) {
			int r = rand_r(&seed) % 8;
			/* mostly keyword-ish text, some raw bytes */
			line[k] = r == 0 ? (char)(rand_r(&seed) % 256)
				: r == 1 ? ' ' : r == 2 ? '=' : (char)("SIZEAUTHPLAINLOGIN0123456789-"[rand_r(&seed) % 29]);
		}
		rq_smtp_caps_line(&c, line, n);
		if (i % 1000 == 999) {
			assert_true((c.flags & ~0x1ffu) == 0);
			assert_true((c.auth & ~0x1fu) == 0);
			rq_smtp_caps_reset(&c);
		}
	}
	char buf[64];
	rq_smtp_caps_describe(&c, buf, sizeof(buf)); /* truncates safely */
	assert_true(strlen(buf) < sizeof(buf));
}

/* The TLS context: a CA file that does not exist is an error, the test CA
 * loads; verification without a name to verify is refused. */
static void test_tls_ctx(void **state)
{
	char err[256] = "", ca[512];
	struct rq_tls_ctx_opts to = {.ca_file = "/nonexistent/ca.pem"};
	assert_null(rq_tls_ctx_create(&to, err, sizeof(err)));
	assert_true(strlen(err) > 0);
	snprintf(ca, sizeof(ca), "%s/tests/fixtures/tls/ca.pem", RQ_SOURCE_ROOT);
	to.ca_file = ca;
	struct rq_tls_ctx *t = rq_tls_ctx_create(&to, err, sizeof(err));
	assert_non_null(t);
	SSL *ssl = rq_tls_ssl_new(t, NULL, true, err, sizeof(err));
	assert_null(ssl);
	assert_non_null(strstr(err, "no host name"));
	ssl = rq_tls_ssl_new(t, "mx.test", true, err, sizeof(err));
	assert_non_null(ssl);
	char d[64];
	rq_tls_describe(ssl, d, sizeof(d));
	assert_string_equal(d, "");   /* no handshake yet */
	assert_false(rq_tls_verified(ssl));
	SSL_free(ssl);
	ssl = rq_tls_ssl_new(t, "127.0.0.1", true, err, sizeof(err)); /* IP literal */
	assert_non_null(ssl);
	SSL_free(ssl);
	rq_tls_ctx_destroy(t);
	rq_tls_ctx_destroy(NULL);
}

/* rq_smtp_create refuses bad options; connect refuses bad addresses. */
static void test_create_checks(void **state)
{
	char err[256];
	struct rq_smtp_opts o;
	struct event_base *base = event_base_new();
	rq_smtp_opts_init(&o);
	assert_null(rq_smtp_create(base, &o, NULL, err, sizeof(err)));  /* no helo */
	o.helo_name = "bad\r\nname";
	assert_null(rq_smtp_create(base, &o, NULL, err, sizeof(err)));
	o.helo_name = "client.test";
	o.tls = RQ_TLS_REQUIRED;  /* no tls_ctx */
	assert_null(rq_smtp_create(base, &o, NULL, err, sizeof(err)));
	assert_non_null(strstr(err, "TLS"));
	o.tls = RQ_TLS_NONE;
	o.auth_user = "u";        /* no password */
	assert_null(rq_smtp_create(base, &o, NULL, err, sizeof(err)));
	o.auth_password = "p";
	struct rq_smtp *s = rq_smtp_create(base, &o, NULL, err, sizeof(err));
	assert_non_null(s);
	assert_int_equal(rq_smtp_state(s), RQ_SMTP_ST_INIT);
	assert_false(rq_smtp_reusable(s));
	struct rq_smtp_host h;
	memset(&h, 0, sizeof(h));
	assert_int_equal(rq_smtp_connect(s, &h, 1), -1);   /* no family */
	assert_int_equal(rq_smtp_connect(s, &h, 0), -1);
	struct rq_smtp_txn t;
	memset(&t, 0, sizeof(t));
	assert_int_equal(rq_smtp_send(s, &t), -1);        /* not connecting */
	rq_smtp_destroy(s);
	rq_smtp_destroy(NULL);
	event_base_free(base);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_postfix_reply),
		cmocka_unit_test(test_first_line_is_domain),
		cmocka_unit_test(test_case_insensitive),
		cmocka_unit_test(test_size_values),
		cmocka_unit_test(test_auth_lists),
		cmocka_unit_test(test_line_forms),
		cmocka_unit_test(test_too_many),
		cmocka_unit_test(test_host_set_and_names),
		cmocka_unit_test(test_random_lines),
		cmocka_unit_test(test_tls_ctx),
		cmocka_unit_test(test_create_checks),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/reply.h"

/* Feeds lines; returns the status of the last one fed (stops at DONE/ERROR). */
static enum rq_reply_status feed(struct rq_reply_parser *p, const char *const *lines)
{
	enum rq_reply_status st = RQ_REPLY_ERROR;
	rq_reply_parser_init(p);
	for (size_t i = 0; lines[i]; i++) {
		st = rq_reply_parser_line(p, lines[i], strlen(lines[i]));
		if (st != RQ_REPLY_MORE)
			break;
	}
	return st;
}

/* socket() / connect() errors: this host's resources are a local fault,
 * everything else is the peer's (issue 15, item 5). */
static void connect_errno_classes(void **state)
{
	(void)state;
	static const int local[] = {EMFILE, ENFILE, ENOBUFS, ENOMEM};
	static const int remote[] = {ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT,
				     ECONNRESET, EADDRNOTAVAIL, EACCES, EINVAL, 0};
	for (size_t i = 0; i < sizeof(local) / sizeof(local[0]); i++) {
		assert_true(rq_errno_local(local[i]));
		assert_int_equal(rq_fail_connect_errno(local[i]), RQ_FAIL_LOCAL);
	}
	for (size_t i = 0; i < sizeof(remote) / sizeof(remote[0]); i++) {
		assert_false(rq_errno_local(remote[i]));
		assert_int_equal(rq_fail_connect_errno(remote[i]), RQ_FAIL_REFUSED);
	}
	/* the hint says whose fault it is */
	struct rq_outcome o;
	rq_outcome_set(&o, RQ_STAGE_CONNECT, RQ_FAIL_LOCAL, 0, NULL, "x");
	assert_non_null(strstr(rq_outcome_hint(&o)->meaning, "this host"));
}

static void names(void **state)
{
	(void)state;
	assert_string_equal(rq_stage_name(RQ_STAGE_RCPT), "rcpt");
	assert_string_equal(rq_stage_name(RQ_STAGE_DOT), "dot");
	assert_string_equal(rq_stage_name(RQ_STAGE_STARTTLS), "starttls");
	assert_string_equal(rq_stage_name((enum rq_stage)99), "unknown");
	assert_string_equal(rq_fail_name(RQ_FAIL_TIMEOUT), "timeout");
	assert_string_equal(rq_fail_name(RQ_FAIL_PROTOCOL), "protocol");
	assert_string_equal(rq_fail_name(RQ_FAIL_LOCAL), "local");
	assert_string_equal(rq_fail_name((enum rq_fail)-1), "unknown");
	for (int i = 0; i < RQ_STAGE_COUNT_; i++)
		assert_int_equal(rq_stage_parse(rq_stage_name((enum rq_stage)i)), i);
	assert_int_equal(rq_stage_parse("RCPT"), RQ_STAGE_RCPT);
	assert_int_equal(rq_stage_parse("nope"), -1);
	assert_int_equal(rq_stage_parse(NULL), -1);
}

static void outcome_set_formats_and_truncates(void **state)
{
	(void)state;
	struct rq_outcome o;
	rq_outcome_set(&o, RQ_STAGE_DNS, RQ_FAIL_NONE, 550, "5.1.2", "null MX for %s", "x.test");
	assert_int_equal(o.stage, RQ_STAGE_DNS);
	assert_int_equal(o.code, 550);
	assert_string_equal(o.enhanced, "5.1.2");
	assert_string_equal(o.text, "null MX for x.test");
	assert_false(o.synthetic);

	rq_outcome_set(&o, RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0, NULL, NULL);
	assert_string_equal(o.enhanced, "");
	assert_string_equal(o.text, "");

	/* 600 bytes of "é" (2 bytes each): cut at a character boundary. */
	char big[1201];
	for (int i = 0; i < 600; i++)
		memcpy(big + 2 * i, "\xc3\xa9", 2);
	big[1200] = '\0';
	rq_outcome_set(&o, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550, NULL, "x%s", big);
	size_t n = strlen(o.text);
	assert_true(n <= RQ_REPLY_TEXT_MAX - 1);
	assert_true(n >= RQ_REPLY_TEXT_MAX - 3);
	/* "x" + complete pairs: the length is odd, the last byte a continuation */
	assert_int_equal(n % 2, 1);
	assert_int_equal((unsigned char)o.text[n - 1], 0xa9);

	/* control bytes other than newline and tab are neutralised */
	rq_outcome_set(&o, RQ_STAGE_TLS, RQ_FAIL_TLS, 0, NULL, "a\rb\nc\x01");
	assert_string_equal(o.text, "a?b\nc?");
}

static void single_line(void **state)
{
	(void)state;
	struct rq_reply_parser p;
	struct rq_outcome o;
	assert_int_equal(feed(&p, (const char *[]){"250 2.1.5 Ok", NULL}), RQ_REPLY_DONE);
	assert_int_equal(p.code, 250);
	assert_string_equal(p.enhanced, "2.1.5");
	assert_string_equal(p.text, "Ok");
	assert_string_equal(p.err, "");
	rq_reply_parser_outcome(&p, RQ_STAGE_RCPT, &o);
	assert_int_equal(o.fail, RQ_FAIL_NONE);
	assert_int_equal(o.stage, RQ_STAGE_RCPT);
	assert_int_equal(o.code, 250);
	assert_string_equal(o.enhanced, "2.1.5");
	assert_string_equal(o.text, "Ok");

	/* just the code */
	assert_int_equal(feed(&p, (const char *[]){"354", NULL}), RQ_REPLY_DONE);
	assert_int_equal(p.code, 354);
	assert_string_equal(p.text, "");
	/* "DDD " with empty text */
	assert_int_equal(feed(&p, (const char *[]){"221 ", NULL}), RQ_REPLY_DONE);
	assert_int_equal(p.code, 221);
	/* a trailing CR left by the caller is tolerated */
	assert_int_equal(feed(&p, (const char *[]){"220 hi\r", NULL}), RQ_REPLY_DONE);
	assert_string_equal(p.text, "hi");
	/* feeding after DONE is an error */
	assert_int_equal(rq_reply_parser_line(&p, "220 x", 5), RQ_REPLY_ERROR);
}

static void multiline(void **state)
{
	(void)state;
	struct rq_reply_parser p;
	struct rq_outcome o;
	const char *ehlo[] = {"250-mx.test Hello", "250-PIPELINING", "250-SIZE 10240000",
			      "250 8BITMIME", NULL};
	rq_reply_parser_init(&p);
	assert_int_equal(rq_reply_parser_line(&p, ehlo[0], strlen(ehlo[0])), RQ_REPLY_MORE);
	assert_int_equal(rq_reply_parser_line(&p, ehlo[1], strlen(ehlo[1])), RQ_REPLY_MORE);
	assert_int_equal(rq_reply_parser_line(&p, ehlo[2], strlen(ehlo[2])), RQ_REPLY_MORE);
	assert_int_equal(rq_reply_parser_line(&p, ehlo[3], strlen(ehlo[3])), RQ_REPLY_DONE);
	assert_int_equal(p.lines, 4);
	assert_string_equal(p.text, "mx.test Hello\nPIPELINING\nSIZE 10240000\n8BITMIME");
	assert_string_equal(p.enhanced, "");

	/* enhanced code on every line: stripped from each, kept once */
	assert_int_equal(feed(&p, (const char *[]){
		"550-5.7.26 This mail is unauthenticated,",
		"550-5.7.26 which poses a security risk",
		"550 5.7.26 to the sender. https://support.example/answer", NULL}),
		RQ_REPLY_DONE);
	assert_string_equal(p.enhanced, "5.7.26");
	assert_string_equal(p.text, "This mail is unauthenticated,\nwhich poses a security risk\n"
				    "to the sender. https://support.example/answer");
	rq_reply_parser_outcome(&p, RQ_STAGE_DOT, &o);
	assert_int_equal(o.code, 550);
	assert_string_equal(o.enhanced, "5.7.26");
	assert_string_equal(o.text, p.text);

	/* the enhanced code only on a later line: taken from there */
	assert_int_equal(feed(&p, (const char *[]){"451-Try again", "451 4.3.0 later", NULL}),
			 RQ_REPLY_DONE);
	assert_string_equal(p.enhanced, "4.3.0");
	assert_string_equal(p.text, "Try again\nlater");

	/* empty continuation lines */
	assert_int_equal(feed(&p, (const char *[]){"250-", "250-", "250", NULL}), RQ_REPLY_DONE);
	assert_string_equal(p.text, "\n\n");
}

static void mismatched_and_bad_codes(void **state)
{
	(void)state;
	struct rq_reply_parser p;
	struct rq_outcome o;
	assert_int_equal(feed(&p, (const char *[]){"250-a", "251 b", NULL}), RQ_REPLY_ERROR);
	assert_non_null(strstr(p.err, "differs"));
	rq_reply_parser_outcome(&p, RQ_STAGE_EHLO, &o);
	assert_int_equal(o.fail, RQ_FAIL_PROTOCOL);
	assert_int_equal(o.code, 0);
	assert_int_equal(o.stage, RQ_STAGE_EHLO);
	assert_non_null(strstr(o.text, "differs"));
	/* after an error every further line is an error */
	assert_int_equal(rq_reply_parser_line(&p, "250 ok", 6), RQ_REPLY_ERROR);

	const char *bad[] = {"199 too low", "600 too high", "abc", "099 x", "25", "",
			     "2500 x", "250x", "25a ok", "250_ok", " 250 ok", NULL};
	for (size_t i = 0; bad[i]; i++) {
		rq_reply_parser_init(&p);
		assert_int_equal(rq_reply_parser_line(&p, bad[i], strlen(bad[i])),
				 RQ_REPLY_ERROR);
		assert_true(p.err[0] != '\0');
		rq_reply_parser_outcome(&p, RQ_STAGE_GREETING, &o);
		assert_int_equal(o.fail, RQ_FAIL_PROTOCOL);
	}
	/* bounds of the range are fine */
	assert_int_equal(feed(&p, (const char *[]){"200 x", NULL}), RQ_REPLY_DONE);
	assert_int_equal(feed(&p, (const char *[]){"599 x", NULL}), RQ_REPLY_DONE);

	/* garbage with control bytes: the error text shows them neutralised */
	rq_reply_parser_init(&p);
	assert_int_equal(rq_reply_parser_line(&p, "HTTP/1.1 400\r\nX: y", 18), RQ_REPLY_ERROR);
	assert_null(strchr(p.err, '\r'));
	assert_null(strchr(p.err, '\n'));

	/* an incomplete reply turned into an outcome is a protocol error */
	rq_reply_parser_init(&p);
	assert_int_equal(rq_reply_parser_line(&p, "250-x", 5), RQ_REPLY_MORE);
	rq_reply_parser_outcome(&p, RQ_STAGE_EHLO, &o);
	assert_int_equal(o.fail, RQ_FAIL_PROTOCOL);
}

static void line_and_count_limits(void **state)
{
	(void)state;
	struct rq_reply_parser p;
	char *line = malloc(RQ_REPLY_LINE_MAX + 2);
	memcpy(line, "250 ", 4);
	memset(line + 4, 'a', RQ_REPLY_LINE_MAX - 2);

	rq_reply_parser_init(&p);
	assert_int_equal(rq_reply_parser_line(&p, line, RQ_REPLY_LINE_MAX), RQ_REPLY_DONE);
	assert_int_equal(p.text_len, RQ_REPLY_TEXT_MAX - 1);
	assert_true(p.text_cut);
	rq_reply_parser_init(&p);
	assert_int_equal(rq_reply_parser_line(&p, line, RQ_REPLY_LINE_MAX + 1), RQ_REPLY_ERROR);
	assert_non_null(strstr(p.err, "longer"));
	free(line);

	/* 100 lines are fine, the 101st is an error */
	rq_reply_parser_init(&p);
	for (int i = 0; i < RQ_REPLY_LINES_MAX - 1; i++)
		assert_int_equal(rq_reply_parser_line(&p, "250-x", 5), RQ_REPLY_MORE);
	assert_int_equal(rq_reply_parser_line(&p, "250 x", 5), RQ_REPLY_DONE);
	rq_reply_parser_init(&p);
	for (int i = 0; i < RQ_REPLY_LINES_MAX; i++)
		assert_int_equal(rq_reply_parser_line(&p, "250-x", 5), RQ_REPLY_MORE);
	assert_int_equal(rq_reply_parser_line(&p, "250 x", 5), RQ_REPLY_ERROR);
	assert_non_null(strstr(p.err, "100 lines"));
}

static void text_joining_and_truncation(void **state)
{
	(void)state;
	struct rq_reply_parser p;
	/* 10 lines of 100 bytes: joined, cut to RQ_REPLY_TEXT_MAX - 1 */
	char line[105];
	memcpy(line, "550-", 4);
	rq_reply_parser_init(&p);
	for (int i = 0; i < 10; i++) {
		memset(line + 4, '0' + i, 100);
		if (i == 9)
			line[3] = ' ';
		enum rq_reply_status st = rq_reply_parser_line(&p, line, 104);
		assert_int_equal(st, i == 9 ? RQ_REPLY_DONE : RQ_REPLY_MORE);
	}
	assert_int_equal(strlen(p.text), RQ_REPLY_TEXT_MAX - 1);
	assert_int_equal(p.text_len, RQ_REPLY_TEXT_MAX - 1);
	assert_int_equal(p.text[100], '\n');
	assert_int_equal(p.text[101], '1');
	assert_int_equal(p.text[RQ_REPLY_TEXT_MAX - 2], '5'); /* lines are 101 bytes apart */

	/* a cut never splits a UTF-8 character: 3-byte characters after 1 byte */
	char u[4 + 1 + 3 * 300 + 1];
	memcpy(u, "554 x", 5);
	for (int i = 0; i < 300; i++)
		memcpy(u + 5 + 3 * i, "\xe2\x82\xac", 3); /* € */
	size_t ulen = 5 + 900;
	rq_reply_parser_init(&p);
	assert_int_equal(rq_reply_parser_line(&p, u, ulen), RQ_REPLY_DONE);
	assert_int_equal(p.text_len, strlen(p.text));
	assert_int_equal((p.text_len - 1) % 3, 0); /* "x" then whole characters */
	assert_true(p.text_len >= RQ_REPLY_TEXT_MAX - 3);

	/* control bytes in reply text never survive */
	rq_reply_parser_init(&p);
	assert_int_equal(rq_reply_parser_line(&p, "550 a\rb\0c\x1b", 10), RQ_REPLY_DONE);
	assert_int_equal(p.text_len, 6);
	assert_memory_equal(p.text, "a?b?c?", 7);
}

static void enhanced_codes(void **state)
{
	(void)state;
	char e[16];
	assert_int_equal(rq_reply_enhanced("5.1.1 no such user", 18, e), 6);
	assert_string_equal(e, "5.1.1");
	assert_int_equal(rq_reply_enhanced("  4.7.26", 8, e), 8);
	assert_string_equal(e, "4.7.26");
	assert_int_equal(rq_reply_enhanced("2.0.0", 5, e), 5);
	assert_int_equal(rq_reply_enhanced("5.999.999 x", 11, e), 10);
	assert_string_equal(e, "5.999.999");
	const char *none[] = {"3.1.1 x", "5.1 x", "5.1.1x", "5.1.1.1", "5.1000.1", "5.1.1000",
			      "x5.1.1", "5..1", ".1.1", "", "Ok", NULL};
	for (size_t i = 0; none[i]; i++) {
		assert_int_equal(rq_reply_enhanced(none[i], strlen(none[i]), e), 0);
		assert_string_equal(e, "");
	}
	/* the length bound is honoured: "5.1.1" cut to "5.1." is no code */
	assert_int_equal(rq_reply_enhanced("5.1.1", 4, e), 0);

	struct rq_reply_parser p;
	/* absent */
	assert_int_equal(feed(&p, (const char *[]){"550 no such user", NULL}), RQ_REPLY_DONE);
	assert_string_equal(p.enhanced, "");
	assert_string_equal(p.text, "no such user");
	/* inconsistent with the reply class: ignored and left in the text */
	assert_int_equal(feed(&p, (const char *[]){"550 2.0.0 odd", NULL}), RQ_REPLY_DONE);
	assert_string_equal(p.enhanced, "");
	assert_string_equal(p.text, "2.0.0 odd");
	assert_int_equal(feed(&p, (const char *[]){"250 4.2.0 odd", NULL}), RQ_REPLY_DONE);
	assert_string_equal(p.enhanced, "");
	/* 3xx replies carry none */
	assert_int_equal(feed(&p, (const char *[]){"354 5.0.0 go ahead", NULL}), RQ_REPLY_DONE);
	assert_string_equal(p.enhanced, "");
	/* only the code: present and stripped, text empty */
	assert_int_equal(feed(&p, (const char *[]){"452 4.5.3", NULL}), RQ_REPLY_DONE);
	assert_string_equal(p.enhanced, "4.5.3");
	assert_string_equal(p.text, "");
}

static void knowledge_base(void **state)
{
	(void)state;
	const int codes[] = {421, 450, 451, 452, 550, 551, 552, 553, 554, 535, 530};
	for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
		const struct rq_hint *h = rq_reply_hint(codes[i], NULL);
		assert_non_null(h);
		assert_true(strlen(h->meaning) > 5);
		assert_true(strlen(h->fix) > 5);
		/* a code's own entry, not the class fallback */
		assert_ptr_not_equal(h, rq_reply_hint(codes[i] / 100 * 100 + 99, NULL));
	}
	const char *subjects[] = {"1.1", "1.2", "2.1", "2.2", "3.4", "4.7", "7.1", "7.26", NULL};
	for (size_t i = 0; subjects[i]; i++) {
		char e[16];
		snprintf(e, sizeof(e), "5.%s", subjects[i]);
		const struct rq_hint *h = rq_reply_hint(550, e);
		assert_non_null(h);
		assert_ptr_not_equal(h, rq_reply_hint(550, NULL));
	}
	assert_non_null(strstr(rq_reply_hint(552, NULL)->meaning, "too large"));
	assert_non_null(strstr(rq_reply_hint(552, NULL)->fix, "attachments"));
	assert_non_null(strstr(rq_reply_hint(552, "5.3.4")->meaning, "too large"));
	assert_non_null(strstr(rq_reply_hint(554, "5.3.4")->fix, "reduce or link attachments"));
	assert_non_null(strstr(rq_reply_hint(553, NULL)->meaning, "invalid address"));
	assert_non_null(strstr(rq_reply_hint(553, NULL)->fix, "domain part"));
	assert_non_null(strstr(rq_reply_hint(550, "5.7.26")->meaning, "SPF/DKIM/DMARC"));
	assert_non_null(strstr(rq_reply_hint(550, "5.7.26")->fix, "DNS"));
	assert_non_null(strstr(rq_reply_hint(550, "5.1.1")->meaning, "does not exist"));
	assert_non_null(strstr(rq_reply_hint(535, NULL)->meaning, "credentials"));
	assert_non_null(strstr(rq_reply_hint(530, NULL)->meaning, "authentication required"));
	assert_non_null(strstr(rq_reply_hint(421, NULL)->fix, "retry"));

	/* fallbacks by class; never NULL in 200..599 */
	for (int c = 200; c <= 599; c++)
		assert_non_null(rq_reply_hint(c, NULL));
	assert_string_equal(rq_reply_hint(299, NULL)->meaning, "success");
	assert_string_equal(rq_reply_hint(479, NULL)->meaning, "temporary failure");
	assert_string_equal(rq_reply_hint(599, NULL)->meaning, "permanent failure");
	assert_null(rq_reply_hint(0, NULL));
	assert_null(rq_reply_hint(600, NULL));
}

static void knowledge_base_specificity(void **state)
{
	(void)state;
	const struct rq_hint *x71 = rq_reply_hint(550, "5.7.1");
	const struct rq_hint *ex471 = rq_reply_hint(450, "4.7.1");
	/* an exact enhanced entry beats the any-class entry */
	assert_ptr_not_equal(ex471, x71);
	assert_non_null(strstr(ex471->meaning, "greylisting"));
	/* the any-class entry serves a class without an exact entry */
	assert_ptr_equal(rq_reply_hint(550, "5.1.1"), rq_reply_hint(450, "4.1.1"));
	/* an enhanced entry beats the reply code */
	assert_ptr_not_equal(rq_reply_hint(550, "5.1.1"), rq_reply_hint(550, NULL));
	assert_ptr_equal(rq_reply_hint(554, "5.3.4"), rq_reply_hint(552, "5.3.4"));
	/* an unknown enhanced code falls back to the reply code, then the class */
	assert_ptr_equal(rq_reply_hint(550, "5.9.99"), rq_reply_hint(550, NULL));
	assert_ptr_equal(rq_reply_hint(550, "5.0.0"), rq_reply_hint(550, NULL));
	assert_ptr_equal(rq_reply_hint(558, "5.9.99"), rq_reply_hint(558, NULL));
	assert_string_equal(rq_reply_hint(558, "5.9.99")->meaning, "permanent failure");
	/* an enhanced code of another class is ignored */
	assert_ptr_equal(rq_reply_hint(250, "5.1.1"), rq_reply_hint(250, NULL));
	assert_ptr_equal(rq_reply_hint(450, "5.7.26"), rq_reply_hint(450, NULL));
	/* garbage enhanced strings are ignored */
	assert_ptr_equal(rq_reply_hint(550, "junk"), rq_reply_hint(550, NULL));
	assert_ptr_equal(rq_reply_hint(550, ""), rq_reply_hint(550, NULL));

	/* outcomes: replies use the reply hint, transport events their own */
	struct rq_outcome o;
	rq_outcome_set(&o, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550, "5.1.1", "no");
	assert_ptr_equal(rq_outcome_hint(&o), rq_reply_hint(550, "5.1.1"));
	rq_outcome_set(&o, RQ_STAGE_CONNECT, RQ_FAIL_TIMEOUT, 0, NULL, "no answer");
	assert_non_null(strstr(rq_outcome_hint(&o)->meaning, "in time"));
	rq_outcome_set(&o, RQ_STAGE_DNS, RQ_FAIL_DNS, 0, NULL, "servfail");
	assert_non_null(strstr(rq_outcome_hint(&o)->meaning, "DNS"));
	rq_outcome_set(&o, RQ_STAGE_DNS, RQ_FAIL_NONE, 550, "5.1.10", "null MX");
	o.synthetic = true;
	assert_non_null(strstr(rq_outcome_hint(&o)->meaning, "null MX"));
	assert_non_null(rq_outcome_hint(NULL));
}

/* Random garbage and random valid-looking lines: the parser never crashes,
 * and whatever it keeps stays bounded, NUL-ended and free of control bytes. */
static void random_lines(void **state)
{
	(void)state;
	unsigned seed = 4242;
	char *line = malloc(RQ_REPLY_LINE_MAX + 100);
	struct rq_reply_parser p;
	struct rq_outcome o;
	int done = 0, errors = 0;
	for (int iter = 0; iter < 20000; iter++) {
		rq_reply_parser_init(&p);
		enum rq_reply_status st = RQ_REPLY_MORE;
		int nlines = 1 + rand_r(&seed) % 120;
		for (int k = 0; k < nlines && st == RQ_REPLY_MORE; k++) {
			size_t len = (size_t)(rand_r(&seed) % (k % 7 == 6 ? RQ_REPLY_LINE_MAX + 60 : 90));
			for (size_t i = 0; i < len; i++)
				line[i] = (char)(rand_r(&seed) & 0xff);
			if (rand_r(&seed) % 4 != 0 && len >= 4) {
				/* mostly well-formed prefixes, sometimes with a code */
				memcpy(line, rand_r(&seed) % 10 ? "250" : "550", 3);
				line[3] = (k == nlines - 1 || rand_r(&seed) % 30 == 0) ? ' ' : '-';
				if (len >= 10 && rand_r(&seed) % 2)
					memcpy(line + 4, rand_r(&seed) % 2 ? "2.1.5 " : "5.7.26", 6);
			}
			st = rq_reply_parser_line(&p, line, len);
		}
		assert_true(p.text_len < RQ_REPLY_TEXT_MAX);
		assert_int_equal(strlen(p.text), p.text_len);
		for (size_t i = 0; i < p.text_len; i++)
			assert_true((unsigned char)p.text[i] >= 0x20 || p.text[i] == '\n' ||
				    p.text[i] == '\t');
		assert_true(strlen(p.err) < sizeof(p.err));
		rq_reply_parser_outcome(&p, RQ_STAGE_RCPT, &o);
		if (st == RQ_REPLY_DONE) {
			done++;
			assert_int_equal(o.fail, RQ_FAIL_NONE);
			assert_true(o.code >= 200 && o.code <= 599);
			if (o.enhanced[0])
				assert_int_equal(o.enhanced[0] - '0', o.code / 100);
			assert_non_null(rq_reply_hint(o.code, o.enhanced));
		} else {
			errors += st == RQ_REPLY_ERROR;
			assert_int_equal(o.fail, RQ_FAIL_PROTOCOL);
		}
		assert_true(strlen(o.text) < sizeof(o.text));
	}
	/* both paths were exercised */
	assert_true(done > 100);
	assert_true(errors > 100);
	free(line);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(names),
		cmocka_unit_test(connect_errno_classes),
		cmocka_unit_test(outcome_set_formats_and_truncates),
		cmocka_unit_test(single_line),
		cmocka_unit_test(multiline),
		cmocka_unit_test(mismatched_and_bad_codes),
		cmocka_unit_test(line_and_count_limits),
		cmocka_unit_test(text_joining_and_truncation),
		cmocka_unit_test(enhanced_codes),
		cmocka_unit_test(knowledge_base),
		cmocka_unit_test(knowledge_base_specificity),
		cmocka_unit_test(random_lines),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

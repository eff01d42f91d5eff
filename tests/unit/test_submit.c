/* A message handed to relayq by an application (submit.h): line endings,
 * header fixes, recipients from To/Cc/Bcc, Received and Date. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "relayq/submit.h"

/* 2026-12-03 18:23:52.123 UTC */
#define NOW 1796322232123LL

static char *fixed;
static size_t fixed_len;

/* rq_submit_fix of a C string; the result in fixed (NUL-ended copy). */
static void fix(const char *msg, const struct rq_submit_fix *f)
{
	char *out = NULL;
	size_t n = 0;
	char err[200] = "";
	if (rq_submit_fix(msg, strlen(msg), f, &out, &n, err, sizeof(err)) != 0)
		fail_msg("rq_submit_fix refused: %s", err);
	free(fixed);
	fixed = malloc(n + 1);
	assert_non_null(fixed);
	memcpy(fixed, out, n);
	fixed[n] = '\0';
	fixed_len = n;
	free(out);
}

static void fix_is(const char *msg, const struct rq_submit_fix *f, const char *want)
{
	fix(msg, f);
	assert_string_equal(fixed, want);
}

static int setup(void **state)
{
	setenv("TZ", "UTC", 1);
	tzset();
	return 0;
}

static int teardown(void **state)
{
	free(fixed);
	fixed = NULL;
	return 0;
}

/* ---- line endings and the header / body split ---- */

static void test_line_endings(void **state)
{
	struct rq_submit_fix f = {0};
	fix_is("Subject: a\n\nbody\n", &f, "Subject: a\r\n\r\nbody\r\n");
	fix_is("Subject: a\r\n\r\nbody\r\n", &f, "Subject: a\r\n\r\nbody\r\n");
	/* mixed, and a bare CR kept where it is */
	fix_is("Subject: a\rb\r\n\nline1\nline2\r\nx\ry\n", &f,
	       "Subject: a\rb\r\n\r\nline1\r\nline2\r\nx\ry\r\n");
	/* the last line gets its CRLF */
	fix_is("Subject: a\n\nno end", &f, "Subject: a\r\n\r\nno end\r\n");
	/* CR before LF is part of the line end, also in "\r\n\n" */
	fix_is("A: 1\r\n\nb\n\n\nc", &f, "A: 1\r\n\r\nb\r\n\r\n\r\nc\r\n");
	/* a trailing bare CR stays, the line still ends */
	fix_is("A: 1\n\nx\r", &f, "A: 1\r\n\r\nx\r\r\n");
}

static void test_no_separator(void **state)
{
	struct rq_submit_fix f = {0};
	/* all header: the empty line is added */
	fix_is("Subject: a\nTo: b@example.net\n", &f,
	       "Subject: a\r\nTo: b@example.net\r\n\r\n");
	fix_is("Subject: a\n folded", &f, "Subject: a\r\n folded\r\n\r\n");
	/* a line that is not a header field: all body */
	fix_is("hello world\n", &f, "\r\nhello world\r\n");
	fix_is("Subject: a\nhello\n", &f, "\r\nSubject: a\r\nhello\r\n");
	fix_is("hello\nSubject: a\n", &f, "\r\nhello\r\nSubject: a\r\n");
	/* a continuation cannot start a header */
	fix_is(" x: y\n", &f, "\r\n x: y\r\n");
	/* empty message */
	fix_is("", &f, "\r\n");
	/* a header field name is printable ASCII without ':' */
	fix_is("Na me: x\n", &f, "\r\nNa me: x\r\n");
	fix_is("Name : x\n", &f, "Name : x\r\n\r\n");
	/* message starting with the empty line: empty header */
	fix_is("\nbody\n", &f, "\r\nbody\r\n");
}

/* ---- fixes ---- */

static void test_add_fields(void **state)
{
	struct rq_submit_fix f = {
		.add_message_id = true, .add_date = true, .add_from = true,
		.hostname = "mx.example.com", .from = "app@example.com", .now_ms = NOW,
	};
	fix("Subject: hi\n\nbody\n", &f);
	/* appended in order: Message-ID, Date, From; the body unchanged */
	const char *id = strstr(fixed, "Message-ID: <");
	const char *date = strstr(fixed, "\r\nDate: Thu, 03 Dec 2026 18:23:52 +0000\r\n");
	const char *from = strstr(fixed, "\r\nFrom: <app@example.com>\r\n\r\nbody\r\n");
	assert_non_null(id);
	assert_non_null(date);
	assert_non_null(from);
	assert_true(strncmp(fixed, "Subject: hi\r\nMessage-ID: <", 26) == 0);
	assert_true(id < date && date < from);
	assert_non_null(strstr(id, "@mx.example.com>\r\n"));
	/* the same message at the same ms: the same id; else another */
	char first[200];
	snprintf(first, sizeof(first), "%.*s", (int)(strchr(id, '>') - id), id);
	fix("Subject: hi\n\nbody\n", &f);
	assert_non_null(strstr(fixed, first));
	f.now_ms++;
	fix("Subject: hi\n\nbody\n", &f);
	assert_null(strstr(fixed, first));
	fix("Subject: hi\n\nbody!\n", &f);
	assert_null(strstr(fixed, first));
	f.now_ms--;

	/* present (any case, space before the colon): not added */
	fix_is("message-id: <x@y>\nDATE : today\nfrom: a@b.c\n\nbody\n", &f,
	       "message-id: <x@y>\r\nDATE : today\r\nfrom: a@b.c\r\n\r\nbody\r\n");
	/* a field only in the body does not count */
	fix("Subject: s\n\nFrom: x@y.z\n", &f);
	assert_non_null(strstr(fixed, "From: <app@example.com>\r\n\r\nFrom: x@y.z\r\n"));
	/* a name like From-X is another field */
	fix("From-X: a\n\nb\n", &f);
	assert_non_null(strstr(fixed, "\r\nFrom: <app@example.com>\r\n"));
	/* hostname NULL: localhost */
	f.hostname = NULL;
	fix("Subject: s\n\nb\n", &f);
	assert_non_null(strstr(fixed, "@localhost>\r\n"));
	/* a whole mailbox is written as it is */
	f.from = "\"App Name\" <app@example.com>";
	fix("Subject: s\n\nb\n", &f);
	assert_non_null(strstr(fixed, "\r\nFrom: \"App Name\" <app@example.com>\r\n\r\n"));
	/* all body: fields then the empty line */
	f.add_message_id = false;
	f.add_date = false;
	f.from = "a@example.com";
	fix_is("just text\n", &f, "From: <a@example.com>\r\n\r\njust text\r\n");
	/* all header */
	fix_is("Subject: s", &f, "Subject: s\r\nFrom: <a@example.com>\r\n\r\n");
}

static void test_received(void **state)
{
	struct rq_submit_fix f = {.received = "Received: from a (b [127.0.0.1]) by c (relayq) with ESMTP; x"};
	fix_is("Subject: s\n\nb\n", &f,
	       "Received: from a (b [127.0.0.1]) by c (relayq) with ESMTP; x\r\n"
	       "Subject: s\r\n\r\nb\r\n");
	fix_is("body only\n", &f,
	       "Received: from a (b [127.0.0.1]) by c (relayq) with ESMTP; x\r\n\r\nbody only\r\n");
}

static void test_remove_bcc(void **state)
{
	struct rq_submit_fix f = {.remove_bcc = true};
	fix_is("To: a@x.y\nBcc: b@x.y,\n c@x.y\nSubject: s\nBCC:d@x.y\nbcc : e@x.y\n\nBcc: body@x.y\n",
	       &f, "To: a@x.y\r\nSubject: s\r\n\r\nBcc: body@x.y\r\n");
	/* last field, folded, no separator */
	fix_is("To: a@x.y\nBcc: b@x.y\n\tc@x.y", &f, "To: a@x.y\r\n\r\n");
	/* Bcc-Like is another field */
	fix_is("Bcc-Like: 1\n\nb", &f, "Bcc-Like: 1\r\n\r\nb\r\n");
	/* not asked: kept */
	f.remove_bcc = false;
	fix_is("Bcc: b@x.y\n\nb", &f, "Bcc: b@x.y\r\n\r\nb\r\n");
}

static void test_fix_refuses(void **state)
{
	char *out = (char *)1;
	size_t n = 1;
	char err[200];
	struct rq_submit_fix f = {.received = "Received: x\r\nBcc: evil@x.y"};
	assert_int_equal(rq_submit_fix("a", 1, &f, &out, &n, err, sizeof(err)), -1);
	assert_null(out);
	assert_int_equal(n, 0);
	assert_non_null(strstr(err, "control"));
	struct rq_submit_fix g = {.add_from = true, .from = "a@b.c\nBcc: x@y.z"};
	assert_int_equal(rq_submit_fix("a", 1, &g, &out, &n, err, sizeof(err)), -1);
	g.from = "not an address";
	assert_int_equal(rq_submit_fix("a", 1, &g, &out, &n, err, sizeof(err)), -1);
	g.from = NULL;
	assert_int_equal(rq_submit_fix("a", 1, &g, &out, &n, err, sizeof(err)), -1);
	struct rq_submit_fix h = {.add_message_id = true, .hostname = "bad host>"};
	assert_int_equal(rq_submit_fix("a", 1, &h, &out, &n, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "host"));
	/* over max: refused before reading anything */
	struct rq_submit_fix z = {0};
	assert_int_equal(rq_submit_fix("a", RQ_SUBMIT_MAX + 1, &z, &out, &n, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "larger"));
}

static void test_hostile(void **state)
{
	struct rq_submit_fix f = {.add_date = true, .add_message_id = true, .remove_bcc = true,
				  .now_ms = NOW};
	/* NUL bytes are kept, also in field names' lines */
	const char msg[] = "Subject: a\0b\nBcc\0: x\n\nbo\0dy\n";
	char *out;
	size_t n;
	char err[200];
	assert_int_equal(rq_submit_fix(msg, sizeof(msg) - 1, &f, &out, &n, err, sizeof(err)), 0);
	assert_non_null(memmem(out, n, "Subject: a\0b\r\n", 14));
	assert_non_null(memmem(out, n, "Bcc\0: x\r\n", 9));     /* not a Bcc field */
	assert_non_null(memmem(out, n, "\r\n\r\nbo\0dy\r\n", 11));
	free(out);

	/* a 1 MB header line, LF ended: kept whole (the DATA writer folds it) */
	size_t big = 1024 * 1024;
	char *m = malloc(big + 64);
	assert_non_null(m);
	memcpy(m, "X-Long: ", 8);
	memset(m + 8, 'a', big);
	memcpy(m + 8 + big, "\n\nbody\n", 7);
	assert_int_equal(rq_submit_fix(m, big + 15, &f, &out, &n, err, sizeof(err)), 0);
	assert_true(n > big + 16);
	assert_true(memcmp(out, "X-Long: aaaa", 12) == 0);
	assert_non_null(memmem(out, n, "\r\n\r\nbody\r\n", 10));
	free(out);
	/* the same with no line end at all: one header line */
	assert_int_equal(rq_submit_fix(m, big + 8, &f, &out, &n, err, sizeof(err)), 0);
	assert_true(memcmp(out + n - 4, "\r\n\r\n", 4) == 0);
	free(out);
	/* a million LFs: doubles, fine */
	memset(m, '\n', big);
	assert_int_equal(rq_submit_fix(m, big, &f, &out, &n, err, sizeof(err)), 0);
	free(out);
	free(m);
}

/* ---- recipients ---- */

static char **rc_v;
static size_t rc_n;

/* The recipients of msg as "a,b,c". */
static const char *rcpts(const char *msg)
{
	static char joined[4096];
	char err[200] = "";
	rq_submit_rcpts_free(rc_v, rc_n);
	rc_v = NULL;
	rc_n = 0;
	if (rq_submit_header_rcpts(msg, strlen(msg), &rc_v, &rc_n, err, sizeof(err)) != 0)
		fail_msg("refused '%s': %s", msg, err);
	joined[0] = '\0';
	for (size_t i = 0; i < rc_n; i++) {
		if (i)
			strcat(joined, ",");
		strcat(joined, rc_v[i]);
	}
	return joined;
}

static void bad_rcpts(const char *msg, const char *reason)
{
	char **v = (char **)1;
	size_t n = 1;
	char err[200] = "";
	if (rq_submit_header_rcpts(msg, strlen(msg), &v, &n, err, sizeof(err)) != -1)
		fail_msg("accepted '%s'", msg);
	assert_null(v);
	assert_int_equal(n, 0);
	if (reason && !strstr(err, reason))
		fail_msg("'%s': err '%s' lacks '%s'", msg, err, reason);
}

static void test_rcpts_forms(void **state)
{
	assert_string_equal(rcpts("To: a@x.y\n\n"), "a@x.y");
	assert_string_equal(rcpts("To: a@x.y, b@x.y\nCc: c@x.y\nBcc: d@x.y\n\nTo: body@x.y\n"),
			    "a@x.y,b@x.y,c@x.y,d@x.y");
	/* display names, quoted ones with commas, angle addresses */
	assert_string_equal(rcpts("To: John Smith <john@x.y>, \"Smith, Jane\" <jane@x.y>\n\n"),
			    "john@x.y,jane@x.y");
	assert_string_equal(rcpts("To: John Q. Public <jqp@x.y>\n\n"), "jqp@x.y");
	assert_string_equal(rcpts("To: \"a@b, c\" <real@x.y>\n\n"), "real@x.y");
	/* comments anywhere, nested, with quoted pairs */
	assert_string_equal(rcpts("To: a@x.y (Alice (the \\) one)), (c) b(x)@(y)x.y\n\n"),
			    "a@x.y,b@x.y");
	assert_string_equal(rcpts("To: <a@x.y> (A)\n\n"), "a@x.y");
	/* quoted local parts */
	assert_string_equal(rcpts("To: \"john doe\"@x.y, <\"q\\\"x\"@x.y>\n\n"),
			    "\"john doe\"@x.y,\"q\\\"x\"@x.y");
	/* groups */
	assert_string_equal(rcpts("To: undisclosed-recipients:;\n\n"), "");
	assert_string_equal(rcpts("To: Team: a@x.y, B <b@x.y>;, c@x.y\n\n"), "a@x.y,b@x.y,c@x.y");
	assert_string_equal(rcpts("Cc: friends: ;\n\n"), "");
	assert_string_equal(rcpts("Cc: open group: a@x.y\n\n"), "a@x.y");
	/* folded lines, LF or CRLF, and field names in any case */
	assert_string_equal(rcpts("TO: a@x.y,\r\n  b@x.y\r\ncc:\r\n\tc@x.y\r\n\r\n"),
			    "a@x.y,b@x.y,c@x.y");
	/* empty fields and members */
	assert_string_equal(rcpts("To:\nCc: , ,a@x.y,,\n\n"), "a@x.y");
	/* duplicates, case-insensitively, first spelling kept */
	assert_string_equal(rcpts("To: A@X.y, a@x.Y\nCc: a@x.y, b@x.y\nBcc: B@X.Y\n\n"),
			    "A@X.y,b@x.y");
	/* domain literals, dotted forms with spaces (obs) */
	assert_string_equal(rcpts("To: a@[127.0.0.1], b . c @ x . y\n\n"), "a@[127.0.0.1],b.c@x.y");
	/* source route dropped */
	assert_string_equal(rcpts("To: <@r1.x,@r2.x:a@x.y>\n\n"), "a@x.y");
	/* UTF-8 display name and address */
	assert_string_equal(rcpts("To: Jürgen <jürgen@x.y>\n\n"), "jürgen@x.y");
	/* other fields ignored, Resent-To too */
	assert_string_equal(rcpts("From: f@x.y\nResent-To: r@x.y\nReply-To: q@x.y\nTo: a@x.y\n\n"),
			    "a@x.y");
	/* no separator: all header, or all body */
	assert_string_equal(rcpts("To: a@x.y"), "a@x.y");
	assert_string_equal(rcpts("hello\nTo: a@x.y\n"), "");
	/* none */
	assert_string_equal(rcpts("Subject: x\n\n"), "");
	assert_null(rc_v);
	rq_submit_rcpts_free(rc_v, rc_n);
	rc_v = NULL;
	rc_n = 0;
}

static void test_rcpts_malformed(void **state)
{
	bad_rcpts("To: root\n\n", "no domain");
	bad_rcpts("To: Smith, John <j@x.y>\n\n", "no domain");
	bad_rcpts("To: <>\n\n", "empty");
	bad_rcpts("To: <a@x.y\n\n", "unclosed angle");
	bad_rcpts("To: \"a@x.y\n\n", "unclosed quoted");
	bad_rcpts("To: a@x.y (oops\n\n", "unclosed comment");
	bad_rcpts("To: a@[1.2.3.4\n\n", "unclosed domain literal");
	bad_rcpts("To: a@\n\n", "without a domain");
	bad_rcpts("To: a@x.\n\n", "dot");
	bad_rcpts("To: .a@x.y\n\n", "dot");
	bad_rcpts("To: John Smith john@x.y\n\n", "words before");
	bad_rcpts("To: a@x.y b@x.y\n\n", "garbage");
	bad_rcpts("To: G1: G2: a@x.y;;\n\n", "group inside");
	bad_rcpts("To: : a@x.y;\n\n", NULL);
	bad_rcpts("To: a\001b@x.y\n\n", "control");
	bad_rcpts("To: a@x.y, ]\n\n", "unexpected");
	bad_rcpts("To: a b@x.y\n\n", NULL);
	/* passes the parser, fails the address check */
	bad_rcpts("To: a@x..y\n\n", NULL);
	bad_rcpts("To: a@ex ample.com\n\n", NULL);
	char local[100];
	memset(local, 'l', 80);
	local[80] = '\0';
	char msg[200];
	snprintf(msg, sizeof(msg), "To: %s@x.y\n\n", local);
	bad_rcpts(msg, NULL);
	/* a NUL ends nothing: refused as a control byte */
	const char nul[] = "To: a\0@x.y\n\n";
	char **v;
	size_t n;
	char err[200];
	assert_int_equal(rq_submit_header_rcpts(nul, sizeof(nul) - 1, &v, &n, err, sizeof(err)), -1);
}

static void test_rcpts_many(void **state)
{
	/* RQ_SUBMIT_RCPTS_MAX distinct: ok; one more: refused. Duplicates do
	 * not count. On one 1 MB+ folded line. */
	size_t cap = (size_t)(RQ_SUBMIT_RCPTS_MAX + 2) * 40 + 100;
	char *m = malloc(cap);
	assert_non_null(m);
	char **v;
	size_t n;
	char err[200];
	for (int extra = 0; extra < 2; extra++) {
		size_t o = (size_t)sprintf(m, "To: ");
		for (int i = 0; i < RQ_SUBMIT_RCPTS_MAX; i++)
			o += (size_t)sprintf(m + o, "u%d@x.y,%s", i, i % 10 == 9 ? "\n " : " ");
		o += (size_t)sprintf(m + o, "%s\n\n", extra ? "one@more.y" : "U0@X.Y");
		if (!extra) {
			assert_int_equal(rq_submit_header_rcpts(m, o, &v, &n, err, sizeof(err)), 0);
			assert_int_equal(n, RQ_SUBMIT_RCPTS_MAX);
			assert_string_equal(v[0], "u0@x.y");
			assert_string_equal(v[n - 1], "u9999@x.y");
			rq_submit_rcpts_free(v, n);
		} else {
			assert_int_equal(rq_submit_header_rcpts(m, o, &v, &n, err, sizeof(err)), -1);
			assert_non_null(strstr(err, "more than"));
		}
	}
	free(m);

	/* a 1 MB display name */
	size_t big = 1024 * 1024;
	m = malloc(big + 64);
	assert_non_null(m);
	memcpy(m, "To: ", 4);
	memset(m + 4, 'n', big);
	memcpy(m + 4 + big, " <a@x.y>\n\n", 10);
	assert_int_equal(rq_submit_header_rcpts(m, big + 14, &v, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 1);
	rq_submit_rcpts_free(v, n);
	/* a 1 MB local part: refused by the address check */
	memcpy(m + 4 + big, "@x.y\n\n", 6);
	assert_int_equal(rq_submit_header_rcpts(m, big + 10, &v, &n, err, sizeof(err)), -1);
	free(m);
	rq_submit_rcpts_free(NULL, 0);
}

static void test_address_list(void **state)
{
	char **v = NULL;
	size_t n = 0;
	char err[200];
	const char *a1 = "a@x.y, B <b@x.y>";
	assert_int_equal(rq_submit_address_list(a1, strlen(a1), &v, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 2);
	const char *a2 = "c@x.y,A@X.Y";
	assert_int_equal(rq_submit_address_list(a2, strlen(a2), &v, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 3);
	assert_string_equal(v[2], "c@x.y");
	/* a bad list adds nothing, even after good members */
	const char *a3 = "d@x.y, root";
	assert_int_equal(rq_submit_address_list(a3, strlen(a3), &v, &n, err, sizeof(err)), -1);
	assert_int_equal(n, 3);
	assert_non_null(strstr(err, "'root' has no domain"));
	/* on top of the header's */
	rq_submit_rcpts_free(v, n);
	const char *m = "To: h@x.y\n\n";
	assert_int_equal(rq_submit_header_rcpts(m, strlen(m), &v, &n, err, sizeof(err)), 0);
	assert_int_equal(rq_submit_address_list("H@x.y", 5, &v, &n, err, sizeof(err)), 0);
	assert_int_equal(rq_submit_address_list("i@x.y", 5, &v, &n, err, sizeof(err)), 0);
	assert_int_equal(n, 2);
	rq_submit_rcpts_free(v, n);
	/* from nothing, failing */
	v = NULL;
	n = 0;
	assert_int_equal(rq_submit_address_list("x", 1, &v, &n, err, sizeof(err)), -1);
	assert_int_equal(n, 0);
	rq_submit_rcpts_free(v, n);
}

/* ---- Received, Date, mailbox ---- */

static void test_date(void **state)
{
	char d[RQ_SUBMIT_DATE_LEN];
	assert_int_equal(rq_submit_date(d, sizeof(d), NOW), 31);
	assert_string_equal(d, "Thu, 03 Dec 2026 18:23:52 +0000");
	assert_int_equal(rq_submit_date(d, sizeof(d), 0), 31);
	assert_string_equal(d, "Thu, 01 Jan 1970 00:00:00 +0000");
	assert_int_equal(rq_submit_date(d, 31, NOW), -1);   /* no room for the NUL */
	setenv("TZ", "EST5EDT", 1);
	tzset();
	assert_int_equal(rq_submit_date(d, sizeof(d), NOW), 31);
	assert_string_equal(d, "Thu, 03 Dec 2026 13:23:52 -0500");
	assert_int_equal(rq_submit_date(d, sizeof(d), 1783000000000LL), 31);   /* July: EDT */
	assert_non_null(strstr(d, " -0400"));
	setenv("TZ", "IST-5:30", 1);
	tzset();
	assert_int_equal(rq_submit_date(d, sizeof(d), NOW), 31);
	assert_string_equal(d, "Thu, 03 Dec 2026 23:53:52 +0530");
	setenv("TZ", "UTC", 1);
	tzset();
}

static void test_received_field(void **state)
{
	char b[RQ_SUBMIT_RECEIVED_LEN];
	int n = rq_submit_received(b, sizeof(b), "client.example", "host.example", "192.0.2.1",
				   "mx.example.com", "ESMTPSA", "one@x.y", NOW);
	assert_string_equal(b, "Received: from client.example (host.example [192.0.2.1]) by "
			    "mx.example.com (relayq) with ESMTPSA for <one@x.y>; "
			    "Thu, 03 Dec 2026 18:23:52 +0000");
	assert_int_equal(n, (int)strlen(b));
	rq_submit_received(b, sizeof(b), NULL, NULL, "2001:db8::1", NULL, NULL, NULL, NOW);
	assert_string_equal(b, "Received: from unknown (unknown [IPv6:2001:db8::1]) by localhost "
			    "(relayq) with ESMTP; Thu, 03 Dec 2026 18:23:52 +0000");
	/* hostile helo and reverse: cleaned and bounded; a bad rcpt: no for */
	char evil[600];
	memset(evil, 'h', sizeof(evil) - 1);
	evil[sizeof(evil) - 1] = '\0';
	memcpy(evil, "a\r\nBcc: x;(y)", 13);
	n = rq_submit_received(b, sizeof(b), evil, "r\001) [x]", "1.2.3.4\r\n", "h", "ESMTP\r\nX",
			       "bad rcpt@x.y", NOW);
	assert_true(n > 0);
	assert_null(strpbrk(b, "\r\n\001"));
	assert_non_null(strstr(b, "from a__Bcc:_x__y_hh"));
	assert_non_null(strstr(b, "(r____x_ [1.2.3.4__]) by h (relayq) with ESMTPX; "));
	assert_null(strstr(b, " for "));
	assert_true(n < 600);
	/* longest: still fits RQ_SUBMIT_RECEIVED_LEN */
	char host[300], rc[300];
	memset(host, 'x', 255);
	host[255] = '\0';
	memset(rc, 'l', 64);
	snprintf(rc + 64, sizeof(rc) - 64, "@%.180s", host);
	n = rq_submit_received(b, sizeof(b), evil, evil, "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
			       host, "ESMTPSA", rc, NOW);
	assert_true(n > 0 && n < RQ_SUBMIT_RECEIVED_LEN);
	/* too small */
	assert_int_equal(rq_submit_received(b, 40, "a", "b", "1.2.3.4", "h", NULL, NULL, NOW), -1);
}

static void test_mailbox(void **state)
{
	char b[600], err[200];
	assert_int_equal(rq_submit_mailbox(b, sizeof(b), NULL, "a@x.y", err, sizeof(err)), 7);
	assert_string_equal(b, "<a@x.y>");
	rq_submit_mailbox(b, sizeof(b), "", "a@x.y", err, sizeof(err));
	assert_string_equal(b, "<a@x.y>");
	rq_submit_mailbox(b, sizeof(b), "Cron Daemon", "a@x.y", err, sizeof(err));
	assert_string_equal(b, "\"Cron Daemon\" <a@x.y>");
	rq_submit_mailbox(b, sizeof(b), "Say \"hi\" \\o/\r\nBcc: x", "a@x.y", err, sizeof(err));
	assert_string_equal(b, "\"Say \\\"hi\\\" \\\\o/Bcc: x\" <a@x.y>");
	rq_submit_mailbox(b, sizeof(b), "Jürgen", "a@x.y", err, sizeof(err));
	assert_string_equal(b, "=?UTF-8?B?SsO8cmdlbg==?= <a@x.y>");
	/* long UTF-8: several words, each under 76 characters, whole characters */
	char name[300] = "";
	for (int i = 0; i < 60; i++)
		strcat(name, "é");
	assert_true(rq_submit_mailbox(b, sizeof(b), name, "a@x.y", err, sizeof(err)) > 0);
	for (char *w = b; (w = strstr(w, "=?UTF-8?B?")); w++) {
		char *e = strstr(w, "?=");
		assert_non_null(e);
		assert_true(e + 2 - w <= 75);
	}
	assert_int_equal(rq_submit_mailbox(b, sizeof(b), "x", "not valid", err, sizeof(err)), -1);
	assert_int_equal(rq_submit_mailbox(b, 5, "x", "a@x.y", err, sizeof(err)), -1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_teardown(test_line_endings, teardown),
		cmocka_unit_test_teardown(test_no_separator, teardown),
		cmocka_unit_test_teardown(test_add_fields, teardown),
		cmocka_unit_test_teardown(test_received, teardown),
		cmocka_unit_test_teardown(test_remove_bcc, teardown),
		cmocka_unit_test(test_fix_refuses),
		cmocka_unit_test(test_hostile),
		cmocka_unit_test(test_rcpts_forms),
		cmocka_unit_test(test_rcpts_malformed),
		cmocka_unit_test(test_rcpts_many),
		cmocka_unit_test(test_address_list),
		cmocka_unit_test(test_date),
		cmocka_unit_test(test_received_field),
		cmocka_unit_test(test_mailbox),
	};
	return cmocka_run_group_tests(tests, setup, NULL);
}

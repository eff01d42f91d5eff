#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/dsn.h"
#include "relayq/message.h"

#define NOW 1795869865 /* Sat, 28 Nov 2026 12:44:25 +0000 */

static const char orig[] =
	"From: App <app@example.com>\r\n"
	"To: bob@example.net, carol@example.org\r\n"
	"Subject: Invoice 42\r\n"
	"Message-ID: <abc@example.com>\r\n"
	"\r\n"
	"SECRET BODY TEXT\r\n";

static struct rq_dsn_input base_input(struct rq_dsn_rcpt *r, size_t n)
{
	struct rq_dsn_input in = {
		.reporting_mta = "relay.example.com",
		.from = "app@example.com",
		.body = orig,
		.body_len = sizeof(orig) - 1,
		.rcpts = r,
		.nrcpts = n,
		.arrival = NOW - 3600,
		.now = NOW,
		.msg_id = "01HXYZ",
	};
	return in;
}

/* Every line ends in CRLF, no bare CR or LF, no line over 998 octets. */
static void check_lines(const char *m, size_t n)
{
	size_t start = 0;
	for (size_t i = 0; i < n; i++) {
		if (m[i] == '\r') {
			assert_true(i + 1 < n && m[i + 1] == '\n');
			assert_true(i - start <= RQ_LINE_MAX);
			i++;
			start = i + 1;
		} else {
			assert_int_not_equal(m[i], '\n');
			assert_int_not_equal(m[i], '\0');
		}
	}
	assert_int_equal(start, n);
}

/* The value of a top-level header field (unfolded, first line only). */
static char *header(const char *m, const char *name)
{
	const char *end = strstr(m, "\r\n\r\n");
	assert_non_null(end);
	size_t nl = strlen(name);
	for (const char *p = m; p < end; p = strstr(p, "\r\n") + 2) {
		if (strncmp(p, name, nl) == 0 && p[nl] == ':') {
			const char *v = p + nl + 1;
			while (*v == ' ')
				v++;
			const char *e = strstr(v, "\r\n");
			return strndup(v, (size_t)(e - v));
		}
	}
	return NULL;
}

struct parts {
	char boundary[80];
	char *part[8];
	int n;
};

/* Splits the multipart body at its delimiters; checks the closing one. */
static void split(const char *m, struct parts *ps)
{
	memset(ps, 0, sizeof(*ps));
	char *ct = header(m, "Content-Type");
	assert_non_null(ct);
	assert_non_null(strstr(ct, "multipart/report; report-type=delivery-status"));
	free(ct);
	const char *b = strstr(m, "boundary=\"");
	assert_non_null(b);
	b += 10;
	const char *e = strchr(b, '"');
	snprintf(ps->boundary, sizeof(ps->boundary), "%.*s", (int)(e - b), b);
	char delim[100];
	snprintf(delim, sizeof(delim), "\r\n--%s", ps->boundary);
	const char *p = strstr(m, delim);
	assert_non_null(p);
	for (;;) {
		p += strlen(delim);
		if (strncmp(p, "--\r\n", 4) == 0) {
			assert_string_equal(p, "--\r\n"); /* nothing after the end */
			break;
		}
		assert_memory_equal(p, "\r\n", 2);
		p += 2;
		const char *next = strstr(p, delim);
		assert_non_null(next);
		assert_true(ps->n < 8);
		ps->part[ps->n++] = strndup(p, (size_t)(next - p));
		p = next;
	}
}

static void free_parts(struct parts *ps)
{
	for (int i = 0; i < ps->n; i++)
		free(ps->part[i]);
}

static size_t count(const char *hay, const char *needle)
{
	size_t c = 0;
	for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle))
		c++;
	return c;
}

static void three_recipients(struct rq_dsn_rcpt r[3])
{
	memset(r, 0, 3 * sizeof(*r));
	r[0].addr = "bob@example.net";
	r[0].remote_mta = "mx.example.net";
	rq_outcome_set(&r[0].outcome, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550, "5.1.1",
		       "<bob@example.net>: Recipient address rejected:\nUser unknown");
	r[1].addr = "carol@example.org";
	r[1].remote_mta = "mx.example.org";
	rq_outcome_set(&r[1].outcome, RQ_STAGE_DOT, RQ_FAIL_NONE, 552, NULL,
		       "Message size exceeds fixed limit");
	r[2].addr = "dave@example.invalid";
	rq_outcome_set(&r[2].outcome, RQ_STAGE_CONNECT, RQ_FAIL_TIMEOUT, 0, NULL,
		       "no answer from 192.0.2.7 after 30 s");
}

static void structure_and_fields(void **state)
{
	(void)state;
	struct rq_dsn_rcpt r[3];
	three_recipients(r);
	struct rq_dsn_input in = base_input(r, 3);
	char err[128];
	size_t len = 0;
	char *m = rq_dsn_build(&in, &len, err, sizeof(err));
	assert_non_null(m);
	assert_int_equal(len, strlen(m));
	check_lines(m, len);

	char *v;
	v = header(m, "From");
	assert_string_equal(v, "Mail Delivery System <MAILER-DAEMON@relay.example.com>");
	free(v);
	v = header(m, "To");
	assert_string_equal(v, "<app@example.com>");
	free(v);
	v = header(m, "Date");
	assert_string_equal(v, "Sat, 28 Nov 2026 12:44:25 +0000");
	free(v);
	v = header(m, "Auto-Submitted");
	assert_string_equal(v, "auto-replied");
	free(v);
	v = header(m, "MIME-Version");
	assert_string_equal(v, "1.0");
	free(v);
	v = header(m, "Message-ID");
	assert_non_null(strstr(v, "@relay.example.com>"));
	free(v);
	v = header(m, "Subject");
	assert_non_null(v);
	free(v);

	struct parts ps;
	split(m, &ps);
	assert_int_equal(ps.n, 3);
	/* the boundary appears in the Content-Type and the 4 delimiters only */
	assert_int_equal(count(m, ps.boundary), 5);

	/* 1: human-readable */
	assert_non_null(strstr(ps.part[0], "Content-Type: text/plain; charset=utf-8\r\n"));
	assert_non_null(strstr(ps.part[0], "<bob@example.net>"));
	assert_non_null(strstr(ps.part[0], "550 5.1.1 <bob@example.net>: Recipient address rejected:"
					   "\r\n               User unknown"));
	assert_non_null(strstr(ps.part[0], "mx.example.net (in reply to RCPT TO)"));
	assert_non_null(strstr(ps.part[0], rq_reply_hint(550, "5.1.1")->meaning));
	assert_non_null(strstr(ps.part[0], rq_reply_hint(550, "5.1.1")->fix));
	assert_non_null(strstr(ps.part[0], "<carol@example.org>"));
	assert_non_null(strstr(ps.part[0], "reduce or link attachments"));
	assert_non_null(strstr(ps.part[0], "<dave@example.invalid>"));
	assert_non_null(strstr(ps.part[0], "timeout: no answer from 192.0.2.7"));
	assert_non_null(strstr(ps.part[0], "did not answer in time"));

	/* 2: delivery-status: per-message fields, a blank line, per recipient */
	const char *ds = ps.part[1];
	assert_non_null(strstr(ds, "Content-Type: message/delivery-status\r\n\r\n"
				   "Reporting-MTA: dns; relay.example.com\r\n"));
	assert_non_null(strstr(ds, "Arrival-Date: Sat, 28 Nov 2026 11:44:25 +0000\r\n"));
	assert_non_null(strstr(ds, "\r\n\r\nFinal-Recipient: rfc822; bob@example.net\r\n"
				   "Action: failed\r\nStatus: 5.1.1\r\n"
				   "Remote-MTA: dns; mx.example.net\r\n"
				   "Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: Recipient"
				   " address\r\n rejected: User unknown\r\n"));
	assert_non_null(strstr(ds, "Final-Recipient: rfc822; carol@example.org\r\n"
				   "Action: failed\r\nStatus: 5.0.0\r\n"
				   "Remote-MTA: dns; mx.example.org\r\n"
				   "Diagnostic-Code: smtp; 552 Message size exceeds fixed limit\r\n"));
	assert_non_null(strstr(ds, "Final-Recipient: rfc822; dave@example.invalid\r\n"
				   "Action: failed\r\nStatus: 4.4.1\r\n"
				   "Diagnostic-Code: X-relayq; timeout: no answer from 192.0.2.7"));
	assert_int_equal(count(ds, "Remote-MTA:"), 2);
	assert_int_equal(count(ds, "Last-Attempt-Date: Sat, 28 Nov 2026 12:44:25 +0000\r\n"), 3);

	/* 3: the original header, not the body */
	assert_non_null(strstr(ps.part[2], "Content-Type: text/rfc822-headers\r\n\r\n"
					   "From: App <app@example.com>\r\n"));
	assert_non_null(strstr(ps.part[2], "Subject: Invoice 42\r\n"));
	assert_non_null(strstr(ps.part[2], "Message-ID: <abc@example.com>\r\n"));
	assert_null(strstr(m, "SECRET BODY"));
	/* all 7-bit here: no 8bit labels */
	assert_false(rq_body_is_8bit(m, len));
	assert_null(strstr(m, "8bit"));
	free_parts(&ps);

	/* pure: the same inputs give the same bytes */
	size_t len2;
	char *m2 = rq_dsn_build(&in, &len2, NULL, 0);
	assert_int_equal(len2, len);
	assert_memory_equal(m2, m, len);
	free(m2);
	free(m);
}

static void refusals(void **state)
{
	(void)state;
	struct rq_dsn_rcpt r[3];
	three_recipients(r);
	struct rq_dsn_input in = base_input(r, 3);
	char err[128];
	size_t len = 99;

	in.from = "";
	assert_null(rq_dsn_build(&in, &len, err, sizeof(err)));
	assert_non_null(strstr(err, "null sender"));
	assert_int_equal(len, 0);

	in.from = "app@example.com\r\nBcc: x@y";
	assert_null(rq_dsn_build(&in, &len, err, sizeof(err)));
	assert_non_null(strstr(err, "invalid sender"));

	in.from = "app@example.com";
	in.reporting_mta = "relay.example.com\r\nX: y";
	assert_null(rq_dsn_build(&in, &len, err, sizeof(err)));
	assert_non_null(strstr(err, "reporting"));

	in.reporting_mta = "relay.example.com";
	in.nrcpts = 0;
	assert_null(rq_dsn_build(&in, &len, err, sizeof(err)));
	assert_non_null(strstr(err, "no failed recipients"));

	assert_null(rq_dsn_build(NULL, &len, err, sizeof(err)));
}

static void no_header_injection(void **state)
{
	(void)state;
	struct rq_dsn_rcpt r[1];
	memset(r, 0, sizeof(r));
	r[0].addr = "bob@example.net\r\nBcc: victim1@evil.test";
	r[0].remote_mta = "mx.evil.test\r\nBcc: victim2@evil.test";
	/* raw CR/LF written straight into the outcome (not via outcome_set) */
	r[0].outcome.stage = RQ_STAGE_RCPT;
	r[0].outcome.code = 550;
	snprintf(r[0].outcome.text, sizeof(r[0].outcome.text),
		 "no\r\nBcc: victim3@evil.test\r\n\r\nContent-Type: text/html\n"
		 "Final-Recipient: rfc822; victim4@evil.test\rAction: delivered");
	snprintf(r[0].outcome.enhanced, sizeof(r[0].outcome.enhanced), "5.1.1\r\nX");
	struct rq_dsn_input in = base_input(r, 1);
	const char hdrs[] = "Subject: hi\rBcc: victim5@evil.test\nX-A: \0b\r\n\r\nbody";
	in.body = hdrs;
	in.body_len = sizeof(hdrs) - 1;
	size_t len;
	char *m = rq_dsn_build(&in, &len, NULL, 0);
	assert_non_null(m);
	check_lines(m, len);
	/* the top-level header holds our fields only */
	const char *hend = strstr(m, "\r\n\r\n");
	const char *own[] = {"From: ", "To: ", "Subject: ", "Date: ", "Message-ID: ",
			     "Auto-Submitted: ", "MIME-Version: ", "Content-Type: ", "\t", NULL};
	for (const char *l = m; l < hend; l = strstr(l, "\r\n") + 2) {
		bool ok = false;
		for (size_t k = 0; own[k]; k++)
			ok = ok || strncmp(l, own[k], strlen(own[k])) == 0;
		if (!ok)
			fail_msg("unexpected top-level header line: %.40s", l);
	}
	/* no line in the report parts starts with an injected field; the
	 * original header is shown as the wire had it (a bare CR is a space
	 * there, as in the DATA writer), inside its own part only */
	const char *hdrpart = strstr(m, "Content-Type: text/rfc822-headers");
	assert_non_null(hdrpart);
	char *before = strndup(m, (size_t)(hdrpart - m));
	assert_null(strstr(before, "\r\nBcc:"));
	assert_null(strstr(before, "\r\nAction: delivered"));
	free(before);
	assert_int_equal(count(m, "\r\nFinal-Recipient:"), 1);
	/* the bare CR of the original Subject is shown as the writer sends it */
	assert_non_null(strstr(m, "\r\nSubject: hi Bcc: victim5@evil.test\r\n"));
	assert_null(strstr(m, "\r\nBcc: victim5"));
	assert_null(strstr(m, "\r\nContent-Type: text/html"));
	assert_null(strstr(m, "\r\n\r\nContent-Type: text/html"));
	struct parts ps;
	split(m, &ps);
	assert_int_equal(ps.n, 3);
	/* the delivery-status part: only known fields, continuations, blank lines */
	const char *body = strstr(ps.part[1], "\r\n\r\n") + 4;
	const char *known[] = {"Reporting-MTA: ", "X-Relayq-Message-Id: ", "Arrival-Date: ",
			       "Final-Recipient: ", "Action: failed", "Status: ",
			       "Remote-MTA: ", "Diagnostic-Code: ", "Last-Attempt-Date: ", NULL};
	for (const char *l = body; *l; l = strstr(l, "\r\n") + 2) {
		if (strncmp(l, "\r\n", 2) == 0 || *l == ' ')
			continue;
		bool ok = false;
		for (size_t k = 0; known[k]; k++)
			ok = ok || strncmp(l, known[k], strlen(known[k])) == 0;
		if (!ok)
			fail_msg("unexpected line in delivery-status: %.40s", l);
	}
	/* line breaks in the address and host name are shown as '?' */
	assert_non_null(strstr(ps.part[1], "Final-Recipient: rfc822; bob@example.net??Bcc:"));
	assert_non_null(strstr(ps.part[1], "Remote-MTA: dns; mx.evil.test??Bcc:"));
	/* an enhanced code that is not one is not reported as such */
	assert_non_null(strstr(ps.part[1], "Status: 5.0.0\r\n"));
	/* the original header part: NUL shown as '?', the body left out */
	assert_non_null(strstr(ps.part[2], "\r\nX-A: ?b\r\n"));
	assert_null(strstr(ps.part[2], "body"));
	free_parts(&ps);
	free(m);
}

static void boundary_avoids_content(void **state)
{
	(void)state;
	struct rq_dsn_rcpt r[3];
	three_recipients(r);
	struct rq_dsn_input in = base_input(r, 3);
	size_t len;
	char *m = rq_dsn_build(&in, &len, NULL, 0);
	struct parts ps;
	split(m, &ps);
	char first[80];
	snprintf(first, sizeof(first), "%s", ps.boundary);
	free_parts(&ps);
	free(m);

	/* the same report, with that boundary planted in the original header */
	char hdrs[300];
	snprintf(hdrs, sizeof(hdrs), "Subject: x\r\nX-Trap: --%s\r\n--%s--\r\n\r\nbody",
		 first, first);
	in.body = hdrs;
	in.body_len = strlen(hdrs);
	m = rq_dsn_build(&in, &len, NULL, 0);
	assert_non_null(m);
	split(m, &ps);
	assert_string_not_equal(ps.boundary, first);
	assert_int_equal(ps.n, 3);
	assert_int_equal(count(m, ps.boundary), 5);
	assert_non_null(strstr(ps.part[2], "X-Trap: --"));
	free_parts(&ps);
	free(m);
}

static void eight_bit_and_limits(void **state)
{
	(void)state;
	struct rq_dsn_rcpt r[1];
	memset(r, 0, sizeof(r));
	r[0].addr = "j\xc3\xbcrgen@example.de";
	rq_outcome_set(&r[0].outcome, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550, "5.2.1",
		       "Konto gel\xc3\xb6scht");
	struct rq_dsn_input in = base_input(r, 1);
	/* a header larger than RQ_DSN_HEADERS_MAX, LF endings, 8-bit */
	size_t big = RQ_DSN_HEADERS_MAX * 2;
	char *h = malloc(big + 16);
	size_t n = 0;
	for (int i = 0; n + 40 < big; i++)
		n += (size_t)sprintf(h + n, "X-H%06d: v\xc3\xa4lue\n", i);
	memcpy(h + n, "\nbody\n", 6);
	in.body = h;
	in.body_len = n + 6;
	size_t len;
	char *m = rq_dsn_build(&in, &len, NULL, 0);
	assert_non_null(m);
	check_lines(m, len);
	struct parts ps;
	split(m, &ps);
	assert_non_null(strstr(ps.part[0], "Content-Transfer-Encoding: 8bit\r\n"));
	assert_non_null(strstr(ps.part[0], "Konto gel\xc3\xb6scht"));
	assert_non_null(strstr(ps.part[0], "<j\xc3\xbcrgen@example.de>"));
	/* the delivery-status part stays 7-bit */
	assert_false(rq_body_is_8bit(ps.part[1], strlen(ps.part[1])));
	assert_non_null(strstr(ps.part[1], "Status: 5.2.1\r\n"));
	/* the header part is bounded, ends on a whole line, and says 8bit */
	const char *hp = strstr(ps.part[2], "\r\n\r\n") + 4;
	assert_true(strlen(hp) <= RQ_DSN_HEADERS_MAX);
	assert_true(strlen(hp) > RQ_DSN_HEADERS_MAX - 40);
	assert_memory_equal(hp + strlen(hp) - 2, "\r\n", 2);
	assert_non_null(strstr(ps.part[2], "Content-Transfer-Encoding: 8bit\r\n"));
	assert_non_null(strstr(m, "\r\nContent-Transfer-Encoding: 8bit\r\n\r\nThis is a MIME"));
	free_parts(&ps);
	free(m);
	free(h);
}

static void status_derivation(void **state)
{
	(void)state;
	struct rq_outcome o;
	char st[16];
	rq_outcome_set(&o, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550, "5.7.26", "x");
	assert_string_equal(rq_dsn_status(&o, st), "5.7.26");
	rq_outcome_set(&o, RQ_STAGE_RCPT, RQ_FAIL_NONE, 451, NULL, "x");
	assert_string_equal(rq_dsn_status(&o, st), "4.0.0");
	rq_outcome_set(&o, RQ_STAGE_RCPT, RQ_FAIL_NONE, 550, "4.1.1", "x");
	assert_string_equal(rq_dsn_status(&o, st), "5.0.0"); /* class mismatch */
	rq_outcome_set(&o, RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0, NULL, "x");
	assert_string_equal(rq_dsn_status(&o, st), "4.4.1");
	rq_outcome_set(&o, RQ_STAGE_DOT, RQ_FAIL_LOST, 0, NULL, "x");
	assert_string_equal(rq_dsn_status(&o, st), "4.4.2");
	rq_outcome_set(&o, RQ_STAGE_DNS, RQ_FAIL_DNS, 0, NULL, "x");
	assert_string_equal(rq_dsn_status(&o, st), "4.4.3");
	rq_outcome_set(&o, RQ_STAGE_TLS, RQ_FAIL_TLS, 0, NULL, "x");
	assert_string_equal(rq_dsn_status(&o, st), "4.7.5");
	rq_outcome_set(&o, RQ_STAGE_EHLO, RQ_FAIL_PROTOCOL, 0, NULL, "x");
	assert_string_equal(rq_dsn_status(&o, st), "4.5.0");

	/* a synthetic reply is not presented as the server's */
	struct rq_dsn_rcpt r[1];
	memset(r, 0, sizeof(r));
	r[0].addr = "x@null-mx.test";
	rq_outcome_set(&r[0].outcome, RQ_STAGE_DNS, RQ_FAIL_NONE, 550, "5.1.10",
		       "null MX: the domain accepts no mail");
	r[0].outcome.synthetic = true;
	struct rq_dsn_input in = base_input(r, 1);
	in.arrival = 0;
	in.msg_id = NULL;
	size_t len;
	char *m = rq_dsn_build(&in, &len, NULL, 0);
	assert_non_null(m);
	assert_non_null(strstr(m, "Status: 5.1.10\r\n"));
	assert_non_null(strstr(m, "Diagnostic-Code: X-relayq; 550 5.1.10 null MX:"));
	assert_null(strstr(m, "smtp;"));
	assert_null(strstr(m, "Arrival-Date:"));
	assert_null(strstr(m, "X-Relayq-Message-Id:"));
	free(m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(structure_and_fields),
		cmocka_unit_test(refusals),
		cmocka_unit_test(no_header_injection),
		cmocka_unit_test(boundary_avoids_content),
		cmocka_unit_test(eight_bit_and_limits),
		cmocka_unit_test(status_derivation),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

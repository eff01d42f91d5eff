#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/message.h"

static bool valid(const char *a, bool allow_null, char *err)
{
	return rq_addr_valid(a, strlen(a), allow_null, err, 128);
}

static void addresses_valid(void **state)
{
	(void)state;
	char err[128];
	const char *ok[] = {"user@example.com", "first.last+tag@sub.example.co.uk",
			    "a@b", "x_y-z@host_name.test", "o'brien@example.ie",
			    "\"john smith\"@example.com", "\"a@b\"@example.com",
			    "\"quote\\\"inside\"@example.com", "user@[192.0.2.1]",
			    "user@[IPv6:2001:db8::1]", "j\xc3\xbcrgen@b\xc3\xbc" "cher.de",
			    "!#$%&'*+-/=?^_`{|}~@example.com", NULL};
	for (size_t i = 0; ok[i]; i++) {
		bool v = valid(ok[i], false, err);
		if (!v)
			fail_msg("%s rejected: %s", ok[i], err);
	}
	/* the null sender */
	assert_true(rq_addr_valid("", 0, true, err, sizeof(err)));
	assert_false(rq_addr_valid("", 0, false, err, sizeof(err)));
	assert_non_null(strstr(err, "empty"));
	/* err may be NULL */
	assert_false(rq_addr_valid("x", 1, false, NULL, 0));
}

static void addresses_invalid(void **state)
{
	(void)state;
	char err[128];
	struct { const char *addr; size_t len; const char *why; } bad[] = {
		{"user@exa\r\nRCPT TO:<x@y>", 0, "CR"},
		{"user@example.com\n", 0, "LF"},
		{"user\0@example.com", 17, "NUL"},
		{"us\ter@example.com", 0, "control"},
		{"user name@example.com", 0, "space"},
		{"user@exa mple.com", 0, "domain"},
		{"user.example.com", 0, "@"},
		{"@example.com", 0, "empty local"},
		{"user@", 0, "empty domain"},
		{"user@@example.com", 0, "@"},
		{"<user@example.com>", 0, "'<'"},
		{"us>er@example.com", 0, "'>'"},
		{".user@example.com", 0, "dot"},
		{"user.@example.com", 0, "dot"},
		{"us..er@example.com", 0, "dot"},
		{"user@example..com", 0, "empty label"},
		{"user@.example.com", 0, "empty label"},
		{"user@example.com.", 0, "ends with a dot"},
		{"\"unterminated@example.com", 0, "quoted"},
		{"\"a\"b\"@example.com", 0, "quoted"},
		{"user@[1.2.3.4", 0, "literal"},
		{"user@[1.2 .3.4]", 0, "literal"},
		{"user@exam(ple).com", 0, "domain"},
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		size_t len = bad[i].len ? bad[i].len : strlen(bad[i].addr);
		if (rq_addr_valid(bad[i].addr, len, true, err, sizeof(err)))
			fail_msg("accepted: case %zu", i);
		if (!strstr(err, bad[i].why))
			fail_msg("case %zu: reason \"%s\" lacks \"%s\"", i, err, bad[i].why);
		assert_null(strchr(err, '\n'));
		assert_null(strchr(err, '\r'));
	}
}

static char *make_addr(size_t local, size_t domain)
{
	char *a = malloc(local + domain + 2);
	memset(a, 'l', local);
	a[local] = '@';
	/* labels of 50 octets separated by dots */
	for (size_t i = 0; i < domain; i++)
		a[local + 1 + i] = (i % 51 == 50) ? '.' : 'd';
	a[local + 1 + domain] = '\0';
	if (a[local + domain] == '.')
		a[local + domain] = 'd';
	return a;
}

static void address_lengths(void **state)
{
	(void)state;
	char err[128];
	char *a = make_addr(64, 20);
	assert_true(valid(a, false, err));
	free(a);
	a = make_addr(65, 20);
	assert_false(valid(a, false, err));
	assert_non_null(strstr(err, "local part longer"));
	free(a);
	/* the path limit: "<" addr ">" of 256 octets, so 254 for the address */
	a = make_addr(64, 254 - 65);
	assert_int_equal(strlen(a), 254);
	assert_true(valid(a, false, err));
	free(a);
	a = make_addr(64, 255 - 65);
	assert_false(valid(a, false, err));
	assert_non_null(strstr(err, "path longer"));
	free(a);
	/* the domain limit: 255 is reported as a path problem, 256 as the domain */
	a = make_addr(1, 255);
	assert_false(valid(a, false, err));
	assert_non_null(strstr(err, "path longer"));
	free(a);
	a = make_addr(1, 256);
	assert_false(valid(a, false, err));
	assert_non_null(strstr(err, "domain longer"));
	free(a);
	/* a label of 63 octets is fine, 64 is not */
	char l63[80], l64[80];
	snprintf(l63, sizeof(l63), "u@%.*s.test", 63, "ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd");
	snprintf(l64, sizeof(l64), "u@%.*s.test", 64, "ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd");
	assert_true(valid(l63, false, err));
	assert_false(valid(l64, false, err));
	assert_non_null(strstr(err, "label"));
	/* a quoted local part counts its quotes */
	char q[80];
	snprintf(q, sizeof(q), "\"%.*s\"@x.test", 62, "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq");
	assert_true(valid(q, false, err));
	snprintf(q, sizeof(q), "\"%.*s\"@x.test", 63, "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq");
	assert_false(valid(q, false, err));
}

static void address_helpers(void **state)
{
	(void)state;
	assert_false(rq_addr_needs_utf8("user@example.com", 16));
	assert_true(rq_addr_needs_utf8("j\xc3\xbcrgen@x.de", 12));
	assert_false(rq_addr_needs_utf8(NULL, 0));
	assert_string_equal(rq_addr_domain("user@example.com"), "example.com");
	assert_string_equal(rq_addr_domain("\"a@b\"@example.net"), "example.net");
	assert_null(rq_addr_domain("nodomain"));
	assert_null(rq_addr_domain("user@"));
	assert_null(rq_addr_domain(NULL));
	assert_false(rq_body_is_8bit("Subject: hi\r\n\r\nplain\r\n", 22));
	assert_true(rq_body_is_8bit("caf\xc3\xa9", 5));
	assert_true(rq_body_is_8bit("\x80", 1));
	assert_false(rq_body_is_8bit("\x7f", 1));
}

/* The DATA content of body as a malloc'd string (via rq_data_encode). */
static char *enc(const char *body, size_t len, size_t *outlen)
{
	size_t n = rq_data_encode(body, len, NULL, 0);
	char *out = malloc(n + 1);
	assert_int_equal(rq_data_encode(body, len, out, n), n);
	out[n] = '\0';
	*outlen = n;
	return out;
}

/* The DATA content of body via rq_data_append, drained into a string. */
static char *app(const char *body, size_t len, size_t *outlen)
{
	struct evbuffer *b = evbuffer_new();
	assert_int_equal(rq_data_append(b, body, len), 0);
	size_t n = evbuffer_get_length(b);
	char *out = malloc(n + 1);
	assert_int_equal(evbuffer_remove(b, out, n), (int)n);
	out[n] = '\0';
	evbuffer_free(b);
	*outlen = n;
	return out;
}

static void expect_data(const char *body, size_t len, const char *want, size_t wantlen)
{
	size_t n1, n2;
	char *e = enc(body, len, &n1);
	char *a = app(body, len, &n2);
	assert_int_equal(n1, wantlen);
	assert_memory_equal(e, want, wantlen);
	assert_int_equal(n2, wantlen);
	assert_memory_equal(a, want, wantlen);
	free(e);
	free(a);
}

#define EXPECT(body, want) expect_data((body), sizeof(body) - 1, (want), sizeof(want) - 1)

static void dot_stuffing_and_line_endings(void **state)
{
	(void)state;
	EXPECT("", ".\r\n");
	EXPECT("a\r\n", "a\r\n.\r\n");
	EXPECT(".", "..\r\n.\r\n");                          /* a line "." */
	EXPECT(".\r\n", "..\r\n.\r\n");
	EXPECT("..x\r\n", "...x\r\n.\r\n");                  /* a line "..x" */
	EXPECT(".starts\r\nbody\r\n", "..starts\r\nbody\r\n.\r\n");
	EXPECT("a\n.\nb", "a\r\n..\r\nb\r\n.\r\n");          /* "\n.\n" */
	EXPECT("\n.\n", "\r\n..\r\n.\r\n");
	EXPECT("a\r\nb\r\n", "a\r\nb\r\n.\r\n");             /* CRLF kept */
	EXPECT("no final newline", "no final newline\r\n.\r\n");
	EXPECT("x.y\r\n a.\r\n", "x.y\r\n a.\r\n.\r\n");     /* dots not at line start */
	EXPECT("\r\n", "\r\n.\r\n");
	EXPECT("\n", "\r\n.\r\n");
	EXPECT("caf\xc3\xa9\n", "caf\xc3\xa9\r\n.\r\n");     /* 8-bit passes */
	EXPECT("a\0b\n", "a\0b\r\n.\r\n");                    /* NUL passes as data */
	/* in the body (after the first empty line) a bare CR ends a line */
	EXPECT("S: x\r\n\r\na\rb", "S: x\r\n\r\na\r\nb\r\n.\r\n");
	EXPECT("S: x\r\n\r\na\r.\r", "S: x\r\n\r\na\r\n..\r\n.\r\n");
	EXPECT("S: x\r\n\r\na\r\r\nb", "S: x\r\n\r\na\r\n\r\nb\r\n.\r\n"); /* CR, CRLF */
	EXPECT("S: x\r\n\r\na\n\rb", "S: x\r\n\r\na\r\n\r\nb\r\n.\r\n");   /* LF, CR */
	EXPECT("S: x\r\n\r\n\r", "S: x\r\n\r\n\r\n.\r\n");
	EXPECT("\r\n\r", "\r\n\r\n.\r\n");   /* no header section: all body */
}

/* A bare CR in the header section is a space, never a line ending. */
static void header_bare_cr(void **state)
{
	(void)state;
	/* the reviewer's case: a CR smuggled past an app's LF-only filter */
	EXPECT("Subject: hi\rBcc: x", "Subject: hi Bcc: x\r\n.\r\n");
	EXPECT("From: a@example.com\r\nSubject: hi\rBcc: x\r\n\r\nbody\r\n",
	       "From: a@example.com\r\nSubject: hi Bcc: x\r\n\r\nbody\r\n.\r\n");
	EXPECT("Subject: hi\rBcc: x\n\nbody\rmore\n",
	       "Subject: hi Bcc: x\r\n\r\nbody\r\nmore\r\n.\r\n");
	EXPECT("Subject: a\r\rb", "Subject: a  b\r\n.\r\n");
	EXPECT("Subject: a\r\r\nTo: b", "Subject: a \r\nTo: b\r\n.\r\n");  /* CR, CRLF */
	EXPECT("Subject: x\r", "Subject: x \r\n.\r\n");                     /* at the end */
	EXPECT("\r", " \r\n.\r\n");
	EXPECT("\rX: 1\r\n\r\nb\r", " X: 1\r\n\r\nb\r\n.\r\n");
	/* a CR at the start of a header line does not make it an empty line:
	 * the header section goes on */
	EXPECT("A: 1\r\n\rB: 2\r\n\r\nc\rd", "A: 1\r\n B: 2\r\n\r\nc\r\nd\r\n.\r\n");
	EXPECT("A: 1\r\n\r\r\nB: 2\rC", "A: 1\r\n \r\nB: 2 C\r\n.\r\n");
	/* neither does a line of white space */
	EXPECT("A: 1\r\n \r\nB\rC", "A: 1\r\n \r\nB C\r\n.\r\n");
	/* a bare LF is a line ending in the header section too (documented) */
	EXPECT("Subject: hi\nBcc: x\n\nb", "Subject: hi\r\nBcc: x\r\n\r\nb\r\n.\r\n");
	/* a header line starting with "." is stuffed like any other */
	EXPECT(".X: 1\r\r\n\r\n", "..X: 1 \r\n\r\n.\r\n");
}

/* The header section ends at its first empty line, whatever the endings. */
static void header_body_boundary(void **state)
{
	(void)state;
	const char *seps[] = {"\r\n\r\n", "\n\n", "\r\n\n", "\n\r\n"};
	for (size_t k = 0; k < sizeof(seps) / sizeof(seps[0]); k++) {
		char body[64];
		int n = snprintf(body, sizeof(body), "S: a\rb%sc\rd\r", seps[k]);
		const char want[] = "S: a b\r\n\r\nc\r\nd\r\n.\r\n";
		expect_data(body, (size_t)n, want, sizeof(want) - 1);
		/* more header lines before it, with the other endings */
		n = snprintf(body, sizeof(body), "A: 1\nB: 2\r\nC: 3\rx%s\r", seps[k]);
		const char want2[] = "A: 1\r\nB: 2\r\nC: 3 x\r\n\r\n\r\n.\r\n";
		expect_data(body, (size_t)n, want2, sizeof(want2) - 1);
	}
	/* an empty line at the very start: no header section */
	EXPECT("\r\na\rb", "\r\na\r\nb\r\n.\r\n");
	EXPECT("\na\rb", "\r\na\r\nb\r\n.\r\n");
	/* only the first empty line counts; later ones are body lines */
	EXPECT("S: x\n\n\n\ra\rb", "S: x\r\n\r\n\r\n\r\na\r\nb\r\n.\r\n");
	/* a message without an empty line is all header section */
	EXPECT("S: x\r\nT: y\rz", "S: x\r\nT: y z\r\n.\r\n");
}

/* Write n octets c (put_run) or the string s (put_str) at p + at; both
 * return the offset after what they wrote. */
static size_t put_run(char *p, size_t at, char c, size_t n)
{
	memset(p + at, c, n);
	return at + n;
}

static size_t put_str(char *p, size_t at, const char *s)
{
	memcpy(p + at, s, strlen(s));
	return at + strlen(s);
}

/*
 * Long lines, in the header section and in the body alike: broken with
 * CRLF SP after 998 octets, then after every 997 more (the SP counts on
 * its line), as Postfix's smtp client does; 998 octets are untouched.
 */
static void long_lines(void **state)
{
	(void)state;
	char *body = malloc(8000);
	char *want = malloc(8100);
	size_t bl, wl;
	const char *hdr[] = {"", "S: x\r\n\r\n"}; /* header section, then body */

	for (size_t h = 0; h < 2; h++) {
		size_t hl = strlen(hdr[h]);
		memcpy(body, hdr[h], hl);
		memcpy(want, hdr[h], hl);

		/* exactly 998 octets: unchanged */
		bl = put_str(body, put_run(body, hl, 'a', 998), "\r\n");
		wl = put_str(want, put_run(want, hl, 'a', 998), "\r\n.\r\n");
		expect_data(body, bl, want, wl);
		expect_data(body, bl - 2, want, wl); /* without a line ending */

		/* 999: broken after 998 with CRLF SP */
		bl = put_run(body, hl, 'b', 999);
		wl = put_str(want, put_run(want, hl, 'b', 998), "\r\n b\r\n.\r\n");
		expect_data(body, bl, want, wl);

		/* 998 + 997 = 1995: one break (the SP counts on the new line) */
		bl = put_str(body, put_run(body, hl, 'c', 1995), "\n");
		wl = put_str(want, put_run(want, hl, 'c', 998), "\r\n ");
		wl = put_str(want, put_run(want, wl, 'c', 997), "\r\n.\r\n");
		expect_data(body, bl, want, wl);

		/* 2000: 998, SP + 997, SP + 5 */
		bl = put_str(body, put_run(body, hl, 'd', 2000), "\n");
		wl = put_str(want, put_run(want, hl, 'd', 998), "\r\n ");
		wl = put_str(want, put_run(want, wl, 'd', 997), "\r\n ");
		wl = put_str(want, put_run(want, wl, 'd', 5), "\r\n.\r\n");
		expect_data(body, bl, want, wl);

		/* a line of 1997 dots: the stuffed dot does not count, and the
		 * continuations start with SP, so they are not stuffed */
		bl = put_run(body, hl, '.', 1997);
		wl = put_str(want, hl, ".");
		wl = put_str(want, put_run(want, wl, '.', 998), "\r\n ");
		wl = put_str(want, put_run(want, wl, '.', 997), "\r\n ");
		wl = put_str(want, put_run(want, wl, '.', 2), "\r\n.\r\n");
		expect_data(body, bl, want, wl);

		/* a "." line of 998 octets: 999 on the wire with the stuffed dot,
		 * not broken (RFC 5321 4.5.3.1.6) */
		bl = put_str(body, put_run(body, hl, '.', 998), "\r\n");
		wl = put_str(want, put_run(want, hl, '.', 999), "\r\n.\r\n");
		expect_data(body, bl, want, wl);

		/* a break falling on a line ending or a CRLF: nothing to break */
		bl = put_str(body, put_run(body, hl, 'e', 998), "\r\nf");
		wl = put_str(want, put_run(want, hl, 'e', 998), "\r\nf\r\n.\r\n");
		expect_data(body, bl, want, wl);
	}

	/* a bare CR in the header section is a space and counts in the length */
	bl = put_str(body, put_run(body, 0, 'g', 997), "\rh");
	wl = put_str(want, put_run(want, 0, 'g', 997), " \r\n h\r\n.\r\n");
	expect_data(body, bl, want, wl);
	bl = put_str(body, put_run(body, 0, 'g', 998), "\rh");
	wl = put_str(want, put_run(want, 0, 'g', 998), "\r\n  h\r\n.\r\n");
	expect_data(body, bl, want, wl);
	free(body);
	free(want);
}

/*
 * The review's case: a Subject filled to 998 octets followed by
 * "Reply-To: ..." used to be broken with a bare CRLF, putting a Reply-To
 * header field on the wire. It is a folded continuation of the Subject now.
 */
static void long_header_no_new_field(void **state)
{
	(void)state;
	char body[2048], want[2048];
	size_t bl = put_str(body, 0, "From: app@example.com\r\nSubject: ");
	bl = put_run(body, bl, 'A', 998 - strlen("Subject: "));
	bl = put_str(body, bl, "Reply-To: attacker@evil.example\r\n"
		     "To: user@example.net\r\n\r\nhello\r\n");
	size_t wl = put_str(want, 0, "From: app@example.com\r\nSubject: ");
	wl = put_run(want, wl, 'A', 998 - strlen("Subject: "));
	wl = put_str(want, wl, "\r\n Reply-To: attacker@evil.example\r\n"
		     "To: user@example.net\r\n\r\nhello\r\n.\r\n");
	expect_data(body, bl, want, wl);

	/* what a receiver would parse: no header line starts with Reply-To */
	size_t n;
	char *e = enc(body, bl, &n);
	for (char *l = e; l < e + n;) {
		char *eol = strstr(l, "\r\n");
		assert_non_null(eol);
		if (eol == l)
			break; /* end of the header section */
		assert_true(strncmp(l, "Reply-To:", 9) != 0);
		l = eol + 2;
	}
	free(e);

	/* the same with bare LF endings and a much longer Subject */
	char *big = malloc(8000), *bw = malloc(8100);
	bl = put_str(big, 0, "Subject: ");
	bl = put_run(big, bl, 'B', 3000);
	bl = put_str(big, bl, "\nX: y\n\nz\n");
	wl = put_str(bw, 0, "Subject: ");
	wl = put_run(bw, wl, 'B', 998 - 9);
	wl = put_str(bw, wl, "\r\n ");
	wl = put_run(bw, wl, 'B', 997);
	wl = put_str(bw, wl, "\r\n ");
	wl = put_run(bw, wl, 'B', 997);
	wl = put_str(bw, wl, "\r\n ");
	wl = put_run(bw, wl, 'B', 3000 - (998 - 9) - 997 - 997);
	wl = put_str(bw, wl, "\r\nX: y\r\n\r\nz\r\n.\r\n");
	expect_data(big, bl, bw, wl);
	free(big);
	free(bw);
}

/*
 * The message with the documented transformations but no breaks and no
 * stuffing, written independently of the scanner: the header section ends
 * after the first line that is empty once a CR before its LF is dropped;
 * there a bare CR becomes SP, elsewhere
 * CRLF; a bare LF becomes CRLF; a final CRLF is added unless the result is
 * empty or ends with one.
 */
static char *normalize(const char *b, size_t len, size_t *outlen)
{
	size_t body_at = len; /* input offset of the body */
	for (size_t i = 0; i < len;) {
		const char *lf = memchr(b + i, '\n', len - i);
		if (!lf)
			break;
		size_t end = (size_t)(lf - b);
		size_t linelen = end - i;
		if (linelen > 0 && b[end - 1] == '\r')
			linelen--;
		if (linelen == 0) {
			body_at = end + 1;
			break;
		}
		i = end + 1;
	}
	char *m = malloc(2 * len + 3);
	size_t k = 0;
	for (size_t i = 0; i < len; i++) {
		char c = b[i];
		bool crlf = c == '\r' && i + 1 < len && b[i + 1] == '\n';
		if (crlf) {
			m[k++] = '\r';
			m[k++] = '\n';
			i++;
		} else if (c == '\r' && i < body_at) {
			m[k++] = ' ';
		} else if (c == '\r' || c == '\n') {
			m[k++] = '\r';
			m[k++] = '\n';
		} else {
			m[k++] = c;
		}
	}
	if (k > 0 && !(k >= 2 && m[k - 2] == '\r' && m[k - 1] == '\n')) {
		m[k++] = '\r';
		m[k++] = '\n';
	}
	*outlen = k;
	return m;
}

/* Header lines (up to the first empty line) that start a field, i.e. do
 * not start with SP or HTAB. */
static size_t field_starts(const char *d, size_t n)
{
	size_t fields = 0;
	for (size_t i = 0; i < n;) {
		const char *eol = memmem(d + i, n - i, "\r\n", 2);
		if (!eol || eol == d + i)
			break;
		if (d[i] != ' ' && d[i] != '\t')
			fields++;
		i = (size_t)(eol - d) + 2;
	}
	return fields;
}

/*
 * BDAT (RFC 3030) of body in chunks of chunk bytes, against the DATA
 * content d (n bytes): the content is d with the stuffed dots and the final
 * ".\r\n" taken out (so both ways store the same message), rq_bdat_encode
 * agrees, and the stream rq_bdat_append writes is "BDAT <n>\r\n" chunks of
 * exactly chunk bytes and one "BDAT <n> LAST" at the end, as
 * rq_bdat_chunks / rq_bdat_chunk_len say.
 */
static void check_bdat(const char *body, size_t len, const char *d, size_t n, size_t chunk)
{
	/* unstuff the DATA content */
	char *want = malloc(n + 1);
	size_t wl = 0;
	for (size_t i = 0; i < n - 3;) {
		const char *eol = memmem(d + i, n - 3 - i, "\r\n", 2);
		size_t end = eol ? (size_t)(eol - d) + 2 : n - 3;
		size_t from = d[i] == '.' ? i + 1 : i;
		memcpy(want + wl, d + from, end - from);
		wl += end - from;
		i = end;
	}
	size_t cl = rq_bdat_encode(body, len, NULL, 0);
	if (cl != wl)
		fail_msg("BDAT content %zu octets, DATA unstuffed %zu", cl, wl);
	char *c = malloc(cl + 1);
	assert_int_equal(rq_bdat_encode(body, len, c, cl), cl);
	assert_memory_equal(c, want, cl);

	struct evbuffer *b = evbuffer_new();
	size_t got_len = 12345;
	assert_int_equal(rq_bdat_append(b, body, len, chunk, &got_len), 0);
	assert_int_equal(got_len, cl);
	size_t sl = evbuffer_get_length(b);
	char *st = malloc(sl + 1);
	assert_int_equal(evbuffer_remove(b, st, sl), (int)sl);
	evbuffer_free(b);
	size_t nch = rq_bdat_chunks(cl, chunk), k = 0, pos = 0, off = 0;
	while (pos < sl) {
		char cmd[64];
		const char *eol = memmem(st + pos, sl - pos, "\r\n", 2);
		assert_non_null(eol);
		size_t cmdl = (size_t)(eol - (st + pos));
		assert_true(cmdl < sizeof(cmd));
		memcpy(cmd, st + pos, cmdl);
		cmd[cmdl] = '\0';
		size_t csz = rq_bdat_chunk_len(cl, chunk, k);
		char exp[64];
		snprintf(exp, sizeof(exp), "BDAT %zu%s", csz, k + 1 == nch ? " LAST" : "");
		if (strcmp(cmd, exp) != 0)
			fail_msg("chunk %zu of %zu: \"%s\", expected \"%s\"", k, nch, cmd, exp);
		assert_true(csz <= chunk);
		pos += cmdl + 2;
		assert_true(pos + csz <= sl);
		assert_memory_equal(st + pos, c + off, csz);
		pos += csz;
		off += csz;
		k++;
	}
	assert_int_equal(k, nch);
	assert_int_equal(off, cl);
	free(st);
	free(c);
	free(want);
}

/*
 * Checks the DATA content d of body: rq_data_append gives the same bytes,
 * the size query and a short buffer agree; the wire rules (lines end with
 * CRLF, no other CR or LF, at most 1000 octets a line with CRLF not counting
 * a stuffed dot, every line starting with "." stuffed, ".\r\n" only at the
 * end); undoing stuffing and breaks gives exactly the normalized message,
 * with breaks only where a line is full and always as CRLF SP; and the
 * header section has as many fields on the wire as in the message.
 */
static void check_data(const char *body, size_t len)
{
	size_t n, n2;
	char *d = enc(body, len, &n);
	char *a = app(body, len, &n2);
	if (n != n2 || memcmp(d, a, n) != 0)
		fail_msg("append and encode differ (%zu / %zu octets)", n, n2);
	assert_int_equal(rq_data_encode(body, len, NULL, 0), n);
	char small[16];
	assert_int_equal(rq_data_encode(body, len, small, sizeof(small)), n);
	assert_memory_equal(small, d, n < sizeof(small) ? n : sizeof(small));

	/* wire rules */
	assert_true(n >= 3);
	assert_memory_equal(d + n - 3, ".\r\n", 3);
	if (n > 3)
		assert_memory_equal(d + n - 5, "\r\n.\r\n", 5);
	size_t linestart = 0;
	for (size_t i = 0; i < n; i++) {
		if (d[i] == '\r') {
			if (!(i + 1 < n && d[i + 1] == '\n'))
				fail_msg("bare CR on the wire at %zu", i);
			size_t ll = i - linestart + 2;
			bool stuffed = ll > 2 && d[linestart] == '.';
			if (stuffed && ll == 3)
				assert_int_equal(i + 2, n); /* only the terminator */
			else if (stuffed && d[linestart + 1] != '.')
				fail_msg("unstuffed dot at %zu", linestart);
			if (ll - (stuffed ? 1 : 0) > RQ_LINE_MAX + 2)
				fail_msg("line of %zu octets at %zu", ll, linestart);
			i++;
			linestart = i + 1;
		} else if (d[i] == '\n') {
			fail_msg("bare LF on the wire at %zu", i);
		}
	}
	assert_int_equal(linestart, n);

	/* decode: the wire is the normalized message plus stuffed dots and
	 * CRLF SP breaks exactly where a line is full */
	size_t ml;
	char *m = normalize(body, len, &ml);
	size_t end = n - 3, j = 0, col = 0;
	for (size_t i = 0; i < ml;) {
		if (m[i] == '\r') { /* always CRLF in m */
			if (!(j + 2 <= end && d[j] == '\r' && d[j + 1] == '\n'))
				fail_msg("line ending expected at wire %zu", j);
			i += 2;
			j += 2;
			col = 0;
			continue;
		}
		if (col == RQ_LINE_MAX) {
			if (!(j + 3 <= end && memcmp(d + j, "\r\n ", 3) == 0))
				fail_msg("CRLF SP break expected at wire %zu", j);
			j += 3;
			col = 1;
		}
		if (col == 0 && m[i] == '.') {
			if (!(j < end && d[j] == '.'))
				fail_msg("stuffed dot expected at wire %zu", j);
			j++;
		}
		if (!(j < end && d[j] == m[i]))
			fail_msg("content differs at wire %zu (message %zu)", j, i);
		i++;
		j++;
		col++;
	}
	assert_int_equal(j, end);

	/* no header field created: as many field starts in the header section
	 * on the wire as in the normalized message */
	assert_int_equal(field_starts(d, end), field_starts(m, ml));
	check_bdat(body, len, d, n, 1 + len % 61);
	check_bdat(body, len, d, n, 512);
	free(m);
	free(d);
	free(a);
}

/* Random bodies of bytes, dots, CR, LF and long lines. */
static void random_bodies(void **state)
{
	(void)state;
	unsigned seed = 12345;
	const char alphabet[] = {'a', 'b', '.', '.', '\r', '\n', ' ', '\x80', '\xff', '\0'};
	char *body = malloc(5000);
	for (int iter = 0; iter < 1000; iter++) {
		size_t len = (size_t)(rand_r(&seed) % 4000);
		/* some bodies have long lines: few line endings */
		int mode = rand_r(&seed) % 3;
		for (size_t i = 0; i < len; i++) {
			int r = rand_r(&seed);
			if (mode == 0)
				body[i] = alphabet[r % sizeof(alphabet)];
			else if (mode == 1)
				body[i] = (r % 500 == 0) ? '\n' : (r % 7 == 0 ? '.' : 'x');
			else
				body[i] = (char)(r & 0xff);
		}
		check_data(body, len);
	}
	free(body);
}

/*
 * The review's property test (rq_data_encode vs rq_data_append and the wire
 * rules) on bodies of ".", CR, LF, SP, ":", "a" and runs just around one and
 * two line lengths, mostly short, some long, some with few line endings (so
 * long header sections); every body goes through check_data.
 */
static void data_property(void **state)
{
	(void)state;
	unsigned seed = 1;
	char *body = malloc(20000);
	for (int it = 0; it < 40000; it++) {
		size_t len = 0;
		size_t want = (size_t)rand_r(&seed) % (it % 10 == 0 ? 8000 : 40);
		bool sparse = it % 4 == 1; /* line endings rare */
		while (len < want) {
			int r = rand_r(&seed) % (sparse ? 60 : 12);
			size_t run = 0;
			if (r < 2)
				body[len++] = '.';
			else if (r < 4)
				body[len++] = '\r';
			else if (r < 6)
				body[len++] = '\n';
			else if (r == 6)
				run = 990 + (size_t)rand_r(&seed) % 20;
			else if (r == 7)
				run = 1985 + (size_t)rand_r(&seed) % 20;
			else if (r == 8)
				body[len++] = ' ';
			else if (r == 9)
				body[len++] = ':';
			else
				body[len++] = 'a';
			if (run > 0) {
				if (len + run > 19000)
					break;
				memset(body + len, 'x', run);
				len += run;
			}
		}
		check_data(body, len);
	}
	free(body);
}

static void big_body_by_reference(void **state)
{
	(void)state;
	size_t len = 5u << 20;
	char *body = malloc(len);
	/* CRLF lines of 78 octets, one line in 1000 starting with "." */
	for (size_t i = 0, line = 0; i < len; line++) {
		size_t n = len - i < 80 ? len - i : 80;
		memset(body + i, 'm', n);
		if (line % 1000 == 0)
			body[i] = '.';
		if (n == 80)
			memcpy(body + i + 78, "\r\n", 2);
		i += n;
	}
	memcpy(body + len - 2, "\r\n", 2);
	/* a header section with a bare CR (a space on the wire) */
	memcpy(body, "Subject: a\rb\r\n\r\n", 16);

	struct evbuffer *b = evbuffer_new();
	assert_int_equal(rq_data_append(b, body, len), 0);
	size_t total = evbuffer_get_length(b);
	assert_int_equal(total, rq_data_encode(body, len, NULL, 0));

	/* count the bytes that sit in the body's own memory */
	int nvec = evbuffer_peek(b, -1, NULL, NULL, 0);
	struct evbuffer_iovec *v = calloc((size_t)nvec, sizeof(*v));
	assert_int_equal(evbuffer_peek(b, -1, NULL, v, nvec), nvec);
	size_t in_body = 0, copied = 0;
	for (int i = 0; i < nvec; i++) {
		const char *p = v[i].iov_base;
		if (p >= body && p + v[i].iov_len <= body + len)
			in_body += v[i].iov_len;
		else
			copied += v[i].iov_len;
	}
	print_message("5 MB CRLF body: %d chains, %zu bytes by reference, %zu copied\n",
		      nvec, in_body, copied);
	assert_int_equal(in_body + copied, total);
	/* everything but the stuffed dots and ".\r\n" is referenced */
	assert_true(copied < 16 * 1024);
	assert_true(in_body > len - 16 * 1024);
	free(v);

	/* and the bytes are the same as the plain encoding */
	char *e = malloc(total);
	assert_int_equal(rq_data_encode(body, len, e, total), total);
	char *a = malloc(total);
	assert_int_equal(evbuffer_remove(b, a, total), (int)total);
	assert_memory_equal(a, e, total);
	check_data(body, len);
	free(a);
	free(e);
	evbuffer_free(b);

	/* a bare-LF body of the same size: short runs are copied, bytes equal */
	for (size_t i = 79; i < len; i += 80)
		body[i - 1] = 'm', body[i] = '\n';
	size_t n1, n2;
	char *e2 = enc(body, len, &n1);
	char *a2 = app(body, len, &n2);
	assert_int_equal(n1, n2);
	assert_memory_equal(e2, a2, n1);
	free(e2);
	free(a2);
	free(body);
}

/* IDNA2008 A-labels (libidn2, NFC input, non-transitional UTS #46). */
static void idna_domains(void **state)
{
	(void)state;
	char out[RQ_ADDR_DOMAIN_MAX + 1], err[200];
	struct { const char *in, *want; } ok[] = {
		{"b\xc3\xbc" "cher.example", "xn--bcher-kva.example"},
		/* capitals are mapped (mail domains are case-insensitive) */
		{"B\xc3\x9c" "CHER.Example", "xn--bcher-kva.example"},
		/* decomposed input (u + U+0308) gives the same A-label (NFC) */
		{"bu\xcc\x88" "cher.example", "xn--bcher-kva.example"},
		/* non-transitional: sharp s stays itself, not "fass.de" */
		{"fa\xc3\x9f.de", "xn--fa-hia.de"},
		{"\xe4\xbe\x8b\xe3\x81\x88.\xe3\x83\x86\xe3\x82\xb9\xe3\x83\x88",
		 "xn--r8jz45g.xn--zckzah"},
		/* ASCII is copied as it is, even with "_" or "xn--" */
		{"Example.COM", "Example.COM"},
		{"host_name.test", "host_name.test"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{NULL, NULL},
	};
	for (size_t i = 0; ok[i].in; i++) {
		if (rq_domain_to_ascii(ok[i].in, strlen(ok[i].in), out, sizeof(out), err,
				       sizeof(err)) != 0)
			fail_msg("%s refused: %s", ok[i].in, err);
		assert_string_equal(out, ok[i].want);
	}
	/* len is honoured: no NUL needed */
	assert_int_equal(rq_domain_to_ascii("b\xc3\xbc" "cher.example.XYZ", 15, out, sizeof(out),
					    err, sizeof(err)), 0);
	assert_string_equal(out, "xn--bcher-kva.example");

	struct { const char *in; const char *why; } bad[] = {
		{"\xff.example", "encoding"},             /* not UTF-8 */
		{"b\xc3\xbc" "ch\xc3\x28r.example", "encoding"},
		{"\xe2\x98\x83.net", "disallowed"},         /* a snowman: DISALLOWED */
		{"-b\xc3\xbc" "cher.example", "hyphen"},
		{"b\xc3\xbc--cher.example", "hyphen"},
		{NULL, NULL},
	};
	for (size_t i = 0; bad[i].in; i++) {
		if (rq_domain_to_ascii(bad[i].in, strlen(bad[i].in), out, sizeof(out), err,
				       sizeof(err)) == 0)
			fail_msg("%s accepted as %s", bad[i].in, out);
		if (!strstr(err, "internationalized") || !strstr(err, bad[i].why))
			fail_msg("%s: reason \"%s\" lacks \"%s\"", bad[i].in, err, bad[i].why);
	}
	/* a result that does not fit */
	char small[8];
	assert_int_equal(rq_domain_to_ascii("b\xc3\xbc" "cher.example", 14, small, sizeof(small),
					    err, sizeof(err)), -1);
	/* labels that grow past 255 octets as A-labels */
	const char *label = "a\xc3\xbc" "a\xd0\xb6" "a\xce\xb1" "a\xc3\xbc" "a\xd0\xb6" "a\xce\xb1";
	char big[300];
	size_t bl = 0;
	for (int l = 0; l < 11; l++) {
		memcpy(big + bl, label, strlen(label));
		bl += strlen(label);
		big[bl++] = '.';
	}
	memcpy(big + bl, "example", 7);
	bl += 7;
	assert_true(bl <= RQ_ADDR_DOMAIN_MAX);
	assert_int_equal(rq_domain_to_ascii(big, bl, out, sizeof(out), err, sizeof(err)), -1);
	if (!strstr(err, "255") && !strstr(err, "A-labels"))
		fail_msg("reason: %s", err);
	assert_int_equal(rq_domain_to_ascii("a\0b", 3, out, sizeof(out), err, sizeof(err)), -1);
}

static enum rq_addr_ascii to_ascii(const char *a, char *out, char *err)
{
	return rq_addr_to_ascii(a, strlen(a), out, err, 200);
}

/* The address a server without SMTPUTF8 gets. */
static void idna_addresses(void **state)
{
	(void)state;
	char out[RQ_ADDR_PATH_MAX + 1], err[200];
	memset(out, 0, sizeof(out));
	assert_int_equal(to_ascii("user@example.com", out, err), RQ_ADDR_ASCII_SAME);
	assert_int_equal(to_ascii("user@b\xc3\xbc" "cher.example", out, err), RQ_ADDR_ASCII_ALABEL);
	assert_string_equal(out, "user@xn--bcher-kva.example");
	assert_int_equal(to_ascii("\"a@b c\"@B\xc3\x9c" "cher.example", out, err),
			 RQ_ADDR_ASCII_ALABEL);
	assert_string_equal(out, "\"a@b c\"@xn--bcher-kva.example");
	/* a UTF-8 local part: only SMTPUTF8 can carry it */
	assert_int_equal(to_ascii("j\xc3\xb6rg@example.com", out, err), RQ_ADDR_ASCII_LOCAL_UTF8);
	assert_int_equal(to_ascii("j\xc3\xb6rg@b\xc3\xbc" "cher.example", out, err),
			 RQ_ADDR_ASCII_LOCAL_UTF8);
	/* an invalid U-label is refused with a reason, nothing written */
	memset(out, 0, sizeof(out));
	assert_int_equal(to_ascii("user@\xff.example", out, err), RQ_ADDR_ASCII_INVALID);
	assert_non_null(strstr(err, "internationalized"));
	assert_string_equal(out, "");
	assert_int_equal(to_ascii("user@\xe2\x98\x83.net", out, err), RQ_ADDR_ASCII_INVALID);
	/* libidn2 maps some symbols to ASCII that our domain rules refuse */
	assert_int_equal(to_ascii("user@a\xef\xbc\x8f" "b.example", out, err),
			 RQ_ADDR_ASCII_INVALID);
	assert_string_equal(out, "");
	/* the path grows past 256 octets in A-labels (a label of 17 octets in
	 * UTF-8 is "xn--" and 22 more) */
	const char *label = "a\xc3\xbc" "a\xd0\xb6" "a\xce\xb1" "a\xc3\xbc" "a\xd0\xb6" "a\xce\xb1";
	char a[300];
	size_t n = 0;
	memset(a, 'l', 60);
	n = 60;
	a[n++] = '@';
	for (int l = 0; l < 8; l++) {
		memcpy(a + n, label, strlen(label));
		n += strlen(label);
		a[n++] = '.';
	}
	memcpy(a + n, "de", 3);
	n += 2;
	char verr[128];
	assert_true(rq_addr_valid(a, n, false, verr, sizeof(verr)));
	assert_int_equal(to_ascii(a, out, err), RQ_ADDR_ASCII_INVALID);
	assert_non_null(strstr(err, "A-labels"));
}

/* Chunk counts and sizes at the edges; a 5 MB body goes by reference in
 * chunks, and moving one chunk copies next to nothing. */
static void bdat_chunks(void **state)
{
	(void)state;
	assert_int_equal(rq_bdat_chunks(0, 100), 1);
	assert_int_equal(rq_bdat_chunk_len(0, 100, 0), 0);
	assert_int_equal(rq_bdat_chunks(100, 100), 1);
	assert_int_equal(rq_bdat_chunk_len(100, 100, 0), 100);
	assert_int_equal(rq_bdat_chunks(101, 100), 2);
	assert_int_equal(rq_bdat_chunk_len(101, 100, 0), 100);
	assert_int_equal(rq_bdat_chunk_len(101, 100, 1), 1);
	assert_int_equal(rq_bdat_chunk_len(101, 100, 2), 0);
	assert_int_equal(rq_bdat_chunks(300, 100), 3);

	struct evbuffer *b = evbuffer_new();
	size_t cl;
	assert_int_equal(rq_bdat_append(b, "", 0, 100, &cl), 0);
	assert_int_equal(cl, 0);
	char s[64];
	int k = evbuffer_remove(b, s, sizeof(s) - 1);
	s[k] = '\0';
	assert_string_equal(s, "BDAT 0 LAST\r\n");
	assert_int_equal(rq_bdat_append(b, "x", 1, 0, &cl), -1);
	evbuffer_free(b);

	/* exactly two full chunks: the second says LAST */
	char body[201];
	memset(body, 'a', 200);
	memcpy(body + 98, "\r\n", 2);
	memcpy(body + 198, "\r\n", 2);
	body[200] = '\0';
	b = evbuffer_new();
	assert_int_equal(rq_bdat_append(b, body, 200, 100, &cl), 0);
	assert_int_equal(cl, 200);
	char *all = malloc(300);
	k = evbuffer_remove(b, all, 300);
	assert_int_equal(k, 200 + 10 + 15);
	assert_memory_equal(all, "BDAT 100\r\n", 10);
	assert_memory_equal(all + 110, "BDAT 100 LAST\r\n", 15);
	free(all);
	evbuffer_free(b);

	/* 5 MB of CRLF lines in 128 KiB chunks */
	size_t len = 5u << 20, chunk = 128u << 10;
	char *big = malloc(len);
	for (size_t i = 0; i < len; i += 80) {
		memset(big + i, i % 8000 == 0 ? '.' : 'm', 78);
		memcpy(big + i + 78, "\r\n", 2);
	}
	b = evbuffer_new();
	assert_int_equal(rq_bdat_append(b, big, len, chunk, &cl), 0);
	assert_int_equal(cl, len); /* no stuffing */
	size_t nch = rq_bdat_chunks(cl, chunk);
	assert_int_equal(nch, 40);
	struct evbuffer *one = evbuffer_new();
	for (size_t i = 0; i < nch; i++) {
		char cmd[64];
		int cn = snprintf(cmd, sizeof(cmd), "BDAT %zu%s\r\n", rq_bdat_chunk_len(cl, chunk, i),
				  i + 1 == nch ? " LAST" : "");
		size_t want = (size_t)cn + rq_bdat_chunk_len(cl, chunk, i);
		assert_int_equal(evbuffer_remove_buffer(b, one, want), (int)want);
		/* the chunk's bytes sit in the body's memory, but its command */
		int nvec = evbuffer_peek(one, -1, NULL, NULL, 0);
		struct evbuffer_iovec *v = calloc((size_t)nvec, sizeof(*v));
		evbuffer_peek(one, -1, NULL, v, nvec);
		size_t in_body = 0;
		for (int j = 0; j < nvec; j++)
			if ((char *)v[j].iov_base >= big && (char *)v[j].iov_base < big + len)
				in_body += v[j].iov_len;
		free(v);
		assert_true(in_body >= rq_bdat_chunk_len(cl, chunk, i) - 2 * RQ_DATA_REF_MIN);
		char head[64];
		assert_int_equal(evbuffer_remove(one, head, (size_t)cn), cn);
		assert_memory_equal(head, cmd, (size_t)cn);
		evbuffer_drain(one, evbuffer_get_length(one));
	}
	assert_int_equal(evbuffer_get_length(b), 0);
	evbuffer_free(one);
	evbuffer_free(b);
	free(big);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(addresses_valid),
		cmocka_unit_test(addresses_invalid),
		cmocka_unit_test(address_lengths),
		cmocka_unit_test(address_helpers),
		cmocka_unit_test(dot_stuffing_and_line_endings),
		cmocka_unit_test(header_bare_cr),
		cmocka_unit_test(header_body_boundary),
		cmocka_unit_test(long_lines),
		cmocka_unit_test(long_header_no_new_field),
		cmocka_unit_test(random_bodies),
		cmocka_unit_test(data_property),
		cmocka_unit_test(big_body_by_reference),
		cmocka_unit_test(idna_domains),
		cmocka_unit_test(idna_addresses),
		cmocka_unit_test(bdat_chunks),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

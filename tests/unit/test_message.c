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
	EXPECT("a\rb", "a\r\nb\r\n.\r\n");                   /* bare CR */
	EXPECT("a\r.\r", "a\r\n..\r\n.\r\n");
	EXPECT("a\r\r\nb", "a\r\n\r\nb\r\n.\r\n");           /* CR then CRLF */
	EXPECT("a\n\rb", "a\r\n\r\nb\r\n.\r\n");             /* LF then CR */
	EXPECT("a\r\nb\r\n", "a\r\nb\r\n.\r\n");             /* CRLF kept */
	EXPECT("no final newline", "no final newline\r\n.\r\n");
	EXPECT("x.y\r\n a.\r\n", "x.y\r\n a.\r\n.\r\n");     /* dots not at line start */
	EXPECT("\r\n", "\r\n.\r\n");
	EXPECT("\n", "\r\n.\r\n");
	EXPECT("\r", "\r\n.\r\n");
	EXPECT("caf\xc3\xa9\n", "caf\xc3\xa9\r\n.\r\n");     /* 8-bit passes */
	EXPECT("a\0b\n", "a\0b\r\n.\r\n");                    /* NUL passes as data */
}

static void long_lines(void **state)
{
	(void)state;
	char *body = malloc(4000);
	char *want = malloc(4100);
	size_t wl;

	/* exactly 998 octets: unchanged */
	memset(body, 'a', 998);
	memcpy(body + 998, "\r\n", 2);
	memcpy(want, body, 1000);
	memcpy(want + 1000, ".\r\n", 3);
	expect_data(body, 1000, want, 1003);
	/* 998 without a line ending */
	expect_data(body, 998, want, 1003);

	/* 999: broken after 998 */
	memset(body, 'b', 999);
	wl = 0;
	memset(want, 'b', 998);
	wl = 998;
	memcpy(want + wl, "\r\nb\r\n.\r\n", 8);
	wl += 8;
	expect_data(body, 999, want, wl);

	/* 2000: 998 + 998 + 4 */
	memset(body, 'c', 2000);
	memcpy(body + 2000, "\n", 1);
	wl = 0;
	memset(want + wl, 'c', 998); wl += 998;
	memcpy(want + wl, "\r\n", 2); wl += 2;
	memset(want + wl, 'c', 998); wl += 998;
	memcpy(want + wl, "\r\n", 2); wl += 2;
	memset(want + wl, 'c', 4); wl += 4;
	memcpy(want + wl, "\r\n.\r\n", 5); wl += 5;
	expect_data(body, 2001, want, wl);

	/* a line of "." then 998 more: the stuffed dot does not count, and the
	 * piece after the break that starts with "." is stuffed too */
	memset(body, '.', 1997);
	wl = 0;
	want[wl++] = '.';
	memset(want + wl, '.', 998); wl += 998;
	memcpy(want + wl, "\r\n.", 3); wl += 3;
	memset(want + wl, '.', 998); wl += 998;
	memcpy(want + wl, "\r\n.", 3); wl += 3;
	want[wl++] = '.';
	memcpy(want + wl, "\r\n.\r\n", 5); wl += 5;
	expect_data(body, 1997, want, wl);
	free(body);
	free(want);
}

/* Checks the wire rules on DATA content and undoes it (un-stuffs). */
static void check_wire(const char *d, size_t n)
{
	assert_true(n >= 3);
	assert_memory_equal(d + n - 3, ".\r\n", 3);
	if (n > 3)
		assert_memory_equal(d + n - 5, "\r\n.\r\n", 5);
	size_t linestart = 0;
	for (size_t i = 0; i < n; i++) {
		if (d[i] == '\r') {
			assert_true(i + 1 < n && d[i + 1] == '\n');
			size_t len = i - linestart;
			bool stuffed = len > 0 && d[linestart] == '.';
			/* the terminator "." is the only line that is a lone dot */
			if (len == 1 && d[linestart] == '.')
				assert_int_equal(i + 2, n);
			assert_true(len <= RQ_LINE_MAX + (stuffed ? 1 : 0));
			i++;
			linestart = i + 1;
		} else {
			assert_int_not_equal(d[i], '\n');
		}
	}
	assert_int_equal(linestart, n);
}

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
		size_t n1, n2;
		char *e = enc(body, len, &n1);
		char *a = app(body, len, &n2);
		if (n1 != n2 || memcmp(e, a, n1) != 0)
			fail_msg("append and encode differ on body %d (seed 12345)", iter);
		check_wire(e, n1);
		/* the size query without a buffer and a short buffer agree */
		assert_int_equal(rq_data_encode(body, len, NULL, 0), n1);
		char small[16];
		assert_int_equal(rq_data_encode(body, len, small, sizeof(small)), n1);
		assert_memory_equal(small, e, n1 < sizeof(small) ? n1 : sizeof(small));
		free(e);
		free(a);
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
	check_wire(a, total);
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

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(addresses_valid),
		cmocka_unit_test(addresses_invalid),
		cmocka_unit_test(address_lengths),
		cmocka_unit_test(address_helpers),
		cmocka_unit_test(dot_stuffing_and_line_endings),
		cmocka_unit_test(long_lines),
		cmocka_unit_test(random_bodies),
		cmocka_unit_test(big_body_by_reference),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

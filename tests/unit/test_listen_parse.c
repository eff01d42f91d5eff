/*
 * The pure parts of engine/listen.c: CIDRs and matching, listen addresses,
 * the command verbs, MAIL / RCPT paths and parameters, DATA lines
 * (dot-unstuffing, line ends, the end of data, size and line limits).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/listen.h"

static struct sockaddr_storage sa_of(const char *ip)
{
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof(ss));
	struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
	if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1)
		a4->sin_family = AF_INET;
	else if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1)
		a6->sin6_family = AF_INET6;
	else
		fail_msg("bad ip %s", ip);
	return ss;
}

static bool in(const char *cidr, const char *ip)
{
	struct rq_cidr c;
	char err[160];
	if (rq_listen_cidr_parse(cidr, &c, err, sizeof(err)) != 0)
		fail_msg("%s: %s", cidr, err);
	struct sockaddr_storage ss = sa_of(ip);
	return rq_listen_cidr_match(&c, (struct sockaddr *)&ss);
}

static void test_cidr(void **st)
{
	(void)st;
	assert_true(in("127.0.0.0/8", "127.0.0.1"));
	assert_true(in("127.0.0.0/8", "127.255.255.255"));
	assert_false(in("127.0.0.0/8", "128.0.0.1"));
	assert_true(in("10.1.2.3", "10.1.2.3"));
	assert_false(in("10.1.2.3", "10.1.2.4"));
	assert_true(in("10.1.2.3/24", "10.1.2.200"));   /* host bits cleared */
	assert_true(in("0.0.0.0/0", "203.0.113.9"));
	assert_false(in("0.0.0.0/0", "::1"));
	assert_true(in("192.168.0.0/23", "192.168.1.7"));
	assert_false(in("192.168.0.0/23", "192.168.2.7"));
	assert_true(in("::1/128", "::1"));
	assert_false(in("::1/128", "::2"));
	assert_true(in("2001:db8::/32", "2001:db8:ffff::1"));
	assert_false(in("2001:db8::/33", "2001:db8:8000::1"));
	assert_true(in("fe80::/10", "febf::1"));
	assert_false(in("fe80::/10", "fec0::1"));
	/* IPv4-mapped IPv6 counts as IPv4 */
	assert_true(in("127.0.0.0/8", "::ffff:127.0.0.5"));
	assert_false(in("::ffff:0:0/96", "::ffff:127.0.0.5"));

	struct rq_cidr c;
	char err[160];
	const char *bad[] = {"", "/8", "1.2.3.4/", "1.2.3.4/33", "::1/129", "1.2.3.4/08",
			     "1.2.3/8", "300.1.1.1", "1.2.3.4/8x", "host.example/8",
			     "1.2.3.4/-1", "1.2.3.4 /8", "1.2.3.4/1234"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (rq_listen_cidr_parse(bad[i], &c, err, sizeof(err)) == 0)
			fail_msg("accepted \"%s\"", bad[i]);
		assert_true(err[0] != '\0');
	}
	assert_int_equal(rq_listen_cidr_parse("10.0.0.0/0", &c, err, sizeof(err)), 0);
	assert_int_equal(c.bits, 0);
	assert_int_equal(c.addr[0], 0);
}

static void test_addr(void **st)
{
	(void)st;
	struct sockaddr_storage ss;
	socklen_t len;
	char err[160];
	assert_int_equal(rq_listen_addr_parse("127.0.0.1:2525", &ss, &len, err, sizeof(err)), 0);
	assert_int_equal(ss.ss_family, AF_INET);
	assert_int_equal(ntohs(((struct sockaddr_in *)&ss)->sin_port), 2525);
	assert_int_equal(rq_listen_addr_parse("[::1]:0", &ss, &len, err, sizeof(err)), 0);
	assert_int_equal(ss.ss_family, AF_INET6);
	const char *bad[] = {"", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536", "::1:25",
			     "[::1]", "[127.0.0.1]:25", "localhost:25", "[::1]25", "1.2.3.4:2x",
			     "1.2.3.4:123456"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (rq_listen_addr_parse(bad[i], &ss, &len, err, sizeof(err)) == 0)
			fail_msg("accepted \"%s\"", bad[i]);
}

static void test_verbs(void **st)
{
	(void)st;
	size_t a;
	assert_int_equal(rq_listen_verb_parse("EHLO x", 6, &a), RQ_LISTEN_V_EHLO);
	assert_int_equal(a, 5);
	assert_int_equal(rq_listen_verb_parse("ehlo", 4, &a), RQ_LISTEN_V_EHLO);
	assert_int_equal(a, 4);
	assert_int_equal(rq_listen_verb_parse("mail from:<a@b>", 15, &a), RQ_LISTEN_V_MAIL);
	assert_int_equal(a, 10);
	assert_int_equal(rq_listen_verb_parse("RCPT TO:<a@b>", 13, &a), RQ_LISTEN_V_RCPT);
	assert_int_equal(a, 8);
	assert_int_equal(rq_listen_verb_parse("MAIL <a@b>", 10, &a), RQ_LISTEN_V_UNKNOWN);
	assert_int_equal(rq_listen_verb_parse("DATA", 4, &a), RQ_LISTEN_V_DATA);
	assert_int_equal(rq_listen_verb_parse("DATAX", 5, &a), RQ_LISTEN_V_UNKNOWN);
	assert_int_equal(rq_listen_verb_parse("StartTLS", 8, &a), RQ_LISTEN_V_STARTTLS);
	assert_int_equal(rq_listen_verb_parse("AUTH PLAIN", 10, &a), RQ_LISTEN_V_AUTH);
	assert_int_equal(a, 5);
	assert_int_equal(rq_listen_verb_parse("EXPN x", 6, &a), RQ_LISTEN_V_NOTIMPL);
	assert_int_equal(rq_listen_verb_parse("BDAT 10 LAST", 12, &a), RQ_LISTEN_V_NOTIMPL);
	assert_int_equal(rq_listen_verb_parse("", 0, &a), RQ_LISTEN_V_UNKNOWN);
	assert_int_equal(rq_listen_verb_parse("GET / HTTP/1.0", 14, &a), RQ_LISTEN_V_UNKNOWN);
}

static int path(const char *arg, bool mail, char *addr, struct rq_listen_params *p)
{
	size_t n;
	const char *why = NULL;
	int r = rq_listen_path_parse(arg, strlen(arg), mail, addr, RQ_LISTEN_CMD_LINE_MAX, &n, p,
				     &why);
	if (r)
		assert_non_null(why);
	else
		assert_int_equal(n, strlen(addr));
	return r;
}

static void test_paths(void **st)
{
	(void)st;
	char a[RQ_LISTEN_CMD_LINE_MAX];
	struct rq_listen_params p;
	assert_int_equal(path("<a@example.com>", true, a, &p), 0);
	assert_string_equal(a, "a@example.com");
	assert_int_equal(path(" <a@example.com> SIZE=1000 BODY=8BITMIME", true, a, &p), 0);
	assert_true(p.has_size);
	assert_int_equal(p.size, 1000);
	assert_true(p.body_8bit);
	assert_false(p.smtputf8);
	assert_int_equal(path("<>", true, a, &p), 0);
	assert_string_equal(a, "");
	assert_int_equal(path("<>", false, a, &p), 553);
	assert_int_equal(path("<\xc3\xa9t\xc3\xa9@example.com> SMTPUTF8", true, a, &p), 0);
	assert_true(p.smtputf8);
	assert_int_equal(path("<\"a b>c\"@example.com>", false, a, &p), 0);
	assert_string_equal(a, "\"a b>c\"@example.com");
	assert_int_equal(path("<@relay.example,@r2.example:u@example.com>", false, a, &p), 0);
	assert_string_equal(a, "u@example.com");
	assert_int_equal(path("<a@example.com> AUTH=<>", true, a, &p), 0);
	/* errors */
	assert_int_equal(path("a@example.com", true, a, &p), 501);
	assert_int_equal(path("<a@example.com", true, a, &p), 501);
	assert_int_equal(path("<a@example.com>x", true, a, &p), 501);
	assert_int_equal(path("<a@example.com> SIZE=12x", true, a, &p), 501);
	assert_int_equal(path("<a@example.com> SIZE=99999999999999999999", true, a, &p), 501);
	assert_int_equal(path("<a@example.com> FOO=1", true, a, &p), 555);
	assert_int_equal(path("<a@example.com> BODY=BINARYMIME", true, a, &p), 555);
	assert_int_equal(path("<a@example.com> NOTIFY=NEVER", false, a, &p), 555);
	assert_int_equal(path("<a b@example.com>", true, a, &p), 553);
	assert_int_equal(path("<nodomain>", false, a, &p), 553);
	assert_int_equal(path("<a@exa\x01mple.com>", false, a, &p), 553);
	char nul[] = "<a@exa\0mple.com>";
	size_t n;
	const char *why;
	assert_int_not_equal(rq_listen_path_parse(nul, sizeof(nul) - 1, false, a, sizeof(a), &n,
						  &p, &why), 0);
	char longp[400];
	memset(longp, 'x', sizeof(longp));
	longp[0] = '<';
	memcpy(longp + 300, "@example.com>", 14);
	assert_int_equal(path(longp, false, a, &p), 553);
}

/* Feeds a whole DATA stream line by line, like the session does (lines
 * longer than the session's buffer as pieces). Returns bytes consumed up to
 * and including the final dot, or 0 when it never ended. */
static size_t feed(struct rq_listen_data *d, const char *s, size_t len)
{
	size_t i = 0;
	while (i < len) {
		const char *lf = memchr(s + i, '\n', len - i);
		if (!lf)
			return 0;
		size_t total = (size_t)(lf - (s + i)) + 1;
		if (total > 1024) {
			rq_listen_data_line(d, NULL, total - 2, false);
			i += total - 2;
			continue;
		}
		int r = rq_listen_data_line(d, s + i, total, true);
		i += total;
		if (r == 1)
			return i;
	}
	return 0;
}

static void check_data(const char *in, const char *want, size_t want_used)
{
	struct rq_listen_data d;
	rq_listen_data_init(&d, 1 << 20);
	size_t used = feed(&d, in, strlen(in));
	assert_int_equal(used, want_used);
	if (want) {
		assert_true(d.done);
		assert_int_equal(d.len, strlen(want));
		assert_memory_equal(d.buf ? d.buf : "", want, d.len);
		assert_int_equal(d.size, d.len);
	}
	rq_listen_data_finish(&d);
}

static void test_data(void **st)
{
	(void)st;
	const char *a = "Subject: x\r\n\r\nbody\r\n.\r\n";
	check_data(a, "Subject: x\r\n\r\nbody\r\n", strlen(a));
	/* dot-unstuffing */
	const char *b = "..x\r\n...\r\n.\r\n";
	check_data(b, ".x\r\n..\r\n", strlen(b));
	/* bare LF normalised; the end needs CRLF . CRLF */
	const char *c = "a\nb\r\n.\r\nQUIT\r\n";
	check_data(c, "a\r\nb\r\n", strlen(c) - 6);
	/* "." ended by a bare LF, or after a bare LF, is content (smuggling) */
	const char *e = "a\r\n.\nMAIL FROM:<x@y>\r\n\n.\r\n.\r\n";
	check_data(e, "a\r\n\r\nMAIL FROM:<x@y>\r\n\r\n\r\n", strlen(e));
	/* bare CR kept as it is */
	const char *f = "a\rb\r\n.\r\n";
	check_data(f, "a\rb\r\n", strlen(f));
	/* an empty message */
	check_data(".\r\n", "", 3);
	/* never ends */
	check_data("abc\r\n..\r\n", NULL, 0);
}

static void test_data_limits(void **st)
{
	(void)st;
	struct rq_listen_data d;
	/* a line of 998 octets is fine, 999 is too long */
	char *big = malloc(5000);
	memset(big, 'x', 998);
	memcpy(big + 998, "\r\n.\r\n", 6);
	rq_listen_data_init(&d, 1 << 20);
	assert_int_equal(feed(&d, big, strlen(big)), 1003);
	assert_false(d.too_long);
	assert_int_equal(d.len, 1000);
	rq_listen_data_finish(&d);
	/* a stuffed dot does not count */
	big[0] = '.';
	memset(big + 1, 'x', 998);
	memcpy(big + 999, "\r\n.\r\n", 6);
	rq_listen_data_init(&d, 1 << 20);
	feed(&d, big, strlen(big));
	assert_false(d.too_long);
	assert_int_equal(d.len, 1000);
	rq_listen_data_finish(&d);
	memset(big, 'x', 999);
	memcpy(big + 999, "\r\n.\r\n", 6);
	rq_listen_data_init(&d, 1 << 20);
	assert_int_equal(feed(&d, big, strlen(big)), 1004);
	assert_true(d.done);
	assert_true(d.too_long);
	assert_null(d.buf);
	rq_listen_data_finish(&d);
	/* a line far longer than the buffer, then the end */
	memset(big, 'y', 4000);
	memcpy(big + 4000, "\r\n.\r\n", 6);
	rq_listen_data_init(&d, 1 << 20);
	assert_int_equal(feed(&d, big, strlen(big)), 4005);
	assert_true(d.too_long);
	rq_listen_data_finish(&d);
	/* size: max counts CRLF line ends, after unstuffing */
	rq_listen_data_init(&d, 10);
	const char *s10 = "..1234567\r\n.\r\n";  /* ".1234567" + CRLF = 10 */
	feed(&d, s10, strlen(s10));
	assert_false(d.too_big);
	assert_int_equal(d.size, 10);
	rq_listen_data_finish(&d);
	rq_listen_data_init(&d, 10);
	const char *s11 = "12345678\n9\r\n.\r\n";
	feed(&d, s11, strlen(s11));
	assert_true(d.too_big);
	assert_true(d.done);
	assert_null(d.buf);
	assert_int_equal(d.size, 13);
	rq_listen_data_finish(&d);
	/* NUL */
	rq_listen_data_init(&d, 100);
	const char nul[] = "a\0b\r\n.\r\n";
	feed(&d, nul, sizeof(nul) - 1);
	assert_true(d.nul);
	assert_true(d.done);
	rq_listen_data_finish(&d);
	free(big);
}

static void test_names(void **st)
{
	(void)st;
	assert_string_equal(rq_listen_state_name(RQ_LISTEN_ST_GREET), "greet");
	assert_string_equal(rq_listen_state_name(RQ_LISTEN_ST_COUNT_), "?");
	assert_string_equal(rq_listen_reject_name(RQ_LISTEN_REJ_AUTH_REQUIRED), "auth_required");
	assert_string_equal(rq_listen_reject_name(RQ_LISTEN_REJ_PER_IP), "per_ip");
	for (int i = 0; i < RQ_LISTEN_ST_COUNT_; i++)
		assert_string_not_equal(rq_listen_state_name((enum rq_listen_state)i), "?");
	for (int i = 0; i < RQ_LISTEN_REJ_COUNT_; i++)
		assert_string_not_equal(rq_listen_reject_name((enum rq_listen_reject)i), "?");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cidr),
		cmocka_unit_test(test_addr),
		cmocka_unit_test(test_verbs),
		cmocka_unit_test(test_paths),
		cmocka_unit_test(test_data),
		cmocka_unit_test(test_data_limits),
		cmocka_unit_test(test_names),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

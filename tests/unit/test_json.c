#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/json.h"

static struct rq_json *parse(const char *s)
{
	char err[200];
	struct rq_json *v = rq_json_parse(s, strlen(s), 0, err, sizeof(err));
	if (!v)
		fprintf(stderr, "parse failed: %s: %s\n", s, err);
	return v;
}

/* True when s is rejected; the error text must name an offset. */
static bool rejected(const char *s, size_t len, int flags)
{
	char err[200] = "unset";
	struct rq_json *v = rq_json_parse(s, len, flags, err, sizeof(err));
	if (v) {
		rq_json_free(v);
		return false;
	}
	assert_non_null(strstr(err, "offset "));
	return true;
}

static void valid_documents(void **state)
{
	(void)state;
	struct rq_json *v = parse(" {\"from\":\"a@x.org\",\"to\":[\"b@y.org\",\"c@z.org\"],"
			"\"delay\":30,\"ratio\":-1.5e2,\"ok\":true,\"no\":false,\"n\":null,"
			"\"meta\":{}} \r\n");
	assert_non_null(v);
	assert_int_equal(v->type, RQ_JSON_OBJECT);
	assert_int_equal(v->count, 8);
	assert_string_equal(rq_json_get_str(v, "from"), "a@x.org");
	const struct rq_json *to = rq_json_get(v, "to");
	assert_true(rq_json_is(to, RQ_JSON_ARRAY));
	assert_int_equal(to->count, 2);
	assert_string_equal(rq_json_at(to, 1)->str, "c@z.org");
	assert_null(rq_json_at(to, 2));
	int64_t i = 0;
	assert_true(rq_json_get_int(v, "delay", false, &i));
	assert_int_equal(i, 30);
	const struct rq_json *r = rq_json_get(v, "ratio");
	assert_false(r->is_int);
	assert_true(r->number == -150.0);
	assert_true(rq_json_get_int(v, "ratio", false, &i));
	assert_int_equal(i, -150);
	assert_true(rq_json_get(v, "ok")->boolean);
	assert_false(rq_json_get(v, "no")->boolean);
	assert_int_equal(rq_json_get(v, "n")->type, RQ_JSON_NULL);
	assert_int_equal(rq_json_get(v, "meta")->count, 0);
	assert_null(rq_json_get(v, "missing"));
	assert_null(rq_json_get_str(v, "delay"));
	assert_false(rq_json_get_int(v, "from", true, &i));
	rq_json_free(v);

	/* Scalars at top level, and numbers at their limits. */
	v = parse("\"x\"");
	assert_string_equal(v->str, "x");
	rq_json_free(v);
	v = parse("-0");
	assert_true(v->is_int);
	rq_json_free(v);
	v = parse("9223372036854775807");
	assert_true(v->is_int);
	assert_true(v->integer == INT64_MAX);
	rq_json_free(v);
	v = parse("9223372036854775808");
	assert_false(v->is_int);
	assert_true(v->number > 9.2e18);
	rq_json_free(v);
	v = parse("[[],{},[{}],0.5,1E+2,1e-2]");
	assert_int_equal(v->count, 6);
	rq_json_free(v);

	/* Lax integer from a string (Redis hash fields are strings). */
	v = parse("{\"attempts\":\"3\",\"bad\":\"3x\",\"k\":1,\"k\":2}");
	assert_true(rq_json_get_int(v, "attempts", true, &i));
	assert_int_equal(i, 3);
	assert_false(rq_json_get_int(v, "attempts", false, &i));
	assert_false(rq_json_get_int(v, "bad", true, &i));
	assert_true(rq_json_get_int(v, "k", false, &i));
	assert_int_equal(i, 2);                 /* last duplicate wins */
	rq_json_free(v);
}

static void invalid_documents(void **state)
{
	(void)state;
	static const char *const bad[] = {
		"", " ", "{", "}", "[1,]", "[,1]", "{\"a\":1,}", "{\"a\" 1}", "{a:1}",
		"{'a':1}", "[1 2]", "01", "1.", ".5", "-", "+1", "1e", "1e+", "0x10",
		"NaN", "Infinity", "-Infinity", "1e400", "tru", "nul", "True",
		"\"abc", "\"a\\x\"", "\"\\u12\"", "\"\\u12G4\"", "\"\\ud800\"",
		"\"\\ud800\\u0041\"", "\"\\udc00\"", "\"\\ud800x\"", "\"tab\there\"",
		"\"nl\nhere\"", "[1]x", "{} {}", "[1]]", "\"a\"\"b\"", "/* c */ 1",
		"\xef\xbb\xbf{}", "[\"\\", "\"\\u", "{\"a\":}",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (!rejected(bad[i], strlen(bad[i]), 0))
			fail_msg("accepted invalid JSON #%zu: %s", i, bad[i]);
	}
	/* NUL outside a string, and invalid UTF-8 (strict by default). */
	assert_true(rejected("[1,\0 2]", 7, 0));
	assert_true(rejected("\"\xff\"", 3, 0));
	assert_true(rejected("\"\xc0\xaf\"", 4, 0));          /* overlong '/' */
	assert_true(rejected("\"\xed\xa0\x80\"", 5, 0));      /* encoded surrogate */
	assert_true(rejected("\"\xf4\x90\x80\x80\"", 6, 0));  /* > U+10FFFF */
	assert_true(rejected("\"\xe2\x82\"", 4, 0));          /* truncated */

	/* The lax flag keeps raw bytes; control bytes stay forbidden. */
	struct rq_json *v = rq_json_parse("\"a\xffz\"", 5, RQ_JSON_LAX_UTF8, NULL, 0);
	assert_non_null(v);
	assert_int_equal(v->len, 3);
	assert_memory_equal(v->str, "a\xffz", 3);
	rq_json_free(v);
	assert_true(rejected("\"\x01\"", 3, RQ_JSON_LAX_UTF8));

	/* The error text names where. */
	char err[100];
	assert_null(rq_json_parse("{\"a\":1 \"b\"}", 11, 0, err, sizeof(err)));
	assert_string_equal(err, "offset 7: expected ',' or '}'");
	/* A tiny error buffer is still NUL-ended. */
	char tiny[5];
	assert_null(rq_json_parse("[", 1, 0, tiny, sizeof(tiny)));
	assert_true(strlen(tiny) < sizeof(tiny));
	assert_null(rq_json_parse(NULL, 0, 0, NULL, 0));
}

static void escapes_decode_to_utf8(void **state)
{
	(void)state;
	struct rq_json *v = parse("\"q\\\" b\\\\ s\\/ \\b\\f\\n\\r\\t"
			" \\u00e9 \\u20AC \\ud83d\\ude00 \\u0000end\"");
	assert_non_null(v);
	const char want[] = "q\" b\\ s/ \b\f\n\r\t \xc3\xa9 \xe2\x82\xac "
			"\xf0\x9f\x98\x80 \0end";
	assert_int_equal(v->len, sizeof(want) - 1);
	assert_memory_equal(v->str, want, sizeof(want) - 1);
	rq_json_free(v);

	/* Raw UTF-8 passes; a key holding NUL is not found by a C string. */
	v = parse("{\"k\\u0000x\":1,\"\xc3\xa9t\xc3\xa9\":\"\xe2\x82\xac\"}");
	assert_non_null(v);
	assert_null(rq_json_get(v, "k"));
	assert_string_equal(rq_json_get_str(v, "\xc3\xa9t\xc3\xa9"), "\xe2\x82\xac");
	assert_int_equal(v->child->key_len, 3);
	rq_json_free(v);
}

static char *nested(int depth, bool object)
{
	char *s = malloc((size_t)depth * 6 + 8);
	size_t n = 0;
	for (int i = 0; i < depth; i++) {
		if (object) {
			memcpy(s + n, "{\"a\":", 5);
			n += 5;
		} else {
			s[n++] = '[';
		}
	}
	s[n++] = '1';
	for (int i = 0; i < depth; i++)
		s[n++] = object ? '}' : ']';
	s[n] = '\0';
	return s;
}

static void depth_limit(void **state)
{
	(void)state;
	char err[100];
	char *s = nested(RQ_JSON_MAX_DEPTH, false);
	struct rq_json *v = rq_json_parse(s, strlen(s), 0, err, sizeof(err));
	assert_non_null(v);
	rq_json_free(v);
	free(s);
	s = nested(RQ_JSON_MAX_DEPTH + 1, false);
	assert_null(rq_json_parse(s, strlen(s), 0, err, sizeof(err)));
	assert_non_null(strstr(err, "nesting deeper than 64"));
	free(s);
	s = nested(RQ_JSON_MAX_DEPTH + 1, true);
	assert_null(rq_json_parse(s, strlen(s), 0, err, sizeof(err)));
	free(s);
	/* Far deeper than any stack would survive unbounded. */
	s = nested(1000000, false);
	assert_null(rq_json_parse(s, strlen(s), 0, err, sizeof(err)));
	free(s);
}

/* RQ_JSON_SKIP_DEEP: a too-deep branch is a too_deep null, the rest of the
 * document stays readable; what does not balance is still an error. */
static void skip_deep(void **state)
{
	(void)state;
	char err[120];
	char *deep = nested(900, true);
	size_t n = strlen(deep) + 200;
	char *doc = malloc(n);
	snprintf(doc, n, "{\"id\":\"x1\",\"meta\":%s,\"s\":\"a]}\\\"[{\",\"to\":[\"a@b\"]}", deep);
	assert_null(rq_json_parse(doc, strlen(doc), 0, err, sizeof(err)));
	struct rq_json *v = rq_json_parse(doc, strlen(doc), RQ_JSON_SKIP_DEEP, err, sizeof(err));
	if (!v)
		fail_msg("%s", err);
	assert_string_equal(rq_json_get_str(v, "id"), "x1");
	assert_string_equal(rq_json_get_str(v, "s"), "a]}\"[{");
	assert_int_equal(rq_json_get(v, "to")->count, 1);
	const struct rq_json *m = rq_json_get(v, "meta");
	assert_true(rq_json_has_deep(m));
	assert_true(rq_json_has_deep(v));
	assert_false(rq_json_has_deep(rq_json_get(v, "to")));
	assert_true(rq_json_depth(v) > RQ_JSON_MAX_DEPTH);
	/* written back: the skipped branch is null */
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_value(&b, rq_json_get(v, "to"));
	assert_string_equal(b.data, "[\"a@b\"]");
	rq_json_buf_finish(&b);
	rq_json_free(v);
	free(doc);
	/* unbalanced or unterminated inside the skipped part: errors */
	char *bad = nested(100, false);
	bad[strlen(bad) - 1] = '}';
	assert_null(rq_json_parse(bad, strlen(bad), RQ_JSON_SKIP_DEEP, err, sizeof(err)));
	bad[strlen(bad) - 1] = '\0';
	assert_null(rq_json_parse(bad, strlen(bad), RQ_JSON_SKIP_DEEP, err, sizeof(err)));
	free(bad);
	free(deep);
	/* a million levels: no recursion, no crash */
	deep = nested(1000000, false);
	v = rq_json_parse(deep, strlen(deep), RQ_JSON_SKIP_DEEP, err, sizeof(err));
	assert_non_null(v);
	assert_true(rq_json_has_deep(v));
	rq_json_free(v);
	free(deep);
}

static void depth_counts_levels(void **state)
{
	(void)state;
	static const struct {
		const char *doc;
		size_t depth;
	} cases[] = {
		{"1", 0}, {"\"x\"", 0}, {"{}", 1}, {"[]", 1}, {"{\"a\":1}", 1},
		{"{\"a\":{\"b\":1}}", 2}, {"[[],[[1]],{}]", 3},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct rq_json *v = rq_json_parse(cases[i].doc, strlen(cases[i].doc), 0, NULL, 0);
		assert_non_null(v);
		assert_int_equal(rq_json_depth(v), cases[i].depth);
		assert_false(rq_json_has_deep(v));
		rq_json_free(v);
	}
	assert_int_equal(rq_json_depth(NULL), 0);
	char *s = nested(RQ_JSON_META_MAX_DEPTH, true);
	struct rq_json *v = rq_json_parse(s, strlen(s), 0, NULL, 0);
	assert_int_equal(rq_json_depth(v), RQ_JSON_META_MAX_DEPTH);
	rq_json_free(v);
	free(s);
}

static void writer_builds_compact_json(void **state)
{
	(void)state;
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_obj_begin(&b);
	rq_json_buf_kv_str(&b, "from", "a@x.org");
	rq_json_buf_key(&b, "to");
	rq_json_buf_arr_begin(&b);
	rq_json_buf_str(&b, "b@y.org");
	rq_json_buf_str(&b, "c@z.org");
	rq_json_buf_arr_end(&b);
	rq_json_buf_kv_int(&b, "delay", -5);
	rq_json_buf_key(&b, "d");
	rq_json_buf_double(&b, 0.1);
	rq_json_buf_key(&b, "inf");
	rq_json_buf_double(&b, 1.0 / 0.0);
	rq_json_buf_kv_bool(&b, "hold", false);
	rq_json_buf_key(&b, "meta");
	rq_json_buf_raw(&b, "{\"x\":1}", 7);
	rq_json_buf_key(&b, "e");
	rq_json_buf_obj_begin(&b);
	rq_json_buf_obj_end(&b);
	rq_json_buf_key(&b, "n");
	rq_json_buf_str(&b, NULL);
	rq_json_buf_obj_end(&b);
	assert_true(rq_json_buf_ok(&b));
	assert_string_equal(b.data, "{\"from\":\"a@x.org\",\"to\":[\"b@y.org\",\"c@z.org\"],"
			"\"delay\":-5,\"d\":0.1,\"inf\":null,\"hold\":false,\"meta\":{\"x\":1},"
			"\"e\":{},\"n\":null}");
	size_t len = 0;
	char *s = rq_json_buf_take(&b, &len);
	assert_int_equal(len, strlen(s));
	free(s);
	assert_null(b.data);

	/* Misuse fails the buffer instead of writing broken JSON. */
	rq_json_buf_init(&b);
	assert_int_equal(rq_json_buf_key(&b, "top"), -1);
	assert_false(rq_json_buf_ok(&b));
	assert_null(rq_json_buf_take(&b, NULL));
	rq_json_buf_init(&b);
	rq_json_buf_arr_begin(&b);
	assert_int_equal(rq_json_buf_obj_end(&b), -1);
	rq_json_buf_reset(&b);
	rq_json_buf_obj_begin(&b);
	assert_int_equal(rq_json_buf_int(&b, 1), -1);     /* value without key */
	rq_json_buf_reset(&b);
	rq_json_buf_arr_begin(&b);
	assert_int_equal(rq_json_buf_key(&b, "k"), -1);   /* key in an array */
	rq_json_buf_reset(&b);
	rq_json_buf_arr_begin(&b);
	rq_json_buf_arr_end(&b);
	assert_int_equal(rq_json_buf_arr_end(&b), -1);
	rq_json_buf_reset(&b);
	assert_true(rq_json_buf_ok(&b));
	for (int i = 0; i < 64; i++)
		assert_int_equal(rq_json_buf_arr_begin(&b), 0);
	assert_int_equal(rq_json_buf_arr_begin(&b), -1);
	rq_json_buf_finish(&b);
	rq_json_buf_finish(&b);
}

/* Writes s as a JSON string, parses it back and compares bytes. */
static void round_trip(const char *s, size_t len, const char *want, size_t want_len)
{
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_arr_begin(&b);
	rq_json_buf_strn(&b, s, len);
	rq_json_buf_arr_end(&b);
	assert_true(rq_json_buf_ok(&b));
	/* The text itself never holds a raw control byte. */
	for (size_t i = 0; i < b.len; i++)
		assert_true((unsigned char)b.data[i] >= 0x20 && b.data[i] != 0x7f);
	char err[100];
	struct rq_json *v = rq_json_parse(b.data, b.len, 0, err, sizeof(err));
	if (!v)
		fail_msg("writer output does not parse: %s: %s", b.data, err);
	const struct rq_json *e = rq_json_at(v, 0);
	assert_int_equal(e->len, want_len);
	assert_memory_equal(e->str, want, want_len);
	rq_json_free(v);
	rq_json_buf_finish(&b);
}

static void hostile_strings_round_trip(void **state)
{
	(void)state;
	static const char crlf[] = "MAIL FROM:<a@x>\r\nRCPT TO:<victim@y>\r\n";
	round_trip(crlf, sizeof(crlf) - 1, crlf, sizeof(crlf) - 1);
	static const char nul[] = "a\0b\0";
	round_trip(nul, sizeof(nul) - 1, nul, sizeof(nul) - 1);
	static const char quotes[] = "\"\\\"\\\\\"},{\"evil\":1";
	round_trip(quotes, sizeof(quotes) - 1, quotes, sizeof(quotes) - 1);
	static const char ctl[] = "\x01\x1b[31m\x7f\t\b\f";
	round_trip(ctl, sizeof(ctl) - 1, ctl, sizeof(ctl) - 1);
	static const char utf8[] = "J\xc3\xbcrgen \xe2\x82\xac \xf0\x9f\x98\x80";
	round_trip(utf8, sizeof(utf8) - 1, utf8, sizeof(utf8) - 1);
	/* Invalid UTF-8 becomes U+FFFD, one per bad byte. */
	round_trip("a\xff\xc0z\xe2\x82", 6, "a\xef\xbf\xbd\xef\xbf\xbdz\xef\xbf\xbd\xef\xbf\xbd", 14);

	/* Every byte value, and a parsed tree written back unchanged. */
	char all[256];
	for (int i = 0; i < 128; i++)
		all[i] = (char)i;
	round_trip(all, 128, all, 128);
	const char doc[] = "{\"a\":[1,-2.5,-0.0,1e+300,150.0,true,false,null,\"x\\u0000\\n\"],\"k\\u0000\":{}}";
	struct rq_json *v = parse(doc);
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_value(&b, v);
	assert_string_equal(b.data, doc);
	rq_json_buf_finish(&b);
	rq_json_free(v);
}

/* Random mutations of valid documents: never a crash, and whatever parses
 * writes back to text that parses to the same text again. */
static void mutations_never_crash(void **state)
{
	(void)state;
	static const char *const seeds[] = {
		"{\"from\":\"a@x\",\"to\":[\"b@y\"],\"delay\":1.5e3,\"meta\":{\"k\":[null,true]}}",
		"[\"\\ud83d\\ude00\",\"\\u00e9\",-0.0,{\"\":\"\"}]",
	};
	unsigned seed = 12345;
	char buf[256];
	for (int round = 0; round < 20000; round++) {
		const char *s = seeds[round % 2];
		size_t n = strlen(s);
		memcpy(buf, s, n);
		for (int k = 0; k < 1 + round % 4; k++) {
			seed = seed * 1103515245u + 12345u;
			size_t at = (seed >> 8) % n;
			seed = seed * 1103515245u + 12345u;
			buf[at] = (char)(seed >> 16);
		}
		seed = seed * 1103515245u + 12345u;
		size_t len = (seed >> 8) % 3 == 0 ? (seed >> 12) % n : n;
		struct rq_json *v = rq_json_parse(buf, len, round % 3 == 0 ? RQ_JSON_LAX_UTF8 : 0, NULL, 0);
		if (!v)
			continue;
		struct rq_json_buf b1, b2;
		rq_json_buf_init(&b1);
		rq_json_buf_init(&b2);
		assert_int_equal(rq_json_buf_value(&b1, v), 0);
		struct rq_json *w = rq_json_parse(b1.data, b1.len, 0, NULL, 0);
		assert_non_null(w);
		rq_json_buf_value(&b2, w);
		assert_string_equal(b1.data, b2.data);
		rq_json_free(w);
		rq_json_free(v);
		rq_json_buf_finish(&b1);
		rq_json_buf_finish(&b2);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(valid_documents),
		cmocka_unit_test(skip_deep),
		cmocka_unit_test(depth_counts_levels),
		cmocka_unit_test(invalid_documents),
		cmocka_unit_test(escapes_decode_to_utf8),
		cmocka_unit_test(depth_limit),
		cmocka_unit_test(writer_builds_compact_json),
		cmocka_unit_test(hostile_strings_round_trip),
		cmocka_unit_test(mutations_never_crash),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

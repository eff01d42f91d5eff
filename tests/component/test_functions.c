/*
 * The Redis Functions library (lua/redis/relayq.lua) against a real
 * redis-server: every function of the contract in lua/redis/README.md, its
 * error texts, and that a refused call writes nothing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"
#include "relayq/fnlib.h"
#include "relayq/json.h"
#include "relayq/keys.h"
#include "relayq/message.h"

#define BODY "Subject: t\r\n\r\nhello\r\n"

static struct th_redis srv;

struct q {
	redisContext *c;
	char name[96];
	char key[128];
};

/* ---- plumbing ---- */

static redisReply *fcall_argv(struct q *q, const char *fn, int argc, const char **argv,
			      const size_t *lens)
{
	const char *a[64];
	size_t l[64];
	assert_true(argc + 4 <= 64);
	a[0] = "FCALL";
	a[1] = fn;
	a[2] = "1";
	a[3] = q->key;
	for (int i = 0; i < 4; i++)
		l[i] = strlen(a[i]);
	for (int i = 0; i < argc; i++) {
		a[4 + i] = argv[i];
		l[4 + i] = lens ? lens[i] : strlen(argv[i]);
	}
	redisReply *r = redisCommandArgv(q->c, argc + 4, a, l);
	if (!r)
		fail_msg("FCALL %s: %s", fn, q->c->errstr);
	return r;
}

static redisReply *fc(struct q *q, const char *fn, const char **args)
{
	int n = 0;
	while (args[n])
		n++;
	return fcall_argv(q, fn, n, args, NULL);
}

/* FC(q, "relayq_x", "a", "b") ; FC(q, "relayq_x", NULL) for no argument. */
#define FC(q, fn, ...) fc((q), (fn), (const char *[]){__VA_ARGS__, NULL})

static redisReply *cmd(struct q *q, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(q->c, fmt, ap);
	va_end(ap);
	if (!r)
		fail_msg("redis: %s", q->c->errstr);
	return r;
}

static void expect_error(redisReply *r, const char *text)
{
	char want[600];
	snprintf(want, sizeof(want), "ERR relayq: %s", text);
	if (r->type != REDIS_REPLY_ERROR)
		fail_msg("expected error \"%s\", got reply type %d", want, r->type);
	assert_string_equal(r->str, want);
}

static void expect_int(redisReply *r, long long v)
{
	if (r->type != REDIS_REPLY_INTEGER)
		fail_msg("expected integer %lld, got type %d (%s)", v, r->type,
			 r->type == REDIS_REPLY_ERROR ? r->str : "");
	assert_int_equal(r->integer, v);
}

static redisReply *enqueue_raw(struct q *q, const char *env, const char *body, size_t len)
{
	const char *a[2] = {env, body};
	size_t l[2] = {strlen(env), len};
	return fcall_argv(q, "relayq_enqueue", 2, a, l);
}

/* Enqueues and copies the id into id (40 bytes). */
static void enq(struct q *q, const char *env, const char *body, char *id)
{
	redisReply *r = enqueue_raw(q, env, body, strlen(body));
	if (r->type != REDIS_REPLY_STRING)
		fail_msg("enqueue %s: %s", env, r->type == REDIS_REPLY_ERROR ? r->str : "not a string");
	assert_true(r->len > 0 && r->len <= 32);
	for (size_t i = 0; i < r->len; i++)
		assert_true((r->str[i] >= '0' && r->str[i] <= '9') || (r->str[i] >= 'a' && r->str[i] <= 'z'));
	snprintf(id, 40, "%s", r->str);
	freeReplyObject(r);
}

static void enq1(struct q *q, const char *rcpt, char *id)
{
	char env[300];
	snprintf(env, sizeof(env), "{\"from\":\"s@example.org\",\"to\":[\"%s\"]}", rcpt);
	enq(q, env, BODY, id);
}

static long long stat_of(struct q *q, const char *name)
{
	redisReply *r = FC(q, "relayq_stats", NULL);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	long long v = -1;
	for (size_t i = 0; i + 1 < r->elements; i += 2) {
		assert_int_equal(r->element[i + 1]->type, REDIS_REPLY_INTEGER);
		if (strcmp(r->element[i]->str, name) == 0)
			v = r->element[i + 1]->integer;
	}
	freeReplyObject(r);
	if (v < 0)
		fail_msg("no stat %s", name);
	return v;
}

/* claim reply accessors: [now, next_due, msgs]; msg = [id, from, rcpts,
 * body, attempts, created, meta, lease] */
#define CL_NOW(r) ((r)->element[0]->integer)
#define CL_DUE(r) ((r)->element[1]->integer)
#define CL_N(r) ((r)->element[2]->elements)
#define CL_MSG(r, i) ((r)->element[2]->element[i])
#define M_ID(m) ((m)->element[0]->str)
#define M_FROM(m) ((m)->element[1]->str)
#define M_RCPTS(m) ((m)->element[2])
#define M_BODY(m) ((m)->element[3])
#define M_ATT(m) ((m)->element[4]->integer)
#define M_CREATED(m) ((m)->element[5]->integer)
#define M_META(m) ((m)->element[6]->str)
#define M_LEASE(m) ((m)->element[7]->integer)

static redisReply *claim(struct q *q, int count, long long lease_ms)
{
	char c[16], l[24];
	snprintf(c, sizeof(c), "%d", count);
	snprintf(l, sizeof(l), "%lld", lease_ms);
	redisReply *r = FC(q, "relayq_claim", c, l);
	if (r->type != REDIS_REPLY_ARRAY)
		fail_msg("claim: %s", r->type == REDIS_REPLY_ERROR ? r->str : "not an array");
	assert_int_equal(r->elements, 3);
	assert_int_equal(r->element[0]->type, REDIS_REPLY_INTEGER);
	assert_int_equal(r->element[1]->type, REDIS_REPLY_INTEGER);
	assert_int_equal(r->element[2]->type, REDIS_REPLY_ARRAY);
	for (size_t i = 0; i < CL_N(r); i++) {
		redisReply *m = CL_MSG(r, i);
		assert_int_equal(m->type, REDIS_REPLY_ARRAY);
		assert_int_equal(m->elements, 8);
		assert_int_equal(m->element[0]->type, REDIS_REPLY_STRING);
		assert_int_equal(m->element[1]->type, REDIS_REPLY_STRING);
		assert_int_equal(m->element[2]->type, REDIS_REPLY_ARRAY);
		assert_int_equal(m->element[3]->type, REDIS_REPLY_STRING);
		assert_int_equal(m->element[4]->type, REDIS_REPLY_INTEGER);
		assert_int_equal(m->element[5]->type, REDIS_REPLY_INTEGER);
		assert_int_equal(m->element[6]->type, REDIS_REPLY_STRING);
		assert_int_equal(m->element[7]->type, REDIS_REPLY_INTEGER);
	}
	return r;
}

static redisReply *settle(struct q *q, const char *json)
{
	return FC(q, "relayq_settle", json);
}

/* Settles one message; returns its status string (static buffer). */
static const char *settle1(struct q *q, const char *id, long long lease, const char *rest)
{
	static char status[32];
	char json[4096];
	snprintf(json, sizeof(json), "[{\"id\":\"%s\",\"lease\":%lld%s%s}]", id, lease,
		 rest && *rest ? "," : "", rest ? rest : "");
	redisReply *r = settle(q, json);
	if (r->type != REDIS_REPLY_ARRAY)
		fail_msg("settle %s: %s", json, r->type == REDIS_REPLY_ERROR ? r->str : "not an array");
	assert_int_equal(r->elements, 1);
	snprintf(status, sizeof(status), "%s", r->element[0]->str);
	freeReplyObject(r);
	return status;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every key of the queue with its DUMP, sorted: equal snapshots = nothing
 * written. Returns a malloc'd buffer. */
static char *snapshot(struct q *q, size_t *len)
{
	char **keys = NULL;
	size_t nkeys = 0;
	char cursor[32] = "0";
	char pattern[160];
	snprintf(pattern, sizeof(pattern), "%s*", q->key);
	do {
		redisReply *r = cmd(q, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
		assert_int_equal(r->type, REDIS_REPLY_ARRAY);
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		redisReply *k = r->element[1];
		for (size_t i = 0; i < k->elements; i++) {
			keys = realloc(keys, (nkeys + 1) * sizeof(*keys));
			keys[nkeys++] = strdup(k->element[i]->str);
		}
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
	if (nkeys > 0)
		qsort(keys, nkeys, sizeof(*keys), cmp_str);
	char *buf = NULL;
	size_t n = 0;
	FILE *f = open_memstream(&buf, &n);
	for (size_t i = 0; i < nkeys; i++) {
		redisReply *d = cmd(q, "DUMP %s", keys[i]);
		fprintf(f, "%s\n%zu\n", keys[i], d->type == REDIS_REPLY_STRING ? d->len : 0);
		if (d->type == REDIS_REPLY_STRING)
			fwrite(d->str, 1, d->len, f);
		freeReplyObject(d);
		free(keys[i]);
	}
	fclose(f);
	free(keys);
	*len = n;
	return buf;
}

static void same_snapshot(char *before, size_t blen, char *after, size_t alen, const char *what)
{
	if (blen != alen || memcmp(before, after, blen) != 0)
		fail_msg("%s wrote to the queue", what);
	free(before);
	free(after);
}

/* Settles json and asserts the statuses (want: NULL-terminated). */
static void settle_expect(struct q *q, const char *json, const char *const *want)
{
	size_t n = 0;
	while (want[n])
		n++;
	redisReply *r = settle(q, json);
	if (r->type != REDIS_REPLY_ARRAY)
		fail_msg("settle %s: %s", json, r->type == REDIS_REPLY_ERROR ? r->str : "not an array");
	if (r->elements != n)
		fail_msg("settle %s: %zu statuses, want %zu", json, r->elements, n);
	for (size_t i = 0; i < n; i++) {
		if (strcmp(r->element[i]->str, want[i]) != 0)
			fail_msg("settle %s: status %zu is %s, want %s", json, i, r->element[i]->str,
				 want[i]);
	}
	freeReplyObject(r);
}

#define SETTLE_EXPECT(q, json, ...) settle_expect((q), (json), (const char *const[]){__VA_ARGS__, NULL})

/* An outcome alone in a batch that must come back "invalid" and write nothing. */
static void settle_invalid_alone(struct q *q, const char *json)
{
	size_t bl, al;
	char *before = snapshot(q, &bl);
	SETTLE_EXPECT(q, json, "invalid");
	char *after = snapshot(q, &al);
	same_snapshot(before, bl, after, al, json);
}

/* Asserts reply r is error text and that it wrote nothing (snap taken before). */
#define REFUSED(q, call, text)                                                \
	do {                                                                  \
		size_t bl_, al_;                                              \
		char *b_ = snapshot((q), &bl_);                               \
		redisReply *r_ = (call);                                      \
		expect_error(r_, (text));                                     \
		freeReplyObject(r_);                                          \
		char *a_ = snapshot((q), &al_);                               \
		same_snapshot(b_, bl_, a_, al_, text);                        \
	} while (0)

static redisReply *events(struct q *q)
{
	redisReply *r = cmd(q, "XRANGE %s:events - +", q->key);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	return r;
}

static const char *ev_field(redisReply *entry, const char *name)
{
	redisReply *kv = entry->element[1];
	for (size_t i = 0; i + 1 < kv->elements; i += 2)
		if (strcmp(kv->element[i]->str, name) == 0)
			return kv->element[i + 1]->str;
	fail_msg("event has no field %s", name);
	return NULL;
}

static char *show(struct q *q, const char *id)
{
	redisReply *r = FC(q, "relayq_show", id);
	if (r->type != REDIS_REPLY_STRING)
		fail_msg("show %s: %s", id, r->type == REDIS_REPLY_ERROR ? r->str : "not a string");
	char *s = strdup(r->str);
	freeReplyObject(r);
	return s;
}

static void has(const char *hay, const char *needle)
{
	if (!strstr(hay, needle))
		fail_msg("\"%s\" not in %s", needle, hay);
}

static long long json_int(const char *s, const char *field)
{
	char pat[64];
	snprintf(pat, sizeof(pat), "\"%s\":", field);
	const char *p = strstr(s, pat);
	if (!p)
		fail_msg("no %s in %s", field, s);
	return strtoll(p + strlen(pat), NULL, 10);
}

static bool key_exists(struct q *q, const char *suffix)
{
	redisReply *r = cmd(q, "EXISTS %s%s", q->key, suffix);
	bool e = r->integer == 1;
	freeReplyObject(r);
	return e;
}

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

static void config_set(struct q *q, const char *field, const char *value)
{
	redisReply *r = FC(q, "relayq_config", field, value);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	freeReplyObject(r);
}

/* ---- fixtures ---- */

static int group_setup(void **state)
{
	(void)state;
	th_redis_shared(&srv);
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	th_redis_stop(&srv);
	return 0;
}

static int setup(void **state)
{
	struct q *q = calloc(1, sizeof(*q));
	q->c = th_redis_connect(&srv);
	snprintf(q->name, sizeof(q->name), "%s", th_unique_queue("fn"));
	snprintf(q->key, sizeof(q->key), "relayq:{%s}", q->name);
	*state = q;
	return 0;
}

static int teardown(void **state)
{
	struct q *q = *state;
	char cursor[32] = "0";
	do {
		redisReply *r = redisCommand(q->c, "SCAN %s MATCH %s* COUNT 1000", cursor, q->key);
		if (!r || r->type != REDIS_REPLY_ARRAY) {
			freeReplyObject(r);
			break;
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		for (size_t i = 0; i < r->element[1]->elements; i++)
			freeReplyObject(redisCommand(q->c, "DEL %s", r->element[1]->element[i]->str));
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
	redisFree(q->c);
	free(q);
	return 0;
}

/* ---- tests ---- */

static void version_matches_embedded(void **state)
{
	struct q *q = *state;
	redisReply *r = cmd(q, "FCALL relayq_version 0");
	assert_true(rq_fnlib_version() >= 1);
	expect_int(r, rq_fnlib_version());
	freeReplyObject(r);
}

struct reject {
	const char *env;
	const char *err;
};

static void enqueue_rejections(void **state)
{
	struct q *q = *state;
	char local65[200], dom256[400], total255[400], env[1200];
	memset(local65, 'a', 65);
	local65[65] = '\0';
	memset(dom256, 'd', 256);
	dom256[256] = '\0';
	char l64[65], d190[191];
	memset(l64, 'l', 64);
	l64[64] = '\0';
	memset(d190, 'e', 190);
	d190[60] = d190[121] = d190[182] = '.'; /* labels of at most 63 */
	d190[190] = '\0';
	snprintf(total255, sizeof(total255), "%s@%s", l64, d190);

	static const struct reject cases[] = {
		{"{", "envelope is not valid JSON"},
		{"", "envelope is not valid JSON"},
		{"[\"a@b\"]", "envelope is not a JSON object"},
		{"\"x\"", "envelope is not a JSON object"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\"],\"bcc\":[]}", "unknown field in envelope: bcc"},
		{"{\"to\":[\"a@b.c\"]}", "from is required"},
		{"{\"from\":1,\"to\":[\"a@b.c\"]}", "from must be a string"},
		{"{\"from\":null,\"to\":[\"a@b.c\"]}", "from must be a string"},
		{"{\"from\":\"\"}", "to is required"},
		{"{\"from\":\"\",\"to\":\"a@b.c\"}", "to must be an array of strings"},
		{"{\"from\":\"\",\"to\":{\"x\":\"a@b.c\"}}", "to must be an array of strings"},
		{"{\"from\":\"\",\"to\":[]}", "to is empty"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\",7]}", "to[1] must be a string"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\"],\"delay\":-1}", "delay must be a number of seconds from 0 to 315360000"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\"],\"delay\":\"5\"}", "delay must be a number of seconds from 0 to 315360000"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\"],\"key\":5}", "key must be a string of 1 to 256 octets"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\"],\"key\":\"\"}", "key must be a string of 1 to 256 octets"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\"],\"meta\":[1]}", "meta must be a JSON object"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\"],\"meta\":\"x\"}", "meta must be a JSON object"},
		{"{\"from\":\"\",\"to\":[\"a\\r@b.c\"]}", "invalid address in to[0]: contains CR"},
		{"{\"from\":\"\",\"to\":[\"ok@b.c\",\"a@b.c\\n\"]}", "invalid address in to[1]: contains LF"},
		{"{\"from\":\"\",\"to\":[\"a\\u0000x@b.c\"]}", "invalid address in to[0]: contains NUL"},
		{"{\"from\":\"\",\"to\":[\"a\\u0007@b.c\"]}", "invalid address in to[0]: contains a control character"},
		{"{\"from\":\"\",\"to\":[\"\\\"a\\r\\\"@b.c\"]}", "invalid address in to[0]: contains CR"},
		{"{\"from\":\"\",\"to\":[\"a b@b.c\"]}", "invalid address in to[0]: space outside quotes"},
		{"{\"from\":\"\",\"to\":[\"ab@b .c\"]}", "invalid address in to[0]: space outside quotes"},
		{"{\"from\":\"\",\"to\":[\"a@b.c> SIZE=1\"]}", "invalid address in to[0]: space outside quotes"},
		{"{\"from\":\"\",\"to\":[\"a@b.c>\"]}", "invalid address in to[0]: angle bracket outside quotes"},
		{"{\"from\":\"\",\"to\":[\"ab.c\"]}", "invalid address in to[0]: missing @"},
		{"{\"from\":\"\",\"to\":[\"\\\"ab\\\"\"]}", "invalid address in to[0]: missing @"},
		{"{\"from\":\"\",\"to\":[\"\\\"ab@b.c\"]}", "invalid address in to[0]: unterminated quoted local part"},
		{"{\"from\":\"\",\"to\":[\"@b.c\"]}", "invalid address in to[0]: empty local part"},
		{"{\"from\":\"\",\"to\":[\"\\\"ab\\\"x@b.c\"]}", "invalid address in to[0]: quoted local part not followed by @"},
		{"{\"from\":\"\",\"to\":[\"\\\"ab\\\"@b@c\"]}", "invalid address in to[0]: more than one @"},
		{"{\"from\":\"\",\"to\":[\"a@\"]}", "invalid address in to[0]: empty domain"},
		{"{\"from\":\"\",\"to\":[\"a@b.c\",\"a@b.c\"]}", "duplicate recipient in to[1]"},
		{"{\"from\":\"a b@c.d\",\"to\":[\"a@b.c\"]}", "invalid address in from: space outside quotes"},
		{"{\"from\":\"x\",\"to\":[\"a@b.c\"]}", "invalid address in from: missing @"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		REFUSED(q, enqueue_raw(q, cases[i].env, BODY, strlen(BODY)), cases[i].err);

	snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":[\"%s@b.c\"]}", local65);
	REFUSED(q, enqueue_raw(q, env, BODY, strlen(BODY)), "invalid address in to[0]: local part over 64 octets");
	snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":[\"a@%s\"]}", dom256);
	REFUSED(q, enqueue_raw(q, env, BODY, strlen(BODY)), "invalid address in to[0]: domain over 255 octets");
	snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":[\"%s\"]}", total255);
	REFUSED(q, enqueue_raw(q, env, BODY, strlen(BODY)), "invalid address in to[0]: address over 254 octets");
	/* 254 octets in all is fine */
	total255[strlen(total255) - 1] = '\0';
	snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":[\"%s\"]}", total255);
	char id[40];
	enq(q, env, BODY, id);

	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"a@b.c\"]}", "", 0), "message is empty");

	/* key over 256 octets, meta over 65536 once encoded */
	char *bigenv = malloc(70000);
	char k257[258];
	memset(k257, 'k', 257);
	k257[257] = '\0';
	snprintf(bigenv, 70000, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"key\":\"%s\"}", k257);
	REFUSED(q, enqueue_raw(q, bigenv, BODY, strlen(BODY)), "key must be a string of 1 to 256 octets");
	int n = snprintf(bigenv, 70000, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"meta\":{\"m\":\"");
	memset(bigenv + n, 'm', 65540);
	snprintf(bigenv + n + 65540, 70000 - (size_t)n - 65540, "\"}}");
	REFUSED(q, enqueue_raw(q, bigenv, BODY, strlen(BODY)), "meta is over 65536 octets");
	free(bigenv);

	/* Lowered limits. */
	config_set(q, "max_recipients", "2");
	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"a@b.c\",\"b@b.c\",\"c@b.c\"]}", BODY, strlen(BODY)),
		"too many recipients: 3, max_recipients is 2");
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\",\"b@b.c\"]}", BODY, id);
	config_set(q, "max_message_size", "100");
	char big[101];
	memset(big, 'x', sizeof(big));
	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"a@b.c\"]}", big, 101),
		"message is 101 octets, over max_message_size 100");
	redisReply *r = enqueue_raw(q, "{\"from\":\"\",\"to\":[\"a@b.c\"]}", big, 100);
	assert_int_equal(r->type, REDIS_REPLY_STRING);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "enqueued"), 3);
	assert_int_equal(stat_of(q, "ready"), 3);
}

/* ---- addresses: the Lua rules agree with rq_addr_valid ---- */

/* Appends s (len octets) as a JSON string to out (size >= 6 * len + 3). */
static void json_str(char *out, const char *s, size_t len)
{
	size_t o = 0;
	out[o++] = '"';
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			out[o++] = '\\';
			out[o++] = (char)c;
		} else if (c < 0x20) {
			o += (size_t)sprintf(out + o, "\\u%04x", c);
		} else {
			out[o++] = (char)c;
		}
	}
	out[o++] = '"';
	out[o] = '\0';
}

/* The address printable for a failure message. */
static const char *shown(const char *s, size_t len)
{
	static char buf[2048];
	size_t o = 0;
	for (size_t i = 0; i < len && o + 5 < sizeof(buf); i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x20 || c >= 0x7f)
			o += (size_t)snprintf(buf + o, sizeof(buf) - o, "\\x%02x", c);
		else
			buf[o++] = (char)c;
	}
	buf[o] = '\0';
	return buf;
}

/*
 * Enqueues addr as to[0] and as from; returns whether Lua accepted it in
 * that role. A refusal must name the address (not another field); why,
 * when given, is the exact reason expected for to[0].
 */
static bool lua_accepts(struct q *q, const char *addr, size_t len, bool as_from, const char *why)
{
	char jaddr[2100], env[2300];
	assert_true(len < 300);
	json_str(jaddr, addr, len);
	if (as_from)
		snprintf(env, sizeof(env), "{\"from\":%s,\"to\":[\"r@example.com\"]}", jaddr);
	else
		snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":[%s]}", jaddr);
	redisReply *r = enqueue_raw(q, env, BODY, strlen(BODY));
	bool ok = r->type == REDIS_REPLY_STRING;
	if (!ok) {
		const char *want = as_from ? "ERR relayq: invalid address in from: "
					   : "ERR relayq: invalid address in to[0]: ";
		if (r->type != REDIS_REPLY_ERROR || strncmp(r->str, want, strlen(want)) != 0)
			fail_msg("enqueue of %s: unexpected reply %s", shown(addr, len),
				 r->type == REDIS_REPLY_ERROR ? r->str : "(not an error)");
		if (why && !as_from && strcmp(r->str + strlen(want), why) != 0)
			fail_msg("enqueue of %s: \"%s\", want reason \"%s\"", shown(addr, len), r->str, why);
	}
	freeReplyObject(r);
	return ok;
}

/* Both sides on one address, as a recipient and as a sender. */
static void addr_agree(struct q *q, const char *addr, size_t len, int expect, const char *why)
{
	char err[256];
	for (int as_from = 0; as_from <= 1; as_from++) {
		bool c_ok = rq_addr_valid(addr, len, as_from, err, sizeof(err));
		bool lua_ok = lua_accepts(q, addr, len, as_from, why);
		if (c_ok != lua_ok)
			fail_msg("%s as %s: rq_addr_valid %s (%s), Lua %s", shown(addr, len),
				 as_from ? "from" : "to", c_ok ? "accepts" : "rejects", err,
				 lua_ok ? "accepts" : "rejects");
		/* expect: 1 valid, 0 invalid, -1 only agreement is checked */
		bool want = expect == 1 || (as_from && len == 0);
		if (expect >= 0 && lua_ok != want)
			fail_msg("%s as %s: both %s it", shown(addr, len), as_from ? "from" : "to",
				 lua_ok ? "accept" : "reject");
	}
}

struct addr_case {
	const char *addr;
	int valid;
	const char *why; /* Lua's reason for to[0], when invalid */
};

static void addr_rules_match_c(void **state)
{
	struct q *q = *state;
	static const struct addr_case cases[] = {
		/* the review's ten */
		{"a..b@x", 0, "two dots in a row in the local part"},
		{"a@b@example.com", 0, "more than one @"},
		{"a@example..com", 0, "empty label in the domain"},
		{"a(b)@x", 0, "character '(' not allowed in an unquoted local part"},
		{".a@x", 0, "local part starts with a dot"},
		{"a@example.com.", 0, "domain ends with a dot"},
		{"a,b@x", 0, "character ',' not allowed in an unquoted local part"},
		{"a@exa$mple.com", 0, "character '$' not allowed in the domain"},
		{"a@[1.2.3.4", 0, "malformed address literal"},
		{"a:b@x", 0, "character ':' not allowed in an unquoted local part"},
		/* more invalid ones */
		{"a.@x", 0, "local part ends with a dot"},
		{"a@.example.com", 0, "empty label in the domain"},
		{"a@[]", 0, "malformed address literal"},
		{"a@[1.2\\3]", 0, "character not allowed in an address literal"},
		{"a@[1.2 3]", 0, "character not allowed in an address literal"},
		{"a@[1.2.3.4]x", 0, "malformed address literal"},
		{"a@x[1]", 0, "character '[' not allowed in the domain"},
		{"a\"b@x", 0, "character '\"' not allowed in an unquoted local part"},
		{"\"a\"b\"@x", 0, "quoted local part not followed by @"},
		{"\"ab\\\"@x", 0, "unterminated quoted local part"},
		{"\"a\"@b@x", 0, "more than one @"},
		{"a@b c", 0, "space outside quotes"},
		{"a b@c", 0, "space outside quotes"},
		{"<a@b.c>", 0, "angle bracket outside quotes"},
		{"a@b.c>", 0, "angle bracket outside quotes"},
		{"ab.c", 0, "missing @"},
		{"@b.c", 0, "empty local part"},
		{"a@", 0, "empty domain"},
		{"a@b\r", 0, "contains CR"},
		{"a\n@b", 0, "contains LF"},
		{"a\t@b", 0, "contains a control character"},
		{"a\x7f@b", 0, "contains a control character"},
		{"", 0, "missing @"}, /* valid only as the null sender */
		/* valid ones */
		{"user@example.com", 1, NULL},
		{"first.last@sub.example.com", 1, NULL},
		{"user+tag@example.com", 1, NULL},
		{"UPPER@EXAMPLE.COM", 1, NULL},
		{"!#$%&'*+-/=?^_`{|}~@example.com", 1, NULL},
		{"a@b", 1, NULL},
		{"a@ex_ample.com", 1, NULL},
		{"a@-x.com", 1, NULL},
		{"\"john doe\"@example.com", 1, NULL},
		{"\"john doe@x\"@example.com", 1, NULL},
		{"\"a\\\"b\"@example.com", 1, NULL},
		{"\"a(b),c:d\"@example.com", 1, NULL},
		{"\"\"@example.com", 1, NULL},
		{"user@[192.0.2.1]", 1, NULL},
		{"user@[IPv6:2001:db8::1]", 1, NULL},
		{"user@[IPv6:::1]", 1, NULL},
		{"\xc3\xbcser@ex\xc3\xa4mple.de", 1, NULL},
		{"user@xn--bcher-kva.example", 1, NULL},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		addr_agree(q, cases[i].addr, strlen(cases[i].addr), cases[i].valid, cases[i].why);
	addr_agree(q, "a\0b@x", 5, 0, "contains NUL");

	/* lengths at and over each limit */
	char l64[65], l65[66], lab63[64], lab64[65], buf[600];
	memset(l64, 'l', 64);
	l64[64] = '\0';
	memset(l65, 'l', 65);
	l65[65] = '\0';
	memset(lab63, 'd', 63);
	lab63[63] = '\0';
	memset(lab64, 'd', 64);
	lab64[64] = '\0';
	/* 64 + 1 + 63 + 1 + 63 + 1 + 61 = 254 octets */
	snprintf(buf, sizeof(buf), "%s@%s.%s.%.61s", l64, lab63, lab63, lab63);
	assert_int_equal(strlen(buf), 254);
	addr_agree(q, buf, strlen(buf), 1, NULL);
	snprintf(buf, sizeof(buf), "%s@%s.%s.%.62s", l64, lab63, lab63, lab63);
	addr_agree(q, buf, strlen(buf), 0, "address over 254 octets");
	snprintf(buf, sizeof(buf), "%s@example.com", l65);
	addr_agree(q, buf, strlen(buf), 0, "local part over 64 octets");
	snprintf(buf, sizeof(buf), "a@%s.com", lab63);
	addr_agree(q, buf, strlen(buf), 1, NULL);
	snprintf(buf, sizeof(buf), "a@%s.com", lab64);
	addr_agree(q, buf, strlen(buf), 0, "domain label over 63 octets");
	snprintf(buf, sizeof(buf), "\"%.62s\"@x", l64);
	addr_agree(q, buf, strlen(buf), 1, NULL);
	snprintf(buf, sizeof(buf), "\"%.63s\"@x", l64);
	addr_agree(q, buf, strlen(buf), 0, "local part over 64 octets");

	/* every byte in every position that has its own rule */
	static const char *const shapes[] = {
		"a%cb@example.com", "%c@example.com", "a%c@example.com",
		"\"a%cb\"@example.com", "ab@ex%cample.com", "ab@%cexample.com",
		"ab@example.com%c", "a@[1%c2]", "a%c.b@example.com",
	};
	for (size_t k = 0; k < sizeof(shapes) / sizeof(shapes[0]); k++) {
		for (int c = 0; c < 256; c++) {
			const char *pos = strstr(shapes[k], "%c");
			size_t pre = (size_t)(pos - shapes[k]);
			size_t n = 0;
			memcpy(buf, shapes[k], pre);
			n = pre;
			buf[n++] = (char)c;
			strcpy(buf + n, pos + 2);
			n += strlen(pos + 2);
			addr_agree(q, buf, n, -1, NULL);
		}
	}
}

/* ---- queue names: the Lua rule agrees with rq_keys_queue_valid ---- */

/* FCALL fn 1 relayq:{name} args... with name of len bytes. */
static redisReply *fcall_name(struct q *q, const char *fn, const char *name, size_t len,
			      int argc, const char *const *argv)
{
	const char *a[16];
	size_t l[16];
	assert_true(argc + 4 <= 16);
	char *key = malloc(len + 10);
	assert_non_null(key);
	memcpy(key, "relayq:{", 8);
	memcpy(key + 8, name, len);
	key[8 + len] = '}';
	a[0] = "FCALL";
	a[1] = fn;
	a[2] = "1";
	a[3] = key;
	l[0] = 5;
	l[1] = strlen(fn);
	l[2] = 1;
	l[3] = len + 9;
	for (int i = 0; i < argc; i++) {
		a[4 + i] = argv[i];
		l[4 + i] = strlen(argv[i]);
	}
	redisReply *r = redisCommandArgv(q->c, argc + 4, a, l);
	free(key);
	if (!r)
		fail_msg("FCALL %s: %s", fn, q->c->errstr);
	return r;
}

/* Number of keys that start with relayq:{name} (len bytes). */
static size_t keys_of(struct q *q, const char *name, size_t len)
{
	size_t n = 0;
	char cursor[32] = "0";
	do {
		redisReply *r = cmd(q, "SCAN %s MATCH relayq:* COUNT 1000", cursor);
		assert_int_equal(r->type, REDIS_REPLY_ARRAY);
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		for (size_t i = 0; i < r->element[1]->elements; i++) {
			const redisReply *k = r->element[1]->element[i];
			if (k->len >= len + 9 && memcmp(k->str, "relayq:{", 8) == 0 &&
			    memcmp(k->str + 8, name, len) == 0 && k->str[8 + len] == '}')
				n++;
		}
		freeReplyObject(r);
	} while (strcmp(cursor, "0") != 0);
	return n;
}

/* Both rules on one name: Lua (relayq_stats, which reads only) and C. */
static void name_agree(struct q *q, const char *name, size_t len, int expect)
{
	bool c_ok = rq_keys_queue_valid(name, len);
	redisReply *r = fcall_name(q, "relayq_stats", name, len, 0, NULL);
	bool lua_ok = r->type == REDIS_REPLY_ARRAY;
	if (!lua_ok) {
		char want[300];
		char shown_name[100];
		/* Lua's clean(): control bytes as ?, cut at 80 bytes + "..." */
		size_t n = len > 80 ? 80 : len;
		for (size_t i = 0; i < n; i++) {
			unsigned char c = (unsigned char)name[i];
			shown_name[i] = c < 0x20 || c == 0x7f ? '?' : (char)c;
		}
		shown_name[n] = '\0';
		snprintf(want, sizeof(want), "ERR relayq: invalid queue name '%s%s': expected %s",
			 shown_name, len > 80 ? "..." : "", RQ_KEYS_QUEUE_RULE);
		if (r->type != REDIS_REPLY_ERROR || r->len != strlen(want) ||
		    memcmp(r->str, want, r->len) != 0)
			fail_msg("queue name %s: unexpected reply %s, want %s", shown(name, len > 200 ? 200 : len),
				 r->type == REDIS_REPLY_ERROR ? r->str : "(not an error)", want);
	}
	freeReplyObject(r);
	if (c_ok != lua_ok)
		fail_msg("queue name %s: rq_keys_queue_valid %s, Lua %s", shown(name, len > 200 ? 200 : len),
			 c_ok ? "accepts" : "rejects", lua_ok ? "accepts" : "rejects");
	if (expect >= 0 && lua_ok != (expect == 1))
		fail_msg("queue name %s: both %s it", shown(name, len > 200 ? 200 : len),
			 lua_ok ? "accept" : "reject");
}

static void queue_names_match_c(void **state)
{
	struct q *q = *state;
	static const struct {
		const char *name;
		int valid;
	} cases[] = {
		/* the issue's names */
		{"with space", 0}, {"*", 0}, {"\n", 0}, {"\x1b", 0}, {"a\x1b[31mred", 0},
		/* more invalid ones */
		{"", 0}, {"a/b", 0}, {"a{b", 0}, {"a}b", 0}, {"{a}", 0}, {"a b", 0},
		{"\xc3\xa4", 0}, {"a\tb", 0}, {"a\r", 0}, {"q?", 0}, {"q[1]", 0},
		/* valid ones */
		{"default", 1}, {"a", 1}, {"q:1", 1}, {"my-queue_2.x", 1}, {"A.Z-0_9:", 1},
		{"-", 1}, {".", 1}, {":", 1}, {"_", 1},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		name_agree(q, cases[i].name, strlen(cases[i].name), cases[i].valid);
	name_agree(q, "a\0b", 3, 0);
	/* lengths at and over the limit, and the issue's 5,000 */
	static char big[5001];
	memset(big, 'q', sizeof(big) - 1);
	name_agree(q, big, RQ_KEYS_QUEUE_MAX, 1);
	name_agree(q, big, RQ_KEYS_QUEUE_MAX + 1, 0);
	name_agree(q, big, 5000, 0);
	/* every byte, alone, between others and last */
	char buf[8];
	for (int c = 0; c < 256; c++) {
		buf[0] = (char)c;
		name_agree(q, buf, 1, -1);
		buf[0] = 'a';
		buf[1] = (char)c;
		buf[2] = 'b';
		name_agree(q, buf, 3, -1);
		name_agree(q, buf, 2, -1);
	}
}

/* Every function of the library refuses a name nothing can serve, before
 * it writes anything. */
static void every_function_checks_the_name(void **state)
{
	struct q *q = *state;
	static const struct {
		const char *fn;
		int argc;
		const char *argv[3];
	} calls[] = {
		{"relayq_enqueue", 2, {"{\"from\":\"\",\"to\":[\"a@b.c\"]}", BODY}},
		{"relayq_claim", 2, {"10", "1000"}},
		{"relayq_settle", 1, {"[]"}},
		{"relayq_renew", 3, {"1000", "x", "1"}},
		{"relayq_recover", 0, {NULL}},
		{"relayq_hold", 1, {"x"}},
		{"relayq_release", 1, {"x"}},
		{"relayq_requeue", 1, {"--dead"}},
		{"relayq_delete", 1, {"x"}},
		{"relayq_flush", 0, {NULL}},
		{"relayq_stats", 0, {NULL}},
		{"relayq_show", 1, {"x"}},
		{"relayq_list", 3, {"all", "0", "10"}},
		{"relayq_config", 2, {"max_recipients", "5"}},
	};
	static const char *const bad[] = {"with space", "*", "\n", "\x1b", "a}b"};
	char want[200];
	for (size_t b = 0; b < sizeof(bad) / sizeof(bad[0]); b++) {
		for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
			redisReply *r = fcall_name(q, calls[i].fn, bad[b], strlen(bad[b]),
						   calls[i].argc, calls[i].argv);
			if (r->type != REDIS_REPLY_ERROR ||
			    strncmp(r->str, "ERR relayq: invalid queue name '", 32) != 0)
				fail_msg("%s on %s: %s", calls[i].fn, shown(bad[b], strlen(bad[b])),
					 r->type == REDIS_REPLY_ERROR ? r->str : "accepted");
			freeReplyObject(r);
		}
		assert_int_equal(keys_of(q, bad[b], strlen(bad[b])), 0);
	}
	static char big[5001];
	memset(big, 'x', sizeof(big) - 1);
	for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
		redisReply *r = fcall_name(q, calls[i].fn, big, 5000, calls[i].argc, calls[i].argv);
		snprintf(want, sizeof(want), "ERR relayq: invalid queue name '%.80s...': expected %s",
			 big, RQ_KEYS_QUEUE_RULE);
		assert_int_equal(r->type, REDIS_REPLY_ERROR);
		assert_string_equal(r->str, want);
		freeReplyObject(r);
	}
	assert_int_equal(keys_of(q, big, 5000), 0);
	/* the longest valid name works end to end */
	redisReply *r = fcall_name(q, "relayq_enqueue", big, RQ_KEYS_QUEUE_MAX, 2, calls[0].argv);
	assert_int_equal(r->type, REDIS_REPLY_STRING);
	freeReplyObject(r);
	r = fcall_name(q, "relayq_delete", big, RQ_KEYS_QUEUE_MAX, 1, (const char *[]){"x"});
	assert_int_equal(r->type, REDIS_REPLY_INTEGER);
	freeReplyObject(r);
	char pat[100];
	snprintf(pat, sizeof(pat), "relayq:{%.*s}*", RQ_KEYS_QUEUE_MAX, big);
	redisReply *ks = cmd(q, "KEYS %s", pat);
	for (size_t i = 0; i < ks->elements; i++)
		freeReplyObject(cmd(q, "DEL %b", ks->element[i]->str, ks->element[i]->len));
	freeReplyObject(ks);
}

/* Recipients that differ only in the case of the domain are one recipient;
 * the local part stays case-sensitive. */
static void duplicate_recipient_domain_case(void **state)
{
	struct q *q = *state;
	char id[40];
	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"a@x.com\",\"a@X.COM\"]}", BODY, strlen(BODY)),
		"duplicate recipient in to[1]");
	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"b@x.com\",\"a@Example.Org\",\"a@example.ORG\"]}",
			       BODY, strlen(BODY)),
		"duplicate recipient in to[2]");
	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"\\\"a b\\\"@x.com\",\"\\\"a b\\\"@X.com\"]}",
			       BODY, strlen(BODY)),
		"duplicate recipient in to[1]");
	/* the local part and non-ASCII octets are compared as they are */
	enq(q, "{\"from\":\"\",\"to\":[\"a@x.com\",\"A@x.com\",\"a@\xc3\xa4.com\",\"a@\xc3\x84.com\"]}", BODY, id);
	redisReply *r = claim(q, 1, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_int_equal(M_RCPTS(CL_MSG(r, 0))->elements, 4);
	assert_string_equal(M_RCPTS(CL_MSG(r, 0))->element[1]->str, "A@x.com");
	freeReplyObject(r);
}

/* A meta that JSON cannot hold again (1e400 decodes to infinity). */
static void meta_not_encodable(void **state)
{
	struct q *q = *state;
	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"meta\":{\"n\":1e400}}", BODY, strlen(BODY)),
		"meta cannot be encoded: Cannot serialise number: must not be NaN or Inf");
	REFUSED(q, enqueue_raw(q, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"meta\":{\"x\":{\"n\":-1e999}}}", BODY,
			       strlen(BODY)),
		"meta cannot be encoded: Cannot serialise number: must not be NaN or Inf");
	assert_int_equal(stat_of(q, "enqueued"), 0);
}

static void enqueue_accepts(void **state)
{
	struct q *q = *state;
	char a[40], b[40], c[40];
	/* null sender, quoted local part with a space and an @ */
	enq(q, "{\"from\":\"\",\"to\":[\"\\\"john doe@x\\\"@example.com\"]}", BODY, a);
	/* bare LF, bare CR and a NUL in the message */
	static const char body[] = "Subject: x\n\nline\rmore\nnul:\0:end\n";
	redisReply *r = enqueue_raw(q, "{\"from\":\"s@example.org\",\"to\":[\"r@example.net\"]}", body,
				    sizeof(body) - 1);
	assert_int_equal(r->type, REDIS_REPLY_STRING);
	snprintf(b, sizeof(b), "%s", r->str);
	freeReplyObject(r);
	enq(q, "{\"from\":\"s@example.org\",\"to\":[\"r@example.net\"],\"delay\":0}", BODY, c);
	assert_true(strcmp(a, b) < 0 && strcmp(b, c) < 0);

	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 3);
	assert_int_equal(CL_DUE(r), -1);
	redisReply *m = CL_MSG(r, 0);
	assert_string_equal(M_ID(m), a);
	assert_string_equal(M_FROM(m), "");
	assert_int_equal(M_RCPTS(m)->elements, 1);
	assert_string_equal(M_RCPTS(m)->element[0]->str, "\"john doe@x\"@example.com");
	assert_string_equal(M_META(m), "{}");
	assert_int_equal(M_ATT(m), 0);
	assert_true(M_LEASE(m) >= 1);
	assert_true(M_CREATED(m) <= CL_NOW(r));
	m = CL_MSG(r, 1);
	assert_string_equal(M_ID(m), b);
	assert_int_equal(M_BODY(m)->len, sizeof(body) - 1);
	assert_memory_equal(M_BODY(m)->str, body, sizeof(body) - 1);
	assert_string_equal(M_ID(CL_MSG(r, 2)), c);
	freeReplyObject(r);
}

static void idempotency_key(void **state)
{
	struct q *q = *state;
	char a[40], b[40], c[40];
	const char *env = "{\"from\":\"\",\"to\":[\"a@b.c\"],\"key\":\"order-17\"}";
	enq(q, env, BODY, a);
	size_t bl, al;
	char *before = snapshot(q, &bl);
	enq(q, env, BODY, b);
	char *after = snapshot(q, &al);
	same_snapshot(before, bl, after, al, "a repeated idempotency key");
	assert_string_equal(a, b);
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"key\":\"order-18\"}", BODY, c);
	assert_string_not_equal(a, c);
	assert_int_equal(stat_of(q, "ready"), 2);
	assert_int_equal(stat_of(q, "enqueued"), 2);
	redisReply *r = cmd(q, "TTL %s:idem:order-17", q->key);
	assert_true(r->integer > 86000 && r->integer <= 86400);
	freeReplyObject(r);
}

static void delay_schedules(void **state)
{
	struct q *q = *state;
	char id[40];
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"delay\":1}", BODY, id);
	assert_int_equal(stat_of(q, "scheduled"), 1);
	assert_int_equal(stat_of(q, "ready"), 0);
	char *s = show(q, id);
	has(s, "\"state\":\"scheduled\"");
	long long due = json_int(s, "next");
	assert_int_equal(due, json_int(s, "created") + 1000);
	free(s);

	redisReply *r = claim(q, 10, 30000);
	if (CL_N(r) == 0) {
		assert_int_equal(CL_DUE(r), due);
		assert_true(CL_NOW(r) < due);
		freeReplyObject(r);
		long long deadline = now_ms() + 5000;
		for (;;) {
			r = claim(q, 10, 30000);
			if (CL_N(r) > 0 || now_ms() > deadline)
				break;
			freeReplyObject(r);
			sleep_ms(20);
		}
	}
	assert_int_equal(CL_N(r), 1);
	assert_string_equal(M_ID(CL_MSG(r, 0)), id);
	assert_true(CL_NOW(r) >= due);
	assert_int_equal(CL_DUE(r), -1);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "scheduled"), 0);
	assert_int_equal(stat_of(q, "inflight"), 1);
}

static void meta_round_trip(void **state)
{
	struct q *q = *state;
	char id[40];
	enq(q, "{\"from\":\"s@x.y\",\"to\":[\"a@b.c\"],\"meta\":{\"tenant\":\"t1\"}}", BODY, id);
	redisReply *r = claim(q, 1, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_string_equal(M_META(CL_MSG(r, 0)), "{\"tenant\":\"t1\"}");
	long long lease = M_LEASE(CL_MSG(r, 0));
	freeReplyObject(r);
	assert_string_equal(settle1(q, id, lease,
		"\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\",\"code\":250,\"enh\":\"2.0.0\",\"text\":\"ok\",\"stage\":\"dot\"}]"),
		"done");
	r = events(q);
	assert_int_equal(r->elements, 1);
	assert_string_equal(ev_field(r->element[0], "type"), "delivered");
	assert_string_equal(ev_field(r->element[0], "id"), id);
	assert_string_equal(ev_field(r->element[0], "rcpt"), "a@b.c");
	assert_string_equal(ev_field(r->element[0], "code"), "250");
	assert_string_equal(ev_field(r->element[0], "enh"), "2.0.0");
	assert_string_equal(ev_field(r->element[0], "text"), "ok");
	assert_string_equal(ev_field(r->element[0], "stage"), "dot");
	assert_string_equal(ev_field(r->element[0], "attempt"), "1");
	assert_string_equal(ev_field(r->element[0], "meta"), "{\"tenant\":\"t1\"}");
	freeReplyObject(r);
}

/* meta: at most RQ_JSON_META_MAX_DEPTH levels (the C constant and Lua's
 * MAX_META_DEPTH are one limit: the last level accepted, the next refused),
 * and the issue's 900. */
static void meta_depth_limit(void **state)
{
	struct q *q = *state;
	static const int depths[] = {1, RQ_JSON_META_MAX_DEPTH, RQ_JSON_META_MAX_DEPTH + 1, 900};
	char want[100];
	snprintf(want, sizeof(want), "meta is nested deeper than %d levels", RQ_JSON_META_MAX_DEPTH);
	for (size_t k = 0; k < sizeof(depths) / sizeof(depths[0]); k++) {
		int d = depths[k];
		size_t n = (size_t)d * 12 + 100;
		char *env = malloc(n);
		size_t o = (size_t)sprintf(env, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"meta\":");
		/* mixed objects and arrays: both count */
		for (int i = 0; i < d; i++)
			o += (size_t)sprintf(env + o, i % 3 == 2 ? "[" : "{\"k\":");
		env[o++] = '1';
		for (int i = d - 1; i >= 0; i--)
			env[o++] = i % 3 == 2 ? ']' : '}';
		/* the outermost level is an object (i = 0) */
		strcpy(env + o, "}");
		if (d <= RQ_JSON_META_MAX_DEPTH) {
			char id[40];
			enq(q, env, BODY, id);
			char *s = show(q, id);
			/* what was accepted, a C reader reads back */
			struct rq_json *v = rq_json_parse(s, strlen(s), RQ_JSON_LAX_UTF8, NULL, 0);
			assert_non_null(v);
			assert_int_equal(rq_json_depth(rq_json_get(v, "meta")), (size_t)d);
			rq_json_free(v);
			free(s);
		} else {
			REFUSED(q, enqueue_raw(q, env, BODY, strlen(BODY)), want);
		}
		free(env);
	}
}

static void claim_settle_delivered(void **state)
{
	struct q *q = *state;
	char ids[3][40];
	for (int i = 0; i < 3; i++)
		enq1(q, "r@example.net", ids[i]);
	redisReply *r = claim(q, 2, 30000);
	assert_int_equal(CL_N(r), 2);
	assert_string_equal(M_ID(CL_MSG(r, 0)), ids[0]);
	assert_string_equal(M_ID(CL_MSG(r, 1)), ids[1]);
	assert_string_equal(M_FROM(CL_MSG(r, 0)), "s@example.org");
	assert_int_equal(M_BODY(CL_MSG(r, 0))->len, strlen(BODY));
	assert_int_equal(stat_of(q, "inflight"), 2);
	assert_int_equal(stat_of(q, "ready"), 1);
	char json[1024];
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"r@example.net\",\"s\":\"delivered\",\"code\":250}]},"
		 "{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"r@example.net\",\"s\":\"dropped\"}]}]",
		 ids[0], M_LEASE(CL_MSG(r, 0)), ids[1], M_LEASE(CL_MSG(r, 1)));
	freeReplyObject(r);
	r = settle(q, json);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	assert_int_equal(r->elements, 2);
	assert_string_equal(r->element[0]->str, "done");
	assert_string_equal(r->element[1]->str, "done");
	freeReplyObject(r);
	char suffix[80];
	snprintf(suffix, sizeof(suffix), ":msg:%s", ids[0]);
	assert_false(key_exists(q, suffix));
	snprintf(suffix, sizeof(suffix), ":rcpt:%s", ids[1]);
	assert_false(key_exists(q, suffix));
	assert_int_equal(stat_of(q, "inflight"), 0);
	assert_int_equal(stat_of(q, "delivered"), 1);
	assert_int_equal(stat_of(q, "dropped"), 1);
	r = events(q);
	assert_int_equal(r->elements, 2);
	assert_string_equal(ev_field(r->element[1], "type"), "dropped");
	freeReplyObject(r);
	/* the third is still there */
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_string_equal(M_ID(CL_MSG(r, 0)), ids[2]);
	freeReplyObject(r);
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 0);
	freeReplyObject(r);
}

static void partial_delivery(void **state)
{
	struct q *q = *state;
	char id[40];
	enq(q, "{\"from\":\"s@x.y\",\"to\":[\"a@b.c\",\"b@b.c\",\"c@b.c\"]}", BODY, id);
	redisReply *r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_int_equal(M_RCPTS(CL_MSG(r, 0))->elements, 3);
	long long lease = M_LEASE(CL_MSG(r, 0));
	freeReplyObject(r);
	/* a delivered, b deferred, c not tried: next 0 = due at once */
	assert_string_equal(settle1(q, id, lease,
		"\"next\":0,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\",\"code\":250},"
		"{\"to\":\"b@b.c\",\"s\":\"deferred\",\"code\":451,\"enh\":\"4.3.0\",\"text\":\"later\",\"stage\":\"rcpt\"}]"),
		"scheduled");
	assert_int_equal(stat_of(q, "scheduled"), 1);
	char *s = show(q, id);
	has(s, "\"state\":\"scheduled\"");
	has(s, "\"pending\":[\"b@b.c\",\"c@b.c\"]");
	has(s, "\"attempts\":1");
	has(s, "\"last_code\":451");
	has(s, "\"last_text\":\"later\"");
	free(s);

	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	redisReply *m = CL_MSG(r, 0);
	assert_string_equal(M_ID(m), id);
	assert_int_equal(M_ATT(m), 1);
	assert_int_equal(M_RCPTS(m)->elements, 2);
	assert_string_equal(M_RCPTS(m)->element[0]->str, "b@b.c");
	assert_string_equal(M_RCPTS(m)->element[1]->str, "c@b.c");
	assert_true(M_LEASE(m) > lease);
	lease = M_LEASE(m);
	freeReplyObject(r);
	/* a recipient already delivered is not pending any more */
	char json[1024];
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"next\":0,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]}]",
		 id, lease);
	settle_invalid_alone(q, json);

	assert_string_equal(settle1(q, id, lease,
		"\"rcpts\":[{\"to\":\"b@b.c\",\"s\":\"failed\",\"code\":550,\"enh\":\"5.1.1\",\"text\":\"no such user\",\"stage\":\"rcpt\",\"hint\":\"bad-mailbox\"},"
		"{\"to\":\"c@b.c\",\"s\":\"delivered\",\"code\":250}]"),
		"done");
	/* one failed: the message is dead and keeps its replies */
	assert_int_equal(stat_of(q, "dead"), 1);
	assert_int_equal(stat_of(q, "scheduled"), 0);
	assert_int_equal(stat_of(q, "inflight"), 0);
	assert_int_equal(stat_of(q, "delivered"), 2);
	assert_int_equal(stat_of(q, "deferred"), 1);
	assert_int_equal(stat_of(q, "failed"), 1);
	s = show(q, id);
	has(s, "\"state\":\"dead\"");
	has(s, "\"attempts\":2");
	has(s, "\"pending\":[]");
	has(s, "\"last_code\":550");
	has(s, "\"last_enhanced\":\"5.1.1\"");
	has(s, "\"last_text\":\"no such user\"");
	has(s, "\"last_stage\":\"rcpt\"");
	has(s, "\"size\":21");
	has(s, "\"meta\":{}");
	has(s, "\"hint\":\"bad-mailbox\"");
	has(s, "\"to\":\"a@b.c\"");
	const char *rc = strstr(s, "\"rcpts\":[");
	assert_non_null(rc);
	assert_int_equal(strstr(rc, "\"s\":\"delivered\"") != NULL, 1);
	assert_int_equal(strstr(rc, "\"s\":\"failed\"") != NULL, 1);
	assert_int_equal(strstr(rc, "\"code\":550") != NULL, 1);
	free(s);
	r = events(q);
	assert_int_equal(r->elements, 4);
	assert_string_equal(ev_field(r->element[1], "type"), "deferred");
	assert_string_equal(ev_field(r->element[1], "next"), "0");
	assert_string_equal(ev_field(r->element[1], "text"), "later");
	assert_string_equal(ev_field(r->element[2], "type"), "failed");
	assert_string_equal(ev_field(r->element[2], "attempt"), "2");
	assert_string_equal(ev_field(r->element[2], "rcpt"), "b@b.c");
	freeReplyObject(r);
	/* dead is not claimable */
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 0);
	freeReplyObject(r);
}

/* Claims exactly one message; copies its id, returns its lease. */
static long long claim_one(struct q *q, long long lease_ms, char *id)
{
	redisReply *r = claim(q, 1, lease_ms);
	if (CL_N(r) != 1)
		fail_msg("expected one message, claim gave %zu", CL_N(r));
	if (id)
		snprintf(id, 40, "%s", M_ID(CL_MSG(r, 0)));
	long long lease = M_LEASE(CL_MSG(r, 0));
	freeReplyObject(r);
	return lease;
}

static bool recovered_one(void *arg)
{
	struct q *q = arg;
	redisReply *r = FC(q, "relayq_recover", NULL);
	bool ok = r->type == REDIS_REPLY_INTEGER && r->integer == 1;
	freeReplyObject(r);
	return ok;
}

static void settle_after_lost_lease(void **state)
{
	struct q *q = *state;
	char id[40], got[40];
	enq1(q, "a@b.c", id);
	long long old = claim_one(q, 1, got);
	assert_string_equal(got, id);
	assert_true(th_wait_for(recovered_one, q, 5000));
	assert_int_equal(stat_of(q, "recovered"), 1);
	assert_int_equal(stat_of(q, "ready"), 1);
	char *s = show(q, id);
	has(s, "\"state\":\"ready\"");
	free(s);
	/* lost before anyone claimed it again: refused too */
	size_t bl, al;
	char *before = snapshot(q, &bl);
	assert_string_equal(settle1(q, id, old, "\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]"), "lost");
	char *after = snapshot(q, &al);
	same_snapshot(before, bl, after, al, "settle with a lost lease");
	/* another runner claims it */
	long long now_lease = claim_one(q, 30000, got);
	assert_string_equal(got, id);
	assert_true(now_lease != old);
	before = snapshot(q, &bl);
	assert_string_equal(settle1(q, id, old, "\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"failed\",\"code\":550}]"), "lost");
	after = snapshot(q, &al);
	same_snapshot(before, bl, after, al, "settle with a lost lease");
	assert_int_equal(stat_of(q, "failed"), 0);
	assert_string_equal(settle1(q, id, now_lease, "\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]"), "done");
	assert_int_equal(stat_of(q, "delivered"), 1);
	assert_int_equal(stat_of(q, "inflight"), 0);
}

static void renew_extends_lease(void **state)
{
	struct q *q = *state;
	char id[40], ls[24], bad[24];
	enq1(q, "a@b.c", id);
	long long lease = claim_one(q, 1, NULL);
	snprintf(ls, sizeof(ls), "%lld", lease);
	snprintf(bad, sizeof(bad), "%lld", lease + 5);
	redisReply *r = FC(q, "relayq_renew", "60000", id, bad, "nope", "1");
	expect_int(r, 0);
	freeReplyObject(r);
	r = FC(q, "relayq_renew", "60000", id, ls);
	expect_int(r, 1);
	freeReplyObject(r);
	r = FC(q, "relayq_recover", NULL);
	expect_int(r, 0);
	freeReplyObject(r);
	r = cmd(q, "ZSCORE %s:inflight %s", q->key, id);
	assert_int_equal(r->type, REDIS_REPLY_STRING);
	freeReplyObject(r);
	REFUSED(q, FC(q, "relayq_renew", "60000", id), "relayq_renew takes lease-ms then pairs of id and lease");
	REFUSED(q, FC(q, "relayq_renew", "0", id, ls), "lease-ms must be between 1 and 604800000");
	REFUSED(q, FC(q, "relayq_renew", "60000", id, "x"), "lease must be an integer");
	assert_string_equal(settle1(q, id, lease, "\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]"), "done");
}

static void hold_and_release(void **state)
{
	struct q *q = *state;
	char a[40], b[40], c[40];
	enq1(q, "a@b.c", a);
	enq1(q, "b@b.c", b);
	enq(q, "{\"from\":\"\",\"to\":[\"c@b.c\"],\"delay\":3600}", BODY, c);
	REFUSED(q, FC(q, "relayq_hold", a, "nope", c), "unknown id: nope");
	REFUSED(q, FC(q, "relayq_hold", NULL), "relayq_hold needs at least one id");
	redisReply *r = FC(q, "relayq_hold", a, c);
	expect_int(r, 2);
	freeReplyObject(r);
	/* only b is claimable */
	char got[40];
	long long lease = claim_one(q, 30000, got);
	assert_string_equal(got, b);
	r = FC(q, "relayq_hold", b, b);
	expect_int(r, 1);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "held"), 3);
	assert_int_equal(stat_of(q, "holds"), 3);
	assert_int_equal(stat_of(q, "inflight"), 0);
	assert_int_equal(stat_of(q, "scheduled"), 0);
	/* the runner's lease was cancelled by the hold */
	assert_string_equal(settle1(q, b, lease, "\"rcpts\":[{\"to\":\"b@b.c\",\"s\":\"delivered\"}]"), "lost");
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 0);
	freeReplyObject(r);
	/* holding a held message again changes nothing */
	r = FC(q, "relayq_hold", a);
	expect_int(r, 0);
	freeReplyObject(r);
	r = events(q);
	assert_int_equal(r->elements, 3);
	assert_string_equal(ev_field(r->element[0], "type"), "held");
	freeReplyObject(r);

	r = FC(q, "relayq_release", a, b, "nope");
	expect_int(r, 2);
	freeReplyObject(r);
	r = FC(q, "relayq_release", a);
	expect_int(r, 0);
	freeReplyObject(r);
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 2);
	assert_string_equal(M_ID(CL_MSG(r, 0)), a);
	assert_string_equal(M_ID(CL_MSG(r, 1)), b);
	assert_true(M_LEASE(CL_MSG(r, 1)) > lease);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "held"), 1);
}

static void settle_hold(void **state)
{
	struct q *q = *state;
	char id[40];
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\",\"b@b.c\"],\"meta\":{\"m\":1}}", BODY, id);
	long long lease = claim_one(q, 30000, NULL);
	/* hold needs no next */
	assert_string_equal(settle1(q, id, lease,
		"\"hold\":true,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"},{\"to\":\"b@b.c\",\"s\":\"deferred\",\"code\":452}]"),
		"held");
	assert_int_equal(stat_of(q, "held"), 1);
	assert_int_equal(stat_of(q, "holds"), 1);
	redisReply *r = events(q);
	assert_int_equal(r->elements, 3);
	assert_string_equal(ev_field(r->element[2], "type"), "held");
	assert_string_equal(ev_field(r->element[2], "id"), id);
	assert_string_equal(ev_field(r->element[2], "meta"), "{\"m\":1}");
	freeReplyObject(r);
	r = FC(q, "relayq_release", id);
	expect_int(r, 1);
	freeReplyObject(r);
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_int_equal(M_RCPTS(CL_MSG(r, 0))->elements, 1);
	assert_string_equal(M_RCPTS(CL_MSG(r, 0))->element[0]->str, "b@b.c");
	freeReplyObject(r);
}

static void make_dead(struct q *q, const char *rcpts_json, const char *outcome_rcpts, char *id)
{
	char env[300];
	snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":%s}", rcpts_json);
	enq(q, env, BODY, id);
	long long lease = claim_one(q, 30000, NULL);
	char rest[1000];
	snprintf(rest, sizeof(rest), "\"rcpts\":%s", outcome_rcpts);
	assert_string_equal(settle1(q, id, lease, rest), "done");
}

static void requeue_dead(void **state)
{
	struct q *q = *state;
	char a[40], b[40];
	make_dead(q, "[\"x@b.c\",\"y@b.c\"]",
		  "[{\"to\":\"x@b.c\",\"s\":\"delivered\"},{\"to\":\"y@b.c\",\"s\":\"failed\",\"code\":550}]", a);
	make_dead(q, "[\"z@b.c\"]", "[{\"to\":\"z@b.c\",\"s\":\"expired\",\"code\":451}]", b);
	assert_int_equal(stat_of(q, "dead"), 2);
	assert_int_equal(stat_of(q, "expired"), 1);
	redisReply *r = FC(q, "relayq_requeue", a, "nope");
	expect_int(r, 1);
	freeReplyObject(r);
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	redisReply *m = CL_MSG(r, 0);
	assert_string_equal(M_ID(m), a);
	assert_int_equal(M_ATT(m), 0);
	assert_int_equal(M_RCPTS(m)->elements, 1);
	assert_string_equal(M_RCPTS(m)->element[0]->str, "y@b.c");
	freeReplyObject(r);
	char *s = show(q, a);
	has(s, "\"failed\":0");
	has(s, "\"s\":\"pending\"");
	has(s, "\"code\":550");  /* the last reply is kept */
	free(s);
	r = FC(q, "relayq_requeue", "--dead");
	expect_int(r, 1);
	freeReplyObject(r);
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_string_equal(M_ID(CL_MSG(r, 0)), b);
	assert_string_equal(M_RCPTS(CL_MSG(r, 0))->element[0]->str, "z@b.c");
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "requeued"), 2);
	assert_int_equal(stat_of(q, "dead"), 0);
	REFUSED(q, FC(q, "relayq_requeue", "--dead", a), "relayq_requeue --dead takes no ids");
}

static void delete_any_state(void **state)
{
	struct q *q = *state;
	char a[40], b[40], c[40], d[40], e[40];
	make_dead(q, "[\"d@b.c\"]", "[{\"to\":\"d@b.c\",\"s\":\"failed\"}]", d); /* dead */
	enq1(q, "e@b.c", e);
	long long lease = claim_one(q, 30000, NULL);                           /* inflight */
	enq1(q, "a@b.c", a);                                                   /* ready */
	enq(q, "{\"from\":\"\",\"to\":[\"b@b.c\"],\"delay\":3600}", BODY, b);   /* scheduled */
	enq1(q, "c@b.c", c);
	redisReply *r = FC(q, "relayq_hold", c);                              /* held */
	freeReplyObject(r);
	r = FC(q, "relayq_delete", a, b, c, d, e, "nope", a);
	expect_int(r, 5);
	freeReplyObject(r);
	static const char *const st[] = {"ready", "scheduled", "inflight", "held", "dead"};
	for (size_t i = 0; i < 5; i++)
		assert_int_equal(stat_of(q, st[i]), 0);
	assert_int_equal(stat_of(q, "deleted"), 5);
	const char *ids[] = {a, b, c, d, e};
	for (int i = 0; i < 5; i++) {
		char suffix[80];
		snprintf(suffix, sizeof(suffix), ":msg:%s", ids[i]);
		assert_false(key_exists(q, suffix));
		snprintf(suffix, sizeof(suffix), ":rcpt:%s", ids[i]);
		assert_false(key_exists(q, suffix));
	}
	assert_string_equal(settle1(q, e, lease, "\"rcpts\":[{\"to\":\"e@b.c\",\"s\":\"delivered\"}]"), "lost");
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 0);
	freeReplyObject(r);
}

static void flush_scheduled(void **state)
{
	struct q *q = *state;
	char a[40], b[40], got[40];
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"delay\":3600}", BODY, a);
	enq(q, "{\"from\":\"\",\"to\":[\"b@b.c\"],\"delay\":3600}", BODY, b);
	redisReply *r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 0);
	assert_true(CL_DUE(r) > CL_NOW(r) + 3000000);
	freeReplyObject(r);
	r = FC(q, "relayq_flush", b, "nope");
	expect_int(r, 1);
	freeReplyObject(r);
	claim_one(q, 30000, got);
	assert_string_equal(got, b);
	r = FC(q, "relayq_flush", NULL);
	expect_int(r, 1);
	freeReplyObject(r);
	claim_one(q, 30000, got);
	assert_string_equal(got, a);
	assert_int_equal(stat_of(q, "scheduled"), 0);
}

static void settle_validation(void **state)
{
	struct q *q = *state;
	char id[40], json[1024];
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\",\"b@b.c\"]}", BODY, id);
	long long lease = claim_one(q, 30000, NULL);
	/* batch-level errors: nothing written for any message */
	REFUSED(q, settle(q, "[{"), "outcomes are not valid JSON");
	REFUSED(q, settle(q, "{\"id\":\"x\"}"), "outcomes must be a JSON array");
	REFUSED(q, FC(q, "relayq_settle", "[]", "[]"), "relayq_settle takes 1 argument: the outcomes JSON array");
	/* a malformed outcome is "invalid" on its own */
	settle_invalid_alone(q, "[1]");
	settle_invalid_alone(q, "[{\"lease\":1}]");
	settle_invalid_alone(q, "[{\"id\":\"x\",\"lease\":\"1\"}]");
	settle_invalid_alone(q, "[{\"id\":\"x\",\"lease\":1,\"nxt\":5}]");
	settle_invalid_alone(q, "[{\"id\":\"x\",\"lease\":1,\"hold\":1}]");
	settle_invalid_alone(q, "[{\"id\":\"x\",\"lease\":1,\"attempt\":\"yes\"}]");
	settle_invalid_alone(q, "[{\"id\":\"x\",\"lease\":1,\"rcpts\":{\"to\":1}}]");
	settle_invalid_alone(q, "[{\"id\":\"x\",\"lease\":1,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"sent\"}]}]");
	settle_invalid_alone(q, "[{\"id\":\"x\",\"lease\":1,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"failed\",\"code\":5500}]}]");
	/* errors that depend on the message (its lease is valid) */
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]}]", id, lease);
	settle_invalid_alone(q, json); /* next missing while b@b.c remains */
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"},{\"to\":\"a@b.c\",\"s\":\"failed\"},"
		 "{\"to\":\"b@b.c\",\"s\":\"delivered\"}]}]", id, lease);
	settle_invalid_alone(q, json); /* listed twice */
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"z@b.c\",\"s\":\"delivered\"}],\"next\":0}]", id, lease);
	settle_invalid_alone(q, json); /* not a recipient */
	/* an invalid outcome with a lease that is not held is still "invalid" */
	settle_invalid_alone(q, "[{\"id\":\"nope\",\"lease\":1,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"done\"}]}]");
	/* a valid outcome with a lease that is not held is "lost" */
	SETTLE_EXPECT(q, "[{\"id\":\"nope\",\"lease\":1,\"rcpts\":[{\"to\":\"x@b.c\",\"s\":\"delivered\"}]}]", "lost");
	/* nothing above touched the message: same lease, both recipients,
	 * no event, no counter */
	assert_int_equal(stat_of(q, "inflight"), 1);
	assert_int_equal(stat_of(q, "delivered"), 0);
	redisReply *r = events(q);
	assert_int_equal(r->elements, 0);
	freeReplyObject(r);
	/* attempt false does not burn an attempt; the unknown id is lost */
	snprintf(json, sizeof(json),
		 "[{\"id\":\"nope\",\"lease\":1},{\"id\":\"%s\",\"lease\":%lld,\"attempt\":false,\"next\":0}]", id, lease);
	SETTLE_EXPECT(q, json, "lost", "scheduled");
	r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_int_equal(M_ATT(CL_MSG(r, 0)), 0);
	assert_int_equal(M_RCPTS(CL_MSG(r, 0))->elements, 2);
	freeReplyObject(r);
}

/* One bad outcome costs only its own message: the others of the batch are
 * applied, the bad one keeps its lease and can be settled again. */
static void settle_invalid_isolated(void **state)
{
	struct q *q = *state;
	char a[40], b[40], c[40], d[40], ids[4][40], json[2048];
	long long leases[4];
	enq1(q, "a@b.c", a);
	enq(q, "{\"from\":\"\",\"to\":[\"b1@b.c\",\"b2@b.c\"]}", BODY, b);
	enq1(q, "c@b.c", c);
	enq1(q, "d@b.c", d);
	redisReply *r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 4);
	for (int i = 0; i < 4; i++) {
		snprintf(ids[i], 40, "%s", M_ID(CL_MSG(r, i)));
		leases[i] = M_LEASE(CL_MSG(r, i));
	}
	freeReplyObject(r);
	assert_string_equal(ids[0], a);
	assert_string_equal(ids[1], b);
	assert_string_equal(ids[2], c);
	assert_string_equal(ids[3], d);
	/* a: delivered; b: b2 deferred without next (invalid); c: a recipient
	 * that is not its own (invalid); d: failed; then a again (invalid:
	 * an id twice) */
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\",\"code\":250}]},"
		 "{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"b1@b.c\",\"s\":\"delivered\"},{\"to\":\"b2@b.c\",\"s\":\"deferred\"}]},"
		 "{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]},"
		 "{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"d@b.c\",\"s\":\"failed\",\"code\":550}]},"
		 "{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"failed\",\"code\":550}]}]",
		 a, leases[0], b, leases[1], c, leases[2], d, leases[3], a, leases[0]);
	SETTLE_EXPECT(q, json, "done", "invalid", "invalid", "done", "invalid");
	/* a delivered once and gone, d dead; b and c untouched and still leased */
	char suffix[64];
	snprintf(suffix, sizeof(suffix), ":msg:%s", a);
	assert_false(key_exists(q, suffix));
	assert_int_equal(stat_of(q, "delivered"), 1);
	assert_int_equal(stat_of(q, "failed"), 1);
	assert_int_equal(stat_of(q, "dead"), 1);
	assert_int_equal(stat_of(q, "inflight"), 2);
	r = events(q);
	assert_int_equal(r->elements, 2);
	assert_string_equal(ev_field(r->element[0], "id"), a);
	assert_string_equal(ev_field(r->element[1], "id"), d);
	freeReplyObject(r);
	char *s = show(q, b);
	has(s, "\"state\":\"inflight\"");
	has(s, "\"attempts\":0");
	assert_null(strstr(s, "\"s\":\"delivered\""));
	free(s);
	snprintf(suffix, sizeof(suffix), ":rcpt:%s", b);
	assert_false(key_exists(q, suffix));
	/* the same leases still settle b and c once corrected */
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"next\":0,\"rcpts\":[{\"to\":\"b1@b.c\",\"s\":\"delivered\"},{\"to\":\"b2@b.c\",\"s\":\"deferred\"}]},"
		 "{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"c@b.c\",\"s\":\"delivered\"}]}]",
		 b, leases[1], c, leases[2]);
	SETTLE_EXPECT(q, json, "scheduled", "done");
	assert_int_equal(stat_of(q, "inflight"), 0);
	assert_int_equal(stat_of(q, "delivered"), 3);
	assert_int_equal(stat_of(q, "deferred"), 1);
}

static void config_validation(void **state)
{
	struct q *q = *state;
	redisReply *r = FC(q, "relayq_config", NULL);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	assert_int_equal(r->elements, 8);
	static const char *const names[] = {"max_recipients", "max_message_size", "idempotency_window", "events_cap"};
	static const long long defaults[] = {1000, 26214400, 86400, 100000};
	for (int i = 0; i < 4; i++) {
		assert_string_equal(r->element[2 * i]->str, names[i]);
		assert_int_equal(r->element[2 * i + 1]->type, REDIS_REPLY_INTEGER);
		assert_int_equal(r->element[2 * i + 1]->integer, defaults[i]);
	}
	freeReplyObject(r);
	assert_false(key_exists(q, ":config"));
	REFUSED(q, FC(q, "relayq_config", "max_recipients", "0"), "max_recipients must be a positive integer");
	REFUSED(q, FC(q, "relayq_config", "events_cap", "-5"), "events_cap must be a positive integer");
	REFUSED(q, FC(q, "relayq_config", "max_message_size", "1e6"), "max_message_size must be a positive integer");
	REFUSED(q, FC(q, "relayq_config", "max_recipients", "5", "colour", "red"), "unknown config field: colour");
	REFUSED(q, FC(q, "relayq_config", "max_recipients"), "relayq_config takes pairs of field and value");
	r = FC(q, "relayq_config", "idempotency_window", "60", "events_cap", "3");
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	assert_int_equal(r->element[5]->integer, 60);
	assert_int_equal(r->element[7]->integer, 3);
	assert_int_equal(r->element[1]->integer, 1000);
	freeReplyObject(r);
	/* the idempotency window applies to new keys */
	char id[40];
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"key\":\"k\"}", BODY, id);
	r = cmd(q, "TTL %s:idem:k", q->key);
	assert_true(r->integer > 0 && r->integer <= 60);
	freeReplyObject(r);
	/* events_cap bounds the stream (MAXLEN ~: never far above the cap) */
	char env[200];
	for (int i = 0; i < 300; i++) {
		snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":[\"r%d@b.c\"]}", i);
		enq(q, env, BODY, id);
	}
	r = claim(q, 1000, 30000);
	assert_int_equal(CL_N(r), 301);
	for (size_t i = 0; i < CL_N(r); i++) {
		char rest[300];
		snprintf(rest, sizeof(rest), "\"rcpts\":[{\"to\":\"%s\",\"s\":\"delivered\"}]",
			 M_RCPTS(CL_MSG(r, i))->element[0]->str);
		assert_string_equal(settle1(q, M_ID(CL_MSG(r, i)), M_LEASE(CL_MSG(r, i)), rest), "done");
	}
	freeReplyObject(r);
	r = cmd(q, "XLEN %s:events", q->key);
	assert_true(r->integer < 301);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "delivered"), 301);
}

static void show_and_list(void **state)
{
	struct q *q = *state;
	char a[40], b[40], c[40];
	enq(q, "{\"from\":\"s@x.y\",\"to\":[\"a@b.c\",\"b@b.c\"],\"key\":\"k1\",\"meta\":{\"t\":\"x\"}}", BODY, a);
	enq(q, "{\"from\":\"\",\"to\":[\"c@b.c\"],\"delay\":3600}", BODY, b);
	enq1(q, "d@b.c", c);
	char *s = show(q, a);
	char want[200];
	snprintf(want, sizeof(want), "{\"id\":\"%s\",\"from\":\"s@x.y\",\"to\":[\"a@b.c\",\"b@b.c\"],\"state\":\"ready\",", a);
	assert_memory_equal(s, want, strlen(want));
	has(s, "\"attempts\":0");
	has(s, "\"lease\":0");
	has(s, "\"key\":\"k1\"");
	has(s, "\"size\":21");
	has(s, "\"meta\":{\"t\":\"x\"}");
	has(s, "\"rcpts\":[{");
	assert_null(strstr(s, "hello"));  /* no body */
	assert_null(strstr(s, "\"pending\":["));
	const char *r1 = strstr(s, "\"rcpts\":");
	has(r1, "\"to\":\"a@b.c\"");
	has(r1, "\"s\":\"pending\"");
	free(s);
	REFUSED(q, FC(q, "relayq_show", "nope"), "unknown id: nope");

	redisReply *r = FC(q, "relayq_list", "all", "0", "10");
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	assert_int_equal(r->elements, 3);
	snprintf(want, sizeof(want), "{\"id\":\"%s\"", a);
	assert_memory_equal(r->element[0]->str, want, strlen(want));
	has(r->element[0]->str, "\"rcpt_count\":2");
	has(r->element[0]->str, "\"pending_count\":2");
	assert_null(strstr(r->element[0]->str, "\"rcpts\""));
	snprintf(want, sizeof(want), "{\"id\":\"%s\"", c);
	assert_memory_equal(r->element[1]->str, want, strlen(want));
	snprintf(want, sizeof(want), "{\"id\":\"%s\"", b);
	assert_memory_equal(r->element[2]->str, want, strlen(want));
	has(r->element[2]->str, "\"state\":\"scheduled\"");
	freeReplyObject(r);
	r = FC(q, "relayq_list", "all", "1", "1");
	assert_int_equal(r->elements, 1);
	snprintf(want, sizeof(want), "{\"id\":\"%s\"", c);
	assert_memory_equal(r->element[0]->str, want, strlen(want));
	freeReplyObject(r);
	r = FC(q, "relayq_list", "ready", "1", "5");
	assert_int_equal(r->elements, 1);
	freeReplyObject(r);
	r = FC(q, "relayq_list", "scheduled", "0", "5");
	assert_int_equal(r->elements, 1);
	freeReplyObject(r);
	r = FC(q, "relayq_list", "dead", "0", "5");
	assert_int_equal(r->elements, 0);
	freeReplyObject(r);
	REFUSED(q, FC(q, "relayq_list", "sent", "0", "5"), "state must be ready, scheduled, inflight, held, dead or all");
	REFUSED(q, FC(q, "relayq_list", "all", "-1", "5"), "offset must be between 0 and 1000000000000000");
	REFUSED(q, FC(q, "relayq_list", "all", "0", "0"), "count must be between 1 and 1000");

	/* partial progress shows in list */
	long long lease = claim_one(q, 30000, NULL);
	assert_string_equal(settle1(q, a, lease, "\"next\":99999999999999,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]"),
			    "scheduled");
	r = FC(q, "relayq_list", "scheduled", "0", "5");
	assert_int_equal(r->elements, 2);
	snprintf(want, sizeof(want), "{\"id\":\"%s\"", b);
	assert_memory_equal(r->element[0]->str, want, strlen(want));
	has(r->element[1]->str, "\"pending_count\":1");
	has(r->element[1]->str, "\"rcpt_count\":2");
	freeReplyObject(r);
}

/* The status of recipient to in the rcpts array of show's JSON (the keys of
 * a recipient object come in any order; addresses here have no braces). */
static void rcpt_status_is(const char *json, const char *to, const char *want)
{
	char pat[128], st[64];
	const char *rc = strstr(json, "\"rcpts\":[");
	assert_non_null(rc);
	snprintf(pat, sizeof(pat), "\"to\":\"%s\"", to);
	const char *p = strstr(rc, pat);
	if (!p)
		fail_msg("no recipient %s in %s", to, json);
	const char *open = p;
	while (*open != '{')
		open--;
	const char *close = strchr(p, '}');
	assert_non_null(close);
	snprintf(st, sizeof(st), "\"s\":\"%s\"", want);
	char *obj = strndup(open, (size_t)(close - open + 1));
	if (!strstr(obj, st))
		fail_msg("recipient %s: %s, want s %s", to, obj, want);
	free(obj);
}

/* show: a recipient without a P:rcpt entry is "pending" while it is in
 * pending, "unknown" when it is not (only a stray write does that). */
static void show_recipient_without_entry(void **state)
{
	struct q *q = *state;
	char id[40];
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\",\"b@b.c\",\"c@b.c\"]}", BODY, id);
	long long lease = claim_one(q, 30000, NULL);
	assert_string_equal(settle1(q, id, lease, "\"next\":99999999999999,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]"),
			    "scheduled");
	char *s = show(q, id);
	rcpt_status_is(s, "a@b.c", "delivered");
	rcpt_status_is(s, "b@b.c", "pending");
	rcpt_status_is(s, "c@b.c", "pending");
	free(s);
	/* stray write: c@b.c dropped from pending without an entry */
	freeReplyObject(cmd(q, "HSET %s:msg:%s pending [\"b@b.c\"]", q->key, id));
	s = show(q, id);
	rcpt_status_is(s, "a@b.c", "delivered");
	rcpt_status_is(s, "b@b.c", "pending");
	rcpt_status_is(s, "c@b.c", "unknown");
	free(s);
}

static void bad_keys_and_args(void **state)
{
	struct q *q = *state;
	redisReply *r = cmd(q, "FCALL relayq_stats 1 myqueue");
	expect_error(r, "invalid queue key myqueue: expected relayq:{<queue>}");
	freeReplyObject(r);
	r = cmd(q, "FCALL relayq_stats 2 %s %s:x", q->key, q->key);
	expect_error(r, "expected exactly one key, the queue prefix relayq:{<queue>}");
	freeReplyObject(r);
	REFUSED(q, FC(q, "relayq_claim", "0", "1000"), "count must be between 1 and 10000");
	REFUSED(q, FC(q, "relayq_claim", "10", "abc"), "lease-ms must be an integer");
	REFUSED(q, FC(q, "relayq_claim", "10"), "relayq_claim takes 2 arguments: count and lease-ms");
	REFUSED(q, FC(q, "relayq_enqueue", "{}"), "relayq_enqueue takes 2 arguments: the envelope JSON and the message");
}

static void wake_on_enqueue(void **state)
{
	struct q *q = *state;
	redisContext *sub = th_redis_connect(&srv);
	struct timeval tv = {5, 0};
	redisSetTimeout(sub, tv);
	redisReply *r = redisCommand(sub, "SUBSCRIBE %s:wake", q->key);
	assert_non_null(r);
	freeReplyObject(r);
	char id[40];
	enq1(q, "a@b.c", id);
	void *v = NULL;
	assert_int_equal(redisGetReply(sub, &v), REDIS_OK);
	r = v;
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	assert_string_equal(r->element[0]->str, "message");
	assert_string_equal(r->element[2]->str, "1");
	freeReplyObject(r);
	/* an earlier scheduled message wakes too */
	claim_one(q, 30000, NULL);
	enq(q, "{\"from\":\"\",\"to\":[\"a@b.c\"],\"delay\":3600}", BODY, id);
	assert_int_equal(redisGetReply(sub, &v), REDIS_OK);
	r = v;
	assert_string_equal(r->element[0]->str, "message");
	freeReplyObject(r);
	redisFree(sub);
}

static void read_only_functions(void **state)
{
	struct q *q = *state;
	char id[40];
	enq1(q, "a@b.c", id);
	/* FCALL_RO accepts only no-writes functions: these work on replicas */
	redisReply *r = cmd(q, "FCALL_RO relayq_version 0");
	assert_int_equal(r->type, REDIS_REPLY_INTEGER);
	freeReplyObject(r);
	r = cmd(q, "FCALL_RO relayq_stats 1 %s", q->key);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	freeReplyObject(r);
	r = cmd(q, "FCALL_RO relayq_show 1 %s %s", q->key, id);
	assert_int_equal(r->type, REDIS_REPLY_STRING);
	freeReplyObject(r);
	r = cmd(q, "FCALL_RO relayq_list 1 %s all 0 10", q->key);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	assert_int_equal(r->elements, 1);
	freeReplyObject(r);
	r = cmd(q, "FCALL_RO relayq_claim 1 %s 1 1000", q->key);
	assert_int_equal(r->type, REDIS_REPLY_ERROR);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "ready"), 1);
}

static void claim_bounds_promotion(void **state)
{
	struct q *q = *state;
	enum { N = 150 };
	char ids[N][40], env[200];
	for (int i = 0; i < N; i++) {
		snprintf(env, sizeof(env), "{\"from\":\"\",\"to\":[\"r%d@b.c\"]}", i);
		enq(q, env, BODY, ids[i]);
	}
	/* all claimed, all deferred with next 0: 150 due ids in scheduled */
	redisReply *r = claim(q, N, 30000);
	assert_int_equal(CL_N(r), N);
	for (int i = 0; i < N; i++) {
		char rest[200];
		snprintf(rest, sizeof(rest), "\"next\":0,\"rcpts\":[{\"to\":\"r%d@b.c\",\"s\":\"deferred\",\"code\":421}]", i);
		assert_string_equal(M_ID(CL_MSG(r, i)), ids[i]);
		assert_string_equal(settle1(q, ids[i], M_LEASE(CL_MSG(r, i)), rest), "scheduled");
	}
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "scheduled"), N);
	/* count 1 moves at most max(1, 100) ids: the rest stay due */
	r = claim(q, 1, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_string_equal(M_ID(CL_MSG(r, 0)), ids[0]);
	assert_int_equal(M_ATT(CL_MSG(r, 0)), 1);
	assert_true(CL_DUE(r) >= 0 && CL_DUE(r) <= CL_NOW(r));
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "scheduled"), N - 100);
	assert_int_equal(stat_of(q, "ready"), 99);
	r = claim(q, 1000, 30000);
	assert_int_equal(CL_N(r), N - 1);
	for (int i = 1; i < N; i++)
		assert_string_equal(M_ID(CL_MSG(r, i - 1)), ids[i]);
	assert_int_equal(CL_DUE(r), -1);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "deferred"), N);
}

static void large_batches(void **state)
{
	struct q *q = *state;
	enum { N = 4500 };
	const char *env = "{\"from\":\"s@x.y\",\"to\":[\"a@b.c\"]}";
	for (int i = 0; i < N; i++)
		redisAppendCommand(q->c, "FCALL relayq_enqueue 1 %s %s %s", q->key, env, BODY);
	for (int i = 0; i < N; i++) {
		void *v = NULL;
		assert_int_equal(redisGetReply(q->c, &v), REDIS_OK);
		assert_int_equal(((redisReply *)v)->type, REDIS_REPLY_STRING);
		freeReplyObject(v);
	}
	/* one claim and one settle of N: commands split past Lua's unpack limit */
	redisReply *r = claim(q, N, 30000);
	assert_int_equal(CL_N(r), N);
	assert_int_equal(stat_of(q, "inflight"), N);
	size_t cap = (size_t)N * 120 + 16, len = 0;
	char *json = malloc(cap);
	json[len++] = '[';
	for (size_t i = 0; i < CL_N(r); i++)
		len += (size_t)snprintf(json + len, cap - len,
			"%s{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"a@b.c\",\"s\":\"delivered\"}]}",
			i ? "," : "", M_ID(CL_MSG(r, i)), M_LEASE(CL_MSG(r, i)));
	json[len++] = ']';
	json[len] = '\0';
	freeReplyObject(r);
	r = settle(q, json);
	free(json);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	assert_int_equal(r->elements, N);
	for (size_t i = 0; i < r->elements; i++)
		assert_string_equal(r->element[i]->str, "done");
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "inflight"), 0);
	assert_int_equal(stat_of(q, "delivered"), N);
}

static void claim_skips_broken_messages(void **state)
{
	struct q *q = *state;
	char a[40], b[40], c[40];
	enq1(q, "a@b.c", a);
	enq1(q, "b@b.c", b);
	enq1(q, "c@b.c", c);
	/* stray writes: a's hash removed, b's recipients unreadable */
	freeReplyObject(cmd(q, "DEL %s:msg:%s", q->key, a));
	freeReplyObject(cmd(q, "HSET %s:msg:%s pending [oops", q->key, b));
	redisReply *r = claim(q, 10, 30000);
	assert_int_equal(CL_N(r), 1);
	assert_string_equal(M_ID(CL_MSG(r, 0)), c);
	freeReplyObject(r);
	assert_int_equal(stat_of(q, "ready"), 0);
	assert_int_equal(stat_of(q, "held"), 1);
	char *s = show(q, b);
	has(s, "\"state\":\"held\"");
	has(s, "\"last_text\":\"relayq: unreadable recipients\"");
	free(s);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(version_matches_embedded, setup, teardown),
		cmocka_unit_test_setup_teardown(enqueue_rejections, setup, teardown),
		cmocka_unit_test_setup_teardown(enqueue_accepts, setup, teardown),
		cmocka_unit_test_setup_teardown(addr_rules_match_c, setup, teardown),
		cmocka_unit_test_setup_teardown(queue_names_match_c, setup, teardown),
		cmocka_unit_test_setup_teardown(every_function_checks_the_name, setup, teardown),
		cmocka_unit_test_setup_teardown(duplicate_recipient_domain_case, setup, teardown),
		cmocka_unit_test_setup_teardown(meta_not_encodable, setup, teardown),
		cmocka_unit_test_setup_teardown(idempotency_key, setup, teardown),
		cmocka_unit_test_setup_teardown(delay_schedules, setup, teardown),
		cmocka_unit_test_setup_teardown(meta_round_trip, setup, teardown),
		cmocka_unit_test_setup_teardown(meta_depth_limit, setup, teardown),
		cmocka_unit_test_setup_teardown(claim_settle_delivered, setup, teardown),
		cmocka_unit_test_setup_teardown(partial_delivery, setup, teardown),
		cmocka_unit_test_setup_teardown(settle_after_lost_lease, setup, teardown),
		cmocka_unit_test_setup_teardown(renew_extends_lease, setup, teardown),
		cmocka_unit_test_setup_teardown(hold_and_release, setup, teardown),
		cmocka_unit_test_setup_teardown(settle_hold, setup, teardown),
		cmocka_unit_test_setup_teardown(requeue_dead, setup, teardown),
		cmocka_unit_test_setup_teardown(delete_any_state, setup, teardown),
		cmocka_unit_test_setup_teardown(flush_scheduled, setup, teardown),
		cmocka_unit_test_setup_teardown(settle_validation, setup, teardown),
		cmocka_unit_test_setup_teardown(settle_invalid_isolated, setup, teardown),
		cmocka_unit_test_setup_teardown(config_validation, setup, teardown),
		cmocka_unit_test_setup_teardown(show_and_list, setup, teardown),
		cmocka_unit_test_setup_teardown(show_recipient_without_entry, setup, teardown),
		cmocka_unit_test_setup_teardown(bad_keys_and_args, setup, teardown),
		cmocka_unit_test_setup_teardown(wake_on_enqueue, setup, teardown),
		cmocka_unit_test_setup_teardown(read_only_functions, setup, teardown),
		cmocka_unit_test_setup_teardown(claim_bounds_promotion, setup, teardown),
		cmocka_unit_test_setup_teardown(large_batches, setup, teardown),
		cmocka_unit_test_setup_teardown(claim_skips_broken_messages, setup, teardown),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

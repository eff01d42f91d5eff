/* The relayq Functions' encoding without Redis (queue_codec.h): settle
 * outcomes JSON, claim and settle replies (built by a hiredis reader from
 * RESP text, hostile ones included), the enqueue envelope, the library
 * version check. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "relayq/json.h"
#include "relayq/queue_codec.h"

/* A reply as Redis would send it (RESP text), or fails the test. */
static redisReply *resp(const char *text, size_t len)
{
	redisReader *rd = redisReaderCreate();
	assert_non_null(rd);
	assert_int_equal(redisReaderFeed(rd, text, len), REDIS_OK);
	void *r = NULL;
	assert_int_equal(redisReaderGetReply(rd, &r), REDIS_OK);
	assert_non_null(r);
	redisReaderFree(rd);
	return r;
}

#define RESP(s) resp(s, sizeof(s) - 1)

static struct rq_json *json_of(struct rq_queue_outcomes *o)
{
	size_t len = 0;
	const char *s = rq_queue_outcomes_json(o, &len);
	assert_non_null(s);
	assert_int_equal(strlen(s), len);
	char err[200];
	struct rq_json *v = rq_json_parse(s, len, 0, err, sizeof(err));
	if (!v)
		fail_msg("not JSON (%s): %s", err, s);
	return v;
}

/* ---- outcomes ---- */

static void outcomes_round_trip(void **state)
{
	struct rq_queue_outcomes o;
	rq_queue_outcomes_init(&o);
	assert_null(rq_queue_outcomes_json(&o, NULL));   /* empty */
	struct rq_queue_rcpt_outcome r = {0};
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), -1);   /* no message open */

	assert_int_equal(rq_queue_outcomes_msg(&o, "id-1", 1700000000123, true, 1700000060000,
					       false), 0);
	r = (struct rq_queue_rcpt_outcome){.to = "a@x.org", .s = RQ_QUEUE_RCPT_DELIVERED,
					   .code = 250, .enh = "2.0.0", .text = "OK id=\"q\"",
					   .stage = "dot"};
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), 0);
	/* hostile text: quotes, backslashes, every control byte, DEL, UTF-8 */
	char hostile[64];
	size_t n = 0;
	hostile[n++] = '"';
	hostile[n++] = '\\';
	for (int c = 1; c < 0x20; c++)
		hostile[n++] = (char)c;
	hostile[n++] = 0x7f;
	memcpy(hostile + n, "\xc3\xa9", 3);
	r = (struct rq_queue_rcpt_outcome){.to = "b@x.org", .s = RQ_QUEUE_RCPT_DEFERRED,
					   .code = 451, .text = hostile, .hint = "h"};
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), 0);
	r = (struct rq_queue_rcpt_outcome){.to = "c@x.org", .s = RQ_QUEUE_RCPT_EXPIRED,
					   .code = 1000};   /* out of range: left out */
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), 0);
	r.s = (enum rq_queue_rcpt_state)99;
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), -1);
	r = (struct rq_queue_rcpt_outcome){.to = NULL};
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), -1);
	assert_int_equal(rq_queue_outcomes_msg(&o, "id-2", 5, false, -1, true), 0);
	r = (struct rq_queue_rcpt_outcome){.to = "d@x.org", .s = RQ_QUEUE_RCPT_FAILED};
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), 0);
	assert_int_equal(rq_queue_outcomes_msg(&o, NULL, 5, false, -1, true), -1);

	struct rq_json *v = json_of(&o);
	assert_int_equal(v->type, RQ_JSON_ARRAY);
	assert_int_equal(v->count, 2);
	assert_int_equal(o.nmsgs, 2);
	const struct rq_json *m = rq_json_at(v, 0);
	int64_t i;
	assert_string_equal(rq_json_get_str(m, "id"), "id-1");
	assert_true(rq_json_get_int(m, "lease", false, &i));
	assert_int_equal(i, 1700000000123);
	assert_true(rq_json_get_int(m, "next", false, &i));
	assert_int_equal(i, 1700000060000);
	assert_true(rq_json_get(m, "attempt")->boolean);
	assert_false(rq_json_get(m, "hold")->boolean);
	const struct rq_json *rc = rq_json_get(m, "rcpts");
	assert_int_equal(rc->count, 3);
	assert_string_equal(rq_json_get_str(rq_json_at(rc, 0), "s"), "delivered");
	assert_string_equal(rq_json_get_str(rq_json_at(rc, 0), "text"), "OK id=\"q\"");
	assert_string_equal(rq_json_get_str(rq_json_at(rc, 0), "stage"), "dot");
	const struct rq_json *t = rq_json_get(rq_json_at(rc, 1), "text");
	assert_int_equal(t->len, n + 2);
	assert_memory_equal(t->str, hostile, n + 2);
	assert_string_equal(rq_json_get_str(rq_json_at(rc, 1), "s"), "deferred");
	assert_null(rq_json_get(rq_json_at(rc, 1), "enh"));
	assert_null(rq_json_get(rq_json_at(rc, 2), "code"));
	assert_string_equal(rq_json_get_str(rq_json_at(rc, 2), "s"), "expired");
	m = rq_json_at(v, 1);
	assert_null(rq_json_get(m, "next"));
	assert_true(rq_json_get(m, "hold")->boolean);
	assert_string_equal(rq_json_get_str(rq_json_at(rq_json_get(m, "rcpts"), 0), "s"), "failed");
	rq_json_free(v);

	/* json() closes the array past the end: more messages may follow */
	assert_int_equal(rq_queue_outcomes_msg(&o, "id-3", 1, true, 2, false), 0);
	v = json_of(&o);
	assert_int_equal(v->count, 3);
	assert_int_equal(rq_json_get(rq_json_at(v, 2), "rcpts")->count, 0);
	rq_json_free(v);

	rq_queue_outcomes_reset(&o);
	assert_null(rq_queue_outcomes_json(&o, NULL));
	assert_int_equal(rq_queue_outcomes_msg(&o, "again", 1, true, 2, false), 0);
	v = json_of(&o);
	assert_int_equal(v->count, 1);
	rq_json_free(v);
	rq_queue_outcomes_finish(&o);
	assert_null(o.buf);
}

static void outcomes_grow(void **state)
{
	struct rq_queue_outcomes o;
	rq_queue_outcomes_init(&o);
	char id[16];
	for (int k = 0; k < 2000; k++) {
		snprintf(id, sizeof(id), "m%d", k);
		assert_int_equal(rq_queue_outcomes_msg(&o, id, k, true, k, false), 0);
		struct rq_queue_rcpt_outcome r = {.to = "x@y.z", .s = RQ_QUEUE_RCPT_DROPPED};
		assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), 0);
	}
	struct rq_json *v = json_of(&o);
	assert_int_equal(v->count, 2000);
	assert_string_equal(rq_json_get_str(rq_json_at(v, 1999), "id"), "m1999");
	rq_json_free(v);
	rq_queue_outcomes_finish(&o);
}

/* ---- claim ---- */

static const char good_claim[] =
	"*3\r\n:1000\r\n:-1\r\n*2\r\n"
	"*8\r\n$2\r\nm1\r\n$5\r\na@b.c\r\n*2\r\n$5\r\nx@y.z\r\n$5\r\nw@y.z\r\n"
	"$6\r\nbo\0dy!\r\n:3\r\n$3\r\n999\r\n$7\r\n{\"k\":1}\r\n:2000\r\n"
	"*8\r\n$2\r\nm2\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n$1\r\n0\r\n:5\r\n$-1\r\n+77\r\n";

static void claim_parse_good(void **state)
{
	redisReply *r = resp(good_claim, sizeof(good_claim) - 1);
	const char *why = NULL;
	struct rq_queue_claim *c = rq_queue_claim_parse(r, &why);
	if (!c)
		fail_msg("refused: %s", why);
	assert_int_equal(c->now, 1000);
	assert_int_equal(c->next_due, -1);
	assert_int_equal(c->count, 2);
	struct rq_queue_msg *m = &c->msgs[0];
	assert_string_equal(m->id, "m1");
	assert_string_equal(m->from, "a@b.c");
	assert_int_equal(m->nrcpts, 2);
	assert_string_equal(m->rcpts[1], "w@y.z");
	assert_int_equal(m->rcpt_lens[1], 5);
	assert_int_equal(m->body_len, 6);
	assert_memory_equal(m->body, "bo\0dy!", 6);
	assert_int_equal(m->attempts, 3);
	assert_int_equal(m->created, 999);
	assert_string_equal(m->meta, "{\"k\":1}");
	assert_int_equal(m->lease, 2000);
	m = &c->msgs[1];
	assert_string_equal(m->from, "");
	assert_int_equal(m->nrcpts, 0);
	assert_string_equal(m->meta, "{}");    /* nil meta */
	assert_int_equal(m->lease, 77);        /* status "77" */
	rq_queue_msg_release(c, 0);
	assert_true(c->msgs[0].released);
	assert_null(c->msgs[0].body);
	assert_string_equal(c->msgs[0].id, "m1");
	rq_queue_msg_release(c, 0);             /* idempotent */
	rq_queue_msg_release(c, 9);             /* out of range */
	rq_queue_claim_free(c);                 /* frees r too */
	rq_queue_claim_free(NULL);

	/* no messages */
	r = RESP("*3\r\n:1\r\n:50\r\n*0\r\n");
	c = rq_queue_claim_parse(r, &why);
	assert_non_null(c);
	assert_int_equal(c->count, 0);
	assert_int_equal(c->next_due, 50);
	rq_queue_claim_free(c);
}

static void claim_parse_hostile(void **state)
{
	static const struct { const char *resp; const char *why; } bad[] = {
		{"-ERR no\r\n", "not [now"},
		{"$3\r\nabc\r\n", "not [now"},
		{"*2\r\n:1\r\n:2\r\n", "not [now"},
		{"*3\r\n$1\r\nx\r\n:2\r\n*0\r\n", "not [now"},
		{"*3\r\n:1\r\n$21\r\n123456789012345678901\r\n*0\r\n", "not [now"},
		{"*3\r\n:1\r\n:2\r\n$0\r\n\r\n", "not [now"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n:5\r\n", "a message is not"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*7\r\n$1\r\na\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n",
		 "a message is not"},
		/* rcpts not an array */
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$1\r\na\r\n$0\r\n\r\n$1\r\nx\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "a message is not"},
		/* ids: empty, too long, with a space, a control byte, not a string */
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$0\r\n\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "message id"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$33\r\n123456789012345678901234567890123\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "message id"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$3\r\na b\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "not printable"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$2\r\na\x1b\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "not printable"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n:7\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "message id"},
		/* from nil, attempts not a number, lease an array */
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$1\r\na\r\n$-1\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "wrong type"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$1\r\na\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n$2\r\nxx\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "wrong type"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$1\r\na\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n*0\r\n",
		 "wrong type"},
		/* meta an integer, a recipient nil */
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$1\r\na\r\n$0\r\n\r\n*0\r\n$0\r\n\r\n:1\r\n:1\r\n:5\r\n:1\r\n",
		 "meta"},
		{"*3\r\n:1\r\n:2\r\n*1\r\n*8\r\n$1\r\na\r\n$0\r\n\r\n*1\r\n$-1\r\n$0\r\n\r\n:1\r\n:1\r\n$2\r\n{}\r\n:1\r\n",
		 "recipient"},
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		redisReply *r = resp(bad[i].resp, strlen(bad[i].resp));
		const char *why = NULL;
		struct rq_queue_claim *c = rq_queue_claim_parse(r, &why);
		if (c)
			fail_msg("accepted reply %zu", i);
		assert_non_null(why);
		if (!strstr(why, bad[i].why))
			fail_msg("reply %zu: '%s' lacks '%s'", i, why, bad[i].why);
		freeReplyObject(r);    /* still the caller's */
	}
	const char *why = NULL;
	assert_null(rq_queue_claim_parse(NULL, &why));
}

/* ---- settle ---- */

static void settle_parse(void **state)
{
	enum rq_queue_settled res[5];
	redisReply *r = RESP("*5\r\n$4\r\ndone\r\n+scheduled\r\n$4\r\nheld\r\n$4\r\nlost\r\n"
			     "$7\r\ninvalid\r\n");
	assert_int_equal(rq_queue_settle_parse(r, 5, res), 0);
	assert_int_equal(res[0], RQ_QUEUE_SETTLE_DONE);
	assert_int_equal(res[1], RQ_QUEUE_SETTLE_SCHEDULED);
	assert_int_equal(res[2], RQ_QUEUE_SETTLE_HELD);
	assert_int_equal(res[3], RQ_QUEUE_SETTLE_LOST);
	assert_int_equal(res[4], RQ_QUEUE_SETTLE_INVALID);
	assert_int_equal(rq_queue_settle_parse(r, 4, res), -1);   /* count differs */
	freeReplyObject(r);
	const char *bad[] = {"*1\r\n$5\r\nDONE!\r\n", "*1\r\n:1\r\n", "*1\r\n$-1\r\n",
			     "*1\r\n$5\r\ndo\0ne\r\n", "$4\r\ndone\r\n", "-ERR x\r\n",
			     "*1\r\n*1\r\n$4\r\ndone\r\n"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		size_t len = strlen(bad[i]);
		if (i == 3)
			len = sizeof("*1\r\n$5\r\ndo\0ne\r\n") - 1;
		r = resp(bad[i], len);
		if (rq_queue_settle_parse(r, 1, res) == 0)
			fail_msg("accepted settle reply %zu", i);
		freeReplyObject(r);
	}
	assert_int_equal(rq_queue_settle_parse(NULL, 0, res), -1);
}

/* ---- enqueue ---- */

static void enqueue_envelope(void **state)
{
	const char *to[] = {"a@x.org", "b\"q@x.org"};
	char err[200];
	struct rq_json *meta = rq_json_parse("{\"k\":[1,2]}", 11, 0, err, sizeof(err));
	assert_non_null(meta);
	struct rq_queue_enqueue_req req = {
		.from = "", .to = to, .nto = 2, .body = "x", .body_len = 1,
		.key = "bounce:m1:3", .delay_s = 90, .meta = meta,
	};
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	assert_int_equal(rq_queue_enqueue_envelope(&req, &b), 0);
	struct rq_json *v = rq_json_parse(b.data, b.len, 0, err, sizeof(err));
	assert_non_null(v);
	assert_string_equal(rq_json_get_str(v, "from"), "");
	assert_string_equal(rq_json_get_str(v, "key"), "bounce:m1:3");
	assert_string_equal(rq_json_at(rq_json_get(v, "to"), 1)->str, "b\"q@x.org");
	int64_t i;
	assert_true(rq_json_get_int(v, "delay", false, &i));
	assert_int_equal(i, 90);
	assert_int_equal(rq_json_get(rq_json_get(v, "meta"), "k")->count, 2);
	rq_json_free(v);

	/* lengths given: bytes after a NUL are kept (escaped); fractional delay;
	 * no key, no meta */
	rq_json_buf_reset(&b);
	const char *to2[] = {"z@y\0z"};
	size_t lens[] = {5};
	req = (struct rq_queue_enqueue_req){.from = "s@x\0y", .from_len = 5, .to = to2,
					    .to_lens = lens, .nto = 1, .delay_s = 1.5};
	assert_int_equal(rq_queue_enqueue_envelope(&req, &b), 0);
	v = rq_json_parse(b.data, b.len, 0, err, sizeof(err));
	assert_non_null(v);
	assert_int_equal(rq_json_get(v, "from")->len, 5);
	assert_int_equal(rq_json_at(rq_json_get(v, "to"), 0)->len, 5);
	assert_true(rq_json_get(v, "delay")->number == 1.5);
	assert_null(rq_json_get(v, "key"));
	assert_null(rq_json_get(v, "meta"));
	rq_json_free(v);

	/* incomplete: no from, no recipient, meta not an object */
	rq_json_buf_reset(&b);
	req = (struct rq_queue_enqueue_req){.to = to, .nto = 1, .delay_s = -1};
	assert_int_equal(rq_queue_enqueue_envelope(&req, &b), -1);
	req.from = "";
	req.nto = 0;
	assert_int_equal(rq_queue_enqueue_envelope(&req, &b), -1);
	req.nto = 1;
	struct rq_json *arr = rq_json_parse("[1]", 3, 0, err, sizeof(err));
	req.meta = arr;
	assert_int_equal(rq_queue_enqueue_envelope(&req, &b), -1);
	rq_json_free(arr);
	rq_json_free(meta);
	rq_json_buf_finish(&b);
}

/* ---- small replies ---- */

static void version_and_ids(void **state)
{
	redisReply *r = RESP(":3\r\n");
	assert_int_equal(rq_queue_version_check(r, 3), RQ_QUEUE_VERSION_OK);
	assert_int_equal(rq_queue_version_check(r, 2), RQ_QUEUE_VERSION_OK);
	assert_int_equal(rq_queue_version_check(r, 4), RQ_QUEUE_VERSION_LOAD);
	freeReplyObject(r);
	r = RESP("-ERR Function not found\r\n");
	assert_int_equal(rq_queue_version_check(r, 1), RQ_QUEUE_VERSION_LOAD);
	freeReplyObject(r);
	r = RESP("-NOPERM no\r\n");
	assert_int_equal(rq_queue_version_check(r, 1), RQ_QUEUE_VERSION_ERROR);
	freeReplyObject(r);
	r = RESP("$1\r\n9\r\n");
	assert_int_equal(rq_queue_version_check(r, 1), RQ_QUEUE_VERSION_ERROR);
	freeReplyObject(r);
	assert_int_equal(rq_queue_version_check(NULL, 1), RQ_QUEUE_VERSION_ERROR);

	char id[RQ_QUEUE_ID_MAX + 1];
	r = RESP("$10\r\n0123456789\r\n");
	assert_true(rq_queue_reply_id(r, id, sizeof(id)));
	assert_string_equal(id, "0123456789");
	assert_false(rq_queue_reply_id(r, id, 10));   /* no room for the NUL */
	freeReplyObject(r);
	const char *bad[] = {"$0\r\n\r\n", "$3\r\na b\r\n", ":5\r\n", "$-1\r\n",
			     "$33\r\n123456789012345678901234567890123\r\n", "+ok\r\n"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		r = resp(bad[i], strlen(bad[i]));
		if (rq_queue_reply_id(r, id, sizeof(id)))
			fail_msg("accepted id reply %zu", i);
		freeReplyObject(r);
	}

	int64_t n;
	r = RESP(":-42\r\n");
	assert_true(rq_queue_reply_int(r, &n));
	assert_int_equal(n, -42);
	freeReplyObject(r);
	r = RESP("$4\r\n1234\r\n");
	assert_true(rq_queue_reply_int(r, &n));
	assert_int_equal(n, 1234);
	freeReplyObject(r);
	const char *nonint[] = {"$2\r\n1x\r\n", "$0\r\n\r\n", "$-1\r\n",
				"$21\r\n123456789012345678901\r\n", "*0\r\n",
				"$20\r\n99999999999999999999\r\n"};
	for (size_t i = 0; i < sizeof(nonint) / sizeof(nonint[0]); i++) {
		r = resp(nonint[i], strlen(nonint[i]));
		if (rq_queue_reply_int(r, &n))
			fail_msg("accepted int reply %zu", i);
		freeReplyObject(r);
	}
	assert_false(rq_queue_reply_int(NULL, &n));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(outcomes_round_trip),
		cmocka_unit_test(outcomes_grow),
		cmocka_unit_test(claim_parse_good),
		cmocka_unit_test(claim_parse_hostile),
		cmocka_unit_test(settle_parse),
		cmocka_unit_test(enqueue_envelope),
		cmocka_unit_test(version_and_ids),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * engine/queue.c against a real redis-server: connect (unix, TCP, password
 * from URL / env / file, ACL user), library check and load, wake-up on
 * enqueue and by the schedule timer, claim / renew / settle / recover round
 * trips, pipelining, reconnect across a redis-server restart, the watchdog
 * (SIGSTOP), and destroy with commands pending; the URL parser and its
 * redaction, BUSY retried, the subscriber's liveness probe, settle
 * "invalid".
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "relayq/fnlib.h"
#include "relayq/queue.h"

/* ---- event loop with a deadline ---- */

struct waiter {
	struct event_base *base;
	bool (*cond)(void *);
	void *arg;
	bool met;
};

static void check_cb(evutil_socket_t fd, short what, void *arg)
{
	struct waiter *w = arg;
	if (w->cond(w->arg)) {
		w->met = true;
		event_base_loopbreak(w->base);
	}
}

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	event_base_loopbreak(arg);
}

/* Runs the loop until cond(arg) holds or ms pass; returns cond(arg). */
static bool run_until(struct event_base *base, bool (*cond)(void *), void *arg, int ms)
{
	if (cond(arg))
		return true;
	struct waiter w = {base, cond, arg, false};
	struct event *chk = event_new(base, -1, EV_PERSIST, check_cb, &w);
	struct event *dl = evtimer_new(base, deadline_cb, base);
	struct timeval tick = {0, 2000};
	struct timeval until = {ms / 1000, (ms % 1000) * 1000};
	event_add(chk, &tick);
	evtimer_add(dl, &until);
	event_base_dispatch(base);
	event_free(chk);
	event_free(dl);
	return cond(arg);
}

/* ---- test context ---- */

struct ctx {
	struct event_base *base;
	struct rq_queue *q;
	bool destroy_on_wake;
	int wakes[3];
	int ready;
	int down;
	char down_err[300];
};

static void on_wake(struct rq_queue *q, enum rq_queue_wake why, void *arg)
{
	struct ctx *c = arg;
	c->wakes[why]++;
	if (c->destroy_on_wake && why == RQ_QUEUE_WAKE_PUBLISH) {
		rq_queue_destroy(q);
		c->q = NULL;
	}
}

static void on_state(struct rq_queue *q, enum rq_queue_conn_state st, const char *err, void *arg)
{
	struct ctx *c = arg;
	if (st == RQ_QUEUE_READY) {
		c->ready++;
	} else {
		c->down++;
		snprintf(c->down_err, sizeof(c->down_err), "%s", err ? err : "");
	}
}

static struct rq_queue_opts base_opts(struct ctx *c, const char *url, const char *queue)
{
	struct rq_queue_opts o = {
		.url = url,
		.queue = queue,
		.on_wake = on_wake,
		.on_state = on_state,
		.arg = c,
		.backoff_min_ms = 20,
		.backoff_max_ms = 200,
	};
	return o;
}

static bool is_ready(void *arg)
{
	struct ctx *c = arg;
	struct rq_queue_stats st;
	rq_queue_get_stats(c->q, &st);
	return st.state == RQ_QUEUE_READY && st.subscribed;
}

static bool is_not_ready(void *arg)
{
	struct ctx *c = arg;
	struct rq_queue_stats st;
	rq_queue_get_stats(c->q, &st);
	return st.state != RQ_QUEUE_READY;
}

static void ctx_open(struct ctx *c, const struct rq_queue_opts *o)
{
	char err[256];
	if (!c->base)
		c->base = event_base_new();
	c->q = rq_queue_create(c->base, o, err, sizeof(err));
	if (!c->q)
		fail_msg("rq_queue_create: %s", err);
}

static void ctx_open_ready(struct ctx *c, const struct rq_queue_opts *o)
{
	ctx_open(c, o);
	if (!run_until(c->base, is_ready, c, 10000))
		fail_msg("queue not ready: %s", rq_queue_last_error(c->q));
}

static void ctx_close(struct ctx *c)
{
	rq_queue_destroy(c->q);
	c->q = NULL;
	event_base_free(c->base);
	c->base = NULL;
}

/* ---- results of commands ---- */

struct res {
	int calls;
	enum rq_queue_status st;
	char err[300];
	long long n;
	struct rq_queue_claim *claim;
	enum rq_queue_settled settled[64];
	size_t nsettled;
	bool destroy_in_cb;        /* call rq_queue_destroy from the callback */
	struct ctx *ctx;
};

static void res_common(struct rq_queue *q, struct res *r, enum rq_queue_status st, const char *err)
{
	r->calls++;
	r->st = st;
	snprintf(r->err, sizeof(r->err), "%s", err ? err : "");
	if (r->destroy_in_cb) {
		rq_queue_destroy(q);
		r->ctx->q = NULL;
	}
}

static void claim_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		     struct rq_queue_claim *claim, void *arg)
{
	struct res *r = arg;
	r->claim = claim;
	res_common(q, r, st, err);
}

static void settle_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		      const enum rq_queue_settled *res, size_t n, void *arg)
{
	struct res *r = arg;
	r->nsettled = n;
	for (size_t i = 0; i < n && i < 64; i++)
		r->settled[i] = res[i];
	res_common(q, r, st, err);
}

static void count_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		     long long n, void *arg)
{
	struct res *r = arg;
	r->n = n;
	res_common(q, r, st, err);
}

static void raw_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		   const redisReply *reply, void *arg)
{
	struct res *r = arg;
	r->n = reply && reply->type == REDIS_REPLY_INTEGER ? reply->integer : -1;
	res_common(q, r, st, err);
}

static bool res_done(void *arg)
{
	return ((struct res *)arg)->calls > 0;
}

struct many {
	struct res *r;
	size_t n;
};

static bool all_done(void *arg)
{
	struct many *m = arg;
	for (size_t i = 0; i < m->n; i++)
		if (m->r[i].calls == 0)
			return false;
	return true;
}

/* ---- a synchronous client for enqueue and checks ---- */

static char *enqueue(redisContext *rc, const char *queue, const char *env, const char *body)
{
	char prefix[256];
	snprintf(prefix, sizeof(prefix), "relayq:{%s}", queue);
	redisReply *r = redisCommand(rc, "FCALL relayq_enqueue 1 %s %s %s", prefix, env, body);
	if (!r || r->type != REDIS_REPLY_STRING)
		fail_msg("enqueue: %s", r ? (r->str ? r->str : "?") : rc->errstr);
	char *id = strdup(r->str);
	freeReplyObject(r);
	return id;
}

static const char *ENV1 = "{\"from\":\"a@example.com\",\"to\":[\"b@example.net\",\"c@example.net\"]}";

static long long sync_int(redisContext *rc, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(rc, fmt, ap);
	va_end(ap);
	if (!r || r->type != REDIS_REPLY_INTEGER)
		fail_msg("expected an integer: %s", r && r->str ? r->str : rc->errstr);
	long long v = r->integer;
	freeReplyObject(r);
	return v;
}

static char *sync_str(redisContext *rc, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(rc, fmt, ap);
	va_end(ap);
	char *s = r && r->type == REDIS_REPLY_STRING ? strdup(r->str) : NULL;
	freeReplyObject(r);
	return s;
}

static void sync_ok(redisContext *rc, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(rc, fmt, ap);
	va_end(ap);
	if (!r || r->type == REDIS_REPLY_ERROR)
		fail_msg("redis: %s", r ? r->str : rc->errstr);
	freeReplyObject(r);
}

/* ---- tests ---- */

static void unix_claim_renew_settle(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	const char *qn = th_unique_queue("rt");
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, qn);
	ctx_open_ready(&c, &o);
	assert_int_equal(c.ready, 1);
	assert_true(c.wakes[RQ_QUEUE_WAKE_CONNECT] >= 1);
	char prefix[256];
	snprintf(prefix, sizeof(prefix), "relayq:{%s}", qn);
	assert_string_equal(rq_queue_prefix(c.q), prefix);

	char *id1 = enqueue(rc, qn, ENV1, "Subject: one\r\n\r\nbody one\r\n");
	char *id2 = enqueue(rc, qn, "{\"from\":\"\",\"to\":[\"d@example.org\"],\"meta\":{\"k\":\"v\"}}",
			    "Subject: two\r\n\r\nbody two\r\n");

	struct res cl = {0};
	assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl), 0);
	assert_int_equal(cl.calls, 0);   /* never called back from inside the call */
	assert_true(run_until(c.base, res_done, &cl, 5000));
	assert_int_equal(cl.st, RQ_QUEUE_OK);
	struct rq_queue_claim *claim = cl.claim;
	assert_non_null(claim);
	assert_int_equal(claim->count, 2);
	assert_true(claim->now > 0);
	assert_int_equal(claim->next_due, -1);
	struct rq_queue_msg *m1 = &claim->msgs[0], *m2 = &claim->msgs[1];
	assert_string_equal(m1->id, id1);
	assert_string_equal(m2->id, id2);
	assert_string_equal(m1->from, "a@example.com");
	assert_int_equal(m1->nrcpts, 2);
	assert_string_equal(m1->rcpts[0], "b@example.net");
	assert_string_equal(m1->rcpts[1], "c@example.net");
	assert_int_equal(m1->rcpt_lens[1], strlen("c@example.net"));
	assert_int_equal(m1->body_len, strlen("Subject: one\r\n\r\nbody one\r\n"));
	assert_memory_equal(m1->body, "Subject: one\r\n\r\nbody one\r\n", m1->body_len);
	assert_int_equal(m1->attempts, 0);
	assert_true(m1->created > 0);
	assert_true(m1->lease > 0);
	assert_string_equal(m1->meta, "{}");
	assert_string_equal(m2->from, "");
	assert_non_null(strstr(m2->meta, "\"k\""));

	/* renew both leases, one with a wrong token */
	struct rq_queue_lease ls[2] = {{m1->id, m1->lease}, {m2->id, m2->lease + 1000}};
	struct res rn = {0};
	assert_int_equal(rq_queue_renew(c.q, 120000, ls, 2, count_cb, &rn), 0);
	assert_true(run_until(c.base, res_done, &rn, 5000));
	assert_int_equal(rn.st, RQ_QUEUE_OK);
	assert_int_equal(rn.n, 1);

	/* m1's body written: release it early; id and lease stay */
	rq_queue_msg_release(claim, 0);
	assert_true(m1->released);
	assert_null(m1->body);
	assert_string_equal(m1->id, id1);
	rq_queue_msg_release(claim, 0);

	/* settle: m1 delivered to b, deferred for c (reply text needing JSON
	 * escapes); m2 delivered */
	const char *text = "4.2.0 \"greylisted\" \\ try\r\nlater\x01 caf\xc3\xa9";
	struct rq_queue_outcomes oc;
	rq_queue_outcomes_init(&oc);
	assert_int_equal(rq_queue_outcomes_msg(&oc, m1->id, m1->lease, true, claim->now + 600000, false), 0);
	struct rq_queue_rcpt_outcome r1 = {.to = "b@example.net", .s = RQ_QUEUE_RCPT_DELIVERED,
					   .code = 250, .enh = "2.0.0", .text = "ok", .stage = "dot"};
	struct rq_queue_rcpt_outcome r2 = {.to = "c@example.net", .s = RQ_QUEUE_RCPT_DEFERRED,
					   .code = 450, .enh = "4.2.0", .text = text, .stage = "rcpt"};
	assert_int_equal(rq_queue_outcomes_rcpt(&oc, &r1), 0);
	assert_int_equal(rq_queue_outcomes_rcpt(&oc, &r2), 0);
	assert_int_equal(rq_queue_outcomes_msg(&oc, m2->id, m2->lease, true, -1, false), 0);
	struct rq_queue_rcpt_outcome r3 = {.to = "d@example.org", .s = RQ_QUEUE_RCPT_DELIVERED, .code = 250};
	assert_int_equal(rq_queue_outcomes_rcpt(&oc, &r3), 0);
	struct res st = {0};
	assert_int_equal(rq_queue_settle(c.q, &oc, settle_cb, &st), 0);
	assert_true(run_until(c.base, res_done, &st, 5000));
	assert_int_equal(st.st, RQ_QUEUE_OK);
	assert_int_equal(st.nsettled, 2);
	assert_int_equal(st.settled[0], RQ_QUEUE_SETTLE_SCHEDULED);
	assert_int_equal(st.settled[1], RQ_QUEUE_SETTLE_DONE);

	/* what a user checks in Redis */
	char *lt = sync_str(rc, "HGET %s:msg:%s last_text", prefix, id1);
	assert_non_null(lt);
	assert_string_equal(lt, text);
	free(lt);
	assert_int_equal(sync_int(rc, "EXISTS %s:msg:%s", prefix, id2), 0);
	assert_int_equal(sync_int(rc, "ZCARD %s:scheduled", prefix), 1);

	/* the same settle again: leases are gone, "lost" */
	struct res st2 = {0};
	assert_int_equal(rq_queue_settle(c.q, &oc, settle_cb, &st2), 0);
	assert_true(run_until(c.base, res_done, &st2, 5000));
	assert_int_equal(st2.st, RQ_QUEUE_OK);
	assert_int_equal(st2.settled[0], RQ_QUEUE_SETTLE_LOST);
	assert_int_equal(st2.settled[1], RQ_QUEUE_SETTLE_LOST);

	/* a reply that does not match the request is a protocol error */
	const char *one = "[{\"id\":\"nosuchid\",\"lease\":1,\"rcpts\":[]}]";
	struct res pe = {0};
	assert_int_equal(rq_queue_settle_json(c.q, one, strlen(one), 2, settle_cb, &pe), 0);
	assert_true(run_until(c.base, res_done, &pe, 5000));
	assert_int_equal(pe.st, RQ_QUEUE_EPROTO);
	assert_int_equal(pe.nsettled, 0);
	struct res pe1 = {0};
	assert_int_equal(rq_queue_settle_json(c.q, one, strlen(one), 1, settle_cb, &pe1), 0);
	assert_true(run_until(c.base, res_done, &pe1, 5000));
	assert_int_equal(pe1.st, RQ_QUEUE_OK);
	assert_int_equal(pe1.settled[0], RQ_QUEUE_SETTLE_LOST);

	/* a Redis error reaches the callback as EREDIS with its text */
	rq_queue_outcomes_reset(&oc);
	assert_int_equal(rq_queue_outcomes_msg(&oc, "nosuchid", 1, true, -1, false), 0);
	struct rq_queue_rcpt_outcome bad = {.to = "x@example.com", .s = RQ_QUEUE_RCPT_DELIVERED};
	assert_int_equal(rq_queue_outcomes_rcpt(&oc, &bad), 0);
	const char *argv[] = {"FCALL", "relayq_settle", "1", rq_queue_prefix(c.q), "not json"};
	struct res er = {0};
	assert_int_equal(rq_queue_command(c.q, 5, argv, NULL, raw_cb, &er), 0);
	assert_true(run_until(c.base, res_done, &er, 5000));
	assert_int_equal(er.st, RQ_QUEUE_EREDIS);
	assert_non_null(strstr(er.err, "ERR relayq: "));
	rq_queue_outcomes_finish(&oc);

	/* recover: nothing expired */
	struct res rv = {0};
	assert_int_equal(rq_queue_recover(c.q, count_cb, &rv), 0);
	assert_true(run_until(c.base, res_done, &rv, 5000));
	assert_int_equal(rv.st, RQ_QUEUE_OK);
	assert_int_equal(rv.n, 0);

	rq_queue_claim_free(claim);
	free(id1);
	free(id2);
	ctx_close(&c);
	redisFree(rc);
	th_redis_stop(&rs);
}

static bool got_publish(void *arg)
{
	return ((struct ctx *)arg)->wakes[RQ_QUEUE_WAKE_PUBLISH] > 0;
}

struct timer_wait {
	struct ctx *c;
	int before;
};

static bool timer_fired(void *arg)
{
	struct timer_wait *t = arg;
	return t->c->wakes[RQ_QUEUE_WAKE_TIMER] > t->before;
}

static void tcp_db_and_wake_on_enqueue(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	const char *qn = th_unique_queue("wake");
	char url[128];
	snprintf(url, sizeof(url), "redis://127.0.0.1:%d/3", rs.port);
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, url, qn);
	ctx_open_ready(&c, &o);
	assert_string_equal(rq_queue_url_redacted(c.q), url);
	assert_int_equal(c.wakes[RQ_QUEUE_WAKE_PUBLISH], 0);

	/* the command connection is on db 3 */
	const char *argv[] = {"SET", "relayq-test-db", "x"};
	struct res set = {0};
	assert_int_equal(rq_queue_command(c.q, 3, argv, NULL, raw_cb, &set), 0);
	assert_true(run_until(c.base, res_done, &set, 5000));
	assert_int_equal(set.st, RQ_QUEUE_OK);
	assert_int_equal(sync_int(rc, "EXISTS relayq-test-db"), 0);
	sync_ok(rc, "SELECT 3");
	assert_int_equal(sync_int(rc, "EXISTS relayq-test-db"), 1);

	/* enqueue from another client wakes the subscriber */
	free(enqueue(rc, qn, ENV1, "x"));
	assert_true(run_until(c.base, got_publish, &c, 5000));

	/* a delayed message: claim reports next_due and arms the wake timer */
	int timers = c.wakes[RQ_QUEUE_WAKE_TIMER];
	char *idd = enqueue(rc, qn, "{\"from\":\"a@example.com\",\"to\":[\"b@example.net\"],\"delay\":1}", "later");
	struct res cl = {0};
	assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl), 0);
	assert_true(run_until(c.base, res_done, &cl, 5000));
	assert_int_equal(cl.st, RQ_QUEUE_OK);
	assert_int_equal(cl.claim->count, 1);
	assert_true(cl.claim->next_due > cl.claim->now);
	assert_true(rq_queue_wake_in(c.q) >= 0);
	/* wait for the timer wake, then claim the delayed message (a claim
	 * that comes a little early finds nothing and re-arms the timer) */
	struct res cl2 = {0};
	for (int i = 0; i < 5; i++) {
		struct timer_wait tw = {&c, c.wakes[RQ_QUEUE_WAKE_TIMER]};
		assert_true(run_until(c.base, timer_fired, &tw, 5000));
		assert_int_equal(rq_queue_wake_in(c.q), -1);
		rq_queue_claim_free(cl2.claim);
		memset(&cl2, 0, sizeof(cl2));
		assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl2), 0);
		assert_true(run_until(c.base, res_done, &cl2, 5000));
		assert_int_equal(cl2.st, RQ_QUEUE_OK);
		if (cl2.claim->count > 0)
			break;
		assert_true(cl2.claim->next_due >= cl2.claim->now);
	}
	assert_true(c.wakes[RQ_QUEUE_WAKE_TIMER] > timers);
	assert_int_equal(cl2.claim->count, 1);
	assert_string_equal(cl2.claim->msgs[0].id, idd);
	assert_string_equal(cl2.claim->msgs[0].body, "later");
	rq_queue_claim_free(cl2.claim);
	rq_queue_claim_free(cl.claim);
	free(idd);
	ctx_close(&c);
	redisFree(rc);
	th_redis_stop(&rs);
}

static bool has_error(void *arg)
{
	struct ctx *c = arg;
	return c->down > 0 && rq_queue_last_error(c->q)[0] != '\0';
}

static void password_sources(void **state)
{
	/* password with characters that need %-encoding in a URL */
	const char *pw = "s3cr:t@pw%x";
	const char *pw_enc = "s3cr%3At%40pw%25x";
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	sync_ok(rc, "CONFIG SET requirepass %s", pw);
	const char *qn = th_unique_queue("pw");
	char url[256];

	/* in the URL, no user */
	snprintf(url, sizeof(url), "redis://:%s@127.0.0.1:%d", pw_enc, rs.port);
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, url, qn);
	ctx_open_ready(&c, &o);
	assert_null(strstr(rq_queue_url_redacted(c.q), "s3cr"));
	assert_non_null(strstr(rq_queue_url_redacted(c.q), "***@127.0.0.1"));
	ctx_close(&c);

	/* in the URL with the ACL user "default" */
	snprintf(url, sizeof(url), "redis://default:%s@127.0.0.1:%d/0", pw_enc, rs.port);
	memset(&c, 0, sizeof(c));
	o = base_opts(&c, url, qn);
	ctx_open_ready(&c, &o);
	char want[256];
	snprintf(want, sizeof(want), "redis://default:***@127.0.0.1:%d/0", rs.port);
	assert_string_equal(rq_queue_url_redacted(c.q), want);
	assert_null(strstr(rq_queue_url_redacted(c.q), "s3cr"));
	ctx_close(&c);

	/* from an environment variable, over the unix socket */
	setenv("RQ_TEST_REDIS_PW", pw, 1);
	memset(&c, 0, sizeof(c));
	o = base_opts(&c, rs.url, qn);
	o.password_env = "RQ_TEST_REDIS_PW";
	ctx_open_ready(&c, &o);
	ctx_close(&c);
	unsetenv("RQ_TEST_REDIS_PW");

	/* from a file (first line, newline stripped) */
	char *dir = th_mkdtemp("pwfile");
	char path[512];
	snprintf(path, sizeof(path), "%s/secret", dir);
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fprintf(f, "%s\n", pw);
	fclose(f);
	memset(&c, 0, sizeof(c));
	o = base_opts(&c, rs.url, qn);
	o.password_file = path;
	ctx_open_ready(&c, &o);
	ctx_close(&c);

	/* a wrong password: a clear error, without the password, retried */
	f = fopen(path, "w");
	fprintf(f, "Wr0ngPassw0rd\n");
	fclose(f);
	memset(&c, 0, sizeof(c));
	o = base_opts(&c, rs.url, qn);
	o.password_file = path;
	ctx_open(&c, &o);
	assert_true(run_until(c.base, has_error, &c, 5000));
	const char *e = rq_queue_last_error(c.q);
	assert_non_null(strstr(e, "AUTH"));
	assert_non_null(strstr(e, "WRONGPASS"));
	assert_null(strstr(e, "Wr0ng"));
	assert_non_null(strstr(c.down_err, "AUTH"));
	assert_null(strstr(c.down_err, "Wr0ng"));
	struct rq_queue_stats st;
	rq_queue_get_stats(c.q, &st);
	assert_int_not_equal(st.state, RQ_QUEUE_READY);
	/* a claim made meanwhile waits, then is cancelled by destroy */
	struct res cl = {0};
	assert_int_equal(rq_queue_claim(c.q, 1, 1000, claim_cb, &cl), 0);
	run_until(c.base, is_ready, &c, 100);
	assert_int_equal(cl.calls, 0);
	rq_queue_destroy(c.q);
	c.q = NULL;
	assert_int_equal(cl.calls, 1);
	assert_int_equal(cl.st, RQ_QUEUE_ECANCEL);
	event_base_free(c.base);

	/* no password at all against requirepass: NOAUTH */
	memset(&c, 0, sizeof(c));
	o = base_opts(&c, rs.url, qn);
	ctx_open(&c, &o);
	assert_true(run_until(c.base, has_error, &c, 5000));
	assert_non_null(strstr(rq_queue_last_error(c.q), "NOAUTH"));
	ctx_close(&c);

	/* option errors never show the password */
	char err[256];
	struct event_base *b = event_base_new();
	snprintf(url, sizeof(url), "redis://:%s@127.0.0.1:%d", "TopSecret", rs.port);
	o = base_opts(&c, url, qn);
	o.password_env = "RQ_TEST_REDIS_PW";
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	assert_non_null(strstr(err, "more than once"));
	assert_null(strstr(err, "TopSecret"));
	o = base_opts(&c, rs.url, qn);
	o.password_env = "RQ_TEST_REDIS_PW_UNSET";
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	assert_non_null(strstr(err, "RQ_TEST_REDIS_PW_UNSET"));
	snprintf(url, sizeof(url), "http://u:TopSecret@127.0.0.1:%d", rs.port);
	o = base_opts(&c, url, qn);
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	assert_null(strstr(err, "TopSecret"));
	o = base_opts(&c, "redis://u:TopSecret@127.0.0.1:port", qn);
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	assert_non_null(strstr(err, "port"));
	assert_null(strstr(err, "TopSecret"));
	event_base_free(b);

	th_rmrf(dir);
	free(dir);
	redisFree(rc);
	th_redis_stop(&rs);
}

static void url_redaction_and_errors(void **state)
{
	char out[256];
	rq_redis_url_redact("redis://user:pa:ss@10.0.0.1:6379/2", out, sizeof(out));
	assert_string_equal(out, "redis://user:***@10.0.0.1:6379/2");
	rq_redis_url_redact("redis://secretonly@10.0.0.1", out, sizeof(out));
	assert_string_equal(out, "redis://***@10.0.0.1");
	rq_redis_url_redact("redis://10.0.0.1:6379", out, sizeof(out));
	assert_string_equal(out, "redis://10.0.0.1:6379");
	rq_redis_url_redact("unix:/run/redis.sock", out, sizeof(out));
	assert_string_equal(out, "unix:/run/redis.sock");

	struct event_base *b = event_base_new();
	struct ctx c = {0};
	char err[256];
	const char *bad[] = {"redis://127.0.0.1:0", "redis://127.0.0.1:99999", "redis://127.0.0.1/x",
			     "redis://[::1", "unix:relative.sock", "unix:/tmp/x.sock?db=x",
			     "redis://", "redis://:%zz@127.0.0.1", "redis://u:p@"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		struct rq_queue_opts o = base_opts(&c, bad[i], "q");
		err[0] = '\0';
		struct rq_queue *q = rq_queue_create(b, &o, err, sizeof(err));
		if (q)
			fail_msg("accepted %s", bad[i]);
		assert_true(err[0] != '\0');
	}
	struct rq_queue_opts o = base_opts(&c, "redis://127.0.0.1", "bad{name}");
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	o = base_opts(&c, "redis://127.0.0.1", "");
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	/* good ones parse (nothing listens: creation still succeeds) */
	const char *good[] = {"redis://127.0.0.1", "redis://[::1]:1/0", "unix:/nonexistent/redis.sock?db=2",
			      "unix:///nonexistent/redis.sock", "redis://localhost:1"};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		o = base_opts(&c, good[i], "q");
		struct rq_queue *q = rq_queue_create(b, &o, err, sizeof(err));
		if (!q)
			fail_msg("refused %s: %s", good[i], err);
		rq_queue_destroy(q);
	}
	event_base_free(b);
}

/* The one URL parser: fields, the special-character rule, refusals whose
 * messages never hold the password, and a redaction that never lets the
 * password through. */
static void url_parser_one_rule(void **state)
{
	struct rq_redis_url u;
	char err[200];

	assert_int_equal(rq_redis_url_parse("redis://app:s3cr%40t%2F%3F%23%25:x@[::1]:6380/3",
					    &u, err, sizeof(err)), 0);
	assert_false(u.is_unix);
	assert_string_equal(u.host, "::1");
	assert_int_equal(u.port, 6380);
	assert_int_equal(u.db, 3);
	assert_string_equal(u.user, "app");
	assert_true(u.has_password);
	assert_string_equal(u.password, "s3cr@t/?#%:x");
	rq_redis_url_wipe(&u);
	assert_string_equal(u.password, "");

	assert_int_equal(rq_redis_url_parse("redis://:only@redis.example:1", &u, err, sizeof(err)), 0);
	assert_string_equal(u.user, "");
	assert_string_equal(u.password, "only");
	assert_string_equal(u.host, "redis.example");
	assert_int_equal(u.port, 1);
	assert_int_equal(u.db, 0);
	/* RFC 3986: no ':' in the userinfo: a user */
	assert_int_equal(rq_redis_url_parse("redis://default@127.0.0.1/", &u, err, sizeof(err)), 0);
	assert_string_equal(u.user, "default");
	assert_false(u.has_password);
	assert_int_equal(u.port, 6379);
	assert_int_equal(rq_redis_url_parse("unix:///run/r.sock?db=7", &u, err, sizeof(err)), 0);
	assert_true(u.is_unix);
	assert_string_equal(u.path, "/run/r.sock");
	assert_int_equal(u.db, 7);

	/* refused, never echoing the password (which holds "s3cret") */
	const char *bad[] = {
		"redis://:s3cret#pw@127.0.0.1",      /* '#' not encoded */
		"redis://:s3cret?pw@127.0.0.1",      /* '?' not encoded */
		"redis://:s3cret/pw@127.0.0.1",      /* '/' not encoded */
		"redis://:s3cret@pw@127.0.0.1",      /* '@' not encoded */
		"redis:/:s3cretpw@127.0.0.1",        /* no "//" */
		"redis//:s3cretpw@127.0.0.1",
		"rediss://:s3cretpw@127.0.0.1",
		"http://:s3cretpw@127.0.0.1",
		"redis://:s3cretpw%@127.0.0.1",
		"redis://:s3cret%00pw@127.0.0.1",
		"redis://:s3cret pw@127.0.0.1",
		"redis://:s3cretpw@127.0.0.1:0",
		"redis://:s3cretpw@127.0.0.1:65536",
		"redis://:s3cretpw@127.0.0.1/db",
		"redis://:s3cretpw@127.0.0.1/1?x=1",
		"redis://:s3cretpw@127.0.0.1#frag",
		"redis://:s3cretpw@[::1",
		"redis://:s3cretpw@[nothex]",
		"redis://:s3cretpw@ho$t",
		"redis://:s3cretpw@",
		"redis://u%0a:s3cretpw@127.0.0.1",
		"s3cretpw",
		"unix:relative?db=1&p=s3cret",
		"unix:/tmp/x.sock?db=s3cret",
		"",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char red[300];
		err[0] = '\0';
		if (rq_redis_url_parse(bad[i], &u, err, sizeof(err)) == 0)
			fail_msg("accepted %s", bad[i]);
		assert_true(err[0] != '\0');
		assert_null(strstr(err, "s3cret"));
		assert_string_equal(u.password, "");
		rq_redis_url_redact(bad[i], red, sizeof(red));
		if (strstr(red, "s3cret") || strstr(red, "pw@"))
			fail_msg("redaction of %s shows %s", bad[i], red);
	}
	/* the hints name the rule */
	rq_redis_url_parse("redis://:s3cret#pw@127.0.0.1", &u, err, sizeof(err));
	assert_non_null(strstr(err, "%23"));
	rq_redis_url_parse("redis://:s3cret@pw@127.0.0.1", &u, err, sizeof(err));
	assert_non_null(strstr(err, "%40"));

	/* redaction: parsed URLs keep everything but the password; unparsed
	 * ones show the scheme only */
	char red[300];
	rq_redis_url_redact("redis:/:s3cret@127.0.0.1", red, sizeof(red));
	assert_string_equal(red, "...");
	rq_redis_url_redact("redis://:s3cret#x@127.0.0.1", red, sizeof(red));
	assert_string_equal(red, "redis://...");
	rq_redis_url_redact("unix:/x?db=s3cret", red, sizeof(red));
	assert_string_equal(red, "unix:...");
	rq_redis_url_redact("redis://app:s3cr%40t@127.0.0.1:6380/2", red, sizeof(red));
	assert_string_equal(red, "redis://app:***@127.0.0.1:6380/2");
	rq_redis_url_redact("redis://:s3cret@127.0.0.1", red, sizeof(red));
	assert_string_equal(red, "redis://:***@127.0.0.1");
	rq_redis_url_redact("redis://app:@127.0.0.1", red, sizeof(red));
	assert_string_equal(red, "redis://app:@127.0.0.1");
	rq_redis_url_redact("unix:/run/redis.sock?db=1", red, sizeof(red));
	assert_string_equal(red, "unix:/run/redis.sock?db=1");

	/* rq_queue_create uses the same parser and never shows the password */
	struct event_base *b = event_base_new();
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, "redis://:s3cret#pw@127.0.0.1", "q");
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	assert_non_null(strstr(err, "%23"));
	assert_null(strstr(err, "s3cret"));
	o = base_opts(&c, "redis:/:s3cretpw@127.0.0.1", "q");
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	assert_null(strstr(err, "s3cret"));
	o = base_opts(&c, "redis://s3cretpw@127.0.0.1", "q");
	assert_null(rq_queue_create(b, &o, err, sizeof(err)));
	assert_non_null(strstr(err, "without a password"));
	assert_null(strstr(err, "s3cret"));
	o = base_opts(&c, "redis://app:s3cr%23t@127.0.0.1:1/2", "q");
	struct rq_queue *q = rq_queue_create(b, &o, err, sizeof(err));
	assert_non_null(q);
	assert_string_equal(rq_queue_url_redacted(q), "redis://app:***@127.0.0.1:1/2");
	rq_queue_destroy(q);
	event_base_free(b);
}

static void outcomes_json(void **state)
{
	struct rq_queue_outcomes o;
	rq_queue_outcomes_init(&o);
	size_t len = 0;
	assert_null(rq_queue_outcomes_json(&o, &len));
	struct rq_queue_rcpt_outcome r = {.to = "a@b", .s = RQ_QUEUE_RCPT_FAILED, .code = 550,
					  .enh = "5.1.1", .text = "no \"such\"\tuser\\\n\x7f",
					  .stage = "rcpt", .hint = "h"};
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), -1);   /* no message open */
	assert_int_equal(rq_queue_outcomes_msg(&o, "id1", 7, false, 1000, true), 0);
	assert_int_equal(rq_queue_outcomes_rcpt(&o, &r), 0);
	const char *j = rq_queue_outcomes_json(&o, &len);
	const char *want = "[{\"id\":\"id1\",\"lease\":7,\"attempt\":false,\"next\":1000,\"hold\":true,"
			   "\"rcpts\":[{\"to\":\"a@b\",\"s\":\"failed\",\"code\":550,\"enh\":\"5.1.1\","
			   "\"text\":\"no \\\"such\\\"\\tuser\\\\\\n\\u007f\",\"stage\":\"rcpt\",\"hint\":\"h\"}]}]";
	assert_string_equal(j, want);
	assert_int_equal(len, strlen(want));
	/* more messages after reading the JSON */
	assert_int_equal(rq_queue_outcomes_msg(&o, "id2", 8, true, -1, false), 0);
	j = rq_queue_outcomes_json(&o, &len);
	assert_non_null(strstr(j, "]},{\"id\":\"id2\",\"lease\":8,\"attempt\":true,\"hold\":false,\"rcpts\":[]}]"));
	assert_int_equal(len, strlen(j));
	rq_queue_outcomes_reset(&o);
	assert_null(rq_queue_outcomes_json(&o, &len));
	rq_queue_outcomes_finish(&o);
	rq_queue_outcomes_finish(&o);
}

static void library_loaded_when_missing_or_old(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	redisReply *r = redisCommand(rc, "FUNCTION DELETE relayq");
	freeReplyObject(r);
	r = redisCommand(rc, "FCALL relayq_version 0");
	assert_int_equal(r->type, REDIS_REPLY_ERROR);
	freeReplyObject(r);

	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, th_unique_queue("lib"));
	ctx_open_ready(&c, &o);
	struct rq_queue_stats st;
	rq_queue_get_stats(c.q, &st);
	assert_int_equal(st.library_loads, 1);
	assert_int_equal(sync_int(rc, "FCALL relayq_version 0"), rq_fnlib_version());
	ctx_close(&c);

	/* present and current: not loaded again */
	memset(&c, 0, sizeof(c));
	ctx_open_ready(&c, &o);
	rq_queue_get_stats(c.q, &st);
	assert_int_equal(st.library_loads, 0);
	ctx_close(&c);

	/* an older library is replaced */
	if (rq_fnlib_version() > 0) {
		sync_ok(rc, "FUNCTION LOAD REPLACE %s",
			"#!lua name=relayq\nredis.register_function('relayq_version', function() return 0 end)");
		memset(&c, 0, sizeof(c));
		ctx_open_ready(&c, &o);
		rq_queue_get_stats(c.q, &st);
		assert_int_equal(st.library_loads, 1);
		assert_int_equal(sync_int(rc, "FCALL relayq_version 0"), rq_fnlib_version());
		ctx_close(&c);
	}

	/* deleted while connected: the next call reloads and succeeds */
	memset(&c, 0, sizeof(c));
	ctx_open_ready(&c, &o);
	sync_ok(rc, "FUNCTION DELETE relayq");
	struct res rv = {0};
	assert_int_equal(rq_queue_recover(c.q, count_cb, &rv), 0);
	assert_true(run_until(c.base, res_done, &rv, 10000));
	assert_int_equal(rv.st, RQ_QUEUE_OK);
	rq_queue_get_stats(c.q, &st);
	assert_int_equal(st.library_loads, 1);
	assert_true(st.retried >= 1);

	/* a function the library does not have: retried a few times (each
	 * time after a reload), then reported, not retried forever */
	const char *argv[] = {"FCALL", "relayq_no_such_function", "0"};
	struct res nf = {0};
	assert_int_equal(rq_queue_command(c.q, 3, argv, NULL, raw_cb, &nf), 0);
	assert_true(run_until(c.base, res_done, &nf, 10000));
	assert_int_equal(nf.st, RQ_QUEUE_EREDIS);
	assert_non_null(strstr(nf.err, "Function not found"));
	ctx_close(&c);
	redisFree(rc);
	th_redis_stop(&rs);
}

#define NMSG 400

static void pipelining_many(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	const char *qn = th_unique_queue("pipe");
	char prefix[256];
	snprintf(prefix, sizeof(prefix), "relayq:{%s}", qn);
	for (int i = 0; i < NMSG; i++)
		redisAppendCommand(rc, "FCALL relayq_enqueue 1 %s %s body%d", prefix,
				   "{\"from\":\"a@example.com\",\"to\":[\"b@example.net\"]}", i);
	for (int i = 0; i < NMSG; i++) {
		void *v;
		assert_int_equal(redisGetReply(rc, &v), REDIS_OK);
		assert_int_equal(((redisReply *)v)->type, REDIS_REPLY_STRING);
		freeReplyObject(v);
	}
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, qn);
	ctx_open_ready(&c, &o);

	/* 60 claims of 8 and 100 recovers, all written before any reply */
	enum { NCL = 60, NRV = 100 };
	struct res cls[NCL + NRV];
	memset(cls, 0, sizeof(cls));
	for (int i = 0; i < NCL + NRV; i++) {
		if (i < NCL)
			assert_int_equal(rq_queue_claim(c.q, 8, 60000, claim_cb, &cls[i]), 0);
		else
			assert_int_equal(rq_queue_recover(c.q, count_cb, &cls[i]), 0);
	}
	struct rq_queue_stats st;
	rq_queue_get_stats(c.q, &st);
	assert_int_equal(st.inflight, NCL + NRV);
	struct many m = {cls, NCL + NRV};
	assert_true(run_until(c.base, all_done, &m, 20000));
	size_t total = 0;
	char *seen = calloc(NMSG, 1);
	struct rq_queue_outcomes oc;
	rq_queue_outcomes_init(&oc);
	for (int i = 0; i < NCL; i++) {
		assert_int_equal(cls[i].st, RQ_QUEUE_OK);
		struct rq_queue_claim *cl = cls[i].claim;
		for (size_t k = 0; k < cl->count; k++) {
			int n = atoi(cl->msgs[k].body + 4);
			assert_true(n >= 0 && n < NMSG);
			assert_int_equal(seen[n], 0);
			seen[n] = 1;
			rq_queue_outcomes_msg(&oc, cl->msgs[k].id, cl->msgs[k].lease, true, -1, false);
			struct rq_queue_rcpt_outcome ro = {.to = cl->msgs[k].rcpts[0],
							   .s = RQ_QUEUE_RCPT_DELIVERED, .code = 250};
			rq_queue_outcomes_rcpt(&oc, &ro);
		}
		total += cl->count;
		/* settle each claim's batch, pipelined */
		if (cl->count > 0) {
			cls[i].calls = 0;
			assert_int_equal(rq_queue_settle(c.q, &oc, settle_cb, &cls[i]), 0);
		}
		rq_queue_outcomes_reset(&oc);
		rq_queue_claim_free(cl);
	}
	assert_int_equal(total, NMSG);
	for (int i = NCL; i < NCL + NRV; i++)
		assert_int_equal(cls[i].n, 0);
	m.n = NCL;
	assert_true(run_until(c.base, all_done, &m, 20000));
	for (int i = 0; i < NCL; i++) {
		assert_int_equal(cls[i].st, RQ_QUEUE_OK);
		for (size_t k = 0; k < cls[i].nsettled; k++)
			assert_int_equal(cls[i].settled[k], RQ_QUEUE_SETTLE_DONE);
	}
	assert_int_equal(sync_int(rc, "ZCARD %s:inflight", prefix), 0);
	assert_int_equal(sync_int(rc, "LLEN %s:ready", prefix), 0);
	rq_queue_outcomes_finish(&oc);
	free(seen);
	ctx_close(&c);
	redisFree(rc);
	th_redis_stop(&rs);
}

static bool down_seen(void *arg)
{
	return ((struct ctx *)arg)->down > 0;
}

/* Nothing listens yet (connection refused, retried with backoff); a claim
 * made meanwhile completes once a redis-server starts on that port. */
static void connect_refused_then_server_starts(void **state)
{
	int port = th_free_port();
	char url[128], portstr[16];
	snprintf(url, sizeof(url), "redis://127.0.0.1:%d/0", port);
	snprintf(portstr, sizeof(portstr), "%d", port);
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, url, th_unique_queue("late"));
	ctx_open(&c, &o);
	struct res cl = {0};
	assert_int_equal(rq_queue_claim(c.q, 5, 60000, claim_cb, &cl), 0);
	assert_true(run_until(c.base, down_seen, &c, 5000));
	assert_non_null(strstr(c.down_err, "127.0.0.1"));
	assert_int_equal(cl.calls, 0);

	char *dir = th_mkdtemp("late");
	char log[600];
	snprintf(log, sizeof(log), "%s/redis.log", dir);
	char *argv[] = {"redis-server", "--port", portstr, "--bind", "127.0.0.1", "--save", "",
			"--dir", dir, "--daemonize", "no", NULL};
	struct th_proc p;
	assert_int_equal(th_spawn(&p, argv, log), 0);
	assert_true(run_until(c.base, res_done, &cl, 10000));
	assert_int_equal(cl.st, RQ_QUEUE_OK);
	assert_int_equal(cl.claim->count, 0);
	assert_int_equal(c.ready, 1);
	struct rq_queue_stats st;
	rq_queue_get_stats(c.q, &st);
	assert_int_equal(st.library_loads, 1);   /* a fresh server */
	rq_queue_claim_free(cl.claim);
	ctx_close(&c);
	th_stop(&p, SIGTERM);
	th_rmrf(dir);
	free(dir);
}

static bool inflight_some(void *arg)
{
	struct ctx *c = arg;
	struct rq_queue_stats st;
	rq_queue_get_stats(c->q, &st);
	return st.inflight > 0;
}

static void reconnect_across_restart(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, true);
	redisContext *rc = th_redis_connect(&rs);
	sync_ok(rc, "CONFIG SET appendfsync always");
	const char *qn = th_unique_queue("restart");
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, qn);
	ctx_open_ready(&c, &o);
	char *ids[3];
	for (int i = 0; i < 3; i++)
		ids[i] = enqueue(rc, qn, ENV1, "restart body");
	redisFree(rc);

	/* 1. Redis goes away; commands made while it is down complete after */
	th_redis_kill(&rs, false);
	assert_true(run_until(c.base, is_not_ready, &c, 5000));
	struct res cl = {0}, rv = {0};
	assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl), 0);
	assert_int_equal(rq_queue_recover(c.q, count_cb, &rv), 0);
	run_until(c.base, res_done, &cl, 300);   /* reconnects fail meanwhile */
	assert_int_equal(cl.calls, 0);
	assert_true(c.down >= 1);
	int wakes = c.wakes[RQ_QUEUE_WAKE_CONNECT];
	th_redis_restart(&rs);
	assert_true(run_until(c.base, res_done, &cl, 10000));
	assert_true(run_until(c.base, res_done, &rv, 10000));
	assert_int_equal(cl.st, RQ_QUEUE_OK);
	assert_int_equal(cl.claim->count, 3);
	for (int i = 0; i < 3; i++)
		assert_string_equal(cl.claim->msgs[i].id, ids[i]);
	assert_int_equal(rv.st, RQ_QUEUE_OK);
	assert_true(run_until(c.base, is_ready, &c, 5000));
	assert_true(c.wakes[RQ_QUEUE_WAKE_CONNECT] > wakes);   /* woken on re-subscribe */
	assert_int_equal(c.ready, 2);

	/* 2. a command in flight when the server dies is sent again. The
	 * restart above reset appendfsync to everysec, which may postpone the
	 * AOF write past the reply while a slow fsync runs (a loaded machine):
	 * the enqueue must be on disk before the SIGKILL. */
	rc = th_redis_connect(&rs);
	sync_ok(rc, "CONFIG SET appendfsync always");
	char *id4 = enqueue(rc, qn, ENV1, "in flight");
	redisFree(rc);
	th_pause(rs.proc.pid);
	struct res cl2 = {0};
	assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl2), 0);
	assert_true(run_until(c.base, inflight_some, &c, 5000));
	th_redis_kill(&rs, true);   /* SIGKILL works on a stopped process */
	th_redis_restart(&rs);
	assert_true(run_until(c.base, res_done, &cl2, 10000));
	assert_int_equal(cl2.st, RQ_QUEUE_OK);
	assert_int_equal(cl2.claim->count, 1);
	assert_string_equal(cl2.claim->msgs[0].id, id4);
	struct rq_queue_stats st;
	rq_queue_get_stats(c.q, &st);
	assert_true(st.retried + st.sent >= 4);
	assert_true(st.disconnects >= 2);

	/* 3. many pipelined commands caught by the crash: each completes once */
	enum { NP = 200, ND = 100 };
	struct res *many = calloc(NP + ND, sizeof(*many));
	th_pause(rs.proc.pid);
	for (int i = 0; i < NP; i++)
		assert_int_equal(rq_queue_recover(c.q, count_cb, &many[i]), 0);
	assert_true(run_until(c.base, inflight_some, &c, 5000));
	th_redis_kill(&rs, true);
	for (int i = 0; i < ND; i++)   /* and more while it is down */
		assert_int_equal(rq_queue_recover(c.q, count_cb, &many[NP + i]), 0);
	th_redis_restart(&rs);
	struct many mw = {many, NP + ND};
	assert_true(run_until(c.base, all_done, &mw, 10000));
	event_base_loop(c.base, EVLOOP_NONBLOCK);
	for (int i = 0; i < NP + ND; i++) {
		assert_int_equal(many[i].calls, 1);
		assert_int_equal(many[i].st, RQ_QUEUE_OK);
	}
	free(many);

	rq_queue_claim_free(cl.claim);
	rq_queue_claim_free(cl2.claim);
	for (int i = 0; i < 3; i++)
		free(ids[i]);
	free(id4);
	ctx_close(&c);
	th_redis_stop(&rs);
}

static bool watchdog_fired(void *arg)
{
	struct ctx *c = arg;
	struct rq_queue_stats st;
	rq_queue_get_stats(c->q, &st);
	return st.watchdog_drops > 0;
}

/* relayq_settle answers "invalid" for an entry it refuses (the others are
 * applied): RQ_QUEUE_SETTLE_INVALID, and nothing written for it. */
static void settle_invalid_entry(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	const char *qn = th_unique_queue("inv");
	char *id1 = enqueue(rc, qn, ENV1, "one");
	char *id2 = enqueue(rc, qn, "{\"from\":\"\",\"to\":[\"d@example.org\"]}", "two");
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, qn);
	ctx_open_ready(&c, &o);
	struct res cl = {0};
	assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl), 0);
	assert_true(run_until(c.base, res_done, &cl, 5000));
	assert_int_equal(cl.st, RQ_QUEUE_OK);
	assert_int_equal(cl.claim->count, 2);
	const struct rq_queue_msg *m1 = &cl.claim->msgs[0], *m2 = &cl.claim->msgs[1];
	assert_string_equal(m1->id, id1);
	char json[600];
	snprintf(json, sizeof(json),
		 "[{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[],\"bogus\":1},"
		 "{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"d@example.org\",\"s\":\"delivered\",\"code\":250}]}]",
		 m1->id, (long long)m1->lease, m2->id, (long long)m2->lease);
	struct res st = {0};
	assert_int_equal(rq_queue_settle_json(c.q, json, strlen(json), 2, settle_cb, &st), 0);
	assert_true(run_until(c.base, res_done, &st, 5000));
	assert_int_equal(st.st, RQ_QUEUE_OK);
	assert_int_equal(st.nsettled, 2);
	assert_int_equal(st.settled[0], RQ_QUEUE_SETTLE_INVALID);
	assert_int_equal(st.settled[1], RQ_QUEUE_SETTLE_DONE);
	char prefix[256];
	snprintf(prefix, sizeof(prefix), "relayq:{%s}", qn);
	char *state1 = sync_str(rc, "HGET %s:msg:%s state", prefix, id1);
	assert_non_null(state1);
	assert_string_equal(state1, "inflight");   /* untouched: its lease runs out */
	free(state1);
	assert_int_equal(sync_int(rc, "EXISTS %s:msg:%s", prefix, id2), 0);
	rq_queue_claim_free(cl.claim);
	ctx_close(&c);
	free(id1);
	free(id2);
	redisFree(rc);
	th_redis_stop(&rs);
}

static bool busy_seen(void *arg)
{
	struct ctx *c = arg;
	struct rq_queue_stats st;
	rq_queue_get_stats(c->q, &st);
	return st.retried >= 1 && strstr(rq_queue_last_error(c->q), "BUSY") != NULL;
}

/* Another client's script keeps Redis busy: our claim gets BUSY, which is
 * not reported but retried; once the script is killed, the claim goes
 * through. */
static void busy_script_is_retried(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	sync_ok(rc, "CONFIG SET lua-time-limit 50");
	const char *qn = th_unique_queue("busy");
	char *id = enqueue(rc, qn, ENV1, "busy body");
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, qn);
	ctx_open_ready(&c, &o);

	/* a script that never ends, sent without waiting for its reply */
	redisContext *blocker = th_redis_connect(&rs);
	assert_int_equal(redisAppendCommand(blocker, "EVAL %s 0", "while true do end"), REDIS_OK);
	int done = 0;
	while (!done)
		assert_int_equal(redisBufferWrite(blocker, &done), REDIS_OK);
	/* busy once another client is told so */
	bool busy = false;
	for (int i = 0; i < 200 && !busy; i++) {
		redisReply *r = redisCommand(rc, "PING");
		assert_non_null(r);
		busy = r->type == REDIS_REPLY_ERROR && strncmp(r->str, "BUSY", 4) == 0;
		freeReplyObject(r);
	}
	assert_true(busy);

	struct res cl = {0};
	assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl), 0);
	assert_true(run_until(c.base, busy_seen, &c, 10000));
	assert_int_equal(cl.calls, 0);      /* not reported: retried */

	sync_ok(rc, "SCRIPT KILL");
	assert_true(run_until(c.base, res_done, &cl, 10000));
	assert_int_equal(cl.st, RQ_QUEUE_OK);
	assert_int_equal(cl.claim->count, 1);
	assert_string_equal(cl.claim->msgs[0].id, id);
	rq_queue_claim_free(cl.claim);
	redisReply *r = NULL;
	redisGetReply(blocker, (void **)&r);   /* the killed script's error */
	freeReplyObject(r);

	ctx_close(&c);
	free(id);
	redisFree(blocker);
	redisFree(rc);
	th_redis_stop(&rs);
}

struct probe_wait {
	struct ctx *c;
	uint64_t pings;
	int wakes_connect;
};

static bool probes_answered(void *arg)
{
	struct probe_wait *w = arg;
	struct rq_queue_stats st;
	rq_queue_get_stats(w->c->q, &st);
	return st.sub_pings >= w->pings && st.subscribed;
}

static bool unsubscribed(void *arg)
{
	struct rq_queue_stats st;
	rq_queue_get_stats(((struct ctx *)arg)->q, &st);
	return !st.subscribed;
}

static bool resubscribed(void *arg)
{
	struct probe_wait *w = arg;
	struct rq_queue_stats st;
	rq_queue_get_stats(w->c->q, &st);
	return st.subscribed && w->c->wakes[RQ_QUEUE_WAKE_CONNECT] > w->wakes_connect;
}

static bool publish_woke(void *arg)
{
	return ((struct ctx *)arg)->wakes[RQ_QUEUE_WAKE_PUBLISH] > 0;
}

/* The subscriber connection's liveness probe: answered probes change
 * nothing (wake-ups still arrive); on a silent server the connection is
 * dropped and, once Redis answers again, resubscribed with a CONNECT wake. */
static void subscriber_probe(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	const char *qn = th_unique_queue("probe");
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, qn);
	o.sub_ping_ms = 50;
	o.cmd_timeout_ms = 400;
	ctx_open_ready(&c, &o);

	struct probe_wait w = {&c, 5, 0};
	assert_true(run_until(c.base, probes_answered, &w, 10000));
	struct rq_queue_stats st;
	rq_queue_get_stats(c.q, &st);
	assert_int_equal(st.disconnects, 0);
	assert_int_equal(st.watchdog_drops, 0);
	char *id = enqueue(rc, qn, ENV1, "probe body");
	assert_true(run_until(c.base, publish_woke, &c, 5000));
	free(id);

	th_pause(rs.proc.pid);
	assert_true(run_until(c.base, unsubscribed, &c, 10000));
	rq_queue_get_stats(c.q, &st);
	assert_true(st.watchdog_drops >= 1);
	assert_non_null(strstr(rq_queue_last_error(c.q), "subscriber ping timed out"));
	w.wakes_connect = c.wakes[RQ_QUEUE_WAKE_CONNECT];
	kill(rs.proc.pid, SIGCONT);
	assert_true(run_until(c.base, resubscribed, &w, 10000));

	ctx_close(&c);
	redisFree(rc);
	th_redis_stop(&rs);
}

static void watchdog_on_stopped_server(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	redisContext *rc = th_redis_connect(&rs);
	const char *qn = th_unique_queue("wd");
	char *id = enqueue(rc, qn, ENV1, "wd body");
	redisFree(rc);
	char url[128];
	snprintf(url, sizeof(url), "redis://127.0.0.1:%d", rs.port);
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, url, qn);
	o.cmd_timeout_ms = 300;
	ctx_open_ready(&c, &o);

	th_pause(rs.proc.pid);
	struct res cl = {0};
	assert_int_equal(rq_queue_claim(c.q, 10, 60000, claim_cb, &cl), 0);
	assert_true(run_until(c.base, watchdog_fired, &c, 10000));
	assert_int_equal(cl.calls, 0);
	assert_non_null(strstr(rq_queue_last_error(c.q), "timed out"));
	kill(rs.proc.pid, SIGCONT);
	assert_true(run_until(c.base, res_done, &cl, 10000));
	assert_int_equal(cl.st, RQ_QUEUE_OK);
	/* the first, dropped attempt may have leased it already: then the
	 * retry finds nothing ready (its lease expires in 60 s) */
	assert_true(cl.claim->count <= 1);
	if (cl.claim->count == 1)
		assert_string_equal(cl.claim->msgs[0].id, id);
	struct rq_queue_stats st;
	rq_queue_get_stats(c.q, &st);
	assert_true(st.watchdog_drops >= 1);
	rq_queue_claim_free(cl.claim);
	free(id);
	ctx_close(&c);
	th_redis_stop(&rs);
}

static bool q_gone(void *arg)
{
	return ((struct ctx *)arg)->q == NULL;
}

static void destroy_with_pending(void **state)
{
	struct th_redis rs;
	th_redis_start(&rs, false);
	const char *qn = th_unique_queue("destroy");
	struct ctx c = {0};
	struct rq_queue_opts o = base_opts(&c, rs.url, qn);

	/* 1. commands in flight on a stopped server, and queued ones */
	ctx_open_ready(&c, &o);
	th_pause(rs.proc.pid);
	struct res r[5];
	memset(r, 0, sizeof(r));
	assert_int_equal(rq_queue_claim(c.q, 5, 1000, claim_cb, &r[0]), 0);
	struct rq_queue_outcomes oc;
	rq_queue_outcomes_init(&oc);
	rq_queue_outcomes_msg(&oc, "x", 1, true, -1, false);
	assert_int_equal(rq_queue_settle(c.q, &oc, settle_cb, &r[1]), 0);
	struct rq_queue_lease l = {"x", 1};
	assert_int_equal(rq_queue_renew(c.q, 1000, &l, 1, count_cb, &r[2]), 0);
	assert_int_equal(rq_queue_recover(c.q, count_cb, &r[3]), 0);
	const char *argv[] = {"PING"};
	assert_int_equal(rq_queue_command(c.q, 1, argv, NULL, raw_cb, &r[4]), 0);
	assert_true(run_until(c.base, inflight_some, &c, 5000));
	rq_queue_destroy(c.q);
	c.q = NULL;
	for (int i = 0; i < 5; i++) {
		assert_int_equal(r[i].calls, 1);
		assert_int_equal(r[i].st, RQ_QUEUE_ECANCEL);
	}
	/* nothing more is called back once the loop runs again */
	event_base_loop(c.base, EVLOOP_NONBLOCK);
	for (int i = 0; i < 5; i++)
		assert_int_equal(r[i].calls, 1);
	kill(rs.proc.pid, SIGCONT);
	event_base_free(c.base);
	c.base = NULL;

	/* 2. destroy from inside a callback: the other pending commands are
	 * cancelled once, after the callback returns */
	memset(&c, 0, sizeof(c));
	ctx_open_ready(&c, &o);
	memset(r, 0, sizeof(r));
	r[0].destroy_in_cb = true;
	r[0].ctx = &c;
	assert_int_equal(rq_queue_recover(c.q, count_cb, &r[0]), 0);
	assert_int_equal(rq_queue_recover(c.q, count_cb, &r[1]), 0);
	assert_int_equal(rq_queue_claim(c.q, 5, 1000, claim_cb, &r[2]), 0);
	struct many m = {r, 3};
	assert_true(run_until(c.base, all_done, &m, 5000));
	assert_null(c.q);
	assert_int_equal(r[0].st, RQ_QUEUE_OK);
	assert_int_equal(r[1].calls, 1);
	assert_int_equal(r[2].calls, 1);
	assert_int_equal(r[1].st, RQ_QUEUE_ECANCEL);
	assert_int_equal(r[2].st, RQ_QUEUE_ECANCEL);
	event_base_loop(c.base, EVLOOP_NONBLOCK);
	assert_int_equal(r[1].calls, 1);
	event_base_free(c.base);
	c.base = NULL;

	/* 3. destroy while Redis is down (commands only queued) and while
	 * connecting */
	memset(&c, 0, sizeof(c));
	struct rq_queue_opts o2 = base_opts(&c, "unix:/nonexistent/relayq-test.sock", qn);
	ctx_open(&c, &o2);
	memset(r, 0, sizeof(r));
	assert_int_equal(rq_queue_claim(c.q, 5, 1000, claim_cb, &r[0]), 0);
	run_until(c.base, is_ready, &c, 100);
	assert_int_equal(r[0].calls, 0);
	ctx_close(&c);
	assert_int_equal(r[0].calls, 1);
	assert_int_equal(r[0].st, RQ_QUEUE_ECANCEL);
	memset(&c, 0, sizeof(c));
	ctx_open(&c, &o);
	memset(r, 0, sizeof(r));
	assert_int_equal(rq_queue_claim(c.q, 5, 1000, claim_cb, &r[0]), 0);
	ctx_close(&c);
	assert_int_equal(r[0].calls, 1);
	assert_int_equal(r[0].st, RQ_QUEUE_ECANCEL);

	/* 4. destroy from the wake callback (subscriber connection) with a
	 * command pending on the other connection */
	memset(&c, 0, sizeof(c));
	ctx_open_ready(&c, &o);
	c.destroy_on_wake = true;
	memset(r, 0, sizeof(r));
	const char *blpop[] = {"BLPOP", "relayq-test-nothing", "20"};   /* blocks there */
	assert_int_equal(rq_queue_command(c.q, 3, blpop, NULL, raw_cb, &r[0]), 0);
	assert_true(run_until(c.base, inflight_some, &c, 5000));
	redisContext *rc = th_redis_connect(&rs);
	sync_ok(rc, "PUBLISH relayq:{%s}:wake 1", qn);
	redisFree(rc);
	assert_true(run_until(c.base, q_gone, &c, 5000));
	assert_int_equal(r[0].calls, 1);
	assert_int_equal(r[0].st, RQ_QUEUE_ECANCEL);
	event_base_loop(c.base, EVLOOP_NONBLOCK);
	assert_int_equal(r[0].calls, 1);
	event_base_free(c.base);

	rq_queue_destroy(NULL);
	rq_queue_outcomes_finish(&oc);
	th_redis_stop(&rs);
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);   /* as relayqd: writes to a dead Redis */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(url_redaction_and_errors),
		cmocka_unit_test(outcomes_json),
		cmocka_unit_test(url_parser_one_rule),
		cmocka_unit_test(busy_script_is_retried),
		cmocka_unit_test(settle_invalid_entry),
		cmocka_unit_test(subscriber_probe),
		cmocka_unit_test(unix_claim_renew_settle),
		cmocka_unit_test(tcp_db_and_wake_on_enqueue),
		cmocka_unit_test(password_sources),
		cmocka_unit_test(library_loaded_when_missing_or_old),
		cmocka_unit_test(pipelining_many),
		cmocka_unit_test(reconnect_across_restart),
		cmocka_unit_test(connect_refused_then_server_starts),
		cmocka_unit_test(watchdog_on_stopped_server),
		cmocka_unit_test(destroy_with_pending),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

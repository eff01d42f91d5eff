/* The runner's flow without Redis or SMTP: a test backend (runner.h's
 * struct rq_runner_backend) stands in for the queue and the destinations,
 * answers on the event loop as the real ones do, and records what the
 * runner asked: claims (bounded by 2 x batch in flight), settle batching
 * (RQ_RUNNER_SETTLE_MAX a call), resends after "too many recipients",
 * recipients of a suspended destination, what destinations are told, and
 * shutdown (what is in flight is handed back, stopped is called once). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/clock.h"
#include "relayq/config.h"
#include "relayq/dest.h"
#include "relayq/json.h"
#include "relayq/log.h"
#include "relayq/runner.h"

#define MAX_JOBS 4096
#define MAX_CALLS 256

struct fake;
/* What the destination does with a job: fills the results, returns 0 (done
 * on the loop), 1 (suspended: until set), or 2 (keep it: the test
 * completes it later). */
typedef int script_fn(struct fake *f, struct rq_dest_job *job);

struct fake {
	struct event_base *base;
	struct rq_queue_opts qo;
	/* the queue: messages ready, each with nrcpt recipients */
	size_t ready, next_id;
	int nrcpt;
	size_t claims, claimed, claim_counts[MAX_CALLS];
	/* settles: messages per call, and every message entry as JSON */
	size_t settles, settle_sizes[MAX_CALLS];
	struct rq_json *settled[MAX_CALLS];
	/* destinations */
	script_fn *script;
	size_t submits;
	struct rq_dest_job *held[MAX_JOBS];
	size_t nheld;
	size_t reports[4];
	double suspend_secs;
	int64_t wake_at;
	bool stopped;
	size_t stopped_calls;
};

/* ---- the queue side ---- */

struct pending {
	struct fake *f;
	void (*fn)(struct pending *p);
	void *cb, *arg;
	struct rq_queue_claim *claim;
	size_t n;
	struct rq_dest_job *job;
};

static void run_pending(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	struct pending *p = arg;
	p->fn(p);
	free(p);
}

/* Calls p->fn from the event loop, as a reply would. */
static void later(struct fake *f, struct pending *p)
{
	struct timeval tv = {0, 0};
	p->f = f;
	assert_int_equal(event_base_once(f->base, -1, EV_TIMEOUT, run_pending, p, &tv), 0);
}

static void state_ready(struct pending *p)
{
	if (p->f->qo.on_state)
		p->f->qo.on_state(NULL, RQ_QUEUE_READY, NULL, p->f->qo.arg);
}

static int f_start(void *ctx, struct event_base *base, const struct rq_queue_opts *qo,
		   char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	struct fake *f = ctx;
	f->base = base;
	f->qo = *qo;
	struct pending *p = calloc(1, sizeof(*p));
	p->fn = state_ready;
	later(f, p);
	return 0;
}

static void f_stop(void *ctx)
{
	struct fake *f = ctx;
	f->stopped = true;
}

static const char *f_redacted(void *ctx)
{
	(void)ctx;
	return "redis://test";
}

/* RESP text of relayq_claim's reply for n messages. */
static char *claim_resp(struct fake *f, size_t n, size_t *len)
{
	size_t cap = 256 + n * (256 + (size_t)f->nrcpt * 64);
	char *b = malloc(cap);
	size_t o = 0;
	int64_t now = rq_clock_wall_ms();
	o += (size_t)snprintf(b + o, cap - o, "*3\r\n:%" PRId64 "\r\n:-1\r\n*%zu\r\n", now, n);
	for (size_t i = 0; i < n; i++) {
		char id[32], body[] = "Subject: t\r\n\r\nbody\r\n";
		snprintf(id, sizeof(id), "m%zu", f->next_id++);
		o += (size_t)snprintf(b + o, cap - o, "*8\r\n$%zu\r\n%s\r\n$13\r\na@example.com\r\n*%d\r\n",
				      strlen(id), id, f->nrcpt);
		for (int k = 0; k < f->nrcpt; k++) {
			char to[48];
			snprintf(to, sizeof(to), "r%d@example.net", k);
			o += (size_t)snprintf(b + o, cap - o, "$%zu\r\n%s\r\n", strlen(to), to);
		}
		o += (size_t)snprintf(b + o, cap - o, "$%zu\r\n%s\r\n:0\r\n:%" PRId64 "\r\n$-1\r\n:%" PRId64
				      "\r\n", strlen(body), body, now, now + 300000);
	}
	*len = o;
	return b;
}

static void claim_reply(struct pending *p)
{
	((rq_queue_claim_cb *)p->cb)(NULL, RQ_QUEUE_OK, NULL, p->claim, p->arg);
}

static int f_claim(void *ctx, int count, int64_t lease_ms, rq_queue_claim_cb *cb, void *arg)
{
	(void)lease_ms;
	struct fake *f = ctx;
	size_t n = f->ready < (size_t)count ? f->ready : (size_t)count;
	f->ready -= n;
	if (f->claims < MAX_CALLS)
		f->claim_counts[f->claims] = n;
	f->claims++;
	f->claimed += n;
	size_t len;
	char *resp = claim_resp(f, n, &len);
	redisReader *rd = redisReaderCreate();
	assert_int_equal(redisReaderFeed(rd, resp, len), REDIS_OK);
	void *reply = NULL;
	assert_int_equal(redisReaderGetReply(rd, &reply), REDIS_OK);
	assert_non_null(reply);
	redisReaderFree(rd);
	free(resp);
	const char *why = NULL;
	struct pending *p = calloc(1, sizeof(*p));
	p->claim = rq_queue_claim_parse(reply, &why);
	if (!p->claim)
		fail_msg("claim reply refused: %s", why);
	p->fn = claim_reply;
	p->cb = (void *)cb;
	p->arg = arg;
	later(f, p);
	return 0;
}

static void settle_reply(struct pending *p)
{
	enum rq_queue_settled *res = calloc(p->n ? p->n : 1, sizeof(*res));
	((rq_queue_settle_cb *)p->cb)(NULL, RQ_QUEUE_OK, NULL, res, p->n, p->arg);
	free(res);
}

static int f_settle(void *ctx, struct rq_queue_outcomes *o, rq_queue_settle_cb *cb, void *arg)
{
	struct fake *f = ctx;
	assert_true(f->settles < MAX_CALLS);
	/* what relayq_settle would receive */
	size_t len = 0;
	const char *json = rq_queue_outcomes_json(o, &len);
	assert_non_null(json);
	char err[128] = "";
	struct rq_json *v = rq_json_parse(json, len, 0, err, sizeof(err));
	if (!v)
		fail_msg("settle JSON does not parse (%s): %.200s", err, json);
	assert_true(rq_json_is(v, RQ_JSON_ARRAY));
	size_t n = 0;
	while (rq_json_at(v, n))
		n++;
	assert_int_equal(n, o->nmsgs);
	f->settle_sizes[f->settles] = n;
	f->settled[f->settles] = v;
	f->settles++;
	struct pending *p = calloc(1, sizeof(*p));
	p->fn = settle_reply;
	p->cb = (void *)cb;
	p->arg = arg;
	p->n = n;
	later(f, p);
	return 0;
}

static int f_renew(void *ctx, int64_t lease_ms, const struct rq_queue_lease *l, size_t n,
		   rq_queue_count_cb *cb, void *arg)
{
	return -1;  /* not sent: leases are not the subject here */
}

static int f_recover(void *ctx, rq_queue_count_cb *cb, void *arg)
{
	return -1;
}

static int f_enqueue(void *ctx, const struct rq_queue_enqueue_req *req, rq_queue_enqueue_cb *cb,
		     void *arg)
{
	return -1;
}

static void f_wake_at(void *ctx, int64_t delay_ms)
{
	struct fake *f = ctx;
	f->wake_at = delay_ms;
}

/* ---- the destination side ---- */

static void job_done_later(struct pending *p)
{
	p->job->done(p->job, p->job->arg);
}

static void complete(struct fake *f, struct rq_dest_job *job)
{
	struct pending *p = calloc(1, sizeof(*p));
	p->fn = job_done_later;
	p->job = job;
	later(f, p);
}

static int f_submit(void *ctx, const char *key, struct rq_dest_job *job)
{
	struct fake *f = ctx;
	f->submits++;
	job->dest = NULL;
	snprintf(job->host, sizeof(job->host), "mx.test");
	int rc = f->script(f, job);
	if (rc == 1)
		return 1;
	if (rc == 2) {
		assert_true(f->nheld < MAX_JOBS);
		f->held[f->nheld++] = job;
		return 0;
	}
	complete(f, job);
	return 0;
}

static void f_report(void *ctx, struct rq_dest *dest, enum rq_decision_dest act,
		     double suspend_secs, const struct rq_backoff *backoff)
{
	struct fake *f = ctx;
	assert_true(act != RQ_DECISION_DEST_NONE && act <= RQ_DECISION_DEST_SUSPEND);
	assert_non_null(backoff);
	f->reports[act]++;
	if (act == RQ_DECISION_DEST_SUSPEND)
		f->suspend_secs = suspend_secs;
}

static const struct rq_runner_backend fake_ops = {
	.queue_start = f_start,
	.queue_stop = f_stop,
	.redis_redacted = f_redacted,
	.claim = f_claim,
	.settle = f_settle,
	.renew = f_renew,
	.recover = f_recover,
	.enqueue = f_enqueue,
	.wake_at = f_wake_at,
	.submit = f_submit,
	.report = f_report,
};

/* ---- scripts ---- */

static void set_all(struct rq_dest_job *job, enum rq_dest_rcpt_result res, int code,
		    const char *enh, enum rq_stage stage)
{
	for (size_t i = 0; i < job->nrcpt; i++) {
		job->rcpts[i].result = res;
		rq_outcome_set(&job->rcpts[i].outcome, stage, RQ_FAIL_NONE, code, enh, "reply %d",
			       code);
	}
}

static int deliver_all(struct fake *f, struct rq_dest_job *job)
{
	set_all(job, RQ_DEST_RCPT_DELIVERED, 250, "2.0.0", RQ_STAGE_DOT);
	return 0;
}

static int hold_all(struct fake *f, struct rq_dest_job *job)
{
	return 2;
}

static int too_many_always(struct fake *f, struct rq_dest_job *job)
{
	set_all(job, RQ_DEST_RCPT_FAILED, 452, "4.5.3", RQ_STAGE_RCPT);
	return 0;
}

static int too_many_once(struct fake *f, struct rq_dest_job *job)
{
	if (f->submits == 1)
		return too_many_always(f, job);
	return deliver_all(f, job);
}

static int suspended(struct fake *f, struct rq_dest_job *job)
{
	job->until = rq_clock_wall_ms() + 90000;
	return 1;
}

static int greeting_421(struct fake *f, struct rq_dest_job *job)
{
	set_all(job, RQ_DEST_RCPT_FAILED, 421, "4.3.2", RQ_STAGE_GREETING);
	return 0;
}

/* ---- harness ---- */

struct t {
	struct fake f;
	struct event_base *base;
	struct rq_config *cfg;
	struct rq_runner *r;
};

static void on_stopped(struct rq_runner *r, void *arg)
{
	struct fake *f = arg;
	f->stopped_calls++;
}

static struct t *start(int batch, size_t ready, int nrcpt, script_fn *script)
{
	struct t *t = calloc(1, sizeof(*t));
	t->base = event_base_new();
	t->cfg = rq_config_create();
	assert_non_null(t->cfg);
	t->cfg->batch = batch;
	t->f.ready = ready;
	t->f.nrcpt = nrcpt;
	t->f.script = script;
	struct rq_runner_opts o = {
		.queue = "t",
		.cfg = t->cfg,
		.backend = &fake_ops,
		.backend_ctx = &t->f,
		.stopped = on_stopped,
		.arg = &t->f,
	};
	char err[256];
	t->r = rq_runner_create(t->base, &o, err, sizeof(err));
	if (!t->r)
		fail_msg("rq_runner_create: %s", err);
	return t;
}

/* Runs the loop until nothing is left to do now (the runner's own timers
 * are minutes away). */
static void spin(struct t *t)
{
	for (int i = 0; i < 200; i++)
		event_base_loop(t->base, EVLOOP_NONBLOCK);
}

static void finish(struct t *t)
{
	rq_runner_destroy(t->r);
	assert_true(t->f.stopped);
	for (size_t i = 0; i < t->f.settles; i++)
		rq_json_free(t->f.settled[i]);
	rq_config_destroy(t->cfg);
	event_base_free(t->base);
	free(t);
}

/* Every settled message entry, in order. */
static size_t settled_msgs(struct t *t, const struct rq_json **out, size_t max)
{
	size_t n = 0;
	for (size_t i = 0; i < t->f.settles; i++)
		for (size_t k = 0; rq_json_at(t->f.settled[i], k) && n < max; k++)
			out[n++] = rq_json_at(t->f.settled[i], k);
	return n;
}

static const char *rcpt_state(const struct rq_json *m, size_t i)
{
	const struct rq_json *rc = rq_json_at(rq_json_get(m, "rcpts"), i);
	return rc ? rq_json_get_str(rc, "s") : NULL;
}

static bool flag(const struct rq_json *m, const char *key)
{
	const struct rq_json *v = rq_json_get(m, key);
	return v && rq_json_is(v, RQ_JSON_BOOL) && v->boolean;
}

static int64_t next_in(const struct rq_json *m)
{
	int64_t next = 0;
	assert_true(rq_json_get_int(m, "next", false, &next));
	return next - rq_clock_wall_ms();
}

/* ---- tests ---- */

/* At most 2 x batch messages in flight: claims stop while jobs hang, and
 * resume once enough have finished. */
static void claims_are_bounded(void **state)
{
	struct t *t = start(10, 500, 1, hold_all);
	spin(t);
	assert_int_equal(t->f.claimed, 20);
	assert_int_equal(t->f.nheld, 20);
	/* 4 done: fewer than batch / 2 slots free, no claim yet */
	for (size_t i = 0; i < 4; i++) {
		set_all(t->f.held[i], RQ_DEST_RCPT_DELIVERED, 250, "2.0.0", RQ_STAGE_DOT);
		complete(&t->f, t->f.held[i]);
	}
	spin(t);
	assert_int_equal(t->f.claimed, 20);
	/* one more: 5 free slots, a claim of 5 */
	set_all(t->f.held[4], RQ_DEST_RCPT_DELIVERED, 250, "2.0.0", RQ_STAGE_DOT);
	complete(&t->f, t->f.held[4]);
	spin(t);
	assert_int_equal(t->f.claimed, 25);
	assert_int_equal(t->f.claim_counts[t->f.claims - 1], 5);
	/* the rest stays in flight: stop hands it back */
	rq_runner_stop(t->r);
	for (size_t i = 5; i < t->f.nheld; i++)
		complete(&t->f, t->f.held[i]);  /* results PENDING: not tried */
	spin(t);
	assert_int_equal(t->f.stopped_calls, 1);
	finish(t);
}

/* Messages finished in one loop turn settle together, at most
 * RQ_RUNNER_SETTLE_MAX a call. */
static void settles_are_batched(void **state)
{
	struct t *t = start(500, 450, 2, deliver_all);
	spin(t);
	assert_int_equal(t->f.claimed, 450);
	assert_int_equal(t->f.submits, 450);  /* one job a message: one destination */
	assert_int_equal(t->f.settles, 3);
	assert_int_equal(t->f.settle_sizes[0], RQ_RUNNER_SETTLE_MAX);
	assert_int_equal(t->f.settle_sizes[1], RQ_RUNNER_SETTLE_MAX);
	assert_int_equal(t->f.settle_sizes[2], 50);
	const struct rq_json *m[450];
	assert_int_equal(settled_msgs(t, m, 450), 450);
	for (size_t i = 0; i < 450; i++) {
		assert_string_equal(rcpt_state(m[i], 0), "delivered");
		assert_string_equal(rcpt_state(m[i], 1), "delivered");
		assert_true(flag(m[i], "attempt"));
	}
	assert_int_equal(t->f.reports[RQ_DECISION_DEST_OK], 450);
	finish(t);
}

/* "Too many recipients" to the first recipient: sent again at once in a new
 * transaction, counted as one attempt. */
static void too_many_is_sent_again(void **state)
{
	struct t *t = start(10, 1, 1, too_many_once);
	spin(t);
	assert_int_equal(t->f.submits, 2);
	const struct rq_json *m[1];
	assert_int_equal(settled_msgs(t, m, 1), 1);
	assert_string_equal(rcpt_state(m[0], 0), "delivered");
	assert_true(flag(m[0], "attempt"));
	finish(t);
}

/* ... but only RQ_DECISION_RESENDS_MAX times; then the backoff. */
static void too_many_resends_are_bounded(void **state)
{
	struct t *t = start(10, 1, 1, too_many_always);
	spin(t);
	assert_int_equal(t->f.submits, 1 + RQ_DECISION_RESENDS_MAX);
	const struct rq_json *m[1];
	assert_int_equal(settled_msgs(t, m, 1), 1);
	assert_string_equal(rcpt_state(m[0], 0), "deferred");
	assert_true(flag(m[0], "attempt"));
	int64_t in = next_in(m[0]);
	assert_true(in > 250 * 1000 && in <= 346 * 1000);  /* 5m +- 15 % jitter */
	finish(t);
}

/* A suspended destination: deferred to the end of the suspension, no
 * attempt counted, nothing reported (the pool knows). */
static void suspended_destination(void **state)
{
	struct t *t = start(10, 1, 1, suspended);
	spin(t);
	const struct rq_json *m[1];
	assert_int_equal(settled_msgs(t, m, 1), 1);
	assert_string_equal(rcpt_state(m[0], 0), "deferred");
	assert_false(flag(m[0], "attempt"));
	int64_t in = next_in(m[0]);
	assert_true(in > 80 * 1000 && in <= 90 * 1000);
	assert_int_equal(t->f.reports[RQ_DECISION_DEST_FAILED] + t->f.reports[RQ_DECISION_DEST_OK] +
				 t->f.reports[RQ_DECISION_DEST_SUSPEND],
			 0);
	finish(t);
}

/* A greeting refused: the destination is told of a failure, the message's
 * attempt is not counted. */
static void destination_failure_is_reported(void **state)
{
	struct t *t = start(10, 3, 1, greeting_421);
	spin(t);
	assert_int_equal(t->f.reports[RQ_DECISION_DEST_FAILED], 3);
	const struct rq_json *m[3];
	assert_int_equal(settled_msgs(t, m, 3), 3);
	for (size_t i = 0; i < 3; i++) {
		assert_string_equal(rcpt_state(m[i], 0), "deferred");
		assert_false(flag(m[i], "attempt"));
	}
	finish(t);
}

/* Stop while transactions run: the recipients not tried go back as they
 * were (pending, no attempt, due now), and stopped comes once, after the
 * settle's reply. */
static void stop_hands_back(void **state)
{
	struct t *t = start(10, 3, 2, hold_all);
	spin(t);
	assert_int_equal(t->f.nheld, 3);
	rq_runner_stop(t->r);
	spin(t);
	assert_int_equal(t->f.stopped_calls, 0);  /* jobs still running */
	assert_int_equal(t->f.claims, 1);         /* and no new claim */
	/* one finished, two handed back untried (what dests do on drain) */
	set_all(t->f.held[0], RQ_DEST_RCPT_DELIVERED, 250, "2.0.0", RQ_STAGE_DOT);
	for (size_t i = 0; i < 3; i++)
		complete(&t->f, t->f.held[i]);
	spin(t);
	assert_int_equal(t->f.stopped_calls, 1);
	const struct rq_json *m[3];
	assert_int_equal(settled_msgs(t, m, 3), 3);
	assert_true(flag(m[0], "attempt"));
	for (size_t i = 1; i < 3; i++) {
		assert_false(flag(m[i], "attempt"));
		assert_null(rcpt_state(m[i], 0));  /* pending: not in the settle */
		assert_true(next_in(m[i]) <= 0);
	}
	finish(t);
}

int main(void)
{
	rq_log_init(RQ_LOG_ERROR, RQ_LOG_LOGFMT, NULL);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(claims_are_bounded),
		cmocka_unit_test(settles_are_batched),
		cmocka_unit_test(too_many_is_sent_again),
		cmocka_unit_test(too_many_resends_are_bounded),
		cmocka_unit_test(suspended_destination),
		cmocka_unit_test(destination_failure_is_reported),
		cmocka_unit_test(stop_hands_back),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

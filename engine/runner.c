/* The runner: claims, dispatch per destination, decisions, settles (see
 * runner.h). */
#include "relayq/runner.h"

#include "relayq/clock.h"
#include "relayq/config.h"
#include "relayq/decision.h"
#include "relayq/dest.h"
#include "relayq/dsn.h"
#include "relayq/json.h"
#include "relayq/keys.h"
#include "relayq/log.h"
#include "relayq/message.h"
#include "relayq/policy.h"
#include "relayq/policy_lua.h"
#include "relayq/queue.h"
#include "relayq/redis_url.h"
#include "relayq/reply.h"

#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CLAIM_RETRY_MS 1000
#define HINT_MAX 600
#define RECOVER_MIN_MS 5000    /* lease sweep: lease / 2, within these */
#define RECOVER_MAX_MS 60000

enum rc_state {
	RC_PENDING = 0,            /* no result (yet): stays pending */
	RC_FINAL,                  /* delivered, failed, dropped, expired */
	RC_DEFERRED,               /* retry at next */
};

struct rrcpt {
	const char *addr;
	size_t len;
	enum rc_state st;
	enum rq_queue_rcpt_state s;
	int64_t next;              /* deferred: Redis time of the next try */
	bool has_outcome;
	bool bounce;               /* failed in this attempt: goes in the DSN */
	bool resend;               /* not_tried: send again at once */
	struct rq_outcome o;
	char host[256];
};

struct rclaim;

struct rmsg {
	struct rq_runner *r;
	struct rclaim *c;
	size_t idx;
	struct rq_queue_msg *qm;
	struct rrcpt *rc;
	size_t n;
	size_t jobs;               /* outstanding jobs */
	unsigned resends;
	bool attempt, hold, finished;
	struct rmsg *prev, *next;  /* in flight */
};

struct rclaim {
	struct rq_queue_claim *c;
	size_t left;               /* messages not yet settled */
	struct rmsg m[];
};

struct rjob {
	struct rq_dest_job job;
	struct rmsg *m;
	char key[RQ_DEST_KEY_MAX];
	struct rq_dest_rcpt rc[];
};

struct settle_ctx {
	struct rq_runner *r;
	size_t n;
	char (*ids)[RQ_QUEUE_ID_MAX + 1];
};

/* The real backend's context: a Redis client and the shared destinations. */
struct real_backend {
	struct rq_queue *q;
	struct rq_dests *dests;
};

struct rq_runner {
	struct event_base *base;
	const struct rq_config *cfg;
	bool relay;
	char *queue_name;
	const struct rq_runner_backend *be;
	void *bctx;
	bool started;              /* the queue client runs */
	struct real_backend real;
	struct rq_runner_opts o;
	int64_t offset;            /* Redis time - local time, ms */
	/* claims */
	bool want_claim, claiming, stopping, stopped_sent, stop_armed, down_logged;
	/* Wakes seen, and the count when the running claim was sent: a wake
	 * that arrives while a claim is in flight (the publish may overtake the
	 * claim's reply on the other connection) must not be lost. */
	uint64_t wakes, claim_wakes;
	int claim_count;
	struct event *claim_retry_ev;
	struct event *renew_ev;
	struct event *recover_ev;  /* sweep for leases of crashed runners */
	struct event *flush_ev;
	struct event *stop_ev;     /* stop wait bound */
	struct event *stopped_ev;  /* deferred stopped callback */
	struct rmsg *inflight;     /* list */
	size_t ninflight;
	/* settles */
	struct rq_queue_outcomes ob;
	char (*ob_ids)[RQ_QUEUE_ID_MAX + 1];
	size_t ob_cap;
	size_t settles_pending, commands_pending;
	size_t bounces_pending;    /* of commands_pending: DSN enqueues */
	enum rq_queue_conn_state qstate;
	struct rq_runner_stats st;
};

/* ------------------------------------------------------------------------
 * The real backend: queue.h and dest.h
 */

static int real_queue_start(void *ctx, struct event_base *base, const struct rq_queue_opts *qo,
			    char *err, size_t errlen)
{
	struct real_backend *b = ctx;
	b->q = rq_queue_create(base, qo, err, errlen);
	return b->q ? 0 : -1;
}

static void real_queue_stop(void *ctx)
{
	struct real_backend *b = ctx;
	struct rq_queue *q = b->q;
	b->q = NULL;
	rq_queue_destroy(q);
}

static const char *real_redis_redacted(void *ctx)
{
	struct real_backend *b = ctx;
	return b->q ? rq_queue_url_redacted(b->q) : "";
}

static int real_claim(void *ctx, int count, int64_t lease, rq_queue_claim_cb *cb, void *arg)
{
	return rq_queue_claim(((struct real_backend *)ctx)->q, count, lease, cb, arg);
}

static int real_settle(void *ctx, struct rq_queue_outcomes *o, rq_queue_settle_cb *cb, void *arg)
{
	return rq_queue_settle(((struct real_backend *)ctx)->q, o, cb, arg);
}

static int real_renew(void *ctx, int64_t lease, const struct rq_queue_lease *l, size_t n,
		      rq_queue_count_cb *cb, void *arg)
{
	return rq_queue_renew(((struct real_backend *)ctx)->q, lease, l, n, cb, arg);
}

static int real_recover(void *ctx, rq_queue_count_cb *cb, void *arg)
{
	return rq_queue_recover(((struct real_backend *)ctx)->q, cb, arg);
}

static int real_enqueue(void *ctx, const struct rq_queue_enqueue_req *req,
			rq_queue_enqueue_cb *cb, void *arg)
{
	return rq_queue_enqueue(((struct real_backend *)ctx)->q, req, cb, arg);
}

static void real_wake_at(void *ctx, int64_t delay_ms)
{
	rq_queue_wake_at(((struct real_backend *)ctx)->q, delay_ms);
}

static int real_submit(void *ctx, const char *key, struct rq_dest_job *job)
{
	return rq_dests_submit(((struct real_backend *)ctx)->dests, key, job);
}

static void real_report(void *ctx, struct rq_dest *dest, enum rq_decision_dest act,
			double suspend_secs, const struct rq_backoff *backoff)
{
	(void)ctx;
	if (!dest)
		return;
	switch (act) {
	case RQ_DECISION_DEST_SUSPEND:
		rq_dest_suspend(dest, suspend_secs);
		break;
	case RQ_DECISION_DEST_FAILED:
		rq_dest_failed(dest, backoff);
		break;
	case RQ_DECISION_DEST_OK:
		rq_dest_ok(dest);
		break;
	case RQ_DECISION_DEST_NONE:
		break;
	}
}

static const struct rq_runner_backend real_ops = {
	.queue_start = real_queue_start,
	.queue_stop = real_queue_stop,
	.redis_redacted = real_redis_redacted,
	.claim = real_claim,
	.settle = real_settle,
	.renew = real_renew,
	.recover = real_recover,
	.enqueue = real_enqueue,
	.wake_at = real_wake_at,
	.submit = real_submit,
	.report = real_report,
};

/* ------------------------------------------------------------------------
 * Time
 */

static int64_t rnow(const struct rq_runner *r)
{
	return rq_clock_wall_ms() + r->offset;
}

static int64_t lease_ms(const struct rq_runner *r)
{
	double l = r->cfg ? r->cfg->lease : 300;
	if (l < 1)
		l = 1;
	return (int64_t)(l * 1000.0);
}

static int batch_size(const struct rq_runner *r)
{
	int b = r->cfg ? r->cfg->batch : 100;
	return b < 1 ? 1 : b;
}

static void fmt_i64(char *buf, size_t len, int64_t v)
{
	snprintf(buf, len, "%" PRId64, v);
}

/* ------------------------------------------------------------------------
 * Logging
 */

#define RCPT_TEXT_MAX (RQ_REPLY_TEXT_MAX + 64)

/* The text logged and settled for a recipient: the reply text, or for a
 * transport event "timeout: <what happened>". Returns buf. */
static const char *rcpt_text(const struct rrcpt *rc, char *buf, size_t len)
{
	if (rc->has_outcome && rc->o.fail != RQ_FAIL_NONE && !rc->o.synthetic)
		snprintf(buf, len, "%s: %s", rq_fail_name(rc->o.fail), rc->o.text);
	else
		snprintf(buf, len, "%s", rc->has_outcome ? rc->o.text : "");
	return buf;
}

/* One line per recipient and attempt: event is the recorded state. d gives
 * the rule, the reason, the level and, for a deferral, the decided delay. */
static void log_rcpt(struct rq_runner *r, const struct rmsg *m, const struct rrcpt *rc,
		     const char *host, const struct rq_decision *d, int64_t now)
{
	enum rq_log_level lvl = RQ_LOG_INFO;
	if (d->loud)
		lvl = RQ_LOG_ERROR;
	else if (d->state == RQ_DECISION_FAILED || d->state == RQ_DECISION_EXPIRED)
		lvl = RQ_LOG_WARN;
	if (!rq_log_enabled(lvl))
		return;
	const char *event = rq_decision_state_name(d->state);
	char code[16] = "", attempt[24], next[24] = "", delay[32], after[32] = "";
	if (rc->o.code)
		snprintf(code, sizeof(code), "%d", rc->o.code);
	fmt_i64(attempt, sizeof(attempt), m->qm->attempts + 1);
	if (d->state == RQ_DECISION_DEFERRED) {
		fmt_i64(next, sizeof(next), rc->next);
		rq_duration_format(d->after, after, sizeof(after));
	}
	snprintf(delay, sizeof(delay), "%.1f",
		 (double)(now - m->qm->created) / 1000.0);
	const char *stage = rc->has_outcome ? rq_stage_name(rc->o.stage) : "";
	char text[RCPT_TEXT_MAX];
	rcpt_text(rc, text, sizeof(text));
	if (next[0])
		rq_log(lvl, event, "queue", r->queue_name, "id", m->qm->id, "rcpt", rc->addr,
		       "host", host ? host : "", "code", code, "enhanced", rc->o.enhanced,
		       "text", text, "stage", stage, "attempt", attempt,
		       "next", next, "after", after, "rule", d->rule,
		       "reason", d->reason, "delay", delay, NULL);
	else
		rq_log(lvl, event, "queue", r->queue_name, "id", m->qm->id, "rcpt", rc->addr,
		       "host", host ? host : "", "code", code, "enhanced", rc->o.enhanced,
		       "text", text, "stage", stage, "attempt", attempt,
		       "rule", d->rule, "reason", d->reason, "delay", delay, NULL);
}

/* ------------------------------------------------------------------------
 * Settles
 */

static void maybe_claim(struct rq_runner *r);
static void check_stopped(struct rq_runner *r);

static void settle_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		      const enum rq_queue_settled *res, size_t n, void *arg)
{
	struct settle_ctx *ctx = arg;
	struct rq_runner *r = ctx->r;
	r->settles_pending--;
	if (st != RQ_QUEUE_OK) {
		char cnt[24];
		snprintf(cnt, sizeof(cnt), "%zu", ctx->n);
		rq_log(st == RQ_QUEUE_ECANCEL ? RQ_LOG_WARN : RQ_LOG_ERROR, "settle_failed",
		       "queue", r->queue_name, "messages", cnt, "first",
		       ctx->n ? ctx->ids[0] : "", "error", err ? err : "", NULL);
	} else {
		r->st.settled += n;
		for (size_t i = 0; i < n && i < ctx->n; i++) {
			if (res[i] == RQ_QUEUE_SETTLE_LOST) {
				r->st.lost++;
				rq_log(RQ_LOG_WARN, "settle_lost", "queue", r->queue_name, "id",
				       ctx->ids[i], "reason",
				       "lease no longer held: the message was taken back", NULL);
			} else if (res[i] == RQ_QUEUE_SETTLE_INVALID) {
				/* our bug: nothing was written for it; the lease
				 * expires and the message is tried again */
				r->st.invalid++;
				rq_log(RQ_LOG_ERROR, "settle_invalid", "queue", r->queue_name,
				       "id", ctx->ids[i], "reason",
				       "Redis refused the outcome (see the Redis log); the message "
				       "is tried again when its lease expires", NULL);
			}
		}
	}
	free(ctx->ids);
	free(ctx);
	check_stopped(r);
}

static void flush_settles(struct rq_runner *r)
{
	if (r->ob.nmsgs == 0)
		return;
	struct settle_ctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		goto oom;
	ctx->r = r;
	ctx->n = r->ob.nmsgs;
	ctx->ids = r->ob_ids;
	r->ob_ids = NULL;
	r->ob_cap = 0;
	if (r->be->settle(r->bctx, &r->ob, settle_cb, ctx) < 0) {
		free(ctx->ids);
		free(ctx);
		goto oom;
	}
	r->settles_pending++;
	r->st.settles++;
	rq_queue_outcomes_reset(&r->ob);
	return;
oom:
	rq_log(RQ_LOG_ERROR, "settle_failed", "queue", r->queue_name, "error",
	       "could not send the settle (memory or shutdown); leases will expire", NULL);
	rq_queue_outcomes_reset(&r->ob);
	free(r->ob_ids);
	r->ob_ids = NULL;
	r->ob_cap = 0;
}

static void on_flush(evutil_socket_t fd, short what, void *arg)
{
	struct rq_runner *r = arg;
	flush_settles(r);
	check_stopped(r);
}

/* ------------------------------------------------------------------------
 * Bounces
 */

static void bounce_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		      const char *id, void *arg)
{
	struct rq_runner *r = arg;
	r->commands_pending--;
	r->bounces_pending--;
	if (st == RQ_QUEUE_OK) {
		r->st.bounces++;
		rq_log(RQ_LOG_INFO, "bounce_queued", "queue", r->queue_name, "bounce_id",
		       id, NULL);
	} else {
		rq_log(RQ_LOG_ERROR, "bounce_failed", "queue", r->queue_name, "error",
		       err ? err : "?", NULL);
	}
	check_stopped(r);
}

static void send_bounce(struct rq_runner *r, struct rmsg *m)
{
	struct rq_queue_msg *qm = m->qm;
	size_t nb = 0;
	for (size_t i = 0; i < m->n; i++)
		nb += m->rc[i].bounce;
	if (!nb || qm->released || !qm->from || !qm->from[0])
		return;
	struct rq_dsn_rcpt *dr = calloc(nb, sizeof(*dr));
	char *dsn = NULL;
	if (!dr)
		goto fail;
	size_t k = 0;
	for (size_t i = 0; i < m->n; i++) {
		if (!m->rc[i].bounce)
			continue;
		dr[k].addr = m->rc[i].addr;
		/* no remote MTA for a DNS failure (host is the domain then) */
		dr[k].remote_mta = m->rc[i].host[0] && m->rc[i].o.stage != RQ_STAGE_DNS
				   ? m->rc[i].host : NULL;
		dr[k].outcome = m->rc[i].o;
		k++;
	}
	int64_t now = rnow(r);
	struct rq_dsn_input in = {
		.reporting_mta = r->cfg && r->cfg->helo ? r->cfg->helo : "localhost",
		.from = qm->from,
		.body = qm->body,
		.body_len = qm->body_len,
		.rcpts = dr,
		.nrcpts = nb,
		.arrival = qm->created / 1000,
		.now = now / 1000,
		.msg_id = qm->id,
	};
	char err[256];
	size_t dlen = 0;
	dsn = rq_dsn_build(&in, &dlen, err, sizeof(err));
	if (!dsn) {
		rq_log(RQ_LOG_ERROR, "bounce_failed", "queue", r->queue_name, "id", qm->id,
		       "error", err, NULL);
		goto out;
	}
	char key[80];
	snprintf(key, sizeof(key), "bounce:%s:%" PRId64, qm->id, qm->attempts + 1);
	const char *to[1] = {qm->from};
	struct rq_queue_enqueue_req req = {
		.from = "",
		.to = to,
		.to_lens = &qm->from_len,
		.nto = 1,
		.body = dsn,
		.body_len = dlen,
		.key = key,
		.delay_s = -1,
	};
	if (r->be->enqueue(r->bctx, &req, bounce_cb, r) < 0)
		goto fail;
	r->commands_pending++;
	r->bounces_pending++;
	goto out;
fail:
	rq_log(RQ_LOG_ERROR, "bounce_failed", "queue", r->queue_name, "id", qm->id,
	       "error", "out of memory", NULL);
out:
	free(dsn);
	free(dr);
}

/* ------------------------------------------------------------------------
 * Messages
 */

static void list_remove(struct rq_runner *r, struct rmsg *m)
{
	if (m->prev)
		m->prev->next = m->next;
	else
		r->inflight = m->next;
	if (m->next)
		m->next->prev = m->prev;
	m->prev = m->next = NULL;
	r->ninflight--;
}

static int ob_add_id(struct rq_runner *r, const char *id)
{
	if (r->ob.nmsgs >= r->ob_cap) {
		size_t cap = r->ob_cap ? r->ob_cap * 2 : 64;
		void *p = realloc(r->ob_ids, cap * sizeof(*r->ob_ids));
		if (!p)
			return -1;
		r->ob_ids = p;
		r->ob_cap = cap;
	}
	snprintf(r->ob_ids[r->ob.nmsgs], sizeof(r->ob_ids[0]), "%s", id);
	return 0;
}

/* All jobs of m are done: settle entry, bounce, release. */
static void finish_msg(struct rmsg *m)
{
	struct rq_runner *r = m->r;
	struct rq_queue_msg *qm = m->qm;
	int64_t now = rnow(r);
	m->finished = true;
	if (r->cfg && r->cfg->bounce)
		send_bounce(r, m);
	int64_t next = -1;
	for (size_t i = 0; i < m->n; i++) {
		struct rrcpt *rc = &m->rc[i];
		if (rc->st == RC_PENDING && (next < 0 || now < next))
			next = now;
		else if (rc->st == RC_DEFERRED && (next < 0 || rc->next < next))
			next = rc->next;
	}
	if (m->hold && next < 0)
		next = now;
	/* Settle does not wake anyone: the timer takes the earliest retry. */
	if (next >= 0 && !m->hold)
		r->be->wake_at(r->bctx, next > now ? next - now : 0);
	int rc_ok = ob_add_id(r, qm->id);
	if (rc_ok == 0)
		rc_ok = rq_queue_outcomes_msg(&r->ob, qm->id, qm->lease, m->attempt, next, m->hold);
	for (size_t i = 0; rc_ok == 0 && i < m->n; i++) {
		struct rrcpt *rc = &m->rc[i];
		if (rc->st == RC_PENDING)
			continue;
		char hint[HINT_MAX] = "";
		struct rq_queue_rcpt_outcome out = {.to = rc->addr, .s = rc->s};
		if (rc->has_outcome && rc->s != RQ_QUEUE_RCPT_DELIVERED) {
			out.code = rc->o.code;
			out.enh = rc->o.enhanced[0] ? rc->o.enhanced : NULL;
			char text[RCPT_TEXT_MAX];
			out.text = rcpt_text(rc, text, sizeof(text));
			out.stage = rq_stage_name(rc->o.stage);
			if (rc->s == RQ_QUEUE_RCPT_FAILED || rc->s == RQ_QUEUE_RCPT_EXPIRED) {
				const struct rq_hint *h = rq_outcome_hint(&rc->o);
				if (h && h->meaning)
					snprintf(hint, sizeof(hint), "%s \xe2\x80\x94 %s", h->meaning,
						 h->fix ? h->fix : "");
				out.hint = hint[0] ? hint : NULL;
			}
			rc_ok = rq_queue_outcomes_rcpt(&r->ob, &out);
		} else {
			if (rc->has_outcome && rc->o.code)
				out.code = rc->o.code;
			rc_ok = rq_queue_outcomes_rcpt(&r->ob, &out);
		}
	}
	if (rc_ok != 0) {
		rq_log(RQ_LOG_ERROR, "settle_failed", "queue", r->queue_name, "id", qm->id,
		       "error", "out of memory; the lease will expire", NULL);
	}
	/* the message's memory goes now */
	rq_queue_msg_release(m->c->c, m->idx);
	free(m->rc);
	m->rc = NULL;
	m->n = 0;
	list_remove(r, m);
	struct rclaim *c = m->c;
	if (--c->left == 0) {
		rq_queue_claim_free(c->c);
		free(c);
	}
	if (r->ob.nmsgs >= RQ_RUNNER_SETTLE_MAX)
		flush_settles(r);
	else if (r->ob.nmsgs)
		event_active(r->flush_ev, EV_WRITE, 0);
	maybe_claim(r);
	check_stopped(r);
}

static void job_done(struct rq_dest_job *job, void *arg);

/* Sends the recipients idx[0..n) of m to the destination key, split into
 * transactions. */
static void submit_group(struct rmsg *m, const char *key, const size_t *idx, size_t n)
{
	struct rq_runner *r = m->r;
	const struct rq_config *cfg = r->cfg;
	/* in relay mode every domain shares the relay: the global limits */
	struct rq_config_limits lim = {0, 0, 100};
	if (cfg)
		rq_config_limits(cfg, r->relay ? NULL : key, &lim);
	int per_txn = lim.recipients_per_transaction;
	int per_dest = r->relay ? 0 : lim.per_destination;
	unsigned mpc = r->relay ? 0 : (unsigned)(lim.messages_per_connection > 0
						 ? lim.messages_per_connection : 0);
	if (per_txn < 1)
		per_txn = 1;
	for (size_t off = 0; off < n; off += (size_t)per_txn) {
		size_t k = n - off < (size_t)per_txn ? n - off : (size_t)per_txn;
		struct rjob *j = calloc(1, sizeof(*j) + k * sizeof(j->rc[0]));
		if (!j) {
			rq_log(RQ_LOG_ERROR, "dispatch_failed", "id", m->qm->id, "error",
			       "out of memory", NULL);
			return;
		}
		j->m = m;
		snprintf(j->key, sizeof(j->key), "%s", key);
		for (size_t i = 0; i < k; i++) {
			struct rrcpt *rc = &m->rc[idx[off + i]];
			j->rc[i].addr = rc->addr;
			j->rc[i].len = rc->len;
			j->rc[i].index = idx[off + i];
		}
		j->job.from = m->qm->from;
		j->job.from_len = m->qm->from_len;
		j->job.body = m->qm->body;
		j->job.body_len = m->qm->body_len;
		j->job.rcpts = j->rc;
		j->job.nrcpt = k;
		j->job.per_destination = per_dest;
		j->job.messages_per_connection = mpc;
		j->job.done = job_done;
		j->job.arg = j;
		int rc = r->be->submit(r->bctx, key, &j->job);
		if (rc == 0) {
			m->jobs++;
			continue;
		}
		if (rc == 1) {
			/* suspended: the job's recipients wait for the destination */
			for (size_t i = 0; i < k; i++)
				j->rc[i].result = RQ_DEST_RCPT_SUSPENDED;
			m->jobs++;
			job_done(&j->job, j);
			continue;
		}
		free(j);  /* shutting down: stays pending */
	}
}

/* Sends every recipient of m that is marked for sending (resend or, at the
 * first dispatch, all pending ones). */
static void dispatch(struct rmsg *m, bool resend_only)
{
	struct rq_runner *r = m->r;
	size_t *idx = calloc(m->n ? m->n : 1, sizeof(*idx));
	bool *done = calloc(m->n ? m->n : 1, sizeof(*done));
	char (*keys)[RQ_DEST_KEY_MAX] = calloc(m->n ? m->n : 1, sizeof(*keys));
	if (!idx || !done || !keys) {
		rq_log(RQ_LOG_ERROR, "dispatch_failed", "id", m->qm->id, "error",
		       "out of memory", NULL);
		goto out;
	}
	for (size_t i = 0; i < m->n; i++) {
		struct rrcpt *rc = &m->rc[i];
		bool want = resend_only ? rc->resend : rc->st == RC_PENDING;
		rc->resend = false;
		if (!want) {
			done[i] = true;
			continue;
		}
		if (rq_dest_key(r->relay, rc->addr, keys[i]) < 0) {
			rc->st = RC_FINAL;
			rc->s = RQ_QUEUE_RCPT_FAILED;
			rc->has_outcome = true;
			rc->bounce = true;
			rq_outcome_set(&rc->o, RQ_STAGE_RCPT, RQ_FAIL_NONE, 553, "5.1.3",
				       "recipient address has no domain");
			rc->o.synthetic = true;
			m->attempt = true;
			struct rq_decision d = {.state = RQ_DECISION_FAILED, .bounce = true};
			snprintf(d.rule, sizeof(d.rule), "builtin:address");
			snprintf(d.reason, sizeof(d.reason), "recipient address has no domain");
			r->st.failed++;
			log_rcpt(r, m, rc, NULL, &d, rnow(r));
			done[i] = true;
		}
	}
	for (size_t i = 0; i < m->n; i++) {
		if (done[i])
			continue;
		size_t n = 0;
		for (size_t k = i; k < m->n; k++) {
			if (!done[k] && strcmp(keys[k], keys[i]) == 0) {
				idx[n++] = k;
				done[k] = true;
			}
		}
		submit_group(m, keys[i], idx, n);
	}
out:
	free(idx);
	free(done);
	free(keys);
}

/* Records the decision for one recipient (decision.h): its state, the
 * message's attempt and hold flags, the counters, the log line. */
static void record(struct rq_runner *r, struct rmsg *m, struct rrcpt *rc, const char *host,
		   const struct rq_decision *d, int64_t now)
{
	if (d->attempt)
		m->attempt = true;
	switch (d->state) {
	case RQ_DECISION_DELIVERED:
		rc->st = RC_FINAL;
		rc->s = RQ_QUEUE_RCPT_DELIVERED;
		r->st.delivered++;
		break;
	case RQ_DECISION_DEFERRED:
		rc->st = RC_DEFERRED;
		rc->s = RQ_QUEUE_RCPT_DEFERRED;
		rc->next = now + (int64_t)(d->after * 1000.0);
		r->st.deferred++;
		break;
	case RQ_DECISION_FAILED:
		rc->st = RC_FINAL;
		rc->s = RQ_QUEUE_RCPT_FAILED;
		r->st.failed++;
		break;
	case RQ_DECISION_EXPIRED:
		rc->st = RC_FINAL;
		rc->s = RQ_QUEUE_RCPT_EXPIRED;
		r->st.expired++;
		break;
	case RQ_DECISION_DROPPED:
		rc->st = RC_FINAL;
		rc->s = RQ_QUEUE_RCPT_DROPPED;
		r->st.dropped++;
		break;
	case RQ_DECISION_HELD:
		rc->st = RC_DEFERRED;
		rc->s = RQ_QUEUE_RCPT_DEFERRED;
		rc->next = now;
		m->hold = true;
		r->st.held++;
		break;
	case RQ_DECISION_RESEND:
	default:
		rc->st = RC_PENDING;
		rc->resend = true;
		return;  /* not an outcome yet: no line */
	}
	rc->bounce = d->bounce;
	log_rcpt(r, m, rc, host, d, now);
}

/* The decision for one recipient's outcome rc->o (suspended > 0: not sent,
 * its destination is suspended that many more seconds). */
static void decide(struct rq_runner *r, struct rmsg *m, struct rrcpt *rc, const char *host,
		   double suspended, int64_t now, struct rq_decision *d)
{
	struct rq_policy_msg pm = {
		.id = m->qm->id,
		.from = m->qm->from,
		.to = m->qm->rcpts,
		.nto = m->qm->nrcpts,
		.attempts = (unsigned)m->qm->attempts,
		.created = (double)m->qm->created / 1000.0,
		.meta = m->qm->meta,
	};
	struct rq_decision_input in = {
		.outcome = &rc->o,
		.recipient = rc->addr,
		.host = host,
		.msg = &pm,
		.attempt = (unsigned)(m->qm->attempts + 1),
		.age = (double)(now - m->qm->created) / 1000.0,
		.resends = m->resends,
		.suspended = suspended,
	};
	rq_decision_make(r->cfg, &in, NULL, d);
	record(r, m, rc, host, d, now);
}

static void job_done(struct rq_dest_job *job, void *arg)
{
	struct rjob *j = arg;
	struct rmsg *m = j->m;
	struct rq_runner *r = m->r;
	struct rq_dest *dest = job->dest;
	enum rq_decision_dest dact = RQ_DECISION_DEST_NONE;
	double dafter = 0;
	const char *domain_for_backoff = NULL;
	int64_t now = rnow(r);
	for (size_t i = 0; i < job->nrcpt; i++) {
		struct rq_dest_rcpt *dr = &job->rcpts[i];
		struct rrcpt *rc = &m->rc[dr->index];
		struct rq_decision d;
		switch (dr->result) {
		case RQ_DEST_RCPT_PENDING:
			break;
		case RQ_DEST_RCPT_SUSPENDED: {
			if (!rc->has_outcome) {
				rq_outcome_set(&rc->o, RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0, "4.4.1",
					       "destination %s suspended after connection failures",
					       dest ? rq_dest_name(dest) : "?");
				rc->has_outcome = true;
			}
			/* job->until is on the local clock: in Redis time, the
			 * end of the suspension is until + offset */
			double left = (double)(job->until + r->offset - now) / 1000.0;
			decide(r, m, rc, NULL, left > 1 ? left : 1, now, &d);
			break;
		}
		case RQ_DEST_RCPT_DELIVERED:
		case RQ_DEST_RCPT_FAILED:
			rc->o = dr->outcome;
			rc->has_outcome = true;
			snprintf(rc->host, sizeof(rc->host), "%s", job->host);
			decide(r, m, rc, job->host, 0, now, &d);
			rq_decision_dest_merge(&dact, &dafter, &d);
			if (d.dest == RQ_DECISION_DEST_FAILED)
				domain_for_backoff = rq_addr_domain(rc->addr);
			break;
		}
	}
	if (dact != RQ_DECISION_DEST_NONE) {
		struct rq_policy_params params;
		rq_config_params(r->cfg, domain_for_backoff, &params);
		r->be->report(r->bctx, dest, dact, dafter, &params.backoff);
	}
	free(j);
	bool resend = false;
	for (size_t i = 0; i < m->n; i++)
		resend |= m->rc[i].resend;
	if (resend && !r->stopping) {
		m->resends++;
		dispatch(m, true);  /* this job still counts: m stays */
	}
	if (--m->jobs == 0)
		finish_msg(m);
}

/* ------------------------------------------------------------------------
 * Claims
 */

static void start_msg(struct rq_runner *r, struct rclaim *c, size_t i)
{
	struct rmsg *m = &c->m[i];
	m->r = r;
	m->c = c;
	m->idx = i;
	m->qm = &c->c->msgs[i];
	m->n = m->qm->nrcpts;
	m->next = r->inflight;
	if (r->inflight)
		r->inflight->prev = m;
	r->inflight = m;
	r->ninflight++;
	m->jobs = 1;  /* held until dispatched */
	m->rc = calloc(m->n ? m->n : 1, sizeof(*m->rc));
	if (!m->rc) {
		m->n = 0;
		rq_log(RQ_LOG_ERROR, "dispatch_failed", "id", m->qm->id, "error",
		       "out of memory", NULL);
		return;
	}
	for (size_t k = 0; k < m->n; k++) {
		m->rc[k].addr = m->qm->rcpts[k];
		m->rc[k].len = m->qm->rcpt_lens[k];
	}
	if (!r->stopping)
		dispatch(m, false);
}

static void claim_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		     struct rq_queue_claim *claim, void *arg)
{
	struct rq_runner *r = arg;
	r->claiming = false;
	if (st != RQ_QUEUE_OK || !claim) {
		if (st != RQ_QUEUE_ECANCEL) {
			rq_log(RQ_LOG_ERROR, "claim_failed", "queue", r->queue_name, "error",
			       err ? err : "", NULL);
			struct timeval tv = rq_clock_tv(CLAIM_RETRY_MS);
			evtimer_add(r->claim_retry_ev, &tv);
		}
		check_stopped(r);
		return;
	}
	r->offset = claim->now - rq_clock_wall_ms();
	r->st.claims++;
	r->st.claimed += claim->count;
	if (claim->count < (size_t)r->claim_count &&
	    !(claim->next_due >= 0 && claim->next_due <= claim->now) &&
	    r->wakes == r->claim_wakes)
		r->want_claim = false;
	if (claim->count == 0) {
		rq_queue_claim_free(claim);
		maybe_claim(r);
		check_stopped(r);
		return;
	}
	if (rq_log_enabled(RQ_LOG_DEBUG)) {
		char n[24];
		snprintf(n, sizeof(n), "%zu", claim->count);
		rq_log(RQ_LOG_DEBUG, "claimed", "queue", r->queue_name, "messages", n, NULL);
	}
	struct rclaim *c = calloc(1, sizeof(*c) + claim->count * sizeof(c->m[0]));
	if (!c) {
		rq_log(RQ_LOG_ERROR, "claim_failed", "queue", r->queue_name, "error",
		       "out of memory; the leases will expire", NULL);
		rq_queue_claim_free(claim);
		struct timeval tv = rq_clock_tv(CLAIM_RETRY_MS);
		evtimer_add(r->claim_retry_ev, &tv);
		check_stopped(r);
		return;
	}
	c->c = claim;
	c->left = claim->count + 1;  /* + 1: held until every message started */
	size_t count = claim->count;
	for (size_t i = 0; i < count; i++)
		start_msg(r, c, i);
	for (size_t i = 0; i < count; i++) {
		struct rmsg *m = &c->m[i];
		if (--m->jobs == 0)
			finish_msg(m);
	}
	if (--c->left == 0) {
		rq_queue_claim_free(c->c);
		free(c);
	}
	maybe_claim(r);
}

static void maybe_claim(struct rq_runner *r)
{
	if (r->stopping || r->claiming || !r->want_claim)
		return;
	int batch = batch_size(r);
	size_t cap = (size_t)batch * 2;
	if (r->ninflight >= cap)
		return;
	size_t free_slots = cap - r->ninflight;
	if (r->ninflight > 0 && free_slots < (size_t)(batch + 1) / 2)
		return;
	int count = free_slots < (size_t)batch ? (int)free_slots : batch;
	if (r->be->claim(r->bctx, count, lease_ms(r), claim_cb, r) < 0) {
		struct timeval tv = rq_clock_tv(CLAIM_RETRY_MS);
		evtimer_add(r->claim_retry_ev, &tv);
		return;
	}
	r->claiming = true;
	r->claim_count = count;
	r->claim_wakes = r->wakes;
}

static void on_claim_retry(evutil_socket_t fd, short what, void *arg)
{
	struct rq_runner *r = arg;
	r->want_claim = true;
	maybe_claim(r);
}

static void on_wake(struct rq_queue *q, enum rq_queue_wake why, void *arg)
{
	struct rq_runner *r = arg;
	r->wakes++;
	r->want_claim = true;
	maybe_claim(r);
}

static void on_state(struct rq_queue *q, enum rq_queue_conn_state st, const char *err,
		     void *arg)
{
	struct rq_runner *r = arg;
	enum rq_queue_conn_state prev = r->qstate;
	r->qstate = st;
	if (st == RQ_QUEUE_READY && prev != RQ_QUEUE_READY)
		rq_log(RQ_LOG_INFO, "redis_ready", "queue", r->queue_name, "redis",
		       r->be->redis_redacted(r->bctx), NULL);
	else if (st != RQ_QUEUE_READY && prev == RQ_QUEUE_READY)
		rq_log(RQ_LOG_WARN, "redis_down", "queue", r->queue_name, "redis",
		       r->be->redis_redacted(r->bctx), "error", err ? err : "", NULL);
	else if (st == RQ_QUEUE_DOWN && err && err[0] && !r->down_logged)
		rq_log(RQ_LOG_WARN, "redis_unavailable", "queue", r->queue_name, "redis",
		       r->be->redis_redacted(r->bctx), "error", err, NULL);
	else if (st == RQ_QUEUE_DOWN && err && err[0])
		rq_log(RQ_LOG_DEBUG, "redis_retry", "queue", r->queue_name, "error", err, NULL);
	/* one warning per outage; retries at debug */
	r->down_logged = st != RQ_QUEUE_READY && (r->down_logged || (err && err[0]));
	if (st != RQ_QUEUE_READY)
		check_stopped(r);
}

/* ------------------------------------------------------------------------
 * Renew, recover
 */

static void renew_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		     long long n, void *arg)
{
	struct rq_runner *r = arg;
	r->commands_pending--;
	if (st != RQ_QUEUE_OK && st != RQ_QUEUE_ECANCEL)
		rq_log(RQ_LOG_WARN, "renew_failed", "queue", r->queue_name, "error",
		       err ? err : "", NULL);
	check_stopped(r);
}

static void arm_renew(struct rq_runner *r)
{
	int64_t ms = lease_ms(r) / 3;
	if (ms < 1000)
		ms = 1000;
	struct timeval tv = rq_clock_tv(ms);
	evtimer_add(r->renew_ev, &tv);
}

static void on_renew(evutil_socket_t fd, short what, void *arg)
{
	struct rq_runner *r = arg;
	size_t n = 0;
	for (struct rmsg *m = r->inflight; m; m = m->next)
		n += !m->finished;
	if (n) {
		struct rq_queue_lease *l = calloc(n, sizeof(*l));
		if (l) {
			size_t k = 0;
			for (struct rmsg *m = r->inflight; m && k < n; m = m->next) {
				if (m->finished)
					continue;
				l[k].id = m->qm->id;
				l[k].lease = m->qm->lease;
				k++;
			}
			if (r->be->renew(r->bctx, lease_ms(r), l, k, renew_cb, r) == 0)
				r->commands_pending++;
			free(l);
		}
	}
	arm_renew(r);
}

static void recover_cb(struct rq_queue *q, enum rq_queue_status st, const char *err,
		       long long n, void *arg)
{
	struct rq_runner *r = arg;
	r->commands_pending--;
	if (st == RQ_QUEUE_OK && n > 0) {
		char cnt[24];
		snprintf(cnt, sizeof(cnt), "%lld", n);
		rq_log(RQ_LOG_INFO, "recovered", "queue", r->queue_name, "messages", cnt, NULL);
		if (n >= 10000 && !r->stopping && r->be->recover(r->bctx, recover_cb, r) == 0)
			r->commands_pending++;
		r->want_claim = true;
		maybe_claim(r);
	} else if (st != RQ_QUEUE_OK && st != RQ_QUEUE_ECANCEL) {
		rq_log(RQ_LOG_WARN, "recover_failed", "queue", r->queue_name, "error",
		       err ? err : "", NULL);
	}
	check_stopped(r);
}

/* Expired leases (a crashed runner's) go back to ready: claim takes them
 * too, but only when something else wakes us, so sweep now and then. */
static void on_recover(evutil_socket_t fd, short what, void *arg)
{
	struct rq_runner *r = arg;
	if (!r->stopping && r->be->recover(r->bctx, recover_cb, r) == 0)
		r->commands_pending++;
}

static void arm_recover(struct rq_runner *r)
{
	int64_t ms = lease_ms(r) / 2;
	if (ms < RECOVER_MIN_MS)
		ms = RECOVER_MIN_MS;
	if (ms > RECOVER_MAX_MS)
		ms = RECOVER_MAX_MS;
	struct timeval tv = rq_clock_tv(ms);
	event_add(r->recover_ev, &tv);
}

/* ------------------------------------------------------------------------
 * Stop
 */

static void on_stopped_ev(evutil_socket_t fd, short what, void *arg)
{
	struct rq_runner *r = arg;
	if (r->o.stopped)
		r->o.stopped(r, r->o.arg);
}

static void send_stopped(struct rq_runner *r)
{
	if (r->stopped_sent)
		return;
	r->stopped_sent = true;
	event_del(r->stop_ev);
	event_del(r->renew_ev);
	event_del(r->recover_ev);
	event_del(r->claim_retry_ev);
	event_active(r->stopped_ev, EV_WRITE, 0);
}

static void check_stopped(struct rq_runner *r)
{
	if (!r->stopping || r->stopped_sent)
		return;
	if (r->ninflight)
		return;
	/* only Redis is waited for now: bounded */
	if (!r->stop_armed) {
		r->stop_armed = true;
		struct timeval tv = {RQ_RUNNER_STOP_WAIT_MS / 1000, 0};
		evtimer_add(r->stop_ev, &tv);
	}
	if (r->ob.nmsgs || r->settles_pending)
		return;
	/* A claim, renew or recover is not worth waiting for while Redis is
	 * away (never sent, or its leases expire); a bounce is. */
	if ((r->claiming || r->commands_pending) &&
	    (r->qstate == RQ_QUEUE_READY || r->bounces_pending))
		return;
	send_stopped(r);
}

static void on_stop_wait(evutil_socket_t fd, short what, void *arg)
{
	struct rq_runner *r = arg;
	char a[24], b[24];
	snprintf(a, sizeof(a), "%zu", r->ninflight);
	snprintf(b, sizeof(b), "%zu", r->settles_pending + r->commands_pending);
	rq_log(RQ_LOG_WARN, "stop_incomplete", "queue", r->queue_name, "unsettled", a,
	       "redis_commands", b, "reason",
	       "Redis did not answer in time; leases will expire and the messages come back",
	       NULL);
	send_stopped(r);
}

void rq_runner_stop(struct rq_runner *r)
{
	if (r->stopping)
		return;
	r->stopping = true;
	event_del(r->claim_retry_ev);
	flush_settles(r);
	check_stopped(r);
}

/* ------------------------------------------------------------------------
 * Create / destroy
 */

void rq_runner_set_config(struct rq_runner *r, const struct rq_config *cfg)
{
	r->cfg = cfg;
}

const char *rq_runner_queue(const struct rq_runner *r)
{
	return r->queue_name;
}

const char *rq_runner_redis_redacted(const struct rq_runner *r)
{
	return r->be->redis_redacted(r->bctx);
}

void rq_runner_get_stats(const struct rq_runner *r, struct rq_runner_stats *st)
{
	*st = r->st;
	st->inflight = r->ninflight;
	st->redis_ready = r->qstate == RQ_QUEUE_READY;
}

void rq_runner_destroy(struct rq_runner *r)
{
	if (!r)
		return;
	/* cancels pending commands: their callbacks run now */
	r->stopping = true;
	r->stopped_sent = true;
	if (r->started) {
		r->started = false;
		r->be->queue_stop(r->bctx);
	}
	/* whatever is still in flight is abandoned (leases expire) */
	while (r->inflight) {
		struct rmsg *m = r->inflight;
		list_remove(r, m);
		free(m->rc);
		m->rc = NULL;
		struct rclaim *c = m->c;
		if (--c->left == 0) {
			rq_queue_claim_free(c->c);
			free(c);
		}
	}
	rq_queue_outcomes_finish(&r->ob);
	free(r->ob_ids);
	if (r->claim_retry_ev)
		event_free(r->claim_retry_ev);
	if (r->renew_ev)
		event_free(r->renew_ev);
	if (r->recover_ev)
		event_free(r->recover_ev);
	if (r->flush_ev)
		event_free(r->flush_ev);
	if (r->stop_ev)
		event_free(r->stop_ev);
	if (r->stopped_ev)
		event_free(r->stopped_ev);
	free(r->queue_name);
	free(r);
}

struct rq_runner *rq_runner_create(struct event_base *base,
				   const struct rq_runner_opts *opts,
				   char *err, size_t errlen)
{
	struct rq_runner *r = calloc(1, sizeof(*r));
	if (!r) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	r->base = base;
	r->o = *opts;
	r->cfg = opts->cfg;
	if (opts->backend) {
		r->be = opts->backend;
		r->bctx = opts->backend_ctx;
	} else {
		r->be = &real_ops;
		r->real.dests = opts->dests;
		r->bctx = &r->real;
	}
	r->relay = opts->cfg && opts->cfg->relay_host;
	r->want_claim = true;
	rq_queue_outcomes_init(&r->ob);
	r->queue_name = strdup(opts->queue ? opts->queue : RQ_KEYS_QUEUE_DEFAULT);
	r->claim_retry_ev = evtimer_new(base, on_claim_retry, r);
	r->renew_ev = evtimer_new(base, on_renew, r);
	r->recover_ev = event_new(base, -1, EV_PERSIST, on_recover, r);
	r->flush_ev = event_new(base, -1, 0, on_flush, r);
	r->stop_ev = evtimer_new(base, on_stop_wait, r);
	r->stopped_ev = event_new(base, -1, 0, on_stopped_ev, r);
	if (!r->queue_name || !r->claim_retry_ev || !r->renew_ev || !r->recover_ev ||
	    !r->flush_ev ||
	    !r->stop_ev || !r->stopped_ev) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	const struct rq_config *cfg = opts->cfg;
	struct rq_queue_opts qo = {
		.url = opts->redis ? opts->redis : (cfg && cfg->redis ? cfg->redis
					: RQ_REDIS_URL_DEFAULT),
		.queue = r->queue_name,
		.user = cfg ? cfg->redis_user : NULL,
		.password_file = cfg ? cfg->redis_password_file : NULL,
		.password_env = cfg ? cfg->redis_password_env : NULL,
		.on_wake = on_wake,
		.on_state = on_state,
		.arg = r,
	};
	if (r->be->queue_start(r->bctx, base, &qo, err, errlen) < 0)
		goto fail;
	r->started = true;
	if (r->be->recover(r->bctx, recover_cb, r) == 0)
		r->commands_pending++;
	arm_renew(r);
	arm_recover(r);
	maybe_claim(r);
	return r;
fail:
	rq_runner_destroy(r);
	return NULL;
}

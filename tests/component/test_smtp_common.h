/*
 * Shared helpers of the SMTP client tests (test_smtp_*.c): one event loop,
 * a session with short timeouts, a transaction runner and a wire trace.
 * Header-only; included by one test file each.
 */
#ifndef TEST_SMTP_COMMON_H
#define TEST_SMTP_COMMON_H

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

#include "harness.h"
#include "relayq/smtp.h"
#include "relayq/tls.h"

#define MAXR 64

struct run {
	struct event_base *base;
	struct rq_smtp *s;
	struct rq_tls_ctx *tls;
	struct rq_smtp_opts opts;
	int nready;
	int nclosed;
	struct rq_outcome why;
	int ndone;
	bool destroy_in_done;    /* rq_smtp_destroy inside the done callback */
	bool destroy_in_closed;
	char *trace;             /* the client's wire trace: "> CMD\n< REPLY\n" */
	size_t tlen, tcap;
	/* one transaction */
	struct rq_smtp_txn txn;
	struct rq_smtp_rcpt rcpts[MAXR];
	const char *body;
};

static inline void on_ready(struct rq_smtp *s, void *arg)
{
	struct run *r = arg;
	r->nready++;
	event_base_loopbreak(r->base);
}

static inline void on_closed(struct rq_smtp *s, const struct rq_outcome *why, void *arg)
{
	struct run *r = arg;
	r->nclosed++;
	r->why = *why;
	event_base_loopbreak(r->base);
	if (r->destroy_in_closed) {
		rq_smtp_destroy(r->s);
		r->s = NULL;
	}
}

static inline void on_trace(struct rq_smtp *s, char dir, const char *line, size_t len, void *arg)
{
	struct run *r = arg;
	if (r->tlen + len + 4 > r->tcap) {
		r->tcap = (r->tcap + len + 4) * 2;
		r->trace = realloc(r->trace, r->tcap);
		assert_non_null(r->trace);
	}
	r->trace[r->tlen++] = dir;
	r->trace[r->tlen++] = ' ';
	memcpy(r->trace + r->tlen, line, len);
	r->tlen += len;
	r->trace[r->tlen++] = '\n';
	r->trace[r->tlen] = '\0';
}

static inline void on_done(struct rq_smtp_txn *t, void *arg)
{
	struct run *r = arg;
	r->ndone++;
	event_base_loopbreak(r->base);
	if (r->destroy_in_done) {
		rq_smtp_destroy(r->s);
		r->s = NULL;
	}
}

/* Short timeouts: tests must not wait minutes. */
static inline void short_timeouts(struct rq_smtp_opts *o, int ms)
{
	struct rq_smtp_timeouts t = {ms, ms, ms, ms, ms, ms, ms, ms, ms, ms, ms, ms};
	o->timeout = t;
	o->data_total = 2 * ms;
}

static inline void run_init(struct run *r)
{
	memset(r, 0, sizeof(*r));
	r->base = event_base_new();
	assert_non_null(r->base);
	rq_smtp_opts_init(&r->opts);
	r->opts.helo_name = "client.test";
	r->opts.idle_ms = 0;
	short_timeouts(&r->opts, 3000);
}

static inline struct rq_tls_ctx *test_tls_ctx(const char *ca_pem)
{
	char err[256];
	struct rq_tls_ctx_opts to = {.ca_file = ca_pem};
	struct rq_tls_ctx *t = rq_tls_ctx_create(&to, err, sizeof(err));
	if (!t)
		fail_msg("tls ctx: %s", err);
	return t;
}

static inline void run_session(struct run *r)
{
	char err[256];
	struct rq_smtp_callbacks cbs = {on_ready, on_closed, on_trace, r};
	r->s = rq_smtp_create(r->base, &r->opts, &cbs, err, sizeof(err));
	if (!r->s)
		fail_msg("rq_smtp_create: %s", err);
}

static inline void run_connect_hosts(struct run *r, const struct rq_smtp_host *h, size_t n)
{
	if (!r->s)
		run_session(r);
	assert_int_equal(rq_smtp_connect(r->s, h, n), 0);
}

static inline void run_connect(struct run *r, int port, const char *name)
{
	struct rq_smtp_host h;
	assert_int_equal(rq_smtp_host_set(&h, "127.0.0.1", port, name), 0);
	run_connect_hosts(r, &h, 1);
}

/* Prepares r->txn: from, recipients (NULL-terminated list), body. */
static inline void txn_set(struct run *r, const char *from, const char *const *rcpts, const char *body)
{
	memset(&r->txn, 0, sizeof(r->txn));
	memset(r->rcpts, 0, sizeof(r->rcpts));
	size_t n = 0;
	while (rcpts[n]) {
		assert_true(n < MAXR);
		r->rcpts[n].addr = rcpts[n];
		r->rcpts[n].len = strlen(rcpts[n]);
		n++;
	}
	r->txn.from = from;
	r->txn.from_len = strlen(from);
	r->txn.rcpts = r->rcpts;
	r->txn.nrcpt = n;
	r->body = body;
	r->txn.body = body;
	r->txn.body_len = strlen(body);
	r->txn.done = on_done;
	r->txn.arg = r;
}

struct wait_arg {
	struct run *r;
	int n;
};

static inline bool cond_done(void *arg)
{
	struct wait_arg *w = arg;
	return w->r->ndone >= w->n;
}

static inline bool cond_closed(void *arg)
{
	struct wait_arg *w = arg;
	return w->r->nclosed >= w->n;
}

static inline bool cond_ready(void *arg)
{
	struct wait_arg *w = arg;
	return w->r->nready >= w->n;
}

/* Runs the loop until cond or ms (with a 5 ms tick). */
static inline bool loop_until(struct event_base *base, bool (*cond)(void *), void *arg, int ms)
{
	struct timeval tick = {0, 5000};
	for (int waited = 0; waited <= ms; waited += 5) {
		if (cond(arg))
			return true;
		event_base_loopexit(base, &tick);
		event_base_loop(base, 0);
	}
	return cond(arg);
}

static inline void wait_done(struct run *r, int n)
{
	struct wait_arg w = {r, n};
	if (!loop_until(r->base, cond_done, &w, 20000))
		fail_msg("transaction %d not done; trace:\n%s", n, r->trace ? r->trace : "");
}

static inline void wait_closed(struct run *r)
{
	struct wait_arg w = {r, 1};
	if (!loop_until(r->base, cond_closed, &w, 20000))
		fail_msg("session not closed; trace:\n%s", r->trace ? r->trace : "");
}

static inline void wait_ready(struct run *r)
{
	struct wait_arg w = {r, 1};
	if (!loop_until(r->base, cond_ready, &w, 20000))
		fail_msg("session not ready; closed=%d why=%s; trace:\n%s", r->nclosed,
			 r->why.text, r->trace ? r->trace : "");
}

/* Sends r->txn and waits for its done callback. */
static inline void send_wait(struct run *r)
{
	int before = r->ndone;
	assert_int_equal(rq_smtp_send(r->s, &r->txn), 0);
	wait_done(r, before + 1);
}

/* QUIT, wait for closed, free everything. */
static inline void run_finish(struct run *r)
{
	if (r->s && r->nclosed == 0) {
		rq_smtp_quit(r->s);
		wait_closed(r);
	}
	rq_smtp_destroy(r->s);
	r->s = NULL;
	rq_tls_ctx_destroy(r->tls);
	r->tls = NULL;
	free(r->trace);
	r->trace = NULL;
}

static inline void run_free_base(struct run *r)
{
	/* let deferred frees run */
	event_base_loop(r->base, EVLOOP_NONBLOCK);
	event_base_free(r->base);
	r->base = NULL;
}

static inline void assert_outcome(const struct rq_outcome *o, enum rq_stage stage, enum rq_fail fail,
			   int code)
{
	if (o->stage != stage || o->fail != fail || o->code != code)
		fail_msg("outcome: stage %s fail %s code %d (%s); expected stage %s fail %s code %d",
			 rq_stage_name(o->stage), rq_fail_name(o->fail), o->code, o->text,
			 rq_stage_name(stage), rq_fail_name(fail), code);
}

static inline void assert_rcpt(const struct rq_smtp_rcpt *rc, enum rq_smtp_rcpt_result res,
			enum rq_stage stage, enum rq_fail fail, int code)
{
	if (rc->result != res)
		fail_msg("recipient %.*s: result %d, expected %d (outcome stage %s fail %s code %d: %s)",
			 (int)rc->len, rc->addr, rc->result, res, rq_stage_name(rc->outcome.stage),
			 rq_fail_name(rc->outcome.fail), rc->outcome.code, rc->outcome.text);
	if (res != RQ_SMTP_RCPT_NOT_TRIED)
		assert_outcome(&rc->outcome, stage, fail, code);
}

/* Counts non-overlapping occurrences of needle in hay. */
static inline int count_str(const char *hay, const char *needle)
{
	int n = 0;
	size_t l = strlen(needle);
	if (!hay)
		return 0;
	for (const char *p = strstr(hay, needle); p; p = strstr(p + l, needle))
		n++;
	return n;
}

#endif

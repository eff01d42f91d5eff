#ifndef RELAYQ_RUNNER_H
#define RELAYQ_RUNNER_H

/*
 * The runner: drains one queue. It claims batches from Redis (queue.h),
 * splits every message into jobs per destination and per
 * recipients_per_transaction, hands them to the destination pools (dest.h),
 * turns every recipient's result into a decision (policy_lua.h), logs one
 * line per recipient and attempt, and settles finished messages in batches
 * (one relayq_settle per event-loop turn, or per RUNNER_SETTLE_MAX
 * messages).
 *
 * Flow control: a claim is made when woken (enqueue, earliest scheduled
 * time, reconnect) or when the last claim came back full, and only while
 * fewer than 2 x batch messages are in flight, so memory stays flat
 * whatever the queue length. Leases of messages in flight are renewed
 * together every lease / 3. Expired leases (of a crashed runner) are
 * recovered at start and by a sweep every lease / 2 (5 s to 60 s): claim
 * takes them back too, but only when something else wakes the runner.
 *
 * Decisions: every recipient's result (delivered, failed, or not sent
 * because its destination is suspended) goes to rq_decision_make
 * (decision.h), the same function `relayq explain` calls; the runner
 * records what it answers: the state (delivered; deferred at now + after;
 * failed / expired with the knowledge-base hint "meaning — fix"; dropped;
 * held: the message is parked; resend: sent again at once), whether the
 * message's attempt counts, and the destination action (suspend, one more
 * failure, ok), folded over a job's recipients. A message's settle entry is
 * written once all its jobs are done; its body is released then. With
 * bounce = true, failed recipients of a message with a sender get one
 * RFC 3464 DSN enqueued into the same queue, idempotency key
 * "bounce:<id>:<attempt>".
 *
 * Log lines (logfmt or JSON, one per recipient and attempt): event =
 * delivered | deferred | failed | expired | dropped | held, with queue, id,
 * rcpt, host, code, enhanced, text, stage, attempt (this attempt's
 * number), next (ms) and after (deferred only), rule, reason, delay
 * (seconds since enqueue). Level info; failed / expired warn; decisions the
 * policy marks loud (AUTH, configuration) error. Other events:
 * settle_lost, settle_failed, claim_failed, bounce_queued, bounce_failed,
 * recovered, redis_ready, redis_down, redis_unavailable, stop_incomplete.
 *
 * Everything runs on the caller's event loop; callbacks come from it.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "relayq/decision.h"
#include "relayq/queue.h"

struct event_base;
struct rq_backoff;
struct rq_config;
struct rq_dest;
struct rq_dest_job;
struct rq_dests;
struct rq_runner;

/*
 * The runner's seam: everything it asks of the queue (queue.h) and of the
 * destinations (dest.h), as a table of functions over one context. NULL in
 * the options means the real ones (a Redis client from the options, and
 * opts->dests); tests give their own to drive claims, resends, shutdown and
 * settle batching without Redis or SMTP. Callbacks get q = NULL from a
 * test's table; the runner never uses that argument.
 */
struct rq_runner_backend {
	/* Starts the queue client with qo (its on_wake / on_state callbacks
	 * are the runner's). 0, or -1 with a reason in err. */
	int (*queue_start)(void *ctx, struct event_base *base, const struct rq_queue_opts *qo,
			   char *err, size_t errlen);
	/* Stops it: every pending command's callback runs now
	 * (RQ_QUEUE_ECANCEL). Nothing else is called afterwards. */
	void (*queue_stop)(void *ctx);
	/* The Redis URL without its password, for log lines. */
	const char *(*redis_redacted)(void *ctx);
	/* As rq_queue_claim / settle / renew / recover / enqueue / wake_at. */
	int (*claim)(void *ctx, int count, int64_t lease_ms, rq_queue_claim_cb *cb, void *arg);
	int (*settle)(void *ctx, struct rq_queue_outcomes *o, rq_queue_settle_cb *cb, void *arg);
	int (*renew)(void *ctx, int64_t lease_ms, const struct rq_queue_lease *leases, size_t n,
		     rq_queue_count_cb *cb, void *arg);
	int (*recover)(void *ctx, rq_queue_count_cb *cb, void *arg);
	int (*enqueue)(void *ctx, const struct rq_queue_enqueue_req *req, rq_queue_enqueue_cb *cb,
		       void *arg);
	void (*wake_at)(void *ctx, int64_t delay_ms);
	/* As rq_dests_submit: 0 queued (job->done runs later, from the event
	 * loop), 1 suspended (job->until set, done not called), -1 refused. */
	int (*submit)(void *ctx, const char *key, struct rq_dest_job *job);
	/* What a finished job's outcomes mean for its destination (job->dest,
	 * may be NULL): suspend for suspend_secs, one more failure (with that
	 * domain's backoff), ok. Never called with RQ_DECISION_DEST_NONE. */
	void (*report)(void *ctx, struct rq_dest *dest, enum rq_decision_dest act,
		       double suspend_secs, const struct rq_backoff *backoff);
};

#define RQ_RUNNER_SETTLE_MAX 200     /* messages per settle call */
#define RQ_RUNNER_STOP_WAIT_MS 10000 /* wait for Redis replies at stop, once
					 every message is handed back */

struct rq_runner_opts {
	const char *redis;            /* URL (overrides cfg->redis); copied */
	const char *queue;            /* queue name; copied */
	const struct rq_config *cfg;  /* borrowed; see rq_runner_set_config */
	struct rq_dests *dests;       /* borrowed, shared by runners */
	/* NULL: the real queue and dests; else a test's (see above) */
	const struct rq_runner_backend *backend;
	void *backend_ctx;
	/* Called once after rq_runner_stop, when every message in flight has
	 * been settled and the settle replies are in (or after
	 * RQ_RUNNER_STOP_WAIT_MS). From the event loop. */
	void (*stopped)(struct rq_runner *r, void *arg);
	void *arg;
};

/* Creates the runner and starts connecting to Redis; the first claim
 * follows once connected. Returns NULL with a reason in err (bad URL, ...;
 * never the password). */
struct rq_runner *rq_runner_create(struct event_base *base,
				   const struct rq_runner_opts *opts,
				   char *err, size_t errlen);

/* Uses cfg (borrowed) for the following decisions, batch and lease: a
 * reloaded configuration. The previous one may be freed once this
 * returns (the runner keeps no pointer into it). */
void rq_runner_set_config(struct rq_runner *r, const struct rq_config *cfg);

/* Stops claiming. Jobs still running finish (the caller drains the
 * destinations); what is left is handed back (deferred to now, no attempt
 * counted); then stopped is called. */
void rq_runner_stop(struct rq_runner *r);

/* Frees the runner (pending Redis commands are cancelled). Call after
 * stopped, or at any time to abandon work (leases then expire). NULL:
 * no-op. Not from inside one of its callbacks. */
void rq_runner_destroy(struct rq_runner *r);

/* The queue's name. */
const char *rq_runner_queue(const struct rq_runner *r);

/* The redacted Redis URL (for the start line). */
const char *rq_runner_redis_redacted(const struct rq_runner *r);

struct rq_runner_stats {
	uint64_t claims, claimed;     /* claim calls, messages claimed */
	uint64_t settles, settled;    /* settle calls, messages settled */
	uint64_t lost;                /* settles answered "lost" */
	uint64_t invalid;             /* settles answered "invalid" (a bug: logged) */
	uint64_t delivered, deferred, failed, expired, dropped, held;
	uint64_t bounces;             /* DSNs enqueued */
	size_t inflight;              /* messages claimed, not yet settled */
	bool redis_ready;             /* the command connection is READY */
};
void rq_runner_get_stats(const struct rq_runner *r, struct rq_runner_stats *st);

#endif

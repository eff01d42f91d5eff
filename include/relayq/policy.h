#ifndef RELAYQ_POLICY_H
#define RELAYQ_POLICY_H

/*
 * The built-in delivery policy: what to do with one outcome (a reply or a
 * transport event) for one recipient. Pure functions: time, attempt count,
 * age and the random source are passed in, nothing is read from the clock.
 *
 * Built-in rules (rule names in brackets):
 *   2xx                                   delivered        [builtin:2xx]
 *   452/552 or x.5.3 "too many recipients" at RCPT
 *                                         not_tried: send the recipient in
 *                                         a new transaction now, no attempt
 *                                         counted          [builtin:too-many-recipients]
 *   greeting 5xx or 421                   next_host (that host refuses the
 *                                         session; retry the destination
 *                                         later), counts against the
 *                                         destination      [builtin:greeting-5xx]
 *                                                          [builtin:greeting-421]
 *   421 at any other stage                retry, counts against the
 *                                         destination (the server closes
 *                                         the session)     [builtin:421]
 *   any reply at stage auth, and 530      retry, loud (our credentials or
 *                                         configuration), counts against the
 *                                         destination      [builtin:auth]
 *   other 4xx (450, 451, 452, ...)        retry with backoff [builtin:4xx]
 *   other 5xx (550-554, ...)              fail             [builtin:5xx]
 *   transport: timeout, refused, lost, tls, dns, protocol
 *                                         retry, counts against the
 *                                         destination      [builtin:timeout] ...
 *   a retry when the message is older than max_age, or its attempt number
 *   reached max_attempts                  fail, expired    [builtin:expired]
 *
 * Backoff for attempt n (1 = the first attempt): first * factor^(n-1),
 * capped at max, then jitter: multiplied by a uniform factor in
 * [1 - jitter, 1 + jitter); never below 1 second.
 */

#include <stdbool.h>
#include <stddef.h>

#include "relayq/reply.h"

enum rq_policy_action {
	RQ_POLICY_DELIVERED = 0,
	RQ_POLICY_RETRY,      /* schedule the recipient again after `after` */
	RQ_POLICY_FAIL,       /* permanent failure (dead set, DSN) */
	RQ_POLICY_DROP,       /* discard the recipient silently (event only) */
	RQ_POLICY_HOLD,       /* park the message for an operator */
	RQ_POLICY_SUSPEND,    /* suspend the whole destination for `after`;
				 the recipient is retried after that */
	RQ_POLICY_NEXT_HOST,  /* try the next MX host now; when none is left,
				 retry after `after` (call rq_policy_expire) */
	RQ_POLICY_NOT_TRIED,  /* not a failure: send again in a new
				 transaction now, no attempt counted */
	RQ_POLICY_ACTION_COUNT_
};

/* What a failure counts against: the message's attempts, or the
 * destination (the message's attempts are not increased). */
enum rq_policy_count {
	RQ_POLICY_COUNT_NONE = 0,
	RQ_POLICY_COUNT_MESSAGE,
	RQ_POLICY_COUNT_DESTINATION,
};

#define RQ_POLICY_RULE_MAX 96
#define RQ_POLICY_REASON_MAX 320

/* The policy's own answer for one outcome. What relayqd records follows
 * from it in decision.h (rq_decision_make), never elsewhere. */
struct rq_policy_answer {
	enum rq_policy_action action;
	double after;                  /* seconds (retry, suspend, next_host) */
	/* The range after was drawn from: the backoff's jitter when after is
	 * the backoff, else both equal to after. What `relayq explain`
	 * prints, without deciding again (a handler runs once). */
	double after_min, after_max;
	enum rq_policy_count counts;
	bool loud;                     /* needs the operator: log at error */
	bool expired;                  /* a retry turned into fail by expiry */
	char rule[RQ_POLICY_RULE_MAX];     /* "builtin:4xx", "lua:550", ... */
	char reason[RQ_POLICY_REASON_MAX]; /* one line, for logs and events */
};

struct rq_backoff {
	double first;    /* seconds, > 0 */
	double factor;   /* >= 1 */
	double max;      /* seconds, >= first */
	double jitter;   /* 0 .. 1 */
};

struct rq_expire {
	double max_age;         /* seconds; 0 = never */
	unsigned max_attempts;  /* 0 = no limit */
};

/* The parameters of one decision (global, or resolved for a domain). */
struct rq_policy_params {
	struct rq_backoff backoff;
	struct rq_expire expire;
};

/* Defaults: backoff first 5m, factor 2, max 4h, jitter 0.15; expire
 * max_age 5d, no max_attempts. */
#define RQ_POLICY_BACKOFF_FIRST 300.0
#define RQ_POLICY_BACKOFF_FACTOR 2.0
#define RQ_POLICY_BACKOFF_MAX 14400.0
#define RQ_POLICY_BACKOFF_JITTER 0.15
#define RQ_POLICY_MAX_AGE (5 * 86400.0)
/* A local fault (RQ_FAIL_LOCAL: out of file descriptors, buffers, memory):
 * the message is retried after this many seconds, whatever the backoff. */
#define RQ_POLICY_LOCAL_RETRY 30.0

void rq_policy_params_default(struct rq_policy_params *p);

/*
 * A random source: returns a uniform double in [0, 1). ctx is passed
 * through. Tests inject a fixed one; NULL fn means rq_policy_rand_default.
 */
struct rq_policy_rand {
	double (*fn)(void *ctx);
	void *ctx;
};

/* A process-wide generator (random(3)-based); ctx unused. */
double rq_policy_rand_default(void *ctx);

/* What the decision is about. Strings are borrowed, may be NULL. */
struct rq_policy_input {
	const struct rq_outcome *outcome;
	const char *recipient;
	const char *domain;      /* the recipient's domain */
	const char *host;        /* the host that answered, if any */
	unsigned attempt;        /* this attempt's number, 1 = first (0 = 1) */
	double age;              /* seconds since the message was created */
};

/* Backoff delay in seconds before the attempt after attempt `attempt`
 * (>= 1 s). rnd may be NULL (default source). */
double rq_policy_backoff(const struct rq_backoff *b, unsigned attempt,
			 const struct rq_policy_rand *rnd);

/* The range rq_policy_backoff draws from for attempt: *lo with the
 * smallest random number, *hi with the largest (equal without jitter). */
void rq_policy_backoff_range(const struct rq_backoff *b, unsigned attempt,
			     double *lo, double *hi);

/*
 * The built-in decision for in (see the table above), expiry included.
 * Never fails; out is always filled.
 */
void rq_policy_builtin(const struct rq_policy_params *params,
		       const struct rq_policy_input *in,
		       const struct rq_policy_rand *rnd, struct rq_policy_answer *out);

/*
 * Expiry: when d is a retry (or a suspend / next_host that the caller turns
 * into a retry of this message) and the message is past max_age or its
 * attempt number reached max_attempts, turns d into a fail with
 * rule "builtin:expired", expired = true and a reason naming the last
 * temporary reply. Returns true when it did.
 */
bool rq_policy_expire(const struct rq_policy_params *params,
		      const struct rq_policy_input *in, struct rq_policy_answer *d);

/* The outcome in one short line: "451 4.7.1 text at rcpt" or
 * "timeout at greeting: text". */
void rq_policy_describe(const struct rq_outcome *o, char *buf, size_t len);

/* "delivered", "retry", "fail", "drop", "hold", "suspend", "next_host",
 * "not_tried"; and "none", "message", "destination". Static strings. */
const char *rq_policy_action_name(enum rq_policy_action a);
const char *rq_policy_count_name(enum rq_policy_count c);

/*
 * Durations: a number of seconds, or a string of one or more
 * <number><unit> parts, unit s, m, h, d or w ("30s", "5m", "1h30m", "1.5h");
 * a bare number string is seconds. Returns 0 and *out, or -1 when invalid
 * (empty, unknown unit, negative, not finite, over 10 years).
 */
int rq_duration_parse(const char *s, double *out);
/* Formats seconds as "5m", "1h30m", "2d", "1.5s" into buf. */
void rq_duration_format(double secs, char *buf, size_t len);

#endif

#ifndef RELAYQ_DECISION_H
#define RELAYQ_DECISION_H

/*
 * The decision: the whole answer for one outcome of one recipient, the one
 * place that makes it. relayqd records exactly this (runner.c) and
 * `relayq explain` prints exactly this: both call rq_decision_make.
 *
 * Input: the outcome (a reply or a transport event, its stage, the host),
 * the recipient, the message, this attempt's number and the message's age,
 * how often the message was already sent again at once, and whether the
 * destination is suspended; the config and its policy.
 *
 * Output: the policy's own answer (policy.h: built-in rules, then the Lua
 * rules), and what follows from it:
 *
 *   policy action          recorded state        scope        destination
 *   -------------          --------------        -----        -----------
 *   delivered (2xx)        delivered             message      ok
 *   retry                  deferred, after       as counted   failure when
 *                                                by the rule  it counts
 *                                                             against it
 *   fail                   failed (expired when  message      ok (a reply)
 *                          expiry turned it)
 *   drop / hold            dropped / held        message      ok
 *   suspend                deferred to the end   destination  suspend for
 *                          of the suspension                  `after`
 *   next_host              deferred (the SMTP    destination  failure
 *                          session already tried
 *                          every host; the policy
 *                          sees the last answer)
 *   not_tried              resend (a new trans-  message,     none
 *                          action now), at most  no attempt
 *                          RQ_DECISION_RESENDS_MAX
 *                          times a message, then
 *                          retry with backoff
 *   (destination suspended deferred to its end,  destination  none
 *    before sending)       or expired
 *   (a local fault:        deferred after        nothing, no  none
 *    RQ_FAIL_LOCAL, before RQ_POLICY_LOCAL_RETRY attempt
 *    the peer was reached) (builtin:local; no
 *                          Lua rule sees it)
 *
 * Expiry (max_age, max_attempts) applies to every state that would wait:
 * a deferral past it is recorded as expired, rule "builtin:expired", with
 * the last temporary reply in the reason. A destination that the policy
 * suspends stays suspended even when this recipient expires.
 *
 * Pure: no I/O, no clock (age and attempt are inputs). A Lua handler may
 * run (policy_lua.h); it never fails the decision.
 */

#include <stdbool.h>
#include <stddef.h>

#include "relayq/policy.h"
#include "relayq/policy_lua.h"

struct rq_config;
struct rq_outcome;

/* Immediate resends of one message after a not_tried answer (a 452 to the
 * first recipient); after that the backoff. */
#define RQ_DECISION_RESENDS_MAX 1
/* A suspension with no length of its own (seconds). */
#define RQ_DECISION_SUSPEND_DEFAULT 60.0

enum rq_decision_state {
	RQ_DECISION_DELIVERED = 0,
	RQ_DECISION_DEFERRED,      /* scheduled again after `after` */
	RQ_DECISION_FAILED,        /* permanent: dead set, DSN */
	RQ_DECISION_EXPIRED,       /* a deferral past max_age / max_attempts */
	RQ_DECISION_DROPPED,       /* discarded (event only) */
	RQ_DECISION_HELD,          /* the message is parked for an operator */
	RQ_DECISION_RESEND,        /* sent again now in a new transaction */
	RQ_DECISION_STATE_COUNT_
};

/* What the outcome counts against: the message's attempts, or the
 * destination (the message's attempt is not counted). */
enum rq_decision_scope {
	RQ_DECISION_SCOPE_MESSAGE = 0,
	RQ_DECISION_SCOPE_DESTINATION,
};

/* What the destination's pool is told, weakest first: for a job of several
 * recipients the strongest one applies (rq_decision_dest_merge). */
enum rq_decision_dest {
	RQ_DECISION_DEST_NONE = 0,
	RQ_DECISION_DEST_OK,       /* it answered: failures are forgotten */
	RQ_DECISION_DEST_FAILED,   /* one more failure: its backoff grows */
	RQ_DECISION_DEST_SUSPEND,  /* suspended for dest_after seconds */
};

struct rq_decision_input {
	const struct rq_outcome *outcome;  /* required */
	const char *recipient;             /* may be NULL */
	const char *domain;                /* NULL: the recipient's */
	const char *host;                  /* the host that answered; may be NULL */
	const struct rq_policy_msg *msg;   /* may be NULL */
	unsigned attempt;                  /* this attempt's number, 1 = first */
	double age;                        /* seconds since the message was created */
	unsigned resends;                  /* immediate resends the message had */
	/* > 0: the recipient was not sent, its destination is suspended for
	 * this many more seconds (outcome: why, e.g. the pool's last failure) */
	double suspended;
};

struct rq_decision {
	struct rq_policy_answer policy;    /* the policy's own answer */
	enum rq_decision_state state;      /* what is recorded */
	double after;                      /* deferred: seconds to the next try */
	enum rq_decision_scope scope;
	bool attempt;                      /* counts as an attempt of the message */
	bool bounce;                       /* goes into a DSN (failed, expired) */
	bool loud;                         /* needs the operator: log at error */
	enum rq_decision_dest dest;
	double dest_after;                 /* suspend: seconds */
	char rule[RQ_POLICY_RULE_MAX];     /* the rule that decided the state */
	char reason[RQ_POLICY_REASON_MAX]; /* one line */
};

/*
 * The decision for in under cfg (NULL: built-in defaults, no Lua). rnd:
 * the jitter source (NULL: the default one). out is always filled.
 */
void rq_decision_make(const struct rq_config *cfg, const struct rq_decision_input *in,
		      const struct rq_policy_rand *rnd, struct rq_decision *out);

/* Folds one recipient's destination action into a job's (*dest, *after):
 * the strongest action wins, the longest suspension. */
void rq_decision_dest_merge(enum rq_decision_dest *dest, double *after,
			    const struct rq_decision *d);

/* "delivered", "deferred", "failed", "expired", "dropped", "held",
 * "resend"; "message", "destination"; "none", "ok", "failed", "suspend".
 * Static strings. */
const char *rq_decision_state_name(enum rq_decision_state s);
const char *rq_decision_scope_name(enum rq_decision_scope s);
const char *rq_decision_dest_name(enum rq_decision_dest d);

#endif

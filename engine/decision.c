/* The decision for one outcome of one recipient: what is recorded, what it
 * counts against, what the destination is told (see decision.h). */
#include "relayq/decision.h"

#include "relayq/config.h"
#include "relayq/message.h"
#include "relayq/reply.h"

#include <stdio.h>
#include <string.h>

static const char *const state_names[RQ_DECISION_STATE_COUNT_] = {
	[RQ_DECISION_DELIVERED] = "delivered",
	[RQ_DECISION_DEFERRED] = "deferred",
	[RQ_DECISION_FAILED] = "failed",
	[RQ_DECISION_EXPIRED] = "expired",
	[RQ_DECISION_DROPPED] = "dropped",
	[RQ_DECISION_HELD] = "held",
	[RQ_DECISION_RESEND] = "resend",
};

const char *rq_decision_state_name(enum rq_decision_state s)
{
	return (unsigned)s < RQ_DECISION_STATE_COUNT_ ? state_names[s] : "?";
}

const char *rq_decision_scope_name(enum rq_decision_scope s)
{
	return s == RQ_DECISION_SCOPE_DESTINATION ? "destination" : "message";
}

const char *rq_decision_dest_name(enum rq_decision_dest d)
{
	switch (d) {
	case RQ_DECISION_DEST_NONE: return "none";
	case RQ_DECISION_DEST_OK: return "ok";
	case RQ_DECISION_DEST_FAILED: return "failed";
	case RQ_DECISION_DEST_SUSPEND: return "suspend";
	}
	return "?";
}

void rq_decision_dest_merge(enum rq_decision_dest *dest, double *after,
			    const struct rq_decision *d)
{
	if (d->dest > *dest)
		*dest = d->dest;
	if (d->dest == RQ_DECISION_DEST_SUSPEND && d->dest_after > *after)
		*after = d->dest_after;
}

/* The recorded state and its consequences, from the final answer a. */
static void record(struct rq_decision *out, const struct rq_policy_answer *a)
{
	out->scope = a->counts == RQ_POLICY_COUNT_DESTINATION ? RQ_DECISION_SCOPE_DESTINATION
							     : RQ_DECISION_SCOPE_MESSAGE;
	out->loud = a->loud;
	out->after = 0;
	switch (a->action) {
	case RQ_POLICY_DELIVERED:
		out->state = RQ_DECISION_DELIVERED;
		break;
	case RQ_POLICY_RETRY:
	case RQ_POLICY_SUSPEND:
	case RQ_POLICY_NEXT_HOST:
		out->state = RQ_DECISION_DEFERRED;
		out->after = a->after >= 1 ? a->after : 1;
		break;
	case RQ_POLICY_FAIL:
		out->state = a->expired ? RQ_DECISION_EXPIRED : RQ_DECISION_FAILED;
		out->bounce = true;
		break;
	case RQ_POLICY_DROP:
		out->state = RQ_DECISION_DROPPED;
		break;
	case RQ_POLICY_HOLD:
		out->state = RQ_DECISION_HELD;
		break;
	case RQ_POLICY_NOT_TRIED:
	default:
		out->state = RQ_DECISION_RESEND;
		break;
	}
	out->attempt = out->scope == RQ_DECISION_SCOPE_MESSAGE &&
		       out->state != RQ_DECISION_RESEND;
	snprintf(out->rule, sizeof(out->rule), "%s", a->rule);
	snprintf(out->reason, sizeof(out->reason), "%s", a->reason);
}

/* A recipient that waits for a suspended destination: deferred to the end
 * of the suspension (not an attempt), unless that is past its expiry. */
static void suspended(const struct rq_policy_params *params, const struct rq_policy_input *pin,
		      double left, struct rq_decision *out)
{
	struct rq_policy_answer a = {
		.action = RQ_POLICY_RETRY,
		.after = left,
		.after_min = left,
		.after_max = left,
		.counts = RQ_POLICY_COUNT_DESTINATION,
	};
	snprintf(a.rule, sizeof(a.rule), "destination:suspended");
	char what[200];
	rq_policy_describe(pin->outcome, what, sizeof(what));
	snprintf(a.reason, sizeof(a.reason), "destination suspended: %s", what);
	out->policy = a;
	rq_policy_expire(params, pin, &a);
	record(out, &a);
}

void rq_decision_make(const struct rq_config *cfg, const struct rq_decision_input *in,
		      const struct rq_policy_rand *rnd, struct rq_decision *out)
{
	memset(out, 0, sizeof(*out));
	const struct rq_outcome *o = in->outcome;
	const char *domain = in->domain ? in->domain
				   : in->recipient ? rq_addr_domain(in->recipient) : NULL;
	struct rq_policy_input pin = {
		.outcome = o,
		.recipient = in->recipient,
		.domain = domain,
		.host = in->host,
		.attempt = in->attempt ? in->attempt : 1,
		.age = in->age,
	};
	/* The server took it: nothing for a rule to decide (the hot path: no
	 * look-up, no Lua). */
	if (in->suspended <= 0 && o->fail == RQ_FAIL_NONE && o->code >= 200 && o->code <= 299) {
		struct rq_policy_answer *a = &out->policy;
		a->action = RQ_POLICY_DELIVERED;
		snprintf(a->rule, sizeof(a->rule), "builtin:2xx");
		memcpy(a->reason, "accepted: ", 10);
		rq_policy_describe(o, a->reason + 10, sizeof(a->reason) - 10);
		record(out, a);
		out->dest = RQ_DECISION_DEST_OK;
		return;
	}

	struct rq_policy_params params;
	rq_config_params(cfg, domain, &params);
	if (in->suspended > 0) {
		suspended(&params, &pin, in->suspended, out);
		return;
	}

	if (o->fail == RQ_FAIL_LOCAL) {
		/* This host ran out of file descriptors, buffers or memory
		 * before the peer was reached: no rule about replies has
		 * anything to judge, and neither the message (no attempt) nor
		 * the destination (no failure, no suspension) is to blame. */
		rq_policy_builtin(&params, &pin, rnd, &out->policy);
		record(out, &out->policy);
		out->attempt = false;
		out->dest = RQ_DECISION_DEST_NONE;
		return;
	}

	rq_policy_lua_decide_config(cfg, &pin, in->msg, rnd, &out->policy);
	struct rq_policy_answer a = out->policy;
	switch (a.action) {
	case RQ_POLICY_SUSPEND:
		out->dest = RQ_DECISION_DEST_SUSPEND;
		out->dest_after = a.after > 0 ? a.after : RQ_DECISION_SUSPEND_DEFAULT;
		rq_policy_expire(&params, &pin, &a);
		break;
	case RQ_POLICY_NEXT_HOST:
		/* every host of the destination was tried: the destination
		 * failed, the recipient waits for it */
		if (!rq_policy_expire(&params, &pin, &a))
			a.counts = RQ_POLICY_COUNT_DESTINATION;
		break;
	case RQ_POLICY_NOT_TRIED:
		if (in->resends >= RQ_DECISION_RESENDS_MAX) {
			a.action = RQ_POLICY_RETRY;
			a.after = rq_policy_backoff(&params.backoff, pin.attempt, rnd);
			rq_policy_backoff_range(&params.backoff, pin.attempt, &a.after_min,
						&a.after_max);
			a.counts = RQ_POLICY_COUNT_MESSAGE;
			size_t len = strlen(a.reason);
			snprintf(a.reason + len, sizeof(a.reason) - len,
				 "; already sent again %u time%s: retry", in->resends,
				 in->resends == 1 ? "" : "s");
			rq_policy_expire(&params, &pin, &a);
		}
		break;
	default:
		break;
	}
	enum rq_decision_dest dest = out->dest;
	double dest_after = out->dest_after;
	record(out, &a);
	out->dest = dest;
	out->dest_after = dest_after;
	if (out->dest == RQ_DECISION_DEST_NONE) {
		if (out->scope == RQ_DECISION_SCOPE_DESTINATION)
			out->dest = RQ_DECISION_DEST_FAILED;
		else if (o->fail == RQ_FAIL_NONE && !o->synthetic)
			out->dest = RQ_DECISION_DEST_OK;
	}
}

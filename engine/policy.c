/* The built-in delivery policy: rules, backoff, expiry and durations; pure
 * (see policy.h). */
#include "relayq/policy.h"

#include "relayq/str.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char *const action_names[RQ_POLICY_ACTION_COUNT_] = {
	[RQ_POLICY_DELIVERED] = "delivered",
	[RQ_POLICY_RETRY] = "retry",
	[RQ_POLICY_FAIL] = "fail",
	[RQ_POLICY_DROP] = "drop",
	[RQ_POLICY_HOLD] = "hold",
	[RQ_POLICY_SUSPEND] = "suspend",
	[RQ_POLICY_NEXT_HOST] = "next_host",
	[RQ_POLICY_NOT_TRIED] = "not_tried",
};

const char *rq_policy_action_name(enum rq_policy_action a)
{
	if ((unsigned)a >= RQ_POLICY_ACTION_COUNT_)
		return "unknown";
	return action_names[a];
}

const char *rq_policy_count_name(enum rq_policy_count c)
{
	switch (c) {
	case RQ_POLICY_COUNT_NONE: return "none";
	case RQ_POLICY_COUNT_MESSAGE: return "message";
	case RQ_POLICY_COUNT_DESTINATION: return "destination";
	}
	return "unknown";
}

void rq_policy_params_default(struct rq_policy_params *p)
{
	memset(p, 0, sizeof(*p));
	p->backoff.first = RQ_POLICY_BACKOFF_FIRST;
	p->backoff.factor = RQ_POLICY_BACKOFF_FACTOR;
	p->backoff.max = RQ_POLICY_BACKOFF_MAX;
	p->backoff.jitter = RQ_POLICY_BACKOFF_JITTER;
	p->expire.max_age = RQ_POLICY_MAX_AGE;
	p->expire.max_attempts = 0;
}

double rq_policy_rand_default(void *ctx)
{
	(void)ctx;
	/* random() gives 31 bits; good enough to spread retries. */
	return (double)random() / 2147483648.0;
}

double rq_policy_backoff(const struct rq_backoff *b, unsigned attempt,
			 const struct rq_policy_rand *rnd)
{
	if (attempt == 0)
		attempt = 1;
	double first = b->first > 0 ? b->first : 1.0;
	double factor = b->factor >= 1.0 ? b->factor : 1.0;
	double max = b->max >= first ? b->max : first;
	double base = first * pow(factor, (double)(attempt - 1));
	if (!isfinite(base) || base > max)
		base = max;
	double jitter = b->jitter;
	if (!(jitter > 0))
		jitter = 0;
	if (jitter > 1)
		jitter = 1;
	if (jitter > 0) {
		double u = rnd && rnd->fn ? rnd->fn(rnd->ctx)
					  : rq_policy_rand_default(NULL);
		if (!(u >= 0) || u >= 1)
			u = 0.5;
		base *= 1.0 + jitter * (2.0 * u - 1.0);
	}
	if (base < 1.0)
		base = 1.0;
	return base;
}

static double fixed_rand(void *ctx)
{
	return *(const double *)ctx;
}

void rq_policy_backoff_range(const struct rq_backoff *b, unsigned attempt,
			     double *lo, double *hi)
{
	/* The extremes of [0, 1) rq_policy_backoff accepts. */
	double u_lo = 0.0, u_hi = 0.9999999;
	struct rq_policy_rand r_lo = {fixed_rand, &u_lo}, r_hi = {fixed_rand, &u_hi};
	*lo = rq_policy_backoff(b, attempt, &r_lo);
	*hi = rq_policy_backoff(b, attempt, &r_hi);
}

/* out->after is the backoff of params for in: its jitter range. */
static void backoff_range(struct rq_policy_answer *out, const struct rq_policy_params *params,
			  const struct rq_policy_input *in)
{
	rq_policy_backoff_range(&params->backoff, in->attempt, &out->after_min,
				&out->after_max);
}

static void set(struct rq_policy_answer *d, enum rq_policy_action action, double after,
		enum rq_policy_count counts, const char *rule, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));

static void set(struct rq_policy_answer *d, enum rq_policy_action action, double after,
		enum rq_policy_count counts, const char *rule, const char *fmt, ...)
{
	d->action = action;
	d->after = after;
	d->after_min = after;
	d->after_max = after;
	d->counts = counts;
	snprintf(d->rule, sizeof(d->rule), "%s", rule);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(d->reason, sizeof(d->reason), fmt, ap);
	va_end(ap);
	rq_str_one_line(d->reason);  /* reply text may hold several lines */
}

/* "451 4.7.1 first line of text" (the reply, short), into buf. */
void rq_policy_describe(const struct rq_outcome *o, char *buf, size_t len)
{
	char first[160];
	size_t n = strcspn(o->text, "\n");
	if (n >= sizeof(first))
		n = sizeof(first) - 1;
	memcpy(first, o->text, n);
	first[n] = '\0';
	if (o->fail != RQ_FAIL_NONE && o->code == 0) {
		snprintf(buf, len, "%s at %s%s%s", rq_fail_name(o->fail),
			 rq_stage_name(o->stage), first[0] ? ": " : "", first);
		return;
	}
	snprintf(buf, len, "%d%s%s%s%s at %s", o->code, o->enhanced[0] ? " " : "",
		 o->enhanced, first[0] ? " " : "", first, rq_stage_name(o->stage));
}

bool rq_policy_expire(const struct rq_policy_params *params,
		      const struct rq_policy_input *in, struct rq_policy_answer *d)
{
	if (d->action != RQ_POLICY_RETRY && d->action != RQ_POLICY_SUSPEND &&
	    d->action != RQ_POLICY_NEXT_HOST)
		return false;
	unsigned attempt = in->attempt ? in->attempt : 1;
	const char *why = NULL;
	char whybuf[96];
	if (params->expire.max_age > 0 && in->age >= params->expire.max_age) {
		char age[32];
		rq_duration_format(params->expire.max_age, age, sizeof(age));
		snprintf(whybuf, sizeof(whybuf), "older than max_age %s", age);
		why = whybuf;
	} else if (params->expire.max_attempts > 0 &&
		   attempt >= params->expire.max_attempts) {
		snprintf(whybuf, sizeof(whybuf), "%u attempts (max_attempts %u)",
			 attempt, params->expire.max_attempts);
		why = whybuf;
	}
	if (!why)
		return false;
	char last[200];
	rq_policy_describe(in->outcome, last, sizeof(last));
	char prev[RQ_POLICY_RULE_MAX];
	snprintf(prev, sizeof(prev), "%s", d->rule);
	set(d, RQ_POLICY_FAIL, 0, RQ_POLICY_COUNT_MESSAGE, "builtin:expired",
	    "expired: %s; last temporary reply (%s): %s", why, prev, last);
	d->expired = true;
	return true;
}

void rq_policy_builtin(const struct rq_policy_params *params,
		       const struct rq_policy_input *in,
		       const struct rq_policy_rand *rnd, struct rq_policy_answer *out)
{
	const struct rq_outcome *o = in->outcome;
	memset(out, 0, sizeof(*out));
	char what[200];
	rq_policy_describe(o, what, sizeof(what));
	double backoff = rq_policy_backoff(&params->backoff, in->attempt, rnd);

	if (o->fail == RQ_FAIL_LOCAL) {
		/* nobody's fault but this host's: soon again, counted against
		 * neither the message nor the destination */
		set(out, RQ_POLICY_RETRY, RQ_POLICY_LOCAL_RETRY, RQ_POLICY_COUNT_NONE,
		    "builtin:local", "local resource failure, retry soon: %s", what);
		goto expire;
	}
	if (o->fail != RQ_FAIL_NONE && !(o->code >= 200 && o->code <= 599)) {
		char rule[RQ_POLICY_RULE_MAX];
		snprintf(rule, sizeof(rule), "builtin:%s", rq_fail_name(o->fail));
		set(out, RQ_POLICY_RETRY, backoff, RQ_POLICY_COUNT_DESTINATION, rule,
		    "transport failure, retry: %s", what);
		goto expire;
	}
	if (o->code >= 200 && o->code <= 299) {
		set(out, RQ_POLICY_DELIVERED, 0, RQ_POLICY_COUNT_NONE, "builtin:2xx",
		    "accepted: %s", what);
		return;
	}
	if (rq_reply_too_many_rcpts(o)) {
		set(out, RQ_POLICY_NOT_TRIED, 0, RQ_POLICY_COUNT_NONE,
		    "builtin:too-many-recipients",
		    "too many recipients, send in a new transaction: %s", what);
		return;
	}
	if (o->stage == RQ_STAGE_GREETING && o->code >= 500 && o->code <= 599) {
		set(out, RQ_POLICY_NEXT_HOST, backoff, RQ_POLICY_COUNT_DESTINATION,
		    "builtin:greeting-5xx", "host refuses the session: %s", what);
		backoff_range(out, params, in);
		return;
	}
	if (o->stage == RQ_STAGE_GREETING && o->code == 421) {
		set(out, RQ_POLICY_NEXT_HOST, backoff, RQ_POLICY_COUNT_DESTINATION,
		    "builtin:greeting-421", "host refuses the session: %s", what);
		backoff_range(out, params, in);
		return;
	}
	if (o->stage == RQ_STAGE_AUTH || o->code == 530) {
		set(out, RQ_POLICY_RETRY, backoff, RQ_POLICY_COUNT_DESTINATION,
		    "builtin:auth",
		    "authentication refused (check our credentials): %s", what);
		out->loud = true;
		goto expire;
	}
	if (o->code == 421) {
		set(out, RQ_POLICY_RETRY, backoff, RQ_POLICY_COUNT_DESTINATION,
		    "builtin:421", "server closes the session, retry: %s", what);
		goto expire;
	}
	if (o->code >= 400 && o->code <= 499) {
		set(out, RQ_POLICY_RETRY, backoff, RQ_POLICY_COUNT_MESSAGE, "builtin:4xx",
		    "temporary failure, retry: %s", what);
		goto expire;
	}
	if (o->code >= 500 && o->code <= 599) {
		set(out, RQ_POLICY_FAIL, 0, RQ_POLICY_COUNT_MESSAGE, "builtin:5xx",
		    "permanent failure: %s", what);
		return;
	}
	/* Neither a reply in 200..599 nor a transport event: a broken peer. */
	set(out, RQ_POLICY_RETRY, backoff, RQ_POLICY_COUNT_DESTINATION,
	    "builtin:protocol", "unexpected result, retry: %s", what);
expire:
	/* every path here retries after the backoff */
	backoff_range(out, params, in);
	rq_policy_expire(params, in, out);
}

int rq_duration_parse(const char *s, double *out)
{
	if (!s)
		return -1;
	while (isspace((unsigned char)*s))
		s++;
	if (*s == '\0')
		return -1;
	double total = 0;
	int parts = 0;
	while (*s) {
		if (!isdigit((unsigned char)*s) && *s != '.')
			return -1;
		char *end;
		double v = strtod(s, &end);
		if (end == s || !isfinite(v) || v < 0)
			return -1;
		s = end;
		double mul;
		switch (*s) {
		case 's': mul = 1; s++; break;
		case 'm': mul = 60; s++; break;
		case 'h': mul = 3600; s++; break;
		case 'd': mul = 86400; s++; break;
		case 'w': mul = 7 * 86400; s++; break;
		case '\0':
			if (parts > 0)
				return -1;  /* "1h30" is ambiguous */
			mul = 1;
			break;
		default:
			return -1;
		}
		total += v * mul;
		parts++;
		while (isspace((unsigned char)*s))
			s++;
	}
	if (!isfinite(total) || total > 10 * 366 * 86400.0)
		return -1;
	*out = total;
	return 0;
}

void rq_duration_format(double secs, char *buf, size_t len)
{
	if (!(secs >= 0) || !isfinite(secs)) {
		snprintf(buf, len, "?");
		return;
	}
	if (secs != floor(secs) || secs < 60) {
		snprintf(buf, len, "%gs", secs);
		return;
	}
	static const struct { const char *unit; long n; } units[] = {
		{"d", 86400}, {"h", 3600}, {"m", 60}, {"s", 1},
	};
	long rest = (long)secs;
	size_t used = 0;
	buf[0] = '\0';
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		long q = rest / units[i].n;
		if (q == 0)
			continue;
		rest -= q * units[i].n;
		int w = snprintf(buf + used, len > used ? len - used : 0, "%ld%s", q,
				 units[i].unit);
		if (w < 0 || (size_t)w >= len - used)
			return;
		used += (size_t)w;
	}
}

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "relayq/policy.h"

static double half(void *ctx)
{
	(void)ctx;
	return 0.5;  /* no jitter */
}

static const struct rq_policy_rand no_jitter = {half, NULL};

struct pcase {
	enum rq_stage stage;
	enum rq_fail fail;
	int code;
	const char *enhanced;
	const char *text;
	enum rq_policy_action action;
	enum rq_policy_count counts;
	const char *rule;
	bool loud;
};

#define D RQ_POLICY_COUNT_DESTINATION
#define M RQ_POLICY_COUNT_MESSAGE
#define N RQ_POLICY_COUNT_NONE

static const struct pcase cases[] = {
	{RQ_STAGE_DOT, 0, 250, "2.0.0", "Ok: queued", RQ_POLICY_DELIVERED, N, "builtin:2xx", false},
	{RQ_STAGE_RCPT, 0, 251, "", "User not local; will forward", RQ_POLICY_DELIVERED, N, "builtin:2xx", false},
	{RQ_STAGE_RCPT, 0, 421, "4.7.0", "Try again later, closing connection", RQ_POLICY_RETRY, D, "builtin:421", false},
	{RQ_STAGE_MAIL, 0, 421, "", "Service not available", RQ_POLICY_RETRY, D, "builtin:421", false},
	{RQ_STAGE_RCPT, 0, 450, "4.2.0", "Mailbox busy", RQ_POLICY_RETRY, M, "builtin:4xx", false},
	{RQ_STAGE_RCPT, 0, 451, "4.7.1", "Greylisted, try again", RQ_POLICY_RETRY, M, "builtin:4xx", false},
	{RQ_STAGE_DOT, 0, 451, "4.3.0", "Local error", RQ_POLICY_RETRY, M, "builtin:4xx", false},
	{RQ_STAGE_RCPT, 0, 452, "4.3.1", "Insufficient system storage", RQ_POLICY_RETRY, M, "builtin:4xx", false},
	{RQ_STAGE_RCPT, 0, 499, "", "odd", RQ_POLICY_RETRY, M, "builtin:4xx", false},
	{RQ_STAGE_RCPT, 0, 452, "4.5.3", "Too many recipients", RQ_POLICY_NOT_TRIED, N, "builtin:too-many-recipients", false},
	{RQ_STAGE_RCPT, 0, 452, "", "Error: too many recipients", RQ_POLICY_NOT_TRIED, N, "builtin:too-many-recipients", false},
	{RQ_STAGE_RCPT, 0, 552, "5.5.3", "Too many recipients", RQ_POLICY_NOT_TRIED, N, "builtin:too-many-recipients", false},
	{RQ_STAGE_DOT, 0, 452, "4.5.3", "Too many recipients (not at RCPT)", RQ_POLICY_RETRY, M, "builtin:4xx", false},
	{RQ_STAGE_DOT, 0, 552, "5.3.4", "Message size exceeds fixed limit", RQ_POLICY_FAIL, M, "builtin:5xx", false},
	{RQ_STAGE_RCPT, 0, 550, "5.1.1", "User unknown", RQ_POLICY_FAIL, M, "builtin:5xx", false},
	{RQ_STAGE_RCPT, 0, 551, "5.1.6", "User not local", RQ_POLICY_FAIL, M, "builtin:5xx", false},
	{RQ_STAGE_RCPT, 0, 552, "5.2.2", "Mailbox full", RQ_POLICY_FAIL, M, "builtin:5xx", false},
	{RQ_STAGE_MAIL, 0, 553, "5.1.8", "Sender address rejected", RQ_POLICY_FAIL, M, "builtin:5xx", false},
	{RQ_STAGE_DOT, 0, 554, "5.7.1", "Spam detected", RQ_POLICY_FAIL, M, "builtin:5xx", false},
	{RQ_STAGE_RCPT, 0, 599, "", "odd", RQ_POLICY_FAIL, M, "builtin:5xx", false},
	{RQ_STAGE_GREETING, 0, 554, "", "No SMTP service here", RQ_POLICY_NEXT_HOST, D, "builtin:greeting-5xx", false},
	{RQ_STAGE_GREETING, 0, 550, "5.7.1", "Blocked", RQ_POLICY_NEXT_HOST, D, "builtin:greeting-5xx", false},
	{RQ_STAGE_GREETING, 0, 421, "", "Too busy", RQ_POLICY_NEXT_HOST, D, "builtin:greeting-421", false},
	{RQ_STAGE_AUTH, 0, 535, "5.7.8", "Authentication credentials invalid", RQ_POLICY_RETRY, D, "builtin:auth", true},
	{RQ_STAGE_AUTH, 0, 454, "4.7.0", "Temporary authentication failure", RQ_POLICY_RETRY, D, "builtin:auth", true},
	{RQ_STAGE_MAIL, 0, 530, "5.7.0", "Authentication required", RQ_POLICY_RETRY, D, "builtin:auth", true},
	{RQ_STAGE_CONNECT, RQ_FAIL_TIMEOUT, 0, "", "connect timed out", RQ_POLICY_RETRY, D, "builtin:timeout", false},
	{RQ_STAGE_DOT, RQ_FAIL_TIMEOUT, 0, "", "", RQ_POLICY_RETRY, D, "builtin:timeout", false},
	{RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0, "", "Connection refused", RQ_POLICY_RETRY, D, "builtin:refused", false},
	{RQ_STAGE_DATA, RQ_FAIL_LOST, 0, "", "connection reset", RQ_POLICY_RETRY, D, "builtin:lost", false},
	{RQ_STAGE_TLS, RQ_FAIL_TLS, 0, "", "certificate verify failed", RQ_POLICY_RETRY, D, "builtin:tls", false},
	{RQ_STAGE_DNS, RQ_FAIL_DNS, 0, "", "SERVFAIL", RQ_POLICY_RETRY, D, "builtin:dns", false},
	{RQ_STAGE_EHLO, RQ_FAIL_PROTOCOL, 0, "", "garbage reply", RQ_POLICY_RETRY, D, "builtin:protocol", false},
	/* A synthetic permanent DNS result (null MX) is a 5xx like any other. */
	{RQ_STAGE_DNS, 0, 556, "5.1.10", "null MX", RQ_POLICY_FAIL, M, "builtin:5xx", false},
};

static void decide(const struct rq_policy_params *p, const struct pcase *c,
		   unsigned attempt, double age, struct rq_policy_answer *d)
{
	struct rq_outcome o;
	rq_outcome_set(&o, c->stage, c->fail, c->code, c->enhanced, "%s", c->text);
	struct rq_policy_input in = {
		.outcome = &o, .recipient = "u@example.com", .domain = "example.com",
		.host = "mx.example.com", .attempt = attempt, .age = age,
	};
	rq_policy_builtin(p, &in, &no_jitter, d);
}

static void table(void **state)
{
	(void)state;
	struct rq_policy_params p;
	rq_policy_params_default(&p);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct pcase *c = &cases[i];
		struct rq_policy_answer d;
		decide(&p, c, 1, 10, &d);
		char label[64];
		snprintf(label, sizeof(label), "case %zu (%d %s)", i, c->code, c->rule);
		if (d.action != c->action || d.counts != c->counts ||
		    strcmp(d.rule, c->rule) != 0 || d.loud != c->loud)
			fail_msg("%s: got %s/%s/%s loud=%d", label,
				 rq_policy_action_name(d.action),
				 rq_policy_count_name(d.counts), d.rule, d.loud);
		assert_false(d.expired);
		assert_null(strchr(d.reason, '\n'));
		if (d.action == RQ_POLICY_RETRY || d.action == RQ_POLICY_NEXT_HOST)
			assert_true(fabs(d.after - 300) < 1e-9);
		else
			assert_true(d.after == 0);
	}
}

static void reason_names_the_reply(void **state)
{
	(void)state;
	struct rq_policy_params p;
	rq_policy_params_default(&p);
	struct rq_policy_answer d;
	decide(&p, &cases[5], 3, 10, &d);  /* 451 4.7.1 */
	assert_non_null(strstr(d.reason, "451 4.7.1 Greylisted"));
	assert_non_null(strstr(d.reason, "rcpt"));
	assert_true(fabs(d.after - 1200) < 1e-9);  /* third attempt: 5m * 2^2 */
}

static void expiry_by_age(void **state)
{
	(void)state;
	struct rq_policy_params p;
	rq_policy_params_default(&p);
	struct rq_policy_answer d;
	/* Just under five days: still a retry. */
	decide(&p, &cases[5], 30, 5 * 86400 - 1, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	/* At five days: fails, expired, with the last temporary reply. */
	decide(&p, &cases[5], 30, 5 * 86400, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_true(d.expired);
	assert_string_equal(d.rule, "builtin:expired");
	assert_non_null(strstr(d.reason, "max_age 5d"));
	assert_non_null(strstr(d.reason, "451 4.7.1 Greylisted"));
	assert_non_null(strstr(d.reason, "builtin:4xx"));
	/* Transport failures expire by age too. */
	decide(&p, &cases[26], 1, 6 * 86400, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_true(d.expired);
	assert_non_null(strstr(d.reason, "timeout"));
	/* A permanent failure stays a plain failure, not "expired". */
	decide(&p, &cases[14], 1, 6 * 86400, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_false(d.expired);
	assert_string_equal(d.rule, "builtin:5xx");
	/* Not-tried and next-host are not expired by the built-in policy. */
	decide(&p, &cases[9], 1, 6 * 86400, &d);
	assert_int_equal(d.action, RQ_POLICY_NOT_TRIED);
	decide(&p, &cases[20], 1, 6 * 86400, &d);
	assert_int_equal(d.action, RQ_POLICY_NEXT_HOST);
	/* ...but the caller can, when no host is left. */
	struct rq_outcome o;
	rq_outcome_set(&o, RQ_STAGE_GREETING, 0, 554, "", "go away");
	struct rq_policy_input in = {.outcome = &o, .attempt = 1, .age = 6 * 86400};
	assert_true(rq_policy_expire(&p, &in, &d));
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	/* max_age 0: never. */
	p.expire.max_age = 0;
	decide(&p, &cases[5], 30, 1e9, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
}

static void expiry_by_attempts(void **state)
{
	(void)state;
	struct rq_policy_params p;
	rq_policy_params_default(&p);
	p.expire.max_attempts = 3;
	struct rq_policy_answer d;
	decide(&p, &cases[4], 2, 60, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	decide(&p, &cases[4], 3, 60, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_true(d.expired);
	assert_non_null(strstr(d.reason, "3 attempts"));
	assert_non_null(strstr(d.reason, "450 4.2.0 Mailbox busy"));
}

static void names(void **state)
{
	(void)state;
	assert_string_equal(rq_policy_action_name(RQ_POLICY_NOT_TRIED), "not_tried");
	assert_string_equal(rq_policy_action_name(RQ_POLICY_NEXT_HOST), "next_host");
	assert_string_equal(rq_policy_action_name((enum rq_policy_action)99), "unknown");
	assert_string_equal(rq_policy_count_name(RQ_POLICY_COUNT_DESTINATION),
			    "destination");
}

static void too_many_rcpts_detection(void **state)
{
	(void)state;
	struct rq_outcome o;
	rq_outcome_set(&o, RQ_STAGE_RCPT, 0, 452, "4.5.3", "x");
	assert_true(rq_reply_too_many_rcpts(&o));
	rq_outcome_set(&o, RQ_STAGE_RCPT, 0, 452, "", "mailbox full");
	assert_false(rq_reply_too_many_rcpts(&o));
	rq_outcome_set(&o, RQ_STAGE_RCPT, 0, 451, "4.5.3", "x");
	assert_true(rq_reply_too_many_rcpts(&o));
	rq_outcome_set(&o, RQ_STAGE_RCPT, 0, 250, "2.5.3", "x");
	assert_false(rq_reply_too_many_rcpts(&o));
	rq_outcome_set(&o, RQ_STAGE_MAIL, 0, 452, "4.5.3", "x");
	assert_false(rq_reply_too_many_rcpts(&o));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(table),
		cmocka_unit_test(reason_names_the_reply),
		cmocka_unit_test(expiry_by_age),
		cmocka_unit_test(expiry_by_attempts),
		cmocka_unit_test(names),
		cmocka_unit_test(too_many_rcpts_detection),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * relayqd end to end, Lua policy: what the operator's rules decide is what
 * the daemon does, and what `relayq explain -c FILE` says it would do.
 *
 *   a 550 turned into a retry by a text match (and left to the built-in
 *       fail when the text does not match)
 *   a 421 turned into a permanent failure
 *   an enhanced-code rule ("5.7.1") beating a code rule (550)
 *   a per-domain rule (on_domain) beating the global one
 *   a rule reading the message (msg.meta) that holds it
 *   handlers that raise, loop forever, allocate without end: the built-in
 *       decision applies and the daemon keeps delivering
 *   SIGHUP with a syntax error keeps the old policy (the error is reported
 *       with file:line); a good reload applies the new one
 *   relayq explain -c FILE agrees with every decision the daemon made
 */
#include "daemon.h"


/* Decisions the daemon made, checked against relayq explain at the end. */
struct decision {
	char policy[600];          /* a copy of the policy file */
	int code;
	char enh[16];
	char text[128];
	char domain[64];
	char meta[64];             /* the message's meta JSON, or "" */
	char action[16];           /* retry / fail / drop / hold */
	long long after_s;         /* retry: seconds (0: not checked) */
};

static struct decision decisions[32];
static size_t ndecisions;
static char *keep_dir;         /* policy copies, removed at the end */

static int group_setup(void **state)
{
	keep_dir = th_mkdtemp("dlua-keep");
	return 0;
}

static int group_teardown(void **state)
{
	th_rmrf(keep_dir);
	free(keep_dir);
	return 0;
}

static int setup(void **state)
{
	return dt_state_setup(state, "dlua", false);
}

static int teardown(void **state)
{
	return dt_state_teardown(state);
}

/* Keeps a copy of the current config for the explain check. */
static void keep_policy(struct dt *t, const char *name, char *out, size_t len)
{
	snprintf(out, len, "%s/%s.lua", keep_dir, name);
	char *s = th_read_file(t->cfg, NULL);
	assert_non_null(s);
	dt_write_file(out, s);
	free(s);
}

static void record(const char *policy, int code, const char *enh, const char *text,
		   const char *domain, const char *action, long long after_s)
{
	assert_true(ndecisions < 32);
	struct decision *d = &decisions[ndecisions++];
	snprintf(d->policy, sizeof(d->policy), "%s", policy);
	d->code = code;
	snprintf(d->enh, sizeof(d->enh), "%s", enh);
	snprintf(d->text, sizeof(d->text), "%s", text);
	snprintf(d->domain, sizeof(d->domain), "%s", domain);
	snprintf(d->action, sizeof(d->action), "%s", action);
	d->after_s = after_s;
	d->meta[0] = '\0';
}

/* The message was retried: scheduled after_s after the deferral. */
static void check_retry(struct dt *t, const char *id, const char *rcpt, int code,
			long long after_s)
{
	struct dt_event ev;
	if (!dt_find_event(t, id, rcpt, "deferred", &ev))
		DT_FAIL(t, "%s (%s): no deferred event (want a retry)", id, rcpt);
	assert_int_equal(atoi(ev.code), code);
	assert_true(dt_in_zset(t, "scheduled", id));
	assert_false(dt_in_zset(t, "dead", id));
	int64_t next = dt_zscore(t, "scheduled", id);
	int64_t want = ev.ms + after_s * 1000;
	if (next < want - 60000 || next > want + 2000)
		DT_FAIL(t, "%s (%s): next attempt %" PRId64 ", want about %lld s after %" PRId64, id,
			rcpt, next, after_s, ev.ms);
	struct rq_json *m = dt_show(t, id);
	assert_string_equal(rq_json_get_str(m, "state"), "scheduled");
	const struct rq_json *r = dt_show_rcpt(m, rcpt);
	assert_non_null(r);
	assert_string_equal(rq_json_get_str(r, "s"), "deferred");
	rq_json_free(m);
}

static void check_failed(struct dt *t, const char *id, const char *rcpt, int code)
{
	struct dt_event ev;
	if (!dt_find_event(t, id, rcpt, "failed", &ev))
		DT_FAIL(t, "%s (%s): no failed event (want a permanent failure)", id, rcpt);
	assert_int_equal(atoi(ev.code), code);
	assert_true(dt_in_zset(t, "dead", id));
	struct rq_json *m = dt_show(t, id);
	assert_string_equal(rq_json_get_str(m, "state"), "dead");
	const struct rq_json *r = dt_show_rcpt(m, rcpt);
	assert_non_null(r);
	assert_string_equal(rq_json_get_str(r, "s"), "failed");
	assert_int_equal(dt_json_int(r, "code"), code);
	rq_json_free(m);
}

static bool log_has(struct dt *t, int i, const char *needle)
{
	char *s = th_read_file(t->dlog[i], NULL);
	bool has = s && strstr(s, needle);
	free(s);
	return has;
}

struct case_ {
	const char *rcpt;
	const char *rule;          /* fixture rule */
	int code;
	const char *enh;
	const char *text;
	const char *action;        /* what the policy must decide */
	long long after_s;
};

/* One daemon, one policy with every kind of rule. */
static void test_rules(void **state)
{
	struct dt *t = *state;
	static const struct case_ cases[] = {
		{"grey@example.net", "rcpt addr=grey@example.net reply 550 5.2.0 Greylisted, please try again",
		 550, "5.2.0", "Greylisted, please try again", "retry", 7200},
		{"nouser@example.net", "rcpt addr=nouser@example.net reply 550 5.1.1 No such user",
		 550, "5.1.1", "No such user", "fail", 0},
		{"pol@example.net", "rcpt addr=pol@example.net reply 550 5.7.1 greylisted by policy",
		 550, "5.7.1", "greylisted by policy", "fail", 0},
		{"user@example.org", "rcpt addr=user@example.org reply 550 5.1.1 No such user",
		 550, "5.1.1", "No such user", "retry", 10800},
		{"raise@example.net", "rcpt addr=raise@example.net reply 552 5.2.2 Mailbox full",
		 552, "5.2.2", "Mailbox full", "fail", 0},
		{"loop@example.net", "rcpt addr=loop@example.net reply 553 5.1.3 Bad address syntax",
		 553, "5.1.3", "Bad address syntax", "fail", 0},
		{"mem@example.net", "rcpt addr=mem@example.net reply 554 5.7.0 Rejected",
		 554, "5.7.0", "Rejected", "fail", 0},
		{"t451@example.net", "rcpt addr=t451@example.net reply 451 4.3.0 Try later",
		 451, "4.3.0", "Try later", "retry", 3600},
	};
	enum { N = sizeof(cases) / sizeof(cases[0]) };
	const char *rules[N + 3];
	for (size_t i = 0; i < N; i++)
		rules[i] = cases[i].rule;
	rules[N] = "rcpt addr=vip@example.net reply 452 4.3.1 Insufficient system storage";
	rules[N + 1] = "rcpt addr=plain452@example.net reply 452 4.3.1 Insufficient system storage";
	rules[N + 2] = NULL;
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",",
		DT_BACKOFF_1H
		"relayq.on(550, function(r, msg)\n"
		"  if r.text:lower():find(\"greylist\", 1, true) then\n"
		"    return relayq.retry { after = \"2h\" }\n"
		"  end\n"
		"end)\n"
		"relayq.on(\"5.7.1\", function(r) return relayq.fail { reason = \"5.7.1 is final\" } end)\n"
		"relayq.on_domain(\"example.org\", { on = {\n"
		"  [550] = function(r) return relayq.retry { after = \"3h\" } end,\n"
		"} })\n"
		"relayq.on(552, function(r) error(\"handler raised on purpose\") end)\n"
		"relayq.on(553, function(r) while true do end end)\n"
		"relayq.on(554, function(r)\n"
		"  local t, i = {}, 0\n"
		"  while true do i = i + 1; t[i] = string.rep(\"x\", 4096) .. i end\n"
		"end)\n"
		"relayq.on(451, function(r) error(\"451 handler raised\") end)\n"
		"relayq.on(452, function(r, msg)\n"
		"  if msg.meta and msg.meta.vip then return relayq.hold() end\n"
		"end)\n");
	char policy[600];
	keep_policy(t, "rules", policy, sizeof(policy));
	char *ids[N];
	for (size_t i = 0; i < N; i++)
		ids[i] = dt_enqueue1(t, cases[i].rcpt, "Subject: lua\r\n\r\nbody\r\n");
	/* a rule that reads the message: the app's meta decides a hold */
	redisReply *rep = dt_cmd(t, "FCALL relayq_enqueue 1 %s %s %s", t->prefix,
		"{\"from\":\"sender@example.com\",\"to\":[\"vip@example.net\"],"
		"\"meta\":{\"vip\":true}}", "Subject: vip\r\n\r\nbody\r\n");
	assert_int_equal(rep->type, REDIS_REPLY_STRING);
	char *vip = strdup(rep->str);
	freeReplyObject(rep);
	char *plain = dt_enqueue1(t, "plain452@example.net", "Subject: p\r\n\r\nbody\r\n");
	char *ok1 = dt_enqueue1(t, "ok1@example.net", "Subject: ok1\r\n\r\nbody\r\n");
	dt_daemon_start(t, 0);

	for (size_t i = 0; i < N; i++) {
		bool retry = !strcmp(cases[i].action, "retry");
		DT_WAIT(t, retry ? dt_cond_scheduled : dt_cond_dead, ids[i], 30000,
			"%s: %d %s not %s", cases[i].rcpt, cases[i].code, cases[i].enh,
			retry ? "scheduled" : "in the dead set");
	}
	DT_WAIT(t, dt_cond_gone, ok1, 30000, "ok1 not delivered");
	for (size_t i = 0; i < N; i++) {
		if (!strcmp(cases[i].action, "retry"))
			check_retry(t, ids[i], cases[i].rcpt, cases[i].code, cases[i].after_s);
		else
			check_failed(t, ids[i], cases[i].rcpt, cases[i].code);
		record(policy, cases[i].code, cases[i].enh, cases[i].text,
		       strchr(cases[i].rcpt, '@') + 1, cases[i].action, cases[i].after_s);
	}
	/* the meta rule */
	DT_WAIT(t, dt_cond_settled, vip, 30000, "vip message not settled");
	DT_WAIT(t, dt_cond_settled, plain, 30000, "plain 452 message not settled");
	if (!dt_in_zset(t, "held", vip))
		DT_FAIL(t, "the meta rule did not hold the vip message");
	struct dt_event hev;
	if (!dt_find_event(t, vip, NULL, "held", &hev))
		DT_FAIL(t, "no held event for the vip message");
	check_retry(t, plain, "plain452@example.net", 452, 3600);
	record(policy, 452, "4.3.1", "Insufficient system storage", "example.net", "hold", 0);
	snprintf(decisions[ndecisions - 1].meta, sizeof(decisions[0].meta), "{\"vip\":true}");
	record(policy, 452, "4.3.1", "Insufficient system storage", "example.net", "retry", 3600);
	free(vip);
	free(plain);

	/* after the broken handlers, it still delivers */
	char *ok2 = dt_enqueue1(t, "ok2@example.net", "Subject: ok2\r\n\r\nbody\r\n");
	DT_WAIT(t, dt_cond_gone, ok2, 30000, "ok2 not delivered after the broken handlers");
	assert_int_equal(dt_stat(t, "delivered"), 2);
	/* the handler's error is reported to the operator */
	if (!log_has(t, 0, "handler raised on purpose"))
		DT_FAIL(t, "the handler's error is not in the daemon's log");
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	for (size_t i = 0; i < N; i++)
		free(ids[i]);
	free(ok1);
	free(ok2);
}

/* 421 made final by the policy. */
static void test_421_fail(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {"rcpt addr=shut@example.net reply 421 4.3.2 Service shutting down",
			       NULL};
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",",
		  DT_BACKOFF_1H
		  "relayq.on(421, function(r) return relayq.fail { reason = \"421 is final here\" } end)\n");
	char policy[600];
	keep_policy(t, "fail421", policy, sizeof(policy));
	char *id = dt_enqueue1(t, "shut@example.net", "Subject: 421\r\n\r\nbody\r\n");
	dt_daemon_start(t, 0);
	DT_WAIT(t, dt_cond_dead, id, 30000, "421 with a fail rule: not in the dead set");
	check_failed(t, id, "shut@example.net", 421);
	record(policy, 421, "4.3.2", "Service shutting down", "example.net", "fail", 0);
	/* and the daemon delivers the next message */
	char *ok = dt_enqueue1(t, "ok@example.net", "Subject: ok\r\n\r\nbody\r\n");
	DT_WAIT(t, dt_cond_gone, ok, 40000, "next message not delivered after the 421");
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
	free(ok);
}

static const char POLICY_A[] =
	DT_BACKOFF_1H
	"relayq.on(550, function(r) return relayq.retry { after = \"1h\" } end)\n";
/* line 4 of the file is the broken one (relayq.config takes lines 1-9) */
static const char POLICY_BROKEN[] =
	DT_BACKOFF_1H
	"relayq.on(550, function(r) return relayq.drop() end\n"
	"this is not lua ((\n";
static const char POLICY_B[] =
	DT_BACKOFF_1H
	"relayq.on(550, function(r) return relayq.drop() end)\n";

/* Enqueues a probe to a 550 recipient and waits until it is settled:
 * true when it was dropped (policy B), false when scheduled (policy A). */
static bool probe_dropped(struct dt *t, int n)
{
	char rcpt[64];
	snprintf(rcpt, sizeof(rcpt), "probe%d@example.net", n);
	char *id = dt_enqueue1(t, rcpt, "Subject: probe\r\n\r\nbody\r\n");
	DT_WAIT(t, dt_cond_settled, id, 30000, "probe %d not settled", n);
	bool dropped = !dt_msg_exists(t, id);
	if (dropped) {
		struct dt_event ev;
		if (!dt_find_event(t, id, rcpt, "dropped", &ev))
			DT_FAIL(t, "probe %d: gone without a dropped event", n);
	} else {
		check_retry(t, id, rcpt, 550, 3600);
	}
	free(id);
	return dropped;
}

static void test_reload(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {"rcpt addr=@example.net reply 550 5.1.1 No such user", NULL};
	dt_smtp_start(t, rules);
	const char *keys = "  lease = \"30s\",";
	dt_config(t, keys, POLICY_A);
	char policy_a[600], policy_b[600];
	keep_policy(t, "reload-a", policy_a, sizeof(policy_a));
	dt_daemon_start(t, 0);
	if (probe_dropped(t, 1))
		DT_FAIL(t, "policy A: the 550 was dropped");
	record(policy_a, 550, "5.1.1", "No such user", "example.net", "retry", 3600);

	/* a broken file: reported with file:line, the old policy stays */
	size_t log_before = dt_file_size(t->dlog[0]);
	dt_config(t, keys, POLICY_BROKEN);
	kill(t->d[0].pid, SIGHUP);
	char want[700];
	const char *base = strrchr(t->cfg, '/') + 1;
	int64_t deadline = dt_now_ms() + 15000;
	for (;;) {
		char *s = th_read_file(t->dlog[0], NULL);
		bool found = false;
		/* "relayq.lua:12" or, in logfmt, "file=.../relayq.lua line=12" */
		for (int line = 10; line <= 13 && s && !found; line++) {
			const char *from = strlen(s) > log_before ? s + log_before : "";
			snprintf(want, sizeof(want), "%s:%d", base, line);
			found = strstr(from, want) != NULL;
			snprintf(want, sizeof(want), "%s line=%d", base, line);
			found = found || strstr(from, want) != NULL;
		}
		free(s);
		if (found)
			break;
		dt_daemon_check_alive(t, 0);
		if (dt_now_ms() > deadline)
			DT_FAIL(t, "a reload of a broken file is not reported with %s:LINE", base);
		dt_sleep_ms(20);
	}
	dt_daemon_check_alive(t, 0);
	if (probe_dropped(t, 2))
		DT_FAIL(t, "after a broken reload the old policy is gone");

	/* a good file: the new policy applies (probes until it shows) */
	dt_config(t, keys, POLICY_B);
	keep_policy(t, "reload-b", policy_b, sizeof(policy_b));
	kill(t->d[0].pid, SIGHUP);
	bool dropped = false;
	deadline = dt_now_ms() + 20000;
	for (int n = 3; !dropped; n++) {
		dropped = probe_dropped(t, n);
		if (!dropped && dt_now_ms() > deadline)
			DT_FAIL(t, "policy B never applied after SIGHUP");
	}
	assert_true(probe_dropped(t, 100));
	record(policy_b, 550, "5.1.1", "No such user", "example.net", "drop", 0);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
}

/* relayq explain -c FILE agrees with every decision recorded above. */
static void test_explain_agrees(void **state)
{
	(void)state;
	if (ndecisions < 13)
		fail_msg("only %zu daemon decisions were recorded (earlier cases failed)", ndecisions);
	for (size_t i = 0; i < ndecisions; i++) {
		const struct decision *d = &decisions[i];
		char *out = NULL;
		int rc = dt_sh(&out,
			       "'%s' explain -c '%s' --code %d --enhanced '%s' --text '%s' "
			       "--stage rcpt --domain '%s' --rcpt 'x@%s' %s%s%s 2>&1",
			       dt_relayq_bin(), d->policy, d->code, d->enh, d->text, d->domain,
			       d->domain, d->meta[0] ? "--meta '" : "", d->meta,
			       d->meta[0] ? "'" : "");
		if (rc != 0)
			fail_msg("relayq explain (%d %s %s): exit %d: %s", d->code, d->enh, d->text, rc,
				 out);
		char *action = dt_line_value(out, "action");
		if (!action || strcmp(action, d->action) != 0)
			fail_msg("explain says %s for %d %s \"%s\" (%s), the daemon did %s:\n%s",
				 action ? action : "(no action line)", d->code, d->enh, d->text,
				 d->policy, d->action, out);
		if (d->after_s > 0) {
			char *after = dt_line_value(out, "after");
			if (!after || atoll(after) != d->after_s)
				fail_msg("explain says after %s for %d %s, the daemon waited %lld s:\n%s",
					 after ? after : "(none)", d->code, d->enh, d->after_s, out);
			free(after);
		}
		free(action);
		free(out);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_rules, setup, teardown),
		cmocka_unit_test_setup_teardown(test_421_fail, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reload, setup, teardown),
		cmocka_unit_test(test_explain_agrees),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

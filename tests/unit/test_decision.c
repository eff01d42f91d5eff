/* The decision module: every row of the table in decision.h, for the
 * built-in policy and for Lua actions. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "relayq/config.h"
#include "relayq/decision.h"
#include "relayq/reply.h"

static double half(void *ctx)
{
	(void)ctx;
	return 0.5;  /* no jitter */
}

static const struct rq_policy_rand no_jitter = {half, NULL};

struct dcase {
	const char *what;
	enum rq_stage stage;
	enum rq_fail fail;
	int code;
	const char *enhanced;
	const char *text;
	unsigned attempt;
	double age;
	unsigned resends;
	double suspended;
	const char *rcpt;
	/* expected */
	enum rq_decision_state state;
	enum rq_decision_scope scope;
	bool attempt_counts;
	enum rq_decision_dest dest;
	double after;          /* < 0: not checked */
	const char *rule;
};

#define MSG RQ_DECISION_SCOPE_MESSAGE
#define DST RQ_DECISION_SCOPE_DESTINATION

static const char *lua_src =
	"relayq.config { queue = \"t\" }\n"
	"relayq.backoff { first = \"5m\", factor = 2, max = \"4h\", jitter = 0 }\n"
	"relayq.expire { max_age = \"1d\", max_attempts = 10 }\n"
	"relayq.on(553, function(r) return relayq.retry { after = \"2h\" } end)\n"
	"relayq.on(\"4.7.1\", function(r) return relayq.fail { reason = \"final here\" } end)\n"
	"relayq.on(\"5.7.1\", function(r) return relayq.drop() end)\n"
	"relayq.on(\"5.2.2\", function(r) return relayq.hold() end)\n"
	"relayq.on(\"4.7.0\", function(r) return relayq.suspend { after = \"30m\" } end)\n"
	"relayq.on(\"timeout\", function(r) return relayq.suspend() end)\n";

static const struct dcase builtin_cases[] = {
	{"250", RQ_STAGE_DOT, 0, 250, "2.0.0", "Ok", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DELIVERED, MSG, true, RQ_DECISION_DEST_OK, 0, "builtin:2xx"},
	{"450", RQ_STAGE_RCPT, 0, 450, "4.2.0", "busy", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DEFERRED, MSG, true, RQ_DECISION_DEST_OK, 300, "builtin:4xx"},
	{"550", RQ_STAGE_RCPT, 0, 550, "5.1.1", "no such user", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_FAILED, MSG, true, RQ_DECISION_DEST_OK, 0, "builtin:5xx"},
	{"421 mid-session", RQ_STAGE_RCPT, 0, 421, "4.3.2", "closing", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_FAILED, 300, "builtin:421"},
	{"greeting 554 (every host)", RQ_STAGE_GREETING, 0, 554, "", "go away", 1, 0, 0, 0,
	 "a@x.test", RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_FAILED, 300,
	 "builtin:greeting-5xx"},
	{"greeting 421 at the last MX", RQ_STAGE_GREETING, 0, 421, "", "busy", 2, 0, 0, 0,
	 "a@x.test", RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_FAILED, 600,
	 "builtin:greeting-421"},
	{"535 auth", RQ_STAGE_AUTH, 0, 535, "5.7.8", "bad credentials", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_FAILED, 300, "builtin:auth"},
	{"timeout", RQ_STAGE_DATA, RQ_FAIL_TIMEOUT, 0, "", "no reply", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_FAILED, 300, "builtin:timeout"},
	{"too many, first time", RQ_STAGE_RCPT, 0, 452, "4.5.3", "Too many recipients", 1, 0, 0,
	 0, "a@x.test", RQ_DECISION_RESEND, MSG, false, RQ_DECISION_DEST_OK, 0,
	 "builtin:too-many-recipients"},
	{"451 4.5.3 (OpenSMTPD's too many)", RQ_STAGE_RCPT, 0, 451, "4.5.3", "Too many recipients",
	 1, 0, 0, 0, "a@x.test", RQ_DECISION_RESEND, MSG, false, RQ_DECISION_DEST_OK, 0,
	 "builtin:too-many-recipients"},
	{"too many, again", RQ_STAGE_RCPT, 0, 452, "4.5.3", "Too many recipients", 1, 0, 1, 0,
	 "a@x.test", RQ_DECISION_DEFERRED, MSG, true, RQ_DECISION_DEST_OK, 300,
	 "builtin:too-many-recipients"},
	{"expired by age", RQ_STAGE_RCPT, 0, 451, "4.3.0", "later", 3, 6 * 86400.0, 0, 0,
	 "a@x.test", RQ_DECISION_EXPIRED, MSG, true, RQ_DECISION_DEST_OK, 0, "builtin:expired"},
	{"greeting 554 past max_age", RQ_STAGE_GREETING, 0, 554, "", "no", 3, 6 * 86400.0, 0, 0,
	 "a@x.test", RQ_DECISION_EXPIRED, MSG, true, RQ_DECISION_DEST_OK, 0, "builtin:expired"},
	{"suspended destination", RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0, "4.4.1", "suspended", 1,
	 0, 0, 90, "a@x.test", RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_NONE, 90,
	 "destination:suspended"},
	{"suspended past max_age", RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0, "4.4.1", "suspended", 1,
	 6 * 86400.0, 0, 90, "a@x.test", RQ_DECISION_EXPIRED, MSG, true, RQ_DECISION_DEST_NONE,
	 0, "builtin:expired"},
	/* issue 15, item 5: out of descriptors here is nobody else's fault */
	{"local: EMFILE at connect", RQ_STAGE_CONNECT, RQ_FAIL_LOCAL, 0, "",
	 "local: cannot connect to 127.0.0.1:25: Too many open files", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DEFERRED, MSG, false, RQ_DECISION_DEST_NONE, RQ_POLICY_LOCAL_RETRY,
	 "builtin:local"},
	{"local: at attempt 7, still soon", RQ_STAGE_CONNECT, RQ_FAIL_LOCAL, 0, "", "ENOBUFS", 7,
	 0, 0, 0, "a@x.test", RQ_DECISION_DEFERRED, MSG, false, RQ_DECISION_DEST_NONE,
	 RQ_POLICY_LOCAL_RETRY, "builtin:local"},
};

static const struct dcase lua_cases[] = {
	{"lua retry of a 5xx", RQ_STAGE_RCPT, 0, 553, "5.1.3", "syntax", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DEFERRED, MSG, true, RQ_DECISION_DEST_OK, 7200, "lua:553"},
	{"lua fail of a 4xx", RQ_STAGE_RCPT, 0, 451, "4.7.1", "later", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_FAILED, MSG, true, RQ_DECISION_DEST_OK, 0, "lua:4.7.1"},
	{"lua drop", RQ_STAGE_RCPT, 0, 554, "5.7.1", "spam", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DROPPED, MSG, true, RQ_DECISION_DEST_OK, 0, "lua:5.7.1"},
	{"lua hold", RQ_STAGE_RCPT, 0, 552, "5.2.2", "full", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_HELD, MSG, true, RQ_DECISION_DEST_OK, 0, "lua:5.2.2"},
	{"lua suspend", RQ_STAGE_RCPT, 0, 450, "4.7.0", "slow down", 1, 0, 0, 0, "a@x.test",
	 RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_SUSPEND, 1800, "lua:4.7.0"},
	{"lua suspend, no length", RQ_STAGE_DATA, RQ_FAIL_TIMEOUT, 0, "", "", 1, 0, 0, 0,
	 "a@x.test", RQ_DECISION_DEFERRED, DST, false, RQ_DECISION_DEST_SUSPEND, 300,
	 "lua:timeout"},
	{"lua suspend past max_attempts", RQ_STAGE_RCPT, 0, 450, "4.7.0", "slow down", 10, 0, 0,
	 0, "a@x.test", RQ_DECISION_EXPIRED, MSG, true, RQ_DECISION_DEST_SUSPEND, 0,
	 "builtin:expired"},
	{"lua retry past max_age", RQ_STAGE_RCPT, 0, 553, "5.1.3", "syntax", 2, 2 * 86400.0, 0,
	 0, "a@x.test", RQ_DECISION_EXPIRED, MSG, true, RQ_DECISION_DEST_OK, 0,
	 "builtin:expired"},
};

static void check(const struct rq_config *cfg, const struct dcase *c)
{
	struct rq_outcome o;
	rq_outcome_set(&o, c->stage, c->fail, c->code, c->enhanced, "%s", c->text);
	struct rq_decision_input in = {
		.outcome = &o, .recipient = c->rcpt, .host = "mx.x.test",
		.attempt = c->attempt, .age = c->age, .resends = c->resends,
		.suspended = c->suspended,
	};
	struct rq_decision d;
	rq_decision_make(cfg, &in, &no_jitter, &d);
	if (d.state != c->state || d.scope != c->scope || d.attempt != c->attempt_counts ||
	    d.dest != c->dest || strcmp(d.rule, c->rule) != 0 ||
	    (c->after >= 0 && d.state == RQ_DECISION_DEFERRED && d.after != c->after)) {
		print_error("%s: got state %s scope %s attempt %d dest %s after %g rule %s (%s)\n",
			    c->what, rq_decision_state_name(d.state),
			    rq_decision_scope_name(d.scope), d.attempt,
			    rq_decision_dest_name(d.dest), d.after, d.rule, d.reason);
		fail();
	}
	bool bounce = c->state == RQ_DECISION_FAILED || c->state == RQ_DECISION_EXPIRED;
	assert_int_equal(d.bounce, bounce);
	if (c->state == RQ_DECISION_EXPIRED)
		assert_non_null(strstr(d.reason, "expired: "));
	if (c->dest == RQ_DECISION_DEST_SUSPEND && c->after > 0 && c->state == RQ_DECISION_DEFERRED)
		assert_true(d.dest_after == c->after);
}

static void builtin_table(void **state)
{
	(void)state;
	struct rq_config *cfg = rq_config_create();
	assert_non_null(cfg);
	for (size_t i = 0; i < sizeof(builtin_cases) / sizeof(builtin_cases[0]); i++)
		check(cfg, &builtin_cases[i]);
	/* no config at all: the same built-in answers */
	for (size_t i = 0; i < sizeof(builtin_cases) / sizeof(builtin_cases[0]); i++)
		check(NULL, &builtin_cases[i]);
	rq_config_destroy(cfg);
}

static struct rq_config *load(const char *src)
{
	char path[] = "/tmp/relayq-decision-XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, src, strlen(src)), (ssize_t)strlen(src));
	close(fd);
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, path);
	struct rq_config *cfg = rq_config_lua_load(path, 0, &diag);
	if (!cfg)
		rq_config_diag_print(&diag, stderr);
	unlink(path);
	assert_non_null(cfg);
	return cfg;
}

static void lua_table(void **state)
{
	(void)state;
	struct rq_config *cfg = load(lua_src);
	for (size_t i = 0; i < sizeof(lua_cases) / sizeof(lua_cases[0]); i++)
		check(cfg, &lua_cases[i]);
	rq_config_destroy(cfg);
}

/* A local fault never reaches a rule: a catch-all that suspends (or fails)
 * does not turn "this host is out of descriptors" into a suspended
 * destination or a bounce; "local" is not a selector. */
static void local_fault_skips_lua(void **state)
{
	(void)state;
	struct rq_config *cfg = load("relayq.config { queue = \"t\" }\n"
				     "relayq.on(\"*\", function(r) return relayq.suspend { after = \"1h\" } end)\n"
				     "relayq.on(\"refused\", function(r) return relayq.fail() end)\n");
	static const struct dcase c = {
		"local under a suspending catch-all", RQ_STAGE_CONNECT, RQ_FAIL_LOCAL, 0, "",
		"local: cannot connect to 127.0.0.1:25: Too many open files", 1, 0, 0, 0,
		"a@x.test", RQ_DECISION_DEFERRED, MSG, false, RQ_DECISION_DEST_NONE,
		RQ_POLICY_LOCAL_RETRY, "builtin:local"};
	check(cfg, &c);
	/* the same connect failing remotely goes to the rules */
	static const struct dcase r = {
		"refused under the same rules", RQ_STAGE_CONNECT, RQ_FAIL_REFUSED, 0, "",
		"Connection refused", 1, 0, 0, 0, "a@x.test", RQ_DECISION_FAILED, MSG, true,
		RQ_DECISION_DEST_NONE, 0, "lua:refused"};
	check(cfg, &r);
	rq_config_destroy(cfg);
	char path[] = "/tmp/relayq-decision-XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	const char *src = "relayq.on(\"local\", function(r) return relayq.retry() end)\n";
	assert_int_equal(write(fd, src, strlen(src)), (ssize_t)strlen(src));
	close(fd);
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, path);
	cfg = rq_config_lua_load(path, 0, &diag);
	unlink(path);
	assert_null(cfg);

}

/* A job's destination action: the strongest of its recipients', the
 * longest suspension. */
static void dest_merge(void **state)
{
	(void)state;
	enum rq_decision_dest dest = RQ_DECISION_DEST_NONE;
	double after = 0;
	struct rq_decision ok = {.dest = RQ_DECISION_DEST_OK};
	struct rq_decision failed = {.dest = RQ_DECISION_DEST_FAILED};
	struct rq_decision s1 = {.dest = RQ_DECISION_DEST_SUSPEND, .dest_after = 60};
	struct rq_decision s2 = {.dest = RQ_DECISION_DEST_SUSPEND, .dest_after = 600};
	rq_decision_dest_merge(&dest, &after, &ok);
	assert_int_equal(dest, RQ_DECISION_DEST_OK);
	rq_decision_dest_merge(&dest, &after, &failed);
	assert_int_equal(dest, RQ_DECISION_DEST_FAILED);
	rq_decision_dest_merge(&dest, &after, &s2);
	rq_decision_dest_merge(&dest, &after, &ok);
	rq_decision_dest_merge(&dest, &after, &s1);
	assert_int_equal(dest, RQ_DECISION_DEST_SUSPEND);
	assert_true(after == 600);
}

static void names(void **state)
{
	(void)state;
	static const char *const want[] = {"delivered", "deferred", "failed", "expired",
					   "dropped", "held", "resend"};
	for (int s = 0; s < RQ_DECISION_STATE_COUNT_; s++)
		assert_string_equal(rq_decision_state_name((enum rq_decision_state)s), want[s]);
	assert_string_equal(rq_decision_scope_name(RQ_DECISION_SCOPE_DESTINATION), "destination");
	assert_string_equal(rq_decision_dest_name(RQ_DECISION_DEST_SUSPEND), "suspend");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(builtin_table),
		cmocka_unit_test(lua_table),
		cmocka_unit_test(local_fault_skips_lua),
		cmocka_unit_test(dest_merge),
		cmocka_unit_test(names),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

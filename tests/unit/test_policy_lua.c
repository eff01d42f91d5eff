#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "relayq/clock.h"
#include "relayq/config.h"
#include "relayq/log.h"
#include "relayq/policy_lua.h"

static char *dir;
static char *logbuf;
static size_t loglen;
static FILE *logout;

static int setup(void **state)
{
	(void)state;
	dir = th_mkdtemp("policy_lua");
	logout = open_memstream(&logbuf, &loglen);
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, logout);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, NULL);
	fclose(logout);
	free(logbuf);
	th_rmrf(dir);
	free(dir);
	return 0;
}

static double half(void *ctx)
{
	(void)ctx;
	return 0.5;
}

static const struct rq_policy_rand no_jitter = {half, NULL};

/* A loaded policy and its config. */
struct pol {
	struct rq_config *cfg;
	struct rq_config_diag diag;
};

static void load_limits(struct pol *p, const char *src,
			const struct rq_policy_lua_limits *lim)
{
	p->cfg = rq_config_create();
	assert_non_null(p->cfg);
	rq_config_diag_init(&p->diag, "test.lua");
	p->cfg->lua = rq_config_lua_run_buffer("test.lua", src, strlen(src), p->cfg,
						lim, &p->diag);
	if (!p->cfg->lua)
		rq_config_diag_print(&p->diag, stderr);
	assert_non_null(p->cfg->lua);
}

static void load(struct pol *p, const char *src)
{
	load_limits(p, src, NULL);
}

static void unload(struct pol *p)
{
	rq_config_destroy(p->cfg);
}

struct ask {
	enum rq_stage stage;
	enum rq_fail fail;
	int code;
	const char *enhanced;
	const char *text;
	const char *domain;
	unsigned attempt;
	double age;
	const char *meta;
};

static void decide(struct pol *p, const struct ask *a, struct rq_policy_answer *d)
{
	struct rq_outcome o;
	rq_outcome_set(&o, a->stage ? a->stage : RQ_STAGE_RCPT, a->fail, a->code,
		       a->enhanced ? a->enhanced : "", "%s", a->text ? a->text : "");
	const char *domain = a->domain ? a->domain : "example.com";
	char rcpt[300];
	snprintf(rcpt, sizeof(rcpt), "user@%s", domain);
	struct rq_policy_input in = {
		.outcome = &o, .recipient = rcpt, .domain = domain,
		.host = "mx.example.com", .attempt = a->attempt ? a->attempt : 1,
		.age = a->age,
	};
	const char *to[] = {rcpt, "other@example.net"};
	struct rq_policy_msg msg = {
		.id = "m1", .from = "app@example.org", .to = to, .nto = 2,
		.attempts = in.attempt - 1, .created = 1700000000,
		.meta = a->meta,
	};
	rq_policy_lua_decide_config(p->cfg, &in, &msg, &no_jitter, d);
}

static void stats(struct pol *p, struct rq_policy_lua_stats *st)
{
	rq_policy_lua_stats(p->cfg->lua, st);
}

static void text_match_550_to_retry(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "relayq.on(550, function(r, msg)\n"
	     "  if r.text:find('greylist', 1, true) then\n"
	     "    return relayq.retry { after = '10m' }\n"
	     "  end\n"
	     "end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .enhanced = "5.7.1",
				 .text = "Recipient greylisted, come back later"}, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	assert_true(d.after == 600);
	assert_string_equal(d.rule, "lua:550");
	assert_int_equal(d.counts, RQ_POLICY_COUNT_MESSAGE);
	/* nil: the built-in decision. */
	decide(&p, &(struct ask){.code = 550, .enhanced = "5.1.1", .text = "No such user"}, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_string_equal(d.rule, "builtin:5xx");
	/* No rule for 551: Lua is not called at all. */
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	unsigned long long calls = st.calls;
	decide(&p, &(struct ask){.code = 551, .text = "x"}, &d);
	stats(&p, &st);
	assert_int_equal(st.calls, calls);
	assert_int_equal(st.errors, 0);
	assert_int_equal(st.rules, 1);
	unload(&p);
}

static void code_421_to_fail(void **state)
{
	(void)state;
	struct pol p;
	load(&p, "relayq.on(421, function(r) return relayq.fail { reason = 'no 421s here: ' .. r.stage } end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 421, .enhanced = "4.7.0", .text = "busy"}, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_string_equal(d.rule, "lua:421");
	assert_string_equal(d.reason, "no 421s here: rcpt");
	unload(&p);
}

static void most_specific_wins(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "relayq.on('*', function() return relayq.hold() end)\n"
	     "relayq.on('5xx', function() return relayq.drop() end)\n"
	     "relayq.on(550, function() return relayq.retry { after = 60 } end)\n"
	     "relayq.on('5.7.26', function() return relayq.fail { reason = 'dmarc' } end)\n"
	     "relayq.on('timeout', function(r) return relayq.retry(r.event == 'timeout' and '15m' or '1s') end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .enhanced = "5.7.26", .text = "DMARC"}, &d);
	assert_string_equal(d.rule, "lua:5.7.26");
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	decide(&p, &(struct ask){.code = 550, .enhanced = "5.1.1", .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:550");
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	assert_true(d.after == 60);
	decide(&p, &(struct ask){.code = 554, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:5xx");
	assert_int_equal(d.action, RQ_POLICY_DROP);
	decide(&p, &(struct ask){.code = 451, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:*");
	assert_int_equal(d.action, RQ_POLICY_HOLD);
	decide(&p, &(struct ask){.stage = RQ_STAGE_CONNECT, .fail = RQ_FAIL_TIMEOUT, .text = "t"}, &d);
	assert_string_equal(d.rule, "lua:timeout");
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	assert_true(d.after == 900);
	/* A transport failure keeps counting against the destination. */
	assert_int_equal(d.counts, RQ_POLICY_COUNT_DESTINATION);
	decide(&p, &(struct ask){.stage = RQ_STAGE_CONNECT, .fail = RQ_FAIL_REFUSED, .text = "r"}, &d);
	assert_string_equal(d.rule, "lua:*");
	/* 2xx and too-many-recipients never reach Lua, not even "*". */
	decide(&p, &(struct ask){.code = 250, .text = "ok"}, &d);
	assert_int_equal(d.action, RQ_POLICY_DELIVERED);
	decide(&p, &(struct ask){.code = 452, .enhanced = "4.5.3", .text = "too many"}, &d);
	assert_int_equal(d.action, RQ_POLICY_NOT_TRIED);
	char rule[64];
	assert_true(rq_policy_lua_rule_for(p.cfg->lua, &(struct rq_outcome){.code = 553}, NULL,
					   rule, sizeof(rule)));
	assert_string_equal(rule, "lua:5xx");
	unload(&p);
}

static void per_domain_rules(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "relayq.on(421, function() return relayq.retry { after = '1m' } end)\n"
	     "relayq.on('5.7.26', function() return relayq.fail() end)\n"
	     "relayq.on_domain('yahoo.com', {\n"
	     "  per_destination = 5,\n"
	     "  backoff = { first = '30m' },\n"
	     "  on = {\n"
	     "    [421] = function(r) return relayq.suspend { after = '30m' } end,\n"
	     "    ['*'] = function(r) return relayq.hold() end,\n"
	     "  },\n"
	     "})\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 421, .text = "busy", .domain = "Yahoo.com"}, &d);
	assert_int_equal(d.action, RQ_POLICY_SUSPEND);
	assert_true(d.after == 1800);
	assert_string_equal(d.rule, "lua:yahoo.com:421");
	decide(&p, &(struct ask){.code = 421, .text = "busy", .domain = "gmail.com"}, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	assert_string_equal(d.rule, "lua:421");
	/* A global enhanced-code rule is more specific than the domain's "*". */
	decide(&p, &(struct ask){.code = 550, .enhanced = "5.7.26", .text = "x",
				 .domain = "yahoo.com"}, &d);
	assert_string_equal(d.rule, "lua:5.7.26");
	decide(&p, &(struct ask){.code = 451, .text = "x", .domain = "yahoo.com"}, &d);
	assert_string_equal(d.rule, "lua:yahoo.com:*");
	/* The domain's backoff applies to built-in retries there. */
	decide(&p, &(struct ask){.code = 450, .text = "x", .domain = "gmail.com"}, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	assert_true(d.after == 300);
	assert_int_equal(rq_config_domain(p.cfg, "yahoo.com")->per_destination, 5);
	unload(&p);
	/* Without an on_domain rule, the domain backoff shows in built-ins. */
	load(&p, "relayq.on_domain('slow.example', { backoff = { first = '30m', max = '8h' } })\n");
	decide(&p, &(struct ask){.code = 450, .text = "x", .domain = "slow.example"}, &d);
	assert_string_equal(d.rule, "builtin:4xx");
	assert_true(d.after == 1800);
	unload(&p);
}

static void handler_sees_reply_and_message(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "relayq.on(452, function(r, msg)\n"
	     "  local parts = { r.code, r.enhanced, r.text, r.stage, r.recipient, r.host,\n"
	     "    r.domain, r.attempt, math.floor(r.age), msg.id, msg.from, #msg.to, msg.to[2],\n"
	     "    msg.attempts, msg.created, msg.meta and msg.meta.tenant or 'nometa',\n"
	     "    tostring(r.event) }\n"
	     "  for i, v in ipairs(parts) do parts[i] = tostring(v) end\n"
	     "  return relayq.fail { reason = table.concat(parts, '|') }\n"
	     "end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 452, .enhanced = "4.2.2", .text = "over quota\nline two",
				 .attempt = 3, .age = 99.5,
				 .meta = "{\"tenant\":\"acme\",\"n\":[1,2]}"}, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_string_equal(d.reason,
		"452|4.2.2|over quota line two|rcpt|user@example.com|mx.example.com|"
		"example.com|3|99|m1|app@example.org|2|other@example.net|2|1700000000.0|acme|nil");
	decide(&p, &(struct ask){.code = 452, .enhanced = "4.2.2", .text = "x",
				 .meta = "not json"}, &d);
	assert_non_null(strstr(d.reason, "|nometa|"));
	unload(&p);
}

static void broken_handlers_get_builtin(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "relayq.on(550, function() error('boom') end)\n"
	     "relayq.on(551, function() while true do end end)\n"
	     "relayq.on(552, function() local s = 'x' while true do s = s .. s end end)\n"
	     "relayq.on(553, function() local t = {} while true do t[#t+1] = {} end end)\n"
	     "relayq.on(554, function() return 'retry' end)\n"
	     "relayq.on(450, function()\n"
	     "  while true do pcall(function() while true do end end) end\n"
	     "end)\n"
	     "relayq.on(451, function() return relayq.retry { after = 42 } end)\n");
	struct rq_policy_answer d;
	struct rq_policy_lua_stats st;

	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "lua:550 error:"));
	assert_non_null(strstr(d.reason, "boom"));
	assert_non_null(strstr(rq_policy_lua_last_error(p.cfg->lua), "stack traceback"));

	decide(&p, &(struct ask){.code = 551, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "instruction budget"));

	decide(&p, &(struct ask){.code = 552, .enhanced = "5.2.2", .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "memory"));

	decide(&p, &(struct ask){.code = 553, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");

	decide(&p, &(struct ask){.code = 554, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "not an action"));

	/* A pcall in the script cannot swallow the budget error. */
	decide(&p, &(struct ask){.code = 450, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:4xx");
	assert_int_equal(d.action, RQ_POLICY_RETRY);

	stats(&p, &st);
	assert_int_equal(st.calls, 6);
	assert_int_equal(st.errors, 6);
	assert_int_equal(st.runtime_errors, 1);
	assert_int_equal(st.budget_errors + st.memory_errors, 4);
	assert_true(st.budget_errors >= 2);
	assert_true(st.memory_errors >= 1);
	assert_int_equal(st.bad_results, 1);
	/* The garbage is gone and the state still works. */
	assert_true(st.memory < RQ_POLICY_LUA_MEMORY / 4);
	assert_true(st.memory_peak > st.memory);
	decide(&p, &(struct ask){.code = 451, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:451");
	assert_true(d.after == 42);

	/* Each failing rule is logged once per load. */
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	fflush(logout);
	size_t n = 0;
	for (const char *s = logbuf; (s = strstr(s, "rule=lua:550")); s++)
		n++;
	assert_int_equal(n, 1);
	assert_non_null(strstr(logbuf, "event=policy_error"));
	assert_non_null(strstr(logbuf, "stack traceback"));
	stats(&p, &st);
	assert_int_equal(st.errors, 8);
	unload(&p);
}

static void sandbox(void **state)
{
	(void)state;
	char marker[600];
	snprintf(marker, sizeof(marker), "%s/escaped", dir);
	char *src = NULL;
	assert_true(asprintf(&src,
	     "relayq.on(550, function()\n"
	     "  local bad = {}\n"
	     "  local function check(name, v) if v ~= nil then bad[#bad + 1] = name end end\n"
	     "  check('io', io) check('os.execute', os.execute) check('os.getenv', os.getenv)\n"
	     "  check('os.remove', os.remove) check('os.exit', os.exit)\n"
	     "  check('require', require) check('debug', debug) check('package', package)\n"
	     "  check('dofile', dofile) check('loadfile', loadfile) check('string.dump', string.dump)\n"
	     "  check('coroutine', coroutine)\n"
	     "  check('load bytecode', (load('\\27Lua\\84\\0\\25\\147\\13\\10\\26\\10')))\n"
	     "  check('load mode b', (load('return 1', 'x', 'b')))\n"
	     "  check('load mode bt', (load('return 1', 'x', 'bt')))\n"
	     "  if pcall(collectgarbage, 'stop') then bad[#bad + 1] = 'collectgarbage stop' end\n"
	     "  if load('return 1 + 1')() ~= 2 then bad[#bad + 1] = 'text load broken' end\n"
	     "  if type(os.time()) ~= 'number' then bad[#bad + 1] = 'os.time' end\n"
	     "  if pcall(relayq.on, 551, print) then bad[#bad + 1] = 'relayq.on at run time' end\n"
	     "  if pcall(relayq.getenv, 'HOME') then bad[#bad + 1] = 'getenv at run time' end\n"
	     "  if #bad == 0 then return relayq.fail { reason = 'sandbox ok' } end\n"
	     "  return relayq.fail { reason = 'escaped: ' .. table.concat(bad, ',') }\n"
	     "end)\n"
	     "relayq.on(551, function() io.open('%s', 'w') end)\n"
	     "relayq.on(552, function() os.execute('touch %s') end)\n"
	     "relayq.on(553, function() require('os') end)\n"
	     "relayq.on(554, function() local s = string.rep('x', 1 << 30) return relayq.retry() end)\n"
	     "relayq.on(555, function() return setmetatable({ action = 'drop' }, getmetatable(relayq.retry())) end)\n",
	     marker, marker) > 0);
	struct pol p;
	load(&p, src);
	free(src);
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_string_equal(d.reason, "sandbox ok");
	for (int code = 551; code <= 555; code++) {
		decide(&p, &(struct ask){.code = code, .text = "x"}, &d);
		assert_string_equal(d.rule, "builtin:5xx");
	}
	assert_int_equal(access(marker, F_OK), -1);
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	assert_int_equal(st.errors, 5);
	assert_true(st.memory_errors >= 1);
	unload(&p);
}

static void bad_rules_refused_at_load(void **state)
{
	(void)state;
	struct rq_config *cfg = rq_config_create();
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, "bad.lua");
	const char *src =
		"relayq.on(250, function() end)\n"
		"relayq.on('2xx', function() end)\n"
		"relayq.on('5.9', function() end)\n"
		"relayq.on(550, 'not a function')\n"
		"relayq.on(451, function() end)\n"
		"relayq.on('451', function() end)\n"
		"relayq.on('sometimes', function() end)\n"
		"relayq.on_domain('x.com', { on = { [250] = function() end } })\n";
	struct rq_policy_lua *pl = rq_config_lua_run_buffer("bad.lua", src, strlen(src),
							     cfg, NULL, &diag);
	assert_null(pl);
	assert_int_equal(diag.errors, 7);
	assert_int_equal(diag.items[0].line, 1);
	assert_non_null(strstr(diag.items[0].msg, "only 4xx and 5xx"));
	bool twice = false;
	for (size_t i = 0; i < diag.n; i++)
		if (diag.items[i].line == 6 && strstr(diag.items[i].msg, "given twice (first at line 5)"))
			twice = true;
	assert_true(twice);
	rq_config_destroy(cfg);

	/* Bad action arguments are runtime errors of the handler. */
	struct pol p;
	load(&p, "relayq.on(450, function() return relayq.retry { after = 'soon' } end)\n"
		 "relayq.on(451, function() return relayq.retry { when = 5 } end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 450, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:4xx");
	assert_non_null(strstr(d.reason, "not a duration"));
	decide(&p, &(struct ask){.code = 451, .text = "x"}, &d);
	assert_non_null(strstr(d.reason, "unknown argument when"));
	unload(&p);
}

static void expiry_still_applies_to_lua_retries(void **state)
{
	(void)state;
	struct pol p;
	load(&p, "relayq.expire { max_age = '1d' }\n"
		 "relayq.on(550, function() return relayq.retry { after = '1h' } end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .text = "x", .age = 3600}, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	decide(&p, &(struct ask){.code = 550, .text = "x", .age = 2 * 86400}, &d);
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_true(d.expired);
	assert_non_null(strstr(d.reason, "lua:550"));
	unload(&p);
}

static void reload_with_syntax_error_keeps_old_policy(void **state)
{
	(void)state;
	char path[600];
	snprintf(path, sizeof(path), "%s/policy.lua", dir);
	FILE *f = fopen(path, "w");
	fputs("relayq.on(550, function() return relayq.retry { after = '7m' } end)\n", f);
	fclose(f);
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, path);
	struct rq_config *cfg = rq_config_lua_load(path, 0, &diag);
	assert_non_null(cfg);
	f = fopen(path, "w");
	fputs("relayq.on(550, function() return relayq.fail() end\n", f);  /* missing ) */
	fclose(f);
	rq_config_diag_init(&diag, path);
	assert_int_equal(rq_config_lua_reload(&cfg, path, &diag), -1);
	assert_true(diag.errors >= 1);
	assert_true(diag.items[0].line >= 1);
	assert_non_null(strstr(diag.items[0].msg, "expected"));
	struct pol p = {.cfg = cfg};
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_int_equal(d.action, RQ_POLICY_RETRY);
	assert_true(d.after == 420);
	rq_config_destroy(cfg);
}

static void many_calls_stay_flat(void **state)
{
	(void)state;
	struct pol p;
	load(&p, "local n = 0\n"
		 "relayq.on('4xx', function(r, msg) n = n + 1\n"
		 "  if r.text:match('grey') then return relayq.retry { after = 60 } end end)\n");
	struct rq_policy_lua_stats st;
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 451, .text = "greylisted"}, &d);
	stats(&p, &st);
	size_t base = st.memory;
	for (int i = 0; i < 20000; i++)
		decide(&p, &(struct ask){.code = 451, .text = "greylisted", .meta = "{\"a\":1}"}, &d);
	stats(&p, &st);
	assert_int_equal(st.errors, 0);
	assert_int_equal(st.calls, 20001);
	/* Garbage is collected as it goes: no growth beyond a few MiB. */
	assert_true(st.memory < base + (4u << 20));
	unload(&p);
}

/* Loads src expecting a load error whose message contains what. */
static void load_fails(const char *src, const char *what, int line)
{
	struct rq_config *cfg = rq_config_create();
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, "bad.lua");
	struct rq_policy_lua *pl = rq_config_lua_run_buffer("bad.lua", src, strlen(src),
							     cfg, NULL, &diag);
	assert_null(pl);
	assert_true(diag.errors >= 1);
	assert_non_null(strstr(diag.items[0].msg, what));
	assert_int_equal(diag.items[0].line, line);
	rq_config_destroy(cfg);
}

static void finalizers_refused(void **state)
{
	(void)state;
	/* A looping __gc would hang the load's final collection, any later
	 * one and the close: Lua runs finalizers with hooks off. */
	load_fails("relayq.on(550, function(r) return nil end)\n"
		   "setmetatable({}, {__gc = function() while true do end end})\n",
		   "__gc metamethods are not allowed", 2);
	/* __gc = false would mark the object too (and could become a
	 * function later). */
	load_fails("local t = setmetatable({}, {__gc = false})\n", "__gc", 1);

	struct pol p;
	load(&p,
	     /* __gc added to a metatable after setmetatable: Lua never
	      * finalizes the object (checked at the close, in unload). */
	     "local mt = {}\n"
	     "local kept = setmetatable({}, mt)\n"
	     "mt.__gc = function() while true do end end\n"
	     "local dflt = setmetatable({}, {__index = function(t, k) return k .. '!' end})\n"
	     "relayq.on(550, function(r)\n"
	     "  local m = {}\n"
	     "  local x = setmetatable({}, m)\n"
	     "  m.__gc = function() while true do end end\n"
	     "  x = nil\n"
	     "  collectgarbage() collectgarbage()\n"
	     "  return relayq.fail { reason = dflt.ok .. tostring(kept ~= nil) }\n"
	     "end)\n"
	     "relayq.on(551, function(r)\n"
	     "  setmetatable({}, {__gc = function() while true do end end})\n"
	     "  collectgarbage()\n"
	     "  return relayq.retry { after = '10m' }\n"
	     "end)\n"
	     /* to-be-closed variables run with the hook on. */
	     "relayq.on(552, function(r)\n"
	     "  local x <close> = setmetatable({}, {__close = function() while true do end end})\n"
	     "  return relayq.drop()\n"
	     "end)\n"
	     "relayq.on(553, function(r)\n"
	     "  local x <close> = setmetatable({}, {__close = function()\n"
	     "    while true do pcall(function() while true do end end) end end})\n"
	     "  while true do end\n"
	     "end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:550");
	assert_string_equal(d.reason, "ok!true");
	decide(&p, &(struct ask){.code = 551, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_int_equal(d.action, RQ_POLICY_FAIL);
	assert_non_null(strstr(d.reason, "lua:551 error:"));
	assert_non_null(strstr(d.reason, "__gc metamethods are not allowed"));
	decide(&p, &(struct ask){.code = 552, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "instruction budget exceeded"));
	decide(&p, &(struct ask){.code = 553, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "instruction budget exceeded"));
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	assert_int_equal(st.errors, 3);
	assert_int_equal(st.runtime_errors, 1);
	assert_int_equal(st.budget_errors, 2);
	fflush(logout);
	assert_non_null(strstr(logbuf, "rule=lua:551 kind=runtime"));
	/* Still usable after the failures. */
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_string_equal(d.reason, "ok!true");
	unload(&p);
}

static void patterns_bounded(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "local a = ('a'):rep(3000)\n"
	     "relayq.on(550, function(r) a:find('.-.-.-.-.-b') return relayq.drop() end)\n"
	     "relayq.on(551, function(r) string.match(a, '(.-)(.-)(.-)(.-)b') return relayq.drop() end)\n"
	     "relayq.on(552, function(r) for x in a:gmatch('.-.-.-b') do end return relayq.drop() end)\n"
	     "relayq.on(553, function(r) a:gsub('.-.-.-b', 'x') return relayq.drop() end)\n"
	     "relayq.on(554, function(r) pcall(string.find, a, '.-.-.-.-.-b') return relayq.drop() end)\n"
	     /* One item reading a long set at every step, anchored. */
	     "relayq.on(555, function(r) local set = '[' .. ('b'):rep(60000) .. 'a]*$'\n"
	     "  local s = a:rep(20) while true do s:find('^' .. set) end end)\n"
	     /* A replacement read at every match, producing nothing. */
	     "relayq.on(556, function(r) local rep = ('%1'):rep(500000)\n"
	     "  while true do a:gsub('()', rep) end end)\n"
	     "relayq.on(557, function(r) while true do print('flood') end end)\n"
	     /* Ordinary uses are unchanged. */
	     "relayq.on(450, function(r)\n"
	     "  local t = {}\n"
	     "  t[#t + 1] = tostring(r.text:find('greylist', 1, true))\n"
	     "  t[#t + 1] = r.text:match('(%d+%.%d+%.%d+)')\n"
	     "  local user, dom = r.recipient:match('^(.-)@(.+)$')\n"
	     "  t[#t + 1] = user .. '/' .. dom\n"
	     "  t[#t + 1] = (r.text:gsub('%s+', '_'))\n"
	     "  local n = 0 for w in r.text:gmatch('%a+') do n = n + 1 end\n"
	     "  t[#t + 1] = n\n"
	     "  t[#t + 1] = r.text:find('[%d.]+%s') .. ',' .. tostring(r.text:find('x$'))\n"
	     "  t[#t + 1] = ('k=v; k2=v2'):gsub('(%w+)=(%w+)', '%2=%1')\n"
	     "  t[#t + 1] = ('%bxy'):len() .. ('(a(b)c)'):match('%b()')\n"
	     /* A long subject, a match near the start: one start at a time. */
	     "  local big = ('x'):rep(60000) .. ' tail'\n"
	     "  t[#t + 1] = #big:match('(.*) tail')\n"
	     "  t[#t + 1] = select(2, big:gsub('x', 'y'))\n"
	     "  t[#t + 1] = tostring(big:find('(%d)'))\n"
	     "  return relayq.fail { reason = table.concat(t, ';') }\n"
	     "end)\n");
	struct rq_policy_answer d;
	static const char *const fn[] = {"string.find", "string.match", "string.gmatch",
					 "string.gsub", NULL, "string.find", "string.gsub",
					 "print"};
	for (int code = 550; code <= 557; code++) {
		decide(&p, &(struct ask){.code = code, .text = "x"}, &d);
		assert_string_equal(d.rule, "builtin:5xx");
		assert_non_null(strstr(d.reason, "instruction budget exceeded"));
		/* In a pcall, the error caught is the next instruction's. */
		if (fn[code - 550])
			assert_non_null(strstr(d.reason, fn[code - 550]));
	}
	decide(&p, &(struct ask){.code = 450, .enhanced = "4.7.1",
				 .text = "greylisted 4.7.1 come back in 300 s"}, &d);
	assert_string_equal(d.rule, "lua:450");
	assert_string_equal(d.reason,
		"1;4.7.1;user/example.com;greylisted_4.7.1_come_back_in_300_s;5;12,nil;"
		"v=k; v2=k2;4(a(b)c);60000;60000;nil");
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	assert_int_equal(st.errors, 8);
	assert_int_equal(st.budget_errors, 8);
	fflush(logout);
	size_t lines = 0;
	for (const char *q = logbuf; (q = strstr(q, "text=flood")); q++)
		lines++;
	assert_true(lines <= RQ_POLICY_LUA_INSTRUCTIONS / 1000);
	unload(&p);
}

static void library_work_bounded(void **state)
{
	(void)state;
	struct pol p;
	/* The budget must stop these, not the time limit (slow machines). */
	struct rq_policy_lua_limits lim = {.seconds = 60, .instructions = 200000};
	load_limits(&p,
	     "local big = {} for i = 1, 1000 do big[i] = i end\n"
	     "relayq.on(550, function() local s = string.rep('', math.maxinteger)\n"
	     "  return relayq.fail { reason = 'rep:' .. #s .. ':' .. ('ab'):rep(3, ',') } end)\n"
	     "relayq.on(551, function() table.move({}, 1, math.maxinteger - 1, 2) end)\n"
	     "relayq.on(552, function()\n"
	     "  local t = setmetatable({}, {__index = table.concat})\n"
	     "  table.concat(t, '', 1, 1 << 40) end)\n"
	     "relayq.on(553, function() table.unpack({}, 1, 1 << 40) end)\n"
	     "relayq.on(554, function() local s = ('\\u{e9}'):rep(500000)\n"
	     "  while true do utf8.len(s) end end)\n"
	     "relayq.on(555, function() local s = ('1'):rep(1000000)\n"
	     "  while true do local x = s + 0 end end)\n"
	     "relayq.on(556, function() local s = (' '):rep(4000000)\n"
	     "  while true do load(s) end end)\n"
	     "relayq.on(557, function() local s = ('f'):rep(1000000)\n"
	     "  while true do tonumber(s, 16) end end)\n"
	     "relayq.on(558, function() local t = setmetatable({}, {__len = function() return 1 << 50 end})\n"
	     "  table.insert(t, 1, 'x') end)\n"
	     "relayq.on(559, function() local s = ('x'):rep(1000000)\n"
	     "  while true do local y = s .. 'y' end end)\n"
	     /* Ordinary uses still work. */
	     "relayq.on(450, function()\n"
	     "  local t = {}\n"
	     "  for i = 1, 100 do t[i] = (i * 37) % 101 end\n"
	     "  table.sort(t) table.sort(t, function(x, y) return x > y end)\n"
	     "  table.insert(t, 1, 0) table.remove(t)\n"
	     "  local m = table.move({1, 2, 3}, 1, 3, 1, {})\n"
	     "  return relayq.fail { reason = t[1] .. ',' .. t[2] .. ',' .. #t .. ',' ..\n"
	     "    table.concat(m, '') .. ',' .. utf8.len('h\\u{e9}') .. ',' ..\n"
	     "    select('#', table.unpack(big)) .. ',' .. tonumber('ff', 16) .. ',' ..\n"
	     "    string.format('%5.1f|%s', 2.25, 'x') .. ',' .. ('10' + 1) }\n"
	     "end)\n", &lim);
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_string_equal(d.reason, "rep:0:ab,ab,ab");
	for (int code = 551; code <= 559; code++) {
		decide(&p, &(struct ask){.code = code, .text = "x"}, &d);
		assert_string_equal(d.rule, "builtin:5xx");
		/* More results than a stack holds: refused at once, as by
		 * stock Lua, before any work. */
		assert_non_null(strstr(d.reason, code == 553 ? "too many results to unpack" :
				       "instruction budget exceeded"));
	}
	decide(&p, &(struct ask){.code = 450, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:450");
	assert_string_equal(d.reason, "0,100,100,123,2,1000,255,  2.2|x,11");
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	assert_int_equal(st.errors, 9);
	assert_int_equal(st.budget_errors, 8);
	unload(&p);
}

static void libraries_read_only(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "local S = string\n"
	     "local SMT = getmetatable('')\n"
	     "G = 'global-ok'\n"
	     "function string.shout(s) return s:upper() .. '!' end\n"
	     "relayq.on(550, function() string.find = function() return 1 end end)\n"
	     "relayq.on(551, function() getmetatable('').__index = function() while true do end end end)\n"
	     "relayq.on(552, function() relayq.retry = function() return relayq.drop() end end)\n"
	     "relayq.on(553, function() math.floor = nil end)\n"
	     "relayq.on(554, function() rawset(string, 'find', print) end)\n"
	     "relayq.on(555, function() string = nil end)\n"
	     "relayq.on(556, function() setmetatable(table, nil) end)\n"
	     "relayq.on(557, function() X = 1 end)\n"
	     "relayq.on(558, function() rawset(_G, 'math', {}) end)\n"
	     "relayq.on(559, function() local f, s = pairs(table) if s then s.concat = nil end\n"
	     "  for k, v in pairs(_G) do if type(v) == 'table' then pcall(rawset, v, 'find', 1) end end end)\n"
	     /* References taken at load are the file's own: changing them
	      * does not reach the others. */
	     "relayq.on(560, function() S.find = function() return 99 end\n"
	     "  SMT.__index = function() while true do end end end)\n"
	     "relayq.on(450, function(r)\n"
	     "  local s = 'abc'\n"
	     "  local ok = s:find('b') == 2 and string.find(s, 'c') == 3 and math.floor(2.5) == 2\n"
	     "    and table.concat({1, 2}, ',') == '1,2' and G == 'global-ok'\n"
	     "    and s:shout() == 'ABC!' and ('x'):rep(3) == 'xxx' and ('5' * 2) == 10\n"
	     "  local n = 0 for k, v in pairs(string) do n = n + 1 end\n"
	     "  local g = 0 for k, v in pairs(_G) do g = g + 1 end\n"
	     "  if ok and n > 10 and g > 10 then return relayq.retry { after = 77 } end\n"
	     "  return relayq.fail { reason = 'poisoned' }\n"
	     "end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 450, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:450");
	assert_true(d.after == 77);
	for (int code = 550; code <= 560; code++) {
		decide(&p, &(struct ask){.code = code, .text = "x"}, &d);
		assert_string_equal(d.rule, "builtin:5xx");
		if (code == 550)
			assert_non_null(strstr(d.reason, "string is read-only: cannot set string.find"));
		if (code == 557)
			assert_non_null(strstr(d.reason, "cannot set global 'X'"));
		if (code == 554 || code == 558)
			assert_non_null(strstr(d.reason, "read-only"));
		/* Every other handler still gets the real libraries. */
		decide(&p, &(struct ask){.code = 450, .text = "x"}, &d);
		assert_string_equal(d.rule, "lua:450");
		assert_true(d.after == 77);
	}
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	/* 559 and 560 only touch their own tables. */
	assert_int_equal(st.errors, 9);
	assert_int_equal(st.runtime_errors, 9);
	unload(&p);
}

static void time_limit_backstop(void **state)
{
	(void)state;
	/* == on two long strings is one instruction doing a long memcmp:
	 * the instruction budget alone would allow minutes of it. */
	const char *src =
		"relayq.on(550, function(r)\n"
		"  local a = ('x'):rep(1000000)\n"
		"  local b = ('x'):rep(999999) .. 'y'\n"
		"  local n = 0\n"
		"  while true do if a == b or a > b then n = n + 1 end end\n"
		"end)\n"
		"relayq.on(551, function(r) return relayq.drop() end)\n";
	struct rq_policy_lua_limits lim = {.seconds = 0.2};
	struct pol p;
	load_limits(&p, src, &lim);
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "time limit exceeded"));
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	assert_int_equal(st.budget_errors, 1);
	decide(&p, &(struct ask){.code = 551, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:551");
	unload(&p);
}

static void strict_globals_kept(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "setmetatable(_G, { __index = function(t, k) error('undefined global ' .. k, 2) end })\n"
	     "limit = 3\n"
	     "relayq.on(550, function(r) return relayq.retry { after = limit } end)\n"
	     "relayq.on(551, function(r) return relayq.retry { after = limt } end)\n");
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 550, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:550");
	assert_true(d.after == 3);
	decide(&p, &(struct ask){.code = 551, .text = "x"}, &d);
	assert_string_equal(d.rule, "builtin:5xx");
	assert_non_null(strstr(d.reason, "undefined global limt"));
	unload(&p);
}

/* The seconds since t0 (monotonic ms). */
static double since(int64_t t0)
{
	return (double)(rq_clock_mono_ms() - t0) / 1000;
}

/*
 * Issue 15: a handler's message handler, __close or comparator cannot
 * keep it running past its budget; the built-in decision applies, and
 * the next call runs normally.
 */
static void handlers_cannot_outlive_budget(void **state)
{
	(void)state;
	struct pol p;
	load(&p,
	     "relayq.on(550, function() xpcall(error, function() while true do end end) end)\n"
	     "relayq.on(551, function()\n"
	     "  xpcall(function() while true do end end, function() while true do end end) end)\n"
	     "relayq.on(552, function()\n"
	     "  local x <close> = setmetatable({}, {__close = function()\n"
	     "    while true do pcall(error) end end})\n"
	     "  while true do end end)\n"
	     "relayq.on(553, function() while true do\n"
	     "  xpcall(function() while true do end end, function(m) return m end) end end)\n"
	     "relayq.on(554, function() string.gsub('abc', '%w', function()\n"
	     "  pcall(function() while true do end end) while true do end end) end)\n"
	     "relayq.on(555, function() local t = setmetatable({}, {__index = function(t, k)\n"
	     "  while true do end end}) xpcall(function() return t.x end, function()\n"
	     "  return t.y end) end)\n"
	     "relayq.on(450, function() return relayq.retry { after = 42 } end)\n");
	for (int code = 550; code <= 555; code++) {
		int64_t t0 = rq_clock_mono_ms();
		struct rq_policy_answer d;
		decide(&p, &(struct ask){.code = code, .text = "x"}, &d);
		if (!strstr(d.reason, "instruction budget exceeded"))
			fprintf(stderr, "%d: %s\n", code, d.reason);
		assert_string_equal(d.rule, "builtin:5xx");
		assert_non_null(strstr(d.reason, "instruction budget exceeded"));
		assert_true(since(t0) < 10);
		decide(&p, &(struct ask){.code = 450, .text = "x"}, &d);
		assert_string_equal(d.rule, "lua:450");
		assert_true(d.after == 42);
	}
	struct rq_policy_lua_stats st;
	stats(&p, &st);
	assert_int_equal(st.budget_errors, 6);
	unload(&p);
}

/*
 * The time limit holds whatever C function the time is spent in: with
 * an instruction budget too large to matter, sorting long strings (the
 * library's compare, no hook between comparisons), table.move over nils
 * and concat of long strings end with the time error soon after the
 * limit (0.3 s here; the assertion's bound is generous on purpose).
 */
static void time_limit_holds_in_c_work(void **state)
{
	(void)state;
	struct rq_policy_lua_limits lim = {.seconds = 0.3, .instructions = 4000000000UL,
					   .load_instructions = 4000000000UL};
	struct pol p;
	load_limits(&p,
	     "local long = {} for i = 1, 40 do long[i] = ('a'):rep(200000) .. (i * 7 % 40) end\n"
	     "relayq.on(550, function() while true do table.sort(long) end end)\n"
	     "relayq.on(551, function() while true do\n"
	     "  table.sort(long, function(a, b) return a > b end) end end)\n"
	     "relayq.on(552, function() while true do table.move({}, 1, 1000000, 2) end end)\n"
	     "relayq.on(553, function() while true do local s = table.concat(long) end end)\n"
	     "relayq.on(554, function() while true do rawequal(long[1], long[1] .. '') end end)\n"
	     "relayq.on(450, function() return relayq.retry { after = 42 } end)\n", &lim);
	for (int code = 550; code <= 554; code++) {
		int64_t t0 = rq_clock_mono_ms();
		struct rq_policy_answer d;
		decide(&p, &(struct ask){.code = code, .text = "x"}, &d);
		double took = since(t0);
		if (!strstr(d.reason, "time limit exceeded") || took > 10)
			fprintf(stderr, "%d: %.2f s: %s\n", code, took, d.reason);
		assert_string_equal(d.rule, "builtin:5xx");
		assert_non_null(strstr(d.reason, "time limit exceeded"));
		assert_true(took < 10);
	}
	struct rq_policy_answer d;
	decide(&p, &(struct ask){.code = 450, .text = "x"}, &d);
	assert_string_equal(d.rule, "lua:450");
	unload(&p);
}

/* Loads src with lim expecting a refusal whose message contains what,
 * within a generous bound. */
static void load_refused_in_time(const char *src, const struct rq_policy_lua_limits *lim,
				 const char *what)
{
	struct rq_config *cfg = rq_config_create();
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, "bad.lua");
	int64_t t0 = rq_clock_mono_ms();
	struct rq_policy_lua *pl = rq_config_lua_run_buffer("bad.lua", src, strlen(src),
							     cfg, lim, &diag);
	double took = since(t0);
	assert_null(pl);
	assert_true(diag.errors >= 1);
	if (!strstr(diag.items[0].msg, what))
		fprintf(stderr, "load: %s\n", diag.items[0].msg);
	assert_non_null(strstr(diag.items[0].msg, what));
	assert_true(took < 20);
	rq_config_destroy(cfg);
}

/*
 * At load time (relayqd --check, start, SIGHUP in the daemon's loop) the
 * same escapes refuse the file instead of hanging; the load's time
 * limit covers the whole load.
 */
static void load_cannot_outlive_budget(void **state)
{
	(void)state;
	static const char *const srcs[] = {
		"xpcall(function() while true do end end, function() while true do end end)\n",
		"xpcall(error, function() while true do end end)\n",
		"local x <close> = setmetatable({}, {__close = function() while true do end end})\n"
		"while true do end\n",
		"while true do load(function() while true do end end) end\n",
	};
	for (size_t i = 0; i < sizeof(srcs) / sizeof(srcs[0]); i++)
		load_refused_in_time(srcs[i], NULL, "instruction budget exceeded");
	struct rq_policy_lua_limits lim = {.load_seconds = 0.5,
					   .load_instructions = 4000000000UL};
	for (size_t i = 0; i < sizeof(srcs) / sizeof(srcs[0]); i++)
		load_refused_in_time(srcs[i], &lim, "time limit exceeded");
	load_refused_in_time("local t = {} for i = 1, 40 do t[i] = ('a'):rep(200000) .. i end\n"
			     "while true do table.sort(t) end\n", &lim, "time limit exceeded");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(text_match_550_to_retry),
		cmocka_unit_test(code_421_to_fail),
		cmocka_unit_test(most_specific_wins),
		cmocka_unit_test(per_domain_rules),
		cmocka_unit_test(handler_sees_reply_and_message),
		cmocka_unit_test(broken_handlers_get_builtin),
		cmocka_unit_test(sandbox),
		cmocka_unit_test(bad_rules_refused_at_load),
		cmocka_unit_test(expiry_still_applies_to_lua_retries),
		cmocka_unit_test(reload_with_syntax_error_keeps_old_policy),
		cmocka_unit_test(many_calls_stay_flat),
		cmocka_unit_test(finalizers_refused),
		cmocka_unit_test(patterns_bounded),
		cmocka_unit_test(library_work_bounded),
		cmocka_unit_test(libraries_read_only),
		cmocka_unit_test(time_limit_backstop),
		cmocka_unit_test(handlers_cannot_outlive_budget),
		cmocka_unit_test(time_limit_holds_in_c_work),
		cmocka_unit_test(load_cannot_outlive_budget),
		cmocka_unit_test(strict_globals_kept),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

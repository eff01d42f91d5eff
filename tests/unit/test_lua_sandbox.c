#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>

#include <lualib.h>

#include "relayq/clock.h"
#include "relayq/log.h"
#include "relayq/lua_sandbox.h"

/* The sandbox alone: no config, no policy, no mail. */

static char *logbuf;
static size_t loglen;
static FILE *logout;

static int setup(void **state)
{
	(void)state;
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
	return 0;
}

static struct rq_lua_sandbox *make(size_t memory)
{
	char err[200] = "";
	struct rq_lua_sandbox_opts o = {.memory = memory, .print_event = "test_print"};
	struct rq_lua_sandbox *sb = rq_lua_sandbox_create(&o, err, sizeof(err));
	if (!sb)
		fprintf(stderr, "create: %s\n", err);
	assert_non_null(sb);
	return sb;
}

struct chunk {
	const char *src;
	int nresults;
};

static int run_chunk(lua_State *L)
{
	struct chunk *c = lua_touserdata(L, 1);
	if (luaL_loadbufferx(L, c->src, strlen(c->src), "=test", "t") != LUA_OK)
		return lua_error(L);
	lua_call(L, 0, c->nresults);
	return c->nresults;
}

/* Runs src on a fresh budget; returns the lua_pcall status, the error
 * text (or the first result as a string) in out. */
static int run(struct rq_lua_sandbox *sb, unsigned long budget, const char *src,
	       char *out, size_t len)
{
	lua_State *L = rq_lua_sandbox_state(sb);
	struct chunk c = {src, 1};
	rq_lua_sandbox_arm(sb, budget, 5.0);
	lua_pushcfunction(L, run_chunk);
	lua_pushlightuserdata(L, &c);
	int st = lua_pcall(L, 1, 1, 0);
	if (out) {
		if (st != LUA_OK || lua_type(L, -1) == LUA_TSTRING)
			rq_lua_sandbox_error_text(L, -1, out, len);
		else
			snprintf(out, len, "%s", luaL_tolstring(L, -1, NULL));
	}
	lua_settop(L, 0);
	return st;
}

static void budget_stops_endless_loop(void **state)
{
	(void)state;
	struct rq_lua_sandbox *sb = make(0);
	char out[300];
	int st = run(sb, 100000, "while true do end", out, sizeof(out));
	assert_int_not_equal(st, LUA_OK);
	assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_BUDGET);
	assert_non_null(strstr(out, "instruction budget exceeded (100000 instructions)"));
	/* A pcall in the script cannot swallow it. */
	st = run(sb, 100000, "while true do pcall(function() while true do end end) end",
		 out, sizeof(out));
	assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_BUDGET);
	/* C work pays too: a long string.rep is stopped by the same budget. */
	st = run(sb, 10000, "return #string.rep('x', 1e7)", out, sizeof(out));
	assert_int_not_equal(st, LUA_OK);
	assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_BUDGET);
	/* A pattern that could backtrack forever fails before it runs. */
	st = run(sb, 100000, "return (string.rep('a', 3000)):find('.-.-.-.-b')", out,
		 sizeof(out));
	assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_BUDGET);
	assert_non_null(strstr(out, "string.find: the pattern may take"));
	/* A fresh arm: the state works again. */
	assert_int_equal(run(sb, 100000, "return 1 + 1", out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "2");
	rq_lua_sandbox_destroy(sb);
	rq_lua_sandbox_destroy(NULL);
}

static void memory_cap(void **state)
{
	(void)state;
	struct rq_lua_sandbox *sb = make(2u << 20);
	char out[300];
	int st = run(sb, 100000000,
		     "local t = {} for i = 1, 1e8 do t[i] = tostring(i) end", out,
		     sizeof(out));
	assert_int_not_equal(st, LUA_OK);
	assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_MEMORY);
	struct rq_lua_sandbox_usage u;
	rq_lua_sandbox_usage(sb, &u);
	assert_int_equal(u.memory_cap, 2u << 20);
	assert_true(u.memory_peak <= u.memory_cap);
	assert_int_equal(rq_lua_sandbox_collect(sb), 0);
	assert_int_equal(run(sb, 100000, "return 'still here'", out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "still here");
	rq_lua_sandbox_destroy(sb);
}

static void frozen_libraries(void **state)
{
	(void)state;
	struct rq_lua_sandbox *sb = make(0);
	char out[300];
	/* Before freezing, the script may add to the libraries and globals. */
	assert_int_equal(run(sb, 100000, "app = { n = 1 } string.shout = string.upper "
			     "return 'ok'", out, sizeof(out)), LUA_OK);
	rq_lua_sandbox_arm(sb, 1000000, 5.0);
	static const char *const extra[] = {"app", NULL};
	assert_int_equal(rq_lua_sandbox_freeze(sb, extra), 0);
	static const struct {
		const char *src, *needle;
	} writes[] = {
		{"string.upper = nil", "string is read-only"},
		{"math.pi = 3", "math is read-only"},
		{"table.insert = print", "table is read-only"},
		{"os.time = nil", "os is read-only"},
		{"app.n = 2", "app is read-only"},
		{"rawset(string, 'x', 1)", "rawset: the table is read-only"},
		{"setmetatable(string, {})", "protected metatable"},
		{"getmetatable('').__index = {}", "attempt to index"},
		{"x = 1", "cannot set global 'x'"},
	};
	for (size_t i = 0; i < sizeof(writes) / sizeof(writes[0]); i++) {
		int st = run(sb, 100000, writes[i].src, out, sizeof(out));
		if (st == LUA_OK || !strstr(out, writes[i].needle))
			fprintf(stderr, "%s: %s\n", writes[i].src, out);
		assert_int_not_equal(st, LUA_OK);
		assert_non_null(strstr(out, writes[i].needle));
	}
	/* Reading still works, and what the file added is there. */
	assert_int_equal(run(sb, 100000, "return string.shout('a') .. ('b'):upper() .. "
			     "app.n", out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "AB1");
	assert_int_equal(run(sb, 100000, "local n = 0 for _ in pairs(math) do n = n + 1 end "
			     "return n > 10 and next(math) == nil", out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "true");
	rq_lua_sandbox_destroy(sb);
}

static void absent_libraries(void **state)
{
	(void)state;
	struct rq_lua_sandbox *sb = make(0);
	char out[300];
	assert_int_equal(run(sb, 100000,
			     "return tostring(io == nil and require == nil and package == nil "
			     "and debug == nil and coroutine == nil and dofile == nil "
			     "and loadfile == nil and os.execute == nil and os.getenv == nil "
			     "and os.exit == nil and os.remove == nil and string.dump == nil "
			     "and type(os.time) == 'function')", out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "true");
	/* load: text chunks only. */
	assert_int_equal(run(sb, 100000, "local f, e = load('\\27Lua binary', 'x', 'b') "
			     "return e", out, sizeof(out)), LUA_OK);
	assert_non_null(strstr(out, "only text chunks"));
	assert_int_equal(run(sb, 100000, "local f, e = load('\\27Lua binary') return e",
			     out, sizeof(out)), LUA_OK);
	assert_non_null(strstr(out, "attempt to load a binary chunk"));
	assert_int_equal(run(sb, 100000, "return load('return 6 * 7')()", out,
			     sizeof(out)), LUA_OK);
	assert_string_equal(out, "42");
	/* No finalizers: they would run outside the budget. */
	assert_int_not_equal(run(sb, 100000, "setmetatable({}, {__gc = function() end})",
				 out, sizeof(out)), LUA_OK);
	assert_non_null(strstr(out, "__gc metamethods are not allowed"));
	assert_int_not_equal(run(sb, 100000, "collectgarbage('stop')", out, sizeof(out)),
			     LUA_OK);
	rq_lua_sandbox_destroy(sb);
}

static void print_bounded(void **state)
{
	(void)state;
	struct rq_lua_sandbox *sb = make(0);
	char out[300];
	fflush(logout);
	size_t before = loglen;
	assert_int_equal(run(sb, 100000, "print('hello', 42, string.rep('y', 5000))",
			     out, sizeof(out)), LUA_OK);
	fflush(logout);
	const char *line = logbuf + before;
	assert_non_null(strstr(line, "test_print"));
	assert_non_null(strstr(line, "hello"));
	/* Each argument is cut at 1024 bytes. */
	char ys[1026];
	memset(ys, 'y', 1025);
	ys[1025] = '\0';
	assert_null(strstr(line, ys));
	ys[1024] = '\0';
	assert_non_null(strstr(line, ys));
	/* Each line costs budget: a print loop cannot flood the log. */
	before = loglen;
	int st = run(sb, 100000, "while true do print('spam') end", out, sizeof(out));
	assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_BUDGET);
	fflush(logout);
	size_t lines = 0;
	for (const char *p = logbuf + before; (p = strstr(p, "spam")); p++)
		lines++;
	assert_true(lines <= 100);
	rq_lua_sandbox_destroy(sb);
}

/* Runs src on budget / seconds; returns the status, the error (or the
 * result) in out and the seconds it took in *took. */
static int run_for(struct rq_lua_sandbox *sb, unsigned long budget, double seconds,
		   const char *src, char *out, size_t len, double *took)
{
	lua_State *L = rq_lua_sandbox_state(sb);
	struct chunk c = {src, 1};
	int64_t t0 = rq_clock_mono_ms();
	rq_lua_sandbox_arm(sb, budget, seconds);
	lua_pushcfunction(L, run_chunk);
	lua_pushlightuserdata(L, &c);
	int st = lua_pcall(L, 1, 1, 0);
	*took = (double)(rq_clock_mono_ms() - t0) / 1000;
	if (st != LUA_OK || lua_type(L, -1) == LUA_TSTRING)
		rq_lua_sandbox_error_text(L, -1, out, len);
	else
		snprintf(out, len, "%s", luaL_tolstring(L, -1, NULL));
	lua_settop(L, 0);
	return st;
}

#define LOOP "while true do end"
#define CLOSER(body) "setmetatable({}, {__close = function() " body " end})"

/*
 * Every place where Lua runs code while an error is being handled, or
 * from inside a C function: once the budget is gone, the run ends with
 * the budget error, in well under the time limit (the runs here have
 * 100000 instructions, 5 s; a hang would be the bug).
 */
static void no_escape_while_handling_errors(void **state)
{
	(void)state;
	static const char *const escapes[] = {
		/* message handlers: after an error of the script, of the budget */
		"xpcall(error, function() " LOOP " end)",
		"xpcall(function() " LOOP " end, function() " LOOP " end)",
		"while true do xpcall(function() " LOOP " end, function(m) return m end) end",
		"xpcall(function() " LOOP " end, function(m) return xpcall(error, function() "
		LOOP " end) end)",
		"xpcall(error, function(m) pcall(function() " LOOP " end) " LOOP " end)",
		"xpcall(error, function(m) while true do pcall(error) end end)",
		"xpcall(function() local s = 'x' while true do s = s .. s end end, "
		"function() " LOOP " end)",
		/* pcall swallowing in a loop */
		"while true do pcall(function() " LOOP " end) end",
		"while true do pcall(string.rep, 'x', 1e9) end",
		/* __close, on the way out of a block and of an error */
		"do local x <close> = " CLOSER(LOOP) " end",
		"pcall(function() local x <close> = " CLOSER(LOOP) " " LOOP " end)",
		"xpcall(function() local x <close> = " CLOSER(LOOP) " error('e') end, "
		"function() " LOOP " end)",
		"local x <close> = " CLOSER("while true do pcall(error) end") " " LOOP,
		/* __tostring of an error value */
		"local e = setmetatable({}, {__tostring = function() " LOOP " end}) "
		"xpcall(function() error(e) end, function(m) return tostring(m) end)",
		"local e = setmetatable({}, {__tostring = function() " LOOP " end}) "
		"print(e)",
		"local e = setmetatable({}, {__tostring = function() " LOOP " end}) "
		"return string.format('%s', e)",
		/* functions the library calls back */
		"string.gsub('aaaa', 'a', function() " LOOP " end)",
		"string.gsub('aaaa', 'a', function() pcall(function() " LOOP " end) "
		LOOP " end)",
		"table.sort({3, 2, 1, 5, 4}, function(a, b) " LOOP " end)",
		"table.sort({3, 2, 1, 5, 4}, function(a, b) pcall(function() " LOOP
		" end) return a < b end)",
		"load(function() " LOOP " end)",
		"while true do load(function() " LOOP " end) end",
		"for k in pairs(setmetatable({}, {__pairs = function() " LOOP " end})) do end",
		/* metamethods */
		"local t = setmetatable({}, {__index = function() " LOOP " end}) return t.x",
		"local t = setmetatable({}, {__newindex = function() " LOOP " end}) t.x = 1",
		"local mt = {__eq = function() " LOOP " end} "
		"return setmetatable({}, mt) == setmetatable({}, mt)",
		"local mt = {__lt = function() " LOOP " end} "
		"return setmetatable({}, mt) < setmetatable({}, mt)",
		"local mt = {__le = function() " LOOP " end} "
		"return setmetatable({}, mt) <= setmetatable({}, mt)",
		"local t = setmetatable({}, {__concat = function() " LOOP " end}) "
		"return t .. 'x'",
		"local t = setmetatable({}, {__len = function() " LOOP " end}) return #t",
		"local t = setmetatable({}, {__call = function() " LOOP " end}) return t()",
		"local t = setmetatable({}, {__index = function(t, k) return t[k] end}) "
		"while true do pcall(function() return t.x end) end",
		"local mt = {__lt = function() " LOOP " end} local a = {} "
		"for i = 1, 10 do a[i] = setmetatable({}, mt) end table.sort(a)",
	};
	struct rq_lua_sandbox *sb = make(0);
	char out[600];
	for (size_t i = 0; i < sizeof(escapes) / sizeof(escapes[0]); i++) {
		double took;
		int st = run_for(sb, 100000, 5.0, escapes[i], out, sizeof(out), &took);
		if (st == LUA_OK || rq_lua_sandbox_failure(sb, st) != RQ_LUA_SANDBOX_FAIL_BUDGET ||
		    took > 4.0)
			fprintf(stderr, "escape %zu (%s): status %d, %.2f s: %s\n", i,
				escapes[i], st, took, out);
		assert_int_not_equal(st, LUA_OK);
		assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_BUDGET);
		/* The budget, not the 5 s backstop, ended it. */
		assert_true(took < 4.0);
		/* A fresh arm: the state works again. */
		assert_int_equal(run(sb, 100000, "return 1 + 1", out, sizeof(out)), LUA_OK);
		assert_string_equal(out, "2");
	}
	/* What handlers are for still works. */
	assert_int_equal(run(sb, 100000, "local ok, m = xpcall(error, function(m) return "
			     "'handled: ' .. m end, 'x') return tostring(ok) .. ' ' .. m",
			     out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "false handled: x");
	assert_int_equal(run(sb, 100000, "local ok, m = pcall(error, 'y') return "
			     "tostring(ok) .. ' ' .. m", out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "false y");
	assert_int_equal(run(sb, 100000, "return select('#', xpcall(function(...) return ... "
			     "end, print, 1, nil, 3))", out, sizeof(out)), LUA_OK);
	assert_string_equal(out, "4");
	assert_int_equal(run(sb, 100000, "local n = 0 do local x <close> = setmetatable({}, "
			     "{__close = function() n = n + 1 end}) end return n", out,
			     sizeof(out)), LUA_OK);
	assert_string_equal(out, "1");
	rq_lua_sandbox_destroy(sb);
}

/*
 * The wall-clock limit is sticky like the budget: a run with a huge
 * budget and a short limit ends with the time error, whatever handlers
 * the script set up to swallow it.
 */
static void time_limit_sticky(void **state)
{
	(void)state;
	static const char *const escapes[] = {
		"xpcall(function() " LOOP " end, function() " LOOP " end)",
		"xpcall(error, function() " LOOP " end)",
		"while true do pcall(function() " LOOP " end) end",
		"local x <close> = " CLOSER("while true do pcall(error) end") " " LOOP,
		"table.sort({3, 2, 1, 5, 4}, function(a, b) pcall(function() " LOOP
		" end) return a < b end)",
	};
	struct rq_lua_sandbox *sb = make(0);
	char out[600];
	for (size_t i = 0; i < sizeof(escapes) / sizeof(escapes[0]); i++) {
		double took;
		int st = run_for(sb, 4000000000UL, 0.3, escapes[i], out, sizeof(out), &took);
		if (st == LUA_OK || !strstr(out, "time limit exceeded") || took > 8.0)
			fprintf(stderr, "escape %zu (%s): status %d, %.2f s: %s\n", i,
				escapes[i], st, took, out);
		assert_int_not_equal(st, LUA_OK);
		assert_int_equal(rq_lua_sandbox_failure(sb, st), RQ_LUA_SANDBOX_FAIL_BUDGET);
		assert_non_null(strstr(out, "time limit exceeded"));
		assert_true(took < 8.0);
	}
	rq_lua_sandbox_destroy(sb);
}

/* The results of running `return <expr>` in L (or its error), as text:
 * each value with its type, integers and floats apart, so a nil result
 * and no result differ. */
static void describe_run(lua_State *L, const char *expr, char *out, size_t len)
{
	char src[1200];
	snprintf(src, sizeof(src), "return %s", expr);
	struct chunk c = {src, LUA_MULTRET};
	lua_settop(L, 0);
	lua_pushcfunction(L, run_chunk);
	lua_pushlightuserdata(L, &c);
	int st = lua_pcall(L, 1, LUA_MULTRET, 0);
	size_t o = 0;
	out[0] = '\0';
	if (st != LUA_OK) {
		const char *m = lua_tostring(L, -1);
		snprintf(out, len, "error: %s", m ? m : "(not a string)");
		lua_settop(L, 0);
		return;
	}
	int n = lua_gettop(L);
	o += (size_t)snprintf(out + o, len - o, "%d:", n);
	for (int i = 1; i <= n && o < len; i++) {
		switch (lua_type(L, i)) {
		case LUA_TNUMBER:
			if (lua_isinteger(L, i))
				o += (size_t)snprintf(out + o, len - o, " int %lld",
						      (long long)lua_tointeger(L, i));
			else
				o += (size_t)snprintf(out + o, len - o, " float %.17g",
						      lua_tonumber(L, i));
			break;
		case LUA_TSTRING: {
			size_t l;
			const char *v = lua_tolstring(L, i, &l);
			o += (size_t)snprintf(out + o, len - o, " string %zu \"", l);
			for (size_t k = 0; k < l && o + 8 < len; k++)
				o += (size_t)snprintf(out + o, len - o,
						      (unsigned char)v[k] < 0x20 ||
						      (unsigned char)v[k] > 0x7e ? "\\x%02x" : "%c",
						      (unsigned char)v[k]);
			o += (size_t)snprintf(out + o, len - o, "\"");
			break;
		}
		case LUA_TBOOLEAN:
			o += (size_t)snprintf(out + o, len - o, " %s",
					      lua_toboolean(L, i) ? "true" : "false");
			break;
		default:
			o += (size_t)snprintf(out + o, len - o, " %s", luaL_typename(L, i));
			break;
		}
	}
	lua_settop(L, 0);
}

/*
 * The wrapped libraries keep Lua's results: coercions, negative indices,
 * nil and none, errors and their messages. Each call runs in a stock
 * state (luaL_newstate + luaL_openlibs) and in the sandbox, unfrozen and
 * frozen, and must give the same.
 */
static void libraries_as_stock_lua(void **state)
{
	(void)state;
	static const char *const calls[] = {
		/* string.rep: numbers are strings, separators, counts */
		"string.rep(7, 3)", "string.rep('ab', 3, ',')", "string.rep('', 5)",
		"string.rep('', 5, '')", "string.rep('', 3, 0)", "string.rep(0, 2, 1)",
		"string.rep('x', 0)", "string.rep('x', -1)", "string.rep('x', '3')",
		"string.rep('x', 2.0)", "string.rep('x', 2.5)", "string.rep('x')",
		"string.rep()", "string.rep({}, 2)", "('x'):rep(3)", "('x'):rep()",
		"string.rep('x', 3, nil)",
		/* sub, upper, lower, len, reverse, byte, char */
		"string.sub('hello', 2)", "string.sub('hello', -3)", "string.sub('hello', -3, -2)",
		"string.sub('hello', 0)", "string.sub('hello', 10)", "string.sub(12345, 2, 3)",
		"string.sub('hello', 2, 100)", "string.sub('hello', '2', '3')",
		"string.sub('hello', 1.5)", "string.sub()", "('hello'):sub(-2)",
		"string.upper(12)", "string.lower('AbC')", "string.upper()", "string.len(123)",
		"string.len('a\\0b')", "string.reverse(123)", "string.reverse('')",
		"string.byte('ABC')", "string.byte('ABC', 1, -1)", "string.byte('ABC', 10)",
		"string.byte('ABC', -1)", "string.byte(65)", "string.byte('')",
		"string.char(72, 105)", "string.char()", "string.char('65')", "string.char(256)",
		/* format */
		"string.format('%d', 3)", "string.format('%d', '3')", "string.format('%d', 3.0)",
		"string.format('%d', 3.5)", "string.format('%s', 1)", "string.format('%s', nil)",
		"string.format('%5.2f|%-5s|%x', 3.14159, 'ab', 255)", "string.format('%q', 'a\\nb')",
		"string.format('%q', 1/0)", "string.format('%s')", "string.format('%y', 1)",
		"string.format(10)", "string.format('%10s', 'x')", "string.format('%%')",
		"string.format('%s %s', 1, 2.5)", "string.format('%i', 42)",
		"string.format('%c%c', 65, 66)", "string.format('%a', 1)",
		/* find, match, gmatch, gsub */
		"string.find('hello world', 'o w')", "string.find('hello', 'l', -2)",
		"string.find('hello', 'l', -100)", "string.find('hello', 'l', 100)",
		"string.find('hello', '')", "string.find('hello', '', 10)",
		"string.find('hello', '', 6)", "string.find('a.b', '.', 1, true)",
		"string.find('a+b', '+', 1, true)", "string.find(12345, 34)",
		"string.find('hello', '(l)(l)')", "string.find('hello', '()ll()')",
		"string.find('hello', 'x')", "string.find('hello', '[')",
		"string.find('hello', 'l', 1.0)", "string.find('hello', 'l', 1.5)",
		"string.find('hello')", "string.find('hello', 'l', nil, true)",
		"string.find('hello', '^h')", "string.find('hello', '^e', 2)",
		"string.find(('x'):rep(300), '.-y')", "string.find('aaa', 'a-', 2)",
		"string.match('key=val', '(%w+)=(%w+)')", "string.match('hello', '.', -1)",
		"string.match('hello', 'z')", "string.match(2024, '%d%d')",
		"string.match('  x  ', '^%s*(.-)%s*$')", "string.match('hello', '()')",
		"string.match('x', '%')", "string.match('[a]', '%[(.)%]')",
		"string.match('THE (quick) fox', '%((%a+)%)')", "string.match('abc', '%f[%w]%w+')",
		"string.match('hello', 'l', 0)",
		"(function() local r = {} for k, v in string.gmatch('a=1, b=2', '(%w+)=(%w+)') "
		"do r[#r + 1] = k .. v end return table.concat(r, ';') end)()",
		"(function() local r = {} for w in string.gmatch('one two', '%a+') do "
		"r[#r + 1] = w end return #r, r[2] end)()",
		"(function() local n = 0 for w in string.gmatch('abc', '') do n = n + 1 end "
		"return n end)()",
		"(function() local n = 0 for w in string.gmatch(123, '%d') do n = n + w end "
		"return n end)()",
		"string.gsub('hello world', 'o', '0')", "string.gsub('hello', 'l', '%0%0', 1)",
		"string.gsub('hello', '', '-')", "string.gsub('abc', '%w', '%1')",
		"string.gsub('abc', '(%w)', '%2')", "string.gsub('abc', '%w', {a = 1, b = true})",
		"string.gsub('abc', '%w', function(c) if c == 'b' then return nil end "
		"return c:upper() end)", "string.gsub(123, 2, 9)", "string.gsub('abc', 'b', 5)",
		"string.gsub('abc', 'b')", "string.gsub('abc', 'b', '%')",
		"string.gsub('abc', 'b', 'x', 0)", "string.gsub('abc', 'b', 'x', -1)",
		"string.gsub('a b', '%s', '%%')",
		/* table */
		"table.concat({1, 2, 3}, ', ')", "table.concat({1, 2.5, 'x'})",
		"table.concat({1, 2, 3}, '-', 2)", "table.concat({1, 2, 3}, '-', 2, 3)",
		"table.concat({1, 2, 3}, '-', 3, 2)", "table.concat({}, 'x')",
		"table.concat({1, {}, 3})", "table.concat({1, 2}, 0)",
		"table.concat({1, 2, 3}, '', -1, 1)", "table.concat()",
		"table.concat({'a', 'b'}, nil, nil, nil)",
		"(function() local t = {1, 2} table.insert(t, 3) table.insert(t, 1, 0) "
		"return table.concat(t, ',') end)()",
		"(function() local t = {1, 2} table.insert(t, 5, 3) return #t end)()",
		"(function() local t = {1, 2} table.insert(t) end)()",
		"(function() local t = {1, 2} table.insert(t, 1, 2, 3) end)()",
		"(function() local t = {1, 2} table.insert(t, '1', 0) return t[1] end)()",
		"(function() local t = {1, 2, 3} return table.remove(t), #t end)()",
		"(function() local t = {1, 2, 3} return table.remove(t, 1), t[1] end)()",
		"(function() local t = {} return table.remove(t) end)()",
		"(function() local t = {} return select('#', table.remove(t)) end)()",
		"(function() local t = {1} return table.remove(t, 5) end)()",
		"(function() local t = {1} return table.remove(t, 2) end)()",
		"(function() local t = {5, 2, 8, 1} table.sort(t) return table.concat(t, ',') end)()",
		"(function() local t = {5, 2, 8, 1} table.sort(t, function(a, b) return a > b end) "
		"return table.concat(t, ',') end)()",
		"(function() local t = {'b', 'a', 'C'} table.sort(t) return table.concat(t) end)()",
		"(function() local t = {3, 'a'} table.sort(t) end)()",
		"(function() local t = {3, 1, 2} table.sort(t, 5) end)()",
		"(function() local t = {3, 1, 2} table.sort(t, nil) return t[1] end)()",
		"(function() local t = {} for i = 1, 200 do t[i] = (i * 37) % 101 end "
		"table.sort(t, function(a, b) return true end) end)()",
		"table.sort()", "table.sort({})",
		"table.unpack({1, 2, 3})", "table.unpack({1, 2, 3}, 2)",
		"table.unpack({1, 2, 3}, -1, 1)", "table.unpack({1, nil, 3})",
		"table.unpack({}, 1, 3)", "table.unpack({1, 2}, '2')", "table.unpack({}, 1, 1e8)",
		"select('#', table.unpack({}, 3, 1))",
		"table.move({1, 2, 3}, 1, 3, 2)[3]", "#table.move({1, 2, 3}, 1, 3, 1, {})",
		"table.pack(1, nil, 3).n",
		/* math */
		"math.floor(3.7)", "math.floor('3.7')", "math.ceil(-3.5)", "math.max(1, 2.5, -1)",
		"math.min(3)", "math.max()", "math.abs(-3)", "math.abs(math.mininteger)",
		"math.tointeger(3.0)", "math.tointeger('8')", "math.tointeger(3.5)",
		"math.type(1)", "math.type(1.0)", "math.type('1')", "math.fmod(7, 3)",
		"math.fmod(-7, 3)", "math.fmod(7, 0)", "math.fmod(7.0, 0)", "math.sqrt(16)",
		"math.huge", "-math.huge", "math.pi", "math.maxinteger + 1 == math.mininteger",
		"math.ult(1, -1)", "math.modf(3.7)", "math.modf(-3)", "math.exp(0)",
		"math.log(8, 2)", "math.log(100, 10)", "math.log(1)", "7 // 2", "7 / 2",
		"'10' + 1", "'3' * '4'", "'0x10' + 0", "10 // 0.0", "pcall(function() return 1 // 0 end)",
		/* tostring, tonumber */
		"tostring(1)", "tostring(1.0)", "tostring(-0.0)", "tostring(nil)",
		"tostring(true)", "tostring()", "tostring(1e100)", "tostring(2^63)",
		"tonumber('10')", "tonumber('0x1p4')", "tonumber('  12  ')", "tonumber('12a')",
		"tonumber('ff', 16)", "tonumber('zz', 36)", "tonumber('8', 8)", "tonumber(10, 16)",
		"tonumber('10', 1)", "tonumber('')", "tonumber(nil)", "tonumber()",
		"tonumber('1e1')", "tonumber('  -7  ', 10)", "tonumber({})", "tonumber('inf')",
		"tonumber('9007199254740993')",
		/* select, ipairs, pairs */
		"select('#')", "select('#', nil, nil)", "select(2, 'a', 'b', 'c')",
		"select(-1, 'a', 'b', 'c')", "select(-4, 'a', 'b', 'c')", "select(0, 'a')",
		"select(5, 'a')", "select('2', 'a', 'b')",
		"(function() local s = 0 for i, v in ipairs({1, 2, nil, 4}) do s = s + v end "
		"return s end)()",
		"(function() local n = 0 for k, v in pairs({a = 1, b = 2, 3}) do n = n + 1 end "
		"return n end)()",
		"(function() local t = setmetatable({}, {__index = function(t, i) if i < 4 then "
		"return i * 10 end end}) local s = 0 for _, v in ipairs(t) do s = s + v end "
		"return s end)()",
		"ipairs()", "pairs(nil)", "next({})", "next({}, 'x')", "rawequal('a', 'a')",
		"rawequal(('x'):rep(40), ('x'):rep(40))", "rawequal({}, {})", "rawequal(1, 1.0)",
		"rawequal(1)", "rawlen({1, 2})", "rawlen('abc')", "rawget({5}, 1)", "type(nil)",
		"pcall(error)", "pcall(error, nil)", "pcall(error, {}, 2)", "pcall(error, 'm', 0)",
		"pcall(error, 'm')", "pcall(pcall)", "xpcall(error, tostring, 'x')",
		"select('#', pcall(function() end))", "xpcall(1)", "xpcall(error, 1)",
		/* utf8 */
		"utf8.char(72, 228, 8364, 128512)", "utf8.char()", "utf8.char('65')",
		"utf8.len('häé')", "utf8.len('abc', 2)", "utf8.len('abc', -1)",
		"utf8.len('\\xff')", "utf8.len('abc', 5)", "utf8.len(12345)",
		"utf8.codepoint('häé', 1, -1)", "utf8.codepoint('abc', 4)",
		"utf8.codepoint('\\xff')", "utf8.offset('häé', 3)", "utf8.offset('häé', -1)",
		"utf8.offset('abc', 5)", "utf8.offset('häé', 0, 3)", "utf8.charpattern",
		"(function() local r = {} for p, c in utf8.codes('hä') do r[#r + 1] = p .. ':' .. c "
		"end return table.concat(r, ' ') end)()",
		/* strings through their metatable */
		"('%d items'):format(3)", "('a,b'):find(',', 1, true)", "#('abc'):rep(2)",
		"('x'):len()", "('abc'):byte(-1)",
	};
	lua_State *stock = luaL_newstate();
	assert_non_null(stock);
	luaL_openlibs(stock);
	struct rq_lua_sandbox *sb = make(0);
	lua_State *L = rq_lua_sandbox_state(sb);
	char want[1200], got[1200];
	size_t bad = 0;
	for (int frozen = 0; frozen < 2; frozen++) {
		if (frozen) {
			rq_lua_sandbox_arm(sb, 1000000, 5.0);
			assert_int_equal(rq_lua_sandbox_freeze(sb, NULL), 0);
		}
		for (size_t i = 0; i < sizeof(calls) / sizeof(calls[0]); i++) {
			describe_run(stock, calls[i], want, sizeof(want));
			rq_lua_sandbox_arm(sb, 1000000, 5.0);
			describe_run(L, calls[i], got, sizeof(got));
			if (strcmp(want, got) != 0) {
				fprintf(stderr, "%s%s\n  stock:   %s\n  sandbox: %s\n",
					calls[i], frozen ? " (frozen)" : "", want, got);
				bad++;
			}
		}
	}
	assert_int_equal(bad, 0);
	rq_lua_sandbox_destroy(sb);
	lua_close(stock);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(budget_stops_endless_loop),
		cmocka_unit_test(memory_cap),
		cmocka_unit_test(frozen_libraries),
		cmocka_unit_test(absent_libraries),
		cmocka_unit_test(print_bounded),
		cmocka_unit_test(no_escape_while_handling_errors),
		cmocka_unit_test(time_limit_sticky),
		cmocka_unit_test(libraries_as_stock_lua),
	};
	return cmocka_run_group_tests(tests, setup, teardown);
}

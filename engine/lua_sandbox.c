/*
 * lua_sandbox: a Lua state for untrusted code, with an instruction
 * budget, a memory cap, a wall-clock backstop, wrapped (paying) and
 * frozen libraries. Knows nothing of mail.
 *
 * Every Lua call from C goes through one lua_pcall of a C function (so an
 * allocation failure while building arguments is an error, never a
 * panic); the count hook stays installed for the life of the state, and
 * its budget is reset by rq_lua_sandbox_arm before each entry.
 *
 * Nothing a script does may run outside that budget:
 * - finalizers run with hooks off: setmetatable refuses __gc (objects are
 *   marked for finalization only by setmetatable, and scripts reach no
 *   other way to set a metatable); __close runs with the hook on;
 * - C library functions are wrapped and pay for their work ("bounded C
 *   work"); allocations pay in lalloc;
 * - single instructions that work on long operands without allocating
 *   (== / < on long strings, calls with many varargs) are caught by a
 *   wall-clock limit checked in the hook (HOOK_EVERY is small so one
 *   hook interval stays short) and in every charge of C work;
 * - message handlers: Lua runs them with hooks off after an error raised
 *   by the hook, so the script's xpcall handler is wrapped and skipped
 *   once the run is exhausted ("error handling after exhaustion").
 * rq_lua_sandbox_freeze makes the libraries, the string metatable and the
 * globals read-only so one run cannot change what the next one sees.
 */
#include "relayq/lua_sandbox.h"

#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

#include "relayq/clock.h"
#include "relayq/err.h"
#include "relayq/log.h"

#define HOOK_EVERY 100
/* What C work costs, in instruction-budget steps (see "bounded C work"). */
#define ALLOC_BYTES_PER_STEP 256   /* allocation */
#define SCAN_BYTES_PER_STEP 16     /* string arguments read by a library call */
#define MATCH_PER_STEP 4           /* pattern matcher steps */
#define ELEMS_PER_STEP 1           /* table elements visited by table.* */
#define CMP_STEPS 2                /* a comparison of table.sort through sort_cmp */
#define CMP_BYTES_PER_STEP 64      /* bytes two strings compared may read (memcmp, strcoll) */
#define FROZEN_KEY "sandbox.frozen"       /* registry: read-only table -> true */
#define STRMT_KEY "sandbox.string_mt"     /* registry: the string metatable's fields */
#define SETUP_SECONDS 10.0

struct rq_lua_sandbox {
	lua_State *L;
	size_t mem_used, mem_cap, mem_peak;
	unsigned long steps, budget;
	int64_t deadline_ms;         /* monotonic clock */
	double seconds;              /* the limit armed */
	size_t alloc_acc;            /* bytes allocated not yet charged */
	double frac;                 /* fractions of a step charged */
	bool mem_hit, budget_hit;    /* budget_hit: budget or time, sticky */
	bool time_hit;               /* the deadline passed (sticky) */
	bool budget_alloc_failed;    /* the last failed allocation: budget, not cap */
	char print_event[64];
};

/* ---- allocator and budget ---- */

static void hook(lua_State *L, lua_Debug *ar);

static void *lalloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
	struct rq_lua_sandbox *sb = ud;
	size_t old = ptr ? osize : 0;
	if (nsize == 0) {
		free(ptr);
		sb->mem_used -= old;
		return NULL;
	}
	if (nsize > old) {
		size_t grow = nsize - old;
		if (grow > sb->mem_cap || sb->mem_used + grow > sb->mem_cap) {
			sb->mem_hit = true;
			sb->budget_alloc_failed = false;
			return NULL;
		}
		/* Allocation pays steps: work proportional to bytes (copies,
		 * the collector) is bounded by the budget too. Once the
		 * budget is gone, allocations are free so the error and its
		 * traceback can be built; every instruction fails from then. */
		if (!sb->budget_hit) {
			sb->alloc_acc += grow;
			sb->steps += sb->alloc_acc / ALLOC_BYTES_PER_STEP;
			sb->alloc_acc %= ALLOC_BYTES_PER_STEP;
			if (sb->steps > sb->budget) {
				sb->budget_hit = true;
				sb->budget_alloc_failed = true;
				if (sb->L)
					lua_sethook(sb->L, hook, LUA_MASKCOUNT, 1);
				return NULL;
			}
		}
	}
	void *p = realloc(ptr, nsize);
	if (!p)
		return NULL;
	sb->mem_used = sb->mem_used - old + nsize;
	if (sb->mem_used > sb->mem_peak)
		sb->mem_peak = sb->mem_used;
	return p;
}

static struct rq_lua_sandbox *owner(lua_State *L)
{
	void *ud = NULL;
	lua_getallocf(L, &ud);
	return ud;
}

/*
 * Raises the budget error at the function `level` (0: the running Lua
 * function, in the hook; 1: the caller of a C function). From now on
 * every instruction fails, so a pcall in the script cannot swallow the
 * error and keep going. what (may be NULL) says what ran out.
 */
static int budget_error(lua_State *L, int level, const char *what)
{
	struct rq_lua_sandbox *sb = owner(L);
	sb->budget_hit = true;
	lua_sethook(L, hook, LUA_MASKCOUNT, 1);
	luaL_where(L, level);
	lua_pushfstring(L, "instruction budget exceeded (%I instructions)%s%s",
			(lua_Integer)sb->budget, what ? ": " : "", what ? what : "");
	lua_concat(L, 2);
	return lua_error(L);
}

/* Raises the time-limit error (sticky, like the budget one). */
static int time_error(lua_State *L, int level)
{
	struct rq_lua_sandbox *sb = owner(L);
	sb->budget_hit = true;
	sb->time_hit = true;
	lua_sethook(L, hook, LUA_MASKCOUNT, 1);
	luaL_where(L, level);
	lua_pushfstring(L, "time limit exceeded (%f s)", sb->seconds);
	lua_concat(L, 2);
	return lua_error(L);
}

/*
 * Every HOOK_EVERY instructions (every instruction once the run is
 * exhausted). Besides the budget, a wall-clock limit as a backstop: some
 * single instructions do work proportional to their operands without
 * allocating (== and < on two long strings), so a loop of them could
 * take minutes within the instruction budget.
 */
static void hook(lua_State *L, lua_Debug *ar)
{
	(void)ar;
	struct rq_lua_sandbox *sb = owner(L);
	if (sb->time_hit)
		time_error(L, 0);
	sb->steps += HOOK_EVERY;
	if (sb->steps > sb->budget || sb->budget_hit)
		budget_error(L, 0, NULL);
	if (rq_clock_mono_coarse_ms() > sb->deadline_ms)
		time_error(L, 0);
}

/*
 * Charges cost steps of work a C function is about to do (called from a
 * C function); raises the budget error instead when they are not left,
 * or the time-limit error when the deadline has passed (C functions
 * that charge as they go, like the comparisons of table.sort, are held
 * to the wall clock too). Fractions of a step add up.
 */
void rq_lua_sandbox_charge(lua_State *L, double cost, const char *what)
{
	struct rq_lua_sandbox *sb = owner(L);
	if (sb->time_hit)
		time_error(L, 1);
	if (sb->budget_hit || sb->steps >= sb->budget ||
	    !(cost <= (double)(sb->budget - sb->steps)))
		budget_error(L, 1, what);
	if (rq_clock_mono_coarse_ms() > sb->deadline_ms)
		time_error(L, 1);
	sb->frac += cost;
	double whole = floor(sb->frac);
	sb->frac -= whole;
	sb->steps += (unsigned long)whole;
}

/* True once the run is exhausted (budget or time): nothing of the
 * script may run any more, and no pcall may catch the error. */
static bool exhausted(lua_State *L)
{
	return owner(L)->budget_hit;
}

static double budget_left(lua_State *L)
{
	struct rq_lua_sandbox *sb = owner(L);
	return sb->steps >= sb->budget ? 0 : (double)(sb->budget - sb->steps);
}

void rq_lua_sandbox_arm(struct rq_lua_sandbox *sb, unsigned long budget, double seconds)
{
	sb->seconds = seconds;
	sb->deadline_ms = rq_clock_mono_coarse_ms() + (int64_t)(seconds * 1000);
	sb->steps = 0;
	sb->alloc_acc = 0;
	sb->frac = 0;
	sb->budget = budget;
	sb->budget_hit = false;
	sb->time_hit = false;
	sb->mem_hit = false;
	sb->budget_alloc_failed = false;
	lua_sethook(sb->L, hook, LUA_MASKCOUNT, HOOK_EVERY);
}

static int panic(lua_State *L)
{
	const char *m = lua_tostring(L, -1);
	rq_log(RQ_LOG_ERROR, "lua_panic", "error", m ? m : "?", NULL);
	abort();
}

int rq_lua_sandbox_caller_line(lua_State *L)
{
	lua_Debug ar;
	if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "l", &ar) && ar.currentline > 0)
		return ar.currentline;
	return 0;
}

void rq_lua_sandbox_error_text(lua_State *L, int idx, char *out, size_t len)
{
	size_t n = 0;
	const char *m = lua_type(L, idx) == LUA_TSTRING ? lua_tolstring(L, idx, &n) : NULL;
	if (!m) {
		snprintf(out, len, "(error object is a %s value)", luaL_typename(L, idx));
		return;
	}
	if (n >= len)
		n = len - 1;
	memcpy(out, m, n);
	out[n] = '\0';
	for (char *c = out; *c; c++)
		if (*c == '\r')
			*c = ' ';
}

int rq_lua_sandbox_traceback(lua_State *L)
{
	const char *m = lua_tostring(L, 1);
	if (!m)
		m = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
	luaL_traceback(L, L, m, 1);
	return 1;
}

/* ---- sandbox ---- */

/* Each line logged costs PRINT_STEPS, so a loop cannot flood the log. */
#define PRINT_STEPS 1000
#define PRINT_ARG_MAX 1024      /* bytes of one argument logged */

static int l_print(lua_State *L)
{
	rq_lua_sandbox_charge(L, PRINT_STEPS, "print");
	luaL_Buffer b;
	int n = lua_gettop(L);
	luaL_buffinit(L, &b);
	for (int i = 1; i <= n; i++) {
		/* Only luaL_addvalue may run with a value above the buffer: a
		 * growing buffer moves to the top of the stack. */
		if (i > 1)
			luaL_addchar(&b, '\t');
		size_t len;
		const char *s = luaL_tolstring(L, i, &len);
		if (len > PRINT_ARG_MAX) {
			lua_pushlstring(L, s, PRINT_ARG_MAX);
			lua_replace(L, -2);
		}
		luaL_addvalue(&b);
	}
	luaL_pushresult(&b);
	rq_log(RQ_LOG_INFO, owner(L)->print_event, "text", lua_tostring(L, -1), NULL);
	return 0;
}

static int l_reader(lua_State *L);

/* load: text chunks only (upvalue 1: the base library's load). */
static int l_load(lua_State *L)
{
	int n = lua_gettop(L);
	if (n >= 3 && !lua_isnil(L, 3)) {
		const char *mode = luaL_checkstring(L, 3);
		if (strcmp(mode, "t") != 0) {
			lua_pushnil(L);
			lua_pushstring(L, "load: only text chunks (mode \"t\") are allowed");
			return 2;
		}
	}
	if (lua_type(L, 1) == LUA_TSTRING) {
		rq_lua_sandbox_charge(L, 1 + (double)lua_rawlen(L, 1) / SCAN_BYTES_PER_STEP,
		       "load of a long chunk");
	} else if (lua_type(L, 1) == LUA_TFUNCTION) {
		lua_pushvalue(L, 1);
		lua_pushcclosure(L, l_reader, 1);
		lua_replace(L, 1);
	}
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_pushvalue(L, 1);
	if (n >= 2)
		lua_pushvalue(L, 2);
	else
		lua_pushnil(L);
	lua_pushliteral(L, "t");
	int args = 3;
	if (n >= 4) {
		lua_pushvalue(L, 4);
		args = 4;
	}
	lua_call(L, args, 2);
	/* The reader runs protected: an exhausted run goes on out. */
	if (lua_isnil(L, -2) && owner(L)->budget_hit) {
		lua_pushvalue(L, -1);
		lua_error(L);
	}
	return 2;
}

static int l_collectgarbage(lua_State *L)
{
	const char *opt = luaL_optstring(L, 1, "collect");
	if (strcmp(opt, "count") == 0) {
		int kb = lua_gc(L, LUA_GCCOUNT);
		int b = lua_gc(L, LUA_GCCOUNTB);
		lua_pushnumber(L, (lua_Number)kb + (lua_Number)b / 1024);
		return 1;
	}
	if (strcmp(opt, "collect") == 0 || strcmp(opt, "step") == 0) {
		/* A collection visits the whole heap. */
		rq_lua_sandbox_charge(L, 1 + (double)owner(L)->mem_used / ALLOC_BYTES_PER_STEP,
		       "collectgarbage");
		lua_gc(L, strcmp(opt, "collect") == 0 ? LUA_GCCOLLECT : LUA_GCSTEP, 0);
		lua_pushinteger(L, 0);
		return 1;
	}
	return luaL_error(L, "collectgarbage(\"%s\") is not allowed in a policy", opt);
}

/* ---- bounded C work ----
 *
 * The count hook only sees Lua instructions; library functions written in
 * C run to completion. So every library C function of the sandbox is
 * wrapped (wrapped(): upvalue 1 the original, upvalue 2 a wrap_kind) and
 * pays steps before it runs, from the same budget:
 * - allocation: 1 step per ALLOC_BYTES_PER_STEP bytes (in lalloc), which
 *   bounds copies (string.rep, .., gsub output) and the collector;
 * - string arguments: 1 step per SCAN_BYTES_PER_STEP bytes (utf8.len,
 *   tonumber(s, 16), string arithmetic, load of a long chunk);
 * - table.concat / insert / remove / unpack / move / sort: the elements
 *   they will visit, ELEMS_PER_STEP per step; sort pays per comparison
 *   through sort_cmp (CMP_STEPS, plus CMP_BYTES_PER_STEP for two strings:
 *   the library's compare reads them without a hook), except a sort of
 *   numbers only with the library's < (n log n upfront); this
 *   also bounds loops over nils that allocate nothing (table.move);
 * - string.find / match / gmatch / gsub: an upper bound of the backtracking
 *   matcher's steps (pattern_cost), MATCH_PER_STEP per step. A quantified
 *   item (*, +, -) can try at most "the longest run of its class in the
 *   subject" + 1 lengths, ? two, and the matcher starts once per subject
 *   position unless anchored. The bound multiplies these; a pattern whose
 *   bound is beyond the budget fails with the budget error before it
 *   runs. When a find / match that is not anchored does not fit as a
 *   whole, it is run one start position at a time (anchored), paying as
 *   it goes, so an early match on a long subject still works.
 * - string.rep of an empty string and separator returns "" at once (the
 *   library would loop n times without allocating).
 */

enum wrap_kind {
	W_SCAN = 0, W_FIND, W_MATCH, W_GMATCH, W_GSUB, W_REP,
	W_CONCAT, W_INSERT, W_REMOVE, W_SORT, W_UNPACK, W_MOVE, W_RAWEQUAL,
};

/*
 * Runs the original (upvalue 1) on the arguments at 1..top, in the
 * wrapper's own call frame: the library's error messages then name the
 * function as the script called it ("bad argument #1 to 'rep'", method
 * calls counted as Lua counts them) and carry the script's line, exactly
 * as without the wrapper. The library functions wrapped use no upvalues
 * of their own. Returns the number of results at the top.
 */
static int call_orig(lua_State *L)
{
	lua_CFunction f = lua_tocfunction(L, lua_upvalueindex(1));
	if (f)
		return f(L);
	int n = lua_gettop(L);
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_insert(L, 1);
	lua_call(L, n, LUA_MULTRET);
	return lua_gettop(L);
}

static bool class_is(int c, int cl)
{
	int r;
	switch (tolower(cl)) {
	case 'a': r = isalpha(c); break;
	case 'c': r = iscntrl(c); break;
	case 'd': r = isdigit(c); break;
	case 'g': r = isgraph(c); break;
	case 'l': r = islower(c); break;
	case 'p': r = ispunct(c); break;
	case 's': r = isspace(c); break;
	case 'u': r = isupper(c); break;
	case 'w': r = isalnum(c); break;
	case 'x': r = isxdigit(c); break;
	default: return cl == c;
	}
	if (isupper(cl))
		r = !r;
	return r != 0;
}

/* [set] at p, ec at its closing ']'. */
static bool in_set(int c, const char *p, const char *ec)
{
	bool neg = false;
	p++;
	if (*p == '^') {
		neg = true;
		p++;
	}
	for (; p < ec; p++) {
		if (*p == '%' && p + 1 < ec) {
			p++;
			if (class_is(c, (unsigned char)*p))
				return !neg;
		} else if (p + 2 < ec && p[1] == '-') {
			if ((unsigned char)p[0] <= c && c <= (unsigned char)p[2])
				return !neg;
			p += 2;
		} else if ((unsigned char)*p == c) {
			return !neg;
		}
	}
	return neg;
}

/* The end of the single-character class at p; NULL when malformed. */
static const char *class_end(const char *p, const char *end)
{
	if (*p == '%')
		return p + 1 < end ? p + 2 : NULL;
	if (*p != '[')
		return p + 1;
	p++;
	if (p < end && *p == '^')
		p++;
	for (;;) {
		if (p >= end)
			return NULL;
		char c = *p++;
		if (c == '%' && p < end)
			p++;
		if (p < end && *p == ']')
			return p + 1;
	}
}

static bool class_has(int c, const char *p, const char *ep)
{
	switch (*p) {
	case '.': return true;
	case '%': return class_is(c, (unsigned char)p[1]);
	case '[': return in_set(c, p, ep - 1);
	default: return (unsigned char)*p == c;
	}
}

static size_t max_run(const char *s, size_t n, const char *p, const char *ep)
{
	if (*p == '.')
		return n;
	size_t best = 0, cur = 0;
	for (size_t i = 0; i < n; i++) {
		if (class_has((unsigned char)s[i], p, ep)) {
			if (++cur > best)
				best = cur;
		} else {
			cur = 0;
		}
	}
	return best;
}

#define COST_HUGE 1e30
#define RUN_SCAN_MAX 4e6  /* class tests spent finding runs, per call */

/*
 * An upper bound of the matcher's steps for ONE start position of pattern
 * p on subject s (see above). *anchored: p starts with '^' (when
 * anchor_ok). *scan: the work of computing it (one pass per quantifier).
 * A malformed pattern fails when the matcher reaches the bad item, so
 * the bound is what comes before it.
 */
static double pattern_cost(const char *s, size_t n, const char *p, size_t plen,
			   bool anchor_ok, bool *anchored, double *scan)
{
	const char *end = p + plen;
	double mult = 1, cost = 0;
	*anchored = false;
	*scan = 0;
	if (anchor_ok && p < end && *p == '^') {
		*anchored = true;
		p++;
	}
	while (p < end) {
		if (cost > COST_HUGE)
			return COST_HUGE;
		cost += mult;
		switch (*p) {
		case '(':
		case ')':
			p++;
			continue;
		case '$':
			if (p + 1 == end) {
				p++;
				continue;
			}
			break;
		case '%':
			if (p + 1 < end && p[1] == 'b') {
				if (p + 3 >= end)
					return cost;
				cost += mult * (double)n;
				p += 4;
				continue;
			}
			if (p + 1 < end && p[1] == 'f') {
				p += 2;
				if (p >= end || *p != '[')
					return cost;
				const char *e = class_end(p, end);
				if (!e)
					return cost;
				p = e;
				continue;
			}
			if (p + 1 < end && isdigit((unsigned char)p[1])) {
				cost += mult * (double)n;
				p += 2;
				continue;
			}
			break;
		default:
			break;
		}
		const char *e = class_end(p, end);
		if (!e)
			return cost;
		/* Testing a character against [set] reads the set. */
		double width = (double)(e - p);
		char q = e < end ? *e : '\0';
		if (q == '*' || q == '+' || q == '-') {
			/* The longest run, unless finding it costs too much
			 * itself: then the whole subject. */
			double r = (double)n + 1;
			if (*scan + (double)n * width <= RUN_SCAN_MAX) {
				r = (double)max_run(s, n, p, e) + 1;
				*scan += (double)n * width;
			}
			cost += mult * r * width;
			mult *= r;
			p = e + 1;
		} else if (q == '?') {
			cost += mult * width;
			mult *= 2;
			p = e + 1;
		} else {
			cost += mult * width;
			p = e;
		}
	}
	cost += mult;
	return cost > COST_HUGE ? COST_HUGE : cost;
}

static bool has_specials(const char *p, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if (strchr("^$*+?.([%-", p[i]) && p[i] != '\0')
			return true;
	return false;
}

static const char *const pat_fn[] = {
	[W_FIND] = "string.find", [W_MATCH] = "string.match",
	[W_GMATCH] = "string.gmatch", [W_GSUB] = "string.gsub",
};

static void too_complex(lua_State *L, enum wrap_kind kind, double cost, size_t n,
			char *msg, size_t len)
{
	(void)L;
	snprintf(msg, len, "%s: the pattern may take up to %.3g matching steps on a "
		 "subject of %zu bytes", pat_fn[kind], cost, n);
}

/* string.find and string.match. */
static int l_find(lua_State *L, enum wrap_kind kind)
{
	if (!lua_isstring(L, 1) || !lua_isstring(L, 2))
		return call_orig(L);
	size_t n, m;
	const char *s = lua_tolstring(L, 1, &n);
	const char *p = lua_tolstring(L, 2, &m);
	lua_Integer init = 1;
	if (!lua_isnoneornil(L, 3)) {
		int ok;
		init = lua_tointegerx(L, 3, &ok);
		if (!ok)
			return call_orig(L);
	}
	/* The library's rule for init (1-based, negative from the end). */
	size_t i0;
	if (init > 0)
		i0 = (size_t)init - 1;
	else if (init == 0 || (init < 0 && (lua_Unsigned)-(init + 1) >= n))
		i0 = 0;
	else
		i0 = n - (size_t)-init;
	if (i0 > n)
		return call_orig(L);  /* no match, at once */
	char msg[200];
	if (kind == W_FIND && (lua_toboolean(L, 4) || !has_specials(p, m))) {
		/* A plain search: at most (n - m + 1) * m byte compares. */
		double span = (double)(n - i0);
		double cost = 1 + span / SCAN_BYTES_PER_STEP;
		if (m > 0 && (double)m <= span)
			cost += (span - (double)m + 1) * (double)m / SCAN_BYTES_PER_STEP;
		snprintf(msg, sizeof(msg), "string.find: plain search of %zu bytes in %zu",
			 m, n);
		rq_lua_sandbox_charge(L, cost, msg);
		return call_orig(L);
	}
	bool anchored;
	double scan;
	double per = pattern_cost(s, n, p, m, true, &anchored, &scan);
	double tries = anchored ? 1 : (double)(n - i0 + 1);
	double whole = 1 + scan / SCAN_BYTES_PER_STEP + tries * per / MATCH_PER_STEP;
	if (anchored || whole <= budget_left(L)) {
		too_complex(L, kind, tries * per, n, msg, sizeof(msg));
		rq_lua_sandbox_charge(L, whole, msg);
		return call_orig(L);
	}
	/* One start position at a time, anchored, paying per attempt. */
	too_complex(L, kind, per, n, msg, sizeof(msg));
	rq_lua_sandbox_charge(L, 1 + scan / SCAN_BYTES_PER_STEP, msg);
	luaL_Buffer b;
	luaL_buffinit(L, &b);
	luaL_addchar(&b, '^');
	luaL_addlstring(&b, p, m);
	luaL_pushresult(&b);
	int pat = lua_gettop(L);
	for (size_t i = i0; i <= n; i++) {
		rq_lua_sandbox_charge(L, 1 + per / MATCH_PER_STEP, msg);
		lua_settop(L, pat);
		lua_pushvalue(L, lua_upvalueindex(1));
		lua_pushvalue(L, 1);
		lua_pushvalue(L, pat);
		lua_pushinteger(L, (lua_Integer)i + 1);
		lua_call(L, 3, LUA_MULTRET);
		if (!lua_isnil(L, pat + 1))
			return lua_gettop(L) - pat;
	}
	lua_settop(L, pat);
	lua_pushnil(L);
	return 1;
}

/* string.gmatch (all the iterations) and string.gsub. */
static void charge_pattern(lua_State *L, enum wrap_kind kind)
{
	if (!lua_isstring(L, 1) || !lua_isstring(L, 2))
		return;
	size_t n, m;
	const char *s = lua_tolstring(L, 1, &n);
	const char *p = lua_tolstring(L, 2, &m);
	bool anchored;
	double scan;
	/* gmatch has no anchor: a leading '^' is a plain character. */
	double per = pattern_cost(s, n, p, m, kind == W_GSUB, &anchored, &scan);
	/* After an empty match the same position is tried again. */
	double tries = anchored ? 1 : 2 * ((double)n + 1);
	/* A replacement string is read once per match ("%1%1..." with
	 * empty captures reads without producing anything). */
	double repl = kind == W_GSUB && lua_type(L, 3) == LUA_TSTRING ?
		tries * (double)lua_rawlen(L, 3) : 0;
	char msg[200];
	too_complex(L, kind, tries * per, n, msg, sizeof(msg));
	rq_lua_sandbox_charge(L, 1 + (scan + repl) / SCAN_BYTES_PER_STEP + tries * per / MATCH_PER_STEP,
	       msg);
}

#ifdef LUAI_MAXSTACK
#define UNPACK_MAX ((double)LUAI_MAXSTACK)
#else
#define UNPACK_MAX 1e6
#endif

/* The number of elements from i to j (0 when j < i). */
static double span_of(lua_Integer i, lua_Integer j)
{
	return j < i ? 0 : (double)j - (double)i + 1;
}

/* luaL_len for charging; false when the original should report the error. */
static bool table_len(lua_State *L, int idx, lua_Integer *len)
{
	if (lua_type(L, idx) != LUA_TTABLE)
		return false;
	*len = luaL_len(L, idx);
	return true;
}

static bool opt_int(lua_State *L, int idx, lua_Integer def, lua_Integer *out)
{
	if (lua_isnoneornil(L, idx)) {
		*out = def;
		return true;
	}
	int ok;
	*out = lua_tointegerx(L, idx, &ok);
	return ok;
}

/* Elements 1..len of the table at idx are all numbers (raw reads). */
static bool all_numbers(lua_State *L, int idx, lua_Integer len)
{
	for (lua_Integer i = 1; i <= len; i++) {
		int t = lua_rawgeti(L, idx, i);
		lua_pop(L, 1);
		if (t != LUA_TNUMBER)
			return false;
	}
	return true;
}

static void charge_table(lua_State *L, enum wrap_kind kind)
{
	lua_Integer len = 0, i, j;
	double elems = 0;
	const char *what = "table function";
	switch (kind) {
	case W_CONCAT:
	case W_UNPACK: {
		int first = kind == W_CONCAT ? 3 : 2;
		what = kind == W_CONCAT ? "table.concat" : "table.unpack";
		if (lua_type(L, 1) != LUA_TTABLE || !opt_int(L, first, 1, &i))
			return;
		if (lua_isnoneornil(L, first + 1)) {
			if (!table_len(L, 1, &j))
				return;
		} else if (!opt_int(L, first + 1, 0, &j)) {
			return;
		}
		elems = span_of(i, j);
		/* More results than a stack holds: the library refuses them
		 * before it reads any. */
		if (kind == W_UNPACK && elems >= UNPACK_MAX)
			return;
		break;
	}
	case W_INSERT:
	case W_REMOVE:
		what = kind == W_INSERT ? "table.insert" : "table.remove";
		if (!table_len(L, 1, &len))
			return;
		elems = len > 0 ? (double)len : 0;
		break;
	case W_SORT:
		/* The comparisons pay as they go (sort_cmp), except those of
		 * numbers only with the library's < (constant time): the
		 * elements are read once to know, then n log n compares. */
		what = "table.sort";
		if (!table_len(L, 1, &len))
			return;
		elems = len > 0 ? (double)len : 0;
		if (lua_isnoneornil(L, 2) && len > 1 && all_numbers(L, 1, len))
			elems += (double)len * (log2((double)len) + 1);
		break;
	case W_MOVE:
		what = "table.move";
		if (!opt_int(L, 2, 0, &i) || !opt_int(L, 3, 0, &j))
			return;
		elems = span_of(i, j);
		break;
	default:
		return;
	}
	char msg[120];
	snprintf(msg, sizeof(msg), "%s over %.3g elements", what, elems);
	rq_lua_sandbox_charge(L, 1 + elems / ELEMS_PER_STEP, msg);
}

/* 1 step, plus the bytes of the string arguments. */
static void charge_scan(lua_State *L)
{
	double bytes = 0;
	int n = lua_gettop(L);
	for (int i = 1; i <= n; i++)
		if (lua_type(L, i) == LUA_TSTRING)
			bytes += (double)lua_rawlen(L, i);
	rq_lua_sandbox_charge(L, 1 + bytes / SCAN_BYTES_PER_STEP, "reading long strings");
}

/*
 * The comparison table.sort calls (upvalue 1: the script's comparator,
 * or nil for the library's <). Pays for each call, CMP_STEPS (the
 * compare and its share of the moves) plus, for two strings, the
 * bytes a compare may read; the charge also checks the clock, so one
 * sort call cannot run past the time limit whatever it compares.
 */
static int sort_cmp(lua_State *L)
{
	double cost = CMP_STEPS;
	if (lua_type(L, 1) == LUA_TSTRING && lua_type(L, 2) == LUA_TSTRING) {
		size_t a = lua_rawlen(L, 1), b = lua_rawlen(L, 2);
		cost += (double)(a < b ? a : b) / CMP_BYTES_PER_STEP;
	}
	rq_lua_sandbox_charge(L, cost, "table.sort comparisons");
	if (lua_isnil(L, lua_upvalueindex(1))) {
		lua_pushboolean(L, lua_compare(L, 1, 2, LUA_OPLT));
		return 1;
	}
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_insert(L, 1);
	lua_call(L, lua_gettop(L) - 1, 1);
	return 1;
}

/* rawequal reads two long strings of the same length (not the same
 * object) to compare them. */
static void charge_rawequal(lua_State *L)
{
	double cost = 1;
	if (lua_type(L, 1) == LUA_TSTRING && lua_type(L, 2) == LUA_TSTRING &&
	    lua_rawlen(L, 1) == lua_rawlen(L, 2) && lua_topointer(L, 1) != lua_topointer(L, 2))
		cost += (double)lua_rawlen(L, 1) / CMP_BYTES_PER_STEP;
	rq_lua_sandbox_charge(L, cost, "rawequal of long strings");
}

/* An empty string (not a number: its text is never empty). */
static bool empty_string(lua_State *L, int idx)
{
	return lua_type(L, idx) == LUA_TSTRING && lua_rawlen(L, idx) == 0;
}

static int wrapped(lua_State *L)
{
	enum wrap_kind kind = (enum wrap_kind)lua_tointeger(L, lua_upvalueindex(2));
	switch (kind) {
	case W_FIND:
	case W_MATCH:
		return l_find(L, kind);
	case W_GMATCH:
	case W_GSUB:
		charge_pattern(L, kind);
		break;
	case W_REP: {
		lua_Integer n;
		if (empty_string(L, 1) && opt_int(L, 2, 0, &n) && n > 0 &&
		    (lua_isnoneornil(L, 3) || empty_string(L, 3))) {
			lua_pushliteral(L, "");
			return 1;
		}
		charge_scan(L);
		break;
	}
	case W_SORT:
		charge_table(L, kind);
		/* Every comparison goes through sort_cmp; a comparator that
		 * is not a function is left for the library to refuse. */
		if (lua_type(L, 1) == LUA_TTABLE &&
		    (lua_type(L, 2) == LUA_TFUNCTION ||
		     (lua_isnoneornil(L, 2) && !all_numbers(L, 1, luaL_len(L, 1))))) {
			lua_settop(L, 2);
			lua_pushcclosure(L, sort_cmp, 1);
		}
		break;
	case W_RAWEQUAL:
		charge_rawequal(L);
		break;
	case W_CONCAT:
	case W_INSERT:
	case W_REMOVE:
	case W_UNPACK:
	case W_MOVE:
		charge_table(L, kind);
		break;
	default:
		charge_scan(L);
		break;
	}
	return call_orig(L);
}

static enum wrap_kind kind_of(const char *lib, const char *name)
{
	static const struct {
		const char *lib, *name;
		enum wrap_kind kind;
	} map[] = {
		{"string", "find", W_FIND}, {"string", "match", W_MATCH},
		{"string", "gmatch", W_GMATCH}, {"string", "gsub", W_GSUB},
		{"string", "rep", W_REP}, {"table", "concat", W_CONCAT},
		{"table", "insert", W_INSERT}, {"table", "remove", W_REMOVE},
		{"table", "sort", W_SORT}, {"table", "unpack", W_UNPACK},
		{"table", "move", W_MOVE},
	};
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
		if (strcmp(map[i].lib, lib) == 0 && strcmp(map[i].name, name) == 0)
			return map[i].kind;
	return W_SCAN;
}

/* Pushes a copy of the table at idx with its C functions wrapped. */
static void wrap_table(lua_State *L, int idx, const char *lib)
{
	idx = lua_absindex(L, idx);
	lua_newtable(L);
	lua_pushnil(L);
	while (lua_next(L, idx)) {
		if (lua_iscfunction(L, -1) && lua_type(L, -2) == LUA_TSTRING) {
			lua_pushinteger(L, kind_of(lib, lua_tostring(L, -2)));
			lua_pushcclosure(L, wrapped, 2);
		}
		lua_pushvalue(L, -2);
		lua_insert(L, -2);
		lua_rawset(L, -4);
	}
}

/* ---- error handling after exhaustion ----
 *
 * Once a run is exhausted (budget or time, budget_hit) nothing of the
 * script may run again, and no script code may stop the error on its
 * way out to the caller of the run:
 * - the hook raises again before every instruction, the charge of every
 *   wrapped C function raises at once (sticky exhaustion);
 * - pcall, xpcall and load (whose reader runs protected) raise the error
 *   again instead of returning it;
 * - a message handler given to xpcall never runs after exhaustion. Lua
 *   calls message handlers inside luaG_errormsg; when the error came from
 *   the hook, hooks are still off then (luaD_hook restores allowhook only
 *   when the hook returns), so a handler that loops would never be
 *   stopped. The script's handler is wrapped (xpcall_handler) and skipped
 *   once the run is exhausted: the error passes through unchanged.
 * The other places where Lua runs while an error is handled: __close
 * (runs with the hook on, and fails at its first instruction after
 * exhaustion), __gc (refused by setmetatable), __tostring of an error
 * value (only print / tostring / string.format call it: script code on
 * the hook), coroutines (not in the sandbox).
 */

/* Raises the error at idx again when the run is exhausted. */
static void rethrow_if_exhausted(lua_State *L, int idx)
{
	if (!exhausted(L))
		return;
	lua_pushvalue(L, idx);
	lua_error(L);
}

/* pcall: the library's (upvalue 1), but an exhausted run goes on out. */
static int l_pcall(lua_State *L)
{
	int n = call_orig(L);
	int first = lua_gettop(L) - n + 1;
	if (n >= 2 && !lua_toboolean(L, first))
		rethrow_if_exhausted(L, first + 1);
	return n;
}

/* The message handler of xpcall (upvalue 1: the script's). */
static int xpcall_handler(lua_State *L)
{
	if (exhausted(L))
		return 1;  /* the error object as it is: nothing of the script runs */
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_insert(L, 1);
	lua_call(L, lua_gettop(L) - 1, 1);
	return 1;
}

/* xpcall: the library's (upvalue 1) with the handler wrapped. */
static int l_xpcall(lua_State *L)
{
	if (lua_type(L, 2) == LUA_TFUNCTION) {
		lua_pushvalue(L, 2);
		lua_pushcclosure(L, xpcall_handler, 1);
		lua_replace(L, 2);
	}
	int n = call_orig(L);
	int first = lua_gettop(L) - n + 1;
	if (n >= 2 && !lua_toboolean(L, first))
		rethrow_if_exhausted(L, first + 1);
	return n;
}

/* ---- finalizers, read-only tables ---- */

/*
 * setmetatable without __gc (upvalue 1: the original). Lua runs
 * finalizers with hooks off, so a __gc could loop forever outside the
 * budget, at any collection or at close. An object is marked for
 * finalization only when it gets a metatable that has __gc then (a
 * __gc added to the metatable later is ignored by Lua), and scripts can
 * give metatables to tables only, so refusing it here is enough.
 */
static int l_setmetatable(lua_State *L)
{
	if (lua_type(L, 2) == LUA_TTABLE) {
		lua_pushliteral(L, "__gc");
		int t = lua_rawget(L, 2);
		lua_pop(L, 1);
		if (t != LUA_TNIL)
			return luaL_error(L, "setmetatable: __gc metamethods are not allowed in "
					  "a policy (finalizers run outside the instruction "
					  "budget)");
	}
	return call_orig(L);
}

static bool is_frozen(lua_State *L, int idx)
{
	if (lua_type(L, idx) != LUA_TTABLE)
		return false;
	idx = lua_absindex(L, idx);
	bool r = false;
	if (lua_getfield(L, LUA_REGISTRYINDEX, FROZEN_KEY) == LUA_TTABLE) {
		lua_pushvalue(L, idx);
		r = lua_rawget(L, -2) != LUA_TNIL;
		lua_pop(L, 1);
	}
	lua_pop(L, 1);
	return r;
}

/* rawset refusing the read-only tables (upvalue 1: the original). */
static int l_rawset(lua_State *L)
{
	if (is_frozen(L, 1))
		return luaL_error(L, "rawset: the table is read-only");
	return call_orig(L);
}

/* __newindex of a read-only library table (upvalue 1: its name). */
static int l_readonly_write(lua_State *L)
{
	const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "?";
	return luaL_error(L, "%s is read-only: cannot set %s.%s", lua_tostring(L,
			  lua_upvalueindex(1)), lua_tostring(L, lua_upvalueindex(1)), k);
}

/* __newindex of the globals once loaded. */
static int l_global_write(lua_State *L)
{
	const char *k = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2) : "?";
	return luaL_error(L, "cannot set global '%s': globals are read-only once the "
			  "config file has run (keep state in a local of the file)", k);
}

/* The iterator of __pairs over a hidden table (upvalue 1). */
static int l_hidden_next(lua_State *L)
{
	lua_settop(L, 2);
	if (lua_next(L, lua_upvalueindex(1)))
		return 2;
	lua_pushnil(L);
	return 1;
}

static int l_hidden_pairs(lua_State *L)
{
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_pushcclosure(L, l_hidden_next, 1);
	lua_pushnil(L);
	lua_pushnil(L);
	return 3;
}

static void mark_frozen(lua_State *L, int idx)
{
	idx = lua_absindex(L, idx);
	lua_getfield(L, LUA_REGISTRYINDEX, FROZEN_KEY);
	lua_pushvalue(L, idx);
	lua_pushboolean(L, 1);
	lua_rawset(L, -3);
	lua_pop(L, 1);
}

/*
 * Sets on the (empty) table at proxy a protected metatable reading from
 * the table at hidden, with newindex (a C function at the top) for
 * writes; pops newindex. pairs() works, next/rawget see an empty table.
 */
static void make_proxy(lua_State *L, int proxy, int hidden)
{
	proxy = lua_absindex(L, proxy);
	hidden = lua_absindex(L, hidden);
	lua_createtable(L, 0, 4);
	lua_insert(L, -2);
	lua_setfield(L, -2, "__newindex");
	lua_pushvalue(L, hidden);
	lua_setfield(L, -2, "__index");
	lua_pushvalue(L, hidden);
	lua_pushcclosure(L, l_hidden_pairs, 1);
	lua_setfield(L, -2, "__pairs");
	lua_pushliteral(L, "read-only");
	lua_setfield(L, -2, "__metatable");
	lua_setmetatable(L, proxy);
	mark_frozen(L, proxy);
}

/* Replaces the table at the top with a read-only proxy of a copy of it
 * (a reference kept by the script no longer reaches what others see). */
static void freeze_table(lua_State *L, const char *name)
{
	int t = lua_gettop(L);
	lua_newtable(L);
	int copy = lua_gettop(L);
	lua_pushnil(L);
	while (lua_next(L, t)) {
		lua_pushvalue(L, -2);
		lua_insert(L, -2);
		lua_rawset(L, copy);
	}
	lua_newtable(L);
	lua_pushstring(L, name);
	lua_pushcclosure(L, l_readonly_write, 1);
	make_proxy(L, -2, copy);
	lua_replace(L, t);
	lua_settop(L, t);
}

static const char *const frozen_libs[] = {
	"string", "table", "math", "utf8", "os",
};

/* A library table, or one of extra (NULL-ended, may be NULL). */
static bool freezes(const char *k, const char *const *extra)
{
	for (size_t i = 0; i < sizeof(frozen_libs) / sizeof(frozen_libs[0]); i++)
		if (strcmp(k, frozen_libs[i]) == 0)
			return true;
	for (size_t i = 0; extra && extra[i]; i++)
		if (strcmp(k, extra[i]) == 0)
			return true;
	return false;
}

/*
 * The library tables (and those named in the list, a light userdata at
 * 1) become read-only proxies, the string metatable a fresh protected
 * one, and the globals read-only (their values move to a hidden table
 * the globals read from).
 */
static int freeze(lua_State *L)
{
	const char *const *extra = lua_touserdata(L, 1);
	lua_settop(L, 0);
	lua_pushglobaltable(L);
	int g = lua_gettop(L);
	lua_newtable(L);
	int back = lua_gettop(L);
	lua_pushnil(L);
	while (lua_next(L, g)) {
		if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE) {
			const char *k = lua_tostring(L, -2);
			if (freezes(k, extra))
				freeze_table(L, k);
		}
		lua_pushvalue(L, -2);
		lua_insert(L, -2);
		lua_rawset(L, back);
	}
	lua_pushnil(L);
	while (lua_next(L, g)) {
		lua_pop(L, 1);
		lua_pushvalue(L, -1);
		lua_pushnil(L);
		lua_rawset(L, g);
	}
	/* A metatable the file gave the globals (a "strict" __index) now
	 * serves the hidden table. */
	if (lua_getmetatable(L, g))
		lua_setmetatable(L, back);
	lua_pushcfunction(L, l_global_write);
	make_proxy(L, g, back);

	/* The string metatable: the fields saved at setup, __index the
	 * read-only string table. */
	lua_newtable(L);
	int mt = lua_gettop(L);
	lua_getfield(L, LUA_REGISTRYINDEX, STRMT_KEY);
	lua_pushnil(L);
	while (lua_next(L, -2)) {
		lua_pushvalue(L, -2);
		lua_insert(L, -2);
		lua_rawset(L, mt);
	}
	lua_pop(L, 1);
	lua_getfield(L, back, "string");
	lua_setfield(L, mt, "__index");
	lua_pushliteral(L, "read-only");
	lua_setfield(L, mt, "__metatable");
	lua_pushliteral(L, "");
	lua_pushvalue(L, mt);
	lua_setmetatable(L, -2);
	lua_settop(L, 0);
	return 0;
}

/* load of a chunk by pieces: the pieces pay what they weigh (upvalue 1:
 * the script's reader). */
static int l_reader(lua_State *L)
{
	lua_settop(L, 0);
	lua_pushvalue(L, lua_upvalueindex(1));
	lua_call(L, 0, 1);
	if (lua_type(L, 1) == LUA_TSTRING)
		rq_lua_sandbox_charge(L, 1 + (double)lua_rawlen(L, 1) / SCAN_BYTES_PER_STEP,
		       "load of a long chunk");
	return 1;
}

static int setup(lua_State *L)
{
	static const struct {
		const char *name;
		lua_CFunction open;
	} libs[] = {
		{LUA_GNAME, luaopen_base}, {LUA_TABLIBNAME, luaopen_table},
		{LUA_STRLIBNAME, luaopen_string}, {LUA_MATHLIBNAME, luaopen_math},
		{LUA_UTF8LIBNAME, luaopen_utf8}, {LUA_OSLIBNAME, luaopen_os},
	};
	for (size_t i = 0; i < sizeof(libs) / sizeof(libs[0]); i++) {
		luaL_requiref(L, libs[i].name, libs[i].open, 1);
		lua_pop(L, 1);
	}
	lua_pushglobaltable(L);
	int g = lua_gettop(L);

	/* os: a read-only clock only. */
	lua_getfield(L, g, "os");
	int os = lua_gettop(L);
	lua_createtable(L, 0, 3);
	static const char *const os_keep[] = {"time", "clock", "date"};
	for (size_t i = 0; i < 3; i++) {
		lua_getfield(L, os, os_keep[i]);
		lua_setfield(L, -2, os_keep[i]);
	}
	lua_setfield(L, g, "os");
	lua_pop(L, 1);

	static const char *const drop[] = {"dofile", "loadfile", "require", "io",
					   "debug", "package", "coroutine"};
	for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++) {
		lua_pushnil(L);
		lua_setfield(L, g, drop[i]);
	}
	/* Library C functions pay for their work (see "bounded C work"):
	 * the sandbox gets wrapped copies, the originals stay where the
	 * scripts cannot reach them (error messages still name them). */
	static const char *const wrap_libs[] = {"string", "table", "utf8"};
	for (size_t i = 0; i < sizeof(wrap_libs) / sizeof(wrap_libs[0]); i++) {
		lua_getfield(L, g, wrap_libs[i]);
		wrap_table(L, -1, wrap_libs[i]);
		lua_setfield(L, g, wrap_libs[i]);
		lua_pop(L, 1);
	}
	lua_getfield(L, g, "string");
	lua_pushnil(L);
	lua_setfield(L, -2, "dump");
	/* The string metatable (s:find(...), string arithmetic): a wrapped
	 * copy, __index the sandbox's string table; its fields are kept for
	 * the fresh metatable made after load (freeze). */
	lua_pushliteral(L, "");
	lua_getmetatable(L, -1);
	wrap_table(L, -1, "string_mt");
	lua_pushvalue(L, -4);
	lua_setfield(L, -2, "__index");
	lua_pushvalue(L, -1);
	lua_setfield(L, LUA_REGISTRYINDEX, STRMT_KEY);
	lua_newtable(L);  /* the live one: a copy, so changes at load stay there */
	lua_pushnil(L);
	while (lua_next(L, -3)) {
		lua_pushvalue(L, -2);
		lua_insert(L, -2);
		lua_rawset(L, -4);
	}
	lua_setmetatable(L, -4);
	lua_pop(L, 4);
	static const char *const base_wrap[] = {"setmetatable", "rawset", "tonumber",
						"rawequal", "pcall", "xpcall"};
	static const lua_CFunction base_fn[] = {l_setmetatable, l_rawset, wrapped,
						wrapped, l_pcall, l_xpcall};
	static const enum wrap_kind base_kind[] = {W_SCAN, W_SCAN, W_SCAN,
						   W_RAWEQUAL, W_SCAN, W_SCAN};
	for (size_t i = 0; i < sizeof(base_wrap) / sizeof(base_wrap[0]); i++) {
		lua_getfield(L, g, base_wrap[i]);
		if (base_fn[i] == wrapped) {
			lua_pushinteger(L, base_kind[i]);
			lua_pushcclosure(L, wrapped, 2);
		} else {
			lua_pushcclosure(L, base_fn[i], 1);
		}
		lua_setfield(L, g, base_wrap[i]);
	}
	lua_newtable(L);
	lua_setfield(L, LUA_REGISTRYINDEX, FROZEN_KEY);

	lua_getfield(L, g, "load");
	lua_pushcclosure(L, l_load, 1);
	lua_setfield(L, g, "load");
	lua_pushcfunction(L, l_collectgarbage);
	lua_setfield(L, g, "collectgarbage");
	lua_pushcfunction(L, l_print);
	lua_setfield(L, g, "print");

	return 0;
}

/* ---- the object ---- */

void rq_lua_sandbox_destroy(struct rq_lua_sandbox *sb)
{
	if (!sb)
		return;
	if (sb->L) {
		/* Finalizers run at close: keep them on a budget. */
		rq_lua_sandbox_arm(sb, sb->budget, sb->seconds);
		lua_close(sb->L);
	}
	free(sb);
}

struct rq_lua_sandbox *rq_lua_sandbox_create(const struct rq_lua_sandbox_opts *opts,
					     char *err, size_t errlen)
{
	struct rq_lua_sandbox *sb = calloc(1, sizeof(*sb));
	if (!sb) {
		rq_err_set(err, errlen, "out of memory");
		return NULL;
	}
	sb->mem_cap = opts && opts->memory ? opts->memory : RQ_LUA_SANDBOX_MEMORY;
	snprintf(sb->print_event, sizeof(sb->print_event), "%s",
		 opts && opts->print_event ? opts->print_event : "lua_print");
	sb->budget = ULONG_MAX;  /* until the first arm */
	sb->L = lua_newstate(lalloc, sb);
	if (!sb->L) {
		rq_err_set(err, errlen, "cannot create a Lua state");
		goto fail;
	}
	lua_atpanic(sb->L, panic);
	/* The setup is fixed C code: no budget to speak of. */
	rq_lua_sandbox_arm(sb, ULONG_MAX, SETUP_SECONDS);
	lua_pushcfunction(sb->L, setup);
	if (lua_pcall(sb->L, 0, 0, 0) != LUA_OK) {
		rq_err_set(err, errlen, "cannot set up the Lua sandbox");
		goto fail;
	}
	lua_settop(sb->L, 0);
	return sb;
fail:
	rq_lua_sandbox_destroy(sb);
	return NULL;
}

lua_State *rq_lua_sandbox_state(struct rq_lua_sandbox *sb)
{
	return sb->L;
}

struct rq_lua_sandbox *rq_lua_sandbox_of(lua_State *L)
{
	return owner(L);
}

int rq_lua_sandbox_freeze(struct rq_lua_sandbox *sb, const char *const *tables)
{
	lua_pushcfunction(sb->L, freeze);
	lua_pushlightuserdata(sb->L, (void *)tables);
	int st = lua_pcall(sb->L, 1, 0, 0);
	lua_settop(sb->L, 0);
	return st == LUA_OK ? 0 : -1;
}

static int collect(lua_State *L)
{
	lua_gc(L, LUA_GCCOLLECT);
	return 0;
}

int rq_lua_sandbox_collect(struct rq_lua_sandbox *sb)
{
	lua_pushcfunction(sb->L, collect);
	int st = lua_pcall(sb->L, 0, 0, 0);
	lua_settop(sb->L, 0);
	return st == LUA_OK ? 0 : -1;
}

enum rq_lua_sandbox_fail rq_lua_sandbox_failure(const struct rq_lua_sandbox *sb,
						int st)
{
	if (st == LUA_ERRMEM)
		return sb->budget_alloc_failed ? RQ_LUA_SANDBOX_FAIL_BUDGET :
		       RQ_LUA_SANDBOX_FAIL_MEMORY;
	if (sb->budget_hit)
		return RQ_LUA_SANDBOX_FAIL_BUDGET;
	return sb->mem_hit ? RQ_LUA_SANDBOX_FAIL_MEMORY : RQ_LUA_SANDBOX_FAIL_RUNTIME;
}

void rq_lua_sandbox_usage(const struct rq_lua_sandbox *sb,
			  struct rq_lua_sandbox_usage *out)
{
	memset(out, 0, sizeof(*out));
	if (!sb)
		return;
	out->memory = sb->mem_used;
	out->memory_peak = sb->mem_peak;
	out->memory_cap = sb->mem_cap;
	out->budget = sb->budget;
	out->steps = sb->steps;
}

#include "relayq/policy_lua.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "relayq/json.h"
#include "relayq/log.h"

/*
 * The Lua side of the policy. Every Lua call from C goes through one
 * lua_pcall of a C function (so an allocation failure while building
 * arguments is an error, never a panic); the count hook stays installed
 * for the life of the state, and its budget is reset before each entry.
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
 *   hook interval stays short).
 * After load, freeze() makes the libraries, the string metatable and the
 * globals read-only so one handler cannot change what the others see.
 */

#define RULES_KEY "relayq.rules"          /* registry: selector -> fn */
#define DRULES_KEY "relayq.domain_rules"  /* registry: domain -> {selector -> fn} */
#define ACTION_MT "relayq.action"
#define HOOK_EVERY 100
#define SEL_MAX 24
#define MAX_RULES 1024
#define MAX_KEYS 256
#define LOGGED_MAX 32
#define ERR_MAX 1024
#define SRC_MAX (4u << 20)
/* What C work costs, in instruction-budget steps (see "bounded C work"). */
#define ALLOC_BYTES_PER_STEP 256   /* allocation */
#define SCAN_BYTES_PER_STEP 16     /* string arguments read by a library call */
#define MATCH_PER_STEP 4           /* pattern matcher steps */
#define ELEMS_PER_STEP 4           /* table elements visited by table.* */
#define FROZEN_KEY "relayq.frozen"        /* registry: read-only table -> true */
#define STRMT_KEY "relayq.string_mt"      /* registry: the string metatable's fields */

enum sel_kind { SEL_ENH = 0, SEL_CODE, SEL_CLASS, SEL_FAIL, SEL_STAR, SEL_KINDS_ };

struct rule {
	char key[SEL_MAX];
	int line;
};

struct rules {
	struct rule *v;
	size_t n;
};

struct dom_rules {
	char *name;
	struct rules r;
};

struct rq_policy_lua {
	lua_State *L;
	size_t mem_used, mem_cap, mem_peak;
	unsigned long steps, budget;
	double deadline, seconds;    /* monotonic clock; the limit armed */
	size_t alloc_acc;            /* bytes allocated not yet charged */
	bool mem_hit, budget_hit;
	bool budget_alloc_failed;    /* the last failed allocation: budget, not cap */
	struct rq_policy_lua_limits limits;
	struct rules global;
	struct dom_rules *doms;
	size_t ndoms;
	struct rq_policy_lua_stats st;
	char last_error[ERR_MAX];
	char logged[LOGGED_MAX][RQ_POLICY_RULE_MAX];
	size_t nlogged;
	/* While the file runs. */
	bool loading;
	struct rq_config *cfg;
	struct rq_config_diag *diag;
	const char *src;
	size_t srclen;
};

/* ---- allocator and budget ---- */

static void hook(lua_State *L, lua_Debug *ar);

static void *lalloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
	struct rq_policy_lua *pl = ud;
	size_t old = ptr ? osize : 0;
	if (nsize == 0) {
		free(ptr);
		pl->mem_used -= old;
		return NULL;
	}
	if (nsize > old) {
		size_t grow = nsize - old;
		if (grow > pl->mem_cap || pl->mem_used + grow > pl->mem_cap) {
			pl->mem_hit = true;
			pl->budget_alloc_failed = false;
			return NULL;
		}
		/* Allocation pays steps: work proportional to bytes (copies,
		 * the collector) is bounded by the budget too. Once the
		 * budget is gone, allocations are free so the error and its
		 * traceback can be built; every instruction fails from then. */
		if (!pl->budget_hit) {
			pl->alloc_acc += grow;
			pl->steps += pl->alloc_acc / ALLOC_BYTES_PER_STEP;
			pl->alloc_acc %= ALLOC_BYTES_PER_STEP;
			if (pl->steps > pl->budget) {
				pl->budget_hit = true;
				pl->budget_alloc_failed = true;
				if (pl->L)
					lua_sethook(pl->L, hook, LUA_MASKCOUNT, 1);
				return NULL;
			}
		}
	}
	void *p = realloc(ptr, nsize);
	if (!p)
		return NULL;
	pl->mem_used = pl->mem_used - old + nsize;
	if (pl->mem_used > pl->mem_peak)
		pl->mem_peak = pl->mem_used;
	return p;
}

static struct rq_policy_lua *owner(lua_State *L)
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
	struct rq_policy_lua *pl = owner(L);
	pl->budget_hit = true;
	lua_sethook(L, hook, LUA_MASKCOUNT, 1);
	luaL_where(L, level);
	lua_pushfstring(L, "instruction budget exceeded (%I instructions)%s%s",
			(lua_Integer)pl->budget, what ? ": " : "", what ? what : "");
	lua_concat(L, 2);
	return lua_error(L);
}

static double now(void)
{
	struct timespec ts;
#ifdef CLOCK_MONOTONIC_COARSE
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
#else
	clock_gettime(CLOCK_MONOTONIC, &ts);
#endif
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * Every HOOK_EVERY instructions. Besides the budget, a wall-clock limit
 * as a backstop: some single instructions do work proportional to their
 * operands without allocating (== and < on two long strings), so a loop
 * of them could take minutes within the instruction budget.
 */
static void hook(lua_State *L, lua_Debug *ar)
{
	(void)ar;
	struct rq_policy_lua *pl = owner(L);
	pl->steps += HOOK_EVERY;
	if (pl->steps > pl->budget || pl->budget_hit)
		budget_error(L, 0, NULL);
	if (now() <= pl->deadline)
		return;
	pl->budget_hit = true;
	lua_sethook(L, hook, LUA_MASKCOUNT, 1);
	luaL_where(L, 0);
	lua_pushfstring(L, "time limit exceeded (%f s)", pl->seconds);
	lua_concat(L, 2);
	lua_error(L);
}

/*
 * Charges cost steps of work a C function is about to do (called from a
 * C function); raises the budget error instead when they are not left.
 */
static void charge(lua_State *L, double cost, const char *what)
{
	struct rq_policy_lua *pl = owner(L);
	if (pl->budget_hit || pl->steps >= pl->budget ||
	    !(cost <= (double)(pl->budget - pl->steps)))
		budget_error(L, 1, what);
	pl->steps += (unsigned long)cost;
}

static double budget_left(lua_State *L)
{
	struct rq_policy_lua *pl = owner(L);
	return pl->steps >= pl->budget ? 0 : (double)(pl->budget - pl->steps);
}

static void arm(struct rq_policy_lua *pl, unsigned long budget, double seconds)
{
	pl->seconds = seconds;
	pl->deadline = now() + seconds;
	pl->steps = 0;
	pl->alloc_acc = 0;
	pl->budget = budget;
	pl->budget_hit = false;
	pl->mem_hit = false;
	pl->budget_alloc_failed = false;
	lua_sethook(pl->L, hook, LUA_MASKCOUNT, HOOK_EVERY);
}

static int panic(lua_State *L)
{
	const char *m = lua_tostring(L, -1);
	rq_log(RQ_LOG_ERROR, "policy_lua_panic", "error", m ? m : "?", NULL);
	abort();
}

/* ---- helpers ---- */

static int caller_line(lua_State *L)
{
	lua_Debug ar;
	if (lua_getstack(L, 1, &ar) && lua_getinfo(L, "l", &ar) && ar.currentline > 0)
		return ar.currentline;
	return 0;
}

static bool ident_char(char c)
{
	return isalnum((unsigned char)c) || c == '_';
}

/*
 * The line of `key = ` (or ["key"] =) at or after line `from` in the
 * source: keys of a table given to relayq.config have no line of their
 * own at run time, so the source is searched. Falls back to `from`.
 */
static int key_line(const struct rq_policy_lua *pl, int from, const char *key)
{
	if (!pl->src || from <= 0)
		return from;
	size_t klen = strlen(key);
	const char *p = pl->src, *end = pl->src + pl->srclen;
	int line = 1;
	while (p < end && line < from) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		if (!nl)
			return from;
		p = nl + 1;
		line++;
	}
	for (; p < end && line < from + 500; line++) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *le = nl ? nl : end;
		for (const char *q = p; q + klen <= le; q++) {
			if (memcmp(q, key, klen) != 0)
				continue;
			if (q > p && ident_char(q[-1]) && q[-1] != '"')
				continue;
			const char *r = q + klen;
			if (r < le && (*r == '"' || *r == '\''))
				r++;
			if (r < le && *r == ']')
				r++;
			if (r < le && ident_char(*r))
				continue;
			while (r < le && (*r == ' ' || *r == '\t'))
				r++;
			if (r < le && *r == '=' && (r + 1 >= le || r[1] != '='))
				return line;
		}
		if (!nl)
			break;
		p = nl + 1;
	}
	return from;
}

/* "path:12: message" -> 12 and the message after it. */
static int error_line(const char *msg, const char **rest)
{
	*rest = msg;
	const char *nl = strchr(msg, '\n');
	size_t n = nl ? (size_t)(nl - msg) : strlen(msg);
	for (size_t i = 0; i < n; i++) {
		if (msg[i] != ':' || !isdigit((unsigned char)msg[i + 1]))
			continue;
		size_t j = i + 1;
		int line = 0;
		while (j < n && isdigit((unsigned char)msg[j]) && line < 10000000)
			line = line * 10 + (msg[j++] - '0');
		if (j < n && msg[j] == ':') {
			*rest = msg + j + 1;
			while (**rest == ' ')
				(*rest)++;
			return line;
		}
	}
	return 0;
}

static void copy_error(lua_State *L, int idx, char *out, size_t len)
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

static int msgh(lua_State *L)
{
	const char *m = lua_tostring(L, 1);
	if (!m)
		m = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
	luaL_traceback(L, L, m, 1);
	return 1;
}

/* ---- durations and selectors ---- */

/* A duration argument: number of seconds or "5m"; 1 s .. 366 days. */
static double check_duration(lua_State *L, int idx, const char *what)
{
	double d = 0;
	if (lua_type(L, idx) == LUA_TNUMBER) {
		d = lua_tonumber(L, idx);
	} else if (lua_type(L, idx) == LUA_TSTRING) {
		if (rq_duration_parse(lua_tostring(L, idx), &d) < 0)
			luaL_error(L, "%s: \"%s\" is not a duration", what, lua_tostring(L, idx));
	} else {
		luaL_error(L, "%s: expected a duration, got a %s", what, luaL_typename(L, idx));
	}
	if (!isfinite(d) || d < 0 || d > 366 * 86400.0)
		luaL_error(L, "%s: duration out of range (0 to 366d)", what);
	return d < 1 ? 1 : d;
}

static bool enhanced_ok(const char *s)
{
	char out[16];
	size_t len = strlen(s);
	if (len >= sizeof(out))
		return false;
	size_t n = rq_reply_enhanced(s, len, out);
	return n > 0 && strcmp(out, s) == 0 && (s[0] == '4' || s[0] == '5');
}

/* Parses the selector at idx into key; -1 with a message in err. */
static int parse_selector(lua_State *L, int idx, char key[SEL_MAX], char *err,
			  size_t errlen)
{
	if (lua_type(L, idx) == LUA_TNUMBER) {
		if (!lua_isinteger(L, idx)) {
			snprintf(err, errlen, "selector %g is not a reply code", lua_tonumber(L, idx));
			return -1;
		}
		lua_Integer c = lua_tointeger(L, idx);
		if (c < 400 || c > 599) {
			snprintf(err, errlen, "selector %lld: only 4xx and 5xx codes can be "
				 "overridden", (long long)c);
			return -1;
		}
		snprintf(key, SEL_MAX, "%lld", (long long)c);
		return 0;
	}
	if (lua_type(L, idx) != LUA_TSTRING) {
		snprintf(err, errlen, "selector must be a code, an enhanced code, a class, "
			 "an event or \"*\", not a %s", luaL_typename(L, idx));
		return -1;
	}
	size_t len;
	const char *s = lua_tolstring(L, idx, &len);
	if (len == 0 || len >= SEL_MAX || strlen(s) != len)
		goto bad;
	if (strcmp(s, "*") == 0 || strcasecmp(s, "4xx") == 0 ||
	    strcasecmp(s, "5xx") == 0) {
		snprintf(key, SEL_MAX, "%c%s", s[0], s[0] == '*' ? "" : "xx");
		return 0;
	}
	if (len == 3 && isdigit((unsigned char)s[0]) && isdigit((unsigned char)s[1]) &&
	    isdigit((unsigned char)s[2])) {
		int c = atoi(s);
		if (c < 400 || c > 599) {
			snprintf(err, errlen, "selector \"%s\": only 4xx and 5xx codes can "
				 "be overridden", s);
			return -1;
		}
		snprintf(key, SEL_MAX, "%d", c);
		return 0;
	}
	if (enhanced_ok(s)) {
		snprintf(key, SEL_MAX, "%s", s);
		return 0;
	}
	for (int f = 1; f < RQ_FAIL_COUNT_; f++) {
		if (strcmp(s, rq_fail_name((enum rq_fail)f)) == 0) {
			snprintf(key, SEL_MAX, "%s", s);
			return 0;
		}
	}
bad:
	snprintf(err, errlen, "selector \"%.40s\" is not a 4xx/5xx code, an enhanced "
		 "code (\"5.7.26\"), \"4xx\", \"5xx\", an event (timeout, refused, "
		 "lost, tls, dns, protocol) or \"*\"", s);
	return -1;
}

static const struct rule *rules_find(const struct rules *r, const char *key)
{
	for (size_t i = 0; i < r->n; i++)
		if (strcmp(r->v[i].key, key) == 0)
			return &r->v[i];
	return NULL;
}

static int rules_add(struct rq_policy_lua *pl, struct rules *r, const char *key,
		     int line)
{
	if (pl->st.rules >= MAX_RULES)
		return -1;
	struct rule *v = realloc(r->v, (r->n + 1) * sizeof(*v));
	if (!v)
		return -1;
	r->v = v;
	snprintf(v[r->n].key, SEL_MAX, "%s", key);
	v[r->n].line = line;
	r->n++;
	pl->st.rules++;
	return 0;
}

static struct dom_rules *dom_find(const struct rq_policy_lua *pl, const char *name)
{
	if (!name)
		return NULL;
	for (size_t i = 0; i < pl->ndoms; i++)
		if (strcasecmp(pl->doms[i].name, name) == 0)
			return &pl->doms[i];
	return NULL;
}

/*
 * Registers fn (at fidx) for the selector at sidx in the rule table at
 * tidx; scope is the domain (NULL: global). Problems go to diag.
 */
static void register_rule(lua_State *L, struct rq_policy_lua *pl, const char *scope,
			  int tidx, int sidx, int fidx, int line)
{
	char key[SEL_MAX], err[200];
	const char *fname = scope ? "relayq.on_domain ... on" : "relayq.on";
	if (parse_selector(L, sidx, key, err, sizeof(err)) < 0) {
		rq_config_diag_add(pl->diag, line, false, "%s: %s", fname, err);
		return;
	}
	if (lua_type(L, fidx) != LUA_TFUNCTION) {
		rq_config_diag_add(pl->diag, line, false, "%s(\"%s\"): expected a function, "
				   "got a %s", fname, key, luaL_typename(L, fidx));
		return;
	}
	struct rules *r = &pl->global;
	if (scope) {
		struct dom_rules *d = dom_find(pl, scope);
		if (!d) {
			d = realloc(pl->doms, (pl->ndoms + 1) * sizeof(*d));
			if (!d)
				luaL_error(L, "out of memory");
			pl->doms = d;
			d = &pl->doms[pl->ndoms];
			memset(d, 0, sizeof(*d));
			d->name = strdup(scope);
			if (!d->name)
				luaL_error(L, "out of memory");
			for (char *c = d->name; *c; c++)
				*c = (char)tolower((unsigned char)*c);
			pl->ndoms++;
		}
		r = &d->r;
	}
	const struct rule *old = rules_find(r, key);
	if (old) {
		rq_config_diag_add(pl->diag, line, false, "%s(\"%s\") given twice (first at "
				   "line %d)", fname, key, old->line);
		return;
	}
	if (rules_add(pl, r, key, line) < 0) {
		rq_config_diag_add(pl->diag, line, false, "%s: too many rules (max %d)",
				   fname, MAX_RULES);
		return;
	}
	lua_pushvalue(L, fidx);
	lua_setfield(L, tidx, key);
}

/* ---- the config walker ---- */

struct key_entry {
	char name[64];
	lua_Integer idx;
	bool is_index;
	int line;
};

static int key_cmp(const void *a, const void *b)
{
	const struct key_entry *x = a, *y = b;
	if (x->is_index != y->is_index)
		return x->is_index ? -1 : 1;
	if (x->is_index)
		return x->idx < y->idx ? -1 : x->idx > y->idx;
	if (x->line != y->line)
		return x->line < y->line ? -1 : 1;
	return strcmp(x->name, y->name);
}

static bool key_name_ok(const char *s, size_t len)
{
	if (len == 0 || len >= 40 || strlen(s) != len)
		return false;
	for (size_t i = 0; i < len; i++)
		if (!ident_char(s[i]))
			return false;
	return true;
}

static void domain_on(lua_State *L, struct rq_policy_lua *pl, const char *domain,
		      int vidx, int line);

/*
 * Hands every key of the table at tidx to rq_config_apply. prefix is the
 * dotted path so far ("" at the top); base is the line to search keys from.
 */
static void walk(lua_State *L, struct rq_policy_lua *pl, enum rq_config_section sec,
		 const char *domain, int tidx, const char *prefix, int base, int depth)
{
	tidx = lua_absindex(L, tidx);
	/* A userdata, so a Lua error anywhere below frees it too. */
	struct key_entry *keys = lua_newuserdatauv(L, MAX_KEYS * sizeof(*keys), 0);
	memset(keys, 0, MAX_KEYS * sizeof(*keys));
	size_t n = 0;
	bool too_many = false;
	lua_pushnil(L);
	while (lua_next(L, tidx)) {
		lua_pop(L, 1);
		if (n >= MAX_KEYS) {
			too_many = true;
			continue;
		}
		struct key_entry *k = &keys[n];
		if (lua_type(L, -1) == LUA_TSTRING) {
			size_t len;
			const char *s = lua_tolstring(L, -1, &len);
			if (!key_name_ok(s, len)) {
				rq_config_diag_add(pl->diag, base, false,
						   "invalid key \"%.40s\" in %s", s,
						   prefix[0] ? prefix : "the table");
				continue;
			}
			memcpy(k->name, s, len + 1);
			k->line = key_line(pl, base, k->name);
		} else if (lua_isinteger(L, -1)) {
			k->is_index = true;
			k->idx = lua_tointeger(L, -1);
			k->line = base;
		} else {
			rq_config_diag_add(pl->diag, base, false, "invalid key of type %s in %s",
					   luaL_typename(L, -1),
					   prefix[0] ? prefix : "the table");
			continue;
		}
		n++;
	}
	if (too_many)
		rq_config_diag_add(pl->diag, base, false, "more than %d keys in %s",
				   MAX_KEYS, prefix[0] ? prefix : "the table");
	qsort(keys, n, sizeof(*keys), key_cmp);
	for (size_t i = 0; i < n; i++) {
		struct key_entry *k = &keys[i];
		char full[160];
		if (k->is_index) {
			lua_rawgeti(L, tidx, k->idx);
			if (prefix[0])
				snprintf(full, sizeof(full), "%s[]", prefix);
			else
				snprintf(full, sizeof(full), "[%lld]", (long long)k->idx);
		} else {
			lua_pushstring(L, k->name);
			lua_rawget(L, tidx);
			snprintf(full, sizeof(full), "%s%s%s", prefix, prefix[0] ? "." : "",
				 k->name);
		}
		if (sec == RQ_CONFIG_SEC_DOMAIN && depth == 0 && !k->is_index &&
		    strcmp(k->name, "on") == 0) {
			domain_on(L, pl, domain, -1, k->line);
			lua_pop(L, 1);
			continue;
		}
		struct rq_config_value v = {0};
		switch (lua_type(L, -1)) {
		case LUA_TNIL: v.type = RQ_CONFIG_NIL; break;
		case LUA_TBOOLEAN: v.type = RQ_CONFIG_BOOL; v.b = lua_toboolean(L, -1); break;
		case LUA_TNUMBER: v.type = RQ_CONFIG_NUMBER; v.num = lua_tonumber(L, -1); break;
		case LUA_TSTRING:
			v.type = RQ_CONFIG_STRING;
			v.str = lua_tolstring(L, -1, &v.len);
			break;
		case LUA_TTABLE: v.type = RQ_CONFIG_TABLE; break;
		default: v.type = RQ_CONFIG_OTHER; break;
		}
		int r = rq_config_apply(pl->cfg, sec, full, &v, k->line, pl->diag);
		if (r == 0 && v.type == RQ_CONFIG_TABLE) {
			if (depth >= 2)
				rq_config_diag_add(pl->diag, k->line, false, "%s: nested too deep",
						   full);
			else
				walk(L, pl, sec, domain, -1, full, k->line, depth + 1);
		}
		lua_pop(L, 1);
	}
	lua_pop(L, 1);  /* keys */
}

static void domain_on(lua_State *L, struct rq_policy_lua *pl, const char *domain,
		      int vidx, int line)
{
	vidx = lua_absindex(L, vidx);
	if (lua_type(L, vidx) != LUA_TTABLE) {
		rq_config_diag_add(pl->diag, line, false,
				   "on: expected a table of selector = function, got a %s",
				   luaL_typename(L, vidx));
		return;
	}
	lua_getfield(L, LUA_REGISTRYINDEX, DRULES_KEY);
	if (lua_getfield(L, -1, domain) != LUA_TTABLE) {
		lua_pop(L, 1);
		lua_newtable(L);
		lua_pushvalue(L, -1);
		lua_setfield(L, -3, domain);
	}
	int tidx = lua_absindex(L, -1);
	lua_pushnil(L);
	while (lua_next(L, vidx)) {
		/* Key at -2, function at -1. Copy the key so lua_next can go on
		 * (parse_selector does not convert in place). */
		int kline = line;
		if (lua_type(L, -2) == LUA_TSTRING) {
			char pat[48];
			snprintf(pat, sizeof(pat), "%.40s", lua_tostring(L, -2));
			kline = key_line(pl, line, pat);
		} else if (lua_isinteger(L, -2)) {
			char pat[48];
			snprintf(pat, sizeof(pat), "%lld", (long long)lua_tointeger(L, -2));
			kline = key_line(pl, line, pat);
		}
		register_rule(L, pl, domain, tidx, lua_absindex(L, -2),
			      lua_absindex(L, -1), kline);
		lua_pop(L, 1);
	}
	lua_pop(L, 2);
}

/* ---- relayq.* functions ---- */

static struct rq_policy_lua *loading(lua_State *L, const char *fn)
{
	struct rq_policy_lua *pl = owner(L);
	if (!pl->loading)
		luaL_error(L, "%s can only be called while the config file loads", fn);
	return pl;
}

static int section(lua_State *L, enum rq_config_section sec, const char *fn)
{
	struct rq_policy_lua *pl = loading(L, fn);
	int line = caller_line(L);
	if (lua_type(L, 1) != LUA_TTABLE) {
		rq_config_diag_add(pl->diag, line, false, "%s: expected a table, got a %s",
				   fn, luaL_typename(L, 1));
		return 0;
	}
	if (rq_config_section_begin(pl->cfg, sec, NULL, line, pl->diag) < 0)
		return 0;
	walk(L, pl, sec, NULL, 1, "", line, 0);
	rq_config_section_end(pl->cfg, sec, line, pl->diag);
	return 0;
}

static int l_config(lua_State *L)
{
	return section(L, RQ_CONFIG_SEC_CONFIG, "relayq.config");
}

static int l_backoff(lua_State *L)
{
	return section(L, RQ_CONFIG_SEC_BACKOFF, "relayq.backoff");
}

static int l_expire(lua_State *L)
{
	return section(L, RQ_CONFIG_SEC_EXPIRE, "relayq.expire");
}

static int l_on(lua_State *L)
{
	struct rq_policy_lua *pl = loading(L, "relayq.on");
	int line = caller_line(L);
	if (lua_gettop(L) != 2) {
		rq_config_diag_add(pl->diag, line, false,
				   "relayq.on: expected (selector, function)");
		return 0;
	}
	lua_getfield(L, LUA_REGISTRYINDEX, RULES_KEY);
	register_rule(L, pl, NULL, lua_absindex(L, -1), 1, 2, line);
	return 0;
}

static int l_on_domain(lua_State *L)
{
	struct rq_policy_lua *pl = loading(L, "relayq.on_domain");
	int line = caller_line(L);
	if (lua_type(L, 1) != LUA_TSTRING || lua_type(L, 2) != LUA_TTABLE) {
		rq_config_diag_add(pl->diag, line, false,
				   "relayq.on_domain: expected (\"domain\", { settings })");
		return 0;
	}
	size_t len;
	const char *name = lua_tolstring(L, 1, &len);
	if (strlen(name) != len) {
		rq_config_diag_add(pl->diag, line, false,
				   "relayq.on_domain: NUL in the domain name");
		return 0;
	}
	if (rq_config_section_begin(pl->cfg, RQ_CONFIG_SEC_DOMAIN, name, line,
				    pl->diag) < 0)
		return 0;
	char lower[256];
	snprintf(lower, sizeof(lower), "%s", name);
	for (char *c = lower; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	walk(L, pl, RQ_CONFIG_SEC_DOMAIN, lower, 2, "", line, 0);
	rq_config_section_end(pl->cfg, RQ_CONFIG_SEC_DOMAIN, line, pl->diag);
	return 0;
}

static int l_getenv(lua_State *L)
{
	loading(L, "relayq.getenv");
	const char *name = luaL_checkstring(L, 1);
	const char *v = getenv(name);
	if (v && *v)
		lua_pushstring(L, v);
	else
		lua_pushvalue(L, 2);
	return 1;
}

/* relayq.retry / fail / drop / hold / suspend: upvalue 1 is the name. */
static int l_action(lua_State *L)
{
	const char *name = lua_tostring(L, lua_upvalueindex(1));
	bool timed = strcmp(name, "retry") == 0 || strcmp(name, "suspend") == 0;
	bool is_fail = strcmp(name, "fail") == 0;
	lua_settop(L, 1);
	lua_createtable(L, 0, 3);
	lua_pushstring(L, name);
	lua_setfield(L, 2, "action");
	int t = lua_type(L, 1);
	if (t == LUA_TTABLE) {
		lua_pushnil(L);
		while (lua_next(L, 1)) {
			lua_pop(L, 1);
			const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
			if (!k || !((timed && strcmp(k, "after") == 0) ||
				    (is_fail && strcmp(k, "reason") == 0)))
				luaL_error(L, "relayq.%s: unknown argument %s", name,
					   k ? k : luaL_typename(L, -1));
		}
		lua_getfield(L, 1, timed ? "after" : "reason");
	} else if (t == LUA_TNIL || t == LUA_TNONE) {
		lua_pushnil(L);
	} else if (timed || is_fail) {
		lua_pushvalue(L, 1);  /* shorthand: relayq.retry("10m") */
	} else {
		luaL_error(L, "relayq.%s takes no arguments", name);
	}
	if (!lua_isnil(L, -1)) {
		if (timed) {
			lua_pushnumber(L, check_duration(L, -1, name));
			lua_setfield(L, 2, "after");
		} else if (is_fail) {
			if (lua_type(L, -1) != LUA_TSTRING)
				luaL_error(L, "relayq.fail: reason must be a string");
			lua_pushvalue(L, -1);
			lua_setfield(L, 2, "reason");
		}
	}
	lua_pop(L, 1);
	luaL_setmetatable(L, ACTION_MT);
	return 1;
}

/* ---- sandbox ---- */

/* Each line logged costs PRINT_STEPS, so a loop cannot flood the log. */
#define PRINT_STEPS 1000

static int l_print(lua_State *L)
{
	charge(L, PRINT_STEPS, "print");
	luaL_Buffer b;
	int n = lua_gettop(L);
	luaL_buffinit(L, &b);
	for (int i = 1; i <= n; i++) {
		size_t len;
		const char *s = luaL_tolstring(L, i, &len);
		if (i > 1)
			luaL_addchar(&b, '\t');
		luaL_addlstring(&b, s, len > 1024 ? 1024 : len);
		lua_pop(L, 1);
	}
	luaL_pushresult(&b);
	rq_log(RQ_LOG_INFO, "policy_print", "text", lua_tostring(L, -1), NULL);
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
		charge(L, 1 + (double)lua_rawlen(L, 1) / SCAN_BYTES_PER_STEP,
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
		charge(L, 1 + (double)owner(L)->mem_used / ALLOC_BYTES_PER_STEP,
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
 *   they will visit (n log n for sort), ELEMS_PER_STEP per step; this
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
	W_CONCAT, W_INSERT, W_REMOVE, W_SORT, W_UNPACK, W_MOVE,
};

static int call_orig(lua_State *L)
{
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
		charge(L, cost, msg);
		return call_orig(L);
	}
	bool anchored;
	double scan;
	double per = pattern_cost(s, n, p, m, true, &anchored, &scan);
	double tries = anchored ? 1 : (double)(n - i0 + 1);
	double whole = 1 + scan / SCAN_BYTES_PER_STEP + tries * per / MATCH_PER_STEP;
	if (anchored || whole <= budget_left(L)) {
		too_complex(L, kind, tries * per, n, msg, sizeof(msg));
		charge(L, whole, msg);
		return call_orig(L);
	}
	/* One start position at a time, anchored, paying per attempt. */
	too_complex(L, kind, per, n, msg, sizeof(msg));
	charge(L, 1 + scan / SCAN_BYTES_PER_STEP, msg);
	luaL_Buffer b;
	luaL_buffinit(L, &b);
	luaL_addchar(&b, '^');
	luaL_addlstring(&b, p, m);
	luaL_pushresult(&b);
	int pat = lua_gettop(L);
	for (size_t i = i0; i <= n; i++) {
		charge(L, 1 + per / MATCH_PER_STEP, msg);
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
	charge(L, 1 + (scan + repl) / SCAN_BYTES_PER_STEP + tries * per / MATCH_PER_STEP,
	       msg);
}

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
		what = "table.sort";
		if (!table_len(L, 1, &len))
			return;
		elems = len > 1 ? (double)len * (log2((double)len) + 1) : 0;
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
	charge(L, 1 + elems / ELEMS_PER_STEP, msg);
}

/* 1 step, plus the bytes of the string arguments. */
static void charge_scan(lua_State *L)
{
	double bytes = 0;
	int n = lua_gettop(L);
	for (int i = 1; i <= n; i++)
		if (lua_type(L, i) == LUA_TSTRING)
			bytes += (double)lua_rawlen(L, i);
	charge(L, 1 + bytes / SCAN_BYTES_PER_STEP, "reading long strings");
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
		if (lua_isstring(L, 1) && opt_int(L, 2, 0, &n) && n > 0 &&
		    lua_rawlen(L, 1) == 0 &&
		    (lua_isnoneornil(L, 3) || (lua_isstring(L, 3) && lua_rawlen(L, 3) == 0))) {
			lua_pushliteral(L, "");
			return 1;
		}
		charge_scan(L);
		break;
	}
	case W_CONCAT:
	case W_INSERT:
	case W_REMOVE:
	case W_SORT:
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
	"string", "table", "math", "utf8", "os", "relayq",
};

/*
 * Run once the file has loaded: the library tables become read-only
 * proxies, the string metatable a fresh protected one, and the globals
 * read-only (their values move to a hidden table the globals read from).
 */
static int freeze(lua_State *L)
{
	lua_pushglobaltable(L);
	int g = lua_gettop(L);
	lua_newtable(L);
	int back = lua_gettop(L);
	lua_pushnil(L);
	while (lua_next(L, g)) {
		if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE) {
			const char *k = lua_tostring(L, -2);
			for (size_t i = 0; i < sizeof(frozen_libs) / sizeof(frozen_libs[0]); i++)
				if (strcmp(k, frozen_libs[i]) == 0)
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
		charge(L, 1 + (double)lua_rawlen(L, 1) / SCAN_BYTES_PER_STEP,
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
	static const char *const base_wrap[] = {"setmetatable", "rawset", "tonumber"};
	static const lua_CFunction base_fn[] = {l_setmetatable, l_rawset, wrapped};
	for (size_t i = 0; i < 3; i++) {
		lua_getfield(L, g, base_wrap[i]);
		if (base_fn[i] == wrapped) {
			lua_pushinteger(L, W_SCAN);
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

	/* Registry: rule tables and the action metatable. */
	lua_newtable(L);
	lua_setfield(L, LUA_REGISTRYINDEX, RULES_KEY);
	lua_newtable(L);
	lua_setfield(L, LUA_REGISTRYINDEX, DRULES_KEY);
	luaL_newmetatable(L, ACTION_MT);
	lua_pushliteral(L, "relayq.action");
	lua_setfield(L, -2, "__metatable");
	lua_pop(L, 1);

	static const luaL_Reg fns[] = {
		{"config", l_config}, {"backoff", l_backoff}, {"expire", l_expire},
		{"on", l_on}, {"on_domain", l_on_domain}, {"getenv", l_getenv},
		{NULL, NULL},
	};
	luaL_newlib(L, fns);
	static const char *const actions[] = {"retry", "fail", "drop", "hold", "suspend"};
	for (size_t i = 0; i < 5; i++) {
		lua_pushstring(L, actions[i]);
		lua_pushcclosure(L, l_action, 1);
		lua_setfield(L, -2, actions[i]);
	}
	lua_setfield(L, g, "relayq");
	lua_pop(L, 1);
	return 0;
}

/* ---- load ---- */

struct run_ctx {
	const char *src;
	size_t len;
	const char *chunkname;
};

static int run_file(lua_State *L)
{
	struct run_ctx *c = lua_touserdata(L, 1);
	lua_pushcfunction(L, msgh);
	int h = lua_gettop(L);
	int st = luaL_loadbufferx(L, c->src, c->len, c->chunkname, "t");
	if (st != LUA_OK)
		return lua_error(L);
	st = lua_pcall(L, 0, 0, h);
	if (st != LUA_OK)
		return lua_error(L);
	return 0;
}

static void load_error(struct rq_policy_lua *pl, lua_State *L, int status)
{
	char msg[ERR_MAX];
	if (status == LUA_ERRMEM)
		snprintf(msg, sizeof(msg), "memory cap of %zu bytes reached", pl->mem_cap);
	else
		copy_error(L, -1, msg, sizeof(msg));
	/* Keep the first line (the traceback is noise for a config error). */
	char *nl = strchr(msg, '\n');
	if (nl)
		*nl = '\0';
	const char *rest;
	int line = error_line(msg, &rest);
	rq_config_diag_add(pl->diag, line, false, "%s", rest);
}

struct rq_policy_lua *rq_policy_lua_load_buffer(const char *name,
						const char *src, size_t len,
						struct rq_config *cfg,
						const struct rq_policy_lua_limits *limits,
						struct rq_config_diag *diag)
{
	struct rq_policy_lua *pl = calloc(1, sizeof(*pl));
	char *chunkname = NULL;
	if (!pl)
		goto fail;
	pl->limits.memory = limits && limits->memory ? limits->memory : RQ_POLICY_LUA_MEMORY;
	pl->limits.instructions = limits && limits->instructions ?
		limits->instructions : RQ_POLICY_LUA_INSTRUCTIONS;
	pl->limits.load_instructions = limits && limits->load_instructions ?
		limits->load_instructions : RQ_POLICY_LUA_LOAD_INSTRUCTIONS;
	pl->limits.seconds = limits && limits->seconds > 0 ? limits->seconds :
		RQ_POLICY_LUA_SECONDS;
	pl->limits.load_seconds = limits && limits->load_seconds > 0 ?
		limits->load_seconds : RQ_POLICY_LUA_LOAD_SECONDS;
	pl->mem_cap = pl->limits.memory;
	pl->budget = ULONG_MAX;  /* until the first arm() */
	pl->L = lua_newstate(lalloc, pl);
	if (!pl->L)
		goto fail;
	lua_atpanic(pl->L, panic);
	arm(pl, pl->limits.load_instructions, pl->limits.load_seconds);
	lua_pushcfunction(pl->L, setup);
	if (lua_pcall(pl->L, 0, 0, 0) != LUA_OK) {
		rq_config_diag_add(diag, 0, false, "cannot set up the Lua sandbox");
		goto fail;
	}
	size_t errors = diag->errors;
	chunkname = malloc(strlen(name) + 2);
	if (!chunkname)
		goto fail;
	chunkname[0] = '@';
	strcpy(chunkname + 1, name);
	pl->loading = true;
	pl->cfg = cfg;
	pl->diag = diag;
	pl->src = src;
	pl->srclen = len;
	struct run_ctx ctx = {src, len, chunkname};
	arm(pl, pl->limits.load_instructions, pl->limits.load_seconds);
	lua_pushcfunction(pl->L, run_file);
	lua_pushlightuserdata(pl->L, &ctx);
	int st = lua_pcall(pl->L, 1, 0, 0);
	if (st != LUA_OK)
		load_error(pl, pl->L, st);
	lua_settop(pl->L, 0);
	pl->loading = false;
	pl->cfg = NULL;
	pl->diag = NULL;
	pl->src = NULL;
	pl->srclen = 0;
	free(chunkname);
	chunkname = NULL;
	if (diag->errors > errors)
		goto fail;
	/* Library tables and globals become read-only for the handlers. */
	arm(pl, pl->limits.load_instructions, pl->limits.load_seconds);
	lua_pushcfunction(pl->L, freeze);
	if (lua_pcall(pl->L, 0, 0, 0) != LUA_OK) {
		rq_config_diag_add(diag, 0, false, "cannot freeze the Lua globals "
				   "(memory cap reached?)");
		goto fail;
	}
	lua_settop(pl->L, 0);
	/* Handlers never run against the load's leftovers. */
	arm(pl, pl->limits.load_instructions, pl->limits.load_seconds);
	lua_gc(pl->L, LUA_GCCOLLECT);
	return pl;
fail:
	free(chunkname);
	rq_policy_lua_destroy(pl);
	return NULL;
}

struct rq_policy_lua *rq_policy_lua_load(const char *path, struct rq_config *cfg,
					 const struct rq_policy_lua_limits *limits,
					 struct rq_config_diag *diag)
{
	struct rq_policy_lua *pl = NULL;
	char *buf = NULL;
	FILE *f = fopen(path, "rb");
	if (!f) {
		rq_config_diag_add(diag, 0, false, "cannot open %s: %s", path, strerror(errno));
		return NULL;
	}
	buf = malloc(SRC_MAX + 1);
	if (!buf) {
		rq_config_diag_add(diag, 0, false, "out of memory");
		goto cleanup;
	}
	size_t n = fread(buf, 1, SRC_MAX + 1, f);
	if (ferror(f)) {
		rq_config_diag_add(diag, 0, false, "cannot read %s", path);
		goto cleanup;
	}
	if (n > SRC_MAX) {
		rq_config_diag_add(diag, 0, false, "%s is larger than %u bytes", path, SRC_MAX);
		goto cleanup;
	}
	buf[n] = '\0';
	pl = rq_policy_lua_load_buffer(path, buf, n, cfg, limits, diag);
cleanup:
	free(buf);
	fclose(f);
	return pl;
}

void rq_policy_lua_destroy(struct rq_policy_lua *pl)
{
	if (!pl)
		return;
	if (pl->L) {
		/* Finalizers run at close: keep them on a budget. */
		arm(pl, pl->limits.instructions, pl->limits.seconds);
		lua_close(pl->L);
	}
	free(pl->global.v);
	for (size_t i = 0; i < pl->ndoms; i++) {
		free(pl->doms[i].name);
		free(pl->doms[i].r.v);
	}
	free(pl->doms);
	free(pl);
}

/* ---- decisions ---- */

/* The most specific rule for o: domain rules before global ones at each
 * level. Writes the selector key; returns the domain scope via *scope. */
static bool find_rule(const struct rq_policy_lua *pl, const struct rq_outcome *o,
		      const char *domain, const char **scope, char key[SEL_MAX])
{
	if (!pl || pl->st.rules == 0)
		return false;
	char cand[SEL_KINDS_][SEL_MAX];
	size_t nc = 0;
	if (o->enhanced[0] && strlen(o->enhanced) < SEL_MAX)
		snprintf(cand[nc++], SEL_MAX, "%s", o->enhanced);
	if (o->code >= 400 && o->code <= 599) {
		snprintf(cand[nc++], SEL_MAX, "%d", o->code);
		snprintf(cand[nc++], SEL_MAX, "%dxx", o->code / 100);
	}
	if (o->fail != RQ_FAIL_NONE)
		snprintf(cand[nc++], SEL_MAX, "%s", rq_fail_name(o->fail));
	snprintf(cand[nc++], SEL_MAX, "*");
	const struct dom_rules *d = dom_find(pl, domain);
	for (size_t i = 0; i < nc; i++) {
		if (d && rules_find(&d->r, cand[i])) {
			*scope = d->name;
			memcpy(key, cand[i], SEL_MAX);
			return true;
		}
		if (rules_find(&pl->global, cand[i])) {
			*scope = NULL;
			memcpy(key, cand[i], SEL_MAX);
			return true;
		}
	}
	return false;
}

bool rq_policy_lua_rule_for(const struct rq_policy_lua *pl,
			    const struct rq_outcome *o, const char *domain,
			    char *rule, size_t len)
{
	const char *scope = NULL;
	char key[SEL_MAX];
	if (!find_rule(pl, o, domain, &scope, key))
		return false;
	snprintf(rule, len, "lua:%s%s%s", scope ? scope : "", scope ? ":" : "", key);
	return true;
}

enum call_result { CALL_NIL = 0, CALL_ACTION, CALL_ERROR };
enum call_err { ERR_RUNTIME = 0, ERR_BUDGET, ERR_MEMORY, ERR_RESULT };

/* What made a call fail: the memory cap, the budget (which allocations
 * pay too: a failed allocation with the budget gone is a budget error). */
static enum call_err err_kind(const struct rq_policy_lua *pl, int st)
{
	if (st == LUA_ERRMEM)
		return pl->budget_alloc_failed ? ERR_BUDGET : ERR_MEMORY;
	if (pl->budget_hit)
		return ERR_BUDGET;
	return pl->mem_hit ? ERR_MEMORY : ERR_RUNTIME;
}

struct call {
	const char *scope;
	const char *key;
	const struct rq_policy_input *in;
	const struct rq_policy_msg *msg;
	enum call_result result;
	enum call_err err_kind;
	enum rq_policy_action action;
	bool has_after;
	double after;
	char reason[RQ_POLICY_REASON_MAX];
	char err[ERR_MAX];
};

static void set_str(lua_State *L, const char *k, const char *v)
{
	if (!v)
		return;
	lua_pushstring(L, v);
	lua_setfield(L, -2, k);
}

/* Pushes a JSON value as Lua (objects and arrays as tables). */
static void push_json(lua_State *L, const struct rq_json *v)
{
	luaL_checkstack(L, 4, "meta nested too deep");
	switch (v->type) {
	case RQ_JSON_NULL: lua_pushnil(L); break;
	case RQ_JSON_BOOL: lua_pushboolean(L, v->boolean); break;
	case RQ_JSON_NUMBER:
		if (v->is_int)
			lua_pushinteger(L, (lua_Integer)v->integer);
		else
			lua_pushnumber(L, v->number);
		break;
	case RQ_JSON_STRING: lua_pushlstring(L, v->str, v->len); break;
	case RQ_JSON_ARRAY: {
		lua_createtable(L, (int)(v->count < 1000 ? v->count : 1000), 0);
		lua_Integer i = 1;
		for (const struct rq_json *c = v->child; c; c = c->next) {
			push_json(L, c);
			lua_rawseti(L, -2, i++);
		}
		break;
	}
	case RQ_JSON_OBJECT:
		lua_createtable(L, 0, (int)(v->count < 1000 ? v->count : 1000));
		for (const struct rq_json *c = v->child; c; c = c->next) {
			lua_pushlstring(L, c->key, c->key_len);
			push_json(L, c);
			lua_rawset(L, -3);
		}
		break;
	}
}

static int json_to_lua(lua_State *L)
{
	const struct rq_json *j = lua_touserdata(L, 1);
	push_json(L, j);
	return 1;
}

/* msg.meta: the JSON object as a table, nil when absent or not JSON. The
 * conversion runs protected so the tree is freed whatever happens. */
static void push_meta(lua_State *L, const char *meta)
{
	char err[64];
	struct rq_json *j = meta ? rq_json_parse(meta, strlen(meta), RQ_JSON_LAX_UTF8,
						  err, sizeof(err)) : NULL;
	if (!j) {
		lua_pushnil(L);
		return;
	}
	lua_pushcfunction(L, json_to_lua);
	lua_pushlightuserdata(L, j);
	int st = lua_pcall(L, 1, 1, 0);
	rq_json_free(j);
	if (st != LUA_OK) {
		lua_pop(L, 1);
		lua_pushnil(L);
	}
}

static int call_handler(lua_State *L)
{
	struct call *c = lua_touserdata(L, 1);
	struct rq_policy_lua *pl = owner(L);
	const struct rq_policy_input *in = c->in;
	const struct rq_outcome *o = in->outcome;
	lua_settop(L, 0);
	lua_pushcfunction(L, msgh);
	lua_getfield(L, LUA_REGISTRYINDEX, c->scope ? DRULES_KEY : RULES_KEY);
	if (c->scope)
		lua_getfield(L, -1, c->scope);
	lua_getfield(L, -1, c->key);
	if (lua_type(L, -1) != LUA_TFUNCTION)
		return luaL_error(L, "rule %s has no function", c->key);

	lua_createtable(L, 0, 10);
	if (o->code > 0) {
		lua_pushinteger(L, o->code);
		lua_setfield(L, -2, "code");
	}
	if (o->enhanced[0])
		set_str(L, "enhanced", o->enhanced);
	set_str(L, "text", o->text);
	set_str(L, "stage", rq_stage_name(o->stage));
	if (o->fail != RQ_FAIL_NONE)
		set_str(L, "event", rq_fail_name(o->fail));
	set_str(L, "recipient", in->recipient);
	set_str(L, "host", in->host);
	set_str(L, "domain", in->domain);
	lua_pushinteger(L, in->attempt ? in->attempt : 1);
	lua_setfield(L, -2, "attempt");
	lua_pushnumber(L, in->age);
	lua_setfield(L, -2, "age");

	lua_createtable(L, 0, 6);
	const struct rq_policy_msg *m = c->msg;
	if (m) {
		set_str(L, "id", m->id);
		set_str(L, "from", m->from);
		lua_createtable(L, (int)(m->nto < 1000 ? m->nto : 1000), 0);
		for (size_t i = 0; i < m->nto; i++) {
			lua_pushstring(L, m->to[i] ? m->to[i] : "");
			lua_rawseti(L, -2, (lua_Integer)i + 1);
		}
		lua_setfield(L, -2, "to");
		lua_pushinteger(L, m->attempts);
		lua_setfield(L, -2, "attempts");
		lua_pushnumber(L, m->created);
		lua_setfield(L, -2, "created");
		push_meta(L, m->meta);
		lua_setfield(L, -2, "meta");
	}

	arm(pl, pl->limits.instructions, pl->limits.seconds);
	int st = lua_pcall(L, 2, 1, 1);
	if (st != LUA_OK) {
		c->result = CALL_ERROR;
		c->err_kind = err_kind(pl, st);
		if (st == LUA_ERRMEM && c->err_kind == ERR_BUDGET)
			snprintf(c->err, sizeof(c->err), "instruction budget exceeded (%lu "
				 "instructions): allocations count too", pl->budget);
		else if (st == LUA_ERRMEM)
			snprintf(c->err, sizeof(c->err), "memory cap of %zu bytes reached",
				 pl->mem_cap);
		else
			copy_error(L, -1, c->err, sizeof(c->err));
		return 0;
	}
	if (lua_isnil(L, -1)) {
		c->result = CALL_NIL;
		return 0;
	}
	bool is_action = false;
	if (lua_type(L, -1) == LUA_TTABLE && lua_getmetatable(L, -1)) {
		luaL_getmetatable(L, ACTION_MT);
		is_action = lua_rawequal(L, -1, -2);
		lua_pop(L, 2);
	}
	if (!is_action) {
		c->result = CALL_ERROR;
		c->err_kind = ERR_RESULT;
		snprintf(c->err, sizeof(c->err), "handler returned a %s, not an action "
			 "(relayq.retry{}, fail{}, drop(), hold(), suspend{} or nil)",
			 luaL_typename(L, -1));
		return 0;
	}
	int t = lua_gettop(L);
	lua_pushliteral(L, "action");
	lua_rawget(L, t);
	const char *a = lua_tostring(L, -1);
	static const struct {
		const char *name;
		enum rq_policy_action action;
	} map[] = {
		{"retry", RQ_POLICY_RETRY}, {"fail", RQ_POLICY_FAIL},
		{"drop", RQ_POLICY_DROP}, {"hold", RQ_POLICY_HOLD},
		{"suspend", RQ_POLICY_SUSPEND},
	};
	bool found = false;
	for (size_t i = 0; a && i < sizeof(map) / sizeof(map[0]); i++) {
		if (strcmp(a, map[i].name) == 0) {
			c->action = map[i].action;
			found = true;
		}
	}
	if (!found) {
		c->result = CALL_ERROR;
		c->err_kind = ERR_RESULT;
		snprintf(c->err, sizeof(c->err), "handler returned an altered action");
		return 0;
	}
	lua_pushliteral(L, "after");
	lua_rawget(L, t);
	if (lua_type(L, -1) == LUA_TNUMBER) {
		double d = lua_tonumber(L, -1);
		if (isfinite(d) && d >= 0 && d <= 366 * 86400.0) {
			c->has_after = true;
			c->after = d < 1 ? 1 : d;
		}
	}
	lua_pushliteral(L, "reason");
	lua_rawget(L, t);
	if (lua_type(L, -1) == LUA_TSTRING) {
		size_t n;
		const char *s = lua_tolstring(L, -1, &n);
		if (n >= sizeof(c->reason))
			n = sizeof(c->reason) - 1;
		memcpy(c->reason, s, n);
		c->reason[n] = '\0';
		for (char *p = c->reason; p < c->reason + n; p++)
			if ((unsigned char)*p < 0x20 || *p == 0x7f)
				*p = ' ';
	}
	c->result = CALL_ACTION;
	return 0;
}

static int collect(lua_State *L)
{
	lua_gc(L, LUA_GCCOLLECT);
	return 0;
}

static void report_error(struct rq_policy_lua *pl, const char *rule,
			 const struct call *c)
{
	pl->st.errors++;
	switch (c->err_kind) {
	case ERR_RUNTIME: pl->st.runtime_errors++; break;
	case ERR_BUDGET: pl->st.budget_errors++; break;
	case ERR_MEMORY: pl->st.memory_errors++; break;
	case ERR_RESULT: pl->st.bad_results++; break;
	}
	snprintf(pl->last_error, sizeof(pl->last_error), "%s: %.900s", rule, c->err);
	for (size_t i = 0; i < pl->nlogged; i++)
		if (strcmp(pl->logged[i], rule) == 0)
			return;
	if (pl->nlogged < LOGGED_MAX)
		snprintf(pl->logged[pl->nlogged++], RQ_POLICY_RULE_MAX, "%s", rule);
	else if (pl->nlogged == LOGGED_MAX)
		return;
	static const char *const kinds[] = {"runtime", "budget", "memory", "result"};
	rq_log(RQ_LOG_ERROR, "policy_error", "rule", rule, "kind", kinds[c->err_kind],
	       "error", c->err, "note", "built-in decision applied; logged once per rule "
	       "per load", NULL);
}

void rq_policy_lua_decide(struct rq_policy_lua *pl,
			  const struct rq_policy_params *params,
			  const struct rq_policy_input *in,
			  const struct rq_policy_msg *msg,
			  const struct rq_policy_rand *rnd,
			  struct rq_policy_answer *out)
{
	rq_policy_builtin(params, in, rnd, out);
	if (!pl || out->action == RQ_POLICY_DELIVERED ||
	    out->action == RQ_POLICY_NOT_TRIED)
		return;
	const char *scope = NULL;
	char key[SEL_MAX];
	if (!find_rule(pl, in->outcome, in->domain, &scope, key))
		return;
	char rule[RQ_POLICY_RULE_MAX];
	snprintf(rule, sizeof(rule), "lua:%s%s%s", scope ? scope : "", scope ? ":" : "",
		 key);

	struct call c;
	memset(&c, 0, sizeof(c));
	c.scope = scope;
	c.key = key;
	c.in = in;
	c.msg = msg;
	lua_State *L = pl->L;
	pl->st.calls++;
	arm(pl, pl->limits.instructions, pl->limits.seconds);
	lua_pushcfunction(L, call_handler);
	lua_pushlightuserdata(L, &c);
	int st = lua_pcall(L, 1, 0, 0);
	if (st != LUA_OK && c.result != CALL_ERROR) {
		c.result = CALL_ERROR;
		c.err_kind = err_kind(pl, st);
		if (st == LUA_ERRMEM && c.err_kind == ERR_BUDGET)
			snprintf(c.err, sizeof(c.err), "instruction budget exceeded "
				 "preparing the call");
		else if (st == LUA_ERRMEM)
			snprintf(c.err, sizeof(c.err), "memory cap reached preparing the call");
		else
			copy_error(L, -1, c.err, sizeof(c.err));
	}
	lua_settop(L, 0);
	if (c.result == CALL_ERROR) {
		/* A failed handler may leave much garbage (a runaway loop):
		 * collect now, on a fresh budget. Errors are rare. */
		arm(pl, pl->limits.instructions, pl->limits.seconds);
		lua_pushcfunction(L, collect);
		lua_pcall(L, 0, 0, 0);
		lua_settop(L, 0);
	}
	lua_sethook(L, hook, LUA_MASKCOUNT, HOOK_EVERY);

	char what[200];
	rq_policy_describe(in->outcome, what, sizeof(what));
	if (c.result == CALL_ERROR) {
		report_error(pl, rule, &c);
		char first[160];
		snprintf(first, sizeof(first), "%.159s", c.err);
		char *nl = strchr(first, '\n');
		if (nl)
			*nl = '\0';
		size_t len = strlen(out->reason);
		snprintf(out->reason + len, sizeof(out->reason) - len, "; %s error: %s",
			 rule, first);
		return;
	}
	if (c.result == CALL_NIL)
		return;

	struct rq_policy_answer b = *out;
	memset(out, 0, sizeof(*out));
	out->action = c.action;
	snprintf(out->rule, sizeof(out->rule), "%s", rule);
	bool builtin_retry = b.action == RQ_POLICY_RETRY || b.action == RQ_POLICY_NEXT_HOST;
	switch (c.action) {
	case RQ_POLICY_RETRY:
		out->after = c.has_after ? c.after :
			     rq_policy_backoff(&params->backoff, in->attempt, rnd);
		out->counts = builtin_retry ? b.counts : RQ_POLICY_COUNT_MESSAGE;
		if (out->counts == RQ_POLICY_COUNT_NONE)
			out->counts = RQ_POLICY_COUNT_MESSAGE;
		out->loud = b.loud;
		snprintf(out->reason, sizeof(out->reason), "%s: retry: %s", rule, what);
		rq_policy_expire(params, in, out);
		return;
	case RQ_POLICY_SUSPEND:
		out->after = c.has_after ? c.after :
			     rq_policy_backoff(&params->backoff, in->attempt, rnd);
		out->counts = RQ_POLICY_COUNT_DESTINATION;
		snprintf(out->reason, sizeof(out->reason), "%s: suspend destination: %s",
			 rule, what);
		return;
	case RQ_POLICY_FAIL:
		out->counts = RQ_POLICY_COUNT_MESSAGE;
		if (c.reason[0])
			snprintf(out->reason, sizeof(out->reason), "%s", c.reason);
		else
			snprintf(out->reason, sizeof(out->reason), "%s: fail: %s", rule, what);
		return;
	case RQ_POLICY_DROP:
		snprintf(out->reason, sizeof(out->reason), "%s: drop: %s", rule, what);
		return;
	case RQ_POLICY_HOLD:
		snprintf(out->reason, sizeof(out->reason), "%s: hold: %s", rule, what);
		return;
	default:
		*out = b;
		return;
	}
}

void rq_policy_lua_decide_config(const struct rq_config *cfg,
				 const struct rq_policy_input *in,
				 const struct rq_policy_msg *msg,
				 const struct rq_policy_rand *rnd,
				 struct rq_policy_answer *out)
{
	struct rq_policy_params params;
	rq_config_params(cfg, in->domain, &params);
	rq_policy_lua_decide(cfg ? cfg->lua : NULL, &params, in, msg, rnd, out);
}

void rq_policy_lua_stats(const struct rq_policy_lua *pl,
			 struct rq_policy_lua_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (!pl)
		return;
	*out = pl->st;
	out->memory = pl->mem_used;
	out->memory_peak = pl->mem_peak;
}

const char *rq_policy_lua_last_error(const struct rq_policy_lua *pl)
{
	return pl ? pl->last_error : "";
}

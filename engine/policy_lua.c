/*
 * policy_lua: the Lua policy. Rules (selector -> handler), the actions a
 * handler returns, the handler calls, and the decisions built from the
 * built-in one and a rule. The state is a lua_sandbox owned here; the
 * config file that registers the rules is run by config_lua.
 */
#include "relayq/policy_lua.h"

#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <lauxlib.h>
#include <lua.h>

#include "relayq/err.h"
#include "relayq/json.h"
#include "relayq/log.h"
#include "relayq/lua_sandbox.h"

#define RULES_KEY "relayq.rules"          /* registry: selector -> fn */
#define DRULES_KEY "relayq.domain_rules"  /* registry: domain -> {selector -> fn} */
#define ACTION_MT "relayq.action"
#define SEL_MAX 24
#define MAX_RULES 1024
#define LOGGED_MAX 32
#define ERR_MAX 1024

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
	struct rq_lua_sandbox *sb;
	lua_State *L;
	struct rq_policy_lua_limits limits;
	struct rules global;
	struct dom_rules *doms;
	size_t ndoms;
	struct rq_policy_lua_stats st;
	char last_error[ERR_MAX];
	char logged[LOGGED_MAX][RQ_POLICY_RULE_MAX];
	size_t nlogged;
	struct rq_config_diag *diag;  /* while the file loads, else NULL */
};

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
		/* a local fault never reaches a rule (decision.c) */
		if (f == RQ_FAIL_LOCAL)
			continue;
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


static int l_on(lua_State *L)
{
	struct rq_policy_lua *pl = lua_touserdata(L, lua_upvalueindex(1));
	if (!pl->diag)
		return luaL_error(L, "%s can only be called while the config file loads",
				  "relayq.on");
	int line = rq_lua_sandbox_caller_line(L);
	if (lua_gettop(L) != 2) {
		rq_config_diag_add(pl->diag, line, false,
				   "relayq.on: expected (selector, function)");
		return 0;
	}
	lua_getfield(L, LUA_REGISTRYINDEX, RULES_KEY);
	register_rule(L, pl, NULL, lua_absindex(L, -1), 1, 2, line);
	return 0;
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


/* ---- create ---- */

/* The registries, the action metatable and relayq (upvalue 1 of the
 * functions: pl). */
static int setup(lua_State *L)
{
	struct rq_policy_lua *pl = lua_touserdata(L, 1);
	lua_newtable(L);
	lua_setfield(L, LUA_REGISTRYINDEX, RULES_KEY);
	lua_newtable(L);
	lua_setfield(L, LUA_REGISTRYINDEX, DRULES_KEY);
	luaL_newmetatable(L, ACTION_MT);
	lua_pushliteral(L, "relayq.action");
	lua_setfield(L, -2, "__metatable");
	lua_pop(L, 1);

	lua_newtable(L);
	lua_pushlightuserdata(L, pl);
	lua_pushcclosure(L, l_on, 1);
	lua_setfield(L, -2, "on");
	static const char *const actions[] = {"retry", "fail", "drop", "hold", "suspend"};
	for (size_t i = 0; i < 5; i++) {
		lua_pushstring(L, actions[i]);
		lua_pushcclosure(L, l_action, 1);
		lua_setfield(L, -2, actions[i]);
	}
	lua_setglobal(L, "relayq");
	return 0;
}

void rq_policy_lua_destroy(struct rq_policy_lua *pl)
{
	if (!pl)
		return;
	if (pl->sb) {
		/* Finalizers run at close: keep them on a budget. */
		rq_lua_sandbox_arm(pl->sb, pl->limits.instructions, pl->limits.seconds);
		rq_lua_sandbox_destroy(pl->sb);
	}
	free(pl->global.v);
	for (size_t i = 0; i < pl->ndoms; i++) {
		free(pl->doms[i].name);
		free(pl->doms[i].r.v);
	}
	free(pl->doms);
	free(pl);
}

struct rq_policy_lua *rq_policy_lua_create(const struct rq_policy_lua_limits *limits,
					   char *err, size_t errlen)
{
	struct rq_policy_lua *pl = calloc(1, sizeof(*pl));
	if (!pl) {
		rq_err_set(err, errlen, "out of memory");
		return NULL;
	}
	pl->limits.memory = limits && limits->memory ? limits->memory : RQ_POLICY_LUA_MEMORY;
	pl->limits.instructions = limits && limits->instructions ?
		limits->instructions : RQ_POLICY_LUA_INSTRUCTIONS;
	pl->limits.load_instructions = limits && limits->load_instructions ?
		limits->load_instructions : RQ_POLICY_LUA_LOAD_INSTRUCTIONS;
	pl->limits.seconds = limits && limits->seconds > 0 ? limits->seconds :
		RQ_POLICY_LUA_SECONDS;
	pl->limits.load_seconds = limits && limits->load_seconds > 0 ?
		limits->load_seconds : RQ_POLICY_LUA_LOAD_SECONDS;
	struct rq_lua_sandbox_opts opts = {
		.memory = pl->limits.memory, .print_event = "policy_print",
	};
	pl->sb = rq_lua_sandbox_create(&opts, err, errlen);
	if (!pl->sb)
		goto fail;
	pl->L = rq_lua_sandbox_state(pl->sb);
	rq_lua_sandbox_arm(pl->sb, pl->limits.load_instructions, pl->limits.load_seconds);
	lua_pushcfunction(pl->L, setup);
	lua_pushlightuserdata(pl->L, pl);
	if (lua_pcall(pl->L, 1, 0, 0) != LUA_OK) {
		rq_err_set(err, errlen, "cannot set up the Lua sandbox");
		goto fail;
	}
	lua_settop(pl->L, 0);
	return pl;
fail:
	rq_policy_lua_destroy(pl);
	return NULL;
}

struct rq_lua_sandbox *rq_policy_lua_sandbox(struct rq_policy_lua *pl)
{
	return pl->sb;
}

const struct rq_policy_lua_limits *rq_policy_lua_limits_of(const struct rq_policy_lua *pl)
{
	return &pl->limits;
}

void rq_policy_lua_load_begin(struct rq_policy_lua *pl, struct rq_config_diag *diag)
{
	pl->diag = diag;
}

void rq_policy_lua_load_end(struct rq_policy_lua *pl)
{
	pl->diag = NULL;
}

void rq_policy_lua_add_rule(struct rq_policy_lua *pl, const char *domain,
			    int sidx, int fidx, int line)
{
	lua_State *L = pl->L;
	sidx = lua_absindex(L, sidx);
	fidx = lua_absindex(L, fidx);
	lua_getfield(L, LUA_REGISTRYINDEX, domain ? DRULES_KEY : RULES_KEY);
	if (domain && lua_getfield(L, -1, domain) != LUA_TTABLE) {
		lua_pop(L, 1);
		lua_newtable(L);
		lua_pushvalue(L, -1);
		lua_setfield(L, -3, domain);
	}
	register_rule(L, pl, domain, lua_absindex(L, -1), sidx, fidx, line);
	lua_pop(L, domain ? 2 : 1);
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
	switch (rq_lua_sandbox_failure(pl->sb, st)) {
	case RQ_LUA_SANDBOX_FAIL_BUDGET: return ERR_BUDGET;
	case RQ_LUA_SANDBOX_FAIL_MEMORY: return ERR_MEMORY;
	case RQ_LUA_SANDBOX_FAIL_RUNTIME: break;
	}
	return ERR_RUNTIME;
}

struct call {
	struct rq_policy_lua *pl;
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
	struct rq_policy_lua *pl = c->pl;
	const struct rq_policy_input *in = c->in;
	const struct rq_outcome *o = in->outcome;
	lua_settop(L, 0);
	lua_pushcfunction(L, rq_lua_sandbox_traceback);
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

	rq_lua_sandbox_arm(pl->sb, pl->limits.instructions, pl->limits.seconds);
	int st = lua_pcall(L, 2, 1, 1);
	if (st != LUA_OK) {
		struct rq_lua_sandbox_usage u;
		rq_lua_sandbox_usage(pl->sb, &u);
		c->result = CALL_ERROR;
		c->err_kind = err_kind(pl, st);
		if (st == LUA_ERRMEM && c->err_kind == ERR_BUDGET)
			snprintf(c->err, sizeof(c->err), "instruction budget exceeded (%lu "
				 "instructions): allocations count too", u.budget);
		else if (st == LUA_ERRMEM)
			snprintf(c->err, sizeof(c->err), "memory cap of %zu bytes reached",
				 u.memory_cap);
		else
			rq_lua_sandbox_error_text(L, -1, c->err, sizeof(c->err));
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

/* out->after (and its range): the handler's `after`, or the backoff. */
static void after_of(struct rq_policy_answer *out, const struct call *c,
		     const struct rq_policy_params *params, const struct rq_policy_input *in,
		     const struct rq_policy_rand *rnd)
{
	if (c->has_after) {
		out->after = out->after_min = out->after_max = c->after;
		return;
	}
	out->after = rq_policy_backoff(&params->backoff, in->attempt, rnd);
	rq_policy_backoff_range(&params->backoff, in->attempt, &out->after_min,
				&out->after_max);
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
	c.pl = pl;
	c.scope = scope;
	c.key = key;
	c.in = in;
	c.msg = msg;
	lua_State *L = pl->L;
	pl->st.calls++;
	rq_lua_sandbox_arm(pl->sb, pl->limits.instructions, pl->limits.seconds);
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
			rq_lua_sandbox_error_text(L, -1, c.err, sizeof(c.err));
	}
	lua_settop(L, 0);
	if (c.result == CALL_ERROR) {
		/* A failed handler may leave much garbage (a runaway loop):
		 * collect now, on a fresh budget. Errors are rare. */
		rq_lua_sandbox_arm(pl->sb, pl->limits.instructions, pl->limits.seconds);
		rq_lua_sandbox_collect(pl->sb);
	}

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
		after_of(out, &c, params, in, rnd);
		out->counts = builtin_retry ? b.counts : RQ_POLICY_COUNT_MESSAGE;
		if (out->counts == RQ_POLICY_COUNT_NONE)
			out->counts = RQ_POLICY_COUNT_MESSAGE;
		out->loud = b.loud;
		snprintf(out->reason, sizeof(out->reason), "%s: retry: %s", rule, what);
		rq_policy_expire(params, in, out);
		return;
	case RQ_POLICY_SUSPEND:
		after_of(out, &c, params, in, rnd);
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
	struct rq_lua_sandbox_usage u;
	rq_lua_sandbox_usage(pl->sb, &u);
	out->memory = u.memory;
	out->memory_peak = u.memory_peak;
}

const char *rq_policy_lua_last_error(const struct rq_policy_lua *pl)
{
	return pl ? pl->last_error : "";
}

/*
 * config_lua: reads the one config file. Runs it in the policy's sandbox
 * with relayq.config / backoff / expire / on_domain / listen / getenv, walks the
 * tables it passes and hands every key to config.c (rq_config_apply) and
 * every rule to policy_lua. Never touches the network.
 */
#include "relayq/config_lua.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>

#include "relayq/clock.h"
#include "relayq/lua_sandbox.h"
#include "relayq/policy_lua.h"

#define MAX_KEYS 256
#define ERR_MAX 1024
#define SRC_MAX (4u << 20)

/* The file being loaded: a userdata of the state (upvalue of the relayq.*
 * functions), so a handler calling them later finds it inactive instead
 * of a dangling pointer. */
struct load {
	bool active;
	struct rq_policy_lua *pl;
	struct rq_config *cfg;
	struct rq_config_diag *diag;
	const char *src;
	size_t srclen;
};

/* ---- lines ---- */

static bool ident_char(char c)
{
	return isalnum((unsigned char)c) || c == '_';
}

/*
 * The line of `key = ` (or ["key"] =) at or after line `from` in the
 * source: keys of a table given to relayq.config have no line of their
 * own at run time, so the source is searched. Falls back to `from`.
 */
static int key_line(const struct load *ld, int from, const char *key)
{
	if (!ld->src || from <= 0)
		return from;
	size_t klen = strlen(key);
	const char *p = ld->src, *end = ld->src + ld->srclen;
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

static void domain_on(lua_State *L, struct load *ld, const char *domain,
		      int vidx, int line);

/*
 * Hands every key of the table at tidx to rq_config_apply. prefix is the
 * dotted path so far ("" at the top); base is the line to search keys from.
 */
static void walk(lua_State *L, struct load *ld, enum rq_config_section sec,
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
				rq_config_diag_add(ld->diag, base, false,
						   "invalid key \"%.40s\" in %s", s,
						   prefix[0] ? prefix : "the table");
				continue;
			}
			memcpy(k->name, s, len + 1);
			k->line = key_line(ld, base, k->name);
		} else if (lua_isinteger(L, -1)) {
			k->is_index = true;
			k->idx = lua_tointeger(L, -1);
			k->line = base;
		} else {
			rq_config_diag_add(ld->diag, base, false, "invalid key of type %s in %s",
					   luaL_typename(L, -1),
					   prefix[0] ? prefix : "the table");
			continue;
		}
		n++;
	}
	if (too_many)
		rq_config_diag_add(ld->diag, base, false, "more than %d keys in %s",
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
			domain_on(L, ld, domain, -1, k->line);
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
		int r = rq_config_apply(ld->cfg, sec, full, &v, k->line, ld->diag);
		if (r == 0 && v.type == RQ_CONFIG_TABLE) {
			if (depth >= 2)
				rq_config_diag_add(ld->diag, k->line, false, "%s: nested too deep",
						   full);
			else
				walk(L, ld, sec, domain, -1, full, k->line, depth + 1);
		}
		lua_pop(L, 1);
	}
	lua_pop(L, 1);  /* keys */
}

static void domain_on(lua_State *L, struct load *ld, const char *domain,
		      int vidx, int line)
{
	vidx = lua_absindex(L, vidx);
	if (lua_type(L, vidx) != LUA_TTABLE) {
		rq_config_diag_add(ld->diag, line, false,
				   "on: expected a table of selector = function, got a %s",
				   luaL_typename(L, vidx));
		return;
	}
	lua_pushnil(L);
	while (lua_next(L, vidx)) {
		/* Key at -2, function at -1. Copy the key so lua_next can go on
		 * (selectors are not converted in place). */
		int kline = line;
		if (lua_type(L, -2) == LUA_TSTRING) {
			char pat[48];
			snprintf(pat, sizeof(pat), "%.40s", lua_tostring(L, -2));
			kline = key_line(ld, line, pat);
		} else if (lua_isinteger(L, -2)) {
			char pat[48];
			snprintf(pat, sizeof(pat), "%lld", (long long)lua_tointeger(L, -2));
			kline = key_line(ld, line, pat);
		}
		rq_policy_lua_add_rule(ld->pl, domain, -2, -1, kline);
		lua_pop(L, 1);
	}
}

/* ---- relayq.* functions ---- */

/* The load in progress (upvalue 1 of the relayq.* functions); raises an
 * error when the file has finished loading (a handler calling them). */
static struct load *loading(lua_State *L, const char *fn)
{
	struct load *ld = lua_touserdata(L, lua_upvalueindex(1));
	if (!ld || !ld->active)
		luaL_error(L, "%s can only be called while the config file loads", fn);
	return ld;
}

static int section(lua_State *L, enum rq_config_section sec, const char *fn)
{
	struct load *ld = loading(L, fn);
	int line = rq_lua_sandbox_caller_line(L);
	if (lua_type(L, 1) != LUA_TTABLE) {
		rq_config_diag_add(ld->diag, line, false, "%s: expected a table, got a %s",
				   fn, luaL_typename(L, 1));
		return 0;
	}
	if (rq_config_section_begin(ld->cfg, sec, NULL, line, ld->diag) < 0)
		return 0;
	walk(L, ld, sec, NULL, 1, "", line, 0);
	rq_config_section_end(ld->cfg, sec, line, ld->diag);
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

/* relayq.listen { "ip:port", key = value, ... }: one listener a call. */
static int l_listen(lua_State *L)
{
	return section(L, RQ_CONFIG_SEC_LISTEN, "relayq.listen");
}


static int l_on_domain(lua_State *L)
{
	struct load *ld = loading(L, "relayq.on_domain");
	int line = rq_lua_sandbox_caller_line(L);
	if (lua_type(L, 1) != LUA_TSTRING || lua_type(L, 2) != LUA_TTABLE) {
		rq_config_diag_add(ld->diag, line, false,
				   "relayq.on_domain: expected (\"domain\", { settings })");
		return 0;
	}
	size_t len;
	const char *name = lua_tolstring(L, 1, &len);
	if (strlen(name) != len) {
		rq_config_diag_add(ld->diag, line, false,
				   "relayq.on_domain: NUL in the domain name");
		return 0;
	}
	if (rq_config_section_begin(ld->cfg, RQ_CONFIG_SEC_DOMAIN, name, line,
				    ld->diag) < 0)
		return 0;
	char lower[256];
	snprintf(lower, sizeof(lower), "%s", name);
	for (char *c = lower; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	walk(L, ld, RQ_CONFIG_SEC_DOMAIN, lower, 2, "", line, 0);
	rq_config_section_end(ld->cfg, RQ_CONFIG_SEC_DOMAIN, line, ld->diag);
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

/* ---- load ---- */

/* relayq.config / backoff / expire / on_domain / getenv into the global
 * relayq (made by policy_lua); returns the load userdata. */
static int setup(lua_State *L)
{
	struct load *ld = lua_newuserdatauv(L, sizeof(*ld), 0);
	memset(ld, 0, sizeof(*ld));
	int u = lua_gettop(L);
	if (lua_getglobal(L, "relayq") != LUA_TTABLE)
		return luaL_error(L, "no relayq table");
	static const luaL_Reg fns[] = {
		{"config", l_config}, {"backoff", l_backoff}, {"expire", l_expire},
		{"on_domain", l_on_domain}, {"getenv", l_getenv}, {"listen", l_listen},
	};
	for (size_t i = 0; i < sizeof(fns) / sizeof(fns[0]); i++) {
		lua_pushvalue(L, u);
		lua_pushcclosure(L, fns[i].func, 1);
		lua_setfield(L, -2, fns[i].name);
	}
	lua_pushvalue(L, u);
	return 1;
}

struct run_ctx {
	const char *src;
	size_t len;
	const char *chunkname;
};

static int run_file(lua_State *L)
{
	struct run_ctx *c = lua_touserdata(L, 1);
	lua_pushcfunction(L, rq_lua_sandbox_traceback);
	int h = lua_gettop(L);
	int st = luaL_loadbufferx(L, c->src, c->len, c->chunkname, "t");
	if (st != LUA_OK)
		return lua_error(L);
	st = lua_pcall(L, 0, 0, h);
	if (st != LUA_OK)
		return lua_error(L);
	return 0;
}

static void load_error(struct rq_lua_sandbox *sb, struct rq_config_diag *diag,
		       int status)
{
	lua_State *L = rq_lua_sandbox_state(sb);
	char msg[ERR_MAX];
	if (status == LUA_ERRMEM) {
		struct rq_lua_sandbox_usage u;
		rq_lua_sandbox_usage(sb, &u);
		snprintf(msg, sizeof(msg), "memory cap of %zu bytes reached", u.memory_cap);
	} else {
		rq_lua_sandbox_error_text(L, -1, msg, sizeof(msg));
	}
	/* Keep the first line (the traceback is noise for a config error). */
	char *nl = strchr(msg, '\n');
	if (nl)
		*nl = '\0';
	const char *rest;
	int line = error_line(msg, &rest);
	rq_config_diag_add(diag, line, false, "%s", rest);
}

/*
 * Arms sb for the next phase of a load that started at t0 (monotonic
 * ms): a fresh instruction budget, but one deadline for all the phases
 * (setup, the file, freezing, the first collection), so a load, and a
 * SIGHUP reload in the daemon's loop, takes at most load_seconds plus
 * the sandbox's margin (lua_sandbox.h), however its time is spread.
 */
static void arm_phase(struct rq_lua_sandbox *sb, const struct rq_policy_lua_limits *lim,
		      int64_t t0)
{
	double left = lim->load_seconds - (double)(rq_clock_mono_ms() - t0) / 1000;
	rq_lua_sandbox_arm(sb, lim->load_instructions, left > 0.001 ? left : 0.001);
}

struct rq_policy_lua *rq_config_lua_run_buffer(const char *name, const char *src,
					       size_t len, struct rq_config *cfg,
					       const struct rq_policy_lua_limits *limits,
					       struct rq_config_diag *diag)
{
	char err[200];
	char *chunkname = NULL;
	int64_t t0 = rq_clock_mono_ms();
	struct rq_policy_lua *pl = rq_policy_lua_create(limits, err, sizeof(err));
	if (!pl) {
		rq_config_diag_add(diag, 0, false, "%s", err);
		return NULL;
	}
	struct rq_lua_sandbox *sb = rq_policy_lua_sandbox(pl);
	lua_State *L = rq_lua_sandbox_state(sb);
	const struct rq_policy_lua_limits *lim = rq_policy_lua_limits_of(pl);
	arm_phase(sb, lim, t0);
	lua_pushcfunction(L, setup);
	if (lua_pcall(L, 0, 1, 0) != LUA_OK) {
		rq_config_diag_add(diag, 0, false, "cannot set up the Lua sandbox");
		goto fail;
	}
	struct load *ld = lua_touserdata(L, -1);
	lua_settop(L, 0);
	size_t errors = diag->errors;
	chunkname = malloc(strlen(name) + 2);
	if (!chunkname)
		goto fail;
	chunkname[0] = '@';
	strcpy(chunkname + 1, name);
	*ld = (struct load){
		.active = true, .pl = pl, .cfg = cfg, .diag = diag,
		.src = src, .srclen = len,
	};
	rq_policy_lua_load_begin(pl, diag);
	struct run_ctx ctx = {src, len, chunkname};
	arm_phase(sb, lim, t0);
	lua_pushcfunction(L, run_file);
	lua_pushlightuserdata(L, &ctx);
	int st = lua_pcall(L, 1, 0, 0);
	if (st != LUA_OK)
		load_error(sb, diag, st);
	lua_settop(L, 0);
	rq_policy_lua_load_end(pl);
	*ld = (struct load){.active = false};
	free(chunkname);
	chunkname = NULL;
	if (diag->errors > errors)
		goto fail;
	/* Library tables and globals become read-only for the handlers. */
	arm_phase(sb, lim, t0);
	static const char *const frozen[] = {"relayq", NULL};
	if (rq_lua_sandbox_freeze(sb, frozen) < 0) {
		rq_config_diag_add(diag, 0, false, "cannot freeze the Lua globals "
				   "(memory cap or load time limit reached?)");
		goto fail;
	}
	/* Handlers never run against the load's leftovers. */
	arm_phase(sb, lim, t0);
	rq_lua_sandbox_collect(sb);
	if (cfg)
		cfg->lua_destroy = rq_policy_lua_destroy;
	return pl;
fail:
	free(chunkname);
	rq_policy_lua_destroy(pl);
	return NULL;
}

struct rq_policy_lua *rq_config_lua_run_file(const char *path, struct rq_config *cfg,
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
	pl = rq_config_lua_run_buffer(path, buf, n, cfg, limits, diag);
cleanup:
	free(buf);
	fclose(f);
	return pl;
}

/* ---- the config ---- */

struct rq_config *rq_config_lua_load(const char *path, unsigned flags,
				     struct rq_config_diag *diag)
{
	struct rq_config *cfg = rq_config_create();
	if (!cfg) {
		rq_config_diag_add(diag, 0, false, "out of memory");
		return NULL;
	}
	cfg->load_flags = flags;
	size_t errors = diag->errors;
	cfg->path = strdup(path);
	cfg->lua = rq_config_lua_run_file(path, cfg, NULL, diag);
	if (!cfg->lua || !cfg->path || diag->errors > errors)
		goto fail;
	if (rq_config_validate(cfg, diag) < 0 || diag->errors > errors)
		goto fail;
	return cfg;
fail:
	if (diag->errors == errors)
		rq_config_diag_add(diag, 0, false, "cannot load the configuration");
	rq_config_destroy(cfg);
	return NULL;
}

int rq_config_lua_reload(struct rq_config **cur, const char *path,
			 struct rq_config_diag *diag)
{
	struct rq_config *cfg = rq_config_lua_load(path, 0, diag);
	if (!cfg)
		return -1;
	rq_config_destroy(*cur);
	*cur = cfg;
	return 0;
}

int rq_config_lua_check(const char *path, FILE *out, FILE *err)
{
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, path);
	struct rq_config *cfg = rq_config_lua_load(path, 0, &diag);
	rq_config_diag_print(&diag, err);
	if (!cfg)
		return 1;
	struct rq_policy_lua_stats st;
	rq_policy_lua_stats(cfg->lua, &st);
	fprintf(out, "%s: ok (%zu policy rules, %zu domains)\n", path, st.rules,
		cfg->ndomains);
	rq_config_destroy(cfg);
	return 0;
}

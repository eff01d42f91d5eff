#ifndef RELAYQ_POLICY_LUA_H
#define RELAYQ_POLICY_LUA_H

/*
 * The Lua policy: selectors, rules (relayq.on, on_domain ... on), actions
 * (relayq.retry / fail / drop / hold / suspend), handler calls, and the
 * decisions that use them. The state the handlers run in is a
 * lua_sandbox (lua_sandbox.h) owned by the policy; the config file that
 * registers the rules is read by config_lua (config_lua.h).
 *
 *   relayq.on(selector, function(r, msg) ... end)
 *   relayq.on_domain("yahoo.com", { per_destination = 5,
 *                                   on = { [550] = function(r, msg) end } })
 *
 * Selectors, most specific first: an enhanced code ("5.7.26"), a reply
 * code (550 or "550"), a class ("4xx", "5xx"), a transport event
 * ("timeout", "refused", "lost", "tls", "dns", "protocol"), "*". At each
 * level a rule of the recipient's domain (on_domain ... on) comes before
 * the global one. 2xx replies and "too many recipients" replies (not a
 * failure) never reach Lua; "2xx" and 2xx codes are refused as selectors.
 *
 * The handler gets r = { code, enhanced, text, stage, event, recipient,
 * host, domain, attempt, age } (code / enhanced / event nil when absent;
 * event is the transport event name) and msg = { id, from, to = {..},
 * attempts, created, meta } (meta: the message's meta object as a table
 * when it is JSON, else nil), and returns one of
 *   relayq.retry { after = D }   retry (D: duration; default the backoff)
 *   relayq.fail { reason = S }   permanent failure
 *   relayq.drop()                discard the recipient
 *   relayq.hold()                park the message
 *   relayq.suspend { after = D } suspend the destination (default backoff)
 *   nil                          the built-in decision
 * A retry is still subject to expiry (max_age, max_attempts).
 *
 * Sandbox (lua_sandbox.h): print logs as policy_print; relayq.getenv
 * (config_lua) reads the environment at load time only. Every handler
 * call has an instruction budget and a wall-clock limit, and the state a
 * memory cap; a call ends within the sandbox's margin of its limit (about
 * 0.1 s), then a failed call gets one full collection (bounded by the
 * memory cap). Loading the file has load_instructions per phase and one
 * deadline of load_seconds for the whole load (config_lua), so a SIGHUP
 * reload holds up the daemon's loop at most load_seconds plus the margin. A handler that errors, runs out of budget, time
 * or memory, or returns something else than an action gets the built-in
 * decision; the error is counted and logged with a traceback once per
 * rule per loaded state.
 *
 * Once the file has run, the handlers share one state but cannot change
 * it for each other: string, table, math, utf8, os and relayq are
 * read-only, "" has a fresh protected metatable, and the globals are
 * read-only (assigning a global in a handler is an error: keep state in
 * a local of the file). The file itself may still add to the libraries
 * and set globals while it loads.
 */

#include <stdbool.h>
#include <stddef.h>

#include "relayq/config.h"
#include "relayq/policy.h"

struct rq_policy_lua;
struct rq_lua_sandbox;

/* 0 in a field: its default. */
struct rq_policy_lua_limits {
	size_t memory;               /* bytes the state may hold */
	unsigned long instructions;  /* per handler call */
	unsigned long load_instructions; /* running the file */
	double seconds;              /* wall clock per handler call (a backstop) */
	double load_seconds;         /* running the file */
};

#define RQ_POLICY_LUA_MEMORY ((size_t)32 << 20)
#define RQ_POLICY_LUA_INSTRUCTIONS 1000000UL
#define RQ_POLICY_LUA_LOAD_INSTRUCTIONS 10000000UL
#define RQ_POLICY_LUA_SECONDS 1.0
#define RQ_POLICY_LUA_LOAD_SECONDS 10.0

/*
 * A policy with no rules yet, on a new sandbox (memory cap from limits)
 * that has a global table relayq with on, retry, fail, drop, hold and
 * suspend. limits NULL = defaults. Returns NULL with a reason in err.
 * The caller (config_lua) runs the file in it; rq_policy_lua_destroy
 * frees it.
 */
struct rq_policy_lua *rq_policy_lua_create(const struct rq_policy_lua_limits *limits,
					   char *err, size_t errlen);

/* The sandbox the handlers run in; owned by pl. */
struct rq_lua_sandbox *rq_policy_lua_sandbox(struct rq_policy_lua *pl);

/* The limits in force (defaults filled in). */
const struct rq_policy_lua_limits *rq_policy_lua_limits_of(const struct rq_policy_lua *pl);

/*
 * Between rq_policy_lua_load_begin and _end the file may register rules
 * (relayq.on, rq_policy_lua_add_rule); problems go to diag (not owned,
 * used until _end). Outside them relayq.on raises an error.
 */
void rq_policy_lua_load_begin(struct rq_policy_lua *pl, struct rq_config_diag *diag);
void rq_policy_lua_load_end(struct rq_policy_lua *pl);

/*
 * Registers the function at stack index fidx for the selector at sidx
 * (of the sandbox's state), for a recipient domain (NULL: global), given
 * at the file's line. Only while loading, from a C function running in
 * the state: it may raise a Lua error (out of memory). Problems with the
 * selector or the function go to the load's diag.
 */
void rq_policy_lua_add_rule(struct rq_policy_lua *pl, const char *domain,
			    int sidx, int fidx, int line);

/* Closes the state, frees the rules. NULL: no-op. */
void rq_policy_lua_destroy(struct rq_policy_lua *pl);

/* The message a decision is about; strings borrowed, may be NULL. */
struct rq_policy_msg {
	const char *id;
	const char *from;
	const char *const *to;
	size_t nto;
	unsigned attempts;
	double created;              /* unix seconds */
	const char *meta;            /* JSON text of the app's meta, or NULL */
};

/*
 * The decision for one outcome: the built-in one, then the most specific
 * Lua rule for it (looked up in C first: no Lua call when no rule matches),
 * then expiry for a retry. pl NULL = built-in only. msg may be NULL.
 * Never fails: a broken handler gives the built-in decision, with
 * "; lua:<rule> error: ..." appended to the reason.
 */
void rq_policy_lua_decide(struct rq_policy_lua *pl,
			  const struct rq_policy_params *params,
			  const struct rq_policy_input *in,
			  const struct rq_policy_msg *msg,
			  const struct rq_policy_rand *rnd,
			  struct rq_policy_answer *out);

/*
 * The same for a loaded config: params resolved for in->domain
 * (rq_config_params), rules from cfg->lua. What the runner calls.
 */
void rq_policy_lua_decide_config(const struct rq_config *cfg,
				 const struct rq_policy_input *in,
				 const struct rq_policy_msg *msg,
				 const struct rq_policy_rand *rnd,
				 struct rq_policy_answer *out);

/* The rule that would run for the outcome ("lua:550",
 * "lua:yahoo.com:5.7.26"), written to rule; false when none. */
bool rq_policy_lua_rule_for(const struct rq_policy_lua *pl,
			    const struct rq_outcome *o, const char *domain,
			    char *rule, size_t len);

struct rq_policy_lua_stats {
	unsigned long long calls;       /* handler calls */
	unsigned long long errors;      /* all failed calls */
	unsigned long long runtime_errors;
	unsigned long long budget_errors;  /* instruction budget exceeded */
	unsigned long long memory_errors;  /* memory cap reached */
	unsigned long long bad_results;    /* returned something else */
	size_t memory;                  /* bytes held now */
	size_t memory_peak;
	size_t rules;                   /* registered rules, domains included */
};

/* Counters and memory of pl into out (all 0 for NULL). */
void rq_policy_lua_stats(const struct rq_policy_lua *pl,
			 struct rq_policy_lua_stats *out);
/* The last handler error with its traceback ("" when none); owned by pl,
 * valid until the next decision. */
const char *rq_policy_lua_last_error(const struct rq_policy_lua *pl);

/* The file loaders moved to config_lua.h (rq_config_lua_run_file / _run_buffer);
 * rq_policy_lua_load / _load_buffer are kept there as the old names. */
#include "relayq/config_lua.h"

#endif

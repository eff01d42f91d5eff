#ifndef RELAYQ_CONFIG_LUA_H
#define RELAYQ_CONFIG_LUA_H

/*
 * Reading the one config file: a Lua file run in the policy's sandbox
 * (policy_lua.h, lua_sandbox.h) whose calls
 *
 *   relayq.config { ... }      settings (config.h lists the keys)
 *   relayq.backoff { first, factor, max, jitter }
 *   relayq.expire { max_age, max_attempts }
 *   relayq.on(selector, fn)    rules (policy_lua.h)
 *   relayq.on_domain(domain, { settings..., on = { [selector] = fn } })
 *   relayq.listen { "ip:port", ... }  an SMTP listener (config.h lists the keys)
 *   relayq.getenv(name [, default])   the environment, at load time only
 *
 * become settings (handed to config.c key by key, with the file's line)
 * and rules (handed to policy_lua). Never touches the network.
 */

#include <stddef.h>
#include <stdio.h>

#include "relayq/config.h"

struct rq_policy_lua;
struct rq_policy_lua_limits;

/*
 * Runs a config file (path) or a buffer (name is used in messages) in a
 * new policy sandbox. Settings go to cfg through rq_config_apply; rules
 * stay in the returned policy. limits NULL = defaults. Returns NULL when
 * anything failed (syntax, runtime error, bad setting: all in diag). cfg
 * is not owned; the caller usually stores the result in cfg->lua (this
 * sets cfg->lua_destroy so rq_config_destroy frees it). Never calls back.
 */
struct rq_policy_lua *rq_config_lua_run_file(const char *path, struct rq_config *cfg,
					     const struct rq_policy_lua_limits *limits,
					     struct rq_config_diag *diag);
struct rq_policy_lua *rq_config_lua_run_buffer(const char *name, const char *src,
					       size_t len, struct rq_config *cfg,
					       const struct rq_policy_lua_limits *limits,
					       struct rq_config_diag *diag);

/*
 * Loads the file with flags (RQ_CONFIG_LOAD_*): defaults, the file's
 * settings, its policy (in cfg->lua), then rq_config_validate. Returns
 * the config (the caller frees it with rq_config_destroy), or NULL when
 * there was any error (all of them in diag; warnings are kept there too).
 */
struct rq_config *rq_config_lua_load(const char *path, unsigned flags,
				     struct rq_config_diag *diag);

/*
 * Reload: loads path and, only when it loads cleanly, destroys *cur and
 * puts the new config there. Returns 0, or -1 with *cur untouched.
 */
int rq_config_lua_reload(struct rq_config **cur, const char *path,
			 struct rq_config_diag *diag);

/*
 * `relayqd --check -c FILE`: loads the file, prints every problem as
 * "file:line: error: msg" (and warnings) to err, and "file: ok" to out when
 * it loads. Returns 0 when it loads, 1 otherwise.
 */
int rq_config_lua_check(const char *path, FILE *out, FILE *err);


#endif

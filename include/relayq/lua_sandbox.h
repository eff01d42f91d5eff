#ifndef RELAYQ_LUA_SANDBOX_H
#define RELAYQ_LUA_SANDBOX_H

/*
 * A Lua state for untrusted scripts: an instruction budget, a memory cap,
 * a wall-clock backstop, wrapped and frozen libraries. It knows nothing
 * of mail: what a script may call besides the libraries below is added
 * by the caller.
 *
 * Libraries: base functions without dofile, loadfile (print logs at info,
 * bounded; load only of text chunks; collectgarbage "count", "collect",
 * "step"); string (without string.dump), table, math, utf8, and os.time,
 * os.clock, os.date. No io, os.execute / getenv / exit / remove, require
 * / package, debug, coroutine. setmetatable refuses a metatable with a
 * __gc field (Lua runs finalizers with hooks off, out of any budget).
 *
 * Budget: every run (between two rq_lua_sandbox_arm) has an instruction
 * budget and a wall-clock limit. The library functions written in C pay
 * from the same budget for the work they do: allocations, string
 * arguments read, table elements visited, each table.sort comparison
 * (with the bytes of two strings compared), rawequal of long strings,
 * and for string.find / match / gmatch / gsub an upper bound of the
 * pattern matcher's backtracking, so a pattern that could run too long
 * on its subject fails with the budget error before it runs. A step of
 * C work costs about a VM instruction's time (5 to 50 ns measured).
 *
 * Exhaustion is sticky: once the budget or the time is gone (budget or
 * time error), every instruction and every charge fails again, pcall,
 * xpcall and load raise the error again instead of returning it, and a
 * message handler given to xpcall no longer runs (Lua would run it with
 * hooks off after an error raised by the hook). So no script code runs
 * after exhaustion and the run ends with the error.
 *
 * Margins (what the limits guarantee): the wall clock is checked every
 * HOOK_EVERY (100) VM instructions and at every charge. Between two
 * checks run at most 100 instructions, some of which may compare two
 * long strings without paying (== < <= on strings of up to half the
 * memory cap: about 1 ms each for 16 MiB), or one charged library call,
 * bounded by the budget left (1,000,000 steps: under 0.05 s measured).
 * So a run ends within about 0.1 s after its time limit, and never runs
 * more than its budget plus one instruction's work. The failing run's
 * error object and traceback are built after exhaustion (allocations are
 * then free of charge, still under the memory cap).
 *
 * Freezing (rq_lua_sandbox_freeze): string, table, math, utf8, os and the
 * tables the caller names become read-only (assigning a field, rawset or
 * setmetatable on them fails; pairs works, next / rawget see them empty),
 * "" gets a fresh protected metatable, and the globals become read-only.
 */

#include <stdbool.h>
#include <stddef.h>

#include <lua.h>

struct rq_lua_sandbox;

#define RQ_LUA_SANDBOX_MEMORY ((size_t)32 << 20)

struct rq_lua_sandbox_opts {
	size_t memory;             /* bytes the state may hold; 0 = RQ_LUA_SANDBOX_MEMORY */
	const char *print_event;   /* log event of print(); NULL = "lua_print" */
};

/*
 * A new state with the libraries above (not frozen yet). opts NULL =
 * defaults. Returns NULL with a reason in err on failure. The caller
 * frees it with rq_lua_sandbox_destroy.
 */
struct rq_lua_sandbox *rq_lua_sandbox_create(const struct rq_lua_sandbox_opts *opts,
					     char *err, size_t errlen);

/* Closes the state (on a fresh budget of the last armed size). NULL: no-op. */
void rq_lua_sandbox_destroy(struct rq_lua_sandbox *sb);

/* The state, owned by sb: never lua_close it. */
lua_State *rq_lua_sandbox_state(struct rq_lua_sandbox *sb);

/* The sandbox a state belongs to (for C functions running in it). */
struct rq_lua_sandbox *rq_lua_sandbox_of(lua_State *L);

/*
 * Starts a run: instructions (C work included) and seconds of wall clock
 * until the next arm. Call it before every lua_pcall into the state.
 */
void rq_lua_sandbox_arm(struct rq_lua_sandbox *sb, unsigned long instructions,
			double seconds);

/*
 * Freezes the libraries, the string metatable, the globals, and the
 * global tables named in tables (NULL-ended list, may be NULL). Runs
 * protected on the current budget. Returns 0, or -1 (memory cap or
 * budget reached).
 */
int rq_lua_sandbox_freeze(struct rq_lua_sandbox *sb, const char *const *tables);

/* A full collection, protected, on the current budget. Returns 0 or -1. */
int rq_lua_sandbox_collect(struct rq_lua_sandbox *sb);

/* Why the last run failed with lua_pcall status st. */
enum rq_lua_sandbox_fail {
	RQ_LUA_SANDBOX_FAIL_RUNTIME = 0, /* an error of the script */
	RQ_LUA_SANDBOX_FAIL_BUDGET,      /* instructions or time (allocations pay too) */
	RQ_LUA_SANDBOX_FAIL_MEMORY,      /* the memory cap */
};
enum rq_lua_sandbox_fail rq_lua_sandbox_failure(const struct rq_lua_sandbox *sb,
						int st);

struct rq_lua_sandbox_usage {
	size_t memory;             /* bytes held now */
	size_t memory_peak;
	size_t memory_cap;
	unsigned long budget;      /* instructions of the armed run */
	unsigned long steps;       /* of them used so far (C work included) */
};
void rq_lua_sandbox_usage(const struct rq_lua_sandbox *sb,
			  struct rq_lua_sandbox_usage *out);

/*
 * For C functions the caller adds to the state: pays cost steps of work
 * about to be done, or raises the budget error (what, may be NULL, says
 * what ran out). Never returns when the budget is gone.
 */
void rq_lua_sandbox_charge(lua_State *L, double cost, const char *what);

/* The line of the Lua code calling the running C function (0 unknown). */
int rq_lua_sandbox_caller_line(lua_State *L);

/* A message handler for lua_pcall: the error with a traceback. */
int rq_lua_sandbox_traceback(lua_State *L);

/* Copies the error at idx into out (a non-string one described). */
void rq_lua_sandbox_error_text(lua_State *L, int idx, char *out, size_t len);

#endif

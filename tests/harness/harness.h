#ifndef RQ_TEST_HARNESS_H
#define RQ_TEST_HARNESS_H

/*
 * Test harness: real servers on loopback, started and stopped by pid.
 * Every function aborts the test (exit 1 with a message) on a setup failure,
 * so tests can call them without checking.
 */

#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <sys/types.h>

struct th_proc {
	pid_t pid;
};

/* Starts argv[0] (searched in PATH) with stdout/stderr to log_path (NULL:
 * inherit). Returns 0 or -1. */
int th_spawn(struct th_proc *p, char *const argv[], const char *log_path);
/* Sends sig, then waits for the process; returns its wait status. */
int th_stop(struct th_proc *p, int sig);
/* True while the process runs (reaps it when it ended). */
bool th_alive(struct th_proc *p);
/* Sends SIGSTOP and returns once the process is really stopped (kill(2)
 * returns before a process running on another core has stopped). */
void th_pause(pid_t pid);

/* A fresh temporary folder (under $TMPDIR or /tmp), removed by th_rmrf. */
char *th_mkdtemp(const char *tag);
void th_rmrf(const char *dir);

/* A free TCP port on 127.0.0.1 (bound then released). */
int th_free_port(void);
/* Waits until 127.0.0.1:port accepts, up to ms; 0 or -1. */
int th_wait_port(int port, int ms);

const char *th_source_root(void);
const char *th_build_root(void);

struct th_redis {
	struct th_proc proc;
	bool own;          /* started here (false: shared from RELAYQ_TEST_REDIS) */
	bool aof;
	char dir[256];
	char sock[300];    /* unix socket path */
	int port;          /* TCP port on 127.0.0.1 (0 when shared via socket) */
	char url[400];     /* "unix:/path" form for relayq --redis */
};

/* Starts a private redis-server (unix socket and a TCP port; aof: appendonly
 * yes, appendfsync everysec) and loads lua/redis/relayq.lua if it exists. */
void th_redis_start(struct th_redis *r, bool aof);
/* The redis-server that scripts/test started (RELAYQ_TEST_REDIS=unix:/path),
 * or a private one when the variable is not set. */
void th_redis_shared(struct th_redis *r);
/* Stops (when own) and removes the folder. */
void th_redis_stop(struct th_redis *r);
/* Kills (SIGKILL when hard, else SIGTERM) and starts again on the same
 * socket, port and folder. */
void th_redis_kill(struct th_redis *r, bool hard);
void th_redis_restart(struct th_redis *r);
/* A synchronous connection (aborts on failure). */
redisContext *th_redis_connect(const struct th_redis *r);
/* FUNCTION LOAD REPLACE of lua/redis/relayq.lua; 0, or -1 when the file is
 * missing or Redis refuses it (message on stderr). */
int th_redis_load_functions(const struct th_redis *r);

/* A queue name unique to this process and call, for tests sharing a Redis. */
const char *th_unique_queue(const char *tag);

/* Runs a shell command, captures stdout (malloc'd, NUL-ended) and returns the
 * exit status (-1 when it could not run). */
int th_run(const char *cmd, char **out);

/* Reads a whole file (malloc'd, NUL-ended); NULL when missing. */
char *th_read_file(const char *path, size_t *len);

/* Waits up to ms for cond(arg) to be true, polling every 5 ms. */
bool th_wait_for(bool (*cond)(void *), void *arg, int ms);

#endif

#ifndef RQ_TEST_DAEMON_H
#define RQ_TEST_DAEMON_H

/*
 * Shared helpers of the end-to-end tests of relayqd (test_daemon_*.c):
 * a private redis-server, the fakesmtpd fixture as a process, relayqd
 * processes started from a generated config file, pipelined enqueues, and
 * waits on conditions with deadlines. Compiled once into the harness
 * library (tests/harness/daemon.c); every name starts with dt_ / DT_.
 * Like the th_ functions, a setup failure fails the running cmocka test.
 *
 * Binaries: $RELAYQD_BIN, $RELAYQ_BIN, $RQ_BUILD_ROOT/tests/fakesmtpd.
 */

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <hiredis/hiredis.h>

#include "harness.h"
#include "relayq/json.h"

#define DT_DAEMONS 2

struct dt {
	struct th_redis redis;
	char *tmp;
	char queue[96];
	char prefix[128];          /* relayq:{q} */
	char cfg[512];             /* config file path */
	redisContext *c;
	/* fakesmtpd */
	struct th_proc smtp;
	int smtp_port;
	char rec[512];             /* its record dir */
	char smtp_log[512];
	int smtp_runs;
	/* relayqd */
	struct th_proc d[DT_DAEMONS];
	char dlog[DT_DAEMONS][512];
	int druns[DT_DAEMONS];
};

void dt_sleep_ms(int ms);

int64_t dt_now_ms(void);

const char *dt_relayqd_bin(void);

const char *dt_relayq_bin(void);

const char *dt_fakesmtpd_bin(void);

/* Prints the tail of a log file to stderr (for failure diagnosis). */
void dt_dump_log(const char *what, const char *path);

void dt_dump_all(struct dt *t);

/* Fails the test with a message and the logs. */
#define DT_FAIL(t, ...)                                                         \
	do {                                                                    \
		dt_dump_all(t);                                                 \
		fail_msg(__VA_ARGS__);                                          \
	} while (0)

void dt_setup(struct dt *t, const char *tag, bool aof);

/* (Re)connects the synchronous client, e.g. after a Redis restart. */
void dt_reconnect(struct dt *t);

void dt_teardown(struct dt *t);

/* ---- files ---- */

/* cmocka setup / teardown around dt_setup / dt_teardown: a test file
 * writes static int setup(void **s) { return dt_state_setup(s, "tag", false); } */
int dt_state_setup(void **state, const char *tag, bool aof);

int dt_state_teardown(void **state);

/* Backoffs the daemon tests use: one hour (a retry a test triggers by hand
 * with flush) and one second (the daemon retries by itself). */
#define DT_BACKOFF_1H "relayq.backoff { first = \"1h\", factor = 2, max = \"4h\", jitter = 0 }\n"
#define DT_BACKOFF_1S "relayq.backoff { first = \"1s\", factor = 2, max = \"2s\", jitter = 0 }\n"

void dt_write_file(const char *path, const char *text);

/*
 * Writes the daemon's config to t->cfg (atomically: a reload never sees a
 * half-written file): relayq.config with the test's Redis, queue and the
 * fixture as relay, plus `keys` (more relayq.config fields, may be ""),
 * then `rest` (backoff, expire, rules...).
 */
void dt_config_port(struct dt *t, int port, const char *keys, const char *rest);

void dt_config(struct dt *t, const char *keys, const char *rest);

/* ---- fakesmtpd ---- */

/*
 * Starts fakesmtpd on port (0: a free one, read back from its "ready PORT"
 * line) with --record t->rec and the given extra arguments (NULL-ended,
 * e.g. "--rule", "rcpt ... reply 450 ..."). Waits until it is ready.
 */
void dt_smtp_start_argv(struct dt *t, int port, const char *const *extra);

/* fakesmtpd with --rule for each rule (NULL-ended list, may be NULL). */
void dt_smtp_start(struct dt *t, const char *const *rules);

/* SIGTERM: the fixture must exit 0. */
void dt_smtp_stop(struct dt *t);

/* A field of the fixture's stats record ("messages", "connections" ...);
 * 0 when not written yet. */
long dt_smtp_stat(struct dt *t, const char *key);

/*
 * Calls fn for every recorded message (msg-N.eml complete files) with its
 * envelope text and content. Returns the number of messages.
 */
typedef void (*dt_msg_fn)(const char *env, const char *content, size_t len, void *arg);

size_t dt_each_message(struct dt *t, dt_msg_fn fn, void *arg);

/* Number of occurrences of needle in every conn-N.log transcript (what the
 * client sent and the server answered, in order). */
size_t dt_count_in_transcripts(struct dt *t, const char *needle);

/* ---- relayqd ---- */

size_t dt_file_size(const char *path);

/* Starts relayqd number i with the config file (its log appended to). */
void dt_daemon_start(struct dt *t, int i);

/* True when the log has a sanitizer report. */
bool dt_log_has_sanitizer_report(const char *path);

/* Fails when daemon i is not running (it crashed or exited). */
void dt_daemon_check_alive(struct dt *t, int i);

/* SIGTERM: relayqd must exit 0, with no sanitizer report in its log. */
void dt_daemon_stop(struct dt *t, int i);

/* kill -9 */
void dt_daemon_kill9(struct dt *t, int i);

/* ---- Redis ---- */

redisReply *dt_cmd(struct dt *t, const char *fmt, ...);

long long dt_int(struct dt *t, const char *fmt, ...);

/* ZCARD / LLEN of a queue key ("ready" is a list, the others zsets). */
long long dt_count(struct dt *t, const char *what);

/* A counter of P:stats (0 when never bumped). */
long long dt_stat(struct dt *t, const char *name);

bool dt_in_zset(struct dt *t, const char *set, const char *id);

int64_t dt_zscore(struct dt *t, const char *set, const char *id);

bool dt_msg_exists(struct dt *t, const char *id);

/* HGET P:msg:<id> field (malloc'd; NULL when absent). */
char *dt_msg_field(struct dt *t, const char *id, const char *field);

/* The recipient's entry of P:rcpt:<id> (HGETALL, as redis-cli shows it),
 * parsed; NULL when absent. */
struct rq_json *dt_rcpt_entry(struct dt *t, const char *id, const char *rcpt);

/* Builds an envelope JSON for simple (unquoted) addresses. */
char *dt_envelope(const char *from, const char *const *to, size_t nto);

/* Enqueues one message; returns its id (malloc'd). */
char *dt_enqueue(struct dt *t, const char *from, const char *const *to, size_t nto,
		 const char *body);

char *dt_enqueue1(struct dt *t, const char *to, const char *body);

/* The body of message number i of a bulk run: a unique token. */
void dt_bulk_body(char *buf, size_t len, const char *tag, size_t i);

/* Enqueues n messages, pipelined 500 at a time, to one recipient each. */
void dt_enqueue_bulk(struct dt *t, const char *tag, size_t n);

/* ---- events ---- */

struct dt_event {
	char type[16];
	char rcpt[128];
	char code[8];
	char enh[16];
	char text[512];
	char stage[16];
	char meta[256];
	long long attempt;
	long long next;
	int64_t ms;                /* stream id time */
};

/* The events of message id, in order; returns how many (at most max). */
size_t dt_events(struct dt *t, const char *id, struct dt_event *out, size_t max);

/* The last event of a type for (id, rcpt); false when none. */
bool dt_find_event(struct dt *t, const char *id, const char *rcpt, const char *type,
		   struct dt_event *out);

/* The first event of a type for (id, rcpt) with this reply code (0: any). */
bool dt_find_event_code(struct dt *t, const char *id, const char *rcpt,
			const char *type, int code, struct dt_event *out);

size_t dt_count_events(struct dt *t, const char *id, const char *rcpt, const char *type);

/* ---- waits ---- */

typedef bool (*dt_cond)(struct dt *t, void *arg);

/*
 * Waits up to ms for cond, polling every 20 ms; fails early (with the
 * logs) when a daemon that should run exited. Returns true when it held.
 */
bool dt_wait(struct dt *t, dt_cond cond, void *arg, int ms);

bool dt_cond_settled(struct dt *t, void *arg);

bool dt_cond_gone(struct dt *t, void *arg);

bool dt_cond_dead(struct dt *t, void *arg);

bool dt_cond_scheduled(struct dt *t, void *arg);

bool dt_cond_queue_empty(struct dt *t, void *arg);

#define DT_WAIT(t, cond, arg, ms, ...)                                        \
	do {                                                                    \
		if (!dt_wait((t), (cond), (arg), (ms)))                         \
			DT_FAIL((t), __VA_ARGS__);                              \
	} while (0)

/* ---- the CLI ---- */

/* `relayq show ID --json`, parsed (the caller frees). */
struct rq_json *dt_show(struct dt *t, const char *id);

/* The rcpts[] entry of a show document for an address. */
const struct rq_json *dt_show_rcpt(const struct rq_json *m, const char *addr);

int64_t dt_json_int(const struct rq_json *j, const char *key);

/* Runs a shell command line; returns its exit status and output. */
int dt_sh(char **out, const char *fmt, ...);

/* A "key: value" line of `relayq explain` output (malloc'd or NULL). */
char *dt_line_value(const char *text, const char *key);

/* ---- bulk runs ---- */

/*
 * Counts, per token of a dt_enqueue_bulk run, the messages the fixture
 * recorded. Fills missing (tokens never delivered), dups (deliveries beyond
 * the first) and returns the number of messages recorded.
 */
size_t dt_token_check(struct dt *t, const char *tag, size_t n, size_t *missing,
		      size_t *dups, size_t *first_missing);

#endif

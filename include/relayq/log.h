#ifndef RELAYQ_LOG_H
#define RELAYQ_LOG_H

#include <stdbool.h>
#include <stdio.h>

/*
 * Structured logging: one line per event, logfmt (default) or JSON.
 * Library modules never print; they return errors, and the daemon and CLI
 * log through here. Secrets must never be passed as values.
 */

enum rq_log_level {
	RQ_LOG_DEBUG = 0,
	RQ_LOG_INFO,
	RQ_LOG_WARN,
	RQ_LOG_ERROR,
	RQ_LOG_OFF,
};

enum rq_log_format {
	RQ_LOG_LOGFMT = 0,
	RQ_LOG_JSON,
};

/* Sets the minimum level, the format and the stream (NULL = stderr). */
void rq_log_init(enum rq_log_level min, enum rq_log_format fmt, FILE *out);

/* True when a line at this level would be written: test it before building
 * costly values. */
bool rq_log_enabled(enum rq_log_level level);

/*
 * Writes one line: ts, level, event, then key/value pairs of strings ended
 * by NULL, e.g. rq_log(RQ_LOG_INFO, "delivered", "id", id, "rcpt", to, NULL).
 * A NULL value after a key is written as an empty string. Values are quoted
 * and escaped as the format needs (CR, LF and control bytes never pass raw).
 */
void rq_log(enum rq_log_level level, const char *event, ...);

/* Parses "debug", "info", "warn", "error", "off"; -1 when unknown. */
int rq_log_level_parse(const char *s);

/*
 * Buffering, for the daemon: one write(2) per line costs more than the
 * delivery it reports at tens of thousands of lines a second. With a
 * callback set, info and debug lines are kept in a buffer (up to 64 KiB)
 * and written by rq_log_flush(); the callback runs when the buffer goes
 * from empty to non-empty, so the caller can arm a short timer that
 * flushes. Warnings and errors flush at once, and so does a full buffer.
 * NULL (the default) writes every line at once.
 */
void rq_log_set_buffered(void (*pending_cb)(void *arg), void *arg);
/* Writes out what is buffered. Safe to call at any time (and at exit). */
void rq_log_flush(void);

#endif

/* Structured logging: one line per event, logfmt or JSON, buffered for
 * the daemon (see log.h). */
#include "relayq/log.h"

#include "relayq/clock.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static enum rq_log_level log_min = RQ_LOG_INFO;
static enum rq_log_format log_fmt = RQ_LOG_LOGFMT;
static FILE *log_out;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

/* Lines waiting to be written (buffered mode), and the line being built. */
#define PENDING_MAX 65536
static char pending[PENDING_MAX];
static size_t pending_len;
static void (*pending_cb)(void *arg);
static void *pending_arg;

struct line {
	char *p;
	size_t len, cap;
	bool oom;
};
static struct line cur;

void rq_log_init(enum rq_log_level min, enum rq_log_format fmt, FILE *out)
{
	rq_log_flush();
	log_min = min;
	log_fmt = fmt;
	log_out = out;
}

bool rq_log_enabled(enum rq_log_level level)
{
	return level >= log_min && level < RQ_LOG_OFF;
}

int rq_log_level_parse(const char *s)
{
	for (int i = 0; i <= RQ_LOG_OFF; i++)
		if (strcasecmp(s, level_names[i]) == 0)
			return i;
	return -1;
}

void rq_log_set_buffered(void (*cb)(void *arg), void *arg)
{
	rq_log_flush();
	pending_cb = cb;
	pending_arg = arg;
}

static FILE *out_stream(void)
{
	return log_out ? log_out : stderr;
}

void rq_log_flush(void)
{
	if (pending_len == 0)
		return;
	FILE *f = out_stream();
	fwrite(pending, 1, pending_len, f);
	fflush(f);
	pending_len = 0;
}

static void add(const char *s, size_t n)
{
	if (cur.len + n + 1 > cur.cap) {
		size_t cap = cur.cap ? cur.cap : 256;
		while (cap < cur.len + n + 1)
			cap *= 2;
		char *p = realloc(cur.p, cap);
		if (!p) {
			cur.oom = true;
			return;
		}
		cur.p = p;
		cur.cap = cap;
	}
	memcpy(cur.p + cur.len, s, n);
	cur.len += n;
}

static void add_str(const char *s)
{
	add(s, strlen(s));
}

static bool logfmt_needs_quotes(const char *v)
{
	if (*v == '\0')
		return true;
	for (const unsigned char *p = (const unsigned char *)v; *p; p++)
		if (*p <= ' ' || *p == '=' || *p == '"' || *p == '\\' || *p == 0x7f)
			return true;
	return false;
}

static void add_escaped(const char *v, bool json)
{
	const unsigned char *p = (const unsigned char *)v;
	while (*p) {
		/* the run that needs no escaping goes in one copy */
		const unsigned char *run = p;
		while (*p >= 0x20 && *p != 0x7f && *p != '"' && *p != '\\')
			p++;
		if (p > run)
			add((const char *)run, (size_t)(p - run));
		if (!*p)
			break;
		char esc[8];
		switch (*p) {
		case '"': add_str("\\\""); break;
		case '\\': add_str("\\\\"); break;
		case '\n': add_str("\\n"); break;
		case '\r': add_str("\\r"); break;
		case '\t': add_str("\\t"); break;
		default:
			snprintf(esc, sizeof(esc), json ? "\\u%04x" : "\\x%02x", *p);
			add_str(esc);
		}
		p++;
	}
}

static void add_pair(bool first, const char *k, const char *v)
{
	if (log_fmt == RQ_LOG_JSON) {
		add_str(first ? "{\"" : ",\"");
		add_escaped(k, true);
		add_str("\":\"");
		add_escaped(v, true);
		add("\"", 1);
		return;
	}
	if (!first)
		add(" ", 1);
	add_str(k);
	add("=", 1);
	if (logfmt_needs_quotes(v)) {
		add("\"", 1);
		add_escaped(v, false);
		add("\"", 1);
	} else {
		add_str(v);
	}
}

/* The line is complete in cur: write it now, or keep it in pending. */
static void emit(enum rq_log_level level)
{
	if (cur.oom) {
		cur.oom = false;
		return;
	}
	bool buffered = pending_cb && level < RQ_LOG_WARN;
	if (buffered && cur.len <= PENDING_MAX - pending_len) {
		bool was_empty = pending_len == 0;
		memcpy(pending + pending_len, cur.p, cur.len);
		pending_len += cur.len;
		if (was_empty)
			pending_cb(pending_arg);
		return;
	}
	rq_log_flush();
	if (buffered && cur.len <= PENDING_MAX) {
		memcpy(pending, cur.p, cur.len);
		pending_len = cur.len;
		pending_cb(pending_arg);
		return;
	}
	FILE *f = out_stream();
	fwrite(cur.p, 1, cur.len, f);
	fflush(f);
}

void rq_log(enum rq_log_level level, const char *event, ...)
{
	if (!rq_log_enabled(level))
		return;
	int64_t ms = rq_clock_wall_ms();
	time_t secs = (time_t)(ms / 1000);
	struct tm tm;
	gmtime_r(&secs, &tm);
	char ts[40];
	size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(ts + n, sizeof(ts) - n, ".%03ldZ", (long)(ms % 1000));

	cur.len = 0;
	add_pair(true, "ts", ts);
	add_pair(false, "level", level_names[level]);
	add_pair(false, "event", event ? event : "");
	va_list ap;
	va_start(ap, event);
	for (;;) {
		const char *k = va_arg(ap, const char *);
		if (!k)
			break;
		const char *v = va_arg(ap, const char *);
		add_pair(false, k, v ? v : "");
	}
	va_end(ap);
	if (log_fmt == RQ_LOG_JSON)
		add("}", 1);
	add("\n", 1);
	emit(level);
}

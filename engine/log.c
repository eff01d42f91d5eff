#include "relayq/log.h"

#include <stdarg.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

static enum rq_log_level log_min = RQ_LOG_INFO;
static enum rq_log_format log_fmt = RQ_LOG_LOGFMT;
static FILE *log_out;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

void rq_log_init(enum rq_log_level min, enum rq_log_format fmt, FILE *out)
{
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

static bool logfmt_needs_quotes(const char *v)
{
	if (*v == '\0')
		return true;
	for (const unsigned char *p = (const unsigned char *)v; *p; p++)
		if (*p <= ' ' || *p == '=' || *p == '"' || *p == '\\' || *p == 0x7f)
			return true;
	return false;
}

static void put_escaped(FILE *f, const char *v, bool json)
{
	for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
		switch (*p) {
		case '"': fputs("\\\"", f); break;
		case '\\': fputs("\\\\", f); break;
		case '\n': fputs("\\n", f); break;
		case '\r': fputs("\\r", f); break;
		case '\t': fputs("\\t", f); break;
		default:
			if (*p < 0x20 || *p == 0x7f)
				fprintf(f, json ? "\\u%04x" : "\\x%02x", *p);
			else
				fputc(*p, f);
		}
	}
}

static void put_pair(FILE *f, bool first, const char *k, const char *v)
{
	if (log_fmt == RQ_LOG_JSON) {
		fputs(first ? "{\"" : ",\"", f);
		put_escaped(f, k, true);
		fputs("\":\"", f);
		put_escaped(f, v, true);
		fputc('"', f);
		return;
	}
	if (!first)
		fputc(' ', f);
	fputs(k, f);
	fputc('=', f);
	if (logfmt_needs_quotes(v)) {
		fputc('"', f);
		put_escaped(f, v, false);
		fputc('"', f);
	} else {
		fputs(v, f);
	}
}

void rq_log(enum rq_log_level level, const char *event, ...)
{
	if (!rq_log_enabled(level))
		return;
	FILE *f = log_out ? log_out : stderr;
	struct timeval tv;
	gettimeofday(&tv, NULL);
	struct tm tm;
	gmtime_r(&tv.tv_sec, &tm);
	char ts[40];
	size_t n = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(ts + n, sizeof(ts) - n, ".%03ldZ", (long)(tv.tv_usec / 1000));

	flockfile(f);
	put_pair(f, true, "ts", ts);
	put_pair(f, false, "level", level_names[level]);
	put_pair(f, false, "event", event ? event : "");
	va_list ap;
	va_start(ap, event);
	for (;;) {
		const char *k = va_arg(ap, const char *);
		if (!k)
			break;
		const char *v = va_arg(ap, const char *);
		put_pair(f, false, k, v ? v : "");
	}
	va_end(ap);
	if (log_fmt == RQ_LOG_JSON)
		fputc('}', f);
	fputc('\n', f);
	fflush(f);
	funlockfile(f);
}

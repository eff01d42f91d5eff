/* relayq CLI: messages, terminal-safe text and JSON reply fields (cli.h). */
#include "cli.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "relayq/json.h"

const char *cli_prog = "relayq";

void cli_errorf(const char *fmt, ...)
{
	va_list ap;
	fflush(stdout);
	fputs(cli_prog, stderr);
	fputs(": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* Copies untrusted text for a terminal: control bytes become escapes
 * (\r, \n, \t, \xNN), and so do the UTF-8 encoded C1 controls U+0080 to
 * U+009F (bytes C2 80 .. C2 9F, shown as \xc2\xNN: some terminals act on
 * them as on ESC sequences); at most max display characters (0: no
 * limit), "..." when cut. Returns a malloc'd string (never NULL: aborts on OOM). */
char *cli_clean(const char *s, size_t len, size_t max)
{
	char *out = malloc(len * 4 + 4);
	if (!out) {
		fputs("relayq: out of memory\n", stderr);
		exit(EXIT_OPERATION);
	}
	size_t n = 0, shown = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (max && shown >= max) {
			memcpy(out + n, "...", 3);
			n += 3;
			break;
		}
		if (c == 0xc2 && i + 1 < len && (unsigned char)s[i + 1] >= 0x80 &&
		    (unsigned char)s[i + 1] <= 0x9f) {
			n += (size_t)sprintf(out + n, "\\xc2\\x%02x", (unsigned char)s[i + 1]);
			shown += 8;
			i++;
			continue;
		}
		if (c < 0x20 || c == 0x7f) {
			const char *e = c == '\r' ? "\\r" : c == '\n' ? "\\n" : c == '\t' ? "\\t" : NULL;
			if (e) {
				memcpy(out + n, e, 2);
				n += 2;
				shown += 2;
			} else {
				n += (size_t)sprintf(out + n, "\\x%02x", c);
				shown += 4;
			}
			continue;
		}
		out[n++] = (char)c;
		if ((c & 0xc0) != 0x80)
			shown++;
	}
	out[n] = '\0';
	return out;
}

char *cli_clean_str(const char *s, size_t max)
{
	return cli_clean(s ? s : "", s ? strlen(s) : 0, max);
}

/* Display width: UTF-8 lead bytes. */
size_t cli_width(const char *s)
{
	size_t w = 0;
	for (; *s; s++)
		if (((unsigned char)*s & 0xc0) != 0x80)
			w++;
	return w;
}

void cli_put_padded(const char *s, size_t w, bool last)
{
	fputs(s, stdout);
	if (last)
		return;
	for (size_t i = cli_width(s); i < w + 2; i++)
		fputc(' ', stdout);
}

/* "5s", "5m", "2h", "3d" (rounded to the nearest unit) */
void cli_fmt_duration(char *out, size_t len, int64_t ms)
{
	int64_t s = ms < 0 ? 0 : (ms + 500) / 1000;
	if (s < 60)
		snprintf(out, len, "%" PRId64 "s", s);
	else if (s < 3600 - 30)
		snprintf(out, len, "%" PRId64 "m", (s + 30) / 60);
	else if (s < 86400 - 1800)
		snprintf(out, len, "%" PRId64 "h", (s + 1800) / 3600);
	else
		snprintf(out, len, "%" PRId64 "d", (s + 43200) / 86400);
}

/* "2026-11-28 12:00:00 UTC" */
void cli_fmt_time(char *out, size_t len, int64_t ms)
{
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	if (ms <= 0 || !gmtime_r(&t, &tm) ||
			strftime(out, len, "%Y-%m-%d %H:%M:%S UTC", &tm) == 0)
		snprintf(out, len, "-");
}

/* Parses a JSON reply of a function (lax about UTF-8: Redis passes bytes). */
struct rq_json *cli_reply_json(const redisReply *r, const char *what)
{
	if (r->type != REDIS_REPLY_STRING) {
		cli_errorf("unexpected reply from %s (not a string)", what);
		return NULL;
	}
	char err[160];
	struct rq_json *v = rq_json_parse(r->str, r->len, RQ_JSON_LAX_UTF8 | RQ_JSON_SKIP_DEEP,
					  err, sizeof(err));
	if (!v)
		cli_errorf("unexpected reply from %s: %s", what, err);
	else if (v->type != RQ_JSON_OBJECT) {
		cli_errorf("unexpected reply from %s: not a JSON object", what);
		rq_json_free(v);
		v = NULL;
	}
	return v;
}

char *cli_reply_id_guess(const redisReply *r)
{
	static const char head[] = "{\"id\":\"";
	size_t hl = sizeof(head) - 1;
	if (r && r->type == REDIS_REPLY_STRING && r->len > hl &&
			memcmp(r->str, head, hl) == 0) {
		const char *q = memchr(r->str + hl, '"', r->len - hl);
		if (q && q > r->str + hl)
			return cli_clean(r->str + hl, (size_t)(q - r->str - hl), 40);
	}
	return cli_clean_str("?", 0);
}

/* Writes v as one compact JSON line. */
void cli_print_json_line(const struct rq_json *v)
{
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	if (rq_json_is(v, RQ_JSON_OBJECT) && rq_json_has_deep(v)) {
		rq_json_buf_obj_begin(&b);
		for (const struct rq_json *c = v->child; c; c = c->next) {
			rq_json_buf_key(&b, c->key);
			if (rq_json_has_deep(c))
				rq_json_buf_str(&b, NULL);
			else
				rq_json_buf_value(&b, c);
		}
		rq_json_buf_key(&b, "unreadable");
		rq_json_buf_arr_begin(&b);
		for (const struct rq_json *c = v->child; c; c = c->next)
			if (rq_json_has_deep(c))
				rq_json_buf_strn(&b, c->key, c->key_len);
		rq_json_buf_arr_end(&b);
		rq_json_buf_obj_end(&b);
	} else {
		rq_json_buf_value(&b, v);
	}
	if (rq_json_buf_ok(&b))
		printf("%s\n", b.data);
	rq_json_buf_finish(&b);
}

int64_t cli_field_int(const struct rq_json *v, const char *key, int64_t dflt)
{
	int64_t i;
	return rq_json_get_int(v, key, true, &i) ? i : dflt;
}

/* Text of a field for humans: strings cleaned, numbers and JSON written. */
char *cli_field_text(const struct rq_json *v, size_t max)
{
	if (rq_json_has_deep(v))
		return cli_clean_str(CLI_UNREADABLE_DEEP, 0);
	if (!v || v->type == RQ_JSON_NULL)
		return cli_clean_str("", 0);
	if (v->type == RQ_JSON_STRING)
		return cli_clean(v->str, v->len, max);
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_value(&b, v);
	char *s = cli_clean(b.data ? b.data : "", b.len, max);
	rq_json_buf_finish(&b);
	return s;
}

/* "450 4.2.0 Greylisted" from a message's last_* or a recipient's fields. */
char *cli_reply_text(const struct rq_json *v, const char *code_key,
		const char *enh_key, const char *text_key, size_t max)
{
	int64_t code = cli_field_int(v, code_key, 0);
	const char *enh = rq_json_get_str(v, enh_key);
	const struct rq_json *text = rq_json_get(v, text_key);
	char head[64] = "";
	if (code > 0)
		snprintf(head, sizeof(head), "%" PRId64, code);
	if (enh && *enh && strlen(enh) < 20)
		snprintf(head + strlen(head), sizeof(head) - strlen(head), "%s%s",
				head[0] ? " " : "", enh);
	char *t = rq_json_is(text, RQ_JSON_STRING) ? cli_clean(text->str, text->len, max) : cli_clean_str("", 0);
	size_t n = strlen(head) + strlen(t) + 2;
	char *out = malloc(n);
	if (!out) {
		free(t);
		return cli_clean_str("", 0);
	}
	snprintf(out, n, "%s%s%s", head, head[0] && t[0] ? " " : "", t);
	free(t);
	return out;
}

/* A JSON array of strings as "a@x, b@y"; v may be a JSON text too. */
char *cli_address_list(const struct rq_json *v, size_t *count, size_t max_items)
{
	struct rq_json *parsed = NULL;
	if (rq_json_is(v, RQ_JSON_STRING)) {
		parsed = rq_json_parse(v->str, v->len, RQ_JSON_LAX_UTF8, NULL, 0);
		v = parsed;
	}
	struct rq_json_buf b;   /* used as a plain growing buffer */
	rq_json_buf_init(&b);
	size_t n = 0;
	if (rq_json_is(v, RQ_JSON_ARRAY)) {
		for (const struct rq_json *c = v->child; c; c = c->next, n++) {
			if (max_items && n >= max_items)
				continue;
			char *s = cli_field_text(c, 80);
			if (n)
				rq_json_buf_raw(&b, ",", 1);
			rq_json_buf_raw(&b, s, strlen(s));
			free(s);
		}
	}
	if (max_items && n > max_items) {
		char more[32];
		snprintf(more, sizeof(more), ",+%zu", n - max_items);
		rq_json_buf_raw(&b, more, strlen(more));
	}
	if (count)
		*count = n;
	rq_json_free(parsed);
	char *s = rq_json_buf_take(&b, NULL);
	return s ? s : cli_clean_str("", 0);
}

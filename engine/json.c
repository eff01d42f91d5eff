/* JSON: a bounded parser and a writer (see json.h). */
#include "relayq/json.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Longest number token we convert (digits beyond this carry no precision). */
#define NUMBER_MAX 512

struct parser {
	const unsigned char *p;
	const unsigned char *start;
	const unsigned char *end;
	int flags;
	char *err;
	size_t errlen;
	bool failed;
};

static void fail(struct parser *ps, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void fail(struct parser *ps, const char *fmt, ...)
{
	if (ps->failed)
		return;
	ps->failed = true;
	if (!ps->err || ps->errlen == 0)
		return;
	int n = snprintf(ps->err, ps->errlen, "offset %zu: ",
			(size_t)(ps->p - ps->start));
	if (n < 0 || (size_t)n >= ps->errlen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(ps->err + n, ps->errlen - (size_t)n, fmt, ap);
	va_end(ap);
}

static void skip_ws(struct parser *ps)
{
	while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' ||
			*ps->p == '\n' || *ps->p == '\r'))
		ps->p++;
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0 when invalid. */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end)
{
	size_t avail = (size_t)(end - p);
	unsigned char c = p[0];
	if (c < 0x80)
		return 1;
	if (c >= 0xc2 && c <= 0xdf) {
		if (avail >= 2 && (p[1] & 0xc0) == 0x80)
			return 2;
		return 0;
	}
	if (c >= 0xe0 && c <= 0xef) {
		if (avail < 3 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80)
			return 0;
		if (c == 0xe0 && p[1] < 0xa0)
			return 0;              /* overlong */
		if (c == 0xed && p[1] >= 0xa0)
			return 0;              /* surrogate */
		return 3;
	}
	if (c >= 0xf0 && c <= 0xf4) {
		if (avail < 4 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 ||
				(p[3] & 0xc0) != 0x80)
			return 0;
		if (c == 0xf0 && p[1] < 0x90)
			return 0;              /* overlong */
		if (c == 0xf4 && p[1] >= 0x90)
			return 0;              /* above U+10FFFF */
		return 4;
	}
	return 0;
}

static size_t utf8_put(char *out, uint32_t cp)
{
	if (cp < 0x80) {
		out[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		out[0] = (char)(0xc0 | (cp >> 6));
		out[1] = (char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		out[0] = (char)(0xe0 | (cp >> 12));
		out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		out[2] = (char)(0x80 | (cp & 0x3f));
		return 3;
	}
	out[0] = (char)(0xf0 | (cp >> 18));
	out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
	out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
	out[3] = (char)(0x80 | (cp & 0x3f));
	return 4;
}

static int hex4(struct parser *ps, uint32_t *out)
{
	if (ps->end - ps->p < 4) {
		fail(ps, "truncated \\u escape");
		return -1;
	}
	uint32_t v = 0;
	for (int i = 0; i < 4; i++) {
		unsigned char c = ps->p[i];
		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= (uint32_t)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v |= (uint32_t)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			v |= (uint32_t)(c - 'A' + 10);
		else {
			fail(ps, "invalid hex digit in \\u escape");
			return -1;
		}
	}
	ps->p += 4;
	*out = v;
	return 0;
}

/* Parses a string at ps->p (on the opening quote) into a malloc'd buffer. */
static char *parse_string(struct parser *ps, size_t *len_out)
{
	ps->p++;                                /* opening quote */
	/* Decoded text is never longer than the source: size by a first scan. */
	const unsigned char *q = ps->p;
	while (q < ps->end && *q != '"') {
		if (*q == '\\' && q + 1 < ps->end)
			q++;
		q++;
	}
	if (q >= ps->end) {
		fail(ps, "unterminated string");
		return NULL;
	}
	char *out = malloc((size_t)(q - ps->p) + 1);
	if (!out) {
		fail(ps, "out of memory");
		return NULL;
	}
	size_t n = 0;
	for (;;) {
		if (ps->p >= ps->end) {
			fail(ps, "unterminated string");
			goto error;
		}
		unsigned char c = *ps->p;
		if (c == '"') {
			ps->p++;
			break;
		}
		if (c < 0x20) {
			fail(ps, "control character 0x%02x in string", c);
			goto error;
		}
		if (c == '\\') {
			ps->p++;
			if (ps->p >= ps->end) {
				fail(ps, "unterminated string");
				goto error;
			}
			unsigned char e = *ps->p++;
			switch (e) {
			case '"': out[n++] = '"'; break;
			case '\\': out[n++] = '\\'; break;
			case '/': out[n++] = '/'; break;
			case 'b': out[n++] = '\b'; break;
			case 'f': out[n++] = '\f'; break;
			case 'n': out[n++] = '\n'; break;
			case 'r': out[n++] = '\r'; break;
			case 't': out[n++] = '\t'; break;
			case 'u': {
				uint32_t cp;
				if (hex4(ps, &cp) < 0)
					goto error;
				if (cp >= 0xdc00 && cp <= 0xdfff) {
					fail(ps, "lone low surrogate in \\u escape");
					goto error;
				}
				if (cp >= 0xd800 && cp <= 0xdbff) {
					uint32_t lo;
					if (ps->end - ps->p < 2 || ps->p[0] != '\\' ||
							ps->p[1] != 'u') {
						fail(ps, "high surrogate without low surrogate");
						goto error;
					}
					ps->p += 2;
					if (hex4(ps, &lo) < 0)
						goto error;
					if (lo < 0xdc00 || lo > 0xdfff) {
						fail(ps, "high surrogate without low surrogate");
						goto error;
					}
					cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
				}
				/* At most 4 bytes out for 6 or 12 bytes in. */
				n += utf8_put(out + n, cp);
				break;
			}
			default:
				ps->p--;
				fail(ps, "invalid escape '\\%c'", e >= 0x20 && e < 0x7f ? e : '?');
				goto error;
			}
			continue;
		}
		if (c < 0x80) {
			out[n++] = (char)c;
			ps->p++;
			continue;
		}
		size_t sl = utf8_seq(ps->p, ps->end);
		if (sl == 0) {
			if (!(ps->flags & RQ_JSON_LAX_UTF8)) {
				fail(ps, "invalid UTF-8 in string");
				goto error;
			}
			sl = 1;
		}
		memcpy(out + n, ps->p, sl);
		n += sl;
		ps->p += sl;
	}
	out[n] = '\0';
	*len_out = n;
	return out;
error:
	free(out);
	return NULL;
}

static int parse_number(struct parser *ps, struct rq_json *v)
{
	const unsigned char *s = ps->p, *p = ps->p, *end = ps->end;
	bool integral = true;
	if (p < end && *p == '-')
		p++;
	if (p >= end || !(*p >= '0' && *p <= '9')) {
		fail(ps, "invalid number");
		return -1;
	}
	if (*p == '0') {
		p++;
	} else {
		while (p < end && *p >= '0' && *p <= '9')
			p++;
	}
	if (p < end && *p == '.') {
		integral = false;
		p++;
		if (p >= end || !(*p >= '0' && *p <= '9')) {
			ps->p = p;
			fail(ps, "digit expected after '.'");
			return -1;
		}
		while (p < end && *p >= '0' && *p <= '9')
			p++;
	}
	if (p < end && (*p == 'e' || *p == 'E')) {
		integral = false;
		p++;
		if (p < end && (*p == '+' || *p == '-'))
			p++;
		if (p >= end || !(*p >= '0' && *p <= '9')) {
			ps->p = p;
			fail(ps, "digit expected in exponent");
			return -1;
		}
		while (p < end && *p >= '0' && *p <= '9')
			p++;
	}
	size_t n = (size_t)(p - s);
	if (n >= NUMBER_MAX) {
		fail(ps, "number too long");
		return -1;
	}
	char tmp[NUMBER_MAX];
	memcpy(tmp, s, n);
	tmp[n] = '\0';
	errno = 0;
	double d = strtod(tmp, NULL);
	if (!isfinite(d)) {
		fail(ps, "number out of range");
		return -1;
	}
	v->type = RQ_JSON_NUMBER;
	v->number = d;
	if (integral) {
		errno = 0;
		long long ll = strtoll(tmp, NULL, 10);
		if (errno == 0) {
			v->is_int = true;
			v->integer = ll;
		}
	}
	ps->p = p;
	return 0;
}

static int literal(struct parser *ps, const char *word)
{
	size_t n = strlen(word);
	if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) {
		fail(ps, "invalid literal");
		return -1;
	}
	ps->p += n;
	return 0;
}

static void append_child(struct rq_json *parent, struct rq_json *c)
{
	if (parent->last)
		parent->last->next = c;
	else
		parent->child = c;
	parent->last = c;
	parent->count++;
}

static struct rq_json *parse_value(struct parser *ps, int depth);

/*
 * RQ_JSON_SKIP_DEEP: steps over the container at ps->p without recursion
 * (a counter of open brackets, strings stepped over with their escapes)
 * and makes v a too_deep null. Mismatched brackets or an unterminated
 * string are errors as usual.
 */
static int skip_container(struct parser *ps, struct rq_json *v)
{
	/* one bit per open level would need a stack; brackets must match, so
	 * keep the kinds in a growing byte array */
	size_t cap = 256, n = 0;
	char *open = malloc(cap);
	if (!open) {
		fail(ps, "out of memory");
		return -1;
	}
	while (ps->p < ps->end) {
		unsigned char c = *ps->p;
		if (c == '"') {
			ps->p++;
			while (ps->p < ps->end && *ps->p != '"') {
				if (*ps->p == '\\' && ps->p + 1 < ps->end)
					ps->p++;
				ps->p++;
			}
			if (ps->p >= ps->end)
				break;
		} else if (c == '{' || c == '[') {
			if (n == cap) {
				char *o = realloc(open, cap * 2);
				if (!o) {
					free(open);
					fail(ps, "out of memory");
					return -1;
				}
				open = o;
				cap *= 2;
			}
			open[n++] = c == '{' ? '}' : ']';
		} else if (c == '}' || c == ']') {
			if (n == 0 || open[n - 1] != (char)c) {
				free(open);
				fail(ps, "mismatched '%c'", c);
				return -1;
			}
			if (--n == 0) {
				ps->p++;
				free(open);
				v->type = RQ_JSON_NULL;
				v->too_deep = true;
				return 0;
			}
		}
		ps->p++;
	}
	free(open);
	fail(ps, "unexpected end inside a container nested deeper than %d", RQ_JSON_MAX_DEPTH);
	return -1;
}

static int parse_container(struct parser *ps, struct rq_json *v, int depth)
{
	bool object = *ps->p == '{';
	char close = object ? '}' : ']';
	v->type = object ? RQ_JSON_OBJECT : RQ_JSON_ARRAY;
	if (depth >= RQ_JSON_MAX_DEPTH) {
		if (ps->flags & RQ_JSON_SKIP_DEEP)
			return skip_container(ps, v);
		fail(ps, "nesting deeper than %d", RQ_JSON_MAX_DEPTH);
		return -1;
	}
	ps->p++;
	skip_ws(ps);
	if (ps->p < ps->end && *ps->p == close) {
		ps->p++;
		return 0;
	}
	for (;;) {
		char *key = NULL;
		size_t key_len = 0;
		if (object) {
			skip_ws(ps);
			if (ps->p >= ps->end || *ps->p != '"') {
				fail(ps, "expected a string as object key");
				return -1;
			}
			key = parse_string(ps, &key_len);
			if (!key)
				return -1;
			skip_ws(ps);
			if (ps->p >= ps->end || *ps->p != ':') {
				free(key);
				fail(ps, "expected ':' after object key");
				return -1;
			}
			ps->p++;
		}
		struct rq_json *c = parse_value(ps, depth + 1);
		if (!c) {
			free(key);
			return -1;
		}
		c->key = key;
		c->key_len = key_len;
		append_child(v, c);
		skip_ws(ps);
		if (ps->p >= ps->end) {
			fail(ps, "unexpected end inside %s", object ? "object" : "array");
			return -1;
		}
		if (*ps->p == ',') {
			ps->p++;
			continue;
		}
		if (*ps->p == close) {
			ps->p++;
			return 0;
		}
		fail(ps, "expected ',' or '%c'", close);
		return -1;
	}
}

static struct rq_json *parse_value(struct parser *ps, int depth)
{
	skip_ws(ps);
	if (ps->p >= ps->end) {
		fail(ps, "unexpected end of input");
		return NULL;
	}
	struct rq_json *v = calloc(1, sizeof(*v));
	if (!v) {
		fail(ps, "out of memory");
		return NULL;
	}
	int rc;
	switch (*ps->p) {
	case '{':
	case '[':
		rc = parse_container(ps, v, depth);
		break;
	case '"':
		v->type = RQ_JSON_STRING;
		v->str = parse_string(ps, &v->len);
		rc = v->str ? 0 : -1;
		break;
	case 't':
		v->type = RQ_JSON_BOOL;
		v->boolean = true;
		rc = literal(ps, "true");
		break;
	case 'f':
		v->type = RQ_JSON_BOOL;
		rc = literal(ps, "false");
		break;
	case 'n':
		v->type = RQ_JSON_NULL;
		rc = literal(ps, "null");
		break;
	default:
		if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9')) {
			rc = parse_number(ps, v);
		} else {
			fail(ps, "unexpected character '%c'",
					*ps->p >= 0x20 && *ps->p < 0x7f ? *ps->p : '?');
			rc = -1;
		}
	}
	if (rc < 0) {
		rq_json_free(v);
		return NULL;
	}
	return v;
}

struct rq_json *rq_json_parse(const char *text, size_t len, int flags,
		char *err, size_t errlen)
{
	struct parser ps = {
		.p = (const unsigned char *)text,
		.start = (const unsigned char *)text,
		.end = (const unsigned char *)text + len,
		.flags = flags,
		.err = err,
		.errlen = errlen,
	};
	if (err && errlen)
		err[0] = '\0';
	if (!text) {
		fail(&ps, "no input");
		return NULL;
	}
	struct rq_json *v = parse_value(&ps, 0);
	if (!v)
		return NULL;
	skip_ws(&ps);
	if (ps.p != ps.end) {
		fail(&ps, "trailing characters after the JSON value");
		rq_json_free(v);
		return NULL;
	}
	return v;
}

void rq_json_free(struct rq_json *v)
{
	while (v) {
		struct rq_json *next = v->next;
		rq_json_free(v->child);
		free(v->str);
		free(v->key);
		free(v);
		v = next;
	}
}

const struct rq_json *rq_json_get(const struct rq_json *v, const char *key)
{
	if (!v || v->type != RQ_JSON_OBJECT || !key)
		return NULL;
	size_t n = strlen(key);
	const struct rq_json *found = NULL;
	for (const struct rq_json *c = v->child; c; c = c->next)
		if (c->key_len == n && memcmp(c->key, key, n) == 0)
			found = c;
	return found;
}

const struct rq_json *rq_json_at(const struct rq_json *v, size_t i)
{
	if (!v || v->type != RQ_JSON_ARRAY)
		return NULL;
	const struct rq_json *c = v->child;
	while (c && i--)
		c = c->next;
	return c;
}

const char *rq_json_get_str(const struct rq_json *v, const char *key)
{
	const struct rq_json *c = rq_json_get(v, key);
	return c && c->type == RQ_JSON_STRING ? c->str : NULL;
}

bool rq_json_get_int(const struct rq_json *v, const char *key, bool lax,
		int64_t *out)
{
	const struct rq_json *c = rq_json_get(v, key);
	if (!c)
		return false;
	if (c->type == RQ_JSON_NUMBER) {
		if (c->is_int) {
			*out = c->integer;
			return true;
		}
		/* 1.0 and 1e3 are integral too. */
		if (c->number == floor(c->number) && fabs(c->number) < 9.0e18) {
			*out = (int64_t)c->number;
			return true;
		}
		return false;
	}
	if (lax && c->type == RQ_JSON_STRING && c->len > 0 && c->len < 24 &&
			strlen(c->str) == c->len) {
		char *end;
		errno = 0;
		long long ll = strtoll(c->str, &end, 10);
		if (errno == 0 && *end == '\0' && end != c->str) {
			*out = ll;
			return true;
		}
	}
	return false;
}

bool rq_json_is(const struct rq_json *v, enum rq_json_type type)
{
	return v && v->type == type;
}

const char *rq_json_type_name(enum rq_json_type type)
{
	switch (type) {
	case RQ_JSON_NULL: return "null";
	case RQ_JSON_BOOL: return "boolean";
	case RQ_JSON_NUMBER: return "number";
	case RQ_JSON_STRING: return "string";
	case RQ_JSON_ARRAY: return "array";
	case RQ_JSON_OBJECT: return "object";
	}
	return "unknown";
}

/* ---- writer ---- */

void rq_json_buf_init(struct rq_json_buf *b)
{
	memset(b, 0, sizeof(*b));
}

void rq_json_buf_finish(struct rq_json_buf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

void rq_json_buf_reset(struct rq_json_buf *b)
{
	char *data = b->data;
	size_t cap = b->cap;
	memset(b, 0, sizeof(*b));
	b->data = data;
	b->cap = cap;
	if (data)
		data[0] = '\0';
}

char *rq_json_buf_take(struct rq_json_buf *b, size_t *len)
{
	char *s = NULL;
	if (!b->failed) {
		if (!b->data) {
			b->data = malloc(1);
			if (b->data)
				b->data[0] = '\0';
		}
		s = b->data;
		if (len)
			*len = b->len;
		b->data = NULL;
	}
	rq_json_buf_finish(b);
	return s;
}

bool rq_json_buf_ok(const struct rq_json_buf *b)
{
	return !b->failed;
}

static int reserve(struct rq_json_buf *b, size_t more)
{
	if (b->failed)
		return -1;
	if (more > SIZE_MAX / 2 - b->len) {
		b->failed = true;
		return -1;
	}
	size_t need = b->len + more + 1;
	if (need <= b->cap)
		return 0;
	size_t cap = b->cap ? b->cap : 64;
	while (cap < need)
		cap *= 2;
	char *d = realloc(b->data, cap);
	if (!d) {
		b->failed = true;
		return -1;
	}
	b->data = d;
	b->cap = cap;
	return 0;
}

static int put(struct rq_json_buf *b, const char *s, size_t n)
{
	if (reserve(b, n) < 0)
		return -1;
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

static bool in_object(const struct rq_json_buf *b)
{
	return b->depth > 0 && (b->is_object & ((uint64_t)1 << (b->depth - 1)));
}

/* Comma before a value or key, as the position needs; a value inside an
 * object without a key first is misuse and fails the buffer. */
static int prefix(struct rq_json_buf *b)
{
	if (b->failed)
		return -1;
	if (b->after_key) {
		b->after_key = false;
		return 0;
	}
	if (b->depth == 0)
		return 0;
	if (in_object(b) && !b->in_key) {
		b->failed = true;
		return -1;
	}
	uint64_t bit = (uint64_t)1 << (b->depth - 1);
	if (b->has_item & bit)
		return put(b, ",", 1);
	b->has_item |= bit;
	return 0;
}

static int open_level(struct rq_json_buf *b, char c)
{
	if (prefix(b) < 0)
		return -1;
	if (b->depth >= 64) {
		b->failed = true;
		return -1;
	}
	b->depth++;
	uint64_t bit = (uint64_t)1 << (b->depth - 1);
	b->has_item &= ~bit;
	if (c == '{')
		b->is_object |= bit;
	else
		b->is_object &= ~bit;
	return put(b, &c, 1);
}

static int close_level(struct rq_json_buf *b, char c)
{
	if (b->failed)
		return -1;
	if (b->depth == 0 || b->after_key || in_object(b) != (c == '}')) {
		b->failed = true;
		return -1;
	}
	b->depth--;
	return put(b, &c, 1);
}

int rq_json_buf_obj_begin(struct rq_json_buf *b)
{
	return open_level(b, '{');
}

int rq_json_buf_obj_end(struct rq_json_buf *b)
{
	return close_level(b, '}');
}

int rq_json_buf_arr_begin(struct rq_json_buf *b)
{
	return open_level(b, '[');
}

int rq_json_buf_arr_end(struct rq_json_buf *b)
{
	return close_level(b, ']');
}

/* Bytes put_escaped writes for s, quotes included. */
static size_t escaped_len(const unsigned char *p, const unsigned char *end)
{
	size_t n = 2;
	while (p < end) {
		unsigned char c = *p;
		if (c >= 0x80) {
			size_t sl = utf8_seq(p, end);
			n += sl ? sl : 3;
			p += sl ? sl : 1;
			continue;
		}
		p++;
		if (c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t' ||
				c == '\b' || c == '\f')
			n += 2;
		else if (c < 0x20 || c == 0x7f)
			n += 6;
		else
			n += 1;
	}
	return n;
}

static int put_escaped(struct rq_json_buf *b, const char *s, size_t len)
{
	if (b->failed)
		return -1;
	/* At most 6 bytes out per byte in: no overflow below this. */
	if (len > (SIZE_MAX / 2) / 6) {
		b->failed = true;
		return -1;
	}
	const unsigned char *start = (const unsigned char *)s;
	if (reserve(b, escaped_len(start, start + len)) < 0)
		return -1;
	const unsigned char *p = (const unsigned char *)s, *end = p + len;
	char *o = b->data + b->len;
	*o++ = '"';
	while (p < end) {
		unsigned char c = *p;
		if (c >= 0x80) {
			size_t sl = utf8_seq(p, end);
			if (sl == 0) {
				memcpy(o, "\xef\xbf\xbd", 3);   /* U+FFFD */
				o += 3;
				p++;
			} else {
				memcpy(o, p, sl);
				o += sl;
				p += sl;
			}
			continue;
		}
		p++;
		switch (c) {
		case '"': *o++ = '\\'; *o++ = '"'; break;
		case '\\': *o++ = '\\'; *o++ = '\\'; break;
		case '\n': *o++ = '\\'; *o++ = 'n'; break;
		case '\r': *o++ = '\\'; *o++ = 'r'; break;
		case '\t': *o++ = '\\'; *o++ = 't'; break;
		case '\b': *o++ = '\\'; *o++ = 'b'; break;
		case '\f': *o++ = '\\'; *o++ = 'f'; break;
		default:
			if (c < 0x20 || c == 0x7f) {
				static const char hex[] = "0123456789abcdef";
				memcpy(o, "\\u00", 4);
				o[4] = hex[c >> 4];
				o[5] = hex[c & 15];
				o += 6;
			} else {
				*o++ = (char)c;
			}
		}
	}
	*o++ = '"';
	b->len = (size_t)(o - b->data);
	b->data[b->len] = '\0';
	return 0;
}

static int put_key(struct rq_json_buf *b, const char *key, size_t len)
{
	b->in_key = true;
	int rc = prefix(b);
	b->in_key = false;
	if (rc < 0 || put_escaped(b, key, len) < 0 || put(b, ":", 1) < 0)
		return -1;
	b->after_key = true;
	return 0;
}

int rq_json_buf_key(struct rq_json_buf *b, const char *key)
{
	if (b->failed)
		return -1;
	if (b->after_key || !in_object(b)) {
		b->failed = true;
		return -1;
	}
	return put_key(b, key, strlen(key));
}

int rq_json_buf_strn(struct rq_json_buf *b, const char *s, size_t len)
{
	if (prefix(b) < 0)
		return -1;
	return put_escaped(b, s, len);
}

int rq_json_buf_str(struct rq_json_buf *b, const char *s)
{
	if (!s)
		return rq_json_buf_null(b);
	return rq_json_buf_strn(b, s, strlen(s));
}

int rq_json_buf_int(struct rq_json_buf *b, int64_t v)
{
	char tmp[32];
	int n = snprintf(tmp, sizeof(tmp), "%" PRId64, v);
	if (prefix(b) < 0)
		return -1;
	return put(b, tmp, (size_t)n);
}

int rq_json_buf_double(struct rq_json_buf *b, double v)
{
	if (!isfinite(v))
		return rq_json_buf_null(b);
	char tmp[40];
	int n = 0;
	for (int prec = 15; prec <= 17; prec++) {
		n = snprintf(tmp, sizeof(tmp), "%.*g", prec, v);
		if (strtod(tmp, NULL) == v)
			break;
	}
	/* Keep it a non-integer in the text (-0 and 1e300 stay doubles). */
	if (!strpbrk(tmp, ".eE") && (size_t)n + 2 < sizeof(tmp)) {
		memcpy(tmp + n, ".0", 3);
		n += 2;
	}
	if (prefix(b) < 0)
		return -1;
	return put(b, tmp, (size_t)n);
}

int rq_json_buf_bool(struct rq_json_buf *b, bool v)
{
	if (prefix(b) < 0)
		return -1;
	return v ? put(b, "true", 4) : put(b, "false", 5);
}

int rq_json_buf_null(struct rq_json_buf *b)
{
	if (prefix(b) < 0)
		return -1;
	return put(b, "null", 4);
}

int rq_json_buf_raw(struct rq_json_buf *b, const char *json, size_t len)
{
	if (prefix(b) < 0)
		return -1;
	return put(b, json, len);
}

int rq_json_buf_value(struct rq_json_buf *b, const struct rq_json *v)
{
	if (!v)
		return rq_json_buf_null(b);
	switch (v->type) {
	case RQ_JSON_NULL:
		return rq_json_buf_null(b);
	case RQ_JSON_BOOL:
		return rq_json_buf_bool(b, v->boolean);
	case RQ_JSON_NUMBER:
		return v->is_int ? rq_json_buf_int(b, v->integer) :
				rq_json_buf_double(b, v->number);
	case RQ_JSON_STRING:
		return rq_json_buf_strn(b, v->str, v->len);
	case RQ_JSON_ARRAY:
	case RQ_JSON_OBJECT: {
		bool object = v->type == RQ_JSON_OBJECT;
		if ((object ? rq_json_buf_obj_begin(b) : rq_json_buf_arr_begin(b)) < 0)
			return -1;
		for (const struct rq_json *c = v->child; c; c = c->next) {
			if (object) {
				/* Keys may hold NUL: write them by length. */
				if (put_key(b, c->key ? c->key : "", c->key_len) < 0)
					return -1;
			}
			if (rq_json_buf_value(b, c) < 0)
				return -1;
		}
		return object ? rq_json_buf_obj_end(b) : rq_json_buf_arr_end(b);
	}
	}
	b->failed = true;
	return -1;
}

int rq_json_buf_kv_str(struct rq_json_buf *b, const char *key, const char *s)
{
	if (rq_json_buf_key(b, key) < 0)
		return -1;
	return rq_json_buf_str(b, s);
}

int rq_json_buf_kv_int(struct rq_json_buf *b, const char *key, int64_t v)
{
	if (rq_json_buf_key(b, key) < 0)
		return -1;
	return rq_json_buf_int(b, v);
}

int rq_json_buf_kv_bool(struct rq_json_buf *b, const char *key, bool v)
{
	if (rq_json_buf_key(b, key) < 0)
		return -1;
	return rq_json_buf_bool(b, v);
}

size_t rq_json_depth(const struct rq_json *v)
{
	if (!v)
		return 0;
	if (v->too_deep)
		return RQ_JSON_MAX_DEPTH + 1;
	if (v->type != RQ_JSON_ARRAY && v->type != RQ_JSON_OBJECT)
		return 0;
	size_t max = 0;
	for (const struct rq_json *c = v->child; c; c = c->next) {
		size_t d = rq_json_depth(c);
		if (d > max)
			max = d;
	}
	return 1 + max;
}

bool rq_json_has_deep(const struct rq_json *v)
{
	if (!v)
		return false;
	if (v->too_deep)
		return true;
	for (const struct rq_json *c = v->child; c; c = c->next)
		if (rq_json_has_deep(c))
			return true;
	return false;
}

/* A message handed to relayq by an application: line endings, header
 * fixes (Received, Message-ID, Date, From, Bcc), recipients from To/Cc/Bcc
 * (see submit.h). Pure: no I/O. */
#include "relayq/submit.h"

#include "relayq/err.h"
#include "relayq/message.h"
#include "relayq/str.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- lines ---- */

/* One line of the input: [p, p + len) without its line end. */
struct line {
	const char *p;
	size_t len;
	bool ended;     /* had a line end (LF) */
};

/* The line at *pos; advances *pos past its line end. False at the end. */
static bool next_line(const char *msg, size_t len, size_t *pos, struct line *l)
{
	if (*pos >= len)
		return false;
	const char *s = msg + *pos;
	size_t rest = len - *pos;
	const char *lf = memchr(s, '\n', rest);
	if (!lf) {
		l->p = s;
		l->len = rest;
		l->ended = false;
		*pos = len;
		return true;
	}
	size_t n = (size_t)(lf - s);
	*pos += n + 1;
	if (n > 0 && s[n - 1] == '\r')
		n--;
	l->p = s;
	l->len = n;
	l->ended = true;
	return true;
}

static bool is_wsp(char c)
{
	return c == ' ' || c == '\t';
}

/* Length of the field name when l starts a header field ("Name:" or
 * "Name :"), else 0. */
static size_t field_name_len(const struct line *l)
{
	size_t i = 0;
	while (i < l->len && (unsigned char)l->p[i] > 32 && (unsigned char)l->p[i] < 127 &&
	       l->p[i] != ':')
		i++;
	if (i == 0)
		return 0;
	size_t name = i;
	while (i < l->len && is_wsp(l->p[i]))
		i++;
	return i < l->len && l->p[i] == ':' ? name : 0;
}

static bool name_is(const struct line *l, size_t nlen, const char *name)
{
	return nlen == strlen(name) && strncasecmp(l->p, name, nlen) == 0;
}

/* Where the header section ends: *hdr_end is the offset just past the last
 * header line, *body the offset of the body (past the empty line), *has_sep
 * whether there was an empty line. See submit.h for the rules. */
static void split(const char *msg, size_t len, size_t *hdr_end, size_t *body, bool *has_sep)
{
	size_t pos = 0, start = 0;
	struct line l;
	bool all_header = true, first = true;
	while (start = pos, next_line(msg, len, &pos, &l)) {
		if (l.len == 0 && l.ended) {
			*hdr_end = start;
			*body = pos;
			*has_sep = true;
			return;
		}
		if (all_header) {
			bool cont = !first && l.len > 0 && is_wsp(l.p[0]);
			if (!cont && field_name_len(&l) == 0)
				all_header = false;
		}
		first = false;
	}
	*has_sep = false;
	if (all_header) {
		*hdr_end = len;
		*body = len;
	} else {
		*hdr_end = 0;
		*body = 0;
	}
}

/* ---- output buffer ---- */

struct obuf {
	char *p;
	size_t len, cap;
	bool failed;    /* out of memory or over RQ_SUBMIT_MAX */
	bool over;
};

static void put(struct obuf *b, const void *s, size_t n)
{
	if (b->failed || n == 0)
		return;
	if (n > RQ_SUBMIT_MAX - b->len) {
		b->failed = b->over = true;
		return;
	}
	if (b->len + n > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n)
			cap = cap > RQ_SUBMIT_MAX / 2 ? RQ_SUBMIT_MAX : cap * 2;
		char *np = realloc(b->p, cap);
		if (!np) {
			b->failed = true;
			return;
		}
		b->p = np;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
}

static void puts_(struct obuf *b, const char *s)
{
	put(b, s, strlen(s));
}

static void put_line(struct obuf *b, const struct line *l)
{
	put(b, l->p, l->len);
	put(b, "\r\n", 2);
}

/* ---- fix ---- */

/* True when s has CR, LF or another control byte but HTAB. */
static bool has_ctl(const char *s)
{
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if ((c < 32 && c != '\t') || c == 127)
			return true;
	}
	return false;
}

static bool hostname_ok(const char *h)
{
	size_t n = strlen(h);
	if (n == 0 || n > 255)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = h[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '-' || c == '.' || c == '_'))
			return false;
	}
	return true;
}

/* splitmix64's final mix, over an FNV-1a 64 (rq_str_fnv1a). */
static uint64_t mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void base36(char *out, uint64_t v)
{
	char tmp[16];
	size_t n = 0;
	do {
		tmp[n++] = "0123456789abcdefghijklmnopqrstuvwxyz"[v % 36];
		v /= 36;
	} while (v);
	for (size_t i = 0; i < n; i++)
		out[i] = tmp[n - 1 - i];
	out[n] = '\0';
}

int rq_submit_fix(const char *msg, size_t len, const struct rq_submit_fix *f,
		  char **out, size_t *outlen, char *err, size_t errlen)
{
	struct obuf b = {0};
	int rc = -1;
	const char *host = f->hostname ? f->hostname : "localhost";
	*out = NULL;
	*outlen = 0;
	if (len > RQ_SUBMIT_MAX) {
		rq_err_set(err, errlen, "message larger than %zu bytes", RQ_SUBMIT_MAX);
		goto cleanup;
	}
	if (f->received && has_ctl(f->received)) {
		rq_err_set(err, errlen, "Received field holds a control byte");
		goto cleanup;
	}
	if (f->add_message_id && !hostname_ok(host)) {
		rq_err_set(err, errlen, "invalid host name for Message-ID");
		goto cleanup;
	}
	if (f->add_from) {
		char aerr[160];
		if (!f->from || has_ctl(f->from)) {
			rq_err_set(err, errlen, "From: %s", f->from ? "holds a control byte" : "no address");
			goto cleanup;
		}
		if (!strchr(f->from, '<') &&
		    !rq_addr_valid(f->from, strlen(f->from), false, aerr, sizeof(aerr))) {
			rq_err_set(err, errlen, "From: %s", aerr);
			goto cleanup;
		}
	}
	size_t hdr_end, body;
	bool has_sep;
	split(msg, len, &hdr_end, &body, &has_sep);

	/* room for the usual case: a few CRs and the added fields */
	size_t guess = len + len / 16 + 512;
	if (guess > RQ_SUBMIT_MAX)
		guess = RQ_SUBMIT_MAX;
	if (!(b.p = malloc(guess))) {
		rq_err_set(err, errlen, "out of memory");
		goto cleanup;
	}
	b.cap = guess;

	if (f->received) {
		puts_(&b, f->received);
		put(&b, "\r\n", 2);
	}
	bool have_id = false, have_date = false, have_from = false, skipping = false;
	size_t pos = 0;
	struct line l;
	while (pos < hdr_end && next_line(msg, hdr_end, &pos, &l)) {
		if (l.len > 0 && is_wsp(l.p[0])) {
			if (!skipping)
				put_line(&b, &l);
			continue;
		}
		size_t nlen = field_name_len(&l);
		skipping = f->remove_bcc && name_is(&l, nlen, "Bcc");
		if (name_is(&l, nlen, "Message-ID"))
			have_id = true;
		else if (name_is(&l, nlen, "Date"))
			have_date = true;
		else if (name_is(&l, nlen, "From"))
			have_from = true;
		if (!skipping)
			put_line(&b, &l);
	}
	if (f->add_message_id && !have_id) {
		uint64_t h = RQ_STR_FNV_BASIS;
		h = rq_str_fnv1a(h, msg, len);
		if (f->from)
			h = rq_str_fnv1a(h, f->from, strlen(f->from) + 1);
		h = rq_str_fnv1a(h, &f->now_ms, sizeof(f->now_ms));
		char t[16], hs[16];
		base36(t, f->now_ms < 0 ? 0 : (uint64_t)f->now_ms);
		base36(hs, mix(h));
		puts_(&b, "Message-ID: <");
		puts_(&b, t);
		put(&b, ".", 1);
		puts_(&b, hs);
		put(&b, "@", 1);
		puts_(&b, host);
		put(&b, ">\r\n", 3);
	}
	if (f->add_date && !have_date) {
		char d[RQ_SUBMIT_DATE_LEN];
		if (rq_submit_date(d, sizeof(d), f->now_ms) < 0) {
			rq_err_set(err, errlen, "cannot write the date of %lld ms", (long long)f->now_ms);
			goto cleanup;
		}
		puts_(&b, "Date: ");
		puts_(&b, d);
		put(&b, "\r\n", 2);
	}
	if (f->add_from && !have_from) {
		bool mailbox = strchr(f->from, '<') != NULL;
		puts_(&b, mailbox ? "From: " : "From: <");
		puts_(&b, f->from);
		puts_(&b, mailbox ? "\r\n" : ">\r\n");
	}
	put(&b, "\r\n", 2);
	pos = body;
	while (next_line(msg, len, &pos, &l))
		put_line(&b, &l);
	(void)has_sep;
	if (b.failed) {
		rq_err_set(err, errlen, b.over ? "message larger than %zu bytes after the fixes"
			   : "out of memory", RQ_SUBMIT_MAX);
		goto cleanup;
	}
	*out = b.p;
	*outlen = b.len;
	b.p = NULL;
	rc = 0;
cleanup:
	free(b.p);
	return rc;
}

/* ---- date and Received ---- */

/* RFC 5322 date-time of tm, off seconds east of UTC. */
static int fmt_date(char *buf, size_t len, const struct tm *tm, long off)
{
	static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
	static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
					     "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
	char sign = off < 0 ? '-' : '+';
	if (off < 0)
		off = -off;
	off = (off + 30) / 60;      /* minutes, rounded */
	int n = snprintf(buf, len, "%s, %02d %s %04d %02d:%02d:%02d %c%02ld%02ld",
			 days[tm->tm_wday % 7], tm->tm_mday, months[tm->tm_mon % 12],
			 tm->tm_year + 1900, tm->tm_hour, tm->tm_min, tm->tm_sec, sign,
			 (off / 60) % 100, off % 60);
	return n < 0 || (size_t)n >= len ? -1 : n;
}

int rq_submit_date(char *buf, size_t len, int64_t now_ms)
{
	time_t t = (time_t)(now_ms / 1000 - (now_ms % 1000 < 0 ? 1 : 0));
	struct tm tm;
	if (!localtime_r(&t, &tm) || tm.tm_wday < 0 || tm.tm_wday > 6 || tm.tm_mon < 0 ||
	    tm.tm_mon > 11 || tm.tm_year + 1900 < 0 || tm.tm_year + 1900 > 9999)
		return -1;
	return fmt_date(buf, len, &tm, tm.tm_gmtoff);
}

int rq_submit_date_utc(char *buf, size_t len, int64_t t_s)
{
	time_t t = (time_t)t_s;
	struct tm tm;
	if (!gmtime_r(&t, &tm))
		return -1;
	return fmt_date(buf, len, &tm, 0);
}

/* Copies s into out (room for max + 1), '_' for bytes outside printable
 * ASCII and for the bytes of bad; dflt when s is NULL or empty. */
static void clean(char *out, size_t max, const char *s, const char *bad, const char *dflt)
{
	if (!s || !*s)
		s = dflt;
	size_t n = 0;
	for (; *s && n < max; s++) {
		unsigned char c = (unsigned char)*s;
		out[n++] = c <= 32 || c >= 127 || strchr(bad, c) ? '_' : (char)c;
	}
	out[n] = '\0';
}

int rq_submit_received(char *buf, size_t len, const char *helo, const char *reverse,
		       const char *ip, const char *hostname, const char *proto,
		       const char *one_rcpt, int64_t now_ms)
{
	static const char bad[] = "()[]<>;\\\"";
	char h[RQ_SUBMIT_HELO_MAX + 1], r[RQ_SUBMIT_HELO_MAX + 1], host[RQ_SUBMIT_HELO_MAX + 1];
	char a[64], p[16], date[RQ_SUBMIT_DATE_LEN];
	clean(h, RQ_SUBMIT_HELO_MAX, helo, bad, "unknown");
	clean(r, RQ_SUBMIT_HELO_MAX, reverse, bad, "unknown");
	clean(host, RQ_SUBMIT_HELO_MAX, hostname, bad, "localhost");
	size_t n = 0;
	for (const char *s = ip ? ip : ""; *s && n < 45; s++) {
		char c = *s;
		bool okc = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
			   (c >= 'A' && c <= 'F') || c == '.' || c == ':';
		a[n++] = okc ? c : '_';
	}
	a[n] = '\0';
	n = 0;
	for (const char *s = proto ? proto : "ESMTP"; *s && n < sizeof(p) - 1; s++) {
		char c = *s;
		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
			p[n++] = c;
	}
	p[n] = '\0';
	if (!n)
		snprintf(p, sizeof(p), "ESMTP");
	if (rq_submit_date(date, sizeof(date), now_ms) < 0)
		return -1;
	bool rcpt = one_rcpt && rq_addr_valid(one_rcpt, strlen(one_rcpt), false, NULL, 0);
	int w = snprintf(buf, len, "Received: from %s (%s%s%s%s%s) by %s (relayq) with %s%s%s%s; %s",
			 h, r, a[0] ? " [" : "", a[0] && strchr(a, ':') ? "IPv6:" : "", a,
			 a[0] ? "]" : "", host, p, rcpt ? " for <" : "", rcpt ? one_rcpt : "",
			 rcpt ? ">" : "", date);
	return w < 0 || (size_t)w >= len ? -1 : w;
}

/* ---- mailbox ---- */

static size_t b64(char *out, const unsigned char *in, size_t n)
{
	static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	size_t o = 0;
	for (size_t i = 0; i < n; i += 3) {
		unsigned v = (unsigned)in[i] << 16;
		if (i + 1 < n)
			v |= (unsigned)in[i + 1] << 8;
		if (i + 2 < n)
			v |= in[i + 2];
		out[o++] = t[(v >> 18) & 63];
		out[o++] = t[(v >> 12) & 63];
		out[o++] = i + 1 < n ? t[(v >> 6) & 63] : '=';
		out[o++] = i + 2 < n ? t[v & 63] : '=';
	}
	return o;
}

int rq_submit_mailbox(char *buf, size_t len, const char *name, const char *addr,
		      char *err, size_t errlen)
{
	char aerr[160];
	if (!addr || !rq_addr_valid(addr, strlen(addr), false, aerr, sizeof(aerr))) {
		rq_err_set(err, errlen, "%s", addr ? aerr : "no address");
		return -1;
	}
	unsigned char nm[RQ_SUBMIT_NAME_MAX];
	size_t nn = 0;
	bool eight = false;
	for (const char *s = name ? name : ""; *s && nn < sizeof(nm); s++) {
		unsigned char c = (unsigned char)*s;
		if (c < 32 || c == 127)
			continue;
		eight |= c >= 0x80;
		nm[nn++] = c;
	}
	/* never cut a UTF-8 sequence: drop a trailing incomplete one */
	if (eight && nn == sizeof(nm)) {
		size_t i = nn;
		while (i > 0 && (nm[i - 1] & 0xc0) == 0x80)
			i--;
		if (i > 0 && nm[i - 1] >= 0xc0) {
			unsigned char lead = nm[i - 1];
			size_t need = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : 2;
			if (nn - (i - 1) < need)
				nn = i - 1;
		}
	}
	/* worst case: every byte escaped, or base64 words of 45 bytes */
	char tmp[RQ_SUBMIT_NAME_MAX * 2 + 400];
	size_t o = 0;
	if (nn > 0 && !eight) {
		tmp[o++] = '"';
		for (size_t i = 0; i < nn; i++) {
			if (nm[i] == '"' || nm[i] == '\\')
				tmp[o++] = '\\';
			tmp[o++] = (char)nm[i];
		}
		tmp[o++] = '"';
		tmp[o++] = ' ';
	} else if (nn > 0) {
		/* RFC 2047: words of at most 75 characters, each whole characters */
		size_t i = 0;
		while (i < nn) {
			size_t take = nn - i > 45 ? 45 : nn - i;
			if (i + take < nn)
				while (take > 1 && (nm[i + take] & 0xc0) == 0x80)
					take--;
			if (o)
				tmp[o++] = ' ';
			memcpy(tmp + o, "=?UTF-8?B?", 10);
			o += 10;
			o += b64(tmp + o, nm + i, take);
			memcpy(tmp + o, "?=", 2);
			o += 2;
			i += take;
		}
		tmp[o++] = ' ';
	}
	int w = snprintf(buf, len, "%.*s<%s>", (int)o, tmp, addr);
	if (w < 0 || (size_t)w >= len) {
		rq_err_set(err, errlen, "mailbox too long");
		return -1;
	}
	return w;
}

/* ---- recipients from the header ---- */

enum tok_type { T_END, T_WORD, T_DOT, T_LITERAL, T_SPECIAL };

struct tok {
	enum tok_type type;
	const char *p;      /* T_WORD (atom or quoted string with its quotes), T_LITERAL */
	size_t len;
	char c;             /* T_SPECIAL: < > @ , ; : */
};

struct lexer {
	const char *s;
	size_t len, pos;
	bool have;          /* peeked */
	struct tok t;
	char *err;
	size_t errlen;
	bool failed;
};

static bool atext(unsigned char c)
{
	if (c >= 0x80)
		return true;    /* RFC 6532 */
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return true;
	return c && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

static void lex_fail(struct lexer *x, const char *what)
{
	if (!x->failed)
		rq_err_set(x->err, x->errlen, "%s", what);
	x->failed = true;
}

/* Reads the next token into x->t (T_END on failure). */
static void lex(struct lexer *x)
{
	struct tok *t = &x->t;
	t->type = T_END;
	for (;;) {
		if (x->failed || x->pos >= x->len)
			return;
		unsigned char c = (unsigned char)x->s[x->pos];
		if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
			x->pos++;
			continue;
		}
		if (c == '(') {     /* comment, nested, with quoted pairs */
			int depth = 0;
			while (x->pos < x->len) {
				char d = x->s[x->pos++];
				if (d == '\\' && x->pos < x->len)
					x->pos++;
				else if (d == '(')
					depth++;
				else if (d == ')' && --depth == 0)
					break;
			}
			if (depth != 0) {
				lex_fail(x, "unclosed comment");
				return;
			}
			continue;
		}
		break;
	}
	const char *s = x->s;
	size_t start = x->pos;
	unsigned char c = (unsigned char)s[start];
	if (c == '"') {
		size_t i = start + 1;
		for (; i < x->len && s[i] != '"'; i++)
			if (s[i] == '\\')
				i++;
		if (i >= x->len) {
			lex_fail(x, "unclosed quoted string");
			return;
		}
		t->type = T_WORD;
		t->p = s + start;
		t->len = i + 1 - start;
		x->pos = i + 1;
		return;
	}
	if (c == '[') {
		size_t i = start + 1;
		for (; i < x->len && s[i] != ']'; i++) {
			if (s[i] == '\\')
				i++;
			else if (s[i] == '[')
				break;
		}
		if (i >= x->len || s[i] != ']') {
			lex_fail(x, "unclosed domain literal");
			return;
		}
		t->type = T_LITERAL;
		t->p = s + start;
		t->len = i + 1 - start;
		x->pos = i + 1;
		return;
	}
	if (c == '.') {
		t->type = T_DOT;
		x->pos++;
		return;
	}
	if (strchr("<>@,;:", c)) {
		t->type = T_SPECIAL;
		t->c = (char)c;
		x->pos++;
		return;
	}
	if (!atext(c)) {
		lex_fail(x, c < 32 || c == 127 ? "control byte in an address list"
			 : "unexpected character in an address list");
		return;
	}
	size_t i = start;
	while (i < x->len && atext((unsigned char)s[i]))
		i++;
	t->type = T_WORD;
	t->p = s + start;
	t->len = i - start;
	x->pos = i;
}

static const struct tok *peek(struct lexer *x)
{
	if (!x->have) {
		lex(x);
		x->have = true;
	}
	return &x->t;
}

static struct tok take(struct lexer *x)
{
	peek(x);
	x->have = false;
	return x->t;
}

static bool is_special(const struct tok *t, char c)
{
	return t->type == T_SPECIAL && t->c == c;
}

/* The list being built: addresses, and a hash set for duplicates. */
struct rlist {
	char **v;
	size_t n, cap;
	size_t *slots;      /* index + 1, 0 empty */
	size_t nslots;
	char *err;
	size_t errlen;
	bool failed;
};

static uint64_t hash_ci(const char *s)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c >= 'A' && c <= 'Z')
			c = (unsigned char)(c - 'A' + 'a');
		h = (h ^ c) * 0x100000001b3ULL;
	}
	return mix(h);
}

static void rl_fail(struct rlist *r, const char *msg)
{
	if (!r->failed)
		rq_err_set(r->err, r->errlen, "%s", msg);
	r->failed = true;
}

static bool rl_grow_set(struct rlist *r)
{
	size_t ns = r->nslots ? r->nslots * 2 : 64;
	size_t *slots = calloc(ns, sizeof(*slots));
	if (!slots)
		return false;
	for (size_t i = 0; i < r->n; i++) {
		size_t j = hash_ci(r->v[i]) & (ns - 1);
		while (slots[j])
			j = (j + 1) & (ns - 1);
		slots[j] = i + 1;
	}
	free(r->slots);
	r->slots = slots;
	r->nslots = ns;
	return true;
}

/* Adds addr (len bytes) after validation, unless it is there already. */
static void rl_add(struct rlist *r, const char *addr, size_t len)
{
	if (r->failed)
		return;
	char aerr[160];
	if (!rq_addr_valid(addr, len, false, aerr, sizeof(aerr))) {
		rl_fail(r, aerr);
		return;
	}
	if ((r->n + 1) * 2 > r->nslots && !rl_grow_set(r)) {
		rl_fail(r, "out of memory");
		return;
	}
	char *a = strndup(addr, len);
	if (!a) {
		rl_fail(r, "out of memory");
		return;
	}
	size_t j = hash_ci(a) & (r->nslots - 1);
	for (; r->slots[j]; j = (j + 1) & (r->nslots - 1)) {
		if (strcasecmp(r->v[r->slots[j] - 1], a) == 0) {
			free(a);
			return;
		}
	}
	if (r->n == RQ_SUBMIT_RCPTS_MAX) {
		free(a);
		r->failed = true;
		rq_err_set(r->err, r->errlen, "more than %d recipients", RQ_SUBMIT_RCPTS_MAX);
		return;
	}
	if (r->n == r->cap) {
		size_t nc = r->cap ? r->cap * 2 : 8;
		char **nv = realloc(r->v, nc * sizeof(*nv));
		if (!nv) {
			free(a);
			rl_fail(r, "out of memory");
			return;
		}
		r->v = nv;
		r->cap = nc;
	}
	r->v[r->n++] = a;
	r->slots[j] = r->n;
}

/* A small growable string for building an addr-spec. */
struct sbuf {
	char s[RQ_ADDR_PATH_MAX + 2];
	size_t n;
	bool over;
};

static void sb_add(struct sbuf *b, const char *p, size_t n)
{
	if (b->over || n > sizeof(b->s) - 1 - b->n) {
		b->over = true;
		return;
	}
	memcpy(b->s + b->n, p, n);
	b->n += n;
	b->s[b->n] = '\0';
}

/* domain = dot-atom / domain-literal (obs: words and dots, CFWS around). */
static void parse_domain(struct lexer *x, struct rlist *r, struct sbuf *b)
{
	struct tok t = take(x);
	if (t.type == T_LITERAL) {
		sb_add(b, t.p, t.len);
		return;
	}
	if (t.type != T_WORD || t.p[0] == '"') {
		lex_fail(x, "an address without a domain");
		return;
	}
	sb_add(b, t.p, t.len);
	while (peek(x)->type == T_DOT) {
		take(x);
		t = take(x);
		if (t.type != T_WORD || t.p[0] == '"') {
			lex_fail(x, "a domain ending in a dot");
			return;
		}
		sb_add(b, ".", 1);
		sb_add(b, t.p, t.len);
	}
}

/* local-part "@" domain, the local part's first word already read; adds
 * the address. */
static void parse_addr_spec(struct lexer *x, struct rlist *r, struct tok first)
{
	struct sbuf b = {.n = 0};
	b.s[0] = '\0';
	sb_add(&b, first.p, first.len);
	while (peek(x)->type == T_DOT) {
		take(x);
		struct tok t = take(x);
		if (t.type != T_WORD) {
			lex_fail(x, "a local part ending in a dot");
			return;
		}
		sb_add(&b, ".", 1);
		sb_add(&b, t.p, t.len);
	}
	if (!is_special(peek(x), '@')) {
		if (!x->failed) {
			char shown[100];
			snprintf(shown, sizeof(shown), "'%.*s' has no domain", (int)(b.n > 60 ? 60 : b.n), b.s);
			rl_fail(r, shown);
		}
		return;
	}
	take(x);
	sb_add(&b, "@", 1);
	parse_domain(x, r, &b);
	if (x->failed || r->failed)
		return;
	if (b.over) {
		rl_fail(r, "an address longer than RFC 5321 allows");
		return;
	}
	rl_add(r, b.s, b.n);
}

/* "<" [route ":"] addr-spec ">", the "<" already read. */
static void parse_angle(struct lexer *x, struct rlist *r)
{
	if (is_special(peek(x), '>')) {
		rl_fail(r, "an empty address <>");
		return;
	}
	if (is_special(peek(x), '@')) {     /* obs-route: @a,@b: */
		for (;;) {
			take(x);
			struct sbuf skip = {.n = 0};
			parse_domain(x, r, &skip);
			if (x->failed)
				return;
			while (is_special(peek(x), ','))
				take(x);
			if (is_special(peek(x), ':')) {
				take(x);
				break;
			}
			if (!is_special(peek(x), '@')) {
				lex_fail(x, "a bad source route");
				return;
			}
		}
	}
	struct tok t = take(x);
	if (t.type != T_WORD) {
		lex_fail(x, "a bad address in angle brackets");
		return;
	}
	parse_addr_spec(x, r, t);
	if (x->failed || r->failed)
		return;
	if (!is_special(peek(x), '>')) {
		lex_fail(x, "unclosed angle address");
		return;
	}
	take(x);
}

/* mailbox / group. in_group: a group's mailbox (no nested groups). */
static void parse_address(struct lexer *x, struct rlist *r, bool in_group)
{
	/* a phrase (display name) or the local part's words */
	struct tok first = {.type = T_END};
	size_t words = 0;
	bool dots = false;
	for (;;) {
		const struct tok *t = peek(x);
		if (t->type == T_WORD) {
			if (!words)
				first = *t;
			words++;
			take(x);
		} else if (t->type == T_DOT) {
			dots = true;
			take(x);
			if (!words) {
				lex_fail(x, "an address starting with a dot");
				return;
			}
		} else {
			break;
		}
	}
	if (x->failed)
		return;
	const struct tok *t = peek(x);
	if (is_special(t, '<')) {
		take(x);
		parse_angle(x, r);
		return;
	}
	if (is_special(t, ':')) {
		if (in_group || !words) {
			lex_fail(x, in_group ? "a group inside a group" : "a group without a name");
			return;
		}
		take(x);
		for (;;) {
			while (is_special(peek(x), ','))
				take(x);
			t = peek(x);
			if (x->failed || r->failed)
				return;
			if (is_special(t, ';')) {
				take(x);
				return;
			}
			if (t->type == T_END)   /* obs: a group left open at the end */
				return;
			parse_address(x, r, true);
			if (x->failed || r->failed)
				return;
			t = peek(x);
			if (!is_special(t, ',') && !is_special(t, ';') && t->type != T_END) {
				lex_fail(x, "garbage after an address in a group");
				return;
			}
		}
	}
	if (is_special(t, '@') && words) {
		/* an addr-spec: re-read its words in order from the first */
		if (words > 1 && !dots) {
			lex_fail(x, "words before an address outside angle brackets");
			return;
		}
		x->pos = (size_t)(first.p - x->s) + first.len;
		x->have = false;
		parse_addr_spec(x, r, first);
		return;
	}
	if (words) {
		char shown[100];
		snprintf(shown, sizeof(shown), "'%.*s' has no domain",
			 (int)(first.len > 60 ? 60 : first.len), first.p);
		rl_fail(r, shown);
		return;
	}
	lex_fail(x, t->type == T_END ? "an empty address" : "unexpected character in an address list");
}

/* One field's value: an address-list (empty allowed, empty members too). */
static void parse_list(const char *v, size_t len, struct rlist *r)
{
	struct lexer x = {.s = v, .len = len, .err = r->err, .errlen = r->errlen};
	for (;;) {
		while (is_special(peek(&x), ','))
			take(&x);
		if (x.failed || r->failed || peek(&x)->type == T_END)
			break;
		parse_address(&x, r, false);
		if (x.failed || r->failed)
			break;
		const struct tok *t = peek(&x);
		if (t->type != T_END && !is_special(t, ','))
			lex_fail(&x, "garbage after an address");
	}
	if (x.failed)
		r->failed = true;
}

int rq_submit_header_rcpts(const char *msg, size_t len, char ***rcpts, size_t *n,
			   char *err, size_t errlen)
{
	struct rlist r = {.err = err, .errlen = errlen};
	struct obuf v = {0};
	int rc = -1;
	*rcpts = NULL;
	*n = 0;
	size_t hdr_end, body;
	bool has_sep;
	split(msg, len, &hdr_end, &body, &has_sep);
	size_t pos = 0;
	struct line l;
	bool in_field = false;
	for (;;) {
		bool more = pos < hdr_end && next_line(msg, hdr_end, &pos, &l);
		if (more && in_field && l.len > 0 && is_wsp(l.p[0])) {
			put(&v, " ", 1);
			put(&v, l.p, l.len);
			continue;
		}
		if (in_field) {
			if (v.failed) {
				rq_err_set(err, errlen, "out of memory");
				goto cleanup;
			}
			parse_list(v.p, v.len, &r);
			if (r.failed)
				goto cleanup;
			in_field = false;
		}
		if (!more)
			break;
		size_t nlen = field_name_len(&l);
		if (nlen && (name_is(&l, nlen, "To") || name_is(&l, nlen, "Cc") ||
			     name_is(&l, nlen, "Bcc"))) {
			const char *colon = memchr(l.p, ':', l.len);
			v.len = 0;
			put(&v, colon + 1, l.len - (size_t)(colon + 1 - l.p));
			in_field = true;
		}
	}
	(void)body;
	(void)has_sep;
	*rcpts = r.v;
	*n = r.n;
	r.v = NULL;
	r.n = 0;
	rc = 0;
cleanup:
	rq_submit_rcpts_free(r.v, r.n);
	free(r.slots);
	free(v.p);
	return rc;
}

int rq_submit_address_list(const char *list, size_t len, char ***rcpts, size_t *n,
			   char *err, size_t errlen)
{
	struct rlist r = {.v = *rcpts, .n = *n, .cap = *n, .err = err, .errlen = errlen};
	size_t had = *n;
	int rc = -1;
	if (!rl_grow_set(&r)) {
		rq_err_set(err, errlen, "out of memory");
		goto cleanup;
	}
	while (r.n * 2 > r.nslots) {
		if (!rl_grow_set(&r)) {
			rq_err_set(err, errlen, "out of memory");
			goto cleanup;
		}
	}
	parse_list(list, len, &r);
	if (r.failed)
		goto cleanup;
	rc = 0;
cleanup:
	if (rc < 0) {
		/* back to what the caller had (r.v may have moved) */
		for (size_t i = had; i < r.n; i++)
			free(r.v[i]);
		r.n = had;
	}
	*rcpts = r.v;
	*n = r.n;
	free(r.slots);
	return rc;
}

void rq_submit_rcpts_free(char **rcpts, size_t n)
{
	if (!rcpts)
		return;
	for (size_t i = 0; i < n; i++)
		free(rcpts[i]);
	free(rcpts);
}

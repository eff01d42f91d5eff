/* Messages: address checks, dot-stuffing and the DATA writer (see
 * message.h). */
#include "relayq/message.h"

#include "relayq/err.h"

#include <event2/buffer.h>
#include <idn2.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/*
 * Envelope addresses (RFC 5321 4.1.2, 4.5.3.1; RFC 6531 for UTF-8) and the
 * DATA writer (RFC 5321 4.5.2 transparency, 4.5.3.1.6 line length; RFC 5322
 * 2.1 header section, 2.2.3 folding).
 *
 * The content handed in (called body in the API) is a whole message: header
 * section, empty line, body. Header section: from the start of the content
 * up to and including its first empty line (a line ending at the very start
 * of the content, or right after another line ending; each of the two may
 * be CRLF or a bare LF). Everything after it is the body; content without
 * an empty line is all header section.
 *
 * Line endings: CRLF and a bare LF end a line everywhere; each goes out as
 * CRLF. A bare CR (a CR not followed by LF) ends a line in the body (it
 * goes out as CRLF) but not in the header section, where it is replaced by
 * a space: apps' header-injection filters often reject LF only, and a CR
 * that became CRLF would start a header field of its own ("Subject:
 * hi\rBcc: x"). An empty body becomes ".\r\n" alone (a message of no
 * lines); any other body that does not end with a line ending gets CRLF
 * before ".\r\n".
 *
 * Line length: a line longer than RQ_LINE_MAX (998) octets is broken by
 * inserting CRLF SP, as Postfix's smtp client does with
 * smtp_line_length_limit = 998 ("by inserting <CR><LF><SPACE>", postconf(5)).
 * The SP counts in the new wire line, so every wire line holds at most 998
 * octets (a long line is broken after 998 octets, then after every 997
 * more). In the header section the rest thus becomes a folded continuation
 * of the same field (RFC 5322 2.2.3), never a field of its own; in the body
 * a receiver sees a new line starting with SP. The count is of content
 * octets: a dot added for transparency is not counted (RFC 5321 4.5.3.1.6:
 * "not counting the leading dot duplicated for transparency"). A
 * continuation starts with SP, so it never needs dot-stuffing and a break
 * never lets a "." line end the data early.
 */

/* RFC 5322 atext, plus any byte >= 0x80 (RFC 6531 UTF-8). */
static bool is_atext(unsigned char c)
{
	if (c >= 0x80)
		return true;
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return true;
	return c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

static bool local_valid(const char *s, size_t len, char *err, size_t errlen)
{
	if (s[0] == '"') {
		if (len < 2 || s[len - 1] != '"') {
			rq_err_set(err, errlen, "unterminated quoted local part");
			return false;
		}
		for (size_t i = 1; i < len - 1; i++) {
			unsigned char c = (unsigned char)s[i];
			if (c == '\\') {
				if (i + 1 >= len - 1) {
					rq_err_set(err, errlen, "backslash at the end of the "
						"quoted local part");
					return false;
				}
				i++;
			} else if (c == '"') {
				rq_err_set(err, errlen, "unescaped '\"' inside the quoted "
					"local part");
				return false;
			}
		}
		return true;
	}
	bool dot_ok = false; /* a dot may follow an atom character only */
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '.') {
			if (!dot_ok) {
				rq_err_set(err, errlen, "empty part between dots in the local "
					"part (quote it)");
				return false;
			}
			dot_ok = false;
		} else if (c == ' ') {
			rq_err_set(err, errlen, "space outside a quoted local part");
			return false;
		} else if (!is_atext(c)) {
			rq_err_set(err, errlen, "character '%c' not allowed in an unquoted "
				"local part", c);
			return false;
		} else {
			dot_ok = true;
		}
	}
	if (!dot_ok) {
		rq_err_set(err, errlen, "local part ends with a dot (quote it)");
		return false;
	}
	return true;
}

static bool domain_valid(const char *s, size_t len, char *err, size_t errlen)
{
	if (s[0] == '[') {
		if (len < 3 || s[len - 1] != ']') {
			rq_err_set(err, errlen, "malformed address literal");
			return false;
		}
		for (size_t i = 1; i < len - 1; i++) {
			unsigned char c = (unsigned char)s[i];
			if (c < 33 || c > 126 || c == '[' || c == ']' || c == '\\') {
				rq_err_set(err, errlen, "character not allowed in an address "
					"literal");
				return false;
			}
		}
		return true;
	}
	size_t label = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '.') {
			if (label == 0) {
				rq_err_set(err, errlen, "empty label in the domain");
				return false;
			}
			label = 0;
			continue;
		}
		bool ok = c >= 0x80 || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '-' || c == '_';
		if (!ok) {
			rq_err_set(err, errlen, "character '%c' not allowed in the domain", c);
			return false;
		}
		if (++label > 63) {
			rq_err_set(err, errlen, "domain label longer than 63 octets");
			return false;
		}
	}
	if (label == 0) {
		rq_err_set(err, errlen, "domain ends with a dot");
		return false;
	}
	return true;
}

bool rq_addr_valid(const char *addr, size_t len, bool allow_null,
		   char *err, size_t errlen)
{
	rq_err_set(err, errlen, "ok");
	if (!addr || len == 0) {
		if (allow_null)
			return true;
		rq_err_set(err, errlen, "empty address");
		return false;
	}
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)addr[i];
		if (c == '\r' || c == '\n' || c == '\0') {
			rq_err_set(err, errlen, "address contains %s",
				c == '\r' ? "CR" : c == '\n' ? "LF" : "NUL");
			return false;
		}
		if (c < 0x20 || c == 0x7f) {
			rq_err_set(err, errlen, "address contains control byte 0x%02x", c);
			return false;
		}
	}
	const char *at = NULL;
	for (size_t i = len; i > 0; i--)
		if (addr[i - 1] == '@') {
			at = addr + i - 1;
			break;
		}
	if (!at) {
		rq_err_set(err, errlen, "address has no '@'");
		return false;
	}
	size_t llen = (size_t)(at - addr);
	size_t dlen = len - llen - 1;
	if (llen == 0) {
		rq_err_set(err, errlen, "empty local part");
		return false;
	}
	if (dlen == 0) {
		rq_err_set(err, errlen, "empty domain");
		return false;
	}
	if (llen > RQ_ADDR_LOCAL_MAX) {
		rq_err_set(err, errlen, "local part longer than %d octets", RQ_ADDR_LOCAL_MAX);
		return false;
	}
	if (dlen > RQ_ADDR_DOMAIN_MAX) {
		rq_err_set(err, errlen, "domain longer than %d octets", RQ_ADDR_DOMAIN_MAX);
		return false;
	}
	if (len + 2 > RQ_ADDR_PATH_MAX) {
		rq_err_set(err, errlen, "path longer than %d octets", RQ_ADDR_PATH_MAX);
		return false;
	}
	if (!local_valid(addr, llen, err, errlen))
		return false;
	if (!domain_valid(at + 1, dlen, err, errlen))
		return false;
	return true;
}

bool rq_addr_needs_utf8(const char *addr, size_t len)
{
	for (size_t i = 0; addr && i < len; i++)
		if ((unsigned char)addr[i] >= 0x80)
			return true;
	return false;
}

/* ---- IDNA ----------------------------------------------------------------- */

int rq_domain_to_ascii(const char *domain, size_t len, char *out, size_t cap,
		       char *err, size_t errlen)
{
	char in[RQ_ADDR_DOMAIN_MAX + 1];
	char *a = NULL;
	int rc = -1;
	if (!domain || !out || cap == 0) {
		rq_err_set(err, errlen, "no domain");
		goto cleanup;
	}
	if (len > RQ_ADDR_DOMAIN_MAX) {
		rq_err_set(err, errlen, "domain longer than %d octets", RQ_ADDR_DOMAIN_MAX);
		goto cleanup;
	}
	if (memchr(domain, '\0', len)) {
		rq_err_set(err, errlen, "domain contains NUL");
		goto cleanup;
	}
	memcpy(in, domain, len);
	in[len] = '\0';
	const char *res = in;
	if (rq_addr_needs_utf8(in, len)) {
		int r = idn2_to_ascii_8z(in, &a, IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL);
		if (r != IDN2_OK) {
			rq_err_set(err, errlen, "not a valid internationalized domain name "
				   "(IDNA2008: %s)", idn2_strerror(r));
			goto cleanup;
		}
		res = a;
	}
	size_t n = strlen(res);
	if (n > RQ_ADDR_DOMAIN_MAX) {
		rq_err_set(err, errlen, "domain longer than %d octets in A-labels",
			   RQ_ADDR_DOMAIN_MAX);
		goto cleanup;
	}
	if (n >= cap) {
		rq_err_set(err, errlen, "domain too long (%zu octets) for the buffer", n);
		goto cleanup;
	}
	memcpy(out, res, n + 1);
	rc = 0;
cleanup:
	idn2_free(a);
	return rc;
}

enum rq_addr_ascii rq_addr_to_ascii(const char *addr, size_t len,
				    char out[RQ_ADDR_PATH_MAX + 1],
				    char *err, size_t errlen)
{
	char dom[RQ_ADDR_DOMAIN_MAX + 1], why[200];
	rq_err_set(err, errlen, "ok");
	if (!rq_addr_needs_utf8(addr, len))
		return RQ_ADDR_ASCII_SAME;
	const char *at = NULL;
	for (size_t i = len; i > 0; i--)
		if (addr[i - 1] == '@') {
			at = addr + i - 1;
			break;
		}
	size_t llen = at ? (size_t)(at - addr) : len;
	if (!at || rq_addr_needs_utf8(addr, llen))
		return RQ_ADDR_ASCII_LOCAL_UTF8;
	size_t dlen = len - llen - 1;
	if (dlen > 0 && at[1] == '[') {
		rq_err_set(err, errlen, "non-ASCII address literal");
		return RQ_ADDR_ASCII_INVALID;
	}
	if (rq_domain_to_ascii(at + 1, dlen, dom, sizeof(dom), why, sizeof(why)) < 0) {
		rq_err_set(err, errlen, "%s", why);
		return RQ_ADDR_ASCII_INVALID;
	}
	size_t n = strlen(dom);
	/* the A-labels go through the same checks as any domain */
	if (n == 0 || !domain_valid(dom, n, why, sizeof(why))) {
		rq_err_set(err, errlen, "domain in A-labels \"%s\": %s", dom,
			   n ? why : "empty");
		return RQ_ADDR_ASCII_INVALID;
	}
	if (llen + 1 + n + 2 > RQ_ADDR_PATH_MAX) {
		rq_err_set(err, errlen, "path longer than %d octets with the domain in "
			   "A-labels", RQ_ADDR_PATH_MAX);
		return RQ_ADDR_ASCII_INVALID;
	}
	memcpy(out, addr, llen + 1);
	memcpy(out + llen + 1, dom, n + 1);
	return RQ_ADDR_ASCII_ALABEL;
}

const char *rq_addr_domain(const char *addr)
{
	if (!addr)
		return NULL;
	const char *at = strrchr(addr, '@');
	if (!at || at[1] == '\0')
		return NULL;
	return at + 1;
}

bool rq_body_is_8bit(const char *body, size_t len)
{
	for (size_t i = 0; body && i < len; i++)
		if ((unsigned char)body[i] >= 0x80)
			return true;
	return false;
}

/* ---- the DATA writer ------------------------------------------------------ */

/*
 * One scanner, two sinks: run() gets unchanged pieces of the body, put()
 * gets the inserted bytes. rq_data_append and rq_data_encode only differ in
 * their sinks, so they produce the same bytes by construction (and the tests
 * check it).
 */
struct sink {
	int (*run)(struct sink *s, const char *p, size_t n);
	int (*put)(struct sink *s, const char *p, size_t n);
};

/* stuff: DATA (dot-stuffing and the final ".\r\n"); false: BDAT content. */
static int scan(struct sink *s, const char *body, size_t len, bool stuff)
{
	size_t start = 0;   /* first body byte not yet handed to the sink */
	size_t col = 0;     /* octets on the current wire line (a continuation's
			       SP counts, a stuffed dot does not); 0 only at the
			       start of a line, never after a break */
	bool header = true; /* in the header section */

#define FLUSH(end) do { \
		if ((end) > start && s->run(s, body + start, (end) - start) < 0) \
			return -1; \
		start = (end); \
	} while (0)
#define PUT(str) do { \
		if (s->put(s, (str), sizeof(str) - 1) < 0) \
			return -1; \
	} while (0)

	for (size_t i = 0; i < len; i++) {
		char c = body[i];
		if (c == '\r' || c == '\n') {
			bool eol = true;
			if (c == '\n') {
				FLUSH(i); /* bare LF: add the CR before it */
				PUT("\r");
			} else if (i + 1 < len && body[i + 1] == '\n') {
				i++; /* CRLF: kept as is */
			} else if (!header) {
				FLUSH(i + 1); /* bare CR in the body: add the LF */
				PUT("\n");
			} else {
				eol = false; /* bare CR in the header section: a space */
			}
			if (eol) {
				if (col == 0)
					header = false; /* an empty line */
				col = 0;
				continue;
			}
		}
		if (col == RQ_LINE_MAX) {
			FLUSH(i);
			PUT("\r\n "); /* a continuation line: the SP is octet 1 */
			col = 1;
		}
		if (c == '\r') {
			FLUSH(i);
			PUT(" ");
			start = i + 1;
		} else if (stuff && col == 0 && c == '.') {
			FLUSH(i);
			PUT(".");
		}
		col++;
	}
	FLUSH(len);
	if (col > 0)
		PUT("\r\n");
	if (stuff)
		PUT(".\r\n");
	return 0;
#undef FLUSH
#undef PUT
}

struct buf_sink {
	struct sink base;
	char *dst;
	size_t cap;
	size_t len;
};

static int buf_write(struct sink *s, const char *p, size_t n)
{
	struct buf_sink *b = (struct buf_sink *)s;
	if (b->dst && b->len < b->cap) {
		size_t room = b->cap - b->len;
		memcpy(b->dst + b->len, p, n < room ? n : room);
	}
	b->len += n;
	return 0;
}

size_t rq_data_encode(const char *body, size_t len, char *dst, size_t cap)
{
	struct buf_sink b = {{buf_write, buf_write}, dst, cap, 0};
	if (!body)
		len = 0;
	scan(&b.base, body, len, true);
	return b.len;
}

size_t rq_bdat_encode(const char *body, size_t len, char *dst, size_t cap)
{
	struct buf_sink b = {{buf_write, buf_write}, dst, cap, 0};
	if (!body)
		len = 0;
	scan(&b.base, body, len, false);
	return b.len;
}

/*
 * The evbuffer sink. Long unchanged runs go in by reference. Short runs and
 * the inserted bytes are copied into a staging evbuffer that is moved into
 * out (evbuffer_add_buffer moves chains, it copies nothing) before the next
 * reference and at the end. Two reasons, both measured on libevent 2.1.12:
 * a reference chain costs a ~1 KB allocation of its own, so referencing a
 * 70-byte line would cost more than copying it; and evbuffer_add() straight
 * after a reference chain allocates a new chain as large as the referenced
 * run (8 MB after a 5 MB reference), which the staging buffer avoids.
 */
struct ev_sink {
	struct sink base;
	struct evbuffer *out;
	struct evbuffer *stage;
};

static int ev_run(struct sink *s, const char *p, size_t n)
{
	struct ev_sink *e = (struct ev_sink *)s;
	if (n < RQ_DATA_REF_MIN)
		return evbuffer_add(e->stage, p, n);
	if (evbuffer_get_length(e->stage) > 0 && evbuffer_add_buffer(e->out, e->stage) < 0)
		return -1;
	return evbuffer_add_reference(e->out, p, n, NULL, NULL);
}

static int ev_put(struct sink *s, const char *p, size_t n)
{
	struct ev_sink *e = (struct ev_sink *)s;
	return evbuffer_add(e->stage, p, n);
}

int rq_data_append(struct evbuffer *out, const char *body, size_t len)
{
	int rc = -1;
	struct ev_sink e = {{ev_run, ev_put}, out, NULL};
	if (!out)
		goto cleanup;
	if (!body)
		len = 0;
	e.stage = evbuffer_new();
	if (!e.stage)
		goto cleanup;
	if (scan(&e.base, body, len, true) < 0)
		goto cleanup;
	if (evbuffer_add_buffer(out, e.stage) < 0)
		goto cleanup;
	rc = 0;
cleanup:
	if (e.stage)
		evbuffer_free(e.stage);
	return rc;
}

/*
 * The BDAT sink: the evbuffer sink writing into the current chunk (cur),
 * with every piece split at the chunk boundary. A full chunk goes out (its
 * "BDAT <n>" line, then its bytes) only when a further byte comes, so the
 * last chunk, whatever its size, is the one that says LAST, without a
 * first pass to learn the length.
 */
struct bdat_sink {
	struct sink base;
	struct ev_sink ev;      /* out = cur */
	struct evbuffer *out;   /* the stream */
	size_t chunk;
	size_t in_cur;          /* content bytes in the current chunk */
	size_t total;
};

static int bdat_emit(struct bdat_sink *b, bool last)
{
	if (evbuffer_get_length(b->ev.stage) > 0 &&
	    evbuffer_add_buffer(b->ev.out, b->ev.stage) < 0)
		return -1;
	if (evbuffer_add_printf(b->out, "BDAT %zu%s\r\n", b->in_cur, last ? " LAST" : "") < 0)
		return -1;
	if (evbuffer_add_buffer(b->out, b->ev.out) < 0)
		return -1;
	b->in_cur = 0;
	return 0;
}

static int bdat_add(struct sink *s, const char *p, size_t n, bool run)
{
	struct bdat_sink *b = (struct bdat_sink *)s;
	while (n > 0) {
		if (b->in_cur == b->chunk && bdat_emit(b, false) < 0)
			return -1;
		size_t k = b->chunk - b->in_cur;
		if (k > n)
			k = n;
		if ((run ? ev_run(&b->ev.base, p, k) : ev_put(&b->ev.base, p, k)) < 0)
			return -1;
		b->in_cur += k;
		b->total += k;
		p += k;
		n -= k;
	}
	return 0;
}

static int bdat_run(struct sink *s, const char *p, size_t n)
{
	return bdat_add(s, p, n, true);
}

static int bdat_put(struct sink *s, const char *p, size_t n)
{
	return bdat_add(s, p, n, false);
}

int rq_bdat_append(struct evbuffer *out, const char *body, size_t len, size_t chunk,
		   size_t *content_len)
{
	int rc = -1;
	struct bdat_sink b = {{bdat_run, bdat_put}, {{ev_run, ev_put}, NULL, NULL},
			      out, chunk, 0, 0};
	if (!out || chunk == 0)
		goto cleanup;
	if (!body)
		len = 0;
	b.ev.out = evbuffer_new();
	b.ev.stage = evbuffer_new();
	if (!b.ev.out || !b.ev.stage)
		goto cleanup;
	if (scan(&b.base, body, len, false) < 0 || bdat_emit(&b, true) < 0)
		goto cleanup;
	if (content_len)
		*content_len = b.total;
	rc = 0;
cleanup:
	if (b.ev.out)
		evbuffer_free(b.ev.out);
	if (b.ev.stage)
		evbuffer_free(b.ev.stage);
	return rc;
}

size_t rq_bdat_chunks(size_t content_len, size_t chunk)
{
	if (chunk == 0 || content_len == 0)
		return 1;
	return (content_len - 1) / chunk + 1;
}

size_t rq_bdat_chunk_len(size_t content_len, size_t chunk, size_t i)
{
	size_t n = rq_bdat_chunks(content_len, chunk);
	if (i + 1 < n)
		return chunk;
	if (i + 1 > n)
		return 0;
	return content_len - (n - 1) * chunk;
}

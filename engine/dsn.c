/* Delivery status notifications: RFC 3464 bounce messages (see dsn.h). */
#include "relayq/dsn.h"

#include "relayq/err.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "relayq/message.h"
#include "relayq/str.h"
#include "relayq/submit.h"

/*
 * RFC 3464 delivery status notifications inside an RFC 6522
 * multipart/report. Everything that comes from the network (reply text,
 * remote host names) or from the queue (addresses, the original header) is
 * untrusted: field values are reduced to printable ASCII on one logical line
 * (folded at spaces), the text part keeps UTF-8 but no control bytes, and
 * the boundary is chosen so it occurs nowhere in the parts.
 */

/* A growing string; oom sticks, so callers check once at the end. */
struct sbuf {
	char *p;
	size_t len;
	size_t cap;
	bool oom;
};

static void sb_grow(struct sbuf *b, size_t more)
{
	if (b->oom)
		return;
	if (b->len + more + 1 <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 1024;
	while (cap < b->len + more + 1)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p) {
		b->oom = true;
		return;
	}
	b->p = p;
	b->cap = cap;
}

static void sb_add(struct sbuf *b, const char *s, size_t n)
{
	sb_grow(b, n);
	if (b->oom)
		return;
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void sb_str(struct sbuf *b, const char *s)
{
	sb_add(b, s, strlen(s));
}

static void sb_fmt(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_fmt(struct sbuf *b, const char *fmt, ...)
{
	char tmp[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	sb_add(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* RFC 5322 date-time in UTC (rq_submit_date_utc), the epoch if t cannot
 * be converted. */
static void fmt_date(int64_t t, char out[64])
{
	if (rq_submit_date_utc(out, 64, t) < 0)
		snprintf(out, 64, "Thu, 01 Jan 1970 00:00:00 +0000");
}

/* A host name we put in From:, Message-ID: and Reporting-MTA:. */
static bool host_ok(const char *s)
{
	size_t n = s ? strlen(s) : 0;
	if (n == 0 || n > RQ_ADDR_DOMAIN_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_' ||
		      c == '[' || c == ']' || c == ':'))
			return false;
	}
	return true;
}

/* Addresses and host names: a line break in them is damage, shown as '?'. */
static void ctl_to_qmark(char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			*s = '?';
}

/*
 * Adds "Name: value" with value reduced to printable ASCII (anything else,
 * line breaks included, becomes a space or '?'), runs of spaces squeezed,
 * folded at spaces to keep lines near 78 octets, ending in CRLF.
 */
static void put_field(struct sbuf *b, const char *name, const char *value, size_t vlen)
{
	char clean[2048];
	size_t n = 0;
	for (size_t i = 0; i < vlen && n < sizeof(clean) - 1; i++) {
		unsigned char c = (unsigned char)value[i];
		char o;
		if (c == '\n' || c == '\r' || c == '\t' || c == ' ')
			o = ' ';
		else if (c < 0x20 || c >= 0x7f)
			o = '?';
		else
			o = (char)c;
		if (o == ' ' && (n == 0 || clean[n - 1] == ' '))
			continue;
		clean[n++] = o;
	}
	while (n > 0 && clean[n - 1] == ' ')
		n--;
	clean[n] = '\0';

	sb_str(b, name);
	sb_str(b, ":");
	size_t col = strlen(name) + 1;
	bool fresh = true; /* no word on this line yet */
	size_t i = 0;
	while (i < n) {
		size_t j = rq_str_end(clean, i, n, ' ');
		size_t w = j - i;
		if (!fresh && col + 1 + w > 78) {
			sb_str(b, "\r\n");
			col = 0;
		}
		sb_str(b, " ");
		sb_add(b, clean + i, w);
		col += 1 + w;
		fresh = false;
		i = j < n ? j + 1 : j;
	}
	sb_str(b, "\r\n");
}

/*
 * Adds text for the human-readable part: UTF-8 is kept, control bytes become
 * '?', each '\n' starts a new line with the given indent (indent NULL: '\n'
 * becomes '?' too).
 */
static void put_text(struct sbuf *b, const char *s, size_t n, const char *indent)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '\n' && indent) {
			sb_str(b, "\r\n");
			sb_str(b, indent);
		} else if (c == '\t') {
			sb_add(b, " ", 1);
		} else if (c < 0x20 || c == 0x7f) {
			sb_add(b, "?", 1);
		} else {
			sb_add(b, (const char *)&c, 1);
		}
	}
}

const char *rq_dsn_status(const struct rq_outcome *o, char out[16])
{
	snprintf(out, 16, "4.0.0");
	if (!o)
		return out;
	if (o->code >= 200 && o->code <= 599) {
		char e[16];
		if (rq_reply_enhanced(o->enhanced, strlen(o->enhanced), e) > 0 &&
		    e[0] - '0' == o->code / 100) {
			memcpy(out, e, 16);
			return out;
		}
		int cls = o->code / 100;
		snprintf(out, 16, "%d.0.0", cls == 3 ? 5 : cls);
		return out;
	}
	const char *st = "4.0.0";
	switch (o->fail) {
	case RQ_FAIL_TIMEOUT:
	case RQ_FAIL_REFUSED:
		st = "4.4.1";
		break;
	case RQ_FAIL_LOST:
		st = "4.4.2";
		break;
	case RQ_FAIL_DNS:
		st = "4.4.3";
		break;
	case RQ_FAIL_TLS:
		st = "4.7.5";
		break;
	case RQ_FAIL_PROTOCOL:
		st = "4.5.0";
		break;
	case RQ_FAIL_LOCAL:
		st = "4.3.0";
		break;
	default:
		break;
	}
	snprintf(out, 16, "%s", st);
	return out;
}

static const char *stage_command(enum rq_stage st)
{
	switch (st) {
	case RQ_STAGE_GREETING: return "the greeting";
	case RQ_STAGE_EHLO: return "EHLO";
	case RQ_STAGE_HELO: return "HELO";
	case RQ_STAGE_STARTTLS: return "STARTTLS";
	case RQ_STAGE_TLS: return "the TLS handshake";
	case RQ_STAGE_AUTH: return "AUTH";
	case RQ_STAGE_MAIL: return "MAIL FROM";
	case RQ_STAGE_RCPT: return "RCPT TO";
	case RQ_STAGE_DATA: return "DATA";
	case RQ_STAGE_DOT: return "end of data";
	case RQ_STAGE_RSET: return "RSET";
	case RQ_STAGE_QUIT: return "QUIT";
	case RQ_STAGE_CONNECT: return "connect";
	case RQ_STAGE_DNS: return "the DNS lookup";
	default: return NULL;
	}
}

/* The original header: up to the first empty line, CRLF endings, bounded.
 * Line endings are CRLF and bare LF, as in the DATA writer (message.h); a
 * bare CR inside a line is shown as a space, as the writer sends it. */
static void put_orig_headers(struct sbuf *b, const char *body, size_t len)
{
	size_t i = 0, out = 0;
	while (i < len) {
		size_t e = i;
		while (e < len && body[e] != '\n' &&
		       !(body[e] == '\r' && e + 1 < len && body[e + 1] == '\n'))
			e++;
		if (e == i)
			break; /* the empty line: end of the header */
		size_t next = e;
		if (next < len && body[next] == '\r')
			next++;
		if (next < len && body[next] == '\n' && (next == e || body[next - 1] == '\r'))
			next++;
		if (out + (e - i) + 2 > RQ_DSN_HEADERS_MAX)
			break;
		/* NUL and lone control bytes would confuse readers: '?' */
		for (size_t k = i; k < e; k++) {
			unsigned char c = (unsigned char)body[k];
			if (c == '\r')
				sb_add(b, " ", 1);
			else if ((c < 0x20 && c != '\t') || c == 0x7f)
				sb_add(b, "?", 1);
			else
				sb_add(b, body + k, 1);
		}
		sb_str(b, "\r\n");
		out += (e - i) + 2;
		i = next;
	}
}

static bool has_8bit(const char *s, size_t n)
{
	return rq_body_is_8bit(s, n);
}

char *rq_dsn_build(const struct rq_dsn_input *in, size_t *len, char *err, size_t errlen)
{
	char *result = NULL;
	struct sbuf text = {0}, status = {0}, headers = {0}, msg = {0};
	char ebuf[128];

	if (len)
		*len = 0;
	if (!in || !in->from || !in->reporting_mta) {
		rq_err_set(err, errlen, "missing sender or reporting MTA name");
		goto cleanup;
	}
	if (in->from[0] == '\0') {
		rq_err_set(err, errlen, "no DSN for the null sender: a bounce is never bounced");
		goto cleanup;
	}
	if (!rq_addr_valid(in->from, strlen(in->from), false, ebuf, sizeof(ebuf))) {
		char m[200];
		snprintf(m, sizeof(m), "invalid sender address: %s", ebuf);
		rq_err_set(err, errlen, "%s", m);
		goto cleanup;
	}
	if (!host_ok(in->reporting_mta)) {
		rq_err_set(err, errlen, "invalid reporting MTA name");
		goto cleanup;
	}
	if (!in->rcpts || in->nrcpts == 0) {
		rq_err_set(err, errlen, "no failed recipients");
		goto cleanup;
	}
	const char *mta = in->reporting_mta;
	char date[64];

	/* 1. the human-readable part */
	sb_fmt(&text, "This is the mail system at %s.\r\n\r\n", mta);
	sb_str(&text, in->nrcpts == 1 ?
	       "Your message could not be delivered to the recipient below.\r\n" :
	       "Your message could not be delivered to the recipients below.\r\n");
	sb_str(&text, "The delivery report and the header of your message are attached.\r\n");
	for (size_t r = 0; r < in->nrcpts; r++) {
		const struct rq_dsn_rcpt *rc = &in->rcpts[r];
		const struct rq_outcome *o = &rc->outcome;
		const struct rq_hint *h = rq_outcome_hint(o);
		const char *addr = rc->addr ? rc->addr : "";
		const char *cmd = stage_command(o->stage);
		sb_str(&text, "\r\n<");
		put_text(&text, addr, strnlen(addr, 512), NULL);
		sb_str(&text, ">\r\n");
		if (o->code) {
			sb_fmt(&text, "    Reply:     %d", o->code);
			if (o->enhanced[0]) {
				sb_str(&text, " ");
				put_text(&text, o->enhanced, strnlen(o->enhanced,
					 sizeof(o->enhanced)), NULL);
			}
			if (o->text[0]) {
				sb_str(&text, " ");
				put_text(&text, o->text, strnlen(o->text, sizeof(o->text)),
					 "               ");
			}
			sb_str(&text, "\r\n");
		} else {
			sb_fmt(&text, "    Problem:   %s", rq_fail_name(o->fail));
			if (o->text[0]) {
				sb_str(&text, ": ");
				put_text(&text, o->text, strnlen(o->text, sizeof(o->text)),
					 "               ");
			}
			sb_str(&text, "\r\n");
		}
		if (rc->remote_mta && rc->remote_mta[0]) {
			sb_str(&text, "    Server:    ");
			put_text(&text, rc->remote_mta, strnlen(rc->remote_mta, 256), NULL);
			if (cmd)
				sb_fmt(&text, " (in reply to %s)", cmd);
			sb_str(&text, "\r\n");
		} else if (cmd) {
			sb_fmt(&text, "    Stage:     %s\r\n", cmd);
		}
		sb_fmt(&text, "    Meaning:   %s\r\n", h->meaning);
		sb_fmt(&text, "    Usual fix: %s\r\n", h->fix);
	}

	/* 2. the message/delivery-status part (RFC 3464 section 2) */
	sb_fmt(&status, "Reporting-MTA: dns; %s\r\n", mta); /* checked by host_ok */
	if (in->msg_id && in->msg_id[0])
		put_field(&status, "X-Relayq-Message-Id", in->msg_id, strnlen(in->msg_id, 200));
	if (in->arrival > 0) {
		fmt_date(in->arrival, date);
		sb_fmt(&status, "Arrival-Date: %s\r\n", date);
	}
	fmt_date(in->now, date);
	for (size_t r = 0; r < in->nrcpts; r++) {
		const struct rq_dsn_rcpt *rc = &in->rcpts[r];
		const struct rq_outcome *o = &rc->outcome;
		const char *addr = rc->addr ? rc->addr : "";
		char st[16];
		char v[1024];
		sb_str(&status, "\r\n");
		snprintf(v, sizeof(v), "rfc822; %.300s", addr);
		ctl_to_qmark(v);
		put_field(&status, "Final-Recipient", v, strlen(v));
		sb_str(&status, "Action: failed\r\n");
		sb_fmt(&status, "Status: %s\r\n", rq_dsn_status(o, st));
		if (rc->remote_mta && rc->remote_mta[0]) {
			snprintf(v, sizeof(v), "dns; %.255s", rc->remote_mta);
			ctl_to_qmark(v);
			put_field(&status, "Remote-MTA", v, strlen(v));
		}
		/* "smtp" for what a server said; a synthetic reply (relayq's own
		 * decision) or a transport event is reported as "X-relayq". */
		if (o->code >= 200 && o->code <= 599) {
			snprintf(v, sizeof(v), "%s; %d%s%.15s%s%s",
				 o->synthetic ? "X-relayq" : "smtp", o->code,
				 o->enhanced[0] ? " " : "", o->enhanced,
				 o->text[0] ? " " : "", o->text);
		} else {
			snprintf(v, sizeof(v), "X-relayq; %s%s%s", rq_fail_name(o->fail),
				 o->text[0] ? ": " : "", o->text);
		}
		put_field(&status, "Diagnostic-Code", v, strlen(v));
		sb_fmt(&status, "Last-Attempt-Date: %s\r\n", date);
	}

	/* 3. the original header */
	if (in->body && in->body_len > 0)
		put_orig_headers(&headers, in->body, in->body_len);
	if (text.oom || status.oom || headers.oom) {
		rq_err_set(err, errlen, "out of memory");
		goto cleanup;
	}

	/* A boundary that occurs in none of the parts ("=_" never appears in
	 * quoted-printable text, and we check anyway). */
	uint64_t hsh = RQ_STR_FNV_BASIS;
	hsh = rq_str_fnv1a(hsh, in->from, strlen(in->from));
	hsh = rq_str_fnv1a(hsh, &in->now, sizeof(in->now));
	hsh = rq_str_fnv1a(hsh, status.p ? status.p : "", status.len);
	char boundary[64];
	for (unsigned k = 0;; k++) {
		snprintf(boundary, sizeof(boundary), "=_relayq_%016llx_%u",
			 (unsigned long long)hsh, k);
		if (!(text.p && memmem(text.p, text.len, boundary, strlen(boundary))) &&
		    !(status.p && memmem(status.p, status.len, boundary, strlen(boundary))) &&
		    !(headers.p && memmem(headers.p, headers.len, boundary, strlen(boundary))))
			break;
	}
	bool text8 = has_8bit(text.p, text.len);
	bool head8 = has_8bit(headers.p, headers.len);

	fmt_date(in->now, date);
	sb_fmt(&msg, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n", mta);
	sb_fmt(&msg, "To: <%s>\r\n", in->from);
	sb_str(&msg, "Subject: Undelivered Mail Returned to Sender\r\n");
	sb_fmt(&msg, "Date: %s\r\n", date);
	sb_fmt(&msg, "Message-ID: <%lld.%016llx@%s>\r\n", (long long)in->now,
	       (unsigned long long)hsh, mta);
	sb_str(&msg, "Auto-Submitted: auto-replied\r\n");
	sb_str(&msg, "MIME-Version: 1.0\r\n");
	sb_fmt(&msg, "Content-Type: multipart/report; report-type=delivery-status;\r\n"
		     "\tboundary=\"%s\"\r\n", boundary);
	if (text8 || head8)
		sb_str(&msg, "Content-Transfer-Encoding: 8bit\r\n");
	sb_str(&msg, "\r\nThis is a MIME-encapsulated delivery status notification.\r\n");

	sb_fmt(&msg, "\r\n--%s\r\n", boundary);
	sb_str(&msg, "Content-Description: Notification\r\n");
	sb_str(&msg, "Content-Type: text/plain; charset=utf-8\r\n");
	sb_fmt(&msg, "Content-Transfer-Encoding: %s\r\n\r\n", text8 ? "8bit" : "7bit");
	sb_add(&msg, text.p, text.len);

	sb_fmt(&msg, "\r\n--%s\r\n", boundary);
	sb_str(&msg, "Content-Description: Delivery report\r\n");
	sb_str(&msg, "Content-Type: message/delivery-status\r\n\r\n");
	sb_add(&msg, status.p, status.len);

	sb_fmt(&msg, "\r\n--%s\r\n", boundary);
	sb_str(&msg, "Content-Description: Undelivered Message Headers\r\n");
	sb_str(&msg, "Content-Type: text/rfc822-headers\r\n");
	if (head8)
		sb_str(&msg, "Content-Transfer-Encoding: 8bit\r\n");
	sb_str(&msg, "\r\n");
	if (headers.len)
		sb_add(&msg, headers.p, headers.len);
	sb_fmt(&msg, "\r\n--%s--\r\n", boundary);
	if (msg.oom) {
		rq_err_set(err, errlen, "out of memory");
		goto cleanup;
	}
	result = msg.p;
	msg.p = NULL;
	if (len)
		*len = msg.len;
	rq_err_set(err, errlen, "ok");
cleanup:
	free(text.p);
	free(status.p);
	free(headers.p);
	free(msg.p);
	return result;
}

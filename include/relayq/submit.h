#ifndef RELAYQ_SUBMIT_H
#define RELAYQ_SUBMIT_H

/*
 * A message handed to relayq by an application (the SMTP listener, relayq
 * sendmail): line endings, header fixes, recipients from headers. Pure: no
 * I/O, time passed in (rq_submit_date reads the local zone's rules).
 *
 * Lines: a line ends at LF; a CR right before that LF is part of the line
 * end. The header section is every line before the first empty line; a
 * message without an empty line is all header when every line of it looks
 * like a header field ("Name:" with a name of printable ASCII but ':', or a
 * continuation starting with SP/HTAB after a field), else all body with an
 * empty header section.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RQ_SUBMIT_MAX ((size_t)512 * 1024 * 1024) /* message in and out (Redis' proto-max-bulk-len) */
#define RQ_SUBMIT_RCPTS_MAX 10000   /* addresses rq_submit_header_rcpts returns */
#define RQ_SUBMIT_DATE_LEN 32       /* "Thu, 03 Dec 2026 18:23:52 +0000" and NUL */
#define RQ_SUBMIT_RECEIVED_LEN 1024 /* room for any rq_submit_received field */
#define RQ_SUBMIT_HELO_MAX 128      /* helo and reverse in Received are cut here */
#define RQ_SUBMIT_NAME_MAX 128      /* a display name (rq_submit_mailbox) is cut here */

struct rq_submit_fix {
	const char *received;   /* a whole "Received: ..." field, no CRLF; prepended; NULL: none */
	bool add_message_id;    /* when the header has none: Message-ID: <...@hostname> */
	bool add_date;          /* when the header has none: Date: (RFC 5322, UTC offset of the local zone) */
	bool add_from;          /* when the header has none: From: <from> (sendmail) */
	bool remove_bcc;        /* drop every Bcc: field (sendmail -t) */
	const char *hostname;   /* for Message-ID; NULL: "localhost" */
	const char *from;       /* for add_from */
	int64_t now_ms;         /* for Date and Message-ID */
};

/*
 * Returns 0 with *out a new heap buffer (free()) of *outlen bytes, the
 * message with CRLF line ends everywhere (a bare LF becomes CRLF; a CR not
 * followed by LF is kept, as Postfix does) and the fixes applied; a message
 * with no header/body separator is taken as all header when it ends in a
 * header-looking line (every line of it is one), else as body with an
 * empty header. -1 with err (out of memory, over max).
 *
 * Exactly:
 * - the output always has the empty line between header and body (added
 *   when the input has none), and a last line without a line end gets CRLF;
 * - f->received, when set, is the first line;
 * - the missing fields are appended at the end of the header section, in
 *   this order: Message-ID ("<BASE36(now_ms).BASE36(hash)@hostname>", the
 *   hash of the message, from and now_ms: the same message at the same
 *   millisecond gets the same id), Date (rq_submit_date), From;
 * - f->from is an address, written "From: <from>", or a whole mailbox
 *   holding '<' (e.g. rq_submit_mailbox's), written as it is;
 * - remove_bcc drops each Bcc field with its continuation lines;
 * - field names compare case-insensitively; every other byte (NUL, 8-bit,
 *   lines of any length) is kept as it is.
 * Also -1 when received, from or hostname hold CR, LF or another control
 * byte, from (an address) fails rq_addr_valid, or hostname is not 1-255
 * bytes of letters, digits, '-', '.', '_'.
 */
int rq_submit_fix(const char *msg, size_t len, const struct rq_submit_fix *f,
		  char **out, size_t *outlen, char *err, size_t errlen);

/*
 * The addr-specs in To, Cc and Bcc (RFC 5322 3.4: display names, angle
 * addresses, groups incl. "undisclosed-recipients:;", comments, quoted
 * local parts, folded lines), in order, duplicates removed
 * case-insensitively. *rcpts: heap array of heap strings
 * (rq_submit_rcpts_free). -1 with err on a malformed list.
 *
 * Every field named To, Cc or Bcc counts (Resent-* fields do not); an empty
 * field gives nothing. An address without a domain, "<>", an unclosed
 * quote, comment, bracket or angle, a control byte, or an address that
 * fails rq_addr_valid is malformed. Source routes ("<@a,@b:x@y>") are
 * dropped. Returns 0 with *n 0 and *rcpts NULL when there is none; -1 when
 * there are more than RQ_SUBMIT_RCPTS_MAX or memory is short.
 */
int rq_submit_header_rcpts(const char *msg, size_t len, char ***rcpts, size_t *n,
			   char *err, size_t errlen);

/*
 * Appends the addr-specs of one address list (a field's value, or a
 * command-line argument like "a@x.y, B <b@x.y>"; same rules as
 * rq_submit_header_rcpts) to *rcpts / *n, which are NULL / 0 or from an
 * earlier call or rq_submit_header_rcpts; an address already there
 * (case-insensitively) is skipped. Returns 0; -1 with err on a malformed
 * list, too many recipients or no memory: *n then unchanged (*rcpts may
 * have moved; it is still the caller's to free with *n).
 */
int rq_submit_address_list(const char *list, size_t len, char ***rcpts, size_t *n,
			   char *err, size_t errlen);

/* Frees what rq_submit_header_rcpts returned; NULL is a no-op. */
void rq_submit_rcpts_free(char **rcpts, size_t n);

/*
 * "Received: from HELO (REVERSE [IP]) by HOSTNAME (relayq) with PROTO; DATE"
 * (RFC 5321 4.4; PROTO e.g. ESMTP, ESMTPS, ESMTPA, ESMTPSA, RFC 3848),
 * with "for <rcpt>" when exactly one recipient. helo and reverse are
 * cleaned (no CR/LF/controls, bounded). Writes into buf (NUL-ended);
 * returns the length or -1 when it does not fit.
 *
 * Exactly: "Received: from HELO (REVERSE [IP]) by HOSTNAME (relayq) with
 * PROTO[ for <RCPT>]; DATE" on one line. helo and reverse: bytes outside
 * printable ASCII and ( ) [ ] < > ; \ " and space become '_', cut at
 * RQ_SUBMIT_HELO_MAX; NULL or empty: "unknown". ip: NULL or empty leaves
 * out " [IP]"; an IPv6 address is written [IPv6:...]; bytes other than hex
 * digits, '.' and ':' become '_'. hostname NULL: "localhost" (cleaned like
 * helo); proto NULL: "ESMTP" (letters and digits kept). one_rcpt: NULL, or
 * an address that fails rq_addr_valid, leaves out the for clause.
 * RQ_SUBMIT_RECEIVED_LEN is always enough.
 */
int rq_submit_received(char *buf, size_t len, const char *helo, const char *reverse,
		       const char *ip, const char *hostname, const char *proto,
		       const char *one_rcpt, int64_t now_ms);

/* RFC 5322 date-time of now_ms in the local zone ("Thu, 03 Dec 2026 18:23:52 +0000").
 * English names whatever the locale; the zone's offset in whole minutes.
 * Writes into buf (NUL-ended, RQ_SUBMIT_DATE_LEN is enough); returns the
 * length or -1 when it does not fit or the time cannot be converted. */
int rq_submit_date(char *buf, size_t len, int64_t now_ms);

/* The same in UTC ("+0000") of t_s, seconds since the epoch (the bounce's
 * Date and Arrival-Date); no range check beyond gmtime's. */
int rq_submit_date_utc(char *buf, size_t len, int64_t t_s);

/*
 * A mailbox for rq_submit_fix's from: "\"NAME\" <ADDR>", or "<ADDR>" when
 * name is NULL or empty. The name is a quoted-string (\ and " escaped),
 * or an RFC 2047 encoded-word (=?UTF-8?B?...?=) when it has bytes >= 0x80;
 * control bytes are dropped, and it is cut at RQ_SUBMIT_NAME_MAX bytes.
 * addr must pass rq_addr_valid. Writes into buf (NUL-ended); returns the
 * length, or -1 with err when addr is invalid or buf too small.
 */
int rq_submit_mailbox(char *buf, size_t len, const char *name, const char *addr,
		      char *err, size_t errlen);

#endif

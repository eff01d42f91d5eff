#ifndef RELAYQ_MESSAGE_H
#define RELAYQ_MESSAGE_H

/*
 * Message helpers: envelope address validation and the DATA writer
 * (CRLF normalisation, header-safe bare CR and long-line handling,
 * dot-stuffing, final CRLF.CRLF).
 */

#include <stdbool.h>
#include <stddef.h>

struct evbuffer;

#define RQ_ADDR_LOCAL_MAX 64    /* RFC 5321 4.5.3.1.1 */
#define RQ_ADDR_DOMAIN_MAX 255  /* RFC 5321 4.5.3.1.2 */
#define RQ_ADDR_PATH_MAX 256    /* RFC 5321 4.5.3.1.3, with the brackets */
#define RQ_LINE_MAX 998         /* RFC 5321 4.5.3.1.6, without CRLF */
#define RQ_DATA_REF_MIN 2048    /* rq_data_append: unchanged runs at least this
				   long go in by reference, shorter ones are
				   copied (a reference chain costs ~1 KB) */

/*
 * Checks an envelope address as it will be put between < and >.
 * allow_null: "" (the null sender) is accepted. Rejects CR, LF, NUL and
 * other control bytes, spaces outside a quoted local part, a missing "@",
 * an empty local part or domain, over-long local part / domain / path /
 * domain label (63), characters outside RFC 5321's dot-string (atext and
 * single dots; bytes >= 0x80 allowed for SMTPUTF8) in an unquoted local
 * part, and domain characters other than letters, digits, '-', '_' and
 * bytes >= 0x80 (an address literal "[...]" is accepted).
 * Returns true, or false with a one-line reason in err.
 */
bool rq_addr_valid(const char *addr, size_t len, bool allow_null,
		   char *err, size_t errlen);

/* True when the address needs SMTPUTF8 (any byte >= 0x80). */
bool rq_addr_needs_utf8(const char *addr, size_t len);

/* The domain part of an address (after the last '@'), or NULL. */
const char *rq_addr_domain(const char *addr);

/* True when the body has any byte >= 0x80 (needs BODY=8BITMIME). */
bool rq_body_is_8bit(const char *body, size_t len);

/*
 * Appends body, a whole message (header section, empty line, body), as DATA
 * content to out. The exact rules:
 * - Header section: from the start up to and including the first empty
 *   line, i.e. a line ending at the very start or right after another line
 *   ending, each of them CRLF or a bare LF ("\r\n\r\n", "\n\n",
 *   "\r\n\n", "\n\r\n"). Everything after it is the body; a message
 *   without an empty line is all header section.
 * - Line endings: CRLF and a bare LF end a line everywhere and go out as
 *   CRLF (so an app must keep LF out of header values it takes from users,
 *   as it must keep out CRLF). A bare CR (a CR not followed by LF) ends a
 *   line in the body (it goes out as CRLF); in the header section it ends
 *   nothing and is replaced by a space ("Subject: hi\rBcc: x" goes out as
 *   "Subject: hi Bcc: x"), so it can never start a header field.
 * - Long lines: a line longer than RQ_LINE_MAX octets is broken by inserting
 *   CRLF SP (as Postfix's smtp client does, smtp_line_length_limit = 998),
 *   in the header section and in the body alike. The SP is the first octet
 *   of the new wire line and counts in its length, so a line is broken after
 *   998 octets, then after every 997 more, and no wire line holds more than
 *   998 octets (1000 with CRLF; a dot added by dot-stuffing is not counted,
 *   RFC 5321 4.5.3.1.6). In the header section the rest of the line is a
 *   folded continuation of the same field, never a new field; in the body a
 *   reader sees a line break and a space. A line of exactly 998 octets is
 *   untouched.
 * - Dot-stuffing: a line starting with "." gets another "." (a continuation
 *   starts with SP and never needs it).
 * - The content ends with CRLF (added when the message does not end with a
 *   line ending) and ".\r\n"; an empty message gives ".\r\n" alone.
 * Unchanged runs of the message are added to out by reference
 * (evbuffer_add_reference), not copied: body must stay alive and unchanged
 * until out has been drained. Runs shorter than RQ_DATA_REF_MIN are
 * copied together with the inserted bytes, so a message with bare-LF line
 * endings (or lines broken for length) is mostly copied; a CRLF message is
 * added by reference except for its dot-stuffed lines and the final ".\r\n".
 * Returns 0, or -1 on allocation failure (out may then hold part of the
 * content: the session has to be dropped).
 */
int rq_data_append(struct evbuffer *out, const char *body, size_t len);

/*
 * The same transformation into a plain buffer (for tests and for sizes),
 * byte for byte the same as rq_data_append:
 * returns the number of bytes the DATA content takes, and writes at most
 * cap bytes to dst when dst is not NULL.
 */
size_t rq_data_encode(const char *body, size_t len, char *dst, size_t cap);

#endif

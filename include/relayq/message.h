#ifndef RELAYQ_MESSAGE_H
#define RELAYQ_MESSAGE_H

/*
 * Message helpers: envelope address validation, the ASCII (A-label) form
 * of internationalized domains (IDNA2008, libidn2), and the writers of the
 * message content: DATA (CRLF normalisation, header-safe bare CR and
 * long-line handling, dot-stuffing, final CRLF.CRLF) and BDAT chunks
 * (RFC 3030: the same content, no dot-stuffing, no terminator).
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

/*
 * IDNA: the A-label form of a domain (RFC 5890-5891, IDNA2008) for a
 * server that does not offer SMTPUTF8 and for DNS. libidn2's
 * idn2_to_ascii_8z with IDN2_NFC_INPUT | IDN2_NONTRANSITIONAL:
 * - NFC: an application may hand in decomposed text ("u" + U+0308); IDNA2008
 *   labels are defined on NFC, so the same domain gives the same A-label.
 * - Non-transitional UTS #46 processing: the mapping step lower-cases what a
 *   user typed ("Bücher.example" is "bücher.example": mail domains are
 *   case-insensitive, and pure IDNA2008 would refuse the capital), but ß, ς
 *   and the joiners stay themselves as IDNA2008 says: "faß.de" is
 *   "xn--fa-hia.de", a domain of its own. Transitional processing would
 *   turn it into "fass.de", someone else's domain: mail sent there would
 *   be misdelivered.
 * - Not IDN2_USE_STD3_ASCII_RULES: libidn2 then deletes "_" silently
 *   ("ex_ample" becomes "example"), a mangled domain; the result is checked
 *   with the rules of rq_addr_valid instead.
 * An ASCII domain is copied unchanged (no conversion, no check of its
 * "xn--" labels). domain: len bytes, no NUL needed. Writes the NUL-ended
 * result to out (cap bytes). Returns 0, or -1 with a one-line reason in err
 * (libidn2's refusal: invalid UTF-8, a disallowed code point, a label
 * starting with a hyphen, ...; or a result longer than
 * RQ_ADDR_DOMAIN_MAX, or than cap). Pure; never aborts on any input.
 */
int rq_domain_to_ascii(const char *domain, size_t len, char *out, size_t cap,
		       char *err, size_t errlen);

enum rq_addr_ascii {
	RQ_ADDR_ASCII_SAME = 0,    /* all ASCII: send it as it is */
	RQ_ADDR_ASCII_ALABEL,      /* ASCII local part, the domain converted
				      to A-labels: out holds local@a-label */
	RQ_ADDR_ASCII_LOCAL_UTF8,  /* a non-ASCII local part: only SMTPUTF8
				      can carry it (RFC 6531), nothing to
				      convert */
	RQ_ADDR_ASCII_INVALID,     /* the domain is not a valid
				      internationalized name, or the address
				      in A-labels is longer than
				      RQ_ADDR_PATH_MAX: err says why */
};

/*
 * The form of an envelope address (one rq_addr_valid accepts) for a server
 * without SMTPUTF8: see enum rq_addr_ascii. out gets the converted address
 * (NUL-ended) for RQ_ADDR_ASCII_ALABEL only. An address literal is never
 * converted.
 */
enum rq_addr_ascii rq_addr_to_ascii(const char *addr, size_t len,
				    char out[RQ_ADDR_PATH_MAX + 1],
				    char *err, size_t errlen);

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

/*
 * BDAT (RFC 3030 CHUNKING). The content is the DATA content of
 * rq_data_append without its transparency: the same line endings, bare
 * CR and long-line rules, but no dot-stuffing and no final ".\r\n" (a
 * message that does not end with a line ending still gets CRLF), so the
 * stored message is the same whichever way it went.
 *
 * rq_bdat_encode: that content into a plain buffer (as rq_data_encode:
 * returns its length, writes at most cap bytes when dst is not NULL).
 *
 * rq_bdat_append: appends the whole BDAT stream to out: for each chunk
 * "BDAT <n>\r\n" and its n content bytes, the last one "BDAT <n>
 * LAST\r\n". Every chunk but the last holds exactly chunk bytes (chunk >=
 * 1); the last holds the rest, 1 to chunk bytes, or 0 for an empty
 * content ("BDAT 0 LAST"). So with L content bytes there are
 * max(1, ceil(L / chunk)) chunks (rq_bdat_chunks) and chunk i has
 * rq_bdat_chunk_len bytes: a caller can move the stream out of the buffer
 * one chunk at a time. Unchanged runs go in by reference as with
 * rq_data_append, split at chunk boundaries: no reference crosses one, so
 * moving one chunk (evbuffer_remove_buffer) moves the referenced runs and
 * copies at most the small copied pieces around a boundary. body must stay alive and unchanged until out is drained or
 * freed. *content_len (may be NULL) gets L. Returns 0, or -1 on
 * allocation failure or chunk 0 (out may hold part of the stream).
 */
size_t rq_bdat_encode(const char *body, size_t len, char *dst, size_t cap);
int rq_bdat_append(struct evbuffer *out, const char *body, size_t len, size_t chunk,
		   size_t *content_len);
/* Chunks of a content of content_len bytes cut in chunk bytes (>= 1). */
size_t rq_bdat_chunks(size_t content_len, size_t chunk);
/* Content bytes of chunk i (0-based) of rq_bdat_chunks(content_len, chunk). */
size_t rq_bdat_chunk_len(size_t content_len, size_t chunk, size_t i);

#endif

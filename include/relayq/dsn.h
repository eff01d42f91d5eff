#ifndef RELAYQ_DSN_H
#define RELAYQ_DSN_H

/*
 * Delivery status notifications (RFC 3464, RFC 6522 multipart/report): the
 * bounce relayq sends to the envelope sender when recipients failed for
 * good. A pure function of its inputs (time passed in, no randomness).
 */

#include <stddef.h>
#include <stdint.h>

#include "relayq/reply.h"

#define RQ_DSN_HEADERS_MAX 65536  /* octets of the original header returned */

/* One failed recipient. */
struct rq_dsn_rcpt {
	const char *addr;           /* the recipient as enqueued */
	const char *remote_mta;     /* host that gave the reply, or NULL */
	struct rq_outcome outcome;  /* its final result */
};

struct rq_dsn_input {
	const char *reporting_mta;  /* our host name (the HELO name) */
	const char *from;           /* the original envelope sender */
	const char *body;           /* the original message, headers first */
	size_t body_len;
	const struct rq_dsn_rcpt *rcpts;
	size_t nrcpts;
	int64_t arrival;            /* when the message was enqueued (unix s), 0: unknown */
	int64_t now;                /* the time of the report (unix s) */
	const char *msg_id;         /* relayq's id of the message, or NULL */
};

/*
 * Builds the bounce: From MAILER-DAEMON@reporting_mta, To the original
 * sender, a multipart/report; report-type=delivery-status with a
 * human-readable part (each recipient, its reply and the knowledge-base
 * hint), the message/delivery-status part and the original header
 * (text/rfc822-headers, at most RQ_DSN_HEADERS_MAX octets, cut at a line).
 * Lines end in CRLF; text from the network is stripped of control bytes and
 * cannot add header fields or MIME parts. The result may hold 8-bit bytes
 * (UTF-8 reply text, raw original header): check rq_body_is_8bit before
 * sending. Send it with MAIL FROM:<> to <from>.
 * Returns a malloc'd NUL-ended message (caller frees; *len its length), or
 * NULL with a reason in err: the null sender (a bounce is never bounced), an
 * invalid sender or reporting name, no recipients, or no memory.
 */
char *rq_dsn_build(const struct rq_dsn_input *in, size_t *len, char *err, size_t errlen);

/*
 * The Status: code reported for an outcome: its enhanced code when it has
 * one of the reply's class, else "<class>.0.0" for replies, and for
 * transport events 4.4.1 (timeout, refused), 4.4.2 (lost), 4.4.3 (dns),
 * 4.7.5 (tls), 4.5.0 (protocol). out must hold 16 bytes; returns out.
 */
const char *rq_dsn_status(const struct rq_outcome *o, char out[16]);

#endif

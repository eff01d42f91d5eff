#ifndef RELAYQ_REPLY_H
#define RELAYQ_REPLY_H

/*
 * SMTP replies: the incremental parser (RFC 5321 4.2, enhanced status codes
 * of RFC 3463), the outcome record every later decision starts from, and the
 * knowledge base of common replies.
 */

#include <stdbool.h>
#include <stddef.h>

/* Where in the session something happened. */
enum rq_stage {
	RQ_STAGE_NONE = 0,
	RQ_STAGE_CONNECT,
	RQ_STAGE_GREETING,
	RQ_STAGE_EHLO,
	RQ_STAGE_HELO,
	RQ_STAGE_STARTTLS,
	RQ_STAGE_TLS,      /* the handshake itself */
	RQ_STAGE_AUTH,
	RQ_STAGE_MAIL,
	RQ_STAGE_RCPT,
	RQ_STAGE_DATA,     /* the DATA command (354 expected) */
	RQ_STAGE_DOT,      /* the reply to the final "." */
	RQ_STAGE_RSET,
	RQ_STAGE_QUIT,
	RQ_STAGE_DNS,      /* MX / address lookup */
	RQ_STAGE_COUNT_
};

/* What kind of result: a reply from the server, or a transport event. */
enum rq_fail {
	RQ_FAIL_NONE = 0,  /* a reply was read: see code */
	RQ_FAIL_TIMEOUT,
	RQ_FAIL_REFUSED,   /* connection refused / unreachable */
	RQ_FAIL_LOST,      /* connection closed or reset mid-session */
	RQ_FAIL_TLS,       /* handshake or verification failed, TLS required */
	RQ_FAIL_DNS,       /* temporary DNS failure (permanent ones are 5xx synthetic) */
	RQ_FAIL_PROTOCOL,  /* garbage, out-of-bounds or overlong reply */
	RQ_FAIL_LOCAL,     /* this host ran out of something (file descriptors,
			      buffers, memory) before the peer was reached:
			      never the destination's fault nor the message's */
	RQ_FAIL_COUNT_
};

#define RQ_REPLY_TEXT_MAX 512   /* bytes of reply text kept in an outcome */
#define RQ_REPLY_LINE_MAX 2048  /* a longer reply line is a protocol error */
#define RQ_REPLY_LINES_MAX 100  /* a reply with more lines is a protocol error */

/*
 * One result, for one recipient or one stage. Fixed size, no heap: it is
 * copied freely into settle calls, events and policy calls.
 * For fail != NONE, code is 0 unless synthetic. synthetic is set for
 * results relayq made itself (e.g. 552 5.3.4 when the message is larger
 * than the server's advertised SIZE, 550 5.1.2 for a null MX).
 */
struct rq_outcome {
	enum rq_stage stage;
	enum rq_fail fail;
	int code;                     /* 200..599, or 0 */
	char enhanced[16];            /* "5.1.1" or "" */
	char text[RQ_REPLY_TEXT_MAX]; /* reply lines joined by '\n' (code and
					 enhanced code stripped), or an error
					 description; truncated, NUL-ended */
	bool synthetic;
};

/* Stage / fail names: "rcpt", "timeout", ... (static strings). */
const char *rq_stage_name(enum rq_stage stage);
const char *rq_fail_name(enum rq_fail fail);
/* Parses a stage name; -1 when unknown. */
int rq_stage_parse(const char *name);

/* True for an errno that says this host is out of a resource (EMFILE,
 * ENFILE, ENOBUFS, ENOMEM): a local fault, whoever the peer was. */
bool rq_errno_local(int err);

/* The transport failure for a failed socket() / connect() with errno err:
 * RQ_FAIL_LOCAL when rq_errno_local(err), else RQ_FAIL_REFUSED. */
enum rq_fail rq_fail_connect_errno(int err);

/*
 * Fills an outcome (text is formatted, truncated as needed, never inside a
 * UTF-8 sequence; control bytes other than '\n' and '\t' become '?').
 * enhanced and fmt may be NULL.
 */
void rq_outcome_set(struct rq_outcome *o, enum rq_stage stage, enum rq_fail fail,
		    int code, const char *enhanced, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));

/* Incremental reply parser: feed one line at a time (without CRLF). */
enum rq_reply_status {
	RQ_REPLY_MORE = 0,  /* a continuation line ("250-..."): feed the next */
	RQ_REPLY_DONE,      /* the last line ("250 ..."): reply complete */
	RQ_REPLY_ERROR,     /* protocol error: see parser->err */
};

struct rq_reply_parser {
	int code;                     /* of the first line */
	int lines;
	char enhanced[16];            /* from the first line that carries one */
	char text[RQ_REPLY_TEXT_MAX];
	size_t text_len;
	char err[128];                /* "" unless the reply was a protocol error */
	bool done;                    /* DONE was returned: feeding more is an error */
	bool text_cut;                /* text was truncated at RQ_REPLY_TEXT_MAX - 1
					 bytes (never inside a UTF-8 sequence) */
};

void rq_reply_parser_init(struct rq_reply_parser *p);
/*
 * Feeds one line. Errors: line too short or not "DDD[ -]" / "DDD", code
 * outside 200..599, a code that differs from the first line's, more than
 * RQ_REPLY_LINES_MAX lines, a line longer than RQ_REPLY_LINE_MAX. After
 * DONE or ERROR, init again before the next reply.
 */
enum rq_reply_status rq_reply_parser_line(struct rq_reply_parser *p,
					  const char *line, size_t len);
/*
 * Copies the completed reply into an outcome at the given stage; after an
 * error (or for an incomplete reply) the outcome is RQ_FAIL_PROTOCOL with
 * the error as text. Reply text keeps no control bytes but '\n' and '\t'.
 */
void rq_reply_parser_outcome(const struct rq_reply_parser *p, enum rq_stage stage,
			     struct rq_outcome *out);

/*
 * Finds an RFC 3463 enhanced status code ("class.subject.detail", class 2, 4
 * or 5, subject 0-999, detail 0-999) at the start of text (after spaces).
 * It must be followed by a space or the end of text. Writes it to out
 * (size >= 16) and returns its length in text including the spaces around
 * it, or 0 when there is none (out is then "").
 */
size_t rq_reply_enhanced(const char *text, size_t len, char out[16]);

/*
 * True when the outcome is a "too many recipients" reply to RCPT (RFC 5321
 * 4.5.3.1.10; RFC 3463 X.5.3): any 4xx or 5xx with enhanced code 4.5.3 /
 * 5.5.3 (OpenSMTPD says 451 4.5.3), or 452 / 552 (552 is the RFC 821 code
 * for it) with no enhanced code and "too many" in the text. Any other
 * enhanced code (4.2.2 over quota, ...) says otherwise. The one classifier: the SMTP session uses it to send the
 * rest of a transaction again, the policy to send a refused first
 * recipient in a new transaction.
 */
bool rq_reply_too_many_rcpts(const struct rq_outcome *o);

/* The knowledge base: a short meaning and the usual fix for a reply. */
struct rq_hint {
	const char *meaning;
	const char *fix;
};
/*
 * The most specific hint for (code, enhanced): an exact enhanced code, then
 * the enhanced subject.detail with any class ("x.1.1"), then the reply code,
 * then the class (4xx / 5xx). Never NULL for 200..599; static storage.
 */
const struct rq_hint *rq_reply_hint(int code, const char *enhanced);

/*
 * The hint for a whole outcome: rq_reply_hint for replies (fail NONE or a
 * synthetic code), else the hint for the transport event (timeout, refused,
 * lost, tls, dns, protocol). Never NULL; static storage.
 */
const struct rq_hint *rq_outcome_hint(const struct rq_outcome *o);

#endif

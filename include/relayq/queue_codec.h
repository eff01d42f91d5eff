#ifndef RELAYQ_QUEUE_CODEC_H
#define RELAYQ_QUEUE_CODEC_H

/*
 * The encoding side of the relayq Redis Functions (lua/redis/README.md):
 * what goes into an FCALL and what comes out of one, without a connection.
 * Pure: no I/O, no clock; testable with replies made by a redisReader.
 *
 * - the settle outcomes JSON (rq_queue_outcomes_*) and the parsing of the
 *   settle reply;
 * - the parsing of the claim reply into struct rq_queue_claim (every part
 *   of the reply is checked: a reply of the wrong shape is refused with a
 *   reason, never trusted);
 * - the enqueue envelope (relayq_enqueue's first argument);
 * - the Functions library version check (relayq_version's reply), shared
 *   by the daemon's async client and the CLI.
 *
 * The async client that sends all this is queue.h.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

struct rq_json;
struct rq_json_buf;

#define RQ_QUEUE_ID_MAX 32         /* bytes of a message id (contract) */

/* ---- claim ---- */

/* One claimed message. id, lease, attempts and created stay valid until
 * rq_queue_claim_free(); from, rcpts, body and meta point into the Redis
 * reply and become invalid at rq_queue_msg_release() of this message or at
 * rq_queue_claim_free(). Strings are NUL-ended (body may also hold NULs:
 * use body_len). */
struct rq_queue_msg {
	char id[RQ_QUEUE_ID_MAX + 1];
	int64_t lease;
	int64_t attempts;
	int64_t created;
	const char *from;           /* "" = null sender */
	size_t from_len;
	size_t nrcpts;              /* recipients still pending */
	const char **rcpts;
	const size_t *rcpt_lens;
	const char *body;
	size_t body_len;
	const char *meta;           /* JSON text, "{}" when none */
	size_t meta_len;
	bool released;
};

struct rq_queue_claim {
	int64_t now;                /* Redis time of the claim (ms) */
	int64_t next_due;           /* earliest scheduled time (ms), -1: none */
	size_t count;
	struct rq_queue_msg *msgs;
	void *priv_;                /* the reply; do not touch */
};

/*
 * Builds a claim from relayq_claim's reply [now, next_due, [[id, from,
 * rcpts, body, attempts, created, meta, lease], ...]]. On success the claim
 * owns r (freed with freeReplyObject by rq_queue_claim_free) and its
 * strings point into r. Returns NULL with a static reason in *why when r
 * does not have that shape (r stays the caller's).
 */
struct rq_queue_claim *rq_queue_claim_parse(redisReply *r, const char **why);

/* Frees the memory of one message (from, rcpts, body, meta) early, e.g. when
 * its DATA has been written; the claim keeps id and lease. Idempotent. */
void rq_queue_msg_release(struct rq_queue_claim *c, size_t i);

/* Frees the claim and everything it points to. NULL is a no-op. */
void rq_queue_claim_free(struct rq_queue_claim *c);

/* ---- settle ---- */

enum rq_queue_rcpt_state {
	RQ_QUEUE_RCPT_DELIVERED = 0,
	RQ_QUEUE_RCPT_DEFERRED,
	RQ_QUEUE_RCPT_FAILED,
	RQ_QUEUE_RCPT_DROPPED,
	RQ_QUEUE_RCPT_EXPIRED,
};

/* One recipient's outcome; NULL strings and code 0 are left out. */
struct rq_queue_rcpt_outcome {
	const char *to;
	enum rq_queue_rcpt_state s;
	int code;
	const char *enh;
	const char *text;
	const char *stage;
	const char *hint;
};

/*
 * Builder of the settle outcomes JSON array (strings are JSON-escaped:
 * quotes, backslashes, control bytes; bytes >= 0x80 are kept as they are).
 * Embed it, rq_queue_outcomes_init(), add messages and their recipients,
 * pass it to rq_queue_settle() (which copies it), then reset or finish.
 */
struct rq_queue_outcomes {
	char *buf;
	size_t len, cap;
	size_t nmsgs;
	size_t nrcpts;              /* of the open message */
	bool open;                  /* a message is open */
	bool oom;
};

void rq_queue_outcomes_init(struct rq_queue_outcomes *o);
/* Empties the builder (keeps its memory). */
void rq_queue_outcomes_reset(struct rq_queue_outcomes *o);
/* Frees the builder's memory. */
void rq_queue_outcomes_finish(struct rq_queue_outcomes *o);
/* Starts a message: next_ms < 0 leaves "next" out (allowed only when no
 * recipient stays pending or deferred). Returns 0 or -1 (no memory). */
int rq_queue_outcomes_msg(struct rq_queue_outcomes *o, const char *id,
			  int64_t lease, bool attempt, int64_t next_ms,
			  bool hold);
/* Adds a recipient outcome to the open message; 0, or -1 (none open or no
 * memory). */
int rq_queue_outcomes_rcpt(struct rq_queue_outcomes *o,
			   const struct rq_queue_rcpt_outcome *r);
/* The JSON text (NUL-ended), or NULL when empty or after a memory failure;
 * valid until the builder changes. Closes the open message (more messages
 * may still be added). */
const char *rq_queue_outcomes_json(struct rq_queue_outcomes *o, size_t *len);

enum rq_queue_settled {
	RQ_QUEUE_SETTLE_DONE = 0,
	RQ_QUEUE_SETTLE_SCHEDULED,
	RQ_QUEUE_SETTLE_HELD,
	RQ_QUEUE_SETTLE_LOST,       /* lease not held: nothing written */
	RQ_QUEUE_SETTLE_INVALID,    /* the entry was refused by relayq_settle
				       (malformed outcome): nothing written
				       for that message */
};

/* Parses relayq_settle's reply: exactly n statuses ("done", "scheduled",
 * "held", "lost", "invalid") into res. 0, or -1 for any other reply. */
int rq_queue_settle_parse(const redisReply *r, size_t n, enum rq_queue_settled *res);

/* ---- enqueue ---- */

/* One message for relayq_enqueue. Strings are copied into the envelope,
 * JSON-escaped; they may hold any bytes when their length is given. */
struct rq_queue_enqueue_req {
	const char *from;           /* "" = the null sender */
	size_t from_len;            /* 0: strlen(from) */
	const char *const *to;      /* nto recipients (at least one) */
	const size_t *to_lens;      /* NULL: strlen of each */
	size_t nto;
	const char *body;           /* the message (header and body) */
	size_t body_len;
	const char *key;            /* idempotency key; NULL: none */
	double delay_s;             /* first attempt after this long; < 0: now */
	const struct rq_json *meta; /* a JSON object carried into events; NULL */
};

/* Writes the envelope {"from":..,"to":[..],"delay":..,"key":..,"meta":..}
 * of req into b. Returns 0, or -1 when req is incomplete (no from, no
 * recipient, meta not an object) or memory is short (b then not ok). */
int rq_queue_enqueue_envelope(const struct rq_queue_enqueue_req *req,
			      struct rq_json_buf *b);

/* ---- the Functions library ---- */

/* What a client does after FCALL relayq_version 0. */
enum rq_queue_version_check {
	RQ_QUEUE_VERSION_OK = 0,    /* the library is there, at least want */
	RQ_QUEUE_VERSION_LOAD,      /* missing or older: FUNCTION LOAD REPLACE */
	RQ_QUEUE_VERSION_ERROR,     /* an error or a reply of another shape */
};

/* Classifies relayq_version's reply r (NULL: no reply = ERROR) against the
 * embedded version want (rq_fnlib_version()). "Function not found" means
 * LOAD; any other error reply, and a reply that is not an integer, ERROR. */
enum rq_queue_version_check rq_queue_version_check(const redisReply *r, long long want);

/* ---- replies ---- */

/* An integer reply, or a string / status reply holding only a decimal
 * integer (at most 20 bytes). */
bool rq_queue_reply_int(const redisReply *r, int64_t *out);

/* A message id reply: a string of 1 to RQ_QUEUE_ID_MAX printable bytes
 * (no space), copied into id (idlen > RQ_QUEUE_ID_MAX). */
bool rq_queue_reply_id(const redisReply *r, char *id, size_t idlen);

#endif

#ifndef RELAYQ_QUEUE_H
#define RELAYQ_QUEUE_H

/*
 * The daemon's asynchronous client of the relayq Redis Functions
 * (lua/redis/README.md): hiredis async on a libevent base.
 *
 * Two connections per queue: one for commands (claim, settle, renew,
 * recover, raw calls; pipelined, replies in order) and one SUBSCRIBEd to
 * relayq:{q}:wake. On every (re)connect the command connection sends AUTH
 * (when a password is configured), SELECT (db != 0) and FCALL relayq_version;
 * when the library is missing or older than the embedded one
 * (rq_fnlib_version()), it is loaded with FUNCTION LOAD REPLACE. Commands
 * are sent only once that setup is done.
 *
 * Delivery guarantees:
 * - Commands made while Redis is down are kept, in order, and sent after the
 *   reconnect; commands in flight when a connection drops are sent again.
 *   None is dropped: every command's callback runs exactly once, with the
 *   reply, a Redis error, a protocol error, or RQ_QUEUE_ECANCEL at destroy.
 * - Retrying is safe for every function used here, with these effects:
 *   a claim whose reply was lost leaves its messages leased until lease-ms
 *   passes (then a later claim takes them again); a settle that was applied
 *   but whose reply was lost reports "lost" (RQ_QUEUE_SETTLE_LOST) for those
 *   messages when retried (the outcome was written the first time); renew
 *   and recover are idempotent.
 * - hiredis 0.14 has no command timeouts: a watchdog drops the connection
 *   when the oldest command in flight (or the connect / setup) is older than
 *   cmd_timeout_ms, and the commands are retried on the next connection.
 * - Redis errors LOADING, BUSY, NOAUTH, READONLY, MASTERDOWN, TRYAGAIN,
 *   CLUSTERDOWN and "Function not found" are treated as transient: the
 *   connection is dropped and the command retried ("Function not found" at
 *   most 3 times, then reported). BUSY (another client's script or function
 *   running past busy-reply-threshold; our command did not run) is retried
 *   after the reconnect backoff, as long as it lasts.
 * - Both connections use TCP keepalive. The subscriber connection, which
 *   otherwise only reads, sends a liveness probe every
 *   RQ_QUEUE_SUB_PING_MS once subscribed (a SUBSCRIBE of its channel again:
 *   hiredis 0.14 hands the answer of a PING sent in subscribed mode to no
 *   callback); when no answer comes within cmd_timeout_ms the connection is
 *   dropped and resubscribed (followed by a RQ_QUEUE_WAKE_CONNECT), so a
 *   half-open connection does not lose wake-ups for long.
 * - Secrets: our copies of the password (the one kept for reconnects, the
 *   parsed URL, the password file's line, the formatted AUTH command) are
 *   wiped (explicit_bzero) when freed. hiredis 0.14 copies the AUTH command
 *   into its output buffer and releases that buffer without wiping it; we
 *   cannot reach it, so a copy may remain in freed heap memory. Copies the
 *   caller keeps (opts->url, the environment) are the caller's.
 *
 * The process must ignore SIGPIPE (hiredis writes to a socket Redis may
 * have closed).
 *
 * Callbacks run from the event loop, never from inside the call that
 * submitted the command (only rq_queue_destroy() calls back from inside, with
 * RQ_QUEUE_ECANCEL). Any callback may submit new commands and may call
 * rq_queue_destroy() (the destroy then completes when the callback returns).
 *
 * Memory: commands made while Redis is down are kept (with their arguments)
 * without a bound; callers limit what they have outstanding (see
 * rq_queue_get_stats: queued, inflight).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include "relayq/keys.h"
#include "relayq/queue_codec.h"
#include "relayq/redis_url.h"

struct event_base;
struct rq_queue;

#define RQ_QUEUE_TIMEOUT_DEFAULT_MS 10000
#define RQ_QUEUE_BACKOFF_MIN_DEFAULT_MS 100
#define RQ_QUEUE_BACKOFF_MAX_DEFAULT_MS 5000
#define RQ_QUEUE_NAME_MAX RQ_KEYS_QUEUE_MAX  /* bytes of a queue name (keys.h) */
#define RQ_QUEUE_SUB_PING_MS 30000 /* subscriber liveness PING interval */

/* Status given to every command callback. */
enum rq_queue_status {
	RQ_QUEUE_OK = 0,
	RQ_QUEUE_EREDIS,   /* Redis answered an error (err: its text) */
	RQ_QUEUE_EPROTO,   /* the reply does not have the contract's shape */
	RQ_QUEUE_ECANCEL,  /* rq_queue_destroy() came first */
};

/* Why the wake callback runs. */
enum rq_queue_wake {
	RQ_QUEUE_WAKE_CONNECT,  /* (re)subscribed: something may have been
				   enqueued while we were not listening */
	RQ_QUEUE_WAKE_PUBLISH,  /* relayq:{q}:wake got a message (enqueue) */
	RQ_QUEUE_WAKE_TIMER,    /* the earliest scheduled time has come */
};

/* State of the command connection, for the state callback and stats. */
enum rq_queue_conn_state {
	RQ_QUEUE_DOWN = 0,      /* waiting to reconnect (backoff) */
	RQ_QUEUE_CONNECTING,    /* TCP / unix connect in progress */
	RQ_QUEUE_SETUP,         /* AUTH / SELECT / library check in flight */
	RQ_QUEUE_READY,         /* commands flow */
};

struct rq_queue_opts {
	/* A Redis URL (redis_url.h): "redis://[user:password@]host
	 * [:port][/db]" (host an IP literal, or a name resolved once, blocking,
	 * by rq_queue_create) or "unix:/path[?db=N]". */
	const char *url;
	const char *queue;          /* queue name q: keys relayq:{q}:* */
	/* Password sources besides the URL; at most one of the three may be
	 * given. password_env: name of an environment variable;
	 * password_file: a file whose first line is the password. Read once
	 * by rq_queue_create. */
	const char *password_env;
	const char *password_file;
	const char *user;           /* ACL user, when not in the URL */
	int cmd_timeout_ms;         /* watchdog; 0 = RQ_QUEUE_TIMEOUT_DEFAULT_MS */
	int backoff_min_ms;         /* reconnect delay, doubling; 0 = default */
	int backoff_max_ms;         /* 0 = default */

	/* Called when there may be messages to claim (see enum rq_queue_wake).
	 * May be NULL. */
	void (*on_wake)(struct rq_queue *q, enum rq_queue_wake why, void *arg);
	/* Called when the command connection becomes READY (err NULL) or is
	 * lost / fails to set up (err: why, never containing the password;
	 * valid during the call). From the event loop. May be NULL. */
	void (*on_state)(struct rq_queue *q, enum rq_queue_conn_state st,
			 const char *err, void *arg);
	void *arg;                  /* passed to on_wake and on_state */
	/* Subscriber liveness probe interval; 0 = RQ_QUEUE_SUB_PING_MS, < 0 =
	 * none. An unanswered probe drops the connection after cmd_timeout_ms. */
	int sub_ping_ms;
};

/*
 * Creates the client and starts connecting (nothing is called back from
 * here). Returns NULL with a reason in err (which never holds the password)
 * when the options are invalid: bad URL, unknown host, unreadable password
 * file, missing environment variable, password given twice, bad queue name.
 */
struct rq_queue *rq_queue_create(struct event_base *base,
				 const struct rq_queue_opts *opts,
				 char *err, size_t errlen);

/*
 * Closes both connections and calls every pending command's callback with
 * RQ_QUEUE_ECANCEL, exactly once, before returning (or, when called from
 * inside one of this queue's callbacks, when that callback returns). Claims
 * already handed out stay valid (rq_queue_claim_free them as usual).
 * NULL is a no-op.
 */
void rq_queue_destroy(struct rq_queue *q);

/* The URL with the password replaced by "***" (for logs). Valid as long as
 * the queue. */
const char *rq_queue_url_redacted(const struct rq_queue *q);


/* The queue's key prefix "relayq:{q}". */
const char *rq_queue_prefix(const struct rq_queue *q);

/* The last connection / setup error ("" when none), e.g. "redis AUTH failed:
 * WRONGPASS ...". Never holds the password. Valid until the next event. */
const char *rq_queue_last_error(const struct rq_queue *q);

struct rq_queue_stats {
	enum rq_queue_conn_state state;  /* of the command connection */
	bool subscribed;                 /* wake channel listening */
	uint64_t connects;               /* command connection reached READY */
	uint64_t disconnects;            /* connections lost or dropped */
	uint64_t watchdog_drops;         /* dropped by the watchdog */
	uint64_t library_loads;          /* FUNCTION LOAD REPLACE done */
	uint64_t sent;                   /* commands written (retries count) */
	uint64_t retried;                /* commands sent again */
	uint64_t wakes;                  /* on_wake calls */
	uint64_t sub_pings;              /* subscriber liveness probes sent */
	size_t queued;                   /* commands waiting to be sent */
	size_t inflight;                 /* commands sent, reply not yet in */
};

void rq_queue_get_stats(const struct rq_queue *q, struct rq_queue_stats *st);

/* ---- claim (struct rq_queue_claim, its release and free: queue_codec.h) ---- */

/*
 * The claim callback: on RQ_QUEUE_OK, claim is non-NULL and belongs to the
 * caller, who must call rq_queue_claim_free() once (any time, also after
 * rq_queue_destroy); the bodies are not copied: they point into the Redis
 * reply, kept alive by the claim. Otherwise claim is NULL and err tells why
 * (valid during the call).
 */
typedef void rq_queue_claim_cb(struct rq_queue *q, enum rq_queue_status st,
			       const char *err, struct rq_queue_claim *claim,
			       void *arg);

/*
 * FCALL relayq_claim: leases up to count messages for lease_ms. The wake
 * timer is armed to next_due (see rq_queue_wake_at). Returns 0, or -1 when
 * the queue is being destroyed or memory is short (cb is then not called).
 */
int rq_queue_claim(struct rq_queue *q, int count, int64_t lease_ms,
		   rq_queue_claim_cb *cb, void *arg);

/* ---- settle (the outcomes builder: queue_codec.h) ---- */

/* res: one status per message, in order (n of them), valid during the call;
 * NULL unless RQ_QUEUE_OK. */
typedef void rq_queue_settle_cb(struct rq_queue *q, enum rq_queue_status st,
				const char *err,
				const enum rq_queue_settled *res, size_t n,
				void *arg);

/* FCALL relayq_settle with the builder's JSON (copied; the builder may be
 * reset right away). 0, or -1 (destroying, no memory, empty or broken
 * builder): cb is then not called. */
int rq_queue_settle(struct rq_queue *q, struct rq_queue_outcomes *o,
		    rq_queue_settle_cb *cb, void *arg);

/* The same with JSON made elsewhere (copied): nmsgs is the number of
 * messages in the array, the number of statuses the reply must have. */
int rq_queue_settle_json(struct rq_queue *q, const char *json, size_t len,
			 size_t nmsgs, rq_queue_settle_cb *cb, void *arg);

/* ---- enqueue ---- */

/* id: the new message's id (or the existing one for a repeated idempotency
 * key), valid during the call; NULL unless RQ_QUEUE_OK. */
typedef void rq_queue_enqueue_cb(struct rq_queue *q, enum rq_queue_status st,
				 const char *err, const char *id, void *arg);

/*
 * FCALL relayq_enqueue with req's envelope (rq_queue_enqueue_envelope) and
 * body, both copied. Retrying is safe only with an idempotency key
 * (req->key): without one, an enqueue whose reply was lost to a dropped
 * connection is sent again and may queue the message twice. cb may be
 * NULL. 0, or -1 (incomplete req, destroying, no memory): cb is then not
 * called.
 */
int rq_queue_enqueue(struct rq_queue *q, const struct rq_queue_enqueue_req *req,
		     rq_queue_enqueue_cb *cb, void *arg);

/* ---- renew, recover, raw ---- */

/* n: the function's integer answer (leases renewed / recovered). */
typedef void rq_queue_count_cb(struct rq_queue *q, enum rq_queue_status st,
			       const char *err, long long n, void *arg);

struct rq_queue_lease {
	const char *id;
	int64_t lease;
};

/* FCALL relayq_renew: extends n leases by lease_ms (arguments copied).
 * 0 or -1 as for claim. */
int rq_queue_renew(struct rq_queue *q, int64_t lease_ms,
		   const struct rq_queue_lease *leases, size_t n,
		   rq_queue_count_cb *cb, void *arg);

/* FCALL relayq_recover. 0 or -1 as for claim. */
int rq_queue_recover(struct rq_queue *q, rq_queue_count_cb *cb, void *arg);

/* reply: borrowed, valid during the call (NULL unless RQ_QUEUE_OK or
 * RQ_QUEUE_EREDIS). */
typedef void rq_queue_reply_cb(struct rq_queue *q, enum rq_queue_status st,
			       const char *err, const redisReply *reply,
			       void *arg);

/* Any command (argv copied; argvlen NULL: C strings), through the same
 * queueing and retrying as the others: use it only for commands that are
 * safe to repeat, and never for (P)SUBSCRIBE or MONITOR. cb may be NULL.
 * 0 or -1. */
int rq_queue_command(struct rq_queue *q, int argc, const char **argv,
		     const size_t *argvlen, rq_queue_reply_cb *cb, void *arg);

/* ---- wake timer ---- */

/* Arms the wake timer to call on_wake(RQ_QUEUE_WAKE_TIMER) in delay_ms,
 * unless it is already armed earlier (the earliest wins; it disarms when it
 * fires). Claims arm it from next_due - now. */
void rq_queue_wake_at(struct rq_queue *q, int64_t delay_ms);

/* Milliseconds until the wake timer fires, or -1 when not armed. */
int64_t rq_queue_wake_in(const struct rq_queue *q);

#endif

#ifndef RELAYQ_DEST_H
#define RELAYQ_DEST_H

/*
 * Destinations: where the daemon delivers, with a connection pool each.
 *
 * A destination is the smarthost (relay mode: every message goes there) or
 * one recipient domain (MX mode: its MX set, looked up with dns.h). It owns
 * the SMTP sessions to it (smtp.h), reused across messages, within the
 * limits: connections in all, per destination, transactions per connection.
 * The runner hands it jobs: one transaction's worth of recipients of one
 * message; the destination runs them and reports, per recipient, DELIVERED
 * or FAILED with the outcome (what the policy decides on), or SUSPENDED
 * (the destination is suspended: not tried, retry at job->until), or
 * PENDING (not tried: shutdown).
 *
 * Health: the runner reports, after the policy's decision, whether an
 * outcome counts against the destination (rq_dest_failed) or shows it works
 * (rq_dest_ok). After RQ_DEST_FAIL_THRESHOLD failures in a row, or a
 * failure while no other connection to it is alive, the destination is
 * suspended for the backoff of its consecutive failures: its waiting jobs
 * end SUSPENDED, new jobs are refused at once, and no connection is made
 * until the suspension ends. While a destination has recent failures, at
 * most one new connection to it is opened at a time (a probe).
 *
 * Job callbacks are always called from the event loop (a zero-delay
 * event), never from inside an rq_dest_* call, so the runner may submit
 * jobs and report health from inside them.
 *
 * This header does not include smtp.h / tls.h / config.h: the caller maps
 * its configuration into struct rq_dests_opts.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "relayq/policy.h"
#include "relayq/reply.h"

struct event_base;
struct rq_dests;
struct rq_dest;

#define RQ_DEST_FAIL_THRESHOLD 3     /* failures in a row that suspend */
#define RQ_DEST_NOPROGRESS_MAX 3     /* transactions in a row that try no
					recipient before the job gives up */
#define RQ_DEST_KEY_MAX 256

/* Timeouts in milliseconds (0: the session's default). idle: QUIT an idle
 * connection after this long (0: right after its transaction when no job
 * waits). */
struct rq_dests_timeouts {
	int connect, greeting, ehlo, mail, rcpt, data, block, dot, quit, idle;
};

struct rq_dests_opts {
	const char *helo;              /* required (copied) */
	const char *tls;               /* "none", "opportunistic", "required",
					  "implicit" */
	const char *tls_ca_file;       /* NULL: system store */
	bool tls_verify;
	const char *auth_user;         /* NULL: no AUTH (copied) */
	const char *auth_password;     /* copied, wiped on destroy */
	bool auth_plaintext_ok;
	bool no_chunking;              /* DATA even where CHUNKING is offered
					  (default false: BDAT there) */
	struct rq_dests_timeouts timeouts;
	int connections;               /* all destinations; >= 1 */
	int per_destination;           /* default per destination; >= 1 */
	int messages_per_connection;   /* default transactions per connection */
	/* Relay: NULL = MX delivery to each recipient domain on mx_port. */
	const char *relay_host;        /* name or IP literal (no brackets) */
	int relay_port;
	bool relay_mx;                 /* MX lookup of relay_host */
	int mx_port;                   /* 0: 25 */
	const char *dns_servers;       /* c-ares server list, NULL: resolv.conf */
	/* Clock (ms since the epoch); NULL: gettimeofday. */
	int64_t (*now_ms)(void *arg);
	void *now_arg;
	struct rq_policy_rand rnd;     /* backoff jitter; fn NULL: default */
};

enum rq_dest_rcpt_result {
	RQ_DEST_RCPT_PENDING = 0,   /* not tried (shutdown) */
	RQ_DEST_RCPT_DELIVERED,
	RQ_DEST_RCPT_FAILED,        /* outcome says why */
	RQ_DEST_RCPT_SUSPENDED,     /* destination suspended until job->until */
};

struct rq_dest_rcpt {
	const char *addr;              /* borrowed; NUL-ended */
	size_t len;
	size_t index;                  /* caller's: e.g. the message's rcpt no. */
	enum rq_dest_rcpt_result result;
	struct rq_outcome outcome;     /* FAILED / DELIVERED: the reply */
};

struct rq_dest_job;
typedef void (*rq_dest_job_cb)(struct rq_dest_job *job, void *arg);

struct rq_dest_job {
	/* in (borrowed: keep alive until done) */
	const char *from;
	size_t from_len;
	const char *body;
	size_t body_len;
	struct rq_dest_rcpt *rcpts;
	size_t nrcpt;
	int per_destination;           /* 0: the default */
	unsigned messages_per_connection; /* 0: the default */
	rq_dest_job_cb done;
	void *arg;
	/* out */
	int64_t until;                 /* SUSPENDED: end of the suspension (ms) */
	char host[256];                /* the host that answered, or "" */
	struct rq_dest *dest;          /* the destination it went to */
	/* private */
	struct rq_dest_job *next_;
	unsigned noprogress_;
	bool queued_;
};

/* The pure parts, for tests. */
struct rq_dest_health {
	unsigned failures;             /* in a row */
	unsigned suspensions;          /* in a row (since the last success) */
	int64_t suspended_until;       /* ms; 0: not suspended */
	int64_t suspended_for_ms;      /* the length decided for it: what is
					  logged, never until - a later now */
};

/* A failure: returns the end of the suspension it starts (ms), or 0 when
 * it does not suspend. others_alive: another connection to the
 * destination is up. */
int64_t rq_dest_health_failed(struct rq_dest_health *h, int64_t now,
			      bool others_alive, const struct rq_backoff *b,
			      const struct rq_policy_rand *rnd);
/* A success: clears the failures; returns true when it ended a suspension. */
bool rq_dest_health_ok(struct rq_dest_health *h);
/* True while suspended at now. */
bool rq_dest_health_suspended(const struct rq_dest_health *h, int64_t now);

/*
 * The destination key of a recipient: "relay" in relay mode, else its
 * domain in lower case (an address literal as written). Writes it to key;
 * returns 0, or -1 when the address has no domain.
 */
int rq_dest_key(bool relay, const char *addr, char key[RQ_DEST_KEY_MAX]);

/*
 * The pool of destinations. Returns NULL with a reason in err (bad TLS
 * mode, unreadable CA file, DNS init). opts strings are copied.
 */
struct rq_dests *rq_dests_create(struct event_base *base,
				 const struct rq_dests_opts *opts,
				 char *err, size_t errlen);

/* Frees everything: sessions closed without QUIT, jobs dropped without a
 * callback (the caller owns them). NULL: no-op. */
void rq_dests_destroy(struct rq_dests *ds);

/*
 * Hands a job to the destination key (rq_dest_key). Returns 0: done will be
 * called once, from the event loop; 1: the destination is suspended
 * (job->until set, job->dest set, done not called); -1: no memory or
 * shutting down (done not called).
 */
int rq_dests_submit(struct rq_dests *ds, const char *key, struct rq_dest_job *job);

/* Health reports for the destination a job went to (job->dest; valid until
 * the job's done callback returns). failed returns the end of the
 * suspension (ms) it started, or 0. */
int64_t rq_dest_failed(struct rq_dest *d, const struct rq_backoff *b);
void rq_dest_ok(struct rq_dest *d);
/* Suspends the destination for after seconds (a policy's suspend). */
int64_t rq_dest_suspend(struct rq_dest *d, double after);
/* The destination's key (for logs). */
const char *rq_dest_name(const struct rq_dest *d);

/*
 * Shutdown, step 1: no new jobs; waiting jobs end at once with their
 * untried recipients PENDING; running transactions get grace_ms to finish,
 * then their connections are dropped and they end PENDING too. drained is
 * called (from the event loop) once no transaction runs. Step 2
 * (rq_dests_close): QUIT every connection; closed is called when all are
 * gone or after the quit timeout.
 */
void rq_dests_drain(struct rq_dests *ds, int grace_ms,
		    void (*drained)(void *arg), void *arg);
/* Ends the grace period now (a second signal). */
void rq_dests_hurry(struct rq_dests *ds);
void rq_dests_close(struct rq_dests *ds, void (*closed)(void *arg), void *arg);

struct rq_dests_stats {
	size_t dests;          /* destinations known */
	size_t suspended;
	size_t sessions;       /* connections open or opening */
	size_t busy;           /* with a transaction */
	size_t waiting;        /* jobs waiting for a connection */
	uint64_t connects;     /* sessions created */
	uint64_t txns;         /* transactions sent */
};
void rq_dests_stats(const struct rq_dests *ds, struct rq_dests_stats *st);

#endif

#ifndef RELAYQ_LISTEN_H
#define RELAYQ_LISTEN_H

/*
 * The SMTP listener: applications hand mail to relayqd over SMTP (RFC 5321
 * server side, with RFC 1870 SIZE, 2920 PIPELINING, 3207 STARTTLS, 2034
 * ENHANCEDSTATUSCODES, 4954 AUTH PLAIN / LOGIN, 6152 8BITMIME, 6531
 * SMTPUTF8) and it puts each accepted message into a queue in Redis with
 * relayq_enqueue. One listener = one address and one queue.
 *
 * One process, two sides: the listener runs in relayqd's own event loop,
 * but intake and delivery share nothing but Redis. A listener has its own
 * queue client (queue.h) and calls no delivery module (runner, dest, smtp
 * client); a message it accepted is in Redis before the client hears 250,
 * and the runners find it there like any other enqueued message.
 *
 * The guarantee: "250 2.0.0 Ok: queued as <id>" is sent only from the
 * enqueue callback, once Redis answered with the message id. Anything else
 * at the final dot (Redis down, an error, no answer within
 * enqueue_timeout_ms) is "451 4.3.0" and the client keeps the message.
 * Every message carries an idempotency key of its own, so the queue
 * client's retries after a dropped connection never store it twice. The
 * window left: an FCALL already written to a Redis that stalls (SIGSTOP,
 * a long fork) past the timeout may still run after the 451; the client
 * then sends the message again and it is stored twice (never lost).
 *
 * The session is an explicit state machine (enum rq_listen_state): one
 * function enters a state and sends the reply that goes with it (greeting,
 * 354, 334, 220 before TLS, 221 / 421); commands are read and answered in
 * order, replies leave when the input buffer is drained (PIPELINING), and
 * while a message waits for Redis the commands pipelined after it wait
 * too. Transitions are logged at debug level by name.
 *
 * Who may send: a client whose address is in one of the trusted CIDRs, or
 * one that authenticated (AUTH, only after TLS unless
 * auth_allow_plaintext); anyone else gets "530 5.7.0 Authentication
 * required" at MAIL. The listener never relays for strangers.
 *
 * Input is bounded everywhere: command lines 512 octets with CRLF (AUTH
 * lines RQ_LISTEN_AUTH_LINE_MAX), DATA lines 1000 with CRLF, the message
 * max_size, recipients, commands and errors per session, connections in
 * total and per client address, an inactivity timeout per command, per
 * DATA block and a deadline per message; the output buffer (a client that
 * pipelines without reading) stops the reading.
 *
 * DATA: lines end with CRLF or a bare LF (normalised to CRLF in the stored
 * message, as Postfix does); a bare CR is kept as it is. The end of the data
 * is only "." on a line of its own with CRLF after a CRLF: a "." line ended
 * by a bare LF (or after one) is content (SMTP smuggling,
 * CVE-2023-51764 class). A leading "." is removed from every other line
 * (RFC 5321 4.5.2). A message with a NUL byte is refused (554 5.6.0).
 *
 * Secrets: AUTH lines are never logged, decoded credentials are wiped
 * after use; only the user name of a successful AUTH is logged.
 *
 * Password checks (crypt(3), yescrypt: tens of milliseconds of CPU) never
 * run on the event loop: a small pool of worker threads (auth_threads)
 * runs them and hands each result back to the loop through a pipe. The
 * session waits in RQ_LISTEN_ST_AUTH_CHECK (reading nothing; pipelined
 * commands wait); a session that goes away meanwhile is freed only when
 * its check has come back. At most auth_queue_max checks are queued or
 * running per listener; an AUTH past that gets "454 4.7.0 Temporary
 * authentication failure". The worker threads touch nothing but the job
 * (user, password copy, a reference to the credentials it was made with)
 * and the pool's queue; everything else stays on the loop thread.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct event_base;
struct rq_listen;

#define RQ_LISTEN_CMD_LINE_MAX 512     /* a command line with CRLF (RFC 5321 4.5.3.1.4) */
#define RQ_LISTEN_AUTH_LINE_MAX 2048   /* an AUTH command or response line with CRLF */
#define RQ_LISTEN_DATA_LINE_MAX 1000   /* a DATA line with CRLF (RFC 5321 4.5.3.1.6) */
#define RQ_LISTEN_MAX_SIZE_DEFAULT ((uint64_t)25 * 1024 * 1024)
#define RQ_LISTEN_TRUSTED_MAX 256      /* CIDRs a listener takes */

/* ---- CIDRs and addresses (pure) ---- */

struct rq_cidr {
	int family;                /* AF_INET or AF_INET6 */
	unsigned char addr[16];    /* network bytes (4 used for AF_INET), host bits zero */
	unsigned bits;             /* prefix length */
};

/* Parses "192.0.2.0/24", "2001:db8::/32", or an address alone (a /32 or
 * /128). Host bits are cleared. Returns 0, or -1 with a reason in err. */
int rq_listen_cidr_parse(const char *s, struct rq_cidr *out, char *err, size_t errlen);

/* True when the address (AF_INET / AF_INET6 sockaddr; an IPv4-mapped IPv6
 * address counts as its IPv4 address) is inside c. */
bool rq_listen_cidr_match(const struct rq_cidr *c, const struct sockaddr *sa);

/* Parses a listen address "IPv4:port" or "[IPv6]:port" (port 0-65535; an
 * IP literal, no names). Returns 0, or -1 with a reason in err. */
int rq_listen_addr_parse(const char *s, struct sockaddr_storage *ss, socklen_t *len,
			 char *err, size_t errlen);

/* ---- commands (pure) ---- */

enum rq_listen_verb {
	RQ_LISTEN_V_UNKNOWN = 0,
	RQ_LISTEN_V_HELO, RQ_LISTEN_V_EHLO, RQ_LISTEN_V_MAIL, RQ_LISTEN_V_RCPT,
	RQ_LISTEN_V_DATA, RQ_LISTEN_V_RSET, RQ_LISTEN_V_NOOP, RQ_LISTEN_V_QUIT,
	RQ_LISTEN_V_VRFY, RQ_LISTEN_V_HELP, RQ_LISTEN_V_STARTTLS, RQ_LISTEN_V_AUTH,
	RQ_LISTEN_V_NOTIMPL,       /* EXPN, TURN, ETRN, BDAT, ...: 502 */
};

/* The verb of a command line (without its line end), case-insensitive;
 * *arg is the offset of its argument (after one space, or len). MAIL and
 * RCPT are recognised by "MAIL FROM:" / "RCPT TO:" (the argument starts
 * after the colon). */
enum rq_listen_verb rq_listen_verb_parse(const char *line, size_t len, size_t *arg);

/* MAIL / RCPT parameters the listener understands. */
struct rq_listen_params {
	bool has_size;
	uint64_t size;             /* SIZE= */
	bool body_8bit;            /* BODY=8BITMIME */
	bool smtputf8;             /* SMTPUTF8 */
};

/*
 * Parses the argument of MAIL FROM: / RCPT TO: (after the colon): optional
 * spaces, "<path>", then parameters. A source route ("<@a,@b:x@y>") is
 * dropped. The address (without < >) is copied to addr (cap bytes,
 * NUL-ended; *addrlen its length) and checked with rq_addr_valid (the null
 * path "<>" only when mail). Parameters: MAIL takes SIZE=n, BODY=7BIT /
 * 8BITMIME, SMTPUTF8 and AUTH=... (ignored); RCPT takes none.
 * Returns 0, or the code of the reply to send: 501 (syntax), 553 (bad
 * address), 555 (unknown or bad parameter), with a reason in why (static).
 */
int rq_listen_path_parse(const char *arg, size_t len, bool mail, char *addr, size_t cap,
			 size_t *addrlen, struct rq_listen_params *p, const char **why);

/* ---- DATA (pure) ---- */

/* The message being received: dot-unstuffed, CRLF line ends. */
struct rq_listen_data {
	char *buf;                 /* heap; NULL until the first line */
	size_t len, cap;
	uint64_t max;              /* bytes the message may have */
	uint64_t size;             /* bytes it has (counted on past max) */
	bool too_big;              /* size > max: nothing kept */
	bool too_long;             /* a line over RQ_LISTEN_DATA_LINE_MAX */
	bool nul;                  /* a NUL byte */
	bool oom;
	bool skipping;             /* inside an over-long line */
	bool prev_crlf;            /* the line before ended with CRLF */
	bool done;                 /* the final "." was seen */
};

void rq_listen_data_init(struct rq_listen_data *d, uint64_t max);
/* Frees the buffer (wiping nothing: messages are not secrets). */
void rq_listen_data_finish(struct rq_listen_data *d);
/*
 * One line as received with its LF (complete true), or a piece of an
 * over-long line without its end (complete false: the line is marked too
 * long and skipped up to its LF). Returns 1 when the line was the final
 * ".", else 0. Once the message is too big, too long, has a NUL or memory
 * ran short, nothing more is kept (buf freed) but lines are still counted
 * until the final dot.
 */
int rq_listen_data_line(struct rq_listen_data *d, const char *line, size_t len,
			bool complete);

/* ---- the listener ---- */

enum rq_listen_state {
	RQ_LISTEN_ST_TLS = 0,      /* TLS handshake (implicit TLS or after STARTTLS) */
	RQ_LISTEN_ST_GREET,        /* greeting sent: HELO / EHLO expected */
	RQ_LISTEN_ST_READY,        /* after HELO / EHLO: MAIL, AUTH, STARTTLS */
	RQ_LISTEN_ST_AUTH_PLAIN,   /* 334 sent: the PLAIN response */
	RQ_LISTEN_ST_AUTH_USER,    /* 334 sent: the LOGIN user name */
	RQ_LISTEN_ST_AUTH_PASS,    /* 334 sent: the LOGIN password */
	RQ_LISTEN_ST_AUTH_WAIT,    /* an AUTH failure's reply waits (brute force) */
	RQ_LISTEN_ST_AUTH_CHECK,   /* the password is being checked by a worker */
	RQ_LISTEN_ST_MAIL,         /* MAIL accepted: RCPT */
	RQ_LISTEN_ST_RCPT,         /* a recipient accepted: RCPT, DATA */
	RQ_LISTEN_ST_DATA,         /* 354 sent: the message */
	RQ_LISTEN_ST_ENQUEUE,      /* final dot: waiting for Redis */
	RQ_LISTEN_ST_STARTTLS,     /* 220 sent, waiting for it to leave */
	RQ_LISTEN_ST_QUIT,         /* 221 / 421 sent: closing once written */
	RQ_LISTEN_ST_CLOSED,
	RQ_LISTEN_ST_COUNT_
};

/* The state's name ("greet", "mail", ...; "?" when out of range). */
const char *rq_listen_state_name(enum rq_listen_state st);

/* Why a message (or a connection) was refused: counters and log lines. */
enum rq_listen_reject {
	RQ_LISTEN_REJ_AUTH_REQUIRED = 0, /* 530 at MAIL */
	RQ_LISTEN_REJ_SIZE,              /* 552 at MAIL SIZE= or after the dot */
	RQ_LISTEN_REJ_RECIPIENTS,        /* 452 past max_recipients */
	RQ_LISTEN_REJ_ADDRESS,           /* 501 / 553 / 555 at MAIL / RCPT */
	RQ_LISTEN_REJ_LINE,              /* 500 at the end of DATA: line too long */
	RQ_LISTEN_REJ_CONTENT,           /* 554: NUL bytes, or refused by the queue */
	RQ_LISTEN_REJ_REDIS,             /* 451: Redis down, error or too slow */
	RQ_LISTEN_REJ_LOST,              /* connection lost or closed during DATA */
	RQ_LISTEN_REJ_CONNECTIONS,       /* 421 at connect: max_connections (after
					  * the handshake on an implicit_tls listener) */
	RQ_LISTEN_REJ_PER_IP,            /* 421 at connect: max_per_ip (after the
					  * handshake on an implicit_tls listener) */
	RQ_LISTEN_REJ_COUNT_
};

/* "auth_required", "size", ... (static). */
const char *rq_listen_reject_name(enum rq_listen_reject r);

struct rq_listen_opts {
	/* "127.0.0.1:2525" / "[::1]:2525" (rq_listen_addr_parse); port 0 = a
	 * free port (rq_listen_port). */
	const char *address;
	const char *const *trusted;  /* CIDR strings that may send without AUTH */
	size_t ntrusted;
	const char *queue;           /* NULL: "default" */
	/* Redis, for the listener's own queue client (queue.h). */
	const char *redis_url;
	const char *redis_user;
	const char *redis_password_file;
	const char *redis_password_env;
	/* TLS: STARTTLS is offered when tls_cert is set; implicit_tls starts
	 * every connection with the handshake (port 465 style). */
	const char *tls_cert;
	const char *tls_key;         /* NULL: in tls_cert */
	bool implicit_tls;
	/* AUTH PLAIN / LOGIN against this credentials file (credentials.h);
	 * NULL: no AUTH. Offered only over TLS unless auth_allow_plaintext. */
	const char *auth_file;
	bool auth_allow_plaintext;
	uint64_t max_size;           /* 0: RQ_LISTEN_MAX_SIZE_DEFAULT */
	int max_recipients;          /* 0: 1000 */
	int max_connections;         /* 0: 1000 */
	int max_per_ip;              /* 0: 50 */
	int max_commands;            /* per session; 0: 10000 */
	int max_bad_commands;        /* per session; 0: 20 */
	const char *hostname;        /* greeting, Received, Message-ID; NULL: gethostname */
	bool add_message_id;         /* Message-ID when the message has none */
	bool add_date;               /* Date when the message has none */
	const char *meta_json;       /* a JSON object merged into every message's meta */
	int timeout_ms;              /* per command; 0: 300000 (5 min) */
	int data_timeout_ms;         /* per DATA block; 0: 180000 (3 min) */
	int message_deadline_ms;     /* MAIL to the final dot; 0: 1800000 (30 min) */
	int enqueue_timeout_ms;      /* final dot to Redis' answer; 0: 30000 */
	int auth_delay_ms;           /* added per AUTH failure past 3; 0: 1000 */
	int close_timeout_ms;        /* a closing session's last reply; 0: 10000 */
	int auth_threads;            /* password-check threads; 0: 2 (max 16) */
	int auth_queue_max;          /* checks queued or running; 0: 64 */
};

/*
 * Binds and listens, creates the queue client, loads the TLS certificate
 * and the credentials file. Returns NULL with a reason in err (bad
 * address or CIDR, bind failure, unreadable certificate, key or
 * credentials file, bad Redis settings). Nothing is called back from here.
 */
struct rq_listen *rq_listen_create(struct event_base *base, const struct rq_listen_opts *opts,
				   char *err, size_t errlen);

/* The port it listens on (useful with port 0). */
int rq_listen_port(const struct rq_listen *l);
/* The address as configured, for logs and the metrics label. */
const char *rq_listen_name(const struct rq_listen *l);

/* Loads the certificate and key files again (SIGHUP: renewed
 * certificates); sessions already in TLS keep the old ones. On failure
 * (err) the old context stays. 0 or -1. */
int rq_listen_reload_tls(struct rq_listen *l, char *err, size_t errlen);
/* Loads the credentials file again; on failure the old one stays. 0 / -1.
 * Checks already running finish against the file they started with. */
int rq_listen_reload_auth(struct rq_listen *l, char *err, size_t errlen);

/* For tests: while held, the worker threads start no new password check
 * (queued ones wait; the bound still applies). Releasing wakes them. */
void rq_listen_auth_hold(struct rq_listen *l, bool hold);

/*
 * Stops accepting; every open session gets "421 4.3.2 Service shutting
 * down" and is closed, except that a session waiting for Redis gets its
 * answer (250 or 451) first. done(arg) runs from the event loop once every
 * session is closed (at once when there is none). Calling it again only
 * replaces done.
 */
void rq_listen_stop(struct rq_listen *l, void (*done)(void *arg), void *arg);

/* Closes everything at once (sessions without a reply) and frees. NULL is a
 * no-op. */
void rq_listen_destroy(struct rq_listen *l);

struct rq_listen_stats {
	uint64_t connections;        /* accepted */
	uint64_t sessions;           /* open now */
	uint64_t messages;           /* accepted (250 sent) */
	uint64_t bytes;              /* of accepted messages, as stored */
	uint64_t rejected[RQ_LISTEN_REJ_COUNT_];
	uint64_t auth_ok;
	uint64_t auth_failed;
	uint64_t auth_pending;       /* password checks queued or running now */
	uint64_t auth_busy;          /* 454: the check queue was full */
	uint64_t tls;                /* handshakes completed */
	uint64_t tls_failed;
	uint64_t timeouts;           /* sessions closed for inactivity or a deadline */
	uint64_t commands;
	uint64_t bad_commands;
	bool redis_ready;
};

void rq_listen_get_stats(const struct rq_listen *l, struct rq_listen_stats *st);

#endif

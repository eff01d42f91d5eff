#ifndef RELAYQ_SMTP_H
#define RELAYQ_SMTP_H

/*
 * The SMTP client session (RFC 5321, 3207 STARTTLS, 4954 AUTH, 2920
 * PIPELINING, 1870 SIZE, 6152 8BITMIME, 6531 SMTPUTF8, 3030 CHUNKING,
 * 5890 IDNA A-labels) over libevent.
 *
 * One session = one connection at a time to one of a list of addresses
 * (MX hosts in preference order, or the relay's addresses). The session
 * moves to the next address when a connection fails before it is ready
 * (refused, timeout, 4xx/5xx greeting or EHLO/HELO, STARTTLS/TLS failure,
 * lost or protocol error; not AUTH failures, which end the session) and
 * reports one outcome when every address failed. Once ready, it runs one
 * transaction (MAIL, RCPT..., DATA) at a time, as many as the caller sends,
 * up to max_txns per connection; between transactions the connection idles
 * until idle_ms, then the session says QUIT.
 *
 * Life of a session:
 *
 *   s = rq_smtp_create(base, &opts, &cbs, err, errlen);
 *   rq_smtp_connect(s, hosts, n);           // copies the list
 *   rq_smtp_send(s, &txn);                  // may be called before ready
 *     ... txn.done(&txn, arg) once: every recipient has its result ...
 *   rq_smtp_send(s, &txn2);                 // e.g. from inside txn.done
 *   rq_smtp_quit(s);                        // or let idle_ms do it
 *     ... cbs.closed(s, &why, arg) once ...
 *   rq_smtp_destroy(s);                     // allowed inside any callback
 *
 * Transactions: with PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in
 * one write (one evbuffer_add: over TLS one record, up to its size) and the
 * replies are matched in order; without it, lock-step. RSET is sent only
 * to end a transaction that ended before its data (MAIL refused, no
 * recipient accepted, DATA refused), right then; after a completed
 * transaction (any reply to ".") the next one starts with MAIL. When a
 * reused connection is lost before the server answered anything of a
 * transaction (it went away while idle), the recipients come back
 * NOT_TRIED. When no recipient was
 * accepted DATA is not sent (lock-step) or its 354 is answered with a lone
 * "." (pipelined). A 421 at any point of a transaction is the outcome of
 * every recipient still open and ends the connection. A reply that arrives
 * while the body is still being sent (a server giving up mid-data) is the
 * message's outcome and ends the connection.
 *
 * CHUNKING (RFC 3030), when the server offers it and opts.chunking is on
 * (the default): the message goes as BDAT chunks of opts.chunk_size bytes
 * (default RQ_SMTP_CHUNK_SIZE, 128 KiB), the last one "BDAT <n> LAST", no
 * dot-stuffing (message.h, rq_bdat_append: the same bytes are stored as
 * with DATA). The BDATs start once every RCPT has its reply and at least
 * one recipient was accepted (so no chunk is sent for nothing: as many
 * round trips as MAIL..DATA pipelined, then the body). With PIPELINING
 * every chunk goes out at once and the replies are matched in order;
 * without it each chunk waits for the reply to the one before. Every BDAT
 * gets a reply: a refused chunk (4xx, 5xx) ends the transaction with that
 * reply for every accepted recipient (stage "data"; the replies to the
 * chunks already sent are read, then RSET), and so does the reply to the
 * last one (stage "dot", as the reply to "."). A refusal that arrives while
 * chunk bytes are still being written ends the connection, as one during
 * DATA does. A 421 is as anywhere else.
 *
 * IDNA: to a server without SMTPUTF8, an address whose local part is
 * ASCII and whose domain is not goes with the domain in A-labels
 * (rq_addr_to_ascii: IDNA2008, "user@xn--bcher-kva.example"); a non-ASCII
 * local part fails as before (553 5.6.7), and a domain libidn2 refuses
 * fails that recipient (553 5.1.3; the sender: 553 5.1.7, the whole
 * transaction) with the reason, before anything is sent. With SMTPUTF8
 * the UTF-8 form goes as it is.
 *
 * Unsolicited replies: bytes already in the input when a command (or the
 * body) is written were sent before the server could have seen it; they
 * are never taken as its reply. The connection is dropped as a protocol
 * error (fail PROTOCOL at the stage of that command).
 *
 * Ending a connection: when the server refuses something that ends the
 * connection (greeting, EHLO/HELO, STARTTLS when required, AUTH, RSET) with
 * anything but 421, or cannot give what we require (STARTTLS, an AUTH
 * mechanism we may use), QUIT is sent and its reply awaited within the quit
 * timeout before closing; the outcome stays the refusal. Every close of a
 * working TLS connection (after QUIT, after a 421) sends a close_notify
 * first. A certificate that fails verification ends the handshake with
 * OpenSSL's alert, written out before the close, and no QUIT (nothing more
 * is said over a channel we do not trust). Broken connections (timeouts,
 * protocol errors, lost) are dropped without either.
 *
 * TLS (tls.h for the modes): STARTTLS is refused when bytes follow its 220
 * reply (response injection; protocol error, connection dropped); after
 * the handshake the capabilities are forgotten and EHLO is sent again.
 * AUTH (PLAIN preferred, then LOGIN) runs after TLS and never over plain
 * text unless auth_plaintext_ok; with credentials configured, a server
 * offering no usable mechanism is a failure (synthetic 454 4.7.0, stage
 * auth), not a silent unauthenticated session.
 *
 * Stages in outcomes: "connect" (TCP), "greeting", "ehlo"/"helo",
 * "starttls" (the command, and TLS required but not offered), "tls" (the
 * handshake and verification), "auth", "rset", "mail", "rcpt", "data" (the
 * DATA command and sending the body; with CHUNKING every BDAT but the
 * last: writing it and its reply), "dot" (waiting for the reply to the
 * final ".", or to BDAT LAST -- a failure here means the server may have
 * the message).
 * Classes: a reply (fail NONE, code set), or timeout / refused (connect
 * failed, also unreachable) / lost / tls / protocol. Synthetic replies made
 * by relayq (synthetic = true): 552 5.3.4 larger than SIZE, 553 5.1.7 and
 * 5.1.3 invalid addresses (also a domain that is no valid IDN), 553 5.6.7
 * SMTPUTF8 missing, 454 4.7.0 AUTH
 * impossible or refused in plain text, 554 5.5.1 no recipients.
 *
 * Reading: reply lines are taken from the input with a bound; a line longer
 * than RQ_REPLY_LINE_MAX is a protocol error as soon as the buffer passes
 * that bound, and so is a reply of more than RQ_REPLY_LINES_MAX lines.
 * Every reply has a total deadline (struct rq_smtp_timeouts), counted from
 * the write of its command and never extended by bytes that trickle in, so
 * a server dripping bytes cannot hold a connection.
 *
 * The process must ignore SIGPIPE (signal(SIGPIPE, SIG_IGN), as relayqd and
 * relayq do): libevent writes with writev(), and a write to a connection
 * the server has just closed would otherwise kill the process.
 *
 * Callbacks are only called from the event loop, never from inside an
 * rq_smtp_* call. Every callback may call any rq_smtp_* function on the
 * session, including rq_smtp_destroy (the free is deferred to a safe point;
 * after destroy no callback is called any more).
 *
 * The state machine: enum rq_smtp_state below; one function sends the
 * command of a state, one switches on the state when a reply arrives;
 * transitions are logged at debug level by name (rq_smtp_state_name).
 * Secrets (AUTH) never reach logs, traces or outcome texts.
 */

#include "relayq/reply.h"
#include "relayq/tls.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct event_base;
struct rq_smtp;

/* ---------------------------------------------------------------------------
 * Capabilities (EHLO keywords), as a pure parser for tests and tools.
 */

enum {
	RQ_SMTP_CAP_PIPELINING = 1u << 0,
	RQ_SMTP_CAP_SIZE = 1u << 1,
	RQ_SMTP_CAP_8BITMIME = 1u << 2,
	RQ_SMTP_CAP_SMTPUTF8 = 1u << 3,
	RQ_SMTP_CAP_STARTTLS = 1u << 4,
	RQ_SMTP_CAP_AUTH = 1u << 5,
	RQ_SMTP_CAP_ENHANCEDSTATUSCODES = 1u << 6,
	RQ_SMTP_CAP_DSN = 1u << 7,
	RQ_SMTP_CAP_CHUNKING = 1u << 8,
};

enum {
	RQ_SMTP_AUTH_PLAIN = 1u << 0,
	RQ_SMTP_AUTH_LOGIN = 1u << 1,
	RQ_SMTP_AUTH_CRAM_MD5 = 1u << 2,
	RQ_SMTP_AUTH_XOAUTH2 = 1u << 3,
	RQ_SMTP_AUTH_OTHER = 1u << 4,  /* any mechanism not listed above */
};

struct rq_smtp_caps {
	unsigned flags;     /* RQ_SMTP_CAP_* */
	uint64_t size_max;  /* SIZE value; 0: no limit announced (absent, "SIZE",
			       "SIZE 0" or an unparsable value) */
	unsigned auth;      /* RQ_SMTP_AUTH_* offered */
	unsigned lines;     /* lines fed so far (the first is the domain) */
};

/* Empties caps (before an EHLO, and again after STARTTLS). */
void rq_smtp_caps_reset(struct rq_smtp_caps *caps);
/*
 * Feeds one line of the EHLO reply, raw ("250-PIPELINING", no CRLF; a line
 * without the "250-"/"250 " prefix is taken as the keyword text itself).
 * The first line fed after a reset is the server's domain and is skipped.
 * Keywords are case-insensitive; unknown keywords are ignored; "AUTH=LOGIN"
 * (the pre-standard form) counts as AUTH. Never fails.
 */
void rq_smtp_caps_line(struct rq_smtp_caps *caps, const char *line, size_t len);
/* Resets caps and feeds every line of a whole reply (lines end with CRLF or
 * LF; the last may have no ending). */
void rq_smtp_caps_parse(struct rq_smtp_caps *caps, const char *reply, size_t len);
/* Writes the capabilities as "PIPELINING SIZE=10240000 AUTH=PLAIN,LOGIN ...". */
void rq_smtp_caps_describe(const struct rq_smtp_caps *caps, char *buf, size_t len);


/* ---------------------------------------------------------------------------
 * Session options.
 */

/* Timeouts in milliseconds; 0 = none. Each is the total deadline of its
 * stage's reply: from the write of the command (or the state's start) to
 * the end of the reply's last line, however the bytes trickle in (RFC 5321
 * 4.5.3.2 values as defaults). With PIPELINING each reply of the group has
 * its own, from the previous reply. */
struct rq_smtp_timeouts {
	int connect;   /* TCP connect (30 s) */
	int greeting;  /* the 220 (RFC 5321: 5 min) */
	int ehlo;      /* EHLO / HELO (5 min) */
	int tls;       /* STARTTLS reply; the handshake (2 min) */
	int auth;      /* each AUTH step (2 min) */
	int mail;      /* MAIL FROM (5 min) */
	int rcpt;      /* each RCPT TO (5 min) */
	int data;      /* DATA initiation, the 354 (2 min) */
	int block;     /* body: each data block written must leave within this
			  (write progress, RFC "data block", 3 min); the whole
			  body is bounded by data_total */
	int dot;       /* the reply to the final "." or to BDAT LAST (10 min);
			  the reply to any other BDAT has data's */
	int rset;      /* RSET (2 min) */
	int quit;      /* QUIT's reply; then the connection is closed anyway (1 min) */
};

struct rq_smtp_opts {
	const char *helo_name;       /* our name for EHLO/HELO (copied); required */
	enum rq_tls_mode tls;
	struct rq_tls_ctx *tls_ctx;  /* borrowed; must outlive the session;
					required unless tls == RQ_TLS_NONE */
	bool tls_verify;             /* REQUIRED / IMPLICIT: verify chain and name
					(default true) */
	const char *servername;      /* SNI and name to verify (copied); NULL:
					each host's name from rq_smtp_connect */
	bool tls_fallback_plain;     /* OPPORTUNISTIC: after a failed handshake,
					connect again to the same host without
					TLS (default false: the host failed) */
	const char *auth_user;       /* AUTH credentials (copied); NULL: no AUTH */
	const char *auth_password;   /* copied, wiped on destroy, never logged */
	unsigned auth_mechs;         /* allowed mechanisms, RQ_SMTP_AUTH_PLAIN |
					RQ_SMTP_AUTH_LOGIN (default both); PLAIN
					is preferred */
	bool auth_plaintext_ok;      /* allow AUTH without TLS (default false) */
	struct rq_smtp_timeouts timeout;
	int data_total;              /* the whole body, however it progresses
					(default 30 min); with BDAT from the
					first chunk's write to the last one's,
					chunk replies between them included */
	bool chunking;               /* BDAT when the server offers CHUNKING
					(default true) */
	size_t chunk_size;           /* content bytes per BDAT chunk (default
					RQ_SMTP_CHUNK_SIZE; 0: the default) */
	unsigned max_txns;           /* transactions per connection (default
					100; 0 = no limit) */
	int idle_ms;                 /* QUIT after this long without a
					transaction (default 5 s; 0 = never) */
	const char *log_id;          /* added to debug logs (copied); may be NULL */
};

/* 128 KiB: a small message (most are) is one "BDAT n LAST"; a big one
 * does not wait a round trip per few kilobytes without PIPELINING, and a
 * server never has to take a huge chunk in one piece. */
#define RQ_SMTP_CHUNK_SIZE (128u * 1024u)

/* Fills opts with the defaults above (RFC 5321 4.5.3.2 timeouts, the
 * body's 30 min in all). */
void rq_smtp_opts_init(struct rq_smtp_opts *opts);

/* ---------------------------------------------------------------------------
 * Transactions.
 */

enum rq_smtp_rcpt_result {
	RQ_SMTP_RCPT_NOT_TRIED = 0, /* not attempted here ("too many recipients",
				       or the connection was found dead before
				       MAIL): send again at once, in a new
				       transaction; counts as no attempt */
	RQ_SMTP_RCPT_DELIVERED,     /* the server took responsibility: outcome
				       is the reply to "." (2xx) */
	RQ_SMTP_RCPT_FAILED,        /* outcome says why: the RCPT reply, or
				       what ended the transaction (MAIL, DATA,
				       ".", a transport event, a synthetic
				       refusal); temporary or permanent is the
				       policy's decision */
};

struct rq_smtp_rcpt {
	const char *addr;            /* in: the address (without <>), borrowed */
	size_t len;                  /* in: its length (may hold a NUL: refused) */
	enum rq_smtp_rcpt_result result;  /* out */
	struct rq_outcome outcome;   /* out (stage NONE when NOT_TRIED) */
};

struct rq_smtp_txn;
typedef void (*rq_smtp_txn_cb)(struct rq_smtp_txn *txn, void *arg);

struct rq_smtp_txn {
	/* in (all borrowed: keep them alive and unchanged until done runs) */
	const char *from;            /* "" = null sender */
	size_t from_len;
	struct rq_smtp_rcpt *rcpts;
	size_t nrcpt;
	const char *body;            /* the message as stored; line endings are
					normalised and dots stuffed on the way,
					the bytes are sent by reference */
	size_t body_len;
	rq_smtp_txn_cb done;         /* called once, from the event loop */
	void *arg;
	/* out */
	struct rq_outcome outcome;   /* the reply to "." when delivered, else
					what ended the transaction */
	size_t delivered;            /* recipients DELIVERED */
	size_t failed;               /* recipients FAILED */
	size_t not_tried;            /* recipients NOT_TRIED */
	bool pipelined;              /* MAIL/RCPT/DATA went in one write (with
					BDAT: MAIL/RCPT, then every chunk) */
	bool chunked;                /* the message went as BDAT chunks */
	size_t chunks;               /* BDAT chunks written */
};

/* ---------------------------------------------------------------------------
 * The session.
 */

enum rq_smtp_state {
	RQ_SMTP_ST_INIT = 0,    /* created, not connected */
	RQ_SMTP_ST_CONNECTING,  /* TCP connect */
	RQ_SMTP_ST_TLS_IMPLICIT,/* handshake of an implicit-TLS connection */
	RQ_SMTP_ST_GREETING,    /* waiting for the 220 */
	RQ_SMTP_ST_EHLO,
	RQ_SMTP_ST_HELO,
	RQ_SMTP_ST_STARTTLS,
	RQ_SMTP_ST_TLS,         /* the STARTTLS handshake */
	RQ_SMTP_ST_AUTH,        /* AUTH PLAIN, or AUTH LOGIN (its 334s) */
	RQ_SMTP_ST_AUTH_USER,   /* AUTH LOGIN: user name sent */
	RQ_SMTP_ST_AUTH_PASS,   /* AUTH LOGIN: password sent */
	RQ_SMTP_ST_READY,       /* idle, ready for a transaction */
	RQ_SMTP_ST_RSET,        /* RSET before reuse / after an aborted txn */
	RQ_SMTP_ST_MAIL,
	RQ_SMTP_ST_RCPT,
	RQ_SMTP_ST_DATA,        /* waiting for the 354 */
	RQ_SMTP_ST_BODY,        /* sending the body */
	RQ_SMTP_ST_BDAT,        /* BDAT chunks: writing them, or waiting for
				   the reply to one that is not the last */
	RQ_SMTP_ST_DOT,         /* waiting for the reply to "." or BDAT LAST */
	RQ_SMTP_ST_ABORT_DOT,   /* an unexpected 354: a lone "." sent */
	RQ_SMTP_ST_QUIT,
	RQ_SMTP_ST_CLOSED,      /* connection over; only destroy remains */
	RQ_SMTP_ST_COUNT_
};

struct rq_smtp_callbacks {
	/* The session is ready for transactions (greeting, EHLO, TLS, AUTH
	 * done). Called once per connection. May be NULL. */
	void (*ready)(struct rq_smtp *s, void *arg);
	/*
	 * The connection is over and no transaction is running (a running one
	 * got its done callback first). why: for a clean end (QUIT, idle,
	 * max_txns) stage QUIT, fail NONE, code 221 or 0; when no address
	 * could be used, the most relevant failure of all attempts (a server
	 * reply over a transport event, else the last); otherwise what broke
	 * the connection. Called once. May be NULL.
	 */
	void (*closed)(struct rq_smtp *s, const struct rq_outcome *why, void *arg);
	/* Wire trace, for debugging and tests: dir '>' (sent) or '<' (received),
	 * one command or reply line without CRLF; AUTH payloads are replaced by
	 * "<secret>", and body bytes are not traced. May be NULL. */
	void (*trace)(struct rq_smtp *s, char dir, const char *line, size_t len, void *arg);
	void *arg;
};

/* One address to try. */
struct rq_smtp_host {
	struct sockaddr_storage addr;  /* IPv4 or IPv6, port set */
	socklen_t addrlen;
	char name[256];                /* host name (SNI, verification, logs);
					  "": the numeric address (no SNI; TLS
					  verification matches the certificate's
					  IP addresses) */
};

/* Fills h from a numeric address ("127.0.0.1", "::1") and port, with name
 * as given (NULL: ""). Returns 0, or -1 when ip is not numeric. */
int rq_smtp_host_set(struct rq_smtp_host *h, const char *ip, int port, const char *name);

/*
 * Creates a session (no I/O yet). opts and its strings are copied; tls_ctx
 * is borrowed. Returns NULL with a reason in err when the options are
 * invalid (no helo_name, a TLS mode without tls_ctx, ...).
 */
struct rq_smtp *rq_smtp_create(struct event_base *base, const struct rq_smtp_opts *opts,
			       const struct rq_smtp_callbacks *cbs,
			       char *err, size_t errlen);

/*
 * Starts connecting to hosts[0], moving on to the next as described at the
 * top. The list is copied. Returns 0, or -1 when called twice, with n = 0
 * or with an address that is neither IPv4 nor IPv6 (family and addrlen).
 * Results come through the callbacks.
 */
int rq_smtp_connect(struct rq_smtp *s, const struct rq_smtp_host *hosts, size_t n);

/*
 * Runs a transaction. Allowed once rq_smtp_connect was called, while no
 * other transaction runs and the session is not closing; before the session
 * is ready the transaction waits for it (and fails with the connection's
 * outcome if it never gets ready). Returns 0 (txn->done will be called
 * exactly once) or -1 (busy, closed, max_txns reached, bad arguments: done is
 * not called). Checks before anything is sent: invalid addresses fail
 * (synthetic 553 5.1.7 sender / 5.1.3 recipient), a body larger than the
 * server's SIZE fails every recipient (synthetic 552 5.3.4), an address that
 * needs SMTPUTF8 fails (synthetic 553 5.6.7) when the server lacks it
 * unless its domain alone is non-ASCII (sent in A-labels; 553 5.1.3 / 5.1.7
 * when libidn2 refuses the domain).
 */
int rq_smtp_send(struct rq_smtp *s, struct rq_smtp_txn *txn);

/* Ends the session politely: QUIT now when idle, after the running (or
 * waiting) transaction, or as soon as a connecting session is ready; closed
 * follows. Before rq_smtp_connect the session is simply closed (no
 * callback). No-op when already closing or closed. */
void rq_smtp_quit(struct rq_smtp *s);

/* Frees the session: closes the connection without QUIT and calls nothing
 * (a running transaction's done is not called: the caller owns it). Safe
 * inside callbacks (deferred). NULL is a no-op. */
void rq_smtp_destroy(struct rq_smtp *s);

/* Accessors. */
enum rq_smtp_state rq_smtp_state(const struct rq_smtp *s);
const char *rq_smtp_state_name(enum rq_smtp_state st);
/* Capabilities of the current connection (after the last EHLO). */
const struct rq_smtp_caps *rq_smtp_caps(const struct rq_smtp *s);
/* The host in use (or last tried): its name, or the numeric address. */
const char *rq_smtp_peer_name(const struct rq_smtp *s);
/* "127.0.0.1:25" / "[::1]:25" of the host in use (or last tried). */
const char *rq_smtp_peer_addr(const struct rq_smtp *s);
/* Index in the list given to rq_smtp_connect of the host in use. */
size_t rq_smtp_host_index(const struct rq_smtp *s);
/* True when a new transaction can be sent now or once ready (connected or
 * connecting, no transaction running, not closing, max_txns not reached). */
bool rq_smtp_reusable(const struct rq_smtp *s);
/* Transactions started on the current connection. */
unsigned rq_smtp_txn_count(const struct rq_smtp *s);
/* TLS: active on the current connection; certificate verified; protocol and
 * cipher ("" without TLS). */
bool rq_smtp_tls_active(const struct rq_smtp *s);
bool rq_smtp_tls_verified(const struct rq_smtp *s);
const char *rq_smtp_tls_info(const struct rq_smtp *s);
/* True when AUTH succeeded on the current connection. */
bool rq_smtp_authenticated(const struct rq_smtp *s);

#endif

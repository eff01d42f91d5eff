#ifndef RELAYQ_TLS_H
#define RELAYQ_TLS_H

/*
 * TLS for the SMTP client: one shared OpenSSL context (trust store, protocol
 * floor) and, per connection, an SSL object with SNI and the host name to
 * verify. The SMTP session (smtp.h) decides when to use it; this module only
 * builds and inspects OpenSSL objects and never does I/O.
 *
 * And for the SMTP listener (listen.h): a server context from a certificate
 * chain and key file (rq_tls_server_ctx_create), and its SSL objects
 * (rq_tls_server_ssl_new). A reload builds a new context; SSL objects made
 * from the old one keep it alive (OpenSSL reference counts) until they end.
 */

#include <stdbool.h>
#include <stddef.h>

typedef struct ssl_st SSL;
struct rq_tls_ctx;

/* How a session uses TLS. */
enum rq_tls_mode {
	RQ_TLS_NONE = 0,       /* never: plain SMTP, STARTTLS ignored */
	RQ_TLS_OPPORTUNISTIC,  /* STARTTLS when offered, plain when not; the
				  certificate is checked and the result kept
				  (rq_smtp_tls_verified) but not enforced */
	RQ_TLS_REQUIRED,       /* STARTTLS must be offered and succeed; chain
				  and host name verified (unless verify is off) */
	RQ_TLS_IMPLICIT,       /* TLS from the first byte (port 465, RFC 8314),
				  verified as REQUIRED */
	RQ_TLS_MODE_COUNT_
};

/* "none", "opportunistic", "required", "implicit" (static strings). */
const char *rq_tls_mode_name(enum rq_tls_mode mode);
/* Parses a mode name (also "may" = opportunistic, "encrypt"/"verify" =
 * required); -1 when unknown. */
int rq_tls_mode_parse(const char *name);

struct rq_tls_ctx_opts {
	const char *ca_file;   /* PEM bundle of trusted CAs; NULL: none */
	const char *ca_path;   /* hashed CA folder; NULL: none */
	bool system_ca;        /* also trust the system's default store */
	const char *cert_file; /* optional client certificate (PEM) */
	const char *key_file;  /* its key; NULL: in cert_file */
};

/*
 * Creates a client context: TLS 1.2 or newer, the given trust anchors.
 * With no ca_file, no ca_path and system_ca false, the system store is used.
 * Returns NULL with a reason in err on failure (unreadable CA file, ...).
 * The context is shared by any number of sessions and must outlive them.
 */
struct rq_tls_ctx *rq_tls_ctx_create(const struct rq_tls_ctx_opts *opts,
				     char *err, size_t errlen);
/* Frees the context (NULL is a no-op). */
void rq_tls_ctx_destroy(struct rq_tls_ctx *ctx);

/*
 * A new client SSL for one connection. servername: the peer's host name,
 * sent as SNI (not for IP literals) and, when verify is true, checked
 * against the certificate (DNS names, or the IP address for IP literals);
 * NULL or "" sends no SNI and, with verify, fails every certificate (nothing
 * to match). verify: the handshake fails unless the chain leads to a trusted
 * CA and the name matches. With verify false the chain is still checked and
 * the result is available from rq_tls_verify_error() after the handshake.
 * Returns NULL with a reason in err on failure. The caller owns the SSL
 * (libevent frees it with BEV_OPT_CLOSE_ON_FREE).
 */
SSL *rq_tls_ssl_new(struct rq_tls_ctx *ctx, const char *servername, bool verify,
		    char *err, size_t errlen);

/*
 * A server context: TLS 1.2 or newer, no compression, no renegotiation,
 * the certificate chain of cert_file (PEM, leaf first) and the key of
 * key_file (PEM; NULL: in cert_file), checked to match. No client
 * certificates are asked for. Returns NULL with a reason in err (unreadable
 * file, key does not match). Free with rq_tls_ctx_destroy.
 */
struct rq_tls_ctx *rq_tls_server_ctx_create(const char *cert_file, const char *key_file,
					    char *err, size_t errlen);

/* A new server SSL for one accepted connection (the caller owns it, as for
 * rq_tls_ssl_new). NULL with a reason in err. */
SSL *rq_tls_server_ssl_new(struct rq_tls_ctx *ctx, char *err, size_t errlen);

/* True when the handshake completed and the certificate verified (chain and,
 * when a name was given, the name). */
bool rq_tls_verified(SSL *ssl);
/* Writes the reason the certificate did not verify ("" when it did) to buf. */
void rq_tls_verify_error(SSL *ssl, char *buf, size_t len);
/* Writes "TLSv1.3 TLS_AES_256_GCM_SHA384" (or "" before a handshake). */
void rq_tls_describe(SSL *ssl, char *buf, size_t len);
/*
 * Describes why a handshake failed: the verification error when there is
 * one, else the OpenSSL error code given (from bufferevent_get_openssl_error,
 * 0 when none), else fallback. Never contains secrets.
 */
void rq_tls_error_text(SSL *ssl, unsigned long ossl_err, const char *fallback,
		       char *buf, size_t len);

#endif

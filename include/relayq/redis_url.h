#ifndef RELAYQ_REDIS_URL_H
#define RELAYQ_REDIS_URL_H

/*
 * Redis URLs: the one parser, redaction and password lookup for every URL
 * relayq takes (relayqd's config "redis", rq_queue_opts.url, the CLI's
 * --redis / RELAYQ_REDIS):
 *
 *   redis://[user[:password]@]host[:port][/db]
 *   redis://:password@host[:port][/db]     (a password without a user)
 *   unix:/path/to/socket[?db=N]   unix:///path/to/socket[?db=N]
 *
 * host: a name of A-Z a-z 0-9 . - _, an IPv4 address, or an IPv6 address in
 * brackets. port 1-65535 (default 6379), db 0-RQ_REDIS_URL_DB_MAX (default
 * 0). rediss:// (TLS), query strings and fragments are refused.
 *
 * Special characters in the user and password follow RFC 3986: the
 * authority ends at the first '/', '?' or '#', and it may hold one '@'. So
 * '@', '/', '?', '#' and '%' in a user or password MUST be %-encoded (%40,
 * %2F, %3F, %23, %25), and so must ':' in a user (':' in a password may be
 * written as it is: the password is everything after the user's ':'). Any
 * byte may be %-encoded, except %00. Spaces and control characters must be
 * %-encoded too (%20). Refused, with a hint, rather than guessed: a second
 * '@' in the authority, and an '@' after the authority (e.g. a '#' or '/'
 * in a password that was not encoded).
 *
 * A userinfo without ':' is a user name (RFC 3986; redis-cli would take
 * it for a password: rq_queue_create then refuses "a user without a
 * password" unless password_env / password_file give one, and the
 * redaction hides such a userinfo too).
 *
 * Error texts never contain any part of the URL (so never the password).
 * Pure: no I/O but rq_redis_url_password's file and environment reads.
 */

#include <stdbool.h>
#include <stddef.h>

/* The URL relayqd and the CLI use when none is given. */
#define RQ_REDIS_URL_DEFAULT "redis://127.0.0.1:6379/0"

#define RQ_REDIS_URL_MAX 4096           /* bytes of a URL */
#define RQ_REDIS_URL_USER_MAX 255       /* decoded bytes */
#define RQ_REDIS_URL_PASSWORD_MAX 1024  /* decoded bytes */
#define RQ_REDIS_URL_DB_MAX 1000000

struct rq_redis_url {
	bool is_unix;
	char host[256];             /* TCP: name or address, no brackets */
	int port;                   /* TCP: 6379 when not given */
	int db;
	char path[108];             /* unix: the socket path */
	char user[RQ_REDIS_URL_USER_MAX + 1];          /* decoded; "" none */
	bool has_password;
	/* decoded; secret: wipe with rq_redis_url_wipe() after use */
	char password[RQ_REDIS_URL_PASSWORD_MAX + 1];
};

/* Parses url into *out (no name resolution). Returns 0, or -1 with a reason
 * in err (err may be NULL when errlen is 0; the reason never holds any of
 * the URL). On failure *out holds no password. */
int rq_redis_url_parse(const char *url, struct rq_redis_url *out, char *err,
		       size_t errlen);

/* Wipes the password in u (explicit_bzero). NULL is a no-op. */
void rq_redis_url_wipe(struct rq_redis_url *u);

/* Writes url to out (NUL-ended, truncated to outlen) for messages: a URL
 * that parses is copied with the password replaced by "***"; one that does
 * not parse is shown as its scheme followed by "..." (or just "..."), so a
 * password never gets through whatever the input looks like. */
void rq_redis_url_redact(const char *url, char *out, size_t outlen);

/*
 * The password for a parsed URL, from exactly one of: the URL itself, the
 * environment variable env_name (non-empty value), or the first line of
 * file (rq_secret_read_file, "redis password file"). env_name and file may
 * be NULL. Returns 0 with *out = the password (heap; free with
 * rq_secret_free) or NULL when no source gives one; -1 with a reason in err
 * (never the password) when more than one source is given, the variable is
 * unset or empty, the file is refused, or memory is short.
 */
int rq_redis_url_password(const struct rq_redis_url *u, const char *env_name,
			  const char *file, char **out, char *err, size_t errlen);

#endif

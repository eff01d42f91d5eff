/* Redis URLs: parse, redact, password sources (see redis_url.h). */
#include "relayq/redis_url.h"

#include "relayq/err.h"
#include "relayq/secret.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One parser for every URL relayq takes (redis_url.h documents the rules).
 * It never resolves names and never writes any part of the URL into err. */

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* %-decodes [s, s+n) into out (NUL-ended, outlen with the NUL). -1 on a bad
 * escape, %00 or too long; -2 when it needs more than outlen. */
static int pct_decode(const char *s, size_t n, char *out, size_t outlen)
{
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		int c = (unsigned char)s[i];
		if (c == '%') {
			if (i + 2 >= n)
				return -1;
			int a = hexval(s[i + 1]), b = hexval(s[i + 2]);
			if (a < 0 || b < 0)
				return -1;
			c = a * 16 + b;
			i += 2;
		}
		if (c == 0)
			return -1;
		if (k + 1 >= outlen)
			return -2;
		out[k++] = (char)c;
	}
	out[k] = '\0';
	return 0;
}

static bool parse_uint(const char *s, size_t n, long max, long *out)
{
	long v = 0;
	if (n == 0 || n > 10)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		v = v * 10 + (s[i] - '0');
	}
	if (v > max)
		return false;
	*out = v;
	return true;
}

static int url_fail(struct rq_redis_url *u, char *err, size_t errlen,
		    const char *msg)
{
	rq_redis_url_wipe(u);
	rq_err_set(err, errlen, "redis URL: %s", msg);
	return -1;
}

static int url_unix(const char *rest, struct rq_redis_url *u, char *err, size_t errlen)
{
	if (strncmp(rest, "//", 2) == 0)
		rest += 2;
	size_t plen = strcspn(rest, "?#");
	if (plen == 0 || rest[0] != '/')
		return url_fail(u, err, errlen, "unix: needs an absolute socket path (unix:/path)");
	if (plen >= sizeof(u->path))
		return url_fail(u, err, errlen, "the unix socket path is too long");
	memcpy(u->path, rest, plen);
	u->path[plen] = '\0';
	u->is_unix = true;
	const char *query = rest + plen;
	if (*query == '\0')
		return 0;
	long db;
	if (strncmp(query, "?db=", 4) != 0 ||
	    !parse_uint(query + 4, strlen(query + 4), RQ_REDIS_URL_DB_MAX, &db))
		return url_fail(u, err, errlen,
				"unix: accepts only ?db=<number> after the path");
	u->db = (int)db;
	return 0;
}

static bool reg_name_ok(const char *h, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)h[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_'))
			return false;
	}
	return n > 0;
}

static bool v6_ok(const char *h, size_t n)
{
	char tmp[INET6_ADDRSTRLEN];
	unsigned char buf[sizeof(struct in6_addr)];
	if (n == 0 || n >= sizeof(tmp))
		return false;
	memcpy(tmp, h, n);
	tmp[n] = '\0';
	return inet_pton(AF_INET6, tmp, buf) == 1;
}

int rq_redis_url_parse(const char *url, struct rq_redis_url *u, char *err,
		       size_t errlen)
{
	if (err && errlen > 0)
		err[0] = '\0';
	if (!u)
		return -1;
	memset(u, 0, sizeof(*u));
	u->port = 6379;
	if (!url || !*url)
		return url_fail(u, err, errlen, "empty");
	for (const unsigned char *p = (const unsigned char *)url; *p; p++)
		if (*p <= ' ' || *p == 0x7f)
			return url_fail(u, err, errlen,
					"space or control character (write it %-encoded)");
	if (strlen(url) > RQ_REDIS_URL_MAX)
		return url_fail(u, err, errlen, "too long");
	if (strncmp(url, "unix:", 5) == 0)
		return url_unix(url + 5, u, err, errlen);
	if (strncmp(url, "rediss://", 9) == 0)
		return url_fail(u, err, errlen, "TLS (rediss://) is not supported");
	if (strncmp(url, "redis://", 8) != 0)
		return url_fail(u, err, errlen,
				"must start with redis:// or unix:");
	const char *auth = url + 8;
	const char *end = auth + strcspn(auth, "/?#");
	const char *at = memchr(auth, '@', (size_t)(end - auth));
	if (at && memchr(at + 1, '@', (size_t)(end - at - 1)))
		return url_fail(u, err, errlen,
				"more than one '@' (write an '@' in the user or password as %40)");
	if (!at && strchr(end, '@'))
		return url_fail(u, err, errlen,
				"'@' after a '/', '?' or '#' (write those characters in the "
				"user or password as %2F, %3F, %23)");
	if (at) {
		const char *colon = memchr(auth, ':', (size_t)(at - auth));
		const char *uend = colon ? colon : at;
		const char *pw = colon ? colon + 1 : at;
		if (uend > auth) {
			int r = pct_decode(auth, (size_t)(uend - auth), u->user, sizeof(u->user));
			if (r != 0)
				return url_fail(u, err, errlen, r == -2 ? "user name too long"
						: "bad %-escape in the user name");
			for (const unsigned char *p = (const unsigned char *)u->user; *p; p++)
				if (*p < 0x20 || *p == 0x7f)
					return url_fail(u, err, errlen,
							"control character in the user name");
		}
		if (at > pw) {
			int r = pct_decode(pw, (size_t)(at - pw), u->password,
					   sizeof(u->password));
			if (r != 0)
				return url_fail(u, err, errlen, r == -2 ? "password too long"
						: "bad %-escape in the password");
			u->has_password = true;
		}
		auth = at + 1;
	}
	const char *hend;
	if (*auth == '[') {
		const char *rb = memchr(auth, ']', (size_t)(end - auth));
		if (!rb)
			return url_fail(u, err, errlen, "unclosed [ in the host");
		if (!v6_ok(auth + 1, (size_t)(rb - auth - 1)))
			return url_fail(u, err, errlen, "not an IPv6 address inside [ ]");
		memcpy(u->host, auth + 1, (size_t)(rb - auth - 1));
		u->host[rb - auth - 1] = '\0';
		hend = rb + 1;
		if (hend < end && *hend != ':')
			return url_fail(u, err, errlen, "unexpected text after ]");
	} else {
		hend = memchr(auth, ':', (size_t)(end - auth));
		if (!hend)
			hend = end;
		size_t n = (size_t)(hend - auth);
		if (n == 0)
			return url_fail(u, err, errlen, "no host");
		if (n >= sizeof(u->host))
			return url_fail(u, err, errlen, "host name too long");
		if (!reg_name_ok(auth, n))
			return url_fail(u, err, errlen,
					"the host must be a name, an IPv4 address or [IPv6]");
		memcpy(u->host, auth, n);
		u->host[n] = '\0';
	}
	if (hend < end) {
		long v;
		if (!parse_uint(hend + 1, (size_t)(end - hend - 1), 65535, &v) || v == 0)
			return url_fail(u, err, errlen, "the port must be 1-65535");
		u->port = (int)v;
	}
	if (*end == '/' && end[1] != '\0') {
		long db;
		if (!parse_uint(end + 1, strlen(end + 1), RQ_REDIS_URL_DB_MAX, &db))
			return url_fail(u, err, errlen,
					"the path must be a database number");
		u->db = (int)db;
	} else if (*end != '\0' && strcmp(end, "/") != 0) {
		return url_fail(u, err, errlen,
				"only /<db> may follow the host (no query, no fragment)");
	}
	return 0;
}

void rq_redis_url_wipe(struct rq_redis_url *u)
{
	if (u)
		explicit_bzero(u->password, sizeof(u->password));
}

void rq_redis_url_redact(const char *url, char *out, size_t outlen)
{
	struct rq_redis_url u;
	if (outlen == 0)
		return;
	out[0] = '\0';
	if (!url)
		return;
	if (rq_redis_url_parse(url, &u, NULL, 0) != 0) {
		/* nothing of an unparsed URL is shown but a known scheme */
		const char *schemes[] = {"redis://", "rediss://", "unix:"};
		const char *s = "";
		for (size_t i = 0; i < sizeof(schemes) / sizeof(schemes[0]); i++)
			if (strncmp(url, schemes[i], strlen(schemes[i])) == 0)
				s = schemes[i];
		snprintf(out, outlen, "%s...", s);
		return;
	}
	bool has_pw = u.has_password;
	rq_redis_url_wipe(&u);
	const char *auth = url + 8;
	const char *end = auth + strcspn(auth, "/?#");
	const char *at = u.is_unix ? NULL : memchr(auth, '@', (size_t)(end - auth));
	if (!at) {
		snprintf(out, outlen, "%s", url);
		return;
	}
	/* the user as written (validated: printable), never the password; a
	 * userinfo without ':' is a user, but is hidden too: redis-cli takes
	 * it for a password */
	const char *colon = memchr(auth, ':', (size_t)(at - auth));
	if (colon)
		snprintf(out, outlen, "redis://%.*s%s%s", (int)(colon - auth), auth,
			 has_pw ? ":***" : ":", at);
	else
		snprintf(out, outlen, "redis://%s%s", at > auth ? "***" : "", at);
}

int rq_redis_url_password(const struct rq_redis_url *u, const char *env_name,
			  const char *file, char **out, char *err, size_t errlen)
{
	*out = NULL;
	int sources = (u && u->has_password) + (env_name != NULL) + (file != NULL);
	if (sources > 1) {
		rq_err_set(err, errlen, "redis password given more than once (URL, "
			   "password_env, password_file)");
		return -1;
	}
	if (u && u->has_password) {
		*out = strdup(u->password);
	} else if (env_name) {
		const char *v = getenv(env_name);
		if (!v || !*v) {
			rq_err_set(err, errlen, "redis password: environment variable %s is not set",
				   env_name);
			return -1;
		}
		*out = strdup(v);
	} else if (file) {
		*out = rq_secret_read_file(file, "redis password file", err, errlen);
		return *out ? 0 : -1;
	} else {
		return 0;
	}
	if (!*out) {
		rq_err_set(err, errlen, "out of memory");
		return -1;
	}
	return 0;
}

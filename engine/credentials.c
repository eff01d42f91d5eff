/* The listener's AUTH credentials file: load, check a password in
 * constant time, hash, replace one user's line atomically (see
 * credentials.h). */
#include "relayq/credentials.h"

#include "relayq/err.h"

#include <crypt.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct entry {
	char *user;
	char *hash;
};

struct rq_credentials {
	struct entry *v;
	size_t n;
	char *dummy;        /* the setting used for unknown users */
};

bool rq_credentials_user_valid(const char *user, size_t len)
{
	if (!user || len == 0 || len > RQ_CREDENTIALS_USER_MAX)
		return false;
	for (size_t i = 0; i < len; i++) {
		char c = user[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '@' || c == '+' || c == '-'))
			return false;
	}
	return true;
}

static bool hash_valid(const char *h, size_t len)
{
	if (len == 0 || h[0] != '$' || len >= CRYPT_OUTPUT_SIZE)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)h[i];
		if (c <= 32 || c >= 127 || c == ':')
			return false;
	}
	return true;
}

/* Opens path and reads it whole after the mode and size checks. Returns
 * the bytes (NUL-ended, *len without it), or NULL with err; *missing is
 * set when the file does not exist. */
static char *read_checked(const char *path, size_t *len, struct stat *st, bool *missing,
			  char *err, size_t errlen)
{
	char *buf = NULL;
	*missing = false;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		*missing = errno == ENOENT;
		rq_err_set(err, errlen, "credentials file %s: %s", path, strerror(errno));
		return NULL;
	}
	if (fstat(fd, st) != 0) {
		rq_err_set(err, errlen, "credentials file %s: %s", path, strerror(errno));
		goto error;
	}
	if (!S_ISREG(st->st_mode)) {
		rq_err_set(err, errlen, "credentials file %s: not a regular file", path);
		goto error;
	}
	if (st->st_mode & 007) {
		rq_err_set(err, errlen, "credentials file %s: others may read or write it "
			   "(mode %03o); chmod o= %s (0600, or 0640 for a group)", path,
			   (unsigned)(st->st_mode & 0777), path);
		goto error;
	}
	if (st->st_size > RQ_CREDENTIALS_FILE_MAX) {
		rq_err_set(err, errlen, "credentials file %s: larger than %d bytes", path,
			   RQ_CREDENTIALS_FILE_MAX);
		goto error;
	}
	size_t cap = (size_t)st->st_size + 1, n = 0;
	if (!(buf = malloc(cap + 1))) {
		rq_err_set(err, errlen, "credentials file %s: out of memory", path);
		goto error;
	}
	for (;;) {
		ssize_t got = read(fd, buf + n, cap - n);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0) {
			rq_err_set(err, errlen, "credentials file %s: %s", path, strerror(errno));
			goto error;
		}
		if (got == 0)
			break;
		n += (size_t)got;
		if (n == cap) {
			rq_err_set(err, errlen, "credentials file %s: grew while read", path);
			goto error;
		}
	}
	buf[n] = '\0';
	*len = n;
	close(fd);
	return buf;
error:
	if (buf) {
		explicit_bzero(buf, (size_t)st->st_size + 1);
		free(buf);
	}
	close(fd);
	return NULL;
}

void rq_credentials_destroy(struct rq_credentials *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->n; i++) {
		free(c->v[i].user);
		free(c->v[i].hash);
	}
	free(c->v);
	free(c->dummy);
	free(c);
}

size_t rq_credentials_count(const struct rq_credentials *c)
{
	return c ? c->n : 0;
}

/* A setting of the default algorithm, for unknown users when the file has
 * none. */
static char *gensalt(void)
{
	char *s = crypt_gensalt_ra("$y$", 0, NULL, 0);
	if (!s)
		s = crypt_gensalt_ra("$6$", 0, NULL, 0);
	return s;
}

struct rq_credentials *rq_credentials_load(const char *path, char *err, size_t errlen)
{
	struct rq_credentials *c = NULL;
	size_t len = 0, cap = 0;
	struct stat st;
	bool missing;
	char *buf = read_checked(path, &len, &st, &missing, err, errlen);
	if (!buf)
		return NULL;
	if (!(c = calloc(1, sizeof(*c))))
		goto oom;
	size_t lineno = 0;
	for (char *p = buf; p < buf + len;) {
		char *end = memchr(p, '\n', (size_t)(buf + len - p));
		char *next = end ? end + 1 : buf + len;
		size_t n = (size_t)((end ? end : buf + len) - p);
		lineno++;
		if (n > 0 && p[n - 1] == '\r')
			n--;
		if (n == 0 || p[0] == '#') {
			p = next;
			continue;
		}
		char *colon = memchr(p, ':', n);
		size_t ulen = colon ? (size_t)(colon - p) : 0;
		if (!colon || !rq_credentials_user_valid(p, ulen)) {
			rq_err_set(err, errlen, "credentials file %s line %zu: %s", path, lineno,
				   colon ? "bad user name (1-64 of A-Z a-z 0-9 . _ @ + -)"
				   : "no ':' (want user:hash)");
			goto error;
		}
		char *h = colon + 1;
		size_t hlen = n - ulen - 1;
		if (!hash_valid(h, hlen)) {
			rq_err_set(err, errlen, "credentials file %s line %zu: bad hash for %.*s "
				   "(set it with relayq passwd)", path, lineno, (int)ulen, p);
			goto error;
		}
		for (size_t i = 0; i < c->n; i++) {
			if (strlen(c->v[i].user) == ulen && memcmp(c->v[i].user, p, ulen) == 0) {
				rq_err_set(err, errlen, "credentials file %s line %zu: user %.*s "
					   "a second time", path, lineno, (int)ulen, p);
				goto error;
			}
		}
		if (c->n == cap) {
			size_t nc = cap ? cap * 2 : 16;
			struct entry *nv = realloc(c->v, nc * sizeof(*nv));
			if (!nv)
				goto oom;
			c->v = nv;
			cap = nc;
		}
		struct entry *e = &c->v[c->n];
		e->user = strndup(p, ulen);
		e->hash = strndup(h, hlen);
		if (!e->user || !e->hash) {
			free(e->user);
			free(e->hash);
			goto oom;
		}
		c->n++;
		p = next;
	}
	c->dummy = c->n ? strdup(c->v[0].hash) : gensalt();
	if (!c->dummy)
		goto oom;
	explicit_bzero(buf, len);
	free(buf);
	return c;
oom:
	rq_err_set(err, errlen, "credentials file %s: out of memory", path);
error:
	explicit_bzero(buf, len);
	free(buf);
	rq_credentials_destroy(c);
	return NULL;
}

bool rq_credentials_check(const struct rq_credentials *c, const char *user,
			  const char *password, size_t plen)
{
	if (!c)
		return false;
	const struct entry *e = NULL;
	size_t ulen = user ? strlen(user) : 0;
	for (size_t i = 0; i < c->n; i++) {
		if (strlen(c->v[i].user) == ulen && memcmp(c->v[i].user, user, ulen) == 0)
			e = &c->v[i];
	}
	bool usable = password && plen <= RQ_CREDENTIALS_PASSWORD_MAX &&
		      !memchr(password, '\0', plen);
	char phrase[RQ_CREDENTIALS_PASSWORD_MAX + 1];
	if (usable)
		memcpy(phrase, password, plen);
	else
		plen = 0;
	phrase[plen] = '\0';
	const char *setting = e ? e->hash : c->dummy;
	struct crypt_data *cd = calloc(1, sizeof(*cd));
	if (!cd)
		return false;
	const char *out = crypt_rn(phrase, setting, cd, (int)sizeof(*cd));
	explicit_bzero(phrase, sizeof(phrase));
	/* compare whole buffers, whatever the lengths */
	unsigned char a[CRYPT_OUTPUT_SIZE] = {0}, b[CRYPT_OUTPUT_SIZE] = {0};
	if (out)
		snprintf((char *)a, sizeof(a), "%s", out);
	snprintf((char *)b, sizeof(b), "%s", setting);
	unsigned char diff = out ? 0 : 1;
	for (size_t i = 0; i < sizeof(a); i++)
		diff |= (unsigned char)(a[i] ^ b[i]);
	explicit_bzero(cd, sizeof(*cd));
	free(cd);
	return diff == 0 && e && usable;
}

char *rq_credentials_hash(const char *password, size_t plen, char *err, size_t errlen)
{
	char *salt = NULL, *res = NULL;
	struct crypt_data *cd = NULL;
	char phrase[RQ_CREDENTIALS_PASSWORD_MAX + 1];
	if (!password || plen == 0 || plen > RQ_CREDENTIALS_PASSWORD_MAX ||
	    memchr(password, '\0', plen)) {
		rq_err_set(err, errlen, plen == 0 ? "empty password"
			   : plen > RQ_CREDENTIALS_PASSWORD_MAX ? "password longer than 511 bytes"
			   : "password holds a NUL byte");
		return NULL;
	}
	memcpy(phrase, password, plen);
	phrase[plen] = '\0';
	if (!(salt = gensalt())) {
		rq_err_set(err, errlen, "cannot make a salt: %s", strerror(errno));
		goto cleanup;
	}
	if (!(cd = calloc(1, sizeof(*cd)))) {
		rq_err_set(err, errlen, "out of memory");
		goto cleanup;
	}
	const char *out = crypt_rn(phrase, salt, cd, (int)sizeof(*cd));
	if (!out || !hash_valid(out, strlen(out))) {
		rq_err_set(err, errlen, "crypt failed: %s", strerror(errno));
		goto cleanup;
	}
	if (!(res = strdup(out)))
		rq_err_set(err, errlen, "out of memory");
cleanup:
	explicit_bzero(phrase, sizeof(phrase));
	if (cd) {
		explicit_bzero(cd, sizeof(*cd));
		free(cd);
	}
	free(salt);
	return res;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

int rq_credentials_file_set(const char *path, const char *user, const char *hash,
			    char *err, size_t errlen)
{
	char *old = NULL, *tmp = NULL, *dirc = NULL;
	int fd = -1, rc = -1;
	size_t len = 0, ulen = user ? strlen(user) : 0;
	struct stat st;
	bool missing = false;
	if (!rq_credentials_user_valid(user, ulen)) {
		rq_err_set(err, errlen, "bad user name (1-64 of A-Z a-z 0-9 . _ @ + -)");
		return -1;
	}
	if (!hash || !hash_valid(hash, strlen(hash))) {
		rq_err_set(err, errlen, "bad hash");
		return -1;
	}
	old = read_checked(path, &len, &st, &missing, err, errlen);
	if (!old && !missing)
		return -1;
	if (!(tmp = malloc(strlen(path) + 16))) {
		rq_err_set(err, errlen, "out of memory");
		goto cleanup;
	}
	sprintf(tmp, "%s.tmp.XXXXXX", path);
	if ((fd = mkstemp(tmp)) < 0) {
		rq_err_set(err, errlen, "cannot create a file next to %s: %s", path, strerror(errno));
		free(tmp);
		tmp = NULL;
		goto cleanup;
	}
	mode_t mode = old ? (st.st_mode & 0770) | 0600 : 0600;
	if (fchmod(fd, mode) != 0) {
		rq_err_set(err, errlen, "chmod %s: %s", tmp, strerror(errno));
		goto cleanup;
	}
	if (old && (st.st_uid != geteuid() || st.st_gid != getegid()))
		(void)!fchown(fd, st.st_uid, st.st_gid);   /* only root may; fine without */
	bool done = false, failed = false;
	for (char *p = old; p && p < old + len && !failed;) {
		char *end = memchr(p, '\n', (size_t)(old + len - p));
		char *next = end ? end + 1 : old + len;
		size_t n = (size_t)(next - p);
		bool mine = n > ulen && memcmp(p, user, ulen) == 0 && p[ulen] == ':';
		if (mine && !done) {
			failed = write_all(fd, user, ulen) || write_all(fd, ":", 1) ||
				 write_all(fd, hash, strlen(hash)) || write_all(fd, "\n", 1);
			done = true;
		} else if (!mine) {
			failed = write_all(fd, p, n) || (!end && write_all(fd, "\n", 1));
		}
		p = next;
	}
	if (!done && !failed)
		failed = write_all(fd, user, ulen) || write_all(fd, ":", 1) ||
			 write_all(fd, hash, strlen(hash)) || write_all(fd, "\n", 1);
	if (failed || fsync(fd) != 0) {
		rq_err_set(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
		goto cleanup;
	}
	if (close(fd) != 0) {
		fd = -1;
		rq_err_set(err, errlen, "cannot write %s: %s", tmp, strerror(errno));
		goto cleanup;
	}
	fd = -1;
	if (rename(tmp, path) != 0) {
		rq_err_set(err, errlen, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
		goto cleanup;
	}
	free(tmp);
	tmp = NULL;
	/* the rename itself durable */
	if ((dirc = strdup(path))) {
		int dfd = open(dirname(dirc), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (dfd >= 0) {
			(void)fsync(dfd);
			close(dfd);
		}
	}
	rc = 0;
cleanup:
	if (fd >= 0)
		close(fd);
	if (tmp) {
		unlink(tmp);
		free(tmp);
	}
	if (old) {
		explicit_bzero(old, len);
		free(old);
	}
	free(dirc);
	return rc;
}

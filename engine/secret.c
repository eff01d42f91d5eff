/* Secrets read from files: the one reader (see secret.h). */
#include "relayq/secret.h"

#include "relayq/err.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *rq_secret_read_file(const char *path, const char *what, char *err, size_t errlen)
{
	char *buf = NULL;
	FILE *f = fopen(path, "r");
	if (!f) {
		rq_err_set(err, errlen, "%s %s: %s", what, path, strerror(errno));
		return NULL;
	}
	/* room for the longest secret, its CRLF, and one byte to see more */
	size_t cap = RQ_SECRET_MAX + 3;
	buf = calloc(1, cap + 1);
	if (!buf) {
		rq_err_set(err, errlen, "%s %s: out of memory", what, path);
		goto error;
	}
	size_t n = 0;
	int c;
	while (n < cap && (c = getc(f)) != EOF && c != '\n')
		buf[n++] = (char)c;
	if (ferror(f)) {
		rq_err_set(err, errlen, "%s %s: %s", what, path, strerror(errno));
		goto error;
	}
	if (n > 0 && buf[n - 1] == '\r')
		n--;
	buf[n] = '\0';
	if (n == 0) {
		rq_err_set(err, errlen, "%s %s: no secret on its first line", what, path);
		goto error;
	}
	if (n > RQ_SECRET_MAX) {
		rq_err_set(err, errlen, "%s %s: first line is longer than %d bytes", what, path,
			   RQ_SECRET_MAX);
		goto error;
	}
	if (memchr(buf, '\0', n)) {
		rq_err_set(err, errlen, "%s %s: first line holds a NUL byte", what, path);
		goto error;
	}
	fclose(f);
	return buf;
error:
	if (buf) {
		explicit_bzero(buf, cap + 1);
		free(buf);
	}
	fclose(f);
	return NULL;
}

void rq_secret_free(char *s)
{
	if (!s)
		return;
	explicit_bzero(s, strlen(s));
	free(s);
}

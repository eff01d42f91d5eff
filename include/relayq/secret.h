#ifndef RELAYQ_SECRET_H
#define RELAYQ_SECRET_H

/*
 * Secrets read from files (Redis passwords, SMTP AUTH passwords): the one
 * reader, with one set of rules for relayqd, its config and the CLI.
 *
 * The secret is the file's first line without its line end (LF or CRLF).
 * Refused, with a reason that never contains the secret: a file that
 * cannot be opened, an empty first line, a first line longer than
 * RQ_SECRET_MAX bytes, a NUL byte in it.
 */

#include <stddef.h>

#define RQ_SECRET_MAX 4096

/* Returns the secret (heap; free with rq_secret_free) or NULL with err =
 * "<what> <path>: <reason>", e.g. what = "redis password file". */
char *rq_secret_read_file(const char *path, const char *what, char *err, size_t errlen);

/* Wipes and frees s. NULL: no-op. */
void rq_secret_free(char *s);

#endif

#ifndef RELAYQ_ERR_H
#define RELAYQ_ERR_H

/*
 * Errors into a caller's buffer: the one helper every module uses for its
 * char *err, size_t errlen out-parameter (conventions: library modules
 * return -1 / false / NULL and say why here; they never print).
 */

#include <stddef.h>

/* Formats into err (truncated, always terminated). err NULL or errlen 0:
 * no-op. Never pass a secret. */
void rq_err_set(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif

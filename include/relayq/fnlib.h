#ifndef RELAYQ_FNLIB_H
#define RELAYQ_FNLIB_H

/*
 * The Redis Functions library (lua/redis/relayq.lua), embedded in the
 * binaries at build time so that relayqd and relayq can FUNCTION LOAD it
 * without finding the file.
 */

#include <stddef.h>

extern const char rq_fnlib_source[];   /* NUL-ended */
extern const size_t rq_fnlib_source_len;

/* The VERSION the embedded library declares (its line "local VERSION = N"),
 * which relayq_version returns once loaded; -1 when not found. */
int rq_fnlib_version(void);

#endif

#ifndef RELAYQ_STR_H
#define RELAYQ_STR_H

/*
 * Small string helpers shared by modules, so that each is written once.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A heap copy of s, or NULL for s NULL. When memory is short, returns NULL
 * and sets *oom to true (never sets it to false: one flag collects the
 * failures of several copies, checked once). */
char *rq_str_dup(const char *s, bool *oom);

/* The index of the first c in s[from, n), or n when there is none: where
 * the word or line that starts at from ends. */
size_t rq_str_end(const char *s, size_t from, size_t n, char c);

/* Makes s one line: every control byte (below 0x20, and 0x7f) becomes a
 * space. */
void rq_str_one_line(char *s);

/* FNV-1a 64 of p[0, n), continuing from h (start with RQ_STR_FNV_BASIS). */
#define RQ_STR_FNV_BASIS 0xcbf29ce484222325ULL
uint64_t rq_str_fnv1a(uint64_t h, const void *p, size_t n);

#endif

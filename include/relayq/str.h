#ifndef RELAYQ_STR_H
#define RELAYQ_STR_H

/*
 * Small string helpers shared by modules, so that each is written once.
 */

#include <stdbool.h>

/* A heap copy of s, or NULL for s NULL. When memory is short, returns NULL
 * and sets *oom to true (never sets it to false: one flag collects the
 * failures of several copies, checked once). */
char *rq_str_dup(const char *s, bool *oom);

#endif

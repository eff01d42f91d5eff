#ifndef RELAYQ_KEYS_H
#define RELAYQ_KEYS_H

/*
 * Queue names and the Redis keys they own: the one place for the rules of
 * a queue name and for the key prefix. Every key of queue q starts with
 * "relayq:{q}:" (one hash tag, so a queue lives in one cluster slot).
 */

#include <stdbool.h>
#include <stddef.h>

#define RQ_KEYS_QUEUE_DEFAULT "default"
#define RQ_KEYS_QUEUE_MAX 64                        /* bytes of a name */
#define RQ_KEYS_PREFIX_MAX (RQ_KEYS_QUEUE_MAX + 10) /* "relayq:{" q "}" + NUL */

/* True for 1..RQ_KEYS_QUEUE_MAX bytes of A-Z a-z 0-9 _ . : - (len bytes
 * of s; a NUL inside makes it false). */
bool rq_keys_queue_valid(const char *s, size_t len);

/* The text that says what a valid name is, for error messages. */
#define RQ_KEYS_QUEUE_RULE "1-64 of A-Z a-z 0-9 _ . : -"

/* Writes "relayq:{<queue>}" into buf (>= RQ_KEYS_PREFIX_MAX bytes).
 * Returns 0, or -1 for an invalid name. */
int rq_keys_prefix(const char *queue, char *buf, size_t len);

#endif

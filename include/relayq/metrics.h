#ifndef RELAYQ_METRICS_H
#define RELAYQ_METRICS_H

/*
 * The daemon's /metrics endpoint (Prometheus text format 0.0.4), when the
 * config names `metrics = "host:port"`: a small HTTP/1.x server on a
 * libevent listener (evhttp in libevent 2.1 can neither cap connections nor
 * bound the time to send a request head). The values come from a fill
 * callback the daemon gives, called for every GET /metrics (HEAD: the same
 * headers, no body); other paths get 404, other methods 405, a malformed
 * request line 400, a head over RQ_METRICS_HEAD_MAX bytes 431. One request
 * per connection (Connection: close).
 *
 * Bounds, so that clients cannot take the daemon's descriptors or CPU:
 * at most RQ_METRICS_CONNS_MAX connections (beyond that the listener stops
 * accepting until one closes); the request head must arrive within
 * RQ_METRICS_HEAD_MS of the accept and no connection may stay silent
 * (reading or writing) for RQ_METRICS_IDLE_MS; a failed accept() (EMFILE,
 * ENFILE, ENOBUFS, ...) pauses accepting until one of its connections
 * closes (a descriptor is free again) or for RQ_METRICS_PAUSE_MS, doubling
 * to RQ_METRICS_PAUSE_MAX_MS while it keeps failing (short again after a
 * quiet spell of twice that): never a busy loop. Logged as at most one
 * metrics_accept_paused line per RQ_METRICS_PAUSE_MAX_MS, with the errors
 * since the last line and since start.
 */

#define RQ_METRICS_CONNS_MAX 16
#define RQ_METRICS_HEAD_MS 5000
#define RQ_METRICS_IDLE_MS 5000
#define RQ_METRICS_HEAD_MAX 16384
#define RQ_METRICS_PAUSE_MS 1000
#define RQ_METRICS_PAUSE_MAX_MS 5000

#include <stddef.h>
#include <stdint.h>

struct event_base;
struct evbuffer;
struct rq_metrics;

/* Writes the metrics into out (use the helpers below). */
typedef void (*rq_metrics_fill_cb)(struct evbuffer *out, void *arg);

/*
 * Listens on listen ("host:port", "[v6]:port"; host an IP address or
 * "localhost"). Returns NULL with a reason in err (bad address, port in
 * use). fill is called from the event loop.
 */
struct rq_metrics *rq_metrics_create(struct event_base *base, const char *listen,
				     rq_metrics_fill_cb fill, void *arg,
				     char *err, size_t errlen);

/* Open connections now, and failed accepts since start (for the daemon's
 * own metrics). */
size_t rq_metrics_connections(const struct rq_metrics *m);
uint64_t rq_metrics_accept_errors(const struct rq_metrics *m);

/* Stops listening and frees. NULL: no-op. */
void rq_metrics_destroy(struct rq_metrics *m);

/* Writes "# HELP name help" and "# TYPE name type" (type "counter" or
 * "gauge"); once per metric name, before its samples. */
void rq_metrics_head(struct evbuffer *out, const char *name, const char *type,
		     const char *help);
/* Writes one sample "name{labels} value"; labels is the text inside the
 * braces (e.g. queue="default"; its values must need no escaping) or NULL. */
void rq_metrics_sample(struct evbuffer *out, const char *name, const char *labels,
		       uint64_t value);

#endif

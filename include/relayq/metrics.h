#ifndef RELAYQ_METRICS_H
#define RELAYQ_METRICS_H

/*
 * The daemon's /metrics endpoint (Prometheus text format 0.0.4) over
 * libevent's evhttp, when the config names `metrics = "host:port"`.
 * The values come from a fill callback the daemon gives, called for every
 * GET /metrics; other paths get 404, methods other than GET are refused
 * (evhttp answers 501, or 405 for HEAD).
 */

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

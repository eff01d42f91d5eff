/* The /metrics endpoint over evhttp (see metrics.h). */
#include "relayq/metrics.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct rq_metrics {
	struct evhttp *http;
	rq_metrics_fill_cb fill;
	void *arg;
};

void rq_metrics_head(struct evbuffer *out, const char *name, const char *type,
		     const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void rq_metrics_sample(struct evbuffer *out, const char *name, const char *labels,
		       uint64_t value)
{
	if (labels && *labels)
		evbuffer_add_printf(out, "%s{%s} %" PRIu64 "\n", name, labels, value);
	else
		evbuffer_add_printf(out, "%s %" PRIu64 "\n", name, value);
}

static void on_request(struct evhttp_request *req, void *arg)
{
	struct rq_metrics *m = arg;
	const char *uri = evhttp_request_get_uri(req);
	if (evhttp_request_get_command(req) != EVHTTP_REQ_GET) {
		evhttp_send_error(req, 405, "Method Not Allowed");
		return;
	}
	if (!uri || (strcmp(uri, "/metrics") != 0 && strncmp(uri, "/metrics?", 9) != 0)) {
		evhttp_send_error(req, HTTP_NOTFOUND, "Not Found");
		return;
	}
	struct evbuffer *out = evbuffer_new();
	if (!out) {
		evhttp_send_error(req, HTTP_INTERNAL, "Out of memory");
		return;
	}
	m->fill(out, m->arg);
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
			  "text/plain; version=0.0.4");
	evhttp_send_reply(req, HTTP_OK, "OK", out);
	evbuffer_free(out);
}

/* Splits "host:port" / "[v6]:port" into host and port. 0 or -1. */
static int split_listen(const char *s, char *host, size_t hostlen, int *port)
{
	const char *colon;
	const char *h = s;
	size_t hl;
	if (*s == '[') {
		const char *end = strchr(s, ']');
		if (!end || end[1] != ':')
			return -1;
		h = s + 1;
		hl = (size_t)(end - h);
		colon = end + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return -1;
		hl = (size_t)(colon - s);
	}
	if (hl == 0 || hl >= hostlen)
		return -1;
	memcpy(host, h, hl);
	host[hl] = '\0';
	char *e = NULL;
	long p = strtol(colon + 1, &e, 10);
	if (!e || *e || e == colon + 1 || p < 0 || p > 65535)
		return -1;
	*port = (int)p;
	return 0;
}

void rq_metrics_destroy(struct rq_metrics *m)
{
	if (!m)
		return;
	if (m->http)
		evhttp_free(m->http);
	free(m);
}

struct rq_metrics *rq_metrics_create(struct event_base *base, const char *listen,
				     rq_metrics_fill_cb fill, void *arg,
				     char *err, size_t errlen)
{
	char host[256];
	int port = 0;
	if (!listen || split_listen(listen, host, sizeof(host), &port) < 0) {
		snprintf(err, errlen, "metrics: \"%.80s\" is not host:port", listen ? listen : "");
		return NULL;
	}
	if (strcmp(host, "localhost") == 0)
		snprintf(host, sizeof(host), "127.0.0.1");
	struct rq_metrics *m = calloc(1, sizeof(*m));
	if (!m) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	m->fill = fill;
	m->arg = arg;
	m->http = evhttp_new(base);
	if (!m->http) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	evhttp_set_allowed_methods(m->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
	evhttp_set_timeout(m->http, 10);
	evhttp_set_max_headers_size(m->http, 16384);
	evhttp_set_max_body_size(m->http, 0);
	evhttp_set_gencb(m->http, on_request, m);
	if (evhttp_bind_socket(m->http, host, (ev_uint16_t)port) != 0) {
		snprintf(err, errlen, "metrics: cannot listen on %s", listen);
		goto fail;
	}
	return m;
fail:
	rq_metrics_destroy(m);
	return NULL;
}

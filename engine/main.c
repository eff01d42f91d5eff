/* relayqd: the delivery daemon (options, config, signals, lifecycle). */
#include "relayq/config.h"
#include "relayq/dest.h"
#include "relayq/keys.h"
#include "relayq/listen.h"
#include "relayq/log.h"
#include "relayq/metrics.h"
#include "relayq/policy_lua.h"
#include "relayq/queue.h"
#include "relayq/runner.h"
#include "relayq/tls.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SHUTDOWN_GRACE_MS 10000   /* running transactions may finish */
#define LOG_FLUSH_MS 50           /* buffered log lines are at most this late */

struct daemon {
	struct event_base *base;
	const char *path;
	const char *redis;            /* override: --redis, else RELAYQ_REDIS */
	const char *queue;            /* override: --queue */
	struct rq_config *boot;       /* the config started with: what runs */
	struct rq_config *cfg;        /* the policy in use (boot or a reload) */
	struct rq_dests *dests;
	struct rq_metrics *metrics;
	struct rq_runner *runners[RQ_CONFIG_QUEUES_MAX];
	size_t nrunners;
	struct rq_listen *listens[RQ_CONFIG_LISTEN_MAX];
	size_t nlistens;
	size_t listens_stopped;
	struct event *sig_term, *sig_int, *sig_hup;
	struct event *log_flush;      /* writes buffered log lines */
	int phase;                    /* 0 running, 1 draining, 2 closing */
	size_t stopped;
	bool drained;
};

static void usage(FILE *f)
{
	fprintf(f,
		"usage: relayqd -c FILE [--redis URL] [--queue NAME]\n"
		"       relayqd --check -c FILE\n"
		"       relayqd --version | --help\n"
		"\n"
		"Delivers the mail queued in Redis over SMTP, as configured in FILE\n"
		"(a Lua file: see contrib/relayq.example.lua).\n"
		"\n"
		"  -c, --config FILE  the configuration file (required)\n"
		"  --redis URL        Redis to use (overrides the file and RELAYQ_REDIS)\n"
		"  --queue NAME       the queue to drain (overrides the file)\n"
		"  --check            validate FILE: prints each problem as file:line,\n"
		"                     exits 0 when it loads, 1 otherwise\n"
		"  --version          print the version\n"
		"  -h, --help         this text\n"
		"\n"
		"Environment: RELAYQ_REDIS (the Redis URL, overrides the file);\n"
		"RELAYQ_DNS_SERVERS (\"ip[:port],...\": DNS servers instead of\n"
		"/etc/resolv.conf) and RELAYQ_MX_PORT (the SMTP port of MX hosts,\n"
		"default 25), both meant for tests.\n"
		"Signals: SIGTERM / SIGINT stop (running transactions get %d s, the\n"
		"rest goes back to the queue; a second signal hurries; SMTP listeners\n"
		"stop first: open sessions get 421), SIGHUP reloads the policy and the\n"
		"listeners' certificates and credentials files.\n",
		SHUTDOWN_GRACE_MS / 1000);
}

static int to_ms(double secs)
{
	if (secs <= 0)
		return 0;
	if (secs > 86400.0 * 24)
		secs = 86400.0 * 24;
	return (int)(secs * 1000.0);
}

static void log_diag(const struct rq_config_diag *d, const char *event)
{
	for (size_t i = 0; i < d->n; i++) {
		char line[24];
		snprintf(line, sizeof(line), "%d", d->items[i].line);
		rq_log(d->items[i].warning ? RQ_LOG_WARN : RQ_LOG_ERROR, event, "file",
		       d->file, "line", line, "problem", d->items[i].msg, NULL);
	}
}

/* ---- shutdown ---- */

static void on_closed(void *arg)
{
	struct daemon *dm = arg;
	event_base_loopbreak(dm->base);
}

static void maybe_close(struct daemon *dm)
{
	if (dm->phase != 1 || !dm->drained || dm->stopped < dm->nrunners ||
	    dm->listens_stopped < dm->nlistens)
		return;
	dm->phase = 2;
	rq_dests_close(dm->dests, on_closed, dm);
}

static void on_drained(void *arg)
{
	struct daemon *dm = arg;
	dm->drained = true;
	maybe_close(dm);
}

static void on_runner_stopped(struct rq_runner *r, void *arg)
{
	struct daemon *dm = arg;
	dm->stopped++;
	maybe_close(dm);
}

static void on_listen_stopped(void *arg)
{
	struct daemon *dm = arg;
	dm->listens_stopped++;
	maybe_close(dm);
}

static void on_stop_signal(evutil_socket_t sig, short what, void *arg)
{
	struct daemon *dm = arg;
	if (dm->phase > 0) {
		rq_log(RQ_LOG_WARN, "stopping_now", "signal", sig == SIGINT ? "INT" : "TERM",
		       NULL);
		rq_dests_hurry(dm->dests);
		return;
	}
	rq_log(RQ_LOG_INFO, "stopping", "signal", sig == SIGINT ? "INT" : "TERM", NULL);
	dm->phase = 1;
	/* intake first: no new message comes in while the rest drains */
	for (size_t i = 0; i < dm->nlistens; i++)
		rq_listen_stop(dm->listens[i], on_listen_stopped, dm);
	for (size_t i = 0; i < dm->nrunners; i++)
		rq_runner_stop(dm->runners[i]);
	rq_dests_drain(dm->dests, SHUTDOWN_GRACE_MS, on_drained, dm);
}

/* ---- reload ---- */

static bool str_differs(const char *a, const char *b)
{
	if (!a || !b)
		return a != b;
	return strcmp(a, b) != 0;
}

static void warn_restart(const struct rq_config *o, const struct rq_config *n)
{
	const char *changed[32];
	size_t k = 0;
#define CHK(cond, name) do { if ((cond) && k < 32) changed[k++] = (name); } while (0)
	CHK(str_differs(o->redis, n->redis) || str_differs(o->redis_user, n->redis_user) ||
	    str_differs(o->redis_password_file, n->redis_password_file) ||
	    str_differs(o->redis_password_env, n->redis_password_env), "redis");
	bool qd = o->nqueues != n->nqueues;
	for (size_t i = 0; !qd && i < o->nqueues; i++)
		qd = str_differs(o->queues[i], n->queues[i]);
	CHK(qd, "queue");
	CHK(str_differs(o->relay_host, n->relay_host) || o->relay_port != n->relay_port ||
	    o->relay_mx != n->relay_mx, "relay");
	CHK(o->tls != n->tls || str_differs(o->tls_ca_file, n->tls_ca_file) ||
	    o->tls_verify != n->tls_verify, "tls");
	CHK(o->auth != n->auth || str_differs(o->auth_user, n->auth_user) ||
	    str_differs(o->auth_password, n->auth_password) ||
	    o->auth_allow_plaintext != n->auth_allow_plaintext, "auth");
	CHK(str_differs(o->helo, n->helo), "helo");
	CHK(o->connections != n->connections, "connections");
	CHK(o->per_destination != n->per_destination, "per_destination");
	CHK(o->messages_per_connection != n->messages_per_connection,
	    "messages_per_connection");
	CHK(memcmp(&o->timeouts, &n->timeouts, sizeof(o->timeouts)) != 0, "timeouts");
	CHK(str_differs(o->metrics, n->metrics), "metrics");
	bool ld = o->nlistens != n->nlistens;
	for (size_t i = 0; !ld && i < o->nlistens; i++)
		ld = str_differs(o->listens[i].address, n->listens[i].address);
	CHK(ld, "listen");
	CHK(o->log_format != n->log_format, "log_format");
#undef CHK
	for (size_t i = 0; i < k; i++)
		rq_log(RQ_LOG_WARN, "reload_needs_restart", "setting", changed[i], "reason",
		       "changed in the file; the running value is kept until a restart",
		       NULL);
}

static void on_hup(evutil_socket_t sig, short what, void *arg)
{
	struct daemon *dm = arg;
	if (dm->phase > 0)
		return;
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, dm->path);
	struct rq_config *n = rq_config_lua_load(dm->path, 0, &diag);
	if (!n) {
		log_diag(&diag, "reload_problem");
		rq_log(RQ_LOG_ERROR, "reload_failed", "file", dm->path, "reason",
		       "the file does not load; the running policy is kept", NULL);
		return;
	}
	log_diag(&diag, "reload_problem");
	/* listeners: new certificates and credentials from the same files (the
	 * other listener settings need a restart) */
	for (size_t i = 0; i < dm->nlistens; i++) {
		char err[300];
		if (rq_listen_reload_tls(dm->listens[i], err, sizeof(err)) < 0)
			rq_log(RQ_LOG_ERROR, "listen_reload_failed", "listener",
			       rq_listen_name(dm->listens[i]), "what", "tls", "error", err,
			       "reason", "the running certificate is kept", NULL);
		if (rq_listen_reload_auth(dm->listens[i], err, sizeof(err)) < 0)
			rq_log(RQ_LOG_ERROR, "listen_reload_failed", "listener",
			       rq_listen_name(dm->listens[i]), "what", "auth_file", "error", err,
			       "reason", "the running credentials are kept", NULL);
		rq_log(RQ_LOG_INFO, "listen_reloaded", "listener",
		       rq_listen_name(dm->listens[i]), NULL);
	}
	/* against what runs: the connection settings of the start */
	warn_restart(dm->boot, n);
	for (size_t i = 0; i < dm->nrunners; i++)
		rq_runner_set_config(dm->runners[i], n);
	rq_log_init((enum rq_log_level)n->log_level, (enum rq_log_format)dm->boot->log_format,
		    NULL);
	if (dm->cfg != dm->boot)
		rq_config_destroy(dm->cfg);
	dm->cfg = n;
	struct rq_policy_lua_stats st;
	rq_policy_lua_stats(n->lua, &st);
	char rules[24], domains[24];
	snprintf(rules, sizeof(rules), "%zu", st.rules);
	snprintf(domains, sizeof(domains), "%zu", n->ndomains);
	rq_log(RQ_LOG_INFO, "reloaded", "file", dm->path, "rules", rules, "domains",
	       domains, NULL);
}

/* ---- metrics ---- */

static void fill_listen_metrics(struct evbuffer *out, struct daemon *dm)
{
	struct rq_listen_stats st[RQ_CONFIG_LISTEN_MAX];
	char labels[RQ_CONFIG_LISTEN_MAX][128];
	for (size_t i = 0; i < dm->nlistens; i++) {
		rq_listen_get_stats(dm->listens[i], &st[i]);
		snprintf(labels[i], sizeof(labels[i]), "listener=\"%s\"",
			 rq_listen_name(dm->listens[i]));
	}
#define PER_LISTENER(name, type, help, field) do { \
		rq_metrics_head(out, name, type, help); \
		for (size_t i = 0; i < dm->nlistens; i++) \
			rq_metrics_sample(out, name, labels[i], (uint64_t)(st[i].field)); \
	} while (0)
	PER_LISTENER("relayq_listen_connections_total", "counter", "SMTP connections accepted",
		     connections);
	PER_LISTENER("relayq_listen_sessions", "gauge", "SMTP sessions open", sessions);
	PER_LISTENER("relayq_listen_messages_total", "counter",
		     "messages accepted (250 after Redis stored them)", messages);
	PER_LISTENER("relayq_listen_bytes_total", "counter", "bytes of accepted messages", bytes);
	PER_LISTENER("relayq_listen_auth_ok_total", "counter", "successful AUTH", auth_ok);
	PER_LISTENER("relayq_listen_auth_failed_total", "counter", "failed AUTH", auth_failed);
	PER_LISTENER("relayq_listen_auth_pending", "gauge",
		     "AUTH password checks queued or running on the worker threads", auth_pending);
	PER_LISTENER("relayq_listen_auth_busy_total", "counter",
		     "AUTH answered 454: the password-check queue was full", auth_busy);
	PER_LISTENER("relayq_listen_tls_total", "counter", "TLS handshakes completed", tls);
	PER_LISTENER("relayq_listen_tls_failed_total", "counter", "TLS handshakes failed",
		     tls_failed);
	PER_LISTENER("relayq_listen_timeouts_total", "counter",
		     "sessions closed for inactivity or a deadline", timeouts);
	PER_LISTENER("relayq_listen_commands_total", "counter", "SMTP commands read", commands);
	PER_LISTENER("relayq_listen_bad_commands_total", "counter",
		     "SMTP commands refused (syntax, sequence, unknown, AUTH failures)",
		     bad_commands);
	PER_LISTENER("relayq_listen_redis_up", "gauge",
		     "1 when the listener's Redis connection is ready", redis_ready);
#undef PER_LISTENER
	rq_metrics_head(out, "relayq_listen_rejected_total", "counter",
			"messages and connections refused, by reason");
	for (size_t i = 0; i < dm->nlistens; i++) {
		for (int r = 0; r < RQ_LISTEN_REJ_COUNT_; r++) {
			char l[200];
			snprintf(l, sizeof(l), "%s,reason=\"%s\"", labels[i],
				 rq_listen_reject_name((enum rq_listen_reject)r));
			rq_metrics_sample(out, "relayq_listen_rejected_total", l,
					  st[i].rejected[r]);
		}
	}
}

static void fill_metrics(struct evbuffer *out, void *arg)
{
	struct daemon *dm = arg;
	struct rq_runner_stats st[RQ_CONFIG_QUEUES_MAX];
	char labels[RQ_CONFIG_QUEUES_MAX][128];
	for (size_t i = 0; i < dm->nrunners; i++) {
		rq_runner_get_stats(dm->runners[i], &st[i]);
		snprintf(labels[i], sizeof(labels[i]), "queue=\"%s\"",
			 rq_runner_queue(dm->runners[i]));
	}
#define PER_QUEUE(name, type, help, field) do { \
		rq_metrics_head(out, name, type, help); \
		for (size_t i = 0; i < dm->nrunners; i++) \
			rq_metrics_sample(out, name, labels[i], (uint64_t)(st[i].field)); \
	} while (0)
	PER_QUEUE("relayq_redis_up", "gauge", "1 when the Redis command connection is ready",
		  redis_ready);
	PER_QUEUE("relayq_claims_total", "counter", "claim calls", claims);
	PER_QUEUE("relayq_claimed_total", "counter", "messages claimed", claimed);
	PER_QUEUE("relayq_settles_total", "counter", "settle calls", settles);
	PER_QUEUE("relayq_settled_total", "counter", "messages settled", settled);
	PER_QUEUE("relayq_settle_lost_total", "counter",
		  "settles refused because the lease was no longer held", lost);
	PER_QUEUE("relayq_settle_invalid_total", "counter",
		  "outcomes Redis refused as invalid (a bug; see the logs)", invalid);
	PER_QUEUE("relayq_inflight_messages", "gauge", "messages claimed, not yet settled",
		  inflight);
	PER_QUEUE("relayq_bounces_total", "counter", "delivery status notifications queued",
		  bounces);
#undef PER_QUEUE
	static const char *const outcomes[] = {"delivered", "deferred", "failed", "expired",
					       "dropped", "held"};
	rq_metrics_head(out, "relayq_recipients_total", "counter",
			"recipient outcomes by kind");
	for (size_t i = 0; i < dm->nrunners; i++) {
		const uint64_t v[] = {st[i].delivered, st[i].deferred, st[i].failed,
				      st[i].expired, st[i].dropped, st[i].held};
		for (size_t k = 0; k < 6; k++) {
			char l[200];
			snprintf(l, sizeof(l), "%s,outcome=\"%s\"", labels[i], outcomes[k]);
			rq_metrics_sample(out, "relayq_recipients_total", l, v[k]);
		}
	}
	struct rq_dests_stats ds;
	rq_dests_stats(dm->dests, &ds);
	rq_metrics_head(out, "relayq_destinations", "gauge", "destinations known");
	rq_metrics_sample(out, "relayq_destinations", NULL, ds.dests);
	rq_metrics_head(out, "relayq_destinations_suspended", "gauge",
			"destinations suspended after connection failures");
	rq_metrics_sample(out, "relayq_destinations_suspended", NULL, ds.suspended);
	rq_metrics_head(out, "relayq_smtp_connections", "gauge", "SMTP connections open or opening");
	rq_metrics_sample(out, "relayq_smtp_connections", NULL, ds.sessions);
	rq_metrics_head(out, "relayq_smtp_connections_busy", "gauge",
			"SMTP connections running a transaction");
	rq_metrics_sample(out, "relayq_smtp_connections_busy", NULL, ds.busy);
	rq_metrics_head(out, "relayq_jobs_waiting", "gauge", "transactions waiting for a connection");
	rq_metrics_sample(out, "relayq_jobs_waiting", NULL, ds.waiting);
	rq_metrics_head(out, "relayq_smtp_connects_total", "counter", "SMTP sessions started");
	rq_metrics_sample(out, "relayq_smtp_connects_total", NULL, ds.connects);
	rq_metrics_head(out, "relayq_smtp_transactions_total", "counter", "SMTP transactions sent");
	rq_metrics_sample(out, "relayq_smtp_transactions_total", NULL, ds.txns);
	if (dm->nlistens)
		fill_listen_metrics(out, dm);
	rq_metrics_head(out, "relayq_metrics_connections", "gauge",
			"connections to this endpoint (at most 16)");
	rq_metrics_sample(out, "relayq_metrics_connections", NULL,
			  rq_metrics_connections(dm->metrics));
	rq_metrics_head(out, "relayq_metrics_accept_errors_total", "counter",
			"failed accepts on this endpoint (each pauses accepting)");
	rq_metrics_sample(out, "relayq_metrics_accept_errors_total", NULL,
			  rq_metrics_accept_errors(dm->metrics));
}

/* ---- start ---- */

static int start(struct daemon *dm)
{
	char err[512];
	const struct rq_config *cfg = dm->cfg;
	struct rq_dests_opts o = {
		.helo = cfg->helo,
		.tls = rq_tls_mode_name(cfg->tls),
		.tls_ca_file = cfg->tls_ca_file,
		.tls_verify = cfg->tls_verify,
		.auth_user = cfg->auth ? cfg->auth_user : NULL,
		.auth_password = cfg->auth ? cfg->auth_password : NULL,
		.auth_plaintext_ok = cfg->auth_allow_plaintext,
		.no_chunking = !cfg->chunking,
		.timeouts = {
			.connect = to_ms(cfg->timeouts.connect),
			.greeting = to_ms(cfg->timeouts.greeting),
			.ehlo = to_ms(cfg->timeouts.helo),
			.mail = to_ms(cfg->timeouts.mail),
			.rcpt = to_ms(cfg->timeouts.rcpt),
			.data = to_ms(cfg->timeouts.data),
			.block = to_ms(cfg->timeouts.data_block),
			.dot = to_ms(cfg->timeouts.dot),
			.quit = to_ms(cfg->timeouts.quit),
			.idle = to_ms(cfg->timeouts.idle),
		},
		.connections = cfg->connections,
		.per_destination = cfg->per_destination,
		.messages_per_connection = cfg->messages_per_connection,
		.relay_host = cfg->relay_host,
		.relay_port = cfg->relay_port,
		.relay_mx = cfg->relay_mx,
		.dns_servers = getenv("RELAYQ_DNS_SERVERS"),
	};
	const char *mxp = getenv("RELAYQ_MX_PORT");
	if (mxp && *mxp)
		o.mx_port = atoi(mxp);
	dm->dests = rq_dests_create(dm->base, &o, err, sizeof(err));
	if (!dm->dests) {
		rq_log(RQ_LOG_ERROR, "start_failed", "error", err, NULL);
		return -1;
	}
	const char *queues[RQ_CONFIG_QUEUES_MAX];
	size_t nq = 0;
	if (dm->queue) {
		queues[nq++] = dm->queue;
	} else {
		for (size_t i = 0; i < cfg->nqueues && nq < RQ_CONFIG_QUEUES_MAX; i++)
			queues[nq++] = cfg->queues[i];
		if (nq == 0)
			queues[nq++] = RQ_KEYS_QUEUE_DEFAULT;
	}
	for (size_t i = 0; i < nq; i++) {
		struct rq_runner_opts ro = {
			.redis = dm->redis,
			.queue = queues[i],
			.cfg = cfg,
			.dests = dm->dests,
			.stopped = on_runner_stopped,
			.arg = dm,
		};
		dm->runners[i] = rq_runner_create(dm->base, &ro, err, sizeof(err));
		if (!dm->runners[i]) {
			rq_log(RQ_LOG_ERROR, "start_failed", "queue", queues[i], "error", err, NULL);
			return -1;
		}
		dm->nrunners++;
	}
	for (size_t i = 0; i < cfg->nlistens; i++) {
		const struct rq_config_listen *lc = &cfg->listens[i];
		struct rq_listen_opts lo = {
			.address = lc->address,
			.trusted = (const char *const *)lc->trusted,
			.ntrusted = lc->ntrusted,
			.queue = lc->queue ? lc->queue : queues[0],
			.redis_url = dm->redis ? dm->redis : cfg->redis,
			.redis_user = cfg->redis_user,
			.redis_password_file = cfg->redis_password_file,
			.redis_password_env = cfg->redis_password_env,
			.tls_cert = lc->tls_cert,
			.tls_key = lc->tls_key,
			.implicit_tls = lc->implicit_tls,
			.auth_file = lc->auth_file,
			.auth_allow_plaintext = lc->auth_allow_plaintext,
			.max_size = (uint64_t)lc->max_size,
			.max_recipients = lc->max_recipients,
			.max_connections = lc->max_connections,
			.max_per_ip = lc->max_per_ip,
			.max_commands = lc->max_commands,
			.max_bad_commands = lc->max_bad_commands,
			.auth_threads = lc->auth_threads,
			.auth_queue_max = lc->auth_queue,
			.hostname = lc->hostname ? lc->hostname : cfg->helo,
			.add_message_id = lc->add_message_id,
			.add_date = lc->add_date,
			.meta_json = lc->meta_json,
			.timeout_ms = to_ms(lc->timeout),
			.data_timeout_ms = to_ms(lc->data_timeout),
			.enqueue_timeout_ms = to_ms(lc->redis_timeout),
		};
		dm->listens[i] = rq_listen_create(dm->base, &lo, err, sizeof(err));
		if (!dm->listens[i]) {
			rq_log(RQ_LOG_ERROR, "start_failed", "listener", lc->address, "error", err,
			       NULL);
			return -1;
		}
		dm->nlistens++;
	}
	if (cfg->metrics) {
		dm->metrics = rq_metrics_create(dm->base, cfg->metrics, fill_metrics, dm, err,
						sizeof(err));
		if (!dm->metrics) {
			rq_log(RQ_LOG_ERROR, "start_failed", "error", err, NULL);
			return -1;
		}
	}
	char relay[300] = "";
	if (cfg->relay_host)
		snprintf(relay, sizeof(relay), cfg->relay_mx ? "%s:%d" : "[%s]:%d",
			 cfg->relay_host, cfg->relay_port);
	char qlist[600] = "";
	size_t off = 0;
	for (size_t i = 0; i < nq && off < sizeof(qlist); i++)
		off += (size_t)snprintf(qlist + off, sizeof(qlist) - off, "%s%s",
					i ? "," : "", queues[i]);
	char conns[24], perd[24];
	snprintf(conns, sizeof(conns), "%d", cfg->connections);
	snprintf(perd, sizeof(perd), "%d", cfg->per_destination);
	rq_log(RQ_LOG_INFO, "start", "version", RQ_VERSION, "config", dm->path, "redis",
	       rq_runner_redis_redacted(dm->runners[0]), "queue", qlist, "mode",
	       cfg->relay_host ? "relay" : "mx", "relay", relay, "tls", rq_tls_mode_name(cfg->tls),
	       "auth", cfg->auth ? "on" : "off", "connections", conns,
	       "per_destination", perd, "metrics", cfg->metrics ? cfg->metrics : "", NULL);
	return 0;
}

static void on_log_flush(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	rq_log_flush();
}

/* The first line after a flush: write the block soon. */
static void on_log_pending(void *arg)
{
	struct daemon *dm = arg;
	if (!evtimer_pending(dm->log_flush, NULL)) {
		struct timeval tv = {0, LOG_FLUSH_MS * 1000};
		evtimer_add(dm->log_flush, &tv);
	}
}

int main(int argc, char **argv)
{
	const char *config = NULL, *redis = NULL, *queue = NULL;
	bool check = false;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if ((strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) && i + 1 < argc) {
			config = argv[++i];
		} else if (strncmp(a, "--config=", 9) == 0) {
			config = a + 9;
		} else if (strcmp(a, "--redis") == 0 && i + 1 < argc) {
			redis = argv[++i];
		} else if (strncmp(a, "--redis=", 8) == 0) {
			redis = a + 8;
		} else if (strcmp(a, "--queue") == 0 && i + 1 < argc) {
			queue = argv[++i];
		} else if (strncmp(a, "--queue=", 8) == 0) {
			queue = a + 8;
		} else if (strcmp(a, "--check") == 0) {
			check = true;
		} else if (strcmp(a, "--version") == 0) {
			printf("relayqd %s\n", RQ_VERSION);
			return 0;
		} else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
			usage(stdout);
			return 0;
		} else {
			fprintf(stderr, "relayqd: unknown or incomplete option %s\n", a);
			usage(stderr);
			return 2;
		}
	}
	if (!config) {
		fprintf(stderr, "relayqd: -c FILE is required\n");
		usage(stderr);
		return 2;
	}
	if (check)
		return rq_config_lua_check(config, stdout, stderr);
	if (queue && (!*queue || strlen(queue) > 64)) {
		fprintf(stderr, "relayqd: --queue: a name of 1 to 64 bytes\n");
		return 2;
	}

	int rc = 1;
	struct daemon dm;
	memset(&dm, 0, sizeof(dm));
	dm.path = config;
	dm.queue = queue;
	dm.redis = redis;
	if (!dm.redis) {
		const char *env = getenv("RELAYQ_REDIS");
		if (env && *env)
			dm.redis = env;
	}
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, config);
	dm.boot = dm.cfg = rq_config_lua_load(config, 0, &diag);
	if (!dm.cfg) {
		rq_config_diag_print(&diag, stderr);
		return 1;
	}
	rq_log_init((enum rq_log_level)dm.cfg->log_level,
		    (enum rq_log_format)dm.cfg->log_format, stderr);
	log_diag(&diag, "config_warning");
	signal(SIGPIPE, SIG_IGN);
	dm.base = event_base_new();
	if (!dm.base)
		goto out;
	/* Info lines are written in blocks, at most LOG_FLUSH_MS late;
	 * warnings and errors at once. */
	dm.log_flush = evtimer_new(dm.base, on_log_flush, &dm);
	if (!dm.log_flush)
		goto out;
	rq_log_set_buffered(on_log_pending, &dm);
	dm.sig_term = evsignal_new(dm.base, SIGTERM, on_stop_signal, &dm);
	dm.sig_int = evsignal_new(dm.base, SIGINT, on_stop_signal, &dm);
	dm.sig_hup = evsignal_new(dm.base, SIGHUP, on_hup, &dm);
	if (!dm.sig_term || !dm.sig_int || !dm.sig_hup ||
	    event_add(dm.sig_term, NULL) < 0 || event_add(dm.sig_int, NULL) < 0 ||
	    event_add(dm.sig_hup, NULL) < 0)
		goto out;
	if (start(&dm) < 0)
		goto out;
	event_base_dispatch(dm.base);
	rc = dm.phase == 2 ? 0 : 1;
	if (rc == 0)
		rq_log(RQ_LOG_INFO, "stopped", NULL);
out:
	rq_log_set_buffered(NULL, NULL);  /* writes what is left */
	if (dm.log_flush)
		event_free(dm.log_flush);
	rq_metrics_destroy(dm.metrics);
	for (size_t i = 0; i < dm.nlistens; i++)
		rq_listen_destroy(dm.listens[i]);
	for (size_t i = 0; i < dm.nrunners; i++)
		rq_runner_destroy(dm.runners[i]);
	rq_dests_destroy(dm.dests);
	if (dm.sig_term)
		event_free(dm.sig_term);
	if (dm.sig_int)
		event_free(dm.sig_int);
	if (dm.sig_hup)
		event_free(dm.sig_hup);
	if (dm.base)
		event_base_free(dm.base);
	if (dm.cfg != dm.boot)
		rq_config_destroy(dm.cfg);
	rq_config_destroy(dm.boot);
	return rc;
}

/* Destinations: connection pools, limits, suspension (see dest.h). */
#include "relayq/dest.h"

#include "relayq/clock.h"
#include "relayq/secret.h"
#include "relayq/str.h"
#include "relayq/dns.h"
#include "relayq/log.h"
#include "relayq/message.h"
#include "relayq/smtp.h"
#include "relayq/tls.h"

#include <ctype.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#define HOSTS_MAX 32               /* addresses tried per connection */
#define SWEEP_MS 10000             /* unused destinations are freed ... */
#define UNUSED_MS 60000            /* ... after this long */
#define CLOSE_EXTRA_MS 1000

struct sess {
	struct rq_dest *d;
	struct rq_smtp *s;
	struct rq_dest_job *job;       /* running transaction's job */
	struct rq_smtp_txn txn;
	struct rq_smtp_rcpt *srcpt;
	size_t *map;                   /* srcpt[i] is job->rcpts[map[i]] */
	size_t cap;
	bool ready;
	struct sess *next;
};

struct rq_dest {
	struct rq_dests *ds;
	char key[RQ_DEST_KEY_MAX];
	struct rq_dest_health h;
	struct rq_smtp_host *hosts;
	size_t nhosts;
	int64_t hosts_expiry;          /* ms; 0: none */
	struct rq_dns_req *req;
	struct sess *sessions;
	size_t nsess, nready;
	unsigned unready_fails;        /* sessions closed before ready, in a row */
	bool ever_ready;               /* a connection got ready (slow start) */
	struct rq_dest_job *wait_head, *wait_tail;
	size_t nwait;
	int per_destination;
	unsigned max_txns;
	int64_t last_used;
	bool starved;
	size_t done_pending;           /* jobs completed, callback not yet run */
	struct rq_dest *next;
};

struct rq_dests {
	struct event_base *base;
	struct rq_dests_opts o;
	char *helo, *ca_file, *auth_user, *auth_password, *relay_host, *dns_servers;
	enum rq_tls_mode tls;
	struct rq_tls_ctx *tls_ctx;
	struct rq_dns *dns;
	struct rq_dest *dests;
	size_t ndests;
	size_t nsess;
	struct rq_dest_job *done_head, *done_tail;
	struct event *done_ev;
	struct event *sweep_ev;
	struct event *grace_ev;
	struct event *close_ev;
	bool draining, drained_sent;
	void (*drained)(void *arg);
	void *drained_arg;
	bool closing, closed_sent;
	void (*closed)(void *arg);
	void *closed_arg;
	uint64_t connects, txns;
};

/* ------------------------------------------------------------------------
 * Pure parts
 */

int64_t rq_dest_health_failed(struct rq_dest_health *h, int64_t now,
			      bool others_alive, const struct rq_backoff *b,
			      const struct rq_policy_rand *rnd)
{
	h->failures++;
	if (h->failures < RQ_DEST_FAIL_THRESHOLD && others_alive)
		return 0;
	h->suspensions++;
	double secs = rq_policy_backoff(b, h->suspensions, rnd);
	h->suspended_for_ms = (int64_t)(secs * 1000.0);
	h->suspended_until = now + h->suspended_for_ms;
	h->failures = 0;
	return h->suspended_until;
}

bool rq_dest_health_ok(struct rq_dest_health *h)
{
	bool was = h->suspended_until != 0;
	h->failures = 0;
	h->suspensions = 0;
	h->suspended_until = 0;
	h->suspended_for_ms = 0;
	return was;
}

bool rq_dest_health_suspended(const struct rq_dest_health *h, int64_t now)
{
	return h->suspended_until != 0 && now < h->suspended_until;
}

int rq_dest_key(bool relay, const char *addr, char key[RQ_DEST_KEY_MAX])
{
	if (relay) {
		snprintf(key, RQ_DEST_KEY_MAX, "relay");
		return 0;
	}
	const char *dom = addr ? rq_addr_domain(addr) : NULL;
	if (!dom || !*dom || strlen(dom) >= RQ_DEST_KEY_MAX)
		return -1;
	size_t i = 0;
	for (; dom[i]; i++)
		key[i] = (char)tolower((unsigned char)dom[i]);
	key[i] = '\0';
	/* a trailing dot names the same domain */
	if (i > 1 && key[i - 1] == '.' && key[0] != '[')
		key[i - 1] = '\0';
	return 0;
}

/* ------------------------------------------------------------------------
 * Helpers
 */

static int64_t now_ms(const struct rq_dests *ds)
{
	if (ds->o.now_ms)
		return ds->o.now_ms(ds->o.now_arg);
	return rq_clock_wall_ms();
}

static void pump(struct rq_dest *d);
static void pump_starved(struct rq_dests *ds);

/* Queues the job's callback (from the event loop). */
static void complete(struct rq_dest_job *job)
{
	struct rq_dests *ds = job->dest->ds;
	job->dest->done_pending++;
	job->next_ = NULL;
	job->queued_ = false;
	if (ds->done_tail)
		ds->done_tail->next_ = job;
	else
		ds->done_head = job;
	ds->done_tail = job;
	event_active(ds->done_ev, EV_WRITE, 0);
}

static void mark_pending(struct rq_dest_job *job, enum rq_dest_rcpt_result r,
			 const struct rq_outcome *o)
{
	for (size_t i = 0; i < job->nrcpt; i++) {
		if (job->rcpts[i].result != RQ_DEST_RCPT_PENDING)
			continue;
		job->rcpts[i].result = r;
		if (o)
			job->rcpts[i].outcome = *o;
	}
}

static void wait_push(struct rq_dest *d, struct rq_dest_job *job, bool front)
{
	job->queued_ = true;
	if (front) {
		job->next_ = d->wait_head;
		d->wait_head = job;
		if (!d->wait_tail)
			d->wait_tail = job;
	} else {
		job->next_ = NULL;
		if (d->wait_tail)
			d->wait_tail->next_ = job;
		else
			d->wait_head = job;
		d->wait_tail = job;
	}
	d->nwait++;
}

static struct rq_dest_job *wait_pop(struct rq_dest *d)
{
	struct rq_dest_job *job = d->wait_head;
	if (!job)
		return NULL;
	d->wait_head = job->next_;
	if (!d->wait_head)
		d->wait_tail = NULL;
	job->next_ = NULL;
	job->queued_ = false;
	d->nwait--;
	return job;
}

/* Ends every waiting job with its pending recipients set to r. */
static void flush_waiting(struct rq_dest *d, enum rq_dest_rcpt_result r,
			  const struct rq_outcome *o, int64_t until)
{
	struct rq_dest_job *job;
	while ((job = wait_pop(d))) {
		mark_pending(job, r, o);
		job->until = until;
		complete(job);
	}
	d->starved = false;
}

static void sess_unlink(struct sess *x)
{
	struct rq_dest *d = x->d;
	for (struct sess **pp = &d->sessions; *pp; pp = &(*pp)->next) {
		if (*pp == x) {
			*pp = x->next;
			break;
		}
	}
	d->nsess--;
	d->ds->nsess--;
	if (x->ready)
		d->nready--;
}

static void sess_free(struct sess *x)
{
	rq_smtp_destroy(x->s);
	free(x->srcpt);
	free(x->map);
	free(x);
}

static void check_drained(struct rq_dests *ds)
{
	if (ds->draining || ds->closing)
		event_active(ds->done_ev, EV_WRITE, 0);
}

/* ------------------------------------------------------------------------
 * Sessions
 */

static void txn_done(struct rq_smtp_txn *txn, void *arg);

static void on_ready(struct rq_smtp *s, void *arg)
{
	struct sess *x = arg;
	if (!x->ready) {
		x->ready = true;
		x->d->nready++;
	}
	x->d->unready_fails = 0;
	x->d->ever_ready = true;
	if (rq_log_enabled(RQ_LOG_DEBUG))
		rq_log(RQ_LOG_DEBUG, "smtp_ready", "dest", x->d->key, "host",
		       rq_smtp_peer_addr(s), "tls", rq_smtp_tls_info(s), NULL);
	/* the destination answers: open the connections that waited */
	pump(x->d);
}

static void on_closed(struct rq_smtp *s, const struct rq_outcome *why, void *arg)
{
	struct sess *x = arg;
	struct rq_dest *d = x->d;
	struct rq_dests *ds = d->ds;
	bool was_ready = x->ready;
	if (!was_ready && why && why->fail == RQ_FAIL_LOCAL) {
		/* out of descriptors / memory here: not the destination's
		 * failure (the runner retries the message soon) */
		if (rq_log_enabled(RQ_LOG_WARN)) {
			char desc[600];
			rq_policy_describe(why, desc, sizeof(desc));
			rq_log(RQ_LOG_WARN, "local_failure", "dest", d->key, "host",
			       rq_smtp_peer_addr(s), "reason", desc, NULL);
		}
	} else if (!was_ready) {
		d->unready_fails++;
		if (rq_log_enabled(RQ_LOG_WARN)) {
			char desc[600];
			rq_policy_describe(why, desc, sizeof(desc));
			rq_log(RQ_LOG_WARN, "connect_failed", "dest", d->key, "host",
			       rq_smtp_peer_addr(s), "reason", desc, NULL);
		}
	} else if (rq_log_enabled(RQ_LOG_DEBUG)) {
		char desc[600];
		rq_policy_describe(why, desc, sizeof(desc));
		rq_log(RQ_LOG_DEBUG, "smtp_closed", "dest", d->key, "host",
		       rq_smtp_peer_addr(s), "reason", desc, NULL);
	}
	sess_unlink(x);
	struct rq_dest_job *job = x->job;
	x->job = NULL;
	sess_free(x);
	if (job) {
		/* done always comes first; keep the job anyway */
		wait_push(d, job, true);
	}
	d->last_used = now_ms(ds);
	pump(d);
	pump_starved(ds);
	check_drained(ds);
}

static struct sess *sess_open(struct rq_dest *d)
{
	struct rq_dests *ds = d->ds;
	struct rq_smtp_opts so;
	rq_smtp_opts_init(&so);
	so.helo_name = ds->helo;
	so.tls = ds->tls;
	so.tls_ctx = ds->tls_ctx;
	so.tls_verify = ds->o.tls_verify;
	so.auth_user = ds->auth_user;
	so.auth_password = ds->auth_password;
	so.auth_plaintext_ok = ds->o.auth_plaintext_ok;
	so.chunking = !ds->o.no_chunking;
	const struct rq_dests_timeouts *t = &ds->o.timeouts;
	/* each the total deadline of its stage's reply (smtp.h); block the
	 * write progress of the body */
#define SETT(f, v) do { if ((v) > 0) so.timeout.f = (v); } while (0)
	SETT(connect, t->connect);
	SETT(greeting, t->greeting);
	SETT(ehlo, t->ehlo);
	SETT(mail, t->mail);
	SETT(rcpt, t->rcpt);
	SETT(data, t->data);
	SETT(block, t->block);
	SETT(dot, t->dot);
	SETT(quit, t->quit);
#undef SETT
	so.idle_ms = t->idle > 0 ? t->idle : 1;
	so.max_txns = d->max_txns;
	so.log_id = d->key;
	struct sess *x = calloc(1, sizeof(*x));
	if (!x)
		return NULL;
	x->d = d;
	struct rq_smtp_callbacks cbs = {
		.ready = on_ready, .closed = on_closed, .arg = x,
	};
	char err[256];
	x->s = rq_smtp_create(ds->base, &so, &cbs, err, sizeof(err));
	if (!x->s) {
		rq_log(RQ_LOG_ERROR, "smtp_create_failed", "dest", d->key, "error", err, NULL);
		free(x);
		return NULL;
	}
	if (rq_smtp_connect(x->s, d->hosts, d->nhosts) < 0) {
		rq_smtp_destroy(x->s);
		free(x);
		return NULL;
	}
	x->next = d->sessions;
	d->sessions = x;
	d->nsess++;
	ds->nsess++;
	ds->connects++;
	return x;
}

/* Sends the job's pending recipients on x. 0, or -1 (job untouched). */
static int sess_start(struct sess *x, struct rq_dest_job *job)
{
	if (x->cap < job->nrcpt) {
		struct rq_smtp_rcpt *r = realloc(x->srcpt, job->nrcpt * sizeof(*r));
		if (!r)
			return -1;
		x->srcpt = r;
		size_t *m = realloc(x->map, job->nrcpt * sizeof(*m));
		if (!m)
			return -1;
		x->map = m;
		x->cap = job->nrcpt;
	}
	size_t n = 0;
	for (size_t i = 0; i < job->nrcpt; i++) {
		if (job->rcpts[i].result != RQ_DEST_RCPT_PENDING)
			continue;
		memset(&x->srcpt[n], 0, sizeof(x->srcpt[n]));
		x->srcpt[n].addr = job->rcpts[i].addr;
		x->srcpt[n].len = job->rcpts[i].len;
		x->map[n++] = i;
	}
	memset(&x->txn, 0, sizeof(x->txn));
	x->txn.from = job->from;
	x->txn.from_len = job->from_len;
	x->txn.rcpts = x->srcpt;
	x->txn.nrcpt = n;
	x->txn.body = job->body;
	x->txn.body_len = job->body_len;
	x->txn.done = txn_done;
	x->txn.arg = x;
	if (n == 0 || rq_smtp_send(x->s, &x->txn) < 0)
		return -1;
	x->job = job;
	x->d->ds->txns++;
	return 0;
}

static void txn_done(struct rq_smtp_txn *txn, void *arg)
{
	struct sess *x = arg;
	struct rq_dest *d = x->d;
	struct rq_dest_job *job = x->job;
	x->job = NULL;
	if (!job)
		return;
	bool progress = false, left = false;
	for (size_t i = 0; i < txn->nrcpt; i++) {
		struct rq_dest_rcpt *r = &job->rcpts[x->map[i]];
		switch (txn->rcpts[i].result) {
		case RQ_SMTP_RCPT_DELIVERED:
			r->result = RQ_DEST_RCPT_DELIVERED;
			r->outcome = txn->rcpts[i].outcome;
			progress = true;
			break;
		case RQ_SMTP_RCPT_FAILED:
			r->result = RQ_DEST_RCPT_FAILED;
			r->outcome = txn->rcpts[i].outcome;
			progress = true;
			break;
		case RQ_SMTP_RCPT_NOT_TRIED:
		default:
			left = true;
			break;
		}
	}
	snprintf(job->host, sizeof(job->host), "%s", rq_smtp_peer_name(x->s));
	d->last_used = now_ms(d->ds);
	if (left) {
		job->noprogress_ = progress ? 0 : job->noprogress_ + 1;
		if (job->noprogress_ >= RQ_DEST_NOPROGRESS_MAX) {
			struct rq_outcome o = txn->outcome;
			if (o.stage == RQ_STAGE_NONE && o.fail == RQ_FAIL_NONE && o.code == 0)
				rq_outcome_set(&o, RQ_STAGE_MAIL, RQ_FAIL_LOST, 0, NULL,
					       "no recipient could be tried");
			mark_pending(job, RQ_DEST_RCPT_FAILED, &o);
			complete(job);
		} else if (d->ds->draining) {
			complete(job);
		} else {
			/* the rest in a new transaction, at once */
			wait_push(d, job, true);
		}
	} else {
		complete(job);
	}
	pump(d);
	/* at the connection limit, an idle connection makes room for a
	 * destination that waits for one */
	struct rq_dests *ds = d->ds;
	if (!x->job && ds->nsess >= (size_t)ds->o.connections) {
		for (struct rq_dest *o = ds->dests; o; o = o->next) {
			if (o != d && o->starved) {
				rq_smtp_quit(x->s);
				break;
			}
		}
	}
	check_drained(ds);
}

/* Quits one idle session of another destination to make room. */
static void make_room(struct rq_dests *ds, struct rq_dest *except)
{
	for (struct rq_dest *d = ds->dests; d; d = d->next) {
		if (d == except)
			continue;
		for (struct sess *x = d->sessions; x; x = x->next) {
			if (!x->job && x->ready && rq_smtp_reusable(x->s) && !d->nwait) {
				rq_smtp_quit(x->s);
				return;
			}
		}
	}
}

static void start_lookup(struct rq_dest *d);

static void pump(struct rq_dest *d)
{
	struct rq_dests *ds = d->ds;
	if (ds->draining || !d->wait_head)
		return;
	int64_t now = now_ms(ds);
	if (rq_dest_health_suspended(&d->h, now)) {
		/* e.g. the rest of a transaction that ended after the
		 * suspension began: nothing would wake it up here */
		flush_waiting(d, RQ_DEST_RCPT_SUSPENDED, NULL, d->h.suspended_until);
		return;
	}
	while (d->wait_head) {
		struct sess *idle = NULL;
		size_t connecting = 0;
		for (struct sess *x = d->sessions; x; x = x->next) {
			if (!x->ready)
				connecting++;
			if (!idle && !x->job && rq_smtp_reusable(x->s))
				idle = x;
		}
		if (idle) {
			struct rq_dest_job *job = wait_pop(d);
			if (sess_start(idle, job) < 0) {
				wait_push(d, job, true);
				rq_smtp_quit(idle->s);
				return;
			}
			continue;
		}
		int limit = d->per_destination > 0 ? d->per_destination : ds->o.per_destination;
		if (d->nsess >= (size_t)limit)
			break;
		/* first contact and after failures: one connection attempt
		 * at a time */
		if ((!d->ever_ready || d->unready_fails > 0 || d->h.failures > 0) &&
		    connecting > 0)
			break;
		/* no more connections than jobs waiting for one */
		if (connecting >= d->nwait)
			break;
		if (ds->nsess >= (size_t)ds->o.connections) {
			d->starved = true;
			make_room(ds, d);
			break;
		}
		if (!d->nhosts || (d->hosts_expiry && now >= d->hosts_expiry)) {
			start_lookup(d);
			break;
		}
		struct sess *x = sess_open(d);
		if (!x)
			break;
		struct rq_dest_job *job = wait_pop(d);
		if (sess_start(x, job) < 0) {
			wait_push(d, job, true);
			rq_smtp_quit(x->s);
			break;
		}
	}
}

static void pump_starved(struct rq_dests *ds)
{
	for (struct rq_dest *d = ds->dests; d; d = d->next) {
		if (!d->starved)
			continue;
		if (ds->nsess >= (size_t)ds->o.connections)
			return;
		d->starved = false;
		pump(d);
	}
}

/* ------------------------------------------------------------------------
 * DNS
 */

static void lookup_done(struct rq_dns_result *res, void *arg)
{
	struct rq_dest *d = arg;
	struct rq_dests *ds = d->ds;
	d->req = NULL;
	if (res->status != RQ_DNS_OK) {
		if (rq_log_enabled(RQ_LOG_WARN)) {
			char desc[600];
			rq_policy_describe(&res->outcome, desc, sizeof(desc));
			rq_log(RQ_LOG_WARN, "dns_failed", "dest", d->key, "name", res->name,
			       "reason", desc, NULL);
		}
		for (struct rq_dest_job *j = d->wait_head; j; j = j->next_)
			snprintf(j->host, sizeof(j->host), "%s", res->name);
		flush_waiting(d, RQ_DEST_RCPT_FAILED, &res->outcome, 0);
		rq_dns_result_free(res);
		return;
	}
	int port = ds->relay_host ? ds->o.relay_port : (ds->o.mx_port ? ds->o.mx_port : 25);
	struct rq_smtp_host *hosts = calloc(HOSTS_MAX, sizeof(*hosts));
	size_t n = 0;
	for (size_t i = 0; hosts && i < res->nhosts && n < HOSTS_MAX; i++) {
		const struct rq_dns_host *h = &res->hosts[i];
		for (size_t k = 0; k < h->naddrs && n < HOSTS_MAX; k++) {
			char ip[64];
			rq_dns_addr_format(&h->addrs[k], ip, sizeof(ip));
			if (rq_smtp_host_set(&hosts[n], ip, port,
					     res->literal ? NULL : h->name) == 0)
				n++;
		}
	}
	free(d->hosts);
	d->hosts = hosts;
	d->nhosts = n;
	/* literals never expire; a TTL of 0 is good for this connection only */
	d->hosts_expiry = res->literal ? 0 : now_ms(ds) + (int64_t)(res->ttl ? res->ttl : 1) * 1000;
	rq_dns_result_free(res);
	if (!n) {
		struct rq_outcome o;
		rq_outcome_set(&o, RQ_STAGE_DNS, RQ_FAIL_DNS, 0, "4.4.3",
			       "no usable address for %s", d->key);
		flush_waiting(d, RQ_DEST_RCPT_FAILED, &o, 0);
		return;
	}
	pump(d);
}

static void start_lookup(struct rq_dest *d)
{
	struct rq_dests *ds = d->ds;
	if (d->req)
		return;
	if (ds->relay_host && !ds->o.relay_mx) {
		d->req = rq_dns_lookup_host(ds->dns, ds->relay_host, lookup_done, d);
	} else {
		/* a recipient domain in UTF-8 is looked up by its A-labels (DNS
		 * knows no other form); one libidn2 refuses fails for good */
		const char *name = ds->relay_host ? ds->relay_host : d->key;
		char alabel[RQ_ADDR_DOMAIN_MAX + 1], why[200];
		if (!ds->relay_host && rq_addr_needs_utf8(name, strlen(name))) {
			if (rq_domain_to_ascii(name, strlen(name), alabel, sizeof(alabel), why,
					       sizeof(why)) < 0) {
				struct rq_outcome o;
				rq_outcome_set(&o, RQ_STAGE_DNS, RQ_FAIL_NONE, 553, "5.1.3",
					       "invalid domain name: %s", why);
				o.synthetic = true;
				if (rq_log_enabled(RQ_LOG_WARN))
					rq_log(RQ_LOG_WARN, "dns_failed", "dest", d->key, "reason",
					       o.text, NULL);
				flush_waiting(d, RQ_DEST_RCPT_FAILED, &o, 0);
				return;
			}
			name = alabel;
		}
		d->req = rq_dns_lookup_mx(ds->dns, name, lookup_done, d);
	}
	if (!d->req) {
		struct rq_outcome o;
		rq_outcome_set(&o, RQ_STAGE_DNS, RQ_FAIL_DNS, 0, "4.4.3", "out of memory");
		flush_waiting(d, RQ_DEST_RCPT_FAILED, &o, 0);
	}
}

/* ------------------------------------------------------------------------
 * Destinations
 */

static void dest_free(struct rq_dest *d)
{
	struct sess *x = d->sessions;
	while (x) {
		struct sess *nx = x->next;
		sess_free(x);
		x = nx;
	}
	rq_dns_cancel(d->req);
	free(d->hosts);
	free(d);
}

static struct rq_dest *dest_get(struct rq_dests *ds, const char *key)
{
	for (struct rq_dest *d = ds->dests; d; d = d->next)
		if (strcmp(d->key, key) == 0)
			return d;
	struct rq_dest *d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->ds = ds;
	snprintf(d->key, sizeof(d->key), "%s", key);
	d->max_txns = (unsigned)ds->o.messages_per_connection;
	d->next = ds->dests;
	ds->dests = d;
	ds->ndests++;
	return d;
}

const char *rq_dest_name(const struct rq_dest *d)
{
	return d->key;
}

/* Suspends d until the deadline decided for for_ms: the log says for_ms,
 * the decided length, not until minus a later clock read. */
static void suspend_now(struct rq_dest *d, int64_t until, int64_t for_ms)
{
	d->h.suspended_until = until;
	d->h.suspended_for_ms = for_ms;
	/* connections still being made are dropped: no hammering */
	struct sess **pp = &d->sessions;
	while (*pp) {
		struct sess *x = *pp;
		if (x->ready) {
			pp = &x->next;
			continue;
		}
		sess_unlink(x);  /* unlinks *pp */
		struct rq_dest_job *job = x->job;
		x->job = NULL;
		sess_free(x);
		if (job) {
			job->until = until;
			mark_pending(job, RQ_DEST_RCPT_SUSPENDED, NULL);
			complete(job);
		}
	}
	flush_waiting(d, RQ_DEST_RCPT_SUSPENDED, NULL, until);
	char secs[32];
	rq_duration_format((double)for_ms / 1000.0, secs, sizeof(secs));
	rq_log(RQ_LOG_WARN, "destination_suspended", "dest", d->key, "for", secs, NULL);
	pump_starved(d->ds);
	check_drained(d->ds);
}

int64_t rq_dest_failed(struct rq_dest *d, const struct rq_backoff *b)
{
	int64_t now = now_ms(d->ds);
	if (rq_dest_health_suspended(&d->h, now))
		return d->h.suspended_until;
	int64_t until = rq_dest_health_failed(&d->h, now, d->nready > 0, b, &d->ds->o.rnd);
	if (until)
		suspend_now(d, until, d->h.suspended_for_ms);
	return until;
}

int64_t rq_dest_suspend(struct rq_dest *d, double after)
{
	int64_t for_ms = (int64_t)(after * 1000.0);
	int64_t until = now_ms(d->ds) + for_ms;
	if (until < d->h.suspended_until)
		return d->h.suspended_until;
	d->h.suspensions++;
	suspend_now(d, until, for_ms);
	return until;
}

void rq_dest_ok(struct rq_dest *d)
{
	if (rq_dest_health_ok(&d->h))
		rq_log(RQ_LOG_INFO, "destination_resumed", "dest", d->key, NULL);
	d->unready_fails = 0;
	pump(d);
}

int rq_dests_submit(struct rq_dests *ds, const char *key, struct rq_dest_job *job)
{
	if (ds->draining || ds->closing)
		return -1;
	struct rq_dest *d = dest_get(ds, key);
	if (!d)
		return -1;
	job->dest = d;
	job->host[0] = '\0';
	job->until = 0;
	job->noprogress_ = 0;
	d->last_used = now_ms(ds);
	if (rq_dest_health_suspended(&d->h, d->last_used)) {
		job->until = d->h.suspended_until;
		return 1;
	}
	for (size_t i = 0; i < job->nrcpt; i++) {
		job->rcpts[i].result = RQ_DEST_RCPT_PENDING;
		memset(&job->rcpts[i].outcome, 0, sizeof(job->rcpts[i].outcome));
	}
	if (job->per_destination > 0)
		d->per_destination = job->per_destination;
	if (job->messages_per_connection > 0)
		d->max_txns = job->messages_per_connection;
	wait_push(d, job, false);
	pump(d);
	return 0;
}

/* ------------------------------------------------------------------------
 * Event handlers, shutdown
 */

static void on_done_ev(evutil_socket_t fd, short what, void *arg)
{
	struct rq_dests *ds = arg;
	struct rq_dest_job *job;
	while ((job = ds->done_head)) {
		ds->done_head = job->next_;
		if (!ds->done_head)
			ds->done_tail = NULL;
		job->next_ = NULL;
		job->dest->done_pending--;
		job->done(job, job->arg);
	}
	if (ds->draining && !ds->drained_sent) {
		size_t busy = 0;
		for (struct rq_dest *d = ds->dests; d; d = d->next)
			for (struct sess *x = d->sessions; x; x = x->next)
				busy += x->job != NULL;
		if (busy == 0 && !ds->done_head) {
			ds->drained_sent = true;
			if (ds->grace_ev)
				event_del(ds->grace_ev);
			if (ds->drained)
				ds->drained(ds->drained_arg);
		}
	}
	if (ds->closing && !ds->closed_sent && ds->nsess == 0) {
		ds->closed_sent = true;
		event_del(ds->close_ev);
		if (ds->closed)
			ds->closed(ds->closed_arg);
	}
}

static void on_sweep(evutil_socket_t fd, short what, void *arg)
{
	struct rq_dests *ds = arg;
	int64_t now = now_ms(ds);
	struct rq_dest **pp = &ds->dests;
	while (*pp) {
		struct rq_dest *d = *pp;
		if (!d->sessions && !d->wait_head && !d->req && !d->starved && !d->done_pending &&
		    !rq_dest_health_suspended(&d->h, now) && d->h.failures == 0 &&
		    now - d->last_used > UNUSED_MS) {
			*pp = d->next;
			ds->ndests--;
			dest_free(d);
			continue;
		}
		pp = &d->next;
	}
}

static void abort_running(struct rq_dests *ds)
{
	for (struct rq_dest *d = ds->dests; d; d = d->next) {
		struct sess **pp = &d->sessions;
		while (*pp) {
			struct sess *x = *pp;
			if (!x->job) {
				pp = &x->next;
				continue;
			}
			rq_log(RQ_LOG_WARN, "transaction_aborted", "dest", d->key, "host",
			       rq_smtp_peer_addr(x->s), "reason", "shutdown grace over", NULL);
			sess_unlink(x);
			struct rq_dest_job *job = x->job;
			x->job = NULL;
			sess_free(x);
			complete(job);
		}
	}
	check_drained(ds);
}

static void on_grace(evutil_socket_t fd, short what, void *arg)
{
	abort_running(arg);
}

void rq_dests_drain(struct rq_dests *ds, int grace_ms,
		    void (*drained)(void *arg), void *arg)
{
	if (ds->draining)
		return;
	ds->draining = true;
	ds->drained = drained;
	ds->drained_arg = arg;
	for (struct rq_dest *d = ds->dests; d; d = d->next) {
		rq_dns_cancel(d->req);
		d->req = NULL;
		flush_waiting(d, RQ_DEST_RCPT_PENDING, NULL, 0);
	}
	ds->grace_ev = evtimer_new(ds->base, on_grace, ds);
	if (ds->grace_ev) {
		struct timeval tv = rq_clock_tv(grace_ms);
		evtimer_add(ds->grace_ev, &tv);
	}
	check_drained(ds);
}

void rq_dests_hurry(struct rq_dests *ds)
{
	if (ds->draining && !ds->drained_sent)
		abort_running(ds);
}

static void on_close_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct rq_dests *ds = arg;
	for (struct rq_dest *d = ds->dests; d; d = d->next) {
		while (d->sessions) {
			struct sess *x = d->sessions;
			sess_unlink(x);
			if (x->job) {
				complete(x->job);
				x->job = NULL;
			}
			sess_free(x);
		}
	}
	check_drained(ds);
}

void rq_dests_close(struct rq_dests *ds, void (*closed)(void *arg), void *arg)
{
	if (ds->closing)
		return;
	ds->closing = true;
	ds->closed = closed;
	ds->closed_arg = arg;
	for (struct rq_dest *d = ds->dests; d; d = d->next)
		for (struct sess *x = d->sessions; x; x = x->next)
			rq_smtp_quit(x->s);
	int ms = (ds->o.timeouts.quit > 0 ? ds->o.timeouts.quit : 60000) + CLOSE_EXTRA_MS;
	struct timeval tv = rq_clock_tv(ms);
	evtimer_add(ds->close_ev, &tv);
	check_drained(ds);
}

/* ------------------------------------------------------------------------
 * Create / destroy
 */

void rq_dests_destroy(struct rq_dests *ds)
{
	if (!ds)
		return;
	struct rq_dest *d = ds->dests;
	while (d) {
		struct rq_dest *nx = d->next;
		dest_free(d);
		d = nx;
	}
	if (ds->done_ev)
		event_free(ds->done_ev);
	if (ds->sweep_ev)
		event_free(ds->sweep_ev);
	if (ds->grace_ev)
		event_free(ds->grace_ev);
	if (ds->close_ev)
		event_free(ds->close_ev);
	rq_dns_destroy(ds->dns);
	rq_tls_ctx_destroy(ds->tls_ctx);
	free(ds->helo);
	free(ds->ca_file);
	free(ds->auth_user);
	rq_secret_free(ds->auth_password);
	free(ds->relay_host);
	free(ds->dns_servers);
	free(ds);
}

struct rq_dests *rq_dests_create(struct event_base *base,
				 const struct rq_dests_opts *opts,
				 char *err, size_t errlen)
{
	struct rq_dests *ds = calloc(1, sizeof(*ds));
	if (!ds) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	ds->base = base;
	ds->o = *opts;
	if (ds->o.connections < 1)
		ds->o.connections = 1;
	if (ds->o.per_destination < 1)
		ds->o.per_destination = 1;
	if (ds->o.messages_per_connection < 0)
		ds->o.messages_per_connection = 0;
	bool oom = false;
	ds->helo = rq_str_dup(opts->helo ? opts->helo : "localhost", &oom);
	ds->ca_file = rq_str_dup(opts->tls_ca_file, &oom);
	ds->auth_user = rq_str_dup(opts->auth_user, &oom);
	ds->auth_password = rq_str_dup(opts->auth_password, &oom);
	ds->relay_host = rq_str_dup(opts->relay_host, &oom);
	ds->dns_servers = rq_str_dup(opts->dns_servers, &oom);
	ds->o.helo = ds->helo;
	ds->o.tls_ca_file = ds->ca_file;
	ds->o.auth_user = ds->auth_user;
	ds->o.auth_password = ds->auth_password;
	ds->o.relay_host = ds->relay_host;
	ds->o.dns_servers = ds->dns_servers;
	ds->o.tls = NULL;
	if (oom) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	/* rq_tls_mode_parse: the four names, any case, and the aliases
	 * may / encrypt / verify */
	const char *mode = opts->tls ? opts->tls : "opportunistic";
	int tls = rq_tls_mode_parse(mode);
	if (tls < 0) {
		snprintf(err, errlen, "unknown tls mode %.40s", mode);
		goto fail;
	}
	ds->tls = (enum rq_tls_mode)tls;
	if (ds->tls != RQ_TLS_NONE) {
		struct rq_tls_ctx_opts to = {.ca_file = ds->ca_file};
		ds->tls_ctx = rq_tls_ctx_create(&to, err, errlen);
		if (!ds->tls_ctx)
			goto fail;
	}
	struct rq_dns_opts dopts = {.servers = ds->dns_servers};
	ds->dns = rq_dns_create(base, &dopts, err, errlen);
	if (!ds->dns)
		goto fail;
	ds->done_ev = event_new(base, -1, 0, on_done_ev, ds);
	ds->sweep_ev = event_new(base, -1, EV_PERSIST, on_sweep, ds);
	ds->close_ev = evtimer_new(base, on_close_timeout, ds);
	if (!ds->done_ev || !ds->sweep_ev || !ds->close_ev) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	struct timeval tv = {SWEEP_MS / 1000, 0};
	event_add(ds->sweep_ev, &tv);
	return ds;
fail:
	rq_dests_destroy(ds);
	return NULL;
}

void rq_dests_stats(const struct rq_dests *ds, struct rq_dests_stats *st)
{
	memset(st, 0, sizeof(*st));
	int64_t now = now_ms(ds);
	for (const struct rq_dest *d = ds->dests; d; d = d->next) {
		st->dests++;
		if (rq_dest_health_suspended(&d->h, now))
			st->suspended++;
		st->waiting += d->nwait;
		for (const struct sess *x = d->sessions; x; x = x->next) {
			st->sessions++;
			st->busy += x->job != NULL;
		}
	}
	st->connects = ds->connects;
	st->txns = ds->txns;
}

/* DNS: MX and address look-ups with c-ares, MX ordering, null MX (see
 * dns.h). */
#include "relayq/dns.h"

#include "relayq/clock.h"
#include "relayq/err.h"

#include <ares.h>
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <event2/event.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define DEF_TIMEOUT_MS 2000
#define DEF_TRIES 2
#define DEF_CACHE_MAX 4096
#define DEF_TTL_MAX 3600
#define DEF_NEG_TTL_MAX 60

#define DNS_CLASS_IN 1
#define DNS_T_CNAME 5
#define DNS_T_SOA 6
#define DNS_RCODE_NXDOMAIN 3

/* ------------------------------------------------------------------ */
/* Pure parts                                                          */
/* ------------------------------------------------------------------ */

int rq_dns_name_normalize(const char *name, char out[RQ_DNS_NAME_MAX + 1],
			  char *err, size_t errlen)
{
	if (!name) {
		rq_err_set(err, errlen, "no name");
		return -1;
	}
	size_t len = strnlen(name, RQ_DNS_NAME_MAX + 2);
	if (len > 0 && name[len - 1] == '.' && len <= RQ_DNS_NAME_MAX + 1)
		len--;
	if (len == 0) {
		rq_err_set(err, errlen, "empty name");
		return -1;
	}
	if (len > RQ_DNS_NAME_MAX) {
		rq_err_set(err, errlen, "name longer than %d bytes", RQ_DNS_NAME_MAX);
		return -1;
	}
	size_t label = 0;
	for (size_t i = 0; i <= len; i++) {
		unsigned char c = i < len ? (unsigned char)name[i] : '.';
		if (c == '.') {
			if (label == 0) {
				rq_err_set(err, errlen, "empty label");
				return -1;
			}
			if (name[i - 1] == '-') {
				rq_err_set(err, errlen, "label ends with a hyphen");
				return -1;
			}
			label = 0;
			continue;
		}
		if (!isalnum(c) && c != '-') {
			rq_err_set(err, errlen, "byte 0x%02x not allowed in a name", c);
			return -1;
		}
		if (c > 0x7f) {
			rq_err_set(err, errlen, "byte 0x%02x not allowed in a name", c);
			return -1;
		}
		if (label == 0 && c == '-') {
			rq_err_set(err, errlen, "label starts with a hyphen");
			return -1;
		}
		if (++label > 63) {
			rq_err_set(err, errlen, "label longer than 63 bytes");
			return -1;
		}
	}
	if (out) {
		for (size_t i = 0; i < len; i++)
			out[i] = (char)tolower((unsigned char)name[i]);
		out[len] = '\0';
	}
	return 0;
}

bool rq_dns_name_valid(const char *name)
{
	return rq_dns_name_normalize(name, NULL, NULL, 0) == 0;
}

static void set_v4(struct rq_dns_addr *a, const void *bytes)
{
	memset(a, 0, sizeof(*a));
	struct sockaddr_in *sin = (struct sockaddr_in *)&a->sa;
	sin->sin_family = AF_INET;
	memcpy(&sin->sin_addr, bytes, 4);
	a->len = sizeof(*sin);
}

static void set_v6(struct rq_dns_addr *a, const void *bytes)
{
	memset(a, 0, sizeof(*a));
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&a->sa;
	sin6->sin6_family = AF_INET6;
	memcpy(&sin6->sin6_addr, bytes, 16);
	a->len = sizeof(*sin6);
}

static int parse_ip(const char *s, int family, struct rq_dns_addr *out)
{
	unsigned char buf[16];
	if (inet_pton(family, s, buf) != 1)
		return 0;
	if (out) {
		if (family == AF_INET)
			set_v4(out, buf);
		else
			set_v6(out, buf);
	}
	return 1;
}

int rq_dns_literal_parse(const char *s, struct rq_dns_addr *out)
{
	if (!s)
		return 0;
	if (s[0] != '[') {
		if (parse_ip(s, AF_INET, out) || parse_ip(s, AF_INET6, out))
			return 1;
		return 0;
	}
	size_t len = strnlen(s, 80);
	char inner[80];
	if (len < 3 || len >= sizeof(inner) || s[len - 1] != ']')
		return -1;
	memcpy(inner, s + 1, len - 2);
	inner[len - 2] = '\0';
	if (strncasecmp(inner, "IPv6:", 5) == 0)
		return parse_ip(inner + 5, AF_INET6, out) ? 1 : -1;
	if (parse_ip(inner, AF_INET, out) || parse_ip(inner, AF_INET6, out))
		return 1;
	return -1;
}

void rq_dns_mx_order(struct rq_dns_mx *mx, size_t n, uint32_t (*rnd)(void *arg), void *arg)
{
	/* insertion sort: stable, n is small (bounded by RQ_DNS_MX_MAX) */
	for (size_t i = 1; i < n; i++) {
		struct rq_dns_mx tmp = mx[i];
		size_t j = i;
		while (j > 0 && mx[j - 1].preference > tmp.preference) {
			mx[j] = mx[j - 1];
			j--;
		}
		mx[j] = tmp;
	}
	if (!rnd)
		return;
	size_t start = 0;
	while (start < n) {
		size_t end = start + 1;
		while (end < n && mx[end].preference == mx[start].preference)
			end++;
		for (size_t k = end - 1; k > start; k--) {
			size_t r = start + (size_t)(rnd(arg) % (uint32_t)(k - start + 1));
			if (r != k) {
				struct rq_dns_mx tmp = mx[k];
				mx[k] = mx[r];
				mx[r] = tmp;
			}
		}
		start = end;
	}
}

bool rq_dns_mx_is_null(const struct rq_dns_mx *mx, size_t n)
{
	if (n == 0)
		return false;
	for (size_t i = 0; i < n; i++)
		if (mx[i].host[0] != '\0' && strcmp(mx[i].host, ".") != 0)
			return false;
	return true;
}

uint32_t rq_dns_neg_ttl(bool have_soa, uint32_t soa_ttl, uint32_t soa_minimum, uint32_t cap)
{
	if (!have_soa)
		return cap;
	uint32_t t = soa_ttl < soa_minimum ? soa_ttl : soa_minimum;
	return t < cap ? t : cap;
}

/* ------------------------------------------------------------------ */
/* Cache                                                               */
/* ------------------------------------------------------------------ */

struct centry {
	struct centry *hnext;
	struct centry *lprev, *lnext;  /* LRU: head is the most recent */
	uint64_t expires_ms;
	uint32_t hash;
	int type;
	enum rq_dns_rcode rcode;
	size_t len;
	char name[RQ_DNS_NAME_MAX + 1];
	unsigned char data[];
};

struct rq_dns_cache {
	struct centry **buckets;
	size_t nbuckets;  /* power of two */
	size_t count;
	size_t max;
	struct centry *lru_head, *lru_tail;
};

static int cache_key(const char *name, int type, char lname[RQ_DNS_NAME_MAX + 1], uint32_t *hash)
{
	size_t len = strnlen(name, RQ_DNS_NAME_MAX + 1);
	if (len > RQ_DNS_NAME_MAX)
		return -1;
	uint32_t h = 2166136261u ^ (uint32_t)type;
	for (size_t i = 0; i < len; i++) {
		lname[i] = (char)tolower((unsigned char)name[i]);
		h = (h ^ (unsigned char)lname[i]) * 16777619u;
	}
	lname[len] = '\0';
	*hash = h;
	return 0;
}

void rq_dns_cache_destroy(struct rq_dns_cache *c)
{
	if (!c)
		return;
	rq_dns_cache_flush(c);
	free(c->buckets);
	free(c);
}

struct rq_dns_cache *rq_dns_cache_create(size_t max)
{
	struct rq_dns_cache *c = calloc(1, sizeof(*c));
	if (!c)
		goto fail;
	c->max = max ? max : 1;
	c->nbuckets = 16;
	while (c->nbuckets < c->max && c->nbuckets < ((size_t)1 << 24))
		c->nbuckets <<= 1;
	c->buckets = calloc(c->nbuckets, sizeof(*c->buckets));
	if (!c->buckets)
		goto fail;
	return c;
fail:
	free(c);
	return NULL;
}

static void cache_unlink(struct rq_dns_cache *c, struct centry *e)
{
	struct centry **pp = &c->buckets[e->hash & (c->nbuckets - 1)];
	while (*pp && *pp != e)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = e->hnext;
	if (e->lprev)
		e->lprev->lnext = e->lnext;
	else
		c->lru_head = e->lnext;
	if (e->lnext)
		e->lnext->lprev = e->lprev;
	else
		c->lru_tail = e->lprev;
	c->count--;
	free(e);
}

static struct centry *cache_find(struct rq_dns_cache *c, int type, const char *lname, uint32_t hash)
{
	for (struct centry *e = c->buckets[hash & (c->nbuckets - 1)]; e; e = e->hnext)
		if (e->hash == hash && e->type == type && strcmp(e->name, lname) == 0)
			return e;
	return NULL;
}

void rq_dns_cache_flush(struct rq_dns_cache *c)
{
	if (!c)
		return;
	while (c->lru_head)
		cache_unlink(c, c->lru_head);
}

size_t rq_dns_cache_count(const struct rq_dns_cache *c)
{
	return c ? c->count : 0;
}

int rq_dns_cache_put(struct rq_dns_cache *c, int type, const char *name,
		     enum rq_dns_rcode rcode, const void *data, size_t len,
		     uint32_t ttl_s, uint64_t now_ms)
{
	char lname[RQ_DNS_NAME_MAX + 1];
	uint32_t hash;
	if (!c || !name || cache_key(name, type, lname, &hash) < 0)
		return -1;
	struct centry *old = cache_find(c, type, lname, hash);
	if (old)
		cache_unlink(c, old);
	if (ttl_s == 0)
		return 0;
	struct centry *e = malloc(sizeof(*e) + len);
	if (!e)
		return -1;
	memset(e, 0, sizeof(*e));
	e->expires_ms = now_ms + (uint64_t)ttl_s * 1000u;
	e->hash = hash;
	e->type = type;
	e->rcode = rcode;
	e->len = len;
	memcpy(e->name, lname, strlen(lname) + 1);
	if (len)
		memcpy(e->data, data, len);
	while (c->count >= c->max && c->lru_tail)
		cache_unlink(c, c->lru_tail);
	size_t b = hash & (c->nbuckets - 1);
	e->hnext = c->buckets[b];
	c->buckets[b] = e;
	e->lnext = c->lru_head;
	if (c->lru_head)
		c->lru_head->lprev = e;
	c->lru_head = e;
	if (!c->lru_tail)
		c->lru_tail = e;
	c->count++;
	return 0;
}

bool rq_dns_cache_get(struct rq_dns_cache *c, int type, const char *name, uint64_t now_ms,
		      enum rq_dns_rcode *rcode, const void **data, size_t *len,
		      uint32_t *ttl_left)
{
	char lname[RQ_DNS_NAME_MAX + 1];
	uint32_t hash;
	if (!c || !name || cache_key(name, type, lname, &hash) < 0)
		return false;
	struct centry *e = cache_find(c, type, lname, hash);
	if (!e)
		return false;
	if (e->expires_ms <= now_ms) {
		cache_unlink(c, e);
		return false;
	}
	if (e != c->lru_head) {
		/* move to the front */
		e->lprev->lnext = e->lnext;
		if (e->lnext)
			e->lnext->lprev = e->lprev;
		else
			c->lru_tail = e->lprev;
		e->lprev = NULL;
		e->lnext = c->lru_head;
		c->lru_head->lprev = e;
		c->lru_head = e;
	}
	if (rcode)
		*rcode = e->rcode;
	if (data)
		*data = e->data;
	if (len)
		*len = e->len;
	if (ttl_left)
		*ttl_left = (uint32_t)((e->expires_ms - now_ms + 999) / 1000);
	return true;
}

/* ------------------------------------------------------------------ */
/* Results                                                             */
/* ------------------------------------------------------------------ */

static size_t result_size(size_t nhosts, size_t naddrs)
{
	return sizeof(struct rq_dns_result) + nhosts * sizeof(struct rq_dns_host) +
	       naddrs * sizeof(struct rq_dns_addr);
}

static struct rq_dns_result *result_alloc(size_t nhosts, size_t naddrs)
{
	struct rq_dns_result *res = calloc(1, result_size(nhosts, naddrs));
	if (!res)
		return NULL;
	res->hosts = nhosts ? (struct rq_dns_host *)(res + 1) : NULL;
	return res;
}

static struct rq_dns_addr *result_addrs(struct rq_dns_result *res, size_t nhosts)
{
	return (struct rq_dns_addr *)((char *)(res + 1) + nhosts * sizeof(struct rq_dns_host));
}

void rq_dns_result_free(struct rq_dns_result *res)
{
	free(res);
}

struct rq_dns_result *rq_dns_result_dup(const struct rq_dns_result *res)
{
	if (!res)
		return NULL;
	size_t naddrs = 0;
	for (size_t i = 0; i < res->nhosts; i++)
		naddrs += res->hosts[i].naddrs;
	struct rq_dns_result *copy = result_alloc(res->nhosts, naddrs);
	if (!copy)
		return NULL;
	struct rq_dns_host *hosts = copy->hosts;
	*copy = *res;
	copy->hosts = hosts;
	struct rq_dns_addr *a = result_addrs(copy, res->nhosts);
	for (size_t i = 0; i < res->nhosts; i++) {
		copy->hosts[i] = res->hosts[i];
		copy->hosts[i].addrs = a;
		memcpy(a, res->hosts[i].addrs, res->hosts[i].naddrs * sizeof(*a));
		a += res->hosts[i].naddrs;
	}
	return copy;
}

const char *rq_dns_addr_format(const struct rq_dns_addr *a, char *buf, size_t len)
{
	if (!buf || len == 0)
		return buf;
	buf[0] = '\0';
	if (!a)
		return buf;
	if (a->sa.ss_family == AF_INET)
		inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->sa)->sin_addr, buf, (socklen_t)len);
	else if (a->sa.ss_family == AF_INET6)
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->sa)->sin6_addr, buf, (socklen_t)len);
	return buf;
}

/* Copies untrusted text for messages: printable ASCII only. */
static void sanitize(char *dst, size_t size, const char *src)
{
	size_t i = 0;
	for (; src && src[i] && i + 1 < size; i++) {
		unsigned char c = (unsigned char)src[i];
		dst[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
	}
	dst[i] = '\0';
}

static void set_outcome_v(struct rq_outcome *o, enum rq_fail fail, int code,
			  const char *enhanced, const char *fmt, va_list ap)
{
	memset(o, 0, sizeof(*o));
	o->stage = RQ_STAGE_DNS;
	o->fail = fail;
	o->code = code;
	o->synthetic = code != 0;
	snprintf(o->enhanced, sizeof(o->enhanced), "%s", enhanced ? enhanced : "");
	vsnprintf(o->text, sizeof(o->text), fmt, ap);
}

/* ------------------------------------------------------------------ */
/* The resolver                                                        */
/* ------------------------------------------------------------------ */

enum req_kind {
	REQ_MX = 0,
	REQ_HOST,
};

enum req_state {
	REQ_RUNNING = 0,  /* queries in flight or being started */
	REQ_DONE,         /* result ready, queued for the callback */
	REQ_CANCELLED,    /* no callback; freed when no query is in flight */
};

/* What one record set of one query turned out to be. */
enum fam_state {
	FAM_SKIP = 0,  /* not asked (family disabled) */
	FAM_PENDING,
	FAM_DATA,
	FAM_NODATA,
	FAM_NXDOMAIN,
	FAM_TEMP,
};

struct rq_dns_req;
struct hostres;

/* The argument of one c-ares query. */
struct query_ref {
	struct rq_dns_req *req;
	struct hostres *host;  /* NULL for the MX query */
	int type;
	struct query_ref *fnext;  /* next waiter on the same flight */
};

/* One DNS query in flight and the requests waiting for its answer. */
struct flight {
	struct flight *next;  /* dns->flights */
	struct rq_dns *dns;
	int type;
	char name[RQ_DNS_NAME_MAX + 1];
	struct query_ref *waiters;
};

struct famres {
	enum fam_state st;
	size_t n;
	unsigned char addr[RQ_DNS_ADDRS_MAX][16];
	uint32_t ttl;
	int ares_status;
	struct query_ref q;
};

struct hostres {
	char name[RQ_DNS_NAME_MAX + 1];
	int preference;
	struct famres fam[2];  /* 0: A, 1: AAAA */
};

struct rq_dns_req {
	struct rq_dns *dns;
	struct rq_dns_req *prev, *next;  /* dns->reqs */
	struct rq_dns_req *done_next;    /* dns->done queue */
	enum req_kind kind;
	enum req_state state;
	rq_dns_cb cb;
	void *arg;
	char name[RQ_DNS_NAME_MAX + 1];
	int pending;        /* c-ares queries in flight (+1 while starting) */
	bool all_cached;
	uint32_t ttl;       /* smallest TTL used so far */
	bool implicit_mx;
	size_t nmx;         /* MX records seen (for messages) */
	struct query_ref mxq;
	struct hostres *hosts;
	size_t nhosts;
	struct rq_dns_result *res;
};

struct watcher {
	struct watcher *next;
	ares_socket_t fd;
	struct event *ev;
};

struct rq_dns {
	struct event_base *base;
	ares_channel ch;
	bool ch_ok;
	bool lib_ok;
	struct event *timer;
	struct event *deliver;
	struct watcher *watchers;
	struct rq_dns_cache *cache;
	struct rq_dns_req *reqs;
	struct flight *flights;
	struct rq_dns_req *done_head, *done_tail;
	struct rq_dns_opts o;
	uint64_t rng;
	int depth;     /* > 0 while user callbacks run */
	bool dying;
	struct rq_dns_stats st;
};

/* Monotonic ms for the cache (clock.h). */
static uint64_t now_ms(void)
{
	return (uint64_t)rq_clock_mono_ms();
}

static uint32_t internal_rand(void *arg)
{
	struct rq_dns *dns = arg;
	/* xorshift64* */
	uint64_t x = dns->rng;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	dns->rng = x;
	return (uint32_t)((x * 0x2545F4914F6CDD1DULL) >> 32);
}

static void update_timer(struct rq_dns *dns)
{
	if (!dns->ch_ok || dns->dying)
		return;
	struct timeval tv;
	if (ares_timeout(dns->ch, NULL, &tv))
		evtimer_add(dns->timer, &tv);
	else
		evtimer_del(dns->timer);
}

static void sock_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rq_dns *dns = arg;
	ares_process_fd(dns->ch, (what & EV_READ) ? (ares_socket_t)fd : ARES_SOCKET_BAD,
			(what & EV_WRITE) ? (ares_socket_t)fd : ARES_SOCKET_BAD);
	update_timer(dns);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	struct rq_dns *dns = arg;
	ares_process_fd(dns->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
	update_timer(dns);
}

/* c-ares tells which sockets to watch (0, 0: the socket is closing). */
static void sock_state_cb(void *data, ares_socket_t fd, int readable, int writable)
{
	struct rq_dns *dns = data;
	struct watcher **pp = &dns->watchers;
	while (*pp && (*pp)->fd != fd)
		pp = &(*pp)->next;
	struct watcher *w = *pp;
	if (!readable && !writable) {
		if (w) {
			*pp = w->next;
			if (w->ev)
				event_free(w->ev);
			free(w);
		}
		return;
	}
	if (!w) {
		w = calloc(1, sizeof(*w));
		if (!w)
			return;  /* the query times out */
		w->fd = fd;
		w->next = dns->watchers;
		dns->watchers = w;
	} else if (w->ev) {
		event_free(w->ev);
		w->ev = NULL;
	}
	short ev = EV_PERSIST | (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0);
	w->ev = event_new(dns->base, fd, ev, sock_cb, dns);
	if (w->ev)
		event_add(w->ev, NULL);
}

static void req_free(struct rq_dns_req *req)
{
	struct rq_dns *dns = req->dns;
	if (req->prev)
		req->prev->next = req->next;
	else
		dns->reqs = req->next;
	if (req->next)
		req->next->prev = req->prev;
	rq_dns_result_free(req->res);
	free(req->hosts);
	free(req);
}

/* Frees a cancelled request once no c-ares query refers to it. */
static void req_maybe_free(struct rq_dns_req *req)
{
	if (req->state == REQ_CANCELLED && req->pending == 0)
		req_free(req);
}

static void req_ttl(struct rq_dns_req *req, uint32_t ttl)
{
	if (ttl < req->ttl)
		req->ttl = ttl;
}

/* Callbacks run from a zero timeout: on the next loop iteration, after
 * other ready events, never inside the current one (no starvation when
 * callbacks start lookups that are answered at once). */
static void schedule_deliver(struct rq_dns *dns)
{
	static const struct timeval zero = {0, 0};
	if (!event_pending(dns->deliver, EV_TIMEOUT, NULL))
		event_add(dns->deliver, &zero);
}

static void req_done(struct rq_dns_req *req, struct rq_dns_result *res)
{
	struct rq_dns *dns = req->dns;
	if (!res) {
		/* out of memory: the smallest answer we can give */
		res = calloc(1, sizeof(*res));
		if (!res)
			abort();
		res->status = RQ_DNS_TEMPFAIL;
		res->outcome.stage = RQ_STAGE_DNS;
		res->outcome.fail = RQ_FAIL_DNS;
		snprintf(res->outcome.enhanced, sizeof(res->outcome.enhanced), "4.3.0");
		snprintf(res->outcome.text, sizeof(res->outcome.text), "out of memory in DNS lookup");
	}
	snprintf(res->name, sizeof(res->name), "%s", req->name);
	if (res->status == RQ_DNS_TEMPFAIL)
		dns->st.tempfails++;
	else if (res->status == RQ_DNS_PERMFAIL)
		dns->st.permfails++;
	req->res = res;
	req->state = REQ_DONE;
	req->done_next = NULL;
	if (dns->done_tail)
		dns->done_tail->done_next = req;
	else
		dns->done_head = req;
	dns->done_tail = req;
	schedule_deliver(dns);
}

static void req_fail(struct rq_dns_req *req, enum rq_dns_status status, enum rq_fail fail,
		     int code, const char *enhanced, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));

static void req_fail(struct rq_dns_req *req, enum rq_dns_status status, enum rq_fail fail,
		     int code, const char *enhanced, const char *fmt, ...)
{
	struct rq_dns_result *res = result_alloc(0, 0);
	if (res) {
		res->status = status;
		if (status == RQ_DNS_PERMFAIL && req->ttl != UINT32_MAX) {
			/* a permanent answer from DNS data: as valid as that data */
			res->ttl = req->ttl;
			res->cached = req->all_cached;
		}
		va_list ap;
		va_start(ap, fmt);
		set_outcome_v(&res->outcome, fail, code, enhanced, fmt, ap);
		va_end(ap);
	}
	req_done(req, res);
}

static void deliver_cb(evutil_socket_t fd, short what, void *arg);

static void teardown(struct rq_dns *dns);

static void dns_free(struct rq_dns *dns)
{
	if (dns->deliver)
		event_free(dns->deliver);
	free(dns);
}

static void deliver_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	struct rq_dns *dns = arg;
	/* only what is queued now: callbacks that start lookups answered at
	 * once (literals, cache) must not keep the loop here */
	size_t n = 0;
	for (struct rq_dns_req *r = dns->done_head; r; r = r->done_next)
		n++;
	dns->depth++;
	for (size_t i = 0; i < n && !dns->dying && dns->done_head; i++) {
		struct rq_dns_req *req = dns->done_head;
		dns->done_head = req->done_next;
		if (!dns->done_head)
			dns->done_tail = NULL;
		struct rq_dns_result *res = req->res;
		rq_dns_cb cb = req->cb;
		void *carg = req->arg;
		req->res = NULL;
		req_free(req);
		cb(res, carg);
	}
	if (!dns->dying && dns->done_head)
		schedule_deliver(dns);
	dns->depth--;
	if (dns->dying && dns->depth == 0)
		dns_free(dns);
}

static const char *temp_reason(int status)
{
	switch (status) {
	case ARES_ETIMEOUT: return "timed out";
	case ARES_ECONNREFUSED: return "no server answered (refused, server failure or unreachable)";
	case ARES_ESERVFAIL: return "server failure (SERVFAIL)";
	case ARES_EREFUSED: return "query refused (REFUSED)";
	case ARES_EFORMERR: return "format error (FORMERR)";
	case ARES_ENOTIMP: return "not implemented (NOTIMP)";
	case ARES_EBADRESP: return "malformed answer";
	default: return ares_strerror(status);
	}
}

/* ---- answer parsing ---- */

struct rrset {
	enum rq_dns_rcode rcode;
	bool temp;          /* temporary failure: nothing else is set */
	int ares_status;
	uint32_t ttl;
	size_t n;           /* records in data */
	size_t len;
	unsigned char *data;  /* malloc'd: struct rq_dns_mx[n] or n addresses */
};

static uint16_t rd16(const unsigned char *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t rd32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Skips a (possibly compressed) name; NULL when malformed. */
static const unsigned char *skip_name(const unsigned char *p, const unsigned char *end)
{
	while (p < end) {
		unsigned char l = *p;
		if ((l & 0xc0) == 0xc0)
			return p + 2 <= end ? p + 2 : NULL;
		if (l & 0xc0)
			return NULL;
		if (l == 0)
			return p + 1;
		p += 1 + l;
	}
	return NULL;
}

static int parse_answer(const struct rq_dns *dns, int qtype, const unsigned char *abuf, int alen,
			struct rrset *out)
{
	const unsigned char *end = abuf + alen;
	size_t recsize = qtype == RQ_DNS_T_MX ? sizeof(struct rq_dns_mx)
		       : qtype == RQ_DNS_T_A ? 4 : 16;
	size_t max = qtype == RQ_DNS_T_MX ? RQ_DNS_MX_MAX : RQ_DNS_ADDRS_MAX;
	if (alen < 12)
		return -1;
	int rcode = abuf[3] & 0x0f;
	unsigned qd = rd16(abuf + 4), an = rd16(abuf + 6), ns = rd16(abuf + 8);
	const unsigned char *p = abuf + 12;
	for (unsigned i = 0; i < qd; i++) {
		p = skip_name(p, end);
		if (!p || p + 4 > end)
			return -1;
		p += 4;
	}
	out->data = calloc(max, recsize);
	if (!out->data)
		return -1;
	uint32_t ttl = UINT32_MAX, cname_ttl = UINT32_MAX;
	bool seen = false;
	for (unsigned i = 0; i < an; i++) {
		p = skip_name(p, end);
		if (!p || p + 10 > end)
			return -1;
		int type = rd16(p), cls = rd16(p + 2);
		uint32_t rttl = rd32(p + 4);
		if (rttl & 0x80000000u)
			rttl = 0;  /* RFC 2181 8 */
		size_t rdlen = rd16(p + 8);
		const unsigned char *rd = p + 10;
		if (rd + rdlen > end)
			return -1;
		p = rd + rdlen;
		if (cls != DNS_CLASS_IN)
			continue;
		if (type == DNS_T_CNAME) {
			if (rttl < cname_ttl)
				cname_ttl = rttl;
			continue;
		}
		if (type != qtype)
			continue;
		seen = true;
		if (out->n >= max)
			continue;
		if (qtype == RQ_DNS_T_A && rdlen == 4) {
			memcpy(out->data + out->n * 4, rd, 4);
		} else if (qtype == RQ_DNS_T_AAAA && rdlen == 16) {
			memcpy(out->data + out->n * 16, rd, 16);
		} else if (qtype == RQ_DNS_T_MX && rdlen >= 3) {
			struct rq_dns_mx *mx = (struct rq_dns_mx *)out->data + out->n;
			char *host = NULL;
			long enclen = 0;
			if (ares_expand_name(rd + 2, abuf, alen, &host, &enclen) != ARES_SUCCESS)
				continue;
			int ok = host[0] == '\0' ? 0 : rq_dns_name_normalize(host, mx->host, NULL, 0);
			if (host[0] == '\0')
				mx->host[0] = '\0';
			ares_free_string(host);
			if (ok < 0)
				continue;  /* an exchange we could not use: left out */
			mx->preference = rd16(rd);
		} else {
			continue;
		}
		out->n++;
		if (rttl < ttl)
			ttl = rttl;
	}
	if (seen) {
		out->rcode = RQ_DNS_R_DATA;
		if (cname_ttl < ttl)
			ttl = cname_ttl;
		if (ttl == UINT32_MAX)
			ttl = 0;
		out->ttl = ttl < dns->o.ttl_max ? ttl : dns->o.ttl_max;
		out->len = out->n * recsize;
		return 0;
	}
	/* negative: the SOA in the authority section gives the TTL */
	out->rcode = rcode == DNS_RCODE_NXDOMAIN ? RQ_DNS_R_NXDOMAIN : RQ_DNS_R_NODATA;
	bool have_soa = false;
	uint32_t soa_ttl = 0, soa_min = 0;
	for (unsigned i = 0; i < ns && !have_soa; i++) {
		p = skip_name(p, end);
		if (!p || p + 10 > end)
			break;
		int type = rd16(p);
		uint32_t rttl = rd32(p + 4);
		if (rttl & 0x80000000u)
			rttl = 0;
		size_t rdlen = rd16(p + 8);
		const unsigned char *rd = p + 10;
		if (rd + rdlen > end)
			break;
		p = rd + rdlen;
		if (type != DNS_T_SOA)
			continue;
		const unsigned char *q = skip_name(rd, rd + rdlen);
		q = q ? skip_name(q, rd + rdlen) : NULL;
		if (!q || q + 20 > rd + rdlen)
			break;
		have_soa = true;
		soa_ttl = rttl;
		soa_min = rd32(q + 16);
	}
	out->ttl = rq_dns_neg_ttl(have_soa, soa_ttl, soa_min, dns->o.neg_ttl_max);
	out->n = 0;
	out->len = 0;
	return 0;
}

/* Turns a c-ares answer into a record set (temp on any failure). */
static void answer_to_rrset(const struct rq_dns *dns, int qtype, int status,
			    const unsigned char *abuf, int alen, struct rrset *out)
{
	memset(out, 0, sizeof(*out));
	out->ares_status = status;
	if ((status == ARES_SUCCESS || status == ARES_ENODATA || status == ARES_ENOTFOUND) &&
	    abuf && alen > 0) {
		if (parse_answer(dns, qtype, abuf, alen, out) == 0)
			return;
		out->ares_status = ARES_EBADRESP;
	}
	free(out->data);
	out->data = NULL;
	out->temp = true;
}

static void start_addrs(struct rq_dns_req *req);
static void handle_mx(struct rq_dns_req *req, const struct rrset *set, bool cached);
static void handle_addr(struct rq_dns_req *req, struct hostres *h, int fi,
			const struct rrset *set, bool cached);

/* Hands a record set to one waiting query; frees a cancelled request
 * once nothing refers to it. */
static void dispatch(struct query_ref *q, const struct rrset *set)
{
	struct rq_dns_req *req = q->req;
	req->pending--;
	if (set && req->state == REQ_RUNNING) {
		if (q->type == RQ_DNS_T_MX)
			handle_mx(req, set, false);
		else
			handle_addr(req, q->host, q->type == RQ_DNS_T_A ? 0 : 1, set, false);
	}
	req_maybe_free(req);
}

static void flight_unlink(struct rq_dns *dns, struct flight *f)
{
	struct flight **pp = &dns->flights;
	while (*pp && *pp != f)
		pp = &(*pp)->next;
	if (*pp)
		*pp = f->next;
}

/* The answer to one DNS query, shared by every request waiting on it. */
static void flight_cb(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
	(void)timeouts;
	struct flight *f = arg;
	struct rq_dns *dns = f->dns;
	/* new requests for the same set from here on start a new query */
	flight_unlink(dns, f);
	struct query_ref *q = f->waiters;
	if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED) {
		while (q) {
			struct query_ref *next = q->fnext;
			dispatch(q, NULL);
			q = next;
		}
		free(f);
		return;
	}
	struct rrset set;
	answer_to_rrset(dns, f->type, status, abuf, alen, &set);
	if (!set.temp && dns->cache)
		rq_dns_cache_put(dns->cache, f->type, f->name, set.rcode, set.data, set.len,
				 set.ttl, now_ms());
	while (q) {
		struct query_ref *next = q->fnext;  /* q may be freed */
		dispatch(q, &set);
		q = next;
	}
	free(set.data);
	free(f);
}

/*
 * Asks for (type, name) on behalf of q. A query for the same set already
 * in flight is joined instead of sending another. A request waits on a
 * given flight at most once (hosts are unique within a request).
 */
static void send_query(struct rq_dns_req *req, struct query_ref *q, const char *name, int type)
{
	struct rq_dns *dns = req->dns;
	q->req = req;
	q->type = type;
	q->fnext = NULL;
	req->pending++;
	for (struct flight *f = dns->flights; f; f = f->next) {
		if (f->type == type && strcmp(f->name, name) == 0) {
			q->fnext = f->waiters;
			f->waiters = q;
			dns->st.joined++;
			return;
		}
	}
	struct flight *f = calloc(1, sizeof(*f));
	if (!f) {
		struct rrset set = {.temp = true, .ares_status = ARES_ENOMEM};
		dispatch(q, &set);
		return;
	}
	f->dns = dns;
	f->type = type;
	memcpy(f->name, name, strlen(name) + 1);
	f->waiters = q;
	f->next = dns->flights;
	dns->flights = f;
	dns->st.queries++;
	ares_query(dns->ch, name, DNS_CLASS_IN, type, flight_cb, f);
	update_timer(dns);
}

/* Looks a set up in the cache; true and set filled (data borrowed). */
static bool cache_lookup(struct rq_dns *dns, int type, const char *name, struct rrset *set)
{
	memset(set, 0, sizeof(*set));
	if (!dns->cache)
		return false;
	const void *data = NULL;
	if (!rq_dns_cache_get(dns->cache, type, name, now_ms(), &set->rcode, &data, &set->len,
			      &set->ttl))
		return false;
	size_t recsize = type == RQ_DNS_T_MX ? sizeof(struct rq_dns_mx) : type == RQ_DNS_T_A ? 4 : 16;
	set->data = (unsigned char *)data;
	set->n = set->len / recsize;
	dns->st.cache_hits++;
	return true;
}

static void start_mx(struct rq_dns_req *req)
{
	struct rrset set;
	if (cache_lookup(req->dns, RQ_DNS_T_MX, req->name, &set)) {
		handle_mx(req, &set, true);
		return;
	}
	send_query(req, &req->mxq, req->name, RQ_DNS_T_MX);
}

static void handle_mx(struct rq_dns_req *req, const struct rrset *set, bool cached)
{
	if (!cached)
		req->all_cached = false;
	if (set->temp) {
		req_fail(req, RQ_DNS_TEMPFAIL, RQ_FAIL_DNS, 0, "4.4.3",
			 "MX lookup for %s: %s", req->name, temp_reason(set->ares_status));
		return;
	}
	req_ttl(req, set->ttl);
	if (set->rcode == RQ_DNS_R_NXDOMAIN) {
		req_fail(req, RQ_DNS_PERMFAIL, RQ_FAIL_NONE, 550, "5.1.2",
			 "domain %s does not exist (NXDOMAIN)", req->name);
		return;
	}
	if (set->rcode == RQ_DNS_R_NODATA) {
		/* RFC 5321 5.1: the domain itself is the implicit MX */
		req->implicit_mx = true;
		req->hosts = calloc(1, sizeof(*req->hosts));
		if (!req->hosts) {
			req_done(req, NULL);
			return;
		}
		req->nhosts = 1;
		memcpy(req->hosts[0].name, req->name, sizeof(req->name));
		start_addrs(req);
		return;
	}
	size_t n = set->n;
	req->nmx = n;
	/* our own copy to order: the set is shared (cache, other waiters) */
	struct rq_dns_mx *mx = calloc(n ? n : 1, sizeof(*mx));
	if (!mx) {
		req_done(req, NULL);
		return;
	}
	if (n)
		memcpy(mx, set->data, n * sizeof(*mx));
	if (rq_dns_mx_is_null(mx, n)) {
		free(mx);
		req_fail(req, RQ_DNS_PERMFAIL, RQ_FAIL_NONE, 556, "5.1.10",
			 "domain %s accepts no mail (null MX, RFC 7505)", req->name);
		return;
	}
	struct rq_dns *dns = req->dns;
	rq_dns_mx_order(mx, n, dns->o.rand ? dns->o.rand : internal_rand,
			dns->o.rand ? dns->o.rand_arg : dns);
	req->hosts = calloc(n < RQ_DNS_HOSTS_MAX ? (n ? n : 1) : RQ_DNS_HOSTS_MAX, sizeof(*req->hosts));
	if (!req->hosts) {
		free(mx);
		req_done(req, NULL);
		return;
	}
	for (size_t i = 0; i < n && req->nhosts < RQ_DNS_HOSTS_MAX; i++) {
		if (mx[i].host[0] == '\0')
			continue;  /* a root exchange next to real ones: unusable */
		bool dup = false;
		for (size_t j = 0; j < req->nhosts; j++)
			if (strcmp(req->hosts[j].name, mx[i].host) == 0)
				dup = true;
		if (dup)
			continue;
		struct hostres *h = &req->hosts[req->nhosts++];
		memcpy(h->name, mx[i].host, sizeof(h->name));
		h->preference = mx[i].preference;
	}
	free(mx);
	if (req->nhosts == 0) {
		req_fail(req, RQ_DNS_TEMPFAIL, RQ_FAIL_DNS, 0, "4.4.4",
			 "no usable MX host for %s", req->name);
		return;
	}
	start_addrs(req);
}

static void finish_addrs(struct rq_dns_req *req);

static void check_addrs_done(struct rq_dns_req *req)
{
	if (req->state == REQ_RUNNING && req->pending == 0)
		finish_addrs(req);
}

static void start_addrs(struct rq_dns_req *req)
{
	struct rq_dns *dns = req->dns;
	req->pending++;  /* hold: queries may answer at once */
	for (size_t i = 0; i < req->nhosts; i++) {
		struct hostres *h = &req->hosts[i];
		for (int fi = 0; fi < 2; fi++) {
			if ((fi == 0 && dns->o.no_ipv4) || (fi == 1 && dns->o.no_ipv6))
				continue;
			int type = fi == 0 ? RQ_DNS_T_A : RQ_DNS_T_AAAA;
			struct famres *f = &h->fam[fi];
			f->st = FAM_PENDING;
			f->q.host = h;
			struct rrset set;
			if (cache_lookup(dns, type, h->name, &set))
				handle_addr(req, h, fi, &set, true);
			else
				send_query(req, &f->q, h->name, type);
		}
	}
	req->pending--;
	check_addrs_done(req);
}

static void handle_addr(struct rq_dns_req *req, struct hostres *h, int fi,
			const struct rrset *set, bool cached)
{
	struct famres *f = &h->fam[fi];
	if (!cached)
		req->all_cached = false;
	f->ares_status = set->ares_status;
	if (set->temp) {
		f->st = FAM_TEMP;
	} else {
		f->ttl = set->ttl;
		f->st = set->rcode == RQ_DNS_R_DATA ? FAM_DATA
		      : set->rcode == RQ_DNS_R_NODATA ? FAM_NODATA : FAM_NXDOMAIN;
		size_t recsize = fi == 0 ? 4 : 16;
		f->n = set->n < RQ_DNS_ADDRS_MAX ? set->n : RQ_DNS_ADDRS_MAX;
		for (size_t i = 0; i < f->n; i++)
			memcpy(f->addr[i], set->data + i * recsize, recsize);
		if (f->st == FAM_DATA && f->n == 0)
			f->st = FAM_NODATA;
	}
	check_addrs_done(req);
}

static void finish_addrs(struct rq_dns_req *req)
{
	struct rq_dns *dns = req->dns;
	size_t nh = 0, na = 0;
	bool any_temp = false;
	int temp_status = 0;
	for (size_t i = 0; i < req->nhosts; i++) {
		struct hostres *h = &req->hosts[i];
		size_t n = h->fam[0].n + h->fam[1].n;
		for (int fi = 0; fi < 2; fi++) {
			if (h->fam[fi].st == FAM_TEMP) {
				any_temp = true;
				temp_status = h->fam[fi].ares_status;
			} else if (h->fam[fi].st != FAM_SKIP) {
				req_ttl(req, h->fam[fi].ttl);
			}
		}
		if (n) {
			nh++;
			na += n;
		}
	}
	if (nh == 0) {
		if (req->kind == REQ_HOST) {
			if (any_temp)
				req_fail(req, RQ_DNS_TEMPFAIL, RQ_FAIL_DNS, 0, "4.4.3",
					 "address lookup for %s: %s", req->name,
					 temp_reason(temp_status));
			else
				req_fail(req, RQ_DNS_TEMPFAIL, RQ_FAIL_DNS, 0, "4.4.4",
					 "host %s has no address (%s)", req->name,
					 req->hosts[0].fam[0].st == FAM_NXDOMAIN ||
					 req->hosts[0].fam[1].st == FAM_NXDOMAIN ? "NXDOMAIN"
					 : "no A/AAAA records");
		} else if (any_temp) {
			req_fail(req, RQ_DNS_TEMPFAIL, RQ_FAIL_DNS, 0, "4.4.3",
				 "address lookup for the MX hosts of %s: %s", req->name,
				 temp_reason(temp_status));
		} else if (req->implicit_mx) {
			req_fail(req, RQ_DNS_PERMFAIL, RQ_FAIL_NONE, 550, "5.4.4",
				 "domain %s has no MX and no address record", req->name);
		} else {
			req_fail(req, RQ_DNS_TEMPFAIL, RQ_FAIL_DNS, 0, "4.4.4",
				 "none of the %zu MX hosts of %s has an address (first: %s)",
				 req->nhosts, req->name, req->hosts[0].name);
		}
		return;
	}
	struct rq_dns_result *res = result_alloc(nh, na);
	if (!res) {
		req_done(req, NULL);
		return;
	}
	res->status = RQ_DNS_OK;
	res->outcome.stage = RQ_STAGE_DNS;
	res->implicit_mx = req->implicit_mx;
	res->cached = req->all_cached;
	res->ttl = req->ttl == UINT32_MAX ? 0 : req->ttl;
	res->nhosts = nh;
	struct rq_dns_addr *a = result_addrs(res, nh);
	size_t k = 0;
	for (size_t i = 0; i < req->nhosts; i++) {
		struct hostres *h = &req->hosts[i];
		if (h->fam[0].n + h->fam[1].n == 0)
			continue;
		struct rq_dns_host *rh = &res->hosts[k++];
		memcpy(rh->name, h->name, sizeof(rh->name));
		rh->preference = h->preference;
		rh->addrs = a;
		for (int pass = 0; pass < 2; pass++) {
			int fi = dns->o.prefer_ipv6 ? 1 - pass : pass;
			for (size_t j = 0; j < h->fam[fi].n; j++) {
				if (fi == 0)
					set_v4(a, h->fam[fi].addr[j]);
				else
					set_v6(a, h->fam[fi].addr[j]);
				a++;
			}
		}
		rh->naddrs = (size_t)(a - rh->addrs);
	}
	req_done(req, res);
}

/* ---- public ---- */

void rq_dns_destroy(struct rq_dns *dns)
{
	if (!dns || dns->dying)
		return;
	teardown(dns);
	if (dns->depth == 0)
		dns_free(dns);
	/* else: deliver_cb frees it when the callback returns */
}

struct rq_dns *rq_dns_create(struct event_base *base, const struct rq_dns_opts *opts,
			     char *err, size_t errlen)
{
	struct rq_dns *dns = NULL;
	if (!base) {
		rq_err_set(err, errlen, "no event base");
		goto fail;
	}
	dns = calloc(1, sizeof(*dns));
	if (!dns) {
		rq_err_set(err, errlen, "out of memory");
		goto fail;
	}
	dns->base = base;
	if (opts)
		dns->o = *opts;
	dns->o.servers = NULL;  /* not kept */
	if (dns->o.timeout_ms <= 0)
		dns->o.timeout_ms = DEF_TIMEOUT_MS;
	if (dns->o.tries <= 0)
		dns->o.tries = DEF_TRIES;
	if (dns->o.cache_max == 0)
		dns->o.cache_max = DEF_CACHE_MAX;
	if (dns->o.ttl_max == 0)
		dns->o.ttl_max = DEF_TTL_MAX;
	if (dns->o.neg_ttl_max == 0)
		dns->o.neg_ttl_max = DEF_NEG_TTL_MAX;
	if (dns->o.no_ipv4 && dns->o.no_ipv6) {
		rq_err_set(err, errlen, "both IPv4 and IPv6 disabled");
		goto fail;
	}
	uint64_t seed = 0;
	if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed))
		seed = now_ms() ^ ((uint64_t)getpid() << 32);
	dns->rng = seed ? seed : 0x9e3779b97f4a7c15ULL;

	dns->timer = evtimer_new(base, timer_cb, dns);
	dns->deliver = event_new(base, -1, 0, deliver_cb, dns);
	if (!dns->timer || !dns->deliver) {
		rq_err_set(err, errlen, "out of memory");
		goto fail;
	}
	if (!dns->o.no_cache) {
		dns->cache = rq_dns_cache_create(dns->o.cache_max);
		if (!dns->cache) {
			rq_err_set(err, errlen, "out of memory");
			goto fail;
		}
	}
	int rc = ares_library_init(ARES_LIB_INIT_ALL);
	if (rc != ARES_SUCCESS) {
		rq_err_set(err, errlen, "c-ares: %s", ares_strerror(rc));
		goto fail;
	}
	dns->lib_ok = true;
	struct ares_options ao;
	memset(&ao, 0, sizeof(ao));
	ao.flags = ARES_FLAG_NOSEARCH | ARES_FLAG_NOALIASES | (dns->o.use_tcp ? ARES_FLAG_USEVC : 0);
	ao.timeout = dns->o.timeout_ms;
	ao.tries = dns->o.tries;
	ao.sock_state_cb = sock_state_cb;
	ao.sock_state_cb_data = dns;
	rc = ares_init_options(&dns->ch, &ao, ARES_OPT_FLAGS | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES |
						  ARES_OPT_SOCK_STATE_CB);
	if (rc != ARES_SUCCESS) {
		rq_err_set(err, errlen, "c-ares: %s", ares_strerror(rc));
		goto fail;
	}
	dns->ch_ok = true;
	if (opts && opts->servers && *opts->servers) {
		rc = ares_set_servers_ports_csv(dns->ch, opts->servers);
		if (rc != ARES_SUCCESS) {
			rq_err_set(err, errlen, "bad DNS server list: %s", ares_strerror(rc));
			goto fail;
		}
	}
	return dns;
fail:
	if (dns)
		teardown(dns);
	if (dns)
		dns_free(dns);
	return NULL;
}

/* Drops every request without callbacks and releases all but dns itself
 * and its deliver event. */
static void teardown(struct rq_dns *dns)
{
	dns->dying = true;
	for (struct rq_dns_req *r = dns->reqs; r; r = r->next)
		r->state = REQ_CANCELLED;
	dns->done_head = dns->done_tail = NULL;
	if (dns->ch_ok) {
		/* calls every pending query back with ARES_EDESTRUCTION */
		ares_destroy(dns->ch);
		dns->ch_ok = false;
	}
	while (dns->reqs)
		req_free(dns->reqs);
	while (dns->watchers) {
		struct watcher *w = dns->watchers;
		dns->watchers = w->next;
		if (w->ev)
			event_free(w->ev);
		free(w);
	}
	if (dns->timer) {
		event_free(dns->timer);
		dns->timer = NULL;
	}
	rq_dns_cache_destroy(dns->cache);
	dns->cache = NULL;
	if (dns->lib_ok) {
		ares_library_cleanup();
		dns->lib_ok = false;
	}
}

static struct rq_dns_req *req_new(struct rq_dns *dns, enum req_kind kind, rq_dns_cb cb, void *arg)
{
	if (!dns || dns->dying || !cb)
		return NULL;
	struct rq_dns_req *req = calloc(1, sizeof(*req));
	if (!req)
		return NULL;
	req->dns = dns;
	req->kind = kind;
	req->cb = cb;
	req->arg = arg;
	req->all_cached = true;
	req->ttl = UINT32_MAX;
	req->next = dns->reqs;
	if (dns->reqs)
		dns->reqs->prev = req;
	dns->reqs = req;
	dns->st.lookups++;
	return req;
}

/*
 * Answers req without DNS: one host with the n addresses in addrs, named
 * req->name; or, for an address literal (literal: the input), named by its
 * address, req->name the input made safe.
 */
static void answer_host(struct rq_dns_req *req, const struct rq_dns_addr *addrs, size_t n,
			const char *literal)
{
	struct rq_dns_result *res = result_alloc(1, n);
	if (!res) {
		req_done(req, NULL);
		return;
	}
	res->status = RQ_DNS_OK;
	res->outcome.stage = RQ_STAGE_DNS;
	res->literal = literal != NULL;
	res->nhosts = 1;
	res->hosts[0].addrs = result_addrs(res, 1);
	memcpy(res->hosts[0].addrs, addrs, n * sizeof(addrs[0]));
	res->hosts[0].naddrs = n;
	if (literal) {
		rq_dns_addr_format(&addrs[0], res->hosts[0].name, sizeof(res->hosts[0].name));
		sanitize(req->name, sizeof(req->name), literal);
	} else {
		memcpy(res->hosts[0].name, req->name, sizeof(res->hosts[0].name));
	}
	req_done(req, res);
}

/* Literal or invalid input: answers without DNS. true when answered. */
static bool answer_locally(struct rq_dns_req *req, const char *input)
{
	struct rq_dns_addr addr;
	int lit = rq_dns_literal_parse(input, &addr);
	if (lit == 1) {
		answer_host(req, &addr, 1, input);
		return true;
	}
	char why[96];
	if (lit < 0) {
		sanitize(req->name, sizeof(req->name), input);
		req_fail(req, RQ_DNS_PERMFAIL, RQ_FAIL_NONE, 553, "5.1.3",
			 "malformed address literal %s", req->name);
		return true;
	}
	if (rq_dns_name_normalize(input, req->name, why, sizeof(why)) < 0) {
		sanitize(req->name, sizeof(req->name), input);
		req_fail(req, RQ_DNS_PERMFAIL, RQ_FAIL_NONE, 553, "5.1.3",
			 "invalid domain name \"%.200s\": %s", req->name, why);
		return true;
	}
	return false;
}

struct rq_dns_req *rq_dns_lookup_mx(struct rq_dns *dns, const char *domain,
				    rq_dns_cb cb, void *arg)
{
	struct rq_dns_req *req = req_new(dns, REQ_MX, cb, arg);
	if (!req)
		return NULL;
	if (!answer_locally(req, domain ? domain : ""))
		start_mx(req);
	return req;
}

/*
 * A host named in the hosts file (e.g. "localhost" for a relay) is answered
 * from there, as the system resolver would; the file is local and small.
 * Only for host lookups: MX lookups always ask DNS. true when answered.
 */
static bool answer_from_hosts_file(struct rq_dns_req *req)
{
	struct rq_dns *dns = req->dns;
	struct rq_dns_addr found[16];
	size_t n = 0;
	if (!dns->ch_ok)
		return false;
	for (int pass = 0; pass < 2; pass++) {
		int fi = dns->o.prefer_ipv6 ? 1 - pass : pass;
		if ((fi == 0 && dns->o.no_ipv4) || (fi == 1 && dns->o.no_ipv6))
			continue;
		struct hostent *he = NULL;
		if (ares_gethostbyname_file(dns->ch, req->name, fi == 0 ? AF_INET : AF_INET6,
					    &he) != ARES_SUCCESS || !he)
			continue;
		for (char **a = he->h_addr_list; a && *a && n < 16; a++) {
			struct rq_dns_addr *d = &found[n];
			memset(d, 0, sizeof(*d));
			if (he->h_addrtype == AF_INET && he->h_length == 4) {
				struct sockaddr_in *sin = (struct sockaddr_in *)&d->sa;
				sin->sin_family = AF_INET;
				memcpy(&sin->sin_addr, *a, 4);
				d->len = sizeof(*sin);
				n++;
			} else if (he->h_addrtype == AF_INET6 && he->h_length == 16) {
				struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&d->sa;
				sin6->sin6_family = AF_INET6;
				memcpy(&sin6->sin6_addr, *a, 16);
				d->len = sizeof(*sin6);
				n++;
			}
		}
		ares_free_hostent(he);
	}
	if (n == 0)
		return false;
	answer_host(req, found, n, NULL);
	return true;
}

struct rq_dns_req *rq_dns_lookup_host(struct rq_dns *dns, const char *host,
				      rq_dns_cb cb, void *arg)
{
	struct rq_dns_req *req = req_new(dns, REQ_HOST, cb, arg);
	if (!req)
		return NULL;
	if (answer_locally(req, host ? host : "") || answer_from_hosts_file(req))
		return req;
	req->hosts = calloc(1, sizeof(*req->hosts));
	if (!req->hosts) {
		req_done(req, NULL);
		return req;
	}
	req->nhosts = 1;
	memcpy(req->hosts[0].name, req->name, sizeof(req->name));
	start_addrs(req);
	return req;
}

void rq_dns_cancel(struct rq_dns_req *req)
{
	if (!req)
		return;
	struct rq_dns *dns = req->dns;
	if (req->state == REQ_DONE) {
		struct rq_dns_req **pp = &dns->done_head;
		struct rq_dns_req *prev = NULL;
		while (*pp && *pp != req) {
			prev = *pp;
			pp = &(*pp)->done_next;
		}
		if (*pp)
			*pp = req->done_next;
		if (dns->done_tail == req)
			dns->done_tail = prev;
	}
	req->state = REQ_CANCELLED;
	req_maybe_free(req);
}

void rq_dns_flush(struct rq_dns *dns)
{
	if (dns)
		rq_dns_cache_flush(dns->cache);
}

void rq_dns_stats(const struct rq_dns *dns, struct rq_dns_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (!dns)
		return;
	*out = dns->st;
	for (const struct rq_dns_req *r = dns->reqs; r; r = r->next)
		if (r->state != REQ_CANCELLED)
			out->pending++;
	out->cached = rq_dns_cache_count(dns->cache);
}

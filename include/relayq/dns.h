#ifndef RELAYQ_DNS_H
#define RELAYQ_DNS_H

/*
 * Where to deliver: MX lookup (RFC 5321 5.1) and plain host lookup with
 * c-ares, driven by the caller's libevent loop (no threads, no blocking).
 *
 * A lookup ends in exactly one callback (unless cancelled), always called
 * from the event loop on a later iteration, never from inside
 * rq_dns_lookup_*() itself. The callback receives a result it owns.
 *
 * MX lookup of a domain:
 *   - MX records ordered by preference, shuffled among equal preferences;
 *     at most RQ_DNS_HOSTS_MAX hosts (the lowest preferences) are kept;
 *   - no MX records: the domain itself is the implicit MX (preference 0);
 *   - each host resolved to its A and AAAA addresses; a host without any
 *     address is left out; when no host has one, temporary failure;
 *   - null MX (RFC 7505: every MX record's exchange is ".", normally the
 *     single record "0 ."): permanent, 556 5.1.10;
 *   - NXDOMAIN: permanent, 550 5.1.2; a domain that exists with no MX and
 *     no address: permanent, 550 5.4.4; an invalid name: 553 5.1.3;
 *   - SERVFAIL, REFUSED, no answer, timeouts, malformed answers: temporary
 *     (fail RQ_FAIL_DNS, enhanced 4.4.3; 4.4.4 when no MX host resolves).
 * Permanent results are synthetic outcomes (synthetic = true, fail =
 * RQ_FAIL_NONE, stage RQ_STAGE_DNS) the policy treats like any 5xx reply.
 *
 * Address literals ("1.2.3.4", "::1", "[1.2.3.4]", "[IPv6:::1]", also
 * "[::1]") are returned as they are, without DNS.
 *
 * Concurrent requests for the same record set share one query.
 * Answers are cached for their TTL (the smallest TTL of the records used,
 * at most ttl_max), negative answers (NXDOMAIN, no data) for the SOA
 * negative TTL (RFC 2308) but at most neg_ttl_max. Temporary failures are
 * not cached. The cache holds at most cache_max record sets (LRU).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "relayq/reply.h"

struct event_base;

#define RQ_DNS_NAME_MAX 253   /* a domain name, without the trailing dot */
#define RQ_DNS_MX_MAX 64      /* MX records read from one answer */
#define RQ_DNS_HOSTS_MAX 16   /* hosts in a result */
#define RQ_DNS_ADDRS_MAX 16   /* addresses read per host and family */

/* Query types, as in DNS. */
#define RQ_DNS_T_A 1
#define RQ_DNS_T_MX 15
#define RQ_DNS_T_AAAA 28

struct rq_dns_opts {
	/* "ip[:port],..." as c-ares' ares_set_servers_ports_csv takes it
	 * ("127.0.0.1:5353", "[::1]:53"); NULL or "": /etc/resolv.conf. */
	const char *servers;
	int timeout_ms;        /* first try, doubled per round; 0: 2000 */
	int tries;             /* per server; 0: 2 */
	size_t cache_max;      /* record sets cached; 0: 4096 */
	bool no_cache;         /* no caching at all */
	uint32_t ttl_max;      /* cap on a positive TTL, s; 0: 3600 */
	uint32_t neg_ttl_max;  /* cap on a negative TTL, s; 0: 60 */
	bool use_tcp;          /* every query over TCP */
	bool no_ipv4;          /* skip A lookups */
	bool no_ipv6;          /* skip AAAA lookups */
	bool prefer_ipv6;      /* per host, IPv6 addresses before IPv4 */
	/* Random source for the MX shuffle (NULL: internal, seeded from
	 * getrandom). Returns any 32-bit value. */
	uint32_t (*rand)(void *arg);
	void *rand_arg;
};

enum rq_dns_status {
	RQ_DNS_OK = 0,    /* hosts[] has at least one host with an address */
	RQ_DNS_TEMPFAIL,  /* outcome: fail RQ_FAIL_DNS */
	RQ_DNS_PERMFAIL,  /* outcome: synthetic 5xx */
};

struct rq_dns_addr {
	struct sockaddr_storage sa;  /* AF_INET or AF_INET6, port 0 */
	socklen_t len;
};

struct rq_dns_host {
	char name[RQ_DNS_NAME_MAX + 1];  /* lower case; the literal for literals */
	int preference;                  /* MX preference; 0 otherwise */
	size_t naddrs;                   /* >= 1 */
	struct rq_dns_addr *addrs;       /* IPv4 first unless prefer_ipv6 */
};

struct rq_dns_result {
	enum rq_dns_status status;
	struct rq_outcome outcome;  /* stage DNS; for OK: code 0, fail NONE */
	char name[RQ_DNS_NAME_MAX + 1]; /* what was looked up, normalized
					   (sanitized when invalid) */
	bool implicit_mx;           /* no MX records: the domain itself */
	bool literal;               /* an address literal, no DNS */
	bool cached;                /* every record came from the cache */
	uint32_t ttl;               /* s the answer stays valid: for OK and
				       for permanent failures read from DNS
				       (NXDOMAIN, null MX, no address); 0 for
				       literals, invalid names and temporary
				       failures */
	size_t nhosts;
	struct rq_dns_host *hosts;  /* in the order to try */
};

/* Frees a result (one allocation); NULL is a no-op. */
void rq_dns_result_free(struct rq_dns_result *res);
/* A deep copy, freed with rq_dns_result_free; NULL on out of memory. */
struct rq_dns_result *rq_dns_result_dup(const struct rq_dns_result *res);
/* Writes the address as text ("127.0.0.1", "::1") into buf; returns buf. */
const char *rq_dns_addr_format(const struct rq_dns_addr *a, char *buf, size_t len);

struct rq_dns;
struct rq_dns_req;

/*
 * The end of a lookup. res is the callee's: free it with
 * rq_dns_result_free() (in the callback or later). The request handle is
 * gone once the callback runs: do not cancel it. From inside the callback
 * anything is allowed, including new lookups, cancelling other requests and
 * rq_dns_destroy().
 */
typedef void (*rq_dns_cb)(struct rq_dns_result *res, void *arg);

/*
 * A resolver on base. opts may be NULL (defaults). Returns NULL with a
 * reason in err on failure (bad server list, c-ares init).
 */
struct rq_dns *rq_dns_create(struct event_base *base, const struct rq_dns_opts *opts,
			     char *err, size_t errlen);

/*
 * Frees the resolver. Pending requests are dropped WITHOUT a callback;
 * their handles become invalid. May be called from inside a callback (the
 * memory is released when the callback returns). NULL is a no-op.
 */
void rq_dns_destroy(struct rq_dns *dns);

/*
 * Starts an MX lookup of domain (a name, optionally with a trailing dot, or
 * an address literal). cb(res, arg) runs later, exactly once, unless the
 * request is cancelled or the resolver destroyed first. Returns the
 * request handle, valid until the callback starts, or NULL (no callback
 * then) when out of memory, dns or cb is NULL, or dns is being destroyed.
 * domain is copied.
 */
struct rq_dns_req *rq_dns_lookup_mx(struct rq_dns *dns, const char *domain,
				    rq_dns_cb cb, void *arg);

/*
 * Starts an address lookup (A and AAAA) of one host, e.g. a relay host:
 * one host in the result, preference 0. Unlike MX lookups this never fails
 * permanently: a name with no address (NXDOMAIN, no data) is a temporary
 * failure (4.4.4), as it is a local configuration problem, not the
 * message's. Invalid names are permanent (553 5.1.3). Same callback rules
 * as rq_dns_lookup_mx.
 */
struct rq_dns_req *rq_dns_lookup_host(struct rq_dns *dns, const char *host,
				      rq_dns_cb cb, void *arg);

/*
 * Cancels a request: its callback will not run. Queries already sent are
 * left to finish (c-ares cannot cancel one query); their answers still
 * fill the cache. NULL is a no-op. Never pass a handle whose callback has
 * started.
 */
void rq_dns_cancel(struct rq_dns_req *req);

/* Empties the cache (e.g. on reload). */
void rq_dns_flush(struct rq_dns *dns);

struct rq_dns_stats {
	uint64_t lookups;      /* rq_dns_lookup_* calls */
	uint64_t queries;      /* DNS queries sent */
	uint64_t joined;       /* record sets that joined a query in flight */
	uint64_t cache_hits;   /* record sets answered from the cache */
	uint64_t tempfails;    /* lookups that ended in a temporary failure */
	uint64_t permfails;
	size_t pending;        /* requests not yet called back */
	size_t cached;         /* record sets in the cache */
};
void rq_dns_stats(const struct rq_dns *dns, struct rq_dns_stats *out);

/* ---- Pure parts (no I/O), exposed for tests and for config checks ---- */

/*
 * Validates a domain name (RFC 1035 / RFC 5321 "Domain"): 1..253 bytes
 * without the optional trailing dot, labels of 1..63 letters, digits and
 * hyphens, not starting or ending with a hyphen (A-labels only: convert
 * internationalized names first). Writes it in lower case without the
 * trailing dot to out (may be NULL). Returns 0, or -1 with a reason in err.
 */
int rq_dns_name_normalize(const char *name, char out[RQ_DNS_NAME_MAX + 1],
			  char *err, size_t errlen);
bool rq_dns_name_valid(const char *name);

/*
 * Parses an address literal: "1.2.3.4", an IPv6 address, "[1.2.3.4]",
 * "[IPv6:addr]" or "[addr]". Returns 1 and fills out (may be NULL) for a
 * literal, 0 when s is not a literal (a name), -1 for a malformed
 * bracketed literal.
 */
int rq_dns_literal_parse(const char *s, struct rq_dns_addr *out);

struct rq_dns_mx {
	int preference;                    /* 0..65535 */
	char host[RQ_DNS_NAME_MAX + 1];    /* "" for the root ("." exchange) */
};

/*
 * Orders MX records in place: by ascending preference, records of equal
 * preference shuffled with rnd(arg) (uniformly, Fisher-Yates). rnd NULL:
 * stable order only.
 */
void rq_dns_mx_order(struct rq_dns_mx *mx, size_t n, uint32_t (*rnd)(void *arg), void *arg);

/* True for a null MX: n >= 1 and every exchange is the root ("" or "."). */
bool rq_dns_mx_is_null(const struct rq_dns_mx *mx, size_t n);

/*
 * The time to cache a negative answer (RFC 2308 5): the smaller of the SOA
 * record's TTL and its MINIMUM field, at most cap; cap when there was no
 * SOA (have_soa false).
 */
uint32_t rq_dns_neg_ttl(bool have_soa, uint32_t soa_ttl, uint32_t soa_minimum, uint32_t cap);

/*
 * The record-set cache, with the time passed in (ms on any monotonic
 * clock). Keys are (type, name), names compared without case. A set is a
 * status (rcode below) and an opaque blob. At most max sets; inserting into
 * a full cache drops the least recently used one.
 */
enum rq_dns_rcode {
	RQ_DNS_R_DATA = 0,   /* records (blob) */
	RQ_DNS_R_NODATA,     /* the name exists, no records of the type */
	RQ_DNS_R_NXDOMAIN,   /* the name does not exist */
};

struct rq_dns_cache;
/* NULL on out of memory; max 0 is taken as 1. */
struct rq_dns_cache *rq_dns_cache_create(size_t max);
void rq_dns_cache_destroy(struct rq_dns_cache *c);
/*
 * Stores a copy of (rcode, data, len) for ttl_s seconds from now_ms,
 * replacing any set under the key. ttl_s 0 stores nothing (and removes an
 * old set). Returns 0, or -1 on out of memory.
 */
int rq_dns_cache_put(struct rq_dns_cache *c, int type, const char *name,
		     enum rq_dns_rcode rcode, const void *data, size_t len,
		     uint32_t ttl_s, uint64_t now_ms);
/*
 * Looks a set up. Returns true and fills rcode, data (valid until the next
 * put, flush or destroy), len and ttl_left (whole seconds, rounded up,
 * >= 1) when a set is there and not expired at now_ms (expires_ms > now);
 * an expired set is dropped. Output pointers may be NULL.
 */
bool rq_dns_cache_get(struct rq_dns_cache *c, int type, const char *name, uint64_t now_ms,
		      enum rq_dns_rcode *rcode, const void **data, size_t *len,
		      uint32_t *ttl_left);
void rq_dns_cache_flush(struct rq_dns_cache *c);
size_t rq_dns_cache_count(const struct rq_dns_cache *c);

#endif

/*
 * MX and host lookups against a real DNS server: Debian's dnsmasq on a
 * private loopback port, started per test binary (and per test where a test
 * stops it).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "relayq/dns.h"

struct dnsmasq {
	struct th_proc proc;
	int port;
	char servers[64];  /* "127.0.0.1:<port>" for rq_dns_opts.servers */
	char log[300];
};

static char *tmpdir;

/* The zone every test asks about (under .test, answered by dnsmasq itself). */
static const char *const zone_args[] = {
	"--mx-host=example.test,mx1.example.test,10",
	"--mx-host=example.test,mx2.example.test,20",
	"--mx-host=tcp.example.test,mx1.example.test,10",
	"--mx-host=tcp.example.test,mx2.example.test,20",
	"--host-record=mx1.example.test,127.0.0.1",
	"--host-record=mx2.example.test,127.0.0.2,::2",
	"--mx-host=eq.test,a.eq.test,10",
	"--mx-host=eq.test,b.eq.test,10",
	"--host-record=a.eq.test,127.0.0.3",
	"--host-record=b.eq.test,127.0.0.4",
	"--host-record=nomx.test,127.0.0.5,::5",
	"--mx-host=nullmx.test,.,0",
	"--mx-host=dangling.test,nohost.test,10",
	"--mx-host=partial.test,nohost.test,10",
	"--mx-host=partial.test,mx1.example.test,20",
	"--txt-record=empty.test,nothing here",
	NULL,
};

/* Starts dnsmasq on a free port with the base options, zone_args and extra
 * (NULL-ended, may be NULL). Retries on another port when one is taken. */
static void dnsmasq_start_opt(struct dnsmasq *d, const char *tag, const char *const *extra,
			      bool with_zone)
{
	for (int attempt = 0; attempt < 5; attempt++) {
		memset(d, 0, sizeof(*d));
		d->port = th_free_port();
		snprintf(d->servers, sizeof(d->servers), "127.0.0.1:%d", d->port);
		snprintf(d->log, sizeof(d->log), "%s/dnsmasq-%s-%d.log", tmpdir, tag, d->port);
		char port_arg[32];
		snprintf(port_arg, sizeof(port_arg), "--port=%d", d->port);
		const char *argv[160];
		int n = 0;
		argv[n++] = "dnsmasq";
		argv[n++] = "--keep-in-foreground";
		argv[n++] = port_arg;
		argv[n++] = "--listen-address=127.0.0.1";
		argv[n++] = "--bind-interfaces";
		argv[n++] = "--no-resolv";
		argv[n++] = "--no-hosts";
		argv[n++] = "--conf-file=/dev/null";
		argv[n++] = "--pid-file=";
		argv[n++] = "--log-facility=-";
		argv[n++] = "--log-queries";
		if (getuid() == 0)
			argv[n++] = "--user=root";  /* no privilege drop to a missing user */
		if (with_zone) {
			argv[n++] = "--local=/test/";
			argv[n++] = "--local-ttl=60";
			for (int i = 0; zone_args[i]; i++)
				argv[n++] = zone_args[i];
		}
		for (int i = 0; extra && extra[i] && n < 158; i++)
			argv[n++] = extra[i];
		argv[n] = NULL;
		if (th_spawn(&d->proc, (char *const *)argv, d->log) < 0)
			continue;
		/* dnsmasq listens on TCP and UDP together: TCP up means ready */
		if (th_wait_port(d->port, 5000) == 0 && th_alive(&d->proc))
			return;
		th_stop(&d->proc, SIGKILL);
	}
	fail_msg("dnsmasq did not start (log in %s)", d->log);
}

static void dnsmasq_start(struct dnsmasq *d, const char *tag, const char *const *extra)
{
	dnsmasq_start_opt(d, tag, extra, true);
}

static void dnsmasq_stop(struct dnsmasq *d)
{
	th_stop(&d->proc, SIGTERM);
}

/* ---- running lookups on a loop ---- */

struct waiter {
	int calls;
	struct rq_dns_result *res;
};

static void on_result(struct rq_dns_result *res, void *arg)
{
	struct waiter *w = arg;
	w->calls++;
	rq_dns_result_free(w->res);
	w->res = res;
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
}

static uint64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Runs the loop until *calls >= want or ms pass; true when reached. */
static bool run_until(struct event_base *base, const int *calls, int want, int ms)
{
	struct event *tick = event_new(base, -1, EV_PERSIST, tick_cb, NULL);
	struct timeval tv = {0, 10000};
	event_add(tick, &tv);
	uint64_t deadline = mono_ms() + (uint64_t)ms;
	while (*calls < want && mono_ms() < deadline)
		event_base_loop(base, EVLOOP_ONCE);
	event_free(tick);
	return *calls >= want;
}

struct fixture {
	struct event_base *base;
	struct rq_dns *dns;
};

static struct dnsmasq main_dns;

static struct rq_dns *make_dns(struct event_base *base, const struct rq_dns_opts *opts_in)
{
	struct rq_dns_opts o = {0};
	if (opts_in)
		o = *opts_in;
	if (!o.servers)
		o.servers = main_dns.servers;
	if (!o.timeout_ms)
		o.timeout_ms = 1000;
	char err[256] = "";
	struct rq_dns *dns = rq_dns_create(base, &o, err, sizeof(err));
	if (!dns)
		fail_msg("rq_dns_create: %s", err);
	return dns;
}

static int setup(void **state)
{
	struct fixture *f = calloc(1, sizeof(*f));
	f->base = event_base_new();
	f->dns = make_dns(f->base, NULL);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fixture *f = *state;
	rq_dns_destroy(f->dns);
	event_base_free(f->base);
	free(f);
	return 0;
}

/* One lookup to its end; the result is the caller's. */
static struct rq_dns_result *lookup(struct event_base *base, struct rq_dns *dns, const char *name,
				    bool mx)
{
	struct waiter w = {0};
	struct rq_dns_req *req = mx ? rq_dns_lookup_mx(dns, name, on_result, &w)
				    : rq_dns_lookup_host(dns, name, on_result, &w);
	assert_non_null(req);
	/* never called back from inside the lookup call */
	assert_int_equal(w.calls, 0);
	if (!run_until(base, &w.calls, 1, 20000))
		fail_msg("no answer for %s", name);
	assert_int_equal(w.calls, 1);
	return w.res;
}

static const char *addr_text(const struct rq_dns_host *h, size_t i, char *buf, size_t len)
{
	assert_true(i < h->naddrs);
	return rq_dns_addr_format(&h->addrs[i], buf, len);
}

/* ---- tests ---- */

static void two_mx_by_preference(void **state)
{
	struct fixture *f = *state;
	char buf[64];
	struct rq_dns_result *r = lookup(f->base, f->dns, "Example.TEST.", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_string_equal(r->name, "example.test");
	assert_false(r->implicit_mx);
	assert_false(r->literal);
	assert_false(r->cached);
	assert_true(r->ttl > 0 && r->ttl <= 60);
	assert_int_equal(r->nhosts, 2);
	assert_string_equal(r->hosts[0].name, "mx1.example.test");
	assert_int_equal(r->hosts[0].preference, 10);
	assert_int_equal(r->hosts[0].naddrs, 1);
	assert_string_equal(addr_text(&r->hosts[0], 0, buf, sizeof(buf)), "127.0.0.1");
	assert_int_equal(r->hosts[0].addrs[0].sa.ss_family, AF_INET);
	assert_int_equal(r->hosts[0].addrs[0].len, sizeof(struct sockaddr_in));
	assert_string_equal(r->hosts[1].name, "mx2.example.test");
	assert_int_equal(r->hosts[1].preference, 20);
	assert_int_equal(r->hosts[1].naddrs, 2);
	/* IPv4 first by default */
	assert_string_equal(addr_text(&r->hosts[1], 0, buf, sizeof(buf)), "127.0.0.2");
	assert_string_equal(addr_text(&r->hosts[1], 1, buf, sizeof(buf)), "::2");
	assert_int_equal(r->hosts[1].addrs[1].len, sizeof(struct sockaddr_in6));
	rq_dns_result_free(r);

	/* the second time it comes from the cache, same answer */
	r = lookup(f->base, f->dns, "example.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_true(r->cached);
	assert_int_equal(r->nhosts, 2);
	assert_string_equal(r->hosts[0].name, "mx1.example.test");
	rq_dns_result_free(r);
	struct rq_dns_stats st;
	rq_dns_stats(f->dns, &st);
	assert_int_equal(st.lookups, 2);
	assert_int_equal(st.queries, 5);     /* MX, 2 x (A, AAAA) */
	assert_int_equal(st.cache_hits, 5);
	assert_int_equal(st.pending, 0);
}

static void equal_preferences_both_orders(void **state)
{
	struct fixture *f = *state;
	bool seen_ab = false, seen_ba = false;
	for (int i = 0; i < 64 && !(seen_ab && seen_ba); i++) {
		struct rq_dns_result *r = lookup(f->base, f->dns, "eq.test", true);
		assert_int_equal(r->status, RQ_DNS_OK);
		assert_int_equal(r->nhosts, 2);
		assert_int_equal(r->hosts[0].preference, 10);
		assert_int_equal(r->hosts[1].preference, 10);
		if (strcmp(r->hosts[0].name, "a.eq.test") == 0) {
			assert_string_equal(r->hosts[1].name, "b.eq.test");
			seen_ab = true;
		} else {
			assert_string_equal(r->hosts[0].name, "b.eq.test");
			assert_string_equal(r->hosts[1].name, "a.eq.test");
			seen_ba = true;
		}
		rq_dns_result_free(r);
	}
	assert_true(seen_ab);
	assert_true(seen_ba);
}

static void no_mx_uses_the_domain_address(void **state)
{
	struct fixture *f = *state;
	char buf[64];
	struct rq_dns_result *r = lookup(f->base, f->dns, "nomx.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_true(r->implicit_mx);
	assert_int_equal(r->nhosts, 1);
	assert_string_equal(r->hosts[0].name, "nomx.test");
	assert_int_equal(r->hosts[0].preference, 0);
	assert_int_equal(r->hosts[0].naddrs, 2);
	assert_string_equal(addr_text(&r->hosts[0], 0, buf, sizeof(buf)), "127.0.0.5");
	assert_string_equal(addr_text(&r->hosts[0], 1, buf, sizeof(buf)), "::5");
	rq_dns_result_free(r);

	/* a name that exists with neither MX nor address: permanent */
	r = lookup(f->base, f->dns, "empty.test", true);
	assert_int_equal(r->status, RQ_DNS_PERMFAIL);
	assert_int_equal(r->outcome.code, 550);
	assert_string_equal(r->outcome.enhanced, "5.4.4");
	assert_true(r->outcome.synthetic);
	rq_dns_result_free(r);
}

static void null_mx_is_permanent(void **state)
{
	struct fixture *f = *state;
	struct rq_dns_result *r = lookup(f->base, f->dns, "nullmx.test", true);
	assert_int_equal(r->status, RQ_DNS_PERMFAIL);
	assert_int_equal(r->nhosts, 0);
	assert_int_equal(r->outcome.stage, RQ_STAGE_DNS);
	assert_int_equal(r->outcome.fail, RQ_FAIL_NONE);
	assert_int_equal(r->outcome.code, 556);
	assert_string_equal(r->outcome.enhanced, "5.1.10");
	assert_true(r->outcome.synthetic);
	assert_non_null(strstr(r->outcome.text, "null MX"));
	rq_dns_result_free(r);
}

static void nxdomain_is_permanent(void **state)
{
	struct fixture *f = *state;
	struct rq_dns_result *r = lookup(f->base, f->dns, "no-such-domain.test", true);
	assert_int_equal(r->status, RQ_DNS_PERMFAIL);
	assert_int_equal(r->outcome.stage, RQ_STAGE_DNS);
	assert_int_equal(r->outcome.code, 550);
	assert_string_equal(r->outcome.enhanced, "5.1.2");
	assert_true(r->outcome.synthetic);
	assert_non_null(strstr(r->outcome.text, "NXDOMAIN"));
	rq_dns_result_free(r);
}

static void mx_host_without_address(void **state)
{
	struct fixture *f = *state;
	/* the only MX host does not resolve: temporary */
	struct rq_dns_result *r = lookup(f->base, f->dns, "dangling.test", true);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	assert_int_equal(r->outcome.stage, RQ_STAGE_DNS);
	assert_int_equal(r->outcome.fail, RQ_FAIL_DNS);
	assert_int_equal(r->outcome.code, 0);
	assert_false(r->outcome.synthetic);
	assert_string_equal(r->outcome.enhanced, "4.4.4");
	rq_dns_result_free(r);

	/* one of two does not resolve: it is skipped */
	r = lookup(f->base, f->dns, "partial.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->nhosts, 1);
	assert_string_equal(r->hosts[0].name, "mx1.example.test");
	assert_int_equal(r->hosts[0].preference, 20);
	rq_dns_result_free(r);
}

/* REFUSED: dnsmasq has no upstream for names outside .test. */
static void refused_is_temporary(void **state)
{
	struct fixture *f = *state;
	struct rq_dns_result *r = lookup(f->base, f->dns, "example.org", true);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	assert_int_equal(r->outcome.fail, RQ_FAIL_DNS);
	assert_int_equal(r->outcome.stage, RQ_STAGE_DNS);
	assert_string_equal(r->outcome.enhanced, "4.4.3");
	rq_dns_result_free(r);
	/* temporary failures are not cached */
	struct rq_dns_stats st;
	rq_dns_stats(f->dns, &st);
	r = lookup(f->base, f->dns, "example.org", true);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	assert_false(r->cached);
	struct rq_dns_stats st2;
	rq_dns_stats(f->dns, &st2);
	assert_int_equal(st2.queries, st.queries + 1);
	assert_int_equal(st2.tempfails, st.tempfails + 1);
	rq_dns_result_free(r);
}

/*
 * SERVFAIL: a second dnsmasq serves fail.test unsigned, the first forwards
 * fail.test to it while holding a (made-up) DNSSEC trust anchor for
 * fail.test, so validation fails and it answers SERVFAIL.
 */
static void servfail_is_temporary(void **state)
{
	(void)state;
	struct dnsmasq upstream, front;
	const char *up_args[] = {"--mx-host=x.fail.test,mx.fail.test,10", NULL};
	dnsmasq_start(&upstream, "upstream", up_args);
	char server_arg[64];
	snprintf(server_arg, sizeof(server_arg), "--server=/fail.test/127.0.0.1#%d", upstream.port);
	const char *front_args[] = {
		"--dnssec",
		"--trust-anchor=.,20326,8,2,E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D",
		"--trust-anchor=fail.test,1,8,2,0000000000000000000000000000000000000000000000000000000000000000",
		server_arg,
		NULL,
	};
	dnsmasq_start(&front, "front", front_args);

	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.servers = upstream.servers};
	struct rq_dns *dns = make_dns(base, &o);
	/* the upstream alone answers: the zone is fine */
	struct rq_dns_result *r = lookup(base, dns, "x.fail.test", true);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);  /* mx.fail.test has no address */
	assert_string_equal(r->outcome.enhanced, "4.4.4");
	rq_dns_result_free(r);
	rq_dns_destroy(dns);

	o.servers = front.servers;
	dns = make_dns(base, &o);
	r = lookup(base, dns, "x.fail.test", true);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	assert_int_equal(r->outcome.fail, RQ_FAIL_DNS);
	assert_string_equal(r->outcome.enhanced, "4.4.3");
	assert_non_null(strstr(r->outcome.text, "x.fail.test"));
	rq_dns_result_free(r);
	rq_dns_destroy(dns);
	event_base_free(base);

	char *log = th_read_file(front.log, NULL);
	assert_non_null(log);
	assert_non_null(strstr(log, "BOGUS"));  /* it did answer SERVFAIL */
	free(log);
	dnsmasq_stop(&front);
	dnsmasq_stop(&upstream);
}

/* A UDP port where nothing answers. */
static int blackhole(int *port)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	*port = ntohs(a.sin_port);
	return fd;
}

static void timeout_is_temporary(void **state)
{
	(void)state;
	int port;
	int fd = blackhole(&port);
	char servers[64];
	snprintf(servers, sizeof(servers), "127.0.0.1:%d", port);
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.servers = servers, .timeout_ms = 200, .tries = 1};
	struct rq_dns *dns = make_dns(base, &o);
	struct rq_dns_result *r = lookup(base, dns, "example.test", true);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	assert_int_equal(r->outcome.fail, RQ_FAIL_DNS);
	assert_string_equal(r->outcome.enhanced, "4.4.3");
	assert_non_null(strstr(r->outcome.text, "timed out"));
	rq_dns_result_free(r);
	/* a relay host lookup times out the same way */
	r = lookup(base, dns, "relay.example.test", false);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	assert_non_null(strstr(r->outcome.text, "timed out"));
	rq_dns_result_free(r);
	rq_dns_destroy(dns);
	event_base_free(base);
	close(fd);
}

/* True when the log has "dnsmasq[<pid>]: <what>" from a pid other than
 * the main process: dnsmasq answers each TCP connection in a child. */
static bool logged_by_child(const struct dnsmasq *d, const char *what)
{
	char *log = th_read_file(d->log, NULL);
	bool found = false;
	for (char *p = log; p && (p = strstr(p, "dnsmasq[")) != NULL; p++) {
		long pid = strtol(p + 8, NULL, 10);
		char *end = strchr(p, '\n');
		char *hit = strstr(p, what);
		if (pid != d->proc.pid && hit && (!end || hit < end))
			found = true;
	}
	free(log);
	return found;
}

static void over_tcp(void **state)
{
	(void)state;
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.use_tcp = true};
	struct rq_dns *dns = make_dns(base, &o);
	assert_false(logged_by_child(&main_dns, "query[MX] tcp.example.test"));
	struct rq_dns_result *r = lookup(base, dns, "tcp.example.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->nhosts, 2);
	assert_string_equal(r->hosts[0].name, "mx1.example.test");
	assert_int_equal(r->hosts[1].naddrs, 2);
	rq_dns_result_free(r);
	assert_true(logged_by_child(&main_dns, "query[MX] tcp.example.test"));
	rq_dns_destroy(dns);
	event_base_free(base);
}

static void host_lookups_and_literals(void **state)
{
	struct fixture *f = *state;
	char buf[64];
	struct rq_dns_result *r = lookup(f->base, f->dns, "MX2.example.test", false);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_false(r->implicit_mx);
	assert_int_equal(r->nhosts, 1);
	assert_string_equal(r->hosts[0].name, "mx2.example.test");
	assert_int_equal(r->hosts[0].naddrs, 2);
	rq_dns_result_free(r);

	/* a relay host that does not exist: temporary, not the message's fault */
	r = lookup(f->base, f->dns, "nohost.test", false);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	assert_int_equal(r->outcome.fail, RQ_FAIL_DNS);
	assert_string_equal(r->outcome.enhanced, "4.4.4");
	rq_dns_result_free(r);

	struct rq_dns_stats before, after;
	rq_dns_stats(f->dns, &before);
	const char *lits[] = {"[127.0.0.9]", "[IPv6:::1]", "127.0.0.9", NULL};
	const char *want[] = {"127.0.0.9", "::1", "127.0.0.9"};
	for (int i = 0; lits[i]; i++) {
		for (int mx = 0; mx < 2; mx++) {
			r = lookup(f->base, f->dns, lits[i], mx);
			assert_int_equal(r->status, RQ_DNS_OK);
			assert_true(r->literal);
			assert_int_equal(r->nhosts, 1);
			assert_int_equal(r->hosts[0].naddrs, 1);
			assert_string_equal(addr_text(&r->hosts[0], 0, buf, sizeof(buf)), want[i]);
			rq_dns_result_free(r);
		}
	}
	rq_dns_stats(f->dns, &after);
	assert_int_equal(after.queries, before.queries);  /* no DNS for literals */

	/* invalid names never reach the wire */
	const char *bad[] = {"bad..test", "x.test\r\nQUIT", "[1.2.3]", "-x.test", "", NULL};
	for (int i = 0; bad[i]; i++) {
		r = lookup(f->base, f->dns, bad[i], i % 2 == 0);
		assert_int_equal(r->status, RQ_DNS_PERMFAIL);
		assert_int_equal(r->outcome.code, 553);
		assert_string_equal(r->outcome.enhanced, "5.1.3");
		assert_null(strchr(r->outcome.text, '\r'));
		assert_null(strchr(r->outcome.text, '\n'));
		rq_dns_result_free(r);
	}
	rq_dns_stats(f->dns, &after);
	assert_int_equal(after.queries, before.queries);

	/* a relay host in the hosts file ("localhost", as Debian's /etc/hosts
	 * has it) is answered from there, without DNS; an MX lookup of the same
	 * name still asks DNS */
	r = lookup(f->base, f->dns, "localhost", false);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->nhosts, 1);
	assert_true(r->hosts[0].naddrs >= 1);
	bool loopback = false;
	for (size_t k = 0; k < r->hosts[0].naddrs; k++) {
		addr_text(&r->hosts[0], k, buf, sizeof(buf));
		loopback = loopback || strcmp(buf, "127.0.0.1") == 0 || strcmp(buf, "::1") == 0;
	}
	assert_true(loopback);
	rq_dns_result_free(r);
	rq_dns_stats(f->dns, &after);
	assert_int_equal(after.queries, before.queries);
}

static void family_options(void **state)
{
	(void)state;
	char buf[64];
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.prefer_ipv6 = true};
	struct rq_dns *dns = make_dns(base, &o);
	struct rq_dns_result *r = lookup(base, dns, "nomx.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->hosts[0].naddrs, 2);
	assert_string_equal(addr_text(&r->hosts[0], 0, buf, sizeof(buf)), "::5");
	rq_dns_result_free(r);
	rq_dns_destroy(dns);

	struct rq_dns_opts o4 = {.no_ipv6 = true};
	dns = make_dns(base, &o4);
	r = lookup(base, dns, "example.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->hosts[1].naddrs, 1);
	assert_string_equal(addr_text(&r->hosts[1], 0, buf, sizeof(buf)), "127.0.0.2");
	rq_dns_result_free(r);
	rq_dns_destroy(dns);
	event_base_free(base);
}

/*
 * TTLs from an authoritative zone (dnsmasq --auth-zone, TTL 7 s, SOA in
 * negative answers): a positive answer lasts the smallest record TTL, a
 * negative one min(SOA TTL, SOA MINIMUM) capped by neg_ttl_max.
 */
static void ttls_from_an_authoritative_zone(void **state)
{
	(void)state;
	struct dnsmasq d;
	const char *args[] = {
		"--auth-server=ns.auth.test,127.0.0.1",
		"--auth-zone=auth.test",
		"--auth-ttl=7",
		"--auth-soa=1,hostmaster.auth.test,1200,180,1209600",
		"--mx-host=auth.test,mx.auth.test,10",
		"--host-record=mx.auth.test,127.0.0.8",
		NULL,
	};
	dnsmasq_start_opt(&d, "auth", args, false);
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.servers = d.servers};
	struct rq_dns *dns = make_dns(base, &o);
	struct rq_dns_result *r = lookup(base, dns, "auth.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->nhosts, 1);
	assert_string_equal(r->hosts[0].name, "mx.auth.test");
	assert_int_equal(r->ttl, 7);
	rq_dns_result_free(r);
	r = lookup(base, dns, "nx.auth.test", true);
	assert_int_equal(r->status, RQ_DNS_PERMFAIL);
	assert_string_equal(r->outcome.enhanced, "5.1.2");
	assert_int_equal(r->ttl, 7);
	assert_false(r->cached);
	rq_dns_result_free(r);
	r = lookup(base, dns, "nx.auth.test", true);
	assert_int_equal(r->status, RQ_DNS_PERMFAIL);
	assert_true(r->cached);
	assert_true(r->ttl >= 1 && r->ttl <= 7);
	rq_dns_result_free(r);
	rq_dns_destroy(dns);

	o.neg_ttl_max = 3;
	o.ttl_max = 5;
	dns = make_dns(base, &o);
	r = lookup(base, dns, "nx.auth.test", true);
	assert_int_equal(r->ttl, 3);
	rq_dns_result_free(r);
	r = lookup(base, dns, "auth.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->ttl, 3);  /* the AAAA "no data" of mx.auth.test */
	rq_dns_result_free(r);
	rq_dns_destroy(dns);
	event_base_free(base);
	dnsmasq_stop(&d);
}

/*
 * 40 MX records do not fit a 512-byte UDP answer: dnsmasq truncates, c-ares
 * asks again over TCP. The result keeps the RQ_DNS_HOSTS_MAX lowest
 * preferences, in order.
 */
static void large_mx_set_over_tcp_fallback(void **state)
{
	(void)state;
	enum { N = 40 };
	static char args[2 * N][96];
	const char *argv[2 * N + 1];
	for (int i = 0; i < N; i++) {
		/* preferences 200, 195, ... : listed in reverse */
		snprintf(args[2 * i], sizeof(args[0]), "--mx-host=big.test,host%02d.big.test,%d",
			 i, 200 - 5 * i);
		snprintf(args[2 * i + 1], sizeof(args[0]), "--host-record=host%02d.big.test,127.0.1.%d",
			 i, i + 1);
		argv[2 * i] = args[2 * i];
		argv[2 * i + 1] = args[2 * i + 1];
	}
	argv[2 * N] = NULL;
	struct dnsmasq d;
	dnsmasq_start(&d, "big", argv);
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.servers = d.servers, .no_ipv6 = true};
	struct rq_dns *dns = make_dns(base, &o);
	struct rq_dns_result *r = lookup(base, dns, "big.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_int_equal(r->nhosts, RQ_DNS_HOSTS_MAX);
	for (size_t i = 0; i < r->nhosts; i++) {
		int k = N - 1 - (int)i;  /* the lowest preference is the last listed */
		char want[64];
		snprintf(want, sizeof(want), "host%02d.big.test", k);
		assert_string_equal(r->hosts[i].name, want);
		assert_int_equal(r->hosts[i].preference, 200 - 5 * k);
		assert_int_equal(r->hosts[i].naddrs, 1);
	}
	rq_dns_result_free(r);
	assert_true(logged_by_child(&d, "query[MX] big.test"));
	rq_dns_destroy(dns);
	event_base_free(base);
	dnsmasq_stop(&d);
}

struct cache_probe {
	struct event_base *base;
	struct rq_dns *dns;
};

static bool lookup_fails(void *arg)
{
	struct cache_probe *p = arg;
	struct rq_dns_result *r = lookup(p->base, p->dns, "example.test", true);
	bool failed = r->status != RQ_DNS_OK;
	rq_dns_result_free(r);
	return failed;
}

/*
 * The cache answers while the server is gone, until the TTL passes:
 * dns_long keeps dnsmasq's 60 s TTL, dns_short caps every TTL at 1 s.
 */
static void cache_survives_server_until_ttl(void **state)
{
	(void)state;
	struct dnsmasq d;
	dnsmasq_start(&d, "cache", NULL);
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.servers = d.servers, .timeout_ms = 300, .tries = 1};
	struct rq_dns *dns_long = make_dns(base, &o);
	o.ttl_max = 1;
	o.neg_ttl_max = 1;
	struct rq_dns *dns_short = make_dns(base, &o);

	struct rq_dns_result *r = lookup(base, dns_long, "example.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_false(r->cached);
	rq_dns_result_free(r);
	r = lookup(base, dns_long, "no-such-domain.test", true);
	assert_int_equal(r->status, RQ_DNS_PERMFAIL);
	rq_dns_result_free(r);
	r = lookup(base, dns_short, "example.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_true(r->ttl <= 1);
	rq_dns_result_free(r);

	dnsmasq_stop(&d);

	r = lookup(base, dns_long, "example.test", true);
	assert_int_equal(r->status, RQ_DNS_OK);
	assert_true(r->cached);
	assert_int_equal(r->nhosts, 2);
	assert_string_equal(r->hosts[1].name, "mx2.example.test");
	assert_int_equal(r->hosts[1].naddrs, 2);
	rq_dns_result_free(r);
	/* negative answers are cached too (at most neg_ttl_max, 60 s) */
	r = lookup(base, dns_long, "no-such-domain.test", true);
	assert_int_equal(r->status, RQ_DNS_PERMFAIL);
	assert_string_equal(r->outcome.enhanced, "5.1.2");
	rq_dns_result_free(r);
	/* not asked before: the server is gone */
	r = lookup(base, dns_long, "nomx.test", true);
	assert_int_equal(r->status, RQ_DNS_TEMPFAIL);
	rq_dns_result_free(r);

	/* the 1 s copy runs out */
	struct cache_probe p = {base, dns_short};
	assert_true(th_wait_for(lookup_fails, &p, 15000));

	rq_dns_destroy(dns_short);
	rq_dns_destroy(dns_long);
	event_base_free(base);
}

/* Cache size cap holds with real answers. */
static void cache_cap(void **state)
{
	(void)state;
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.cache_max = 3};
	struct rq_dns *dns = make_dns(base, &o);
	const char *names[] = {"example.test", "eq.test", "nomx.test", "nullmx.test", NULL};
	for (int i = 0; names[i]; i++) {
		struct rq_dns_result *r = lookup(base, dns, names[i], true);
		rq_dns_result_free(r);
		struct rq_dns_stats st;
		rq_dns_stats(dns, &st);
		assert_true(st.cached <= 3);
		assert_true(st.cached >= 1);
	}
	rq_dns_destroy(dns);
	event_base_free(base);
}

struct counter {
	int calls;
	struct rq_dns *dns_to_destroy;
};

static void count_cb(struct rq_dns_result *res, void *arg)
{
	struct counter *c = arg;
	c->calls++;
	rq_dns_result_free(res);
	if (c->dns_to_destroy) {
		rq_dns_destroy(c->dns_to_destroy);
		c->dns_to_destroy = NULL;
	}
}

static void cancel_and_destroy_in_flight(void **state)
{
	(void)state;
	int port;
	int fd = blackhole(&port);
	char servers[64];
	snprintf(servers, sizeof(servers), "127.0.0.1:%d", port);
	struct event_base *base = event_base_new();
	struct rq_dns_opts o = {.servers = servers, .timeout_ms = 300, .tries = 1};
	struct rq_dns *dns = make_dns(base, &o);
	struct counter cancelled = {0}, kept = {0};

	/* cancelled while the query is in flight: no callback, ever */
	struct rq_dns_req *a = rq_dns_lookup_mx(dns, "example.test", count_cb, &cancelled);
	/* cancelled after it finished but before its callback ran */
	struct rq_dns_req *b = rq_dns_lookup_mx(dns, "[127.0.0.1]", count_cb, &cancelled);
	struct rq_dns_req *c = rq_dns_lookup_host(dns, "relay.example.test", count_cb, &kept);
	assert_non_null(a);
	assert_non_null(b);
	assert_non_null(c);
	rq_dns_cancel(a);
	rq_dns_cancel(b);
	rq_dns_cancel(NULL);
	struct rq_dns_stats st;
	rq_dns_stats(dns, &st);
	assert_int_equal(st.pending, 1);
	assert_true(run_until(base, &kept.calls, 1, 10000));
	/* the cancelled query has timed out as well by now */
	assert_int_equal(cancelled.calls, 0);

	/* destroyed with requests in flight: no callback after destroy */
	for (int i = 0; i < 5; i++)
		assert_non_null(rq_dns_lookup_mx(dns, "example.test", count_cb, &cancelled));
	assert_non_null(rq_dns_lookup_mx(dns, "[127.0.0.1]", count_cb, &cancelled));
	rq_dns_destroy(dns);
	int dummy = 0;
	run_until(base, &dummy, 1, 700);  /* longer than the query timeout */
	assert_int_equal(cancelled.calls, 0);
	assert_int_equal(kept.calls, 1);

	/* destroyed from inside a callback: the other answers are dropped */
	dns = make_dns(base, &o);
	struct counter first = {0}, rest = {0};
	first.dns_to_destroy = dns;
	assert_non_null(rq_dns_lookup_mx(dns, "[127.0.0.1]", count_cb, &first));
	assert_non_null(rq_dns_lookup_mx(dns, "[127.0.0.2]", count_cb, &rest));
	assert_non_null(rq_dns_lookup_mx(dns, "example.test", count_cb, &rest));
	assert_true(run_until(base, &first.calls, 1, 5000));
	run_until(base, &dummy, 1, 700);
	assert_int_equal(first.calls, 1);
	assert_int_equal(rest.calls, 0);

	event_base_free(base);
	close(fd);
}

struct chain {
	struct rq_dns *dns;
	int calls;
	int stop_at;
};

static void chain_cb(struct rq_dns_result *res, void *arg)
{
	struct chain *c = arg;
	c->calls++;
	assert_int_equal(res->status, RQ_DNS_OK);
	rq_dns_result_free(res);
	if (c->calls < c->stop_at)
		assert_non_null(rq_dns_lookup_mx(c->dns, c->calls % 2 ? "[127.0.0.1]" : "example.test",
						 chain_cb, c));
}

/* A callback may start lookups; answers that are ready at once (literals,
 * cache) come on a later loop iteration, never inside the current one. */
static void lookups_from_callbacks(void **state)
{
	struct fixture *f = *state;
	struct rq_dns_result *r = lookup(f->base, f->dns, "example.test", true);  /* cache it */
	rq_dns_result_free(r);
	struct chain c = {f->dns, 0, 200};
	assert_non_null(rq_dns_lookup_mx(f->dns, "[127.0.0.1]", chain_cb, &c));
	event_base_loop(f->base, EVLOOP_ONCE);
	assert_int_equal(c.calls, 1);
	event_base_loop(f->base, EVLOOP_ONCE);
	assert_int_equal(c.calls, 2);
	assert_true(run_until(f->base, &c.calls, 200, 10000));
	assert_int_equal(c.calls, 200);
}

/* Two requests share a query; cancelling one leaves the other answered. */
static void cancel_one_of_two_sharing(void **state)
{
	struct fixture *f = *state;
	struct waiter gone = {0}, kept = {0};
	struct rq_dns_req *a = rq_dns_lookup_mx(f->dns, "example.test", on_result, &gone);
	struct rq_dns_req *b = rq_dns_lookup_mx(f->dns, "example.test", on_result, &kept);
	assert_non_null(a);
	assert_non_null(b);
	rq_dns_cancel(a);
	assert_true(run_until(f->base, &kept.calls, 1, 10000));
	assert_int_equal(kept.res->status, RQ_DNS_OK);
	assert_int_equal(kept.res->nhosts, 2);
	rq_dns_result_free(kept.res);
	assert_int_equal(gone.calls, 0);
	struct rq_dns_stats st;
	rq_dns_stats(f->dns, &st);
	assert_int_equal(st.queries, 5);
	assert_int_equal(st.joined, 1);
}

/* Many concurrent lookups on one loop, all answered, sharing queries. */
static void many_concurrent(void **state)
{
	struct fixture *f = *state;
	rq_dns_flush(f->dns);
	struct waiter w[40];
	memset(w, 0, sizeof(w));
	const char *names[] = {"example.test", "eq.test", "nomx.test", "nullmx.test",
			       "no-such-domain.test"};
	int total = 0;
	for (int i = 0; i < 40; i++)
		assert_non_null(rq_dns_lookup_mx(f->dns, names[i % 5], on_result, &w[i]));
	uint64_t deadline = mono_ms() + 20000;
	for (;;) {
		total = 0;
		for (int i = 0; i < 40; i++)
			total += w[i].calls;
		if (total == 40 || mono_ms() > deadline)
			break;
		event_base_loop(f->base, EVLOOP_ONCE);
	}
	assert_int_equal(total, 40);
	/* one query per record set: 5 + 5 + 3 + 1 + 1, the rest joined */
	struct rq_dns_stats st;
	rq_dns_stats(f->dns, &st);
	assert_int_equal(st.queries, 15);
	assert_true(st.joined > 0);
	assert_int_equal(st.pending, 0);
	for (int i = 0; i < 40; i++) {
		assert_int_equal(w[i].calls, 1);
		enum rq_dns_status want = i % 5 >= 3 ? RQ_DNS_PERMFAIL : RQ_DNS_OK;
		assert_int_equal(w[i].res->status, want);
		rq_dns_result_free(w[i].res);
	}
}

static void bad_options(void **state)
{
	(void)state;
	struct event_base *base = event_base_new();
	char err[128] = "";
	struct rq_dns_opts o = {.servers = "not an address"};
	assert_null(rq_dns_create(base, &o, err, sizeof(err)));
	assert_non_null(strstr(err, "server"));
	assert_null(rq_dns_create(NULL, NULL, err, sizeof(err)));
	rq_dns_destroy(NULL);
	event_base_free(base);
}

static int group_setup(void **state)
{
	(void)state;
	tmpdir = th_mkdtemp("dns");
	dnsmasq_start(&main_dns, "main", NULL);
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	dnsmasq_stop(&main_dns);
	th_rmrf(tmpdir);
	free(tmpdir);
	return 0;
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN);
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(two_mx_by_preference, setup, teardown),
		cmocka_unit_test_setup_teardown(equal_preferences_both_orders, setup, teardown),
		cmocka_unit_test_setup_teardown(no_mx_uses_the_domain_address, setup, teardown),
		cmocka_unit_test_setup_teardown(null_mx_is_permanent, setup, teardown),
		cmocka_unit_test_setup_teardown(nxdomain_is_permanent, setup, teardown),
		cmocka_unit_test_setup_teardown(mx_host_without_address, setup, teardown),
		cmocka_unit_test_setup_teardown(refused_is_temporary, setup, teardown),
		cmocka_unit_test(servfail_is_temporary),
		cmocka_unit_test(timeout_is_temporary),
		cmocka_unit_test(over_tcp),
		cmocka_unit_test_setup_teardown(host_lookups_and_literals, setup, teardown),
		cmocka_unit_test(family_options),
		cmocka_unit_test(ttls_from_an_authoritative_zone),
		cmocka_unit_test(large_mx_set_over_tcp_fallback),
		cmocka_unit_test(cache_survives_server_until_ttl),
		cmocka_unit_test(cache_cap),
		cmocka_unit_test(cancel_and_destroy_in_flight),
		cmocka_unit_test_setup_teardown(cancel_one_of_two_sharing, setup, teardown),
		cmocka_unit_test_setup_teardown(lookups_from_callbacks, setup, teardown),
		cmocka_unit_test_setup_teardown(many_concurrent, setup, teardown),
		cmocka_unit_test(bad_options),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

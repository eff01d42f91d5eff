/*
 * bench_submit: the application's side of SMTP submission, for scripts/bench.
 * Plain blocking sockets, no libraries: it measures the server, not itself.
 *
 * Latency probe:
 *   bench_submit --port N --messages COUNT [--size OCTETS] [--warmup COUNT]
 *                [--interval MS] [--load RATE --load-sessions K]
 * One connection, EHLO, then COUNT messages one after the other (MAIL, RCPT
 * and DATA pipelined, the message text, then the final ".\r\n" in a write
 * of its own). For each message it takes CLOCK_MONOTONIC just before the
 * write of the final dot and again when the "250" reply to it has been
 * read, and prints
 *   submit_ms_p50=X submit_ms_p90=X submit_ms_p99=X submit_ms_max=X ...
 * one per line. The socket has TCP_NODELAY, so the dot is sent at once.
 * --warmup messages (default 10) are sent first and not counted; with
 * --interval, each message starts MS milliseconds after the previous one
 * started (or at once when that one took longer), so the probe samples a
 * stretch of time rather than one burst.
 * With --load, K child processes send a background load of RATE messages/s
 * in all (each RATE/K on its own connection, open loop on a fixed
 * schedule) for the whole probe; it prints load_msgs_per_s, the rate they
 * achieved, and load_errors.
 *
 * Idle connections:
 *   bench_submit --port N --idle COUNT [--ready FILE]
 * Opens COUNT connections, reads each greeting, sends EHLO and reads its
 * 250 reply, then writes "open=COUNT" to FILE and holds them until SIGTERM
 * or SIGINT. Any other reply is an error (exit 1).
 *
 * Messages are --size octets (default 2048), one recipient.
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define REPLY_MAX 4096

struct opts {
	int port;
	long messages;
	long size;
	long warmup;
	long interval_ms;
	double load;
	long load_sessions;
	long idle;
	const char *ready;
};

static struct opts O;
static volatile sig_atomic_t stop;

__attribute__((format(printf, 1, 2), noreturn))
static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("bench_submit: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

/* ---- a connection with a small read buffer ---- */

struct conn {
	int fd;
	char buf[REPLY_MAX];
	size_t len;
};

static int conn_open(struct conn *c)
{
	struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)O.port)};
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	c->len = 0;
	c->fd = socket(AF_INET, SOCK_STREAM, 0);
	if (c->fd < 0)
		return -1;
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(c->fd, (struct sockaddr *)&sin, sizeof(sin)) < 0) {
		close(c->fd);
		c->fd = -1;
		return -1;
	}
	return 0;
}

static int send_all(struct conn *c, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(c->fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* Reads one reply (all its lines); returns its code, -1 on error / EOF.
 * The reply's last line is copied to last (for messages). */
static int read_reply(struct conn *c, char *last, size_t lastlen)
{
	for (;;) {
		char *eol = memchr(c->buf, '\n', c->len);
		if (eol) {
			size_t ll = (size_t)(eol - c->buf) + 1;
			bool final = ll < 5 || c->buf[3] != '-';
			int code = -1;
			if (ll >= 4 && c->buf[0] >= '1' && c->buf[0] <= '5')
				code = (c->buf[0] - '0') * 100 + (c->buf[1] - '0') * 10 + (c->buf[2] - '0');
			if (final && last && lastlen) {
				size_t k = ll < lastlen ? ll : lastlen - 1;
				memcpy(last, c->buf, k);
				last[k] = '\0';
				last[strcspn(last, "\r\n")] = '\0';
			}
			memmove(c->buf, c->buf + ll, c->len - ll);
			c->len -= ll;
			if (final)
				return code;
			continue;
		}
		if (c->len == sizeof(c->buf))
			return -1;
		ssize_t r = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		c->len += (size_t)r;
	}
}

static int expect(struct conn *c, int want, const char *what)
{
	char last[256] = "";
	int code = read_reply(c, last, sizeof(last));
	if (code != want) {
		fprintf(stderr, "bench_submit: %s: expected %d, got \"%s\"%s\n", what, want, last,
			code < 0 ? " (connection lost)" : "");
		return -1;
	}
	return 0;
}

static int conn_ehlo(struct conn *c)
{
	if (conn_open(c) < 0)
		return -1;
	if (expect(c, 220, "greeting") < 0)
		return -1;
	static const char ehlo[] = "EHLO bench-submit.test\r\n";
	if (send_all(c, ehlo, sizeof(ehlo) - 1) < 0)
		return -1;
	return expect(c, 250, "EHLO");
}

/* ---- messages ---- */

static char *body;     /* the message text without the final dot line */
static size_t body_len;

/* A message of exactly size octets: headers, then 76-octet CRLF lines
 * (no line starts with a dot), ending in CRLF. */
static void make_body(long size)
{
	const char *hdr = "From: bench@example.org\r\nTo: rcpt@example.net\r\nSubject: submit\r\n\r\n";
	if (size < (long)strlen(hdr) + 2)
		die("--size is too small");
	body = malloc((size_t)size);
	if (!body)
		die("out of memory");
	long n = 0;
	for (; hdr[n]; n++)
		body[n] = hdr[n];
	long col = 0;
	while (n < size - 2) {
		if (col == 76 && n + 2 <= size - 2) {
			body[n++] = '\r';
			body[n++] = '\n';
			col = 0;
			continue;
		}
		body[n] = (char)('a' + (n % 26));
		n++;
		col++;
	}
	body[n++] = '\r';
	body[n++] = '\n';
	body_len = (size_t)n;
}

static const char envelope[] = "MAIL FROM:<bench@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n";

/* Sends one message; *lat_ns (when not NULL): final dot written -> 250. */
static int send_message(struct conn *c, int64_t *lat_ns)
{
	if (send_all(c, envelope, sizeof(envelope) - 1) < 0)
		return -1;
	if (expect(c, 250, "MAIL") < 0 || expect(c, 250, "RCPT") < 0 || expect(c, 354, "DATA") < 0)
		return -1;
	if (send_all(c, body, body_len) < 0)
		return -1;
	int64_t t0 = now_ns();
	if (send_all(c, ".\r\n", 3) < 0)
		return -1;
	if (expect(c, 250, "end of DATA") < 0)
		return -1;
	if (lat_ns)
		*lat_ns = now_ns() - t0;
	return 0;
}

/* ---- background load ---- */

struct load_count {
	long sent;
	long errors;
};

static void load_child(long idx, struct load_count *cnt)
{
	struct conn c;
	double per_s = O.load / (double)O.load_sessions;
	int64_t period = (int64_t)(1e9 / per_s);
	/* spread the sessions over one period */
	int64_t next = now_ns() + period * idx / O.load_sessions;
	if (conn_ehlo(&c) < 0) {
		cnt->errors++;
		_exit(1);
	}
	while (!stop) {
		int64_t t = now_ns();
		if (t < next) {
			struct timespec ts = {(time_t)((next - t) / 1000000000), (long)((next - t) % 1000000000)};
			nanosleep(&ts, NULL);
			continue;
		}
		if (send_message(&c, NULL) < 0) {
			cnt->errors++;
			_exit(1);
		}
		cnt->sent++;
		next += period;
	}
	send_all(&c, "QUIT\r\n", 6);
	close(c.fd);
	_exit(0);
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return x < y ? -1 : x > y;
}

static double pct_ms(const int64_t *v, long n, double p)
{
	long i = (long)(p / 100.0 * (double)n + 0.999999) - 1;
	if (i < 0)
		i = 0;
	if (i >= n)
		i = n - 1;
	return (double)v[i] / 1e6;
}

static int probe(void)
{
	struct load_count *cnt = NULL;
	pid_t *kids = NULL;
	int64_t l0 = 0;
	if (O.load > 0) {
		cnt = mmap(NULL, sizeof(*cnt) * (size_t)O.load_sessions, PROT_READ | PROT_WRITE,
			   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		kids = calloc((size_t)O.load_sessions, sizeof(*kids));
		if (cnt == MAP_FAILED || !kids)
			die("out of memory");
		memset(cnt, 0, sizeof(*cnt) * (size_t)O.load_sessions);
		l0 = now_ns();
		for (long i = 0; i < O.load_sessions; i++) {
			kids[i] = fork();
			if (kids[i] < 0)
				die("fork: %s", strerror(errno));
			if (kids[i] == 0)
				load_child(i, &cnt[i]);
		}
		/* let the load reach its rate before measuring */
		struct timespec ts = {0, 500000000};
		nanosleep(&ts, NULL);
	}

	int rc = 0;
	int64_t *lat = calloc((size_t)O.messages, sizeof(*lat));
	if (!lat)
		die("out of memory");
	struct conn c;
	if (conn_ehlo(&c) < 0) {
		rc = 1;
		goto out;
	}
	for (long i = 0; i < O.warmup; i++)
		if (send_message(&c, NULL) < 0) {
			rc = 1;
			goto out;
		}
	int64_t next = now_ns();
	for (long i = 0; i < O.messages; i++) {
		int64_t t = now_ns();
		if (t < next) {
			struct timespec ts = {(time_t)((next - t) / 1000000000), (long)((next - t) % 1000000000)};
			while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
				;
		}
		next = now_ns() + O.interval_ms * 1000000;
		if (send_message(&c, &lat[i]) < 0) {
			fprintf(stderr, "bench_submit: message %ld of %ld failed\n", i + 1, O.messages);
			rc = 1;
			goto out;
		}
	}
	send_all(&c, "QUIT\r\n", 6);
	close(c.fd);

out:
	if (O.load > 0) {
		int64_t l1 = now_ns();
		long sent = 0, errors = 0;
		for (long i = 0; i < O.load_sessions; i++)
			kill(kids[i], SIGTERM);
		for (long i = 0; i < O.load_sessions; i++) {
			int st;
			waitpid(kids[i], &st, 0);
			sent += cnt[i].sent;
			errors += cnt[i].errors;
		}
		printf("load_msgs_per_s=%.0f\n", (double)sent * 1e9 / (double)(l1 - l0));
		printf("load_errors=%ld\n", errors);
		if (errors)
			rc = 1;
	}
	if (rc == 0) {
		qsort(lat, (size_t)O.messages, sizeof(*lat), cmp_i64);
		printf("submit_ms_p50=%.3f\n", pct_ms(lat, O.messages, 50));
		printf("submit_ms_p90=%.3f\n", pct_ms(lat, O.messages, 90));
		printf("submit_ms_p99=%.3f\n", pct_ms(lat, O.messages, 99));
		printf("submit_ms_max=%.3f\n", (double)lat[O.messages - 1] / 1e6);
		printf("submit_ms_min=%.3f\n", (double)lat[0] / 1e6);
	}
	free(lat);
	return rc;
}

/* ---- idle connections ---- */

static int idle(void)
{
	struct conn *cs = calloc((size_t)O.idle, sizeof(*cs));
	if (!cs)
		die("out of memory");
	for (long i = 0; i < O.idle; i++) {
		if (conn_ehlo(&cs[i]) < 0) {
			fprintf(stderr, "bench_submit: connection %ld of %ld: %s\n", i + 1, O.idle,
				errno ? strerror(errno) : "refused");
			return 1;
		}
	}
	if (O.ready) {
		FILE *f = fopen(O.ready, "w");
		if (!f || fprintf(f, "open=%ld\n", O.idle) < 0 || fclose(f) != 0)
			die("%s: %s", O.ready, strerror(errno));
	}
	while (!stop)
		pause();
	for (long i = 0; i < O.idle; i++)
		close(cs[i].fd);
	free(cs);
	return 0;
}

static long parse_long(const char *s, const char *name)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || v < 0)
		die("%s must be a non-negative integer", name);
	return v;
}

static void usage(void)
{
	fputs("usage: bench_submit --port N --messages COUNT [--size OCTETS] [--warmup COUNT]\n"
	      "                    [--interval MS] [--load RATE --load-sessions K]\n"
	      "       bench_submit --port N --idle COUNT [--ready FILE]\n", stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	O = (struct opts){.size = 2048, .warmup = 10, .load_sessions = 4};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			usage();
		if (strcmp(a, "--port") == 0)
			O.port = (int)parse_long(v, a);
		else if (strcmp(a, "--messages") == 0)
			O.messages = parse_long(v, a);
		else if (strcmp(a, "--size") == 0)
			O.size = parse_long(v, a);
		else if (strcmp(a, "--warmup") == 0)
			O.warmup = parse_long(v, a);
		else if (strcmp(a, "--interval") == 0)
			O.interval_ms = parse_long(v, a);
		else if (strcmp(a, "--load") == 0)
			O.load = (double)parse_long(v, a);
		else if (strcmp(a, "--load-sessions") == 0)
			O.load_sessions = parse_long(v, a);
		else if (strcmp(a, "--idle") == 0)
			O.idle = parse_long(v, a);
		else if (strcmp(a, "--ready") == 0)
			O.ready = v;
		else
			usage();
		i++;
	}
	if (O.port < 1 || O.port > 65535 || (O.messages < 1) == (O.idle < 1) || O.load_sessions < 1)
		usage();
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (O.idle)
		return idle();
	make_body(O.size);
	int rc = probe();
	free(body);
	return rc;
}

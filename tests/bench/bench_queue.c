/*
 * bench_queue: throughput of the Redis Functions hot path (relayq_enqueue,
 * then relayq_claim + relayq_settle) against a running redis-server.
 * scripts/bench starts a private, durable redis-server and runs this.
 *
 * Usage: bench_queue (--port N | --socket PATH) [--quick] [--messages N]
 *        [--size OCTETS] [--pipeline N] [--batch N] [--depth N]
 *        [--functions lua/redis/relayq.lua] [--enqueue-only --queue NAME]
 * --enqueue-only enqueues the messages into queue NAME (key relayq:{NAME})
 * and leaves them there for a delivery daemon; it prints
 * enqueue_start_ns / enqueue_end_ns (CLOCK_REALTIME, before the first call
 * is sent and after the last reply) and enqueue_msgs_per_s.
 * It depends on hiredis only (not on the engine library), so it builds even
 * while engine modules are being changed.
 * Prints name=value lines, then a table.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>


struct opts {
	int port;
	const char *socket;
	long messages;
	long size;
	long pipeline;   /* enqueue FCALLs per network round trip */
	long batch;      /* messages per claim / settle FCALL */
	long depth;      /* claim FCALLs per network round trip */
	const char *functions;
	bool enqueue_only;
	const char *queue;
};

static long long now_real_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

__attribute__((format(printf, 1, 2), noreturn))
static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("bench_queue: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static redisReply *get_reply(redisContext *c)
{
	void *v = NULL;
	if (redisGetReply(c, &v) != REDIS_OK || !v)
		die("redis: %s", c->errstr);
	redisReply *r = v;
	if (r->type == REDIS_REPLY_ERROR)
		die("redis error: %s", r->str);
	return r;
}

static long parse_long(const char *s, const char *name)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || *end || v < 1)
		die("%s must be a positive integer", name);
	return v;
}

static void usage(void)
{
	fputs("usage: bench_queue (--port N | --socket PATH) [--quick] [--messages N] [--size OCTETS]\n"
	      "                   [--pipeline N] [--batch N] [--depth N] [--functions FILE]\n"
	      "                   [--enqueue-only --queue NAME]\n", stderr);
	exit(2);
}

static void parse(int argc, char **argv, struct opts *o)
{
	*o = (struct opts){.messages = 100000, .size = 2048, .pipeline = 256, .batch = 100, .depth = 4,
			   .functions = RQ_SOURCE_ROOT "/lua/redis/relayq.lua"};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (strcmp(a, "--quick") == 0) {
			o->messages = 10000;
			continue;
		}
		if (strcmp(a, "--enqueue-only") == 0) {
			o->enqueue_only = true;
			continue;
		}
		if (!v)
			usage();
		if (strcmp(a, "--port") == 0)
			o->port = (int)parse_long(v, a);
		else if (strcmp(a, "--socket") == 0)
			o->socket = v;
		else if (strcmp(a, "--messages") == 0)
			o->messages = parse_long(v, a);
		else if (strcmp(a, "--size") == 0)
			o->size = parse_long(v, a);
		else if (strcmp(a, "--pipeline") == 0)
			o->pipeline = parse_long(v, a);
		else if (strcmp(a, "--batch") == 0)
			o->batch = parse_long(v, a);
		else if (strcmp(a, "--depth") == 0)
			o->depth = parse_long(v, a);
		else if (strcmp(a, "--functions") == 0)
			o->functions = v;
		else if (strcmp(a, "--queue") == 0)
			o->queue = v;
		else
			usage();
		i++;
	}
	if ((!o->port && !o->socket) || (o->enqueue_only && !o->queue))
		usage();
}

/* A message of exactly size octets: headers, then 76-octet CRLF lines. */
static char *make_body(long size)
{
	char *b = malloc((size_t)size + 1);
	if (!b)
		die("out of memory");
	const char *hdr = "From: bench@example.org\r\nTo: rcpt@example.net\r\nSubject: bench\r\n\r\n";
	long n = 0;
	for (; n < size && hdr[n]; n++)
		b[n] = hdr[n];
	long col = 0;
	while (n < size) {
		if (col == 76 && n + 2 <= size) {
			b[n++] = '\r';
			b[n++] = '\n';
			col = 0;
			continue;
		}
		b[n] = (char)('a' + (n % 26));
		n++;
		col++;
	}
	b[size] = '\0';
	return b;
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		die("%s: %s", path, strerror(errno));
	size_t cap = 1 << 16, n = 0, got;
	char *buf = malloc(cap);
	while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
		n += got;
		if (n == cap) {
			cap *= 2;
			buf = realloc(buf, cap);
		}
	}
	fclose(f);
	if (!buf)
		die("out of memory");
	*len = n;
	return buf;
}

static double bench_enqueue(redisContext *c, const char *key, const struct opts *o, const char *body)
{
	const char *env = "{\"from\":\"bench@example.org\",\"to\":[\"rcpt@example.net\"]}";
	const char *argv[6] = {"FCALL", "relayq_enqueue", "1", key, env, body};
	size_t lens[6] = {5, 14, 1, strlen(key), strlen(env), (size_t)o->size};
	double t0 = now_s();
	long sent = 0;
	while (sent < o->messages) {
		long n = o->messages - sent < o->pipeline ? o->messages - sent : o->pipeline;
		for (long i = 0; i < n; i++)
			redisAppendCommandArgv(c, 6, argv, lens);
		for (long i = 0; i < n; i++)
			freeReplyObject(get_reply(c));
		sent += n;
	}
	return now_s() - t0;
}

static double bench_claim_settle(redisContext *c, const char *key, const struct opts *o, long *fcalls)
{
	size_t cap = (size_t)o->batch * 160 + 16;
	char *json = malloc(cap);
	redisReply **claims = calloc((size_t)o->depth, sizeof(*claims));
	char cnt[24];
	snprintf(cnt, sizeof(cnt), "%ld", o->batch);
	long done = 0, calls = 0;
	double t0 = now_s();
	while (done < o->messages) {
		for (long d = 0; d < o->depth; d++)
			redisAppendCommand(c, "FCALL relayq_claim 1 %s %s 60000", key, cnt);
		long settles = 0;
		for (long d = 0; d < o->depth; d++)
			claims[d] = get_reply(c);
		calls += o->depth;
		for (long d = 0; d < o->depth; d++) {
			redisReply *msgs = claims[d]->element[2];
			if (msgs->elements > 0) {
				size_t len = 0;
				json[len++] = '[';
				for (size_t i = 0; i < msgs->elements; i++) {
					redisReply *m = msgs->element[i];
					len += (size_t)snprintf(json + len, cap - len,
						"%s{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"%s\",\"s\":\"delivered\",\"code\":250}]}",
						i ? "," : "", m->element[0]->str, m->element[7]->integer,
						m->element[2]->element[0]->str);
				}
				json[len++] = ']';
				json[len] = '\0';
				redisAppendCommand(c, "FCALL relayq_settle 1 %s %s", key, json);
				settles++;
				done += (long)msgs->elements;
			}
			freeReplyObject(claims[d]);
		}
		if (settles == 0)
			die("the queue ran dry before all messages were claimed");
		for (long i = 0; i < settles; i++)
			freeReplyObject(get_reply(c));
		calls += settles;
	}
	double t = now_s() - t0;
	free(claims);
	free(json);
	*fcalls = calls;
	return t;
}

static long long stat_of(redisContext *c, const char *key, const char *name)
{
	redisReply *r = redisCommand(c, "FCALL relayq_stats 1 %s", key);
	if (!r || r->type != REDIS_REPLY_ARRAY)
		die("stats failed");
	long long v = -1;
	for (size_t i = 0; i + 1 < r->elements; i += 2)
		if (strcmp(r->element[i]->str, name) == 0)
			v = r->element[i + 1]->integer;
	freeReplyObject(r);
	return v;
}

int main(int argc, char **argv)
{
	struct opts o;
	parse(argc, argv, &o);
	redisContext *c = o.socket ? redisConnectUnix(o.socket) : redisConnect("127.0.0.1", o.port);
	if (!c || c->err)
		die("connect: %s", c ? c->errstr : "out of memory");
	size_t flen = 0;
	char *fsrc = read_file(o.functions, &flen);
	redisReply *r = redisCommand(c, "FUNCTION LOAD REPLACE %b", fsrc, flen);
	free(fsrc);
	if (!r || r->type == REDIS_REPLY_ERROR)
		die("FUNCTION LOAD: %s", r ? r->str : c->errstr);
	freeReplyObject(r);

	char key[160];
	if (o.queue)
		snprintf(key, sizeof(key), "relayq:{%.64s}", o.queue);
	else
		snprintf(key, sizeof(key), "relayq:{bench-%ld}", (long)getpid());
	char *body = make_body(o.size);

	if (o.enqueue_only) {
		long long t0 = now_real_ns();
		double te = bench_enqueue(c, key, &o, body);
		long long t1 = now_real_ns();
		printf("enqueue_start_ns=%lld\n", t0);
		printf("enqueue_end_ns=%lld\n", t1);
		printf("enqueue_msgs_per_s=%.0f\n", (double)o.messages / te);
		redisFree(c);
		free(body);
		return 0;
	}

	double te = bench_enqueue(c, key, &o, body);
	if (stat_of(c, key, "ready") != o.messages)
		die("ready count after enqueue is wrong");
	long cs_calls = 0;
	double tc = bench_claim_settle(c, key, &o, &cs_calls);
	if (stat_of(c, key, "delivered") != o.messages || stat_of(c, key, "inflight") != 0)
		die("delivered / inflight counts after settle are wrong");
	r = redisCommand(c, "INFO memory");
	long long used = 0;
	if (r && r->type == REDIS_REPLY_STRING) {
		const char *p = strstr(r->str, "used_memory:");
		if (p)
			used = atoll(p + strlen("used_memory:"));
	}
	freeReplyObject(r);
	const char *const sfx[] = {":events", ":stats", ":seq", ":ready", ":inflight"};
	for (int i = 0; i < 5; i++)
		freeReplyObject(redisCommand(c, "DEL %s%s", key, sfx[i]));
	redisFree(c);
	free(body);

	double enq_rate = (double)o.messages / te;
	double cs_rate = (double)o.messages / tc;
	double cs_rtt = (double)cs_calls / (double)o.messages;
	long rounds = (o.messages + o.batch * o.depth - 1) / (o.batch * o.depth);
	printf("messages=%ld\n", o.messages);
	printf("message_size=%ld\n", o.size);
	printf("enqueue_msgs_per_s=%.0f\n", enq_rate);
	printf("enqueue_fcalls_per_msg=1\n");
	printf("enqueue_round_trips_per_msg=%.5f\n", 1.0 / (double)o.pipeline);
	printf("claim_settle_msgs_per_s=%.0f\n", cs_rate);
	printf("claim_settle_fcalls_per_msg=%.5f\n", cs_rtt);
	printf("claim_settle_round_trips_per_msg=%.5f\n", 2.0 * (double)rounds / (double)o.messages);
	printf("redis_used_memory_after=%lld\n", used);
	printf("\n");
	printf("%-22s %12s %14s %16s\n", "phase", "msgs/s", "FCALLs/msg", "round trips/msg");
	printf("%-22s %12.0f %14.3f %16.5f\n", "enqueue", enq_rate, 1.0, 1.0 / (double)o.pipeline);
	printf("%-22s %12.0f %14.3f %16.5f\n", "claim+settle", cs_rate, cs_rtt,
	       2.0 * (double)rounds / (double)o.messages);
	printf("(%ld messages of %ld octets, one recipient; enqueue pipeline %ld; claim batch %ld x depth %ld)\n",
	       o.messages, o.size, o.pipeline, o.batch, o.depth);
	return 0;
}

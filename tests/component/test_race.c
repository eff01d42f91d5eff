/*
 * Two claimers, each on its own connection and thread, drain 10,000 messages
 * through relayq_claim / relayq_settle at the same time: every id is claimed
 * exactly once and settled, none twice, none missed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

#define N_MSGS 10000
#define BATCH 37       /* not a divisor of N_MSGS: the last batch is short */
#define ID_LEN 40

static struct th_redis srv;
static char qkey[128];
static pthread_barrier_t start;

struct claimer {
	pthread_t thread;
	char (*ids)[ID_LEN];
	size_t n;
	size_t settled;
	char err[256];
};

static void claimer_fail(struct claimer *c, const char *what, redisReply *r, redisContext *ctx)
{
	if (c->err[0])
		return;
	snprintf(c->err, sizeof(c->err), "%s: %s", what,
		 !r ? ctx->errstr : r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
}

static void *claimer_run(void *arg)
{
	struct claimer *c = arg;
	redisContext *ctx = th_redis_connect(&srv);
	size_t cap = 64 * 1024;
	char *json = malloc(cap);
	pthread_barrier_wait(&start);
	while (!c->err[0]) {
		redisReply *r = redisCommand(ctx, "FCALL relayq_claim 1 %s %d 60000", qkey, BATCH);
		if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3) {
			claimer_fail(c, "claim", r, ctx);
			freeReplyObject(r);
			break;
		}
		redisReply *msgs = r->element[2];
		if (msgs->elements == 0) {
			freeReplyObject(r);
			break;
		}
		size_t len = 0;
		json[len++] = '[';
		for (size_t i = 0; i < msgs->elements; i++) {
			redisReply *m = msgs->element[i];
			if (m->elements != 8 || c->n >= N_MSGS) {
				claimer_fail(c, "claimed message", NULL, ctx);
				break;
			}
			snprintf(c->ids[c->n++], ID_LEN, "%s", m->element[0]->str);
			len += (size_t)snprintf(json + len, cap - len,
				"%s{\"id\":\"%s\",\"lease\":%lld,\"rcpts\":[{\"to\":\"%s\",\"s\":\"delivered\",\"code\":250}]}",
				i ? "," : "", m->element[0]->str, m->element[7]->integer,
				m->element[2]->element[0]->str);
		}
		json[len++] = ']';
		json[len] = '\0';
		size_t claimed = msgs->elements;
		freeReplyObject(r);
		if (c->err[0])
			break;
		r = redisCommand(ctx, "FCALL relayq_settle 1 %s %s", qkey, json);
		if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != claimed) {
			claimer_fail(c, "settle", r, ctx);
			freeReplyObject(r);
			break;
		}
		for (size_t i = 0; i < r->elements; i++) {
			if (strcmp(r->element[i]->str, "done") == 0)
				c->settled++;
			else
				claimer_fail(c, "settle status", r->element[i], ctx);
		}
		freeReplyObject(r);
	}
	free(json);
	redisFree(ctx);
	return NULL;
}

static int cmp_id(const void *a, const void *b)
{
	return strcmp(a, b);
}

static long long stat_of(redisContext *c, const char *name)
{
	redisReply *r = redisCommand(c, "FCALL relayq_stats 1 %s", qkey);
	assert_non_null(r);
	assert_int_equal(r->type, REDIS_REPLY_ARRAY);
	long long v = -1;
	for (size_t i = 0; i + 1 < r->elements; i += 2)
		if (strcmp(r->element[i]->str, name) == 0)
			v = r->element[i + 1]->integer;
	freeReplyObject(r);
	return v;
}

static void two_claimers_each_id_once(void **state)
{
	(void)state;
	th_redis_shared(&srv);
	snprintf(qkey, sizeof(qkey), "relayq:{%s}", th_unique_queue("race"));
	redisContext *c = th_redis_connect(&srv);

	/* Enqueue N_MSGS, pipelined in windows of 500. */
	char (*enqueued)[ID_LEN] = calloc(N_MSGS, ID_LEN);
	size_t n_enq = 0;
	for (int base = 0; base < N_MSGS; base += 500) {
		for (int i = base; i < base + 500 && i < N_MSGS; i++) {
			char env[128];
			snprintf(env, sizeof(env), "{\"from\":\"s@example.org\",\"to\":[\"r%d@example.net\"]}", i);
			redisAppendCommand(c, "FCALL relayq_enqueue 1 %s %s %s", qkey, env,
					   "Subject: race\r\n\r\nbody\r\n");
		}
		for (int i = base; i < base + 500 && i < N_MSGS; i++) {
			void *v = NULL;
			assert_int_equal(redisGetReply(c, &v), REDIS_OK);
			redisReply *r = v;
			if (r->type != REDIS_REPLY_STRING)
				fail_msg("enqueue: %s", r->type == REDIS_REPLY_ERROR ? r->str : "?");
			snprintf(enqueued[n_enq++], ID_LEN, "%s", r->str);
			freeReplyObject(r);
		}
	}
	assert_int_equal(n_enq, N_MSGS);
	assert_int_equal(stat_of(c, "ready"), N_MSGS);

	struct claimer cl[2];
	memset(cl, 0, sizeof(cl));
	pthread_barrier_init(&start, NULL, 2);
	for (int i = 0; i < 2; i++) {
		cl[i].ids = calloc(N_MSGS, ID_LEN);
		assert_int_equal(pthread_create(&cl[i].thread, NULL, claimer_run, &cl[i]), 0);
	}
	for (int i = 0; i < 2; i++)
		pthread_join(cl[i].thread, NULL);
	pthread_barrier_destroy(&start);
	for (int i = 0; i < 2; i++)
		if (cl[i].err[0])
			fail_msg("claimer %d: %s", i, cl[i].err);

	/* Every id once: the merged claimed ids equal the enqueued ids. */
	size_t total = cl[0].n + cl[1].n;
	char (*all)[ID_LEN] = calloc(total ? total : 1, ID_LEN);
	memcpy(all, cl[0].ids, cl[0].n * ID_LEN);
	memcpy(all + cl[0].n, cl[1].ids, cl[1].n * ID_LEN);
	qsort(all, total, ID_LEN, cmp_id);
	qsort(enqueued, N_MSGS, ID_LEN, cmp_id);
	for (size_t i = 1; i < total; i++)
		if (strcmp(all[i - 1], all[i]) == 0)
			fail_msg("id %s claimed twice", all[i]);
	assert_int_equal(total, N_MSGS);
	for (size_t i = 0; i < N_MSGS; i++)
		assert_string_equal(all[i], enqueued[i]);
	assert_int_equal(cl[0].settled + cl[1].settled, N_MSGS);
	print_message("claimer 0: %zu, claimer 1: %zu\n", cl[0].n, cl[1].n);

	assert_int_equal(stat_of(c, "delivered"), N_MSGS);
	assert_int_equal(stat_of(c, "ready"), 0);
	assert_int_equal(stat_of(c, "inflight"), 0);
	redisReply *r = redisCommand(c, "XLEN %s:events", qkey);
	assert_int_equal(r->integer, N_MSGS);
	freeReplyObject(r);

	/* leave the shared Redis clean */
	const char *const sfx[] = {":events", ":stats", ":seq"};
	for (int i = 0; i < 3; i++)
		freeReplyObject(redisCommand(c, "DEL %s%s", qkey, sfx[i]));
	free(all);
	free(enqueued);
	free(cl[0].ids);
	free(cl[1].ids);
	redisFree(c);
	th_redis_stop(&srv);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(two_claimers_each_id_once),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

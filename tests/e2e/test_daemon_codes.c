/*
 * relayqd end to end, the common reply codes: the fixture (fakesmtpd)
 * answers per recipient / per attempt, the daemon drains the queue, and the
 * test checks what a mail operator would: `relayq show ID --json`, the
 * Redis keys (as redis-cli shows them), the events stream, the counters and
 * what the server recorded.
 *
 *   4xx (450, 451 at RCPT, 451 at end of data): deferred, scheduled with
 *       the backoff, attempts 1, last reply kept; delivered once the
 *       server accepts (backoff 1h, then `relayq flush`)
 *   451 retried by the daemon itself when the backoff (1 s) is due
 *   421 at RCPT: deferred without burning the message's attempt (it counts
 *       against the destination, include/relayq/policy.h), delivered later
 *   550, 552, 553, 554 at RCPT and 554 at end of data: dead set with the
 *       reply and the knowledge-base hint, never retried
 *   451 every time with max_attempts 2: expired after attempt 2, dead with
 *       the last temporary reply
 *   2xx: delivered byte for byte (dot-stuffing), keys removed, event
 *   relayqd --redis URL --queue NAME override the config file
 *   back-to-back enqueues to an idle daemon are all picked up (no lost
 *       wake-up)
 *   a message with recipients in two domains: both delivered and settled
 *   relayqd exits 0 on SIGTERM, no sanitizer report
 */
#include "daemon.h"

#include "relayq/reply.h"


static int setup(void **state)
{
	return dt_state_setup(state, "dcodes", false);
}

static int teardown(void **state)
{
	return dt_state_teardown(state);
}

static const char BODY[] =
	"From: <sender@example.com>\r\n"
	"To: <x@example.net>\r\n"
	"Subject: relayq e2e\r\n"
	"\r\n"
	"first line\r\n"
	".a line that starts with a dot\r\n"
	"..two dots\r\n"
	"last line\r\n";

/* What a deferred message looks like between attempts. */
static void check_deferred(struct dt *t, const char *id, const char *rcpt, int code,
			   const char *enh, const char *text, const char *stage,
			   long long want_attempts, int64_t backoff_ms)
{
	struct dt_event ev;
	if (!dt_find_event(t, id, rcpt, "deferred", &ev))
		DT_FAIL(t, "%s: no deferred event for %s", id, rcpt);
	assert_int_equal(atoi(ev.code), code);
	assert_string_equal(ev.enh, enh);
	assert_non_null(strstr(ev.text, text));
	assert_string_equal(ev.stage, stage);
	assert_int_equal(ev.attempt, want_attempts);

	struct rq_json *m = dt_show(t, id);
	assert_string_equal(rq_json_get_str(m, "state"), "scheduled");
	assert_int_equal(dt_json_int(m, "attempts"), want_attempts);
	int64_t next = dt_json_int(m, "next");
	/* next attempt = the time of the outcome + the backoff (jitter 0) */
	if (next < ev.ms + backoff_ms - 60000 || next > ev.ms + backoff_ms + 2000)
		DT_FAIL(t, "%s: next %" PRId64 " is not about %" PRId64 " ms after the deferral (%"
			PRId64 ")", id, next, backoff_ms, ev.ms);
	assert_int_equal(ev.next, next);
	assert_int_equal(dt_zscore(t, "scheduled", id), next);
	assert_int_equal(dt_json_int(m, "last_code"), code);
	assert_string_equal(rq_json_get_str(m, "last_enhanced"), enh);
	assert_non_null(strstr(rq_json_get_str(m, "last_text"), text));
	assert_string_equal(rq_json_get_str(m, "last_stage"), stage);
	const struct rq_json *r = dt_show_rcpt(m, rcpt);
	assert_non_null(r);
	assert_string_equal(rq_json_get_str(r, "s"), "deferred");
	assert_int_equal(dt_json_int(r, "code"), code);
	rq_json_free(m);

	/* the raw record, as redis-cli HGETALL relayq:{q}:rcpt:ID shows it */
	struct rq_json *e = dt_rcpt_entry(t, id, rcpt);
	if (!e)
		DT_FAIL(t, "%s: no entry for %s in the rcpt hash", id, rcpt);
	assert_string_equal(rq_json_get_str(e, "s"), "deferred");
	assert_int_equal(dt_json_int(e, "code"), code);
	assert_string_equal(rq_json_get_str(e, "enh"), enh);
	assert_non_null(strstr(rq_json_get_str(e, "text"), text));
	rq_json_free(e);
	char *attempts = dt_msg_field(t, id, "attempts");
	assert_non_null(attempts);
	assert_int_equal(atoll(attempts), want_attempts);
	free(attempts);
}

struct rec_check {
	const char *rcpt;          /* count envelopes naming it */
	const char *body;          /* and whose content equals this */
	int n_env, n_body;
};

static void rec_count(const char *env, const char *content, size_t len, void *arg)
{
	struct rec_check *c = arg;
	char line[300];
	snprintf(line, sizeof(line), "RCPT TO:<%s>\n", c->rcpt);
	if (strstr(env, line)) {
		c->n_env++;
		if (strlen(c->body) == len && memcmp(c->body, content, len) == 0)
			c->n_body++;
		if (strncmp(env, "MAIL FROM:<sender@example.com>\n", 31) != 0)
			fail_msg("envelope sender: %s", env);
	}
}

/* The fixture recorded exactly one message for rcpt, byte for byte. */
static void check_recorded_once(struct dt *t, const char *rcpt, const char *body)
{
	struct rec_check c = {rcpt, body, 0, 0};
	dt_each_message(t, rec_count, &c);
	if (c.n_env != 1 || c.n_body != 1)
		DT_FAIL(t, "%s: recorded %d time(s), %d with the exact content (want 1, 1)", rcpt,
			c.n_env, c.n_body);
}

static void check_delivered(struct dt *t, const char *id, const char *rcpt,
			    long long want_attempt)
{
	struct dt_event ev;
	if (!dt_find_event(t, id, rcpt, "delivered", &ev))
		DT_FAIL(t, "%s: no delivered event for %s", id, rcpt);
	assert_int_equal(ev.code[0], '2');
	assert_int_equal(ev.attempt, want_attempt);
	assert_int_equal(dt_count_events(t, id, rcpt, "delivered"), 1);
	assert_false(dt_msg_exists(t, id));
	assert_int_equal(dt_int(t, "EXISTS %s:rcpt:%s", t->prefix, id), 0);
	assert_false(dt_in_zset(t, "scheduled", id));
	assert_false(dt_in_zset(t, "inflight", id));
	assert_false(dt_in_zset(t, "dead", id));
}

/* 450 / 451 at RCPT, 451 at end of data: scheduled after 1h, then flushed
 * and delivered once the server accepts. */
static void test_4xx_deferred_then_delivered(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {
		"rcpt addr=t450@example.net times=1 reply 450 4.2.0 Greylisted, come back later",
		"rcpt addr=t451@example.net times=1 reply 451 4.3.0 Temporary lookup failure",
		"dot times=1 reply 451 4.3.2 Queue full at end of data",
		NULL,
	};
	dt_smtp_start(t, rules);
	dt_config(t, "  batch = 100, lease = \"30s\",", DT_BACKOFF_1H "relayq.expire { max_age = \"5d\" }\n");
	char *a = dt_enqueue1(t, "t450@example.net", BODY);
	char *b = dt_enqueue1(t, "t451@example.net", BODY);
	char *c = dt_enqueue1(t, "d451@example.net", BODY);
	dt_daemon_start(t, 0);

	DT_WAIT(t, dt_cond_scheduled, a, 30000, "450 message not scheduled");
	DT_WAIT(t, dt_cond_scheduled, b, 30000, "451 message not scheduled");
	DT_WAIT(t, dt_cond_scheduled, c, 30000, "451-at-dot message not scheduled");
	check_deferred(t, a, "t450@example.net", 450, "4.2.0", "Greylisted", "rcpt", 1, 3600000);
	check_deferred(t, b, "t451@example.net", 451, "4.3.0", "Temporary lookup", "rcpt", 1,
		       3600000);
	check_deferred(t, c, "d451@example.net", 451, "4.3.2", "Queue full", "dot", 1, 3600000);
	assert_int_equal(dt_stat(t, "deferred"), 3);
	assert_int_equal(dt_stat(t, "delivered"), 0);
	assert_int_equal(dt_smtp_stat(t, "messages"), 0);
	assert_int_equal(dt_smtp_stat(t, "rejected"), 1);

	/* the operator makes them due now: delivered on attempt 2 */
	char *out = NULL;
	int rc = dt_sh(&out, "'%s' flush --all --redis '%s' --queue '%s' 2>&1", dt_relayq_bin(),
		       t->redis.url, t->queue);
	if (rc != 0)
		DT_FAIL(t, "relayq flush: exit %d: %s", rc, out);
	free(out);
	DT_WAIT(t, dt_cond_gone, a, 30000, "450 message not delivered after flush");
	DT_WAIT(t, dt_cond_gone, b, 30000, "451 message not delivered after flush");
	DT_WAIT(t, dt_cond_gone, c, 30000, "451-at-dot message not delivered after flush");
	check_delivered(t, a, "t450@example.net", 2);
	check_delivered(t, b, "t451@example.net", 2);
	check_delivered(t, c, "d451@example.net", 2);
	check_recorded_once(t, "t450@example.net", BODY);
	check_recorded_once(t, "t451@example.net", BODY);
	check_recorded_once(t, "d451@example.net", BODY);
	assert_int_equal(dt_stat(t, "delivered"), 3);
	assert_int_equal(dt_stat(t, "deferred"), 3);
	assert_int_equal(dt_stat(t, "failed"), 0);

	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(a);
	free(b);
	free(c);
}

/* The daemon retries by itself once the backoff is due, not before. */
static void test_4xx_retried_when_due(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {
		"rcpt addr=later@example.net times=1 reply 451 4.7.1 Please try again later",
		NULL,
	};
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1S);
	dt_daemon_start(t, 0);
	char *id = dt_enqueue1(t, "later@example.net", BODY);
	DT_WAIT(t, dt_cond_gone, id, 30000, "451 message not delivered by the retry");
	struct dt_event def, del;
	if (!dt_find_event(t, id, "later@example.net", "deferred", &def))
		DT_FAIL(t, "no deferred event");
	assert_int_equal(atoi(def.code), 451);
	assert_int_equal(def.attempt, 1);
	if (def.next <= 0 || def.next > def.ms + 1000 + 2000)
		DT_FAIL(t, "deferred next %lld, event at %" PRId64 " (backoff 1 s)", def.next, def.ms);
	check_delivered(t, id, "later@example.net", 2);
	assert_true(dt_find_event(t, id, "later@example.net", "delivered", &del));
	/* not retried before its time */
	if (del.ms < def.next)
		DT_FAIL(t, "delivered at %" PRId64 ", before the scheduled retry %lld", del.ms,
			def.next);
	check_recorded_once(t, "later@example.net", BODY);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* 421 at RCPT: the server closes the session; retried without counting an
 * attempt of the message (policy.h: 421 counts against the destination). */
static void test_421_retried(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {
		"rcpt addr=t421@example.net times=1 reply 421 4.3.2 Service shutting down",
		NULL,
	};
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1S);
	dt_daemon_start(t, 0);
	char *id = dt_enqueue1(t, "t421@example.net", BODY);
	DT_WAIT(t, dt_cond_gone, id, 40000, "421 message not delivered by the retry");
	struct dt_event def;
	if (!dt_find_event_code(t, id, "t421@example.net", "deferred", 421, &def))
		DT_FAIL(t, "no deferred event with the 421");
	assert_string_equal(def.enh, "4.3.2");
	assert_non_null(strstr(def.text, "shutting down"));
	assert_string_equal(def.stage, "rcpt");
	/* every deferral (the 421, and any while the destination was
	 * suspended) leaves the message's attempts alone */
	struct dt_event evs[32];
	size_t nev = dt_events(t, id, evs, 32);
	for (size_t i = 0; i < nev; i++)
		if (!strcmp(evs[i].type, "deferred") && evs[i].attempt != 0)
			DT_FAIL(t, "a deferral (%s %s) burnt an attempt of the message (attempt "
				"%lld, want 0: a 421 counts against the destination)", evs[i].code,
				evs[i].text, evs[i].attempt);
	check_delivered(t, id, "t421@example.net", 1);
	check_recorded_once(t, "t421@example.net", BODY);
	assert_true(dt_smtp_stat(t, "connections") >= 2);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

struct perm {
	const char *rcpt;
	int code;
	const char *enh;
	const char *text;
	const char *stage;
};

static void check_dead(struct dt *t, const char *id, const struct perm *p)
{
	struct rq_json *m = dt_show(t, id);
	assert_string_equal(rq_json_get_str(m, "state"), "dead");
	assert_int_equal(dt_json_int(m, "attempts"), 1);
	assert_int_equal(dt_json_int(m, "last_code"), p->code);
	assert_string_equal(rq_json_get_str(m, "last_enhanced"), p->enh);
	assert_non_null(strstr(rq_json_get_str(m, "last_text"), p->text));
	const struct rq_json *r = dt_show_rcpt(m, p->rcpt);
	assert_non_null(r);
	assert_string_equal(rq_json_get_str(r, "s"), "failed");
	assert_int_equal(dt_json_int(r, "code"), p->code);
	assert_string_equal(rq_json_get_str(r, "enh"), p->enh);
	assert_string_equal(rq_json_get_str(r, "stage"), p->stage);
	const char *shown_hint = rq_json_get_str(r, "hint");
	if (!shown_hint || !*shown_hint)
		DT_FAIL(t, "%s: relayq show has no hint for %d %s", id, p->code, p->enh);
	rq_json_free(m);

	struct rq_json *e = dt_rcpt_entry(t, id, p->rcpt);
	if (!e)
		DT_FAIL(t, "%s: no entry for %s in the rcpt hash", id, p->rcpt);
	assert_string_equal(rq_json_get_str(e, "s"), "failed");
	assert_int_equal(dt_json_int(e, "code"), p->code);
	assert_string_equal(rq_json_get_str(e, "enh"), p->enh);
	assert_non_null(strstr(rq_json_get_str(e, "text"), p->text));
	assert_string_equal(rq_json_get_str(e, "stage"), p->stage);
	const char *hint = rq_json_get_str(e, "hint");
	const struct rq_hint *kb = rq_reply_hint(p->code, p->enh);
	if (!hint || !(strstr(hint, kb->meaning) || strstr(hint, kb->fix)))
		DT_FAIL(t, "%s: hint \"%s\" is not the knowledge base's for %d %s (\"%s\" / \"%s\")",
			id, hint ? hint : "(none)", p->code, p->enh, kb->meaning, kb->fix);
	/* the operator's view, `relayq show ID`, shows the hint too */
	char *out = NULL;
	int rc = dt_sh(&out, "'%s' show '%s' --redis '%s' --queue '%s' 2>&1", dt_relayq_bin(), id,
		       t->redis.url, t->queue);
	if (rc != 0 || !strstr(out, hint) || !strstr(out, p->text))
		DT_FAIL(t, "relayq show %s (exit %d) lacks the reply or the hint \"%s\":\n%s", id, rc,
			hint, out);
	free(out);
	/* and redis-cli, as an operator would type it */
	rc = dt_sh(&out, "redis-cli -s '%s' HGETALL '%s:rcpt:%s' 2>&1", t->redis.sock, t->prefix, id);
	if (rc != 0 || !strstr(out, p->rcpt) || !strstr(out, "\"hint\"") || !strstr(out, p->text))
		DT_FAIL(t, "redis-cli HGETALL %s:rcpt:%s (exit %d):\n%s", t->prefix, id, rc, out);
	free(out);
	rq_json_free(e);

	struct dt_event ev;
	if (!dt_find_event(t, id, p->rcpt, "failed", &ev))
		DT_FAIL(t, "%s: no failed event", id);
	assert_int_equal(atoi(ev.code), p->code);
	assert_string_equal(ev.enh, p->enh);
	assert_non_null(strstr(ev.text, p->text));
	assert_int_equal(ev.attempt, 1);
	assert_int_equal(dt_count_events(t, id, NULL, "deferred"), 0);
	assert_false(dt_in_zset(t, "scheduled", id));

	char needle[300];
	snprintf(needle, sizeof(needle), "C: RCPT TO:<%s>", p->rcpt);
	size_t sent = dt_count_in_transcripts(t, needle);
	if (sent != 1)
		DT_FAIL(t, "%s sent %zu times (a permanent failure is not retried)", p->rcpt, sent);
}

/* 550, 552, 553, 554 at RCPT and 554 at end of data: dead with the reply
 * and the hint. */
static void test_5xx_dead(void **state)
{
	struct dt *t = *state;
	static const struct perm perms[] = {
		{"u550@example.net", 550, "5.1.1", "No such user here", "rcpt"},
		{"u552@example.net", 552, "5.2.2", "Mailbox full", "rcpt"},
		{"u553@example.net", 553, "5.1.3", "Bad destination mailbox address", "rcpt"},
		{"u554@example.net", 554, "5.7.1", "Relay access denied", "rcpt"},
		{"dot554@example.net", 554, "5.6.0", "Message content rejected", "dot"},
	};
	const char *rules[] = {
		"rcpt addr=u550@example.net reply 550 5.1.1 No such user here",
		"rcpt addr=u552@example.net reply 552 5.2.2 Mailbox full",
		"rcpt addr=u553@example.net reply 553 5.1.3 Bad destination mailbox address syntax",
		"rcpt addr=u554@example.net reply 554 5.7.1 Relay access denied",
		"dot reply 554 5.6.0 Message content rejected",
		NULL,
	};
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1S);
	char *ids[5];
	for (int i = 0; i < 5; i++)
		ids[i] = dt_enqueue1(t, perms[i].rcpt, BODY);
	dt_daemon_start(t, 0);
	for (int i = 0; i < 5; i++)
		DT_WAIT(t, dt_cond_dead, ids[i], 30000, "%d %s: not in the dead set", perms[i].code,
			perms[i].stage);
	for (int i = 0; i < 5; i++)
		check_dead(t, ids[i], &perms[i]);
	assert_int_equal(dt_stat(t, "failed"), 5);
	assert_int_equal(dt_stat(t, "delivered"), 0);
	assert_int_equal(dt_count(t, "dead"), 5);
	assert_int_equal(dt_smtp_stat(t, "messages"), 0);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	for (int i = 0; i < 5; i++)
		free(ids[i]);
}

/* 2xx: delivered exactly as enqueued; keys gone; event and counter. */
static void test_2xx_delivered(void **state)
{
	struct dt *t = *state;
	dt_smtp_start(t, NULL);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1S);
	dt_daemon_start(t, 0);
	/* with the app's meta, which the event carries */
	redisReply *rep = dt_cmd(t, "FCALL relayq_enqueue 1 %s %s %s", t->prefix,
		"{\"from\":\"sender@example.com\",\"to\":[\"ok@example.net\"],"
		"\"meta\":{\"app\":\"e2e\",\"n\":7}}", BODY);
	if (rep->type != REDIS_REPLY_STRING)
		DT_FAIL(t, "enqueue: %s", rep->type == REDIS_REPLY_ERROR ? rep->str : "?");
	char *id = strdup(rep->str);
	freeReplyObject(rep);
	DT_WAIT(t, dt_cond_gone, id, 30000, "message not delivered");
	check_delivered(t, id, "ok@example.net", 1);
	struct dt_event ev;
	assert_true(dt_find_event(t, id, "ok@example.net", "delivered", &ev));
	assert_int_equal(atoi(ev.code), 250);
	struct rq_json *meta = rq_json_parse(ev.meta, strlen(ev.meta), 0, NULL, 0);
	if (!meta || !rq_json_get_str(meta, "app") || strcmp(rq_json_get_str(meta, "app"), "e2e") ||
	    dt_json_int(meta, "n") != 7)
		DT_FAIL(t, "the delivered event's meta is \"%s\", want the app's {app=e2e, n=7}",
			ev.meta);
	rq_json_free(meta);
	check_recorded_once(t, "ok@example.net", BODY);
	assert_int_equal(dt_stat(t, "delivered"), 1);
	assert_true(dt_cond_queue_empty(t, NULL));
	/* the raw DATA had its leading dots doubled on the wire */
	assert_true(dt_count_in_transcripts(t, "C: ..a line that starts with a dot\r\n") == 1);
	assert_true(dt_count_in_transcripts(t, "C: ...two dots\r\n") == 1);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* Recipients in two domains: both delivered (relay mode may group them
 * into one transaction), the message settled. */
static void test_two_domains(void **state)
{
	struct dt *t = *state;
	dt_smtp_start(t, NULL);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1S);
	dt_daemon_start(t, 0);
	const char *to[] = {"alice@example.net", "bob@example.org"};
	char *id = dt_enqueue(t, "sender@example.com", to, 2, BODY);
	DT_WAIT(t, dt_cond_gone, id, 30000, "two-domain message not settled");
	for (int i = 0; i < 2; i++) {
		struct dt_event ev;
		if (!dt_find_event(t, id, to[i], "delivered", &ev))
			DT_FAIL(t, "no delivered event for %s", to[i]);
		assert_int_equal(dt_count_events(t, id, to[i], "delivered"), 1);
		check_recorded_once(t, to[i], BODY);
	}
	assert_int_equal(dt_stat(t, "delivered"), 2);
	assert_true(dt_cond_queue_empty(t, NULL));
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* A recipient that keeps getting 4xx expires after max_attempts: dead,
 * with the last temporary reply. */
static void test_expired_after_max_attempts(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {"rcpt addr=never@example.net reply 451 4.2.0 Still busy", NULL};
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",",
		  DT_BACKOFF_1S "relayq.expire { max_age = \"5d\", max_attempts = 2 }\n");
	dt_daemon_start(t, 0);
	char *id = dt_enqueue1(t, "never@example.net", BODY);
	DT_WAIT(t, dt_cond_dead, id, 30000, "not dead after max_attempts");
	assert_int_equal(dt_count_events(t, id, "never@example.net", "deferred"), 1);
	struct dt_event ev;
	if (!dt_find_event(t, id, "never@example.net", "expired", &ev))
		DT_FAIL(t, "no expired event");
	assert_int_equal(atoi(ev.code), 451);
	assert_non_null(strstr(ev.text, "Still busy"));
	assert_int_equal(ev.attempt, 2);
	struct rq_json *m = dt_show(t, id);
	assert_string_equal(rq_json_get_str(m, "state"), "dead");
	assert_int_equal(dt_json_int(m, "attempts"), 2);
	const struct rq_json *r = dt_show_rcpt(m, "never@example.net");
	assert_string_equal(rq_json_get_str(r, "s"), "expired");
	assert_int_equal(dt_json_int(r, "code"), 451);
	rq_json_free(m);
	assert_int_equal(dt_stat(t, "expired"), 1);
	assert_int_equal(dt_count_in_transcripts(t, "C: RCPT TO:<never@example.net>"), 2);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* relayqd -c FILE --redis URL --queue NAME: the options beat the file. */
static void test_options_override_config(void **state)
{
	struct dt *t = *state;
	dt_smtp_start(t, NULL);
	char *text = NULL;
	assert_true(asprintf(&text,
		"relayq.config {\n"
		"  redis = \"unix:%s/no-such-redis.sock\",\n"
		"  queue = \"not-this-one\",\n"
		"  relay = \"[127.0.0.1]:%d\",\n"
		"  tls = \"none\",\n"
		"  helo = \"relayq.test\",\n"
		"}\n" DT_BACKOFF_1S, t->tmp, t->smtp_port) > 0);
	dt_write_file(t->cfg, text);
	free(text);
	const char *argv[] = {dt_relayqd_bin(), "-c", t->cfg, "--redis", t->redis.url,
			      "--queue", t->queue, NULL};
	assert_int_equal(th_spawn(&t->d[0], (char *const *)argv, t->dlog[0]), 0);
	t->druns[0]++;
	char *id = dt_enqueue1(t, "opt@example.net", BODY);
	DT_WAIT(t, dt_cond_gone, id, 30000, "not delivered with --redis/--queue");
	check_delivered(t, id, "opt@example.net", 1);
	check_recorded_once(t, "opt@example.net", BODY);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* Messages enqueued one right after another while the daemon is idle or
 * busy claiming: every one is picked up by itself (no lost wake-up: an
 * enqueue that lands while a claim is on its way must not be forgotten). */
static void test_back_to_back_enqueues(void **state)
{
	struct dt *t = *state;
	dt_smtp_start(t, NULL);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1S);
	dt_daemon_start(t, 0);
	for (int round = 0; round < 150; round++) {
		char a[64], b[64];
		snprintf(a, sizeof(a), "a%d@example.net", round);
		snprintf(b, sizeof(b), "b%d@example.net", round);
		char *ia = dt_enqueue1(t, a, BODY);
		if (round % 3)
			dt_sleep_ms(round % 7);
		char *ib = dt_enqueue1(t, b, BODY);
		DT_WAIT(t, dt_cond_gone, ia, 15000, "round %d: first message not delivered", round);
		DT_WAIT(t, dt_cond_gone, ib, 15000,
			"round %d: the second of two back-to-back messages was never picked up "
			"(a lost wake-up)", round);
		free(ia);
		free(ib);
	}
	assert_int_equal(dt_stat(t, "delivered"), 300);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_2xx_delivered, setup, teardown),
		cmocka_unit_test_setup_teardown(test_two_domains, setup, teardown),
		cmocka_unit_test_setup_teardown(test_4xx_deferred_then_delivered, setup, teardown),
		cmocka_unit_test_setup_teardown(test_4xx_retried_when_due, setup, teardown),
		cmocka_unit_test_setup_teardown(test_421_retried, setup, teardown),
		cmocka_unit_test_setup_teardown(test_5xx_dead, setup, teardown),
		cmocka_unit_test_setup_teardown(test_expired_after_max_attempts, setup, teardown),
		cmocka_unit_test_setup_teardown(test_options_override_config, setup, teardown),
		cmocka_unit_test_setup_teardown(test_back_to_back_enqueues, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * relayqd end to end, recipients and destinations:
 *
 *   a message to three recipients answered 250, 451, 550: the delivered one
 *       is never sent again, only the deferred one is retried, the failed
 *       one is in the dead record (with the delivered ones' state kept)
 *   the same, retried by the daemon itself (backoff 1 s)
 *   a relay that refuses connections: the messages' attempts are not
 *       burnt while refused (attempts stays 0), the destination is
 *       suspended, and delivery resumes by itself once a server listens
 *   421 / 554 greetings and a greeting timeout: deferred against the
 *       destination (attempts 0), delivered once a session works
 *   tls = "required" to a server without STARTTLS: deferred against the
 *       destination, nothing sent in plain text, delivered over verified
 *       TLS once the server offers it
 *   452 4.5.3 too many recipients: the rest sent at once in new
 *       transactions, each recipient exactly once, nothing deferred
 */
#include "daemon.h"


static int setup(void **state)
{
	return dt_state_setup(state, "dmixed", false);
}

static int teardown(void **state)
{
	return dt_state_teardown(state);
}

static const char BODY[] = "Subject: three recipients\r\n\r\nhello\r\n";

struct rcpt_count {
	const char *rcpt;
	int n;
};

static void count_rcpt(const char *env, const char *content, size_t len, void *arg)
{
	struct rcpt_count *c = arg;
	char line[200];
	snprintf(line, sizeof(line), "RCPT TO:<%s>\n", c->rcpt);
	if (strstr(env, line) && len == strlen(BODY) && !memcmp(content, BODY, len))
		c->n++;
}

static int recorded(struct dt *t, const char *rcpt)
{
	struct rcpt_count c = {rcpt, 0};
	dt_each_message(t, count_rcpt, &c);
	return c.n;
}

static size_t sent_rcpt(struct dt *t, const char *rcpt)
{
	char needle[200];
	snprintf(needle, sizeof(needle), "C: RCPT TO:<%s>", rcpt);
	return dt_count_in_transcripts(t, needle);
}

static const char *RULES[] = {
	"rcpt addr=later@example.net times=1 reply 451 4.2.1 Mailbox busy, try later",
	"rcpt addr=bad@example.net reply 550 5.1.1 No such user",
	NULL,
};

static void check_entry(struct dt *t, const char *id, const char *rcpt, const char *s, int code)
{
	struct rq_json *e = dt_rcpt_entry(t, id, rcpt);
	if (!e)
		DT_FAIL(t, "%s: no entry for %s in the rcpt hash", id, rcpt);
	if (strcmp(rq_json_get_str(e, "s"), s) != 0)
		DT_FAIL(t, "%s: %s is %s, want %s", id, rcpt, rq_json_get_str(e, "s"), s);
	if (code)
		assert_int_equal(dt_json_int(e, "code"), code);
	rq_json_free(e);
}

static void check_final(struct dt *t, const char *id)
{
	/* dead (one recipient failed), the others delivered exactly once */
	assert_true(dt_in_zset(t, "dead", id));
	struct rq_json *m = dt_show(t, id);
	assert_string_equal(rq_json_get_str(m, "state"), "dead");
	const struct rq_json *r = dt_show_rcpt(m, "bad@example.net");
	assert_non_null(r);
	assert_string_equal(rq_json_get_str(r, "s"), "failed");
	assert_int_equal(dt_json_int(r, "code"), 550);
	const char *hint = rq_json_get_str(r, "hint");
	assert_true(hint && *hint);
	r = dt_show_rcpt(m, "later@example.net");
	assert_non_null(r);
	assert_string_equal(rq_json_get_str(r, "s"), "delivered");
	r = dt_show_rcpt(m, "ok@example.net");
	assert_non_null(r);
	assert_string_equal(rq_json_get_str(r, "s"), "delivered");
	assert_int_equal(dt_json_int(m, "attempts"), 2);
	rq_json_free(m);
	check_entry(t, id, "bad@example.net", "failed", 550);

	/* the fixture: each delivered recipient exactly once across attempts */
	if (recorded(t, "ok@example.net") != 1 || recorded(t, "later@example.net") != 1)
		DT_FAIL(t, "recorded ok@ %d time(s), later@ %d time(s) (want 1 each)",
			recorded(t, "ok@example.net"), recorded(t, "later@example.net"));
	assert_int_equal(recorded(t, "bad@example.net"), 0);
	/* on the wire: ok@ and bad@ sent once, later@ twice (451, then 250) */
	if (sent_rcpt(t, "ok@example.net") != 1)
		DT_FAIL(t, "RCPT TO:<ok@example.net> sent %zu times (delivered: never again)",
			sent_rcpt(t, "ok@example.net"));
	if (sent_rcpt(t, "bad@example.net") != 1)
		DT_FAIL(t, "RCPT TO:<bad@example.net> sent %zu times (failed: never again)",
			sent_rcpt(t, "bad@example.net"));
	assert_int_equal(sent_rcpt(t, "later@example.net"), 2);

	/* events: one per recipient outcome */
	assert_int_equal(dt_count_events(t, id, "ok@example.net", "delivered"), 1);
	assert_int_equal(dt_count_events(t, id, "later@example.net", "deferred"), 1);
	assert_int_equal(dt_count_events(t, id, "later@example.net", "delivered"), 1);
	assert_int_equal(dt_count_events(t, id, "bad@example.net", "failed"), 1);
	struct dt_event ev;
	assert_true(dt_find_event(t, id, "later@example.net", "delivered", &ev));
	assert_int_equal(ev.attempt, 2);
	assert_int_equal(dt_stat(t, "delivered"), 2);
	assert_int_equal(dt_stat(t, "failed"), 1);
	assert_int_equal(dt_stat(t, "deferred"), 1);
}

/* Between the attempts (backoff 1h), then flushed. */
static void test_mixed_flushed(void **state)
{
	struct dt *t = *state;
	dt_smtp_start(t, RULES);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1H);
	const char *to[] = {"ok@example.net", "later@example.net", "bad@example.net"};
	char *id = dt_enqueue(t, "sender@example.com", to, 3, BODY);
	dt_daemon_start(t, 0);
	DT_WAIT(t, dt_cond_scheduled, id, 30000, "mixed message not scheduled");

	struct rq_json *m = dt_show(t, id);
	assert_string_equal(rq_json_get_str(m, "state"), "scheduled");
	assert_int_equal(dt_json_int(m, "attempts"), 1);
	assert_int_equal(dt_json_int(m, "failed"), 1);
	const struct rq_json *pending = rq_json_get(m, "pending");
	if (!pending || pending->count != 1 ||
	    strcmp(rq_json_at(pending, 0)->str, "later@example.net") != 0)
		DT_FAIL(t, "pending is not [later@example.net]");
	const struct rq_json *r = dt_show_rcpt(m, "ok@example.net");
	assert_string_equal(rq_json_get_str(r, "s"), "delivered");
	r = dt_show_rcpt(m, "later@example.net");
	assert_string_equal(rq_json_get_str(r, "s"), "deferred");
	assert_int_equal(dt_json_int(r, "code"), 451);
	r = dt_show_rcpt(m, "bad@example.net");
	assert_string_equal(rq_json_get_str(r, "s"), "failed");
	/* the last reply that was not a delivery */
	int64_t last = dt_json_int(m, "last_code");
	assert_true(last == 451 || last == 550);
	rq_json_free(m);
	check_entry(t, id, "ok@example.net", "delivered", 0);
	check_entry(t, id, "later@example.net", "deferred", 451);
	check_entry(t, id, "bad@example.net", "failed", 550);
	assert_int_equal(recorded(t, "ok@example.net"), 1);

	char *out = NULL;
	int rc = dt_sh(&out, "'%s' flush --all --redis '%s' --queue '%s' 2>&1", dt_relayq_bin(),
		       t->redis.url, t->queue);
	if (rc != 0)
		DT_FAIL(t, "relayq flush: exit %d: %s", rc, out);
	free(out);
	DT_WAIT(t, dt_cond_dead, id, 30000, "mixed message not dead after the retry");
	check_final(t, id);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* The daemon retries the deferred recipient by itself. */
static void test_mixed_retried(void **state)
{
	struct dt *t = *state;
	dt_smtp_start(t, RULES);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1S);
	dt_daemon_start(t, 0);
	const char *to[] = {"ok@example.net", "later@example.net", "bad@example.net"};
	char *id = dt_enqueue(t, "sender@example.com", to, 3, BODY);
	DT_WAIT(t, dt_cond_dead, id, 30000, "mixed message not dead after the retry");
	check_final(t, id);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

struct refused {
	char **ids;
	size_t n;
	bool burnt;                /* some message's attempts went above 0 */
	char burnt_id[64];
};

/* Every message deferred at least twice by "refused", none burnt. */
static bool cond_refused_twice(struct dt *t, void *arg)
{
	struct refused *r = arg;
	bool all = true;
	for (size_t i = 0; i < r->n; i++) {
		char *a = dt_msg_field(t, r->ids[i], "attempts");
		if (a && atoll(a) != 0 && !r->burnt) {
			r->burnt = true;
			snprintf(r->burnt_id, sizeof(r->burnt_id), "%s", r->ids[i]);
		}
		free(a);
		if (dt_count_events(t, r->ids[i], NULL, "deferred") < 2)
			all = false;
	}
	return all;
}

static bool cond_all_gone(struct dt *t, void *arg)
{
	struct refused *r = arg;
	for (size_t i = 0; i < r->n; i++)
		if (dt_msg_exists(t, r->ids[i]))
			return false;
	return true;
}

static bool log_has(struct dt *t, const char *needle)
{
	char *s = th_read_file(t->dlog[0], NULL);
	bool has = s && strstr(s, needle);
	free(s);
	return has;
}

static void test_refused_then_resumed(void **state)
{
	struct dt *t = *state;
	int port = th_free_port();
	dt_config_port(t, port, "  lease = \"30s\",\n  timeouts = { connect = \"5s\" },",
		       DT_BACKOFF_1S);
	char *ids[3];
	for (int i = 0; i < 3; i++) {
		char rcpt[64];
		snprintf(rcpt, sizeof(rcpt), "r%d@example.net", i);
		ids[i] = dt_enqueue1(t, rcpt, BODY);
	}
	struct refused r = {ids, 3, false, ""};
	dt_daemon_start(t, 0);
	DT_WAIT(t, cond_refused_twice, &r, 40000,
		"the messages were not deferred twice while the relay refused");
	if (r.burnt)
		DT_FAIL(t, "%s: attempts went above 0 while the relay refused connections "
			"(a destination failure must not burn the message's attempts)", r.burnt_id);
	for (int i = 0; i < 3; i++) {
		struct rq_json *m = dt_show(t, ids[i]);
		assert_int_equal(dt_json_int(m, "attempts"), 0);
		const char *text = rq_json_get_str(m, "last_text");
		assert_non_null(text);
		rq_json_free(m);
		struct dt_event ev;
		assert_true(dt_find_event(t, ids[i], NULL, "deferred", &ev));
		assert_int_equal(ev.attempt, 0);
	}
	/* the destination was suspended, and the operator can see it */
	if (!log_has(t, "suspend"))
		DT_FAIL(t, "no suspension of the refusing destination in the log");

	/* a server appears on the port: delivery resumes by itself */
	dt_smtp_start_argv(t, port, NULL);
	DT_WAIT(t, cond_all_gone, &r, 40000, "delivery did not resume once the server listened");
	for (int i = 0; i < 3; i++) {
		struct dt_event ev;
		char rcpt[64];
		snprintf(rcpt, sizeof(rcpt), "r%d@example.net", i);
		if (!dt_find_event(t, ids[i], rcpt, "delivered", &ev))
			DT_FAIL(t, "%s: no delivered event", ids[i]);
		assert_int_equal(ev.attempt, 1);
		assert_int_equal(recorded(t, rcpt), 1);
	}
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	for (int i = 0; i < 3; i++)
		free(ids[i]);
}

/* Session-level failures (421 and 554 greetings, a greeting that never
 * comes) count against the destination: the message is deferred without
 * burning attempts and delivered once a session works. */
static void test_greeting_failures(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {
		"greeting conn=1 reply 421 4.3.2 Too busy, come back later",
		"greeting conn=2 reply 554 5.3.2 No SMTP service here",
		"greeting conn=3 stall",
		NULL,
	};
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",\n  timeouts = { greeting = \"1s\" },", DT_BACKOFF_1S);
	dt_daemon_start(t, 0);
	char *id = dt_enqueue1(t, "g@example.net", BODY);
	DT_WAIT(t, dt_cond_gone, id, 60000, "not delivered after three failed sessions");
	assert_true(dt_smtp_stat(t, "connections") >= 4);
	struct dt_event evs[32];
	size_t n = dt_events(t, id, evs, 32), deferred = 0;
	for (size_t i = 0; i < n; i++) {
		if (!strcmp(evs[i].type, "failed"))
			DT_FAIL(t, "a greeting failure failed the message: %s %s", evs[i].code,
				evs[i].text);
		if (!strcmp(evs[i].type, "deferred")) {
			deferred++;
			if (evs[i].attempt != 0)
				DT_FAIL(t, "a session failure (%s %s) burnt an attempt (attempt %lld)",
					evs[i].code, evs[i].text, evs[i].attempt);
		}
	}
	if (deferred < 3)
		DT_FAIL(t, "%zu deferred events for three failed sessions", deferred);
	struct dt_event ev;
	assert_true(dt_find_event_code(t, id, "g@example.net", "deferred", 421, &ev));
	assert_true(dt_find_event_code(t, id, "g@example.net", "deferred", 554, &ev));
	assert_true(dt_find_event(t, id, "g@example.net", "delivered", &ev));
	assert_int_equal(ev.attempt, 1);
	assert_int_equal(recorded(t, "g@example.net"), 1);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* tls = "required" to a server without STARTTLS: deferred against the
 * destination (attempts 0), never sent in plain text; delivered over TLS
 * (verified with the test CA) once the server offers it. */
static void test_tls_required(void **state)
{
	struct dt *t = *state;
	int port = th_free_port();
	dt_smtp_start_argv(t, port, NULL);
	char keys[1024];
	snprintf(keys, sizeof(keys),
		 "  lease = \"30s\",\n  tls = \"required\",\n"
		 "  tls_ca_file = \"%s/tests/fixtures/tls/ca.pem\",",
		 th_source_root());
	/* dt_config writes tls = "none" first; a second tls key is an error,
	 * so write the file by hand */
	char *text = NULL;
	assert_true(asprintf(&text,
		"relayq.config {\n  redis = \"%s\",\n  queue = \"%s\",\n"
		"  relay = \"[127.0.0.1]:%d\",\n  helo = \"relayq.test\",\n%s\n}\n%s",
		t->redis.url, t->queue, port, keys, DT_BACKOFF_1S) > 0);
	dt_write_file(t->cfg, text);
	free(text);
	char *id = dt_enqueue1(t, "tls@example.net", BODY);
	struct refused r = {&id, 1, false, ""};
	dt_daemon_start(t, 0);
	DT_WAIT(t, cond_refused_twice, &r, 40000,
		"not deferred twice while the server offered no STARTTLS");
	if (r.burnt)
		DT_FAIL(t, "attempts went above 0 while TLS was unavailable (a destination failure)");
	assert_int_equal(dt_count_in_transcripts(t, "C: MAIL FROM"), 0);
	assert_int_equal(dt_smtp_stat(t, "messages"), 0);

	dt_smtp_stop(t);
	const char *args[] = {"--starttls", NULL};
	dt_smtp_start_argv(t, port, args);
	DT_WAIT(t, dt_cond_gone, id, 40000, "not delivered once the server offered STARTTLS");
	assert_true(dt_smtp_stat(t, "tls") >= 1);
	assert_int_equal(recorded(t, "tls@example.net"), 1);
	struct dt_event ev;
	assert_true(dt_find_event(t, id, "tls@example.net", "delivered", &ev));
	assert_int_equal(ev.attempt, 1);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

/* "452 4.5.3 Too many recipients" after two RCPTs: the rest go in new
 * transactions at once, each recipient delivered exactly once, no attempt
 * burnt, nothing deferred. */
static void test_too_many_recipients(void **state)
{
	struct dt *t = *state;
	const char *rules[] = {"rcpt rcpt=3- reply 452 4.5.3 Too many recipients", NULL};
	dt_smtp_start(t, rules);
	dt_config(t, "  lease = \"30s\",", DT_BACKOFF_1H);
	const char *to[] = {"m1@example.net", "m2@example.net", "m3@example.net",
			    "m4@example.net", "m5@example.net"};
	char *id = dt_enqueue(t, "sender@example.com", to, 5, BODY);
	dt_daemon_start(t, 0);
	DT_WAIT(t, dt_cond_gone, id, 30000, "five-recipient message not delivered");
	for (int i = 0; i < 5; i++) {
		if (recorded(t, to[i]) != 1)
			DT_FAIL(t, "%s recorded %d times (want 1)", to[i], recorded(t, to[i]));
		struct dt_event ev;
		if (!dt_find_event(t, id, to[i], "delivered", &ev))
			DT_FAIL(t, "no delivered event for %s", to[i]);
		assert_int_equal(ev.attempt, 1);
	}
	assert_int_equal(dt_count_events(t, id, NULL, "deferred"), 0);
	assert_int_equal(dt_stat(t, "delivered"), 5);
	assert_true(dt_smtp_stat(t, "messages") >= 3);
	dt_daemon_stop(t, 0);
	dt_smtp_stop(t);
	free(id);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_mixed_flushed, setup, teardown),
		cmocka_unit_test_setup_teardown(test_mixed_retried, setup, teardown),
		cmocka_unit_test_setup_teardown(test_refused_then_resumed, setup, teardown),
		cmocka_unit_test_setup_teardown(test_greeting_failures, setup, teardown),
		cmocka_unit_test_setup_teardown(test_tls_required, setup, teardown),
		cmocka_unit_test_setup_teardown(test_too_many_recipients, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

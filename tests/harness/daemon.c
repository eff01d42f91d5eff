/* The daemon tests' helpers (see daemon.h): compiled once into the
 * harness library. */
#include "daemon.h"

void dt_sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

int64_t dt_now_ms(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

const char *dt_relayqd_bin(void)
{
	const char *e = getenv("RELAYQD_BIN");
	static char buf[600];
	if (e && *e)
		return e;
	snprintf(buf, sizeof(buf), "%s/relayqd", th_build_root());
	return buf;
}

const char *dt_relayq_bin(void)
{
	const char *e = getenv("RELAYQ_BIN");
	static char buf[600];
	if (e && *e)
		return e;
	snprintf(buf, sizeof(buf), "%s/relayq", th_build_root());
	return buf;
}

const char *dt_fakesmtpd_bin(void)
{
	static char buf[600];
	snprintf(buf, sizeof(buf), "%s/tests/fakesmtpd", th_build_root());
	return buf;
}

void dt_dump_log(const char *what, const char *path)
{
	size_t len = 0;
	char *s = th_read_file(path, &len);
	if (!s)
		return;
	size_t from = len > 6000 ? len - 6000 : 0;
	fprintf(stderr, "---- %s (%s), last %zu bytes ----\n%s\n---- end ----\n", what,
		path, len - from, s + from);
	free(s);
}

void dt_dump_all(struct dt *t)
{
	for (int i = 0; i < DT_DAEMONS; i++)
		if (t->druns[i])
			dt_dump_log("relayqd log", t->dlog[i]);
	if (t->smtp_runs)
		dt_dump_log("fakesmtpd log", t->smtp_log);
}

void dt_setup(struct dt *t, const char *tag, bool aof)
{
	memset(t, 0, sizeof(*t));
	th_redis_start(&t->redis, aof);
	t->tmp = th_mkdtemp(tag);
	snprintf(t->queue, sizeof(t->queue), "%s", th_unique_queue(tag));
	snprintf(t->prefix, sizeof(t->prefix), "relayq:{%s}", t->queue);
	snprintf(t->cfg, sizeof(t->cfg), "%s/relayq.lua", t->tmp);
	snprintf(t->rec, sizeof(t->rec), "%s/rec", t->tmp);
	snprintf(t->smtp_log, sizeof(t->smtp_log), "%s/fakesmtpd.log", t->tmp);
	for (int i = 0; i < DT_DAEMONS; i++)
		snprintf(t->dlog[i], sizeof(t->dlog[i]), "%s/relayqd-%d.log", t->tmp, i);
	t->c = th_redis_connect(&t->redis);
}

void dt_reconnect(struct dt *t)
{
	if (t->c)
		redisFree(t->c);
	t->c = th_redis_connect(&t->redis);
}

void dt_teardown(struct dt *t)
{
	for (int i = 0; i < DT_DAEMONS; i++)
		if (t->d[i].pid > 0)
			th_stop(&t->d[i], SIGKILL);
	if (t->smtp.pid > 0)
		th_stop(&t->smtp, SIGKILL);
	if (t->c)
		redisFree(t->c);
	t->c = NULL;
	th_redis_stop(&t->redis);
	if (t->tmp) {
		/* DT_KEEP=1 keeps the logs and records for a post-mortem */
		if (getenv("DT_KEEP"))
			fprintf(stderr, "kept %s\n", t->tmp);
		else
			th_rmrf(t->tmp);
		free(t->tmp);
	}
	t->tmp = NULL;
}

int dt_state_setup(void **state, const char *tag, bool aof)
{
	struct dt *t = calloc(1, sizeof(*t));
	if (!t)
		return -1;
	dt_setup(t, tag, aof);
	*state = t;
	return 0;
}

int dt_state_teardown(void **state)
{
	struct dt *t = *state;
	dt_teardown(t);
	free(t);
	return 0;
}

void dt_write_file(const char *path, const char *text)
{
	char tmp[600];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	assert_non_null(f);
	assert_int_equal(fputs(text, f) >= 0, 1);
	assert_int_equal(fclose(f), 0);
	assert_int_equal(rename(tmp, path), 0);
}

void dt_config_port(struct dt *t, int port, const char *keys, const char *rest)
{
	char *text = NULL;
	int n = asprintf(&text,
		"relayq.config {\n"
		"  redis = \"%s\",\n"
		"  queue = \"%s\",\n"
		"  relay = \"[127.0.0.1]:%d\",\n"
		"  tls = \"none\",\n"
		"  helo = \"relayq.test\",\n"
		"  log_level = \"%s\",\n"
		"%s\n"
		"}\n%s\n",
		t->redis.url, t->queue, port,
		getenv("DT_LOG_LEVEL") ? getenv("DT_LOG_LEVEL") : "info", keys ? keys : "",
		rest ? rest : "");
	assert_true(n > 0);
	dt_write_file(t->cfg, text);
	free(text);
}

void dt_config(struct dt *t, const char *keys, const char *rest)
{
	dt_config_port(t, t->smtp_port, keys, rest);
}

void dt_smtp_start_argv(struct dt *t, int port, const char *const *extra)
{
	char listen[64];
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
	const char *argv[64];
	size_t n = 0;
	argv[n++] = dt_fakesmtpd_bin();
	argv[n++] = "--listen";
	argv[n++] = listen;
	argv[n++] = "--record";
	argv[n++] = t->rec;
	for (size_t i = 0; extra && extra[i]; i++) {
		assert_true(n < 62);
		argv[n++] = extra[i];
	}
	argv[n] = NULL;
	unlink(t->smtp_log);
	assert_int_equal(th_spawn(&t->smtp, (char *const *)argv, t->smtp_log), 0);
	t->smtp_runs++;
	int64_t deadline = dt_now_ms() + 15000;
	for (;;) {
		char *s = th_read_file(t->smtp_log, NULL);
		const char *r = s ? strstr(s, "ready ") : NULL;
		if (r) {
			t->smtp_port = atoi(r + 6);
			free(s);
			break;
		}
		free(s);
		if (!th_alive(&t->smtp))
			DT_FAIL(t, "fakesmtpd exited at start");
		if (dt_now_ms() > deadline)
			DT_FAIL(t, "fakesmtpd not ready after 15 s");
		dt_sleep_ms(10);
	}
	assert_true(t->smtp_port > 0);
	if (port)
		assert_int_equal(t->smtp_port, port);
}

void dt_smtp_start(struct dt *t, const char *const *rules)
{
	const char *argv[48];
	size_t n = 0;
	for (size_t i = 0; rules && rules[i]; i++) {
		assert_true(n < 46);
		argv[n++] = "--rule";
		argv[n++] = rules[i];
	}
	argv[n] = NULL;
	dt_smtp_start_argv(t, 0, argv);
}

void dt_smtp_stop(struct dt *t)
{
	if (t->smtp.pid <= 0)
		return;
	int st = th_stop(&t->smtp, SIGTERM);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		DT_FAIL(t, "fakesmtpd did not exit 0 on SIGTERM (status %d)", st);
}

long dt_smtp_stat(struct dt *t, const char *key)
{
	char path[600];
	snprintf(path, sizeof(path), "%s/stats", t->rec);
	char *s = th_read_file(path, NULL);
	if (!s)
		return 0;
	long v = 0;
	size_t kl = strlen(key);
	for (char *p = s; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
			v = atol(p + kl + 1);
			break;
		}
	}
	free(s);
	return v;
}

size_t dt_each_message(struct dt *t, dt_msg_fn fn, void *arg)
{
	DIR *d = opendir(t->rec);
	if (!d)
		return 0;
	size_t n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		size_t l = strlen(e->d_name);
		if (strncmp(e->d_name, "msg-", 4) != 0 || l < 8 ||
		    strcmp(e->d_name + l - 4, ".eml") != 0)
			continue;
		char path[1200], envp[1200];
		snprintf(path, sizeof(path), "%s/%s", t->rec, e->d_name);
		snprintf(envp, sizeof(envp), "%s/%.*s.env", t->rec, (int)(l - 4), e->d_name);
		size_t len = 0;
		char *content = th_read_file(path, &len);
		/* the .env is written before the .eml: present when the .eml is */
		char *env = th_read_file(envp, NULL);
		if (content) {
			n++;
			if (fn)
				fn(env ? env : "", content, len, arg);
		}
		free(content);
		free(env);
	}
	closedir(d);
	return n;
}

size_t dt_count_in_transcripts(struct dt *t, const char *needle)
{
	DIR *d = opendir(t->rec);
	if (!d)
		return 0;
	size_t n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		size_t l = strlen(e->d_name);
		if (strncmp(e->d_name, "conn-", 5) != 0 || l < 9 ||
		    strcmp(e->d_name + l - 4, ".log") != 0)
			continue;
		char path[1200];
		snprintf(path, sizeof(path), "%s/%s", t->rec, e->d_name);
		char *s = th_read_file(path, NULL);
		for (const char *p = s; p && (p = strstr(p, needle)) != NULL; p += strlen(needle))
			n++;
		free(s);
	}
	closedir(d);
	return n;
}

size_t dt_file_size(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 ? (size_t)st.st_size : 0;
}

void dt_daemon_start(struct dt *t, int i)
{
	const char *argv[] = {dt_relayqd_bin(), "-c", t->cfg, NULL};
	assert_int_equal(th_spawn(&t->d[i], (char *const *)argv, t->dlog[i]), 0);
	t->druns[i]++;
}

bool dt_log_has_sanitizer_report(const char *path)
{
	char *s = th_read_file(path, NULL);
	bool bad = s && (strstr(s, "ERROR: AddressSanitizer") ||
			 strstr(s, "ERROR: LeakSanitizer") ||
			 strstr(s, "runtime error:"));
	free(s);
	return bad;
}

void dt_daemon_check_alive(struct dt *t, int i)
{
	if (t->d[i].pid > 0 && !th_alive(&t->d[i]))
		DT_FAIL(t, "relayqd %d exited while it should run", i);
}

void dt_daemon_stop(struct dt *t, int i)
{
	if (t->d[i].pid <= 0)
		DT_FAIL(t, "relayqd %d is not running at stop", i);
	pid_t pid = t->d[i].pid;
	kill(pid, SIGTERM);
	int st = 0;
	int64_t deadline = dt_now_ms() + 30000;
	for (;;) {
		pid_t r = waitpid(pid, &st, WNOHANG);
		if (r == pid)
			break;
		if (dt_now_ms() > deadline) {
			th_stop(&t->d[i], SIGKILL);
			DT_FAIL(t, "relayqd %d did not exit within 30 s of SIGTERM", i);
		}
		dt_sleep_ms(10);
	}
	t->d[i].pid = 0;
	if (dt_log_has_sanitizer_report(t->dlog[i]))
		DT_FAIL(t, "relayqd %d: sanitizer report in its log", i);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		DT_FAIL(t, "relayqd %d: exit status %d%s (want exit 0 on SIGTERM)", i,
			WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st),
			WIFEXITED(st) ? "" : " (signal)");
}

void dt_daemon_kill9(struct dt *t, int i)
{
	if (t->d[i].pid > 0)
		th_stop(&t->d[i], SIGKILL);
	if (dt_log_has_sanitizer_report(t->dlog[i]))
		DT_FAIL(t, "relayqd %d: sanitizer report in its log", i);
}

redisReply *dt_cmd(struct dt *t, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(t->c, fmt, ap);
	va_end(ap);
	if (!r)
		DT_FAIL(t, "redis: %s", t->c->errstr);
	return r;
}

long long dt_int(struct dt *t, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	redisReply *r = redisvCommand(t->c, fmt, ap);
	va_end(ap);
	if (!r)
		DT_FAIL(t, "redis: %s", t->c->errstr);
	long long v = -1;
	if (r->type == REDIS_REPLY_INTEGER)
		v = r->integer;
	else if (r->type == REDIS_REPLY_STRING)
		v = atoll(r->str);
	else if (r->type == REDIS_REPLY_NIL)
		v = 0;
	else if (r->type == REDIS_REPLY_ERROR)
		DT_FAIL(t, "redis error: %s", r->str);
	freeReplyObject(r);
	return v;
}

long long dt_count(struct dt *t, const char *what)
{
	if (strcmp(what, "ready") == 0)
		return dt_int(t, "LLEN %s:ready", t->prefix);
	return dt_int(t, "ZCARD %s:%s", t->prefix, what);
}

long long dt_stat(struct dt *t, const char *name)
{
	return dt_int(t, "HGET %s:stats %s", t->prefix, name);
}

bool dt_in_zset(struct dt *t, const char *set, const char *id)
{
	redisReply *r = dt_cmd(t, "ZSCORE %s:%s %s", t->prefix, set, id);
	bool in = r->type == REDIS_REPLY_STRING;
	freeReplyObject(r);
	return in;
}

int64_t dt_zscore(struct dt *t, const char *set, const char *id)
{
	redisReply *r = dt_cmd(t, "ZSCORE %s:%s %s", t->prefix, set, id);
	int64_t v = r->type == REDIS_REPLY_STRING ? (int64_t)atoll(r->str) : -1;
	freeReplyObject(r);
	return v;
}

bool dt_msg_exists(struct dt *t, const char *id)
{
	return dt_int(t, "EXISTS %s:msg:%s", t->prefix, id) == 1;
}

char *dt_msg_field(struct dt *t, const char *id, const char *field)
{
	redisReply *r = dt_cmd(t, "HGET %s:msg:%s %s", t->prefix, id, field);
	char *s = r->type == REDIS_REPLY_STRING ? strdup(r->str) : NULL;
	freeReplyObject(r);
	return s;
}

struct rq_json *dt_rcpt_entry(struct dt *t, const char *id, const char *rcpt)
{
	redisReply *r = dt_cmd(t, "HGETALL %s:rcpt:%s", t->prefix, id);
	struct rq_json *j = NULL;
	if (r->type == REDIS_REPLY_ARRAY) {
		for (size_t i = 0; i + 1 < r->elements; i += 2) {
			if (strcmp(r->element[i]->str, rcpt) == 0) {
				char err[128];
				j = rq_json_parse(r->element[i + 1]->str, r->element[i + 1]->len,
						  RQ_JSON_LAX_UTF8, err, sizeof(err));
				if (!j)
					DT_FAIL(t, "rcpt entry of %s is not JSON: %s", rcpt, err);
			}
		}
	}
	freeReplyObject(r);
	return j;
}

char *dt_envelope(const char *from, const char *const *to, size_t nto)
{
	char *s = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&s, &len);
	assert_non_null(f);
	fprintf(f, "{\"from\":\"%s\",\"to\":[", from);
	for (size_t i = 0; i < nto; i++)
		fprintf(f, "%s\"%s\"", i ? "," : "", to[i]);
	fputs("]}", f);
	fclose(f);
	return s;
}

char *dt_enqueue(struct dt *t, const char *from, const char *const *to, size_t nto,
		 const char *body)
{
	char *env = dt_envelope(from, to, nto);
	redisReply *r = dt_cmd(t, "FCALL relayq_enqueue 1 %s %s %s", t->prefix, env, body);
	free(env);
	if (r->type != REDIS_REPLY_STRING)
		DT_FAIL(t, "enqueue: %s", r->type == REDIS_REPLY_ERROR ? r->str : "not a string");
	char *id = strdup(r->str);
	freeReplyObject(r);
	return id;
}

char *dt_enqueue1(struct dt *t, const char *to, const char *body)
{
	const char *rc[] = {to};
	return dt_enqueue(t, "sender@example.com", rc, 1, body);
}

void dt_bulk_body(char *buf, size_t len, const char *tag, size_t i)
{
	snprintf(buf, len,
		 "From: <sender@example.com>\r\nTo: <rcpt@example.net>\r\n"
		 "Subject: bulk %zu\r\nX-Token: %s-%zu-end\r\n\r\nmessage %zu of the run\r\n",
		 i, tag, i, i);
}

void dt_enqueue_bulk(struct dt *t, const char *tag, size_t n)
{
	const char *to[] = {"rcpt@example.net"};
	char *env = dt_envelope("sender@example.com", to, 1);
	char body[512];
	for (size_t done = 0; done < n;) {
		size_t k = n - done < 500 ? n - done : 500;
		for (size_t i = 0; i < k; i++) {
			dt_bulk_body(body, sizeof(body), tag, done + i);
			redisAppendCommand(t->c, "FCALL relayq_enqueue 1 %s %s %s", t->prefix,
					   env, body);
		}
		for (size_t i = 0; i < k; i++) {
			void *rv = NULL;
			if (redisGetReply(t->c, &rv) != REDIS_OK)
				DT_FAIL(t, "enqueue: %s", t->c->errstr);
			redisReply *r = rv;
			if (r->type != REDIS_REPLY_STRING)
				DT_FAIL(t, "enqueue: %s",
					r->type == REDIS_REPLY_ERROR ? r->str : "not a string");
			freeReplyObject(r);
		}
		done += k;
	}
	free(env);
}

size_t dt_events(struct dt *t, const char *id, struct dt_event *out, size_t max)
{
	redisReply *r = dt_cmd(t, "XRANGE %s:events - +", t->prefix);
	size_t n = 0;
	for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
		redisReply *e = r->element[i];
		if (e->type != REDIS_REPLY_ARRAY || e->elements != 2)
			continue;
		redisReply *f = e->element[1];
		bool mine = false;
		struct dt_event ev;
		memset(&ev, 0, sizeof(ev));
		ev.ms = atoll(e->element[0]->str);
		for (size_t k = 0; k + 1 < f->elements; k += 2) {
			const char *key = f->element[k]->str, *v = f->element[k + 1]->str;
			if (!strcmp(key, "id"))
				mine = !strcmp(v, id);
			else if (!strcmp(key, "type"))
				snprintf(ev.type, sizeof(ev.type), "%s", v);
			else if (!strcmp(key, "rcpt"))
				snprintf(ev.rcpt, sizeof(ev.rcpt), "%s", v);
			else if (!strcmp(key, "code"))
				snprintf(ev.code, sizeof(ev.code), "%s", v);
			else if (!strcmp(key, "enh"))
				snprintf(ev.enh, sizeof(ev.enh), "%s", v);
			else if (!strcmp(key, "text"))
				snprintf(ev.text, sizeof(ev.text), "%s", v);
			else if (!strcmp(key, "stage"))
				snprintf(ev.stage, sizeof(ev.stage), "%s", v);
			else if (!strcmp(key, "meta"))
				snprintf(ev.meta, sizeof(ev.meta), "%s", v);
			else if (!strcmp(key, "attempt"))
				ev.attempt = atoll(v);
			else if (!strcmp(key, "next"))
				ev.next = *v ? atoll(v) : 0;
		}
		if (mine && n < max)
			out[n++] = ev;
	}
	freeReplyObject(r);
	return n;
}

bool dt_find_event(struct dt *t, const char *id, const char *rcpt, const char *type,
		   struct dt_event *out)
{
	struct dt_event ev[32];
	size_t n = dt_events(t, id, ev, 32);
	bool found = false;
	for (size_t i = 0; i < n; i++)
		if (!strcmp(ev[i].type, type) && (!rcpt || !strcmp(ev[i].rcpt, rcpt))) {
			*out = ev[i];
			found = true;
		}
	return found;
}

bool dt_find_event_code(struct dt *t, const char *id, const char *rcpt,
			const char *type, int code, struct dt_event *out)
{
	struct dt_event ev[32];
	size_t n = dt_events(t, id, ev, 32);
	for (size_t i = 0; i < n; i++)
		if (!strcmp(ev[i].type, type) && (!rcpt || !strcmp(ev[i].rcpt, rcpt)) &&
		    (code == 0 || atoi(ev[i].code) == code)) {
			*out = ev[i];
			return true;
		}
	return false;
}

size_t dt_count_events(struct dt *t, const char *id, const char *rcpt, const char *type)
{
	struct dt_event ev[32];
	size_t n = dt_events(t, id, ev, 32), k = 0;
	for (size_t i = 0; i < n; i++)
		if (!strcmp(ev[i].type, type) && (!rcpt || !strcmp(ev[i].rcpt, rcpt)))
			k++;
	return k;
}

bool dt_wait(struct dt *t, dt_cond cond, void *arg, int ms)
{
	int64_t deadline = dt_now_ms() + ms;
	for (;;) {
		if (cond(t, arg))
			return true;
		for (int i = 0; i < DT_DAEMONS; i++)
			dt_daemon_check_alive(t, i);
		if (dt_now_ms() > deadline)
			return false;
		dt_sleep_ms(20);
	}
}

bool dt_cond_settled(struct dt *t, void *arg)
{
	/* the message left ready/inflight: delivered (gone), dead or scheduled */
	const char *id = arg;
	if (!dt_msg_exists(t, id))
		return true;
	char *st = dt_msg_field(t, id, "state");
	bool done = st && (strcmp(st, "dead") == 0 || strcmp(st, "scheduled") == 0 ||
			   strcmp(st, "held") == 0);
	free(st);
	return done;
}

bool dt_cond_gone(struct dt *t, void *arg)
{
	return !dt_msg_exists(t, arg);
}

bool dt_cond_dead(struct dt *t, void *arg)
{
	return dt_in_zset(t, "dead", arg);
}

bool dt_cond_scheduled(struct dt *t, void *arg)
{
	return dt_in_zset(t, "scheduled", arg);
}

bool dt_cond_queue_empty(struct dt *t, void *arg)
{
	(void)arg;
	return dt_count(t, "ready") == 0 && dt_count(t, "scheduled") == 0 &&
	       dt_count(t, "inflight") == 0;
}

struct rq_json *dt_show(struct dt *t, const char *id)
{
	char cmd[2048];
	snprintf(cmd, sizeof(cmd), "'%s' show '%s' --json --redis '%s' --queue '%s' 2>&1",
		 dt_relayq_bin(), id, t->redis.url, t->queue);
	char *out = NULL;
	int rc = th_run(cmd, &out);
	if (rc != 0)
		DT_FAIL(t, "relayq show %s: exit %d: %s", id, rc, out ? out : "");
	char err[128];
	struct rq_json *j = rq_json_parse(out, strlen(out), RQ_JSON_LAX_UTF8, err, sizeof(err));
	if (!j)
		DT_FAIL(t, "relayq show %s --json: not JSON (%s): %s", id, err, out);
	free(out);
	return j;
}

const struct rq_json *dt_show_rcpt(const struct rq_json *m, const char *addr)
{
	const struct rq_json *a = rq_json_get(m, "rcpts");
	for (size_t i = 0; a && i < a->count; i++) {
		const struct rq_json *r = rq_json_at(a, i);
		const char *to = rq_json_get_str(r, "to");
		if (to && !strcmp(to, addr))
			return r;
	}
	return NULL;
}

int64_t dt_json_int(const struct rq_json *j, const char *key)
{
	int64_t v = -1;
	if (!rq_json_get_int(j, key, true, &v))
		return -1;
	return v;
}

int dt_sh(char **out, const char *fmt, ...)
{
	char *cmd = NULL;
	va_list ap;
	va_start(ap, fmt);
	int n = vasprintf(&cmd, fmt, ap);
	va_end(ap);
	assert_true(n > 0);
	int rc = th_run(cmd, out);
	free(cmd);
	return rc;
}

char *dt_line_value(const char *text, const char *key)
{
	size_t kl = strlen(key);
	for (const char *p = text; p && *p;) {
		if (strncmp(p, key, kl) == 0 && p[kl] == ':') {
			const char *v = p + kl + 1;
			while (*v == ' ')
				v++;
			const char *e = strchr(v, '\n');
			return strndup(v, e ? (size_t)(e - v) : strlen(v));
		}
		p = strchr(p, '\n');
		if (p)
			p++;
	}
	return NULL;
}

struct dt_tokens {
	const char *tag;
	size_t n;
	unsigned *count;           /* n counters */
	size_t total, foreign;
};

static void dt_token_one(const char *env, const char *content, size_t len, void *arg)
{
	struct dt_tokens *k = arg;
	char pre[64];
	snprintf(pre, sizeof(pre), "X-Token: %s-", k->tag);
	k->total++;
	const char *p = memmem(content, len, pre, strlen(pre));
	if (!p) {
		k->foreign++;
		return;
	}
	size_t i = strtoul(p + strlen(pre), NULL, 10);
	if (i < k->n)
		k->count[i]++;
	else
		k->foreign++;
}

size_t dt_token_check(struct dt *t, const char *tag, size_t n, size_t *missing,
		      size_t *dups, size_t *first_missing)
{
	struct dt_tokens k = {tag, n, calloc(n, sizeof(unsigned)), 0, 0};
	assert_non_null(k.count);
	dt_each_message(t, dt_token_one, &k);
	*missing = 0;
	*dups = 0;
	*first_missing = n;
	for (size_t i = 0; i < n; i++) {
		if (k.count[i] == 0) {
			if (*missing == 0)
				*first_missing = i;
			(*missing)++;
		} else {
			*dups += k.count[i] - 1;
		}
	}
	free(k.count);
	if (k.foreign)
		DT_FAIL(t, "%zu recorded messages carry no token of this run", k.foreign);
	return k.total;
}

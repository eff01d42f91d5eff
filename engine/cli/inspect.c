/* relayq list, show, stats, tail (cli.h). */
#include "cli.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "relayq/json.h"

#define LIST_PAGE 1000

/* ---- list ---- */

static const char *const list_usage =
	"Usage: relayq list [--state ready|scheduled|inflight|dead|held|all] [--json]\n"
	"\n"
	"One line per message: id, state, age, attempts, next attempt, sender,\n"
	"recipients (pending ones when some are done) and the last reply.\n"
	"With --json, one JSON object per line.\n";

enum { COL_ID, COL_STATE, COL_AGE, COL_ATT, COL_NEXT, COL_FROM, COL_TO, COL_LAST, NCOLS };

static const char *const col_names[NCOLS] = {
	"ID", "STATE", "AGE", "ATT", "NEXT", "FROM", "RCPTS", "LAST REPLY",
};

struct row {
	char *col[NCOLS];
};

static void row_free(struct row *row)
{
	for (int i = 0; i < NCOLS; i++)
		free(row->col[i]);
}

static void row_fill(struct row *row, const struct rq_json *m, int64_t now)
{
	char tmp[64];
	row->col[COL_ID] = cli_field_text(rq_json_get(m, "id"), 40);
	const char *state = rq_json_get_str(m, "state");
	row->col[COL_STATE] = cli_clean_str(state ? state : "?", 12);
	cli_fmt_duration(tmp, sizeof(tmp), now - cli_field_int(m, "created", now));
	row->col[COL_AGE] = strdup(tmp);
	snprintf(tmp, sizeof(tmp), "%" PRId64, cli_field_int(m, "attempts", 0));
	row->col[COL_ATT] = strdup(tmp);
	int64_t next = cli_field_int(m, "next", 0);
	if (state && strcmp(state, "scheduled") == 0 && next > now) {
		char d[32];
		cli_fmt_duration(d, sizeof(d), next - now);
		snprintf(tmp, sizeof(tmp), "in %s", d);
	} else if (state && (strcmp(state, "ready") == 0 || strcmp(state, "scheduled") == 0)) {
		snprintf(tmp, sizeof(tmp), "now");
	} else {
		snprintf(tmp, sizeof(tmp), "-");
	}
	row->col[COL_NEXT] = strdup(tmp);
	const char *from = rq_json_get_str(m, "from");
	row->col[COL_FROM] = from && *from ? cli_clean_str(from, 40) : strdup("<>");
	/* Pending recipients; all of them when none is pending (dead). */
	const struct rq_json *pending = rq_json_get(m, "pending");
	if (!rq_json_is(pending, RQ_JSON_ARRAY) || pending->count == 0)
		pending = rq_json_get(m, "to");
	row->col[COL_TO] = cli_address_list(pending, NULL, 1);
	row->col[COL_LAST] = cli_reply_text(m, "last_code", "last_enhanced", "last_text", 80);
	for (int i = 0; i < NCOLS; i++)
		if (!row->col[i])
			row->col[i] = cli_clean_str("", 0);
}

static void row_print(const struct row *row, const size_t *w)
{
	for (int i = 0; i < NCOLS; i++)
		cli_put_padded(row->col[i][0] ? row->col[i] : "-", w[i], i == NCOLS - 1);
	fputc('\n', stdout);
}

int cmd_list(struct cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"state", required_argument, NULL, OPT_STATE},
		{"json", no_argument, NULL, OPT_JSON},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	static const char *const states[] = {"ready", "scheduled", "inflight", "dead", "held", "all"};
	int rc = 0;
	const char *state = "all";
	bool json = false;
	redisReply *r = NULL;
	cli_start_options();
	int o;
	while ((o = cli_next_option(cli, argc, argv, opts, list_usage, &rc)) != -1) {
		switch (o) {
		case -2:
			return rc;
		case OPT_STATE: {
			bool ok = false;
			for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++)
				ok |= strcmp(optarg, states[i]) == 0;
			if (!ok) {
				char *c = cli_clean_str(optarg, 40);
				cli_errorf("list: invalid --state '%s' (ready, scheduled, inflight, dead, held or all)", c);
				free(c);
				return EXIT_USAGE;
			}
			state = optarg;
			break;
		}
		case OPT_JSON:
			json = true;
			break;
		}
	}
	if (optind < argc) {
		cli_errorf("list: unexpected argument '%s'", argv[optind]);
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	int64_t now = json ? 0 : cli_redis_now(cli);
	if (!json && now == 0)
		return EXIT_OPERATION;
	size_t w[NCOLS] = {0};
	bool header = false;
	size_t total = 0;
	for (long offset = 0;; offset += LIST_PAGE) {
		char off[32], cnt[32];
		snprintf(off, sizeof(off), "%ld", offset);
		snprintf(cnt, sizeof(cnt), "%d", LIST_PAGE);
		const char *args[] = {state, off, cnt};
		r = cli_fcall(cli, "relayq_list", 3, args, NULL);
		if (!r)
			return EXIT_OPERATION;
		if (r->type != REDIS_REPLY_ARRAY) {
			cli_errorf("unexpected reply from relayq_list");
			rc = EXIT_OPERATION;
			goto cleanup;
		}
		size_t n = r->elements;
		struct row *rows = calloc(n ? n : 1, sizeof(*rows));
		if (!rows) {
			cli_errorf("out of memory");
			rc = EXIT_OPERATION;
			goto cleanup;
		}
		for (size_t i = 0; i < n; i++) {
			struct rq_json *m = cli_reply_json(r->element[i], "relayq_list");
			if (!m) {
				/* Never left out: a row that says it cannot be
				 * read (the reason is on stderr). */
				rc = EXIT_OPERATION;
				char *id = cli_reply_id_guess(r->element[i]);
				if (json) {
					struct rq_json_buf b;
					rq_json_buf_init(&b);
					rq_json_buf_obj_begin(&b);
					rq_json_buf_kv_str(&b, "id", id);
					rq_json_buf_kv_str(&b, "unreadable", "record");
					rq_json_buf_obj_end(&b);
					if (rq_json_buf_ok(&b))
						printf("%s\n", b.data);
					rq_json_buf_finish(&b);
					free(id);
				} else {
					rows[i].col[COL_ID] = id;
					for (int c = 1; c < NCOLS; c++)
						rows[i].col[c] = cli_clean_str(c == COL_LAST ?
							"(unreadable record, see the error above)" : "?", 0);
				}
				continue;
			}
			if (json)
				cli_print_json_line(m);
			else
				row_fill(&rows[i], m, now);
			rq_json_free(m);
		}
		if (!json) {
			/* Column widths from the first page (later pages just push). */
			if (!header && n > 0) {
				for (int c = 0; c < NCOLS; c++)
					w[c] = cli_width(col_names[c]);
				for (size_t i = 0; i < n; i++)
					for (int c = 0; c < NCOLS; c++)
						if (rows[i].col[c] && cli_width(rows[i].col[c]) > w[c])
							w[c] = cli_width(rows[i].col[c]);
				struct row h;
				for (int c = 0; c < NCOLS; c++)
					h.col[c] = (char *)col_names[c];
				row_print(&h, w);
				header = true;
			}
			for (size_t i = 0; i < n; i++)
				if (rows[i].col[0])
					row_print(&rows[i], w);
		}
		for (size_t i = 0; i < n; i++)
			row_free(&rows[i]);
		free(rows);
		total += n;
		freeReplyObject(r);
		r = NULL;
		if (n < LIST_PAGE || ferror(stdout))
			break;
	}
	if (!json && total == 0)
		printf("queue %s: no messages%s%s\n", cli->qname,
				strcmp(state, "all") ? " in state " : "",
				strcmp(state, "all") ? state : "");
cleanup:
	freeReplyObject(r);
	return rc;
}

/* ---- show ---- */

static const char *const show_usage =
	"Usage: relayq show ID [--json]\n"
	"\n"
	"Every field of a message and each recipient's state and last reply.\n";

static void show_line(const char *name, const char *value)
{
	printf("%-14s %s\n", name, value && *value ? value : "-");
}

static void show_time(const char *name, const struct rq_json *m, const char *key, int64_t now)
{
	int64_t t = cli_field_int(m, key, 0);
	char when[64], rel[32], line[128];
	if (t <= 0) {
		show_line(name, "-");
		return;
	}
	cli_fmt_time(when, sizeof(when), t);
	cli_fmt_duration(rel, sizeof(rel), t > now ? t - now : now - t);
	snprintf(line, sizeof(line), "%s (%s%s%s)", when, t > now ? "in " : "", rel,
			t > now ? "" : " ago");
	show_line(name, line);
}

static void show_human(const struct rq_json *m, int64_t now)
{
	static const char *const known[] = {
		"id", "state", "from", "to", "pending", "created", "attempts", "next",
		"size", "key", "last_code", "last_enhanced", "last_text", "last_stage",
		"meta", "rcpts",
	};
	char *s = cli_field_text(rq_json_get(m, "id"), 0);
	show_line("id:", s);
	free(s);
	s = cli_field_text(rq_json_get(m, "state"), 0);
	show_line("state:", s);
	free(s);
	const char *from = rq_json_get_str(m, "from");
	s = from && *from ? cli_clean_str(from, 0) : strdup("<> (null sender)");
	show_line("from:", s);
	free(s);
	show_time("created:", m, "created", now);
	char tmp[64];
	snprintf(tmp, sizeof(tmp), "%" PRId64, cli_field_int(m, "attempts", 0));
	show_line("attempts:", tmp);
	const char *state = rq_json_get_str(m, "state");
	if (state && (strcmp(state, "scheduled") == 0 || strcmp(state, "ready") == 0))
		show_time("next attempt:", m, "next", now);
	else
		show_line("next attempt:", "-");
	snprintf(tmp, sizeof(tmp), "%" PRId64 " bytes", cli_field_int(m, "size", 0));
	show_line("size:", tmp);
	if (rq_json_get(m, "key")) {
		s = cli_field_text(rq_json_get(m, "key"), 0);
		show_line("key:", s);
		free(s);
	}
	s = cli_reply_text(m, "last_code", "last_enhanced", "last_text", 0);
	const char *stage = rq_json_get_str(m, "last_stage");
	if (*s && stage && *stage) {
		char *st = cli_clean_str(stage, 20);
		size_t n = strlen(s) + strlen(st) + 16;
		char *t = malloc(n);
		if (t) {
			snprintf(t, n, "%s (at %s)", s, st);
			free(s);
			s = t;
		}
		free(st);
	}
	show_line("last reply:", s);
	free(s);
	s = cli_field_text(rq_json_get(m, "meta"), 0);
	show_line("meta:", s);
	free(s);
	/* Fields this version does not know, as they are. */
	for (const struct rq_json *c = m->child; c; c = c->next) {
		bool seen = false;
		for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
			seen |= strcmp(c->key, known[i]) == 0;
		if (seen)
			continue;
		char *k = cli_clean(c->key, c->key_len, 40);
		char name[64];
		snprintf(name, sizeof(name), "%s:", k);
		s = cli_field_text(c, 0);
		show_line(name, s);
		free(s);
		free(k);
	}
	const struct rq_json *rcpts = rq_json_get(m, "rcpts");
	size_t nr = rq_json_is(rcpts, RQ_JSON_ARRAY) ? rcpts->count : 0;
	snprintf(tmp, sizeof(tmp), "%zu", nr);
	show_line("recipients:", tmp);
	if (!nr)
		return;
	size_t wto = 0;
	for (const struct rq_json *c = rcpts->child; c; c = c->next) {
		char *t = cli_field_text(rq_json_get(c, "to"), 60);
		if (cli_width(t) > wto)
			wto = cli_width(t);
		free(t);
	}
	for (const struct rq_json *c = rcpts->child; c; c = c->next) {
		char *to = cli_field_text(rq_json_get(c, "to"), 60);
		char *st = cli_field_text(rq_json_get(c, "s"), 12);
		char *rep = cli_reply_text(c, "code", "enh", "text", 0);
		fputs("  ", stdout);
		cli_put_padded(to, wto, false);
		cli_put_padded(st[0] ? st : "?", 9, !rep[0]);
		fputs(rep, stdout);
		const char *rstage = rq_json_get_str(c, "stage");
		if (rep[0] && rstage && *rstage) {
			char *t = cli_clean_str(rstage, 20);
			printf(" (at %s)", t);
			free(t);
		}
		int64_t at = cli_field_int(c, "at", 0);
		if (at > 0) {
			char when[64];
			cli_fmt_time(when, sizeof(when), at);
			printf(" [%s]", when);
		}
		fputc('\n', stdout);
		const char *hint = rq_json_get_str(c, "hint");
		if (hint && *hint) {
			char *h = cli_clean_str(hint, 0);
			printf("  %*s  hint: %s\n", (int)wto, "", h);
			free(h);
		}
		free(to);
		free(st);
		free(rep);
	}
}

int cmd_show(struct cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"json", no_argument, NULL, OPT_JSON},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	int rc = 0;
	bool json = false;
	cli_start_options();
	int o;
	while ((o = cli_next_option(cli, argc, argv, opts, show_usage, &rc)) != -1) {
		if (o == -2)
			return rc;
		if (o == OPT_JSON)
			json = true;
	}
	if (argc - optind != 1) {
		cli_errorf("show: give exactly one message id (see relayq show --help)");
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	const char *args[] = {argv[optind]};
	redisReply *r = cli_fcall(cli, "relayq_show", 1, args, NULL);
	if (!r)
		return EXIT_OPERATION;
	struct rq_json *m = cli_reply_json(r, "relayq_show");
	freeReplyObject(r);
	if (!m)
		return EXIT_OPERATION;
	if (json) {
		cli_print_json_line(m);
	} else {
		int64_t now = cli_redis_now(cli);
		if (now)
			show_human(m, now);
		else
			rc = EXIT_OPERATION;
	}
	rq_json_free(m);
	return rc;
}

/* ---- stats ---- */

static const char *const stats_usage =
	"Usage: relayq stats [--json]\n"
	"\n"
	"Current counts (ready, scheduled, inflight, dead, held) and the queue's\n"
	"counters.\n";

int cmd_stats(struct cli *cli, int argc, char **argv)
{
	bool json = false;
	int rc = cli_json_only_options(cli, argc, argv, "stats", stats_usage, &json);
	if (rc >= 0)
		return rc;
	rc = 0;
	redisReply *r = cli_fcall(cli, "relayq_stats", 0, NULL, NULL);
	if (!r)
		return EXIT_OPERATION;
	if (r->type != REDIS_REPLY_ARRAY || r->elements % 2) {
		cli_errorf("unexpected reply from relayq_stats");
		freeReplyObject(r);
		return EXIT_OPERATION;
	}
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_obj_begin(&b);
	size_t wname = 0;
	for (size_t i = 0; i + 1 < r->elements; i += 2)
		if (r->element[i]->type == REDIS_REPLY_STRING && r->element[i]->len > wname)
			wname = r->element[i]->len;
	for (size_t i = 0; i + 1 < r->elements; i += 2) {
		const redisReply *k = r->element[i], *v = r->element[i + 1];
		if (k->type != REDIS_REPLY_STRING)
			continue;
		long long n = 0;
		if (v->type == REDIS_REPLY_INTEGER)
			n = v->integer;
		else if (v->type == REDIS_REPLY_STRING)
			n = strtoll(v->str, NULL, 10);
		char *name = cli_clean(k->str, k->len, 40);
		if (json) {
			rq_json_buf_kv_int(&b, name, n);
		} else {
			printf("%s:", name);
			printf("%*s%lld\n", (int)(wname - strlen(name) + 1), "", n);
		}
		free(name);
	}
	rq_json_buf_obj_end(&b);
	if (json && rq_json_buf_ok(&b))
		printf("%s\n", b.data);
	rq_json_buf_finish(&b);
	freeReplyObject(r);
	return 0;
}

/* ---- tail ---- */

static const char *const tail_usage =
	"Usage: relayq tail [--json]\n"
	"\n"
	"Follows the queue's events (delivered, deferred, failed, dropped,\n"
	"expired, held) as they happen, one line each, until interrupted.\n";

static volatile sig_atomic_t tail_stop;

static void on_stop_signal(int sig)
{
	(void)sig;
	tail_stop = 1;
}

/* One event entry: [id, [field, value, ...]]. */
static void print_event(const redisReply *e, bool json)
{
	if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
			e->element[0]->type != REDIS_REPLY_STRING ||
			e->element[1]->type != REDIS_REPLY_ARRAY)
		return;
	const redisReply *f = e->element[1];
	const char *sid = e->element[0]->str;
	int64_t ms = strtoll(sid, NULL, 10);
	if (json) {
		struct rq_json_buf b;
		rq_json_buf_init(&b);
		rq_json_buf_obj_begin(&b);
		rq_json_buf_kv_str(&b, "event_id", sid);
		rq_json_buf_kv_int(&b, "ts", ms);
		for (size_t i = 0; i + 1 < f->elements; i += 2) {
			const redisReply *k = f->element[i], *v = f->element[i + 1];
			if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
				continue;
			char *name = cli_clean(k->str, k->len, 40);
			rq_json_buf_key(&b, name);
			free(name);
			char *end;
			long long num = v->len ? strtoll(v->str, &end, 10) : 0;
			bool numeric = v->len && v->len < 19 && *end == '\0' &&
				(strcmp(k->str, "code") == 0 || strcmp(k->str, "attempt") == 0 ||
				 strcmp(k->str, "next") == 0);
			struct rq_json *meta = NULL;
			if (strcmp(k->str, "meta") == 0)
				meta = rq_json_parse(v->str, v->len, RQ_JSON_LAX_UTF8, NULL, 0);
			if (meta)
				rq_json_buf_value(&b, meta);
			else if (numeric)
				rq_json_buf_int(&b, num);
			else
				rq_json_buf_strn(&b, v->str, v->len);
			rq_json_free(meta);
		}
		rq_json_buf_obj_end(&b);
		if (rq_json_buf_ok(&b))
			printf("%s\n", b.data);
		rq_json_buf_finish(&b);
		return;
	}
	/* time type id rcpt code enh text */
	static const char *const shown[] = {"type", "id", "rcpt", "code", "enh", "text"};
	char when[64];
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	if (gmtime_r(&t, &tm))
		strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
	else
		snprintf(when, sizeof(when), "-");
	printf("%s.%03dZ", when, (int)(ms % 1000));
	for (size_t s = 0; s < sizeof(shown) / sizeof(shown[0]); s++) {
		for (size_t i = 0; i + 1 < f->elements; i += 2) {
			const redisReply *k = f->element[i], *v = f->element[i + 1];
			if (k->type != REDIS_REPLY_STRING || strcmp(k->str, shown[s]) != 0 ||
					v->type != REDIS_REPLY_STRING || v->len == 0)
				continue;
			char *c = cli_clean(v->str, v->len, strcmp(shown[s], "text") == 0 ? 200 : 80);
			printf(" %s", c);
			free(c);
			break;
		}
	}
	fputc('\n', stdout);
}

/* Waits for a reply while watching for signals and a closed stdout.
 * Returns 1 with *reply, 0 to stop quietly, -1 on a connection error. */
static int tail_wait(struct cli *cli, const sigset_t *unblocked, redisReply **reply)
{
	for (;;) {
		void *aux = NULL;
		if (redisGetReplyFromReader(cli->rc, &aux) != REDIS_OK)
			return -1;
		if (aux) {
			*reply = aux;
			return 1;
		}
		struct pollfd pfd[2] = {
			{.fd = cli->rc->fd, .events = POLLIN},
			{.fd = STDOUT_FILENO, .events = 0},
		};
		int n = ppoll(pfd, 2, NULL, unblocked);
		if (tail_stop)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (pfd[1].revents & (POLLERR | POLLHUP))
			return 0;       /* the reader of our output went away */
		if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))
			if (redisBufferRead(cli->rc) != REDIS_OK)
				return -1;
	}
}

int cmd_tail(struct cli *cli, int argc, char **argv)
{
	bool json = false;
	int rc = cli_json_only_options(cli, argc, argv, "tail", tail_usage, &json);
	if (rc >= 0)
		return rc;
	rc = 0;
	/* A name tests and operators can find in CLIENT LIST. */
	redisReply *r = redisCommand(cli->rc, "CLIENT SETNAME relayq-tail-%d", (int)getpid());
	freeReplyObject(r);
	r = NULL;

	sigset_t block, unblocked;
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGHUP);
	sigprocmask(SIG_BLOCK, &block, &unblocked);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_stop_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);

	char key[RQ_KEYS_PREFIX_MAX + 16];
	snprintf(key, sizeof(key), "%s:events", cli->prefix);
	char last[64] = "$";
	while (!tail_stop) {
		const char *args[] = {"XREAD", "COUNT", "100", "BLOCK", "0", "STREAMS", key, last};
		if (redisAppendCommandArgv(cli->rc, 8, args, NULL) != REDIS_OK) {
			rc = EXIT_OPERATION;
			break;
		}
		int done = 0;
		while (!done)
			if (redisBufferWrite(cli->rc, &done) != REDIS_OK)
				break;
		int w = done ? tail_wait(cli, &unblocked, &r) : -1;
		if (w == 0)
			break;
		if (w < 0) {
			cli_errorf("lost the connection to Redis at %s: %s", cli->t.shown,
					cli->rc->errstr[0] ? cli->rc->errstr : "closed");
			rc = EXIT_OPERATION;
			break;
		}
		if (r->type == REDIS_REPLY_ERROR) {
			cli_print_redis_error(cli, r);
			rc = EXIT_OPERATION;
			break;
		}
		/* [[key, [entry, ...]]] or nil */
		if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
				r->element[0]->type == REDIS_REPLY_ARRAY &&
				r->element[0]->elements == 2 &&
				r->element[0]->element[1]->type == REDIS_REPLY_ARRAY) {
			const redisReply *entries = r->element[0]->element[1];
			for (size_t i = 0; i < entries->elements; i++) {
				const redisReply *e = entries->element[i];
				print_event(e, json);
				if (e->type == REDIS_REPLY_ARRAY && e->elements == 2 &&
						e->element[0]->type == REDIS_REPLY_STRING &&
						e->element[0]->len < sizeof(last))
					snprintf(last, sizeof(last), "%s", e->element[0]->str);
			}
		}
		freeReplyObject(r);
		r = NULL;
		if (fflush(stdout) != 0 || ferror(stdout))
			break;              /* EPIPE: the reader went away */
	}
	freeReplyObject(r);
	sigprocmask(SIG_SETMASK, &unblocked, NULL);
	return rc;
}

/* relayq enqueue (cli.h). */
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/json.h"
#include "relayq/queue_codec.h"

#define MESSAGE_MAX ((size_t)512 * 1024 * 1024)   /* Redis' proto-max-bulk-len */

static const char *const enqueue_usage =
	"Usage: relayq enqueue --from ADDR --to ADDR [--to ADDR ...] [--delay SECS]\n"
	"                      [--key KEY] [--meta JSON] [FILE|-]\n"
	"\n"
	"Puts the message read from FILE (default: standard input) in the queue\n"
	"and prints its id.\n"
	"\n"
	"  --from ADDR    envelope sender ('' for the null sender)\n"
	"  --to ADDR      a recipient (repeat for more)\n"
	"  --delay SECS   first attempt after this long (seconds, or 30s 5m 2h 1d)\n"
	"  --key KEY      idempotency key: the same key returns the same id\n"
	"  --meta JSON    a JSON object carried with the message into events\n";

/* Seconds from "90", "1.5", "30s", "5m", "2h", "1d"; -1 when invalid. */
static double parse_delay(const char *s)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (end == s || errno || !isfinite(v) || v < 0 || !isdigit((unsigned char)s[0]))
		return -1;
	double mult = 1;
	if (*end) {
		if (end[1])
			return -1;
		switch (*end) {
		case 's': mult = 1; break;
		case 'm': mult = 60; break;
		case 'h': mult = 3600; break;
		case 'd': mult = 86400; break;
		default: return -1;
		}
	}
	return v * mult;
}

static char *read_all(FILE *f, size_t *len)
{
	size_t cap = 65536, n = 0;
	char *buf = malloc(cap);
	if (!buf)
		return NULL;
	for (;;) {
		if (n == cap) {
			if (cap >= MESSAGE_MAX) {
				errno = EFBIG;
				free(buf);
				return NULL;
			}
			char *nb = realloc(buf, cap * 2);
			if (!nb) {
				free(buf);
				return NULL;
			}
			buf = nb;
			cap *= 2;
		}
		size_t got = fread(buf + n, 1, cap - n, f);
		n += got;
		if (got == 0) {
			if (ferror(f)) {
				free(buf);
				return NULL;
			}
			break;
		}
	}
	*len = n;
	return buf;
}

/* FCALL relayq_enqueue of an envelope and its body, as relayq enqueue and
 * relayq sendmail send them. 0 with the new id (cleaned, malloc'd) in *id
 * when id is not NULL; 1 when relayq refused it ("ERR relayq: ..."); -1
 * for a lost connection, any other error or an unexpected reply. The
 * error is printed. */
int cli_enqueue_send(struct cli *cli, const char *env, size_t envlen, const char *body,
		     size_t bodylen, char **id)
{
	const char *argv[] = {"FCALL", "relayq_enqueue", "1", cli->prefix, env, body};
	size_t lens[] = {5, 14, 1, strlen(cli->prefix), envlen, bodylen};
	redisReply *r = redisCommandArgv(cli->rc, 6, argv, lens);
	if (!r) {
		cli_errorf("lost the connection to Redis at %s: %s", cli->t.shown,
			   cli->rc->errstr[0] ? cli->rc->errstr : "unknown error");
		return -1;
	}
	int rc = 0;
	if (r->type == REDIS_REPLY_ERROR) {
		cli_print_redis_error(cli, r);
		rc = r->len > 12 && strncmp(r->str, "ERR relayq: ", 12) == 0 ? 1 : -1;
	} else if (r->type != REDIS_REPLY_STRING) {
		cli_errorf("unexpected reply from relayq_enqueue");
		rc = -1;
	} else if (id) {
		*id = cli_clean(r->str, r->len, 64);
	}
	freeReplyObject(r);
	return rc;
}

int cmd_enqueue(struct cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"from", required_argument, NULL, OPT_FROM},
		{"to", required_argument, NULL, OPT_TO},
		{"delay", required_argument, NULL, OPT_DELAY},
		{"key", required_argument, NULL, OPT_KEY},
		{"meta", required_argument, NULL, OPT_META},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	int rc = 0;
	const char *from = NULL, *key = NULL, *meta_text = NULL;
	const char **to = calloc((size_t)argc, sizeof(*to));
	size_t nto = 0;
	double delay = -1;
	struct rq_json *meta = NULL;
	char *body = NULL;
	size_t body_len = 0;
	struct rq_json_buf env;
	rq_json_buf_init(&env);
	if (!to) {
		cli_errorf("out of memory");
		return EXIT_OPERATION;
	}
	cli_start_options();
	int o;
	while ((o = cli_next_option(cli, argc, argv, opts, enqueue_usage, &rc)) != -1) {
		switch (o) {
		case -2:
			goto cleanup;
		case OPT_FROM:
			from = optarg;
			break;
		case OPT_TO:
			to[nto++] = optarg;
			break;
		case OPT_DELAY:
			delay = parse_delay(optarg);
			if (delay < 0) {
				char *c = cli_clean_str(optarg, 40);
				cli_errorf("enqueue: invalid --delay '%s' (seconds, or like 30s 5m 2h 1d)", c);
				free(c);
				rc = EXIT_USAGE;
				goto cleanup;
			}
			break;
		case OPT_KEY:
			key = optarg;
			break;
		case OPT_META:
			meta_text = optarg;
			break;
		}
	}
	if (!from) {
		cli_errorf("enqueue: --from is required (use --from '' for the null sender)");
		rc = EXIT_USAGE;
		goto cleanup;
	}
	if (nto == 0) {
		cli_errorf("enqueue: at least one --to is required");
		rc = EXIT_USAGE;
		goto cleanup;
	}
	if (argc - optind > 1) {
		cli_errorf("enqueue: one message FILE at most");
		rc = EXIT_USAGE;
		goto cleanup;
	}
	if (meta_text) {
		char err[160];
		meta = rq_json_parse(meta_text, strlen(meta_text), 0, err, sizeof(err));
		if (!meta) {
			cli_errorf("enqueue: --meta is not valid JSON: %s", err);
			rc = EXIT_USAGE;
			goto cleanup;
		}
		if (meta->type != RQ_JSON_OBJECT) {
			cli_errorf("enqueue: --meta must be a JSON object, not %s %s",
					meta->type == RQ_JSON_ARRAY ? "an" : "a",
					rq_json_type_name(meta->type));
			rc = EXIT_USAGE;
			goto cleanup;
		}
		if (rq_json_depth(meta) > RQ_JSON_META_MAX_DEPTH) {
			cli_errorf("enqueue: --meta is nested deeper than %d levels",
					RQ_JSON_META_MAX_DEPTH);
			rc = EXIT_USAGE;
			goto cleanup;
		}
	}
	const char *file = optind < argc ? argv[optind] : "-";
	if (strcmp(file, "-") == 0) {
		body = read_all(stdin, &body_len);
		if (!body) {
			cli_errorf("enqueue: cannot read the message from standard input: %s", strerror(errno));
			rc = EXIT_OPERATION;
			goto cleanup;
		}
	} else {
		FILE *f = fopen(file, "rb");
		if (f) {
			body = read_all(f, &body_len);
			if (!body)
				cli_errorf("enqueue: cannot read %s: %s", file, strerror(errno));
			fclose(f);
		} else {
			cli_errorf("enqueue: cannot open %s: %s", file, strerror(errno));
		}
		if (!body) {
			rc = EXIT_OPERATION;
			goto cleanup;
		}
	}
	/* The envelope: the queue module's encoding, as relayqd's bounces. */
	struct rq_queue_enqueue_req req = {
		.from = from,
		.to = to,
		.nto = nto,
		.body = body,
		.body_len = body_len,
		.key = key,
		.delay_s = delay,
		.meta = meta,
	};
	if (rq_queue_enqueue_envelope(&req, &env) != 0) {
		cli_errorf("out of memory");
		rc = EXIT_OPERATION;
		goto cleanup;
	}
	if ((rc = cli_open(cli)) != 0)
		goto cleanup;
	char *id = NULL;
	if (cli_enqueue_send(cli, env.data, env.len, body, body_len, &id) != 0) {
		rc = EXIT_OPERATION;
		goto cleanup;
	}
	printf("%s\n", id);
	free(id);
cleanup:
	rq_json_buf_finish(&env);
	rq_json_free(meta);
	free(body);
	free(to);
	return rc;
}

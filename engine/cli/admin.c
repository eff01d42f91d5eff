/* relayq hold, release, delete, requeue, flush (cli.h). */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct id_op {
	const char *name;          /* the command */
	const char *function;      /* the Redis Function */
	const char *done;          /* "held", ... */
	const char *from_state;    /* what an id must be in, NULL: any */
	const char *all_flag;      /* "all" / "dead": the flag for every id */
	const char *usage;
};

static const char hold_usage[] =
	"Usage: relayq hold ID ...\n\nParks messages (ready, scheduled or inflight) until released.\n";
static const char release_usage[] =
	"Usage: relayq release ID ...\n\nMakes held messages ready again.\n";
static const char delete_usage[] =
	"Usage: relayq delete ID ...\n\nDeletes messages in any state.\n";
static const char requeue_usage[] =
	"Usage: relayq requeue ID ... | --dead\n\n"
	"Moves dead messages back to ready (attempts reset, failed recipients\n"
	"pending again); --dead for every dead message.\n";
static const char flush_usage[] =
	"Usage: relayq flush ID ... | --all\n\n"
	"Makes scheduled messages due now; --all for every scheduled message.\n";

static const struct id_op ops[] = {
	{"hold", "relayq_hold", "held", NULL, NULL, hold_usage},
	{"release", "relayq_release", "released", "held", NULL, release_usage},
	{"delete", "relayq_delete", "deleted", NULL, NULL, delete_usage},
	{"requeue", "relayq_requeue", "requeued", "dead", "dead", requeue_usage},
	{"flush", "relayq_flush", "flushed", "scheduled", "all", flush_usage},
};

/* After a partial count: says which ids were not acted on, and why. */
static void explain_shortfall(struct cli *cli, const struct id_op *op, int n, char **ids)
{
	for (int i = 0; i < n; i++) {
		char key[RQ_KEYS_PREFIX_MAX + 200];
		if (strlen(ids[i]) > 100)
			continue;
		snprintf(key, sizeof(key), "%s:msg:%s", cli->prefix, ids[i]);
		redisReply *r = redisCommand(cli->rc, "HGET %s state", key);
		if (!r)
			return;
		char *c = cli_clean_str(ids[i], 40);
		if (r->type == REDIS_REPLY_NIL)
			cli_errorf("%s: unknown id: %s", op->name, c);
		else if (r->type == REDIS_REPLY_STRING && op->from_state &&
				strcmp(r->str, op->from_state) != 0 &&
				strcmp(r->str, op->done) != 0) {
			char *s = cli_clean(r->str, r->len, 20);
			cli_errorf("%s: %s is %s, not %s", op->name, c, s, op->from_state);
			free(s);
		}
		free(c);
		freeReplyObject(r);
	}
}

static int cmd_ids(struct cli *cli, const struct id_op *op, int argc, char **argv)
{
	static const struct option opts_plain[] = {
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	static const struct option opts_all[] = {
		{"all", no_argument, NULL, OPT_ALL},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	static const struct option opts_dead[] = {
		{"dead", no_argument, NULL, OPT_DEAD},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	const struct option *opts = !op->all_flag ? opts_plain :
			strcmp(op->all_flag, "all") == 0 ? opts_all : opts_dead;
	int rc = 0;
	bool every = false;
	cli_start_options();
	int o;
	while ((o = cli_next_option(cli, argc, argv, opts, op->usage, &rc)) != -1) {
		if (o == -2)
			return rc;
		if (o == OPT_ALL || o == OPT_DEAD)
			every = true;
	}
	int nids = argc - optind;
	char **ids = argv + optind;
	if (every && nids > 0) {
		cli_errorf("%s: give ids or --%s, not both", op->name, op->all_flag);
		return EXIT_USAGE;
	}
	if (!every && nids == 0) {
		if (op->all_flag)
			cli_errorf("%s: give message ids or --%s (see relayq %s --help)",
					op->name, op->all_flag, op->name);
		else
			cli_errorf("%s: give message ids (see relayq %s --help)", op->name, op->name);
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	redisReply *r;
	if (every && strcmp(op->all_flag, "dead") == 0) {
		const char *args[] = {"--dead"};
		r = cli_fcall(cli, op->function, 1, args, NULL);
	} else {
		r = cli_fcall(cli, op->function, nids, (const char **)ids, NULL);
	}
	if (!r)
		return EXIT_OPERATION;
	if (r->type != REDIS_REPLY_INTEGER) {
		cli_errorf("unexpected reply from %s", op->function);
		freeReplyObject(r);
		return EXIT_OPERATION;
	}
	long long n = r->integer;
	freeReplyObject(r);
	printf("%s %lld message%s\n", op->done, n, n == 1 ? "" : "s");
	if (!every) {
		/* Distinct ids given: fewer done means some were unknown or in
		 * another state. */
		int distinct = 0;
		for (int i = 0; i < nids; i++) {
			bool dup = false;
			for (int j = 0; j < i && !dup; j++)
				dup = strcmp(ids[i], ids[j]) == 0;
			distinct += !dup;
		}
		if (n < distinct) {
			fflush(stdout);
			explain_shortfall(cli, op, nids, ids);
			return EXIT_OPERATION;
		}
	}
	return 0;
}

int cmd_admin(struct cli *cli, const char *name, int argc, char **argv)
{
	for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++)
		if (strcmp(name, ops[i].name) == 0)
			return cmd_ids(cli, &ops[i], argc, argv);
	return -1;
}

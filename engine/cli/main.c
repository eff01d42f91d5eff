/*
 * relayq: the command-line client. Talks to Redis synchronously through the
 * relayq Redis Functions (lua/redis/README.md), loading the embedded library
 * when the server has none or an older one. This file: argv dispatch, the
 * common options, and where Redis and the queue come from; the commands
 * live next to it (cli.h).
 */
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "explain.h"
#include "relayq/config.h"
#include "relayq/config_lua.h"
#include "relayq/fnlib.h"
#include "relayq/secret.h"

/* ---- options ---- */

static const char *const main_usage =
	"Usage: relayq [OPTIONS] COMMAND [ARGS]\n"
	"\n"
	"Inspect and manage a relayq mail queue in Redis.\n"
	"\n"
	"Options (also accepted after the command):\n"
	"  -c, --config FILE            read redis and queue from relayqd's config\n"
	"      --redis URL              redis://[user@]host:port/db or unix:/path\n"
	"                               (default $RELAYQ_REDIS, else\n"
	"                               " RQ_REDIS_URL_DEFAULT ")\n"
	"      --redis-password-file F  Redis password from a file (first line);\n"
	"                               or $RELAYQ_REDIS_PASSWORD, or in the URL of\n"
	"                               $RELAYQ_REDIS (never on the command line)\n"
	"      --queue NAME             queue name (default \"" RQ_KEYS_QUEUE_DEFAULT "\")\n"
	"      --help                   this help; COMMAND --help for a command\n"
	"      --version                print the version\n"
	"\n"
	"Commands:\n"
	"  enqueue   put a message in the queue, print its id\n"
	"  list      one line per message (like mailq)\n"
	"  show      every field of one message and its recipients\n"
	"  stats     queue counts and counters\n"
	"  flush     make scheduled messages due now\n"
	"  requeue   move dead messages back to ready\n"
	"  hold      park messages\n"
	"  release   release held messages\n"
	"  delete    delete messages\n"
	"  tail      follow the events stream\n"
	"  explain   what the policy decides for a reply\n"
	"  sendmail  take a message the way /usr/sbin/sendmail does (also when\n"
	"            this binary is run as \"sendmail\", e.g. through a symlink)\n"
	"  passwd    set a user's password in the listener's credentials file\n"
	"\n"
	"Exit status: 0 ok, 1 operation error, 2 usage error.\n";

int cli_next_option(struct cli *cli, int argc, char **argv,
		const struct option *opts, const char *usage, int *rc)
{
	for (;;) {
		int longidx = -1;
		int o = getopt_long(argc, argv, "c:", opts, &longidx);
		switch (o) {
		case 'c':
			cli->config_path = optarg;
			continue;
		case OPT_REDIS:
			cli->redis_url = optarg;
			continue;
		case OPT_QUEUE:
			cli->queue = optarg;
			continue;
		case OPT_PASSWORD_FILE:
			cli->password_file = optarg;
			continue;
		case OPT_HELP:
			fputs(usage, stdout);
			*rc = 0;
			return -2;
		case '?': {
			const char *bad = optind > 0 && optind <= argc ? argv[optind - 1] : "";
			char *c = cli_clean(bad, strcspn(bad, "="), 60);
			if (optopt == 'c' || optopt >= OPT_REDIS)
				cli_errorf("%s: option '%s' needs a value (see relayq %s --help)",
						cli->cmd, c, cli->cmd);
			else if (optopt)
				cli_errorf("%s: unknown option '-%c' (see relayq %s --help)",
						cli->cmd, isprint(optopt) ? optopt : '?', cli->cmd);
			else
				cli_errorf("%s: unknown option '%s' (see relayq %s --help)",
						cli->cmd, c, cli->cmd);
			free(c);
			*rc = EXIT_USAGE;
			return -2;
		}
		default:
			return o;
		}
	}
}

void cli_start_options(void)
{
	optind = 0;                 /* glibc: full re-initialisation */
	opterr = 0;
}

int cli_json_only_options(struct cli *cli, int argc, char **argv, const char *name,
			     const char *usage, bool *json)
{
	static const struct option opts[] = {
		{"json", no_argument, NULL, OPT_JSON},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	int rc = 0;
	cli_start_options();
	int o;
	while ((o = cli_next_option(cli, argc, argv, opts, usage, &rc)) != -1) {
		if (o == -2)
			return rc;
		if (o == OPT_JSON)
			*json = true;
	}
	if (optind < argc) {
		cli_errorf("%s: unexpected argument '%s'", name, argv[optind]);
		return EXIT_USAGE;
	}
	if ((rc = cli_open(cli)) != 0)
		return rc;
	return -1;
}

/* ---- Redis and queue ---- */

/* Reads redis and the first queue from relayqd's config file. */
static int load_config(struct cli *cli)
{
	struct rq_config_diag diag;
	rq_config_diag_init(&diag, cli->config_path);
	struct rq_config *cfg = rq_config_lua_load(cli->config_path,
						     RQ_CONFIG_LOAD_NO_SMTP_SECRET, &diag);
	if (!cfg) {
		rq_config_diag_print(&diag, stderr);
		cli_errorf("cannot load config %s", cli->config_path);
		return -1;
	}
	int rc = -1;
	if (cfg->redis && !(cli->config_redis = strdup(cfg->redis)))
		goto cleanup;
	if (cfg->nqueues > 0 && !(cli->config_queue = strdup(cfg->queues[0])))
		goto cleanup;
	if (cfg->redis_user && !(cli->config_user = strdup(cfg->redis_user)))
		goto cleanup;
	if (cfg->redis_password_file &&
	    !(cli->config_password_file = strdup(cfg->redis_password_file)))
		goto cleanup;
	if (cfg->redis_password_env &&
	    !(cli->config_password_env = strdup(cfg->redis_password_env)))
		goto cleanup;
	rc = 0;
cleanup:
	if (rc < 0)
		cli_errorf("out of memory");
	rq_config_destroy(cfg);
	return rc;
}

/* Resolves URL, password and queue (options > config > environment >
 * defaults). Returns 0, or an exit code. */
int cli_resolve(struct cli *cli)
{
	if (cli->config_path && load_config(cli) < 0)
		return EXIT_OPERATION;
	const char *url = cli->redis_url;
	if (!url)
		url = cli->config_redis;
	if (!url)
		url = getenv("RELAYQ_REDIS");
	if (!url || !*url)
		url = RQ_REDIS_URL_DEFAULT;
	char err[200];
	if (cli_target_parse(&cli->t, url, err, sizeof(err)) < 0) {
		char shown[200];
		cli_redact_raw(url, shown, sizeof(shown));
		cli_errorf("invalid Redis URL '%s': %s", shown, err);
		return EXIT_USAGE;
	}
	if (cli->t.password && url == cli->redis_url) {
		/* Other users see the command line (ps, /proc). */
		cli_errorf("--redis %s: a password does not belong on the command line; "
				"use RELAYQ_REDIS_PASSWORD or --redis-password-file", cli->t.shown);
		return EXIT_USAGE;
	}
	/* the user and password sources of relayqd's config (-c), when the
	 * URL comes from it too */
	bool cfg_target = url == cli->config_redis && url;
	if (cfg_target && cli->config_user && !cli->t.user[0]) {
		snprintf(cli->t.user, sizeof(cli->t.user), "%s", cli->config_user);
		cli_target_show(&cli->t);
	}
	const char *pw_file = cli->password_file;
	if (!pw_file && cfg_target && !cli->t.password)
		pw_file = cli->config_password_file;
	if (!pw_file && cfg_target && !cli->t.password && cli->config_password_env) {
		const char *env = getenv(cli->config_password_env);
		if (!env || !*env) {
			cli_errorf("redis_password_env of %s: %s is not set", cli->config_path,
					cli->config_password_env);
			return EXIT_OPERATION;
		}
		if (!(cli->t.password = strdup(env))) {
			cli_errorf("out of memory");
			return EXIT_OPERATION;
		}
		cli_target_show(&cli->t);
	}
	if (pw_file) {
		char err2[600];
		char *pw = rq_secret_read_file(pw_file, pw_file == cli->password_file
					       ? "--redis-password-file" : "redis_password_file",
					       err2, sizeof(err2));
		if (!pw) {
			cli_errorf("cannot read %s", err2);
			return EXIT_OPERATION;
		}
		rq_secret_free(cli->t.password);
		cli->t.password = pw;
		cli_target_show(&cli->t);
	} else if (!cli->t.password) {
		const char *env = getenv("RELAYQ_REDIS_PASSWORD");
		if (env && *env && !(cli->t.password = strdup(env))) {
			cli_errorf("out of memory");
			return EXIT_OPERATION;
		}
	}
	const char *q = cli->queue ? cli->queue : cli->config_queue ? cli->config_queue
		: RQ_KEYS_QUEUE_DEFAULT;
	if (!rq_keys_queue_valid(q, strlen(q)) ||
	    rq_keys_prefix(q, cli->prefix, sizeof(cli->prefix)) != 0) {
		char *c = cli_clean_str(q, 80);
		cli_errorf("invalid queue name '%s': use " RQ_KEYS_QUEUE_RULE, c);
		free(c);
		return EXIT_USAGE;
	}
	snprintf(cli->qname, sizeof(cli->qname), "%s", q);
	return 0;
}

int cli_open(struct cli *cli)
{
	int rc = cli_resolve(cli);
	if (rc)
		return rc;
	return cli_redis_connect(cli) < 0 ? EXIT_OPERATION : 0;
}

static void close_all(struct cli *cli)
{
	cli_redis_close(cli);
	rq_secret_free(cli->config_redis);
	free(cli->config_queue);
	free(cli->config_user);
	free(cli->config_password_file);
	free(cli->config_password_env);
	cli->config_redis = cli->config_queue = NULL;
	cli->config_user = cli->config_password_file = cli->config_password_env = NULL;
}

/* ---- explain ---- */

/* Handled by explain.c; a -c given before the command is passed on. */
static int cmd_explain(struct cli *cli, int argc, char **argv)
{
	if (!cli->config_path)
		return rq_cli_explain(argc, argv);
	char **args = calloc((size_t)argc + 3, sizeof(*args));
	if (!args) {
		cli_errorf("out of memory");
		return EXIT_OPERATION;
	}
	args[0] = argv[0];
	args[1] = (char *)"-c";
	args[2] = (char *)cli->config_path;
	for (int i = 1; i < argc; i++)
		args[i + 2] = argv[i];
	int rc = rq_cli_explain(argc + 2, args);
	free(args);
	return rc;
}

/* ---- main ---- */

static int dispatch(struct cli *cli, int argc, char **argv)
{
	const char *name = argv[0];
	cli->cmd = name;
	if (strcmp(name, "enqueue") == 0)
		return cmd_enqueue(cli, argc, argv);
	if (strcmp(name, "list") == 0)
		return cmd_list(cli, argc, argv);
	if (strcmp(name, "show") == 0)
		return cmd_show(cli, argc, argv);
	if (strcmp(name, "stats") == 0)
		return cmd_stats(cli, argc, argv);
	if (strcmp(name, "tail") == 0)
		return cmd_tail(cli, argc, argv);
	if (strcmp(name, "explain") == 0)
		return cmd_explain(cli, argc, argv);
	if (strcmp(name, "sendmail") == 0)
		return cmd_sendmail(cli, argc, argv);
	if (strcmp(name, "passwd") == 0)
		return cmd_passwd(cli, argc, argv);
	int rc = cmd_admin(cli, name, argc, argv);
	if (rc >= 0)
		return rc;
	if (strcmp(name, "help") == 0) {
		fputs(main_usage, stdout);
		return 0;
	}
	char *c = cli_clean_str(name, 40);
	cli_errorf("unknown command '%s' (see relayq --help)", c);
	free(c);
	return EXIT_USAGE;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		COMMON_OPTIONS,
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	struct cli cli = {.cmd = ""};
	int rc = 0;
	/* Redis or stdout going away must be an error, not a silent death. */
	signal(SIGPIPE, SIG_IGN);

	/* run as "sendmail" (a symlink to this binary): relayq sendmail */
	const char *base = argc > 0 && argv[0] ? strrchr(argv[0], '/') : NULL;
	base = base ? base + 1 : argc > 0 && argv[0] ? argv[0] : "";
	if (strcmp(base, "sendmail") == 0) {
		cli.cmd = "sendmail";
		rc = cmd_sendmail(&cli, argc, argv);
		close_all(&cli);
		return rc;
	}

	/* Global options stop at the command ('+'). */
	optind = 0;
	opterr = 0;
	for (;;) {
		int o = getopt_long(argc, argv, "+c:", opts, NULL);
		if (o == -1)
			break;
		switch (o) {
		case 'c':
			cli.config_path = optarg;
			break;
		case OPT_REDIS:
			cli.redis_url = optarg;
			break;
		case OPT_QUEUE:
			cli.queue = optarg;
			break;
		case OPT_PASSWORD_FILE:
			cli.password_file = optarg;
			break;
		case OPT_HELP:
			fputs(main_usage, stdout);
			return 0;
		case OPT_VERSION:
			printf("relayq %s (functions library version %d)\n", RQ_VERSION,
					rq_fnlib_version());
			return 0;
		default: {
			const char *bad = optind > 0 && optind <= argc ? argv[optind - 1] : "";
			char *c = cli_clean(bad, strcspn(bad, "="), 60);
			if (optopt == 'c' || optopt >= OPT_REDIS)
				cli_errorf("option '%s' needs a value (see relayq --help)", c);
			else if (optopt)
				cli_errorf("unknown option '-%c' (see relayq --help)",
						isprint(optopt) ? optopt : '?');
			else
				cli_errorf("unknown option '%s' (see relayq --help)", c);
			free(c);
			return EXIT_USAGE;
		}
		}
	}
	if (optind >= argc) {
		fputs(main_usage, stderr);
		cli_errorf("no command given");
		return EXIT_USAGE;
	}
	rc = dispatch(&cli, argc - optind, argv + optind);
	close_all(&cli);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		if (errno != EPIPE) {
			cli_errorf("cannot write the output: %s", strerror(errno));
			if (rc == 0)
				rc = EXIT_OPERATION;
		}
	}
	return rc;
}

/* relayq sendmail (cli.h): a drop-in /usr/sbin/sendmail for applications
 * (PHP mail(), cron, git, framework sendmail backends): reads one message
 * on standard input, fixes it (submit.h) and enqueues it with its
 * recipients; exit codes of <sysexits.h>. */
#include "cli.h"

#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "relayq/clock.h"
#include "relayq/json.h"
#include "relayq/message.h"
#include "relayq/queue_codec.h"
#include "relayq/submit.h"

static const char *const sendmail_usage =
	"Usage: relayq sendmail [OPTIONS] [RECIPIENT ...]\n"
	"       sendmail [OPTIONS] [RECIPIENT ...]   (this binary under the name sendmail)\n"
	"\n"
	"Reads one message on standard input and puts it in the relayq queue, as\n"
	"/usr/sbin/sendmail does. A RECIPIENT may hold several addresses\n"
	"(\"a@example.com, B <b@example.net>\"). Date, Message-ID and From are\n"
	"added when the message has none; Bcc fields are always removed.\n"
	"\n"
	"  -t              recipients also from the To, Cc and Bcc fields\n"
	"  -i, -oi         a line with a single dot does not end the message\n"
	"                  (without it, such a line ends the message)\n"
	"  -f ADDR, -fADDR envelope sender (default: LOGIN@HOSTNAME; '' or '<>'\n"
	"                  for the null sender); -r ADDR is the same\n"
	"  -F NAME         full name for an added From field\n"
	"  -c, --config FILE, --redis URL, --queue NAME, --redis-password-file F\n"
	"                  where the queue is, as for every relayq command\n"
	"                  (default $RELAYQ_REDIS, else " RQ_REDIS_URL_DEFAULT ")\n"
	"  --help          this help\n"
	"\n"
	"Accepted and ignored: -odi -odb -odq -oem -oee -oep -oeq -oew -om -m -v -U\n"
	"-bm -B TYPE -N DSN -R RET -V ENVID.\n"
	"\n"
	"Nothing is printed on success. Exit status (sysexits.h): 0 queued,\n"
	"64 bad usage, 65 bad address or no recipient, 66 no input,\n"
	"75 Redis unreachable or refusing (try again later), 78 bad configuration,\n"
	"70 internal error.\n";

struct sm {
	bool from_header;       /* -t */
	bool ignore_dots;       /* -i */
	const char *sender;     /* -f / -r */
	const char *full_name;  /* -F */
	char **rcpts;
	size_t nrcpts;
	char login[256];
	char host[256];
};

/* ---- options ---- */

/* "BEFORE'ARG'AFTER (see sendmail --help)"; returns EX_USAGE. */
static int usage_error(const char *before, const char *arg, const char *after)
{
	char *c = cli_clean_str(arg, 60);
	cli_errorf("%s'%s'%s (see sendmail --help)", before, c, after);
	free(c);
	return EX_USAGE;
}

/* A long option of relayq's: "--name=value" or "--name value". Returns 0,
 * 1 when --help was shown, or EX_USAGE. */
static int long_option(struct cli *cli, int argc, char **argv, int *i)
{
	static const char *const names[] = {"config", "redis", "queue", "redis-password-file"};
	const char *a = argv[*i] + 2;
	if (strcmp(a, "help") == 0) {
		fputs(sendmail_usage, stdout);
		return 1;
	}
	size_t nlen = strcspn(a, "=");
	for (size_t k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
		if (strlen(names[k]) != nlen || strncmp(a, names[k], nlen) != 0)
			continue;
		const char *v = a[nlen] == '=' ? a + nlen + 1 : NULL;
		if (!v) {
			if (*i + 1 >= argc)
				return usage_error("option ", argv[*i], " needs a value");
			v = argv[++*i];
		}
		switch (k) {
		case 0: cli->config_path = v; break;
		case 1: cli->redis_url = v; break;
		case 2: cli->queue = v; break;
		case 3: cli->password_file = v; break;
		}
		return 0;
	}
	return usage_error("unknown option ", argv[*i], "");
}

/* -o<x>: the ones applications pass. */
static int o_option(struct sm *s, const char *v)
{
	if (strcmp(v, "i") == 0) {
		s->ignore_dots = true;
		return 0;
	}
	if (strcmp(v, "m") == 0)
		return 0;
	if (v[0] == 'd' && v[1] && strchr("bqi", v[1]) && !v[2])
		return 0;
	if (v[0] == 'e' && v[1] && strchr("empqw", v[1]) && !v[2])
		return 0;
	char opt[80];
	snprintf(opt, sizeof(opt), "-o%.70s", v);
	return usage_error("option ", opt, " is not supported");
}

/* Parses the options; *first is the index of the first recipient. Returns
 * 0, 1 after --help, or EX_USAGE. */
static int parse_options(struct cli *cli, struct sm *s, int argc, char **argv, int *first)
{
	int i = 1;
	for (; i < argc; i++) {
		const char *a = argv[i];
		if (strcmp(a, "--") == 0) {
			i++;
			break;
		}
		if (a[0] != '-' || a[1] == '\0')
			break;
		if (a[1] == '-') {
			int rc = long_option(cli, argc, argv, &i);
			if (rc)
				return rc;
			continue;
		}
		for (size_t j = 1; a[j]; j++) {
			char c = a[j];
			if (strchr("tivUm", c)) {
				if (c == 't')
					s->from_header = true;
				else if (c == 'i')
					s->ignore_dots = true;
				continue;
			}
			if (!strchr("frFBNRVcob", c)) {
				char opt[3] = {'-', c, '\0'};
				return usage_error("unknown option ", opt, "");
			}
			/* the value: the rest of this argument, or the next one */
			const char *v = a + j + 1;
			if (!*v) {
				if (i + 1 >= argc) {
					char opt[3] = {'-', c, '\0'};
					return usage_error("option ", opt, " needs a value");
				}
				v = argv[++i];
			}
			int rc = 0;
			switch (c) {
			case 'f':
			case 'r':
				s->sender = v;
				break;
			case 'F':
				s->full_name = v;
				break;
			case 'c':
				cli->config_path = v;
				break;
			case 'o':
				rc = o_option(s, v);
				break;
			case 'b':
				if (strcmp(v, "m") != 0) {
					char opt[80];
					snprintf(opt, sizeof(opt), "-b%.70s", v);
					rc = usage_error("mode ", opt, " is not supported (only -bm)");
				}
				break;
			default:        /* -B -N -R -V: accepted, ignored */
				break;
			}
			if (rc)
				return rc;
			break;
		}
	}
	*first = i;
	return 0;
}

/* ---- the message ---- */

/* Reads standard input: to the end, or (without -i) to a line that is a
 * single dot (LF or CRLF), which is not part of the message. Returns the
 * message, or NULL with an exit code in *rc after printing why. */
static char *read_message(bool ignore_dots, size_t *len, int *rc)
{
	size_t cap = 65536, n = 0, line = 0;
	char *buf = malloc(cap);
	if (!buf) {
		cli_errorf("out of memory");
		*rc = EX_TEMPFAIL;
		return NULL;
	}
	int c;
	while ((c = getc_unlocked(stdin)) != EOF) {
		if (n == cap) {
			if (cap >= RQ_SUBMIT_MAX) {
				cli_errorf("the message is larger than %zu bytes", RQ_SUBMIT_MAX);
				*rc = EX_DATAERR;
				goto error;
			}
			size_t nc = cap * 2 > RQ_SUBMIT_MAX ? RQ_SUBMIT_MAX : cap * 2;
			char *nb = realloc(buf, nc);
			if (!nb) {
				cli_errorf("out of memory");
				*rc = EX_TEMPFAIL;
				goto error;
			}
			buf = nb;
			cap = nc;
		}
		buf[n++] = (char)c;
		if (c != '\n')
			continue;
		size_t l = n - line;
		if (!ignore_dots && buf[line] == '.' &&
		    (l == 2 || (l == 3 && buf[line + 1] == '\r'))) {
			n = line;
			break;
		}
		line = n;
	}
	if (ferror(stdin)) {
		cli_errorf("cannot read the message from standard input: %s", strerror(errno));
		*rc = EX_NOINPUT;
		goto error;
	}
	*len = n;
	return buf;
error:
	free(buf);
	return NULL;
}

/* LOGIN and HOSTNAME for the default sender. */
static void who(struct sm *s)
{
	struct passwd *pw = getpwuid(getuid());
	if (pw && pw->pw_name && *pw->pw_name)
		snprintf(s->login, sizeof(s->login), "%s", pw->pw_name);
	else
		snprintf(s->login, sizeof(s->login), "uid%lu", (unsigned long)getuid());
	if (gethostname(s->host, sizeof(s->host)) != 0 || !s->host[0])
		snprintf(s->host, sizeof(s->host), "localhost");
	s->host[sizeof(s->host) - 1] = '\0';
	for (char *p = s->host; *p; p++) {
		char c = *p;
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '-' || c == '.' || c == '_')) {
			snprintf(s->host, sizeof(s->host), "localhost");
			break;
		}
	}
}

/* The envelope sender into out: -f's address without angle brackets, ""
 * for the null sender, else LOGIN@HOSTNAME. Returns 0 or EX_DATAERR. */
static int sender_address(const struct sm *s, char *out, size_t len)
{
	if (s->sender) {
		size_t n = strlen(s->sender);
		const char *p = s->sender;
		if (n >= 2 && p[0] == '<' && p[n - 1] == '>') {
			p++;
			n -= 2;
		}
		if (n >= len) {
			cli_errorf("bad sender address: too long");
			return EX_DATAERR;
		}
		memcpy(out, p, n);
		out[n] = '\0';
	} else {
		int w = snprintf(out, len, "%s@%s", s->login, s->host);
		if (w < 0 || (size_t)w >= len) {
			cli_errorf("bad sender address: login and host name too long (give one with -f)");
			return EX_DATAERR;
		}
	}
	char err[200];
	if (!rq_addr_valid(out, strlen(out), true, err, sizeof(err))) {
		char *c = cli_clean_str(out, 80);
		cli_errorf("bad sender address '%s': %s%s", c, err,
			   s->sender ? "" : " (give one with -f)");
		free(c);
		return EX_DATAERR;
	}
	return 0;
}

/* ---- the queue ---- */

/* FCALL relayq_enqueue; classifies the outcome. Returns 0, EX_DATAERR (the
 * queue's rules refuse the message: "ERR relayq: ...") or EX_TEMPFAIL. */
int cmd_sendmail(struct cli *cli, int argc, char **argv)
{
	struct sm s = {0};
	char *msg = NULL, *fixed = NULL;
	size_t msglen = 0, fixedlen = 0;
	struct rq_json *meta = NULL;
	struct rq_json_buf mb, env;
	char err[300];
	char sender[RQ_ADDR_PATH_MAX + 1];
	char from_field[1024];
	int first = 0, rc;
	cli_prog = "sendmail";
	rq_json_buf_init(&mb);
	rq_json_buf_init(&env);

	if ((rc = parse_options(cli, &s, argc, argv, &first)) != 0) {
		if (rc == 1)
			rc = 0;
		goto cleanup;
	}
	who(&s);
	if ((rc = sender_address(&s, sender, sizeof(sender))) != 0)
		goto cleanup;
	/* a full name must be one before the message is read */
	char from_addr[RQ_ADDR_PATH_MAX + 300];
	int w = sender[0] ? snprintf(from_addr, sizeof(from_addr), "%s", sender)
		: snprintf(from_addr, sizeof(from_addr), "%s@%s", s.login, s.host);
	if (w < 0 || (size_t)w >= sizeof(from_addr)) {
		cli_errorf("bad From address: login and host name too long");
		rc = EX_DATAERR;
		goto cleanup;
	}
	const char *from = from_addr;
	if (s.full_name) {
		if (rq_submit_mailbox(from_field, sizeof(from_field), s.full_name, from_addr,
				      err, sizeof(err)) < 0) {
			cli_errorf("bad From address: %s", err);
			rc = EX_DATAERR;
			goto cleanup;
		}
		from = from_field;
	}
	if (!(msg = read_message(s.ignore_dots, &msglen, &rc)))
		goto cleanup;
	/* recipients: the header's (-t), then the arguments' */
	if (s.from_header &&
	    rq_submit_header_rcpts(msg, msglen, &s.rcpts, &s.nrcpts, err, sizeof(err)) != 0) {
		cli_errorf("bad recipient in the message's To, Cc or Bcc: %s", err);
		rc = EX_DATAERR;
		goto cleanup;
	}
	for (int i = first; i < argc; i++) {
		if (rq_submit_address_list(argv[i], strlen(argv[i]), &s.rcpts, &s.nrcpts,
					   err, sizeof(err)) != 0) {
			char *c = cli_clean_str(argv[i], 80);
			cli_errorf("bad recipient '%s': %s", c, err);
			free(c);
			rc = EX_DATAERR;
			goto cleanup;
		}
	}
	if (s.nrcpts == 0) {
		cli_errorf(s.from_header ? "no recipients: none in To, Cc or Bcc, none given"
			   : "no recipients given (use -t to take them from the message)");
		rc = EX_DATAERR;
		goto cleanup;
	}
	struct rq_submit_fix f = {
		.add_message_id = true,
		.add_date = true,
		.add_from = true,
		.remove_bcc = true,
		.hostname = s.host,
		.from = from,
		.now_ms = rq_clock_wall_ms(),
	};
	if (rq_submit_fix(msg, msglen, &f, &fixed, &fixedlen, err, sizeof(err)) != 0) {
		cli_errorf("%s", err);
		rc = strstr(err, "memory") ? EX_TEMPFAIL : EX_DATAERR;
		goto cleanup;
	}
	/* meta {"via":"sendmail","user":LOGIN} and the envelope */
	rq_json_buf_obj_begin(&mb);
	rq_json_buf_kv_str(&mb, "via", "sendmail");
	rq_json_buf_kv_str(&mb, "user", s.login);
	rq_json_buf_obj_end(&mb);
	if (!rq_json_buf_ok(&mb) ||
	    !(meta = rq_json_parse(mb.data, mb.len, 0, err, sizeof(err)))) {
		cli_errorf("cannot build the meta field: %s", rq_json_buf_ok(&mb) ? err : "out of memory");
		rc = EX_SOFTWARE;
		goto cleanup;
	}
	struct rq_queue_enqueue_req req = {
		.from = sender,
		.to = (const char *const *)s.rcpts,
		.nto = s.nrcpts,
		.body = fixed,
		.body_len = fixedlen,
		.delay_s = -1,
		.meta = meta,
	};
	if (rq_queue_enqueue_envelope(&req, &env) != 0) {
		cli_errorf("cannot build the envelope (out of memory?)");
		rc = EX_TEMPFAIL;
		goto cleanup;
	}
	if (cli_resolve(cli) != 0) {
		rc = EX_CONFIG;
		goto cleanup;
	}
	if (cli_redis_connect(cli) != 0) {
		rc = EX_TEMPFAIL;
		goto cleanup;
	}
	switch (cli_enqueue_send(cli, env.data, env.len, fixed, fixedlen, NULL)) {
	case 0: rc = 0; break;
	case 1: rc = EX_DATAERR; break;
	default: rc = EX_TEMPFAIL; break;
	}
cleanup:
	rq_json_buf_finish(&mb);
	rq_json_buf_finish(&env);
	rq_json_free(meta);
	rq_submit_rcpts_free(s.rcpts, s.nrcpts);
	free(msg);
	free(fixed);
	return rc;
}

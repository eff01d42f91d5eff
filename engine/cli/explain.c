/* relayq explain: what relayqd decides for one reply, from decision.h
 * (explain.h). */
#include "explain.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayq/config.h"
#include "relayq/decision.h"
#include "relayq/json.h"
#include "relayq/log.h"
#include "relayq/policy.h"
#include "relayq/policy_lua.h"
#include "relayq/reply.h"

#define EXIT_CONFIG 1
#define EXIT_USAGE 2

static const char usage[] =
	"usage: relayq explain [-c FILE] --code N|EVENT [--enhanced X.Y.Z] [--text T]\n"
	"                      [--stage S] [--domain D] [--rcpt ADDR] [--host H]\n"
	"                      [--attempt N] [--age DURATION] [--resends N] [--meta JSON]\n"
	"                      [--json]\n"
	"\n"
	"Prints what relayqd decides for one reply (the policy's action, then the\n"
	"state it records, what that counts against and what the destination is\n"
	"told) and which rule decided, without sending anything. Without -c: the\n"
	"built-in policy.\n"
	"\n"
	"  -c, --config FILE  the relayqd config file (settings and Lua policy)\n"
	"  --code N|EVENT     reply code 200-599, or a transport event: timeout,\n"
	"                     refused, lost, tls, dns, protocol, local\n"
	"  --enhanced X.Y.Z   enhanced status code (RFC 3463)\n"
	"  --text T           reply text\n"
	"  --stage S          greeting, ehlo, helo, starttls, tls, auth, mail, rcpt,\n"
	"                     data, dot, connect, dns, ... (default rcpt, or connect\n"
	"                     for an event)\n"
	"  --domain D         recipient domain (default: from --rcpt)\n"
	"  --rcpt ADDR        recipient address\n"
	"  --host H           the host that answered\n"
	"  --attempt N        this attempt's number, 1 = first (default 1)\n"
	"  --age DURATION     message age: seconds or 30s, 5m, 2h, 5d (default 0)\n"
	"  --resends N        times the message was already sent again at once in\n"
	"                     a new transaction (too many recipients; default 0)\n"
	"  --meta JSON        the message's meta object, for Lua handlers\n"
	"  --json             one JSON object instead of text\n";

struct opts {
	const char *config;
	const char *code, *enhanced, *text, *stage;       /* the outcome */
	const char *domain, *rcpt, *host;                 /* where */
	const char *attempt, *age, *resends, *meta;       /* the message */
	bool json;
	bool help;
};

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int usage_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("relayq explain: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputs("\n(see relayq explain --help)\n", stderr);
	va_end(ap);
	return EXIT_USAGE;
}

/* Seconds rounded to milliseconds, for JSON. */
static double ms(double v)
{
	return round(v * 1000) / 1000;
}

/* Safe to print: no control bytes, bounded. */
static const char *shown(const char *s)
{
	static char buf[80];
	size_t i = 0;
	for (; s[i] && i < sizeof(buf) - 1; i++)
		buf[i] = (unsigned char)s[i] < 0x20 || s[i] == 0x7f ? '?' : s[i];
	buf[i] = '\0';
	return buf;
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	static const struct {
		const char *name;
		size_t off;
	} valued[] = {
		{"--config", offsetof(struct opts, config)},
		{"-c", offsetof(struct opts, config)},
		{"--code", offsetof(struct opts, code)},
		{"--event", offsetof(struct opts, code)},
		{"--enhanced", offsetof(struct opts, enhanced)},
		{"--text", offsetof(struct opts, text)},
		{"--stage", offsetof(struct opts, stage)},
		{"--domain", offsetof(struct opts, domain)},
		{"--rcpt", offsetof(struct opts, rcpt)},
		{"--host", offsetof(struct opts, host)},
		{"--attempt", offsetof(struct opts, attempt)},
		{"--age", offsetof(struct opts, age)},
		{"--resends", offsetof(struct opts, resends)},
		{"--meta", offsetof(struct opts, meta)},
	};
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (strcmp(a, "--json") == 0) {
			o->json = true;
			continue;
		}
		if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
			o->help = true;
			continue;
		}
		bool found = false;
		for (size_t k = 0; k < sizeof(valued) / sizeof(valued[0]); k++) {
			size_t n = strlen(valued[k].name);
			const char *val = NULL;
			if (strcmp(a, valued[k].name) == 0) {
				if (i + 1 >= argc)
					return usage_error("%s needs a value", a);
				val = argv[++i];
			} else if (strncmp(a, valued[k].name, n) == 0 && a[n] == '=' &&
				   valued[k].name[1] == '-') {
				val = a + n + 1;
			} else {
				continue;
			}
			*(const char **)((char *)o + valued[k].off) = val;
			found = true;
			break;
		}
		if (!found)
			return usage_error("unknown argument '%s'", shown(a));
	}
	return 0;
}

static bool parse_uint(const char *s, unsigned long max, unsigned long *out)
{
	if (!*s)
		return false;
	for (const char *p = s; *p; p++)
		if (!isdigit((unsigned char)*p))
			return false;
	errno = 0;
	unsigned long v = strtoul(s, NULL, 10);
	if (errno || v > max)
		return false;
	*out = v;
	return true;
}

/* A "random" number that is always *ctx. */
static double fixed(void *ctx)
{
	return *(const double *)ctx;
}

static void print_text(const struct rq_decision *d, double lo, double hi,
		       const struct rq_hint *h)
{
	const struct rq_policy_answer *a = &d->policy;
	char buf[32];
	printf("action: %s\n", rq_policy_action_name(a->action));
	rq_duration_format(a->after, buf, sizeof(buf));
	if (a->after > 0)
		printf("after: %.0f (%s)\n", a->after, buf);
	else
		printf("after: 0\n");
	if (lo != hi)
		printf("jitter: %.0f..%.0f\n", lo, hi);
	printf("counts_against: %s\n", rq_policy_count_name(a->counts));
	if (d->state == RQ_DECISION_DEFERRED) {
		rq_duration_format(d->after, buf, sizeof(buf));
		printf("state: deferred (next try in %s)\n", buf);
	} else {
		printf("state: %s\n", rq_decision_state_name(d->state));
	}
	printf("scope: %s\n", rq_decision_scope_name(d->scope));
	if (d->dest == RQ_DECISION_DEST_SUSPEND) {
		rq_duration_format(d->dest_after, buf, sizeof(buf));
		printf("destination: suspend for %s\n", buf);
	} else {
		printf("destination: %s\n", rq_decision_dest_name(d->dest));
	}
	printf("rule: %s\n", d->rule);
	printf("reason: %s\n", d->reason);
	if (d->loud)
		printf("loud: yes (needs the operator)\n");
	if (d->state == RQ_DECISION_EXPIRED)
		printf("expired: yes\n");
	printf("hint: %s\n", h->meaning);
	printf("fix: %s\n", h->fix);
}

static int print_json(const struct rq_decision *dd, double lo, double hi,
		      const struct rq_hint *h)
{
	const struct rq_policy_answer *d = &dd->policy;
	struct rq_json_buf b;
	rq_json_buf_init(&b);
	rq_json_buf_obj_begin(&b);
	rq_json_buf_kv_str(&b, "action", rq_policy_action_name(d->action));
	rq_json_buf_key(&b, "after");
	rq_json_buf_double(&b, ms(d->after));
	rq_json_buf_key(&b, "after_min");
	rq_json_buf_double(&b, ms(lo));
	rq_json_buf_key(&b, "after_max");
	rq_json_buf_double(&b, ms(hi));
	rq_json_buf_kv_str(&b, "counts_against", rq_policy_count_name(d->counts));
	rq_json_buf_kv_str(&b, "rule", dd->rule);
	rq_json_buf_kv_str(&b, "reason", dd->reason);
	rq_json_buf_kv_bool(&b, "loud", dd->loud);
	rq_json_buf_kv_bool(&b, "expired", dd->state == RQ_DECISION_EXPIRED);
	rq_json_buf_kv_str(&b, "state", rq_decision_state_name(dd->state));
	rq_json_buf_key(&b, "next_after");
	rq_json_buf_double(&b, ms(dd->after));
	rq_json_buf_kv_str(&b, "scope", rq_decision_scope_name(dd->scope));
	rq_json_buf_kv_bool(&b, "attempt", dd->attempt);
	rq_json_buf_kv_str(&b, "destination", rq_decision_dest_name(dd->dest));
	rq_json_buf_key(&b, "destination_after");
	rq_json_buf_double(&b, ms(dd->dest_after));
	rq_json_buf_kv_str(&b, "policy_rule", d->rule);
	rq_json_buf_key(&b, "hint");
	rq_json_buf_obj_begin(&b);
	rq_json_buf_kv_str(&b, "meaning", h->meaning);
	rq_json_buf_kv_str(&b, "fix", h->fix);
	rq_json_buf_obj_end(&b);
	rq_json_buf_obj_end(&b);
	int rc = 0;
	if (rq_json_buf_ok(&b)) {
		printf("%s\n", b.data);
	} else {
		fputs("relayq explain: out of memory\n", stderr);
		rc = EXIT_CONFIG;
	}
	rq_json_buf_finish(&b);
	return rc;
}

int rq_cli_explain(int argc, char **argv)
{
	struct opts o = {0};
	struct rq_config *cfg = NULL;
	int rc = parse_args(argc, argv, &o);
	if (rc != 0)
		return rc;
	if (o.help) {
		fputs(usage, stdout);
		return 0;
	}
	if (!o.code)
		return usage_error("%s", "--code is required");

	/* The outcome. */
	int code = 0;
	enum rq_fail fail = RQ_FAIL_NONE;
	unsigned long n;
	if (parse_uint(o.code, 999, &n)) {
		if (n < 200 || n > 599)
			return usage_error("--code %s: a reply code is 200 to 599", shown(o.code));
		code = (int)n;
	} else {
		for (int f = 1; f < RQ_FAIL_COUNT_; f++)
			if (strcmp(o.code, rq_fail_name((enum rq_fail)f)) == 0)
				fail = (enum rq_fail)f;
		if (fail == RQ_FAIL_NONE)
			return usage_error("--code '%s' is neither a reply code nor an event "
					   "(timeout, refused, lost, tls, dns, protocol, local)",
					   shown(o.code));
	}
	char enhanced[16] = "";
	if (o.enhanced) {
		size_t len = strlen(o.enhanced);
		if (len >= sizeof(enhanced) || rq_reply_enhanced(o.enhanced, len, enhanced) == 0 ||
		    strcmp(enhanced, o.enhanced) != 0)
			return usage_error("--enhanced '%s' is not an enhanced status code "
					   "like 5.1.1", shown(o.enhanced));
	}
	enum rq_stage stage = fail != RQ_FAIL_NONE ? RQ_STAGE_CONNECT : RQ_STAGE_RCPT;
	if (o.stage) {
		int s = rq_stage_parse(o.stage);
		if (s < 0 || s == RQ_STAGE_NONE)
			return usage_error("--stage '%s' is not a stage (greeting, ehlo, "
					   "starttls, auth, mail, rcpt, data, dot, ...)",
					   shown(o.stage));
		stage = (enum rq_stage)s;
	}
	unsigned long attempt = 1;
	if (o.attempt && (!parse_uint(o.attempt, 1000000, &attempt) || attempt == 0))
		return usage_error("--attempt '%s' is not a number from 1 to 1000000",
				   shown(o.attempt));
	unsigned long resends = 0;
	if (o.resends && !parse_uint(o.resends, 1000, &resends))
		return usage_error("--resends '%s' is not a number from 0 to 1000",
				   shown(o.resends));
	double age = 0;
	if (o.age && rq_duration_parse(o.age, &age) < 0)
		return usage_error("--age '%s' is not a duration (seconds, or like 5m, "
				   "2h, 5d)", shown(o.age));
	const char *domain = o.domain;
	if (!domain && o.rcpt) {
		const char *at = strrchr(o.rcpt, '@');
		domain = at ? at + 1 : NULL;
	}
	if (domain && (strlen(domain) > 255 || !*domain))
		return usage_error("--domain '%s' is not a domain", shown(domain));

	struct rq_outcome out;
	rq_outcome_set(&out, stage, fail, code, enhanced, "%s", o.text ? o.text : "");

	/* The policy. */
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, stderr);
	if (o.config) {
		struct rq_config_diag diag;
		rq_config_diag_init(&diag, o.config);
		cfg = rq_config_lua_load(o.config, RQ_CONFIG_LOAD_NO_SMTP_SECRET, &diag);
		if (!cfg || diag.warnings)
			rq_config_diag_print(&diag, stderr);
		if (!cfg)
			return EXIT_CONFIG;
	} else {
		cfg = rq_config_create();
		if (!cfg) {
			fputs("relayq explain: out of memory\n", stderr);
			return EXIT_CONFIG;
		}
	}

	const char *to[1] = {o.rcpt ? o.rcpt : ""};
	struct rq_policy_msg msg = {
		.id = "explain", .from = "", .to = to, .nto = o.rcpt ? 1 : 0,
		.attempts = (unsigned)attempt - 1, .created = 0, .meta = o.meta,
	};
	struct rq_decision_input in = {
		.outcome = &out, .recipient = o.rcpt, .domain = domain, .host = o.host, .msg = &msg,
		.attempt = (unsigned)attempt, .age = age, .resends = (unsigned)resends,
	};
	/* The decision without jitter (the middle of the range), made once:
	 * a handler runs once, as in relayqd (handlers may keep state). The
	 * range comes with the decision. */
	struct rq_decision d;
	double v_mid = 0.5;
	struct rq_policy_rand r_mid = {fixed, &v_mid};
	rq_decision_make(cfg, &in, &r_mid, &d);
	double lo = d.policy.after_min, hi = d.policy.after_max;
	if (!(lo <= d.policy.after && d.policy.after <= hi))
		lo = hi = d.policy.after;
	const struct rq_hint *h = rq_outcome_hint(&out);
	rc = o.json ? print_json(&d, lo, hi, h) : (print_text(&d, lo, hi, h), 0);
	rq_config_destroy(cfg);
	return rc;
}

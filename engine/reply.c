/* SMTP replies: parsing, enhanced status codes, the "too many recipients"
 * classifier and the knowledge base (see reply.h). */
#include "relayq/reply.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/*
 * SMTP replies (RFC 5321 4.2), enhanced status codes (RFC 3463, RFC 7372,
 * RFC 7505, RFC 4954) and the knowledge base of common replies.
 *
 * Everything here reads untrusted bytes from the network: every copy is
 * bounded, control bytes never reach the kept text, and truncation never
 * cuts a UTF-8 sequence in half.
 */

bool rq_reply_too_many_rcpts(const struct rq_outcome *o)
{
	if (o->fail != RQ_FAIL_NONE || o->stage != RQ_STAGE_RCPT || o->code < 400 || o->code > 599)
		return false;
	/* RFC 3463: X.5.3 is "too many recipients" whatever the reply code
	 * (OpenSMTPD answers 451 4.5.3) */
	if (o->enhanced[0])
		return strcmp(o->enhanced + 1, ".5.3") == 0;
	if (o->code != 452 && o->code != 552)
		return false;
	for (const char *p = o->text; *p; p++)
		if (strncasecmp(p, "too many", 8) == 0)
			return true;
	return false;
}

static const char *const stage_names[RQ_STAGE_COUNT_] = {
	[RQ_STAGE_NONE] = "none",
	[RQ_STAGE_CONNECT] = "connect",
	[RQ_STAGE_GREETING] = "greeting",
	[RQ_STAGE_EHLO] = "ehlo",
	[RQ_STAGE_HELO] = "helo",
	[RQ_STAGE_STARTTLS] = "starttls",
	[RQ_STAGE_TLS] = "tls",
	[RQ_STAGE_AUTH] = "auth",
	[RQ_STAGE_MAIL] = "mail",
	[RQ_STAGE_RCPT] = "rcpt",
	[RQ_STAGE_DATA] = "data",
	[RQ_STAGE_DOT] = "dot",
	[RQ_STAGE_RSET] = "rset",
	[RQ_STAGE_QUIT] = "quit",
	[RQ_STAGE_DNS] = "dns",
};

static const char *const fail_names[RQ_FAIL_COUNT_] = {
	[RQ_FAIL_NONE] = "none",
	[RQ_FAIL_TIMEOUT] = "timeout",
	[RQ_FAIL_REFUSED] = "refused",
	[RQ_FAIL_LOST] = "lost",
	[RQ_FAIL_TLS] = "tls",
	[RQ_FAIL_DNS] = "dns",
	[RQ_FAIL_PROTOCOL] = "protocol",
	[RQ_FAIL_LOCAL] = "local",
};

const char *rq_stage_name(enum rq_stage stage)
{
	if ((unsigned)stage >= RQ_STAGE_COUNT_)
		return "unknown";
	return stage_names[stage];
}

bool rq_errno_local(int err)
{
	return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

enum rq_fail rq_fail_connect_errno(int err)
{
	return rq_errno_local(err) ? RQ_FAIL_LOCAL : RQ_FAIL_REFUSED;
}

const char *rq_fail_name(enum rq_fail fail)
{
	if ((unsigned)fail >= RQ_FAIL_COUNT_)
		return "unknown";
	return fail_names[fail];
}

int rq_stage_parse(const char *name)
{
	if (!name)
		return -1;
	for (int i = 0; i < RQ_STAGE_COUNT_; i++)
		if (strcasecmp(name, stage_names[i]) == 0)
			return i;
	return -1;
}

/*
 * The length of s[0..len) without a trailing incomplete UTF-8 sequence, so a
 * cut made at len never leaves half a character behind.
 */
static size_t utf8_trim(const char *s, size_t len)
{
	size_t i = len;
	size_t back = 0;
	while (i > 0 && back < 3 && ((unsigned char)s[i - 1] & 0xC0) == 0x80) {
		i--;
		back++;
	}
	if (i == 0)
		return len;
	unsigned char lead = (unsigned char)s[i - 1];
	size_t need;
	if (lead < 0xC0)
		return len; /* ASCII, or not UTF-8 at all: nothing to protect */
	else if (lead < 0xE0)
		need = 2;
	else if (lead < 0xF0)
		need = 3;
	else
		need = 4;
	if (back + 1 < need)
		return i - 1; /* the last character is incomplete: drop it */
	return len;
}

/* Control bytes other than tab (and newline where allowed) become '?'. */
static char clean_byte(unsigned char c, bool keep_nl)
{
	if (c == '\t' || (keep_nl && c == '\n'))
		return (char)c;
	if (c < 0x20 || c == 0x7f)
		return '?';
	return (char)c;
}

void rq_outcome_set(struct rq_outcome *o, enum rq_stage stage, enum rq_fail fail,
		    int code, const char *enhanced, const char *fmt, ...)
{
	memset(o, 0, sizeof(*o));
	o->stage = stage;
	o->fail = fail;
	o->code = code;
	if (enhanced) {
		size_t n = strnlen(enhanced, sizeof(o->enhanced) - 1);
		memcpy(o->enhanced, enhanced, n);
		o->enhanced[n] = '\0';
	}
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		int n = vsnprintf(o->text, sizeof(o->text), fmt, ap);
		va_end(ap);
		if (n < 0) {
			o->text[0] = '\0';
		} else if ((size_t)n >= sizeof(o->text)) {
			size_t keep = utf8_trim(o->text, sizeof(o->text) - 1);
			o->text[keep] = '\0';
		}
		for (char *p = o->text; *p; p++)
			*p = clean_byte((unsigned char)*p, true);
	}
}

/* ---- the reply parser ---------------------------------------------------- */

static int parse_num(const char *s, size_t len, size_t *pos, int maxdigits)
{
	int v = 0, n = 0;
	while (*pos < len && n < maxdigits && s[*pos] >= '0' && s[*pos] <= '9') {
		v = v * 10 + (s[*pos] - '0');
		(*pos)++;
		n++;
	}
	return n ? v : -1;
}

size_t rq_reply_enhanced(const char *text, size_t len, char out[16])
{
	size_t i = 0;
	out[0] = '\0';
	if (!text)
		return 0;
	while (i < len && text[i] == ' ')
		i++;
	if (i >= len || (text[i] != '2' && text[i] != '4' && text[i] != '5'))
		return 0;
	int cls = text[i] - '0';
	i++;
	if (i >= len || text[i] != '.')
		return 0;
	i++;
	int subject = parse_num(text, len, &i, 3);
	if (subject < 0 || i >= len || text[i] != '.')
		return 0;
	i++;
	int detail = parse_num(text, len, &i, 3);
	if (detail < 0)
		return 0;
	if (i < len && text[i] != ' ')
		return 0; /* "5.1.1x", "5.1.1.2" or a fourth digit */
	while (i < len && text[i] == ' ')
		i++;
	char tmp[40]; /* at most "5.999.999" */
	snprintf(tmp, sizeof(tmp), "%d.%d.%d", cls, subject, detail);
	memcpy(out, tmp, 10);
	out[15] = '\0';
	return i;
}

void rq_reply_parser_init(struct rq_reply_parser *p)
{
	memset(p, 0, sizeof(*p));
}

static enum rq_reply_status parser_fail(struct rq_reply_parser *p, const char *what,
					const char *line, size_t len)
{
	char shown[41] = "";
	size_t n = len < sizeof(shown) - 1 ? len : sizeof(shown) - 1;
	for (size_t i = 0; i < n; i++)
		shown[i] = clean_byte((unsigned char)line[i], false);
	n = utf8_trim(shown, n);
	shown[n] = '\0';
	snprintf(p->err, sizeof(p->err), "%s: \"%s%s\"", what, shown,
		 len > n ? "..." : "");
	return RQ_REPLY_ERROR;
}

/* Appends cleaned text; once anything had to be cut, nothing more is kept. */
static void text_append(struct rq_reply_parser *p, const char *s, size_t len,
			bool keep_nl)
{
	if (p->text_cut)
		return;
	size_t room = sizeof(p->text) - 1 - p->text_len;
	size_t n = len;
	if (n > room) {
		n = room;
		p->text_cut = true;
	}
	char *dst = p->text + p->text_len;
	for (size_t i = 0; i < n; i++)
		dst[i] = clean_byte((unsigned char)s[i], keep_nl);
	p->text_len += n;
	if (p->text_cut)
		p->text_len = utf8_trim(p->text, p->text_len);
	p->text[p->text_len] = '\0';
}

enum rq_reply_status rq_reply_parser_line(struct rq_reply_parser *p,
					  const char *line, size_t len)
{
	if (p->err[0])
		return RQ_REPLY_ERROR;
	if (p->done) {
		snprintf(p->err, sizeof(p->err), "line after the end of the reply");
		return RQ_REPLY_ERROR;
	}
	if (!line)
		len = 0;
	if (len > 0 && line[len - 1] == '\r')
		len--; /* tolerate a CR the caller left in */
	if (len > RQ_REPLY_LINE_MAX)
		return parser_fail(p, "reply line longer than 2048 bytes", line, len);
	if (p->lines >= RQ_REPLY_LINES_MAX)
		return parser_fail(p, "reply longer than 100 lines", line, len);
	p->lines++;
	if (len < 3)
		return parser_fail(p, "reply line too short", line, len);
	for (int i = 0; i < 3; i++)
		if (line[i] < '0' || line[i] > '9')
			return parser_fail(p, "reply line without a code", line, len);
	if (len > 3 && line[3] != ' ' && line[3] != '-')
		return parser_fail(p, "malformed reply line", line, len);
	int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
	if (code < 200 || code > 599)
		return parser_fail(p, "reply code out of range", line, len);
	if (p->lines > 1 && code != p->code)
		return parser_fail(p, "reply code differs from the first line's", line, len);
	p->code = code;

	const char *text = len > 3 ? line + 4 : line + len;
	size_t tlen = len > 3 ? len - 4 : 0;
	char enh[16];
	size_t skip = rq_reply_enhanced(text, tlen, enh);
	if (skip > 0 && enh[0] - '0' == code / 100) {
		if (!p->enhanced[0])
			memcpy(p->enhanced, enh, sizeof(p->enhanced));
		text += skip;
		tlen -= skip;
	}
	if (p->lines > 1)
		text_append(p, "\n", 1, true);
	text_append(p, text, tlen, false);

	if (len == 3 || line[3] == ' ') {
		p->done = true;
		return RQ_REPLY_DONE;
	}
	return RQ_REPLY_MORE;
}

void rq_reply_parser_outcome(const struct rq_reply_parser *p, enum rq_stage stage,
			     struct rq_outcome *out)
{
	if (p->err[0]) {
		rq_outcome_set(out, stage, RQ_FAIL_PROTOCOL, 0, NULL, "%s", p->err);
		return;
	}
	if (!p->done) {
		rq_outcome_set(out, stage, RQ_FAIL_PROTOCOL, 0, NULL, "incomplete reply");
		return;
	}
	memset(out, 0, sizeof(*out));
	out->stage = stage;
	out->fail = RQ_FAIL_NONE;
	out->code = p->code;
	memcpy(out->enhanced, p->enhanced, sizeof(out->enhanced));
	memcpy(out->text, p->text, sizeof(out->text));
	out->text[sizeof(out->text) - 1] = '\0';
}

/* ---- the knowledge base --------------------------------------------------- */

struct hint_entry {
	const char *key; /* "5.7.1" exact, "x.7.1" any class, "550" or "5xx" */
	struct rq_hint hint;
};

/* Exact enhanced codes, where the class changes the meaning. */
static const struct hint_entry exact_hints[] = {
	{"4.2.2", {"the recipient's mailbox is full (temporarily)",
		   "retry later; the recipient has to make room"}},
	{"4.7.0", {"temporarily refused for policy reasons (rate limit, reputation, "
		   "unverified sender)",
		   "retry later and slow down; check the sending IP's reputation"}},
	{"4.7.1", {"temporarily refused by policy (greylisting or rate limiting)",
		   "retry later; greylisting accepts the retry after a few minutes"}},
	{"5.7.0", {"refused for security or policy reasons",
		   "read the reply text; authenticate, or check the sender's "
		   "reputation and the server's policy"}},
	{"5.7.1", {"delivery not authorized: the message was refused by policy "
		   "(relaying denied, blocklist, content)",
		   "authenticate before relaying, check blocklists for the sending IP, "
		   "or ask the recipient's postmaster"}},
};

/* Enhanced subject.detail with any class (RFC 3463, 7372, 7505, 4954). */
static const struct hint_entry subject_hints[] = {
	{"x.1.1", {"the recipient mailbox does not exist (bad destination mailbox "
		   "address)",
		   "check the recipient address for typos; remove it from the list"}},
	{"x.1.2", {"the recipient's domain does not exist or does not accept mail "
		   "(bad destination system address)",
		   "check the domain part of the address (typo, expired domain, "
		   "missing MX)"}},
	{"x.1.3", {"the recipient address is syntactically invalid",
		   "fix the address syntax"}},
	{"x.1.6", {"the recipient mailbox has moved",
		   "use the new address given in the reply text"}},
	{"x.1.7", {"the sender address is syntactically invalid",
		   "fix the envelope sender address"}},
	{"x.1.8", {"the sender's domain is invalid or does not resolve",
		   "use a sender domain with valid DNS (MX or A records)"}},
	{"x.1.10", {"the recipient's domain has a null MX: it accepts no mail",
		    "the address cannot receive mail; remove it"}},
	{"x.2.1", {"the recipient mailbox is disabled and not accepting messages",
		   "the account is probably closed; remove the address or contact "
		   "the recipient another way"}},
	{"x.2.2", {"the recipient's mailbox is full",
		   "retry later or contact the recipient another way"}},
	{"x.2.3", {"the message is larger than the recipient's per-message limit",
		   "reduce or link attachments"}},
	{"x.2.4", {"mailing list expansion problem",
		   "contact the list owner"}},
	{"x.3.1", {"the receiving mail system is full",
		   "retry later"}},
	{"x.3.2", {"the receiving system is not accepting messages now",
		   "retry later"}},
	{"x.3.4", {"message too large for the receiving system",
		   "reduce or link attachments"}},
	{"x.4.1", {"no answer from the destination host",
		   "retry later; check the MX hosts and firewalls"}},
	{"x.4.2", {"bad connection to the destination host",
		   "retry later"}},
	{"x.4.3", {"directory server (DNS) failure while routing",
		   "retry later; check the destination domain's DNS"}},
	{"x.4.4", {"unable to route: no usable mail server for the domain",
		   "check the destination domain's MX and A records"}},
	{"x.4.6", {"routing loop detected",
		   "fix the mail routing (MX pointing back at the sender, forwarding "
		   "loop)"}},
	{"x.4.7", {"delivery time expired: the message could not be delivered in "
		   "time",
		   "check why earlier attempts failed; the destination may be down"}},
	{"x.5.1", {"invalid command",
		   "a client/server protocol mismatch; report it"}},
	{"x.5.2", {"syntax error in a command",
		   "check the addresses and parameters sent"}},
	{"x.5.3", {"too many recipients",
		   "send the remaining recipients in another transaction"}},
	{"x.5.4", {"invalid command arguments",
		   "check the MAIL/RCPT parameters (SIZE, BODY, SMTPUTF8)"}},
	{"x.6.3", {"conversion required but not supported (8-bit or UTF-8 content)",
		   "send 7-bit content or use a server supporting 8BITMIME/SMTPUTF8"}},
	{"x.6.7", {"non-ASCII addresses are not supported by the server",
		   "use an ASCII address for this recipient"}},
	{"x.7.1", {"delivery not authorized: the message was refused by policy",
		   "authenticate before relaying, check blocklists for the sending "
		   "IP, or ask the recipient's postmaster"}},
	{"x.7.8", {"authentication credentials invalid",
		   "check the user name and password (or API key)"}},
	{"x.7.9", {"authentication mechanism too weak",
		   "use a stronger AUTH mechanism, over TLS"}},
	{"x.7.11", {"encryption required for the requested authentication mechanism",
		    "use STARTTLS or implicit TLS"}},
	{"x.7.20", {"no passing DKIM signature found",
		    "sign outgoing mail with DKIM for the sender domain"}},
	{"x.7.21", {"no acceptable DKIM signature found",
		    "fix the DKIM signing (key size, algorithm, signed headers)"}},
	{"x.7.22", {"no valid DKIM signature aligned with the author's domain",
		    "sign with a DKIM key of the From: domain"}},
	{"x.7.23", {"SPF validation failed",
		    "add the sending IP to the sender domain's SPF record"}},
	{"x.7.24", {"SPF validation error (DNS problem with the SPF record)",
		    "fix the sender domain's SPF record"}},
	{"x.7.25", {"reverse DNS validation failed for the sending IP",
		    "give the sending IP a PTR record that resolves back to it"}},
	{"x.7.26", {"sender authentication (SPF/DKIM/DMARC) failed",
		    "fix the sender domain's DNS records: SPF, DKIM and DMARC"}},
	{"x.7.27", {"the sender's domain has a null MX and cannot receive replies",
		    "use a sender domain that accepts mail"}},
};

static const struct hint_entry code_hints[] = {
	{"220", {"the server is ready", "nothing to do"}},
	{"221", {"the server is closing the connection", "nothing to do"}},
	{"235", {"authentication succeeded", "nothing to do"}},
	{"250", {"requested action completed", "nothing to do"}},
	{"251", {"user not local; the server will forward", "nothing to do"}},
	{"252", {"cannot verify the user, but the message will be attempted",
		 "nothing to do"}},
	{"354", {"start mail input", "send the message content"}},
	{"421", {"the service is not available now and the server is closing the "
		 "connection (overload, rate limit, shutdown)",
		 "retry later; lower the connection rate to this destination"}},
	{"450", {"mailbox unavailable for now (busy, greylisted or blocked "
		 "temporarily)",
		 "retry later"}},
	{"451", {"local error in processing on the receiving side",
		 "retry later; if it persists, contact the receiving postmaster"}},
	{"452", {"insufficient system storage, or too many recipients",
		 "retry later; send fewer recipients per transaction"}},
	{"454", {"TLS or authentication temporarily unavailable",
		 "retry later"}},
	{"455", {"the server cannot accommodate the parameters now",
		 "retry later"}},
	{"500", {"syntax error, command unrecognized",
		 "a protocol mismatch; check the server and the client settings"}},
	{"501", {"syntax error in parameters or arguments",
		 "check the address syntax and the parameters sent"}},
	{"502", {"command not implemented", "do not use this command with this server"}},
	{"503", {"bad sequence of commands",
		 "a protocol problem; e.g. authentication required before MAIL"}},
	{"504", {"command parameter not implemented",
		 "use another parameter or mechanism"}},
	{"521", {"the host does not accept mail", "the destination accepts no mail; remove it"}},
	{"530", {"authentication required",
		 "configure AUTH credentials for this relay"}},
	{"534", {"authentication mechanism too weak",
		 "use a stronger AUTH mechanism, over TLS"}},
	{"535", {"authentication credentials invalid",
		 "check the user name and password (or API key)"}},
	{"538", {"encryption required for the requested authentication mechanism",
		 "use STARTTLS or implicit TLS"}},
	{"550", {"mailbox unavailable: the recipient does not exist, or the message "
		 "was refused by policy",
		 "check the recipient address; read the reply text for a policy "
		 "reason"}},
	{"551", {"user not local", "use the forwarding address given in the reply"}},
	{"552", {"message too large, or storage exceeded",
		 "reduce or link attachments"}},
	{"553", {"invalid address (mailbox name not allowed)",
		 "check the domain part and the syntax of the address"}},
	{"554", {"transaction failed (often: refused by policy or as spam)",
		 "read the reply text; check blocklists and the content"}},
	{"555", {"MAIL or RCPT parameters not recognized or not implemented",
		 "check the MAIL/RCPT parameters (SIZE, BODY, SMTPUTF8)"}},
	{"556", {"the recipient's domain does not accept mail",
		 "the address cannot receive mail; remove it"}},
};

static const struct hint_entry class_hints[] = {
	{"2xx", {"success", "nothing to do"}},
	{"3xx", {"intermediate reply: the server waits for more", "nothing to do"}},
	{"4xx", {"temporary failure", "retry later"}},
	{"5xx", {"permanent failure", "read the reply text; do not retry unchanged"}},
};

static const struct rq_hint *find_hint(const struct hint_entry *t, size_t n,
				       const char *key)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(t[i].key, key) == 0)
			return &t[i].hint;
	return NULL;
}

#define FIND(table, key) find_hint((table), sizeof(table) / sizeof((table)[0]), (key))

const struct rq_hint *rq_reply_hint(int code, const char *enhanced)
{
	const struct rq_hint *h = NULL;
	char enh[16] = "";
	if (enhanced && rq_reply_enhanced(enhanced, strlen(enhanced), enh) > 0) {
		/* An enhanced code of another class than the reply is ignored. */
		if (code >= 200 && code <= 599 && enh[0] - '0' != code / 100)
			enh[0] = '\0';
	}
	if (enh[0]) {
		h = FIND(exact_hints, enh);
		if (h)
			return h;
		char any[16];
		snprintf(any, sizeof(any), "x%s", enh + 1);
		h = FIND(subject_hints, any);
		if (h)
			return h;
	}
	if (code < 200 || code > 599)
		return NULL;
	char key[8];
	snprintf(key, sizeof(key), "%d", code);
	h = FIND(code_hints, key);
	if (h)
		return h;
	snprintf(key, sizeof(key), "%dxx", code / 100);
	return FIND(class_hints, key);
}

static const struct rq_hint fail_hints[RQ_FAIL_COUNT_] = {
	[RQ_FAIL_NONE] = {"no reply recorded", "nothing to do"},
	[RQ_FAIL_TIMEOUT] = {"the server did not answer in time",
			     "retry later; check the network path and the "
			     "server's load"},
	[RQ_FAIL_REFUSED] = {"the connection was refused or the host is unreachable",
			     "retry later; check the MX hosts, port and firewalls"},
	[RQ_FAIL_LOST] = {"the connection was closed in the middle of the session",
			  "retry later; the server may be overloaded or dropping "
			  "clients"},
	[RQ_FAIL_TLS] = {"the TLS handshake or certificate verification failed",
			 "check the server's certificate and the TLS settings"},
	[RQ_FAIL_DNS] = {"temporary DNS failure",
			 "retry later; check the resolver and the domain's DNS"},
	[RQ_FAIL_PROTOCOL] = {"the server sent a malformed reply",
			      "report it to the server's postmaster"},
	[RQ_FAIL_LOCAL] = {"this host ran out of a resource (file descriptors, "
			   "buffers, memory) before the server was reached",
			   "nothing wrong with the destination; check relayqd's "
			   "limits (ulimit -n, connections) and the host's load"},
};

const struct rq_hint *rq_outcome_hint(const struct rq_outcome *o)
{
	static const struct rq_hint unknown = {"unknown result", "read the text"};
	if (!o)
		return &unknown;
	if (o->code >= 200 && o->code <= 599 &&
	    (o->fail == RQ_FAIL_NONE || o->synthetic)) {
		const struct rq_hint *h = rq_reply_hint(o->code, o->enhanced);
		if (h)
			return h;
	}
	if ((unsigned)o->fail < RQ_FAIL_COUNT_)
		return &fail_hints[o->fail];
	return &unknown;
}

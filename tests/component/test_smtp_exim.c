/*
 * The SMTP client against Exim 4.96 (Debian's exim4-daemon-light), run
 * privately from the package unpacked by scripts/exim-fetch (never
 * installed: it would replace postfix). Exim offers CHUNKING and
 * PIPELINING by default: messages go as BDAT (dot lines, more than one
 * chunk, chunks cut between CR and LF, and lock-step on a port without
 * PIPELINING), and what Exim stored (exim -Mvc) is our message byte for
 * byte; Exim's log shows every message received with CHUNKING ("K") and
 * PIPELINING ("L", never "L-": offered but not used) and no protocol
 * error. IDNA: on a port without SMTPUTF8 a recipient domain in UTF-8 is
 * accepted as its A-label; where Exim offers SMTPUTF8 the UTF-8 form goes.
 *
 * Exim looks up its compiled-in user (Debian-exim) at start: it runs in a
 * mount namespace of its own (unshare -m, as root) where a private passwd
 * and group file that name it are bind-mounted over /etc/passwd and
 * /etc/group. Exim listens on three ports: P1 without SMTPUTF8, P2 with
 * it, P3 without PIPELINING; it queues what it accepts (queue_only) and
 * delivers nothing. The test skips, saying why, only when Exim cannot be
 * fetched (no package mirror reachable); any other failure fails.
 */
#include "test_smtp_common.h"

#include "relayq/message.h"

#include <sys/stat.h>
#include <unistd.h>

static char *tmpdir;
static char exim_root[600];     /* the unpacked packages */
static char skip_why[1200];
static struct th_proc exim;
static int port_ascii, port_utf8, port_lockstep;

static const char *const one[] = {"ok@example.net", NULL};

static char *exim_log(const char *name)
{
	char p[700];
	snprintf(p, sizeof(p), "%s/log/%slog", tmpdir, name);
	char *l = th_read_file(p, NULL);
	return l ? l : calloc(1, 1);
}

static void exim_fail(const char *what)
{
	char *m = exim_log("main"), *pn = exim_log("panic"), *out;
	char p[700];
	snprintf(p, sizeof(p), "%s/exim.out", tmpdir);
	out = th_read_file(p, NULL);
	fail_msg("Exim %s. mainlog:\n%s\npaniclog:\n%s\noutput:\n%s", what, m, pn, out ? out : "");
}

/* A shell command run as Exim, in the namespace with the private passwd:
 * "exim4 -C conf ARGS". */
static void exim_cmd(char *buf, size_t len, const char *args)
{
	snprintf(buf, len,
		 "unshare -m sh -c 'mount --bind %s/passwd /etc/passwd && "
		 "mount --bind %s/group /etc/group && "
		 "exec env LD_LIBRARY_PATH=%s/usr/lib/x86_64-linux-gnu:%s/lib/x86_64-linux-gnu "
		 "%s/usr/sbin/exim4 -C %s/exim.conf %s'",
		 tmpdir, tmpdir, exim_root, exim_root, exim_root, tmpdir, args);
}

static void exim_start(void)
{
	char cmd[4096], *out = NULL;
	snprintf(cmd, sizeof(cmd), "%s/scripts/exim-fetch 2>&1", th_source_root());
	if (th_run(cmd, &out) != 0) {
		snprintf(skip_why, sizeof(skip_why),
			 "Exim could not be fetched (scripts/exim-fetch: no package mirror?): %.1000s",
			 out ? out : "");
		free(out);
		return;
	}
	out[strcspn(out, "\n")] = '\0';
	snprintf(exim_root, sizeof(exim_root), "%s/root", out);
	free(out);

	port_ascii = th_free_port();
	do
		port_utf8 = th_free_port();
	while (port_utf8 == port_ascii);
	do
		port_lockstep = th_free_port();
	while (port_lockstep == port_ascii || port_lockstep == port_utf8);
	/* Debian-exim as nobody/nogroup in a private copy of passwd and group;
	 * the spool and the logs are Exim's */
	snprintf(cmd, sizeof(cmd),
		 "set -e; cd '%s'; mkdir -p spool log; chown 65534:65534 spool log; "
		 "grep -v '^Debian-exim:' /etc/passwd > passwd; "
		 "echo 'Debian-exim:x:65534:65534:Exim (relayq test):/nonexistent:/usr/sbin/nologin' >> passwd; "
		 "grep -v '^Debian-exim:' /etc/group > group; echo 'Debian-exim:x:65534:' >> group; "
		 "chmod 644 passwd group", tmpdir);
	if (th_run(cmd, &out) != 0)
		fail_msg("cannot prepare the Exim folder: %s", out ? out : "");
	free(out);
	snprintf(cmd, sizeof(cmd), "%s/exim.conf", tmpdir);
	FILE *f = fopen(cmd, "w");
	assert_non_null(f);
	fprintf(f,
		"primary_hostname = exim.test\n"
		"spool_directory = %s/spool\n"
		"log_file_path = %s/log/%%slog\n"
		"pid_file_path = %s/exim.pid\n"
		"daemon_smtp_ports = %d : %d : %d\n"
		"local_interfaces = 127.0.0.1\n"
		"queue_only = true\n"
		"host_lookup =\n"
		"rfc1413_hosts =\n"
		"rfc1413_query_timeout = 0s\n"
		"tls_advertise_hosts =\n"
		"pipelining_connect_advertise_hosts =\n"
		"chunking_advertise_hosts = *\n"
		"smtputf8_advertise_hosts = ${if eq{$received_port}{%d}{*}{}}\n"
		"pipelining_advertise_hosts = ${if eq{$received_port}{%d}{}{*}}\n"
		"log_selector = +pipelining +smtp_protocol_error +smtp_syntax_error "
		"+received_recipients +smtp_connection +smtp_no_mail +incoming_port\n"
		"keep_environment =\n"
		"acl_smtp_rcpt = acl_rcpt\n"
		"begin acl\n"
		"acl_rcpt:\n"
		"  accept\n"
		"begin routers\n"
		"all:\n"
		"  driver = accept\n"
		"  transport = file\n"
		"begin transports\n"
		"file:\n"
		"  driver = appendfile\n"
		"  file = %s/mail\n",
		tmpdir, tmpdir, tmpdir, port_ascii, port_utf8, port_lockstep, port_utf8,
		port_lockstep, tmpdir);
	fclose(f);
	char sh[4096], log[700];
	/* exec all the way down: the pid th_stop signals is Exim's */
	memcpy(sh, "exec ", 5);
	exim_cmd(sh + 5, sizeof(sh) - 5, "-bdf");
	snprintf(log, sizeof(log), "%s/exim.out", tmpdir);
	char *argv[] = {"sh", "-c", sh, NULL};
	if (th_spawn(&exim, argv, log) != 0)
		exim_fail("could not be started");
	if (th_wait_port(port_ascii, 15000) != 0 || th_wait_port(port_utf8, 15000) != 0 ||
	    th_wait_port(port_lockstep, 15000) != 0)
		exim_fail("does not listen");
}

static void skip_without_exim(void)
{
	if (skip_why[0]) {
		fprintf(stderr, "test_smtp_exim: SKIPPED: %s\n", skip_why);
		skip();
	}
}

/* Exim's id of the message whose Message-ID is <id@relayq.test>, from the
 * "<=" line of its main log; the line is copied to line. */
static void exim_msg_id(const char *id, char *out, size_t outlen, char *line, size_t linelen)
{
	char needle[200];
	snprintf(needle, sizeof(needle), " id=%s@relayq.test", id);
	char *log = exim_log("main");
	char *p = strstr(log, needle);
	if (!p)
		exim_fail("logged no \"<=\" line for the message");
	char *bol = p;
	while (bol > log && bol[-1] != '\n')
		bol--;
	char *eol = strchr(p, '\n');
	snprintf(line, linelen, "%.*s", (int)(eol ? eol - bol : (long)strlen(bol)), bol);
	/* "2026-12-03 21:14:41 1tXXXX-000000-00 <= ..." */
	char date[32], tm[32], mid[64];
	if (sscanf(line, "%31s %31s %63s", date, tm, mid) != 3)
		fail_msg("unexpected log line: %s", line);
	snprintf(out, outlen, "%s", mid);
	free(log);
}

/* One message with dot lines and n_lines more, sent to port in chunks of
 * chunk bytes (0: default); Exim's stored copy (exim -Mvc) must be ours
 * from our first field to the end (LF line ends), its "<=" line must say
 * CHUNKING and, with PIPELINING offered, PIPELINING. */
static void exim_case(const char *id, int port, size_t n_lines, bool split_crlf,
		      const char *rcpt, bool pipelined)
{
	size_t cap = 1000 + n_lines * 70;
	char *body = malloc(cap);
	size_t n = (size_t)snprintf(body, cap,
		"Message-ID: <%s@relayq.test>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
		"From: sender@example.com\r\nTo: ok@example.net\r\nSubject: bdat %s\r\n\r\n"
		".leading dot\r\n..two dots\r\n.\r\n. dot space\r\nnot a dot\r\n", id, id);
	for (size_t i = 0; i < n_lines; i++)
		n += (size_t)snprintf(body + n, cap - n, "%s%06zu %055d\r\n",
				      i % 7 == 0 ? "." : "l", i, 0);
	struct run r;
	run_init(&r);
	short_timeouts(&r.opts, 15000);
	if (split_crlf)
		r.opts.chunk_size = (size_t)(strchr(body, '\r') - body) + 1;
	run_connect(&r, port, "exim.test");
	const char *const rc[] = {rcpt, NULL};
	txn_set(&r, "sender@example.com", rcpt ? rc : one, body);
	send_wait(&r);
	if (r.txn.delivered != 1)
		fail_msg("%s: not accepted: %d %s; trace:\n%s", id, r.rcpts[0].outcome.code,
			 r.rcpts[0].outcome.text, r.trace);
	assert_true(rq_smtp_caps(r.s)->flags & RQ_SMTP_CAP_CHUNKING);
	assert_true(r.txn.chunked);
	assert_int_equal(r.txn.pipelined, pipelined);
	size_t chunk = r.opts.chunk_size ? r.opts.chunk_size : RQ_SMTP_CHUNK_SIZE;
	size_t cl = rq_bdat_encode(body, n, NULL, 0);
	assert_int_equal(r.txn.chunks, rq_bdat_chunks(cl, chunk));
	assert_null(strstr(r.trace, "> DATA"));
	run_finish(&r);
	assert_outcome(&r.why, RQ_STAGE_QUIT, RQ_FAIL_NONE, 221);
	run_free_base(&r);
	fprintf(stderr, "exim %s: %zu octets in %zu chunk(s)%s\n", id, cl, rq_bdat_chunks(cl, chunk),
		pipelined ? ", pipelined" : ", lock-step");

	char mid[64], line[2048], cmd[4096], *stored = NULL;
	exim_msg_id(id, mid, sizeof(mid), line, sizeof(line));
	fprintf(stderr, "exim log: %s\n", line);
	if (!strstr(line, " K ") && !strstr(line, " K\n"))
		fail_msg("%s: Exim did not log CHUNKING (K): %s", id, line);
	if (pipelined && !strstr(line, " L "))
		fail_msg("%s: Exim did not log PIPELINING (L): %s", id, line);
	if (strstr(line, " L-") || strstr(line, " L."))
		fail_msg("%s: Exim logged PIPELINING offered but not used: %s", id, line);
	char args[200];
	snprintf(args, sizeof(args), "-Mvc %s", mid);
	exim_cmd(cmd, sizeof(cmd), args);
	if (th_run(cmd, &stored) != 0 || !stored)
		exim_fail("-Mvc failed");
	char *lf = malloc(n + 2);
	size_t k = 0;
	for (size_t i = 0; i < n; i++)
		if (!(body[i] == '\r' && i + 1 < n && body[i + 1] == '\n'))
			lf[k++] = body[i];
	lf[k] = '\0';
	const char *at = strstr(stored, "Message-ID: <");
	if (!at || strcmp(at, lf) != 0)
		fail_msg("%s: Exim stored other bytes than we sent (%zu / %zu octets):\n%s\n--- sent:\n%s",
			 id, at ? strlen(at) : 0, k, stored, lf);
	free(lf);
	free(stored);
	free(body);
}

static void test_exim_bdat(void **state)
{
	skip_without_exim();
	exim_case("exim-bdat-small", port_ascii, 0, false, NULL, true);
	exim_case("exim-bdat-big", port_ascii, 5000, false, NULL, true);
	exim_case("exim-bdat-split", port_ascii, 40, true, NULL, true);
	exim_case("exim-bdat-lockstep", port_lockstep, 40, true, NULL, false);
	/* no protocol trouble in any of Exim's logs */
	char *m = exim_log("main"), *rj = exim_log("reject"), *pn = exim_log("panic");
	const char *bad[] = {"synchronization error", "protocol error", "syntax error",
			     "unexpected disconnection", "lost connection", "SMTP error", NULL};
	for (int i = 0; bad[i]; i++)
		if (strstr(m, bad[i]) || strstr(rj, bad[i]))
			fail_msg("Exim logged \"%s\":\n%s\n%s", bad[i], m, rj);
	if (pn[0])
		fail_msg("Exim's panic log:\n%s", pn);
	free(m);
	free(rj);
	free(pn);
}

/* IDNA: Exim without SMTPUTF8 takes the A-label; with it, the UTF-8 form
 * (and relayq says SMTPUTF8 on MAIL). */
static void test_exim_idna(void **state)
{
	skip_without_exim();
	char mid[64], line[2048];
	exim_case("exim-idna-alabel", port_ascii, 0, false, "user@b\xc3\xbc" "cher.example", true);
	exim_msg_id("exim-idna-alabel", mid, sizeof(mid), line, sizeof(line));
	if (!strstr(line, "for user@xn--bcher-kva.example"))
		fail_msg("Exim did not record the A-label: %s", line);
	exim_case("exim-idna-utf8", port_utf8, 0, false, "user@b\xc3\xbc" "cher.example", true);
	exim_msg_id("exim-idna-utf8", mid, sizeof(mid), line, sizeof(line));
	if (!strstr(line, "for user@b\xc3\xbc" "cher.example"))
		fail_msg("Exim did not record the UTF-8 recipient: %s", line);
}

static int group_setup(void **state)
{
	tmpdir = th_mkdtemp("smtp-exim");
	chmod(tmpdir, 0755);
	exim_start();
	return 0;
}

static int group_teardown(void **state)
{
	if (exim.pid > 0)
		th_stop(&exim, SIGTERM);
	th_rmrf(tmpdir);
	free(tmpdir);
	return 0;
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN); /* as relayqd does (see smtp.h) */
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_exim_bdat),
		cmocka_unit_test(test_exim_idna),
	};
	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

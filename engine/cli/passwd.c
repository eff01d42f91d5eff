/* relayq passwd (cli.h): sets one user's password in the SMTP listener's
 * credentials file (credentials.h); the password from standard input,
 * without echo on a terminal. */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include "relayq/credentials.h"

enum { OPT_FILE = 2000 };

static const char *const passwd_usage =
	"Usage: relayq passwd --file FILE USER\n"
	"\n"
	"Sets USER's password in FILE, the credentials file of relayqd's SMTP\n"
	"listener (AUTH): one line \"USER:HASH\" (yescrypt, or SHA-512 where\n"
	"yescrypt is missing), replaced or added; the file is written atomically\n"
	"with mode 0600 (an existing file keeps its owner, group and group bits).\n"
	"The password is read from standard input: asked twice without echo on a\n"
	"terminal, else the first line.\n"
	"\n"
	"  --file FILE   the credentials file (created when missing)\n"
	"\n"
	"USER: 1 to 64 of A-Z a-z 0-9 . _ @ + -\n";

/* One line from stdin into buf (without its line end); echo off when a
 * terminal. Returns the length, or -1 (EOF before anything, too long, read
 * error) after printing why. */
static ssize_t read_password(const char *prompt, char *buf, size_t cap)
{
	bool tty = isatty(STDIN_FILENO);
	struct termios old, quiet;
	bool restored = true;
	if (tty) {
		fprintf(stderr, "%s", prompt);
		fflush(stderr);
		if (tcgetattr(STDIN_FILENO, &old) == 0) {
			quiet = old;
			quiet.c_lflag &= (tcflag_t)~(ECHO | ECHOE | ECHOK | ECHONL);
			if (tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet) == 0)
				restored = false;
		}
	}
	size_t n = 0;
	int c;
	bool over = false;
	while ((c = getc(stdin)) != EOF && c != '\n') {
		if (n < cap - 1)
			buf[n++] = (char)c;
		else
			over = true;
	}
	bool eof_first = c == EOF && n == 0;
	bool rerr = ferror(stdin);
	if (!restored)
		tcsetattr(STDIN_FILENO, TCSAFLUSH, &old);
	if (tty)
		fputc('\n', stderr);
	if (n > 0 && buf[n - 1] == '\r')
		n--;
	buf[n] = '\0';
	if (rerr) {
		cli_errorf("passwd: cannot read the password: %s", strerror(errno));
		return -1;
	}
	if (eof_first) {
		cli_errorf("passwd: no password on standard input");
		return -1;
	}
	if (over) {
		cli_errorf("passwd: password longer than %d bytes", RQ_CREDENTIALS_PASSWORD_MAX);
		return -1;
	}
	return (ssize_t)n;
}

int cmd_passwd(struct cli *cli, int argc, char **argv)
{
	static const struct option opts[] = {
		{"file", required_argument, NULL, OPT_FILE},
		COMMON_OPTIONS,
		{NULL, 0, NULL, 0},
	};
	const char *file = NULL;
	char pw[RQ_CREDENTIALS_PASSWORD_MAX + 2], again[RQ_CREDENTIALS_PASSWORD_MAX + 2];
	char *hash = NULL;
	char err[600];
	int rc = 0, o;
	cli_start_options();
	while ((o = cli_next_option(cli, argc, argv, opts, passwd_usage, &rc)) != -1) {
		if (o == -2)
			return rc;
		if (o == OPT_FILE)
			file = optarg;
	}
	if (!file) {
		cli_errorf("passwd: --file is required (see relayq passwd --help)");
		return EXIT_USAGE;
	}
	if (argc - optind != 1) {
		cli_errorf("passwd: give exactly one USER (see relayq passwd --help)");
		return EXIT_USAGE;
	}
	const char *user = argv[optind];
	if (!rq_credentials_user_valid(user, strlen(user))) {
		char *c = cli_clean_str(user, 80);
		cli_errorf("passwd: bad user name '%s': use 1 to 64 of A-Z a-z 0-9 . _ @ + -", c);
		free(c);
		return EXIT_USAGE;
	}
	rc = EXIT_OPERATION;
	ssize_t n = read_password("Password: ", pw, sizeof(pw));
	if (n < 0)
		goto cleanup;
	if (n == 0) {
		cli_errorf("passwd: empty password");
		goto cleanup;
	}
	if (isatty(STDIN_FILENO)) {
		ssize_t m = read_password("Again: ", again, sizeof(again));
		if (m < 0)
			goto cleanup;
		if (m != n || memcmp(pw, again, (size_t)n) != 0) {
			cli_errorf("passwd: the passwords differ; nothing changed");
			goto cleanup;
		}
	}
	if (!(hash = rq_credentials_hash(pw, (size_t)n, err, sizeof(err)))) {
		cli_errorf("passwd: %s", err);
		goto cleanup;
	}
	if (rq_credentials_file_set(file, user, hash, err, sizeof(err)) != 0) {
		cli_errorf("passwd: %s", err);
		goto cleanup;
	}
	rc = 0;
cleanup:
	explicit_bzero(pw, sizeof(pw));
	explicit_bzero(again, sizeof(again));
	free(hash);
	return rc;
}

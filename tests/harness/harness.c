#include "harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("harness: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

int th_spawn(struct th_proc *p, char *const argv[], const char *log_path)
{
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		setpgid(0, 0);
		if (log_path) {
			int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
			if (fd >= 0) {
				dup2(fd, 1);
				dup2(fd, 2);
				close(fd);
			}
		}
		int devnull = open("/dev/null", O_RDONLY);
		if (devnull >= 0) {
			dup2(devnull, 0);
			close(devnull);
		}
		execvp(argv[0], argv);
		fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	p->pid = pid;
	return 0;
}

int th_stop(struct th_proc *p, int sig)
{
	int status = 0;
	if (p->pid <= 0)
		return 0;
	kill(p->pid, sig);
	while (waitpid(p->pid, &status, 0) == -1 && errno == EINTR)
		;
	p->pid = 0;
	return status;
}

bool th_alive(struct th_proc *p)
{
	if (p->pid <= 0)
		return false;
	int status;
	pid_t r = waitpid(p->pid, &status, WNOHANG);
	if (r == p->pid) {
		p->pid = 0;
		return false;
	}
	return true;
}

static char proc_state(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return '?';
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	const char *paren = strrchr(buf, ')');  /* the name may hold spaces */
	return paren && paren[1] == ' ' ? paren[2] : '?';
}

void th_pause(pid_t pid)
{
	kill(pid, SIGSTOP);
	for (int i = 0; i < 2000; i++) {
		char st = proc_state(pid);
		if (st == 'T' || st == 't' || st == '?')
			return;
		sleep_ms(1);
	}
	die("process %ld did not stop", (long)pid);
}

char *th_mkdtemp(const char *tag)
{
	const char *base = getenv("TMPDIR");
	char buf[512];
	snprintf(buf, sizeof(buf), "%s/rq-%s-XXXXXX", base && *base ? base : "/tmp", tag);
	if (!mkdtemp(buf))
		die("mkdtemp %s: %s", buf, strerror(errno));
	chmod(buf, 0755);
	return strdup(buf);
}

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	remove(path);
	return 0;
}

void th_rmrf(const char *dir)
{
	if (dir && *dir)
		nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int th_free_port(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(a);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    getsockname(fd, (struct sockaddr *)&a, &len) < 0)
		die("free port: %s", strerror(errno));
	close(fd);
	return ntohs(a.sin_port);
}

int th_wait_port(int port, int ms)
{
	for (int waited = 0; waited <= ms; waited += 10) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
					.sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
		int ok = connect(fd, (struct sockaddr *)&a, sizeof(a));
		close(fd);
		if (ok == 0)
			return 0;
		sleep_ms(10);
	}
	return -1;
}

const char *th_source_root(void)
{
	const char *e = getenv("RQ_SOURCE_ROOT");
	return e && *e ? e : RQ_SOURCE_ROOT;
}

const char *th_build_root(void)
{
	const char *e = getenv("RQ_BUILD_ROOT");
	return e && *e ? e : RQ_BUILD_ROOT;
}

static void redis_launch(struct th_redis *r)
{
	char port[16], log[400];
	snprintf(port, sizeof(port), "%d", r->port);
	snprintf(log, sizeof(log), "%s/redis.log", r->dir);
	char *argv[] = {"redis-server", "--port", port, "--bind", "127.0.0.1",
			"--unixsocket", r->sock, "--unixsocketperm", "700",
			"--save", "", "--dir", r->dir, "--daemonize", "no",
			"--appendonly", r->aof ? "yes" : "no",
			"--appendfsync", "everysec", NULL};
	if (th_spawn(&r->proc, argv, log) != 0)
		die("cannot start redis-server");
	for (int i = 0; i < 1000; i++) {
		redisContext *c = redisConnectUnix(r->sock);
		if (c && !c->err) {
			redisReply *rep = redisCommand(c, "PING");
			bool ok = rep && rep->type == REDIS_REPLY_STATUS;
			freeReplyObject(rep);
			redisFree(c);
			if (ok)
				return;
		} else if (c) {
			redisFree(c);
		}
		if (!th_alive(&r->proc))
			die("redis-server exited at start; see %s", log);
		sleep_ms(10);
	}
	die("redis-server did not answer PING; see %s", log);
}

void th_redis_start(struct th_redis *r, bool aof)
{
	memset(r, 0, sizeof(*r));
	char *dir = th_mkdtemp("redis");
	snprintf(r->dir, sizeof(r->dir), "%s", dir);
	free(dir);
	snprintf(r->sock, sizeof(r->sock), "%s/redis.sock", r->dir);
	snprintf(r->url, sizeof(r->url), "unix:%s", r->sock);
	r->own = true;
	r->aof = aof;
	r->port = th_free_port();
	redis_launch(r);
	char path[600];
	snprintf(path, sizeof(path), "%s/lua/redis/relayq.lua", th_source_root());
	if (access(path, R_OK) == 0 && th_redis_load_functions(r) != 0)
		die("cannot load %s", path);
}

void th_redis_shared(struct th_redis *r)
{
	const char *e = getenv("RELAYQ_TEST_REDIS");
	if (!e || strncmp(e, "unix:", 5) != 0) {
		th_redis_start(r, false);
		return;
	}
	memset(r, 0, sizeof(*r));
	snprintf(r->sock, sizeof(r->sock), "%s", e + 5);
	snprintf(r->url, sizeof(r->url), "%s", e);
	r->own = false;
	char path[600];
	snprintf(path, sizeof(path), "%s/lua/redis/relayq.lua", th_source_root());
	if (access(path, R_OK) == 0 && th_redis_load_functions(r) != 0)
		die("cannot load %s", path);
}

void th_redis_stop(struct th_redis *r)
{
	if (!r->own)
		return;
	th_stop(&r->proc, SIGTERM);
	th_rmrf(r->dir);
	r->own = false;
}

void th_redis_kill(struct th_redis *r, bool hard)
{
	if (!r->own)
		die("th_redis_kill on a shared redis-server");
	th_stop(&r->proc, hard ? SIGKILL : SIGTERM);
	unlink(r->sock);
}

void th_redis_restart(struct th_redis *r)
{
	if (r->proc.pid > 0)
		th_redis_kill(r, false);
	redis_launch(r);
}

redisContext *th_redis_connect(const struct th_redis *r)
{
	redisContext *c = redisConnectUnix(r->sock);
	if (!c || c->err)
		die("connect %s: %s", r->sock, c ? c->errstr : "out of memory");
	return c;
}

char *th_read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap);
	size_t got;
	while (buf && (got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
		n += got;
		if (cap - n - 1 == 0) {
			cap *= 2;
			char *nb = realloc(buf, cap);
			if (!nb) {
				free(buf);
				buf = NULL;
			}
			buf = nb;
		}
	}
	fclose(f);
	if (!buf)
		return NULL;
	buf[n] = '\0';
	if (len)
		*len = n;
	return buf;
}

int th_redis_load_functions(const struct th_redis *r)
{
	char path[600];
	snprintf(path, sizeof(path), "%s/lua/redis/relayq.lua", th_source_root());
	size_t len;
	char *code = th_read_file(path, &len);
	if (!code) {
		fprintf(stderr, "harness: %s missing\n", path);
		return -1;
	}
	redisContext *c = th_redis_connect(r);
	redisReply *rep = redisCommand(c, "FUNCTION LOAD REPLACE %b", code, len);
	int rc = 0;
	if (!rep || rep->type == REDIS_REPLY_ERROR) {
		fprintf(stderr, "harness: FUNCTION LOAD: %s\n", rep ? rep->str : c->errstr);
		rc = -1;
	}
	freeReplyObject(rep);
	redisFree(c);
	free(code);
	return rc;
}

const char *th_unique_queue(const char *tag)
{
	static char names[16][96];
	static unsigned n;
	char *s = names[n++ % 16];
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	snprintf(s, 96, "t-%s-%ld-%u-%ld", tag, (long)getpid(), n, (long)(ts.tv_nsec % 100000));
	return s;
}

int th_run(const char *cmd, char **out)
{
	FILE *p = popen(cmd, "r");
	if (!p)
		return -1;
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap);
	size_t got;
	while ((got = fread(buf + n, 1, cap - n - 1, p)) > 0) {
		n += got;
		if (cap - n - 1 == 0) {
			cap *= 2;
			buf = realloc(buf, cap);
			if (!buf)
				die("out of memory");
		}
	}
	buf[n] = '\0';
	int status = pclose(p);
	if (out)
		*out = buf;
	else
		free(buf);
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool th_wait_for(bool (*cond)(void *), void *arg, int ms)
{
	for (int waited = 0; waited <= ms; waited += 5) {
		if (cond(arg))
			return true;
		sleep_ms(5);
	}
	return false;
}

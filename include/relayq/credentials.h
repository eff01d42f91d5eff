#ifndef RELAYQ_CREDENTIALS_H
#define RELAYQ_CREDENTIALS_H

/*
 * The credentials file of the SMTP listener's AUTH: one "user:HASH" line a
 * user (HASH a crypt(3) string of libxcrypt: yescrypt "$y$...", or
 * SHA-512 "$6$..." where yescrypt is missing), '#' comments and empty
 * lines. Loading, checking a password, hashing one, and replacing one
 * user's line (relayq passwd).
 *
 * User names: 1 to RQ_CREDENTIALS_USER_MAX bytes of [A-Za-z0-9._@+-].
 * Hashing and checking run crypt: with yescrypt that is tens of
 * milliseconds of CPU, on purpose; a caller on an event loop runs it where
 * that does not stall other sessions.
 */

#include <stdbool.h>
#include <stddef.h>

#define RQ_CREDENTIALS_USER_MAX 64
#define RQ_CREDENTIALS_PASSWORD_MAX 511     /* bytes; longer is refused (libxcrypt: 512 with the NUL) */
#define RQ_CREDENTIALS_FILE_MAX (16 * 1024 * 1024)

struct rq_credentials;

/* True when user (len bytes) is a valid user name. */
bool rq_credentials_user_valid(const char *user, size_t len);

/*
 * Reads the file at path. Refuses (NULL, err names the path and the line)
 * a file that others may read or write (mode & 007: group is allowed, so
 * the daemon's group can read a root-owned file), that is not a regular
 * file, is over RQ_CREDENTIALS_FILE_MAX, or has a bad line: no ':', a bad
 * user name, a user twice, or a hash that is empty, holds a ':', a space
 * or a control byte, or does not start with '$'. An empty file is valid
 * (nobody can log in). Free with rq_credentials_destroy.
 */
struct rq_credentials *rq_credentials_load(const char *path, char *err, size_t errlen);

/* Frees c; NULL is a no-op. */
void rq_credentials_destroy(struct rq_credentials *c);

/* How many users c holds. */
size_t rq_credentials_count(const struct rq_credentials *c);

/*
 * True when user has that password (plen bytes; a password holding NUL or
 * longer than RQ_CREDENTIALS_PASSWORD_MAX never matches). Runs crypt once
 * whatever the outcome, against a hash of the file's first user when the
 * user is unknown, and compares the results in constant time, so that the
 * time taken does not tell which users exist. Never calls back.
 */
bool rq_credentials_check(const struct rq_credentials *c, const char *user,
			  const char *password, size_t plen);

/*
 * A new crypt hash of password (plen bytes, no NUL, 1 to
 * RQ_CREDENTIALS_PASSWORD_MAX): yescrypt with a random salt, or SHA-512
 * ("$6$") when this libxcrypt has no yescrypt. Returns a heap string
 * (free()), or NULL with err.
 */
char *rq_credentials_hash(const char *password, size_t plen, char *err, size_t errlen);

/*
 * Writes the file at path with user's line set to "user:hash" (replaced in
 * place, or appended; other lines kept as they are), atomically: a
 * temporary file in the same directory, fsync, rename. A new file gets
 * mode 0600; an existing one keeps its mode without the bits for others,
 * and its owner and group when the caller may set them. Refuses an
 * existing file the loader would refuse for its mode or size. Returns 0,
 * or -1 with err (nothing changed).
 */
int rq_credentials_file_set(const char *path, const char *user, const char *hash,
			    char *err, size_t errlen);

#endif

/* TLS: OpenSSL client and server contexts, modes and certificate
 * verification (see tls.h). */
#include "relayq/tls.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct rq_tls_ctx {
	SSL_CTX *ctx;
};

static const char *const mode_names[RQ_TLS_MODE_COUNT_] = {
	"none", "opportunistic", "required", "implicit",
};

const char *rq_tls_mode_name(enum rq_tls_mode mode)
{
	if ((int)mode < 0 || mode >= RQ_TLS_MODE_COUNT_)
		return "?";
	return mode_names[mode];
}

int rq_tls_mode_parse(const char *name)
{
	if (!name)
		return -1;
	for (int i = 0; i < RQ_TLS_MODE_COUNT_; i++)
		if (strcasecmp(name, mode_names[i]) == 0)
			return i;
	if (strcasecmp(name, "may") == 0)
		return RQ_TLS_OPPORTUNISTIC;
	if (strcasecmp(name, "encrypt") == 0 || strcasecmp(name, "verify") == 0)
		return RQ_TLS_REQUIRED;
	return -1;
}

static void ossl_err(char *err, size_t errlen, const char *what)
{
	unsigned long e = ERR_get_error();
	char buf[256] = "";
	if (e)
		ERR_error_string_n(e, buf, sizeof(buf));
	ERR_clear_error();
	if (err && errlen)
		snprintf(err, errlen, "%s%s%s", what, *buf ? ": " : "", buf);
}

void rq_tls_ctx_destroy(struct rq_tls_ctx *t)
{
	if (!t)
		return;
	if (t->ctx)
		SSL_CTX_free(t->ctx);
	free(t);
}

struct rq_tls_ctx *rq_tls_ctx_create(const struct rq_tls_ctx_opts *opts,
				     char *err, size_t errlen)
{
	struct rq_tls_ctx *t = calloc(1, sizeof(*t));
	struct rq_tls_ctx_opts none = {0};
	if (!opts)
		opts = &none;
	if (!t) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	t->ctx = SSL_CTX_new(TLS_client_method());
	if (!t->ctx) {
		ossl_err(err, errlen, "SSL_CTX_new");
		goto fail;
	}
	SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(t->ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
	SSL_CTX_set_mode(t->ctx, SSL_MODE_RELEASE_BUFFERS);
	if (opts->ca_file || opts->ca_path) {
		if (SSL_CTX_load_verify_locations(t->ctx, opts->ca_file, opts->ca_path) != 1) {
			ossl_err(err, errlen, "cannot load CA file/path");
			goto fail;
		}
	}
	if (opts->system_ca || (!opts->ca_file && !opts->ca_path)) {
		if (SSL_CTX_set_default_verify_paths(t->ctx) != 1) {
			ossl_err(err, errlen, "cannot load the system CA store");
			goto fail;
		}
	}
	if (opts->cert_file) {
		if (SSL_CTX_use_certificate_chain_file(t->ctx, opts->cert_file) != 1) {
			ossl_err(err, errlen, "cannot load client certificate");
			goto fail;
		}
		const char *key = opts->key_file ? opts->key_file : opts->cert_file;
		if (SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1 ||
		    SSL_CTX_check_private_key(t->ctx) != 1) {
			ossl_err(err, errlen, "cannot load client key");
			goto fail;
		}
	}
	return t;
fail:
	rq_tls_ctx_destroy(t);
	return NULL;
}

struct rq_tls_ctx *rq_tls_server_ctx_create(const char *cert_file, const char *key_file,
					    char *err, size_t errlen)
{
	struct rq_tls_ctx *t = calloc(1, sizeof(*t));
	if (!t) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	if (!cert_file) {
		snprintf(err, errlen, "no certificate file");
		goto fail;
	}
	t->ctx = SSL_CTX_new(TLS_server_method());
	if (!t->ctx) {
		ossl_err(err, errlen, "SSL_CTX_new");
		goto fail;
	}
	SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(t->ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
			    SSL_OP_CIPHER_SERVER_PREFERENCE);
	SSL_CTX_set_mode(t->ctx, SSL_MODE_RELEASE_BUFFERS);
	SSL_CTX_set_verify(t->ctx, SSL_VERIFY_NONE, NULL);
	SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_OFF);
	if (SSL_CTX_use_certificate_chain_file(t->ctx, cert_file) != 1) {
		char what[300];
		snprintf(what, sizeof(what), "cannot load certificate %.256s", cert_file);
		ossl_err(err, errlen, what);
		goto fail;
	}
	const char *key = key_file ? key_file : cert_file;
	if (SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1) {
		char what[300];
		snprintf(what, sizeof(what), "cannot load key %.256s", key);
		ossl_err(err, errlen, what);
		goto fail;
	}
	if (SSL_CTX_check_private_key(t->ctx) != 1) {
		ossl_err(err, errlen, "the key does not match the certificate");
		goto fail;
	}
	return t;
fail:
	rq_tls_ctx_destroy(t);
	return NULL;
}

SSL *rq_tls_server_ssl_new(struct rq_tls_ctx *t, char *err, size_t errlen)
{
	if (!t || !t->ctx) {
		snprintf(err, errlen, "no TLS context");
		return NULL;
	}
	SSL *ssl = SSL_new(t->ctx);
	if (!ssl)
		ossl_err(err, errlen, "SSL_new");
	return ssl;
}

static bool is_ip_literal(const char *name)
{
	unsigned char buf[16];
	return inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
}

SSL *rq_tls_ssl_new(struct rq_tls_ctx *t, const char *servername, bool verify,
		    char *err, size_t errlen)
{
	SSL *ssl = NULL;
	bool have_name = servername && *servername;
	if (!t || !t->ctx) {
		snprintf(err, errlen, "no TLS context");
		goto fail;
	}
	ssl = SSL_new(t->ctx);
	if (!ssl) {
		ossl_err(err, errlen, "SSL_new");
		goto fail;
	}
	SSL_set_verify(ssl, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
	if (have_name) {
		bool ip = is_ip_literal(servername);
		if (!ip && SSL_set_tlsext_host_name(ssl, servername) != 1) {
			ossl_err(err, errlen, "cannot set SNI");
			goto fail;
		}
		X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
		X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
		int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(param, servername)
			    : X509_VERIFY_PARAM_set1_host(param, servername, 0);
		if (ok != 1) {
			ossl_err(err, errlen, "cannot set the name to verify");
			goto fail;
		}
	} else if (verify) {
		snprintf(err, errlen, "no host name to verify the certificate against");
		goto fail;
	}
	return ssl;
fail:
	if (ssl)
		SSL_free(ssl);
	return NULL;
}

bool rq_tls_verified(SSL *ssl)
{
	if (!ssl || !SSL_is_init_finished(ssl))
		return false;
	X509 *peer = SSL_get1_peer_certificate(ssl);
	bool ok = peer && SSL_get_verify_result(ssl) == X509_V_OK;
	X509_free(peer);
	return ok;
}

void rq_tls_verify_error(SSL *ssl, char *buf, size_t len)
{
	if (!len)
		return;
	buf[0] = '\0';
	if (!ssl)
		return;
	long v = SSL_get_verify_result(ssl);
	if (v != X509_V_OK)
		snprintf(buf, len, "certificate verification failed: %s",
			 X509_verify_cert_error_string(v));
	else if (SSL_is_init_finished(ssl)) {
		X509 *peer = SSL_get1_peer_certificate(ssl);
		if (!peer)
			snprintf(buf, len, "no peer certificate");
		X509_free(peer);
	}
}

void rq_tls_describe(SSL *ssl, char *buf, size_t len)
{
	if (!len)
		return;
	buf[0] = '\0';
	if (!ssl || !SSL_is_init_finished(ssl))
		return;
	snprintf(buf, len, "%s %s", SSL_get_version(ssl), SSL_get_cipher_name(ssl));
}

void rq_tls_error_text(SSL *ssl, unsigned long e, const char *fallback,
		       char *buf, size_t len)
{
	if (!len)
		return;
	buf[0] = '\0';
	if (ssl && SSL_get_verify_result(ssl) != X509_V_OK) {
		rq_tls_verify_error(ssl, buf, len);
		return;
	}
	if (e) {
		char tmp[256];
		ERR_error_string_n(e, tmp, sizeof(tmp));
		snprintf(buf, len, "TLS handshake failed: %s", tmp);
		return;
	}
	snprintf(buf, len, "%s", fallback ? fallback : "TLS handshake failed");
}

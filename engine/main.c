/* relayqd: the delivery daemon (lifecycle, signals). Completed by the daemon
 * issue; for now it parses its options and reports what it would run. */
#include "relayq/log.h"

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	const char *config = NULL;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "-c") == 0 && i + 1 < argc) {
			config = argv[++i];
		} else if (strcmp(argv[i], "--version") == 0) {
			printf("relayqd %s\n", RQ_VERSION);
			return 0;
		} else {
			fprintf(stderr, "relayqd: unknown option %s\n", argv[i]);
			return 2;
		}
	}
	rq_log_init(RQ_LOG_INFO, RQ_LOG_LOGFMT, NULL);
	rq_log(RQ_LOG_ERROR, "not_implemented", "config", config, NULL);
	return 1;
}

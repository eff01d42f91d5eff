/* relayq: the command-line client. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "--version") == 0) {
		printf("relayq %s\n", RQ_VERSION);
		return 0;
	}
	fprintf(stderr, "relayq: not implemented yet\n");
	return 2;
}

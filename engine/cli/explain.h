#ifndef RELAYQ_CLI_EXPLAIN_H
#define RELAYQ_CLI_EXPLAIN_H

/*
 * `relayq explain`: prints what the policy decides for one reply and which
 * rule decided, without sending anything.
 *
 *   relayq explain [-c FILE] --code N|EVENT [--enhanced X.Y.Z] [--text T]
 *                  [--stage S] [--domain D] [--rcpt ADDR] [--host H]
 *                  [--attempt N] [--age DURATION] [--meta JSON] [--json]
 *
 * Without -c, the built-in policy with default settings. EVENT is a
 * transport event (timeout, refused, lost, tls, dns, protocol). The stage
 * defaults to rcpt for a reply and connect for an event.
 */

/*
 * argv[0] is "explain". Writes the decision to stdout, errors to stderr.
 * Returns 0, 1 when the config file does not load, 2 on bad arguments.
 */
int rq_cli_explain(int argc, char **argv);

#endif

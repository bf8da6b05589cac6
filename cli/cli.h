/* Shared pieces of the `denoised` command line: strict number parsing and the
 * subcommand entry points. Each subcommand prints its own --help. */
#ifndef DENOISED_CLI_H
#define DENOISED_CLI_H

#include <stdint.h>

/* Parse a whole string as an integer in [min, max]; on failure print an error
 * naming `flag` to stderr and return -1. */
int cli_parse_int(const char *flag, const char *s, long long min, long long max, long long *out);
int cli_parse_double(const char *flag, const char *s, double min, double max, double *out);

/* Prints "denoised <cmd>: <msg>" to stderr; returns exit status 1 (2 for usage). */
int cli_fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

int cmd_forward(int argc, char **argv);
int cmd_sample(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_bench_solvers(int argc, char **argv);

#endif

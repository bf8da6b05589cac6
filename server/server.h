/* `denoised serve`: the HTTP daemon. Reads the configuration (file, DENOISED_* environment,
 * flags), loads the models, recovers the job store and serves until SIGTERM or SIGINT.
 * Exit codes:
 *   0  stopped by SIGTERM/SIGINT after running jobs reached a step boundary
 *   1  runtime failure
 *   2  usage or configuration error
 *   3  cannot listen on the configured address
 *   4  state directory unusable (not writable, or in use by another denoised)
 *   5  a configured model failed to load
 *   6  shutdown timed out with workers still computing (their jobs stay queued on disk) */
#ifndef DENOISED_SERVER_H
#define DENOISED_SERVER_H

enum {
  SERVER_EXIT_OK = 0,
  SERVER_EXIT_FAILURE = 1,
  SERVER_EXIT_USAGE = 2,
  SERVER_EXIT_LISTEN = 3,
  SERVER_EXIT_STATE = 4,
  SERVER_EXIT_MODEL = 5,
  SERVER_EXIT_SHUTDOWN_TIMEOUT = 6,
};

int server_main(int argc, char **argv);
/* `denoised config check FILE`: the configuration `serve --config FILE` would run with, checked
 * as serve checks it (API keys file and DENOISED_API_KEYS read, every model loaded), printed as
 * JSON; 0, or 2 with the reason on stderr. argv[0] is "check". */
int server_config_check(int argc, char **argv);

#endif

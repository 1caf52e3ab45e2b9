/* Holds an abort of a multi-process run's process long enough for its watchdog to name a lost peer.
 *
 * When a peer dies in the middle of a CPU collective, the collectives library (gloo) can throw from
 * one of its threads, which ends in std::terminate -> abort(): SIGABRT, exit 134, before Python
 * runs. With memjax_hold_aborts(seconds, line) installed, SIGABRT parks the aborting thread instead
 * (the rest of the process runs on): the watchdog names the lost process within its bound and ends
 * the process itself; if nobody ends it within `seconds`, the handler writes `line` to stderr and
 * exits with code 1. Everything in the handler is async-signal-safe (nanosleep, write, _exit).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char hold_line[2048];
static size_t hold_line_len = 0;
static struct timespec hold_for = {0, 0};

static void hold_abort(int signum) {
  (void)signum;
  struct timespec left = hold_for;
  while (nanosleep(&left, &left) == -1 && errno == EINTR) {
  }
  if (hold_line_len > 0) {
    ssize_t unused = write(2, hold_line, hold_line_len);
    (void)unused;
  }
  _exit(1);
}

/* Returns 0 once installed, else errno of sigaction. */
int memjax_hold_aborts(double seconds, const char *line) {
  size_t n = strlen(line);
  if (n > sizeof(hold_line) - 1) n = sizeof(hold_line) - 1;
  memcpy(hold_line, line, n);
  hold_line[n] = '\0';
  hold_line_len = n;
  if (seconds < 0) seconds = 0;
  hold_for.tv_sec = (time_t)seconds;
  hold_for.tv_nsec = (long)((seconds - (double)hold_for.tv_sec) * 1e9);
  struct sigaction action;
  memset(&action, 0, sizeof(action));
  action.sa_handler = hold_abort;
  sigemptyset(&action.sa_mask);
  return sigaction(SIGABRT, &action, NULL) == 0 ? 0 : errno;
}

/* Holds an abort of a multi-process run's process long enough for its watchdog to name a lost peer.
 *
 * When a peer dies in the middle of a CPU collective, the collectives library (gloo) can throw from
 * one of its threads, which ends in std::terminate -> abort(): SIGABRT, exit 134, before Python
 * runs. With memjax_hold_aborts(seconds, line) installed, SIGABRT parks the aborting thread instead
 * (the rest of the process runs on): the watchdog names the lost process within its bound and ends
 * the process itself; if nobody ends it within `seconds`, the handler writes `line` to stderr and
 * exits with code 1. Everything in the handler is async-signal-safe (nanosleep, write, _exit).
 *
 * memjax_native_watchdog_start(seconds, line) / _pet() / _stop(): a thread outside Python that ends the
 * process with `line` and exit code 1 when the Python watchdog has not completed a round (pet) for
 * `seconds`. A main thread blocked in a collective with a dead peer can hold the GIL (a device-to-host
 * copy waiting on gloo, seen in the 2-process kill soak: ~30 s, gloo's own timeout), and then no Python
 * thread runs at all.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Copies `src` into `dst` (capacity 2048, truncated, NUL-terminated); returns its length. */
static size_t copy_line(char *dst, const char *src) {
  size_t n = strlen(src);
  if (n > 2047) n = 2047;
  memcpy(dst, src, n);
  dst[n] = '\0';
  return n;
}

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
  hold_line_len = copy_line(hold_line, line);
  if (seconds < 0) seconds = 0;
  hold_for.tv_sec = (time_t)seconds;
  hold_for.tv_nsec = (long)((seconds - (double)hold_for.tv_sec) * 1e9);
  struct sigaction action;
  memset(&action, 0, sizeof(action));
  action.sa_handler = hold_abort;
  sigemptyset(&action.sa_mask);
  return sigaction(SIGABRT, &action, NULL) == 0 ? 0 : errno;
}

static char watchdog_line[2048];
static size_t watchdog_line_len = 0;
static double watchdog_limit = 0;
static _Atomic long long watchdog_last_pet_ns = 0;
static _Atomic int watchdog_running = 0;

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *watchdog_main(void *unused) {
  (void)unused;
  struct timespec tick = {0, 250000000L};
  while (atomic_load(&watchdog_running)) {
    nanosleep(&tick, NULL);
    if (!atomic_load(&watchdog_running)) break;
    double quiet = (double)(now_ns() - atomic_load(&watchdog_last_pet_ns)) / 1e9;
    if (quiet > watchdog_limit) {
      ssize_t unused_w = write(2, watchdog_line, watchdog_line_len);
      (void)unused_w;
      _exit(1);
    }
  }
  return NULL;
}

/* Returns 0 once the thread runs (or already ran), else an errno. */
int memjax_native_watchdog_start(double seconds, const char *line) {
  watchdog_line_len = copy_line(watchdog_line, line);
  watchdog_limit = seconds;
  atomic_store(&watchdog_last_pet_ns, now_ns());
  if (atomic_exchange(&watchdog_running, 1)) return 0;
  pthread_t thread;
  int err = pthread_create(&thread, NULL, watchdog_main, NULL);
  if (err) {
    atomic_store(&watchdog_running, 0);
    return err;
  }
  pthread_detach(thread);
  return 0;
}

void memjax_native_watchdog_pet(void) { atomic_store(&watchdog_last_pet_ns, now_ns()); }

void memjax_native_watchdog_stop(void) { atomic_store(&watchdog_running, 0); }

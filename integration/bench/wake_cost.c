// What this machine charges for a thread waking from idle: the cost behind a slow link's CPU
// per byte (docs/benchmarks.md, session 27). The main thread sleeps GAP microseconds (so the
// other thread is idle, as an agent's are between a 50 Mbit/s link's packets), then wakes a
// thread blocked in epoll_wait through an eventfd and waits for its answer on another. The
// figure is the process's CPU (getrusage) per round trip: one timer sleep and two wake-ups.
// With GAP 0 the threads never go idle: the same hand-offs between busy threads.
//
//   gcc -O2 -pthread wake_cost.c -o wake_cost && ./wake_cost ROUNDS GAP_US
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

static int to_worker, to_main;

static void *worker(void *unused) {
  (void)unused;
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = to_worker};
  if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, to_worker, &ev) != 0) exit(2);
  for (;;) {
    struct epoll_event out;
    uint64_t v;
    if (epoll_wait(ep, &out, 1, 1000) <= 0) continue;
    if (read(to_worker, &v, sizeof v) != sizeof v) continue;
    if (v == 2) return NULL;
    v = 1;
    if (write(to_main, &v, sizeof v) != sizeof v) exit(2);
  }
}

static double cpu_seconds(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s ROUNDS GAP_US\n", argv[0]);
    return 1;
  }
  int rounds = atoi(argv[1]), gap = atoi(argv[2]);
  to_worker = eventfd(0, 0);
  to_main = eventfd(0, 0);
  pthread_t t;
  if (to_worker < 0 || to_main < 0 || pthread_create(&t, NULL, worker, NULL) != 0) return 2;
  usleep(100000);
  double before = cpu_seconds();
  uint64_t v;
  for (int i = 0; i < rounds; i++) {
    if (gap > 0) usleep(gap);
    v = 1;
    if (write(to_worker, &v, sizeof v) != sizeof v || read(to_main, &v, sizeof v) != sizeof v) return 2;
  }
  double used = cpu_seconds() - before;
  v = 2;
  if (write(to_worker, &v, sizeof v) != sizeof v) return 2;
  pthread_join(t, NULL);
  printf("%.1f\n", used / rounds * 1e6);
  return 0;
}

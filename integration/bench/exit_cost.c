// What a trip from a virtual machine to its hypervisor costs here: the price under every
// timer interrupt, timer reprogramming, wake-up IPI and halt of an idle CPU, so under every
// sleep and wake-up a slow link's reader and writer take (docs/benchmarks.md, session 32).
// CPUID always leaves a VM for the hypervisor, so its cost is one exit's round trip. On bare
// metal CPUID does not exit, and the figure is the instruction's own cost, a fraction of that.
//
//   gcc -O2 exit_cost.c -o exit_cost && ./exit_cost ROUNDS   (prints microseconds per CPUID)
#include <cpuid.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s ROUNDS\n", argv[0]);
    return 1;
  }
  long rounds = atol(argv[1]);
  unsigned a, b, c, d;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long i = 0; i < rounds; i++) __cpuid(0, a, b, c, d);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
  printf("%.2f\n", ns / rounds / 1e3);
  return 0;
}

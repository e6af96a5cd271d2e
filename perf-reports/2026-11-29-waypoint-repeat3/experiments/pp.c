#define _GNU_SOURCE
#define _GNU_SOURCE
#include <stdio.h>
#include <pthread.h>
#include <unistd.h>
#include <sched.h>
#include <time.h>
#include <sys/resource.h>
int p1[2],p2[2];int N=100000;int cpuB;
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);sched_setaffinity(0,sizeof s,&s);}
void* b(void*x){pin(cpuB);char c;for(int i=0;i<N;i++){read(p1[0],&c,1);write(p2[1],&c,1);}return 0;}
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){cpuB=atoi(argv[1]);pipe(p1);pipe(p2);pin(0);pthread_t t;pthread_create(&t,0,b,0);
struct rusage r0,r1;getrusage(RUSAGE_SELF,&r0);double t0=now();char c='x';
for(int i=0;i<N;i++){write(p1[1],&c,1);read(p2[0],&c,1);}
double el=now()-t0;getrusage(RUSAGE_SELF,&r1);pthread_join(t,0);
double cpu=(r1.ru_utime.tv_sec-r0.ru_utime.tv_sec)+(r1.ru_utime.tv_usec-r0.ru_utime.tv_usec)*1e-6+(r1.ru_stime.tv_sec-r0.ru_stime.tv_sec)+(r1.ru_stime.tv_usec-r0.ru_stime.tv_usec)*1e-6;
printf("cpuB=%d roundtrip %.2f us wall, %.2f us cpu per roundtrip (2 wakeups)\n",cpuB,el/N*1e6,cpu/N*1e6);}

/* libuv peer: W4 TCP echo (uv_tcp_t, uv_read_start, uv_write), W5 executor round trips
 * (uv_queue_work), W6 timers (uv_timer_t, millisecond resolution: delays rounded up to whole
 * milliseconds). One loop, one thread (plus libuv's own pool for W5). Usage: uv_bench W4|W4S|W5|W6 N */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#define CLIENTS 32
#define MESSAGE 64

static void check(int r, const char* what) {
  if (r < 0) {
    fprintf(stderr, "%s: %s\n", what, uv_strerror(r));
    exit(1);
  }
}

static void report(const char* w, long n, double per_op, const char* extra, const char* note) {
  printf("{\"workload\":\"%s\",\"impl\":\"libuv\",\"n\":%ld,\"per_op_ns\":%.3f,\"allocs_per_op\":null,\"extra\":%s,\"note\":\"%s\"}\n",
         w, n, per_op, extra, note);
}

/* ---- W4 ---------------------------------------------------------------------------------- */
typedef struct {
  uv_tcp_t tcp;
  uv_connect_t connect_req;
  uv_write_t write_req;
  long rounds_left;
  size_t got;
  char in[MESSAGE];
} client_conn;

static char out_msg[MESSAGE];
static struct sockaddr_in server_addr;
static uv_tcp_t listener;
static int clients_left, accepted;
static client_conn clients[CLIENTS];
static uv_tcp_t servers[CLIENTS];

/* The server side follows libuv's echo-server example: each read gets a fresh buffer, handed to
 * a write request and freed when the write completes (4 KiB instead of the suggested 64 KiB). */
typedef struct {
  uv_write_t req;
  uv_buf_t buf;
} write_req_t;

static void server_alloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf) {
  (void)h;
  (void)suggested;
  buf->base = malloc(4096);
  buf->len = 4096;
}

static void server_written(uv_write_t* req, int status) {
  check(status, "server write");
  write_req_t* wr = (write_req_t*)req;
  free(wr->buf.base);
  free(wr);
}

static void server_read(uv_stream_t* stream, ssize_t n, const uv_buf_t* buf) {
  if (n > 0) {
    write_req_t* wr = malloc(sizeof *wr);
    wr->buf = uv_buf_init(buf->base, (unsigned)n);
    check(uv_write(&wr->req, stream, &wr->buf, 1, server_written), "uv_write");
    return;
  }
  if (n < 0) uv_close((uv_handle_t*)stream, NULL);
  free(buf->base);
}

static void on_connection(uv_stream_t* l, int status) {
  check(status, "connection");
  uv_tcp_t* s = &servers[accepted++];
  uv_tcp_init(l->loop, s);
  check(uv_accept(l, (uv_stream_t*)s), "uv_accept");
  uv_tcp_nodelay(s, 1);
  check(uv_read_start((uv_stream_t*)s, server_alloc, server_read), "uv_read_start");
  if (accepted == CLIENTS) uv_close((uv_handle_t*)l, NULL);
}

static void client_alloc(uv_handle_t* h, size_t suggested, uv_buf_t* buf) {
  (void)suggested;
  client_conn* c = (client_conn*)h;
  *buf = uv_buf_init(c->in + c->got, (unsigned)(MESSAGE - c->got));
}

static void client_written(uv_write_t* req, int status) {
  (void)req;
  check(status, "client write");
}

static void client_send(client_conn* c) {
  uv_buf_t b = uv_buf_init(out_msg, MESSAGE);
  check(uv_write(&c->write_req, (uv_stream_t*)&c->tcp, &b, 1, client_written), "uv_write");
}

static void client_read(uv_stream_t* stream, ssize_t n, const uv_buf_t* buf) {
  (void)buf;
  client_conn* c = (client_conn*)stream;
  if (n < 0) check((int)n, "client read");
  c->got += (size_t)n;
  if (c->got < MESSAGE) return;
  c->got = 0;
  if (--c->rounds_left > 0) {
    client_send(c);
  } else {
    uv_close((uv_handle_t*)stream, NULL);
    --clients_left;
  }
}

static void on_connect(uv_connect_t* req, int status) {
  check(status, "connect");
  client_conn* c = req->data;
  uv_tcp_nodelay(&c->tcp, 1);
  check(uv_read_start((uv_stream_t*)&c->tcp, client_alloc, client_read), "uv_read_start");
  client_send(c);
}

static void w4(const char* name, long rounds) {
  uv_loop_t* loop = uv_default_loop();
  memset(out_msg, 'x', sizeof out_msg);
  uv_tcp_init(loop, &listener);
  uv_ip4_addr("127.0.0.1", 0, &server_addr);
  check(uv_tcp_bind(&listener, (const struct sockaddr*)&server_addr, 0), "bind");
  int len = sizeof server_addr;
  uv_tcp_getsockname(&listener, (struct sockaddr*)&server_addr, &len);
  uint64_t t0 = uv_hrtime();
  check(uv_listen((uv_stream_t*)&listener, 128, on_connection), "listen");
  clients_left = CLIENTS;
  for (int i = 0; i < CLIENTS; ++i) {
    client_conn* c = &clients[i];
    c->rounds_left = rounds;
    uv_tcp_init(loop, &c->tcp);
    c->connect_req.data = c;
    check(uv_tcp_connect(&c->connect_req, &c->tcp, (const struct sockaddr*)&server_addr, on_connect), "uv_tcp_connect");
  }
  uv_run(loop, UV_RUN_DEFAULT);
  uint64_t t1 = uv_hrtime();
  if (clients_left != 0) {
    fprintf(stderr, "W4: clients left\n");
    exit(1);
  }
  double msgs = (double)CLIENTS * (double)rounds;
  char extra[64];
  snprintf(extra, sizeof extra, "{\"msgs_per_s\":%.1f}", msgs / (double)(t1 - t0) * 1e9);
  report(name, rounds, (double)(t1 - t0) / msgs, extra, strcmp(name, "W4S") ? "" : "the W4 program: uv streams already");
}

/* ---- W5: sequential uv_queue_work round trips -------------------------------------------- */
static long w5_left, w5_sum;
static uv_work_t work_req;
static volatile int w5_value;

static int trivial(int x) { return x + 1; }
static void work_cb(uv_work_t* req) { w5_value = trivial((int)(long)req->data & 1); }
static void after_work(uv_work_t* req, int status) {
  check(status, "after_work");
  w5_sum += w5_value;
  if (--w5_left > 0) {
    req->data = (void*)(long)w5_left;
    check(uv_queue_work(req->loop, req, work_cb, after_work), "uv_queue_work");
  }
}

static void w5(long n) {
  uv_loop_t* loop = uv_default_loop();
  /* Start the pool outside the timing, as the other peers do. */
  w5_left = 1;
  check(uv_queue_work(loop, &work_req, work_cb, after_work), "uv_queue_work");
  uv_run(loop, UV_RUN_DEFAULT);
  w5_left = n;
  w5_sum = 0;
  uint64_t t0 = uv_hrtime();
  work_req.data = (void*)(long)w5_left;
  check(uv_queue_work(loop, &work_req, work_cb, after_work), "uv_queue_work");
  uv_run(loop, UV_RUN_DEFAULT);
  uint64_t t1 = uv_hrtime();
  if (w5_sum != n + n / 2) {
    fprintf(stderr, "W5: wrong sum %ld\n", w5_sum);
    exit(1);
  }
  report("W5", n, (double)(t1 - t0) / (double)n, "{}", "uv_queue_work, next job queued from after_work_cb");
}

/* ---- W6: one uv_timer_t per sleeper ------------------------------------------------------ */
static long timers_left;
static void timer_fired(uv_timer_t* t) {
  uv_close((uv_handle_t*)t, NULL);
  --timers_left;
}

static void w6(long n) {
  uv_loop_t* loop = uv_default_loop();
  uv_timer_t* timers = calloc((size_t)n, sizeof *timers);
  uint32_t x = 42;  /* the LCG of bench_common.hpp and bench_py.py */
  long last_us = 0;
  timers_left = n;
  uint64_t t0 = uv_hrtime();
  uv_update_time(loop);
  for (long i = 0; i < n; ++i) {
    x = x * 1664525u + 1013904223u;
    long us = (long)((x >> 8) % 50001u);
    if (us > last_us) last_us = us;
    uv_timer_init(loop, &timers[i]);
    check(uv_timer_start(&timers[i], timer_fired, (uint64_t)((us + 999) / 1000), 0), "uv_timer_start");
  }
  uv_run(loop, UV_RUN_DEFAULT);
  uint64_t t1 = uv_hrtime();
  if (timers_left != 0) exit(1);
  char extra[64];
  snprintf(extra, sizeof extra, "{\"overshoot_ms\":%.3f}", ((double)(t1 - t0) - (double)last_us * 1e3) / 1e6);
  report("W6", n, (double)(t1 - t0) / (double)n, extra, "uv_timer_t per sleeper; ms resolution (delays rounded up)");
  free(timers);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s W4|W5|W6 N\n", argv[0]);
    return 2;
  }
  long n = atol(argv[2]);
  if (!strcmp(argv[1], "W4") || !strcmp(argv[1], "W4S")) w4(argv[1], n);
  else if (!strcmp(argv[1], "W5")) w5(n);
  else if (!strcmp(argv[1], "W6")) w6(n);
  else return 2;
  return 0;
}

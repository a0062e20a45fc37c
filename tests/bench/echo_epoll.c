/* W4 floor: TCP echo over raw epoll, no library. One thread, one epoll set; a server and 32
 * clients on 127.0.0.1, each client N sequential 64-byte round trips. Level-triggered, every
 * socket registered once for EPOLLIN; writes of 64 bytes to an idle loopback socket complete
 * at once, so no write readiness is needed. W4S is the same program (the floor of the streams
 * variant). W4idle: 1,000 more connections whose server side is registered for EPOLLIN too and
 * never written to (set up before the timing). Usage: echo_epoll W4|W4S|W4idle N */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CLIENTS 32
#define MESSAGE 64
#define IDLE 1000

enum kind { LISTENER, SERVER_CONN, CLIENT };
struct conn {
  enum kind kind;
  int fd;
  long rounds_left;
  size_t got;
  char buf[4096];
};

static void die(const char* what) {
  perror(what);
  exit(1);
}

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void send_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR) continue;
      die("send");  /* EAGAIN cannot happen for 64 bytes on an idle socket */
    }
    p += k;
    n -= (size_t)k;
  }
}

static void watch(int ep, struct conn* c) {
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) die("epoll_ctl");
}

static void nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int main(int argc, char** argv) {
  if (argc != 3 || (strcmp(argv[1], "W4") != 0 && strcmp(argv[1], "W4S") != 0 &&
                    strcmp(argv[1], "W4idle") != 0)) {
    fprintf(stderr, "usage: %s W4|W4S|W4idle N\n", argv[0]);
    return 2;
  }
  const int idle = strcmp(argv[1], "W4idle") == 0 ? IDLE : 0;
  const long rounds = atol(argv[2]);
  char out[MESSAGE];
  memset(out, 'x', sizeof out);

  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct conn listener = {.kind = LISTENER};
  listener.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof addr;
  if (bind(listener.fd, (struct sockaddr*)&addr, sizeof addr) || listen(listener.fd, 128) ||
      getsockname(listener.fd, (struct sockaddr*)&addr, &len))
    die("listen");

  static struct conn idlers[IDLE];
  static int idle_clients[IDLE];
  for (int i = 0; i < idle; ++i) {
    idle_clients[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(idle_clients[i], (struct sockaddr*)&addr, sizeof addr) != 0) die("idle connect");
    idlers[i].kind = SERVER_CONN;
    while ((idlers[i].fd = accept4(listener.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) < 0)
      if (errno != EAGAIN && errno != EINTR) die("idle accept");
    watch(ep, &idlers[i]);
  }

  double t0 = now_ns();
  watch(ep, &listener);
  static struct conn clients[CLIENTS], servers[CLIENTS];
  for (int i = 0; i < CLIENTS; ++i) {
    struct conn* c = &clients[i];
    c->kind = CLIENT;
    c->rounds_left = rounds;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);  /* blocking connect: loopback */
    nodelay(c->fd);
    if (connect(c->fd, (struct sockaddr*)&addr, sizeof addr) != 0) die("connect");
    watch(ep, c);
    send_all(c->fd, out, MESSAGE);
  }
  int accepted = 0, clients_left = CLIENTS;
  struct epoll_event events[64];
  while (clients_left > 0) {
    int n = epoll_wait(ep, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("epoll_wait");
    }
    for (int i = 0; i < n; ++i) {
      struct conn* c = events[i].data.ptr;
      if (c->kind == LISTENER) {
        int fd;
        while (accepted < CLIENTS && (fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
          struct conn* s = &servers[accepted++];
          s->kind = SERVER_CONN;
          s->fd = fd;
          nodelay(fd);
          watch(ep, s);
        }
      } else if (c->kind == SERVER_CONN) {
        ssize_t k = recv(c->fd, c->buf, sizeof c->buf, MSG_DONTWAIT);
        if (k > 0) send_all(c->fd, c->buf, (size_t)k);
        else if (k == 0 || (errno != EAGAIN && errno != EINTR)) {
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          close(c->fd);
        }
      } else {
        ssize_t k = recv(c->fd, c->buf + c->got, MESSAGE - c->got, MSG_DONTWAIT);
        if (k <= 0) {
          if (k < 0 && (errno == EAGAIN || errno == EINTR)) continue;
          die("client recv");
        }
        c->got += (size_t)k;
        if (c->got < MESSAGE) continue;
        c->got = 0;
        if (--c->rounds_left > 0) {
          send_all(c->fd, out, MESSAGE);
        } else {
          epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
          close(c->fd);
          --clients_left;
        }
      }
    }
  }
  double t1 = now_ns();
  double msgs = (double)CLIENTS * (double)rounds;
  for (int i = 0; i < idle; ++i) {
    close(idle_clients[i]);
    close(idlers[i].fd);
  }
  printf("{\"workload\":\"%s\",\"impl\":\"epoll-floor\",\"n\":%ld,\"per_op_ns\":%.3f,\"allocs_per_op\":null,"
         "\"extra\":{\"msgs_per_s\":%.1f},\"note\":\"hand-written C, level-triggered epoll\"}\n",
         argv[1], rounds, (t1 - t0) / msgs, msgs / (t1 - t0) * 1e9);
  close(listener.fd);
  close(ep);
  return 0;
}

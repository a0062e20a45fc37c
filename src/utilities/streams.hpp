// asyncio streams over a connected socket: stream_reader and stream_writer share one owned
// descriptor. Reads fill a buffer owned by the stream (so a cancelled read loses no byte) and
// hand it out by move when a read takes all of it; writes go out at once and only what the
// socket does not take is buffered, flushed by an add_writer callback (asyncio's transport).
#pragma once

#include "../platform/config.hpp"
#include "../runtime/executor.hpp"
#include "../runtime/future.hpp"
#include "../runtime/io.hpp"
#include "../runtime/sleep.hpp"
#include "../runtime/task.hpp"
#include "async_exit_stack.hpp"

#if ASYNC_UTILS_DEFINITIONS
#include <arpa/inet.h>
#endif
#if ASYNC_UTILS_DEFINITIONS
#include <netdb.h>
#endif
#include <netinet/tcp.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#if ASYNC_UTILS_DEFINITIONS
#include <sys/stat.h>
#endif
#if ASYNC_UTILS_DEFINITIONS
#include <sys/un.h>
#endif
#include <vector>

namespace codestare::async_utils {

/// asyncio.IncompleteReadError: EOF came before `expected()` bytes (none for readuntil).
class incomplete_read_error : public std::runtime_error {
 public:
  incomplete_read_error(std::string partial, std::optional<std::size_t> expected)
      : std::runtime_error(std::to_string(partial.size()) + " bytes read on a total of " +
                           (expected ? std::to_string(*expected) : std::string("undefined")) + " expected bytes"),
        partial_(std::move(partial)),
        expected_(expected) {}
  const std::string& partial() const noexcept { return partial_; }
  std::optional<std::size_t> expected() const noexcept { return expected_; }

 private:
  std::string partial_;
  std::optional<std::size_t> expected_;
};

/// asyncio.LimitOverrunError: the separator was not found within the reader's limit; the data
/// stays in the buffer, `consumed()` bytes of it were searched.
class limit_overrun_error : public std::runtime_error {
 public:
  limit_overrun_error(const std::string& what, std::size_t consumed) : std::runtime_error(what), consumed_(consumed) {}
  std::size_t consumed() const noexcept { return consumed_; }

 private:
  std::size_t consumed_;
};

namespace detail {

inline constexpr std::size_t stream_default_limit = 64 * 1024;
inline constexpr std::size_t stream_high_water = 64 * 1024;
inline constexpr std::size_t stream_low_water = stream_high_water / 4;

/// The connection shared by a reader and its writer; the last of them closes the descriptor.
struct stream_state {
  event_loop* loop;
  unique_fd fd;
  std::size_t limit;
  // Read side: valid bytes are rbuf[head, tail); rbuf.size() is the capacity.
  std::string rbuf;
  std::size_t head = 0, tail = 0;
  bool eof = false;
  bool reading = false;  // a read waits on the descriptor: closing must wake it, not pull the fd
  int read_error = 0;
  // Write side: bytes the socket did not take, wbuf[whead, end).
  std::string wbuf;
  std::size_t whead = 0;
  bool writer_armed = false;
  bool closing = false;      // close() called
  bool eof_pending = false;  // write_eof() waits for the buffer to flush
  bool eof_written = false;
  int write_error = 0;
  std::vector<future<void>> drainers;
  future<void> closed;

  stream_state(int f, std::size_t lim) : loop(&event_loop::current()), fd(f), limit(lim), closed(loop->create_future<void>()) {}
  stream_state(const stream_state&) = delete;
  stream_state& operator=(const stream_state&) = delete;
  ~stream_state();

  std::size_t available() const noexcept { return tail - head; }
  std::size_t buffered() const noexcept { return wbuf.size() - whead; }

  /// Room for at least `n` more bytes after tail.
  void reserve(std::size_t n);

  /// The first n buffered bytes; moved out without a copy when they are all of the buffer.
  std::string take(std::size_t n);

  void wake_drainers();

  void finish_close();

  void flush();
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK stream_state::~stream_state() {
  if (writer_armed && fd) loop->remove_writer(fd.get());
}

ASYNC_UTILS_LINK void stream_state::reserve(std::size_t n) {
  if (head == tail) head = tail = 0;
  if (rbuf.size() - tail >= n) return;
  if (head > 0) {
    std::memmove(rbuf.data(), rbuf.data() + head, tail - head);
    tail -= head;
    head = 0;
  }
  if (rbuf.size() - tail < n) rbuf.resize(std::max(tail + n, rbuf.size() * 2));
}

ASYNC_UTILS_LINK std::string stream_state::take(std::size_t n) {
  std::string out;
  if (head == 0 && n == tail) {
    out = std::move(rbuf);
    out.resize(n);
    rbuf = std::string();
    tail = 0;
  } else {
    out.assign(rbuf.data() + head, n);
    head += n;
    if (head == tail) head = tail = 0;
  }
  return out;
}

ASYNC_UTILS_LINK void stream_state::wake_drainers() {
  for (auto& f : drainers)
    if (!f.done()) f.set_result();
  drainers.clear();
}

ASYNC_UTILS_LINK void stream_state::finish_close() {
  if (writer_armed) {
    loop->remove_writer(fd.get());
    writer_armed = false;
  }
  wake_drainers();
  if (reading) {
    ::shutdown(fd.get(), SHUT_RDWR);  // the pending read sees EOF and closes after it
    return;
  }
  fd.reset();
  if (!closed.done()) closed.set_result();
}

ASYNC_UTILS_LINK void stream_state::flush() {
  while (buffered() > 0) {
    ssize_t n = ::send(fd.get(), wbuf.data() + whead, buffered(), send_flags);
    if (n >= 0) {
      whead += static_cast<std::size_t>(n);
      continue;
    }
    if (errno == EINTR) continue;
    if (would_block(errno)) break;
    write_error = errno;
    wbuf.clear();
    whead = 0;
    break;
  }
  if (buffered() == 0) {
    wbuf.clear();
    whead = 0;
  }
  if (buffered() <= stream_low_water) wake_drainers();
  if (buffered() == 0 || write_error) {
    if (writer_armed) {
      loop->remove_writer(fd.get());
      writer_armed = false;
    }
    if (closing && fd) {
      finish_close();
    } else if (eof_pending && !write_error) {
      eof_pending = false;
      eof_written = true;
      ::shutdown(fd.get(), SHUT_WR);
    }
  } else if (!writer_armed) {
    loop->add_writer(fd.get(), [this] { flush(); });
    writer_armed = true;
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Receives into the stream's buffer. The bytes are counted in the state at once, so a read
/// cancelled after the kernel handed them over keeps them for the next read.
struct stream_fill_op : op_status {
  stream_state* s;
  std::size_t max;
  bool attempt(bool) noexcept {
    fd_watch* w = socket_record(s->fd.get());
    if (w && (w->drained & io_read)) return false;  // nothing to read until the next report
    for (;;) {
      ssize_t n = socket_receive(s->fd.get(), s->rbuf.data() + s->tail, max, w);
      if (n > 0) {
        s->tail += static_cast<std::size_t>(n);
        return true;
      }
      if (n == 0) {
        s->eof = true;
        return true;
      }
      if (errno == EINTR) continue;
      if (would_block(errno)) return false;
      s->read_error = errno;
      s->eof = true;
      return true;
    }
  }
  void result() const {}
};

/// Marks a read in progress; when it ends on a closed writer, the descriptor is closed now.
struct reading_guard {
  stream_state* s;
  explicit reading_guard(stream_state* st) : s(st) { s->reading = true; }
  reading_guard(const reading_guard&) = delete;
  reading_guard& operator=(const reading_guard&) = delete;
  ~reading_guard() {
    s->reading = false;
    if (s->closing && s->fd && s->buffered() == 0) s->finish_close();
  }
};

ASYNC_UTILS_LINK std::string format_address(const sockaddr_storage& a, socklen_t len);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::string format_address(const sockaddr_storage& a, socklen_t len) {
  char host[INET6_ADDRSTRLEN] = {};
  if (a.ss_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(a);
    ::inet_ntop(AF_INET, &in.sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(in.sin_port));
  }
  if (a.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(a);
    ::inet_ntop(AF_INET6, &in6.sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6.sin6_port));
  }
  if (a.ss_family == AF_UNIX) {
    const auto& un = reinterpret_cast<const sockaddr_un&>(a);
    std::size_t n = len > offsetof(sockaddr_un, sun_path) ? len - offsetof(sockaddr_un, sun_path) : 0;
    return std::string(un.sun_path, strnlen(un.sun_path, std::min(n, sizeof un.sun_path)));
  }
  return {};
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

namespace detail {

ASYNC_UTILS_LINK void stream_check_error(stream_state& s);
// The operations' frames hold the state: the handle may go while an operation runs.
ASYNC_UTILS_LINK coroutine<std::string> stream_read(std::shared_ptr<stream_state> s, std::ptrdiff_t n);
ASYNC_UTILS_LINK coroutine<std::string> stream_readexactly(std::shared_ptr<stream_state> s, std::ptrdiff_t n);
ASYNC_UTILS_LINK coroutine<std::string> stream_readuntil(std::shared_ptr<stream_state> s, std::string separator);
ASYNC_UTILS_LINK coroutine<std::string> stream_readline(std::shared_ptr<stream_state> s);
ASYNC_UTILS_LINK coroutine<void> stream_drain(std::shared_ptr<stream_state> s);
ASYNC_UTILS_LINK coroutine<void> stream_wait_closed(std::shared_ptr<stream_state> s);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void stream_check_error(stream_state& s) {
  if (s.read_error) {
    int e = std::exchange(s.read_error, 0);
    throw_errno(e, "stream_reader");
  }
}

// One receive into the buffer (room for at least `want` bytes): `co_await stream_fill(s, want)`.
// A plain awaiter (no coroutine frame of its own, no extra resumption per read); it lives in the
// caller's frame, which keeps the state alive.
struct stream_fill {
  std::optional<reading_guard> guard;                // declared first: released after the wait
  std::optional<io_awaiter<stream_fill_op>> io;  // empty: nothing to wait for (EOF, closed)

  stream_fill(stream_state* s, std::size_t want) {
    if (!s->fd || s->eof) {
      s->eof = true;
      return;
    }
    if (s->reading) throw std::runtime_error("stream_reader: another read is already waiting for data");
    s->reserve(want);
    guard.emplace(s);
    const std::size_t room = s->rbuf.size() - s->tail;
    io.emplace(stream_fill_op{{}, s, room}, s->fd.get(), io_read);
  }
  stream_fill(const stream_fill&) = delete;
  stream_fill& operator=(const stream_fill&) = delete;
  bool await_ready() { return !io || io->await_ready(); }
  void await_suspend(std::coroutine_handle<> h) { io->await_suspend(h); }
  void await_resume() {
    if (io) io->await_resume();
  }
};

ASYNC_UTILS_LINK coroutine<std::string> stream_read(std::shared_ptr<stream_state> s, std::ptrdiff_t n) {
  if (n == 0) co_return std::string();
  if (n < 0) {
    while (!s->eof) {
      stream_fill fill(s.get(), stream_default_limit);  // named: g++ 12 and temporaries in co_await
      co_await fill;
    }
    stream_check_error(*s);
    co_return s->take(s->available());
  }
  if (s->available() == 0 && !s->eof) {
    stream_fill fill(s.get(), std::min<std::size_t>(static_cast<std::size_t>(n), 256 * 1024));
    co_await fill;
  }
  if (s->available() == 0) stream_check_error(*s);
  co_return s->take(std::min(s->available(), static_cast<std::size_t>(n)));
}

ASYNC_UTILS_LINK coroutine<std::string> stream_readexactly(std::shared_ptr<stream_state> s, std::ptrdiff_t n) {
  if (n < 0) throw std::invalid_argument("readexactly: size can not be less than zero");
  const auto want = static_cast<std::size_t>(n);
  while (s->available() < want) {
    if (s->eof) {
      stream_check_error(*s);
      throw incomplete_read_error(s->take(s->available()), want);
    }
    stream_fill fill(s.get(), want - s->available());
    co_await fill;
  }
  co_return s->take(want);
}

ASYNC_UTILS_LINK coroutine<std::string> stream_readuntil(std::shared_ptr<stream_state> s, std::string separator) {
  if (separator.empty()) throw std::invalid_argument("readuntil: separator should be at least one-byte string");
  const std::size_t seplen = separator.size();
  std::size_t offset = 0, found = std::string::npos;
  for (;;) {
    const std::size_t len = s->available();
    if (len - std::min(len, offset) >= seplen) {
      std::string_view view(s->rbuf.data() + s->head, len);
      found = view.find(separator, offset);
      if (found != std::string::npos) break;
      offset = len + 1 - seplen;
      if (offset > s->limit) throw limit_overrun_error("Separator is not found, and chunk exceed the limit", offset);
    }
    if (s->eof) {
      stream_check_error(*s);
      throw incomplete_read_error(s->take(s->available()), std::nullopt);
    }
    stream_fill fill(s.get(), stream_default_limit);
    co_await fill;
  }
  if (found > s->limit) throw limit_overrun_error("Separator is found, but chunk is longer than limit", found);
  co_return s->take(found + seplen);
}

ASYNC_UTILS_LINK coroutine<std::string> stream_readline(std::shared_ptr<stream_state> s) {
  std::string sep = "\n";
  std::optional<limit_overrun_error> overrun;
  try {
    co_return co_await stream_readuntil(s, sep);
  } catch (incomplete_read_error& e) {
    co_return e.partial();
  } catch (limit_overrun_error& e) {
    overrun = e;
  }
  // As asyncio: the long line goes (up to its separator, or all that is buffered).
  std::string_view rest(s->rbuf.data() + s->head, s->available());
  if (rest.substr(std::min(rest.size(), overrun->consumed()), 1) == sep)
    s->take(overrun->consumed() + 1);
  else
    s->take(s->available());
  throw *overrun;
}

ASYNC_UTILS_LINK coroutine<void> stream_drain(std::shared_ptr<stream_state> s) {
  if (s->write_error) throw_errno(s->write_error, "stream_writer.drain");
  if (s->closing) {
    co_await sleep(std::chrono::seconds(0));  // as asyncio: let the close go on
    co_return;
  }
  while (s->buffered() > stream_high_water) {
    auto f = s->loop->create_future<void>();
    s->drainers.push_back(f);
    co_await f;
    if (s->write_error) throw_errno(s->write_error, "stream_writer.drain");
  }
}

ASYNC_UTILS_LINK coroutine<void> stream_wait_closed(std::shared_ptr<stream_state> s) {
  if (!s->closed.done()) co_await s->closed;
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// The shared state of a stream or server handle; a moved-from handle may only be destroyed or
/// assigned to, anything else throws instead of reaching through a null pointer.
template <class S>
const std::shared_ptr<S>& live(const std::shared_ptr<S>& s, const char* who) {
  if (!s) throw invalid_state_error(std::string(who) + ": used after being moved from");
  return s;
}

}  // namespace detail

/// asyncio.StreamReader over a connected socket. Copies share the connection.
class stream_reader {
 public:
  explicit stream_reader(std::shared_ptr<detail::stream_state> s) : s_(std::move(s)) {}

  /// Up to n bytes (n < 0: everything until EOF); empty at EOF.
  coroutine<std::string> read(std::ptrdiff_t n = -1) { return detail::stream_read(st(), n); }

  /// Exactly n bytes; incomplete_read_error (with what came) if EOF comes first.
  coroutine<std::string> readexactly(std::ptrdiff_t n) { return detail::stream_readexactly(st(), n); }

  /// Data up to and including `separator`. At EOF without it: incomplete_read_error with the
  /// rest. Not found within limit bytes: limit_overrun_error, the data stays buffered.
  coroutine<std::string> readuntil(std::string separator = "\n") { return detail::stream_readuntil(st(), std::move(separator)); }

  /// A line ending in '\n', or what is left at EOF. A line longer than the limit is dropped
  /// and throws limit_overrun_error (asyncio: ValueError).
  coroutine<std::string> readline() { return detail::stream_readline(st()); }

  /// True once EOF was seen and the buffer is empty.
  bool at_eof() const { return st()->eof && st()->available() == 0; }

 private:
  const std::shared_ptr<detail::stream_state>& st() const { return detail::live(s_, "stream_reader"); }
  std::shared_ptr<detail::stream_state> s_;
};

/// asyncio.StreamWriter over a connected socket. Copies share the connection.
class stream_writer {
 public:
  explicit stream_writer(std::shared_ptr<detail::stream_state> s) : s_(std::move(s)) {}

  /// Sends what the socket takes now and buffers the rest; drain() waits for the buffer.
  void write(std::string_view data);
  template <class Range>
  void writelines(const Range& lines) {
    for (const auto& line : lines) write(std::string_view(line));
  }

  /// Waits while more than 64 KiB are buffered, until at most 16 KiB are; throws the error of a
  /// lost connection. Cancelling it keeps every buffered byte.
  coroutine<void> drain() { return detail::stream_drain(st()); }

  /// Closes the connection once the buffer is flushed.
  void close();
  bool is_closing() const { return st()->closing; }
  coroutine<void> wait_closed() { return detail::stream_wait_closed(st()); }
  bool can_write_eof() const noexcept { return true; }
  /// Shuts the sending side down after the buffer is flushed.
  void write_eof();
  /// "peername" or "sockname" as "host:port" ("[v6]:port", or a Unix path); none for others.
  std::optional<std::string> get_extra_info(std::string_view name) const;
  /// The descriptor (owned by the stream; -1 once closed).
  int fileno() const { return st()->fd.get(); }

 private:
  const std::shared_ptr<detail::stream_state>& st() const { return detail::live(s_, "stream_writer"); }
  std::shared_ptr<detail::stream_state> s_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void stream_writer::write(std::string_view data) {
  auto& s = *st();
  if (s.closing) throw std::runtime_error("stream_writer.write: the writer is closed");
  if (s.eof_written || s.eof_pending) throw std::runtime_error("stream_writer.write: cannot write after write_eof()");
  if (data.empty() || s.write_error) return;  // a lost connection is reported by drain()
  std::size_t sent = 0;
  if (s.buffered() == 0) {
    while (sent < data.size()) {
      ssize_t n = ::send(s.fd.get(), data.data() + sent, data.size() - sent, detail::send_flags);
      if (n >= 0) {
        sent += static_cast<std::size_t>(n);
        continue;
      }
      if (errno == EINTR) continue;
      if (detail::would_block(errno)) break;
      s.write_error = errno;
      return;
    }
    if (sent == data.size()) return;
  }
  s.wbuf.append(data.data() + sent, data.size() - sent);
  if (!s.writer_armed) {
    s.loop->add_writer(s.fd.get(), [p = &s] { p->flush(); });
    s.writer_armed = true;
  }
}

ASYNC_UTILS_LINK void stream_writer::close() {
  auto& s = *st();
  if (s.closing) return;
  s.closing = true;
  if (s.buffered() == 0 && s.fd) s.finish_close();
}

ASYNC_UTILS_LINK void stream_writer::write_eof() {
  auto& s = *st();
  if (s.closing || s.eof_written || s.eof_pending) return;
  if (s.buffered() == 0) {
    s.eof_written = true;
    ::shutdown(s.fd.get(), SHUT_WR);
  } else {
    s.eof_pending = true;
  }
}

ASYNC_UTILS_LINK std::optional<std::string> stream_writer::get_extra_info(std::string_view name) const {
  if (!st()->fd) return std::nullopt;
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  int r;
  if (name == "peername")
    r = ::getpeername(s_->fd.get(), reinterpret_cast<sockaddr*>(&a), &len);
  else if (name == "sockname")
    r = ::getsockname(s_->fd.get(), reinterpret_cast<sockaddr*>(&a), &len);
  else
    return std::nullopt;
  if (r != 0) return std::nullopt;
  return detail::format_address(a, len);
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// Takes a connected socket (made non-blocking here) and returns its reader and writer, which
/// own it from now on.
ASYNC_UTILS_LINK std::pair<stream_reader, stream_writer> open_stream(int fd, std::size_t limit = detail::stream_default_limit);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::pair<stream_reader, stream_writer> open_stream(int fd, std::size_t limit) {
  detail::unique_fd owned(fd);
  if (fd < 0) throw std::invalid_argument("open_stream: bad descriptor");
  if (limit == 0) throw std::invalid_argument("open_stream: limit must be positive");
  detail::make_nonblocking_cloexec(fd);
  auto s = std::make_shared<detail::stream_state>(owned.release(), limit);
  return {stream_reader(s), stream_writer(s)};
}
#endif  // ASYNC_UTILS_DEFINITIONS

/// One result of getaddrinfo: what socket() and connect()/bind() take.
struct address_info {
  int family = 0, socktype = 0, protocol = 0;
  sockaddr_storage address{};
  socklen_t length = 0;
};

namespace detail {
ASYNC_UTILS_LINK const std::error_category& gai_category();
ASYNC_UTILS_LINK void check_port(int port, const char* what);
ASYNC_UTILS_LINK std::vector<address_info> resolve(const std::string& host, int port, int flags);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK const std::error_category& gai_category() {
  struct category : std::error_category {
    const char* name() const noexcept override { return "getaddrinfo"; }
    std::string message(int e) const override { return ::gai_strerror(e); }
  };
  static const category c;
  return c;
}
ASYNC_UTILS_LINK void check_port(int port, const char* what) {
  if (port < 0 || port > 65535) throw std::invalid_argument(std::string(what) + ": port out of range 0-65535: " + std::to_string(port));
}
ASYNC_UTILS_LINK std::vector<address_info> resolve(const std::string& host, int port, int flags) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = flags | AI_NUMERICSERV;
  addrinfo* list = nullptr;
  const std::string service = std::to_string(port);
  int r = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &list);
  if (r == EAI_SYSTEM) throw_errno(errno, "getaddrinfo " + host);
  if (r != 0) throw std::system_error(r, gai_category(), "getaddrinfo " + host);
  std::vector<address_info> out;
  for (addrinfo* a = list; a; a = a->ai_next) {
    address_info i;
    i.family = a->ai_family;
    i.socktype = a->ai_socktype;
    i.protocol = a->ai_protocol;
    std::memcpy(&i.address, a->ai_addr, a->ai_addrlen);
    i.length = a->ai_addrlen;
    out.push_back(i);
  }
  ::freeaddrinfo(list);
  return out;
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// asyncio's loop.getaddrinfo for stream sockets, run on the default executor. An unknown host
/// throws std::system_error (category "getaddrinfo"), a bad port std::invalid_argument.
ASYNC_UTILS_LINK coroutine<std::vector<address_info>> getaddrinfo(std::string host, int port, int flags = 0);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<std::vector<address_info>> getaddrinfo(std::string host, int port, int flags) {
  detail::check_port(port, "getaddrinfo");
  // Named, not a temporary inside the co_await: g++ 12 frees the captured string twice otherwise.
  auto job = [host, port, flags] { return detail::resolve(host, port, flags); };
  auto resolved = event_loop::current().run_in_executor(std::move(job));
  co_return co_await std::move(resolved);
}
#endif  // ASYNC_UTILS_DEFINITIONS

namespace detail {
/// A numeric IPv4 or IPv6 host needs no resolver (asyncio skips getaddrinfo for them too).
ASYNC_UTILS_LINK std::optional<address_info> numeric_address(const std::string& host, int port);
/// The addresses to connect to or bind: numeric hosts at once, names through getaddrinfo.
ASYNC_UTILS_LINK coroutine<std::vector<address_info>> resolve_host(std::string host, int port, int flags);
ASYNC_UTILS_LINK address_info unix_address(const std::string& path, const char* what);
ASYNC_UTILS_LINK void set_nodelay(int fd, int family);
ASYNC_UTILS_LINK coroutine<std::pair<stream_reader, stream_writer>> connect_to(address_info a, std::size_t limit);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::optional<address_info> numeric_address(const std::string& host, int port) {
  address_info a;
  a.socktype = SOCK_STREAM;
  a.protocol = IPPROTO_TCP;
  auto& in = reinterpret_cast<sockaddr_in&>(a.address);
  if (::inet_pton(AF_INET, host.c_str(), &in.sin_addr) == 1) {
    in.sin_family = AF_INET;
    in.sin_port = htons(static_cast<std::uint16_t>(port));
    a.family = AF_INET;
    a.length = sizeof(sockaddr_in);
    return a;
  }
  auto& in6 = reinterpret_cast<sockaddr_in6&>(a.address);
  if (::inet_pton(AF_INET6, host.c_str(), &in6.sin6_addr) == 1) {
    in6.sin6_family = AF_INET6;
    in6.sin6_port = htons(static_cast<std::uint16_t>(port));
    a.family = AF_INET6;
    a.length = sizeof(sockaddr_in6);
    return a;
  }
  return std::nullopt;
}

ASYNC_UTILS_LINK coroutine<std::vector<address_info>> resolve_host(std::string host, int port, int flags) {
  if (auto a = numeric_address(host, port)) co_return std::vector<address_info>{*a};
  // Named, not a temporary inside the co_await (g++ 12, see getaddrinfo).
  auto job = [host, port, flags] { return resolve(host, port, flags); };
  auto resolved = event_loop::current().run_in_executor(std::move(job));
  co_return co_await std::move(resolved);
}

ASYNC_UTILS_LINK address_info unix_address(const std::string& path, const char* what) {
  address_info a;
  auto& un = reinterpret_cast<sockaddr_un&>(a.address);
  if (path.empty() || path.size() >= sizeof un.sun_path)
    throw std::invalid_argument(std::string(what) + ": bad path (empty or longer than " + std::to_string(sizeof un.sun_path - 1) + " bytes)");
  un.sun_family = AF_UNIX;
  std::memcpy(un.sun_path, path.data(), path.size());
  a.family = AF_UNIX;
  a.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
  return a;
}

ASYNC_UTILS_LINK void set_nodelay(int fd, int family) {
  if (family != AF_INET && family != AF_INET6) return;
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

ASYNC_UTILS_LINK coroutine<std::pair<stream_reader, stream_writer>> connect_to(address_info a, std::size_t limit) {
  unique_fd fd(::socket(a.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, a.protocol));
  if (!fd) throw_errno(errno, "open_connection: socket");
  set_nodelay(fd.get(), a.family);
  co_await sock_connect(fd.get(), reinterpret_cast<const sockaddr*>(&a.address), a.length);
  co_return open_stream(fd.release(), limit);
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// asyncio.open_connection: resolves host, connects to the first address that accepts (TCP_NODELAY on).
ASYNC_UTILS_LINK coroutine<std::pair<stream_reader, stream_writer>> open_connection(std::string host, int port,
                                                                                    std::size_t limit = detail::stream_default_limit);
/// asyncio.open_unix_connection.
ASYNC_UTILS_LINK coroutine<std::pair<stream_reader, stream_writer>> open_unix_connection(std::string path,
                                                                                         std::size_t limit = detail::stream_default_limit);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<std::pair<stream_reader, stream_writer>> open_connection(std::string host, int port,
                                                                                    std::size_t limit) {
  detail::check_port(port, "open_connection");
  auto addresses = co_await detail::resolve_host(host, port, 0);
  std::exception_ptr last;
  for (const auto& a : addresses) {
    try {
      co_return co_await detail::connect_to(a, limit);
    } catch (const std::system_error&) {
      last = std::current_exception();
    }
  }
  std::rethrow_exception(last);
}

ASYNC_UTILS_LINK coroutine<std::pair<stream_reader, stream_writer>> open_unix_connection(std::string path,
                                                                                         std::size_t limit) {
  auto a = detail::unix_address(path, "open_unix_connection");
  co_return co_await detail::connect_to(a, limit);
}
#endif  // ASYNC_UTILS_DEFINITIONS


/// How start_server and start_unix_server set up the listening sockets.
struct server_options {
  std::size_t limit = detail::stream_default_limit;  // the readers' limit
  int backlog = 100;                                  // listen() backlog
  bool start_serving = true;                          // accept at once (else: start_serving())
};

/// One listening socket of a server (asyncio: server.sockets[i]).
struct listening_socket {
  int fd = -1;
  /// The bound address as "host:port" ("[v6]:port", or the Unix path).
  std::string sockname() const;
  /// The bound port (0 for a Unix socket).
  int port() const;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK std::string listening_socket::sockname() const {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return {};
  return detail::format_address(a, len);
}

ASYNC_UTILS_LINK int listening_socket::port() const {
  sockaddr_storage a{};
  socklen_t len = sizeof a;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) return 0;
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
  return 0;
}
#endif  // ASYNC_UTILS_DEFINITIONS

namespace detail {

/// A server's listeners and the count of its running handlers. Each handler's frame holds the
/// state, so the callback lives as long as any connection it serves.
struct server_state : std::enable_shared_from_this<server_state> {
  using callback = std::function<coroutine<void>(stream_reader, stream_writer)>;
  event_loop* loop;
  callback cb;
  server_options options;
  std::vector<unique_fd> listeners;
  std::string unix_path;  // removed on close
  bool serving = false;
  bool closed = false;
  std::size_t active = 0;  // handlers not yet ended
  std::optional<future<void>> forever;
  std::vector<future<void>> closed_waiters;
  handle retry;  // accepting paused after EMFILE and the like

  server_state(callback c, server_options o) : loop(&event_loop::current()), cb(std::move(c)), options(o) {}
  server_state(const server_state&) = delete;
  server_state& operator=(const server_state&) = delete;
  ~server_state() { close(); }

  void start();
  void pause();
  void close();
  void maybe_wake();

  // Accepts what is pending (at most a backlog's worth per wake-up, as asyncio).
  void accept_ready(int fd);
  static coroutine<void> serve(std::shared_ptr<server_state> self, unique_fd conn);
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK void server_state::start() {
  if (serving || closed) return;
  serving = true;
  for (auto& l : listeners) loop->add_reader(l.get(), [this, fd = l.get()] { accept_ready(fd); });
}

ASYNC_UTILS_LINK void server_state::pause() {
  if (!serving) return;
  serving = false;
  for (auto& l : listeners) loop->remove_reader(l.get());
}

ASYNC_UTILS_LINK void server_state::close() {
  if (closed) return;
  pause();
  closed = true;
  retry.cancel();
  listeners.clear();  // stops accepting; connections already made go on
  if (!unix_path.empty()) ::unlink(unix_path.c_str());
  if (forever && !forever->done()) forever->cancel();
  maybe_wake();
}

ASYNC_UTILS_LINK void server_state::maybe_wake() {
  if (!closed || active > 0) return;
  for (auto& f : closed_waiters)
    if (!f.done()) f.set_result();
  closed_waiters.clear();
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

/// asyncio.Server: the listening sockets of start_server / start_unix_server. close() stops
/// accepting; the connections already made go on, and wait_closed() waits for their handlers
/// to end (asyncio 3.12). Destroying it closes it. Usable as an async context manager.
class server {
 public:
  explicit server(std::shared_ptr<detail::server_state> s) : s_(std::move(s)) {}
  server(server&&) noexcept = default;
  server& operator=(server&& other) noexcept {
    if (this != &other) {
      if (s_) s_->close();
      s_ = std::move(other.s_);
    }
    return *this;
  }
  ~server() {
    if (s_) s_->close();
  }

  /// Stops listening and closes the listening sockets (a Unix socket's file is removed).
  void close() { live()->close(); }
  /// Waits until the server is closed and every handler it started has ended.
  coroutine<void> wait_closed() { return wait_closed_impl(live()); }
  bool is_serving() const { return live()->serving; }
  /// Starts accepting (start_server does unless options.start_serving is false).
  coroutine<void> start_serving() { return start_serving_impl(live()); }
  /// Accepts until cancelled; then closes the server, waits for it, and ends cancelled.
  coroutine<void> serve_forever() { return serve_forever_impl(live()); }
  /// The listening sockets; none once closed.
  std::vector<listening_socket> sockets() const {
    std::vector<listening_socket> out;
    for (auto& l : live()->listeners) out.push_back({l.get()});
    return out;
  }

  detail::ready_ref<server> aenter() noexcept { return {*this}; }
  /// Closes the server and waits for it (asyncio's __aexit__).
  coroutine<bool> aexit(std::exception_ptr) { return aexit_impl(live()); }

 private:
  const std::shared_ptr<detail::server_state>& live() const { return detail::live(s_, "server"); }
  static coroutine<void> wait_closed_impl(std::shared_ptr<detail::server_state> s);
  static coroutine<void> start_serving_impl(std::shared_ptr<detail::server_state> s);
  static coroutine<void> serve_forever_impl(std::shared_ptr<detail::server_state> s);
  static coroutine<bool> aexit_impl(std::shared_ptr<detail::server_state> s);

  std::shared_ptr<detail::server_state> s_;
};

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<void> server::wait_closed_impl(std::shared_ptr<detail::server_state> s) {
  if (s->closed && s->active == 0) co_return;
  auto f = s->loop->create_future<void>();
  s->closed_waiters.push_back(f);
  co_await f;
}
ASYNC_UTILS_LINK coroutine<void> server::start_serving_impl(std::shared_ptr<detail::server_state> s) {
  if (s->closed) throw std::runtime_error("server is closed");
  s->start();
  co_await sleep(std::chrono::seconds(0));
}
ASYNC_UTILS_LINK coroutine<void> server::serve_forever_impl(std::shared_ptr<detail::server_state> s) {
  if (s->forever) throw std::runtime_error("server is already being awaited on serve_forever()");
  if (s->closed) throw std::runtime_error("server is closed");
  s->start();
  s->forever = s->loop->create_future<void>();
  std::exception_ptr stop;
  try {
    co_await *s->forever;  // only ever cancelled: by the caller, or by close()
  } catch (const cancelled_error&) {
    stop = std::current_exception();
  }
  s->forever.reset();
  s->close();
  co_await wait_closed_impl(s);
  if (stop) std::rethrow_exception(stop);
}
ASYNC_UTILS_LINK coroutine<bool> server::aexit_impl(std::shared_ptr<detail::server_state> s) {
  s->close();
  co_await wait_closed_impl(s);
  co_return false;
}
#endif  // ASYNC_UTILS_DEFINITIONS

namespace detail {

#if ASYNC_UTILS_DEFINITIONS
/// Counts a running handler; its end (also a frame destroyed unfinished) may end wait_closed.
struct handler_count {
  server_state* s;
  explicit handler_count(server_state* st) : s(st) { ++s->active; }
  handler_count(const handler_count&) = delete;
  handler_count& operator=(const handler_count&) = delete;
  ~handler_count() {
    --s->active;
    s->maybe_wake();
  }
};

ASYNC_UTILS_LINK coroutine<void> server_state::serve(std::shared_ptr<server_state> self, unique_fd conn) {
  handler_count counted(self.get());
  std::exception_ptr error;
  try {
    auto [r, w] = open_stream(conn.release(), self->options.limit);
    co_await self->cb(std::move(r), std::move(w));
  } catch (const cancelled_error&) {
    throw;  // run() ending, or the user cancelled the handler's task: not a fault
  } catch (...) {
    error = std::current_exception();
  }
  if (error) {  // as asyncio: reported through the loop's exception handler
    exception_context c;
    c.message = "Unhandled exception in client_connected_cb";
    c.exception = error;
    self->loop->call_exception_handler(c);
  }
}

ASYNC_UTILS_LINK void server_state::accept_ready(int fd) {
  for (int i = 0; i < options.backlog && serving; ++i) {
#if defined(__linux__) || defined(__FreeBSD__) || defined(__NetBSD__) || defined(__OpenBSD__)
    int c = ::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    int c = ::accept(fd, nullptr, nullptr);
    if (c >= 0) {
      try {
        make_nonblocking_cloexec(c);
      } catch (...) {
        ::close(c);
        continue;
      }
    }
#endif
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (would_block(errno)) return;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        // As asyncio: out of descriptors or memory; stop accepting for a second.
        log(log_level::error, std::string("server: accept failed, pausing for 1 s: ") + std::strerror(errno));
        pause();
        retry = loop->call_later(std::chrono::seconds(1), [this] { start(); });
        return;
      }
      log(log_level::error, std::string("server: accept failed: ") + std::strerror(errno));
      return;
    }
    unique_fd conn(c);
    loop->descriptor_opened(c);  // what the loop knew under this number was about another socket
    sockaddr_storage a{};
    socklen_t len = sizeof a;
    if (::getsockname(c, reinterpret_cast<sockaddr*>(&a), &len) == 0) set_nodelay(c, a.ss_family);
    loop->create_task(serve(shared_from_this(), std::move(conn)));
  }
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace detail

namespace detail {

ASYNC_UTILS_LINK unique_fd listen_on(const address_info& a, int backlog, const char* what);
ASYNC_UTILS_LINK void check_server_options(const server_options& o, const char* what);

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK unique_fd listen_on(const address_info& a, int backlog, const char* what) {
  unique_fd fd(::socket(a.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, a.protocol));
  if (!fd) throw_errno(errno, std::string(what) + ": socket");
  int one = 1;
  if (a.family != AF_UNIX) ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
#ifdef IPV6_V6ONLY
  if (a.family == AF_INET6) ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
#endif
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&a.address), a.length) != 0)
    throw_errno(errno, std::string(what) + ": bind " + format_address(a.address, a.length));
  if (::listen(fd.get(), backlog) != 0) throw_errno(errno, std::string(what) + ": listen");
  return fd;
}

ASYNC_UTILS_LINK void check_server_options(const server_options& o, const char* what) {
  if (o.limit == 0) throw std::invalid_argument(std::string(what) + ": limit must be positive");
  if (o.backlog <= 0) throw std::invalid_argument(std::string(what) + ": backlog must be positive");
}
#endif  // ASYNC_UTILS_DEFINITIONS


}  // namespace detail

/// asyncio.start_server: listens on every address `host` resolves to ("" for all interfaces;
/// port 0 picks a free one) and runs client_connected(reader, writer) in a task for each
/// connection (TCP_NODELAY on). A handler's exception goes to the loop's exception handler.
ASYNC_UTILS_LINK coroutine<server> start_server(detail::server_state::callback client_connected, std::string host, int port,
                                                server_options options = {});
/// asyncio.start_unix_server: listens on the Unix socket `path` (a stale socket file there is
/// replaced; the file is removed when the server closes).
ASYNC_UTILS_LINK coroutine<server> start_unix_server(detail::server_state::callback client_connected, std::string path,
                                                     server_options options = {});

#if ASYNC_UTILS_DEFINITIONS
ASYNC_UTILS_LINK coroutine<server> start_server(detail::server_state::callback client_connected, std::string host, int port,
                                                server_options options) {
  detail::check_port(port, "start_server");
  detail::check_server_options(options, "start_server");
  if (!client_connected) throw std::invalid_argument("start_server: empty callback");
  auto addresses = co_await detail::resolve_host(host, port, AI_PASSIVE);
  auto s = std::make_shared<detail::server_state>(std::move(client_connected), options);
  for (const auto& a : addresses) s->listeners.push_back(detail::listen_on(a, options.backlog, "start_server"));
  if (options.start_serving) s->start();
  co_return server(std::move(s));
}

ASYNC_UTILS_LINK coroutine<server> start_unix_server(detail::server_state::callback client_connected, std::string path,
                                                     server_options options) {
  detail::check_server_options(options, "start_unix_server");
  if (!client_connected) throw std::invalid_argument("start_unix_server: empty callback");
  auto a = detail::unix_address(path, "start_unix_server");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  auto s = std::make_shared<detail::server_state>(std::move(client_connected), options);
  s->listeners.push_back(detail::listen_on(a, options.backlog, "start_unix_server"));
  s->unix_path = path;
  if (options.start_serving) s->start();
  co_return server(std::move(s));
}
#endif  // ASYNC_UTILS_DEFINITIONS

}  // namespace codestare::async_utils

#ifdef ASYNC_UTILS_TESTS
TEST_SUITE("streams") {
  using namespace codestare::async_utils;
  using namespace std::chrono_literals;

  // A connected pair of streams over a socketpair.
  std::pair<int, int> make_socketpair() {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
    return {fds[0], fds[1]};
  }
  struct stream_pair {
    std::pair<stream_reader, stream_writer> a, b;
    explicit stream_pair(std::pair<int, int> fds = make_socketpair()) : a(open_stream(fds.first)), b(open_stream(fds.second)) {}
  };

  coroutine<void> send_then_eof(stream_writer w, std::string data) {
    w.write(data);
    co_await w.drain();
    w.write_eof();
  }

  TEST_CASE("readline, readexactly, readuntil, read and at_eof") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      stream_pair p;
      auto& [r, w] = p.a;
      auto& [peer_r, peer_w] = p.b;
      std::string payload = "one\ntwo\r\nabcdefXYZrest";
      co_await send_then_eof(peer_w, payload);
      CHECK(co_await r.readline() == "one\n");
      CHECK(co_await r.readuntil("\r\n") == "two\r\n");
      CHECK(co_await r.readexactly(6) == "abcdef");
      CHECK(co_await r.readuntil("Z") == "XYZ");
      CHECK_FALSE(r.at_eof());
      CHECK(co_await r.read(2) == "re");
      CHECK(co_await r.read() == "st");
      CHECK(r.at_eof());
      CHECK(co_await r.read() == "");
      CHECK(co_await r.readline() == "");
      CHECK(co_await r.readexactly(0) == "");
      w.write("back");
      w.close();
      co_await w.wait_closed();
      CHECK(co_await peer_r.read() == "back");
      (void)peer_r;
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("readexactly with the peer closing mid-message; readuntil at EOF") {
    testing::run_bounded([]() -> coroutine<void> {
      stream_pair p;
      co_await send_then_eof(p.b.second, "abc");
      try {
        co_await p.a.first.readexactly(10);
        FAIL("no error");
      } catch (const incomplete_read_error& e) {
        CHECK(e.partial() == "abc");
        CHECK(e.expected() == std::optional<std::size_t>(10));
      }
      CHECK(p.a.first.at_eof());
      stream_pair q;
      co_await send_then_eof(q.b.second, "no separator");
      try {
        co_await q.a.first.readuntil("!");
        FAIL("no error");
      } catch (const incomplete_read_error& e) {
        CHECK(e.partial() == "no separator");
        CHECK_FALSE(e.expected().has_value());
      }
      CHECK_THROWS_AS(co_await q.a.first.readuntil(""), std::invalid_argument);
      CHECK_THROWS_AS(co_await q.a.first.readexactly(-1), std::invalid_argument);
    }());
  }

  TEST_CASE("a line longer than the limit: limit_overrun_error, readline drops it") {
    testing::run_bounded([]() -> coroutine<void> {
      int fds[2];
      REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
      auto [r, w] = open_stream(fds[0], 8);
      auto [pr, pw] = open_stream(fds[1]);
      pw.write("0123456789AB\nshort\n");
      co_await pw.drain();
      try {
        co_await r.readuntil("\n");
        FAIL("no error");
      } catch (const limit_overrun_error& e) {
        CHECK(e.consumed() == 12);
      }
      CHECK_THROWS_AS(co_await r.readline(), limit_overrun_error);  // drops the long line
      CHECK(co_await r.readline() == "short\n");
      (void)w;
      (void)pr;
    }());
  }

  TEST_CASE("writing after close or write_eof throws; a peer that never reads blocks drain, cancel works") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      stream_pair p;
      auto& w = p.a.second;
      std::string chunk(4 << 20, 'x');
      w.write(chunk);  // more than the socket takes
      auto d = create_task(w.drain());
      co_await sleep(5ms);
      CHECK_FALSE(d.done());  // nobody reads
      d.cancel();
      co_await wait_done(d);
      CHECK(d.cancelled());
      // Every byte is still delivered after the cancelled drain.
      auto reading = create_task(p.b.first.readexactly(static_cast<std::ptrdiff_t>(chunk.size())));
      co_await w.drain();
      CHECK(co_await reading == chunk);
      w.write_eof();
      CHECK_THROWS_AS(w.write("late"), std::runtime_error);
      CHECK(co_await p.b.first.read() == "");
      p.b.second.close();
      CHECK(p.b.second.is_closing());
      CHECK_THROWS_AS(p.b.second.write("x"), std::runtime_error);
      co_await p.b.second.wait_closed();
      w.close();
      co_await w.wait_closed();
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("a cancelled read loses no byte; closing the writer wakes a pending read with EOF") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      stream_pair p;
      auto& r = p.a.first;
      auto t = create_task(r.readexactly(6));
      co_await sleep(1ms);
      p.b.second.write("abc");
      co_await sleep(1ms);  // three bytes buffered by the waiting read
      t.cancel();
      co_await wait_done(t);
      CHECK(t.cancelled());
      p.b.second.write("def");
      CHECK(co_await r.readexactly(6) == "abcdef");
      auto pending = create_task(r.read(10));
      co_await sleep(1ms);
      p.a.second.close();
      CHECK(co_await pending == "");
      co_await p.a.second.wait_closed();
      CHECK(p.a.second.fileno() == -1);
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("streams destroyed while their reads run close the descriptor once") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      std::vector<task<std::string>> reads;
      {
        stream_pair p;
        reads.push_back(create_task(p.a.first.readline()));
        p.b.second.write("partial");
      }  // the handles are gone; the frames keep the connections
      // The peer's end closed with the pair: the read gets what was sent.
      CHECK(co_await reads[0] == "partial");
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("get_extra_info and writelines") {
    testing::run_bounded([]() -> coroutine<void> {
      stream_pair p;
      CHECK(p.a.second.get_extra_info("peername").has_value());
      CHECK_FALSE(p.a.second.get_extra_info("nonsense").has_value());
      std::vector<std::string> lines{"a\n", "b\n"};
      p.a.second.writelines(lines);
      CHECK(co_await p.b.first.readline() == "a\n");
      CHECK(co_await p.b.first.readline() == "b\n");
    }());
  }

  TEST_CASE("open_connection: port out of range, unknown host, refused connection") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      CHECK_THROWS_AS(co_await open_connection("127.0.0.1", 70000), std::invalid_argument);
      CHECK_THROWS_AS(co_await open_connection("127.0.0.1", -1), std::invalid_argument);
      CHECK_THROWS_AS(co_await open_connection("no-such-host.invalid", 80), std::system_error);
      CHECK_THROWS_AS(co_await open_connection("127.0.0.1", 1), std::system_error);
      auto v4 = co_await getaddrinfo("127.0.0.1", 80);
      REQUIRE(v4.size() >= 1);
      CHECK(v4[0].family == AF_INET);
      auto v6 = co_await getaddrinfo("::1", 80);
      REQUIRE(v6.size() >= 1);
      CHECK(v6[0].family == AF_INET6);
      CHECK_FALSE((co_await getaddrinfo("localhost", 0)).empty());
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  // Echoes lines until EOF; counts the handlers that ended.
  struct echo_counts {
    int started = 0, ended = 0;
  };
  detail::server_state::callback echo_handler(echo_counts& counts) {
    return [&counts](stream_reader r, stream_writer w) -> coroutine<void> {
      ++counts.started;
      for (;;) {
        std::string line = co_await r.readline();
        if (line.empty()) break;
        w.write(line);
        co_await w.drain();
      }
      w.close();
      co_await w.wait_closed();
      ++counts.ended;
    };
  }

  coroutine<std::string> ask(stream_reader& r, stream_writer& w, std::string line) {
    w.write(line);
    co_await w.drain();
    co_return co_await r.readline();
  }

  TEST_CASE("start_server: echo; close stops accepting, connections go on; wait_closed waits for the handlers") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      echo_counts counts;
      server srv = co_await start_server(echo_handler(counts), "127.0.0.1", 0);
      CHECK(srv.is_serving());
      REQUIRE(srv.sockets().size() == 1);
      const int port = srv.sockets()[0].port();
      CHECK(port > 0);
      CHECK(srv.sockets()[0].sockname() == "127.0.0.1:" + std::to_string(port));
      auto [r, w] = co_await open_connection("127.0.0.1", port);
      CHECK(co_await ask(r, w, "hello\n") == "hello\n");
      int nodelay = 0;
      socklen_t len = sizeof nodelay;
      REQUIRE(::getsockopt(w.fileno(), IPPROTO_TCP, TCP_NODELAY, &nodelay, &len) == 0);
      CHECK(nodelay != 0);
      CHECK(w.get_extra_info("peername") == "127.0.0.1:" + std::to_string(port));
      srv.close();
      CHECK_FALSE(srv.is_serving());
      CHECK(srv.sockets().empty());
      CHECK_THROWS_AS(co_await open_connection("127.0.0.1", port), std::system_error);  // refused
      CHECK(co_await ask(r, w, "still here\n") == "still here\n");  // the old connection goes on
      auto waiting = create_task(srv.wait_closed());
      co_await sleep(2ms);
      CHECK_FALSE(waiting.done());  // a handler still runs
      w.write_eof();
      CHECK(co_await r.read() == "");
      co_await waiting;
      CHECK(counts.started == 1);
      CHECK(counts.ended == 1);
      w.close();
      co_await w.wait_closed();
      CHECK_THROWS_AS(co_await srv.start_serving(), std::runtime_error);
      CHECK_THROWS_AS(co_await srv.serve_forever(), std::runtime_error);
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("moved-from readers, writers and servers throw invalid_state_error") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      stream_pair p;
      stream_reader r = std::move(p.b.first);
      stream_writer w = std::move(p.a.second);
      CHECK_THROWS_AS(p.b.first.at_eof(), invalid_state_error);
      CHECK_THROWS_AS(co_await p.b.first.readline(), invalid_state_error);
      CHECK_THROWS_AS(p.a.second.write("x"), invalid_state_error);
      CHECK_THROWS_AS(p.a.second.close(), invalid_state_error);
      CHECK_THROWS_AS(co_await p.a.second.drain(), invalid_state_error);
      w.write("still here\n");  // the moved-to handles work
      CHECK(co_await r.readline() == "still here\n");
      echo_counts counts;
      server srv = co_await start_server(echo_handler(counts), "127.0.0.1", 0);
      server moved = std::move(srv);
      CHECK_THROWS_AS(srv.close(), invalid_state_error);
      CHECK_THROWS_AS(srv.sockets(), invalid_state_error);
      CHECK_THROWS_AS(co_await srv.wait_closed(), invalid_state_error);
      srv = std::move(moved);  // assigning to a moved-from server is fine
      srv.close();
      co_await srv.wait_closed();
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("start_server on IPv6 and all interfaces; open_connection to localhost") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      echo_counts counts;
      {
        server srv = co_await start_server(echo_handler(counts), "::1", 0);
        REQUIRE(srv.sockets().size() == 1);
        const int port = srv.sockets()[0].port();
        CHECK(srv.sockets()[0].sockname() == "[::1]:" + std::to_string(port));
        auto [r, w] = co_await open_connection("::1", port);
        CHECK(co_await ask(r, w, "six\n") == "six\n");
      }  // the server, then the client, go out of scope: the handler sees EOF
      server any = co_await start_server(echo_handler(counts), "", 0);
      REQUIRE_FALSE(any.sockets().empty());
      auto [r, w] = co_await open_connection("localhost", any.sockets()[0].port());
      CHECK(co_await ask(r, w, "local\n") == "local\n");
      w.close();
      any.close();
      co_await any.wait_closed();
      CHECK(counts.ended == 2);
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("start_unix_server and open_unix_connection; closing removes the socket file") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      const std::string path = "/tmp/async_utils_streams_" + std::to_string(::getpid()) + ".sock";
      echo_counts counts;
      server srv = co_await start_unix_server(echo_handler(counts), path);
      CHECK(srv.sockets()[0].sockname() == path);
      CHECK(srv.sockets()[0].port() == 0);
      auto [r, w] = co_await open_unix_connection(path);
      CHECK(co_await ask(r, w, "unix\n") == "unix\n");
      w.close();
      srv.close();
      co_await srv.wait_closed();
      CHECK(::access(path.c_str(), F_OK) != 0);
      CHECK_THROWS_AS(co_await open_unix_connection(path), std::system_error);
      CHECK_THROWS_AS(co_await open_unix_connection(""), std::invalid_argument);
      CHECK_THROWS_AS(co_await start_unix_server(echo_handler(counts), std::string(200, 'x')), std::invalid_argument);
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("serve_forever until cancelled or closed; start_serving; async_with closes") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      echo_counts counts;
      server_options opts;
      opts.start_serving = false;
      server srv = co_await start_server(echo_handler(counts), "127.0.0.1", 0, opts);
      CHECK_FALSE(srv.is_serving());
      const int port = srv.sockets()[0].port();
      auto forever = create_task(srv.serve_forever());
      co_await sleep(0ms);
      CHECK(srv.is_serving());
      CHECK_THROWS_AS(co_await srv.serve_forever(), std::runtime_error);
      {
        auto [r, w] = co_await open_connection("127.0.0.1", port);
        CHECK(co_await ask(r, w, "x\n") == "x\n");
      }
      forever.cancel();
      co_await wait_done(forever);
      CHECK(forever.cancelled());
      CHECK_FALSE(srv.is_serving());
      CHECK(counts.ended == 1);

      server other = co_await start_server(echo_handler(counts), "127.0.0.1", 0, opts);
      co_await other.start_serving();
      CHECK(other.is_serving());
      auto forever2 = create_task(other.serve_forever());
      co_await sleep(0ms);
      other.close();  // as asyncio: serve_forever ends cancelled
      co_await wait_done(forever2);
      CHECK(forever2.cancelled());

      server third = co_await start_server(echo_handler(counts), "127.0.0.1", 0);
      const int port3 = third.sockets()[0].port();
      co_await async_with(third, [&](server& s) -> coroutine<void> {
        CHECK(s.is_serving());
        auto [r, w] = co_await open_connection("127.0.0.1", port3);
        CHECK(co_await ask(r, w, "y\n") == "y\n");
      });
      CHECK_FALSE(third.is_serving());
      CHECK(counts.ended == 2);
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("start_server: bad port, unknown host, address in use, empty callback; a handler's exception is reported") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      echo_counts counts;
      CHECK_THROWS_AS(co_await start_server(echo_handler(counts), "127.0.0.1", 65536), std::invalid_argument);
      CHECK_THROWS_AS(co_await start_server(echo_handler(counts), "no-such-host.invalid", 0), std::system_error);
      CHECK_THROWS_AS(co_await start_server(nullptr, "127.0.0.1", 0), std::invalid_argument);
      server srv = co_await start_server(echo_handler(counts), "127.0.0.1", 0);
      const int port = srv.sockets()[0].port();
      CHECK_THROWS_AS(co_await start_server(echo_handler(counts), "127.0.0.1", port), std::system_error);  // in use
      std::vector<std::string> reports;
      event_loop::current().set_exception_handler([&](event_loop&, const exception_context& c) {
        reports.push_back(c.message + ": " + describe(c.exception));
      });
      server failing = co_await start_server(
          [](stream_reader r, stream_writer) -> coroutine<void> {
            co_await r.readline();
            throw std::runtime_error("handler broke");
          },
          "127.0.0.1", 0);
      auto [r, w] = co_await open_connection("127.0.0.1", failing.sockets()[0].port());
      w.write("go\n");
      CHECK(co_await r.read() == "");  // the handler's streams closed with it
      failing.close();
      co_await failing.wait_closed();
      REQUIRE(reports.size() == 1);
      CHECK(reports[0] == "Unhandled exception in client_connected_cb: handler broke");
      event_loop::current().set_exception_handler({});
    }());
    CHECK(testing::open_fds() == fds_before);
  }

  TEST_CASE("server closed while clients are connected and mid-message; handlers run to the end") {
    const int fds_before = testing::open_fds();
    testing::run_bounded([]() -> coroutine<void> {
      int ended = 0;
      server srv = co_await start_server(
          [&ended](stream_reader r, stream_writer w) -> coroutine<void> {
            try {
              std::string msg = co_await r.readexactly(8);
              w.write(msg);
            } catch (const incomplete_read_error& e) {
              w.write("partial:" + e.partial());
            }
            ++ended;
          },
          "127.0.0.1", 0);
      const int port = srv.sockets()[0].port();
      std::vector<std::pair<stream_reader, stream_writer>> clients;
      for (int i = 0; i < 3; ++i) clients.push_back(co_await open_connection("127.0.0.1", port));
      for (auto& c : clients) c.second.write("abc");
      co_await sleep(2ms);
      srv.close();
      clients[0].second.write("defgh");  // completes its message
      clients[1].second.close();          // the peer goes mid-message (its answer is lost)
      CHECK(co_await clients[0].first.read() == "abcdefgh");
      clients[2].second.write_eof();
      CHECK(co_await clients[2].first.read() == "partial:abc");
      co_await srv.wait_closed();
      CHECK(ended == 3);
    }());
    CHECK(testing::open_fds() == fds_before);
  }
}
#endif

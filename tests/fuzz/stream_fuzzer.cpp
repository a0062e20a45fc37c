// libFuzzer target for stream_reader's parsers: read(n), read() to EOF, readexactly(n),
// readuntil(separator) and readline() over arbitrary bytes arriving in arbitrary chunks, each
// result checked against a reference model that sees the whole input at once:
//  - bytes in == bytes out, in order, whatever the chunking;
//  - a separator ends exactly the results that must end in it;
//  - limit_overrun_error and incomplete_read_error come exactly where the model says (the
//    outcome of readuntil does not depend on the chunking; consumed() stays within bounds);
//  - a read that a timeout scope cancels keeps every byte for the next read.
// readline() after an overrun drops what was buffered, and that depends on the chunking: the
// model then reads the rest and checks that the reader dropped a prefix of allowed length.
//
// Build: clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize=function ...
// Input: byte 0 picks the reader's limit (1..16, or the default 64 KiB); then records, each a
// byte r and its arguments: r even writes a chunk (1-8 bytes of "ab\nxy", then yields r/2 % 4
// times in the writer), r odd is a read in the reader task (kind (r >> 1) % 5, under a timeout
// scope when bit 4 is set). The writer shuts its side down after the last chunk.
#include "../../async_utils.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

using namespace codestare::async_utils;
using namespace std::chrono_literals;

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "stream_fuzzer: invariant broken: %s\n", what.c_str());
  std::abort();
}
#define FUZZ_CHECK(cond)                                                                  \
  do {                                                                                    \
    if (!(cond)) fail(std::string(#cond) + " (line " + std::to_string(__LINE__) + ")"); \
  } while (0)

struct reader_bytes {
  const std::uint8_t* data;
  std::size_t size;
  std::size_t pos = 0;
  bool more() const { return pos < size; }
  std::uint8_t byte() { return pos < size ? data[pos++] : 0; }
};

std::string text(reader_bytes& in, std::size_t n) {
  static constexpr char alphabet[] = "ab\nxy";
  std::string out;
  for (std::size_t i = 0; i < n; ++i) out += alphabet[in.byte() % 5];
  return out;
}

struct chunk {
  std::string bytes;
  int yields;
};
enum read_kind : std::uint8_t { r_read, r_read_all, r_exactly, r_until, r_line, r_kinds };
struct read_op {
  read_kind kind;
  std::size_t n;          // read(n), readexactly(n)
  std::string separator;  // readuntil
  bool with_timeout;
};

struct plan {
  std::size_t limit;
  std::vector<chunk> chunks;
  std::vector<read_op> reads;
  std::string all;  // every byte the writer sends
};

plan parse(const std::uint8_t* data, std::size_t size) {
  reader_bytes in{data, size};
  plan p;
  const std::uint8_t l = in.byte() % 17;
  p.limit = l == 16 ? detail::stream_default_limit : static_cast<std::size_t>(l) + 1;
  while (in.more() && p.chunks.size() + p.reads.size() < 200) {
    const std::uint8_t r = in.byte();
    if (r % 2 == 0) {
      chunk c{text(in, 1 + in.byte() % 8), (r >> 1) % 4};
      p.all += c.bytes;
      p.chunks.push_back(std::move(c));
    } else {
      read_op op{static_cast<read_kind>((r >> 1) % r_kinds), static_cast<std::size_t>(in.byte() % 13), {}, ((r >> 4) & 1) != 0};
      if (op.kind == r_until) op.separator = text(in, 1 + in.byte() % 3);
      p.reads.push_back(std::move(op));
    }
  }
  return p;
}

coroutine<void> write_all(int fd, const plan* p) {
  for (const chunk& c : p->chunks) {
    FUZZ_CHECK(::send(fd, c.bytes.data(), c.bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(c.bytes.size()));
    for (int i = 0; i < c.yields; ++i) co_await sleep(0s);
  }
  FUZZ_CHECK(::shutdown(fd, SHUT_WR) == 0);
}

coroutine<std::string> do_read(stream_reader& r, const read_op& op) {
  switch (op.kind) {
    case r_read: co_return co_await r.read(static_cast<std::ptrdiff_t>(op.n));
    case r_read_all: co_return co_await r.read();
    case r_exactly: co_return co_await r.readexactly(static_cast<std::ptrdiff_t>(op.n));
    case r_until: co_return co_await r.readuntil(op.separator);
    default: co_return co_await r.readline();
  }
}

/// The result of one read: its bytes, or which error it threw (with its fields).
struct result {
  enum { value, incomplete, overrun, timed_out } how = value;
  std::string bytes;  // the value, or incomplete_read_error::partial()
  std::optional<std::size_t> expected;
  std::size_t consumed = 0;
};

coroutine<result> attempt(stream_reader& r, const read_op& op) {
  result res;
  try {
    if (op.with_timeout) {
      auto body = [&r, &op]() -> coroutine<std::string> { co_return co_await do_read(r, op); };
      res.bytes = *co_await async_with(timeout(0s), std::move(body));
    } else {
      res.bytes = co_await do_read(r, op);
    }
  } catch (const incomplete_read_error& e) {
    res.how = result::incomplete;
    res.bytes = e.partial();
    res.expected = e.expected();
  } catch (const limit_overrun_error& e) {
    res.how = result::overrun;
    res.consumed = e.consumed();
  } catch (const timeout_error&) {
    res.how = result::timed_out;
  }
  co_return res;
}

std::string show(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '\n' ? std::string("\\n") : std::string(1, c);
  return '"' + out + '"';
}

coroutine<void> read_all(stream_reader r, const plan* p) {
  std::size_t pos = 0;  // the model: p->all[pos..] is still to come
  for (const read_op& op : p->reads) {
    const std::string rest = p->all.substr(pos);
    result got = co_await attempt(r, op);
    auto where = [&] { return "read kind " + std::to_string(op.kind) + " n " + std::to_string(op.n) + " sep " + show(op.separator) + " limit " + std::to_string(p->limit) + ", rest " + show(rest) + ": "; };
    if (got.how == result::timed_out) continue;  // nothing taken: the model stays
    switch (op.kind) {
      case r_read:
        if (op.n == 0 || rest.empty()) {
          if (got.how != result::value || !got.bytes.empty()) fail(where() + "expected nothing");
        } else if (got.how != result::value || got.bytes.empty() || got.bytes.size() > op.n || rest.compare(0, got.bytes.size(), got.bytes) != 0) {
          fail(where() + "got " + show(got.bytes));
        }
        pos += got.bytes.size();
        break;
      case r_read_all:
        if (got.how != result::value || got.bytes != rest) fail(where() + "got " + show(got.bytes));
        pos += got.bytes.size();
        break;
      case r_exactly:
        if (rest.size() >= op.n) {
          if (got.how != result::value || got.bytes != rest.substr(0, op.n)) fail(where() + "got " + show(got.bytes));
          pos += op.n;
        } else {
          if (got.how != result::incomplete || got.bytes != rest || got.expected != op.n) fail(where() + "expected incomplete_read_error");
          pos += rest.size();
        }
        break;
      case r_until:
      case r_line: {
        const std::string sep = op.kind == r_line ? std::string("\n") : op.separator;
        const std::size_t i = rest.find(sep);
        const bool overrun = i != std::string::npos ? i > p->limit : rest.size() >= sep.size() && rest.size() + 1 - sep.size() > p->limit;
        if (!overrun && i != std::string::npos) {
          if (got.how != result::value || got.bytes != rest.substr(0, i + sep.size())) fail(where() + "got " + show(got.bytes));
          pos += i + sep.size();
        } else if (!overrun) {
          // EOF first: readuntil throws incomplete_read_error, readline returns the rest.
          if (op.kind == r_until && (got.how != result::incomplete || got.bytes != rest || got.expected)) fail(where() + "expected incomplete_read_error");
          if (op.kind == r_line && (got.how != result::value || got.bytes != rest)) fail(where() + "expected the rest");
          pos += rest.size();
        } else {
          if (got.how != result::overrun) fail(where() + "expected limit_overrun_error");
          const std::size_t most = i != std::string::npos ? i : rest.size() + 1 - sep.size();
          if (got.consumed <= p->limit || got.consumed > most) fail(where() + "consumed " + std::to_string(got.consumed));
          if (op.kind == r_until) break;  // the data stays buffered
          // readline dropped what was buffered (through the newline when it was there); how
          // much depends on the chunking: read the rest and check that a prefix of allowed
          // length is gone, then stop.
          const std::size_t max_drop = i != std::string::npos ? i + 1 : rest.size();
          read_op all{r_read_all, 0, {}, false};
          result tail = co_await attempt(r, all);
          FUZZ_CHECK(tail.how == result::value);
          const std::size_t dropped = rest.size() - std::min(rest.size(), tail.bytes.size());
          if (tail.bytes.size() > rest.size() || dropped <= p->limit || dropped > max_drop || rest.compare(dropped, std::string::npos, tail.bytes) != 0)
            fail(where() + "after the overrun, the rest is " + show(tail.bytes));
          FUZZ_CHECK(r.at_eof());
          co_return;
        }
        break;
      }
      default: fail("unknown read kind");
    }
  }
  // Whatever the reads left is still there, in order.
  std::string tail = co_await r.read();
  if (tail != p->all.substr(pos)) fail("the rest is " + show(tail) + ", the model says " + show(p->all.substr(pos)));
  FUZZ_CHECK(r.at_eof());
}

coroutine<void> scenario(const plan* p) {
  int sv[2];
  FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  auto [r, w] = open_stream(sv[0], p->limit);
  auto writer = create_task(write_all(sv[1], p));
  co_await read_all(r, p);
  co_await writer;
  w.close();
  co_await w.wait_closed();
  ::close(sv[1]);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const plan p = parse(data, size);
  run(scenario(&p));
  return 0;
}

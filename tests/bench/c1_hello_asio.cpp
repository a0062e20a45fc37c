// C1: the cost of including <boost/asio.hpp> and running one co_spawn'ed hello coroutine.
#include <utility>  // Boost 1.74 awaitable.hpp uses std::exchange without including it

#include <boost/asio.hpp>
#include <cstdio>

namespace asio = boost::asio;

asio::awaitable<void> hello() {
  std::puts("hello");
  co_return;
}

int main() {
  asio::io_context ctx;
  asio::co_spawn(ctx, hello(), asio::detached);
  ctx.run();
}

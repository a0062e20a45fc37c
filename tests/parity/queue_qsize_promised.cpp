// qsize() right after put_nowait() wakes a waiting getter: asyncio still counts the item until
// the getter runs; this library no longer counts an item promised to a woken getter.
#include "parity.hpp"

int main() {
  run([]() -> coroutine<void> {
    queue<std::string> q;
    auto getter = create_task([](queue<std::string>& q) -> coroutine<std::string> { co_return co_await q.get(); }(q));
    co_await sleep(0s);
    q.put_nowait("x");
    say("qsize after put: " + std::to_string(q.qsize()) + " empty: " + py(q.empty()));
    say("got: " + co_await getter);
    say("qsize after get: " + std::to_string(q.qsize()));
  }());
  return 0;
}

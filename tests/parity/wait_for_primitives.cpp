// Primitive waits under wait_for: a timed-out wait leaves the primitive as if it had never been
// called (the lock not taken, no queue item consumed, no semaphore unit used), and the next
// waiter is served.
// The primitives' awaitables are wrapped in small coroutines until they compose with wait_for
// directly (the primitives change being merged).
#include "parity.hpp"

coroutine<bool> acquire(lock& lk) { co_return co_await lk.acquire(); }
coroutine<bool> acquire(semaphore& s) { co_return co_await s.acquire(); }
coroutine<std::string> get(queue<std::string>& q) { co_return co_await q.get(); }
coroutine<bool> wait(event& ev) { co_return co_await ev.wait(); }

int main() {
  run([]() -> coroutine<void> {
    lock lk;
    co_await lk.acquire();
    try {
      co_await wait_for(acquire(lk), 10ms);
    } catch (const timeout_error&) {
      say("lock.acquire: TimeoutError; locked: " + py(lk.locked()));
    }
    lk.release();
    say("after release, locked: " + py(lk.locked()));
    say("acquire again: " + py(co_await wait_for(acquire(lk), 1s)));
    lk.release();

    queue<std::string> q;
    try {
      co_await wait_for(get(q), 10ms);
    } catch (const timeout_error&) {
      say("queue.get: TimeoutError; qsize: " + std::to_string(q.qsize()));
    }
    q.put_nowait("item");
    say("get after timeout: " + co_await wait_for(get(q), 1s));

    semaphore sem(0);
    try {
      co_await wait_for(acquire(sem), 10ms);
    } catch (const timeout_error&) {
      say("semaphore.acquire: TimeoutError; locked: " + py(sem.locked()));
    }
    sem.release();
    say("semaphore locked after release: " + py(sem.locked()));
    say("acquire: " + py(co_await wait_for(acquire(sem), 1s)));

    event ev;
    try {
      co_await wait_for(wait(ev), 10ms);
    } catch (const timeout_error&) {
      say("event.wait: TimeoutError");
    }
    ev.set();
    say("event.wait: " + py(co_await wait_for(wait(ev), 1s)));
  }());
  return 0;
}

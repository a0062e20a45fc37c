# Waiters get a held lock in arrival order; a waiter cancelled in the queue is skipped and the
# lock goes to the next one.
import asyncio


async def user(lock, name):
    print(f"{name} waits")
    try:
        async with lock:
            print(f"{name} holds the lock")
            await asyncio.sleep(0)
            print(f"{name} releases")
    except asyncio.CancelledError:
        print(f"{name} cancelled while waiting; locked={lock.locked()}")


async def main():
    lock = asyncio.Lock()
    await lock.acquire()
    tasks = [asyncio.create_task(user(lock, n)) for n in ("a", "b", "c", "d")]
    await asyncio.sleep(0)
    tasks[1].cancel()
    await asyncio.sleep(0)
    print("main releases")
    lock.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    print("locked at end:", lock.locked())


asyncio.run(main())

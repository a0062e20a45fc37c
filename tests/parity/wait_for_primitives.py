# Primitive waits under wait_for: a timed-out wait leaves the primitive as if it had never been
# called (the lock not taken, no queue item consumed, no semaphore unit used), and the next
# waiter is served.
import asyncio


async def main():
    lock = asyncio.Lock()
    await lock.acquire()
    try:
        await asyncio.wait_for(lock.acquire(), 0.01)
    except asyncio.TimeoutError:
        print("lock.acquire: TimeoutError; locked:", lock.locked())
    lock.release()
    print("after release, locked:", lock.locked())
    print("acquire again:", await asyncio.wait_for(lock.acquire(), 1))
    lock.release()

    q = asyncio.Queue()
    try:
        await asyncio.wait_for(q.get(), 0.01)
    except asyncio.TimeoutError:
        print("queue.get: TimeoutError; qsize:", q.qsize())
    q.put_nowait("item")
    print("get after timeout:", await asyncio.wait_for(q.get(), 1))

    sem = asyncio.Semaphore(0)
    try:
        await asyncio.wait_for(sem.acquire(), 0.01)
    except asyncio.TimeoutError:
        print("semaphore.acquire: TimeoutError; locked:", sem.locked())
    sem.release()
    print("semaphore locked after release:", sem.locked())
    print("acquire:", await asyncio.wait_for(sem.acquire(), 1))

    ev = asyncio.Event()
    try:
        await asyncio.wait_for(ev.wait(), 0.01)
    except asyncio.TimeoutError:
        print("event.wait: TimeoutError")
    ev.set()
    print("event.wait:", await asyncio.wait_for(ev.wait(), 1))


asyncio.run(main())

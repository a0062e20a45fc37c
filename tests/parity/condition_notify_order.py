# notify(n) wakes the n longest-waiting tasks; each re-acquires the lock in turn; notify_all
# wakes the rest in order.
import asyncio


async def waiter(cond, name):
    async with cond:
        print(f"{name} waits")
        await cond.wait()
        print(f"{name} woken, holds the lock: {cond.locked()}")


async def main():
    cond = asyncio.Condition()
    tasks = [asyncio.create_task(waiter(cond, n)) for n in ("a", "b", "c", "d", "e")]
    await asyncio.sleep(0)
    async with cond:
        print("notify(1)")
        cond.notify(1)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    async with cond:
        print("notify(2)")
        cond.notify(2)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    async with cond:
        print("notify_all")
        cond.notify_all()
    await asyncio.gather(*tasks)
    print("done; locked:", cond.locked())


asyncio.run(main())

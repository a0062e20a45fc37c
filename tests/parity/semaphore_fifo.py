# A semaphore hands released units to waiters in arrival order; a newcomer does not overtake
# a waiter that was already woken.
import asyncio


async def user(sem, name, hold):
    print(f"{name} waits")
    async with sem:
        print(f"{name} acquired")
        for _ in range(hold):
            await asyncio.sleep(0)
        print(f"{name} releases")


async def main():
    sem = asyncio.Semaphore(2)
    tasks = [asyncio.create_task(user(sem, n, h)) for n, h in (("a", 2), ("b", 1), ("c", 0), ("d", 1), ("e", 0))]
    await asyncio.sleep(0)
    print("locked:", sem.locked())
    await asyncio.gather(*tasks)
    print("locked at end:", sem.locked())


asyncio.run(main())

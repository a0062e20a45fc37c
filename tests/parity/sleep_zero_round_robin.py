# Tasks start in creation order on the next iteration (never inline) and sleep(0) yields once:
# three tasks interleave round-robin.
import asyncio


async def worker(name):
    for i in range(3):
        print(f"{name} step {i}")
        await asyncio.sleep(0)
    print(f"{name} done")


async def main():
    tasks = [asyncio.create_task(worker(n)) for n in "abc"]
    print("created")
    await asyncio.sleep(0)
    print("main after one yield")
    for t in tasks:
        await t
    print("all done")


asyncio.run(main())

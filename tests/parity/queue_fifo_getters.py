# Getters waiting on an empty queue receive items in arrival order; a cancelled getter takes
# nothing, its item goes to the next getter.
import asyncio


async def getter(q, name):
    print(f"{name} waits")
    try:
        item = await q.get()
        print(f"{name} got {item}")
    except asyncio.CancelledError:
        print(f"{name} cancelled")


async def main():
    q = asyncio.Queue()
    tasks = [asyncio.create_task(getter(q, n)) for n in ("a", "b", "c", "d")]
    await asyncio.sleep(0)
    tasks[2].cancel()
    for i in range(3):
        q.put_nowait(i)
        print(f"put {i}")
    await asyncio.gather(*tasks)
    print("left:", q.qsize())


asyncio.run(main())

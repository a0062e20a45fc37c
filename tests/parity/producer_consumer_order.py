# A producer and two consumers on a bounded queue: the exact interleaving of puts, gets and
# waits, step by step.
import asyncio


async def producer(q, n):
    for i in range(n):
        print(f"put {i} (qsize {q.qsize()}, full {q.full()})")
        await q.put(i)
        print(f"put {i} done")
    for _ in range(2):
        await q.put(None)
    print("producer done")


async def consumer(q, name):
    while True:
        item = await q.get()
        if item is None:
            print(f"{name} stops")
            return
        print(f"{name} got {item}")
        await asyncio.sleep(0)


async def main():
    q = asyncio.Queue(maxsize=2)
    await asyncio.gather(producer(q, 7), consumer(q, "c1"), consumer(q, "c2"))
    print("empty:", q.empty())


asyncio.run(main())

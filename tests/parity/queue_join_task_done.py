# join() waits until task_done() was called once per item put; every joiner wakes, in the
# order they began to wait; task_done() once too often raises ValueError.
import asyncio


async def worker(q, name):
    while True:
        item = await q.get()
        print(f"{name} got {item}")
        await asyncio.sleep(0)
        print(f"{name} done with {item}")
        q.task_done()


async def joiner(q, name):
    await q.join()
    print(f"{name}: join returned")


async def main():
    q = asyncio.Queue()
    for i in range(5):
        q.put_nowait(i)
    workers = [asyncio.create_task(worker(q, n)) for n in ("w1", "w2")]
    joiners = [asyncio.create_task(joiner(q, n)) for n in ("j1", "j2")]
    await q.join()
    print("main: join returned")
    await asyncio.gather(*joiners)
    try:
        q.task_done()
    except ValueError:
        print("task_done once too often: ValueError")
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    print("join on an idle queue:", await asyncio.wait_for(q.join(), 1))


asyncio.run(main())

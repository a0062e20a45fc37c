# A coroutine awaiting a future or task is woken by a done callback registered when it began to
# wait: callbacks added before the await run before it resumes, callbacks added later after it.
import asyncio


async def main():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fut.add_done_callback(lambda f: print("future callback 1 (added before the await)"))

    async def awaiter(aw, name):
        print(f"{name} waits")
        v = await aw
        print(f"{name} resumed with {v}")

    t = asyncio.create_task(awaiter(fut, "future awaiter"))
    await asyncio.sleep(0)
    fut.add_done_callback(lambda f: print("future callback 2 (added after the await began)"))
    fut.set_result(7)
    print("set_result returned")
    await t

    async def work():
        await asyncio.sleep(0)
        print("work returns")
        return 8

    w = asyncio.create_task(work())
    w.add_done_callback(lambda f: print("task callback 1 (added before the await)"))
    t = asyncio.create_task(awaiter(w, "task awaiter"))
    await asyncio.sleep(0)
    w.add_done_callback(lambda f: print("task callback 2 (added after the await began)"))
    await t
    print("done")


asyncio.run(main())

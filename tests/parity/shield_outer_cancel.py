# shield(): cancelling the task that awaits a shielded task cancels only the awaiting task; the
# inner task runs on and keeps its result.
import asyncio


async def inner():
    print("inner starts")
    for _ in range(3):
        await asyncio.sleep(0)
    print("inner finishes")
    return 5


async def outer(t):
    try:
        return await asyncio.shield(t)
    except asyncio.CancelledError:
        print("outer: CancelledError")
        raise


async def main():
    t = asyncio.create_task(inner())
    o = asyncio.create_task(outer(t))
    await asyncio.sleep(0)
    print("cancel outer:", o.cancel())
    try:
        await o
    except asyncio.CancelledError:
        print("main: outer task cancelled")
    print("inner cancelled:", t.cancelled(), "done:", t.done())
    print("inner result:", await t)
    # A shielded coroutine becomes a task of its own and also survives.
    o2 = asyncio.create_task(outer(inner()))
    await asyncio.sleep(0)
    o2.cancel()
    try:
        await o2
    except asyncio.CancelledError:
        print("main: second outer task cancelled")
    for _ in range(5):
        await asyncio.sleep(0)


asyncio.run(main())

# asyncio.wait: FIRST_COMPLETED, FIRST_EXCEPTION and ALL_COMPLETED; a timeout (0, and one that
# passes) returns what is pending without cancelling it; the children's exceptions stay in them;
# an empty set is a ValueError; a cancelled caller leaves the children running.
import asyncio


async def child(name, steps, fail=False):
    for _ in range(steps):
        await asyncio.sleep(0)
    if fail:
        print(f"{name} raises")
        raise ValueError(name)
    print(f"{name} finishes")
    return name


def names(tasks):
    return sorted(t.get_name() for t in tasks)


async def main():
    a = asyncio.create_task(child("a", 1), name="a")
    b = asyncio.create_task(child("b", 3, fail=True), name="b")
    c = asyncio.create_task(child("c", 5), name="c")
    d = asyncio.create_task(asyncio.sleep(10), name="d")
    done, pending = await asyncio.wait([a, b, c, d], return_when=asyncio.FIRST_COMPLETED)
    print("first_completed:", names(done), names(pending))
    done, pending = await asyncio.wait([a, b, c, d], return_when=asyncio.FIRST_EXCEPTION)
    print("first_exception:", names(done), names(pending))
    done, pending = await asyncio.wait([a, b, c, d], timeout=0)
    print("timeout 0:", names(done), names(pending))
    done, pending = await asyncio.wait([c, d], timeout=0.02)
    print("all_completed with a timeout:", names(done), names(pending), "d cancelled:", d.cancelled())
    print("b's exception:", repr(b.exception()))
    try:
        await asyncio.wait([])
    except ValueError:
        print("empty: ValueError")

    waiter = asyncio.create_task(asyncio.wait([d]))
    await asyncio.sleep(0)
    waiter.cancel()
    try:
        await waiter
    except asyncio.CancelledError:
        print("cancelled caller: CancelledError; d done:", d.done())
    d.cancel()
    done, pending = await asyncio.wait([d])
    print("all_completed:", names(done), names(pending), "d cancelled:", d.cancelled())


asyncio.run(main())

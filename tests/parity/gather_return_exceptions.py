# gather(..., return_exceptions=True): results in argument order, exceptions (a cancelled child
# included) as values; nothing propagates.
import asyncio


async def ok(v, steps):
    for _ in range(steps):
        await asyncio.sleep(0)
    print(f"ok({v}) returns")
    return v


async def fail(msg):
    await asyncio.sleep(0)
    print(f"fail({msg}) raises")
    raise ValueError(msg)


def show(r):
    if isinstance(r, asyncio.CancelledError):
        return "CancelledError"
    if isinstance(r, ValueError):
        return f"ValueError({r})"
    return repr(r)


async def main():
    victim = asyncio.create_task(asyncio.sleep(10))
    asyncio.get_running_loop().call_soon(victim.cancel)
    results = await asyncio.gather(ok(1, 3), fail("bad"), victim, ok(2, 0), return_exceptions=True)
    print("gather returned")
    for r in results:
        print(show(r))


asyncio.run(main())

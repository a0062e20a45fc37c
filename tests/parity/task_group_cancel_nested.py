# TaskGroup: an outside cancellation of the body cancels the children, waits for their cleanup,
# and leaves as CancelledError; a nested group's failure reaches the outer group as one more
# error (a group inside the group), and the outer group cancels its own children.
import asyncio


async def stubborn(name, cleanup_steps):
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        print(f"{name} cancelled, cleaning up")
        for _ in range(cleanup_steps):
            await asyncio.sleep(0)
        print(f"{name} cleanup done")
        raise


async def fail_after(name, steps):
    for _ in range(steps):
        await asyncio.sleep(0)
    print(f"{name} raises")
    raise ValueError(name)


def describe(eg, depth=0):
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            print("  " * depth + f"group of {len(e.exceptions)}")
            describe(e, depth + 1)
        else:
            print("  " * depth + f"ValueError({e})")


async def outside():
    async with asyncio.TaskGroup() as tg:
        tg.create_task(stubborn("x", 2))
        tg.create_task(stubborn("y", 0))
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            print("body cancelled")
            raise
    print("not reached")


async def nested():
    async with asyncio.TaskGroup() as outer:
        outer.create_task(stubborn("outer child", 1))
        async with asyncio.TaskGroup() as inner:
            inner.create_task(stubborn("inner child", 1))
            inner.create_task(fail_after("inner failing", 2))
            await asyncio.sleep(10)
        print("not reached")


async def main():
    t = asyncio.create_task(outside())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    print("cancelling the task")
    t.cancel()
    try:
        await t
    except asyncio.CancelledError:
        print("outside: CancelledError")
    print("task cancelled:", t.cancelled())
    try:
        await nested()
    except* ValueError as eg:
        print(f"nested: group of {len(eg.exceptions)}")
        describe(eg, 1)
    print("cancelling:", asyncio.current_task().cancelling())


asyncio.run(main())

# Cancelling a task that awaits another task (or a future) cancels the awaited one too; the
# message travels along.
import asyncio


async def leaf():
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError as e:
        print("leaf cancelled:", repr(e.args[0] if e.args else ""))
        raise


async def middle(t):
    try:
        await t
    except asyncio.CancelledError:
        print("middle cancelled")
        raise


async def main():
    loop = asyncio.get_running_loop()
    lt = asyncio.create_task(leaf())
    mt = asyncio.create_task(middle(lt))
    await asyncio.sleep(0)
    mt.cancel("from main")
    await asyncio.wait([mt])
    print("middle cancelled:", mt.cancelled(), "leaf cancelled:", lt.cancelled())
    fut = loop.create_future()
    ft = asyncio.create_task(middle(fut))
    await asyncio.sleep(0)
    ft.cancel()
    await asyncio.wait([ft])
    print("future cancelled:", fut.cancelled())


asyncio.run(main())

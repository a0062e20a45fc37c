# wait_for, cancelled from outside first; its deadline passes while the inner task is still
# handling that cancellation: the caller ends with CancelledError, never TimeoutError.
# The outcome is printed once both tasks are done, so the trace is the same whether wait_for
# returns before or after the inner task's cleanup (3.11 and 3.12 differ there).
import asyncio


async def slow(started):
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        print("inner: cancelled")
        started.set()
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.15
        while loop.time() < end:  # a cleanup that outlives the deadline and ignores more cancels
            try:
                await asyncio.sleep(end - loop.time())
            except asyncio.CancelledError:
                pass
        print("inner: cleanup done")
        raise


async def outer(inner, timeout):
    try:
        await asyncio.wait_for(inner, timeout)
        return "returned"
    except asyncio.TimeoutError:
        return "TimeoutError"
    except asyncio.CancelledError:
        return "CancelledError"


async def main():
    started = asyncio.Event()
    inner = asyncio.create_task(slow(started))
    t = asyncio.create_task(outer(inner, 0.05))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    print("outside cancel")
    t.cancel()
    result = await t
    await asyncio.wait([inner])
    print("caller:", result)
    print("inner cancelled:", inner.cancelled())


asyncio.run(main())

# wait_for times out first; while the inner task handles the timeout's cancellation, the
# caller is cancelled from outside: it ends with CancelledError, never TimeoutError.
# The outcome is printed once both tasks are done: asyncio 3.11 lets wait_for return before the
# inner task's cleanup ends, 3.12 (and this library) after; the printed trace is the same.
import asyncio


async def slow(started):
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        print("inner: cancelled")
        started.set()
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.15
        while loop.time() < end:  # a cleanup that ignores more cancels
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
    t = asyncio.create_task(outer(inner, 0.01))
    await started.wait()  # the deadline passed, the inner task is cleaning up
    print("outside cancel")
    t.cancel()
    result = await t
    await asyncio.wait([inner])
    print("caller:", result)
    print("inner cancelled:", inner.cancelled())


asyncio.run(main())

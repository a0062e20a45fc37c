# asyncio.timeout: a zero timeout expires at the first await; expired() before and after;
# reschedule() to later, to never, and to the past; nested scopes (inner deadline first, outer
# deadline first); an outside cancellation inside a scope stays a CancelledError.
import asyncio


async def main():
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(0) as cm:
            print("zero: body runs, expired", cm.expired())
            await asyncio.sleep(0)
            print("not reached")
    except TimeoutError:
        print("zero: TimeoutError, expired", cm.expired())
    async with asyncio.timeout(0) as cm:
        print("zero without an await: expired", cm.expired())
    print("zero without an await: no error, expired", cm.expired())

    async with asyncio.timeout(None) as cm:
        print("none: when is None", cm.when() is None)
        cm.reschedule(loop.time() + 0.001)
        cm.reschedule(None)
        await asyncio.sleep(0.01)
    print("rescheduled to never: expired", cm.expired())
    try:
        async with asyncio.timeout(10) as cm:
            cm.reschedule(loop.time() - 1)
            print("past: before the await")
            await asyncio.sleep(0)
            print("not reached")
    except TimeoutError:
        print("past: TimeoutError")
    try:
        cm.reschedule(None)
    except RuntimeError:
        print("reschedule after exit: RuntimeError")

    # Nested: the inner deadline first.
    try:
        async with asyncio.timeout(10) as outer:
            try:
                async with asyncio.timeout(0.001) as inner:
                    await asyncio.sleep(10)
            except TimeoutError:
                print("inner first: inner TimeoutError, inner expired", inner.expired(), "outer expired", outer.expired())
            await asyncio.sleep(0)
        print("inner first: outer scope left normally")
    except TimeoutError:
        print("not reached")
    # Nested: the outer deadline first; the inner scope sees a CancelledError.
    try:
        async with asyncio.timeout(0.001) as outer:
            try:
                async with asyncio.timeout(10) as inner:
                    await asyncio.sleep(10)
            except asyncio.CancelledError:
                print("outer first: inner sees CancelledError, inner expired", inner.expired())
                raise
    except TimeoutError:
        print("outer first: outer TimeoutError, outer expired", outer.expired())

    # An outside cancel() while in a scope that has not expired.
    async def guarded():
        async with asyncio.timeout(10):
            await asyncio.sleep(10)

    t = asyncio.create_task(guarded())
    await asyncio.sleep(0)
    t.cancel()
    try:
        await t
    except asyncio.CancelledError:
        print("outside cancel: CancelledError")
    print("cancelling:", asyncio.current_task().cancelling())


asyncio.run(main())

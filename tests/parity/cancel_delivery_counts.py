# cancelling() counts requests; two cancels before the task runs deliver one CancelledError;
# a task that catches it and uncancel()s can go on and await again; a later cancel is delivered.
import asyncio


async def stubborn():
    me = asyncio.current_task()
    for round in range(2):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            print(f"round {round}: caught, cancelling={me.cancelling()}")
            while me.uncancel() > 0:
                pass
            print(f"round {round}: after uncancel, cancelling={me.cancelling()}")
    return "finished"


async def main():
    t = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    t.cancel()
    t.cancel()
    print("after two cancels:", t.cancelling())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    t.cancel()
    print("third cancel:", t.cancelling())
    print("result:", await t)
    print("cancelled:", t.cancelled())


asyncio.run(main())

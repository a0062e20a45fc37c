# The message given to cancel() reaches the CancelledError inside the task and the awaiter.
import asyncio


async def sleeper():
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError as e:
        print("inside:", repr(e.args[0] if e.args else ""))
        raise


async def main():
    t = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    t.cancel("stop now")
    try:
        await t
    except asyncio.CancelledError as e:
        print("awaiter:", repr(e.args[0] if e.args else ""))
    print("cancelled:", t.cancelled())


asyncio.run(main())

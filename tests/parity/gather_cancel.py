# Cancelling what gather() returned cancels every child that is still running; awaiting it
# raises CancelledError; finished children keep their results.
import asyncio


async def child(name, steps):
    print(f"{name} starts")
    try:
        for _ in range(steps):
            await asyncio.sleep(0)
        print(f"{name} finishes")
        return name
    except asyncio.CancelledError:
        print(f"{name} cancelled")
        raise


async def main():
    quick = asyncio.create_task(child("quick", 0))
    slow = asyncio.create_task(child("slow", 100))
    g = asyncio.gather(quick, slow, child("coro", 100))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    print("cancel gather:", g.cancel())
    try:
        await g
    except asyncio.CancelledError:
        print("gather: CancelledError")
    print("quick:", quick.result(), "slow cancelled:", slow.cancelled())


asyncio.run(main())

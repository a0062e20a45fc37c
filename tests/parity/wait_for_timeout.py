# wait_for: the awaitable is cancelled on timeout, its cancellation lands (cleanup runs) before
# TimeoutError reaches the caller; a result in time is returned; a zero timeout on an unfinished
# task times out; an inner that swallows the cancellation has its value returned (3.12 rule).
import asyncio


async def slow(name, cleanup_steps=1):
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        print(f"{name}: cancelled, cleaning up")
        for _ in range(cleanup_steps):
            await asyncio.sleep(0)
        print(f"{name}: cleanup done")
        raise
    return "slow result"


async def quick():
    await asyncio.sleep(0)
    return "quick result"


async def main():
    print(await asyncio.wait_for(quick(), 1))
    try:
        await asyncio.wait_for(slow("inner", 2), 0.01)
    except asyncio.TimeoutError:
        print("caller: TimeoutError")
    t = asyncio.create_task(slow("task"))
    await asyncio.sleep(0)
    try:
        await asyncio.wait_for(t, 0)
    except asyncio.TimeoutError:
        print("caller: TimeoutError at zero timeout; task cancelled:", t.cancelled())


asyncio.run(main())

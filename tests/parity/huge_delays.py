# Delays far beyond any real wait: timers that never fire, sleeps that last until cancelled,
# wait_for that never times out; negative delays count as zero. Other timers are undisturbed.
import asyncio

HUGE = 1e300  # C++: duration::max(), hours::max()


async def main():
    loop = asyncio.get_running_loop()
    never = loop.call_later(HUGE, print, "never fires")
    loop.call_later(-5, print, "negative delay fires first")
    loop.call_later(0.01, print, "10 ms timer fires")
    sleeper = asyncio.create_task(asyncio.sleep(HUGE))
    await asyncio.sleep(0.02)
    print("sleeper done after 20 ms:", sleeper.done())
    sleeper.cancel()
    await asyncio.wait([sleeper])
    print("sleeper cancelled:", sleeper.cancelled())
    fut = loop.create_future()
    loop.call_later(0.01, fut.set_result, "value")
    print("wait_for with a huge timeout:", await asyncio.wait_for(fut, HUGE))
    await asyncio.sleep(-1)
    print("sleep(-1) returned")
    print("never-timer cancelled:", never.cancelled())
    never.cancel()


asyncio.run(main())

# One loop iteration runs the jobs that were ready before it, then the callbacks of the timers
# that came due: a deadline that passed while a task was blocking does not overtake jobs already
# queued. A task woken by a timer resumes after them; a call_later callback runs in the same
# iteration as the timer, after the ready jobs; wait_for's inner task takes its first step
# before a deadline that is already due cancels it.
import asyncio
import time


async def main():
    loop = asyncio.get_running_loop()

    async def sleeper():
        await asyncio.sleep(0.001)
        print("sleeper woke")

    s = asyncio.create_task(sleeper())
    await asyncio.sleep(0)  # the sleeper's timer is armed
    loop.call_later(0.001, lambda: print("call_later"))
    time.sleep(0.02)  # both deadlines pass while this step blocks
    loop.call_soon(lambda: print("soon 1"))

    async def step_a():
        print("task a step")

    a = asyncio.create_task(step_a())
    loop.call_soon(lambda: print("soon 2"))
    await asyncio.sleep(0)
    print("main after its yield")
    await s
    await a

    async def inner():
        print("inner started")
        await asyncio.sleep(10)
        print("not reached")

    t = asyncio.create_task(asyncio.wait_for(inner(), 0.001))
    await asyncio.sleep(0)  # wait_for creates the inner task and arms its deadline
    time.sleep(0.02)  # the deadline passes before the inner task's first step
    try:
        await t
    except TimeoutError:
        print("wait_for: TimeoutError")


asyncio.run(main())

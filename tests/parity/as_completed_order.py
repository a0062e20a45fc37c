# asyncio.as_completed: results in completion order (a failing child's element raises, the rest
# go on); with a timeout, the elements for children not done raise TimeoutError and the
# children are not cancelled.
import asyncio


async def child(name, steps, fail=False):
    for _ in range(steps):
        await asyncio.sleep(0)
    if fail:
        print(f"{name} raises")
        raise ValueError(name)
    print(f"{name} finishes")
    return name


async def main():
    tasks = [asyncio.create_task(child("a", 4)), asyncio.create_task(child("b", 1)),
             asyncio.create_task(child("c", 2, fail=True)), asyncio.create_task(child("d", 3))]
    for nxt in asyncio.as_completed(tasks):
        try:
            print("got", await nxt)
        except ValueError as e:
            print(f"got ValueError({e})")
    slow = asyncio.create_task(asyncio.sleep(10, "slow"))
    quick = asyncio.create_task(child("quick", 1))
    for nxt in asyncio.as_completed([slow, quick], timeout=0.02):
        try:
            print("got", await nxt)
        except TimeoutError:
            print("got TimeoutError; slow cancelled:", slow.cancelled())
    print("slow done:", slow.done())
    for nxt in asyncio.as_completed([slow], timeout=0):
        try:
            print("got", await nxt)
        except TimeoutError:
            print("timeout 0: TimeoutError")
    slow.cancel()
    count = 0
    for nxt in asyncio.as_completed([]):
        count += 1
    print("empty:", count, "elements")


asyncio.run(main())

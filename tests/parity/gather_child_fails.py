# gather without return_exceptions: the first failure propagates at once; the other children
# are not cancelled and run to their end.
import asyncio


async def child(name, steps, fail=False):
    try:
        for _ in range(steps):
            await asyncio.sleep(0)
        if fail:
            print(f"{name} raises")
            raise ValueError(name)
        print(f"{name} finishes")
        return name
    except asyncio.CancelledError:
        print(f"{name} cancelled")
        raise


async def main():
    a = asyncio.create_task(child("a", 3))
    b = asyncio.create_task(child("b", 1, fail=True))
    try:
        await asyncio.gather(a, b, child("c", 4))
    except ValueError as e:
        print(f"gather raised ValueError({e})")
    print("a done:", a.done(), "b done:", b.done())
    for _ in range(6):
        await asyncio.sleep(0)
    print("a:", a.result(), "cancelled:", a.cancelled())


asyncio.run(main())

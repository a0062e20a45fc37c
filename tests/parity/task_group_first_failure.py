# TaskGroup: the first failing child cancels its siblings and the body; the children that fail
# in the same step are all collected, in the order they failed; a child done before stays done.
import asyncio


async def child(name, steps, fail=False):
    try:
        for _ in range(steps):
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        print(f"{name} cancelled")
        raise
    if fail:
        print(f"{name} raises")
        raise ValueError(name)
    print(f"{name} finishes")
    return name


async def main():
    try:
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(child("a", 5))
            tg.create_task(child("b", 2, fail=True))
            tg.create_task(child("c", 2, fail=True))
            d = tg.create_task(child("d", 0))
            try:
                for i in range(10):
                    await asyncio.sleep(0)
                    print(f"body step {i}")
            except asyncio.CancelledError:
                print("body cancelled")
                raise
    except* ValueError as eg:
        print("group of", len(eg.exceptions), [str(e) for e in eg.exceptions])
    print("a cancelled:", a.cancelled(), "d:", d.result())
    print("cancelling:", asyncio.current_task().cancelling())
    # The body fails: the children are cancelled, the body's error joins the group.
    try:
        async with asyncio.TaskGroup() as tg:
            e = tg.create_task(child("e", 5))
            await asyncio.sleep(0)
            print("body raises")
            raise ValueError("body")
    except* ValueError as eg:
        print("group of", len(eg.exceptions), [str(x) for x in eg.exceptions])
    print("e cancelled:", e.cancelled())
    # create_task once the group is shutting down, and after it is done.
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(child("f", 0, fail=True))
            try:
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                late = child("g", 0)
                try:
                    tg.create_task(late)
                except RuntimeError:
                    print("create_task while shutting down: RuntimeError")
                    late.close()
                raise
    except* ValueError as eg:
        print("group of", len(eg.exceptions), [str(x) for x in eg.exceptions])
    late = child("h", 0)
    try:
        tg.create_task(late)
    except RuntimeError:
        print("create_task after exit: RuntimeError")
        late.close()


asyncio.run(main())

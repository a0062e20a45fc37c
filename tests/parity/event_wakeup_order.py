# event.set() wakes every waiter in the order they began to wait; waiters arriving after set()
# pass at once; clear() makes new waiters wait again.
import asyncio


async def waiter(ev, name):
    print(f"{name} waits")
    await ev.wait()
    print(f"{name} woken")


async def main():
    ev = asyncio.Event()
    tasks = [asyncio.create_task(waiter(ev, n)) for n in ("a", "b", "c")]
    await asyncio.sleep(0)
    print("set")
    ev.set()
    late = asyncio.create_task(waiter(ev, "late"))
    await asyncio.gather(*tasks, late)
    ev.clear()
    again = asyncio.create_task(waiter(ev, "after clear"))
    await asyncio.sleep(0)
    print("is_set:", ev.is_set(), "waiting:", not again.done())
    ev.set()
    await again


asyncio.run(main())

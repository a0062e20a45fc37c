# aclose(): a generator suspended at a yield gets GeneratorExit there and runs its finally block,
# awaits included (C++: catch generator_exit, await after the handler, rethrow); an unstarted
# one is closed without running; a finished one is left alone; one that yields again makes
# aclose() raise RuntimeError and stays suspended.
import asyncio


async def gen(name):
    try:
        for i in range(10):
            yield i
    finally:
        print(name, "finally: cleanup starts")
        await asyncio.sleep(0)
        print(name, "finally: cleanup done")


async def other():
    for i in range(3):
        print("other", i)
        await asyncio.sleep(0)


async def stubborn():
    try:
        yield 1
    except GeneratorExit:
        print("stubborn: ignores GeneratorExit")
    yield 2
    print("stubborn: end")


async def next_or_stop(g, label):
    try:
        print(label, await anext(g))
    except StopAsyncIteration:
        print(label, "StopAsyncIteration")


async def main():
    t = asyncio.create_task(other())
    g1 = gen("g1")
    await next_or_stop(g1, "g1 next:")
    await next_or_stop(g1, "g1 next:")
    print("g1 aclose")
    await g1.aclose()
    print("g1 closed")
    await next_or_stop(g1, "g1 next:")
    await g1.aclose()
    print("g1 closed again")

    g2 = gen("g2")
    await g2.aclose()
    print("g2 (unstarted) closed")
    await next_or_stop(g2, "g2 next:")

    g3 = gen("g3")
    async for v in g3:
        if v == 1:
            break
    print("g3 left the loop at 1")
    await g3.aclose()
    print("g3 closed")

    s = stubborn()
    await next_or_stop(s, "stubborn next:")
    try:
        await s.aclose()
    except RuntimeError:
        print("stubborn aclose: RuntimeError")
    await next_or_stop(s, "stubborn next:")
    await t


asyncio.run(main())

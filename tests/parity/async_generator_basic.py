# Async generators: yields interleaved with awaits (here sleep(0), which lets another task run),
# `async for` to the end, then anext() at the end: StopAsyncIteration (C++: std::nullopt).
import asyncio


async def numbers(n):
    for i in range(n):
        print("gen: before sleep", i)
        await asyncio.sleep(0)
        print("gen: yield", i)
        yield i
    print("gen: end")


async def other():
    for i in range(4):
        print("other", i)
        await asyncio.sleep(0)


async def main():
    t = asyncio.create_task(other())
    g = numbers(3)
    async for v in g:
        print("main got", v)
    for _ in range(2):
        try:
            await anext(g)
        except StopAsyncIteration:
            print("main: StopAsyncIteration")
    # A generator that ends before its first yield.
    empty = numbers(0)
    async for v in empty:
        print("never", v)
    print("empty generator done")
    await t


asyncio.run(main())

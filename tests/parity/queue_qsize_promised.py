# qsize() right after put_nowait() wakes a waiting getter: asyncio still counts the item until
# the getter runs; this library no longer counts an item promised to a woken getter.
import asyncio


async def main():
    q = asyncio.Queue()
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait("x")
    print("qsize after put:", q.qsize(), "empty:", q.empty())
    print("got:", await getter)
    print("qsize after get:", q.qsize())


asyncio.run(main())

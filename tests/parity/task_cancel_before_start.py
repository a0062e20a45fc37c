# A task cancelled before it starts never runs its body; it ends cancelled; cancelling() counts.
import asyncio


async def body():
    print("body runs (must not happen)")


async def main():
    t = asyncio.create_task(body())
    print("cancel:", t.cancel())
    print("cancelling:", t.cancelling())
    try:
        await t
    except asyncio.CancelledError:
        print("awaiting it: CancelledError")
    print("cancelled:", t.cancelled(), "done:", t.done())
    print("cancel again:", t.cancel())


asyncio.run(main())

# call_soon callbacks run FIFO on a later iteration; one scheduled from a callback runs after
# the whole current batch; a cancelled handle never runs.
import asyncio

loop = asyncio.new_event_loop()


def cb(name):
    print(name)
    if name == "b":
        loop.call_soon(cb, "d (scheduled by b)")
    if name == "d (scheduled by b)":
        loop.stop()


loop.call_soon(cb, "a")
h = loop.call_soon(cb, "x")
loop.call_soon(cb, "b")
loop.call_soon(cb, "c")
h.cancel()
print("scheduled")
loop.run_forever()
print("cancelled handle:", h.cancelled())
loop.close()

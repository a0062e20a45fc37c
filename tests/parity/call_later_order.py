# Timers fire in deadline order, ties in scheduling order; call_at and call_later share one
# clock; a cancelled timer never fires; a negative delay counts as zero.
import asyncio

loop = asyncio.new_event_loop()
now = loop.time()
loop.call_at(now + 0.03, print, "call_at +30ms")
loop.call_later(0.01, print, "later 10ms")
h = loop.call_later(0.02, print, "cancelled")
loop.call_later(0.02, print, "later 20ms (first)")
loop.call_later(0.02, print, "later 20ms (second)")
loop.call_later(-1, print, "negative delay")
loop.call_soon(print, "soon")
loop.call_later(0.04, loop.stop)
h.cancel()
loop.run_forever()
print("cancelled:", h.cancelled())
loop.close()

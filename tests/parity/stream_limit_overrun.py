# A reader with limit 8: readuntil past the limit raises LimitOverrunError (consumed) and keeps
# the data; readline drops the long line (ValueError) and the next line reads; without any
# separator the overrun leaves everything buffered for read().
import asyncio
import socket


async def main():
    a, b = socket.socketpair()
    r, w = await asyncio.open_connection(sock=a, limit=8)
    pr, pw = await asyncio.open_connection(sock=b)
    pw.write(b"0123456789AB\nshort\n")
    await pw.drain()
    await asyncio.sleep(0.01)
    try:
        await r.readuntil(b"\n")
    except asyncio.LimitOverrunError as e:
        print(f"readuntil: LimitOverrunError({e}) consumed={e.consumed}")
    try:
        await r.readexactly(3)
        print("the data stayed: readexactly(3) works")
    except Exception as e:
        print("lost", e)
    try:
        await r.readline()
    except ValueError as e:
        print(f"readline: ValueError({e})")
    print("next line:", (await r.readline()).decode().strip())
    pw.write(b"xxxxxxxxxxxx")
    await pw.drain()
    await asyncio.sleep(0.01)
    try:
        await r.readuntil(b"\n")
    except asyncio.LimitOverrunError as e:
        print(f"readuntil: LimitOverrunError({e}) consumed={e.consumed}")
    print("what remains:", (await r.read(100)).decode())
    pw.write(b"yyyyyyyyyyyy")
    await pw.drain()
    await asyncio.sleep(0.01)
    try:
        await r.readline()
    except ValueError as e:
        print(f"readline without a separator: ValueError({e})")
    pw.write(b"z\n")
    await pw.drain()
    print("after the dropped chunk:", (await r.readline()).decode().strip())
    w.close()
    pw.close()
    await w.wait_closed()
    await pw.wait_closed()
    print("done")


asyncio.run(main())

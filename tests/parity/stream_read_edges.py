# stream reader edge cases over a socket pair: a separator split across two sends, partial data
# then EOF under readexactly (IncompleteReadError.partial and .expected) and readuntil, at_eof,
# and reads after EOF.
import asyncio
import socket


async def main():
    a, b = socket.socketpair()
    r, w = await asyncio.open_connection(sock=a)
    pr, pw = await asyncio.open_connection(sock=b)
    pw.write(b"ab\r")
    await pw.drain()
    reading = asyncio.create_task(r.readuntil(b"\r\n"))
    await asyncio.sleep(0.01)
    print("readuntil waits for the rest of the separator:", not reading.done())
    pw.write(b"\nrest")
    await pw.drain()
    print("readuntil:", (await reading).decode().replace("\r\n", "<CRLF>"))
    print("read(2):", (await r.read(2)).decode())
    pw.write(b"abc")
    await pw.drain()
    pw.write_eof()
    try:
        await r.readexactly(10)
    except asyncio.IncompleteReadError as e:
        print(f"readexactly(10): IncompleteReadError partial={e.partial.decode()} expected={e.expected}")
    print("at_eof:", r.at_eof())
    print("read():", repr((await r.read()).decode()))
    print("readline():", repr((await r.readline()).decode()))
    print("readexactly(0):", repr((await r.readexactly(0)).decode()))
    try:
        await r.readexactly(1)
    except asyncio.IncompleteReadError as e:
        print(f"readexactly(1): IncompleteReadError partial={e.partial.decode()!r} expected={e.expected}")
    # readuntil at EOF without the separator: everything goes out in partial, expected is None.
    w.write(b"no separator")
    await w.drain()
    w.write_eof()
    try:
        await pr.readuntil(b"!")
    except asyncio.IncompleteReadError as e:
        print(f"readuntil at EOF: IncompleteReadError partial={e.partial.decode()} expected={e.expected}")
    print("peer at_eof:", pr.at_eof())
    w.close()
    pw.close()
    await w.wait_closed()
    await pw.wait_closed()
    print("done")


asyncio.run(main())

"""Python peers: asyncio and uvloop, written as their documentation shows.

Run with the system interpreter (/usr/bin/python3, where python3-uvloop is installed):
    /usr/bin/python3 bench_py.py asyncio|uvloop W1|W2|W3|W4|W4S|W5|W6|W7|W8|M1 N
Prints one JSON line, like the C++ programs.
"""
import asyncio
import json
import socket
import sys
import time

CLIENTS = 32
MESSAGE = 64


def report(workload, impl, n, per_op_ns, extra=None, note=""):
    print(json.dumps({"workload": workload, "impl": impl, "n": n, "per_op_ns": per_op_ns,
                      "allocs_per_op": None, "extra": extra or {}, "note": note}), flush=True)


def resident_bytes():
    import resource
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def timer_delays_us(n):
    """The LCG of bench_common.hpp: x = x * 1664525 + 1013904223 mod 2^32, seed 42."""
    x, out = 42, []
    for _ in range(n):
        x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        out.append((x >> 8) % 50001)
    return out


async def index_of(i):
    return i


async def w1(n):
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(index_of(i)) for i in range(n)]
    total = 0
    for t in tasks:
        total += await t
    t1 = time.perf_counter()
    assert total == n * (n - 1) // 2
    return (t1 - t0) * 1e9 / n, {}, ""


async def w2(n):
    cond = asyncio.Condition()
    turn = [0]

    async def side(me):
        for _ in range(n):
            async with cond:
                await cond.wait_for(lambda: turn[0] == me)
                turn[0] = 1 - me
                cond.notify()

    t0 = time.perf_counter()
    await asyncio.gather(side(0), side(1))
    t1 = time.perf_counter()
    return (t1 - t0) * 1e9 / n, {}, "asyncio.Condition, wait_for + notify"


async def w3(n):
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    for _ in range(n):
        await asyncio.sleep(0)
    t1 = time.perf_counter()
    return (t1 - t0) * 1e9 / n, {}, ""


async def w4(rounds):
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    addr = listener.getsockname()

    async def echo(conn):
        buf = bytearray(4096)
        view = memoryview(buf)
        while True:
            n = await loop.sock_recv_into(conn, buf)
            if n == 0:
                break
            await loop.sock_sendall(conn, view[:n])
        conn.close()

    async def serve():
        sessions = []
        for _ in range(CLIENTS):
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sessions.append(asyncio.create_task(echo(conn)))
        await asyncio.gather(*sessions)

    async def client():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(s, addr)
        out = b"x" * MESSAGE
        buf = bytearray(MESSAGE)
        view = memoryview(buf)
        for _ in range(rounds):
            await loop.sock_sendall(s, out)
            got = 0
            while got < MESSAGE:
                n = await loop.sock_recv_into(s, view[got:])
                if n == 0:
                    raise RuntimeError("server closed early")
                got += n
        s.close()

    t0 = time.perf_counter()
    server = asyncio.create_task(serve())
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    await server
    t1 = time.perf_counter()
    listener.close()
    msgs = CLIENTS * rounds
    return (t1 - t0) * 1e9 / msgs, {"msgs_per_s": msgs / (t1 - t0)}, "loop.sock_* on non-blocking sockets"


async def w4s(rounds):
    """W4 written with asyncio streams, as their documentation shows."""
    async def echo(reader, writer):
        while True:
            try:
                msg = await reader.readexactly(MESSAGE)
            except asyncio.IncompleteReadError:
                break
            writer.write(msg)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out = b"x" * MESSAGE
        for _ in range(rounds):
            writer.write(out)
            await writer.drain()
            await reader.readexactly(MESSAGE)
        writer.close()
        await writer.wait_closed()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    server.close()
    await server.wait_closed()
    t1 = time.perf_counter()
    msgs = CLIENTS * rounds
    return (t1 - t0) * 1e9 / msgs, {"msgs_per_s": msgs / (t1 - t0)}, "asyncio streams (start_server, open_connection)"


def trivial(x):
    return x + 1


async def w5(n):
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, trivial, 0)
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        total += await loop.run_in_executor(None, trivial, i & 1)
    t1 = time.perf_counter()
    assert total == n + n // 2
    return (t1 - t0) * 1e9 / n, {}, "run_in_executor(None, fn): default ThreadPoolExecutor"


async def w6(n):
    delays = timer_delays_us(n)
    last = max(delays)
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(asyncio.sleep(d / 1e6)) for d in delays]
    for t in tasks:
        await t
    t1 = time.perf_counter()
    return (t1 - t0) * 1e9 / n, {"overshoot_ms": ((t1 - t0) - last / 1e6) * 1e3}, ""


async def count_up(n):
    for i in range(n):
        yield i


async def w8(n):
    t0 = time.perf_counter()
    total = 0
    async for v in count_up(n):
        total += v
    t1 = time.perf_counter()
    assert total == n * (n - 1) // 2
    return (t1 - t0) * 1e9 / n, {}, "async for over an async generator"


async def m1(n):
    gate = asyncio.Event()
    await asyncio.sleep(0)
    before = resident_bytes()
    tasks = [asyncio.create_task(gate.wait()) for _ in range(n)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    after = resident_bytes()
    gate.set()
    await asyncio.gather(*tasks)
    return (after - before) / n, {}, "tasks blocked on asyncio.Event"


async def yield_once():
    await asyncio.sleep(0)


async def w7(n):
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(yield_once())
    t1 = time.perf_counter()
    return (t1 - t0) * 1e9 / n, {}, ""


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W4S": w4s, "W5": w5, "W6": w6, "W7": w7, "W8": w8, "M1": m1}


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("asyncio", "uvloop") or sys.argv[2] not in WORKLOADS:
        sys.exit(__doc__)
    impl, workload, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if impl == "uvloop":
        import uvloop
        uvloop.install()
    per_op, extra, note = asyncio.run(WORKLOADS[workload](n))
    report(workload, impl, n, per_op, extra, note)


if __name__ == "__main__":
    main()

# Exceptions and cancellation travel through anext(): a generator that raises hands the exception
# to the consumer and is finished afterwards (StopAsyncIteration); cancelling the consumer while
# the generator sleeps raises CancelledError inside the generator (its finally block runs) and
# in the consumer; anext() while another anext() of the same generator is running is refused
# (Python: RuntimeError, C++: invalid_state_error; the trace prints "already running").
import asyncio


async def fails_after(n):
    for i in range(n):
        yield i
    raise ValueError("generator failed")


async def sleeper():
    try:
        print("sleeper: sleeps")
        await asyncio.sleep(3600)
        yield 1
    except asyncio.CancelledError:
        print("sleeper: CancelledError")
        raise
    finally:
        print("sleeper: finally")


async def pull(g, label):
    try:
        print(label, await anext(g))
    except StopAsyncIteration:
        print(label, "StopAsyncIteration")
    except ValueError as e:
        print(label, "ValueError:", e)
    except RuntimeError as e:
        print(label, "already running" if "already running" in str(e) else "RuntimeError")
    except asyncio.CancelledError:
        print(label, "CancelledError")
        raise


async def main():
    g = fails_after(2)
    for _ in range(4):
        await pull(g, "fails_after:")

    s = sleeper()
    consumer = asyncio.create_task(pull(s, "consumer:"))
    await asyncio.sleep(0)
    await pull(s, "second anext:")
    print("cancel consumer:", consumer.cancel())
    try:
        await consumer
    except asyncio.CancelledError:
        print("main: consumer cancelled")
    await pull(s, "after cancel:")


asyncio.run(main())

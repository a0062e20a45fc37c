// async_utils: Python's codestare.async_utils and the asyncio it stands on, for C++20.
// This root file lists the parts in dependency order; amalgamate.py inlines them into the
// single header at the repository root.
#pragma once

// Platform: configuration, errors, logging, the I/O backends.
#include "platform/config.hpp"
#include "platform/errors.hpp"
#include "platform/log.hpp"
#include "platform/posix.hpp"
#include "platform/backend_epoll.hpp"
#include "platform/backend_io_uring.hpp"
#include "platform/backend_kqueue.hpp"
#include "platform/backend_poll.hpp"
#include "platform/backend.hpp"
#include "platform/signal_source.hpp"
#include "platform/thread_pool.hpp"

// Runtime: the event loop, futures, coroutines, tasks and the asyncio helpers.
#include "runtime/test_support.hpp"
#include "runtime/exception_group.hpp"
#include "runtime/intrusive_list.hpp"
#include "runtime/frame_cache.hpp"
#include "runtime/job_queue.hpp"
#include "runtime/timer_heap.hpp"
#include "runtime/future_core.hpp"
#include "runtime/any_task.hpp"
#include "runtime/handle.hpp"
#include "runtime/event_loop.hpp"
#include "runtime/task_steps.hpp"
#include "runtime/awaitable.hpp"
#include "runtime/future.hpp"
#include "runtime/coroutine.hpp"
#include "runtime/sleep.hpp"
#include "runtime/completion.hpp"
#include "runtime/task.hpp"
#include "runtime/wait_for.hpp"
#include "runtime/gather.hpp"
#include "runtime/shield.hpp"
#include "runtime/wait.hpp"
#include "runtime/as_completed.hpp"
#include "runtime/io.hpp"
#include "runtime/executor.hpp"
#include "runtime/run.hpp"
#include "runtime/async_generator.hpp"
#include "runtime/signals.hpp"

// Primitives: asyncio's locks, conditions, events, semaphores and queues.
#include "primitives/waiter.hpp"
#include "primitives/lock.hpp"
#include "primitives/condition.hpp"
#include "primitives/event.hpp"
#include "primitives/semaphore.hpp"
#include "primitives/queue.hpp"

// Utilities: the codestare.async_utils classes.
#include "utilities/awaitable_predicate.hpp"
#include "utilities/accessor.hpp"
#include "utilities/condition_property.hpp"
#include "utilities/registry.hpp"
#include "utilities/async_exit_stack.hpp"
#include "utilities/timeout.hpp"
#include "utilities/task_group.hpp"
#include "utilities/async_exit_on_exc.hpp"
#include "utilities/coroutine_wrapper.hpp"
#include "utilities/make_async.hpp"
#include "utilities/task_nursery.hpp"
#include "utilities/shutdown.hpp"
#include "utilities/streams.hpp"
#include "utilities/composition.hpp"

// The end of the library's code: the implementation TU's warnings come back for what follows
// (config.hpp turned -Wsubobject-linkage off for the library's coroutine frames).
#if defined(ASYNC_UTILS_IMPLEMENTATION) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

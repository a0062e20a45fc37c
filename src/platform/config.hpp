// Version, backend selection and the hook that turns the embedded tests on.
#pragma once

#define ASYNC_UTILS_VERSION_MAJOR 0
#define ASYNC_UTILS_VERSION_MINOR 1
#define ASYNC_UTILS_VERSION_PATCH 0
#define ASYNC_UTILS_VERSION "0.1.0"

// Backend: forced by the user with ASYNC_UTILS_BACKEND_{EPOLL,IO_URING,KQUEUE,POLL}, else the
// best the platform has. Exactly one of them ends up defined, except that io_uring also defines
// the epoll one: it falls back to epoll when the kernel refuses io_uring, and shares signalfd.
#if (defined(ASYNC_UTILS_BACKEND_EPOLL) + defined(ASYNC_UTILS_BACKEND_IO_URING) + \
     defined(ASYNC_UTILS_BACKEND_KQUEUE) + defined(ASYNC_UTILS_BACKEND_POLL)) > 1
#error "async_utils: define at most one of ASYNC_UTILS_BACKEND_EPOLL, _IO_URING, _KQUEUE, _POLL"
#endif
#if defined(ASYNC_UTILS_BACKEND_IO_URING)
#if !defined(__linux__)
#error "async_utils: ASYNC_UTILS_BACKEND_IO_URING needs Linux"
#endif
#define ASYNC_UTILS_BACKEND_EPOLL
#endif
#if !defined(ASYNC_UTILS_BACKEND_EPOLL) && !defined(ASYNC_UTILS_BACKEND_KQUEUE) && \
    !defined(ASYNC_UTILS_BACKEND_POLL)
#if defined(__linux__)
#define ASYNC_UTILS_BACKEND_EPOLL
#elif defined(__APPLE__) || defined(__FreeBSD__) || defined(__OpenBSD__) || defined(__NetBSD__) || \
    defined(__DragonFly__)
#define ASYNC_UTILS_BACKEND_KQUEUE
#else
#define ASYNC_UTILS_BACKEND_POLL
#endif
#endif

#if !defined(__unix__) && !defined(__APPLE__)
#error "async_utils needs a POSIX system (Linux, macOS or a BSD)"
#endif

#if __cplusplus < 202002L
#error "async_utils needs C++20 (-std=c++20)"
#endif

// g++ warns (-Wsubobject-linkage, on by default) when the frame of a coroutine template defined
// in a header stores a type without linkage, such as the type of a lambda in the user's .cpp
// file. Harmless there, so the templates that store user awaitables in their frames say so.
#if defined(__GNUC__) && !defined(__clang__)
#define ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wsubobject-linkage\"")
#define ASYNC_UTILS_USER_TYPES_IN_FRAMES_END _Pragma("GCC diagnostic pop")
#else
#define ASYNC_UTILS_USER_TYPES_IN_FRAMES_BEGIN
#define ASYNC_UTILS_USER_TYPES_IN_FRAMES_END
#endif

// Separate compilation (opt-in, README "Faster builds"): with ASYNC_UTILS_SPLIT defined in every
// TU, the non-template functions marked ASYNC_UTILS_LINK are only declared; the one TU that also
// defines ASYNC_UTILS_IMPLEMENTATION compiles their definitions, as ordinary (non-inline)
// functions: a program without that TU fails to link, one with two such TUs too. Without either
// macro everything stays inline, as before. ASYNC_UTILS_DEFINITIONS is 1 where the definitions are
// compiled (the default drop-in mode and the implementation TU).
#if defined(ASYNC_UTILS_IMPLEMENTATION) || defined(ASYNC_UTILS_SPLIT)
#define ASYNC_UTILS_LINK
#else
#define ASYNC_UTILS_LINK inline
#endif
#if defined(ASYNC_UTILS_IMPLEMENTATION) || !defined(ASYNC_UTILS_SPLIT)
#define ASYNC_UTILS_DEFINITIONS 1
#else
#define ASYNC_UTILS_DEFINITIONS 0
#endif
// g++ warns (-Wsubobject-linkage) about coroutine frames of non-inline functions that hold a
// lambda; the implementation TU is their only home, so the warning is off there, for the
// library's code only: the root file (src/async_utils.hpp) pops it after its last part.
#if defined(ASYNC_UTILS_IMPLEMENTATION) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsubobject-linkage"
#endif

// Embedded tests: ASYNC_UTILS_TESTS compiles the doctest TEST_CASEs that sit beside the code,
// ASYNC_UTILS_TESTS_MAIN also supplies doctest's main(). Without either, doctest is never named.
#if defined(ASYNC_UTILS_TESTS_MAIN) && !defined(ASYNC_UTILS_TESTS)
#define ASYNC_UTILS_TESTS
#endif
#ifdef ASYNC_UTILS_TESTS
#ifdef ASYNC_UTILS_TESTS_MAIN
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#endif
#include <doctest/doctest.h>
#endif

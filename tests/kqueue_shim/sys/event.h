/* Declarations-only stand-in for <sys/event.h>, written from the kqueue(2) manual, so that the
 * kqueue backend can be compiled (-fsyntax-only) on Linux. Nothing here is ever linked or run;
 * constant values follow macOS and FreeBSD where they agree. */
#ifndef ASYNC_UTILS_KQUEUE_SHIM_SYS_EVENT_H
#define ASYNC_UTILS_KQUEUE_SHIM_SYS_EVENT_H

#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#define EVFILT_READ (-1)
#define EVFILT_WRITE (-2)
#define EVFILT_AIO (-3)
#define EVFILT_VNODE (-4)
#define EVFILT_PROC (-5)
#define EVFILT_SIGNAL (-6)
#define EVFILT_TIMER (-7)
#define EVFILT_USER (-10)

/* Actions and flags. */
#define EV_ADD 0x0001
#define EV_DELETE 0x0002
#define EV_ENABLE 0x0004
#define EV_DISABLE 0x0008
#define EV_ONESHOT 0x0010
#define EV_CLEAR 0x0020
#define EV_RECEIPT 0x0040
#define EV_DISPATCH 0x0080
/* Returned values. */
#define EV_ERROR 0x4000
#define EV_EOF 0x8000

/* EVFILT_USER fflags. */
#define NOTE_FFNOP 0x00000000
#define NOTE_FFAND 0x40000000
#define NOTE_FFOR 0x80000000
#define NOTE_FFCOPY 0xc0000000
#define NOTE_FFCTRLMASK 0xc0000000
#define NOTE_FFLAGSMASK 0x00ffffff
#define NOTE_TRIGGER 0x01000000

/* EVFILT_TIMER fflags (data is in milliseconds when none is given). */
#define NOTE_SECONDS 0x00000001
#define NOTE_USECONDS 0x00000004
#define NOTE_NSECONDS 0x00000008

struct kevent {
  uintptr_t ident; /* identifier of the event source, usually a descriptor */
  int16_t filter;  /* EVFILT_* */
  uint16_t flags;  /* EV_* */
  uint32_t fflags; /* filter-specific flags (NOTE_*) */
  intptr_t data;   /* filter-specific data */
  void *udata;     /* opaque user data, returned unchanged */
};

#define EV_SET(kevp, a, b, c, d, e, f) \
  do {                                 \
    struct kevent *ev_set_p_ = (kevp); \
    ev_set_p_->ident = (a);            \
    ev_set_p_->filter = (b);           \
    ev_set_p_->flags = (c);            \
    ev_set_p_->fflags = (d);           \
    ev_set_p_->data = (e);             \
    ev_set_p_->udata = (f);            \
  } while (0)

#ifdef __cplusplus
extern "C" {
#endif

int kqueue(void);
int kevent(int kq, const struct kevent *changelist, int nchanges, struct kevent *eventlist,
           int nevents, const struct timespec *timeout);

#ifdef __cplusplus
}
#endif

#endif /* ASYNC_UTILS_KQUEUE_SHIM_SYS_EVENT_H */

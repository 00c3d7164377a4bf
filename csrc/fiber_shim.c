/*
 * tokioloop fiber shim: the per-thread interpreter state that must follow a
 * fiber (a stackful coroutine, see src/fiber/mod.rs) when the OS thread
 * switches from one C stack to another.
 *
 * CPython keeps "where the interpreter is" in the PyThreadState: the frame
 * chain, the frame data stack (3.11+), the recursion counters, the exception
 * being handled, the trashcan state. A fiber owns its own copy of all of
 * these. `tlf_switch_in()` moves the resumer's values out of the thread
 * state into a block on the resumer's stack and installs the fiber's;
 * `tlf_switch_out()` does the reverse. Both run on the resumer's side (see
 * core.rs), never with a Python error set.
 *
 * The exception being handled is kept apart: CPython's slots form a chain
 * (generators link theirs on top of their resumer's), so a fiber's slots are
 * put on top of the resumer's instead of swapped with them (tlf_switch_in).
 *
 * The contextvars Context is the exception: a fiber runs in the Context of
 * whoever resumes it (like a coroutine, which runs in its awaiter's
 * Context), so a task and the synchronous code it runs on a fiber share one
 * Context object. Only a fiber that suspends inside `Context.run()` of
 * another Context keeps that one (in its block) until it is resumed.
 *
 * Everything touched here is declared in Include/cpython/pystate.h for
 * 3.10-3.13, so no Py_BUILD_CORE is needed. The layout of PyThreadState
 * differs per version, per debug build and per free-threaded build, which is
 * why this is C compiled against the target interpreter's headers rather than
 * hand-written Rust mirrors.
 *
 * Functions here make no Python API calls that could run arbitrary code
 * (allocation -> GC -> __del__ -> a switch) except where noted
 * (tlf_state_finish, tlf_state_top_frame, tlf_context_ensure), and those are
 * only called with a consistent thread state installed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if PY_VERSION_HEX < 0x030A0000
#  error "tokioloop fibers need CPython 3.10 or newer"
#endif
#if PY_VERSION_HEX >= 0x030E0000
#  error "tokioloop fibers: CPython 3.14+ is not supported yet. 3.14 checks the C stack pointer against per-thread bounds (_PyThreadStateImpl.c_stack_soft_limit/hard_limit, or PyUnstable_ThreadState_SetStackProtection) that must be swapped per fiber; see src/fiber/mod.rs."
#endif
#ifdef Py_GIL_DISABLED
#  error "tokioloop fibers: free-threaded CPython builds are not supported yet (per-fiber critical sections and GC visits of suspended frames' deferred references are missing); see src/fiber/mod.rs."
#endif

#define TLF_310 (PY_VERSION_HEX < 0x030B0000)
#define TLF_311 (PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000)
#define TLF_311P (PY_VERSION_HEX >= 0x030B0000)
#define TLF_312P (PY_VERSION_HEX >= 0x030C0000)
#define TLF_313P (PY_VERSION_HEX >= 0x030D0000)
/* 3.10-3.12 keep a linked list of C frames ("CFrame") rooted in the thread
   state; 3.13 removed it. */
#define TLF_CFRAME (!TLF_313P)
/* 3.10/3.11 keep the tracing on/off flag in the innermost CFrame. */
#define TLF_CFRAME_TRACING (TLF_310 || TLF_311)

#if TLF_310
typedef CFrame tlf_cframe;
#elif TLF_CFRAME
typedef _PyCFrame tlf_cframe;
#endif

#if TLF_312P && !TLF_313P && !defined(Py_C_RECURSION_LIMIT)
#  define Py_C_RECURSION_LIMIT C_RECURSION_LIMIT
#endif

typedef struct tlf_state {
    /* contextvars. Fiber blocks: NULL (runs in its resumer's Context) or the
       Context it was suspended in, if that differed from its resumer's
       (strong reference). Resumer blocks: the resumer's Context, borrowed
       (context_owned == 0) or owned (1). */
    PyObject *context;
    int context_owned;
    /* sys.exc_info(). Fiber blocks: `exc_state` is the fiber's own bottom
       exception slot (strong references; it lives in this heap block, so
       slots of generators resumed on the fiber can point at it) and
       `exc_info` the fiber's innermost slot while it is switched out (its
       own bottom slot, or a slot of a generator running on its stack).
       Resumer blocks: `exc_info` is the resumer's innermost slot; their
       `exc_state` is unused (the thread state's bottom slot stays where it
       is, with its contents). */
    _PyErr_StackItem exc_state;
    _PyErr_StackItem *exc_info;
#if TLF_310
    PyFrameObject *frame; /* borrowed, exactly like tstate->frame */
#endif
#if TLF_CFRAME
    tlf_cframe *cframe;       /* innermost CFrame: on the fiber's C stack, or root_cframe */
    tlf_cframe root_cframe;   /* bottom CFrame of the fiber; lives in this block */
#endif
#if TLF_311P
    struct _PyInterpreterFrame *current_frame;
    _PyStackChunk *datastack_chunk;
    PyObject **datastack_top;
    PyObject **datastack_limit;
    /* Root data-stack chunk supplied by the fiber's stack slot (NULL if
       CPython allocated it). CPython never pops a root chunk, so whoever
       owns it frees it: the slot for ours, tlf_state_finish for CPython's. */
    _PyStackChunk *own_chunk;
#endif
    /* Python recursion depth (not "remaining", so that setrecursionlimit()
       while the fiber is suspended behaves as on a thread). */
    int py_depth;
#if TLF_312P
    int c_remaining; /* C recursion budget left */
#endif
#if TLF_313P
    PyObject *delete_later;
    uintptr_t critical_section;
    PyObject *previous_executor;
#else
    int trash_nesting;
    PyObject *trash_later;
#endif
} tlf_state;

size_t tlf_state_size(void) { return sizeof(tlf_state); }
size_t tlf_state_align(void) { return _Alignof(tlf_state); }

int tlf_py_version_hex(void) { return PY_VERSION_HEX; }

/* Default C recursion budget of a thread (3.12+), or -1. */
int tlf_c_recursion_default(void)
{
#if TLF_312P
    return Py_C_RECURSION_LIMIT;
#else
    return -1;
#endif
}

int tlf_is_finalizing(void)
{
#if TLF_313P
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

/* Prepare the state block of a fiber that has not run yet.
   `context` is stolen (NULL: the fiber runs in its resumer's Context).
   `c_budget` is the C recursion budget (3.12+).
   `chunk`/`chunk_size`: memory for the root frame data-stack chunk (3.11+),
   or NULL to let CPython allocate one on first use. */
void tlf_state_init(tlf_state *s, PyThreadState *ts, PyObject *context, int c_budget,
                    void *chunk, size_t chunk_size)
{
    memset(s, 0, sizeof(*s));
    s->context = context;
    s->exc_info = &s->exc_state;
#if TLF_CFRAME
    /* The fiber's bottom CFrame lives in this heap block; eval loops started
       on the fiber link their own (stack) CFrames to it. Its `previous` is a
       valid CFrame whose own `previous` is NULL, so walkers terminate. */
    s->root_cframe.previous = &ts->root_cframe;
    s->cframe = &s->root_cframe;
#else
    (void)ts;
#endif
#if TLF_311P
    if (chunk != NULL) {
        _PyStackChunk *c = (_PyStackChunk *)chunk;
        c->previous = NULL;
        c->size = chunk_size;
        c->top = 0;
        s->own_chunk = c;
        s->datastack_chunk = c;
        /* Like CPython's push_chunk() for a root chunk: skip data[0] so that
           _PyThreadState_PopFrame() never tries to pop (free) this chunk. */
        s->datastack_top = &c->data[1];
        s->datastack_limit = (PyObject **)((char *)c + chunk_size);
    }
#else
    (void)chunk;
    (void)chunk_size;
#endif
    s->py_depth = 0;
#if TLF_312P
    s->c_remaining = c_budget;
#else
    (void)c_budget;
#endif
}

static inline void tlf_save(tlf_state *s, PyThreadState *ts)
{
#if TLF_310
    s->frame = ts->frame;
    s->cframe = ts->cframe;
    s->py_depth = ts->recursion_depth;
    s->trash_nesting = ts->trash_delete_nesting;
    s->trash_later = ts->trash_delete_later;
#else
#  if TLF_CFRAME
    s->cframe = ts->cframe;
    s->current_frame = ts->cframe->current_frame;
#  else
    s->current_frame = ts->current_frame;
#  endif
    s->datastack_chunk = ts->datastack_chunk;
    s->datastack_top = ts->datastack_top;
    s->datastack_limit = ts->datastack_limit;
#  if TLF_312P
    s->py_depth = ts->py_recursion_limit - ts->py_recursion_remaining;
    s->c_remaining = ts->c_recursion_remaining;
#  else
    s->py_depth = ts->recursion_limit - ts->recursion_remaining;
#  endif
#  if TLF_313P
    s->delete_later = ts->delete_later;
    s->critical_section = ts->critical_section;
    s->previous_executor = ts->previous_executor;
#  elif TLF_312P
    s->trash_nesting = ts->trash.delete_nesting;
    s->trash_later = ts->trash.delete_later;
#  else
    s->trash_nesting = ts->trash_delete_nesting;
    s->trash_later = ts->trash_delete_later;
#  endif
#endif
}

static inline void tlf_restore(tlf_state *s, PyThreadState *ts)
{
#if TLF_310
    ts->frame = s->frame;
    ts->cframe = s->cframe;
    ts->recursion_depth = s->py_depth;
    ts->trash_delete_nesting = s->trash_nesting;
    ts->trash_delete_later = s->trash_later;
#else
#  if TLF_CFRAME
    ts->cframe = s->cframe;
    ts->cframe->current_frame = s->current_frame;
#  else
    ts->current_frame = s->current_frame;
#  endif
    ts->datastack_chunk = s->datastack_chunk;
    ts->datastack_top = s->datastack_top;
    ts->datastack_limit = s->datastack_limit;
#  if TLF_312P
    ts->py_recursion_remaining = ts->py_recursion_limit - s->py_depth;
    ts->c_recursion_remaining = s->c_remaining;
#  else
    ts->recursion_remaining = ts->recursion_limit - s->py_depth;
#  endif
#  if TLF_313P
    ts->delete_later = s->delete_later;
    ts->critical_section = s->critical_section;
    ts->previous_executor = s->previous_executor;
#  elif TLF_312P
    ts->trash.delete_nesting = s->trash_nesting;
    ts->trash.delete_later = s->trash_later;
#  else
    ts->trash_delete_nesting = s->trash_nesting;
    ts->trash_delete_later = s->trash_later;
#  endif
#endif
}

/* Move the live thread state into `out` and install `in`. Tracing on/off is
   a per-thread setting, so on 3.10/3.11 (where it lives in the innermost
   CFrame) it is carried over to the incoming side. */
static inline void tlf_swap(PyThreadState *ts, tlf_state *out, tlf_state *in)
{
#if TLF_CFRAME_TRACING
    int use_tracing = ts->cframe->use_tracing;
#endif
    tlf_save(out, ts);
    tlf_restore(in, ts);
#if TLF_CFRAME_TRACING
    ts->cframe->use_tracing = use_tracing;
#endif
}

/* Resumer side, before switching stacks to `fiber`: save the resumer's state
   into `resumer` (a block on the resumer's stack) and install the fiber's.
   The Context stays unless the fiber carries its own. No Python API call,
   no reference count reaches zero.

   The exception being handled: the fiber's slots are installed on top of
   the resumer's, which stay in place. With `link_exc`, the fiber's bottom
   slot points down to the resumer's innermost one for this run, as a
   generator's slot points to its resumer's: code on the fiber sees the
   exception its resumer is handling (sys.exc_info(), the __context__ of
   what it raises) while it handles none itself (run_anywhere() called in
   an `except` block). Without it the fiber's chain ends at its own slot
   (plain fibers, like greenlets). Every slot below is alive for the run:
   they belong to the resumer's frames, which are suspended in this very
   resume, or to the thread state. The link is cut when the fiber switches
   out, so a suspended fiber never points into a stack that moved on. */
void tlf_switch_in(PyThreadState *ts, tlf_state *resumer, tlf_state *fiber, int link_exc)
{
    resumer->exc_info = ts->exc_info;
    fiber->exc_state.previous_item = link_exc ? ts->exc_info : NULL;
    ts->exc_info = fiber->exc_info != NULL ? fiber->exc_info : &fiber->exc_state;
    tlf_swap(ts, resumer, fiber);
    resumer->context = ts->context;
    if (fiber->context == NULL) {
        resumer->context_owned = 0; /* borrowed: the thread state keeps it */
    } else {
        resumer->context_owned = 1; /* moved out of the thread state */
        ts->context = fiber->context;
        fiber->context = NULL;
        ts->context_ver++; /* invalidates ContextVar lookup caches */
    }
}

/* Resumer side, after the fiber switched back (suspended or finished): save
   the fiber's state and reinstall the resumer's. If the fiber's current
   Context is not the resumer's (it suspended inside Context.run() of another
   one), the fiber keeps it. No Python API call, no reference count reaches
   zero (the only decref is of a Context the thread state also holds). */
void tlf_switch_out(PyThreadState *ts, tlf_state *fiber, tlf_state *resumer)
{
    PyObject *mine = resumer->context;
    PyObject *cur = ts->context;
    fiber->exc_info = ts->exc_info;
    fiber->exc_state.previous_item = NULL;
    ts->exc_info = resumer->exc_info;
    tlf_swap(ts, fiber, resumer);
    if (cur == mine) {
        fiber->context = NULL;
        if (resumer->context_owned) {
            Py_DECREF(mine); /* the thread state holds it too */
        }
    } else {
        fiber->context = cur; /* moves the thread state's reference */
        ts->context = resumer->context_owned ? mine : Py_XNewRef(mine);
        ts->context_ver++;
    }
    resumer->context = NULL;
    resumer->context_owned = 0;
}

/* After the fiber returned and its final state was switched out into `s`:
   free the data-stack chunks CPython allocated for it (it never frees a root
   chunk) and drop the references the block still owns. Decrefs can run
   arbitrary code; the resumer's state is installed when this is called. */
void tlf_state_finish(tlf_state *s)
{
#if TLF_311P
    _PyStackChunk *chunk = s->datastack_chunk;
    s->datastack_chunk = NULL;
    s->datastack_top = NULL;
    s->datastack_limit = NULL;
    s->current_frame = NULL;
    if (chunk != NULL) {
        PyObjectArenaAllocator alloc;
        PyObject_GetArenaAllocator(&alloc);
        while (chunk != NULL) {
            _PyStackChunk *prev = chunk->previous;
            if (chunk != s->own_chunk && alloc.free != NULL) {
                alloc.free(alloc.ctx, chunk, chunk->size);
            }
            chunk = prev;
        }
    }
    s->own_chunk = NULL;
#endif
#if TLF_310
    s->frame = NULL;
#endif
    s->exc_info = NULL;
    Py_CLEAR(s->context);
    Py_CLEAR(s->exc_state.exc_value);
#if TLF_310
    Py_CLEAR(s->exc_state.exc_type);
    Py_CLEAR(s->exc_state.exc_traceback);
#endif
}

/* The strong references a switched-out block owns, for tp_traverse. Writes
   up to 4 pointers (some may be NULL) and returns how many were written. */
int tlf_state_refs(tlf_state *s, PyObject **out)
{
    int n = 0;
    out[n++] = s->context;
    out[n++] = s->exc_state.exc_value;
#if TLF_310
    out[n++] = s->exc_state.exc_type;
    out[n++] = s->exc_state.exc_traceback;
#endif
    return n;
}

/* True if a switched-out block is back at its bottom: no frames, no handled
   exception, no Context of its own, depth 0. Runner fibers must be in this
   state between steps. */
int tlf_state_is_idle(tlf_state *s)
{
    if (s->context != NULL) return 0;
#if TLF_310
    if (s->frame != NULL) return 0;
    if (s->exc_state.exc_type != NULL || s->exc_state.exc_traceback != NULL) return 0;
#else
    if (s->current_frame != NULL) return 0;
#endif
    if (s->exc_state.exc_value != NULL) return 0;
    return s->py_depth == 0;
}

/* Makes sure the thread has a Context (creating an empty one, as CPython
   itself does lazily), so that a fiber started now and its resumer share
   one object even if the fiber is the first to set a variable. Returns -1
   with an exception set on failure. */
int tlf_context_ensure(PyThreadState *ts)
{
    if (ts->context == NULL) {
        PyObject *ctx = PyContext_New();
        if (ctx == NULL) {
            return -1;
        }
        ts->context = ctx;
        ts->context_ver++;
    }
    return 0;
}

/* Python recursion depth of the running code (for tests). */
int tlf_py_depth(PyThreadState *ts)
{
#if TLF_310
    return ts->recursion_depth;
#elif TLF_312P
    return ts->py_recursion_limit - ts->py_recursion_remaining;
#else
    return ts->recursion_limit - ts->recursion_remaining;
#endif
}

/* Top of the frame data stack (3.11+), or NULL (for measurements). */
void *tlf_datastack_top(PyThreadState *ts)
{
#if TLF_311P
    return (void *)ts->datastack_top;
#else
    (void)ts;
    return NULL;
#endif
}

/* C recursion budget left (3.12+), or -1 (for tests). */
int tlf_c_remaining(PyThreadState *ts)
{
#if TLF_312P
    return ts->c_recursion_remaining;
#else
    (void)ts;
    return -1;
#endif
}

/* Set the C recursion budget left (3.12+; no-op before). */
void tlf_set_c_remaining(PyThreadState *ts, int v)
{
#if TLF_312P
    ts->c_recursion_remaining = v;
#else
    (void)ts;
    (void)v;
#endif
}

/* A new reference to the innermost frame object of a suspended fiber, None
   semantics as NULL without an error; NULL with an error on failure.
   PyThreadState_GetFrame() may allocate the frame object, so the fiber's
   frame pointer is installed only around that call, with the cyclic GC
   disabled so that no finalizer can run (and switch) in that window. */
PyObject *tlf_state_top_frame(tlf_state *s, PyThreadState *ts)
{
#if TLF_310
    (void)ts;
    Py_XINCREF(s->frame);
    return (PyObject *)s->frame;
#else
    if (s->current_frame == NULL) {
        return NULL;
    }
    int gc_was_enabled = PyGC_Disable();
#  if TLF_CFRAME
    struct _PyInterpreterFrame *saved = ts->cframe->current_frame;
    ts->cframe->current_frame = s->current_frame;
    PyFrameObject *f = PyThreadState_GetFrame(ts);
    ts->cframe->current_frame = saved;
#  else
    struct _PyInterpreterFrame *saved = ts->current_frame;
    ts->current_frame = s->current_frame;
    PyFrameObject *f = PyThreadState_GetFrame(ts);
    ts->current_frame = saved;
#  endif
    if (gc_was_enabled) {
        PyGC_Enable();
    }
    return (PyObject *)f;
#endif
}

"""The process transport's control block: one 4 KiB page of shared memory both worlds map; and how each
world waits for the other there (``spin_while``, the ``DEFAULT_*SPIN_US`` windows).

Layout (little-endian)::

    0    u64 request sequence    (normal world bumps it after writing a request)
    64   u64 response sequence   (secure world sets it to the request's after writing the response)
    128  u64 secure world sleeping  (1: it is blocked on the request eventfd, kick it)
    192  u64 normal world sleeping  (1: it is blocked on the response eventfd, kick it)
    256  request:  op, session, cmd, packed param types (u32 each); 4 x (a, b, shm id, offset, size) u64
                   (parameters of type NONE are not written)
    512  response: code, origin, session, message length (u32); TA time ns, memory used/peak/cap (u64);
                   4 x (a, b, size) u64 (only written when there is an output parameter)
    1024 message (UTF-8, <= 1 KiB)     2048 payload (e.g. the UUID of OpenSession, <= 2 KiB)

Each counter sits on its own cache line, so a spinning reader does not bounce the line the writer
fills. Everything read from the block is copied out (``unpack_from``) before it is checked: the
normal world may rewrite the block at any time.
"""

from __future__ import annotations

import os
import struct
import time

BLOCK_SIZE = 4096

# Indices into the block viewed as u64 words.
REQ_SEQ = 0
RESP_SEQ = 8
SW_SLEEPING = 16
NW_SLEEPING = 24

REQUEST_OFFSET = 256
REQUEST_HEADER = struct.Struct("<IIII")
REQUEST = struct.Struct(REQUEST_HEADER.format + "QQQQQ" * 4)
RESPONSE_OFFSET = 512
RESPONSE_HEADER = struct.Struct("<IIIIQQQQ")
RESPONSE = struct.Struct(RESPONSE_HEADER.format + "QQQ" * 4)
MESSAGE_OFFSET = 1024
MESSAGE_MAX = 1024
PAYLOAD_OFFSET = 2048

OP_INVOKE = 1
OP_OPEN = 2
OP_CLOSE = 3
OP_REGISTER = 4
OP_RELEASE = 5
OP_STATS = 6
OP_SHUTDOWN = 7

# The fd-passing message that precedes OP_REGISTER on the control socket: shm id, size.
REGISTER_MESSAGE = struct.Struct("<QQ")


# How each world waits for the other (process transport): poll the shared counter, calling sched_yield
# between looks, for a window; then sleep on an eventfd. Chosen with `python -m tee_sim.bench` on this
# 2-core machine while other jobs kept it at load 5-6 (figures noisy, two runs):
# - Flat-out spinning ("hard") gives the best median round trip (14.6 us) but steals a core: a 2-thread
#   LiteRT conv ran 50-78% slower while the secure world spun, and under load both worlds' spinners
#   fight the scheduler (p90 round trip 3-4 ms, 2-2.6 ms after an idle gap). Not used (hard = 0).
# - Yielding between looks: the secure world got 0.2-9% of one core during a LiteRT call and the call's
#   time changed within the noise (-8%..+6%); round trip 39-40 us median under that load (~16 us on a
#   quiet machine, where each world keeps its own core), 50 us with no polling at all (eventfd only).
# - Window: a TEE entry that finds the secure world still polling costs the round trip; one that finds
#   it asleep costs 52-72 us. 1 ms covers the rounds of small models (a 32x32x16->32 conv takes 0.3 ms)
#   at no measurable cost to LiteRT; a longer window only burns CPU other processes could use.
DEFAULT_SPIN_US = 1000.0  # secure world, after each answer
DEFAULT_CALLER_SPIN_US = 1000.0  # normal world, waiting for an answer (it has nothing else to do)
DEFAULT_HARD_SPIN_US = 0.0  # flat-out part of each window


def spin_while(words: memoryview, index: int, value: int, hard_ns: int, window_ns: int) -> None:
    """Busy-wait while ``words[index] == value``: ``hard_ns`` flat out, then until ``window_ns`` with a
    ``sched_yield`` between looks (the core goes to any other runnable thread); the caller then sleeps.

    Measured (``python -m tee_sim.bench``): looking flat out between yields, even for 2-10 us, made
    the round trip slower on a loaded machine, where both worlds often share one core and each yield
    is the hand-over to the other.
    """
    if words[index] != value:
        return
    clock = time.perf_counter_ns
    now = clock()
    hard_end, end = now + hard_ns, now + window_ns
    while words[index] == value and clock() < hard_end:
        pass
    while words[index] == value and clock() < end:
        os.sched_yield()

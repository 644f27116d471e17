"""The secure world's process: ``python -m tee_sim.secure_world CONFIG``, started by the process transport.

It serves one normal-world process: every session, one ``SecureOS``. Requests arrive in the shared
control block (``tee_sim.channel``); after each answer the loop polls the request counter for
``spin_us`` (yielding the core between looks, see ``tee_sim.channel.DEFAULT_SPIN_US``), then sleeps
on an eventfd. While a trusted app offers a step program (``TrustedApp.step_program``), the polling is
done by the C fast path (``tee_sim.secure_world_fast``), which answers the program's steps
itself (ResNet-404: 32.6 -> 24.0 us per TEE entry, as seen by the normal world) and leaves every other
request to this loop. It exits when the normal world shuts it down, closes the control socket, or dies.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import mmap
import os
import select
import signal
import socket
import sys
import threading
import traceback
import uuid

from tee_sim import channel as ch
from tee_sim import secure_world_fast
from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_GENERIC,
    TEE_ERROR_NOT_SUPPORTED,
    TEEC_ORIGIN_TEE,
)
from tee_sim.secure_os import NO_OUTPUTS, NO_PARAMS, Outcome, SecureOS, WireParam

PR_SET_PDEATHSIG = 1
# Messages of interrupted registrations that one registration skips at most (a Ctrl-C each).
STALE_REGISTRATIONS = 64

log = logging.getLogger("tee_sim.secure_world")


def _watch_parent(sock: socket.socket, parent: int) -> None:
    """Exit as soon as the normal world is gone, even while a trusted app is stuck in a command."""
    poller = select.poll()
    poller.register(sock.fileno(), 0)  # POLLHUP/POLLERR are always reported
    while True:
        if poller.poll(1000) or os.getppid() != parent:
            os._exit(0)


class SecureWorld:
    def __init__(self, config: dict) -> None:
        self.sock = socket.socket(fileno=config["ctrl"])
        self.block = mmap.mmap(config["block"], ch.BLOCK_SIZE)
        os.close(config["block"])
        self.words = memoryview(self.block).cast("Q")
        self.req_efd, self.resp_efd = config["req"], config["resp"]
        self.spin_ns = int(config["spin_us"] * 1000)
        self.hard_spin_ns = int(min(config["hard_spin_us"], config["spin_us"]) * 1000)
        self.os = SecureOS(config["home"], config["memory_cap"])
        self.maps: dict[int, mmap.mmap] = {}
        self.poller = select.poll()
        self.poller.register(self.req_efd, select.POLLIN)
        self.poller.register(self.sock.fileno(), 0)
        self.fast = secure_world_fast.FastPath(self.block, self.spin_ns, self.resp_efd)

    def wait_request(self, last: int, spin: bool = True) -> int:
        words = self.words
        if spin:
            ch.spin_while(words, ch.REQ_SEQ, last, self.hard_spin_ns, self.spin_ns)
        if words[ch.REQ_SEQ] == last:
            words[ch.SW_SLEEPING] = 1
            # The first short wait covers a kick lost while the flag was becoming visible; after
            # that the normal world surely sees the flag and kicks the eventfd.
            timeout = 1
            while words[ch.REQ_SEQ] == last:
                for fd, _ in self.poller.poll(timeout):
                    if fd == self.req_efd:
                        try:
                            os.eventfd_read(self.req_efd)
                        except BlockingIOError:
                            pass
                    else:  # the control socket hung up: the normal world is gone
                        sys.exit(0)
                timeout = 1000
            words[ch.SW_SLEEPING] = 0
        return words[ch.REQ_SEQ]

    def serve(self) -> None:
        last = 0  # the block starts zeroed; the first request may be posted as soon as we say ready
        self.sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
        while True:
            if self.fast.active:
                # The fast path answers the steps it can (in C) and waits out the spin window; then a
                # request it left for Python, or none yet: sleep until one, and let the fast path see it.
                last, pending = self.fast.serve(last)
                if not pending:
                    self.wait_request(last, spin=False)
                    continue
                seq = self.words[ch.REQ_SEQ]
            else:
                seq = self.wait_request(last)
            # Copied out (unpack_from) before anything is checked: the normal world may rewrite the block.
            op, session, cmd, types = ch.REQUEST_HEADER.unpack_from(self.block, ch.REQUEST_OFFSET)
            if types == 0 and op == ch.OP_INVOKE:
                wire = NO_PARAMS
            else:
                fields = ch.REQUEST.unpack_from(self.block, ch.REQUEST_OFFSET)
                op, session, cmd, types = fields[:4]
                wire = (
                    (types & 0xF, *fields[4:9]),
                    (types >> 4 & 0xF, *fields[9:14]),
                    (types >> 8 & 0xF, *fields[14:19]),
                    (types >> 12 & 0xF, *fields[19:24]),
                )
            try:
                outcome = self.dispatch(op, session, cmd, wire)
            except Exception:  # noqa: BLE001 - a bug here must cost one request, not the secure world
                log.error("request %d failed:\n%s", op, traceback.format_exc())
                outcome = Outcome(TEE_ERROR_GENERIC, TEEC_ORIGIN_TEE, "internal error of the secure world")
            if op == ch.OP_SHUTDOWN:
                self.fast.close()  # before the response: the normal world may unmap everything after it
                self.respond(outcome, seq)
                return
            memory = self.os.memory
            self.fast.refresh(self.os.step_programs(), (memory.used, memory.peak, memory.cap))
            self.respond(outcome, seq)
            last = seq

    def dispatch(self, op: int, session: int, cmd: int, wire: tuple[WireParam, ...]) -> Outcome:
        if op == ch.OP_INVOKE:
            return self.os.invoke(session, cmd, wire)
        if op == ch.OP_OPEN:
            ta_uuid = uuid.UUID(bytes=bytes(self.block[ch.PAYLOAD_OFFSET : ch.PAYLOAD_OFFSET + 16]))
            return self.os.open_session(ta_uuid, wire)
        if op == ch.OP_CLOSE:
            return self.os.close_session(session)
        if op == ch.OP_REGISTER:
            return self.register(wire[0][1], wire[0][2])
        if op == ch.OP_RELEASE:
            self.release(wire[0][1])
            return Outcome()
        if op == ch.OP_STATS:
            return Outcome()
        if op == ch.OP_SHUTDOWN:
            self.os.shutdown()
            return Outcome()
        return Outcome(TEE_ERROR_NOT_SUPPORTED, TEEC_ORIGIN_TEE, f"unknown operation {op}")

    def register(self, shm_id: int, size: int) -> Outcome:
        refused = Outcome(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TEE, "shared memory registration refused")
        for _ in range(STALE_REGISTRATIONS + 1):
            self.sock.settimeout(5.0)
            try:
                message, fds, _, _ = socket.recv_fds(self.sock, ch.REGISTER_MESSAGE.size, 1)
            except OSError:  # nothing sent (timeout), or a malformed message
                return refused
            finally:
                self.sock.settimeout(None)
            if len(fds) != 1 or len(message) != ch.REGISTER_MESSAGE.size:
                for fd in fds:
                    os.close(fd)
                return refused
            # The normal world sends a registration's descriptor, then its request, under one lock, and
            # requests are served one at a time: a message ahead of this one's is a registration whose
            # request never came (interrupted between the two), dropped, else every later one read it.
            if ch.REGISTER_MESSAGE.unpack(message) == (shm_id, size):
                break
            os.close(fds[0])
        else:
            return refused
        fd = fds[0]
        try:
            if size <= 0:
                return refused
            # Sealing the memfd's size stops the normal world from shrinking it under our mapping
            # (the next access would be SIGBUS: a crash it could trigger at will). Only a memfd takes
            # seals, so no other kind of file is ever mapped as shared memory.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            except OSError:
                pass  # already sealed (a re-registration after a restart), or not a memfd
            try:
                sealed = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            except OSError:
                sealed = 0
            if not sealed or os.fstat(fd).st_size < size:
                return refused
            self.release(shm_id)
            self.maps[shm_id] = mmap.mmap(fd, size)
            self.os.register_shm(shm_id, self.maps[shm_id])
            return Outcome()
        finally:
            os.close(fd)

    def release(self, shm_id: int) -> None:
        self.os.release_shm(shm_id)
        mapping = self.maps.pop(shm_id, None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # a view outlived its call; the mapping goes when that view does
                pass

    def respond(self, outcome: Outcome, seq: int) -> None:
        message = outcome.message.encode("utf-8", "replace")[: ch.MESSAGE_MAX] if outcome.message else b""
        if message:
            self.block[ch.MESSAGE_OFFSET : ch.MESSAGE_OFFSET + len(message)] = message
        memory = self.os.memory
        header = (outcome.code, outcome.origin, outcome.session, len(message), outcome.ta_time_ns,
                  memory.used, memory.peak, memory.cap)  # fmt: skip
        if outcome.outputs is NO_OUTPUTS:
            ch.RESPONSE_HEADER.pack_into(self.block, ch.RESPONSE_OFFSET, *header)
        else:
            (a0, b0, s0), (a1, b1, s1), (a2, b2, s2), (a3, b3, s3) = outcome.outputs
            ch.RESPONSE.pack_into(
                self.block, ch.RESPONSE_OFFSET, *header, a0, b0, s0, a1, b1, s1, a2, b2, s2, a3, b3, s3
            )
        self.words[ch.RESP_SEQ] = seq
        if self.words[ch.NW_SLEEPING]:
            os.eventfd_write(self.resp_efd, 1)


def main() -> None:
    config = json.loads(sys.argv[1])
    # stderr is the log file (tee_sim.secure_world_launch): TA panics and tracebacks go there, not to a tty.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s secure world %(process)d %(levelname)s %(message)s"
    )
    # Ctrl-C in the terminal reaches the whole process group; the normal world decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.get("pdeathsig"):
        # Only when the spawning thread is the main thread: the signal fires when that *thread* exits.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != config["parent"]:
        return
    world = SecureWorld(config)
    threading.Thread(target=_watch_parent, args=(world.sock, config["parent"]), daemon=True).start()
    world.serve()


if __name__ == "__main__":
    main()

"""The secure world's fast path (``tee_sim.secure_world_fast``): the ShadowNet TA's steps answered in C,
through a control block as the process transport posts them, give the TA's own results; a step out of
order, or one with Python work, is left unanswered for the TA, which refuses or runs it; a step 0 only when
the TA took its inference's pool entry ahead."""

import mmap
import os
import warnings

import numpy as np
import pytest

import shadownet
import tee_sim
from converters.fidelity import relative_error
from shadownet.accelerator import AcceleratorWrapper
from shadownet.exceptions import IntegrityError
from tee_sim import channel as ch
from tee_sim.secure_os import NO_PARAMS, Outcome
from tee_sim.secure_world_fast import AHEAD, FINISHED, FastPath
from tests.shadownet.small_models import reference, small_cnn


def _in_this_process(monkeypatch):
    """An in-process secure world as this process's default - the device convert provisions the secrets
    to - so that the TA's objects are here to look at."""
    context = tee_sim.Context("inprocess")
    monkeypatch.setattr(tee_sim, "default_context", lambda: context)
    return context


def _protect(tmp_path_factory, name: str, original: bytes, **kw):
    out = tmp_path_factory.mktemp(name) / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(original, str(out), **kw)
    return out


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """(the original, its artifacts): the small CNN at 48 px with its depthwise layers offloaded (the default
    before stop 34: their rounds are among the steps followed), the deeper rounds unmasked ("auto" would
    mask every round of a model this small, every step then needing its pool slot)."""
    original = small_cnn(side=48)
    return original, _protect(tmp_path_factory, "offloaded", original, seed=8,
                              scheme="groupmix:depthwise=offload", mask_rounds="first")


@pytest.fixture(scope="module")
def all_masked(tmp_path_factory):
    """(the original, its artifacts): the small CNN with one-time masks on every round."""
    original = small_cnn()
    return original, _protect(tmp_path_factory, "all_masked", original, seed=3, mask_rounds="all")


def _through_fast_path(context, monkeypatch, on_stop=None):
    """Route every invocation of the in-process ``context`` through a ``FastPath`` on a control block of
    its own first, as ``SecureWorld.serve`` does; returns the fast path. ``on_stop()``: what the normal world
    does between the fast path leaving a request to the TA's Python and the Python reading it."""
    transport = context._transport
    secure_os, python_path = transport._os, transport.invoke
    block = mmap.mmap(-1, ch.BLOCK_SIZE)
    words = memoryview(block).cast("Q")
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    fast = FastPath(block, spin_ns=0, resp_efd=kick)
    seq = [0]

    def invoke(session, cmd_id, wire, timeout):
        memory = secure_os.memory
        fast.refresh(secure_os.step_programs(), (memory.used, memory.peak, memory.cap))
        if wire is NO_PARAMS:
            ch.REQUEST_HEADER.pack_into(block, ch.REQUEST_OFFSET, ch.OP_INVOKE, session, cmd_id, 0)
        else:
            types = wire[0][0] | wire[1][0] << 4 | wire[2][0] << 8 | wire[3][0] << 12
            ch.REQUEST.pack_into(block, ch.REQUEST_OFFSET, ch.OP_INVOKE, session, cmd_id, types,
                                 *wire[0][1:], *wire[1][1:], *wire[2][1:], *wire[3][1:])
        seq[0] += 1
        words[ch.REQ_SEQ] = seq[0]
        last, pending = fast.serve(seq[0] - 1)
        if not pending:  # answered in C
            assert last == seq[0] and words[ch.RESP_SEQ] == seq[0]
            answer = ch.RESPONSE_HEADER.unpack_from(block, ch.RESPONSE_OFFSET)
            code, origin, sid, _, ta_ns, used, peak, cap = answer
            outcome = Outcome(code, origin, "", session=sid, ta_time_ns=ta_ns)
            outcome.memory = (used, peak, cap)
            return outcome
        assert last == seq[0] - 1  # left unanswered, for the TA's Python
        words[ch.RESP_SEQ] = seq[0]
        if on_stop is not None:
            on_stop()
        return python_path(session, cmd_id, wire, timeout)

    monkeypatch.setattr(transport, "invoke", invoke)
    return fast


def test_middle_steps_answered_in_c_match_the_reference(offloaded, monkeypatch):
    original, out = offloaded
    context = _in_this_process(monkeypatch)
    fast = _through_fast_path(context, monkeypatch)
    with shadownet.load(out, background_refill=False) as model:
        (program,) = context._transport._os.step_programs().values()
        middle = [calls is not None for calls in program.calls[1:-1]]
        assert program.calls[0] is None  # an inference's start: it picks the pool slot in Python
        # With no inference under way, round 1's restore (it pops the slot's one-time mask) needs Python;
        # deeper ones are kernels. In an inference the slot's program has it in C too.
        assert any(middle) and not all(middle)
        # In an inference's pool slot every middle step is kernel calls, MEAN included (small ops in C).
        from tee_sim.ta_shadownet_steps import step_calls

        (loaded,) = [s.context["model"] for s in context._transport._os._sessions.values()]
        assert all(step_calls(step, 0) is not None for step in loaded.steps[1:-1])
        rng = np.random.default_rng(0)
        for i in range(3):
            x = rng.uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
            got = model(x)
            assert relative_error(got, reference(original, x)) <= 1e-4
            if i == 0:
                per_inference = fast.served
                assert per_inference > sum(middle)
            assert fast.served == (i + 1) * per_inference
            assert model.stats()["world_switches"] == model.num_rounds + 1
        # Out of order (no inference under way): left to the TA, which refuses it.
        step = 1 + middle.index(True)
        with pytest.raises(tee_sim.TEEError) as refused:
            model._steps[step]()
        assert refused.value.code == tee_sim.TEE_ERROR_BAD_STATE and fast.served == 3 * per_inference
        # The last step runs in C too: the TA settles that inference (its checks' statistics, its spent
        # pool entry) at its next entry - here a refill, which then remakes the entry.
        model(x)
        assert fast.served == 4 * per_inference
        assert loaded.cursor[0] == FINISHED and loaded.online.current is not None
        spent = loaded.online.current
        model.refill_masks()
        # The refill settled it, remade its entry and took the next inference's ahead: that inference runs
        # wholly in C, its step 0 included.
        assert loaded.cursor[0] == AHEAD and loaded.online.current is not None
        assert loaded.online.current is not spent
        pool = model.stats()["pool"]
        assert pool["ready"] == pool["capacity"]  # the entry taken ahead is ready all the same
        before = fast.served
        assert relative_error(model(x), reference(original, x)) <= 1e-4
        assert fast.served - before == model.num_rounds + 1 == per_inference + 1
        # An inference abandoned after its step 0 ran in C: the next step 0 is not AHEAD, so the TA's Python
        # begins anew, with another entry; the abandoned one is spent, not taken again.
        model.refill_masks()
        abandoned = loaded.online.current
        before = fast.served
        model._steps[0]()
        assert fast.served == before + 1 and loaded.cursor[0] == 1
        assert relative_error(model(x), reference(original, x)) <= 1e-4
        assert fast.served == before + 1 + per_inference
        assert loaded.online.current is not abandoned and abandoned in loaded.online._free
    assert context._transport._os.step_programs() == {}  # the session closed: nothing left to answer
    context.close()


def test_a_model_without_a_pool_runs_every_step_in_c(tmp_path, monkeypatch):
    """The paper's scheme (static masks), unverified: no pool entry to take or spend, so after the bind
    every inference - step 0 and the last included - is answered in C, and the next one's step 0 too."""
    original = small_cnn(side=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(original, str(tmp_path / "out"), scheme="shadownet", seed=8)
    context = _in_this_process(monkeypatch)
    fast = _through_fast_path(context, monkeypatch)
    with shadownet.load(tmp_path / "out") as model:
        (loaded,) = [s.context["model"] for s in context._transport._os._sessions.values()]
        assert loaded.online is None and loaded.cursor[0] == AHEAD
        rng = np.random.default_rng(2)
        for i in range(3):
            x = rng.uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
            assert relative_error(model(x), reference(original, x)) <= 1e-3
            assert fast.served == (i + 1) * (model.num_rounds + 1) and loaded.cursor[0] == AHEAD
    context.close()


def _padded_stem() -> bytes:
    """Darknet's stem, as yolov4-tiny's: a zero PAD of one row and column before a VALID stride-2 conv,
    twice (the second after a restore); then a dense head."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model
    from tests.shadownet.small_models import conv_options

    rng = np.random.default_rng(3)
    g = Graph()
    x = g.add_tensor("image", (1, 24, 24, 3), np.float32)
    pads = g.add_tensor("pads", (4, 2), np.int32, np.array([[0, 0], [1, 0], [1, 0], [0, 0]]))
    side, c_in = 24, 3
    for i, c_out in enumerate((8, 12)):
        padded = g.add_tensor(f"padded{i}", (1, side + 1, side + 1, c_in), np.float32)
        g.add_op("PAD", [x, pads], [padded], fb.PadOptionsT())
        w = g.add_tensor(f"w{i}", (c_out, 3, 3, c_in), np.float32,
                         rng.standard_normal((c_out, 3, 3, c_in)) * 0.4)
        b = g.add_tensor(f"b{i}", (c_out,), np.float32, rng.standard_normal(c_out) * 0.1)
        side //= 2
        x = g.add_tensor(f"y{i}", (1, side, side, c_out), np.float32)
        g.add_op("CONV_2D", [padded, w, b], [x],
                 conv_options("CONV_2D", fb.Padding.VALID, 2, fb.ActivationFunctionType.RELU))
        c_in = c_out
    flat = g.add_tensor("flat", (1, side * side * c_in), np.float32)
    shape = g.add_tensor("shape", (2,), np.int32, np.array([1, side * side * c_in]))
    g.add_op("RESHAPE", [x, shape], [flat], fb.ReshapeOptionsT())
    width = side * side * c_in
    w = g.add_tensor("fc/w", (4, width), np.float32, rng.standard_normal((4, width)) * 0.1)
    out = g.add_tensor("logits", (1, 4), np.float32)
    g.add_op("FULLY_CONNECTED", [flat, w, -1], [out], fb.FullyConnectedOptionsT())
    g.inputs, g.outputs = [0], [out]
    return write_model(g)


def test_padded_pushes_are_answered_in_c(tmp_path, monkeypatch):
    """A push that pads (the mask, or zeros, on its border) writes the border with kernel calls: with the
    pool entry taken ahead every step of the padded stem - the one-time-masked first push and the unmasked
    second - runs on the fast path, and the results match LiteRT on the original. Round 1's mask follows
    its input's spread: an input of another power of two sends step 0 back to the TA's Python, which moves
    the entry's mask there (each entry taken after it is moved as it is taken, off the path), and the next
    step 0 runs in C again."""
    original = _padded_stem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        # (mask_floor=input: the second push unmasked, as before stop 56 masked it, one layer from the input)
        shadownet.convert(original, str(tmp_path / "out"), seed=6,
                          scheme="groupmix:exact_split=none,mask_floor=input", mask_rounds="first")
    context = _in_this_process(monkeypatch)
    fast = _through_fast_path(context, monkeypatch)
    with shadownet.load(tmp_path / "out", background_refill=False) as model:
        buffers = model.artifacts.manifest["buffers"]
        assert [b["shape"] for b in buffers if b["name"].startswith("round_1/in")] == [[1, 25, 25, 3]]
        assert [b["shape"] for b in buffers if b["name"].startswith("round_2/in")] == [[1, 13, 13, 8]]
        rng = np.random.default_rng(4)
        # Converted without calibration: masks sized for N(0, 1) inputs, whose RMS these [0, 1] ones are
        # within a factor of 4 under (kept), then 0-255 ones (eight powers of two up), then [0, 1] again.
        steps = ((1, 0, False), (1, 0, False), (255, 8, True), (255, 8, False), (1, 0, True), (1, 0, False))
        rescaled = 0
        for scale, exponent, moved in steps:
            model.refill_masks()  # the next inference's entry taken ahead
            before = fast.served
            x = (scale * rng.uniform(0, 1, (1, 24, 24, 3))).astype(np.float32)
            assert relative_error(model(x), reference(original, x)) <= 1e-4
            assert fast.served - before == model.num_rounds + (0 if moved else 1)
            pool = model.stats()["pool"]
            rescaled += moved
            assert list(pool["mask_exponents"].values()) == [exponent]
            assert pool["rescaled"] == rescaled  # on the inference path: once per change
    context.close()


def test_a_push_made_in_its_masks_buffer_is_not_run_again_on_the_spent_mask(tmp_path, monkeypatch):
    """Unverified, a restore's fused push whose mask follows its input makes what it sends in the mask's own
    buffer (no staging buffer: yolov4-tiny's 5.3 MiB), so its pass spends the mask. Stopped on the fast path
    for the mask to move, the TA's Python draws a fresh mask where it belongs and runs the pass once, on it:
    run first as it was, on the spent mask, the pass added round 1's results to themselves under the old
    mask, and results rewritten in between that passed its measure would have gone out so."""
    import tee_sim.ta_shadownet_restore_push as rp

    original = _padded_stem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(original, str(tmp_path / "out"), seed=6, scheme="groupmix:exact_split=none")
    passes: list[int] = []  # the measured passes the TA's Python ran (the fast path's are C calls)
    compile_ = rp._compile

    def compile_counted(model, *args, spread=None, **kw):
        kernel = compile_(model, *args, spread=spread, **kw)
        if spread is None:
            return kernel

        def counted():
            passes.append(1)
            return kernel()
        counted.__dict__.update(vars(kernel))  # its C calls, for the fast path
        return counted

    monkeypatch.setattr(rp, "_compile", compile_counted)
    context = _in_this_process(monkeypatch)
    _through_fast_path(context, monkeypatch)
    rng = np.random.default_rng(5)
    with shadownet.load(tmp_path / "out", background_refill=False) as model:
        (loaded,) = [s.context["model"] for s in context._transport._os._sessions.values()]
        for scale, python, moved in ((1, 0, False), (1, 0, False), (255, 1, True), (255, 0, False),
                                     (1, 1, True)):
            model.refill_masks()
            passes.clear()
            before = model.stats()["pool"]["mask_exponents"]["r2/x0/mask"]
            x = (scale * rng.uniform(0, 1, (1, 24, 24, 3))).astype(np.float32)
            assert relative_error(model(x), reference(original, x)) <= 1e-4
            after = model.stats()["pool"]["mask_exponents"]["r2/x0/mask"]
            assert (len(passes), abs(after - before) >= 6) == (python, moved), (scale, passes, before, after)
        assert loaded.online.kernels._staging is None  # made in the mask's buffer: no staging buffer
    context.close()


class _Tamper(AcceleratorWrapper):
    """Adds 1e-3 of the round's output norm to one result of round ``round`` while ``armed``;
    ``put_back()`` restores the honest value."""

    armed, round = False, 2

    def run_round(self, r):
        self.inner.run_round(r)
        if self.armed and r == self.round:
            name = min(n for n in self.buffers if n.startswith(f"round_{r}/out/"))
            y = self.buffers[name].reshape(-1)
            self.honest = (y, y[7].copy())
            y[7] += np.float32(1e-3 * np.linalg.norm(y.astype(np.float64)))

    def put_back(self):
        if getattr(self, "honest", None) is not None:
            y, value = self.honest
            y[7], self.honest = value, None


def test_verified_steps_answered_in_c_and_a_failed_check_still_raises(offloaded, monkeypatch):
    """A verified model's checked restores and prepares run on the fast path; a check that fails there is
    handed back to the TA, whose Python raises IntegrityError."""
    original, out = offloaded
    context = _in_this_process(monkeypatch)
    fast = _through_fast_path(context, monkeypatch)
    made = []
    with shadownet.load(out, background_refill=False, verify=True,
                        accelerator=lambda inner: made.append(_Tamper(inner)) or made[-1]) as model:
        (program,) = context._transport._os.step_programs().values()
        idle = sum(calls is not None for calls in program.calls[1:-1])  # no slot yet: no checked step
        rng = np.random.default_rng(1)
        xs = [rng.uniform(0, 1, (1, 48, 48, 3)).astype(np.float32) for _ in range(4)]
        for i, x in enumerate(xs[:3]):
            assert relative_error(model(x), reference(original, x)) <= 1e-4
            if i == 0:
                per_inference = fast.served
                assert per_inference > idle  # the slot's checked steps ran in C
            assert fast.served == (i + 1) * per_inference
        verify = model.stats()["verify"]
        assert verify["checked"] == 3 * verify["layers"] and 0 < verify["worst_ratio"] < 1
        assert verify["worst_bound_log2"] <= -20  # tallied from the C runs' outcomes
        made[0].armed = True
        before = fast.served
        with pytest.raises(IntegrityError, match="failed verification"):
            model(xs[3])
        assert fast.served - before < per_inference  # the failed step was not answered in C
        made[0].armed = False
        assert relative_error(model(xs[3]), reference(original, xs[3])) <= 1e-4


def test_a_step_handed_back_to_python_runs_on_from_the_call_that_stopped_it(tmp_path, monkeypatch):
    """Every round masked: a push whose input left its mask's band stops its step on the fast path, and
    the TA's Python runs the step on from that push's instruction, not from the start - the instructions
    before it ran in C, and one may have reused a slot an earlier one read (ResNet-44's step 43: a restore
    whose addend's slot the MEAN after it overwrote; its outputs came out 0.12-0.15 off when the step ran
    again from the start, a review). Here: restore, MEAN, then the dense layer's push."""
    from converters import pipeline
    from tee_sim.program import read_program

    original = small_cnn()
    programs = []
    real = pipeline.provision
    monkeypatch.setattr(pipeline, "provision",
                        lambda program, *a: programs.append(program) or real(program, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(original, str(tmp_path / "out"), seed=3, mask_rounds="all")
    header, _ = read_program(programs[-1])
    followed = {name for name, spec in header["one_time"]["masks"].items() if spec.get("spread")}
    (step,) = [s for s, instrs in enumerate(header["steps"]) if [i["op"] for i in instrs] ==
               ["restore", "mean", "push"] and instrs[2]["mask"] in followed]
    context = _in_this_process(monkeypatch)
    fast = _through_fast_path(context, monkeypatch)
    ran: list[int] = []  # the step's instructions the TA's Python ran
    with shadownet.load(tmp_path / "out", background_refill=False) as model:
        (loaded,) = [s.context["model"] for s in context._transport._os._sessions.values()]
        for i, run in enumerate(loaded.steps[step]):
            def counted(run=run, i=i):
                ran.append(i)
                return run()
            counted.__dict__.update(vars(run))  # its C calls, for the fast path
            loaded.steps[step][i] = counted
        rng = np.random.default_rng(4)
        for scale, python in ((1, []), (1, []), (255, [2]), (255, []), (1, [2])):
            model.refill_masks()
            ran.clear()
            before = fast.served
            x = (scale * rng.uniform(0, 1, (1, 16, 16, 3))).astype(np.float32)
            assert relative_error(model(x), reference(original, x)) <= 1e-4
            assert ran == python and fast.served > before, (scale, ran)
    context.close()


def test_a_stopped_step_is_resumed_only_by_its_own_request(all_masked, monkeypatch):
    """After the fast path stops a step part-way (cursor STOPPED, the step, the call), a normal world may
    rewrite the request before Python reads it. A review: Python refused the other step as out of order,
    the cursor still named the stopped one, and its next request ran it again in C from the start - the
    instructions before the stop twice (a clobbered slot read again: outputs 0.58 off; a push sent again
    under the same one-time mask). Now any other step but a new inference's step 0 ends the inference."""
    from tee_sim.errors import TEEError
    from tee_sim.secure_world_fast import STOPPED
    from tee_sim.ta_shadownet_steps import run_step

    original, out = all_masked
    context = _in_this_process(monkeypatch)
    x = np.random.default_rng(5).uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    with shadownet.load(out, background_refill=False) as model:
        (loaded,) = [s.context["model"] for s in context._transport._os._sessions.values()]
        assert relative_error(model(x), reference(original, x)) <= 1e-4
        loaded.cursor[:] = (STOPPED, 3, 2, 2)  # as the fast path leaves a step it stopped at its third call
        with pytest.raises(TEEError, match="step 3 was stopped part-way"):
            run_step(loaded, 4)
        assert loaded.cursor[0] == 0 and loaded.online.current is None  # the inference is ended
        with pytest.raises(TEEError, match="out of order"):
            run_step(loaded, 3)  # not run again from its start
        assert relative_error(model(x), reference(original, x)) <= 1e-4  # the next inference is whole
        loaded.cursor[:] = (STOPPED, 3, 99, 2)  # a call the step does not have: nothing to resume from
        with pytest.raises(TEEError, match="stopped part-way"):
            run_step(loaded, 3)
        assert loaded.cursor[0] == 0
    context.close()


def test_a_check_failed_on_the_fast_path_is_reported_though_the_honest_result_is_put_back(offloaded,
                                                                                           monkeypatch):
    """The fast path hands a failed check's step to the TA's Python. That ran the restore again, reading
    the results anew: a normal world that put the honest result back in between (a helper's C thread won
    39 of 40 races) had its tampering go unreported - one free try per step, and a bit about the secret
    projections each time. The failure is now reported from the run that failed."""
    from tee_sim.secure_world_fast import STOPPED

    original, out = offloaded
    context = _in_this_process(monkeypatch)
    made, stops = [], []

    def on_stop():
        sessions = context._transport._os._sessions.values()
        if made and any(int(s.context["model"].cursor[0]) == STOPPED for s in sessions):
            stops.append(made[0].round)  # the fast path stopped a step: its check failed there
            made[0].put_back()

    _through_fast_path(context, monkeypatch, on_stop=on_stop)
    rng = np.random.default_rng(2)
    with shadownet.load(out, background_refill=False, verify=True,
                        accelerator=lambda inner: made.append(_Tamper(inner)) or made[-1]) as model:
        for r in (1, 2, 3):
            x = rng.uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
            model(x)  # the slot's checked steps run in C
            made[0].armed, made[0].round = True, r
            with pytest.raises(IntegrityError, match="failed verification"):
                model(x)
            assert stops[-1:] == [r]
            made[0].armed = False
            assert relative_error(model(x), reference(original, x)) <= 1e-4
    context.close()


@pytest.mark.parametrize("request_", ["step 0", "refill"])
def test_a_check_failed_on_the_fast_path_is_reported_whatever_request_comes_next(offloaded, monkeypatch,
                                                                                  request_):
    """The normal world may rewrite the request the fast path stopped before the TA's Python reads it: asked
    for a new inference's step 0, the TA abandoned the stopped one without a word of its failed check (a
    helper's probe: 15 of 15 races won), and so did any other command (a review). The failure is reported
    whatever the request."""
    from tee_sim.errors import TEE_ERROR_MAC_INVALID
    from tee_sim.params import TEEC_VALUE_INPUT, TEEC_VALUE_OUTPUT
    from tee_sim.secure_os import NO_PARAMS
    from tee_sim.secure_world_fast import STOPPED
    from tee_sim.ta_shadownet_commands import Command

    original, out = offloaded
    context = _in_this_process(monkeypatch)
    secure_os = context._transport._os
    made, codes = [], []
    value = {"step 0": (Command.RUN_STEP, ((TEEC_VALUE_INPUT, 0, 0, 0, 0, 0),)),
             "refill": (Command.REFILL_POOL, ((TEEC_VALUE_INPUT, 0, 0, 0, 0, 0),
                                              (TEEC_VALUE_OUTPUT, 0, 0, 0, 0, 0)))}[request_]

    def on_stop():
        for sid, s in list(secure_os._sessions.items()):
            if made and int(s.context["model"].cursor[0]) == STOPPED:
                made[0].put_back()
                command, wire = value  # the request rewritten: another one instead
                codes.append(secure_os.invoke(sid, command, wire + NO_PARAMS[len(wire):]).code)

    _through_fast_path(context, monkeypatch, on_stop=on_stop)
    x = np.random.default_rng(3).uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
    with shadownet.load(out, background_refill=False, verify=True,
                        accelerator=lambda inner: made.append(_Tamper(inner)) or made[-1]) as model:
        model(x)
        made[0].armed = True
        with pytest.raises(shadownet.exceptions.ShadowNetError):
            model(x)
        made[0].armed = False
        assert codes == [TEE_ERROR_MAC_INVALID]
        assert relative_error(model(x), reference(original, x)) <= 1e-4
    context.close()


def test_verified_steps_stopped_to_move_a_mask_resume_without_a_false_alarm(all_masked, monkeypatch):
    """Verified, every round masked, inputs whose scale changes call after call: steps that hold checked
    restores stop on the fast path for a mask to move (a push's spread check, a restore's measure) and
    resume, never taken for a failed check (a push's check answered 1 as a failed check does, told apart
    then by its place alone; it answers 2 now: a review)."""
    from tee_sim.secure_world_fast import STOPPED
    from tee_sim.ta_shadownet_restore_push import SPREAD_OUTSIDE

    original, out = all_masked
    context = _in_this_process(monkeypatch)
    secure_os = context._transport._os
    answers = []

    def on_stop():
        for s in secure_os._sessions.values():
            loaded = s.context.get("model")
            if loaded is not None and int(loaded.cursor[0]) == STOPPED:
                answers.append(int(loaded.cursor[3]))

    _through_fast_path(context, monkeypatch, on_stop=on_stop)
    rng = np.random.default_rng(4)
    with shadownet.load(out, background_refill=False, verify=True) as model:
        for scale in (1, 1, 255, 300, 1, 255):
            model.refill_masks()
            x = (scale * rng.uniform(0, 1, (1, 16, 16, 3))).astype(np.float32)
            assert relative_error(model(x), reference(original, x)) <= 1e-4
    assert answers and set(answers) == {SPREAD_OUTSIDE}, answers
    context.close()

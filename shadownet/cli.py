"""The ``shadownet`` command line: one entry point, one sub-command per job.

Every sub-command lives in the module that owns the work; this file only parses arguments, keeps
native log noise off the terminal and turns the errors a user can cause into one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# TensorFlow's C++ logging reads this at import time; the CLI never wants it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# numpy's OpenBLAS reads this at import time. The converter's work is thousands of small factorizations
# (QR / SVD of 16-filter groups), where a second BLAS thread only spins, against LiteRT's threads too:
# MobileNet's groupmix conversion took 11 s with two BLAS threads and 5 s with one on this 2-core machine
# under load (the secure world pins its own to one for the same reason).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ZOO_NAMES = ("mobilenet", "resnet44", "resnet404", "minivgg", "yolov4-tiny")
MAX_RUNS = 10_000  # bench's --num_runs and --warmup_runs (a billion ran until killed: a helper's probe)


def silence_litert_info() -> None:
    """Consume LiteRT's log-once "Created TensorFlow Lite XNNPACK delegate" line with stderr closed.

    LiteRT prints it from C++ the first time a process creates an XNNPACK interpreter and offers no
    Python switch; creating one tiny interpreter with file descriptor 2 pointed at /dev/null uses up
    the "once", so real errors printed later still reach the terminal.
    """
    from ai_edge_litert.interpreter import Interpreter

    from converters.graph import tiny_model_bytes

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        interpreter = Interpreter(model_content=tiny_model_bytes(), num_threads=1)
        interpreter.allocate_tensors()
        interpreter.invoke()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cmd_zoo(args: argparse.Namespace) -> None:
    from models.zoo import check_output_name, export, testset_path
    from shadownet.files import check_destination

    check_output_name(args.output)
    check_destination(args.output, replace=args.force)
    if args.train:
        check_destination(testset_path(args.output), replace=args.force)
    export(args.name, args.output, seed=args.seed, train=args.train)  # which checks -o before building


def _cmd_convert(args: argparse.Namespace) -> None:
    from shadownet.api import convert_cli

    convert_cli(args)


def _cmd_run(args: argparse.Namespace) -> None:
    from shadownet.api import run_cli

    run_cli(args)


def _cmd_demo(args: argparse.Namespace) -> None:
    from shadownet.demo import main as demo

    demo(args)


def _cmd_bench(args: argparse.Namespace) -> None:
    from shadownet.bench import bench_cli

    bench_cli(args)


def _cmd_audit(args: argparse.Namespace) -> None:
    from shadownet.audit import audit_cli

    audit_cli(args)


def _cmd_device_export(args: argparse.Namespace) -> None:
    from shadownet.device import export_identity
    from shadownet.files import check_destination

    check_destination(args.file, replace=args.force)
    fingerprint = export_identity(args.file)
    print(f"device identity written to {args.file} (device key fingerprint {fingerprint}: give it to the "
          "vendor by a channel other than the file's, to convert with --device-key)")


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int of at least ``minimum`` (and at most ``maximum``): a value out of range is
    a usage error, exit 2."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {value}")
        return value

    return count


_SEED = _at_least(0, 2**32 - 1)


def _fingerprint(text: str) -> str:
    """An argparse type: a device key's fingerprint (``converters.provisioning.fingerprint_of``)."""
    from converters.provisioning import fingerprint_of

    try:
        return fingerprint_of(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _path(text: str) -> str:
    """An argparse type: a path, not empty ("" was taken as the current directory - "." has no manifest.json,
    "." is not a SavedModel - or was loaded as a delegate: a helper's probe)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


def _library(text: str) -> str:
    """An argparse type: ``--delegate``, a path as the CLI's other paths are - a bare name that is a file
    here is that file ('--delegate mine.so' was looked up on the library path, as dlopen looks up a bare
    name, and said "No such file" of a file that was there); any other bare name is left to the loader's
    search. The Python API's ``delegate=`` is dlopen's, unchanged."""
    text = _path(text)
    return os.path.abspath(text) if "/" not in text and os.path.isfile(text) else text


def _scheme(text: str) -> str:
    """An argparse type: a scheme spec ``converters.schemes.get_scheme`` takes (a usage error, exit 2)."""
    from converters.schemes import get_scheme

    try:
        get_scheme(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _mask_rounds(text: str) -> str:
    """An argparse type: a ``--mask-rounds`` policy, its syntax checked (the rounds against the model's
    later)."""
    from converters.per_inference import mask_round_ranges

    try:
        mask_round_ranges(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shadownet", description="Protect a CNN's weights with a TEE and an untrusted accelerator."
    )
    from shadownet import MAX_THREADS, __version__

    parser.add_argument("--version", action="version", version=f"shadownet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("zoo", help="export a model of the paper's zoo to .tflite")
    p.add_argument("name", choices=ZOO_NAMES)
    p.add_argument("-o", "--output", required=True, type=_path, help="FILE.tflite to write")
    p.add_argument("--seed", type=_SEED, default=0, help="weight seed (default 0)")
    p.add_argument("--train", choices=("digits",), help="train on a data set that ships with a package")
    p.add_argument("--force", action="store_true", help="replace FILE.tflite (and its test set) if it exists")
    p.set_defaults(func=_cmd_zoo, command_parser=p)

    p = sub.add_parser("convert", help="protect a model (untrusted.tflite, secrets.sealed, manifest.json)")
    p.add_argument("model", type=_path, help="a float .tflite, a Keras file or a SavedModel directory")
    p.add_argument("-o", "--output", required=True, type=_path, help="artifact directory to create")
    p.add_argument("--scheme", type=_scheme, default=None, metavar="NAME[:key=value,...]",
                   help="obfuscation scheme: groupmix (the default) or shadownet (the paper's), with its "
                        "parameters (README, Schemes)")
    p.add_argument("--seed", type=_SEED, default=None, help="INSECURE: reproducible secrets, for tests only")
    p.add_argument("--calibration", type=_path,
                   help="FILE.npz (.npy: one input) of representative inputs, for mask scales")
    p.add_argument("--device", type=_path, help="FILE from `shadownet device export` on the target device")
    p.add_argument("--device-key", dest="device_key", metavar="FINGERPRINT", type=_fingerprint,
                   help="pin the --device FILE's key: the fingerprint `device export` printed on the device")
    p.add_argument("--force", action="store_true", help="replace an earlier conversion's output directory")
    p.add_argument("--mask-rounds", dest="mask_rounds", type=_mask_rounds, default=None, metavar="POLICY",
                   help="rounds with one-time masks (schemes without static masks): 'auto' (default: "
                        "'all' where every round's masks take at most 4 MiB of a pool entry and no layer's "
                        "weights 16 MiB, else 'first'), 'first', 'all' or round numbers such as 1,2,5 or "
                        "1-4; round 1 always, any round a user input joins later, and any round that reads "
                        "what one layer made of it or whose input is too narrow to mix")
    p.add_argument("--signature", metavar="KEY",
                   help="the signature to protect, in a model that has several")
    p.set_defaults(func=_cmd_convert, command_parser=p)

    p = sub.add_parser("run", help="protected inference on an artifact directory")
    p.add_argument("artifacts", type=_path, help="directory written by `shadownet convert`")
    p.add_argument("--input", required=True, type=_path,
                   help="X.npy, or X.npz keyed by input tensor (or signature input) names")
    p.add_argument("--output", type=_path, help="Y.npz to write, keyed by output tensor names")
    p.add_argument("--num_threads", type=_at_least(1, MAX_THREADS), default=None,
                   help="accelerator threads (default: LiteRT's)")
    p.add_argument("--delegate", type=_library, help="external delegate PATH.so for the accelerator")
    p.add_argument("--verify", action="store_true", help="check every accelerator result in the TEE")
    p.set_defaults(func=_cmd_run, command_parser=p)

    p = sub.add_parser("bench", help="protected vs unprotected vs all-in-TEE latency, memory and breakdown")
    p.add_argument("files", nargs="*", type=_path, metavar="FILE.tflite",
                   help="models to benchmark besides --models (also Keras files or SavedModel directories)")
    p.add_argument("--models", help="comma-separated zoo names or model files (default: all five zoo "
                                    "models when no FILE is given)")
    p.add_argument("--signature", metavar="KEY",
                   help="the signature to measure in the models that have several (others ignore it)")
    p.add_argument("--scheme", type=_scheme, default=None, metavar="NAME[:key=value,...]",
                   help="obfuscation scheme: groupmix (the default) or shadownet (the paper's), with its "
                        "parameters (README, Schemes)")
    p.add_argument("--num_threads", type=_at_least(1, MAX_THREADS), default=2,
                   help="accelerator / unprotected threads (default 2)")
    p.add_argument("--num_runs", type=_at_least(1, MAX_RUNS), default=20,
                   help="timed runs per mode (default 20)")
    p.add_argument("--warmup_runs", type=_at_least(0, MAX_RUNS), default=3,
                   help="untimed runs first (default 3)")
    p.add_argument("--delegate", type=_library,
                   help="external delegate PATH.so for the accelerator and unprotected LiteRT")
    p.add_argument("--json", type=_path, help="write the report as JSON")
    p.add_argument("--markdown", type=_path, help="write the report as Markdown")
    p.add_argument("--plot", type=_path, help="write a PNG of the breakdown (needs matplotlib)")
    p.add_argument("--throughput", action="store_true",
                   help="frames/s per mode (protected: two frames in flight, and one at a time)")
    p.add_argument("--verify", action="store_true",
                   help="add the mode shadownet-verify (every accelerator result checked): its overhead")
    p.add_argument("--mask-rounds", dest="mask_rounds", type=_mask_rounds, default=None, metavar="POLICY",
                   help="convert with one-time masks on these rounds: 'auto' (the converter's default), "
                        "'first', 'all', or round numbers such as 1,2,5 or 1-4")
    p.add_argument("--workdir", type=_path,
                   help="keep exported zoo models here and reuse them (default: temporary)")
    p.set_defaults(func=_cmd_bench, command_parser=p)

    p = sub.add_parser("audit", help="run the attack suite against what the normal world sees")
    p.add_argument("artifacts", type=_path, help="directory written by `shadownet convert`")
    p.add_argument("--reference", required=True, type=_path,
                   help="the original model, as convert took it: .tflite, Keras file or SavedModel "
                        "directory (the attacker's best guess)")
    p.add_argument("--inferences", type=_at_least(0), default=None,
                   help="inferences to observe at the boundary (default: as many as the attacks on the "
                        "crossings want for every conv and depthwise layer, within bounds; the report lists "
                        "the layers that wanted more)")
    p.add_argument("--public", type=_path, metavar="PUBLIC",
                   help="public weights of the same architecture that the protected model was fine-tuned "
                        "from: also report how much of the private change an attacker holding them learns")
    p.add_argument("--critical-points", dest="critical_points", nargs="?", const=True, default=False,
                   type=_at_least(1), metavar="BUDGET",
                   help="also run the critical-point attack on the first layer from the first deeper round "
                        "that crosses without one-time masks, within BUDGET inferences (default 4000); what "
                        "it recovers counts in the table (crit, and any)")
    p.add_argument("--mask-fit", dest="mask_fit", nargs="?", const=True, default=False,
                   type=_at_least(1), metavar="BUDGET",
                   help="also fit the first layer through the one-time mask of the round that carries its "
                        "activated output, from BUDGET inferences of random inputs (default 1600); what it "
                        "recovers counts in the table (fit, and any)")
    p.add_argument("--json", type=_path, help="also write the report as JSON to this file")
    p.set_defaults(func=_cmd_audit, command_parser=p)

    p = sub.add_parser("demo", help="the README's main job: protect MiniVGG and MobileNet, compare them")
    p.add_argument("--workdir", type=_path,
                   help="where to keep models and artifacts (default: a temporary directory); "
                        "its minivgg_digits.tflite and mobilenet.tflite (and test set) are reused if there, "
                        "their .protected directories replaced")
    p.set_defaults(func=_cmd_demo, command_parser=p)

    p = sub.add_parser("device", help="this device's attestation identity")
    dsub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    e = dsub.add_parser("export", help="write the attestation public key and a fresh report")
    e.add_argument("file", type=_path)
    e.add_argument("--force", action="store_true", help="replace the file if it exists")
    e.set_defaults(func=_cmd_device_export, command_parser=e)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    command = getattr(args, "command_parser", parser)  # a usage error points at its command's --help
    if extras:
        command.error(f"unrecognized arguments: {' '.join(extras)}")
    if getattr(args, "device_key", None) and not args.device:
        command.error("argument --device-key: pins the key of a --device FILE, which is missing")
    func: Callable[[argparse.Namespace], None] = args.func
    received: list[int] = []  # SIGINT / SIGTERM while the command ran
    main_thread = threading.current_thread() is threading.main_thread()  # Python sets handlers there only
    # A signal the caller ignores stays ignored (a background job of a script: SIGINT is SIG_IGN, and a
    # Ctrl-C aimed at the script stopped it - a review), as does one whose handler was set outside Python
    # (None: it could not be put back)
    previous = {sig: handler for sig in (signal.SIGINT, signal.SIGTERM)
                if (handler := signal.getsignal(sig)) not in (signal.SIG_IGN, None)} if main_thread else {}
    swallowed = ""
    try:
        silence_litert_info()  # numpy's and LiteRT's C extensions imported before SIGTERM may interrupt
        for sig in previous:
            signal.signal(sig, _interrupt_handler(received))
        func(args)
    except KeyboardInterrupt:
        return _stopped(received)
    except BrokenPipeError as exc:
        if not _stdout_closed():  # another pipe's (none is expected): an error like any other
            return _report(exc)
        # The reader of our output left (``shadownet demo | head``): stop quietly, as tools do
        _discard_stdout()
        return 141
    except Exception as exc:  # noqa: BLE001 - the one place errors become a line on stderr
        if not received:
            return _report(exc)
        swallowed = f" (and then {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Every way out: an interrupt that became another error, or that a callback swallowed, exited by
        # SIGINT too (a review). One that leaves main() sets the flag again on its way.
        _forget_unhandled_interrupt()
    if received:  # the interrupt became another error (inside an import), or was ignored (a callback)
        return _stopped(received, swallowed)
    return 0


def run() -> None:
    """The process's entry point (the ``shadownet`` script, ``python -m shadownet``): ``main()``, then exit
    with its code. Once the command is done, Ctrl-C and SIGTERM are ignored while the interpreter tears
    down (the secure world's sessions, TensorFlow's clean-up): they ended the process by the signal, with
    no word and the output complete (a helper's probe), and cut TensorFlow's clean-up short (a review)."""
    _standard_descriptors()
    code = main()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # kept through finalization (a handler is not)
    sys.exit(code)


def _standard_descriptors() -> None:
    """Point a closed standard descriptor (``>&-``, ``2>&-``) at /dev/null. Python leaves ``sys.stdout`` or
    ``sys.stderr`` None for one, and every command then failed at its first flush, exit 3 (a helper's
    probe: ``run --output`` lost its result); and the next file opened would take the number, so that
    what LiteRT's C++ writes to descriptor 2 would land in it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself, the lower ones open
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the process's, for its whole life
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


def _stdout_failed(exc: OSError) -> bool:
    """Whether ``exc`` (an ``OSError`` with no file's name) is standard output's (``> /dev/full``: a ``print``
    failed): writing it fails with the same error; if so it is discarded. Not for a stdout with no
    descriptor (captured, redirected in Python: a review's traceback)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
        return False
    try:
        os.write(fd, b"")  # nothing where it works (a failed flush may drop its data)
        return False
    except OSError as failed:
        if failed.errno != exc.errno:
            return False
        _discard_stdout()
        return True


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that Python's flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _stdout_closed() -> bool:
    """Whether standard output is a pipe or a socket whose reader has closed it (poll says POLLERR for a
    pipe, POLLHUP for a socket)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor (captured)
        return False


def _forget_unhandled_interrupt() -> None:
    """Undo a CPython flag that would make ``python -m shadownet`` die by SIGINT after main() returned.

    A KeyboardInterrupt that leaves code run by ``exec`` of a string (dataclasses and namedtuple make their
    methods so, in a module imported mid-command) sets CPython's "unhandled KeyboardInterrupt" flag, though
    main() catches it further up; ``-m`` then ends the process by SIGINT whatever exit code it was given
    (exit -2 in about one SIGTERM test run in four). Each ``exec`` of a string clears the flag first."""
    exec("")  # noqa: S102 - an empty string: nothing runs


def _interrupt_handler(received: list[int]) -> Callable[[int, Any], None]:
    """Ctrl-C (SIGINT) and SIGTERM (``kill``, a service manager): a KeyboardInterrupt, as Python's own
    handler raises, recorded - the same clean-up (no half-written output, no temporary directories; a
    helper's probe found both left by SIGTERM), then "interrupted", exit 130, or "terminated", 143, also when
    the interrupt became another error on its way (raised inside a C extension: Keras's seed cast made one a
    TypeError, exit 3, a helper's probe) or a callback swallowed it."""
    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    return handler


def _stopped(received: list[int], swallowed: str = "") -> int:
    """The line and exit code of a command stopped by a signal (``received``: SIGTERM among them says
    "terminated")."""
    terminated = signal.SIGTERM in received
    print(f"shadownet: {'terminated' if terminated else 'interrupted'}{swallowed}", file=sys.stderr)
    return 143 if terminated else 130


def _report(exc: Exception) -> int:
    from shadownet.debug import debugging
    from shadownet.exceptions import ShadowNetError

    # The secure world's own answer (e.g. its storage), when its module was imported: importing it here
    # imports numpy, and out of memory at start-up that failed again, a traceback (a helper's probe)
    tee_errors = sys.modules.get("tee_sim.errors")
    tee_error = tee_errors.TEEError if tee_errors is not None else ()
    if isinstance(exc, MemoryError):  # the user's machine, not a bug of ours
        print(f"shadownet: error: out of memory{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
        return 1
    if isinstance(exc, ShadowNetError | OSError | ValueError) or isinstance(exc, tee_error):
        message = str(exc) or type(exc).__name__
        if isinstance(exc, tee_error) and exc.origin == tee_errors.TEEC_ORIGIN_API and exc.message:
            message = exc.message  # the client library refused a setting: its code adds nothing
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:  # not "[Errno 2] ..."
            message = f"{exc.filename}: {exc.strerror}"
        elif isinstance(exc, OSError) and exc.strerror and _stdout_failed(exc):  # "> /dev/full"
            message = f"writing standard output: {exc.strerror}"
        # One line: a line break in the message (a path given with one: a helper's probe cut "no\nsuch"'s
        # error to "artifact directory no") is shown escaped, as Python writes it in a string.
        one_line = "\\n".join(message.strip().splitlines())
        print(f"shadownet: error: {one_line}", file=sys.stderr)
        return 1
    # The first line that says something (numpy's ImportError, out of memory at start-up, begins with a
    # line break: "internal error (ImportError: )", a helper's probe), and what caused it
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        first += f" ({str(exc.__cause__).strip().splitlines()[0]})"
    if debugging():
        traceback.print_exception(exc)
    hint = "" if debugging() else "; set SHADOWNET_DEBUG=1 for a traceback"
    print(f"shadownet: internal error ({type(exc).__name__}: {first}){hint}", file=sys.stderr)
    return 3  # not 2, argparse's for a flag the user mistyped: this one is ours

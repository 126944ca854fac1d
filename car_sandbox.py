"""The sandbox for vlm_car_reward.py's generated reward programs: checked at load, run in a worker process.

Generated code is hostile input. `load_checker(code)` refuses, with `UnsafeCodeError`, any program that uses
more than numpy, math and a few builtins, or reaches for names, attributes or strings through which Python
leads to files, processes or the interpreter's internals. `Sandbox` runs the accepted programs in a fresh
`python -I` worker of its own with the same allowlists and OS limits, and stands it up again when a program
hangs or kills it; `SubtaskProgress` keeps, over a vector env, the sub-task each env is at and sends each env's
frame to its next program. `save_programs` and `load_programs` write and read back a folder of accepted programs
(`subtask_<k>.py` and `programs.json`); what is read back goes through `load_checker` again. Only
vlm_car_reward.py uses this file; it lives apart so that the one piece that must be audited as a whole can be
read as a whole.
"""

import ast
import fcntl
import inspect
import json
import os
import pickle
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np

MAX_PROGRAM_CHARS = 20_000
# What a program may use. The parent checks names and attributes at load; the worker gets only these objects.
NUMPY_API = [
    "abs", "absolute", "add", "all", "allclose", "amax", "amin", "any", "arange", "argmax", "argmin", "argsort",
    "argwhere", "array", "array_equal", "asarray", "bincount", "bool_", "ceil", "clip", "concatenate",
    "count_nonzero", "cumsum", "diff", "divide", "dot", "e", "equal", "exp", "expand_dims", "flatnonzero", "flip",
    "fliplr", "flipud", "float32", "float64", "floor", "full", "full_like", "greater", "greater_equal", "histogram",
    "hstack", "inf", "int16", "int32", "int64", "int8", "isclose", "isfinite", "isin", "isinf", "isnan", "linspace",
    "log", "logical_and", "logical_not", "logical_or", "logical_xor", "less", "less_equal", "max", "maximum",
    "mean", "median", "min", "minimum", "mod", "multiply", "nan", "newaxis", "nonzero", "not_equal", "ones",
    "ones_like", "percentile", "pi", "prod", "ravel", "repeat", "reshape", "rint", "roll", "rot90", "round", "sign",
    "sort", "sqrt", "square", "squeeze", "stack", "std", "subtract", "sum", "swapaxes", "tile", "transpose",
    "uint16", "uint32", "uint8", "unique", "var", "vstack", "where", "zeros", "zeros_like"
]
MATH_API = [
    "ceil", "cos", "e", "exp", "fabs", "floor", "hypot", "inf", "isclose", "isfinite", "isnan", "log", "pi", "sin",
    "sqrt", "tan"
]
SAFE_BUILTINS = [
    "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "filter", "float", "frozenset", "int", "isinstance",
    "len", "list", "map", "max", "min", "pow", "range", "reversed", "round", "set", "slice", "sorted", "str", "sum",
    "tuple", "zip", "ArithmeticError", "Exception", "IndexError", "KeyError", "TypeError", "ValueError",
    "ZeroDivisionError"
]
FORBIDDEN_NAMES = {
    "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "hasattr", "globals", "locals", "vars",
    "dir", "input", "breakpoint", "help", "memoryview", "type", "object", "super", "classmethod", "staticmethod",
    "property", "exit", "quit", "print", "id", "bytearray", "bytes", "BaseException", "SystemExit",
    "KeyboardInterrupt", "GeneratorExit", "os", "sys", "subprocess", "socket", "signal", "shutil", "pathlib",
    "builtins", "importlib", "ctypes", "resource", "multiprocessing", "threading", "pickle", "marshal", "io"
}
# numpy's and Python's ways out (files, raw memory, interpreter frames) and the ways to make a frame writable
FORBIDDEN_ATTRIBUTES = {
    "tofile", "dump", "dumps", "load", "loads", "save", "savez", "savez_compressed", "savetxt", "loadtxt",
    "fromfile", "frombuffer", "fromregex", "genfromtxt", "memmap", "ctypes", "ctypeslib", "lib", "DataSource",
    "setflags", "flags", "format", "format_map", "mro", "system", "popen", "fork", "environ", "modules", "getfield",
    "setfield", "itemset"
}
FORBIDDEN_ATTRIBUTE_PREFIXES = ("_", "f_", "gi_", "cr_", "ag_", "tb_", "co_")
ALLOWED_IMPORTS = {("numpy", "np"), ("math", None), ("math", "math")}


# ---------------------------------------------------------------------------------------------------------------------
# Generated code is hostile input: checked at load, run in a worker process
# ---------------------------------------------------------------------------------------------------------------------
class UnsafeCodeError(ValueError):
    """A program that may not run: it does not parse, has no `check(frame)`, or uses a forbidden construct."""


def load_checker(code: str) -> str:
    """Validate a program and return it ready for the sandbox (the allowed imports removed: np and math are given).

    Allowed: `import numpy as np`, `import math`, constants, and functions, one of them `def check(frame)`. Refused:
    any other import, names or attributes starting with `_` (no dunder walks), the builtins and attributes that reach
    files, processes, raw memory or the interpreter (FORBIDDEN_NAMES, FORBIDDEN_ATTRIBUTES), classes, generators'
    and tracebacks' frames, `global`, `with`, bare `except:` (it would swallow the worker's time limit).
    """
    if len(code) > MAX_PROGRAM_CHARS:
        raise UnsafeCodeError(f"the program has {len(code)} characters, more than {MAX_PROGRAM_CHARS}")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError) as error:
        raise UnsafeCodeError(f"the program does not parse ({type(error).__name__}: {error})") from None
    body = []
    for statement in tree.body:
        if isinstance(statement, ast.Import) and all((a.name, a.asname) in ALLOWED_IMPORTS for a in statement.names):
            continue
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            raise UnsafeCodeError(f"line {statement.lineno} imports: only `import numpy as np` and `import math` exist")
        if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
            try:
                ast.literal_eval(statement.value)
            except ValueError:
                raise UnsafeCodeError(f"line {statement.lineno}: top-level assignments must be constants") from None
        elif not isinstance(statement, ast.FunctionDef) and not (
            isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
        ):
            raise UnsafeCodeError(f"line {statement.lineno}: only imports, constants and functions at the top level")
        body.append(statement)
    checks = [s for s in body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if len(checks) != 1:
        raise UnsafeCodeError("the program must define `def check(frame)` exactly once")
    arguments = checks[0].args
    if len(arguments.args) != 1 or arguments.vararg or arguments.kwarg or arguments.kwonlyargs or arguments.posonlyargs:
        raise UnsafeCodeError("`check` must take exactly one argument, the frame")
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            raise UnsafeCodeError(f"{where} imports inside a function")
        if isinstance(node, (ast.Global, ast.Nonlocal, ast.ClassDef, ast.AsyncFunctionDef, ast.Await, ast.Yield,
                             ast.YieldFrom, ast.With, ast.AsyncWith, ast.AsyncFor)):
            raise UnsafeCodeError(f"{where} uses `{type(node).__name__}`, which programs may not")
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            raise UnsafeCodeError(f"{where} has a bare `except:`; name the exceptions")
        if isinstance(node, ast.FunctionDef):
            if node.decorator_list:
                raise UnsafeCodeError(f"{where} decorates a function")
            for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                try:
                    ast.literal_eval(default)
                except ValueError:
                    raise UnsafeCodeError(f"{where}: default arguments must be constants") from None
        names = []
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.arg)):
            names.append(node.name if isinstance(node, ast.FunctionDef) else node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.append(node.name)
        for name in names:
            if name.startswith("_") or name in FORBIDDEN_NAMES:
                raise UnsafeCodeError(f"{where} uses the name `{name}`, which programs may not")
        if isinstance(node, ast.Attribute) and (
            node.attr.startswith(FORBIDDEN_ATTRIBUTE_PREFIXES) or node.attr in FORBIDDEN_ATTRIBUTES
        ):
            raise UnsafeCodeError(f"{where} reads the attribute `.{node.attr}`, which programs may not")
        if isinstance(node, ast.keyword) and node.arg and node.arg.startswith("_"):
            raise UnsafeCodeError(f"{where} passes the keyword `{node.arg}`, which programs may not")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "__" in node.value:
            raise UnsafeCodeError(f"{where} has a string with `__`, which programs may not")
    return ast.unparse(ast.Module(body=body, type_ignores=[]))


def sandbox_worker() -> None:
    """The worker's main loop. It runs in a fresh `python -I` of its own (see Sandbox), which knows nothing of this
    file: it imports what it needs here, and gets its allowlists and limits from the parent's first message."""
    import builtins
    import json
    import math
    import os
    import pickle
    import resource
    import signal
    import struct
    import types

    import numpy as np

    # the protocol keeps private copies of the pipes; fds 0, 1, 2 go to /dev/null
    read_fd, write_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)

    def receive() -> object:  # from the trusted parent: pickles
        data = b""
        while len(data) < 8 or len(data) < 8 + struct.unpack("<Q", data[:8])[0]:
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                os._exit(0)
            data += chunk
        return pickle.loads(data[8:])

    def send(message: dict) -> None:  # to the parent: JSON only, so that nothing from a program can unpickle there
        data = json.dumps(message).encode()
        data = struct.pack("<Q", len(data)) + data
        while data:
            data = data[os.write(write_fd, data):]

    class TimeLimit(BaseException):  # not an Exception: `except Exception` in a program cannot catch it
        pass

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeLimit

    # RLIMIT_CPU is checked against the kernel's tick-sampled CPU clock, which drifts from the precise one that
    # getrusage reports (ahead or behind, by seconds over a long run: more than a batch's whole budget). An ITIMER_PROF
    # counts down on that same clock, so one armed for ever (its signal ignored) reads it.
    prof_clock_start = 1e9
    signal.signal(signal.SIGPROF, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_PROF, prof_clock_start)

    def cpu_seconds() -> float:  # the CPU time that RLIMIT_CPU sees
        return prof_clock_start - signal.getitimer(signal.ITIMER_PROF)[0]

    config, programs = receive()
    signal.signal(signal.SIGALRM, on_alarm)
    if os.getuid() == 0:  # as root the process limit would not hold: become nobody
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    numpy_api = types.SimpleNamespace(**{name: getattr(np, name) for name in config["numpy"]})
    math_api = types.SimpleNamespace(**{name: getattr(math, name) for name in config["math"]})
    safe_builtins = {name: getattr(builtins, name) for name in config["builtins"]}

    def numpy_import(name: str, *arguments: object) -> object:  # numpy's C code imports its own modules by name
        if name == "numpy" or name.startswith("numpy."):
            return builtins.__import__(name, *arguments)
        raise ImportError(name)

    safe_builtins["__import__"] = numpy_import  # programs cannot name it: underscores are refused at load
    # no memory beyond the limit, no files written, no processes, no core dumps, no new file descriptors
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"], config["memory_bytes"]))
    for limit in (resource.RLIMIT_FSIZE, resource.RLIMIT_NPROC, resource.RLIMIT_CORE):
        resource.setrlimit(limit, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(read_fd, write_fd) + 1, max(read_fd, write_fd) + 1))

    def call(function: object, *arguments: object) -> tuple[object, str | None]:
        signal.setitimer(signal.ITIMER_REAL, config["time_limit"])
        try:
            return function(*arguments), None
        except TimeLimit:
            return None, "ran past its time limit"
        except Exception as error:  # noqa: BLE001 (whatever a program raises means "not done")
            return None, f"{type(error).__name__}: {error}"[:300]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    checks, loaded = [], []
    for program in programs:
        namespace = {"__builtins__": safe_builtins, "np": numpy_api, "math": math_api}
        _, error = call(exec, program, namespace)
        checks.append(namespace.get("check") if error is None else None)
        loaded.append(error)
    send({"loaded": loaded})

    while True:
        starts, sequences = receive()
        budget = config["time_limit"] * (sum(len(s) for s in sequences) + len(sequences)) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_seconds() + budget) + 1, resource.RLIM_INFINITY))
        completed, errors = [], []
        for start, frames in zip(starts, sequences):
            steps, k, stuck = [], start, False
            for t in range(len(frames)):
                while k < len(checks) and not stuck:
                    frame = frames[t].copy()  # each call gets its own read-only copy
                    frame.setflags(write=False)
                    result, error = call(checks[k], frame) if checks[k] else (None, "did not load")
                    if error is None and not isinstance(result, (bool, np.bool_)):
                        error = f"returned {type(result).__name__}, not a bool"
                    if error is not None:
                        errors.append(f"sub-task {k + 1}, frame {t}: {error}")
                        stuck = error == "ran past its time limit"  # one time-out per sequence, not one per frame
                    if error is not None or not result:
                        break
                    steps.append(t)
                    k += 1
            completed.append(steps)
        send({"completed": completed, "errors": len(errors), "messages": errors[:5]})


WORKER_SOURCE = f"{inspect.getsource(sandbox_worker)}\nsandbox_worker()\n"  # read once, at import


class WorkerFailure(Exception):
    """The worker died, hung past its deadline or answered something that is not the protocol."""


PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size; a vector step of 16 UnlockPickup frames is about 200 KiB


class Sandbox:
    """The programs of one run in a worker process of their own: a fresh `python -I` with an empty environment and
    working directory (as nobody when started as root), restricted builtins, numpy and math behind allowlists, and
    limits on memory (RLIMIT_AS), CPU time, file size (0), processes (0) and file descriptors. A batch of frame
    sequences goes in (`submit`), and for each the frames at which the next sub-tasks completed in order come back
    (`collect`). A call that raises or runs past its time limit is "not done"; a worker that dies, hangs or answers
    outside the protocol is killed and restarted, and its batch counts as "not done"."""

    def __init__(self, programs: Sequence[str], time_limit: float = 0.1, memory_mb: int = 1024):
        self.programs, self.time_limit, self.memory_mb = list(programs), time_limit, memory_mb
        self.errors, self.restarts, self.messages = 0, 0, []
        self.process: subprocess.Popen | None = None
        self.load_errors = self._start()

    def _start(self) -> list[str | None]:
        self.workdir = tempfile.mkdtemp(prefix="vlm-car-worker-")
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", WORKER_SOURCE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.workdir,
            env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, start_new_session=True,
        )
        try:  # room for a whole batch of frames in the pipe, so that `submit` returns without waiting for the worker
            fcntl.fcntl(self.process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (AttributeError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: the default works, with waits
            pass
        config = {"numpy": NUMPY_API, "math": MATH_API, "builtins": SAFE_BUILTINS, "time_limit": self.time_limit,
                  "memory_bytes": self.memory_mb << 20}
        try:
            failed = self._send((config, self.programs))
            if failed:
                raise WorkerFailure(failed)
            reply = self._receive(time.monotonic() + 10.0 + self.time_limit * len(self.programs))
        except WorkerFailure as error:
            raise SystemExit(f"The worker that runs the reward programs did not start ({error}).") from None
        loaded = reply.get("loaded")
        if not (isinstance(loaded, list) and len(loaded) == len(self.programs)):
            raise SystemExit("The worker that runs the reward programs answered its setup wrongly.")
        return [error if isinstance(error, str) else None for error in loaded]

    def _send(self, message: object) -> str | None:
        """Write a request; why it failed, or None."""
        data = pickle.dumps(message, protocol=5)
        try:
            self.process.stdin.write(struct.pack("<Q", len(data)) + data)
            self.process.stdin.flush()
        except OSError as error:
            return f"its pipe closed ({type(error).__name__})"
        return None

    def _receive(self, deadline: float) -> dict:
        """The worker's answer, read until `deadline` (time.monotonic())."""
        fd, reply = self.process.stdout.fileno(), b""
        while len(reply) < 8 or len(reply) < 8 + struct.unpack("<Q", reply[:8])[0]:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise WorkerFailure("no answer in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerFailure(f"it exited with status {self.process.wait()}")
            reply += chunk
        try:
            answer = json.loads(reply[8:])
        except ValueError:
            raise WorkerFailure("its answer is not JSON") from None
        if not isinstance(answer, dict):
            raise WorkerFailure("its answer is not a JSON object")
        return answer

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                try:
                    stream.close()
                except OSError:  # a killed worker leaves the request unsent
                    pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _note(self, message: str) -> None:
        self.messages = (self.messages + [message])[-20:]

    def submit(self, starts: Sequence[int], sequences: Sequence[np.ndarray]) -> None:
        """Send a batch: for each sequence of frames, the programs from sub-task starts[i] on. `collect` answers it, so
        the trainer can work while the worker checks."""
        self.request = (list(starts), [len(frames) for frames in sequences])
        self.deadline = time.monotonic() + 1.0 + self.time_limit * (sum(self.request[1]) + len(sequences))
        self.send_failure = self._send((list(starts), list(sequences)))

    def collect(self) -> list[list[int]]:
        """For each sequence of the submitted batch, the indices of the frames at which sub-tasks starts[i],
        starts[i] + 1, ... completed, each program evaluated from the frame where the previous one completed."""
        starts, lengths = self.request
        try:
            if self.send_failure:
                raise WorkerFailure(self.send_failure)
            answer = self._receive(self.deadline)
            completed = answer.get("completed")
            if not (isinstance(completed, list) and len(completed) == len(starts) and all(
                isinstance(steps, list) and len(steps) <= len(self.programs) - start
                and all(isinstance(t, int) and 0 <= t < length for t in steps)
                for steps, start, length in zip(completed, starts, lengths)
            )):
                raise WorkerFailure("its answer does not fit the request")
        except WorkerFailure as error:
            self.errors += 1
            self.restarts += 1
            self._note(f"worker killed and restarted: {error}")
            self._stop()
            self._start()
            return [[] for _ in starts]
        errors, messages = answer.get("errors"), answer.get("messages")
        self.errors += errors if isinstance(errors, int) else 1
        for message in messages[:5] if isinstance(messages, list) else []:
            self._note(str(message)[:300])
        return completed

    def advance(self, starts: Sequence[int], sequences: Sequence[np.ndarray]) -> list[list[int]]:
        """`submit`, then `collect`."""
        self.submit(starts, sequences)
        return self.collect()

    def close(self) -> None:
        """Stop the worker."""
        self._stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SubtaskProgress:
    """The sub-tasks that each env of a vector env has completed, in order, in its episode, checked by the worker.
    `submit` sends the frames of a vector step, each env's next not-yet-completed program first in line, in one worker
    call; `collect` (called one step later: the worker checks while the agent acts) returns the sub-tasks each env
    completed in that step, and the sub-tasks completed in the episodes that ended in that step, whose progress starts
    again from 0. An env that has completed every sub-task is not checked again in its episode."""

    def __init__(self, sandbox: Sandbox, num_envs: int):
        self.sandbox = sandbox
        self.progress = np.zeros(num_envs, dtype=np.int64)  # sub-tasks completed, in order, in each env's episode
        self.pending: tuple[np.ndarray, np.ndarray] | None = None  # the submitted step's active envs and ended envs

    def submit(self, frames: np.ndarray, ended: np.ndarray) -> None:
        active = np.flatnonzero(self.progress < len(self.sandbox.programs))
        self.sandbox.submit(self.progress[active].tolist(), [frames[i][None] for i in active])
        self.pending = (active, ended)

    def collect(self) -> tuple[np.ndarray, list[int]]:
        active, ended = self.pending
        self.pending = None
        new = np.zeros(len(self.progress), dtype=np.int64)
        new[active] = [len(steps) for steps in self.sandbox.collect()]
        self.progress += new
        completed = [int(self.progress[i]) for i in np.flatnonzero(ended)]
        self.progress[ended] = 0
        return new, completed


# ---------------------------------------------------------------------------------------------------------------------
# The accepted programs on disk: runs/<run_name>/reward_programs, read back by --reward-programs
# ---------------------------------------------------------------------------------------------------------------------
def save_programs(path: str | Path, env_id: str, checker_input: str, tile_size: int, subtasks: Sequence[str],
                  programs: Sequence[str]) -> None:
    """Write the programs (subtask_1.py, ...) and programs.json, which `load_programs` reads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = [f"subtask_{k + 1}.py" for k in range(len(programs))]
    for k, (subtask, program, name) in enumerate(zip(subtasks, programs, files)):
        (path / name).write_text(f"# sub-task {k + 1}: {subtask}\n{program}")
    manifest = {"env_id": env_id, "checker_input": checker_input, "tile_size": tile_size,
                "subtasks": list(subtasks), "files": files}
    (path / "programs.json").write_text(json.dumps(manifest, indent=2) + "\n")


def load_programs(path: str, env_id: str, checker_input: str, tile_size: int) -> tuple[list[str], list[str]]:
    """The sub-tasks and validated programs of a --reward-programs folder, checked against this run's flags."""
    try:
        manifest = json.loads((Path(path) / "programs.json").read_text())
        subtasks, files = [str(s) for s in manifest["subtasks"]], [str(f) for f in manifest["files"]]
        codes = [(Path(path) / name).read_text() for name in files]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"--reward-programs {path} is not a folder of reward programs ({type(error).__name__}: "
                         f"{error}); pass a runs/<run_name>/reward_programs folder.") from None
    for flag, value in (("env_id", env_id), ("checker_input", checker_input), ("tile_size", tile_size)):
        if manifest.get(flag) != value and not (flag == "tile_size" and checker_input == "state"):
            name = "--" + flag.replace("_", "-")
            raise SystemExit(f"--reward-programs {path} was written for {name} {manifest.get(flag)}, not {value}: "
                             f"pass {name} {manifest.get(flag)}.")
    if not subtasks or len(subtasks) != len(files):
        raise SystemExit(f"--reward-programs {path} lists {len(subtasks)} sub-tasks and {len(files)} files.")
    programs = []
    for name, code in zip(files, codes):
        try:
            programs.append(load_checker(code))
        except UnsafeCodeError as error:
            raise SystemExit(f"--reward-programs {path}: {name} is refused ({error}).") from None
    return subtasks, programs

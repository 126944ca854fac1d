"""The sandbox for vlm_car_reward.py's generated reward programs: checked at load, run in a confined worker process.

Generated code is hostile input, and each of the two layers holds on its own. `load_checker(code)` allows rather than
forbids: a program may use only the statements, expressions, attributes, keywords and names on its allowlists (what
numpy code on a frame needs), so that a construct nobody thought of is refused (`UnsafeCodeError`, for any input).
`Sandbox` runs the accepted programs in a fresh `python -I` worker of its own that, before it loads any program,
installs a default-deny seccomp filter (memory, time, its two pipes, signals to itself, exit), no-new-privs, a
parent-death signal, non-dumpability and a Landlock ruleset that grants no path; its answers are bounded JSON read
on deadlines, it is stood up again when a program hangs or kills it, and a program that keeps failing is disabled.
`save_programs` and `load_programs` write and read back a folder of accepted programs (`subtask_<k>.py` and
`programs.json`); what is read back goes through `load_checker` again. Only vlm_car_reward.py uses this file (it
never imports the script, whose reward rule drives the worker); it lives apart so that the one piece that must be
audited as a whole can be read as a whole.
"""

import ast
import fcntl
import inspect
import json
import mmap
import os
import pickle
import select
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self

import numpy as np

MAX_PROGRAM_CHARS = 20_000
MAX_PROGRAM_DEPTH = 64  # AST nesting; deeper code is refused before anything recursive (literal_eval, unparse) sees it
# fmt: off
# What a program may use: everything else is refused at load, so that a construct nobody thought of is refused too.
# The worker gets only these objects.
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
# no `str`: the repr of a function or array method holds its address
SAFE_BUILTINS = [
    "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "filter", "float", "frozenset", "int", "isinstance",
    "len", "list", "map", "max", "min", "pow", "range", "reversed", "round", "set", "slice", "sorted", "sum", "tuple",
    "zip", "ArithmeticError", "Exception", "IndexError", "KeyError", "TypeError", "ValueError", "ZeroDivisionError"
]
# Attributes a program may read, on any object: numpy's and math's allowed functions, what an array, its dtype and
# Python's containers offer for computing. Not `data`, `base`, `ctypes`, `view`, `resize`, `flags`, `format`, ...
ALLOWED_ATTRIBUTES = frozenset(NUMPY_API + MATH_API + [
    "T", "argmax", "argmin", "argsort", "astype", "clip", "copy", "cumsum", "dot", "dtype", "flatten", "item",
    "itemsize", "kind", "max", "mean", "min", "name", "nbytes", "ndim", "nonzero", "prod", "ravel", "repeat",
    "reshape", "round", "shape", "size", "sort", "squeeze", "std", "sum", "swapaxes", "tolist", "transpose", "var",
    "add", "append", "count", "difference", "discard", "extend", "get", "index", "insert", "intersection",
    "issubset", "issuperset", "items", "keys", "pop", "remove", "reverse", "union", "update", "values",
])
ALLOWED_KEYWORDS = frozenset([
    "a_max", "a_min", "append", "assume_unique", "atol", "axes", "axis", "bins", "decimals", "ddof", "default",
    "density", "dtype", "endpoint", "equal_nan", "fill_value", "initial", "invert", "k", "keepdims", "key", "max",
    "min", "minlength", "n", "num", "prepend", "q", "range", "return_counts", "return_index", "return_inverse",
    "reverse", "rtol", "shape", "start", "step", "stop", "weights", "where",
])
# Statements and expressions of plain numeric code. Not there, among others: classes, `match`, f-strings, `with`,
# `global` / `nonlocal`, generators' `yield`, `async`, imports inside functions, `try ... finally`.
ALLOWED_NODES = tuple(getattr(ast, name) for name in [
    "Module", "FunctionDef", "arguments", "arg", "Return", "Assign", "AugAssign", "For", "While", "If", "Break",
    "Continue", "Pass", "Expr", "Try", "ExceptHandler", "Raise", "Assert", "Delete", "BoolOp", "BinOp", "UnaryOp",
    "Compare", "Call", "IfExp", "Lambda", "NamedExpr", "Constant", "Attribute", "Subscript", "Slice", "Starred",
    "Name", "List", "Tuple", "Set", "Dict", "ListComp", "SetComp", "DictComp", "GeneratorExp", "comprehension",
    "keyword", "Load", "Store", "Del", "And", "Or", "Add", "Sub", "Mult", "MatMult", "Div", "Mod", "Pow", "LShift",
    "RShift", "BitOr", "BitXor", "BitAnd", "FloorDiv", "Invert", "Not", "UAdd", "USub", "Eq", "NotEq", "Lt", "LtE",
    "Gt", "GtE", "Is", "IsNot", "In", "NotIn",
])
ALLOWED_CONSTANTS = (bool, int, float, complex, str, type(None), type(...))
ALLOWED_IMPORTS = {("numpy", "np"), ("math", None), ("math", "math")}
# What the worker may ask of the kernel once its OS layer is in place: memory, time, its own signals, exit. read,
# write, kill, tgkill and prlimit64 are added with their arguments pinned (its two pipes, itself).
WORKER_SYSCALLS = [
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "futex", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "sigaltstack", "setitimer", "getitimer", "clock_gettime", "clock_getres", "gettimeofday",
    "getrusage", "times", "getpid", "gettid", "sched_yield", "getrandom", "restart_syscall", "exit", "exit_group",
]
# fmt: on
MAX_REPLY_BYTES = 1 << 20  # the longest answer the parent reads from a worker
MAX_REPLY_DEPTH = 4  # brackets open at once in an answer: {"completed": [[1, 2]]} has 3


# ---------------------------------------------------------------------------------------------------------------------
# Generated code is hostile input: checked at load, run in a confined worker process
# ---------------------------------------------------------------------------------------------------------------------
class UnsafeCodeError(ValueError):
    """A program that may not run: it does not parse, has no `check(frame)`, or uses a construct not allowed."""


def load_checker(code: str) -> str:
    """Validate a program and return it ready for the sandbox (the allowed imports removed: np and math are given).
    Raises UnsafeCodeError, and nothing else, for any input.

    Allowed: `import numpy as np`, `import math`, constants, and functions, one of them `def check(frame)`, made of
    the statements and expressions in ALLOWED_NODES, reading only the attributes in ALLOWED_ATTRIBUTES, passing only
    the keywords in ALLOWED_KEYWORDS and naming only SAFE_BUILTINS, np, math and the program's own names (none
    starting with `_`). Type annotations are dropped; strings may not hold `__` or `%`; `except` must name its
    exceptions.
    """
    if not isinstance(code, str):
        raise UnsafeCodeError(f"the program is a {type(code).__name__}, not text")
    if len(code) > MAX_PROGRAM_CHARS:
        raise UnsafeCodeError(f"the program has {len(code)} characters, more than {MAX_PROGRAM_CHARS}")
    try:
        return _checked_program(code)
    except UnsafeCodeError:
        raise
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError, OverflowError) as error:
        raise UnsafeCodeError(f"the program cannot be read ({type(error).__name__}: {str(error)[:200]})") from None


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def _checked_program(code: str) -> str:
    with warnings.catch_warnings():  # the parser's warnings about a program's escapes are not the trainer's
        warnings.simplefilter("ignore")
        tree = ast.parse(code)
    stack = [(tree, 0)]
    while stack:  # no recursion: the depth is what is being checked
        node, depth = stack.pop()
        if depth > MAX_PROGRAM_DEPTH:
            raise UnsafeCodeError(f"the program nests deeper than {MAX_PROGRAM_DEPTH} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    body = []
    for statement in tree.body:
        if isinstance(statement, ast.Import) and all((a.name, a.asname) in ALLOWED_IMPORTS for a in statement.names):
            continue
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            raise UnsafeCodeError(f"line {statement.lineno} imports: only `import numpy as np` and `import math` exist")
        if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
            if not _is_literal(statement.value):
                raise UnsafeCodeError(f"line {statement.lineno}: top-level assignments must be constants")
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
    module = ast.Module(body=body, type_ignores=[])
    nodes = list(ast.walk(module))
    for node in nodes:  # annotations mean nothing at run time, and `np.ndarray` in one would be refused
        if isinstance(node, ast.FunctionDef):
            node.returns = None
        elif isinstance(node, ast.arg):
            node.annotation = None
    nodes = list(ast.walk(module))
    defined = {n.id for n in nodes if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    defined |= {n.name for n in nodes if isinstance(n, ast.FunctionDef)}
    defined |= {n.arg for n in nodes if isinstance(n, ast.arg)}
    defined |= {n.name for n in nodes if isinstance(n, ast.ExceptHandler) and n.name}
    private = sorted(name for name in defined if name.startswith("_"))
    if private:
        raise UnsafeCodeError(f"the program defines the name `{private[0]}`; names may not start with `_`")
    known = defined | set(SAFE_BUILTINS) | {"np", "math"}
    for node in nodes:
        where = f"line {getattr(node, 'lineno', '?')}"
        if not isinstance(node, ALLOWED_NODES):
            raise UnsafeCodeError(f"{where} uses `{type(node).__name__}`, which programs may not")
        if isinstance(node, ast.Try) and node.finalbody:
            raise UnsafeCodeError(f"{where} has a `finally:`, which could outlast the time limit")
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            raise UnsafeCodeError(f"{where} has a bare `except:`; name the exceptions")
        if isinstance(node, ast.FunctionDef) and node.decorator_list:
            raise UnsafeCodeError(f"{where} decorates a function")
        if isinstance(node, ast.arguments) and not all(
            _is_literal(d) for d in node.defaults + [d for d in node.kw_defaults if d is not None]
        ):
            raise UnsafeCodeError(f"{where}: default arguments must be constants")
        if isinstance(node, ast.Name) and node.id not in known:
            raise UnsafeCodeError(f"{where} uses the name `{node.id}`, which is neither the program's own nor given")
        if isinstance(node, ast.Attribute) and (
            node.attr not in ALLOWED_ATTRIBUTES or not isinstance(node.ctx, ast.Load)
        ):
            raise UnsafeCodeError(
                f"{where} {'reads' if isinstance(node.ctx, ast.Load) else 'sets'} the attribute "
                f"`.{node.attr}`, which programs may not"
            )
        if isinstance(node, ast.keyword) and node.arg not in ALLOWED_KEYWORDS:
            raise UnsafeCodeError(f"{where} passes the keyword `{node.arg or '**'}`, which programs may not")
        if isinstance(node, ast.Constant) and not isinstance(node.value, ALLOWED_CONSTANTS):
            raise UnsafeCodeError(f"{where} has a {type(node.value).__name__} constant, which programs may not")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ("__" in node.value or "%" in node.value):
            raise UnsafeCodeError(
                f"{where} has a string with `__` or `%` (a format, which shows addresses), which programs may not"
            )
    return ast.unparse(module)


def sandbox_worker() -> None:
    """The worker's main loop. It runs in a fresh `python -I` of its own (see Sandbox), which knows nothing of this
    file: it imports what it needs here, and gets its allowlists and limits from the parent's first message. It
    installs its OS layer before it loads any program."""
    import builtins
    import ctypes
    import errno
    import json
    import math
    import os
    import pickle
    import resource
    import signal
    import struct
    import types

    import numpy as np

    # imported before the uid changes (nobody may not read the files) and before any program loads
    seccomp_missing = ""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as error:  # not installed, or libseccomp.so.2 cannot be loaded
        seccomp, seccomp_missing = None, f"{type(error).__name__}: {error}"
    try:
        import landlock
    except (ImportError, OSError):
        landlock = None

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
            data = data[os.write(write_fd, data) :]

    class TimeLimit(BaseException):  # not an Exception: `except Exception` in a program cannot catch it
        pass

    armed, fired = [False], [False]

    def on_alarm(signum: int, frame: object) -> None:
        fired[0] = True  # seen after the call even if the program swallowed TimeLimit
        if armed[0]:
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
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig, pr_set_dumpable, pr_set_no_new_privs = 1, 4, 38
    prctl = getattr(libc, "prctl", None)  # Linux's
    if prctl is not None:
        prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        prctl(pr_set_dumpable, 0, 0, 0, 0)  # no ptrace, no /proc/<pid>/mem or environ for processes of its uid
    if os.getppid() != config["parent"]:  # the trainer died before the signal was set
        os._exit(0)
    # the slot where the parent reads which program runs, should this process hang or die
    libc.mmap.restype, libc.mmap.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long],
    )
    address = libc.mmap(None, 8, 3, 1, config["slot_fd"], 0)  # PROT_READ | PROT_WRITE, MAP_SHARED
    os.close(config["slot_fd"])
    running = ctypes.c_int64.from_address(address) if address not in (None, ctypes.c_void_p(-1).value) else None

    safe_builtins = {name: getattr(builtins, name) for name in config["builtins"]}
    numpy_api = {name: getattr(np, name) for name in config["numpy"]}
    math_api = {name: getattr(math, name) for name in config["math"]}

    def numpy_import(name: str, *arguments: object) -> object:  # numpy's C code imports its own modules by name
        if name == "numpy" or name.startswith("numpy."):
            return builtins.__import__(name, *arguments)
        raise ImportError(name)

    def confine() -> str:
        """The OS layer: no new privileges, Landlock where the kernel has it, then a default-deny seccomp filter. What
        holds, in words; raises ImportError or OSError when the filter cannot be installed."""
        if prctl is None:
            raise OSError("no prctl: the OS layer needs Linux")
        if prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if seccomp is None:
            raise ImportError(seccomp_missing)
        rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
        for name in config["syscalls"]:
            rules.add_rule(seccomp.ALLOW, name)
        for name, argument in (
            ("read", read_fd),
            ("write", write_fd),
            ("kill", os.getpid()),
            ("tgkill", os.getpid()),
            ("prlimit64", 0),
        ):
            rules.add_rule(seccomp.ALLOW, name, seccomp.Arg(0, seccomp.EQ, argument))
        held = ["no-new-privs", "parent-death signal", "not dumpable"]
        try:
            if landlock is None:
                raise ImportError("landlock is not installed")
            ruleset = landlock.Ruleset()  # every filesystem right handled, none granted: no path can be opened
            ruleset.apply()
            os.close(ruleset._fd)
            held.append(f"Landlock ABI {landlock.landlock_abi_version()}")
        except (ImportError, OSError, AttributeError) as error:  # landlock's errors are OSErrors
            held.append(f"no Landlock ({type(error).__name__})")
        rules.load()
        return ", ".join(["seccomp"] + held)

    try:
        confinement = confine() if config["os_layer"] != "off" else "off (only the allowlists and limits)"
    except (ImportError, OSError, AttributeError, ValueError, RuntimeError) as error:
        reason = f"{type(error).__name__}: {error}"[:300]
        if config["os_layer"] == "require":
            send({"refused": reason})
            os._exit(0)
        confinement = f"unconfined ({reason})"
    # the limits hold where the filter does not: no memory beyond the limit, no files written, no processes, no core
    # dumps, no new file descriptors
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"], config["memory_bytes"]))
    for limit in (resource.RLIMIT_FSIZE, resource.RLIMIT_NPROC, resource.RLIMIT_CORE):
        resource.setrlimit(limit, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(read_fd, write_fd) + 1, max(read_fd, write_fd) + 1))

    def describe(error: BaseException) -> str:  # never formats what a program chose to put in its exception
        shown = [a for a in error.args[:3] if type(a) is str or (type(a) is int and abs(a) < 1 << 63)]
        text = f"{type(error).__name__}: {', '.join(str(a)[:200] for a in shown)}"[:300]
        return text.translate(str.maketrans("[]{}", "()()"))  # the parent bounds the answer's brackets

    def call(k: int, function: object, *arguments: object) -> tuple[object, str | None]:
        fired[0], armed[0] = False, True
        if running is not None:
            running.value = k + 1
        signal.setitimer(signal.ITIMER_REAL, config["time_limit"])
        try:
            result, error = function(*arguments), None
        except TimeLimit:
            result, error = None, "ran past its time limit"
        except BaseException as raised:  # noqa: BLE001 (whatever a program raises means "not done")
            result, error = None, describe(raised)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            if running is not None:
                running.value = 0
        if fired[0]:  # a program that caught its time limit (or returned from `finally:`) still ran past it
            return None, "ran past its time limit"
        return result, error

    def frozen(value: object) -> object:  # top-level constants cannot carry state from one call to the next
        if isinstance(value, (list, tuple)):
            return tuple(frozen(v) for v in value)
        if isinstance(value, (set, frozenset)):
            return frozenset(frozen(v) for v in value)
        if isinstance(value, dict):
            return types.MappingProxyType({k: frozen(v) for k, v in value.items()})
        return value

    def load(program: str, namespace: dict) -> None:  # run under the time limit, as a call
        exec(program, namespace)
        for name, value in list(namespace.items()):
            if isinstance(value, types.FunctionType):
                value.__defaults__ = frozen(value.__defaults__) if value.__defaults__ else None
            elif name not in ("__builtins__", "np", "math"):
                namespace[name] = frozen(value)

    checks, loaded = [], []
    for k, program in enumerate(programs):  # each program with its own namespaces: none can rebind another's np
        namespace = {
            "__builtins__": {**safe_builtins, "__import__": numpy_import},
            "np": types.SimpleNamespace(**numpy_api),
            "math": types.SimpleNamespace(**math_api),
        }
        _, error = call(k, load, program, namespace)
        check = namespace.get("check")
        checks.append(check if error is None and isinstance(check, types.FunctionType) else None)
        loaded.append(error if error is not None or checks[-1] is not None else "defines no function `check`")
    send({"loaded": loaded, "confinement": confinement})

    while True:
        starts, sequences, disabled = receive()
        budget = config["time_limit"] * (sum(len(s) for s in sequences) + len(sequences)) + 2
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_seconds() + budget) + 1, resource.RLIM_INFINITY))
        completed, errors = [], []
        failed, passed = [0] * len(checks), [0] * len(checks)  # per program: failures since its last success
        for start, frames in zip(starts, sequences):
            steps, k, stuck = [], start, False
            for t in range(len(frames)):
                while k < len(checks) and k not in disabled and not stuck:
                    frame = frames[t].copy()  # each call gets its own read-only copy
                    frame.setflags(write=False)
                    result, error = call(k, checks[k], frame) if checks[k] else (None, "did not load")
                    if error is None and not isinstance(result, (bool, np.bool_)):
                        error = f"returned {type(result).__name__}, not a bool"
                    if error is not None:
                        errors.append(f"sub-task {k + 1}, frame {t}: {error}")
                        failed[k] += 1
                        stuck = error == "ran past its time limit"  # one time-out per sequence, not one per frame
                    else:
                        failed[k], passed[k] = 0, 1
                    if error is not None or not result:
                        break
                    steps.append(t)
                    k += 1
            completed.append(steps)
        send(
            {"completed": completed, "errors": len(errors), "messages": errors[:5], "failed": failed, "passed": passed}
        )


WORKER_SOURCE = f"{inspect.getsource(sandbox_worker)}\nsandbox_worker()\n"  # read once, at import


class WorkerFailure(Exception):
    """The worker died, hung past its deadline or answered something that is not the protocol."""


class ConfinementUnavailable(Exception):
    """The worker could not install its OS layer, and running programs without it was not accepted."""


PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size; a vector step of 16 UnlockPickup frames is about 200 KiB
SETUP_SECONDS = 10.0  # to start a worker, install its OS layer and load the programs (plus their time limits)
NEVER_DONE = "def check(frame):\n    return False\n"  # what the worker runs in place of a program that did not load


class Sandbox:
    """The programs of one run in a worker process of their own: a fresh `python -I` with an empty environment and
    working directory (as nobody when started as root) that, before it loads a program, installs a default-deny
    seccomp filter (memory, time, its own pipes and signals, exit), no-new-privs, a parent-death signal, non-dumpability
    and, where the kernel has Landlock, a ruleset that grants no path; then restricted builtins, numpy and math behind
    allowlists, each program in namespaces of its own, and limits on memory (RLIMIT_AS), CPU time, file size (0),
    processes (0) and file descriptors. A batch of frame sequences goes in (`submit`), and for each the frames at which
    the next sub-tasks completed in order come back (`collect`). A call that raises or runs past its time limit is
    "not done"; a worker that dies, hangs or answers outside the protocol (too long, too deep, not JSON) is killed and
    restarted, and its batch counts as "not done". A program that fails `max_failures` calls in a row (a hang counts
    against the program that was running) is disabled: "not done" from then on. Where the OS layer cannot be
    installed the worker refuses to load the programs (ConfinementUnavailable) unless `os_layer` is "prefer" (the risk
    accepted: the OS layer where it can be installed); "off" leaves it out (to measure its cost, and in the tests)."""

    def __init__(
        self,
        programs: Sequence[str],
        time_limit: float = 0.1,
        memory_mb: int = 1024,
        os_layer: Literal["require", "prefer", "off"] = "require",
        max_failures: int = 10,
    ):
        self.programs, self.time_limit, self.memory_mb = list(programs), time_limit, memory_mb
        self.os_layer, self.max_failures = os_layer, max_failures
        self.errors, self.restarts, self.messages = 0, 0, []
        self.failures = [0] * len(self.programs)  # failed calls in a row, per program
        self.disabled: set[int] = set()
        self.unloadable: dict[int, str] = {}  # programs that stopped the worker while loading, and how
        self.process: subprocess.Popen | None = None
        self.load_errors = self._start()

    def _start(self) -> list[str | None]:
        """Start a worker; why each program did not load (None: it did). A program that kills or hangs the worker
        while it loads is replaced by one that is never done, and the worker started again."""
        while True:
            try:
                loaded = self._spawn()
            except WorkerFailure as error:
                running = struct.unpack("<q", self.slot_map[:8])[0]
                self._stop()
                if not 1 <= running <= len(self.programs):
                    raise SystemExit(f"The worker that runs the reward programs did not start ({error}).") from None
                self.unloadable[running - 1] = f"it stopped the worker while loading ({error})"
                continue
            return [self.unloadable.get(k, error) for k, error in enumerate(loaded)]

    def _spawn(self) -> list[str | None]:
        """Start one worker and read its answer to the setup: why each program did not load."""
        self.workdir = tempfile.mkdtemp(prefix="vlm-car-worker-")
        self.slot = tempfile.TemporaryFile()  # shared with the worker: the program it runs now (k + 1, 0: none)
        self.slot.truncate(8)
        self.slot_map = mmap.mmap(self.slot.fileno(), 8)
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", WORKER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=self.workdir,
            env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            start_new_session=True,
            pass_fds=(self.slot.fileno(),),
        )
        try:  # room for a whole batch of frames in the pipe, so that `submit` returns without waiting for the worker
            fcntl.fcntl(self.process.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (
            AttributeError,
            OSError,
        ):  # not Linux, or above /proc/sys/fs/pipe-max-size: the default works, with waits
            pass
        os.set_blocking(self.process.stdin.fileno(), False)  # `_send` waits on a deadline, not on the worker
        config = {
            "numpy": NUMPY_API,
            "math": MATH_API,
            "builtins": SAFE_BUILTINS,
            "syscalls": WORKER_SYSCALLS,
            "time_limit": self.time_limit,
            "memory_bytes": self.memory_mb << 20,
            "parent": os.getpid(),
            "slot_fd": self.slot.fileno(),
            "os_layer": self.os_layer,
        }
        programs = [NEVER_DONE if k in self.unloadable else program for k, program in enumerate(self.programs)]
        deadline = time.monotonic() + SETUP_SECONDS + self.time_limit * len(self.programs)
        failed = self._send((config, programs), deadline)
        if failed:
            raise WorkerFailure(failed)
        reply = self._receive(deadline)
        if "refused" in reply:
            self._stop()
            raise ConfinementUnavailable(str(reply["refused"])[:300])
        loaded = reply.get("loaded")
        if not (isinstance(loaded, list) and len(loaded) == len(self.programs)):
            raise WorkerFailure("it answered its setup wrongly")
        self.confinement = str(reply.get("confinement"))[:300]
        return [error[:300] if isinstance(error, str) else None for error in loaded]

    def _send(self, message: object, deadline: float) -> str | None:
        """Write a request before `deadline` (time.monotonic()); why it failed, or None."""
        data = pickle.dumps(message, protocol=5)
        view, fd = memoryview(struct.pack("<Q", len(data)) + data), self.process.stdin.fileno()
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([], [fd], [], remaining)[1]:
                return "it did not read its request in time"
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # the pipe filled between select and write
                continue
            except OSError as error:
                return f"its pipe closed ({type(error).__name__})"
        return None

    def _receive(self, deadline: float) -> dict:
        """The worker's answer, read until `deadline` (time.monotonic()), at most MAX_REPLY_BYTES and MAX_REPLY_DEPTH
        brackets deep."""
        fd, reply = self.process.stdout.fileno(), b""
        while len(reply) < 8 or len(reply) < 8 + struct.unpack("<Q", reply[:8])[0]:
            if len(reply) >= 8 and struct.unpack("<Q", reply[:8])[0] > MAX_REPLY_BYTES:
                raise WorkerFailure("its answer is too long")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise WorkerFailure("no answer in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise WorkerFailure(f"it exited with status {self.process.wait()}")
            reply += chunk
        text = np.frombuffer(reply, dtype=np.uint8, offset=8)
        depth = np.cumsum((text == ord("[")) | (text == ord("{")), dtype=np.int64) - np.cumsum(
            (text == ord("]")) | (text == ord("}")), dtype=np.int64
        )
        if len(text) > MAX_REPLY_BYTES or (len(depth) and depth.max() > MAX_REPLY_DEPTH):
            raise WorkerFailure("its answer is too long or too deep")
        try:
            answer = json.loads(reply[8:])
        except (ValueError, RecursionError):
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
        self.slot_map.close()
        self.slot.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _note(self, message: str) -> None:
        self.messages = (self.messages + [message])[-20:]

    def _failed(self, k: int, times: int, passed: bool = False) -> None:
        """Count program k's failures in a row; disable it at max_failures."""
        self.failures[k] = (0 if passed else self.failures[k]) + times
        if self.failures[k] >= self.max_failures and k not in self.disabled:
            self.disabled.add(k)
            self._note(f"sub-task {k + 1}'s program disabled after {self.failures[k]} failed calls in a row")

    def submit(self, starts: Sequence[int], sequences: Sequence[np.ndarray]) -> None:
        """Send a batch: for each sequence of frames, the programs from sub-task starts[i] on. `collect` answers it, so
        the trainer can work while the worker checks."""
        self.request = (list(starts), [len(frames) for frames in sequences])
        self.deadline = time.monotonic() + 1.0 + self.time_limit * (sum(self.request[1]) + len(sequences))
        self.send_failure = self._send((list(starts), list(sequences), self.disabled), self.deadline)

    def collect(self) -> list[list[int]]:
        """For each sequence of the submitted batch, the indices of the frames at which sub-tasks starts[i],
        starts[i] + 1, ... completed, each program evaluated from the frame where the previous one completed."""
        starts, lengths = self.request
        n = len(self.programs)
        try:
            if self.send_failure:
                raise WorkerFailure(self.send_failure)
            answer = self._receive(self.deadline)
            completed, failed, passed = answer.get("completed"), answer.get("failed"), answer.get("passed")
            if not (
                isinstance(completed, list)
                and len(completed) == len(starts)
                and all(
                    isinstance(steps, list)
                    and len(steps) <= n - start
                    and all(isinstance(t, int) and 0 <= t < length for t in steps)
                    for steps, start, length in zip(completed, starts, lengths)
                )
                and all(
                    isinstance(counts, list) and len(counts) == n and all(type(c) is int and c >= 0 for c in counts)
                    for counts in (failed, passed)
                )
            ):
                raise WorkerFailure("its answer does not fit the request")
        except WorkerFailure as error:
            running = struct.unpack("<q", self.slot_map[:8])[0]
            self.errors += 1
            self.restarts += 1
            self._note(
                f"worker killed and restarted: {error}"
                + (f" (sub-task {running}'s program was running)" if 1 <= running <= n else "")
            )
            if 1 <= running <= n:
                self._failed(running - 1, 1)
            self._stop()
            self._start()
            return [[] for _ in starts]
        errors, messages = answer.get("errors"), answer.get("messages")
        self.errors += errors if type(errors) is int and errors >= 0 else 1
        for message in messages[:5] if isinstance(messages, list) else []:
            self._note(str(message)[:300])
        for k in range(n):
            if failed[k] or passed[k]:
                self._failed(k, failed[k], bool(passed[k]))
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


def confinement_problem() -> str | None:
    """Why the worker's OS layer cannot be installed on this machine, or None when it can (a worker with no
    programs is started to find out)."""
    try:
        Sandbox([]).close()
    except ConfinementUnavailable as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The accepted programs on disk: runs/<run_name>/reward_programs, read back by --reward-programs
# ---------------------------------------------------------------------------------------------------------------------
def save_programs(
    path: str | Path, env_id: str, checker_input: str, tile_size: int, subtasks: Sequence[str], programs: Sequence[str]
) -> None:
    """Write the programs (subtask_1.py, ...) and programs.json, which `load_programs` reads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = [f"subtask_{k + 1}.py" for k in range(len(programs))]
    for k, (subtask, program, name) in enumerate(zip(subtasks, programs, files)):
        (path / name).write_text(f"# sub-task {k + 1}: {subtask}\n{program}")
    manifest = {
        "env_id": env_id,
        "checker_input": checker_input,
        "tile_size": tile_size,
        "subtasks": list(subtasks),
        "files": files,
    }
    (path / "programs.json").write_text(json.dumps(manifest, indent=2) + "\n")


MAX_MANIFEST_BYTES = 1 << 16
MAX_FOLDER_PROGRAMS = 32


def read_small_file(path: Path, limit: int) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes; OSError or ValueError for anything else (a FIFO or a
    device would hang or never end, so neither is read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))  # a FIFO opens without a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{path.name} is larger than {limit} bytes")
    return data.decode("utf-8")


def load_programs(path: str, env_id: str, checker_input: str, tile_size: int) -> tuple[list[str], list[str]]:
    """The sub-tasks and validated programs of a --reward-programs folder, checked against this run's flags. Only
    regular files of bounded size named by programs.json, in the folder itself, are read."""
    try:
        manifest = json.loads(read_small_file(Path(path) / "programs.json", MAX_MANIFEST_BYTES))
        subtasks, files = [str(s) for s in manifest["subtasks"]], [str(f) for f in manifest["files"]]
        if any(Path(name).name != name or name in ("", ".", "..") for name in files):
            raise ValueError("programs.json names a file outside the folder")
        if len(files) > MAX_FOLDER_PROGRAMS:
            raise ValueError(f"programs.json names {len(files)} files, more than {MAX_FOLDER_PROGRAMS}")
        codes = [read_small_file(Path(path) / name, 4 * MAX_PROGRAM_CHARS) for name in files]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise SystemExit(
            f"--reward-programs {path} is not a folder of reward programs ({type(error).__name__}: "
            f"{str(error)[:200]}); pass a runs/<run_name>/reward_programs folder."
        ) from None
    for flag, value in (("env_id", env_id), ("checker_input", checker_input), ("tile_size", tile_size)):
        if manifest.get(flag) != value and not (flag == "tile_size" and checker_input == "state"):
            name = "--" + flag.replace("_", "-")
            raise SystemExit(
                f"--reward-programs {path} was written for {name} {manifest.get(flag)}, not {value}: "
                f"pass {name} {manifest.get(flag)}."
            )
    if not subtasks or len(subtasks) != len(files):
        raise SystemExit(f"--reward-programs {path} lists {len(subtasks)} sub-tasks and {len(files)} files.")
    programs = []
    for name, code in zip(files, codes):
        try:
            programs.append(load_checker(code))
        except UnsafeCodeError as error:
            raise SystemExit(f"--reward-programs {path}: {name} is refused ({error}).") from None
    return subtasks, programs

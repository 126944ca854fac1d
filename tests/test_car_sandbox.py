"""car_sandbox: the load check (allowlists) and the worker's OS layer (seccomp, Landlock, no-new-privs), each tested
on its own with hostile programs, and the protocol between the trainer and the worker."""

import ctypes
import errno  # noqa: F401 (this and the other noqa imports: what sandbox_worker imports, loaded here so that a
import json  # worker forked from this process by nobody, who may not read their files, finds them loaded)
import os
import pickle  # noqa: F401
import re
import resource  # noqa: F401
import shutil
import signal
import socket
import struct  # noqa: F401
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import landlock  # noqa: F401
import numpy as np
import pyseccomp  # noqa: F401
import pytest

import car_sandbox
from car_sandbox import ConfinementUnavailable, Sandbox, UnsafeCodeError, load_checker, load_programs, save_programs

REFERENCE = Path(car_sandbox.__file__).resolve().parent / "reference_programs"
REFERENCE_PROGRAMS = {
    f"{env} {path.stem}": path.read_text()
    for env in ("DoorKey-8x8", "UnlockPickup")
    for path in sorted((REFERENCE / env).glob("subtask_*.py"))
}
NOBODY = 65534
needs_root_on_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="dropping to an unprivileged user needs root on Linux",
)

# Programs a coder might write: they must load and run without an error.
BENIGN = {
    "annotated": "import numpy as np\ndef check(frame: np.ndarray) -> bool:\n    return bool(frame.mean() > 10)",
    "docstring and constants": (
        '"""Is the key gone?"""\nimport numpy as np\nYELLOW = (255, 255, 0)\nLIMIT = 4\n'
        'def check(frame):\n    """True once no key pixel is left."""\n'
        "    mask = np.all(frame == np.array(YELLOW), axis=-1)\n"
        "    return int(mask.sum()) < LIMIT"
    ),
    "helper with defaults": (
        "def count(frame, colour=(0, 255, 0), tile=8):\n"
        "    return int(np.count_nonzero(np.all(frame == colour, axis=2))) // tile\n"
        "def check(frame):\n    return count(frame) >= 0"
    ),
    "loops and cells": (
        "def check(frame):\n    tile = frame.shape[0] // 8\n    found = []\n"
        "    for y in range(8):\n        for x in range(frame.shape[1] // tile):\n"
        "            cell = frame[y * tile:(y + 1) * tile, x * tile:(x + 1) * tile]\n"
        "            if cell[..., 1].max() == 255 and cell[..., 0].max() == 0:\n"
        "                found.append((x, y))\n    return len(found) == 0"
    ),
    "comprehensions": (
        "def check(frame):\n    means = [float(frame[..., c].mean()) for c in range(3)]\n"
        "    big = {i: m for i, m in enumerate(means) if m > 1}\n"
        "    return any(m > 200 for m in means) or len(big) > 5"
    ),
    "try except": (
        "def check(frame):\n    try:\n        return bool(frame[100, 100, 0] > 0)\n"
        "    except IndexError:\n        return False"
    ),
    "math": "import math\ndef check(frame):\n    return math.sqrt(float(frame.sum())) >= 0 and math.isfinite(1.0)",
    "while and walrus": (
        "def check(frame):\n    i = 0\n    while (i := i + 1) < 3:\n        pass\n    return i == 3 and frame.ndim == 3"
    ),
    "lambda and sorted": (
        "def check(frame):\n    counts = np.unique(frame.reshape(-1, 3), axis=0, return_counts=True)[1]\n"
        "    return sorted(counts.tolist(), key=lambda c: -c)[0] > 0"
    ),
    "dtype name": "def check(frame):\n    return frame.dtype.name == 'uint8' and frame.astype(np.int32).min() >= 0",
    "where and argwhere": (
        "def check(frame):\n    red = np.where(frame[..., 0] == 255, 1, 0)\n    return np.argwhere(red).shape[0] >= 0"
    ),
    "slices and transpose": "def check(frame):\n    return frame[::2, ::-1].transpose(1, 0, 2).shape[2] == 3",
    "assert and raise": (
        "def check(frame):\n    assert frame.ndim == 3\n    if frame.size == 0:\n"
        "        raise ValueError('empty frame')\n    return True"
    ),
    "dict constant": (
        "TARGETS = {'key': (255, 255, 0), 'goal': (0, 255, 0)}\n"
        "def check(frame):\n    return not np.any(np.all(frame == TARGETS['goal'], axis=-1)) or True"
    ),
    "clip and isin": "def check(frame):\n    return bool(np.isin(np.clip(frame, 0, 10), [10]).any() or True)",
    **REFERENCE_PROGRAMS,
}


def escape(action: str) -> str:
    """A program that walks to the real builtins (a path the load check refuses) and then tries `action`."""
    return (
        f"def check(frame):\n    for cls in ().__class__.__base__.__subclasses__():\n"
        f"        if cls.__name__ == '_wrap_close':\n            g = cls.__init__.__globals__\n"
        f"    b = g['__builtins__']\n    {action}\n    return True"
    )


# Refused at load: each class of the probe, and constructs nobody listed (refused because they are not allowed).
REFUSED_AT_LOAD = {
    # imports and the interpreter's internals
    "import os": "import os\ndef check(frame):\n    return os.system('touch pwned') == 0",
    "from import": "from subprocess import run\ndef check(frame):\n    return True",
    "import numpy as other": "import numpy as n\ndef check(frame):\n    return True",
    "import inside": "def check(frame):\n    import socket\n    return True",
    "__import__": "def check(frame):\n    return __import__('os').getcwd() == ''",
    "__builtins__": "def check(frame):\n    return __builtins__ is None",
    "dunder walk": "def check(frame):\n    return len(().__class__.__mro__[1].__subclasses__()) > 0",
    "frame dunder": "def check(frame):\n    return frame.__array_interface__ is None",
    "function globals": "def check(frame):\n    return check.__globals__ is None",
    "escape to builtins": escape("b['open']('pwned', 'w')"),
    "open / write": "def check(frame):\n    open('pwned', 'w').write('x')\n    return True",
    "socket": "def check(frame):\n    return socket.create_connection(('example.com', 80)) is None",
    "subprocess": "def check(frame):\n    return subprocess.call(['touch', 'pwned']) == 0",
    "eval": "def check(frame):\n    return eval('1') == 1",
    "exec": "def check(frame):\n    exec('x = 1')\n    return True",
    "compile": "def check(frame):\n    return compile('1', 'f', 'eval') is None",
    "getattr": "def check(frame):\n    return getattr(frame, '__class__') is None",
    "vars / globals": "def check(frame):\n    return 'np' in globals() or vars() is None",
    "type / object": "def check(frame):\n    return type(frame).mro() is None",
    "str (addresses)": "def check(frame):\n    return str(check) == ''",
    "print": "def check(frame):\n    print(frame)\n    return True",
    "breakpoint / input": "def check(frame):\n    breakpoint()\n    return input() == ''",
    "unknown name": "def check(frame):\n    return len(frames_before) > 0",
    "underscore name": "def check(frame):\n    _x = 1\n    return _x == 1",
    # structural pattern matching, f-strings and format strings
    "match class keyword": (
        "def check(frame):\n    match frame:\n        case object(__class__=c):\n"
        "            return c is None\n    return False"
    ),
    "match mapping": "def check(frame):\n    match {}:\n        case {'a': x}:\n            return x\n    return False",
    "match attribute": (
        "def check(frame):\n    match frame:\n        case np.ndarray(shape=s):\n            return s\n    return False"
    ),
    "f-string repr": "def check(frame):\n    return f'{check!r}' == ''",
    "f-string address": "def check(frame):\n    return int(f'{id}'[-15:-1], 16) > 0",
    "format string": "def check(frame):\n    return '{0.mro}'.format(frame) == ''",
    "format_map": "def check(frame):\n    return '{x}'.format_map({'x': 1}) == ''",
    "percent format": "def check(frame):\n    return ('%r' % (check,)) == ''",
    "dunder in a string": "def check(frame):\n    return frame.dtype.name == '__class__'",
    "bytes constant": "def check(frame):\n    return b'x' == b'x'",
    # numpy's raw memory, files and views
    "array interface": "def check(frame):\n    return np.asarray({'__array_interface__': {}}) is None",
    "frombuffer": "def check(frame):\n    return np.frombuffer(frame.data, np.uint8).size > 0",
    "frame.data": "def check(frame):\n    return frame.data is None",
    "frame.base": "def check(frame):\n    return frame.base is None",
    "view": "def check(frame):\n    return frame.view(np.int64).size > 0",
    "resize refcheck": (
        "def check(frame):\n    a = np.zeros(10)\n    v = a[:]\n    a.resize(10 ** 6, refcheck=False)\n"
        "    return v.sum() > 0"
    ),
    "np.ndarray buffer": "def check(frame):\n    return np.ndarray((10 ** 6,), np.uint8, frame).sum() > 0",
    "keyword like": "def check(frame):\n    return np.array([1], like=frame) is None",
    "keyword out": "def check(frame):\n    np.add(frame, 1, out=frame)\n    return True",
    "splat keywords": "def check(frame):\n    return np.sum(frame, **{'axis': 0}) is None",
    "np.save": "def check(frame):\n    np.save('pwned.npy', frame)\n    return True",
    "tofile": "def check(frame):\n    frame.tofile('pwned')\n    return True",
    "np.load / memmap": "def check(frame):\n    return np.memmap('pwned', mode='w+', shape=(1,)) is None",
    "np.lib": "def check(frame):\n    return np.lib.stride_tricks.as_strided(frame, (10**9,), (1,)).sum() > 0",
    "ctypes": "def check(frame):\n    return frame.ctypes.data > 0",
    "writable again": "def check(frame):\n    frame.setflags(write=True)\n    frame[:] = 0\n    return True",
    "flags": "def check(frame):\n    return frame.flags.writeable",
    # processes and signals
    "fork bomb": "import os\ndef check(frame):\n    while True:\n        os.fork()",
    "signal tampering": (
        "import signal\ndef check(frame):\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n    return True"
    ),
    # the time limit and the other programs
    "bare except": (
        "def check(frame):\n    try:\n        while True:\n            pass\n    except:\n        return True"
    ),
    "finally return": (
        "def check(frame):\n    try:\n        while True:\n            pass\n    finally:\n        return True"
    ),
    "except star": "def check(frame):\n    try:\n        pass\n    except* ValueError:\n        pass\n    return True",
    "rebinds np.mean": "def check(frame):\n    np.mean = None\n    return True",
    "function attribute state": "def check(frame):\n    check.calls = 1\n    return True",
    "global": "def check(frame):\n    global np\n    np = None\n    return True",
    "nonlocal": (
        "def check(frame):\n    n = 0\n    def inner():\n        nonlocal n\n        n = 1\n"
        "    inner()\n    return n == 1"
    ),
    "generator": "def check(frame):\n    yield True",
    "generator frames": "def check(frame):\n    return (x for x in [1]).gi_frame.f_back is None",
    "async": "async def check(frame):\n    return True",
    "with": "def check(frame):\n    with frame:\n        return True",
    "class": "class A:\n    pass\ndef check(frame):\n    return True",
    "top-level code": "while True:\n    pass\ndef check(frame):\n    return True",
    "top-level call": "X = np.zeros(10 ** 10)\ndef check(frame):\n    return True",
    "default argument": "def check(frame, big=[0] * 10**10):\n    return True",
    "decorator": "@np.vectorize\ndef check(frame):\n    return True",
    "annotated assignment": "X: int = 1\ndef check(frame):\n    return True",
    # malformed programs and inputs the parser chokes on
    "no check": "def verify(frame):\n    return True",
    "two checks": "def check(frame):\n    return True\ndef check(frame):\n    return False",
    "two arguments": "def check(frame, other):\n    return True",
    "does not parse": "def check(frame):\n    return (",
    "null byte": "def check(frame):\n    return True\x00",
    "deep nesting": "def check(frame):\n    return " + "[" * 70 + "]" * 70,
    "deeper nesting": "def check(frame):\n    return " + "[" * 10_000 + "]" * 10_000,
    "deep unary": "def check(frame):\n    return " + "-" * 100_000 + "1 > 0",
    "deep literal": "X = " + "[" * 90 + "]" * 90 + "\ndef check(frame):\n    return True",
    "huge int literal": "X = " + "9" * 5000 + "\ndef check(frame):\n    return True",
    "too long": "def check(frame):\n    return True\n" + "#" * car_sandbox.MAX_PROGRAM_CHARS,
    "not text": b"def check(frame):\n    return True",
    "None": None,
}


@pytest.mark.parametrize("name", list(REFUSED_AT_LOAD))
def test_hostile_code_is_refused_at_load(name):
    with pytest.raises(UnsafeCodeError):
        load_checker(REFUSED_AT_LOAD[name])


def test_load_checker_raises_only_unsafe_code_error():
    """Random fragments of Python, glued together: each either loads or raises UnsafeCodeError."""
    pieces = [
        "def check(frame):\n    return ",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        "frame",
        ".",
        "__class__",
        "mean",
        "1",
        "9" * 50,
        ",",
        ":",
        "lambda x: ",
        "not ",
        "'",
        '"',
        "\n",
        " if ",
        " else ",
        "*",
        "**",
        "-",
        "np",
        "match",
        "case",
        "f'{",
        "}'",
        "\\",
        "\x00",
        "yield",
        "import os",
        "\t",
        "é",
        "=",
        ";",
    ]
    rng = np.random.default_rng(0)
    for _ in range(1500):
        code = "".join(rng.choice(pieces, size=int(rng.integers(1, 40))))
        try:
            load_checker(code)
        except UnsafeCodeError:
            pass


def test_benign_programs_load_and_run_without_errors():
    programs = [load_checker(code) for code in BENIGN.values()]
    assert all("import" not in program for program in programs)
    frame = np.zeros((48, 88, 3), dtype=np.uint8)
    frame[8:16, 8:16] = (0, 255, 0)
    with Sandbox(programs, time_limit=1.0) as sandbox:
        assert sandbox.load_errors == [None] * len(programs)
        sandbox.advance(list(range(len(programs))), [frame[None]] * len(programs))
        assert sandbox.errors == 0, sandbox.messages


# Loaded, then misbehave when run: each counts as "not done".
FAIL_AT_RUN = {
    "infinite loop": "def check(frame):\n    while True:\n        pass",
    "loop in except": (
        "def check(frame):\n    try:\n        return 1 / 0\n    except ZeroDivisionError:\n"
        "        while True:\n            pass"
    ),
    "deep recursion": "def check(frame):\n    return check(frame)",
    "huge allocation": "def check(frame):\n    return np.ones(300_000_000).sum() > 0",
    "memory grows": "def check(frame):\n    x = [frame.tolist()]\n    while True:\n        x = x + x",
    # one BLAS call of seconds (686 GFLOP): the timer cannot stop it, the trainer's deadline does
    "long C call": "def check(frame):\n    x = np.ones((7000, 7000), np.float32)\n    return x.dot(x).sum() > 0",
    "writes into the frame": "def check(frame):\n    frame[:] = 0\n    return True",
    "not a bool": "def check(frame):\n    return frame",
    "raises": "def check(frame):\n    return 1 / 0 > 0",
    "state in a constant": "CALLS = [0]\ndef check(frame):\n    CALLS[0] += 1\n    return CALLS[0] > 1",
    "state in a default": (
        "def seen(x, memo=[]):\n    memo.append(x)\n    return len(memo)\ndef check(frame):\n    return seen(1) > 1"
    ),
    "state in a dict": "MEMO = {'n': 0}\ndef check(frame):\n    MEMO['n'] = MEMO['n'] + 1\n    return MEMO['n'] > 1",
}


def test_misbehaving_programs_are_not_done_and_the_trainer_is_unharmed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM)}
    programs = [load_checker(code) for code in FAIL_AT_RUN.values()]
    seen = np.stack([np.full((16, 16, 3), v, dtype=np.uint8) for v in (0, 255)])
    before = seen.copy()
    with Sandbox(programs, time_limit=0.2) as sandbox:
        assert sandbox.load_errors == [None] * len(programs)
        for k in range(len(programs)):  # each program first in line, on both frames, twice: never done
            assert sandbox.advance([k, k], [seen, seen]) == [[], []], list(FAIL_AT_RUN)[k]
        assert sandbox.errors >= 2 * len(programs)
        assert sandbox.restarts >= 1  # the long C call outlives the time limit: the worker is replaced
        assert sandbox.advance([0], [seen]) == [[]]  # the worker answers after its restart
    np.testing.assert_array_equal(seen, before)  # the trainer's frames did not change
    assert list(tmp_path.iterdir()) == []  # no file appeared
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_program_that_keeps_failing_is_disabled_and_a_hang_is_blamed_on_its_program():
    programs = [
        load_checker("def check(frame):\n    return True"),
        load_checker(FAIL_AT_RUN["raises"]),
        load_checker(FAIL_AT_RUN["long C call"]),
    ]
    frame = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    with Sandbox(programs, time_limit=0.2, max_failures=3) as sandbox:
        for _ in range(5):
            assert sandbox.advance([0], [frame]) == [[0]]  # program 2 raises: done with 1 only
        assert sandbox.disabled == {1} and sandbox.errors == 3  # not called after its third failure in a row
        assert any("sub-task 2's program disabled after 3 failed calls" in m for m in sandbox.messages)
        for _ in range(4):
            assert sandbox.advance([2], [frame]) == [[]]
        # three hangs (or time-outs, should the allocation outlast the time limit), each blamed on program 3
        assert sandbox.restarts >= 2 and sandbox.disabled == {1, 2}
        assert any("sub-task 3's program was running" in m for m in sandbox.messages)


def test_programs_have_their_own_numpy_and_no_state_survives_a_call():
    """Without the load check: one program rebinds np.mean and math.pi; the other's are untouched."""
    programs = [
        "def check(frame):\n    np.mean = None\n    math.pi = 3\n    return True",
        "def check(frame):\n    return bool(np.mean(frame) == 0 and math.pi > 3.1)",
    ]
    with Sandbox(programs) as sandbox:
        assert sandbox.advance([0, 1], [np.zeros((2, 1, 1, 3), np.uint8)] * 2) == [[0, 0], [0]]


def test_a_program_that_kills_the_worker_while_loading_is_replaced():
    """Without the load check, top-level code can end the worker before it answers: that program is replaced by one
    that is never done, and the others run."""
    crasher = (
        "for cls in ().__class__.__base__.__subclasses__():\n    if cls.__name__ == '_wrap_close':\n"
        "        cls.__init__.__globals__['_exit'](3)\ndef check(frame):\n    return True"
    )
    with Sandbox([crasher, load_checker("def check(frame):\n    return True")]) as sandbox:
        assert sandbox.load_errors[0].startswith("it stopped the worker while loading (it exited with status 3)")
        assert sandbox.load_errors[1] is None
        assert sandbox.advance([0, 1], [np.zeros((1, 1, 1, 3), np.uint8)] * 2) == [[], [0]]


def test_a_program_that_crashes_the_worker_is_blamed_and_disabled():
    """Without the load check a program can crash the worker (a segfault, as `resize(refcheck=False)` on a live view
    can): each crash restarts it and counts against the program, which is disabled after max_failures."""
    crasher = escape("ctypes = b['__import__']('ctypes')\n    ctypes.string_at(0)")
    with Sandbox([crasher], max_failures=2) as sandbox:
        for _ in range(3):
            assert sandbox.advance([0], [np.zeros((1, 1, 1, 3), np.uint8)]) == [[]]
        assert sandbox.restarts == 2 and sandbox.errors == 2 and sandbox.disabled == {0}
        assert "it exited with status -11" in sandbox.messages[0]


def test_a_time_limit_swallowed_by_finally_is_still_a_time_out():
    program = escape("").replace(
        "    return True", "    try:\n        while True:\n            pass\n    finally:\n        return True"
    )
    with Sandbox([program], time_limit=0.05) as sandbox:
        assert sandbox.advance([0], [np.zeros((1, 1, 1, 3), np.uint8)]) == [[]]
        assert sandbox.errors == 1 and "ran past its time limit" in sandbox.messages[-1]


def test_an_exception_that_cannot_be_formatted_is_counted_and_the_worker_lives():
    program = escape(
        "f = b['type']('F', (), {'__str__': lambda self: 1 / 0, '__repr__': lambda self: 1 / 0})\n"
        "    raise ValueError(f())"
    )
    with Sandbox([program]) as sandbox:
        for _ in range(3):
            assert sandbox.advance([0], [np.zeros((1, 1, 1, 3), np.uint8)]) == [[]]
        assert sandbox.errors == 3 and sandbox.restarts == 0


@pytest.mark.parametrize(
    "reply",
    [b"[" * 100_000, b'{"completed": [[[[[[1]]]]]]}', b"x" * (2 << 20), b"\xff\xfe"],
    ids=["deeply nested", "nested too deep", "too long", "not JSON"],
)
def test_a_worker_that_writes_garbage_is_restarted(reply):
    """Without the load check a program can write to the worker's own pipe: the trainer reads a bounded answer,
    refuses it, restarts the worker and goes on."""
    written = len(reply).to_bytes(8, "little") + (reply if len(reply) <= car_sandbox.MAX_REPLY_BYTES else reply[:9])
    program = escape(
        f"os = b['__import__']('os')\n    for fd in range(3, 8):\n        try:\n"
        f"            os.write(fd, {written!r})\n        except b['OSError']:\n            pass"
    )
    with Sandbox([program]) as sandbox:
        for restarts in (1, 2):
            assert sandbox.advance([0], [np.zeros((1, 1, 1, 3), np.uint8)]) == [[]]
            assert sandbox.restarts == restarts and sandbox.errors == restarts


def test_a_worker_that_stops_reading_does_not_hang_the_trainer():
    """Without the load check a program can make the worker stop reading its pipe (here: os.read replaced by a loop
    that ignores the timer): a request bigger than the pipe is given up at its deadline."""
    program = escape(
        "os, s = b['__import__']('os'), b['__import__']('signal')\n"
        "    def stuck(fd, n):\n        s.setitimer(s.ITIMER_REAL, 0)\n        while True:\n"
        "            pass\n    os.read = stuck"
    )
    big = np.zeros((40, 100, 100, 3), np.uint8)  # 1.2 MB: more than the pipe holds
    with Sandbox([program], time_limit=0.01) as sandbox:
        assert sandbox.advance([0], [big[:1]]) == [[0]]  # answered; from now on the worker reads nothing
        start = time.monotonic()
        sandbox.submit([0, 0, 0], [big, big, big])
        assert sandbox.collect() == [[], [], []]
        assert time.monotonic() - start < 10 and sandbox.restarts == 1


def test_without_the_os_layer_the_worker_refuses_unless_the_risk_is_accepted(monkeypatch):
    """A filter that cannot be installed (an unknown syscall in it): no program is loaded, ConfinementUnavailable;
    with os_layer="prefer" the programs run on the load check and the limits."""
    monkeypatch.setattr(car_sandbox, "WORKER_SYSCALLS", car_sandbox.WORKER_SYSCALLS + ["no_such_syscall"])
    with pytest.raises(ConfinementUnavailable, match="OSError"):
        Sandbox([load_checker("def check(frame):\n    return True")])
    with Sandbox([load_checker("def check(frame):\n    return True")], os_layer="prefer") as sandbox:
        assert sandbox.confinement.startswith("unconfined (OSError")
        assert sandbox.advance([0], [np.zeros((1, 1, 1, 3), np.uint8)]) == [[0]]
    monkeypatch.undo()
    with Sandbox([]) as sandbox:
        assert sandbox.confinement.startswith("seccomp, no-new-privs, parent-death signal, not dumpable")
    assert car_sandbox.confinement_problem() is None


def test_the_worker_dies_with_its_trainer():
    """A trainer killed with SIGKILL leaves no worker behind (the parent-death signal)."""
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import car_sandbox\n"
        "s = car_sandbox.Sandbox([]); print(s.process.pid, flush=True); time.sleep(60)"
    )
    trainer = subprocess.Popen([sys.executable, "-c", code, str(REFERENCE.parent)], stdout=subprocess.PIPE, text=True)
    worker = int(trainer.stdout.readline())
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 5
    while (
        time.monotonic() < deadline
        and Path(f"/proc/{worker}").exists()
        and "Z" not in Path(f"/proc/{worker}/stat").read_text().split(")")[-1][:3]
    ):
        time.sleep(0.05)
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split(")")[-1][:3]


@pytest.mark.parametrize("kind", ["fifo", "device", "huge", "outside", "nested json", "too many"])
def test_a_folder_of_programs_reads_only_small_regular_files(kind, tmp_path):
    folder = tmp_path / "programs"
    save_programs(folder, "MiniGrid-DoorKey-8x8-v0", "frame", 8, ["a"], ["def check(frame):\n    return True\n"])
    manifest = json.loads((folder / "programs.json").read_text())
    if kind == "fifo":
        (folder / "subtask_1.py").unlink()
        os.mkfifo(folder / "subtask_1.py")
    elif kind == "device":
        (folder / "subtask_1.py").unlink()
        (folder / "subtask_1.py").symlink_to("/dev/zero")
    elif kind == "huge":
        (folder / "subtask_1.py").write_text("#" * (1 << 20))
    elif kind == "outside":
        manifest["files"] = ["../../../../../../dev/zero"]
        (folder / "programs.json").write_text(json.dumps(manifest))
    elif kind == "nested json":
        (folder / "programs.json").write_text("[" * 100_000)
    else:
        manifest["subtasks"], manifest["files"] = ["a"] * 1000, ["subtask_1.py"] * 1000
        (folder / "programs.json").write_text(json.dumps(manifest))
    start = time.monotonic()
    with pytest.raises(SystemExit, match=r"is not a folder of reward programs \("):
        load_programs(str(folder), "MiniGrid-DoorKey-8x8-v0", "frame", 8)
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------------------------------------------------
# The OS layer alone: programs that skip the load check and reach the real builtins, os and libc
# ---------------------------------------------------------------------------------------------------------------------
def raw_programs(target: str, victim: int, other_worker: int, port: int) -> dict[str, str]:
    """Programs that walk to os and libc (ctypes is loaded with numpy) and try to write, delete, rename, exec, open
    sockets, signal other processes or read /proc. Each raises when the kernel refuses, and returns True only when its
    action went through. `target` holds `canary` and `victim` (world-writable files) and `sub` (a directory)."""
    tgkill = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine, -1)
    libc_ok = "if r < 0:\n        raise b['OSError'](ctypes.get_errno(), 'refused')"
    actions = {
        # writing
        "open for writing": "b['open'](T + '/w1', 'w').write('x')",
        "os.open O_CREAT": "os.open(T + '/w2', os.O_CREAT | os.O_WRONLY, 0o666)",
        "libc creat": f"r = libc.creat((T + '/w3').encode(), 0o666)\n    {libc_ok}",
        "libc openat": f"r = libc.openat(-100, (T + '/w4').encode(), 0o101, 0o666)\n    {libc_ok}",
        "append to a file": "b['open'](T + '/canary', 'a').write('x')",
        "write after closing fd 0": "os.close(0)\n    b['open'](T + '/w5', 'w').write('x')",
        "mkdir": "os.mkdir(T + '/d1')",
        "libc mkdir": f"r = libc.mkdir((T + '/d2').encode(), 0o777)\n    {libc_ok}",
        "mkfifo": "os.mkfifo(T + '/fifo')",
        "mknod": "os.mknod(T + '/node')",
        "symlink": "os.symlink('/etc/passwd', T + '/link')",
        "hard link": "os.link(T + '/canary', T + '/hard')",
        "truncate": "os.truncate(T + '/canary', 0)",
        "libc truncate": f"r = libc.truncate((T + '/canary').encode(), 0)\n    {libc_ok}",
        "chmod": "os.chmod(T + '/canary', 0o777)",
        "utime": "os.utime(T + '/canary')",
        "numpy save": "imp('numpy').save(T + '/a.npy', frame)",
        "tofile": "frame.tofile(T + '/a.bin')",
        "memmap": "imp('numpy').memmap(T + '/mm', mode='w+', shape=(4,))",
        "write to an inherited fd": f"r = os.write(2, b'x') - 1\n    {libc_ok}",
        "setxattr": "os.setxattr(T + '/canary', 'user.x', b'1')",
        # deleting and renaming
        "unlink": "os.unlink(T + '/canary')",
        "remove": "os.remove(T + '/victim')",
        "libc unlink": f"r = libc.unlink((T + '/victim').encode())\n    {libc_ok}",
        "libc unlinkat": f"r = libc.unlinkat(-100, (T + '/victim').encode(), 0)\n    {libc_ok}",
        "rmdir": "os.rmdir(T + '/sub')",
        "rename": "os.rename(T + '/canary', T + '/moved')",
        "replace": "os.replace(T + '/victim', T + '/canary')",
        "libc rename": f"r = libc.rename((T + '/canary').encode(), (T + '/moved2').encode())\n    {libc_ok}",
        "rename a directory": "os.rename(T + '/sub', T + '/sub2')",
        # processes
        "execv": "os.execv('/bin/sh', ['sh', '-c', 'touch ' + T + '/exec1'])",
        "libc execve": (
            "argv = (ctypes.c_char_p * 4)(b'/bin/sh', b'-c', ('touch ' + T + '/exec2').encode(), None)\n"
            f"    r = libc.execve(b'/bin/sh', argv, None)\n    {libc_ok}"
        ),
        "os.system": f"r = -1 if os.system('touch ' + T + '/exec3') else 0\n    {libc_ok}",
        "libc system": f"r = -1 if libc.system(('touch ' + T + '/exec4').encode()) else 0\n    {libc_ok}",
        "fork": "if os.fork() == 0:\n        os.execv('/bin/touch', ['touch', T + '/exec5'])",
        "posix_spawn": "os.posix_spawn('/bin/touch', ['touch', T + '/exec6'], {})",
        "subprocess": "imp('subprocess').run(['touch', T + '/exec7'])",
        "a thread": "imp('_thread').start_new_thread(os.mkdir, (T + '/thread',))",
        # sockets
        "libc TCP connect": (
            "s = libc.socket(2, 1, 0)\n"
            f"    addr = (ctypes.c_ubyte * 16)(2, 0, {port >> 8}, {port & 255}, 127, 0, 0, 1)\n"
            f"    r = min(s, libc.connect(s, addr, 16))\n    {libc_ok}"
        ),
        "socket module": f"imp('socket').socket().connect(('127.0.0.1', {port}))",
        "_socket": f"imp('_socket').socket().connect(('127.0.0.1', {port}))",
        "UDP socket": f"r = libc.socket(2, 2, 0)\n    {libc_ok}",
        "unix socket": f"r = libc.socket(1, 1, 0)\n    {libc_ok}",
        "socketpair": f"sv = (ctypes.c_int * 2)()\n    r = libc.socketpair(1, 1, 0, sv)\n    {libc_ok}",
        # signals
        "kill a process of the same uid": f"os.kill({victim}, 9)",
        "kill the trainer": "os.kill(os.getppid(), 9)",
        "kill another run's worker": f"os.kill({other_worker}, 9)",
        "killpg": f"os.killpg({victim}, 9)",
        "kill everything": "os.kill(-1, 9)",
        "libc kill": f"r = libc.kill({victim}, 9)\n    {libc_ok}",
        "tgkill": f"r = libc.syscall({tgkill}, {victim}, {victim}, 9)\n    {libc_ok}",
        "pidfd_send_signal": (
            f"fd = libc.syscall(434, {victim}, 0)\n    r = min(fd, libc.syscall(424, fd, 9, None, 0))\n    {libc_ok}"
        ),
        "ptrace attach": f"r = libc.ptrace(16, {victim}, 0, 0)\n    {libc_ok}",
        "ptrace the trainer": f"r = libc.ptrace(16, os.getppid(), 0, 0)\n    {libc_ok}",
        "process_vm_readv": f"r = libc.process_vm_readv(os.getppid(), None, 0, None, 0, 0)\n    {libc_ok}",
        # reading
        "trainer environ": "assert b['open']('/proc/%d/environ' % os.getppid(), 'rb').read()",
        "trainer environ after closing fd 0": (
            "os.close(0)\n    assert b['open']('/proc/%d/environ' % os.getppid(), 'rb').read()"
        ),
        "victim cmdline": f"assert b['open']('/proc/{victim}/cmdline', 'rb').read()",
        "another run's worker's memory": f"b['open']('/proc/{other_worker}/mem', 'rb')",
        "ptrace another run's worker": f"r = libc.ptrace(16, {other_worker}, 0, 0)\n    {libc_ok}",
        "own environ": "b['open']('/proc/self/environ', 'rb').read()",
        "own memory": "b['open']('/proc/self/mem', 'rb')",
        "list /proc": "assert os.listdir('/proc')",
        "readlink /proc": "os.readlink('/proc/self/exe')",
        "world-readable file": "assert b['open']('/etc/passwd').read()",
        "libc open": f"r = libc.open(b'/etc/passwd', 0)\n    {libc_ok}",
        "stat": "os.stat('/etc/passwd')",
        "list /": "assert os.listdir('/')",
        "numpy fromfile": "assert imp('numpy').fromfile('/etc/passwd', dtype='uint8').size",
        # privileges
        "dumpable again": f"r = libc.prctl(4, 1, 0, 0, 0)\n    {libc_ok}",
        "raise a limit": "res = imp('resource')\n    res.setrlimit(res.RLIMIT_NOFILE, (4096, 4096))",
        "setuid root": "os.setuid(0)",
    }
    prelude = (
        "os, ctypes, imp = b['__import__']('os'), b['__import__']('ctypes'), b['__import__']\n"
        f"    libc = ctypes.CDLL(None, use_errno=True)\n    T = {target!r}\n    "
    )
    return {name: escape(prelude + action) for name, action in actions.items()}


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder that nobody can reach (pytest's tmp_path sits in a folder of mode 700)."""
    folder = Path(tempfile.mkdtemp(prefix="car-sandbox-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_target(folder: Path, owner: int | None) -> dict[str, bytes]:
    """The folder the raw programs aim at, writable by the worker's uid; its files and their bytes."""
    folder.mkdir(mode=0o777)
    (folder / "sub").mkdir(mode=0o777)
    for name in ("canary", "victim"):
        (folder / name).write_text(f"{name}\n")
        (folder / name).chmod(0o666)
    folder.chmod(0o777)  # against the umask
    if owner is not None:
        for path in [folder, *folder.iterdir()]:
            os.chown(path, owner, owner)
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"dir" for p in sorted(folder.rglob("*"))}


def run_raw_suite(folder: Path, victim: int, memory_mb: int = 1024) -> dict:
    """Run every raw program once, in one confined worker, next to a second run's worker; what happened."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    other = Sandbox([load_checker("def check(frame):\n    return True")])
    programs = raw_programs(str(folder), victim, other.process.pid, listener.getsockname()[1])
    frame = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    answers, why = [], {}
    with Sandbox(list(programs.values()), time_limit=2.0, memory_mb=memory_mb) as sandbox:
        confinement = sandbox.confinement
        for k, name in enumerate(programs):  # one call per batch, to read each program's error
            answers += sandbox.advance([k], [frame])
            why[name] = sandbox.messages[-1] if sandbox.messages else ""
        errors, restarts = sandbox.errors, sandbox.restarts
    try:
        listener.accept()
        connected = True
    except BlockingIOError:
        connected = False
    listener.close()
    other_answers = other.advance([0], [frame])
    other.close()
    return {
        "escaped": [name for name, steps in zip(programs, answers) if steps],
        "errors": errors,
        "restarts": restarts,
        "programs": len(programs),
        "connected": connected,
        "other": other_answers,
        "confinement": confinement,
        "why": why,
    }


def check_raw_suite(result: dict, folder: Path, before: dict[str, bytes], victim: subprocess.Popen) -> None:
    assert result["programs"] >= 60 and result["confinement"].startswith("seccomp")
    assert result["escaped"] == []  # no program reports that its action went through
    assert snapshot(folder) == before  # nothing written, deleted or renamed
    assert victim.poll() is None and result["other"] == [[0]]  # the process of the same uid, the other run's worker
    assert not result["connected"]
    assert result["errors"] == result["programs"] and result["restarts"] == 0  # each failure counted, worker alive
    refused = re.compile(
        r"(PermissionError: 1, |OSError: 1, refused|No module named|can't start new thread|"
        r"returned NULL without setting an exception|not allowed to raise maximum limit)"
    )
    assert {name: why for name, why in result["why"].items() if not refused.search(why)} == {}  # the kernel's EPERM


def sleeper(uid: int) -> subprocess.Popen:
    """A process of the worker's uid for the programs to signal."""
    return subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[], start_new_session=True)


@needs_root_on_linux
def test_os_layer_alone_holds_as_root(open_tmp):
    """The trainer runs as root, the worker as nobody: the raw programs change nothing, signal nobody, connect
    nowhere, read nothing, and each failure is counted."""
    folder = open_tmp / "target"
    before = make_target(folder, None)
    victim = sleeper(NOBODY)
    try:
        result = run_raw_suite(folder, victim.pid)
        check_raw_suite(result, folder, before, victim)
    finally:
        victim.kill()
        victim.wait()


class ForkedWorker:
    """What Sandbox uses of subprocess.Popen, for a worker forked from the trainer instead of exec'd: an unprivileged
    user may not be able to execute this interpreter (one under /root, say), and a fork keeps the worker at the
    trainer's uid, the case under test. The worker runs the same sandbox_worker()."""

    def __init__(
        self,
        args: list[str],
        stdin: int,
        stdout: int,
        stderr: int,
        cwd: str,
        env: dict,
        start_new_session: bool,
        pass_fds: tuple[int, ...],
    ):
        to_worker, from_worker = os.pipe(), os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.setsid()
                os.chdir(cwd)
                os.dup2(to_worker[0], 0)
                os.dup2(from_worker[1], 1)
                keep = {0, 1, 2, *pass_fds}
                for fd in [int(fd) for fd in os.listdir("/proc/self/fd")]:
                    if fd not in keep:
                        try:
                            os.close(fd)
                        except OSError:  # the listing's own fd
                            pass
                car_sandbox.sandbox_worker()
            finally:
                os._exit(0)
        os.close(to_worker[0])
        os.close(from_worker[1])
        self.stdin, self.stdout = os.fdopen(to_worker[1], "wb"), os.fdopen(from_worker[0], "rb")
        self.returncode = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def as_nobody(function, *arguments) -> dict:
    """function(*arguments) in a child forked from this process and dropped to nobody (dumpable again, as a
    process started by that user is), its workers forked from it; its JSON result."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid cleared it
            car_sandbox.subprocess = types.SimpleNamespace(
                Popen=ForkedWorker, PIPE=subprocess.PIPE, DEVNULL=subprocess.DEVNULL
            )
            os.write(write_end, json.dumps(function(*arguments)).encode())
            status = 0
        except BaseException:  # noqa: BLE001 (the child reports any failure on stderr and exits)
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 1 << 16):
        data += chunk
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged trainer failed (see its traceback above)"
    return json.loads(data)


def unconfined_escapes(folder: str) -> dict:
    """Without the OS layer (os_layer="off") at the trainer's uid: the probe's escapes still work, so the confined
    suite's result is the OS layer's doing."""
    victim = os.fork()
    if victim == 0:
        time.sleep(60)
        os._exit(0)
    programs = [
        escape("os = b['__import__']('os')\n    os.mkdir(" + repr(folder + "/made") + ")"),
        escape("os = b['__import__']('os')\n    os.unlink(" + repr(folder + "/canary") + ")"),
        escape(f"os = b['__import__']('os')\n    os.kill({victim}, 9)"),
        escape(
            "os = b['__import__']('os')\n    os.close(0)\n"
            "    assert b['open']('/proc/%d/environ' % os.getppid(), 'rb').read()"
        ),
    ]
    answers = []
    for program in programs:
        with Sandbox([program], time_limit=2.0, memory_mb=1 << 16, os_layer="off") as sandbox:
            answers += sandbox.advance([0], [np.zeros((1, 1, 1, 3), np.uint8)])
    _, status = os.waitpid(victim, 0)
    return {"answers": answers, "victim_killed": os.WIFSIGNALED(status)}


@needs_root_on_linux
def test_os_layer_alone_holds_for_an_unprivileged_trainer(open_tmp):
    """The trainer runs as an ordinary user and its worker at the same uid (no uid change): the raw programs cannot
    kill the trainer, read its environment through /proc, signal a process of that uid or another run's worker,
    change files that uid may write, connect or exec. Without the OS layer the same uid could."""
    folder = open_tmp / "target"
    before = make_target(folder, NOBODY)
    victim = sleeper(NOBODY)
    try:
        # a worker forked from this process starts with all of its memory: an address-space limit of 64 GiB
        result = as_nobody(run_raw_suite, folder, victim.pid, 1 << 16)
        check_raw_suite(result, folder, before, victim)
    finally:
        victim.kill()
        victim.wait()
    control = open_tmp / "control"
    make_target(control, NOBODY)
    result = as_nobody(unconfined_escapes, str(control))
    assert result == {"answers": [[0], [0], [0], [0]], "victim_killed": True}
    assert (control / "made").is_dir() and not (control / "canary").exists()

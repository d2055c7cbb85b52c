"""Shared by the fault-injection suite (tests/reliability/): a tiny comparison, the real CLI in a
subprocess watched line by line, store snapshots and value-for-value artifact comparison.

Not a conftest.py on purpose: the other test folders import the top-level tests/conftest.py as
`conftest`, and a second conftest.py module would shadow it for them.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

from rsvc_cli.store.artifact import PARTIAL_SUFFIX, check_artifact
from rsvc_cli.store.keys import KINDS

# One comparison small enough to run a few dozen times: two real architectures at 32 px (random
# initial weights, seeded), 2 synthetic classes x 10 images x 16 patches. ResNet-20 activations
# are non-negative, Tiniest's are signed, so semi-NMF serves both; ridge keeps the regression short.
FAST = [
    "model1=cifar_resnet20", "model2=tiniest", "layer1=layer2", "layer2=l3",
    "dataset=synthetic", "dataset.n_classes=2", "dataset.images_per_class=10",
    "decomposition=semi_nmf", "decomposition.n_concepts=3", "decomposition.max_iter=50",
    "regression=ridge", "regression.n_folds=2",
    "importance.steps=2", "importance.max_patches_per_class=2", "n_tiles=2", "device=cpu",
    # Random weights on purpose (the reliability of the machinery, not of any model's numbers).
    "model1.random_weights_ok=true", "model2.random_weights_ok=true",
]

# The stages of `rsvc compare` in order, each with the artifact kind it writes and how many.
STAGES = ("extract", "decompose", "regress", "score", "importance", "collage")
STAGE_KIND = {"extract": "activations", "decompose": "concepts", "regress": "regression", "score": "scores",
              "importance": "importance", "collage": None}
STAGE_ARTIFACTS = {"extract": 2, "decompose": 2, "regress": 1, "score": 1, "importance": 2, "collage": 0}
# Attributes that legitimately differ between two runs with the same settings.
VOLATILE_ATTRS = {"versions"}
ARTIFACT_LINE = re.compile(r"^(wrote|reused) (\w+) (\S+\.h5)")
# Subprocess timeouts: generous, a loaded CI machine is slow, a hung one must still fail.
RUN_TIMEOUT = 300


def subprocess_env(**extra: str) -> dict[str, str]:
    """One torch thread per process: runs are reproducible in timing, and parallel jobs do not
    oversubscribe the (2-core) CI machine."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RSVC_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RSVC_DEBUG", None)
    env.pop("RSVC_STORE", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """In-process runs with one torch thread, like the subprocesses: on a loaded 2-core machine two
    threads spin against each other and a stage takes several times longer."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rsvc_command(*args: str, console_script: bool = False) -> list[str]:
    """`rsvc ARGS` (the installed console script) or `python -m rsvc_cli ARGS` (same entry point)."""
    if console_script and shutil.which("rsvc"):
        return ["rsvc", *args]
    return [sys.executable, "-m", "rsvc_cli", *args]


def run_rsvc(*args: str, cwd: Path, console_script: bool = False, env: dict | None = None,
             timeout: float = RUN_TIMEOUT, killpoint: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """Run rsvc to the end. Runs of the command itself (`console_script`, another environment) start
    a fresh interpreter; the others are forked from the warm process (WarmRsvc), which is the same
    process minus 5 s of imports."""
    if console_script or env is not None:
        assert killpoint is None, "kill points are armed in forked runs"
        return subprocess.run(rsvc_command(*args, console_script=console_script), cwd=cwd,
                              env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)
    run = WarmRsvc.shared().start(list(args), cwd, killpoint=killpoint)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(run.stdout.read()), daemon=True)
    reader.start()
    err = run.stderr.read()
    code = run.wait(timeout)
    reader.join(10)
    return subprocess.CompletedProcess(["rsvc", *args], code, "".join(out), err)


# ------------------------------------------------------------------------------ warm runs

class ForkedRun:
    """A run forked by the warm process: the part of subprocess.Popen the tests use."""

    def __init__(self, server: "WarmRsvc", pid: int, stdout, stderr):
        self.server, self.pid, self.stdout, self.stderr = server, pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        status = self.server.exit_status(self.pid, block=False)
        if status is not None:
            self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.server.exit_status(self.pid, block=True, timeout=timeout)
        return self.poll()

    def kill(self) -> None:
        """SIGKILL, as `kill -9` sends it."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


class WarmRsvc:
    """The client of tests/reliability/warm_rsvc.py: one per test process (and per environment
    of subprocess_env()), started on first use, ended when the tests end."""

    _shared: "WarmRsvc | None" = None

    @classmethod
    def shared(cls) -> "WarmRsvc":
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls(subprocess_env())
        return cls._shared

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server = Path(__file__).resolve().parent / "warm_rsvc.py"
        # Its stdout is not ours: under pytest-xdist this process's stdout is the worker's channel.
        self.process = subprocess.Popen([sys.executable, str(server), str(theirs.fileno())], env=env,
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL)
        theirs.close()
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.started: dict[int, int] = {}  # request number -> pid
        self.requests = 0
        self.statuses: dict[int, int] = {}
        threading.Thread(target=self._listen, daemon=True).start()
        atexit.register(self.close)

    def _listen(self) -> None:
        while True:
            message = self.channel.recv(256).decode()
            if not message:
                return
            what, first, second = message.split()
            with self.changed:
                if what == "started":
                    self.started[int(first)] = int(second)
                    self.statuses.pop(int(second), None)  # a reused pid (pid_max may be 32768)
                else:
                    self.statuses[int(first)] = int(second)
                self.changed.notify_all()

    def start(self, args: list[str], cwd: Path, killpoint: tuple[str, int] | None = None,
              capture_stdout: bool = True) -> ForkedRun:
        """Fork a run; its stderr is always a pipe, its stdout a pipe or /dev/null."""
        out_read, out_write = os.pipe() if capture_stdout else (None, os.open(os.devnull, os.O_WRONLY))
        err_read, err_write = os.pipe()
        with self.lock:
            self.requests += 1
            number = self.requests
            request = {"number": number, "args": args, "cwd": str(cwd), "env": self.env, "killpoint": killpoint}
            socket.send_fds(self.channel, [json.dumps(request).encode()], [out_write, err_write])
            os.close(out_write)
            os.close(err_write)
            with self.changed:
                # The first request waits for the imports too (a minute on a loaded 2-core machine).
                if not self.changed.wait_for(lambda: number in self.started or self.process.poll() is not None,
                                             timeout=RUN_TIMEOUT) or number not in self.started:
                    raise RuntimeError(f"the warm rsvc process did not start the run (exit {self.process.poll()})")
                pid = self.started.pop(number)
        stdout = None if out_read is None else os.fdopen(out_read, "r", encoding="utf-8", errors="replace")
        stderr = os.fdopen(err_read, "r", encoding="utf-8", errors="replace", buffering=1)
        return ForkedRun(self, pid, stdout, stderr)

    def exit_status(self, pid: int, block: bool, timeout: float | None = None) -> int | None:
        with self.changed:
            if block and not self.changed.wait_for(lambda: pid in self.statuses, timeout=timeout):
                raise subprocess.TimeoutExpired(f"rsvc (pid {pid})", timeout)
            return self.statuses.get(pid)

    def close(self) -> None:
        try:
            self.channel.close()
            self.process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


# ------------------------------------------------------------------------------------ store state

def snapshot(store: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under the store (Hydra's run logs in .runs excepted)."""
    out = {}
    store = Path(store)
    if not store.is_dir():
        return out
    for path in sorted(store.rglob("*")):
        rel = path.relative_to(store).as_posix()
        if rel.startswith(".runs/") or not path.is_file():
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def artifacts(store: Path) -> dict[str, Path]:
    """kind/name -> path of every final-named artifact file (`*.h5`) in the store."""
    out = {}
    for kind in KINDS:
        folder = Path(store) / kind
        if folder.is_dir():
            for path in sorted(folder.glob("*.h5")):
                out[f"{kind}/{path.name}"] = path
    return out


def leftovers(store: Path) -> list[str]:
    """Partial files and locks: what a finished run must not leave behind."""
    store = Path(store)
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*")
                  if p.name.endswith((PARTIAL_SUFFIX, ".lock")) and ".runs" not in p.parts)


def artifact_values(path: Path) -> dict[str, object]:
    """Every dataset and every attribute (of the file, groups and datasets) but `versions`."""
    values: dict[str, object] = {}
    with h5py.File(path, "r", locking=False) as f:
        def visit(name, obj):
            for key, value in obj.attrs.items():
                values[f"{name}@{key}"] = value
            if isinstance(obj, h5py.Dataset):
                values[name] = obj[()]
        for key, value in f.attrs.items():
            if key not in VOLATILE_ATTRS:
                values[f"/@{key}"] = value
        f.visititems(visit)
    return values


def _equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        # Bitwise: NaN in the same places counts as equal, nothing else is tolerated.
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(a, b))


def differences(path_a: Path, path_b: Path) -> list[str]:
    """Names of the datasets/attributes that differ between two artifacts (empty: equal value for value)."""
    a, b = artifact_values(path_a), artifact_values(path_b)
    diff = [f"only in one: {name}" for name in sorted(set(a) ^ set(b))]
    diff += [name for name in sorted(set(a) & set(b)) if not _equal(a[name], b[name])]
    return diff


def assert_same_artifacts(store: Path, reference: Path, subset: bool = False, superset: bool = False) -> None:
    """Artifacts of the same name in `store` and `reference` are equal, value for value; both
    stores hold the same artifacts, or `store` only some of the reference's (`subset`), or all of
    them and more (`superset`)."""
    ours, theirs = artifacts(store), artifacts(reference)
    if subset:
        assert set(ours) <= set(theirs), f"not in the reference store: {sorted(set(ours) - set(theirs))}"
    elif superset:
        assert set(ours) >= set(theirs), f"missing: {sorted(set(theirs) - set(ours))}"
    else:
        assert sorted(ours) == sorted(theirs), (sorted(ours), sorted(theirs))
    for name in sorted(set(ours) & set(theirs)):
        diff = differences(ours[name], theirs[name])
        assert not diff, f"{name} differs from the uninterrupted run in: {diff[:10]}"


def assert_all_artifacts_usable(store: Path) -> None:
    """No final-named file in the store is truncated, foreign, incomplete or of the wrong kind."""
    for name, path in artifacts(store).items():
        problem = check_artifact(path, name.split("/")[0])
        assert problem is None, f"{name} has a final name but {problem[0]}"


def report_images(store: Path) -> dict[str, np.ndarray]:
    """Pixels of every PNG of the reports (collages, plots), by path relative to the store."""
    from PIL import Image

    out = {}
    for path in sorted((Path(store) / "reports").rglob("*.png")):
        with Image.open(path) as image:
            out[path.relative_to(store).as_posix()] = np.asarray(image.convert("RGBA"))
    return out


def copy_store(source: Path, target: Path, kinds: tuple[str, ...] | None = None) -> Path:
    """A copy of a store's artifacts (only `kinds` when given), without Hydra's run logs."""
    target.mkdir(parents=True, exist_ok=True)
    for kind in kinds if kinds is not None else KINDS:
        if (source / kind).is_dir():
            shutil.copytree(source / kind, target / kind)
    return target


# ---------------------------------------------------------------------------- watched subprocess

@dataclass
class Watched:
    """A subprocess whose stderr lines are timestamped as they arrive."""

    proc: subprocess.Popen
    start: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start_rsvc(cls, *args: str, cwd: Path, env: dict | None = None) -> "Watched":
        """Start rsvc: forked from the warm process (WarmRsvc), or a fresh interpreter in another `env`."""
        if env is None:
            proc = WarmRsvc.shared().start(list(args), cwd, capture_stdout=False)
        else:
            proc = subprocess.Popen(rsvc_command(*args), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True, bufsize=1)
        watched = cls(proc=proc, start=time.monotonic())
        watched.reader = threading.Thread(target=watched._read, daemon=True)
        watched.reader.start()
        return watched

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    def kill(self) -> None:
        """kill -9: no handler, no cleanup, no flush."""
        self.proc.kill()
        self.proc.wait(30)
        self.reader.join(10)


def stage_ends(lines: list[tuple[float, str]]) -> dict[str, float]:
    """When each stage of `compare` ended (its last artifact announced), from timestamped stderr.

    An artifact counts whether written or reused; collage ends with the report line.
    """
    seen: dict[str, list[float]] = {}
    ends: dict[str, float] = {}
    for t, line in lines:
        match = ARTIFACT_LINE.match(line)
        if match:
            seen.setdefault(match.group(2), []).append(t)
        elif line.startswith("report:"):
            ends["collage"] = t
    for stage in STAGES[:-1]:
        times = seen.get(STAGE_KIND[stage], [])
        if len(times) >= STAGE_ARTIFACTS[stage]:
            ends[stage] = times[STAGE_ARTIFACTS[stage] - 1]
    return ends


def first_partial_since(store: Path, since_wall: float) -> bool:
    """True once an activations partial is being written by this run (its mtime is not older)."""
    folder = Path(store) / "activations"
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return False
    for entry in entries:
        if entry.name.endswith(PARTIAL_SUFFIX):
            try:
                if entry.stat().st_mtime >= since_wall:
                    return True
            except FileNotFoundError:
                continue
    return False


# ------------------------------------------------------------------------------ reference run

@dataclass
class Reference:
    """An uninterrupted run of FAST: its store and when each stage began and ended."""

    store: Path
    windows: dict[str, tuple[float, float]]  # stage -> (start, end), seconds since the process started
    duration: float


_REFERENCES: dict[tuple, Reference] = {}


def reference_run(root: Path, overrides: tuple[str, ...] = tuple(FAST)) -> Reference:
    """Run `rsvc compare` once per session for these overrides (cached across test modules)."""
    if overrides in _REFERENCES and _REFERENCES[overrides].store.is_dir():
        return _REFERENCES[overrides]
    store = Path(root) / f"reference-{len(_REFERENCES)}"
    wall0 = time.time()
    watched = Watched.start_rsvc("compare", *overrides, f"store={store}", cwd=Path(root))
    first_partial = None
    while watched.proc.poll() is None:
        if first_partial is None and first_partial_since(store, wall0):
            first_partial = time.monotonic() - watched.start
        time.sleep(0.005)
    code = watched.finish()
    assert code == 0, watched.stderr()
    ends = stage_ends(watched.lines)
    assert set(ends) == set(STAGES), (ends, watched.stderr())
    windows = {}
    previous = first_partial if first_partial is not None else 0.0
    for stage in STAGES:
        windows[stage] = (previous, ends[stage])
        previous = ends[stage]
    reference = Reference(store=store, windows=windows, duration=time.monotonic() - watched.start)
    _REFERENCES[overrides] = reference
    return reference

r"""Multi-process runs: a local launcher, initialization, sharded checkpoints.

On a TPU pod (or a GPU cluster) one Python process runs per host and the
cluster's own launcher starts them; :func:`initialize` connects them with
``jax.distributed``. To run and test the same program on one machine, this
module starts ``N`` CPU processes with ``D`` host devices each, connected
through a coordinator on a loopback address::

  python -m sharpjax.launch --num-processes 2 --devices-per-process 2 \
      -- -m my_package.train --epochs 3
  python -m sharpjax.launch -n 2 -d 2 -- train.py --epochs 3
  python -m sharpjax.launch -n 2 -d 2 -- sharpjax train --method saf

Each worker calls :func:`initialize` (``jax.distributed.initialize`` with
bounded heartbeat and initialization timeouts, gloo collectives on CPU) and
then runs the module (``-m``) or script as ``__main__``, so the program
itself needs no launcher-specific code (calling :func:`initialize` again is a
no-op, and on a pod it is the one line that changes nothing). Each worker's
output is line-buffered and its stdout and stderr are forwarded a whole line
at a time with a ``[i]`` prefix, so every message is one line. If a process fails, the others are
stopped and the launcher exits with the failing process's status; an overall
``--timeout`` stops a run that hangs.

The rest of the program is the same on one process or many: a
``jax.sharding.Mesh`` over ``jax.devices()`` (every process's devices),
:func:`sharpjax.training.make_trainer` with ``mesh=`` (and
``shard_example_tables=True`` so that no host holds the whole SAF bank), a
:class:`sharpjax.data.DataLoader` built identically on every process with
``num_shards=jax.process_count(), shard_index=jax.process_index()`` (each
process loads only its rows of every global batch, ids included), and
:func:`save_state` / :func:`restore_state` for checkpoints written by all
processes.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Optional, Sequence, TextIO

from sharpjax._src import distributed as _dist
from sharpjax._src.checkpoint import CheckpointError
from sharpjax._src.checkpoint import CheckpointWarning
from sharpjax._src.checkpoint import latest_step
from sharpjax._src.checkpoint import restore_state
from sharpjax._src.checkpoint import save_state
from sharpjax._src.distributed import initialize
from sharpjax._src.distributed import process_rows

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "initialize",
    "latest_step",
    "launch",
    "main",
    "process_rows",
    "restore_state",
    "save_state",
]

_WORKER_FLAG = "--sharpjax-worker"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def _worker_env(process_id: int, num_processes: int, devices: int,
                address: str, heartbeat_timeout: int, init_timeout: int,
                shutdown_timeout: int) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (
      f"{flags.strip()} --xla_force_host_platform_device_count={devices}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Not PYTHONUNBUFFERED: unbuffered, print() writes a line's text and its
  # newline apart, and the runtime's own lines (gloo's) land in between.
  # The worker makes its streams line-buffered instead (_line_buffered).
  env.pop("PYTHONUNBUFFERED", None)
  env[_dist.ENV_COORDINATOR] = address
  env[_dist.ENV_NUM_PROCESSES] = str(num_processes)
  env[_dist.ENV_PROCESS_ID] = str(process_id)
  env[_dist.ENV_HEARTBEAT] = str(heartbeat_timeout)
  env[_dist.ENV_INIT_TIMEOUT] = str(init_timeout)
  env[_dist.ENV_SHUTDOWN_TIMEOUT] = str(shutdown_timeout)
  return env


def _forward(stream, prefix: str, out: TextIO, lock: threading.Lock):
  """Copies ``stream`` to ``out`` a whole line at a time, prefixed."""
  for line in iter(stream.readline, ""):
    with lock:
      out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
      out.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float = 3.0) -> None:
  """SIGTERM each still-running worker's process group, then SIGKILL."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
      try:
        os.killpg(p.pid, sig)  # the group of our own child (start_new_session)
      except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
      time.sleep(0.05)


def launch(
    command: Sequence[str],
    num_processes: int = 2,
    devices_per_process: int = 1,
    *,
    timeout: Optional[float] = None,
    heartbeat_timeout: int = 10,
    init_timeout: int = 60,
    shutdown_timeout: int = 30,
    kill_on_failure: bool = True,
    port: Optional[int] = None,
    out: Optional[TextIO] = None,
) -> int:
  """Runs ``command`` in ``num_processes`` connected CPU processes; waits.

  Args:
    command: ``["-m", "module", *args]``, ``["script.py", *args]`` or a
      console script on the ``PATH`` (``["sharpjax", "train", ...]``).
    num_processes: processes to start (>= 1).
    devices_per_process: host CPU devices of each process
      (``--xla_force_host_platform_device_count``).
    timeout: seconds after which every process still running is killed and
      124 is returned (None: no limit).
    heartbeat_timeout: seconds without heartbeats after which the
      coordination service declares a process dead; the survivors then fail
      with an error naming it instead of waiting forever.
    init_timeout: seconds ``jax.distributed.initialize`` waits for all
      processes to connect.
    shutdown_timeout: seconds the exit barrier waits for the others.
    kill_on_failure: stop the other processes as soon as one fails (False:
      let them notice by themselves, through the runtime's timeouts).
    port: the coordinator's port on 127.0.0.1 (default: a free one).
    out: where the prefixed output goes (default ``sys.stdout``).

  Returns:
    0 if every process exited with 0; else the exit status of the first
    process seen failing (a signal ``s`` gives ``128 + s``), 124 on timeout,
    130 when interrupted (Ctrl-C or SIGTERM to the launcher).

  Example:
    >>> from sharpjax import launch
    >>> launch.launch(["train.py", "--epochs", "3"], num_processes=2,
    ...               devices_per_process=2, timeout=600)  # doctest: +SKIP
    0
  """
  command = list(command)
  if not command:
    raise ValueError("launch: no command (a script or '-m module').")
  if num_processes < 1:
    raise ValueError(f"launch: num_processes must be >= 1, got "
                     f"{num_processes}.")
  if devices_per_process < 1:
    raise ValueError(f"launch: devices_per_process must be >= 1, got "
                     f"{devices_per_process}.")
  out = sys.stdout if out is None else out
  lock = threading.Lock()
  address = f"127.0.0.1:{port or _free_port()}"
  procs, threads = [], []
  for i in range(num_processes):
    env = _worker_env(i, num_processes, devices_per_process, address,
                      heartbeat_timeout, init_timeout, shutdown_timeout)
    # stdout and stderr in pipes of their own, each forwarded by whole
    # lines: a partial line on one never splits a line of the other.
    p = subprocess.Popen(
        [sys.executable, "-m", "sharpjax.launch", _WORKER_FLAG, "--",
         *command],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        bufsize=1, start_new_session=True)
    procs.append(p)
    for stream in (p.stdout, p.stderr):
      t = threading.Thread(target=_forward, args=(stream, f"[{i}] ", out,
                                                  lock), daemon=True)
      t.start()
      threads.append(t)

  def note(msg):
    with lock:
      out.write(f"[launch] {msg}\n")
      out.flush()

  start = time.monotonic()
  status, reported, stopping = 0, set(), False
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    while True:
      codes = [p.poll() for p in procs]
      for i, c in enumerate(codes):
        if c in (None, 0) or i in reported or stopping:
          continue
        reported.add(i)
        first = not status
        status = status or (128 - c if c < 0 else c)
        note(f"process {i} exited with status {c}"
             + ("; stopping the others." if first and kill_on_failure
                else "."))
        if first and kill_on_failure:
          stopping = True
          _stop(procs)
      if all(c is not None for c in codes):
        break
      if timeout is not None and time.monotonic() - start > timeout:
        running = [i for i, c in enumerate(codes) if c is None]
        note(f"timeout after {timeout:g} s; killing processes {running}.")
        _stop(procs)
        status = status or 124
        break
      time.sleep(0.05)
  except KeyboardInterrupt:
    note("interrupted; stopping the processes.")
    _stop(procs)
    status = 130
  finally:
    _stop(procs, grace=1.0)
    for t in threads:
      t.join(timeout=5.0)
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return status


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def _watch_parent(parent: int) -> None:
  """Exits the worker if the launcher that started it is gone."""

  def watch():
    while True:
      time.sleep(1.0)
      if os.getppid() != parent:
        try:  # the launcher read our output: the pipe may be gone
          sys.stderr.write("sharpjax.launch: the launcher exited; "
                           "stopping.\n")
          sys.stderr.flush()
        except OSError:
          pass
        os._exit(1)

  threading.Thread(target=watch, daemon=True).start()


def _line_buffered() -> None:
  """This process's output line-buffered: each line leaves in one write.

  Python's ``sys.stdout`` / ``sys.stderr``, and the C library's ``stdout``
  that the runtime's C++ code prints to (gloo's ``Rank N is connected``).
  """
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):
      pass
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL(None)
    c_stdout = ctypes.c_void_p.in_dll(libc, "stdout")
    libc.setvbuf(c_stdout, None, 1, 0)  # _IOLBF, before any output
  except (OSError, ValueError, AttributeError):
    pass  # not glibc: the C stream keeps its buffering


def _run_worker(command: list[str]) -> None:
  """Inside a worker: connect to the others, then run the target."""
  _line_buffered()
  _watch_parent(os.getppid())
  try:
    initialize()
    if command[0] == "-m":
      if len(command) < 2:
        raise ValueError("launch: '-m' needs a module name.")
      sys.argv = [command[1], *command[2:]]
      runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
      script = command[0]
      if not os.path.exists(script):
        # A console script (sharpjax train ...): on the PATH, or installed
        # beside this Python.
        found = shutil.which(script, path=os.pathsep.join(
            [os.environ.get("PATH", ""), os.path.dirname(sys.executable)]))
        if found is None:
          raise FileNotFoundError(
              f"launch: {script!r} is neither a file nor a command on the "
              "PATH or beside this Python.")
        script = found
      sys.argv = [script, *command[1:]]
      sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
      runpy.run_path(script, run_name="__main__")
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if code:
      if not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)  # no exit barrier: the launcher stops the others
    raise
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip jax.distributed's exit barrier, which would wait for the others.
    os._exit(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line: ``python -m sharpjax.launch [options] -- command``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == [_WORKER_FLAG]:
    _run_worker(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    return 0
  if "--" in argv:
    k = argv.index("--")
    argv, command = argv[:k], argv[k + 1:]
  else:
    command = []
  parser = argparse.ArgumentParser(
      prog="python -m sharpjax.launch",
      description="Run a JAX program in N connected CPU processes on this "
      "machine (loopback coordinator).",
      epilog="The command follows '--': '-m module args', 'script.py args' or a "
      "console script ('sharpjax train ...').")
  parser.add_argument("-n", "--num-processes", type=int, default=2)
  parser.add_argument("-d", "--devices-per-process", type=int, default=1)
  parser.add_argument("--timeout", type=float, default=None,
                      help="overall limit in seconds (exit status 124)")
  parser.add_argument("--heartbeat-timeout", type=int, default=10)
  parser.add_argument("--init-timeout", type=int, default=60)
  parser.add_argument("--shutdown-timeout", type=int, default=30)
  parser.add_argument("--no-kill", action="store_true",
                      help="on a failure, let the other processes fail by "
                      "themselves (runtime heartbeats) instead of stopping "
                      "them")
  parser.add_argument("--port", type=int, default=None)
  args = parser.parse_args(argv)
  if not command:
    parser.error("no command: add '-- -m module args' or '-- script.py args'.")
  try:
    return launch(command, args.num_processes, args.devices_per_process,
                  timeout=args.timeout,
                  heartbeat_timeout=args.heartbeat_timeout,
                  init_timeout=args.init_timeout,
                  shutdown_timeout=args.shutdown_timeout,
                  kill_on_failure=not args.no_kill, port=args.port)
  except ValueError as e:
    parser.error(str(e))
    return 2


if __name__ == "__main__":
  sys.exit(main())

"""The journal of runs, kept outside every Redis under test: each worker process appends
lines to a file of its own (``<pid>.log``) in the directory ``TT_JOURNAL``.

    boot - <pid> <time>                 a worker process installed its stack dump (config.py)
    deliver <key> <pid> <time>          a delivery reached the worker (before the gate)
    start <key> <pid> <time>            the body began
    end <key> <pid> <time>              the body returned
    retried <key> <pid> <time> <n>      the body began on a delivery whose retries were n > 0
    fail <key> <pid> <time> <what>      the framework saw the task fail (Celery's
                                        task_failure signal, Dramatiq's after_process_message)
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TextIO

_file: tuple[int, TextIO] | None = None
_lock = threading.Lock()


def record(kind: str, key: str, *extra: object) -> None:
    """Append one line to this process's journal file and flush it."""
    global _file  # noqa: PLW0603  (one file per process, opened after a fork)
    pid = os.getpid()
    words = [kind, key, str(pid), f"{time.time():.6f}", *(str(e) for e in extra)]
    line = " ".join(w.replace("\n", " ") for w in words) + "\n"
    with _lock:
        if _file is None or _file[0] != pid:
            path = Path(os.environ["TT_JOURNAL"]) / f"{pid}.log"
            _file = (pid, path.open("a", encoding="utf-8"))
        _file[1].write(line)
        _file[1].flush()

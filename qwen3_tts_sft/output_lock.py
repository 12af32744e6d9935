"""One run at a time per output: a lock file beside what a run writes, held (flock) for as long as the
run's process lives, killed or not, with the holder's process and host written in it for the next
run to name. prepare_codes.py holds OUTPUT.lock, the trainer OUTPUT_DIR/.trainer.lock."""

import errno
import os
import socket
import time
from pathlib import Path


# The lock files this process holds, by path. A run in this process that ended with an exception (a
# notebook's, a test's) may leave its open file behind; the next run here is the only one, so it takes
# the lock over rather than be refused by its own process.
held = {}


def hold(lock_path: Path) -> tuple:
    """(the open lock file, None) when this process now holds it: it stays held while the file is open.
    (None, who holds it) when another process does. OSError when the file cannot be made."""
    key = str(Path(lock_path).resolve())
    if key in held:
        held.pop(key).close()
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        import fcntl
    except ImportError:  # not on Linux or macOS: no lock
        return handle, None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EAGAIN, errno.EACCES):  # a file system without locks (Lustre, some NFS)
            return handle, None
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, holder
    handle.truncate(0)
    handle.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    held[key] = handle
    return handle, None

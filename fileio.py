"""How bitfast reads and writes files: inputs are only read, outputs never land over someone else's files and
are never half-written.

Every output is built under a temp name beside its target (`.NAME.bitfast-tmp-PID-XXXX`) and renamed into place,
so a killed run leaves the old output or the new one, never a mix. A temp whose process is gone is removed by the
next write to the same target. An output path is refused before any work unless it is new, an empty folder, or
an earlier output of the same kind (`is_ours`), and never the current folder or one above it.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_TAG = ".bitfast-tmp-"


def read_json(path):
    """A JSON file, or ValueError naming it (malformed, not UTF-8); the caller checks the shape."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def _temp_prefix(target: Path) -> str:
    return f".{target.name}{TEMP_TAG}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(target) -> list:
    """Remove temps of `target` left by bitfast runs that were killed (their process is gone); returns them."""
    target = Path(target)
    pattern = re.compile(re.escape(f".{target.name}{TEMP_TAG}") + r"(\d+)-")
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


def _check_parent(path: Path, what: str):
    """The folder that will hold `path` exists as a writable folder or can be made (no file in the way)."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise ValueError(f"{path}: {parent} is a broken link; cannot write the {what}")
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, not a folder; cannot write the {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: folder {parent} is not writable; cannot write the {what}")


def check_output_dir(path, is_ours, what: str) -> Path:
    """Refuse, before any work, an output folder that would replace something bitfast did not write.
    `is_ours(folder)` says whether an existing, non-empty folder is an earlier output of this kind."""
    path = Path(path)
    here = Path.cwd().resolve()
    resolved = path.resolve()
    if resolved == here or resolved in here.parents:
        raise ValueError(f"{path}: refusing to write the {what} over the current folder or one above it; "
                         "name a new folder")
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise ValueError(f"{path}: exists and is not a folder; refusing to replace it with the {what}")
        if any(path.iterdir()) and not is_ours(path):
            raise ValueError(f"{path}: folder holds files that are not a bitfast {what}; refusing to write there "
                             "(name a new or empty folder)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{path}: folder is not writable")
    _check_parent(path, what)
    return path


def check_output_file(path, is_ours, what: str) -> Path:
    """Refuse, before any work, an output file that would replace something bitfast did not write."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; the {what} is a file")
    if path.exists() and path.stat().st_size and not is_ours(path):
        raise ValueError(f"{path}: exists and is not a bitfast {what}; refusing to overwrite it (name a new file)")
    _check_parent(path, what)
    return path


def atomic_write(path, data):
    """Write bytes or text to `path` through a temp file in the same folder and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


@contextmanager
def atomic_file(path):
    """Yield a temp file path beside `path` for a writer that wants a file name (e.g. gguf.GGUFWriter); when the
    block ends without error the file replaces `path`, else it is removed. Check the path first (check_output_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path):
    """Yield a temp folder beside `path`; when the block ends without error it replaces `path` (an existing
    folder is moved aside first and removed after), else it is removed. Check the path first (check_output_dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an output is an ordinary folder
    old = None
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
            os.replace(path, old / "old")
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old / "old", path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()

"""Reading one media file a jsonl line names, with every refusal made before the file is opened.

A path (relative to the media root, or absolute) is read only if
- it resolves, symlinks followed, inside the media root (unless `allow_outside`): `..`, absolute paths and
  symlinks that lead out are refused ("outside_media_root");
- it is a regular file on a real filesystem: FIFOs, sockets, devices (/dev/zero), directories and the pseudo
  files of /proc and /sys are refused ("not_regular_file"), so nothing can block or stream forever;
- it is at most `max_bytes` long ("file_too_large"); the read itself never takes more than the size `stat`
  reported plus one byte, and a file whose content does not match that size is refused too.
Other refusals: "missing_file" (does not exist), "symlink_loop" (ELOOP), "unreadable_file" (permissions, I/O
errors), "bad_path" (a NUL byte or an unencodable character). Every message is valid UTF-8 (see `escape`).
Remote roots (`gs://...`, read through etils.epath) get the lexical containment check and the size bound.
"""

import errno
import io
import os
import stat

from etils import epath

# One record is one protobuf message (tf.train.Example), which cannot exceed 2 GiB; 64 MiB is left for the
# record's other fields. 1984 MiB holds ~35 min of 1080p30 H.264 at 8 Mbit/s, ~70 min at 4 Mbit/s.
RECORD_LIMIT_BYTES = 2**31 - 64 * 2**20
DEFAULT_MAX_MEDIA_BYTES = 1984 * 2**20
_PSEUDO_ROOTS = (b"/proc", b"/sys", b"/dev")  # their filesystems are refused; /dev/shm (a tmpfs) is not
_PSEUDO_PREFIXES = (b"/proc", b"/sys")
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class MediaRefused(Exception):
  """A media file that is not read. `.reason` names the rule; the message names the path."""

  def __init__(self, reason: str, message: str):
    self.reason = reason
    super().__init__(message)


def escape(text) -> str:
  """`text` (str, possibly holding surrogate escapes, or bytes) as valid UTF-8: undecodable bytes become `\\xNN`."""
  if isinstance(text, (bytes, bytearray)):
    return bytes(text).decode("utf-8", "backslashreplace")
  try:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  except UnicodeEncodeError:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _pseudo_devices(media_root: bytes) -> set[int]:
  """Devices of the /proc, /sys and /dev mounts; none where one is a plain directory of `/` or the media root."""
  def dev(path):
    try:
      return os.stat(path).st_dev
    except OSError:
      return None
  return {dev(p) for p in _PSEUDO_ROOTS} - {dev(b"/"), dev(media_root), None}


def _inside(path: bytes, root: bytes) -> bool:
  return path == root or path.startswith(root.rstrip(b"/") + b"/")


def _kind(mode: int) -> str:
  return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _os_refusal(e: OSError, shown: str) -> MediaRefused:
  if e.errno in (errno.ENOENT, errno.ENOTDIR):
    return MediaRefused("missing_file", f"{shown} does not exist")
  if e.errno == errno.ELOOP:
    return MediaRefused("symlink_loop", f"{shown}: symlink loop (too many levels of symbolic links)")
  if e.errno == errno.ENAMETOOLONG:
    return MediaRefused("bad_path", f"{shown}: name too long")
  return MediaRefused("unreadable_file", f"cannot read {shown}: {os.strerror(e.errno) if e.errno else e}")


class MediaReader:
  """Reads media under `root` by the rules in the module docstring. Picklable; cheap to build."""

  def __init__(self, root: str | os.PathLike, *, allow_outside: bool = False,
               max_bytes: int = DEFAULT_MAX_MEDIA_BYTES):
    if not 0 < max_bytes <= RECORD_LIMIT_BYTES:
      raise ValueError(f"max media size {max_bytes} bytes: expected 1..{RECORD_LIMIT_BYTES} (a record is one "
                       "protobuf message, at most 2 GiB)")
    self.root = os.fspath(root)
    self.remote = "://" in self.root
    self.allow_outside = allow_outside
    self.max_bytes = max_bytes
    if not self.remote:
      self._root_b = os.path.realpath(os.fsencode(self.root))
      self._roots = {self._root_b, os.path.normpath(os.path.abspath(os.fsencode(self.root)))}
      self._pseudo = _pseudo_devices(self._root_b)

  def read(self, rel: str) -> bytes:
    """The bytes of the file `rel` names; raises MediaRefused."""
    if "\x00" in rel:
      raise MediaRefused("bad_path", f"path {escape(rel)!r} holds a NUL character")
    if self.remote:
      return self._read_remote(rel)
    try:
      rel_b = os.fsencode(rel)
    except UnicodeEncodeError:
      raise MediaRefused("bad_path", f"path {escape(rel)!r} holds characters no file name can have") from None
    joined = os.path.join(self._root_b, rel_b)
    shown = escape(joined)
    if not self.allow_outside and not any(_inside(os.path.normpath(joined), r) for r in self._roots):
      raise MediaRefused("outside_media_root", f"{shown} is outside the media root {escape(self._root_b)} "
                         "(pass --allow-outside-media-root to read it)")
    try:
      real = os.path.realpath(joined, strict=True)
    except OSError as e:
      raise _os_refusal(e, shown) from None
    if not self.allow_outside and not _inside(real, self._root_b):
      raise MediaRefused("outside_media_root", f"{shown} resolves to {escape(real)}, outside the media root "
                         f"{escape(self._root_b)} (pass --allow-outside-media-root to read it)")
    try:
      st = os.stat(real)
    except OSError as e:
      raise _os_refusal(e, shown) from None
    self._check_stat(st, real, shown)
    return self._read_checked(real, st, shown)

  def _check_stat(self, st: os.stat_result, real: bytes, shown: str) -> None:
    if not stat.S_ISREG(st.st_mode):
      raise MediaRefused("not_regular_file", f"{shown} is {_kind(st.st_mode)}, not a regular file")
    if st.st_dev in self._pseudo or any(_inside(real, p) for p in _PSEUDO_PREFIXES):
      raise MediaRefused("not_regular_file", f"{shown} ({escape(real)}) is a /proc, /sys or /dev file")
    if st.st_size > self.max_bytes:
      raise MediaRefused("file_too_large", f"{shown} has {st.st_size} bytes, more than the maximum {self.max_bytes}"
                         " (--max-media-bytes)")

  def _read_checked(self, real: bytes, st: os.stat_result, shown: str) -> bytes:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
      fd = os.open(real, flags)
    except OSError as e:
      raise _os_refusal(e, shown) from None
    with io.open(fd, "rb", closefd=True) as f:
      now = os.fstat(fd)
      if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(now.st_mode):
        raise MediaRefused("not_regular_file", f"{shown} changed while being opened")
      self._check_stat(now, real, shown)
      try:
        data = f.read(now.st_size + 1)
      except OSError as e:
        raise _os_refusal(e, shown) from None
    if len(data) != now.st_size:
      raise MediaRefused("not_regular_file", f"{shown}: stat says {now.st_size} bytes but "
                         f"{'more' if len(data) > now.st_size else len(data)} were read (a pseudo file, or a "
                         "file being written)")
    return data

  def _read_remote(self, rel: str) -> bytes:
    root = self.root.rstrip("/")
    path = rel if "://" in rel or rel.startswith("/") else f"{root}/{rel}"
    lexical = [os.fsencode(os.path.normpath(p.split("://", 1)[-1])) for p in (path, root)]
    if not self.allow_outside and not _inside(*lexical):
      raise MediaRefused("outside_media_root", f"{escape(path)} is outside the media root {escape(root)}")
    try:
      p = epath.Path(path)
      size = p.stat().length
      if size > self.max_bytes:
        raise MediaRefused("file_too_large", f"{escape(path)} has {size} bytes, more than the maximum "
                           f"{self.max_bytes} (--max-media-bytes)")
      with p.open("rb") as f:
        data = f.read(self.max_bytes + 1)
    except FileNotFoundError:
      raise MediaRefused("missing_file", f"{escape(path)} does not exist") from None
    except OSError as e:
      raise MediaRefused("unreadable_file", f"cannot read {escape(path)}: {type(e).__name__}") from None
    if len(data) > self.max_bytes:
      raise MediaRefused("file_too_large", f"{escape(path)} is larger than the maximum {self.max_bytes}")
    return data

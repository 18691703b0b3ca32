"""
cli.py -- command-line plumbing shared by train.py, sample.py and bench.py.

Every script here follows one contract (README: "exit code 2 for any bad input"):
  1. flags -> a @dataclass config (`parse_config`): unknown flags, bad types and bad choices are errors;
  2. `config.validate()` checks every value, every contradiction and every output location *before*
     any model is loaded or any sample is drawn, so a mistake costs a second, not a run;
  3. outputs are written to temp files and renamed into place (`atomic_write`), all of them or none, with the
     modes open() would give them; a full disk is one sentence; one writer per output (`exclusive`);
  4. `run(main)` turns a user error into one sentence on stderr (printed by rank 0 only under torchrun)
     and exit code 2, with no traceback; anything else is a bug and keeps its traceback.

    python cli.py        # smoke demo: a toy config, its checks and the one-sentence errors
"""
import argparse
import contextlib
import errno
import inspect
import json
import math
import os
import re
import sys
import tempfile
import typing
from dataclasses import asdict, fields


class UserError(ValueError):  # bad input from the command line; the message is one sentence for the user
    pass


# -----------------------------------------------------------------------------
# flags -> dataclass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of printing usage and exiting, so callers decide
        raise UserError(f"{message}; see python {self.prog} --help")


def parse_config(cls, argv=None, presets=None):
    """A `cls` dataclass from argv (None: sys.argv), `--field VALUE` per field: Optional[X] takes an X,
    bool is --field / --no-field, List[X] one or more values; field metadata may give another `flag`
    and `choices`. With `presets`, the `preset` field names a dict of defaults that flags override.
    Bad flags raise UserError. Calls cfg.validate() when the class has one. Prints the config once."""
    p = _Parser(description=inspect.getmodule(cls).__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    notes = dict(re.findall(r'^\s+(\w+):[^#\n]*#\s*(.+)$', inspect.getsource(cls), re.M))  # --help text
    for f in fields(cls):
        t = typing.get_type_hints(cls)[f.name]  # the real type even under `from __future__ import annotations`
        if typing.get_origin(t) is typing.Union:  # Optional[X] -> X
            t = next(a for a in typing.get_args(t) if a is not type(None))
        kw = dict(dest=f.name, help=notes.get(f.name, '').replace('%', '%%'), choices=f.metadata.get('choices'))
        if t is bool:
            kw['action'] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) is list:
            kw.update(nargs='+', type=typing.get_args(t)[0])
        else:
            kw['type'] = t
        p.add_argument(f.metadata.get('flag', '--' + f.name), **kw)
    given = vars(p.parse_args(argv))  # only the flags actually passed
    if presets is not None:
        name = given.get('preset', getattr(cls, 'preset', None))
        if name is not None and name not in presets:
            raise UserError(f"unknown preset {name!r}; known: {', '.join(presets)}")
        given = {**presets.get(name, {}), **given}
    cfg = cls(**given)
    check_finite(cfg)
    if hasattr(cfg, 'validate'):
        cfg.validate()
    if int(os.environ.get('RANK', '0')) == 0:  # once, not once per rank
        print(f"{cls.__name__}: {json.dumps(asdict(cfg))}")
    return cfg


# -----------------------------------------------------------------------------
# value checks: one line per rule in a config's validate(), each failing with a sentence that names the flag


def flag_name(cfg, name):
    """The command-line spelling of a config field (its metadata `flag`, else --name)."""
    f = next((f for f in fields(cfg) if f.name == name), None)
    return f.metadata.get('flag', '--' + name) if f is not None else '--' + name


def check_finite(cfg):
    """Every float value of the config (float, Optional[float], List[float] fields) is a finite number:
    argparse's float() accepts 'nan' and 'inf', which pass every `<`/`>` comparison and fail much later."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, float) and not math.isfinite(x):
                raise UserError(f"{flag_name(cfg, f.name)} must be a finite number, got {x}")


def check_range(cfg, names, lo=None, hi=None, lo_open=False, hi_open=False):
    """Each field in `names` must be a finite number in [lo, hi] (open ends with lo_open/hi_open); None is
    allowed for Optional fields left unset. Raises UserError naming the flag and the allowed range."""
    for name in names.split() if isinstance(names, str) else names:
        v = getattr(cfg, name)
        if v is None:
            continue
        bad = isinstance(v, float) and not math.isfinite(v)
        bad |= lo is not None and (v <= lo if lo_open else v < lo)
        bad |= hi is not None and (v >= hi if hi_open else v > hi)
        if bad:
            lo_s = '' if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
            hi_s = '' if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
            raise UserError(f"{flag_name(cfg, name)} must be {' and '.join(filter(None, (lo_s, hi_s)))}, got {v}")


SEED_MAX = 2 ** 31 - 1  # seeds are mixed with steps and ranks (seed * 1_000_003 + step): keep them far from 2**63


def check_seed(cfg, names):
    """Each seed field in `names` (an int, or a list of ints) is in 0 .. SEED_MAX: torch's generators take 64 bits,
    and a larger seed failed deep inside, after the models were built, naming no flag."""
    for name in names.split():
        v = getattr(cfg, name)
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if not 0 <= x <= SEED_MAX:
                raise UserError(f"{flag_name(cfg, name)} must be >= 0 and <= 2**31 - 1 ({SEED_MAX}), got {x}")


def check_device(device, flag='--device'):
    """'cpu', 'cuda', 'cuda:N' or 'mps' that this torch build and this machine have ('auto'/None pass)."""
    import torch
    if device in (None, 'auto', 'cpu'):
        return
    if not re.fullmatch(r'cuda(:\d+)?|mps', device):
        raise UserError(f"{flag} must be cpu, cuda, cuda:N or mps, got {device!r}")
    if device == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise UserError(f"{flag} mps was asked for but this torch build or machine has no MPS; use {flag} cpu")
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f"{flag} {device} was asked for but torch sees no GPU here; use {flag} cpu")
    if device.startswith('cuda:') and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")


def check_writable_dir(path, flag):
    """Directory `path` can be written: it is a writable directory, or the nearest existing folder above it is
    (it is created when something is written). Proved with a temp file that is removed at once: a command that
    fails validation leaves the file system as it was."""
    if not path:  # '' would mean the current directory to some calls and no directory to others (os.makedirs)
        raise UserError(f"{flag} is empty; give a directory (e.g. {flag} out/run)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a directory; choose another path")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path} cannot be created: {probe} is a file, not a directory; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix='.write_test'):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not a writable directory ({e.strerror or type(e).__name__} in {probe}); "
                        f"choose another path") from None


def check_writable_file(path, flag):
    """`path` will be written at the end: its directory must be writable and the path not a directory."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name")
    try:
        check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
    except UserError as e:
        raise UserError(f"{flag} {path} cannot be written: {str(e).split(' ', 1)[1]}") from None


def check_input_file(path, flag, what='file'):
    """An input file that must exist and be readable."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such {what}; check the path")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} {path} is not readable; check its permissions")


# -----------------------------------------------------------------------------
# outputs: written whole or not at all


def atomic_write(writers):
    """writers: {path: fn(tmp_path)}. Every fn writes its temp file first; only when all succeeded are
    they renamed into place, so a failure leaves no half output (and no half file) behind. The files get the
    mode open() would give them (0644 under umask 022), not mkstemp's 0600; a full disk is one sentence."""
    tmps = {}
    try:
        with disk_full_is_one_sentence(', '.join(writers)):
            for path, write in writers.items():
                d = os.path.dirname(os.path.abspath(path))
                os.makedirs(d, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
                os.close(fd)
                tmps[path] = tmp
                write(tmp)
                as_umask_allows(tmp)
            for path, tmp in tmps.items():
                os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def as_umask_allows(path):
    """chmod a file we wrote to what open() would have made it (0666 minus the umask): mkstemp and
    safetensors create 0600 files that colleagues on a shared file system could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


# what torch.save's zip writer (inline_container.cc) raises when a write comes back short: a full disk, mostly
TORCH_WRITE_FAILED = re.compile(r'unexpected pos|PytorchStreamWriter failed writing|file write failed')


def is_disk_full(e):
    """A full disk or quota: OSError ENOSPC / EDQUOT, or torch.save's RuntimeError for a short write."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, RuntimeError) and bool(TORCH_WRITE_FAILED.search(str(e)))


@contextlib.contextmanager
def disk_full_is_one_sentence(path):
    """Inside, a full disk (or quota) becomes a UserError naming `path`; the caller removes its temp files."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise UserError(f"no space left on the device while writing {getattr(e, 'filename', None) or path} (or the "
                        f"file system refused the write); free some space and run the same command again (what was "
                        f"written before is intact)") from None


def check_not_locked(path, flag, target):
    """Validation's read-only look at an `exclusive` lock file: UserError if another process holds it."""
    if os.path.isfile(path):
        with exclusive(path, flag, target, create=False):
            pass


@contextlib.contextmanager
def exclusive(path, flag, target, create=True):
    """Hold an exclusive lock on the file `path` (created if needed) while inside: one writer per output. The OS
    releases it when this process dies, so a killed run never blocks the next one. A second writer gets one
    sentence naming `target` and the holder's pid, and touches nothing else."""
    import fcntl
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if create else os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or '?'
            raise UserError(f"{flag} {target} is in use by another run (pid {holder}); wait for it to finish or "
                            f"choose another {flag}") from None
        if create:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it could let two writers lock two files)


def save_npz(path, **arrays):
    """np.savez to exactly `path` (given a name, np.savez would append .npz to a temp file's name)."""
    import numpy as np
    with open(path, 'wb') as f:
        np.savez(f, **arrays)
    as_umask_allows(path)


# -----------------------------------------------------------------------------
# the entry point wrapper


def run(main, argv=None, errors=(ValueError,)):
    """main(argv) -> exit code: 0, or 2 with one sentence on stderr for any exception in `errors` (user
    errors: UserError, bad checkpoints, missing weights). Under torchrun every rank gets the same error
    from validation, so only rank 0 prints it, and every rank exits 2."""
    try:
        with disk_full_is_one_sentence('an output'):
            main(argv)
        return 0
    except errors as e:
        if int(os.environ.get('RANK', '0')) == 0:
            msg = ' '.join(str(e).split()) or type(e).__name__
            print(f"error: {msg}", file=sys.stderr, flush=True)
        _meet_before_exit()
        return 2


def _meet_before_exit(timeout_s=10):
    """Under torchrun, a config error is found by every rank before any process group exists. If one rank
    exited first, torchrun would kill the others (rank 0 possibly before it printed); so the ranks meet
    in a gloo barrier first (at most timeout_s) and then all exit 2 together."""
    if int(os.environ.get('WORLD_SIZE', '1')) == 1 or 'MASTER_ADDR' not in os.environ:
        return
    import datetime
    import torch.distributed as dist
    if dist.is_initialized():  # the error came later, maybe on this rank only: a barrier could hang
        return
    try:
        dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=timeout_s))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # another rank is gone or never came: exit anyway
        pass


if __name__ == '__main__':
    from dataclasses import dataclass

    @dataclass
    class Toy:
        steps: int = 10  # must be >= 1
        top_p: float = 1.0  # in (0, 1]
        out: str = 'out/toy'  # a directory we will write

        def validate(self):
            check_range(self, 'steps', lo=1)
            check_range(self, 'top_p', lo=0, hi=1, lo_open=True)

    for argv in (['--steps', '3'], ['--steps', '0'], ['--top_p', '2'], ['--nope', '1']):
        print(argv, '-> exit', run(lambda a: parse_config(Toy, a), argv))

"""
cli.py -- command-line plumbing shared by train.py, sample.py and bench.py.

Every script here follows one contract (README: "exit code 2 for any bad input"):
  1. flags -> a @dataclass config (`parse_config`): unknown flags, bad types and bad choices are errors;
  2. `config.validate()` checks every value, every contradiction and every output location *before*
     any model is loaded or any sample is drawn, so a mistake costs a second, not a run;
  3. outputs are written to temp files and renamed into place (`atomic_write`), all of them or none;
  4. `run(main)` turns a user error into one sentence on stderr (printed by rank 0 only under torchrun)
     and exit code 2, with no traceback; anything else is a bug and keeps its traceback.

    python cli.py        # smoke demo: a toy config, its checks and the one-sentence errors
"""
import argparse
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


def check_device(device, flag='--device'):
    """'cpu', 'cuda' or 'cuda:N' ('auto' passes); cuda only when torch sees a GPU."""
    import torch
    if device in (None, 'auto', 'cpu'):
        return
    if not re.fullmatch(r'cuda(:\d+)?', device):
        raise UserError(f"{flag} must be cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {device} was asked for but torch sees no GPU here; use {flag} cpu")


def check_writable_dir(path, flag):
    """Create directory `path` if needed and prove it writable with a temp file, before any compute."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a directory; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test'):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} is not a writable directory ({e.strerror or type(e).__name__}); "
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
    they renamed into place, so a failure leaves no half output (and no half file) behind."""
    tmps = {}
    try:
        for path, write in writers.items():
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
            os.close(fd)
            tmps[path] = tmp
            write(tmp)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def save_npz(path, **arrays):
    """np.savez to exactly `path` (given a name, np.savez would append .npz to a temp file's name)."""
    import numpy as np
    with open(path, 'wb') as f:
        np.savez(f, **arrays)


# -----------------------------------------------------------------------------
# the entry point wrapper


def run(main, argv=None, errors=(ValueError,)):
    """main(argv) -> exit code: 0, or 2 with one sentence on stderr for any exception in `errors` (user
    errors: UserError, bad checkpoints, missing weights). Under torchrun every rank gets the same error
    from validation, so only rank 0 prints it, and every rank exits 2."""
    try:
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

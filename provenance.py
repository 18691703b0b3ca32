"""
provenance.py -- where a result came from: the full config, every seed, the world, the code and the machine,
as one JSON-ready dict that report.json, run.json (beside metrics.jsonl) and study.md carry.

    python provenance.py      # smoke demo: this machine's provenance of a toy config, printed as JSON

Two reports of the miniature from two machines differ in their last digits (another CPU rounds differently,
README), so a figure is only half a result without the machine that printed it. Everything here is read, never
guessed: the git commit only inside a checkout (None elsewhere, e.g. an unpacked copy), the GPU only when torch
sees one. The function takes the config and returns a new dict; it writes nothing.
"""
import os
import platform
import subprocess
from dataclasses import asdict, is_dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit(path=HERE):
    """The commit checked out at `path` (+ '-dirty' when tracked files differ from it), or None outside a
    git checkout or without git."""
    try:
        run = lambda *a: subprocess.run(['git', '-C', path, *a], capture_output=True, text=True, timeout=10)
        head = run('rev-parse', 'HEAD')
        if head.returncode:
            return None
        dirty = run('status', '--porcelain', '--untracked-files=no').stdout.strip()
        return head.stdout.strip() + ('-dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform says."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seeds_of(config):
    """Every field of a config whose name says it is a seed ('seed', 'world_seed', 'seeds', ...) -> {name: value}."""
    return {k: v for k, v in config.items() if 'seed' in k}


def provenance(config, world_dir=None, extra_seeds=None):
    """The provenance of a run: config (a dataclass or dict: every field, plain types), seeds (the config's own,
    plus extra_seeds {name: seed} a command fixes in code, e.g. the measurement's sampling seed), world (its
    directory and the hash the directory is named by; None outside a world), the git commit, the versions, the
    machine (CPU, GPU, threads). -> a new dict, JSON-ready."""
    config = asdict(config) if is_dataclass(config) else dict(config)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(
        config=config,
        seeds={**seeds_of(config), **(extra_seeds or {})},
        world=None if not world_dir else dict(dir=os.path.abspath(world_dir),
                                              hash=os.path.basename(os.path.normpath(world_dir))),
        git_commit=git_commit(),
        versions=dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__),
        machine=dict(cpu=cpu_model(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), gpu=gpu,
                     platform=platform.platform()))


def one_line(p):
    """A provenance dict in one line for a table's caption: commit, machine, threads, versions, world."""
    m, v = p['machine'], p['versions']
    world = f", world {p['world']['hash']}" if p.get('world') else ''
    return (f"commit {p['git_commit'] or 'none (not a git checkout)'}, {m['cpu']}{', ' + m['gpu'] if m['gpu'] else ''}"
            f", {m['torch_threads']} torch thread(s), torch {v['torch']}, numpy {v['numpy']}{world}")


if __name__ == '__main__':
    import json
    p = provenance(dict(seed=0, world_seed=1, lr=3e-4), extra_seeds=dict(eval_seed=1234))
    print(json.dumps(p, indent=1))
    print(one_line(p))

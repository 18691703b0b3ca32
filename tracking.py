"""
tracking.py -- where train.py's run is recorded besides metrics.jsonl: run.json (the provenance of each start of
the run, provenance.py) always, and with --report_to a tracker people already follow runs in, as TRL does:
TensorBoard (torch.utils.tensorboard) or Weights & Biases.

    python train.py --preset demo --report_to tensorboard   # events in out/demo/{tuned,control}/tb
    tensorboard --logdir out/demo                            # both runs' curves side by side
    WANDB_MODE=offline python train.py --preset demo_color --report_to wandb   # needs `pip install wandb`
    python tracking.py                                       # smoke demo: a few steps into /tmp/tracking_demo/tb

A tracker gets what metrics.jsonl gets, nothing more: every numeric scalar of each step's row (by its metrics.jsonl
name, at its step), each reward grid train.py writes (grid_NNNNN.png) as an image, and the resolved config (as
text for TensorBoard, as the run's config for wandb). Only rank 0 records. wandb is imported only when asked for,
and is not a dependency of this repository: without it --report_to wandb is refused before anything runs.
"""
import json
import math
import os

import numpy as np
from PIL import Image

from cli import UserError, atomic_write
from provenance import provenance

TRACKERS = ('none', 'tensorboard', 'wandb')


def check_flag(report_to):
    """--report_to names a tracker this machine has. Raises UserError (one sentence) before anything runs."""
    if report_to not in TRACKERS:
        raise UserError(f"--report_to must be one of {', '.join(TRACKERS)}, got {report_to!r}")
    try:
        if report_to == 'tensorboard':
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the tensorboard package)
        elif report_to == 'wandb':
            import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"--report_to {report_to} needs the {report_to} package, which is not installed; "
                        f"pip install {report_to}, or pass --report_to none") from None


def scalars(row):
    """The numeric scalars of a metrics.jsonl row, step excluded: {name: float}."""
    return {k: float(v) for k, v in row.items()
            if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, str)}


class NoTracker:
    """--report_to none: metrics.jsonl and the PNGs are the record."""

    def log(self, row):
        pass

    def image(self, name, path, step):
        pass

    def close(self):
        pass


class TensorBoard(NoTracker):
    """Events in out_dir/tb; flushed at every step, since train.py ends with os._exit (no atexit flush)."""

    def __init__(self, log_dir, config):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(log_dir)
        self.w.add_text('config', '```\n' + json.dumps(config, indent=1) + '\n```', 0)  # markdown: keep the layout

    def log(self, row):
        for k, v in scalars(row).items():
            self.w.add_scalar(k, v, row['step'])
        self.w.flush()

    def image(self, name, path, step):
        self.w.add_image(name, np.asarray(Image.open(path).convert('RGB')), step, dataformats='HWC')
        self.w.flush()

    def close(self):
        self.w.close()


class WandB(NoTracker):
    """A wandb run in out_dir (WANDB_MODE=offline keeps it on disk: `wandb sync` uploads it later)."""

    def __init__(self, out_dir, config):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get('WANDB_PROJECT', 'ar-grpo'), dir=out_dir, config=config,
                              name=os.path.basename(os.path.normpath(out_dir)))

    def log(self, row):
        self.run.log(scalars(row), step=row['step'])

    def image(self, name, path, step):
        self.run.log({name: self.wandb.Image(path)}, step=step)

    def close(self):
        self.run.finish()


def write_run_json(cfg, step):
    """run.json beside metrics.jsonl: the provenance of this start of the run, appended to the earlier starts'
    (a resumed run may continue on another machine) -> the list of starts."""
    path = os.path.join(cfg.out_dir, 'run.json')
    starts = []
    if step and os.path.isfile(path):  # a resume keeps the record of how the run began
        try:
            starts = json.load(open(path))['starts']
        except (ValueError, KeyError, TypeError):
            starts = []  # a torn record is replaced by this start's, not a reason to refuse the resume
    starts.append(dict(step=step, provenance=provenance(cfg, cfg.world or None)))
    text = json.dumps(dict(starts=starts), indent=1)
    atomic_write({path: lambda tmp: open(tmp, 'w').write(text)})
    return starts


def open_tracker(cfg, rank=0, step=0):
    """train.py's record of a run from `step`: run.json written, and the --report_to tracker (rank 0; others
    and 'none' get a NoTracker)."""
    if rank != 0:
        return NoTracker()
    config = write_run_json(cfg, step)[-1]['provenance']['config']
    if cfg.report_to == 'tensorboard':
        return TensorBoard(os.path.join(cfg.out_dir, 'tb'), config)
    if cfg.report_to == 'wandb':
        return WandB(cfg.out_dir, config)
    return NoTracker()


if __name__ == '__main__':
    from dataclasses import dataclass

    @dataclass
    class Demo:  # the TrainConfig fields tracking reads
        out_dir: str = '/tmp/tracking_demo'
        report_to: str = 'tensorboard'
        world: str = ''
        seed: int = 0

    cfg = Demo()
    os.makedirs(cfg.out_dir, exist_ok=True)
    check_flag(cfg.report_to)
    t = open_tracker(cfg)
    for s in range(1, 6):
        t.log(dict(step=s, reward=1 - math.exp(-s / 3), kl=0.01 * s, skipped=False))
    t.close()
    print(f"wrote {cfg.out_dir}/run.json and 5 steps of events to {cfg.out_dir}/tb; tensorboard --logdir {cfg.out_dir}")

"""
study.py -- how much of the miniature's result survives another GRPO seed and another world, and what each
change to the recipe buys: train.py --preset demo run many times in world.py's worlds, side by side.

    python study.py                               # the README's demo table: the demo recipe, GRPO seeds 0 1 2 x
                                                  # worlds 0..4, each run beside its shuffled-reward control
    python study.py --beyond --world_seeds 0      # the README's "beyond the paper" table (BEYOND's rows, seeds
                                                  # 0 1 2, the base with and without guidance) and beyond.png
    python study.py --seeds 0 --world_seeds 0 --variants "" "--beta 0.2"   # a sweep of your own
    python study.py --preset demo_t2i --out_dir out/study_t2i   # the text-to-image miniature's table (world_t2i.py)

Each run is `python train.py --preset demo --seed S --world_seed W <variant flags>`, in this process
(world.run_demo: GRPO, optionally its control, then base and tuned measured on the same seeds). Its outputs stay
in out_dir/<variant>/w<W>_s<S>/; a run whose report.json exists is read back, not run again (delete its directory
to redo it). Per variant the study prints, and writes to out_dir/study.md, the mean +- spread (sample standard
deviation over every run) of each figure, and every run's target checks (world.targets). A world not yet built
is built first (about 4 minutes). It sits on top of the stack: it drives train.train() and world.measure.
"""
import hashlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np

import train
import miniature
from provenance import one_line
import world
import world_t2i
from cli import UserError, atomic_write, check_range, check_seed, check_writable_dir, parse_config, run
from plots import class_rows


# the rows of issue 19's side-by-side table: the paper's instance rewards alone, + the distribution-level reward
# (the demo's recipe), + the entropy bonus, both, and both stronger (loo_fid 1, the entropy coefficient adapted
# toward the world-0 base's 3.7 nats/token), all trained and sampled without guidance (the demo's cfg 1); and the
# demo's recipe trained and sampled with guidance (cfg 2), to set guidance-free RL beside guided RL
INSTANCE = '--rewards world_class=1,world_quality=0.5,world_real=0.5'
BEYOND = {'instance rewards': INSTANCE,
          '+ loo_fid (the demo)': INSTANCE + ',loo_fid=0.5',
          '+ entropy': INSTANCE + ' --entropy_coef 0.01',
          '+ loo_fid + entropy': INSTANCE + ',loo_fid=0.5 --entropy_coef 0.01',
          '+ loo_fid x2 + adaptive entropy': INSTANCE + ',loo_fid=1 --entropy_coef 0.01 --entropy_target 3.7 '
                                                        '--entropy_lr 0.05',
          '+ loo_fid, trained and sampled at cfg 2': INSTANCE + ',loo_fid=0.5 --cfg_scale 2'}


# train.py flags the study sets itself for every run: a variant that set them would write outside the study or
# repeat one run under the name of another
STUDY_OWNS = {'--out_dir', '--seed', '--world_seed', '--preset', '--overwrite', '--no-overwrite', '--resume',
              '--no-resume'}


@dataclass
class StudyConfig:
    preset: str = 'demo'  # the train.py preset every run starts from (one with a world)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])  # GRPO seeds (train.py --seed)
    world_seeds: List[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # worlds (train.py --world_seed)
    variants: List[str] = field(default_factory=lambda: [''])  # extra train.py flags, one string per variant
    beyond: bool = False  # issue 19's table: variants = BEYOND, no controls, plus the base sampled with guidance
    control: bool = True  # run each variant's shuffled-reward control too (the honest-gain check)
    guided_cfg: float = 2.0  # --beyond: the base is also measured at this CFG (twice the forward passes)
    out_dir: str = 'out/study'  # one directory per variant and run, study.md and the pictures

    def validate(self):
        if self.preset not in train.TRAIN_PRESETS or not train.TRAIN_PRESETS[self.preset].get('world'):
            worlds = [k for k, v in train.TRAIN_PRESETS.items() if v.get('world')]
            raise UserError(f"--preset must be a train.py preset with a world ({', '.join(worlds)}), "
                            f"got {self.preset!r}")
        for name in ('seeds', 'world_seeds'):
            if not getattr(self, name):
                raise UserError(f"--{name} must be one or more integers >= 0, got {getattr(self, name)}")
        check_seed(self, 'seeds world_seeds')
        check_range(self, 'guided_cfg', lo=1, lo_open=True)
        if self.beyond and room(self) is world_t2i:
            raise UserError("--beyond is the class-to-image table (issue 19); drop it with --preset demo_t2i")
        check_writable_dir(self.out_dir, '--out_dir')
        for v in self.all_variants().values():  # every variant's flags are checked now, not after an hour of runs
            train_config(self, v, 0, 0, out_dir=os.path.join(self.out_dir, '.check'))  # (a path that holds nothing)
            owned = [a.split('=')[0] for a in shlex.split(v) if a.split('=')[0] in STUDY_OWNS]
            if owned:
                raise UserError(f"--variants {v!r} sets {owned[0]}, which the study sets for each run (its runs "
                                f"live in --out_dir/<variant>/w<W>_s<S>; seeds come from --seeds and --world_seeds); "
                                f"drop it from the variant")

    def all_variants(self):
        """{row name: flags}."""
        return dict(BEYOND) if self.beyond else {v or 'the preset as it is': v for v in self.variants}


def room(sc):
    """The world file of the study's preset: world_t2i for the text-to-image miniature, else world."""
    return world_t2i if world_t2i.is_t2i(train.TRAIN_PRESETS[sc.preset]['world']) else world


def run_dir(sc, variant, world_seed, seed):
    name = '_'.join(a.lstrip('-').replace('/', '-') for a in shlex.split(variant)) or 'preset'
    if len(name) > 100:  # a file name has at most 255 bytes; a hash keeps two long variants apart
        name = name[:88] + '_' + hashlib.sha1(variant.encode()).hexdigest()[:11]
    return os.path.join(sc.out_dir, name, f'w{world_seed}_s{seed}')


def train_config(sc, variant, world_seed, seed, out_dir=None):
    """The TrainConfig of one run, parsed and validated as train.py would parse its command line. A run left
    without its report.json (a study killed mid-run) is started over: the study owns its run directories."""
    try:
        flags = shlex.split(variant)
    except ValueError as e:
        raise UserError(f"--variants {variant!r} is not a valid flag string ({e})") from None
    argv = ['--preset', sc.preset, '--seed', str(seed), '--world_seed', str(world_seed), '--overwrite',
            '--out_dir', out_dir or run_dir(sc, variant, world_seed, seed), *flags]
    return parse_config(train.TrainConfig, argv, presets=train.TRAIN_PRESETS)


def run_one(sc, variant, world_seed, seed, control):
    """One demo run (GRPO [+ control] + measures) -> {'base', 'tuned'[, 'control']}; cached in report.json."""
    path = os.path.join(run_dir(sc, variant, world_seed, seed), 'report.json')
    if not os.path.isfile(path):
        print(f"study: variant {variant or '(preset)'!r}, world {world_seed}, GRPO seed {seed}", flush=True)
        room(sc).run_demo(train_config(sc, variant, world_seed, seed), train.train, control=control)
    with open(path) as f:
        return json.load(f)


STUDY_KEYS = ('world_class', 'world_quality', 'world_real', 'judge_accuracy', 'mini_fid', 'pixel_diversity',
              'token_hamming', 'kl_to_base', 'forward_passes')
T2I_KEYS = ('geneval_overall', 'geneval_unseen', *(f'geneval_{t}' for t in world_t2i.scenes.TAGS), 'geneval',
            'world_clip', 'world_quality', 'world_real', 'mini_fid', 'pixel_diversity', 'kl_to_base')
ms = lambda vals: f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0:.3f}"


def summarise(name, runs, rm=world):
    """Markdown for one variant: mean +- spread of each figure, then each run's target checks (rm.targets: the
    world file's own). runs: {(world_seed, seed): results}."""
    parts = [p for p in ('base', 'tuned', 'control') if all(p in r for r in runs.values())]
    lines = [f"### {name} ({len(runs)} runs: worlds x GRPO seeds)", '',
             '| figure | ' + ' | '.join({'base': 'base', 'tuned': 'GRPO', 'control': 'shuffled control'}[p]
                                        for p in parts) + ' |', '|---' * (1 + len(parts)) + '|']
    for k in (T2I_KEYS if rm is world_t2i else STUDY_KEYS):
        lines.append(f"| {k} | " + ' | '.join(ms([r[p][k] for r in runs.values()]) for p in parts) + ' |')
    checks = {key: rm.targets(r['base'], r['tuned'], r.get('control')) for key, r in runs.items()}
    names = [c[0] for c in next(iter(checks.values()))]
    lines += ['', '| world | GRPO seed | ' + ' | '.join(names) + ' |', '|---' * (2 + len(names)) + '|']
    for (w, s), cs in checks.items():
        cell = lambda v, lim, ok, m: f"{v:.3f} vs {lim:.3f} {'met' if ok else '**MISSED**'} ({m:+.1f} s.e.)"
        lines.append(f"| {w} | {s} | " + ' | '.join(cell(*c[1:]) for c in cs) + ' |')
    worst = [min(checks, key=lambda k: checks[k][i][4]) for i in range(len(names))]  # the run nearest each limit
    lines.append('| worst run | | ' + ' | '.join(f"{checks[k][i][1]:.3f} vs {checks[k][i][2]:.3f} "
                                               f"({checks[k][i][4]:+.1f} s.e.), world {k[0]} seed {k[1]}"
                                               for i, k in enumerate(worst)) + ' |')
    met = sum(all(c[3] for c in cs) for cs in checks.values())
    made = sorted({one_line(r['provenance']).rsplit(', world ', 1)[0] for r in runs.values() if 'provenance' in r})
    return lines + ['', f"all {len(names)} targets met in {met} of {len(checks)} runs", '',
                    'provenance (each run\'s report.json has its config, seeds and world hash): ' +
                    ('; '.join(made) or 'not recorded (runs older than report.json\'s provenance)'), '']


BEYOND_COLS = [('judge_accuracy', 'held-out accuracy'), ('mini_fid', 'mini-FID'),
               ('pixel_diversity', 'pixel diversity'), ('token_hamming', 'token Hamming'),
               ('kl_to_base', 'KL to base'), ('forward_passes', 'forward passes / image')]


def beyond_targets(base, r):
    """Issue 19's targets for a distribution-level reward, one run: (accuracy, mini-FID, diversity) met."""
    return (r['judge_accuracy'] >= base['judge_accuracy'] + (1 - base['judge_accuracy']) / 2,
            r['mini_fid'] <= 0.85 * base['mini_fid'], r['pixel_diversity'] >= 0.9 * base['pixel_diversity'])


def beyond_table(sc, rows, guided):
    """The side-by-side table: one row per recipe (mean ± spread over the seeds), the base at cfg 1 and with
    guidance as references, and per recipe how many seeds meet each of issue 19's three targets.
    rows: {name: {(world, seed): results}}; guided: [results of the base at sc.guided_cfg, per world]."""
    base = [r['base'] for r in next(iter(rows.values())).values()]
    head = '| recipe | ' + ' | '.join(c for _, c in BEYOND_COLS) + ' | targets met (acc, FID, diversity) |'
    lines = [head, '|---' * (2 + len(BEYOND_COLS)) + '|',
             '| base, cfg 1 | ' + ' | '.join(ms([b[k] for b in base]) for k, _ in BEYOND_COLS) + ' | |',
             f'| base, cfg {sc.guided_cfg:g} | ' + ' | '.join(ms([g[k] for g in guided]) for k, _ in BEYOND_COLS)
             + ' | |']
    for name, runs in rows.items():
        met = np.sum([beyond_targets(r['base'], r['tuned']) for r in runs.values()], axis=0)
        lines.append(f"| {name} | " + ' | '.join(ms([r['tuned'][k] for r in runs.values()]) for k, _ in BEYOND_COLS)
                     + f" | {met[0]}/{len(runs)}, {met[1]}/{len(runs)}, {met[2]}/{len(runs)} |")
    return lines + ['']


def comparison_picture(path, dirs, names, per_row=6):
    """Base / instance-reward GRPO / GRPO + loo_fid samples on the same seeds, one row per class: the first
    per_row samples of each class from each run's samples_*.npz (ADM layout, class-major)."""
    sets = [np.load(os.path.join(dirs[0], 'samples_base.npz'))['arr_0']]
    sets += [np.load(os.path.join(d, 'samples_tuned.npz'))['arr_0'] for d in dirs]
    C = world.NUM_CLASSES
    blocks = [(title, x.reshape(C, len(x) // C, *x.shape[1:])[:, :per_row], None)
              for x, title in zip(sets, ['base (pretrained)'] + names)]
    class_rows(path, blocks, world.CLASS_NAMES)


def guided_base(sc, world_seed):
    """The base generator of a world measured at sc.guided_cfg (CFG's two forward passes per token), cached."""
    path = os.path.join(sc.out_dir, f'base_cfg{sc.guided_cfg:g}_w{world_seed}.json')
    if not os.path.isfile(path):
        with miniature.fixed_threads():
            w = world.load_or_build(world.preset_config(train.TRAIN_PRESETS[sc.preset]['world'], world_seed))
            res = world.measure(w, w.gpt, sc.guided_cfg, w.config.eval_per_class)[0]
        atomic_write({path: lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1))})
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    sc = parse_config(StudyConfig, argv)  # runs sc.validate(): every variant's flags included
    control = sc.control and not sc.beyond
    rows, lines = {}, []
    for name, variant in sc.all_variants().items():
        rows[name] = {(w, s): run_one(sc, variant, w, s, control) for w in sc.world_seeds for s in sc.seeds}
        lines += summarise(name, rows[name], room(sc))
        print('\n'.join(lines), flush=True)
    if sc.beyond:
        lines = beyond_table(sc, rows, [guided_base(sc, w) for w in sc.world_seeds]) + lines
        w, s = sc.world_seeds[0], sc.seeds[0]
        names = list(BEYOND)[:2]
        comparison_picture(os.path.join(sc.out_dir, 'beyond.png'),
                           [run_dir(sc, BEYOND[n], w, s) for n in names], names)
        print('\n'.join(lines), flush=True)
    text = '\n'.join(lines) + '\n'
    atomic_write({os.path.join(sc.out_dir, 'study.md'): lambda tmp: Path(tmp).write_text(text)})


if __name__ == '__main__':
    sys.exit(run(main))  # a bad flag: one sentence, exit code 2

"""
study.py -- the miniature's studies, which run train.py's GRPO many times in world.py's world: the (lr, beta)
sweep of the shipped recipe and its spread over GRPO seeds, real rewards against the shuffled-reward control.

    python study.py --preset demo --study all      # both tables (the README's), printed and in out/study/*.md
    python study.py --preset demo --study seeds    # the shipped setting over 3 seeds, GRPO vs control

It sits on top of the stack: it drives train.train() repeatedly and measures each run with world.measure.
"""
import os
import sys
from dataclasses import dataclass, field, replace

import numpy as np

import train
import world
from checkpoint import load_gpt
from cli import parse_config, run


@dataclass
class StudyConfig(world.WorldConfig):
    study: str = field(default='all', metadata=dict(choices=['sweep', 'seeds', 'all']))  # which table(s)


SWEEP = [dict(lr=1e-4, beta=0.0), dict(lr=3e-4, beta=0.0), dict(lr=1e-3, beta=0.0), dict(lr=3e-4, beta=0.05),
         dict(lr=3e-4, beta=0.2)]
STUDY_KEYS = ('world_class', 'judge_acc', 'mini_fid', 'pixel_div', 'hamming', 'top_token_share', 'kl_to_base')


def study_setup(wc):
    """The demo's TrainConfig in world wc, the world, and a function run -> its measured results."""
    tcfg = train.TrainConfig(**{**train.TRAIN_PRESETS['demo'], 'world': wc.preset, 'out_dir': 'out/study'})
    w = world.prepare(tcfg)
    measure_run = lambda cfg: world.measure(w, load_gpt(os.path.join(cfg.out_dir, 'latest', 'model.safetensors')),
                                            cfg.cfg_scale, wc.eval_per_class)[0]
    return train, tcfg, w, measure_run, world.measure(w, w.gpt, tcfg.cfg_scale, wc.eval_per_class)[0]


def sweep(wc):
    """The (lr, beta) sweep at seed 0 with the real rewards: a table, one row per setting."""
    train, tcfg, w, measure_run, base = study_setup(wc)
    row = lambda r: ' | '.join(f"{r[k]:.3f}" for k in STUDY_KEYS) + ' |'
    lines = ['sweep (seed 0, real rewards):', '| lr | beta | ' + ' | '.join(STUDY_KEYS) + ' |',
             '|---' * (2 + len(STUDY_KEYS)) + '|', '| base | | ' + row(base)]
    for s in SWEEP:
        cfg = replace(tcfg, **s, out_dir=f"out/study/lr{s['lr']}_beta{s['beta']}")
        train.train(cfg)
        lines.append(f"| {s['lr']} | {s['beta']} | " + row(measure_run(cfg)))
    return lines


def seeds(wc, seeds=(0, 1, 2)):
    """The shipped setting (train.py's demo preset) over `seeds`, GRPO vs shuffled control: mean +- spread
    (sample std across seeds) of each measure."""
    train, tcfg, w, measure_run, base = study_setup(wc)
    runs = {'tuned': [], 'control': []}
    for seed in seeds:
        for name, shuffle in (('tuned', False), ('control', True)):
            cfg = replace(tcfg, seed=seed, shuffle_rewards=shuffle, out_dir=f"out/study/seed{seed}_{name}")
            train.train(cfg)
            runs[name].append(measure_run(cfg))
    ms = lambda rs, k: f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs], ddof=1):.3f}"
    lines = [f"seeds {list(seeds)} (lr {tcfg.lr}, beta {tcfg.beta}): mean ± spread (sample std)",
             '| metric | base | GRPO | shuffled control |', '|---|---|---|---|']
    return lines + [f"| {k} | {base[k]:.3f} | {ms(runs['tuned'], k)} | {ms(runs['control'], k)} |" for k in STUDY_KEYS]


def study(wc):
    """python study.py --preset demo --study all|sweep|seeds: prints the tables (and out/study/<part>.md)."""
    for part in ('sweep', 'seeds') if wc.study == 'all' else (wc.study,):
        lines = (sweep if part == 'sweep' else seeds)(wc)
        print('\n'.join(lines), flush=True)
        os.makedirs('out/study', exist_ok=True)
        open(f'out/study/{part}.md', 'w').write('\n'.join(lines) + '\n')


def main(argv=None):
    wc = parse_config(StudyConfig, argv, presets=world.WORLD_PRESETS)
    with world.fixed_threads():
        study(wc)


if __name__ == '__main__':
    sys.exit(run(main))

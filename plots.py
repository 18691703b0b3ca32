"""
plots.py -- every picture this project draws, with PIL alone (no plotting dependency): image grids as LlamaGen's
save_image makes them, train.py's grid of groups with each image's reward, line charts with ticks and labels
(train.py's reward curve, the miniature's curves), the miniature's class-by-row grids, and the base-vs-tuned
side-by-side of an evaluation.

    python plots.py      # smoke demo: a grid and a curve of random numbers into /tmp
"""
import math

import numpy as np
from PIL import Image, ImageDraw

from cli import atomic_write
from tokenizer import to_uint8


def image_grid(images, ncol, pad=2):
    """(N, H, W, 3) uint8 -> (rows*(H+pad)+pad, ncol*(W+pad)+pad, 3) with black gaps, as make_grid."""
    N, H, W, _ = images.shape
    rows = -(-N // ncol)
    x = np.pad(images, ((0, rows * ncol - N), (pad, 0), (pad, 0), (0, 0)))  # (rows*ncol, H+pad, W+pad, 3)
    x = x.reshape(rows, ncol, H + pad, W + pad, 3).transpose(0, 2, 1, 3, 4).reshape(rows * (H + pad), -1, 3)
    return np.pad(x, ((0, pad), (0, pad), (0, 0)))


def write_grid(path, images, total, group_size, groups=2):
    """The first `groups` groups as rows (or the part of a group this rank sampled), each image with its
    reward written under it."""
    imgs = to_uint8(images[:groups * group_size]).permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
    H, W = imgs.shape[1:3]
    zoom = max(1, 96 // W)  # tiny demo images are blown up so the text fits
    cw, ch = W * zoom, H * zoom + 14
    group_size = min(group_size, len(imgs))
    grid = Image.new('RGB', (cw * group_size, ch * (-(-len(imgs) // group_size))), 'white')
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(imgs):
        x, y = (i % group_size) * cw, (i // group_size) * ch
        grid.paste(Image.fromarray(im).resize((cw, H * zoom), Image.NEAREST), (x, y))
        draw.text((x + 2, y + H * zoom + 1), f"{total[i].item():.3f}", fill='black')
    atomic_write({path: lambda tmp: grid.save(tmp, format='PNG')})


def plot_curve(path, steps, rewards, size=(720, 400)):
    """train.py's reward-vs-step chart: the raw mean reward of each step and its 10-step moving average."""
    keep = [i for i, r in enumerate(rewards) if math.isfinite(r)]  # skipped steps may have logged NaN
    steps, rewards = [steps[i] for i in keep] or [0], [rewards[i] for i in keep] or [0.0]
    smooth = np.convolve(rewards, np.ones(10) / 10, mode='valid') if len(rewards) >= 10 else rewards
    series = {'each step': ((170, 190, 230), list(zip(steps, rewards))),
              '10-step average': ((20, 60, 200), list(zip(steps[len(steps) - len(smooth):], smooth)))}
    img = Image.new('RGB', size, 'white')
    draw_panel(img, (90, 70, size[0] - 30, size[1] - 60), series, 'mean reward of the rollouts', 'GRPO step', 'reward')
    atomic_write({path: lambda tmp: img.save(tmp, format='PNG')})


def plot_runs(path, runs, acc_title='held-out judge accuracy', panel=(470, 280)):
    """The miniature's curves, two panels: the mean reward of each step's rollouts and the held-out judge's
    accuracy (step 0: the base). runs: {'tuned' | 'control': train.py's rows, [{'step': s, 'reward': r, ...}]};
    GRPO in blue beside the shuffled-reward control in orange. acc_title names what the accuracy measures (the
    curve may judge fewer samples than the report: then it says so)."""
    colours = {'tuned': ((20, 60, 200), 'GRPO'), 'control': ((230, 120, 20), 'shuffled control')}
    img = Image.new('RGB', (2 * panel[0] + 200, panel[1] + 130), 'white')
    for i, (key, title, ylabel) in enumerate((('reward', 'mean reward of the rollouts', 'reward'),
                                               ('judge_acc', acc_title + ' (never a reward)', 'accuracy'))):
        series = {colours[k][1]: (colours[k][0], [(r['step'], r[key]) for r in rows if key in r])
                  for k, rows in runs.items()}
        x0 = 80 + i * (panel[0] + 100)
        draw_panel(img, (x0, 60, x0 + panel[0], 60 + panel[1]), series, title, 'GRPO step', ylabel)
    atomic_write({path: lambda tmp: img.save(tmp, format='PNG')})


def font(size=12):
    """PIL's default font at `size` points where Pillow can scale it (>= 10.1 with FreeType), else its bitmap font."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def nice_ticks(lo, hi, n=5):
    """About n round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / n or 1
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def draw_panel(img, box, series, title, xlabel, ylabel):
    """A line chart in box (x0, y0, x1, y1) of img: series {label: (colour, [(x, y), ...])}, ticks, labels, legend."""
    d, f = ImageDraw.Draw(img), font(12)
    x0, y0, x1, y1 = box
    pts = [p for _, s in series.values() for p in s]
    ylo, yhi = min(y for _, y in pts), max(y for _, y in pts)
    ylo, yhi = ylo - 0.05 * (yhi - ylo + 1e-3), yhi + 0.05 * (yhi - ylo + 1e-3)
    xhi = max(x for x, _ in pts) or 1  # the x axis starts at 0 (the base, before any step)
    X = lambda v: x0 + v / xhi * (x1 - x0)
    Y = lambda v: y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)
    for v in nice_ticks(0, xhi):
        d.line([(X(v), y1), (X(v), y1 + 4)], fill='black')
        d.text((X(v) - 8, y1 + 6), f"{v:g}", fill='black', font=f)
    for v in nice_ticks(ylo, yhi):
        d.line([(x0, Y(v)), (x1, Y(v))], fill=(225, 225, 225))
        d.line([(x0 - 4, Y(v)), (x0, Y(v))], fill='black')
        d.text((x0 - 44, Y(v) - 7), f"{v:.2f}", fill='black', font=f)
    d.rectangle(box, outline='black')
    for i, (label, (colour, s)) in enumerate(series.items()):  # the lines, and a legend above the plot
        d.line([(X(x), Y(y)) for x, y in s], fill=colour, width=2)
        lx = x1 - 130 * (len(series) - i)
        d.line([(lx, y0 - 12), (lx + 20, y0 - 12)], fill=colour, width=3)
        d.text((lx + 25, y0 - 19), label, fill='black', font=f)
    d.text((x0, y0 - 42), title, fill='black', font=font(14))
    d.text(((x0 + x1) / 2 - 30, y1 + 22), xlabel, fill='black', font=f)
    side = Image.new('RGB', (int(y1 - y0), 16), 'white')  # the y label, written sideways
    ImageDraw.Draw(side).text((4, 1), ylabel, fill='black', font=f)
    img.paste(side.rotate(90, expand=True), (x0 - 64, y0))


def class_rows(path, blocks, class_names, footer='', zoom=5, gap=16):
    """One row per class, blocks of tiles side by side under their titles (the miniature's before/after grid and
    its study picture). blocks: [(title, tiles uint8 (C, n, H, W, 3), verdict)], verdict None or (C, n) class
    ids: the class a judge saw in each tile, drawn under it as a green bar (the row's class) or a red bar and the
    name of the class it saw instead."""
    C, side = len(class_names), blocks[0][1].shape[2] * zoom
    label_h, left, top = (16 if any(v is not None for *_, v in blocks) else 0), 100, 40
    row = side + label_h + 4
    xs = [left]
    for _, tiles, _ in blocks[:-1]:
        xs.append(xs[-1] + tiles.shape[1] * side + gap)
    canvas = Image.new('RGB', (xs[-1] + blocks[-1][1].shape[1] * side + 8, top + C * row + (24 if footer else 8)),
                       'white')
    d, f, small = ImageDraw.Draw(canvas), font(14), font(11)
    for x0, (title, tiles, verdict) in zip(xs, blocks):
        d.text((x0, 12), title, fill='black', font=f)
        for c in range(C):
            y = top + c * row
            for k in range(tiles.shape[1]):
                x = x0 + k * side
                canvas.paste(Image.fromarray(tiles[c, k]).resize((side - 2, side - 2), Image.NEAREST), (x, y))
                if verdict is not None:
                    ok = int(verdict[c, k]) == c
                    colour = (40, 170, 60) if ok else (210, 50, 40)
                    d.rectangle([x, y + side - 1, x + side - 3, y + side + 1], fill=colour)
                    if not ok:
                        d.text((x + 1, y + side + 2), class_names[int(verdict[c, k])], fill=(190, 30, 30), font=small)
    for c, name in enumerate(class_names):
        d.text((4, top + c * row + side // 2 - 8), name, fill='black', font=f)
    if footer:
        d.text((left, canvas.height - 20), footer, fill='black', font=f)
    atomic_write({path: lambda tmp: canvas.save(tmp, format='PNG')})


def side_by_side(rows, path, max_images=8, gap=8):
    """rows: [(base (n, H, W, 3), tuned (n, H, W, 3))] -> one PNG: a row per condition, base left, tuned right."""
    n = min(max_images, len(rows[0][0]))
    left = image_grid(np.concatenate([b[:n] for b, _ in rows]), n)
    right = image_grid(np.concatenate([t[:n] for _, t in rows]), n)
    white = np.full((left.shape[0], gap, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([left, white, right], 1)).save(path, format='PNG')


def prompt_rows(path, prompts, blocks, footer='', gap=16, left=250):
    """One row per prompt (the text-to-image miniature's before/after grid): blocks of samples side by side under
    their titles, and under each sample the prompt's atoms, green (+) where the evaluator found one satisfied and
    red (x) where not. blocks: [(title, tiles uint8 (P, n, H, W, 3), atoms: P lists of n lists of (name, ok))]."""
    side = max(5, 120 // blocks[0][1].shape[2]) * blocks[0][1].shape[2]  # tiles blown up to about 120 px
    lines = max(len(a) for _, _, atoms in blocks for row in atoms for a in row)
    row, top = side + 12 * lines + 12, 40
    xs = [left]
    for _, tiles, _ in blocks[:-1]:
        xs.append(xs[-1] + tiles.shape[1] * side + gap)
    width = max(xs[-1] + blocks[-1][1].shape[1] * side + 8, left + 7 * len(footer))
    canvas = Image.new('RGB', (width, top + len(prompts) * row + (24 if footer else 8)), 'white')
    d, f, small = ImageDraw.Draw(canvas), font(13), font(10)
    for x0, (title, tiles, atoms) in zip(xs, blocks):
        d.text((x0, 12), title, fill='black', font=font(14))
        for p in range(len(prompts)):
            y = top + p * row
            for k in range(tiles.shape[1]):
                x = x0 + k * side
                canvas.paste(Image.fromarray(tiles[p, k]).resize((side - 4, side - 4), Image.NEAREST), (x, y))
                for a, (name, ok) in enumerate(atoms[p][k]):
                    d.text((x + 1, y + side - 2 + 12 * a), ('+ ' if ok else 'x ') + name,
                           fill=(30, 140, 50) if ok else (200, 40, 30), font=small)
    for p, text in enumerate(prompts):
        d.text((4, top + p * row + side // 2 - 8), text, fill='black', font=f)
    if footer:
        d.text((left, canvas.height - 20), footer, fill='black', font=f)
    atomic_write({path: lambda tmp: canvas.save(tmp, format='PNG')})


if __name__ == '__main__':
    import torch
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 16, 16, generator=g) * 2 - 1
    write_grid('/tmp/plots_grid.png', images, torch.rand(16, generator=g), group_size=8)
    steps = list(range(1, 101))
    plot_curve('/tmp/plots_curve.png', steps, [0.3 + 0.4 * (1 - math.exp(-s / 30)) + 0.05 * math.sin(s) for s in steps])
    tiles = (torch.rand(3, 4, 8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()  # 3 classes x 4 tiles
    class_rows('/tmp/plots_rows.png', [('random', tiles, None), ('judged', tiles, np.array([[0, 1, 0, 0]] * 3))],
               ['a', 'b', 'c'], footer='green: the judge saw the row class')
    atoms = [[[('a disk', True), ('the disk is red', k % 2 == 0)] for k in range(4)]] * 3  # 3 prompts x 4 tiles
    prompt_rows('/tmp/plots_prompts.png', ['a red disk'] * 3, [('random', tiles, atoms)], footer='+: found, x: not')
    print("wrote /tmp/plots_grid.png (2 groups of 8 with their rewards), /tmp/plots_curve.png, /tmp/plots_rows.png, "
          "/tmp/plots_prompts.png")

"""
plots.py -- every picture this project draws, with PIL alone (no plotting dependency): image grids as LlamaGen's
save_image makes them, train.py's grid of groups with each image's reward, its reward curve, and the
base-vs-tuned side-by-side of an evaluation.

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


def plot_curve(path, steps, rewards, size=(640, 360), pad=40):
    """A reward-vs-step line chart drawn with PIL (no plotting dependency): raw and smoothed."""
    keep = [i for i, r in enumerate(rewards) if math.isfinite(r)]  # skipped steps may have logged NaN
    steps, rewards = [steps[i] for i in keep] or [0], [rewards[i] for i in keep] or [0.0]
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    lo, hi = min(rewards), max(rewards)
    hi = hi if hi > lo else lo + 1
    sx = lambda s: pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (size[0] - 2 * pad)
    sy = lambda r: size[1] - pad - (r - lo) / (hi - lo) * (size[1] - 2 * pad)
    smooth = np.convolve(rewards, np.ones(10) / 10, mode='valid') if len(rewards) >= 10 else rewards
    d.rectangle([pad, pad, size[0] - pad, size[1] - pad], outline='black')
    d.line([(sx(s), sy(r)) for s, r in zip(steps, rewards)], fill=(170, 190, 230), width=1)
    d.line([(sx(s), sy(r)) for s, r in zip(steps[len(steps) - len(smooth):], smooth)], fill=(20, 60, 200), width=2)
    d.text((pad, 10), f"mean reward per step (blue: 10-step average)   {lo:.3f} .. {hi:.3f}", fill='black')
    d.text((pad, size[1] - pad + 8), f"step {steps[0]}", fill='black')
    d.text((size[0] - pad - 60, size[1] - pad + 8), f"step {steps[-1]}", fill='black')
    atomic_write({path: lambda tmp: img.save(tmp, format='PNG')})


def side_by_side(rows, path, max_images=8, gap=8):
    """rows: [(base (n, H, W, 3), tuned (n, H, W, 3))] -> one PNG: a row per condition, base left, tuned right."""
    n = min(max_images, len(rows[0][0]))
    left = image_grid(np.concatenate([b[:n] for b, _ in rows]), n)
    right = image_grid(np.concatenate([t[:n] for _, t in rows]), n)
    white = np.full((left.shape[0], gap, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([left, white, right], 1)).save(path, format='PNG')


if __name__ == '__main__':
    import torch
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 16, 16, generator=g) * 2 - 1
    write_grid('/tmp/plots_grid.png', images, torch.rand(16, generator=g), group_size=8)
    steps = list(range(1, 101))
    plot_curve('/tmp/plots_curve.png', steps, [0.3 + 0.4 * (1 - math.exp(-s / 30)) + 0.05 * math.sin(s) for s in steps])
    print("wrote /tmp/plots_grid.png (2 groups of 8 with their rewards) and /tmp/plots_curve.png")

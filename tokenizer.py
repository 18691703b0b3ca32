"""
tokenizer.py -- LlamaGen's VQGAN image tokenizer: images <-> grids of codebook indices.

Follows FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py with the same module and
parameter names, so the released vq_ds16_c2i.pt / vq_ds8_c2i.pt / vq_ds16_t2i.pt load with strict=True
(checkpoint.load_vq). VQ-16 maps a 256x256 image to a 16x16 grid of indices into a 16384 x 8 codebook.

    python tokenizer.py      # smoke demo: encode and decode a random image with a tiny VQ
"""
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQConfig:
    codebook_size: int = 16384  # number of codes (the GPT's vocab_size)
    codebook_embed_dim: int = 8  # width of one code
    codebook_l2_norm: bool = True  # codes and latents are l2-normalised before matching
    codebook_show_usage: bool = True  # keeps the `quantize.codebook_used` buffer (in released files)
    commit_loss_beta: float = 0.25  # VQ training only; kept so LlamaGen ModelArgs dicts load
    entropy_loss_ratio: float = 0.0  # VQ training only, as above
    encoder_ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # width per level
    decoder_ch_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # width per level
    z_channels: int = 256  # encoder output / decoder input channels
    dropout_p: float = 0.0  # dropout inside resblocks
    ch: int = 128  # base width; LlamaGen hard-codes 128, the tiny test fixture uses 32

    @property
    def downsample(self):
        return 2 ** (len(self.encoder_ch_mult) - 1)


VQ_PRESETS = {'VQ-16': dict(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]),
              'VQ-8': dict(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4])}


def Normalize(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if cin != cout:  # a 1x1 projection on the skip path when the width changes
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))  # swish == silu
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, 'nin_shortcut') else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs as projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = Normalize(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, HW, C)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # scale C^-0.5
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LlamaGen quirk: pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def _level(cin, cout, n_res, attn, dropout):
    """One resolution level: n_res resblocks, each followed by attention at the lowest resolution."""
    block = nn.Module()
    block.res = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, dropout) for i in range(n_res))
    block.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n_res if attn else 0))
    return block


def _run_level(block, h):
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256, dropout=0.0, num_res_blocks=2):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        self.conv_blocks = nn.ModuleList()
        for i in range(len(ch_mult)):  # highest resolution first
            last = i == len(ch_mult) - 1
            block = _level(widths[i], widths[i + 1], num_res_blocks, attn=last, dropout=dropout)
            if not last:
                block.downsample = Downsample(widths[i + 1])
            self.conv_blocks.append(block)
        c = widths[-1]
        self.mid = nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        self.norm_out, self.conv_out = Normalize(c), nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, 'downsample'):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256, dropout=0.0, num_res_blocks=2):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):  # LlamaGen quirk: conv_blocks.0 is the LOWEST resolution
            block = _level(c, ch * ch_mult[i], num_res_blocks + 1, attn=i == len(ch_mult) - 1, dropout=dropout)
            c = ch * ch_mult[i]
            if i != 0:
                block.upsample = Upsample(c)
            self.conv_blocks.append(block)
        self.norm_out, self.conv_out = Normalize(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, 'upsample'):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_e, e_dim, l2_norm=True, show_usage=True):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        if show_usage:  # a training statistic; only here so released state_dicts load strictly
            self.register_buffer('codebook_used', torch.zeros(65536))

    def codebook(self):
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z):
        """z (B, C, H, W) -> (z_q (B, C, H, W), indices (B*H*W,) in (b, h, w) order)."""
        z = z.permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        zf, e = z.reshape(-1, z.shape[-1]), self.codebook()
        # argmin over |z|^2 + |e|^2 - 2 z.e, as LlamaGen computes it (ties then break the same way)
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()
        idx = d.argmin(1)
        return e[idx].view(z.shape).permute(0, 3, 1, 2), idx


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg.ch, cfg.encoder_ch_mult, cfg.z_channels, cfg.dropout_p)
        self.decoder = Decoder(cfg.ch, cfg.decoder_ch_mult, cfg.z_channels, cfg.dropout_p)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim, cfg.codebook_l2_norm,
                                        cfg.codebook_show_usage)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode(self, images):
        """images (B, 3, H, W) in [-1, 1] -> codes (B, H/ds, W/ds) int64."""
        z = self.quant_conv(self.encoder(images))
        _, idx = self.quantize(z)
        return idx.view(z.shape[0], z.shape[2], z.shape[3])

    def decode(self, codes):
        """codes (B, h, w) or (B, h*w) on a square grid -> images (B, 3, h*ds, w*ds), roughly in [-1, 1]."""
        B = codes.shape[0]
        h = codes.shape[1] if codes.dim() == 3 else int(codes.shape[1] ** 0.5)
        w = codes[0].numel() // h
        z = self.quantize.codebook()[codes.reshape(B, h, w)].permute(0, 3, 1, 2)  # (B, C, h, w)
        z = z.to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images):
        """Reconstruction: encode to the nearest codes, decode back."""
        zq, _ = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(zq))


def to_unit(images):
    """Decoder output (B, 3, H, W) in [-1, 1], possibly overshooting -> float32 in [0, 1] (what reward models see)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def to_uint8(x):
    """Decoder output in [-1, 1] -> uint8 of the same shape, rounded as LlamaGen's torchvision
    save_image(normalize=True, value_range=(-1, 1)) does: clamp, to [0, 1], * 255 + 0.5, truncate."""
    return ((x.float().clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)


if __name__ == '__main__':
    torch.manual_seed(0)
    vq = VQModel(VQConfig(codebook_size=64, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
                          z_channels=32, ch=32)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        codes = vq.encode(x)
        y = vq.decode(codes)
        same = (vq.encode(y.clamp(-1, 1)) == codes).float().mean()  # random weights: no real round trip
    print(f"{sum(p.numel() for p in vq.parameters())} params; image {tuple(x.shape)} -> codes "
          f"{tuple(codes.shape)} -> image {tuple(y.shape)}; re-encoded codes equal: {same:.0%}")

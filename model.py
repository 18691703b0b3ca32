"""
model.py -- a LlamaGen-compatible autoregressive image transformer, with a KV cache and CFG sampling.

Follows FoundationVision/LlamaGen autoregressive/models/gpt.py and generate.py: the same module and
parameter names (released checkpoints load with strict=True) and the same numerics, pinned by the
fixtures in ../shared/fixtures/llamagen. Where LlamaGen does something unusual we copy it on purpose
and mark it `# LlamaGen quirk:`.

The sequence is [condition tokens (cls_token_num)] + [image tokens (block_size, raster order)].
There is one forward path, `forward(tokens, cond, kv_cache=None)`, used for teacher-forced
log-probs in training and, with a KV cache, for sampling. `logits[:, j]` predicts image token j.
The network does no file I/O: released checkpoints, the Hub and every reader/writer live in checkpoint.py.

    python model.py      # smoke demo: cached decoding equals the full forward on a tiny model
"""
import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    # Field names are LlamaGen's ModelArgs, so its config dicts load as they are.
    dim: int = 768  # model width
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads; head_dim = dim // n_head
    n_kv_head: Optional[int] = None  # key/value heads for GQA; None = n_head (all released models)
    multiple_of: int = 256  # SwiGLU hidden width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None  # optional extra factor on the SwiGLU width
    rope_base: float = 10000  # RoPE frequency base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    initializer_range: float = 0.02  # std of the normal init of Linear/Embedding weights
    token_dropout_p: float = 0.1  # dropout on the input embeddings (active only in train mode)
    attn_dropout_p: float = 0.0  # dropout on attention probabilities (train mode only)
    resid_dropout_p: float = 0.1  # dropout after the attention output projection (train mode only)
    ffn_dropout_p: float = 0.1  # dropout after the FFN output projection (train mode only)
    drop_path_rate: float = 0.0  # stochastic depth; every released model uses 0, only 0 is supported
    num_classes: int = 1000  # c2i: number of real classes; row num_classes is the null class
    caption_dim: int = 2048  # t2i: width of the T5 caption embeddings (flan-t5-xl: 2048)
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row that CFG needs
    model_type: str = 'c2i'  # 'c2i' (class id) or 't2i' (T5 caption embeddings)
    vocab_size: int = 16384  # VQ codebook size
    cls_token_num: int = 1  # condition positions: 1 for c2i, 120 for t2i
    block_size: int = 256  # image tokens: (image_size / downsample) ** 2, a square grid
    max_batch_size: int = 32  # unused (LlamaGen sizes caches with it); kept so ModelArgs dicts load
    max_seq_len: int = 2048  # unused, as above

    def __post_init__(self):
        if self.model_type not in ('c2i', 't2i'):
            raise ValueError(f"model_type must be 'c2i' or 't2i', not {self.model_type!r}")
        if self.drop_path_rate != 0:
            raise ValueError("drop_path_rate > 0 is not supported (every released LlamaGen model uses 0)")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ValueError(f"block_size must be a square number of image tokens, got {self.block_size}")
        if self.dim % self.n_head or self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"dim {self.dim}, n_head {self.n_head}, n_kv_head {self.n_kv_head} do not divide")

    @property
    def head_dim(self):
        return self.dim // self.n_head


# LlamaGen's GPT_models, as data. Parameter counts (c2i, vocab 16384): B 111M, L 343M, XL 775M, XXL 1.4B.
GPT_PRESETS = {
    'GPT-B': dict(n_layer=12, n_head=12, dim=768),
    'GPT-L': dict(n_layer=24, n_head=16, dim=1024),
    'GPT-XL': dict(n_layer=36, n_head=20, dim=1280),
    'GPT-XXL': dict(n_layer=48, n_head=24, dim=1536),
    'GPT-XXXL': dict(n_layer=48, n_head=40, dim=2560),
    'GPT-1B': dict(n_layer=22, n_head=32, dim=2048),
    'GPT-3B': dict(n_layer=24, n_head=32, dim=3200),
    'GPT-7B': dict(n_layer=32, n_head=32, dim=4096),
    'GPT-tiny': dict(n_layer=2, n_head=4, dim=64),  # not a release: demos and tests on a CPU
}


def find_multiple(n, k):
    return n if n % k == 0 else n + k - n % k


def config_for(preset=None, image_size=256, downsample=16, **overrides):
    """A GPTConfig from a preset name, the image size and any field overrides."""
    if preset is not None and preset not in GPT_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(GPT_PRESETS)}")
    if image_size % downsample:
        raise ValueError(f"image_size {image_size} is not a multiple of the VQ downsampling {downsample}")
    kw = dict(GPT_PRESETS.get(preset, {}), block_size=(image_size // downsample) ** 2)
    if overrides.get('model_type') == 't2i':
        kw['cls_token_num'] = 120
    kw.update(overrides)
    names = {f.name for f in fields(GPTConfig)}
    unknown = set(kw) - names
    if unknown:
        raise ValueError(f"unknown GPTConfig fields: {', '.join(sorted(unknown))}")
    return GPTConfig(**kw)


# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in float32, cast back, then the weight (LlamaGen's order, in x's dtype)
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class LabelEmbedder(nn.Module):
    """c2i condition: a class id -> one embedding (B, 1, dim)."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        # LlamaGen quirk: the null class for CFG is an extra row at index num_classes
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels):  # (B,) int64 -> (B, 1, dim)
        return self.embedding_table(labels).unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, in_features, hidden_features, out_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class CaptionEmbedder(nn.Module):
    """t2i condition: T5 caption embeddings (B, T, caption_dim) -> (B, T, dim)."""

    def __init__(self, caption_dim, dim, token_num=120):
        super().__init__()
        self.cap_proj = MLP(caption_dim, dim, dim)
        # LlamaGen quirk: the null caption is a persistent *buffer* (in the state_dict, not a parameter)
        # with a hard-coded 120 rows, so LlamaGen's CFG needs cls_token_num == 120 (GPT.null_cond: below)
        self.register_buffer('uncond_embedding', torch.randn(token_num, caption_dim) / caption_dim ** 0.5)

    def forward(self, caption):
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(2 * 4 * cfg.dim / 3)
        if cfg.ffn_dim_multiplier is not None:
            hidden = int(cfg.ffn_dim_multiplier * hidden)
        # LlamaGen quirk: SwiGLU width rounded up to a multiple of 256 (B: 768 -> 2048, XL: 1280 -> 3584)
        hidden = find_multiple(hidden, cfg.multiple_of)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def precompute_freqs_cis_2d(grid_size, head_dim, base=10000, cls_token_num=1):
    """2D RoPE table (cls_token_num + grid_size**2, head_dim // 2, 2) holding [cos, sin].

    The first head_dim/4 pairs rotate by the token's row, the next head_dim/4 by its column.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (head_dim/4,)
    angles = torch.outer(torch.arange(grid_size).float(), freqs)  # (grid, head_dim/4)
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),  # row angle
                      angles[None, :, :].expand(grid_size, -1, -1)], dim=-1)  # col angle -> (g, g, hd/2)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # (g*g, hd/2, 2)
    # LlamaGen quirk: condition positions get all-zero rows (cos = sin = 0), not the identity, so their
    # q and k become zero vectors: every query scores 0 against a condition key.
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rotary_emb(x, freqs_cis):
    """Rotate interleaved pairs (a, b) = (x[2i], x[2i+1]) to (a cos - b sin, b cos + a sin), in float32.

    x (B, T, H, hd), freqs_cis (T, hd/2, 2) holding [cos, sin]. Real arithmetic rather than complex
    numbers, which torch.compile's code generator handles less well.
    """
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    a, b, cos, sin = xs[..., 0], xs[..., 1], fc[..., 0], fc[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(3).type_as(x)


class KVCache:
    """Preallocated keys and values of every layer, passed into forward and never in a state_dict.

    Sized with n_kv_head (the reference sizes it with n_head, which is why its GQA cache crashes).
    `pos` is a 1-element tensor (not a Python int) so a compiled decode step has static shapes and
    `key_valid` masks out left-padded caption positions (t2i). `filled` mirrors `pos` on the host (the
    caller knows how many tokens it fed, so keeping it costs no synchronisation): an eager step attends
    over the filled prefix only, not the whole preallocated cache; a static cache (torch.compile's CUDA
    graphs need fixed shapes) reads all of it behind the mask.
    """

    def __init__(self, cfg: GPTConfig, batch_size, max_len, device, dtype, static=False):
        shape = (batch_size, cfg.n_kv_head or cfg.n_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # next position to write
        self.key_pos = torch.arange(max_len, device=device)  # position of every cache slot
        self.static = static  # True: every step reads the whole cache (fixed shapes for CUDA graphs)
        self.filled = 0  # host copy of pos (eager only; a compiled step would recompile on a changing int)
        self.padded = False  # some caption rows are padding: the prefix read needs the mask too
        self.n_read = max_len  # keys the current forward attends over (set by GPT.forward)

    def mark_static(self):
        # lets torch.compile's CUDA graphs update these tensors in place
        self.static = True
        for t in self.k + self.v + [self.key_valid, self.pos, self.key_pos]:
            torch._dynamo.mark_static_address(t)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_dim
        # fused projection, rows laid out [q: n_head*hd | k: n_kv_head*hd | v: n_kv_head*hd]
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * self.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)

    def forward(self, x, freqs_cis, mask, kv_cache=None, layer=0, input_pos=None):
        B, T, C = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, hd)  # heads in the row order [q | k | v]
        qk = apply_rotary_emb(qkv[:, :, :H + Hkv], freqs_cis)  # q and k rotated in one go
        q, k = qk.transpose(1, 2).split([H, Hkv], dim=1)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = qkv[:, :, H + Hkv:].transpose(1, 2)  # (B, Hkv, T, hd)
        if kv_cache is not None:  # write this step's keys/values, then attend over the filled prefix (or all)
            kv_cache.k[layer].index_copy_(2, input_pos, k)
            kv_cache.v[layer].index_copy_(2, input_pos, v)
            n = kv_cache.n_read
            k, v = kv_cache.k[layer][:, :, :n], kv_cache.v[layer][:, :, :n]  # (B, n_kv, n, hd)
        # query head h reads kv head h // (n_head / n_kv_head): LlamaGen's repeat_interleave. Without a mask,
        # T queries over T keys are causal and one query over the filled prefix sees every key (GPT.forward
        # passes a mask in every other case), so no mask is built and SDPA may pick a flash kernel.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.attn_dropout_p if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, C)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs_cis, mask, kv_cache=None, layer=0, input_pos=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, kv_cache, layer, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    """LlamaGen's `Transformer`, with its parameter names."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        if cfg.model_type == 'c2i':
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # not tied to tok_embeddings
        # a plain attribute, not a buffer: it stays float32 when the model is cast to bf16 and never
        # enters the state_dict (LlamaGen keeps it the same way)
        self.freqs_cis = precompute_freqs_cis_2d(math.isqrt(cfg.block_size), cfg.head_dim, cfg.rope_base,
                                                 cfg.cls_token_num)
        # activation checkpointing (train.py --grad_ckpt): keep only each block's input in the teacher-forced
        # forward and recompute the block in backward; a switch, not a second forward path
        self.grad_ckpt = False
        self.apply(self._init_weights)
        nn.init.zeros_(self.output.weight)  # LlamaGen quirk: output starts at zero, so logits start uniform

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)

    def null_cond(self, cond):
        """The unconditional input for CFG, shaped like `cond`: the null class, or the last L rows of the (120, D)
        null caption for (B, L, D) captions -- LlamaGen's exactly at 120; below, where LlamaGen fails, the rows a
        left-padded short caption fills (and world_t2i's caption dropout trains)."""
        if self.config.model_type == 'c2i':
            return torch.full_like(cond, self.config.num_classes)  # the null class row
        null = self.cls_embedding.uncond_embedding
        if cond.shape[1] > null.shape[0]:
            raise ValueError(f"t2i CFG needs at most {null.shape[0]} caption positions (LlamaGen's null caption), "
                             f"got {cond.shape[1]}")
        return null[-cond.shape[1]:].to(cond.dtype).expand(cond.shape[0], -1, -1)  # same rows for every sample

    def new_kv_cache(self, batch_size, max_len=None, static=False):
        """A zeroed cache for `batch_size` sequences (CFG doubles the batch: pass 2B); static: see KVCache."""
        p = self.output.weight
        # LlamaGen rounds the cache length up to a multiple of 8
        max_len = find_multiple(max_len or self.config.cls_token_num + self.config.block_size, 8)
        # under autocast the keys/values come out in the autocast dtype, not the weights' dtype
        dt = p.device.type
        dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else p.dtype
        return KVCache(self.config, batch_size, max_len, p.device, dtype, static)

    def forward(self, tokens, cond=None, kv_cache=None, cond_mask=None):
        """tokens (B, S) int64 image tokens to feed; cond (B,) class ids or (B, C, caption_dim) captions,
        given on the first call only; cond_mask (B, C) 1 = valid caption row (t2i, left-padded).

        Returns float32 logits: (B, S + 1, V) when cond is given (logits[:, j] predicts image token j),
        else (B, S, V) for the positions after the cache (decoding).
        """
        C = self.config.cls_token_num
        h = self.tok_embeddings(tokens)  # (B, S, dim)
        if cond is not None:
            if self.config.model_type == 'c2i' and cond.dtype.is_floating_point:
                raise TypeError("a c2i model takes class ids (int64), not embeddings")
            ce = self.cls_embedding(cond.to(h.dtype) if cond.dtype.is_floating_point else cond)
            h = torch.cat([ce[:, :C], h], dim=1)  # (B, C + S, dim)
        h = self.tok_dropout(h)
        T = h.shape[1]
        if self.freqs_cis.device != h.device:
            self.freqs_cis = self.freqs_cis.to(h.device)
        if kv_cache is None:
            input_pos = torch.arange(T, device=h.device)
            mask = None if cond_mask is None else attention_mask(input_pos, input_pos,
                                                                 _key_valid(cond_mask, T))
        else:
            input_pos = kv_cache.pos + torch.arange(T, device=h.device)
            if cond_mask is not None:  # prefill: remember which caption rows are padding
                kv_cache.key_valid[:, :C] = cond_mask.bool()
                kv_cache.padded = True
            mask = _cache_mask(kv_cache, input_pos, T)
        freqs_cis = self.freqs_cis[input_pos]
        for i, layer in enumerate(self.layers):
            if self.grad_ckpt and kv_cache is None and torch.is_grad_enabled():  # never in the cached decode
                h = checkpoint(layer, h, freqs_cis, mask, use_reentrant=False)  # (B, T, dim), block input kept
            else:
                h = layer(h, freqs_cis, mask, kv_cache, i, input_pos)
        if kv_cache is not None:
            kv_cache.pos.add_(T)
            if not kv_cache.static:
                kv_cache.filled += T
        if cond is not None:
            h = h[:, C - 1:]  # condition positions before the last one predict nothing
        # LlamaGen quirk: logits are cast to float32
        return self.output(self.norm(h)).float()


def _key_valid(cond_mask, T):
    """(B, C) caption mask -> (B, T) key validity with the image positions always valid."""
    B, C = cond_mask.shape
    return torch.cat([cond_mask.bool(), cond_mask.new_ones(B, T - C, dtype=torch.bool)], dim=1)


def _cache_mask(kv_cache, input_pos, T):
    """Sets how many keys a cached forward of T tokens reads and returns their mask, or None when the plain
    causal rule is the mask: T queries from position 0, or one query over a prefix without padded keys."""
    n = kv_cache.k[0].shape[2] if kv_cache.static else kv_cache.filled + T
    kv_cache.n_read = n
    if kv_cache.static or kv_cache.padded or (T > 1 and kv_cache.filled > 0):
        return attention_mask(input_pos, kv_cache.key_pos[:n], kv_cache.key_valid[:, :n])
    return None


def attention_mask(query_pos, key_pos, key_valid):
    """Bool mask (B, 1, Tq, Tk): causal, minus padded caption keys, with the diagonal always on.

    LlamaGen quirk: padded caption rows attend only to themselves (the diagonal is forced to 1).
    """
    causal = key_pos[None, :] <= query_pos[:, None]  # (Tq, Tk)
    diag = key_pos[None, :] == query_pos[:, None]
    return ((causal & key_valid[:, None, :]) | diag)[:, None]


# -----------------------------------------------------------------------------
# sampling


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, uniform=None):
    """Sample one token per row. logits (B, V) float32 -> (token (B,), log-prob (B,)).

    LlamaGen's `sample`: divide by the temperature, keep the top-k, then the top-p nucleus of those,
    softmax, draw. With top-k we draw among the k kept logits only (the same distribution, but k random
    numbers per row instead of V). temperature 0 means greedy. The log-prob is of the distribution
    actually sampled from, i.e. after filtering (0 for greedy). `uniform` (B,) in [0, 1) replaces the
    generator: each row then draws by inverse CDF from its own number, so an image can be reproduced
    from its own seed whatever batch it is sampled in (sample.py --per_class).
    """
    logits = logits / max(temperature, 1e-5)
    idx = None  # vocabulary ids of the columns of `logits` once they are sorted / cut to the top-k
    if top_k > 0:
        logits, idx = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), sorted
    elif top_p < 1.0:
        logits, idx = torch.sort(logits, descending=True)
    if top_p < 1.0:  # drop the tail beyond cumulative probability top_p, keeping the token that crosses it
        drop = logits.softmax(-1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(drop, float('-inf'))
    logp = logits.log_softmax(-1)
    if temperature == 0:
        pick = logits.argmax(-1, keepdim=True)
    elif uniform is not None:  # inverse CDF: row i's token depends on uniform[i] alone, not on its batch
        cdf = logp.double().exp().cumsum(-1)  # (B, K); float64, so u * total < total and p = 0 is never hit
        pick = torch.searchsorted(cdf, uniform.double()[:, None] * cdf[:, -1:], right=True)  # (B, 1)
    else:
        pick = multinomial_one(logp.exp(), generator)  # (B, 1)
    token = pick if idx is None else idx.gather(-1, pick)
    return token.squeeze(-1), logp.gather(-1, pick).squeeze(-1)


def multinomial_one(probs, generator=None):
    """One draw per row of probs (B, K) -> (B, 1): what torch.multinomial(probs, 1) computes for one sample,
    argmax(p / q) with q ~ Exp(1) (the exponential form of the Gumbel-max trick), the same operations on the
    same generator, so the same tokens, minus its check that every p is finite and >= 0, which reads a value
    back to the host: one GPU synchronisation per decoded token."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1, keepdim=True)


def _step_logits(model, token, kv_cache, cfg_scale, use_cfg):
    """One cached decode step for the whole (cond + uncond) batch -> (B, V) sampling logits."""
    logits = model(token, kv_cache=kv_cache)[:, -1]  # (2B or B, V)
    if cfg_scale > 1.0:
        cond, uncond = logits.chunk(2)
        # LlamaGen quirk: CFG on raw logits, before temperature and filtering
        logits = uncond + (cond - uncond) * cfg_scale if use_cfg else cond
    return logits


@torch.no_grad()
def generate(model, cond, cond_mask=None, cfg_scale=4.0, cfg_interval=-1, temperature=1.0, top_k=0,
             top_p=1.0, generator=None, compile=False, sample_fn=None, static_cache=None):
    """Sample image tokens for a batch of conditions.

    cond: (B,) class ids or (B, C, caption_dim) caption embeddings; cond_mask: (B, C) for captions.
    CFG runs the conditional and unconditional halves as one batch of 2B. Token j uses CFG while
    cfg_interval == -1 or j <= cfg_interval + 1 (LlamaGen's decode step j-1 <= cfg_interval).
    Returns tokens (B, block_size) int64 and the log-prob of each under the distribution it was
    sampled from (B, block_size) float32. `sample_fn(logits) -> (token, logp)` replaces the sampler
    (tests use it to record the logits and force teacher tokens, as the fixtures were made).
    static_cache (default: = compile) reads the whole cache at every step (bench.py times the prefix read
    against it).
    """
    if sample_fn is None:
        sample_fn = lambda lg: sample_logits(lg, temperature, top_k, top_p, generator)
    cfg = model.config
    B, N = cond.shape[0], cfg.block_size
    use_cfg = cfg_scale > 1.0  # LlamaGen quirk: scale <= 1 means no unconditional half at all
    cond_all = torch.cat([cond, model.null_cond(cond)]) if use_cfg else cond
    mask_all = None if cond_mask is None else (torch.cat([cond_mask, cond_mask]) if use_cfg else cond_mask)
    cache = model.new_kv_cache(cond_all.shape[0], static=compile if static_cache is None else static_cache)
    step = _step_logits
    if compile:
        cache.mark_static()
        step = torch.compile(_step_logits, mode='reduce-overhead' if cond.is_cuda else 'default',
                             fullgraph=True)
    tokens = torch.empty(B, N, dtype=torch.long, device=cond.device)
    logps = torch.empty(B, N, dtype=torch.float32, device=cond.device)
    empty = torch.empty(cond_all.shape[0], 0, dtype=torch.long, device=cond.device)
    logits = model(empty, cond_all, kv_cache=cache, cond_mask=mask_all)[:, -1]  # prefill: (2B, V)
    if use_cfg:  # the prefill always uses CFG
        c, u = logits.chunk(2)
        logits = u + (c - u) * cfg_scale
    for j in range(N):
        tokens[:, j], logps[:, j] = sample_fn(logits)
        if j + 1 < N:
            x = tokens[:, j:j + 1]
            x = torch.cat([x, x]) if use_cfg else x  # the same token goes to both halves
            use = cfg_interval == -1 or j <= cfg_interval  # this step predicts token j + 1
            logits = step(model, x, cache, cfg_scale, use)
    return tokens, logps


# -----------------------------------------------------------------------------
# smoke demo

if __name__ == '__main__':
    torch.manual_seed(0)
    cfg = GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16)
    model = GPT(cfg).eval()
    nn.init.normal_(model.output.weight, std=0.02)  # the LlamaGen init zeroes it: make logits non-trivial
    labels = torch.tensor([3, 7])
    tokens, logp = generate(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    full = model(tokens[:, :-1], labels).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    print(f"{sum(p.numel() for p in model.parameters())} params; sampled tokens {tuple(tokens.shape)}")
    print(f"max |cached log-prob - full-forward log-prob| = {(full - logp).abs().max():.2e}")

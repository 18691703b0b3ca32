"""
test_model.py -- model.py: generation properties (cached = uncached, CFG 1 = no CFG, seeds, filters), activation
checkpointing, and the GPU checks (skipped without one).
"""
import numpy as np
from safetensors.torch import load_file
import torch

import model
import train
from conftest import ATOL, cuda, fixture, forced_generate, tiny_gpt, tiny_vq
from model import GPT, config_for, generate
from model import sample_logits


def _random_head(m, seed=0):
    torch.nn.init.normal_(m.output.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    return m


@torch.no_grad()
def test_cached_generation_equals_uncached():
    m = _random_head(tiny_gpt())
    cls = torch.tensor([1, 2, 5, 9])
    for cfg_scale in (1.0, 3.0):
        tok, logp = generate(m, cls, cfg_scale=cfg_scale, top_k=20, generator=torch.Generator().manual_seed(1))
        # recompute every step's sampling distribution without a cache: the full prefix each time
        cond = m(tok[:, :-1], cls)
        uncond = m(tok[:, :-1], m.null_cond(cls))
        mix = uncond + (cond - uncond) * cfg_scale if cfg_scale > 1 else cond
        kth = mix.topk(20, -1).values[..., -1:]
        ref = mix.masked_fill(mix < kth, float('-inf')).log_softmax(-1).gather(-1, tok[..., None])[..., 0]
        torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cfg_scale_one_is_no_cfg():
    m = _random_head(tiny_gpt())
    cls, tok = torch.tensor([0, 4, 4]), torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    cond = m(tok[:, :-1], cls)  # plain conditional model, no unconditional half anywhere
    # scale 1 runs no unconditional half; scale 1 + 1e-6 runs the full 2B batch through the mixture
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=1.0), cond, atol=1e-5, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=1.0 + 1e-6), cond, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sampling_determinism():
    m = _random_head(tiny_gpt())
    cls = torch.tensor([0, 4, 4])
    run = lambda seed: generate(m, cls, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@torch.no_grad()
def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    for _ in range(20):
        tok, lp = sample_logits(logits, top_k=3, generator=g)
        assert all(t in logits[i].topk(3).indices for i, t in enumerate(tok))
        tok, _ = sample_logits(logits, top_p=0.3, generator=g)
        p = logits.softmax(-1)
        for i, t in enumerate(tok):  # a token is kept iff the mass of strictly better tokens is < top_p
            assert p[i][p[i] > p[i, t]].sum() < 0.3


@cuda
@torch.no_grad()
def test_gpu_parity_float32():
    m, e = tiny_gpt().cuda(), load_file(fixture('c2i_tiny_expected.safetensors'))
    cls, tok = e['input.class_ids'].cuda(), e['input.tokens'].cuda()
    torch.testing.assert_close(m(tok[:, :-1], cls).cpu(), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=4.0).cpu(), e['logits.kv_cfg4'], atol=ATOL, rtol=0)
    vq, ev = tiny_vq().cuda(), load_file(fixture('vq_tiny_expected.safetensors'))
    assert torch.equal(vq.encode(ev['input.images'].cuda()).flatten().cpu(), ev['indices'])


@cuda
@torch.no_grad()
def test_gpu_bf16_compile_close_to_eager():
    m = _random_head(tiny_gpt()).cuda()
    e = load_file(fixture('c2i_tiny_expected.safetensors'))
    cls, tok = e['input.class_ids'].cuda(), e['input.tokens'].cuda()
    ref = forced_generate(m, cls, tok, cfg_scale=4.0)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        eager = forced_generate(m, cls, tok, cfg_scale=4.0)
        compiled = forced_generate(m, cls, tok, cfg_scale=4.0, compile=True)
        compiled_again = forced_generate(m, cls, tok, cfg_scale=4.0, compile=True)  # replays the graphs
    scale = ref.abs().max()
    assert (eager - ref).abs().max() < 0.05 * scale
    assert (compiled - eager).abs().max() < 0.05 * scale
    torch.testing.assert_close(compiled_again, compiled)


def test_sample_logits_uniform_is_the_filtered_distribution():
    # stratified uniforms u = (m + 0.5) / M hit every token about M * p times: within one of it
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2
    M = 2000
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (1.0, 12, 0.9)]:
        x = logits.numpy() / temperature
        for row in range(3):
            ref = np.exp(x[row] - x[row].max())
            ref[np.argsort(-x[row])[top_k:] if top_k else []] = 0  # top-k, then the nucleus of what is left
            ref /= ref.sum()
            order = np.argsort(-ref)
            keep = np.cumsum(ref[order]) - ref[order] <= top_p  # kept if the mass before it is <= top_p
            ref[order[~keep]] = 0
            ref /= ref.sum()
            u = (torch.arange(M, dtype=torch.float64) + 0.5) / M
            tok, logp = model.sample_logits(logits[row].expand(M, -1), temperature, top_k, top_p, uniform=u)
            counts = np.bincount(tok.numpy(), minlength=40)
            assert np.abs(counts - M * ref).max() <= 1 + 1e-9, (temperature, top_k, top_p)
            np.testing.assert_allclose(logp.exp().numpy(), ref[tok.numpy()], rtol=1e-5)


def test_grad_ckpt_equals_plain():
    torch.manual_seed(0)
    m = GPT(config_for('GPT-tiny', 32, 4, vocab_size=64)).eval()
    torch.nn.init.normal_(m.output.weight, std=0.02)
    tc = train.TrainConfig(cfg_scale=2.0, logprob_mode='guided')
    x, y, w = torch.randint(64, (3, 64)), torch.tensor([1, 2, 3]), torch.randn(3, 64)
    calls = []
    m.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    out = {}
    for ckpt in (False, True):
        m.grad_ckpt = ckpt
        m.zero_grad(set_to_none=True)
        calls.clear()
        loss = (train.sequence_logprobs(tc, m, x, y, None)[0] * w).sum()
        loss.backward()
        out[ckpt] = loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}, len(calls)
    assert out[False][2] == 1 and out[True][2] == 2  # the block really ran again in backward
    assert torch.allclose(out[False][0], out[True][0], atol=1e-6, rtol=0)
    for k, g in out[False][1].items():
        assert torch.allclose(g, out[True][1][k], atol=1e-6, rtol=0), k
    with torch.no_grad():  # the cached decode never checkpoints and samples the same tokens
        a = generate(m, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))[0]
        m.grad_ckpt = False
        assert torch.equal(a, generate(m, y, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))[0])


@torch.no_grad()
def test_prefix_read_equals_whole_cache_read():
    # the eager cache attends over the filled prefix only; a static cache (what torch.compile uses) reads all of it
    # behind the mask: the same logits, for c2i, GQA and left-padded captions, one token or a chunk at a time
    from conftest import tiny_gpt as load
    g = torch.Generator().manual_seed(0)
    cases = [(_random_head(load()), torch.tensor([1, 2, 5]), None),
             (_random_head(load('c2i_tiny_gqa.safetensors', 'c2i_tiny_gqa_config.json')), torch.tensor([0, 7]), None)]
    t2i = _random_head(load('t2i_tiny.safetensors', 't2i_tiny_config.json'))
    C = t2i.config.cls_token_num
    mask = torch.ones(2, C, dtype=torch.long)
    mask[0, :C // 2] = 0  # a left-padded caption
    cases.append((t2i, torch.randn(2, C, t2i.config.caption_dim, generator=g), mask))
    for m, cond, cmask in cases:
        N, V = m.config.block_size, m.config.vocab_size
        tok = torch.randint(0, V, (cond.shape[0], N), generator=g)
        full = m(tok[:, :-1], cond, cond_mask=cmask)  # teacher-forced, no cache: (B, N, V)
        for static in (False, True):
            for chunk in (1, 5):  # after the prefill, feed `chunk` tokens per forward
                cache = m.new_kv_cache(cond.shape[0], static=static)
                out = [m(tok[:, :0], cond, kv_cache=cache, cond_mask=cmask)[:, -1:]]
                for j in range(0, N - 1, chunk):
                    out.append(m(tok[:, j:min(j + chunk, N - 1)], kv_cache=cache))
                torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_multinomial_one_is_torch_multinomial():
    # the sync-free draw is torch.multinomial(p, 1)'s own computation: the same tokens from the same generator
    p = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)).mul(3).softmax(-1)
    p[0, 10:] = 0  # zero-probability tokens are never drawn by either
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(50):
        assert torch.equal(model.multinomial_one(p, g1), torch.multinomial(p, 1, generator=g2))


@cuda
@torch.no_grad()
def test_gpu_decode_loop_never_waits_for_the_device():
    # no .item(), no torch.multinomial check, no branch on a tensor inside the decode loop: with CUDA's sync debug
    # mode set to error, any synchronising call in generate() raises; bf16 weights as the rollout's sampler copy
    m = _random_head(tiny_gpt()).cuda().to(torch.bfloat16)
    cls = torch.tensor([1, 2, 5, 9], device='cuda')
    gens = [torch.Generator('cuda').manual_seed(0) for _ in range(2)]  # made outside the checked region
    first = generate(m, cls, cfg_scale=2.0, generator=gens[0])  # also moves the RoPE table to the GPU, once
    torch.cuda.set_sync_debug_mode('error')
    try:
        again = generate(m, cls, cfg_scale=2.0, generator=gens[1])
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert torch.equal(first[0], again[0])

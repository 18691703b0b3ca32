"""
test_all.py -- fidelity to LlamaGen: our model and tokenizer against the outputs of the original code stored in
../shared/fixtures/llamagen (see its README), the released full-size models' keys and shapes, and the layout
of the project itself (no import cycles, counting imports inside functions).

    python -m pytest -q            # every test file (this one and test_<file>.py for each product file)
"""
import ast
import glob
import json
import os

import pytest
from safetensors.torch import load_file
import torch

from checkpoint import RELEASES
from conftest import ATOL, FIX, HERE, cached_logits, fixture, forced_generate, tiny_gpt, tiny_vq
from model import GPT, GPTConfig, config_for, generate, precompute_freqs_cis_2d
from tokenizer import VQConfig, VQModel


@torch.no_grad()
def test_c2i_parity():
    m, e = tiny_gpt(), load_file(fixture('c2i_tiny_expected.safetensors'))
    cls, tok = e['input.class_ids'], e['input.tokens']
    torch.testing.assert_close(m(tok[:, :-1], cls), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    torch.testing.assert_close(m(tok[:, :-1], torch.full_like(cls, 10)), e['logits.teacher_forced_uncond'],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits(m, cls, tok), e['logits.kv_cached'], atol=ATOL, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=4.0), e['logits.kv_cfg4'], atol=ATOL, rtol=0)
    torch.testing.assert_close(forced_generate(m, cls, tok, cfg_scale=4.0, cfg_interval=4),
                               e['logits.kv_cfg4_interval4'], atol=ATOL, rtol=0)
    greedy, _ = generate(m, cls, cfg_scale=4.0, temperature=0)
    assert torch.equal(greedy, e['generate.greedy_cfg4_tokens'])


def test_rope_table():
    e = load_file(fixture('c2i_tiny_expected.safetensors'))
    torch.testing.assert_close(precompute_freqs_cis_2d(4, 16, 10000, 1), e['rope.freqs_cis'], atol=1e-6, rtol=0)


@torch.no_grad()
def test_gqa_parity_and_cache():
    m = tiny_gpt('c2i_tiny_gqa.safetensors', 'c2i_tiny_gqa_config.json')
    e = load_file(fixture('c2i_tiny_gqa_expected.safetensors'))
    cls, tok = e['input.class_ids'], e['input.tokens']
    torch.testing.assert_close(m(tok[:, :-1], cls), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    # the reference cache crashes on GQA; ours must reproduce the teacher-forced logits step by step
    assert m.new_kv_cache(3).k[0].shape[1] == 2
    torch.testing.assert_close(cached_logits(m, cls, tok), e['logits.teacher_forced'], atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize('variant', ['cls120', 'cls8'])
def test_t2i_parity(variant):
    config = 't2i_tiny_config.json' if variant == 'cls120' else 't2i_tiny_cls8_config.json'
    m = tiny_gpt('t2i_tiny.safetensors', config)
    e = {k[len(variant) + 1:]: v for k, v in load_file(fixture('t2i_tiny_expected.safetensors')).items()
         if k.startswith(variant + '.')}
    emb, mask, tok = e['input.caption_embs'], e['input.emb_masks'], e['input.tokens']
    torch.testing.assert_close(m(tok[:, :-1], emb, cond_mask=mask), e['logits.teacher_forced'], atol=ATOL, rtol=0)
    torch.testing.assert_close(m(tok[:, :-1], emb), e['logits.teacher_forced_nomask'], atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_logits(m, emb, tok, mask), e['logits.kv_cached'], atol=ATOL, rtol=0)
    if variant == 'cls120':
        torch.testing.assert_close(m(tok[:, :-1], m.null_cond(emb), cond_mask=mask),
                                   e['logits.teacher_forced_uncond'], atol=ATOL, rtol=0)
        torch.testing.assert_close(forced_generate(m, emb, tok, cond_mask=mask, cfg_scale=4.0), e['logits.kv_cfg4'],
                                   atol=ATOL, rtol=0)
        greedy, _ = generate(m, emb, cond_mask=mask, cfg_scale=4.0, temperature=0)
        assert torch.equal(greedy, e['generate.greedy_cfg4_tokens'])
    else:  # the reference cannot run CFG here (its null caption has 120 rows): we take its last 8 rows
        null = m.null_cond(emb)
        assert torch.equal(null[1], m.cls_embedding.uncond_embedding[-emb.shape[1]:])
        c, u = m(tok[:, :-1], emb, cond_mask=mask), m(tok[:, :-1], null, cond_mask=mask)  # the two CFG halves
        torch.testing.assert_close(forced_generate(m, emb, tok, cond_mask=mask, cfg_scale=4.0), u + (c - u) * 4.0,
                                   atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match='at most 120 caption positions'):
            m.null_cond(torch.zeros(1, 121, emb.shape[2]))


@torch.no_grad()
def test_vq_parity():
    vq, e = tiny_vq(), load_file(fixture('vq_tiny_expected.safetensors'))
    x = e['input.images']
    h = vq.encoder(x)
    torch.testing.assert_close(h, e['encoder_out'], atol=ATOL, rtol=0)
    z = vq.quant_conv(h)
    torch.testing.assert_close(z, e['pre_quant'], atol=ATOL, rtol=0)
    zq, idx = vq.quantize(z)
    torch.testing.assert_close(zq, e['quant'], atol=ATOL, rtol=0)
    assert torch.equal(idx, e['indices'])
    codes = vq.encode(x)
    assert codes.shape == (2, 8, 8) and torch.equal(codes.flatten(), e['indices'])
    torch.testing.assert_close(vq.decode(codes), e['decoded'], atol=ATOL, rtol=0)
    torch.testing.assert_close(vq.decode(codes.flatten(1)), e['decoded'], atol=ATOL, rtol=0)
    torch.testing.assert_close(vq(x), e['reconstructed'], atol=ATOL, rtol=0)


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(FIX, 'real_size'))))
def test_real_size_manifest(name):
    man = json.load(open(os.path.join(FIX, 'real_size', name)))
    with torch.device('meta'):
        if name.startswith('vq'):
            m = VQModel(VQConfig(**man['model_args'], ch=man['encoder_decoder_ch']))
        else:
            m = GPT(GPTConfig(**man['model_args']))
    sd = m.state_dict()
    assert list(sd) == list(man['state_dict'])  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == man['state_dict']
    assert sum(p.numel() for p in m.parameters()) == man['num_parameters']
    assert sorted(k for k, _ in m.named_buffers()) == sorted(man['buffers_in_state_dict'])


def test_presets_match_manifests():
    # config_for(preset, image_size) gives the same config LlamaGen used for each release
    for rel, man in [('c2i_B_256', 'gpt_B_c2i_256'), ('c2i_XL_384', 'gpt_XL_c2i_384'),
                     ('t2i_XL_stage1_256', 'gpt_XL_t2i_256'), ('c2i_XXL_384', 'gpt_XXL_c2i_384')]:
        r = RELEASES[rel]
        kw = {k: r[k] for k in ('model_type', 'cls_token_num') if k in r}
        cfg = config_for(r['preset'], r['image_size'], **kw)
        want = json.load(open(os.path.join(FIX, 'real_size', man + '.json')))['model_args']
        assert {k: getattr(cfg, k) for k in want} == want


# -----------------------------------------------------------------------------
# the layout: arrows point down (STYLE.md)


def test_no_import_cycles():
    """No product file reaches itself through imports, counting imports inside functions and __main__ blocks:
    an AST walk over every top-level .py file that is not a test, a graph of the imports between them, and a
    depth-first search for a path back to the start. Also: nothing imports a command-line script."""
    mods = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(HERE, '*.py'))
            if not os.path.basename(f).startswith('test_') and os.path.basename(f) != 'conftest.py'}
    edges = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(HERE, m + '.py')).read())
        names = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                names |= {a.name.split('.')[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                names.add(n.module.split('.')[0])
        edges[m] = (names & mods) - {m}

    def path_back(start, node, seen):
        for nxt in sorted(edges[node]):
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                rest = path_back(start, nxt, seen)
                if rest:
                    return [node] + rest
        return None
    cycles = {m: path_back(m, m, {m}) for m in sorted(mods)}
    assert not any(cycles.values()), {m: ' -> '.join(c) for m, c in cycles.items() if c}
    scripts = {'train', 'sample', 'bench', 'study'}  # command-line scripts: nothing below may import them
    assert all(not (edges[m] & scripts) for m in mods - {'bench', 'study'}), \
        {m: sorted(edges[m] & scripts) for m in mods if edges[m] & scripts}

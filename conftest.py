"""
conftest.py -- the stand-ins every test file shares: the LlamaGen fixtures' paths and tiny models, a tiny random
CLIP, a tiny random judge, self-describing tiny checkpoints with a tiny T5, the tiny world, and a forker that runs
a function on N torchrun-like CPU ranks (gloo) in seconds.
"""
import huggingface_hub.constants as hf_constants
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
import json
import os
import signal
import socket
import sys
import traceback

import open_clip
import pytest
from safetensors.torch import load_file
import torch
import torch.nn.functional as F

import checkpoint
import model
import tokenizer
import train
import miniature
import world
from checkpoint import load_into, read_state_dict
from judge import tiny_judge
from model import GPT, GPTConfig, generate
from rewards import load_clip
from tokenizer import VQConfig, VQModel


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
FIX = os.path.join(HERE, '..', 'shared', 'fixtures', 'llamagen')


ATOL = 1e-4


def cached_logits(model, cond, tokens, cond_mask=None):
    """Teacher tokens fed one by one through the KV cache -> (B, N, V), as the fixtures recorded."""
    cache = model.new_kv_cache(cond.shape[0])
    out = [model(tokens[:, :0], cond, kv_cache=cache, cond_mask=cond_mask)[:, -1]]
    for j in range(tokens.shape[1] - 1):
        out.append(model(tokens[:, j:j + 1], kv_cache=cache)[:, -1])
    return torch.stack(out, 1)


def forced_generate(model, cond, tokens, **kw):
    """Run the real generate() with a sampler that records the logits it is handed and returns
    the teacher token: exactly how the fixture's kv_cfg4 logits were recorded."""
    seen = []

    def sample_fn(logits):
        seen.append(logits.clone())
        j = len(seen) - 1
        return tokens[:, j], torch.zeros(tokens.shape[0])
    generate(model, cond, sample_fn=sample_fn, **kw)
    return torch.stack(seen, 1)


def fixture(name):
    return os.path.join(FIX, name)


def tiny_gpt(weights='c2i_tiny.safetensors', config='c2i_tiny_config.json'):
    cfg = GPTConfig(**json.load(open(fixture(config)))['model_args'])
    sd, _ = read_state_dict(fixture(weights))
    return load_into(GPT(cfg), sd, weights).eval()


def tiny_vq():
    c = json.load(open(fixture('vq_tiny_config.json')))
    sd, _ = read_state_dict(fixture('vq_tiny.pt'))
    return load_into(VQModel(VQConfig(**c['model_args'], ch=c['encoder_decoder_ch'])), sd, 'vq_tiny').eval()


def run_train(out_dir, *args):
    """The colourfulness smoke preset at 8x8 px (4x4 tokens): a GRPO step takes ~50 ms on a CPU."""
    return train.main(['--preset', 'demo_color', '--image_size', '8', '--grid_every', '0', '--out_dir', str(out_dir),
                       *args])


TINY = "rewards-test-tiny"  # ~0.9M parameters, builds in ~10 ms; vocab 49408 so the real tokenizer fits


TINY_CFG = dict(embed_dim=16,
                vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=1))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return load_clip(TINY, None, "cpu")  # (model, tokenizer), random weights


def make_images(b=4, h=16, w=16, seed=0):
    """Smooth random images in [-1.1, 1.1] (the decoder may overshoot), like a random VQ decoder's."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, max(h // 4, 1), max(w // 4, 1), generator=g) * 2.2 - 1.1
    return F.interpolate(low, size=(h, w), mode="bilinear") + 0.05 * torch.randn(b, 3, h, w, generator=g)


def offline_hf_home(monkeypatch, home):
    """HF_HUB_OFFLINE=1 and HF_HOME=home; huggingface_hub reads both at import, so patch its constants too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))


def _gpt(weights, config):
    cfg = model.GPTConfig(**json.load(open(os.path.join(FIX, config)))['model_args'])
    sd, _ = checkpoint.read_state_dict(os.path.join(FIX, weights))
    return checkpoint.load_into(model.GPT(cfg), sd, weights).eval()


@pytest.fixture(scope='session')
def ckpts(tmp_path_factory):
    """Self-describing copies of the tiny fixtures and a tiny random T5 saved with save_pretrained."""
    d = tmp_path_factory.mktemp('ckpts')
    checkpoint.save_gpt(_gpt('c2i_tiny.safetensors', 'c2i_tiny_config.json'), str(d / 'c2i.safetensors'))
    checkpoint.save_gpt(_gpt('t2i_tiny.safetensors', 't2i_tiny_config.json'), str(d / 't2i.safetensors'))  # cls 120
    vq_args = json.load(open(os.path.join(FIX, 'vq_tiny_config.json')))['model_args']
    vq = tokenizer.VQModel(tokenizer.VQConfig(**vq_args, ch=32))
    checkpoint.load_into(vq, checkpoint.read_state_dict(os.path.join(FIX, 'vq_tiny.pt'))[0], 'vq_tiny.pt')
    checkpoint.save_vq(vq, str(d / 'vq.safetensors'))
    tok = ByT5Tokenizer()  # needs no files
    torch.manual_seed(0)  # d_model = the t2i fixture's caption_dim
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    t5.save_pretrained(str(d / 't5'))
    tok.save_pretrained(str(d / 't5'))
    return {k: str(d / v) for k, v in dict(c2i='c2i.safetensors', t2i='t2i.safetensors', vq='vq.safetensors',
                                              t5='t5').items()}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')


@pytest.fixture(scope='session')
def judge():
    return tiny_judge(seed=0)


SCALE_ARGS = ['--preset', 'demo_color', '--image_size', '8', '--grid_every', '0', '--device', 'cpu',
              '--conds_per_rank', '2', '--group_size', '4', '--beta', '0.1', '--cfg_scale', '2.0',
              '--logprob_mode', 'guided']


def on_ranks(world, fn, distributed=None, timeout=120):
    """fn() on `world` forked copies of this process, each with RANK/WORLD_SIZE/... set as torchrun would
    (distributed=False: a plain single process). True if every rank exits 0."""
    distributed = world > 1 if distributed is None else distributed
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    pids = []
    for r in range(world):
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 1
            try:
                signal.alarm(timeout)  # a hung rank dies instead of hanging the suite
                if distributed:
                    os.environ.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
                torch.set_num_threads(1)
                fn()
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return all(os.waitpid(p, 0)[1] == 0 for p in pids)


def train_on(world, out_dir, *args):
    argv = [*SCALE_ARGS, '--out_dir', str(out_dir), *args]
    assert on_ranks(world, lambda: train.main(argv), distributed=world > 1 or '--fsdp' in args), out_dir


def latest_weights(out_dir):
    return load_file(os.path.join(str(out_dir), 'latest', 'model.safetensors'))


def assert_same_weights(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope='session')
def tiny_world(tmp_path_factory):
    wc = world.preset_config('tiny', root=str(tmp_path_factory.mktemp('world')))
    with miniature.fixed_threads():
        return world.load_or_build(wc, log=lambda *a: None)

"""
test_conditions.py -- conditions.py: ImageNet names -> ids, prompt files, and FLAN-T5 encodings left-padded as
LlamaGen's sample_t2i.py does (against its own loop), offline T5 errors.
"""
import json

import pytest
import torch

import conditions
from checkpoint import CheckpointError
from cli import UserError
from conditions import encode_prompts, load_t5


def _llamagen_left_pad(emb, mask):
    """LlamaGen sample_t2i.py's loop, written out: rotate each row by its valid count, flip the mask."""
    new_mask = torch.flip(mask, dims=[-1])
    rows = []
    for e, m in zip(emb, mask):
        k = int(m.sum().item())
        rows.append(torch.cat([e[k:], e[:k]]))
    return torch.stack(rows) * new_mask[:, :, None], new_mask


def test_encode_prompts_left_padding(ckpts, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    tok, enc = load_t5(ckpts['t5'])  # a save_pretrained directory loads offline
    prompts = ['A red  Cube', 'two cats on a sofa, photo', 'x' * 200]  # the last one is truncated
    emb, mask = encode_prompts(prompts, tok, enc, max_length=120)
    assert emb.shape == (3, 120, 32) and emb.dtype == torch.float32 and mask.dtype == torch.int64
    lens = [len('a red cube') + 1, len(prompts[1]) + 1, 120]  # ByT5: one token per byte, plus </s>
    for i, n in enumerate(lens):
        assert mask[i].tolist() == [0] * (120 - n) + [1] * n  # valid rows at the end
        assert (emb[i, :120 - n] == 0).all() and (emb[i, 120 - n:].abs().sum(-1) > 0).all()
    # reference 1: each prompt encoded alone, without padding, gives the valid rows
    for i, p in enumerate(prompts[:2]):
        ids = tok(' '.join(p.lower().split()), return_tensors='pt').input_ids
        with torch.no_grad():
            alone = enc(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(emb[i, 120 - lens[i]:], alone, atol=1e-5, rtol=1e-5)
    # reference 2: LlamaGen's loop on the right-padded encoder output
    b = tok([' '.join(p.lower().split()) for p in prompts], max_length=120, padding='max_length',
            truncation=True, return_tensors='pt')
    with torch.no_grad():
        right = enc(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    ref_emb, ref_mask = _llamagen_left_pad(right, b.attention_mask)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(emb, ref_emb, atol=0, rtol=0)


def test_load_t5_offline_is_fast_and_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        load_t5('google/flan-t5-xl')
    msg = str(e.value)
    assert 'google/flan-t5-xl' in msg and '--t5' in msg and '\n' not in msg


def test_prompt_file_formats(tmp_path):
    files = {'t2i.json': json.dumps([{'conversations': [{'from': 'human', 'value': 'a red fox'},
                                                        {'from': 'gpt', 'value': 'ignored'}]},
                                     {'conversations': [{'value': ' two cups '}]}]),
             'coco.json': json.dumps({'images': [], 'annotations': [{'image_id': 1, 'caption': 'a red fox\n'},
                                                                    {'image_id': 2, 'caption': 'two cups'}]}),
             'geneval.jsonl': '{"tag": "single_object", "prompt": "a red fox"}\n{"prompt": "two cups"}\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert conditions.read_prompts(str(tmp_path / name)) == ['a red fox', 'two cups'], name
    (tmp_path / 'bin.txt').write_bytes(bytes(range(128, 256)))
    (tmp_path / 'bad.json').write_text(json.dumps([{'conversations': []}]))
    for name, msg in [('bin.txt', 'could not be read as UTF-8'), ('bad.json', 'conversations')]:
        with pytest.raises(UserError, match=msg) as err:
            conditions.read_prompts(str(tmp_path / name))
        assert name in str(err.value) and '\n' not in str(err.value)


def test_prompt_files_that_are_no_text_are_refused_before_being_read_whole(tmp_path, monkeypatch):
    """A directory, NUL bytes in the head or later, and a file past the size limit; the limit is lowered here so
    that a small file of good prompts stands in for a huge one (the battery in test_cli.py has a 2 GiB one)."""
    (tmp_path / 'dir.txt').mkdir()
    (tmp_path / 'head.txt').write_bytes(b'\x00' * 100 + b'a red fox\n')
    (tmp_path / 'tail.txt').write_bytes(b'a red fox\n' * 10_000 + b'\x00')  # past the 64 KiB head
    (tmp_path / 'big.txt').write_text('a red fox\n' * 30_000)
    monkeypatch.setattr(conditions, 'MAX_PROMPT_BYTES', 200_000)
    reads = []
    real_open = open
    monkeypatch.setattr('builtins.open', lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    for name, msg in [('dir.txt', 'is a directory'), ('head.txt', 'holds NUL bytes'), ('tail.txt', 'holds NUL bytes'),
                      ('big.txt', 'MiB, more than the')]:
        with pytest.raises(UserError, match=msg) as err:
            conditions.read_prompts(str(tmp_path / name))
        assert name in str(err.value) and '\n' not in str(err.value)
    assert str(tmp_path / 'big.txt') not in reads  # refused from its size alone
    assert reads.count(str(tmp_path / 'head.txt')) == 1  # its head only: never opened as text
    monkeypatch.setattr(conditions, 'MAX_PROMPT_BYTES', 1 << 20)
    assert conditions.read_prompts(str(tmp_path / 'big.txt')) == ['a red fox'] * 30_000

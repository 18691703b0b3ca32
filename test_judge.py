"""
test_judge.py -- judge.py on a tiny random Qwen2.5-VL (judge.tiny_judge: ~30k parameters, seconds on CPU) against
the plain transformers processor + forward one image at a time; the served judge through a real HTTP server on
127.0.0.1.
"""
import base64
import http.server
import io
import json
import re
import socket
import threading
import time

from PIL import Image
import numpy as np
import open_clip
import pytest
import torch

import judge
import rewards
from conftest import make_images, offline_hf_home
from judge import JudgeError
from rewards import JudgeScore
from rewards import WeightsUnavailable, build_reward


JUDGE_NAMES = ('realism', 'no_artifacts', 'vlm_quality')


ANSWERS = {'realism': (('Yes', 0), ('No', 1)), 'no_artifacts': (('Yes', 0), ('No', 1)),
           'vlm_quality': tuple((str(d), d) for d in range(6))}  # written out again: an independent reference


def u8_images(b, h, w, seed):
    """Images whose [0, 1] pixels are exact uint8 levels, so a PNG round trip (served judge) changes nothing."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 127.5 - 1


@torch.no_grad()
def judge_reference(judge, image, question, name):
    """One image, the whole chat through the plain processor and model; full softmax, then renormalised."""
    proc, model = judge.processor, judge.model
    chat = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': question}]}]
    text = proc.apply_chat_template(chat, add_generation_prompt=True)
    inputs = proc(text=[text], images=[(image.clamp(-1, 1) + 1) * 127.5], return_tensors='pt')
    p = model(**inputs).logits[0, -1].softmax(-1)
    ids = [proc.tokenizer.convert_tokens_to_ids(a) for a, _ in ANSWERS[name]]
    return sum(p[i] * v for i, (_, v) in zip(ids, ANSWERS[name])) / p[ids].sum()


def judge_question(name, subject):
    q = rewards.JUDGE_QUESTIONS[name][0]
    return q.format(subject) if name == 'vlm_quality' else q


def test_judge_batched_equals_per_image_reference(judge):
    # sizes: kept (16x16), rounded to the patch grid (20x12 -> 16x16), shrunk to max_pixels (40x28 -> 32x24)
    cases = [((16, 16), [207, 1, 980]), ((20, 12), ['a cat', 'two dogs on a red sofa at night', 'x']),
             ((40, 28), ['a photo of 3 birds', 'a tabby cat', 'sky'])]
    for seed, ((h, w), conds) in enumerate(cases):
        images = make_images(3, h, w, seed)
        subjects = [c if isinstance(c, str) else open_clip.IMAGENET_CLASSNAMES[c] for c in conds]
        for name in JUDGE_NAMES:
            got = JudgeScore(judge, name)(images, conds)
            ref = torch.stack([judge_reference(judge, im, judge_question(name, s), name)
                               for im, s in zip(images, subjects)])
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            perm = torch.tensor([2, 0, 1])
            torch.testing.assert_close(JudgeScore(judge, name)(images[perm], [conds[i] for i in perm]), got[perm],
                                       atol=1e-5, rtol=0)
    assert got.min() >= 0 and got.max() <= 5 and got.std() > 1e-3  # a random judge still tells images apart


class FakeJudgeServer(http.server.ThreadingHTTPServer):
    """OpenAI-style /v1/chat/completions on 127.0.0.1 backed by the tiny judge: the PNG and question of each
    request through the plain processor + forward, the top-20 log-probs of the first token returned.
    mode: 'ok', 'http500', or 'no_logprobs' (a reply without the log-probs)."""

    def __init__(self, judge):
        super().__init__(('127.0.0.1', 0), FakeJudgeHandler)
        self.judge, self.mode, self.lock, self.requests = judge, 'ok', threading.Lock(), []


class FakeJudgeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    @torch.no_grad()
    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        srv.requests.append((self.path, {k: v for k, v in body.items() if k != 'messages'}))
        if srv.mode == 'http500':
            self.send_error(500, 'boom')
            return
        parts = {c['type']: c for c in body['messages'][0]['content']}
        png = parts['image_url']['image_url']['url'].split(',', 1)[1]
        image = torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(png))))).permute(2, 0, 1).float()
        proc, model = srv.judge.processor, srv.judge.model
        chat = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': parts['text']['text']}]}]
        inputs = proc(text=[proc.apply_chat_template(chat, add_generation_prompt=True)], images=[image],
                      return_tensors='pt')
        with srv.lock:
            logp = model(**inputs).logits[0, -1].float().log_softmax(-1)
        top = logp.topk(min(20, len(logp)))
        entries = [{'token': proc.tokenizer.convert_ids_to_tokens(i), 'logprob': v}
                   for v, i in zip(top.values.tolist(), top.indices.tolist())]
        choice = {'message': {'role': 'assistant', 'content': entries[0]['token']},
                  'logprobs': {'content': [{**entries[0], 'top_logprobs': entries}]}}
        reply = {'choices': [choice]} if srv.mode == 'ok' else {'choices': [{'message': choice['message']}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_judge_served_equals_in_process_and_fails_cleanly(judge):
    srv = FakeJudgeServer(judge)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{srv.server_address[1]}/v1'
        images, conds = u8_images(5, 20, 12, seed=3), ['a red car', 'a', 'two cats', 'x y', 'a dog']
        reward = build_reward('realism=1,vlm_quality=0.5', judge_url=url, judge_model='tiny')
        total, raw = reward(images, conds)
        for name in ('realism', 'vlm_quality'):
            torch.testing.assert_close(raw[name], JudgeScore(judge, name)(images, conds), atol=1e-4, rtol=0)
        assert len(srv.requests) == 10 and all(p == '/v1/chat/completions' for p, _ in srv.requests)
        assert all(b['max_tokens'] == 1 and b['logprobs'] is True and b['top_logprobs'] == 20 and b['model'] == 'tiny'
                   for _, b in srv.requests)
        for mode, msg in [('http500', 'answered HTTP 500'), ('no_logprobs', 'without log-probs')]:
            srv.mode = mode
            with pytest.raises(JudgeError, match=msg) as err:
                reward(images[:2], conds[:2])
            assert url in str(err.value) and '\n' not in str(err.value)
    finally:
        srv.shutdown()
        srv.server_close()
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(('127.0.0.1', 0))
        closed = f'http://127.0.0.1:{s.getsockname()[1]}/v1'
    with pytest.raises(JudgeError, match='could not reach the judge server at ' + re.escape(closed)):
        build_reward('no_artifacts=1', judge_url=closed, judge_model='tiny')(images[:1], [1])


def test_judge_offline_is_fast_and_one_sentence(monkeypatch, tmp_path):
    offline_hf_home(monkeypatch, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        judge.load_judge('Qwen/Qwen2.5-VL-3B-Instruct', 'cpu')
    msg = str(err.value)
    assert time.perf_counter() - t0 < 3.0 and 'Qwen/Qwen2.5-VL-3B-Instruct' in msg and 'HF_HOME' in msg
    assert '\n' not in msg and msg.endswith('.') and not re.search(r'[.!?]\s+[A-Z]', msg)

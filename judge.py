"""
judge.py -- a vision-language model as a reward judge: asked a question about each image, answered with one
token whose probability is read from the next-token logits. rewards.py turns its answers into the realism,
no_artifacts and vlm_quality scores (JudgeScore, JUDGE_QUESTIONS); this file holds the two ways to ask.

    python judge.py      # smoke demo: a tiny random Qwen2.5-VL built in memory answers for 4 images

- `VLMJudge`: any Hugging Face image-text-to-text model (default Qwen/Qwen2.5-VL-3B-Instruct, the paper's judge)
  in this process, B questions about B images in one left-padded forward, bf16 on GPU.
- `ServedJudge`: the same questions to a bigger judge behind an OpenAI-compatible /chat/completions server (vLLM,
  sglang), one request per image, 16 at a time, reading the answers from the first token's top_logprobs.

How this departs from the paper's code, which has the VLM *generate* a JSON answer (up to 256 tokens at
temperature 0.6, one image at a time) and parses it: each question asks for a one-token answer, so the judge is
deterministic, continuous (it ranks images within a group instead of producing tied integers), has no parser that
can fail, and costs one forward (bench.py: 63x faster than generating 20 tokens per image on a tiny model).
`tiny_judge` builds a ~30k-parameter random judge with an in-memory tokenizer: the offline smoke demo, bench.py's
judge section and the tests use it (no weights can be downloaded here).
"""
import base64
import concurrent.futures
import functools
import io
import json
import math
import urllib.error
import urllib.request

import torch
from PIL import Image

from hub import fetch_weights, hub_cache_dir
from tokenizer import to_unit

JUDGE = "Qwen/Qwen2.5-VL-3B-Instruct"  # the paper's judge


class JudgeError(ValueError):
    """A served judge is unreachable or answers something unusable (the CLI exits with code 2)."""


class VLMJudge:
    """A Hugging Face image-text-to-text model (model, processor) as a judge: answer_probs asks B
    questions about B images in one forward and reads the answers from the next-token logits."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval().requires_grad_(False), processor
        self.chats, self.ids = {}, {}  # question -> chat text; answers -> token ids (both repeat every step)

    def chat(self, question):  # the user turn (image, question) and the assistant prompt, as the model's template
        if question not in self.chats:
            turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            self.chats[question] = self.processor.apply_chat_template(turn, add_generation_prompt=True)
        return self.chats[question]

    def answer_ids(self, answers):  # each answer must be exactly one token, or it has no single logit
        if answers not in self.ids:
            ids = [self.processor.tokenizer.encode(a, add_special_tokens=False) for a in answers]
            if any(len(i) != 1 for i in ids):
                raise ValueError(f"the judge's tokenizer splits the answers {answers} into {ids}; use a judge "
                                 f"whose vocabulary has each as one token.")
            self.ids[answers] = [i[0] for i in ids]
        return self.ids[answers]

    @torch.no_grad()
    def answer_probs(self, images, questions, answers):
        """(B, 3, H, W) in [-1, 1], B questions, K answer words -> (B, K) float32: P(answer), renormalised
        over the K. Left padding puts every row's last token at -1, so a row scores as it would alone."""
        dev = self.model.device
        pixels = to_unit(images.to(dev)) * 255  # the processor's own rescale (1/255) and normalise follow
        batch = self.processor(text=[self.chat(q) for q in questions], images=pixels, padding=True,
                               padding_side="left", return_tensors="pt", device=dev)  # resize etc. in torch
        batch = {k: v.to(dev, self.model.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
        logits = self.model(**batch, logits_to_keep=1).logits[:, -1].float()  # (B, V): the next token
        return logits[:, self.answer_ids(tuple(answers))].softmax(-1)  # (B, K)


class ServedJudge:
    """The same questions to a judge behind an OpenAI-compatible /chat/completions (vLLM, sglang): one
    request per image, sent concurrently, the answers read from the first token's top_logprobs. An answer
    outside the server's top 20 counts as probability 0 (in-process it gets its exact, tiny probability)."""

    def __init__(self, url, model, workers=16, timeout=120.0):
        self.url, self.name, self.workers, self.timeout = url.rstrip("/"), model, workers, timeout

    def ask(self, image_url, question, answers):  # -> K probabilities, renormalised over the answers
        body = dict(model=self.name, max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=20,
                    messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                           {"type": "text", "text": question}]}])
        req = urllib.request.Request(self.url + "/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:  # one attempt, bounded by the timeout: a dead server fails the step instead of hanging it
            with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                top = json.load(reply)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            logp = {t["token"]: float(t["logprob"]) for t in top}
        except urllib.error.HTTPError as e:
            raise JudgeError(f"the judge server at {self.url} answered HTTP {e.code} ({e.reason}); check "
                             f"--judge_url and --judge_model.") from None
        except (urllib.error.URLError, OSError) as e:
            raise JudgeError(f"could not reach the judge server at {self.url} ({getattr(e, 'reason', e)}); "
                             f"start it or fix --judge_url.") from None
        except (ValueError, KeyError, IndexError, TypeError):
            logp = {}  # not chat-completions JSON with log-probs: reported as below
        p = [math.exp(logp[a]) if a in logp else 0.0 for a in answers]
        if not sum(p) > 0:
            raise JudgeError(f"the judge server at {self.url} replied without log-probs for any of the answers "
                             f"{', '.join(answers)}; serve an OpenAI-compatible /chat/completions with logprobs.")
        return [x / sum(p) for x in p]

    def answer_probs(self, images, questions, answers):  # as VLMJudge.answer_probs
        u8 = (to_unit(images) * 255 + 0.5).floor().byte().permute(0, 2, 3, 1).cpu().numpy()  # as save_image
        urls = []
        for im in u8:  # PNG: lossless, so the server sees the same uint8 pixels
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(urls))) as pool:
            rows = list(pool.map(lambda uq: self.ask(*uq, answers), zip(urls, questions)))
        return torch.tensor(rows, dtype=torch.float32, device=images.device)


@functools.cache
def load_judge(name=JUDGE, device="cpu"):
    """-> VLMJudge: any image-text-to-text model (AutoModelForImageTextToText + AutoProcessor) by Hub name
    or save_pretrained directory; bf16 on GPU, float32 on CPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32

    def download():
        kw = dict(cache_dir=hub_cache_dir())
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **kw)
        return model, AutoProcessor.from_pretrained(name, **kw)
    model, processor = fetch_weights(f"judge weights {name}", download, "judge", "a save_pretrained directory")
    return VLMJudge(model.to(device), processor)


# -----------------------------------------------------------------------------
# a tiny random judge for offline runs (smoke demo, bench.py, tests)


TINY_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
             "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
             "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's, minus the system turn


def tiny_judge(seed=0, std=1.0):
    """A random ~30k-parameter Qwen2.5-VL judge built in memory, for demos, tests and bench.py: a word-level
    tokenizer of 18 tokens (Qwen's chat and vision tokens, the answers, the rest -> [UNK]), patch 4, merge 2.
    std: init scale of the weights; large, so that answer probabilities differ visibly between images."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    vocab = {t: i for i, t in enumerate(special + ["[UNK]", "user", "assistant", "Yes", "No", *"012345"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                   pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token=special[0],
                                  additional_special_tokens=special[1:], chat_template=TINY_CHAT)
    patches = dict(patch_size=4, merge_size=2, temporal_patch_size=2)  # images go in multiples of 8 px
    processor = Qwen2_5_VLProcessor(Qwen2VLImageProcessor(**patches, min_pixels=8 * 8, max_pixels=32 * 32), tok,
                                    Qwen2VLVideoProcessor(**patches), chat_template=TINY_CHAT)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, initializer_range=std, pad_token_id=0, bos_token_id=0,
                eos_token_id=2,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=16, out_hidden_size=32, fullatt_block_indexes=[1],
                  initializer_range=std)
    ids = {k: vocab[f"<|{v}|>"] for k, v in [("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
                                              ("vision_start_token_id", "vision_start"),
                                              ("vision_end_token_id", "vision_end")]}
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    return VLMJudge(model, processor)


if __name__ == "__main__":
    torch.manual_seed(0)
    judge = tiny_judge()  # random weights: the answers mean nothing, the plumbing is real
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    p = judge.answer_probs(images, ["Is this image AI-generated? Answer Yes or No."] * 4, ("Yes", "No"))
    print("P(Yes), P(No) of a tiny random judge for 4 images:", [[round(x, 3) for x in row] for row in p.tolist()])

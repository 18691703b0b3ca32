"""
conditions.py -- what the generator is conditioned on: ImageNet class ids (or their names) for class-to-image,
prompts for text-to-image, read from prompt files and encoded by FLAN-T5 the way LlamaGen feeds them.

    python conditions.py     # smoke demo: class names -> ids, a prompt file, a tiny random T5's left-padded encoding

Follows LlamaGen's autoregressive/sample/sample_t2i.py for the captions: FLAN-T5-XL, 120 tokens, the rows of each
caption rotated so the padding comes first (left-padded), lowercased and whitespace-folded (its clean_caption
minus the URL/HTML rules). Prompt files: .txt, a .json list, AR-GRPO's t2i .json, COCO captions .json, GenEval
.jsonl.
"""
import codecs
import difflib
import json
import os

import torch

from checkpoint import CheckpointError
from hub import cache_only_if_offline, hub_cache_dir
from cli import UserError

# -----------------------------------------------------------------------------
# class-to-image: class ids, or ImageNet names


def class_ids(specs):
    """--class values (ids, or ImageNet names matched case-insensitively) -> list of int."""
    keys = [' '.join(str(s).lower().split()) for s in specs]
    if all(k.lstrip('-').isdigit() for k in keys):
        return [int(k) for k in keys]
    import open_clip  # IMAGENET_CLASSNAMES: 1000 names, index = class id (~2 s to import, so only here)
    names = [c.lower() for c in open_clip.IMAGENET_CLASSNAMES]
    for s, k in zip(specs, keys):
        if not k.lstrip('-').isdigit() and k not in names:
            close = ' or '.join(map(repr, difflib.get_close_matches(k, names, n=3))) or 'none'
            raise UserError(f"unknown ImageNet class name {s!r} (close matches: {close}); or pass a class id")
    return [int(k) if k.lstrip('-').isdigit() else names.index(k) for k in keys]  # repeated names: first id


# -----------------------------------------------------------------------------
# text-to-image: prompt files, and FLAN-T5 encodings left-padded as LlamaGen's


MAX_PROMPT_BYTES = 256 << 20  # COCO's largest captions file is ~90 MB; a bigger "prompt file" is a wrong path


def read_prompts(path):
    """Prompts from .txt (one per line), .jsonl (GenEval metadata: "prompt" per line) or .json: a list of
    strings, AR-GRPO's t2i file (a list of {"conversations": [{"value": caption}, ...]}, the first value
    taken) or COCO captions ({"annotations": [{"caption": ...}, ...]})."""
    if path and os.path.isdir(path):
        raise UserError(f"prompt file {path} is a directory; pass --prompts FILE (.txt, .json or .jsonl)")
    if not path or not os.path.isfile(path):
        raise UserError(f"prompt file {path!r} does not exist; pass --prompts FILE (.txt, .json or .jsonl)")
    if os.path.getsize(path) > MAX_PROMPT_BYTES:  # said before reading it whole
        raise UserError(f"prompt file {path} is {os.path.getsize(path) / 2 ** 20:.0f} MiB, more than the "
                        f"{MAX_PROMPT_BYTES >> 20} MiB a prompt file may hold; pass a smaller .txt, .json or .jsonl")
    try:
        with open(path, 'rb') as f:  # the head first: a binary file is refused before it is read whole
            head = f.read(1 << 16)
        codecs.getincrementaldecoder('utf-8')().decode(head)  # (a character cut at the end of the head is fine)
        binary = b'\x00' in head  # text never holds NUL bytes
        text = '' if binary else open(path, encoding='utf-8').read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"prompt file {path} could not be read as UTF-8 text ({type(e).__name__}); pass a .txt, "
                        f".json or .jsonl file") from None
    if binary or '\x00' in text:
        raise UserError(f"prompt file {path} holds NUL bytes, so it is binary, not text; pass a .txt, .json or "
                        f".jsonl file")
    try:
        if path.endswith('.jsonl'):
            prompts = [json.loads(line)['prompt'] for line in text.splitlines() if line.strip()]
        elif path.endswith('.json'):
            data = json.loads(text)
            if isinstance(data, dict):  # COCO captions
                prompts = [a['caption'] for a in data['annotations']]
            else:  # strings, or AR-GRPO's conversations (the first turn is the caption)
                prompts = [p['conversations'][0]['value'] if isinstance(p, dict) else p for p in data]
        else:
            prompts = [line.strip() for line in text.splitlines()]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"prompt file {path} is not a .json list of strings, of {{\"conversations\": ...}} or COCO "
                        f"captions, nor a .jsonl of {{\"prompt\": ...}} objects ({type(e).__name__}: {e})") from None
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts")
    return prompts


def load_t5(name='google/flan-t5-xl', device='cpu', dtype=torch.float32):
    """(tokenizer, T5 encoder in eval mode) from a local directory, the Hugging Face cache or the Hub.
    Offline it fails at once with CheckpointError (cache-only lookups when the Hub is unreachable)."""
    from transformers import AutoTokenizer, T5EncoderModel
    try:
        with cache_only_if_offline():
            kw = dict(cache_dir=hub_cache_dir())
            tok = AutoTokenizer.from_pretrained(name, **kw)
            return tok, T5EncoderModel.from_pretrained(name, dtype=dtype, **kw).to(device).eval()
    except Exception as e:
        raise CheckpointError(f"could not load the text encoder {name} ({type(e).__name__}): it is not a "
                              f"save_pretrained directory nor in the cache {hub_cache_dir()}, and the Hub is "
                              f"unreachable or refused; download it where there is network (or point HF_HOME at a "
                              f"cache that has it), or pass --t5 DIR") from None


@torch.no_grad()
def encode_prompts(prompts, tokenizer, encoder, max_length=120):
    """B prompts -> (emb (B, L, D) float32, mask (B, L) int64) with L = max_length, left-padded.
    LlamaGen quirk (sample_t2i.py): T5 encodes right-padded tokens, then each row is rotated so its
    n valid rows come last (row j <- row (j + n) mod L), padded rows are zeroed and the mask flipped.
    Prompts are lowercased and whitespace-folded, as LlamaGen's clean_caption (minus URL/HTML rules).
    """
    texts = [' '.join(p.lower().split()) for p in prompts]
    batch = tokenizer(texts, max_length=max_length, padding='max_length', truncation=True,
                      padding_side='right', return_tensors='pt')
    dev = next(encoder.parameters()).device
    ids, mask = batch['input_ids'].to(dev), batch['attention_mask'].to(dev)  # (B, L); mask 1..1 0..0
    emb = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, L, D)
    src = (torch.arange(ids.shape[1], device=dev) + mask.sum(1, keepdim=True)) % ids.shape[1]  # (B, L)
    emb = emb.gather(1, src[..., None].expand_as(emb))
    mask = mask.flip(-1)  # 0..0 1..1
    return emb * mask[..., None], mask



if __name__ == '__main__':
    import tempfile
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel
    print("class ids of ['207', 'tabby cat', 'Golden Retriever']:", class_ids(['207', 'tabby cat', 'Golden Retriever']))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'prompts.jsonl')
        open(path, 'w').write('{"prompt": "a red cube"}\n{"prompt": "two  Blue  spheres"}\n')
        prompts = read_prompts(path)
    torch.manual_seed(0)  # a tiny random T5 and a byte-level tokenizer built in memory: the padding is real
    t5 = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)).eval()
    emb, mask = encode_prompts(prompts, ByT5Tokenizer(), t5, max_length=24)
    print(f"{prompts} -> embeddings {tuple(emb.shape)}, mask rows (1 = caption token, padding first):")
    print(mask)

"""
hub.py -- the Hugging Face Hub, as every file here reaches it: the cache directory (read from the environment at
call time), whether the Hub is reachable, lookups that answer from the cache alone when it is not (one sentence
at once, instead of huggingface_hub's ~25 s of retries), and a safetensors header read without its weights.

    python hub.py     # smoke demo: where the cache is, whether the Hub is reachable

checkpoint.py (generators, VQs), conditions.py (T5), rewards.py (CLIP, HPS) and judge.py (Qwen2.5-VL) fetch
through it; each turns a failure into its own one-sentence error naming the flag that replaces the download.
"""
import contextlib
import os


def hub_cache_dir():
    """The huggingface_hub cache, read from the environment now (not at import, so tests can move it)."""
    home = os.environ.get('HF_HOME', os.path.join(os.path.expanduser('~'), '.cache', 'huggingface'))
    return os.environ.get('HF_HUB_CACHE', os.path.join(home, 'hub'))


def hub_unreachable():
    """Why the Hub cannot be reached right now (HF_HUB_OFFLINE is set, or its host does not resolve), or None."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on'):
        return 'HF_HUB_OFFLINE is set'
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return 'no network'
    return None


@contextlib.contextmanager
def cache_only_if_offline():
    """Inside, Hub lookups answer from the local cache alone when the Hub cannot be reached, so a missing
    file fails at once instead of after huggingface_hub's ~25 s of retries."""
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE  # read by huggingface_hub at call time
    constants.HF_HUB_OFFLINE = saved or hub_unreachable() is not None
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def cached_file(repo, filename):
    """The local path of `filename` from Hub `repo` if the huggingface_hub cache holds it, else None (no request)."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, filename, cache_dir=hub_cache_dir(), local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError and kin)
        return None


def remote_header(repo, filename):
    """The `__metadata__` of a safetensors file on the Hub, read by two small range requests (the 8-byte header
    length, then the header), not by downloading its weights. Raises ConnectionError when the Hub is unreachable."""
    from huggingface_hub import parse_safetensors_file_metadata
    why = hub_unreachable()
    if why:
        raise ConnectionError(why)
    return parse_safetensors_file_metadata(repo, filename).metadata or {}


class WeightsUnavailable(RuntimeError):
    """Pretrained reward or judge weights that are neither in the local cache nor downloadable (e.g. offline)."""


def fetch_weights(what, download, arg, local="a local file"):
    """download() inside cache_only_if_offline; any failure -> WeightsUnavailable, one sentence naming the flag."""
    try:
        with cache_only_if_offline():  # offline: fail at once instead of retrying for ~25 s
            return download()
    except Exception as e:  # offline, not in the cache, or a hub error
        raise WeightsUnavailable(f"{what} are not in the Hugging Face cache {hub_cache_dir()} and "
                                 f"could not be downloaded ({type(e).__name__}); set HF_HOME to a cache that "
                                 f"has them or pass {local} as {arg}.") from None


if __name__ == '__main__':
    print(f"Hugging Face cache: {hub_cache_dir()}; the Hub is {hub_unreachable() or 'reachable'}")

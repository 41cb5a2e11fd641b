"""The tokenizer oracles: open_clip's tokenizer module (the reference for ldm.tokenizer) and transformers'
CLIPTokenizer (SD1's, as diffusers pipelines use it) built from the same vocabulary."""
import importlib.util
from pathlib import Path

from ldm.tokenizer import BOS, EOS
from oracles import find_oracle, import_oracle


def open_clip_tokenizer():
    """open_clip/tokenizer.py loaded from its file: `import open_clip` fails without torchvision, and this one module
    only needs ftfy, regex, numpy and torch."""
    path = Path(find_oracle("open_clip").submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_oracle", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def hf_clip_tokenizer(open_clip_module=None):
    """transformers' CLIPTokenizer from open_clip's vocabulary and merges, with OpenAI's special token names."""
    transformers = import_oracle("transformers")
    simple = (open_clip_module or open_clip_tokenizer())._tokenizer
    vocab = {symbol: token_id for symbol, token_id in simple.encoder.items() if token_id < BOS}
    vocab.update({"<|startoftext|>": BOS, "<|endoftext|>": EOS})
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)

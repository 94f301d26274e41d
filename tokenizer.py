"""
Tokenizers, for prepare.py (which writes token files) and for the readers (which decode them: data.py, sample.py,
logger.py): "bytes" is UTF-8 bytes 0..255 with separator 256 (vocab 257) and needs nothing; any tiktoken encoding
(gpt2, cl100k_base, ...) uses its <|endoftext|> as separator, its files downloaded on first use or read from
TIKTOKEN_CACHE_DIR; a path names a tiktoken-format BPE file (LLaMA-3's tokenizer.model: its ranks, then the
separator) or a Hugging Face tokenizer.json (pip install tokenizers; its separator: the eos_token of the
tokenizer_config.json beside it, else the first of SEP_NAMES it has).
"""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common import UserError, need

# a tokenizer.json's separator when no tokenizer_config.json beside it names its eos_token: the first of these it has
SEP_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")



def get_tokenizer(name):
    """A tokenizer: .name, .encode(str) -> list[int], .decode(list[int]) -> str, .vocab_size, .sep_id, and
    .encode_batch(list[str]) -> [uint32 array], the bulk path of prepare()'s workers."""
    if name == "bytes":
        return SimpleNamespace(
            name="bytes", vocab_size=257, sep_id=256,
            encode=lambda s: list(s.encode("utf-8", errors="replace")),
            encode_batch=lambda texts: [np.frombuffer(s.encode("utf-8", errors="replace"), np.uint8) for s in texts],
            # ids > 255 (the separator, or padding ids a model may sample) are not text
            decode=lambda ids: bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace"))
    if name.endswith(".json") and os.path.isfile(name):
        return hf_tokenizer(name)
    try:
        import tiktoken  # imported only here, so the bytes tokenizer works without it
    except ImportError:
        raise UserError(f"tokenizer {name!r} needs tiktoken (pip install tiktoken); "
                           "--tokenizer=bytes needs nothing") from None
    if os.path.isfile(name):  # a tiktoken-format BPE file (LLaMA-3's tokenizer.model is one)
        enc, name = bpe_file_encoding(tiktoken, name), os.path.abspath(name)
    elif name not in tiktoken.list_encoding_names():
        valid = ", ".join(["bytes"] + tiktoken.list_encoding_names())
        raise UserError(f"unknown tokenizer {name!r}; valid names: {valid}, or the path of a tiktoken-format BPE file "
                        f"or of a Hugging Face tokenizer.json")
    else:
        enc = None
    try:
        enc = enc or tiktoken.get_encoding(name)
    except Exception as e:  # no network, a proxy, a corrupt download: all look alike to the user
        cause = f"{type(e).__name__}: {str(e)}".splitlines()[0]
        cause = cause if len(cause) < 100 else cause[:99] + "…"
        raise UserError(
            f"tiktoken encoding {name!r} could not be loaded: tiktoken could not download its "
            f"files ({cause}). Fix: set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached "
            f"files (or run once with internet access to fill the cache), or use "
            f"--tokenizer=bytes, which works offline.") from None

    def decode(ids):
        ids = [i for i in ids if 0 <= i < enc.n_vocab]
        try:
            return enc.decode(ids, errors="replace")
        except KeyError:  # some encodings have holes below n_vocab; drop just those ids
            ok = []
            for i in ids:
                try:
                    enc.decode_single_token_bytes(i)
                    ok.append(i)
                except KeyError:
                    pass
            return enc.decode(ok, errors="replace")

    # encode_ordinary: text that happens to contain "<|endoftext|>" stays plain text. In bulk, the same ids
    # as a buffer (encode with no special token allowed is encode_ordinary): no Python int per token, which
    # would hold the GIL
    core, buffer = enc._core_bpe, hasattr(enc._core_bpe, "encode_to_tiktoken_buffer")

    def as_array(text):
        if buffer:
            try:
                return np.frombuffer(core.encode_to_tiktoken_buffer(text, set()), np.uint32)
            except UnicodeEncodeError:  # lone surrogates: encode_ordinary has the fallback
                pass
        return np.array(enc.encode_ordinary(text), np.uint32)

    return SimpleNamespace(name=name, vocab_size=enc.n_vocab, sep_id=enc.eot_token, encode=enc.encode_ordinary,
                           decode=decode, encode_batch=lambda texts: [as_array(t) for t in texts])


# LLaMA-3's pre-tokenizer split (cl100k_base's, written without possessive quantifiers)
BPE_FILE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_file_encoding(tiktoken, path):
    """A tiktoken Encoding from a BPE file of 'base64-token rank' lines, split by BPE_FILE_PATTERN; the
    document separator is the id after the last rank, so vocab_size = ranks + 1."""
    from tiktoken.load import load_tiktoken_bpe
    try:
        ranks = load_tiktoken_bpe(path)
    except Exception as e:
        raise UserError(f"tokenizer file {path!r} is not a tiktoken BPE file ({type(e).__name__}: {str(e)[:80]}); "
                        f"its lines must be 'base64-token rank'") from None
    return tiktoken.Encoding(os.path.basename(path), pat_str=BPE_FILE_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": max(ranks.values()) + 1})


def hf_tokenizer(path):
    """A Hugging Face tokenizer.json, through the optional tokenizers package: vocab_size is its largest id + 1
    (added tokens included); the separator is the eos_token of the tokenizer_config.json beside it, else
    the first of SEP_NAMES it has. No BOS or other special token is added to a document."""
    tokenizers = need("tokenizers", "tokenizers", f"--tokenizer={path}")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # a JSON that is not a tokenizer: the library's message, on one line
        raise UserError(f"tokenizer file {path!r} is not a Hugging Face tokenizer.json "
                        f"({str(e).splitlines()[0][:100]})") from None
    vocab, names = tok.get_vocab(with_added_tokens=True), list(SEP_NAMES)
    config = Path(path).with_name("tokenizer_config.json")
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        names.insert(0, eos.get("content") if isinstance(eos, dict) else eos)
    sep = next((vocab[n] for n in names if n in vocab), None)
    if sep is None:
        raise UserError(f"tokenizer file {path!r} has no end-of-document token: put a tokenizer_config.json with "
                        f"its eos_token beside it, or give it one of {', '.join(SEP_NAMES)}")
    n, batch = max(vocab.values()) + 1, getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no offsets
    return SimpleNamespace(
        name=os.path.abspath(path), vocab_size=n, sep_id=sep,
        encode=lambda s: tok.encode(s, add_special_tokens=False).ids,
        # encode_batch spreads the texts over tokenizers' own threads (one per worker process: start_worker)
        encode_batch=lambda texts: [np.array(e.ids, np.uint32) for e in batch(texts, add_special_tokens=False)],
        decode=lambda ids: tok.decode([i for i in ids if 0 <= i < n], skip_special_tokens=False))


def dtype_for_vocab(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32

def get_tokenizer_from_meta(meta):
    """The tokenizer a corpus was built with, from its meta.json dict."""
    tok = get_tokenizer(meta["tokenizer"])
    if (tok.vocab_size, tok.sep_id) != (meta["vocab_size"], meta["sep_id"]):
        raise UserError(f"tokenizer {tok.name!r} now has vocab_size={tok.vocab_size} "
                           f"sep_id={tok.sep_id}, but the corpus recorded "
                           f"{meta['vocab_size']} and {meta['sep_id']}; re-run prepare.py")
    return tok

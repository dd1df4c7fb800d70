"""Training a byte-level BPE vocabulary, readably and fast enough for a 4 MB corpus in about a minute.

The algorithm is the one in every textbook: start from the 256 bytes, count every adjacent pair
of tokens, merge the most frequent pair into a new token, repeat until the vocabulary is full.
`train_bpe_naive` below does exactly that and nothing more. It recounts the whole corpus for
every merge, which is fine for a paragraph and hopeless for megabytes.

`train_bpe` gives the same merges (a test checks it) with three changes, none of them clever:

1. Count each distinct pre-token chunk once. After the regex split, a corpus is mostly the same
   few thousand chunks (" the", "する", "\n") repeated; a chunk and its frequency stand for all copies.
2. Update counts, don't recount. Merging (a, b) only changes pairs next to an occurrence of
   a b: (x, a) becomes (x, ab) and (b, y) becomes (ab, y). An index pair → chunks containing it
   says which chunks to visit.
3. A heap finds the most frequent pair. Counts go stale as merges happen; a stale heap entry is
   noticed when popped and pushed back with its current count.

Ties go to the pair with the smallest ids, so training is deterministic.
"""

from __future__ import annotations

import heapq
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable

import regex

from tegaki.errors import TegakiError
from tegaki.tokenizer.bpe import ENDOFTEXT, BytePairTokenizer, pattern_for


def count_chunks(texts: Iterable[str], pattern: str, special_tokens: Iterable[str] = ()) -> Counter:
    """Pre-tokenize and count: {chunk: how many times it occurs}. Special tokens in the text are
    cut out first, so no merge ever learns a piece of "<|endoftext|>"."""
    split = regex.compile(pattern_for(pattern))
    specials = sorted(special_tokens, key=len, reverse=True)
    cut = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    counts: Counter = Counter()
    for text in texts:
        for part in cut.split(text) if cut else [text]:
            counts.update(split.findall(part))
    return counts


# The largest vocabulary a tokenizer is trained to: 4x the largest in use (Gemma's 262,144). The
# tokenizers library sizes its tables by --vocab-size before it reads a byte (a billion: 70 GB, then
# an abort), and an embedding of more rows would not fit a model anyway.
MAX_VOCAB_SIZE = 1 << 20


def check_vocab_size(vocab_size: int) -> None:
    """Refuse a vocabulary no corpus fills and no model embeds, before a trainer allocates for it."""
    if vocab_size > MAX_VOCAB_SIZE:
        raise TegakiError(
            f"vocab size {vocab_size:,} is more than tegaki trains ({MAX_VOCAB_SIZE:,}; the largest "
            "vocabularies in use have 262,144 tokens): choose a smaller --vocab-size"
        )


def _check_size(vocab_size: int, special_tokens: list[str]) -> int:
    check_vocab_size(vocab_size)
    smallest = 256 + len(special_tokens)
    if vocab_size < smallest:
        raise TegakiError(
            f"vocab size {vocab_size} is smaller than the byte alphabet: a byte-level tokenizer needs "
            f"256 byte tokens + {len(special_tokens)} special token(s) = {smallest} at least"
        )
    return vocab_size - smallest  # the number of merges to learn


def _finish(merges, vocab_size, pattern, special_tokens, name) -> BytePairTokenizer:
    vocab = {i: bytes([i]) for i in range(256)}
    for (left, right), new_id in merges.items():  # in merge order: both parts already exist
        vocab[new_id] = vocab[left] + vocab[right]
    first_special = 256 + len(merges)
    specials = {s: first_special + k for k, s in enumerate(special_tokens)}
    return BytePairTokenizer(vocab, merges, pattern, specials, name)


def train_bpe(
    texts: Iterable[str] | str,
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    name: str = "bpe",
    verbose: bool = False,
) -> BytePairTokenizer:
    """Learn `vocab_size - 256 - len(special_tokens)` merges from `texts`.

    Ids: 0..255 are the bytes, then one id per merge in the order learned, then the special tokens.
    Stops early (with a smaller vocabulary) if the corpus runs out of pairs.
    """
    if isinstance(texts, str):
        texts = [texts]
    special_tokens = list(special_tokens)
    num_merges = _check_size(vocab_size, special_tokens)
    start = time.perf_counter()
    chunk_counts = count_chunks(texts, pattern, special_tokens)

    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # each chunk as token ids
    freqs = list(chunk_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair → indices of words holding it
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: dict[tuple[int, int], int] = {}
    for new_id in range(256, 256 + num_merges):
        pair = _pop_most_frequent(heap, pair_counts)
        if pair is None:
            break  # every chunk is a single token already
        merges[pair] = new_id
        grown = set()
        for w in where.pop(pair):
            words[w], changes = _merge_word(words[w], pair, new_id)
            for changed, delta in changes:
                pair_counts[changed] += delta * freqs[w]
                if delta > 0:
                    where[changed].add(w)
                    grown.add(changed)
        del pair_counts[pair]
        for changed in grown:  # a count that grew needs a fresh heap entry; shrunk ones are lazy
            heapq.heappush(heap, (-pair_counts[changed], changed))
        if verbose and (new_id - 255) % 1000 == 0:
            print(
                f"  merge {new_id - 255:,}/{num_merges:,}  {time.perf_counter() - start:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    return _finish(merges, vocab_size, pattern, special_tokens, name)


def _pop_most_frequent(heap, pair_counts) -> tuple[int, int] | None:
    """The pair with the highest count (smallest ids on a tie), skipping stale entries."""
    while heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count == -negative_count and count > 0:
            return pair
        if count > 0:  # the count dropped since this entry was pushed: file it again
            heapq.heappush(heap, (-count, pair))
    return None


def _merge_word(word: list[int], pair: tuple[int, int], new_id: int):
    """Merge `pair` in one word, left to right, and say how its pair counts change.

    For each occurrence x a b y → x Z y: (a, b), (x, a), (b, y) lose one, (x, Z), (Z, y) gain one.
    x is read from the output, so in "a b a b" the second occurrence sees x = Z, as it should.
    """
    a, b = pair
    out: list[int] = []
    changes: list[tuple[tuple[int, int], int]] = []
    i, n = 0, len(word)
    while True:
        try:
            j = word.index(a, i)  # jumping to the next `a` runs in C, not in this loop
        except ValueError:
            break
        if j + 1 < n and word[j + 1] == b:
            out.extend(word[i:j])
            changes.append((pair, -1))
            if out:
                x = out[-1]
                changes += [((x, a), -1), ((x, new_id), +1)]
            if j + 2 < n:
                y = word[j + 2]
                changes += [((b, y), -1), ((new_id, y), +1)]
            out.append(new_id)
            i = j + 2
        else:
            out.extend(word[i : j + 1])
            i = j + 1
    out.extend(word[i:])
    return out, changes


def train_bpe_naive(
    texts: Iterable[str] | str,
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    name: str = "bpe",
) -> BytePairTokenizer:
    """The textbook loop, the twin `train_bpe` is tested against: recount all pairs, merge the top."""
    from tegaki.tokenizer.bpe import merge

    if isinstance(texts, str):
        texts = [texts]
    special_tokens = list(special_tokens)
    num_merges = _check_size(vocab_size, special_tokens)
    chunk_counts = count_chunks(texts, pattern, special_tokens)
    words = {chunk: list(chunk.encode("utf-8")) for chunk in chunk_counts}
    merges: dict[tuple[int, int], int] = {}
    for new_id in range(256, 256 + num_merges):
        counts: Counter = Counter()
        for chunk, word in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += chunk_counts[chunk]
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))  # most frequent, then smallest
        merges[pair] = new_id
        words = {chunk: merge(word, pair, new_id) for chunk, word in words.items()}
    return _finish(merges, vocab_size, pattern, special_tokens, name)


def train_bpe_tokenizers(
    texts: Iterable[str] | str,
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    name: str = "bpe",
) -> BytePairTokenizer:
    """The same training done by the `tokenizers` library (Rust), converted to our numbering.

    Set up to match `train_bpe`: the same regex, byte-level, all 256 bytes in the alphabet, no
    minimum frequency. Its tie-breaking between equally frequent pairs differs, so the merges
    can differ in order late in training; the compression agrees closely (tested).
    """
    try:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        raise TegakiError("--backend tokenizers needs the tokenizers package: pip install tokenizers") from None
    from tegaki.tokenizer.bpe import str_to_token

    if isinstance(texts, str):
        texts = [texts]
    special_tokens = list(special_tokens)
    _check_size(vocab_size, special_tokens)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern_for(pattern)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=0,
    )
    hf.train_from_iterator(texts, trainer)
    # Renumber: bytes 0..255, then merges in the order learned, then specials (as train_bpe does).
    ids = {bytes([b]): b for b in range(256)}
    merges = {}
    for left, right in _hf_merges(hf):
        left_bytes, right_bytes = str_to_token(left), str_to_token(right)
        merges[ids[left_bytes], ids[right_bytes]] = ids[left_bytes + right_bytes] = 256 + len(merges)
    return _finish(merges, vocab_size, pattern, special_tokens, name)


def _hf_merges(hf) -> list[tuple[str, str]]:
    import json

    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]

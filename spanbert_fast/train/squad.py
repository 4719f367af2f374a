"""SQuAD v1.1 / v2.0 for extractive QA: reading the JSON, sliding windows over long
contexts, answer extraction from start/end logits, and the official metrics.

Windows follow BERT's and SpanBERT's SQuAD code: ``[CLS] question [SEP] context-window
[SEP]``, the question cut to ``max_query_len`` tokens, consecutive windows starting
``doc_stride`` context tokens apart. Character offsets of the context tokens come from the
fast tokenizer, so an answer is always an exact slice of the original context.

Metrics are those of the official evaluation scripts: answers are normalised (lowercase,
punctuation removed, the articles a/an/the removed, whitespace collapsed); exact match is
string equality of normalised answers; F1 is the harmonic mean of token precision and
recall between normalised answers (bag of tokens); each question takes its best score over
its gold answers, and the dataset score is the mean over questions times 100. Following
the v2.0 script (identical to v1.1 whenever both answers are non-empty): gold answers
that normalise to nothing are dropped, a question with none left has the single gold
answer "", and F1 between an empty and a non-empty answer is 0 (1 when both are empty).
"""

from __future__ import annotations

import collections
import functools
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .input_files import InputError, read_json

__all__ = [
    "SquadExample",
    "QAWindow",
    "read_squad",
    "build_windows",
    "extract_answers",
    "best_null_threshold",
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "evaluate_predictions",
]


# ---------------------------------------------------------------------------------------
# The SQuAD JSON format
# ---------------------------------------------------------------------------------------
@dataclass
class SquadExample:
    """One question. ``answers``: ``(text, answer_start)`` pairs, the first being the
    training target; empty for an unanswerable (v2.0) question."""

    qas_id: str
    question: str
    context: str
    answers: List[Tuple[str, int]]
    is_impossible: bool = False


def _expect(value: Any, kind: type, where: str, path: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {dict: "an object", list: "a list", str: "a string", int: "an integer"}
        raise InputError(f"{path!r} is not in SQuAD format: {where} must be {names[kind]}, "
                         f"got {type(value).__name__}")
    return value


def _field(obj: Dict[str, Any], key: str, kind: type, where: str, path: str) -> Any:
    if key not in obj:
        raise InputError(f"{path!r} is not in SQuAD format: {where} has no {key!r} "
                         f"(expected {{\"data\": [{{\"paragraphs\": [{{\"context\": ..., "
                         f"\"qas\": [{{\"id\", \"question\", \"answers\"}}]}}]}}]}})")
    return _expect(obj[key], kind, f"{where}.{key}", path)


def read_squad(path: str) -> Tuple[List[SquadExample], bool]:
    """Read a SQuAD v1.1 or v2.0 file. Returns ``(examples, has_impossible)``: the second
    is True when any question is marked ``is_impossible`` (a v2.0 file).

    Raises :class:`InputError` naming the first element that breaks the format.
    """
    dataset = read_json(path, "SQuAD file")
    _expect(dataset, dict, "the top level", path)
    articles = _field(dataset, "data", list, "the top level", path)
    examples: List[SquadExample] = []
    seen_ids = set()
    for a, article in enumerate(articles):
        where = f"data[{a}]"
        _expect(article, dict, where, path)
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where, path)):
            pwhere = f"{where}.paragraphs[{p}]"
            _expect(paragraph, dict, pwhere, path)
            context = _field(paragraph, "context", str, pwhere, path)
            for q, qa in enumerate(_field(paragraph, "qas", list, pwhere, path)):
                qwhere = f"{pwhere}.qas[{q}]"
                _expect(qa, dict, qwhere, path)
                qas_id = qa.get("id")
                if not isinstance(qas_id, (str, int)) or isinstance(qas_id, bool):
                    raise InputError(f"{path!r} is not in SQuAD format: {qwhere} needs an "
                                     f"'id' (string), got {qas_id!r}")
                qas_id = str(qas_id)
                if qas_id in seen_ids:
                    raise InputError(f"{path!r} is not in SQuAD format: question id "
                                     f"{qas_id!r} appears twice (second at {qwhere})")
                seen_ids.add(qas_id)
                question = _field(qa, "question", str, qwhere, path)
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise InputError(f"{path!r} is not in SQuAD format: {qwhere}.is_impossible "
                                     f"must be true or false, got {impossible!r}")
                answers = []
                for n, answer in enumerate(_field(qa, "answers", list, qwhere, path)):
                    awhere = f"{qwhere}.answers[{n}]"
                    _expect(answer, dict, awhere, path)
                    text = _field(answer, "text", str, awhere, path)
                    start = _field(answer, "answer_start", int, awhere, path)
                    answers.append((text, start))
                examples.append(SquadExample(qas_id, question, context,
                                             [] if impossible else answers, impossible))
    if not examples:
        raise InputError(f"SQuAD file {path!r} holds no questions")
    return examples, any(ex.is_impossible for ex in examples)


# ---------------------------------------------------------------------------------------
# Sliding windows
# ---------------------------------------------------------------------------------------
@dataclass
class QAWindow:
    """One model input: ``[CLS] question [SEP] context[window] [SEP]``.

    ``context_offset``: index in ``input_ids`` of the window's first context token.
    ``char_spans[i]``: ``(start, end)`` characters in the example's context of the window's
    i-th context token. ``max_context[i]``: whether this window gives that token more
    context on both sides than any other window (predictions start only at such tokens,
    so each token is judged where it is seen best). ``start_position`` /
    ``end_position``: the answer's token indices in ``input_ids``; 0 (the [CLS] token)
    when the window does not hold the whole answer or the question has none.
    """

    example_index: int
    input_ids: List[int]
    token_type_ids: List[int]
    context_offset: int
    char_spans: List[Tuple[int, int]]
    max_context: List[bool]
    start_position: int = 0
    end_position: int = 0


@dataclass
class WindowStats:
    """What :func:`build_windows` skipped, for a one-line report."""

    examples: int = 0
    windows: int = 0
    answer_not_in_context: int = 0
    empty_context: int = 0
    skipped_ids: List[str] = field(default_factory=list)


def _window_starts(num_tokens: int, window_len: int, doc_stride: int) -> List[int]:
    starts = [0]
    while starts[-1] + window_len < num_tokens:
        starts.append(starts[-1] + min(window_len, doc_stride))
    return starts


@functools.lru_cache(maxsize=4096)
def _max_context_table(num_tokens: int, window_len: int, stride: int) -> Tuple[Tuple[bool, ...], ...]:
    """For each window of a context of ``num_tokens`` tokens: which of its tokens have
    their most context there. A token's context in a window is the smaller of its left
    and right context there, plus 0.01 x the window's length (ties go to longer windows,
    then to the earlier window), as in BERT's SQuAD code. Cached: it depends on the
    three sizes only."""
    starts = _window_starts(num_tokens, window_len, stride)
    best = np.full(num_tokens, -1.0)
    owner = np.zeros(num_tokens, dtype=np.int64)
    for which, start in enumerate(starts):
        stop = min(start + window_len, num_tokens)
        tokens = np.arange(start, stop)
        score = np.minimum(tokens - start, stop - 1 - tokens) + 0.01 * (stop - start)
        better = score > best[start:stop]
        best[start:stop][better] = score[better]
        owner[start:stop][better] = which
    return tuple(tuple((owner[start:min(start + window_len, num_tokens)] == which).tolist())
                 for which, start in enumerate(starts))


def _locate_answer(context: str, text: str, start: int) -> Optional[Tuple[int, int]]:
    """The answer's character span: at ``answer_start`` when the text is there, else its
    occurrence closest to ``answer_start`` (some SQuAD offsets are off by a few
    characters), else None."""
    if not text.strip():
        return None
    if context[start:start + len(text)] == text:
        return start, start + len(text)
    found = [m.start() for m in re.finditer(re.escape(text), context)]
    if not found:
        return None
    best = min(found, key=lambda i: abs(i - start))
    return best, best + len(text)


def build_windows(examples: Sequence[SquadExample], tokenizer, *, max_seq_len: int,
                  doc_stride: Optional[int], max_query_len: int,
                  for_training: bool) -> Tuple[List[QAWindow], WindowStats]:
    """Tokenize every example into sliding windows.

    ``tokenizer``: a :class:`spanbert_fast.train.tokenization.WordPieceTokenizer`. With
    ``for_training``, answerable questions whose answer cannot be found in the context
    are skipped (counted in the stats), and each window carries the answer's token span
    (or [CLS] when the window misses it or the question is unanswerable). ``doc_stride``
    None: 128 tokens, or half the context part of a window if that is shorter.
    """
    window_len = max_seq_len - 3 - 1  # at least one question token besides 3 specials
    if window_len < 1:
        raise InputError(f"--max-seq-len {max_seq_len} leaves no room for the context")
    if doc_stride is not None and doc_stride < 1:
        raise InputError(f"--doc-stride must be positive, got {doc_stride}")
    if max_query_len < 1:
        raise InputError(f"--max-query-len must be positive, got {max_query_len}")
    stats = WindowStats(examples=len(examples))
    windows: List[QAWindow] = []
    context_cache: Dict[str, Tuple[List[int], List[Tuple[int, int]]]] = {}
    for index, example in enumerate(examples):
        if example.context not in context_cache:
            context_cache[example.context] = tokenizer.encode_with_offsets(example.context)
        ctx_ids, ctx_spans = context_cache[example.context]
        if not ctx_ids:
            stats.empty_context += 1
            stats.skipped_ids.append(example.qas_id)
            continue
        question_ids = tokenizer.encode_with_offsets(example.question)[0][:max_query_len]
        doc_len = max_seq_len - len(question_ids) - 3
        if doc_len < 1:
            raise InputError(f"--max-seq-len {max_seq_len} is too short for questions of "
                             f"{len(question_ids)} tokens (--max-query-len {max_query_len})")
        stride = doc_stride if doc_stride is not None else max(1, min(128, doc_len // 2))
        if stride > doc_len:
            raise InputError(f"--doc-stride {doc_stride} is longer than the context part of "
                             f"a window ({doc_len} tokens), so windows would skip text; "
                             f"lower --doc-stride or raise --max-seq-len")
        answer_tokens = None
        if for_training and not example.is_impossible:
            located = None
            if example.answers:
                located = _locate_answer(example.context, *example.answers[0])
            if located is not None:
                first = next((i for i, (_, e) in enumerate(ctx_spans) if e > located[0]), None)
                last = next((i for i in range(len(ctx_spans) - 1, -1, -1)
                             if ctx_spans[i][0] < located[1]), None)
                if first is not None and last is not None and first <= last:
                    answer_tokens = (first, last)
            if answer_tokens is None:
                stats.answer_not_in_context += 1
                stats.skipped_ids.append(example.qas_id)
                continue
        starts = _window_starts(len(ctx_ids), doc_len, stride)
        max_context = _max_context_table(len(ctx_ids), doc_len, stride)
        prefix = [tokenizer.cls_id] + question_ids + [tokenizer.sep_id]
        for which, begin in enumerate(starts):
            end = min(begin + doc_len, len(ctx_ids))
            input_ids = prefix + ctx_ids[begin:end] + [tokenizer.sep_id]
            token_type_ids = [0] * len(prefix) + [1] * (end - begin + 1)
            window = QAWindow(example_index=index, input_ids=input_ids,
                              token_type_ids=token_type_ids, context_offset=len(prefix),
                              char_spans=list(ctx_spans[begin:end]),
                              max_context=list(max_context[which]))
            if answer_tokens is not None and begin <= answer_tokens[0] and answer_tokens[1] < end:
                window.start_position = len(prefix) + answer_tokens[0] - begin
                window.end_position = len(prefix) + answer_tokens[1] - begin
            windows.append(window)
    stats.windows = len(windows)
    return windows, stats


# ---------------------------------------------------------------------------------------
# From logits to answers
# ---------------------------------------------------------------------------------------
def extract_answers(examples: Sequence[SquadExample], windows: Sequence[QAWindow],
                    start_logits: Sequence[np.ndarray], end_logits: Sequence[np.ndarray], *,
                    n_best: int = 20, max_answer_len: int = 30, version_2: bool = False,
                    null_score_diff_threshold: float = 0.0
                    ) -> Tuple[Dict[str, str], Dict[str, float]]:
    """The best answer of every example, over all of its windows.

    ``start_logits[k]`` / ``end_logits[k]``: 1-D float arrays over ``windows[k].input_ids``.
    Candidates pair one of the ``n_best`` highest start logits with one of the ``n_best``
    highest end logits among the window's context tokens, with start <= end, at most
    ``max_answer_len`` tokens, and a start token that has its maximal context in this
    window; a candidate's score is start logit + end logit. With ``version_2``, the null
    score is the lowest [CLS] start + end logit over the example's windows, and the answer
    is "" when null score - best candidate score > ``null_score_diff_threshold``.

    Returns ``(predictions, null_score_diffs)``, both keyed by question id (the second
    only for ``version_2``; an example without a candidate gets +inf).
    """
    if len(windows) != len(start_logits) or len(windows) != len(end_logits):
        raise ValueError(f"got {len(windows)} windows but {len(start_logits)} start and "
                         f"{len(end_logits)} end logit arrays")
    by_example: Dict[int, List[int]] = collections.defaultdict(list)
    for k, window in enumerate(windows):
        by_example[window.example_index].append(k)
    predictions: Dict[str, str] = {}
    null_diffs: Dict[str, float] = {}
    for index, example in enumerate(examples):
        best_score, best_span = -np.inf, None
        null_score = np.inf
        for k in by_example.get(index, ()):
            window = windows[k]
            starts = np.asarray(start_logits[k], dtype=np.float64)
            ends = np.asarray(end_logits[k], dtype=np.float64)
            null_score = min(null_score, starts[0] + ends[0])
            lo, n = window.context_offset, len(window.char_spans)
            context_starts, context_ends = starts[lo:lo + n], ends[lo:lo + n]
            # Stable sort: ties go to the earlier token, so the result is reproducible.
            top_starts = np.argsort(-context_starts, kind="stable")[:n_best]
            top_ends = np.argsort(-context_ends, kind="stable")[:n_best]
            for s in top_starts:
                if not window.max_context[s]:
                    continue
                for e in top_ends:
                    if e < s or e - s + 1 > max_answer_len:
                        continue
                    score = context_starts[s] + context_ends[e]
                    if score > best_score:
                        best_score = score
                        best_span = (window.char_spans[s][0], window.char_spans[e][1])
        text = example.context[best_span[0]:best_span[1]] if best_span is not None else ""
        if version_2:
            diff = float(null_score - best_score) if best_span is not None else float("inf")
            null_diffs[example.qas_id] = diff
            if diff > null_score_diff_threshold:
                text = ""
        predictions[example.qas_id] = text
    return predictions, null_diffs


# ---------------------------------------------------------------------------------------
# Official metrics
# ---------------------------------------------------------------------------------------
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token F1 of the normalised answers (0..1)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_answers(example: SquadExample) -> List[str]:
    golds = [text for text, _ in example.answers if normalize_answer(text)]
    return golds or [""]


def evaluate_predictions(examples: Iterable[SquadExample],
                         predictions: Dict[str, str]) -> Dict[str, float]:
    """Exact match and F1 (0..100) over ``examples``; a question without a prediction
    scores 0 (and is counted in ``missing``). When some questions are unanswerable, the
    scores over answerable (``HasAns_*``) and unanswerable (``NoAns_*``) ones too."""
    groups: Dict[str, List[Tuple[float, float]]] = {"all": [], "HasAns": [], "NoAns": []}
    missing = 0
    for example in examples:
        if example.qas_id in predictions:
            pred = predictions[example.qas_id]
            golds = _gold_answers(example)
            scores = (max(exact_match_score(pred, g) for g in golds),
                      max(f1_score(pred, g) for g in golds))
        else:
            missing += 1
            scores = (0.0, 0.0)
        groups["all"].append(scores)
        groups["NoAns" if example.is_impossible else "HasAns"].append(scores)

    def mean(values: List[Tuple[float, float]], which: int) -> float:
        return 100.0 * sum(v[which] for v in values) / len(values) if values else 0.0

    result = {"exact_match": mean(groups["all"], 0), "f1": mean(groups["all"], 1),
              "total": len(groups["all"]), "missing": missing}
    if groups["NoAns"]:
        for name in ("HasAns", "NoAns"):
            result[f"{name}_exact"] = mean(groups[name], 0)
            result[f"{name}_f1"] = mean(groups[name], 1)
            result[f"{name}_total"] = len(groups[name])
    return result


def best_null_threshold(examples: Iterable[SquadExample], predictions: Dict[str, str],
                        null_diffs: Dict[str, float], metric: str = "f1"
                        ) -> Tuple[float, float]:
    """SQuAD 2.0's tuned no-answer threshold: ``(best score 0..100, threshold)``.

    ``predictions`` are the best non-null spans (no threshold applied) and ``null_diffs``
    the null score - best span score of each question (:func:`extract_answers`). A question
    is answered "" when its difference exceeds the threshold; the threshold is chosen among
    the differences to maximise the total ``metric`` ("exact_match" or "f1") over the
    questions, the first maximum in increasing order winning. Answering "" to every
    question is the starting point; when nothing beats it, the threshold is just below the
    smallest difference. Questions without any candidate span (difference +inf) always
    answer "".
    """
    if metric not in ("exact_match", "f1"):
        raise ValueError(f"metric must be 'exact_match' or 'f1', got {metric!r}")
    score_of = exact_match_score if metric == "exact_match" else f1_score
    examples = [e for e in examples if e.qas_id in predictions]
    if not examples:
        return 0.0, 0.0
    # Start from "" everywhere: a point for every unanswerable question.
    score = best = float(sum(e.is_impossible for e in examples))
    finite = sorted((null_diffs.get(e.qas_id, math.inf), k) for k, e in enumerate(examples))
    finite = [(d, k) for d, k in finite if math.isfinite(d)]
    threshold = finite[0][0] - 1.0 if finite else 0.0
    for diff, k in finite:  # answering every question whose difference is <= diff
        example = examples[k]
        answered = max(score_of(predictions[example.qas_id], g) for g in _gold_answers(example))
        score += answered - float(example.is_impossible)
        if score > best:
            best, threshold = score, diff
    return 100.0 * best / len(examples), threshold

"""Load and save SpanBERT checkpoints in every layout DESIGN.md lists, safetensors first.

Layouts read (all normalised to transformers' BERT parameter names):

* transformers ``BertModel`` / ``BertForPreTraining`` / ``BertForQuestionAnswering``:
  ``config.json`` + ``model.safetensors`` (optionally sharded through
  ``model.safetensors.index.json``) or ``pytorch_model.bin`` (optionally sharded).
  Tied ``cls.predictions.decoder.weight`` may be absent; ``cls.predictions.decoder.bias``
  duplicates ``cls.predictions.bias``; old files carry ``embeddings.position_ids`` buffers.
* the original SpanBERT release: ``pytorch_model.bin`` + ``config.json`` or
  ``bert_config.json``; LayerNorm parameters named ``gamma`` / ``beta``; the ``bert.``
  prefix is optional; no pooler.
* the original fairseq pretraining checkpoint with heads: everything under ``decoder.``
  (``decoder.bert.*``, ``decoder.cls.predictions.*``, ``decoder.cls.pair_target_predictions.*``),
  gamma/beta naming, the state dict possibly nested under ``"model"``, and an SBO
  position table of 20 rows (fairseq's default) instead of the release's 15.

Files are always written in transformers' layout (``config.json`` + ``model.safetensors``),
atomically, so ``transformers.BertModel.from_pretrained`` reads what we write.

Names used below: the *canonical* form of a key is transformers' name inside a model with
heads (``bert.embeddings...``, ``cls.predictions...``, ``qa_outputs...``); the *model* form
is the name inside our model of a given ``kind`` (``"model"`` drops the ``bert.`` prefix).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .config import SpanBertConfig
from .io import atomic_write_all

__all__ = [
    "CheckpointError",
    "read_state_dict",
    "read_config",
    "convert_state_dict",
    "load_into",
    "load_pretrained",
    "save_pretrained",
    "from_transformers",
]

logger = logging.getLogger(__name__)

KINDS = ("model", "pretraining", "qa")

# File names looked for in a checkpoint directory, in order of preference (safetensors
# first: it cannot run code on load and maps the file instead of unpickling it).
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# fairseq's names for the original pretraining checkpoint.
FAIRSEQ_NAMES = ("checkpoint_best.pt", "checkpoint_last.pt", "model.pt")
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME, PYTORCH_INDEX_NAME) \
    + FAIRSEQ_NAMES
CONFIG_NAMES = ("config.json", "bert_config.json")

# transformers' class name for each of our kinds (the ``architectures`` entry we write).
ARCHITECTURES = {"model": "BertModel", "pretraining": "BertForPreTraining",
                 "qa": "BertForQuestionAnswering"}

# Decoders whose weight is the word-embedding matrix (same Parameter) in our models; they
# are never "missing" and never written.
WORD_EMBEDDINGS_KEY = "bert.embeddings.word_embeddings.weight"
TIED_DECODER_KEYS = ("cls.predictions.decoder.weight",
                     "cls.pair_target_predictions.decoder.weight")
SBO_POSITION_KEY = "cls.pair_target_predictions.position_embeddings.weight"
SBO_PREFIX = "cls.pair_target_predictions."

# config.json keys that describe the file rather than the model; dropped on read and
# rewritten by save_pretrained, so a saved-then-loaded config equals the original.
_FILE_CONFIG_KEYS = ("architectures", "transformers_version", "dtype", "torch_dtype",
                     "_name_or_path", "_commit_hash")

# Canonical top-level families.
_ENCODER_ROOTS = ("embeddings.", "encoder.", "pooler.")
# Buffers that older transformers versions saved; they are recomputed, never loaded.
_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# How many keys of each kind an error message lists before summarising the rest.
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model.

    ``missing``: keys the model needs that the checkpoint lacks; ``unexpected``: keys of the
    checkpoint the model has no place for; ``mismatched``: ``(key, model shape, checkpoint
    shape)``. The message lists the first 20 of each and counts the rest.
    """

    def __init__(self, message: str, *, missing: Sequence[str] = (),
                 unexpected: Sequence[str] = (),
                 mismatched: Sequence[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = ()) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        details = _describe_problems(self.missing, self.unexpected, self.mismatched)
        super().__init__(message + (("\n" + details) if details else ""))


def _listing(title: str, lines: List[str]) -> str:
    shown = lines[:_MAX_LISTED]
    text = f"{title} ({len(lines)}):\n" + "\n".join(f"  {line}" for line in shown)
    if len(lines) > len(shown):
        text += f"\n  ... and {len(lines) - len(shown)} more"
    return text


def _describe_problems(missing: Sequence[str], unexpected: Sequence[str],
                       mismatched: Sequence[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]) -> str:
    parts = []
    if missing:
        parts.append(_listing("missing keys (in the model, not in the checkpoint)", list(missing)))
    if unexpected:
        parts.append(_listing("unexpected keys (in the checkpoint, not in the model)",
                              list(unexpected)))
    if mismatched:
        parts.append(_listing(
            "mis-shaped keys",
            [f"{name}: model expects {tuple(want)}, checkpoint has {tuple(got)}"
             for name, want, got in mismatched]))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------
def _first_file(directory: str, names) -> Optional[str]:
    """The first of ``names`` that is a file in ``directory``, or None."""
    for name in names:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def find_weights_file(directory: str) -> str:
    found = _first_file(directory, WEIGHT_NAMES)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"no weights in checkpoint directory {directory!r}: looked for "
        f"{', '.join(WEIGHT_NAMES)}")


def _looks_like_safetensors(path: str) -> bool:
    # A safetensors file starts with an 8-byte little-endian header length, then '{'.
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    import safetensors.torch
    try:
        return dict(safetensors.torch.load_file(path, device="cpu"))
    except Exception as err:  # SafetensorError, OSError on short reads, ...
        raise CheckpointError(
            f"could not read safetensors file {path!r} (corrupt or truncated?): "
            f"{type(err).__name__}: {err}") from err


class StubbedObject:
    """An inert stand-in for a pickled object whose class the loader does not trust (e.g.
    the fairseq ``BertConfig`` inside the original release's ``args``). Building one runs
    no code of the checkpoint: it keeps the constructor arguments and the pickled state as
    plain data, and :func:`read_state_dict` never reads them. ``stubbed_name`` is the
    module-qualified name the pickle asked for."""

    stubbed_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stubbed {self.stubbed_name}>"


# Globals of a pickle that are never stubbed: torch's own (tensor and storage rebuilders,
# dtypes; the weights-only unpickler checks them) and the containers a state dict is made
# of. Anything else a checkpoint names becomes a StubbedObject subclass.
_TRUSTED_GLOBAL_ROOTS = ("torch",)
_TRUSTED_GLOBALS = ("collections.OrderedDict", "argparse.Namespace")
# Opcodes that push a string (the operands of STACK_GLOBAL, protocol 4+).
_STRING_OPCODES = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                   "BINSTRING", "SHORT_BINSTRING")


def _globals_in_pickle(stream) -> List[str]:
    """The ``module.name`` of every GLOBAL / STACK_GLOBAL of the one pickle at the current
    position of ``stream``, read statically with :mod:`pickletools` (nothing is built)."""
    import _compat_pickle
    import pickletools

    found: List[str] = []
    strings: List[str] = []  # strings pushed so far (and memoised ones), for STACK_GLOBAL
    memo: Dict[Any, Any] = {}
    last: Any = None
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name == "GLOBAL" or name == "INST":
            module, _, qualname = str(arg).partition(" ")
            # Python 2 names (protocol 2: __builtin__, copy_reg), mapped as unpicklers do.
            module, qualname = _compat_pickle.NAME_MAPPING.get(
                (module, qualname), (_compat_pickle.IMPORT_MAPPING.get(module, module), qualname))
            found.append(f"{module}.{qualname}")
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if name in _STRING_OPCODES:
            last = str(arg)
            strings.append(last)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = last
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(arg)
            if isinstance(last, str):
                strings.append(last)
        else:
            last = None
    return found


def _pickled_globals(path: str) -> List[str]:
    """Every global named by a ``torch.save`` file: the zip format's ``data.pkl``, or the
    legacy format's leading pickles (magic number, protocol, system info, the object)."""
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                return []
            with archive.open(names[0]) as stream:
                return _globals_in_pickle(stream)
    found: List[str] = []
    with open(path, "rb") as stream:
        for _ in range(4):
            found += _globals_in_pickle(stream)
    return found


def _stubs_for(names: Sequence[str]) -> Dict[str, type]:
    """A fresh StubbedObject subclass per untrusted global in ``names``."""
    stubs: Dict[str, type] = {}
    for full_name in names:
        root = full_name.split(".", 1)[0]
        if root in _TRUSTED_GLOBAL_ROOTS or full_name in _TRUSTED_GLOBALS or full_name in stubs:
            continue
        module, _, qualname = full_name.rpartition(".")
        stubs[full_name] = type(qualname or full_name, (StubbedObject,),
                                {"__module__": module or "?", "stubbed_name": full_name})
    return stubs


def _stubbed_names(obj: Any, seen: Optional[set] = None) -> List[str]:
    """Names of the StubbedObject classes reachable from ``obj`` (containers walked)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, StubbedObject):
        return [obj.stubbed_name] + _stubbed_names(vars(obj), seen)
    if isinstance(obj, Mapping):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    elif isinstance(obj, argparse.Namespace):
        children = list(vars(obj).values())
    else:
        return []
    return [name for child in children for name in _stubbed_names(child, seen)]


def _read_torch_pickle(path: str) -> Any:
    """``torch.load(weights_only=True)``, never ``weights_only=False``. A checkpoint that
    pickles objects of other classes (the original release's ``model.pt`` keeps its command
    line, an ``argparse.Namespace`` holding a fairseq ``BertConfig``) is read with each
    such class replaced by an inert :class:`StubbedObject` subclass: found statically in
    the pickle, allowed under its own name, so the unpickler builds the stub and runs none
    of the checkpoint's code. One warning names what was stubbed."""
    try:
        stubs = _stubs_for(_pickled_globals(path))
    except Exception:  # not a pickle we can scan: torch.load below reports it
        stubs = {}
    try:
        allowed = [argparse.Namespace] + [(stub, name) for name, stub in stubs.items()]
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError from the zip reader, EOFError...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"could not read PyTorch checkpoint {path!r} (corrupt, truncated, or holding "
            f"objects other than tensors, which are not unpickled for safety): "
            f"{type(err).__name__}: {reason}") from err
    stubbed = sorted(set(_stubbed_names(obj)))
    if stubbed:
        warnings.warn(f"{path}: read without running pickled code; stubbed "
                      f"{', '.join(stubbed)} (not needed for the weights)", stacklevel=3)
    return obj


def _as_tensor_dict(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """Unwrap fairseq's ``{"model": state_dict, "args": ...}`` and keep the tensors."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state "
                              f"dict (a mapping of parameter names to tensors)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    skipped = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if skipped:
        logger.info("%s: skipped %d non-tensor entries: %s", path, len(skipped), skipped[:_MAX_LISTED])
    if not tensors:
        raise CheckpointError(f"checkpoint {path!r} holds no tensors")
    return tensors


def _read_index(index_path: str) -> Dict[str, torch.Tensor]:
    try:
        with open(index_path, "r", encoding="utf-8") as handle:
            index = json.load(handle)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"could not read shard index {index_path!r}: "
                              f"{type(err).__name__}: {err}") from err
    directory = os.path.dirname(index_path)
    out: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"shard {shard_path!r} named by {index_path!r} does not exist")
        out.update(_read_weights_file(shard_path))
    absent = sorted(k for k in weight_map if k not in out)
    if absent:
        raise CheckpointError(f"shard index {index_path!r} names keys that no shard holds",
                              missing=absent)
    return out


def _read_weights_file(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".json"):
        return _read_index(path)
    if path.endswith(".safetensors") or _looks_like_safetensors(path):
        return _read_safetensors(path)
    return _as_tensor_dict(_read_torch_pickle(path), path)


def read_state_dict(path: "str | os.PathLike[str]") -> Dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint, on CPU, with the names the file uses.

    ``path`` is a weights file (``*.safetensors``, ``pytorch_model.bin``, a fairseq ``*.pt``,
    or a ``*.index.json`` shard index) or a directory holding one; in a directory
    ``model.safetensors`` is preferred over ``pytorch_model.bin``. A fairseq checkpoint's
    ``{"model": state_dict, ...}`` is unwrapped. Pickled files load with
    ``weights_only=True``; classes the file pickles besides tensors and containers (the
    fairseq ``BertConfig`` in the original release's ``args``) are replaced by inert
    :class:`StubbedObject` stand-ins, never imported or run, and one warning names them.

    Raises ``FileNotFoundError`` (naming the path, or what was looked for in a directory)
    and :class:`CheckpointError` for a corrupt or truncated file (naming it and the reason).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = find_weights_file(path)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    return _read_weights_file(path)


def _config_file(path: str) -> str:
    if os.path.isfile(path) and path.endswith(".json") and not path.endswith(".index.json"):
        return path
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    found = _first_file(directory, CONFIG_NAMES)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"no config in {directory!r}: looked for {', '.join(CONFIG_NAMES)}; pass config= "
        f"(a SpanBertConfig) to load weights without one")


def _check_representable(values: Mapping[str, Any], where: str) -> None:
    """Refuse transformers BERT options our encoder does not implement (a decoder with a
    causal mask or cross-attention would load but compute something else)."""
    if values.get("is_decoder"):
        raise ValueError(f"{where}: is_decoder=True (causal BERT decoder) is not supported; "
                         f"spanbert_fast runs bidirectional encoders only")
    if values.get("add_cross_attention"):
        raise ValueError(f"{where}: add_cross_attention=True is not supported")
    position_type = values.get("position_embedding_type", "absolute")
    if position_type not in (None, "absolute"):
        raise ValueError(f"{where}: position_embedding_type={position_type!r} is not "
                         f"supported; only 'absolute' (as BERT and SpanBERT use)")
    act = values.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported; only 'gelu' "
                         f"(the exact erf GELU of BERT and SpanBERT)")


def _read_config_dict(path: str) -> Tuple[Dict[str, Any], str]:
    where = _config_file(path)
    try:
        with open(where, "r", encoding="utf-8") as handle:
            values = json.load(handle)
    except ValueError as err:
        raise ValueError(f"config {where!r} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config {where!r} must hold a JSON object, got {type(values).__name__}")
    _check_representable(values, f"config {where!r}")
    return {k: v for k, v in values.items() if k not in _FILE_CONFIG_KEYS}, where


def read_config(path: "str | os.PathLike[str]") -> SpanBertConfig:
    """Read ``config.json`` (transformers) or ``bert_config.json`` (original release) from a
    checkpoint directory, the directory of a weights file, or a ``.json`` file itself."""
    values, where = _read_config_dict(os.fspath(path))
    try:
        return SpanBertConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {where!r}: {err}") from None


# ---------------------------------------------------------------------------------------
# Key conversion
# ---------------------------------------------------------------------------------------
_GAMMA_BETA = re.compile(r"\.(gamma|beta)$")


def _canonical_key(key: str) -> str:
    """Any supported layout's name -> transformers' name inside a model with heads."""
    if key.startswith("module."):  # saved from a DistributedDataParallel wrapper
        key = key[len("module."):]
    if key.startswith(("decoder.bert.", "decoder.cls.")):  # fairseq's model wrapper
        key = key[len("decoder."):]
    key = _GAMMA_BETA.sub(lambda m: ".weight" if m.group(1) == "gamma" else ".bias", key)
    if key.startswith(_ENCODER_ROOTS):
        key = "bert." + key
    return key


def _canonicalize(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename every key to its canonical name; drop saved buffers and the duplicate
    ``cls.predictions.decoder.bias``. Returns (canonical dict, dropped original keys)."""
    out: Dict[str, torch.Tensor] = {}
    dropped: List[str] = []
    for key, tensor in state_dict.items():
        name = _canonical_key(key)
        if name.endswith(_BUFFER_SUFFIXES):
            dropped.append(key)
            continue
        if name in out:
            raise CheckpointError(f"checkpoint has two keys that both mean {name!r} "
                                  f"(one of them is {key!r})")
        out[name] = tensor
    # transformers ties cls.predictions.decoder.bias to cls.predictions.bias; keep one.
    decoder_bias = out.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None:
        if "cls.predictions.bias" not in out:
            out["cls.predictions.bias"] = decoder_bias
        elif not _same_tensor(decoder_bias, out["cls.predictions.bias"]):
            raise CheckpointError(
                "checkpoint's cls.predictions.decoder.bias differs from cls.predictions.bias; "
                "the MLM head has one output bias, so it cannot hold both")
        dropped.append("cls.predictions.decoder.bias")
    return out, dropped


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _keeps(name: str, kind: str, config: SpanBertConfig) -> bool:
    """Whether a canonical key belongs to a model of ``kind`` (others are ignored)."""
    if name.startswith("bert.pooler."):
        # QA models never have a pooler (transformers' BertForQuestionAnswering neither);
        # elsewhere only when the config asks for one (SpanBERT drops NSP, its only user).
        return kind != "qa" and config.add_pooling_layer
    if name.startswith("cls.seq_relationship."):
        return False  # next-sentence prediction: SpanBERT does not use it
    if name.startswith("cls."):
        return kind == "pretraining"
    if name.startswith("qa_outputs."):
        return kind == "qa"
    return True  # the encoder, and unknown keys (reported as unexpected later)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], kind: str,
                       config: SpanBertConfig) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Rename a checkpoint of any supported layout to our model's names for ``kind``.

    ``kind`` is ``"model"`` (:class:`SpanBertModel`: keys without the ``bert.`` prefix),
    ``"pretraining"`` or ``"qa"`` (``bert.*`` + their heads). Keys of heads that ``kind``
    does not have (NSP ``cls.seq_relationship.*`` always; ``cls.*`` or ``qa_outputs.*``;
    the pooler unless ``config.add_pooling_layer`` and ``kind != "qa"``) are returned in
    ``ignored`` with their original names, as are saved ``position_ids`` buffers and the
    duplicate ``cls.predictions.decoder.bias``. Keys the function does not recognise are
    passed through (``load_into`` reports them as unexpected). Tied decoder weights are
    kept if present; ``load_into`` checks them against the word embeddings.

    Tensors are not copied. Returns ``(converted, ignored)``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(config, SpanBertConfig):
        raise TypeError(f"config must be a SpanBertConfig, got {type(config).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got "
                        f"{type(state_dict).__name__}")
    canonical, ignored = _canonicalize(state_dict)
    converted: Dict[str, torch.Tensor] = {}
    for name, tensor in canonical.items():
        if not _keeps(name, kind, config):
            ignored.append(name)
            continue
        if kind == "model" and name.startswith("bert."):
            name = name[len("bert."):]
        converted[name] = tensor
    return converted, ignored


# ---------------------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------------------
def _kind_of(model: torch.nn.Module) -> str:
    kind = getattr(model, "checkpoint_kind", None)
    if kind not in KINDS:
        raise TypeError(f"model must be a spanbert_fast model with checkpoint_kind in {KINDS}, "
                        f"got {type(model).__name__} (checkpoint_kind={kind!r})")
    return kind


def _tied_keys(model: torch.nn.Module, kind: str) -> Tuple[Optional[str], List[str]]:
    """(word-embedding key, decoder keys that share its Parameter) in the model's names."""
    params = dict(model.named_parameters(remove_duplicate=False))
    source = WORD_EMBEDDINGS_KEY if kind != "model" else WORD_EMBEDDINGS_KEY[len("bert."):]
    if source not in params:
        return None, []
    tied = [k for k in TIED_DECODER_KEYS if k in params and params[k] is params[source]]
    return source, tied


def _match(model: torch.nn.Module, converted: Dict[str, torch.Tensor], kind: str,
           optional_missing: Callable[[str], bool] = lambda name: False):
    """Compare converted tensors with the model's state dict. Returns
    (loadable, missing, unexpected, mismatched, untied) where ``untied`` names tied decoder
    keys whose checkpoint tensor differs from the word embeddings."""
    expected = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    source, tied = _tied_keys(model, kind)
    converted = dict(converted)
    untied: List[str] = []
    for key in tied:
        tensor = converted.pop(key, None)
        if tensor is None:
            continue
        if source not in converted:  # only the decoder copy was saved: it is the embedding
            converted[source] = tensor
        elif not _same_tensor(tensor, converted[source]):
            untied.append(key)
    loadable: Dict[str, torch.Tensor] = {}
    mismatched = []
    unexpected = []
    for name, tensor in converted.items():
        if name not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            mismatched.append((name, tuple(expected[name].shape), tuple(tensor.shape)))
        else:
            loadable[name] = tensor
    missing = [name for name in expected
               if name not in converted and name not in tied and name not in buffers
               and not optional_missing(name)]
    return loadable, missing, sorted(unexpected), mismatched, untied


def _load(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool,
          optional_missing: Callable[[str], bool] = lambda name: False,
          source: str = "checkpoint") -> None:
    kind = _kind_of(model)
    converted, ignored = convert_state_dict(state_dict, kind, model.config)
    if ignored:
        logger.info("%s: ignored %d keys that %s does not use (next-sentence prediction, "
                    "other heads, saved buffers): %s", source, len(ignored),
                    type(model).__name__, ignored[:_MAX_LISTED])
    loadable, missing, unexpected, mismatched, untied = _match(
        model, converted, kind, optional_missing)
    if untied:
        note = (f"{', '.join(untied)} in the {source} differs from the word embeddings, but "
                f"{type(model).__name__} ties its decoders to them; the word embeddings are used")
    else:
        note = ""
    if missing or unexpected or mismatched or untied:
        headline = f"{source} does not fit {type(model).__name__}"
        if strict:
            raise CheckpointError(headline + (f"; {note}" if note else "") +
                                  ("; pass strict=False to load the keys that fit"
                                   if missing or unexpected or mismatched else ""),
                                  missing=missing, unexpected=unexpected, mismatched=mismatched)
        details = _describe_problems(missing, unexpected, mismatched)
        warnings.warn(f"{headline}; loading the {len(loadable)} keys that fit"
                      + (f"; {note}" if note else "") + (("\n" + details) if details else ""),
                      stacklevel=3)
    with torch.no_grad():
        result = model.load_state_dict(loadable, strict=False)
    if result.unexpected_keys:  # _match filtered them: this would be a bug here, not the file's
        raise RuntimeError(f"internal error: load_state_dict rejected {result.unexpected_keys}")
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
              strict: bool = True) -> None:
    """Load a checkpoint's tensors (any supported layout) into ``model`` in place.

    Keys are converted with :func:`convert_state_dict` for ``model.checkpoint_kind``; keys
    of other heads are ignored (logged at info level). With ``strict=True`` any missing,
    unexpected or mis-shaped key raises :class:`CheckpointError` listing them all (nothing
    is loaded); with ``strict=False`` they are reported through ``warnings.warn`` and the
    keys that fit are loaded. Decoders tied to the word embeddings are never missing; a
    checkpoint whose decoder differs from its word embeddings is a mismatch. Tensors are
    copied into the model's parameters (cast to their dtype, moved to their device).
    """
    _load(model, state_dict, strict=strict)


def _inferred_config(config: SpanBertConfig, canonical: Mapping[str, torch.Tensor], kind: str,
                     pooler_from_weights: bool) -> SpanBertConfig:
    """Fill in what a config.json cannot say from the tensors themselves."""
    changes: Dict[str, Any] = {}
    if pooler_from_weights and kind == "model":
        has_pooler = any(k.startswith("bert.pooler.") for k in canonical)
        if has_pooler != config.add_pooling_layer:
            changes["add_pooling_layer"] = has_pooler
    table = canonical.get(SBO_POSITION_KEY)
    if kind == "pretraining" and table is not None and table.dim() == 2:
        rows, width = (int(n) for n in table.shape)
        if rows != config.sbo_max_targets:
            changes["sbo_max_targets"] = rows
        if width != config.sbo_position_embedding_size:
            changes["sbo_position_embedding_size"] = width
    if changes:
        logger.info("config adjusted to the checkpoint's tensors: %s", changes)
        config = config.replace(**changes)
    return config


def load_pretrained(model_cls, path: "str | os.PathLike[str]", *,
                    config: Optional[SpanBertConfig] = None, strict: bool = True,
                    **model_kwargs: Any):
    """Build ``model_cls(config, **model_kwargs)`` from a checkpoint and return it in eval mode.

    ``path``: a checkpoint directory or weights file (see :func:`read_state_dict`). The
    config is read from ``config.json`` / ``bert_config.json`` unless given. The weights
    then fill what a config cannot say: for :class:`SpanBertModel`, whether there is a
    pooler (when the config file has no ``add_pooling_layer`` key: a transformers
    ``BertModel`` saved with its pooler loads with one); for :class:`SpanBertForPreTraining`,
    the SBO position table's shape (``sbo_max_targets`` × ``sbo_position_embedding_size``,
    20 rows in fairseq checkpoints), which overrides the config. ``strict`` as in
    :func:`load_into`.
    """
    kind = getattr(model_cls, "checkpoint_kind", None)
    if kind not in KINDS:
        raise TypeError(f"model_cls must be a spanbert_fast model class with checkpoint_kind "
                        f"in {KINDS}, got {model_cls!r}")
    path = os.fspath(path)
    state_dict = read_state_dict(path)
    pooler_from_weights = False
    if config is None:
        values, where = _read_config_dict(path)
        try:
            config = SpanBertConfig.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config {where!r}: {err}") from None
        pooler_from_weights = "add_pooling_layer" not in values
    elif not isinstance(config, SpanBertConfig):
        raise TypeError(f"config must be a SpanBertConfig or None, got {type(config).__name__}")
    canonical, _ = _canonicalize(state_dict)
    config = _inferred_config(config, canonical, kind, pooler_from_weights)
    model = model_cls(config, **model_kwargs)
    _load(model, state_dict, strict=strict, source=f"checkpoint {path!r}")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------
def _tensors_to_save(model: torch.nn.Module, kind: str) -> Dict[str, torch.Tensor]:
    """The model's state dict in transformers' layout: tied decoders left out (transformers
    re-ties them; safetensors refuses shared storage), every tensor contiguous on CPU and
    owning its storage."""
    _, tied = _tied_keys(model, kind)
    out: Dict[str, torch.Tensor] = {}
    seen_storage = set()
    for name, tensor in model.state_dict().items():
        if name in tied:
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen_storage or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _remove_stale_weights(directory: str, keep: str) -> None:
    """Remove weight files of the other format, which :func:`read_state_dict` (or
    transformers) might otherwise prefer over the file just written."""
    for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME, PYTORCH_INDEX_NAME):
        path = os.path.join(directory, name)
        if name == keep or not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            try:
                with open(path, "r", encoding="utf-8") as handle:
                    shards = set(json.load(handle).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                shards = set()
            for shard in shards:
                shard_path = os.path.join(directory, os.path.basename(str(shard)))
                if os.path.isfile(shard_path):
                    os.unlink(shard_path)
        logger.info("removed stale %s from %s", name, directory)
        os.unlink(path)


def save_pretrained(model: torch.nn.Module, directory: "str | os.PathLike[str]", *,
                    safe_serialization: bool = True) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin`` when
    ``safe_serialization=False``) in transformers' layout, so that
    ``transformers.BertModel`` / ``BertForPreTraining`` / ``BertForQuestionAnswering``
    ``.from_pretrained(directory)`` and :func:`load_pretrained` both read it.

    ``config.json`` is ``model.config.to_dict()`` plus ``architectures`` (transformers'
    class name) and ``dtype``. Tied decoder weights are not written. Both files are first
    written in full to temporary files in ``directory`` (and fsync'd), and only then renamed
    into place, weights first: a failure while writing either one leaves the previous files
    intact and no temporary file behind. The two renames are not one atomic step: a crash
    (or a failing rename) between them leaves the new weights beside the previous
    ``config.json``. Creates ``directory``.
    """
    kind = _kind_of(model)
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_pretrained needs a directory, {directory!r} is a file")
    os.makedirs(directory, exist_ok=True)
    tensors = _tensors_to_save(model, kind)

    values = model.config.to_dict()
    values = {k: v for k, v in values.items() if not str(k).startswith("_")}
    values["architectures"] = [ARCHITECTURES[kind]]
    float_dtypes = [t.dtype for t in tensors.values() if t.is_floating_point()]
    if float_dtypes:
        values["dtype"] = str(float_dtypes[0]).replace("torch.", "")
    config_text = json.dumps(values, indent=2, sort_keys=True) + "\n"

    if safe_serialization:
        import safetensors.torch
        weights_name = SAFETENSORS_NAME

        def write_weights(tmp: str) -> None:
            safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
    else:
        weights_name = PYTORCH_NAME

        def write_weights(tmp: str) -> None:
            torch.save(tensors, tmp)

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(config_text)

    atomic_write_all([(os.path.join(directory, weights_name), write_weights),
                       (os.path.join(directory, "config.json"), write_config)])
    _remove_stale_weights(directory, keep=weights_name)


# ---------------------------------------------------------------------------------------
# From an in-memory transformers model
# ---------------------------------------------------------------------------------------
def from_transformers(model_cls, hf_model: torch.nn.Module, **model_kwargs: Any):
    """Build ``model_cls`` (one of our models) with the weights of an in-memory
    ``transformers`` ``BertModel`` / ``BertForPreTraining`` / ``BertForQuestionAnswering``.

    The config comes from ``hf_model.config.to_dict()``; for :class:`SpanBertModel` the
    pooler is kept when ``hf_model`` has one. transformers has no span-boundary head, so a
    :class:`SpanBertForPreTraining` built from ``BertForPreTraining`` keeps its freshly
    initialised SBO head (logged at info level); every other missing, unexpected or
    mis-shaped key raises :class:`CheckpointError`. Raises ``ValueError`` for configs our
    encoder cannot represent (``is_decoder``, cross-attention, relative position
    embeddings, an activation other than exact GELU). The result is on ``hf_model``'s
    device and dtype, in its train/eval mode.
    """
    kind = getattr(model_cls, "checkpoint_kind", None)
    if kind not in KINDS:
        raise TypeError(f"model_cls must be a spanbert_fast model class with checkpoint_kind "
                        f"in {KINDS}, got {model_cls!r}")
    hf_config = getattr(hf_model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict") or not isinstance(hf_model, torch.nn.Module):
        raise TypeError(f"hf_model must be a transformers BERT model (nn.Module with a "
                        f".config), got {type(hf_model).__name__}")
    values = {k: v for k, v in hf_config.to_dict().items() if not str(k).startswith("_")}
    _check_representable(values, f"{type(hf_model).__name__}.config")
    values = {k: v for k, v in values.items() if k not in _FILE_CONFIG_KEYS}
    # A transformers config object has already accepted all its keys: keep unknown ones.
    config = SpanBertConfig.from_dict(values, strict=False)
    encoder = getattr(hf_model, "bert", hf_model)
    has_pooler = getattr(encoder, "pooler", None) is not None
    config = config.replace(add_pooling_layer=has_pooler and kind == "model")
    state_dict = hf_model.state_dict()
    canonical, _ = _canonicalize(state_dict)
    config = _inferred_config(config, canonical, kind, pooler_from_weights=False)

    model = model_cls(config, **model_kwargs)
    has_sbo = any(k.startswith(SBO_PREFIX) for k in canonical)
    if kind == "pretraining" and not has_sbo:
        logger.info("%s has no span-boundary (SBO) head; %s keeps a freshly initialised one",
                    type(hf_model).__name__, model_cls.__name__)

    def sbo_may_be_missing(name: str) -> bool:
        return kind == "pretraining" and not has_sbo and name.startswith(SBO_PREFIX)

    _load(model, state_dict, strict=True, optional_missing=sbo_may_be_missing,
          source=type(hf_model).__name__)
    reference = next(iter(hf_model.parameters()), None)
    if reference is not None:
        model.to(device=reference.device, dtype=reference.dtype)
    model.train(hf_model.training)
    return model

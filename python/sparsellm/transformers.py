"""A drop-in for the parts of HuggingFace transformers a generation script uses.

Change ``from transformers import AutoTokenizer, AutoModelForCausalLM`` to
``from sparsellm.transformers import AutoTokenizer, AutoModelForCausalLM`` and a script
that tokenizes, calls ``model.generate`` and reads ``model(input_ids).logits`` runs on
the sparsellm engine. Inputs may be lists, numpy arrays or (when torch is installed)
torch tensors; outputs come back as the same kind. The supported arguments are listed on
each method and in docs/python.md; others raise TypeError rather than being ignored.

Differences from transformers, by design:

- no BOS is added (``add_special_tokens`` is accepted and ignored): the ids are exactly
  what ``sparsellm tokenize`` gives, so greedy outputs equal the CLI's;
- sampling (``do_sample=True``) uses sparsellm's seeded sampler (``seed=``, default 0),
  not torch's random state;
- a batch is generated row by row; padded batches (an attention mask with zeros) are
  refused.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from ._sparsellm import Model, Tokenizer

__all__ = [
    "AutoModelForCausalLM",
    "AutoTokenizer",
    "BatchEncoding",
    "CausalLMOutput",
    "PreTrainedTokenizer",
    "SparseCausalLM",
]

_Path = Union[str, "os.PathLike[str]", None]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _to_rows(ids: Any) -> tuple[list[list[int]], str]:
    """Token ids as a list of rows, and the kind they came as ("list", "np" or "pt")."""
    if _is_torch(ids):
        arr, kind = ids.detach().cpu().numpy(), "pt"
    elif isinstance(ids, np.ndarray):
        arr, kind = ids, "np"
    else:
        arr, kind = np.asarray(ids), "list"
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, tokens] array; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"input_ids must hold integers; got {arr.dtype}")
    return [[int(t) for t in row] for row in arr], kind


def _as_kind(arr: np.ndarray, kind: str) -> Any:
    if kind == "list":
        return arr.tolist()
    if kind == "np":
        return arr
    import torch  # only reached when the caller passed torch tensors

    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_mask(attention_mask: Any) -> None:
    if attention_mask is None:
        return
    mask = attention_mask.detach().cpu().numpy() if _is_torch(attention_mask) else np.asarray(attention_mask)
    if not np.all(mask == 1):
        raise NotImplementedError("padded batches (attention_mask with zeros) are not supported; generate one row at a time")


class BatchEncoding(dict):
    """What a tokenizer call returns: a dict with ``input_ids`` and ``attention_mask``,
    also readable as attributes; ``to(device)`` returns it unchanged (CPU only)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> "BatchEncoding":
        return self


class PreTrainedTokenizer:
    """transformers' tokenizer surface over a sparsellm :class:`Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, name_or_path: str = "") -> None:
        self._tok = tokenizer
        self.name_or_path = name_or_path
        self.padding_side = "left"

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._tok.eos_token_id

    @property
    def bos_token_id(self) -> Optional[int]:
        return self._tok.bos_token_id

    @property
    def pad_token_id(self) -> Optional[int]:
        return self._tok.eos_token_id

    @property
    def eos_token(self) -> Optional[str]:
        i = self._tok.eos_token_id
        return None if i is None else self._tok.id_to_token(i)

    @property
    def bos_token(self) -> Optional[str]:
        i = self._tok.bos_token_id
        return None if i is None else self._tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def __len__(self) -> int:
        return self._tok.vocab_size

    @property
    def chat_template(self) -> Optional[str]:
        return self._tok.chat_template

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: Optional[str] = None) -> Any:
        """The ids of ``text`` (a list; a [1, n] array or tensor with return_tensors)."""
        ids = self._tok.encode(text)
        if return_tensors is None:
            return ids
        return _as_kind(np.asarray([ids], dtype=np.int64), _tensor_kind(return_tensors))

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        return_tensors: Optional[str] = None,
        add_special_tokens: bool = True,
        padding: Union[bool, str] = False,
        truncation: bool = False,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Tokenizes a text (``input_ids`` a list of ids) or a list of texts (a list of
        lists). ``return_tensors="np"`` or ``"pt"`` gives [batch, tokens] int64 arrays or
        tensors (texts of one length only: padding is not supported)."""
        if truncation:
            raise NotImplementedError("truncation is not supported")
        single = isinstance(text, str)
        rows = [self._tok.encode(t) for t in ([text] if single else list(text))]
        if return_tensors is None:
            ids: Any = rows[0] if single else rows
            mask: Any = [1] * len(rows[0]) if single else [[1] * len(r) for r in rows]
        else:
            if len({len(r) for r in rows}) > 1:
                raise NotImplementedError("texts of different lengths need padding, which is not supported; tokenize them one at a time")
            kind = _tensor_kind(return_tensors)
            arr = np.asarray(rows, dtype=np.int64)
            ids, mask = _as_kind(arr, kind), _as_kind(np.ones_like(arr), kind)
        out = BatchEncoding(input_ids=ids)
        if return_attention_mask:
            out["attention_mask"] = mask
        return out

    def decode(self, token_ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        """The text of one sequence of ids (list, 1-d array or tensor, or a 0-d one)."""
        rows, _ = _to_rows(np.atleast_1d(token_ids.detach().cpu().numpy() if _is_torch(token_ids) else np.asarray(token_ids)))
        if len(rows) != 1:
            raise ValueError("decode takes one sequence; use batch_decode for several")
        return self._tok.decode(rows[0], skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        """The texts of a batch of sequences ([batch, tokens])."""
        rows, _ = _to_rows(sequences)
        return [self._tok.decode(r, skip_special_tokens) for r in rows]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]) -> Any:
        if isinstance(ids, int):
            return self._tok.id_to_token(ids)
        return [self._tok.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Any:
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def apply_chat_template(
        self,
        conversation: Sequence[dict],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        return_tensors: Optional[str] = None,
        **kwargs: Any,
    ) -> Any:
        """The conversation rendered by the model's chat template: text, or (tokenize=True,
        the default, as transformers) its ids; with return_tensors a [1, n] array."""
        text = self._tok.apply_chat_template(conversation, add_generation_prompt)
        if not tokenize:
            return text
        return self.encode(text, return_tensors=return_tensors)


def _tensor_kind(return_tensors: str) -> str:
    if return_tensors in ("np", "pt"):
        return return_tensors
    raise ValueError(f"return_tensors={return_tensors!r}: expected None, 'np' or 'pt'")


class AutoTokenizer:
    """``AutoTokenizer.from_pretrained(path)``: the tokenizer of a GGUF file or
    HuggingFace directory (None: the default model)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: _Path = None, **kwargs: Any) -> PreTrainedTokenizer:
        _only(kwargs, ("trust_remote_code", "use_fast", "revision", "cache_dir"))
        return PreTrainedTokenizer(Tokenizer(pretrained_model_name_or_path), str(pretrained_model_name_or_path or ""))


def _only(kwargs: dict, harmless: Sequence[str]) -> None:
    """Refuses keyword arguments this drop-in does not implement (except ones that change
    nothing here)."""
    unknown = sorted(k for k in kwargs if k not in harmless)
    if unknown:
        raise TypeError(f"not supported by sparsellm.transformers: {', '.join(unknown)}")


class CausalLMOutput:
    """``model(input_ids)``'s result: ``.logits`` [batch, tokens, vocab] float32 (also
    ``out["logits"]`` and ``out[0]``)."""

    def __init__(self, logits: Any) -> None:
        self.logits = logits

    def __getitem__(self, key: Union[int, str]) -> Any:
        if key in (0, "logits"):
            return self.logits
        raise KeyError(key)


class _Config:
    def __init__(self, model: Model) -> None:
        self.vocab_size = model.vocab_size
        self.max_position_embeddings = model.context_length
        ids = model.eos_token_ids
        self.eos_token_id = ids[0] if len(ids) == 1 else ids
        self.pad_token_id = ids[0] if ids else None


class SparseCausalLM:
    """transformers' causal-LM surface over a sparsellm :class:`Model`."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.config = _Config(model)
        self.generation_config = self.config
        self.device = "cpu"

    def eval(self) -> "SparseCausalLM":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "SparseCausalLM":
        return self

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> CausalLMOutput:
        """Logits of every position: ``.logits`` is [batch, tokens, vocab] float32, the
        same kind as ``input_ids`` (numpy for lists)."""
        _only(kwargs, ("return_dict", "use_cache"))
        _check_mask(attention_mask)
        rows, kind = _to_rows(input_ids)
        logits = np.stack([self.model.logits(r) for r in rows])
        return CausalLMOutput(_as_kind(logits, "np" if kind == "list" else kind))

    forward = __call__

    def generate(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        max_new_tokens: Optional[int] = None,
        max_length: Optional[int] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        eos_token_id: Any = None,
        pad_token_id: Optional[int] = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> Any:
        """Prompt plus generated ids, [batch, prompt + new] of the input's kind, as
        transformers' generate: greedy unless do_sample (then temperature, top_k, top_p
        apply; top_k=0 or None means no limit); stops at max_new_tokens new tokens
        (or max_length in all; default 20 in all, as transformers) or at EOS, which is
        included; shorter rows are padded with pad_token_id (default EOS).
        eos_token_id=None uses the model's; any other value is not supported."""
        _only(kwargs, ("use_cache", "return_dict_in_generate", "output_scores"))
        if kwargs.get("return_dict_in_generate"):
            raise NotImplementedError("return_dict_in_generate is not supported")
        if eos_token_id is not None and eos_token_id not in (self.config.eos_token_id, self.model.eos_token_ids):
            raise NotImplementedError("only the model's own eos_token_id is supported")
        _check_mask(attention_mask)
        rows, kind = _to_rows(input_ids)
        if max_new_tokens is None:
            max_new_tokens = (20 if max_length is None else max_length) - len(rows[0])
        if max_new_tokens < 1:
            raise ValueError(f"nothing to generate: max_new_tokens={max_new_tokens} (max_length counts the prompt)")
        if do_sample:
            sampling = dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k or 0), seed=seed)
        else:
            sampling = dict(temperature=0.0)
        outs = []
        for r in rows:
            g = self.model.generate_detailed(r, max_tokens=max_new_tokens, **sampling)
            new = list(g["output_ids"])
            if g["eos_id"] is not None:
                new.append(g["eos_id"])
            outs.append(r + new)
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        width = max(len(o) for o in outs)
        arr = np.asarray([o + [pad] * (width - len(o)) for o in outs], dtype=np.int64)
        return _as_kind(arr, kind)


class AutoModelForCausalLM:
    """``AutoModelForCausalLM.from_pretrained(path, sparsity=..., ...)``: a sparsellm model
    (path None: the default model) with transformers' ``generate`` and ``__call__``.
    Keyword arguments: dtype ("native", "f32", "bf16", "f16"; torch_dtype is accepted
    and ignored), threads, sparsity, scorer, predictor, sparse_mode, kv_dtype, as
    :class:`sparsellm.Model`."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: _Path = None,
        *,
        dtype: str = "native",
        threads: Optional[int] = None,
        sparsity: Optional[str] = None,
        scorer: Optional[str] = None,
        predictor: _Path = None,
        sparse_mode: str = "cached",
        kv_dtype: str = "f32",
        **kwargs: Any,
    ) -> SparseCausalLM:
        _only(kwargs, ("torch_dtype", "trust_remote_code", "low_cpu_mem_usage", "device_map", "revision", "cache_dir"))
        return SparseCausalLM(
            Model(
                pretrained_model_name_or_path,
                dtype=dtype,
                threads=threads,
                sparsity=sparsity,
                scorer=scorer,
                predictor=predictor,
                sparse_mode=sparse_mode,
                kv_dtype=kv_dtype,
            )
        )

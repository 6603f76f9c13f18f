"""Type stubs of the compiled module sparsellm._sparsellm (import sparsellm instead)."""

import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Mapping, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, os.PathLike[str]]
_Ids = Sequence[int]
_Messages = Sequence[Union[Mapping[str, str], Tuple[str, str]]]

def default_model_path() -> pathlib.Path:
    """The default model's file (in $SPARSELLM_MODELS_DIR, default ./models), downloaded
    and checked first if it is not there."""

class ModelError(Exception):
    """A model, tokenizer or predictor file that cannot be used (missing, truncated,
    malformed, unsupported); the message names the file and the problem."""

class TextStream(Iterator[str]):
    """The text of a generation as it is produced (from Model.stream)."""
    def __iter__(self) -> "TextStream": ...
    def __next__(self) -> str: ...
    def close(self) -> None:
        """Stops the generation (within one token); the iterator then ends."""

class Tokenizer:
    """A model file's tokenizer alone (no weights loaded)."""
    def __init__(self, path: Optional[_Path] = None) -> None: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: _Ids, skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(
        self, messages: _Messages, add_generation_prompt: bool = True
    ) -> str: ...
    def token_to_id(self, token: str) -> Optional[int]: ...
    def id_to_token(self, id: int) -> Optional[str]: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_token_id(self) -> Optional[int]: ...
    @property
    def eos_token_id(self) -> Optional[int]: ...
    @property
    def chat_template(self) -> Optional[str]: ...

class Model:
    """A LLaMA-family model on the CPU, optionally with contextual sparsity at decode.

    Calls on one Model from several threads are serialized; compute releases the GIL.
    """
    def __init__(
        self,
        path: Optional[_Path] = None,
        dtype: Literal["native", "f32", "bf16", "f16"] = "native",
        threads: Optional[int] = None,
        sparsity: Optional[str] = None,
        scorer: Optional[str] = None,
        predictor: Optional[_Path] = None,
        sparse_mode: Literal["cached", "gather", "blocks"] = "cached",
        kv_dtype: Literal["f32", "f16"] = "f32",
    ) -> None: ...
    def generate(
        self,
        prompt: Union[str, _Ids],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
        *,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        ignore_eos: bool = False,
    ) -> str: ...
    def generate_detailed(
        self,
        prompt: Union[str, _Ids],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
        *,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        ignore_eos: bool = False,
    ) -> dict[str, Any]: ...
    def stream(
        self,
        prompt: Union[str, _Ids],
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        chat: bool = False,
        *,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        ignore_eos: bool = False,
    ) -> TextStream: ...
    def chat(
        self,
        messages: _Messages,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        stop: Optional[Sequence[str]] = None,
        *,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        ignore_eos: bool = False,
    ) -> str: ...
    def apply_chat_template(
        self, messages: _Messages, add_generation_prompt: bool = True
    ) -> str: ...
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: _Ids, skip_special_tokens: bool = False) -> str: ...
    def logits(self, ids: _Ids) -> npt.NDArray[np.float32]: ...
    def perplexity(self, text: str, window: int = 512) -> dict[str, Any]: ...
    def bench(
        self,
        prompt_tokens: int = 128,
        gen_tokens: int = 64,
        runs: int = 5,
        warmup: int = 1,
        text_file: _Path = "/usr/share/common-licenses/GPL-3",
    ) -> dict[str, Any]: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def identity(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def sparsity(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def eos_token_ids(self) -> list[int]: ...
    @property
    def chat_template(self) -> Optional[str]: ...
    @property
    def tokenizer(self) -> Tokenizer: ...

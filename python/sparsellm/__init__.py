"""sparsellm: CPU inference for LLaMA-family models with contextual activation sparsity.

The engine is Rust; this package is a thin binding to it:

- :class:`Model` loads a GGUF file or HuggingFace directory and generates, streams,
  chats, scores (logits, perplexity) and benchmarks;
- :class:`Tokenizer` is a model file's tokenizer alone;
- :func:`default_model_path` gives the default model's file, fetching it first;
- :class:`ModelError` is raised for files that cannot be used (bad arguments raise
  ``ValueError``);
- :mod:`sparsellm.transformers` is a drop-in for transformers' ``AutoTokenizer`` and
  ``AutoModelForCausalLM``.

Example::

    import sparsellm
    m = sparsellm.Model()                       # the default model, fetched on first use
    print(m.generate("The capital of France is", max_tokens=16))

See docs/python.md in the repository for every argument.
"""

from ._sparsellm import Model, ModelError, TextStream, Tokenizer, default_model_path

__all__ = ["Model", "ModelError", "TextStream", "Tokenizer", "default_model_path"]
__version__ = "0.1.0"

"""btlm: run, train, extend, shrink and evaluate Cerebras BTLM-3B-8k models with PyTorch + transformers.

``import btlm`` registers the BTLM classes with the ``transformers`` Auto classes, so the released
checkpoint loads with ``AutoModelForCausalLM.from_pretrained`` and no ``trust_remote_code``.

The package root is light: it imports neither torch nor transformers. The registration happens the
moment transformers' Auto classes are imported (now, if they already are), and the submodules
(``btlm.inference``, ``btlm.train``, ``btlm.quant``, …) and the model names (``btlm.BTLMConfig``, …)
are imported on first attribute access. So ``btlm --help`` and the data workers start fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys

__version__ = "0.1.0"

__all__ = ["PRESETS", "BTLMConfig", "BTLMLMHeadModel", "BTLMModel", "config_from_preset", "load_tokenizer"]

_SUBMODULES = ("cli", "data", "demo", "errors", "eval", "inference", "io", "model", "quant", "tokenizer", "train")
_NAMES = {"PRESETS": "btlm.model", "BTLMConfig": "btlm.model", "BTLMLMHeadModel": "btlm.model",
          "BTLMModel": "btlm.model", "config_from_preset": "btlm.model", "load_tokenizer": "btlm.tokenizer"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"btlm.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'btlm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))


# ---- registration with transformers' Auto classes -------------------------------------------------


def _register_models(module=None) -> None:
    # btlm.model registers itself at the end of its import; when it is being imported right now (it
    # imports the Auto classes itself), that registration is still to come.
    if "btlm.model" not in sys.modules:
        importlib.import_module("btlm.model")


def _register_quantizer(module=None) -> None:
    from btlm.quant import register

    register()


def _register_config_on_lookup(module) -> None:
    """``AutoConfig`` finds model types in ``CONFIG_MAPPING``: import (and so register) btlm.model the
    first time "btlm" is looked up there. A lookup happens after all imports are done, unlike this
    hook, which runs while transformers may still be importing its own modules."""
    cls = type(module.CONFIG_MAPPING)
    if getattr(cls, "_btlm_lookup", False):
        return
    get, contains = cls.__getitem__, cls.__contains__

    def ensure(key):
        if key == "btlm" and "btlm.model" not in sys.modules:
            importlib.import_module("btlm.model")

    def __getitem__(self, key):
        ensure(key)
        return get(self, key)

    def __contains__(self, key):
        ensure(key)
        return contains(self, key)

    cls.__getitem__, cls.__contains__, cls._btlm_lookup = __getitem__, __contains__, True


#: transformers module → what to register once it has been imported.
_HOOKS = {"transformers.models.auto.configuration_auto": _register_config_on_lookup,
          "transformers.models.auto.modeling_auto": _register_models,
          "transformers.quantizers": _register_quantizer}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration right after one of :data:`_HOOKS`' modules has executed, so ``import btlm``
    costs nothing until transformers' Auto classes are in use, and they always know BTLM then."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                exec_module = spec.loader.exec_module

                def exec_and_register(module, exec_module=exec_module, hook=_HOOKS[fullname]):
                    exec_module(module)
                    hook(module)

                spec.loader.exec_module = exec_and_register
                return spec
        return None


if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
for _name, _hook in _HOOKS.items():
    if _name in sys.modules:  # transformers' Auto classes already imported: register now
        _hook(sys.modules[_name])

"""Loading PEFT LoRA adapters into a model's projections, by name, once each.

An adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
``target_modules``) and ``adapter_model.safetensors`` with ``lora_A`` ``[r, in]`` and
``lora_B`` ``[out, r]`` per targeted projection, named after the base model's modules
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). Each loaded adapter gets an
id that is never reused, so a request's prefix-cache salt can name it.

An adapter unloaded (the server's ``/v1/unload_lora_adapter``) or replaced (its name loaded from
another path) while requests run with it is retired: its weights stay, under its id, until the
last of those requests ends, so none of them ever runs on other weights. A request that names an
unloaded adapter's ``LoRARequest`` afterwards (resolved before the unload, added after it) is
refused, never served by loading the adapter again behind the server's back.

Offline (``LLM``, ``AsyncLLM``) a request's adapter loads the first time one names it, as in
vLLM, and the last ``MAX_UNLOADED`` unloaded requests are remembered to be refused. A program
holds its ``LoRARequest`` objects as long as it likes, so no memory covers them all; one
forgotten loads its adapter again on its next use, as vLLM does after any unload, and so still
runs with the weights it names, never another adapter's. A server loads its adapters itself
(``load``) and sets ``loads_on_use`` False, and then keeps nothing of an unload: a request runs
only with the very ``LoRARequest`` loaded under its name now. Each one the server hands out is
loaded, under an id never given before, ahead of any request that carries it, so a request whose
adapter is not the one loaded under its name was routed before an unload, however late it comes
(a pause holds requests for as long as it lasts), and it is refused.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Collection
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pagedserve.lora.request import LoRARequest
from pagedserve.lora.weights import LoRAState, LoRAWeights, Pair, Stacked
from pagedserve.model.layers.linear import Linear, MergedLinear
from pagedserve.model.llama import STACKED

_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "alpha_pattern", "layer_replication")
MAX_UNLOADED = 1024  # offline: the unloaded requests refused (see the module's docstring)


class LoRAAdapterUnloadedError(ValueError):
    """A request names an adapter that was unloaded after the request was routed to it."""

    def __init__(self, lora_name: str) -> None:
        super().__init__(
            f"The LoRA adapter '{lora_name}' was unloaded before this request could start; "
            "send the request again for the adapter now served under that name, if any."
        )


class LoRAManager:
    """The adapters a model serves; ``slot(request)`` loads one on first use.

    ``in_use()`` gives the ids of the adapters that live requests run with: the retired ones
    among them keep their weights."""

    def __init__(
        self, model: nn.Module, max_lora_rank: int, in_use: Callable[[], Collection[int]]
    ) -> None:
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.in_use = in_use
        self.state = LoRAState()
        for module in model.modules():
            if isinstance(module, Linear):
                module.lora = LoRAWeights(self.state)
        model.lora_state = self.state
        self.loaded: dict[str, tuple[LoRARequest, int]] = {}  # name -> (request, id)
        self.retired: set[int] = set()  # ids of adapters unloaded or replaced, still in use
        # Offline: the last MAX_UNLOADED unloaded requests, oldest first, refused.
        self.unloaded: dict[LoRARequest, None] = {}
        # False on a server: a request runs only with the adapter loaded under its name now.
        self.loads_on_use = True
        self._ids = itertools.count(1)

    def slot(self, request: LoRARequest) -> int:
        """The id of the loaded adapter ``request`` names, loading it the first time offline; a
        ``ValueError`` for an adapter that cannot be served (``LoRAAdapterUnloadedError``: one
        unloaded since)."""
        known = self.loaded.get(request.lora_name)
        if not self.loads_on_use:
            if known is None or known[0] != request:
                raise LoRAAdapterUnloadedError(request.lora_name)
            return known[1]
        if request in self.unloaded:
            raise LoRAAdapterUnloadedError(request.lora_name)
        if known is not None and known[0].lora_path == request.lora_path:
            return known[1]
        return self.load(request)

    def load(self, request: LoRARequest) -> int:
        """Load the adapter ``request`` names under its name, in place of the one loaded under
        it if any (a server's ``--lora-modules`` and ``/v1/load_lora_adapter``); its id, or a
        ``ValueError`` for an adapter that cannot be served."""
        pairs = self._read(Path(request.lora_path))
        if request.lora_name in self.loaded:
            self._retire(request.lora_name)
        self.unloaded.pop(request, None)
        adapter = next(self._ids)
        for module, module_pairs in pairs.items():
            module.lora.adapters[adapter] = Stacked.of(module_pairs, module.out_features)
        self.loaded[request.lora_name] = (request, adapter)
        return adapter

    def remove(self, name: str) -> bool:
        """Unload the adapter named ``name`` (its weights once no request runs with it, and
        later requests naming it are refused); False if none is loaded."""
        known = self.loaded.get(name)
        if known is None:
            return False
        if self.loads_on_use:
            self.unloaded[known[0]] = None
            while len(self.unloaded) > MAX_UNLOADED:
                del self.unloaded[next(iter(self.unloaded))]
        self._retire(name)
        return True

    def release(self) -> None:
        """Free the weights of the retired adapters that no live request runs with."""
        if not self.retired:
            return
        unused = self.retired.difference(self.in_use())
        if not unused:
            return
        self.retired -= unused
        for module in self.model.modules():
            if isinstance(module, Linear):
                for adapter in unused:
                    module.lora.adapters.pop(adapter, None)

    def _retire(self, name: str) -> None:
        self.retired.add(self.loaded.pop(name)[1])
        self.release()

    def _read(self, path: Path) -> dict[Linear, list[Pair]]:
        config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise ValueError(
                f"LoRA adapter {path} needs adapter_config.json and adapter_model.safetensors"
            )
        try:
            config = json.loads(config_file.read_text())
            tensors = load_file(weights_file)
        except (OSError, ValueError, SafetensorError) as exc:
            raise ValueError(f"LoRA adapter {path} cannot be read: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"LoRA adapter {path}: adapter_config.json is not a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"LoRA adapter {path}: peft_type {config['peft_type']} is not LoRA")
        for key in _UNSUPPORTED:
            if config.get(key):
                raise ValueError(f"LoRA adapter {path}: {key} is not supported")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise ValueError(f"LoRA adapter {path}: trained biases or modules are not supported")
        pairs: dict[Linear, list[Pair]] = {}
        for name in sorted(n for n in tensors if ".lora_A." in n):
            module_name = name.split(".lora_A.")[0].removeprefix("base_model.model.")
            a = tensors[name]
            b = tensors.get(name.replace(".lora_A.", ".lora_B."))
            if b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(f"LoRA adapter {path}: {module_name} lacks a matching lora_B")
            rank = a.shape[0]
            if rank == 0:
                raise ValueError(f"LoRA adapter {path}: {module_name} has rank 0")
            if rank > self.max_lora_rank:
                raise ValueError(
                    f"LoRA adapter {path} has rank {rank}, above max_lora_rank "
                    f"{self.max_lora_rank} (--max-lora-rank)"
                )
            alpha = config.get("lora_alpha", rank)
            if isinstance(alpha, bool) or not isinstance(alpha, int | float):
                raise ValueError(f"LoRA adapter {path}: lora_alpha {alpha!r} is not a number")
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            module, start = self._target(module_name, path)
            if a.shape[1] != module.in_features or start + b.shape[0] > module.out_features:
                raise ValueError(f"LoRA adapter {path}: {module_name}'s shapes do not fit")
            weight = module.weight
            pair = (a.to(weight), (b * scale).to(weight), start)
            pairs.setdefault(module, []).append(pair)
        if not pairs:
            raise ValueError(f"LoRA adapter {path} holds no LoRA weights")
        return pairs

    def _target(self, module_name: str, path: Path) -> tuple[Linear, int]:
        """Our projection for a checkpoint's module name, and where its output starts."""
        parent, _, leaf = module_name.rpartition(".")
        fused, shard = STACKED.get(leaf, (leaf, None))
        try:
            module = self.model.get_submodule(f"{parent}.{fused}")
        except AttributeError:
            module = None
        if not isinstance(module, Linear):
            raise ValueError(
                f"LoRA adapter {path} targets {module_name}, which is not a projection of this "
                "model (adapters on embeddings or the lm head are not supported)"
            )
        if shard is None:
            return module, 0
        assert isinstance(module, MergedLinear)
        return module, module.offsets[shard]

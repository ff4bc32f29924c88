"""One module per task, looked up by task name, whatever the name.

``nn.ModuleDict`` makes every key an attribute of the container, so a task
named ``forward``, ``update``, ``train``, ``type`` or ``training`` (all
attributes of every torch module) cannot be a key: the declaration accepts the
name and training crashes on building the towers. ``TaskModules`` keys each
module by its position and its name (``0_forward``): a key that starts with a
digit is never a Python attribute, so no name can collide, and the state dict
still says which head is which.

Artifacts written when heads were keyed by the bare task name
(``arch.towers.click.0.0.weight``) are renamed on loading (``_load_from_state_dict``),
so they load into this layout unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import nn


def head_key(position: int, name: str) -> str:
    return f"{position}_{name}"


class TaskModules(nn.Module):
    """A read-only mapping task name -> module, in task order, as ``nn.ModuleDict`` would be."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        super().__init__()
        self._keys = {name: head_key(i, name) for i, name in enumerate(modules)}
        for name, module in modules.items():
            self.add_module(self._keys[name], module)

    def __getitem__(self, name: str) -> nn.Module:
        return self._modules[self._keys[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def values(self) -> list[nn.Module]:
        return [self[n] for n in self._keys]

    def items(self) -> list[tuple[str, nn.Module]]:
        return [(n, self[n]) for n in self._keys]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Two key layouts load: by task name (earlier artifacts) and by position (a digit first); they
        # cannot be confused.
        for name, key in self._keys.items():
            old, new = f"{prefix}{name}.", f"{prefix}{key}."
            if any(k.startswith(new) for k in state_dict):
                continue
            for k in [k for k in state_dict if k.startswith(old)]:
                state_dict[new + k[len(old):]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

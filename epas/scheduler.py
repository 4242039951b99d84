"""The progressive sharing schedule (Algorithm 1 of the EPAS paper).

The sharing region grows from the deepest layer toward the shallow end: after every ``interval``
completed steps (counted from ``start_step``) the deepest ``growth`` layers of the target that
are not yet sharing switch to sharing mode. The set in force is a pure function of the number
of completed steps, so every rank computes the same set and a resumed run continues exactly.
"""

from __future__ import annotations

import torch.distributed as dist

from epas.config import EPASConfig, validate_sections
from epas.errors import ConfigError
from epas.sharing import MODES, check_sharing_layers


def _block_layout(num_layers: int, epas: EPASConfig) -> list[int]:
    """``num_sharing_layers`` layers in ``num_blocks`` equal blocks at the deep end."""
    count, blocks = epas.num_sharing_layers, epas.num_blocks
    if count % blocks:
        raise ConfigError(
            f"epas.num_sharing_layers={count} cannot be split into epas.num_blocks={blocks} "
            "equal blocks; make it a multiple of num_blocks"
        )
    size = count // blocks
    end = num_layers - 1 if epas.include_last_layer else num_layers - 2
    layers = []
    for block in range(blocks):
        last = end - block * (size + epas.block_gap)
        layers.extend(range(last - size + 1, last + 1))
    if layers and min(layers) < 1:
        raise ConfigError(
            f"{blocks} block(s) of {size} layers with gap {epas.block_gap} do not fit in "
            f"{num_layers} layers (layer 0 cannot share); lower epas.num_sharing_layers, "
            "epas.num_blocks or epas.block_gap"
        )
    return layers


def resolve_target_layers(num_layers: int, epas: EPASConfig) -> tuple[int, ...]:
    """The target sharing set S_c as sorted 0-based layer indices, validated."""
    if epas.mode not in MODES:  # a section built in code skips the loader's choice check
        raise ConfigError(f"epas.mode must be one of {MODES}, got {epas.mode!r}")
    validate_sections(epas)
    if epas.sharing_layers is not None:
        if epas.num_sharing_layers:
            raise ConfigError(
                "set either epas.sharing_layers (explicit list) or epas.num_sharing_layers, not both"
            )
        layers = list(epas.sharing_layers)
        if len(set(layers)) != len(layers):
            raise ConfigError(f"epas.sharing_layers {layers} lists a layer twice")
    else:
        layers = _block_layout(num_layers, epas)
    if len(layers) % epas.growth:
        raise ConfigError(
            f"the target has {len(layers)} layers, not a multiple of epas.growth={epas.growth}; "
            "every growth step must add a whole group of layers"
        )
    try:
        return check_sharing_layers(layers, num_layers)
    except ValueError as error:
        raise ConfigError(f"epas.sharing_layers: {error}") from None


class SharingScheduler:
    """Which layers share after a given number of completed training steps."""

    def __init__(self, num_layers: int, epas: EPASConfig):
        self.target = resolve_target_layers(num_layers, epas)
        self.interval, self.growth, self.start_step = epas.interval, epas.growth, epas.start_step
        self.completed_steps = 0

    def sharing_layers_at(self, completed_steps: int) -> tuple[int, ...]:
        growths = max(0, (completed_steps - self.start_step) // self.interval)
        count = min(len(self.target), growths * self.growth)
        return self.target[len(self.target) - count :]

    @property
    def current(self) -> tuple[int, ...]:
        return self.sharing_layers_at(self.completed_steps)

    def step(self) -> bool:
        """Count one completed training step; True when the sharing set changed."""
        before = self.current
        self.completed_steps += 1
        return self.current != before

    @property
    def growth_steps(self) -> list[tuple[int, tuple[int, ...]]]:
        """Every (completed step, sharing set after it) at which the region grows."""
        changes = []
        for event in range(1, len(self.target) // self.growth + 1):
            step = self.start_step + event * self.interval
            changes.append((step, self.sharing_layers_at(step)))
        return changes

    def _schedule(self) -> dict:
        return {
            "target": list(self.target),
            "interval": self.interval,
            "growth": self.growth,
            "start_step": self.start_step,
        }

    def state_dict(self) -> dict:
        return {"completed_steps": self.completed_steps, **self._schedule()}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._schedule().items():
            if state[key] != value:
                raise ConfigError(
                    f"the checkpoint's EPAS schedule has {key}={state[key]} but this run has "
                    f"{key}={value}; resuming with another schedule changes the run's meaning "
                    "(restore the original epas settings, or start from checkpoint.load with "
                    "checkpoint.load_optimizer=false)"
                )
        self.completed_steps = state["completed_steps"]

    def check_same_on_all_ranks(self) -> None:
        """Raise if any rank disagrees on the step count (and so on the sharing set)."""
        if not dist.is_initialized():
            return
        mine = (self.completed_steps, self.current)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if any(other != mine for other in everyone):
            raise RuntimeError(f"ranks disagree on the EPAS schedule (steps, sharing set): {everyone}")

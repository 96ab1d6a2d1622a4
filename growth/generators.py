"""Seeded random streams: the same generator seed gives the same growth on every run."""

from __future__ import annotations

import torch


class DeviceGenerators:
    """One ``torch.Generator`` per device, all seeded from a single user generator (or the
    global RNG), so random draws happen where the tensors live."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.mapping = generator if generator is not None else torch.Generator()
        if generator is None:
            self.mapping.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self._seed = int(
            torch.randint(0, 2**62, (1,), generator=self.mapping, device=self.mapping.device)
        )
        self._by_device: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._by_device:
            g = torch.Generator(device=device)
            g.manual_seed(self._seed)
            self._by_device[device] = g
        return self._by_device[device]

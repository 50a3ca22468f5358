"""Input embeddings: space-time patches, spectrogram patches, text tokens,
modality tags.

Every visual token is ``Linear(patch) + spatial position + temporal (frame)
position + modality``; every audio token is ``Linear(patch) + frequency
position + time position + modality``; every text token is ``token + 1D
position + modality``. An image is a one-frame video.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

VIDEO, TEXT = 0, 1  # modality ids


def _init_pos(p: nn.Parameter) -> nn.Parameter:
    nn.init.trunc_normal_(p, std=0.02)
    return p


class PatchEmbed(nn.Module):
    """Cut a video ``[B, T, 3, H, W]`` into ``tubelet x patch x patch`` cubes
    and project each linearly to ``dim``; returns ``[B, T/tubelet * (H/patch)**2, dim]``.

    A clip whose length is not a multiple of ``tubelet`` gets its last frame
    repeated, so an image (T=1) goes through the same path as a video.
    """

    def __init__(self, image_size: int, patch_size: int, tubelet: int, max_frames: int, dim: int,
                 channels: int = 3):
        super().__init__()
        self.image_size, self.patch_size, self.tubelet = image_size, patch_size, tubelet
        self.grid = image_size // patch_size
        self.max_steps = -(-max_frames // tubelet)
        self.proj = nn.Linear(channels * tubelet * patch_size**2, dim)
        self.spatial = _init_pos(nn.Parameter(torch.zeros(self.grid * self.grid, dim)))
        self.temporal = _init_pos(nn.Parameter(torch.zeros(self.max_steps, dim)))

    def num_tokens(self, frames: int) -> int:
        """How many visual tokens a clip of ``frames`` frames becomes."""
        return -(-frames // self.tubelet) * self.grid * self.grid

    def forward(self, video: Tensor) -> Tensor:
        b, t = video.shape[:2]
        pad = (-t) % self.tubelet
        if pad:
            video = torch.cat([video, video[:, -1:].expand(b, pad, *video.shape[2:])], dim=1)
        x = rearrange(video, "b (t pt) c (gh ph) (gw pw) -> b t (gh gw) (pt ph pw c)",
                      pt=self.tubelet, ph=self.patch_size, pw=self.patch_size)
        x = self.proj(x) + self.spatial + self.temporal[: x.shape[1], None, :]
        return rearrange(x, "b t n d -> b (t n) d")


class SpectrogramEmbed(nn.Module):
    """Cut a log-mel spectrogram ``[B, n_mels, F]`` (``F <= max_frames``) into
    non-overlapping ``patch_mel x patch_time`` patches (AST-style) and project
    each linearly to ``dim``; returns ``[B, (n_mels / patch_mel) *
    ceil(F / patch_time), dim]``.

    Tokens are frequency-major: token ``r * T + t`` is mel-patch row ``r``
    (row 0: the lowest mel bins) at time patch ``t`` of ``T``. Each gets a
    learned frequency position (per row) and time position (per time patch),
    so a shorter clip is simply fewer time patches. The time axis is
    zero-padded to a multiple of ``patch_time``: zero is the training mean of
    a normalised spectrogram, which adds no energy the clip does not have.
    """

    def __init__(self, n_mels: int, max_frames: int, patch_mel: int, patch_time: int, dim: int):
        super().__init__()
        if n_mels % patch_mel:
            raise ValueError(f"SpectrogramEmbed: patch_mel={patch_mel} does not divide n_mels={n_mels}")
        self.n_mels, self.max_frames, self.patch_mel, self.patch_time = n_mels, max_frames, patch_mel, patch_time
        self.rows = n_mels // patch_mel
        self.max_steps = -(-max_frames // patch_time)
        self.proj = nn.Linear(patch_mel * patch_time, dim)
        self.frequency = _init_pos(nn.Parameter(torch.zeros(self.rows, dim)))
        self.time = _init_pos(nn.Parameter(torch.zeros(self.max_steps, dim)))

    def num_tokens(self, frames: int) -> int:
        """How many audio tokens a spectrogram of ``frames`` frames becomes."""
        return self.rows * -(-frames // self.patch_time)

    def forward(self, spec: Tensor) -> Tensor:
        pad = (-spec.shape[2]) % self.patch_time
        if pad:
            spec = nn.functional.pad(spec, (0, pad))
        x = rearrange(spec, "b (r pm) (t pt) -> b r t (pm pt)", pm=self.patch_mel, pt=self.patch_time)
        x = self.proj(x) + self.frequency[:, None, :] + self.time[: x.shape[2]]
        return rearrange(x, "b r t d -> b (r t) d")


class TextEmbed(nn.Module):
    """Token embedding plus a learned 1D position embedding."""

    def __init__(self, vocab_size: int, max_len: int, dim: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.position = _init_pos(nn.Parameter(torch.zeros(max_len, dim)))
        nn.init.trunc_normal_(self.tokens.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.tokens(ids) + self.position[: ids.shape[1]]


class ModalityEmbed(nn.Module):
    """One learned vector per modality, added to that modality's tokens.

    ``modalities`` is their names (``("video", "audio", "text")``: any number)
    or a count; ``forward`` takes a name or an index."""

    def __init__(self, modalities: int | Sequence[str], dim: int):
        super().__init__()
        self.names = [str(i) for i in range(modalities)] if isinstance(modalities, int) else list(modalities)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"ModalityEmbed: modality names must be distinct, got {self.names}")
        self.table = _init_pos(nn.Parameter(torch.zeros(len(self.names), dim)))

    def forward(self, x: Tensor, modality: int | str) -> Tensor:
        if isinstance(modality, str):
            if modality not in self.names:
                raise ValueError(f"modality {modality!r}: this embedding knows {self.names}")
            modality = self.names.index(modality)
        return x + self.table[modality]
